//! Plain HTTP/1.1 GETs against the operator listeners (`/metrics`, `/healthz`) of the relay and
//! the hub connector, and reading one series out of a Prometheus exposition. Waits are bounded by
//! [`PATIENCE`].

use crate::PATIENCE;

/// GETs `path` from `addr` (`host:port`) on a plain thread: (status code, body).
pub fn get_blocking(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the HTTP listener");
    stream.set_read_timeout(Some(PATIENCE)).expect("set a read timeout");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: keyway-test\r\nConnection: close\r\n\r\n")
        .expect("send the request");
    let mut raw = String::new();
    stream.read_to_string(&mut raw).expect("read the response");
    parse(&raw)
}

/// GETs `path` from `addr`: (status code, body).
#[cfg(feature = "async")]
pub async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use crate::within;
    let mut stream = within("HTTP connect", tokio::net::TcpStream::connect(addr))
        .await
        .expect("connect to the HTTP listener");
    let request = format!("GET {path} HTTP/1.1\r\nHost: keyway-test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send the request");
    let mut raw = String::new();
    within("HTTP response", stream.read_to_string(&mut raw)).await.expect("read the response");
    parse(&raw)
}

fn parse(raw: &str) -> (u16, String) {
    let status = raw.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("an HTTP status line");
    (status, raw.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
}

/// The value of one series, `name{labels}` exactly as exposed (e.g.
/// `keyway_relay_limit{limit="max_hubs"}`), if it is there and a number.
pub fn series(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    #[test]
    fn series_matches_the_exact_name_and_labels() {
        let text = "# HELP x\nkeyway_up{relay=\"a\"} 1\nkeyway_up{relay=\"ab\"} 0\nkeyway_up_total 7\n";
        assert_eq!(super::series(text, "keyway_up{relay=\"a\"}"), Some(1.0));
        assert_eq!(super::series(text, "keyway_up{relay=\"ab\"}"), Some(0.0));
        assert_eq!(super::series(text, "keyway_up"), None);
        assert_eq!(super::series(text, "keyway_up_total"), Some(7.0));
    }

    #[test]
    fn a_response_splits_into_status_and_body() {
        assert_eq!(
            super::parse("HTTP/1.1 503 Service Unavailable\r\nA: b\r\n\r\ndraining\n"),
            (503, "draining\n".into())
        );
    }
}
