//! The operator's HTTP listener shared by the relay and the hub connector: Prometheus
//! `/metrics` and `/healthz` over HTTP/1.1 (`hyper`), GET/HEAD only, on a TCP listener of its
//! own (never the QUIC port). What the numbers are and when the service is healthy is the
//! caller's, through [`OpsSource`]; this module owns the serving, and [`probe_health`], the
//! client side that `keyway-relay health` (a container's `HEALTHCHECK`) runs against it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Content type of the Prometheus text exposition format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the listener serves.
pub trait OpsSource: Send + Sync + 'static {
    /// The Prometheus text exposition of the current numbers.
    fn metrics(&self) -> String;
    /// `Ok` while healthy; `Err(why)` is answered with 503 and `why`.
    fn health(&self) -> Result<(), &'static str>;
}

/// Serves `listener` until the returned task is aborted. Returns the bound address (with the
/// real port if `:0` was asked for) and the serving task.
pub fn serve<S: OpsSource>(
    listener: TcpListener,
    source: Arc<S>,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Typically EMFILE; back off a little instead of spinning.
                    tracing::debug!("metrics listener: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let source = Arc::clone(&source);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let source = Arc::clone(&source);
                    async move { Ok::<_, Infallible>(respond(source.as_ref(), &req)) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!("metrics connection ended: {e}");
                }
            });
        }
    });
    Ok((local, task))
}

fn text(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

fn respond<S: OpsSource>(source: &S, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET or HEAD only\n".into());
    }
    match req.uri().path() {
        "/metrics" => text(StatusCode::OK, PROMETHEUS_TEXT, source.metrics()),
        "/healthz" => match source.health() {
            Ok(()) => text(StatusCode::OK, "text/plain", "ok\n".into()),
            Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("{why}\n")),
        },
        _ => text(StatusCode::NOT_FOUND, "text/plain", "try /metrics or /healthz\n".into()),
    }
}

/// Why [`probe_health`] found the service not healthy.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error(
        "cannot reach the metrics listener at {addr} (is the relay running with its metrics listener there?)"
    )]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("the metrics listener at {addr} did not answer in time")]
    Timeout { addr: SocketAddr },
    #[error("the metrics listener at {addr} failed while answering")]
    Io { addr: SocketAddr, source: std::io::Error },
    #[error("the metrics listener at {addr} sent no HTTP answer")]
    Malformed { addr: SocketAddr },
    #[error("unhealthy: {addr}/healthz answered {status}: {why}")]
    Unhealthy { addr: SocketAddr, status: u16, why: String },
}

/// The address to probe for a listener bound to `listen`: a wildcard bind is reached on
/// loopback of the same family.
pub fn probe_address(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// Splits an HTTP/1.x answer into its status code and body (the text after the head), or
/// `None` if it is not one.
pub fn parse_answer(answer: &str) -> Option<(u16, &str)> {
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((answer, ""));
    let status_line = head.lines().next()?;
    let mut parts = status_line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let status = parts.next()?.parse().ok()?;
    Some((status, body))
}

/// Asks `GET /healthz` of the listener at `addr` (blocking, for a CLI), all within `timeout`.
/// `Ok` holds the body of a 200 answer.
pub fn probe_health(addr: SocketAddr, timeout: std::time::Duration) -> Result<String, HealthError> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|source| {
        if source.kind() == std::io::ErrorKind::TimedOut {
            HealthError::Timeout { addr }
        } else {
            HealthError::Connect { addr, source }
        }
    })?;
    let io = |source: std::io::Error| match source.kind() {
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => HealthError::Timeout { addr },
        _ => HealthError::Io { addr, source },
    };
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(io)?;
    let mut answer = Vec::new();
    // The answer is a few lines; more than this is not our listener.
    stream.take(64 * 1024).read_to_end(&mut answer).map_err(io)?;
    let answer = String::from_utf8_lossy(&answer);
    let (status, body) = parse_answer(&answer).ok_or(HealthError::Malformed { addr })?;
    let body = body.trim().to_owned();
    if status == 200 {
        Ok(body)
    } else {
        Err(HealthError::Unhealthy { addr, status, why: body })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse_into_status_and_body() {
        assert_eq!(parse_answer("HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n"), Some((200, "ok\n")));
        assert_eq!(
            parse_answer("HTTP/1.1 503 Service Unavailable\r\n\r\ndraining\n"),
            Some((503, "draining\n"))
        );
        assert_eq!(parse_answer("SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(parse_answer(""), None);
    }

    #[test]
    fn wildcard_binds_are_probed_on_loopback() {
        assert_eq!(probe_address("0.0.0.0:9464".parse().unwrap()), "127.0.0.1:9464".parse().unwrap());
        assert_eq!(probe_address("[::]:9464".parse().unwrap()), "[::1]:9464".parse().unwrap());
        assert_eq!(probe_address("10.1.2.3:9464".parse().unwrap()), "10.1.2.3:9464".parse().unwrap());
    }

    struct Fixed(Result<(), &'static str>);
    impl OpsSource for Fixed {
        fn metrics(&self) -> String {
            String::new()
        }
        fn health(&self) -> Result<(), &'static str> {
            self.0
        }
    }

    async fn probe_of(health: Result<(), &'static str>) -> Result<String, HealthError> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, task) = serve(listener, Arc::new(Fixed(health))).unwrap();
        let result =
            tokio::task::spawn_blocking(move || probe_health(addr, std::time::Duration::from_secs(20)))
                .await
                .unwrap();
        task.abort();
        result
    }

    #[tokio::test]
    async fn the_probe_reads_the_listeners_verdict() {
        assert_eq!(probe_of(Ok(())).await.unwrap(), "ok");
        let err = probe_of(Err("draining")).await.unwrap_err();
        assert!(
            matches!(&err, HealthError::Unhealthy { status: 503, why, .. } if why == "draining"),
            "{err:?}"
        );
        // Nothing listening: a typed connect error.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let err = probe_health(closed, std::time::Duration::from_secs(5)).unwrap_err();
        assert!(matches!(err, HealthError::Connect { .. }), "{err:?}");
    }
}
