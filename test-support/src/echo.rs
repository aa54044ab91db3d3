//! The TCP echo service that stands in for the hub's local service (Home Assistant, a NAS) in
//! tests and benchmarks: whatever a session sends comes back, so a test checks a round trip
//! byte for byte without a service of its own.

use std::net::SocketAddr;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

/// A loopback TCP service that writes `banner` (may be empty) to each connection, then echoes
/// everything back, and closes its write side when the peer closes its own (half-close is
/// honoured, so a sender can read the whole echo after finishing). `TCP_NODELAY` is set, as a
/// hub's local service should have it. Serves until the runtime ends.
pub async fn echo_service(banner: &'static [u8]) -> SocketAddr {
    try_echo_service(banner).await.expect("bind the echo service on loopback")
}

/// [`echo_service`] for callers that report errors instead of failing a test (the load
/// generator).
pub async fn try_echo_service(banner: &'static [u8]) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = stream.set_nodelay(true);
                let (mut r, mut w) = stream.into_split();
                if w.write_all(banner).await.is_err() {
                    return;
                }
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn banner_then_echo_until_half_close() {
        let addr = super::echo_service(b"hi\n").await;
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(b"ping").await.unwrap();
        stream.shutdown().await.unwrap();
        let mut back = Vec::new();
        stream.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"hi\nping");
    }
}
