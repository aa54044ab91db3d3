//! The hub does not flood its service (issue 28, item 6): a burst of downloads through one
//! `keyway forward` to a service with a listen backlog of 5 that is slow to accept is answered
//! in full, because the hub bounds its connects in flight and queues the rest; and a service
//! that closes connections without answering is counted in the hub's metrics.
//!
//! Real binaries throughout (relay, hub, `keyway forward`); the service is a plain TCP listener
//! in this process.

use std::net::SocketAddr;
use std::time::Duration;

use keyway_e2e::*;
use keyway_test_support::child::Lines;
use keyway_test_support::eventually_blocking;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Concurrent downloads in the burst (the figure).
const DOWNLOADS: usize = 400;
/// Body size of each download.
const BODY: usize = 64 * 1024;

/// An HTTP/1.1 service listening with a backlog of 5 that accepts one connection every
/// `accept_every` (a busy single-threaded server) and answers each with `BODY` bytes.
async fn slow_service(accept_every: Duration) -> SocketAddr {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(5).unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let body = payload(BODY, 7);
        while let Ok((mut stream, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer =
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                let _ = stream.write_all(answer.as_bytes()).await;
                let _ = stream.write_all(&body).await;
                let _ = stream.shutdown().await;
            });
            tokio::time::sleep(accept_every).await;
        }
    });
    addr
}

/// A service that takes every connection and closes it without a byte.
async fn mute_service() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            drop(stream);
        }
    });
    addr
}

/// One download through the forwarder: whether the whole answer came.
async fn download(port: u16) -> Result<(), String> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.map_err(|e| format!("after {} bytes: {e}", answer.len()))?;
    if answer.is_empty() {
        return Err("closed with no byte".into());
    }
    let head_end = answer.windows(4).position(|w| w == b"\r\n\r\n").ok_or("no HTTP head")? + 4;
    if !answer.starts_with(b"HTTP/1.1 200") || answer.len() - head_end != BODY {
        return Err(format!(
            "{} bytes, head {:?}",
            answer.len(),
            String::from_utf8_lossy(&answer[..head_end.min(40)])
        ));
    }
    Ok(())
}

/// Relay, hub (forwarding to `service`, with `hub_flags`) and `keyway forward`, as binaries.
/// Returns the processes, the forwarder's port and the hub's metrics address.
fn stack(dir: &std::path::Path, service: SocketAddr, hub_flags: &[&str]) -> (Vec<Bin>, u16, SocketAddr) {
    let (ok, out, err) = Bin::run("keyway", &["keygen", "--out", "hub.key"], dir);
    assert!(ok, "{err}");
    let hub_key = out.split_whitespace().find(|w| w.starts_with("kw")).unwrap().to_owned();
    let (ok, out, err) = Bin::run("keyway", &["keygen", "--out", "app.key"], dir);
    assert!(ok, "{err}");
    let app_key = out.split_whitespace().find(|w| w.starts_with("kw")).unwrap().to_owned();
    std::fs::write(dir.join("authorized_hubs"), format!("home {hub_key}\n")).unwrap();
    std::fs::write(dir.join("authorized_apps"), format!("{app_key} downloader\n")).unwrap();

    let relay_addr = format!("127.0.0.1:{}", free_udp_port());
    let mut relay = Bin::spawn("keyway-relay", &["run", "--listen", &relay_addr, "--no-metrics"], dir);
    let mut lines = Lines::new(relay.child.stdout.take().unwrap());
    let relay_key = lines.until("the relay's public key", |l| {
        l.strip_prefix("relay public key: ").map(|k| k.trim().to_owned())
    });
    let hub_metrics: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
    let (service, metrics) = (service.to_string(), hub_metrics.to_string());
    let mut args = vec![
        "run",
        "--relay",
        &relay_addr,
        "--relay-key",
        &relay_key,
        "--name",
        "home",
        "--key",
        "hub.key",
        "--apps",
        "authorized_apps",
        "--forward",
        &service,
        "--metrics-listen",
        &metrics,
    ];
    args.extend(hub_flags);
    let hub = Bin::spawn("keyway-hub", &args, dir);
    let port = free_tcp_port();
    let listen = format!("127.0.0.1:{port}");
    let forward = Bin::spawn(
        "keyway",
        &[
            "forward",
            "--relay",
            &relay_addr,
            "--relay-key",
            &relay_key,
            "--hub",
            "home",
            "--hub-key",
            &hub_key,
            "--key",
            "app.key",
            "--listen",
            &listen,
        ],
        dir,
    );
    eventually_blocking("the hub registered (its /healthz is 200)", || {
        keyway_proto::ops_http::probe_health(hub_metrics, Duration::from_secs(5)).ok()
    });
    (vec![relay, hub, forward], port, hub_metrics)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_downloads_to_a_service_with_a_backlog_of_5_is_answered_in_full() {
    let dir = tempfile::tempdir().unwrap();
    let service = slow_service(Duration::from_millis(2)).await;
    let extra: Vec<String> = std::env::var("KEYWAY_TEST_HUB_FLAGS")
        .map(|f| f.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let (_procs, port, hub_metrics) = stack(dir.path(), service, &extra);
    // The forwarder is up once one download goes through.
    eventually("a first download through keyway forward", || async { download(port).await.ok() }).await;

    let downloads: Vec<_> = (0..DOWNLOADS).map(|_| tokio::spawn(download(port))).collect();
    let mut failures = Vec::new();
    for task in downloads {
        if let Err(e) = task.await.unwrap() {
            failures.push(e);
        }
    }
    let text = scrape(hub_metrics).unwrap_or_default();
    let unanswered = metric(&text, "keyway_hub_service_unanswered_total", &[]);
    assert!(
        failures.is_empty(),
        "{} of {DOWNLOADS} downloads failed (service_unanswered_total {unanswered}); first: {:?}",
        failures.len(),
        failures.first()
    );
    assert_eq!(unanswered, 0.0, "no connection may end unanswered");
    eventually("the hub's connects in flight drop to 0", || async {
        let text = scrape(hub_metrics)?;
        (metric(&text, "keyway_hub_service_connects_in_flight", &[]) == 0.0
            && metric(&text, "keyway_hub_service_connects_waiting", &[]) == 0.0)
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_closing_without_answering_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let service = mute_service().await;
    let (_procs, port, hub_metrics) = stack(dir.path(), service, &[]);
    // Each attempt is closed with no byte (the service's doing, passed on to the caller).
    let count = eventually("the hub counts a connection the service closed unanswered", || async {
        let _ = download(port).await;
        let text = scrape(hub_metrics)?;
        let count = metric(&text, "keyway_hub_service_unanswered_total", &[]);
        (count >= 3.0).then_some(count)
    })
    .await;
    assert!(count >= 3.0);
    let answered = download(port).await;
    assert_eq!(answered, Err("closed with no byte".to_owned()));
}
