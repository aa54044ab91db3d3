//! A raw protocol peer for adversarial tests: dials the relay with any key and sends whatever
//! bytes a test wants, bypassing the well-behaved client library.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use keyway_proto::codec::Frame;
use keyway_proto::io::{read_frame, FrameIoError};
use keyway_proto::{Identity, PublicKey, ALPN_RELAY};

/// One QUIC client endpoint that many raw connections can share (one UDP socket).
pub fn endpoint() -> quinn::Endpoint {
    quinn::Endpoint::client("127.0.0.1:0".parse().expect("literal address")).expect("bind client endpoint")
}

/// Completes a QUIC handshake with the relay as `identity`, pinning `relay_key`.
pub async fn dial(
    endpoint: &quinn::Endpoint,
    relay: SocketAddr,
    relay_key: PublicKey,
    identity: &Identity,
) -> anyhow::Result<quinn::Connection> {
    let (crypto, _) = keyway_proto::tls::quic_client_crypto(identity, relay_key, ALPN_RELAY)?;
    let mut config = quinn::ClientConfig::new(crypto);
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(Duration::from_secs(30).try_into()?));
    config.transport_config(Arc::new(transport));
    let conn = endpoint.connect_with(config, relay, keyway_proto::tls::SERVER_NAME)?.await?;
    Ok(conn)
}

/// Opens a stream, writes `bytes` (then FIN if `finish`), and reads the relay's answer frame.
pub async fn send_raw(conn: &quinn::Connection, bytes: &[u8], finish: bool) -> Result<Frame, FrameIoError> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| FrameIoError::Io(e.into()))?;
    send.write_all(bytes).await.map_err(|e| FrameIoError::Io(e.into()))?;
    if finish {
        let _ = send.finish();
    }
    read_frame(&mut recv).await
}

/// Encodes a frame (test helper: frames built here are always valid).
pub fn encode(frame: &Frame) -> Vec<u8> {
    frame.encode().expect("test frames encode")
}
