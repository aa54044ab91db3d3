//! Helpers shared by the hub connector's integration tests (real in-process relays, real
//! UDP on loopback): identities, a TCP echo service, and a bounded wait. Not every test file
//! uses every helper.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use keyway_proto::{HubName, Identity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Guards against hangs only; nothing asserts how long anything took.
pub const PATIENCE: Duration = Duration::from_secs(30);
pub fn id(seed: u8) -> Identity {
    let mut bytes = [seed; 32];
    bytes[0] = 0x4b;
    Identity::from_seed(bytes)
}
pub fn home() -> HubName {
    HubName::new("home").unwrap()
}
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "gave up waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
pub async fn echo_service() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}
pub async fn echo_once(stream: &mut keyway_client::HubStream, data: &[u8]) -> std::io::Result<Vec<u8>> {
    stream.write_all(data).await?;
    stream.flush().await?;
    let mut back = vec![0u8; data.len()];
    stream.read_exact(&mut back).await?;
    Ok(back)
}
