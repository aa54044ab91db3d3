//! A raw protocol peer: a quinn client that speaks the relay's wire (`keyway_proto` frames) by
//! itself, without the hub connector or the client library, so a test chooses and sees every
//! frame. The relay's own tests register hubs and open sessions with it, e2e's attackers send
//! malformed bytes with it, and the load generator registers thousands of idle hubs with it
//! (over one shared endpoint and its own transport settings: [`client_config`] +
//! [`dial_with`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use keyway_proto::io::{read_frame, write_frame, FrameIoError};
use keyway_proto::tls::TlsConfigError;
use keyway_proto::{Frame, HubName, Identity, PublicKey, RefusalReason, SessionPurpose, ALPN_RELAY};
use quinn::{Connection, RecvStream, SendStream};

use crate::ids::name;
use crate::wait::within;

/// The idle timeout of a raw peer's connection: quinn's default, stated so that a peer never
/// outlives [`crate::PATIENCE`] by more than it without traffic.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a raw peer could not connect.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("client crypto config: {0}")]
    Crypto(#[from] TlsConfigError),
    #[error("starting the QUIC handshake: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// quinn's own text, unchanged: a refused connection says "refused".
    #[error(transparent)]
    Handshake(#[from] quinn::ConnectionError),
}

/// One client endpoint on a loopback port, which many raw connections can share (one UDP
/// socket, one source address).
pub fn endpoint() -> quinn::Endpoint {
    quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind a client endpoint")
}

/// The client config of a peer that is `identity` and pins `relay_key`, with the default
/// transport (callers may set their own).
pub fn client_config(
    identity: &Identity,
    relay_key: PublicKey,
) -> Result<quinn::ClientConfig, TlsConfigError> {
    let (crypto, _) = keyway_proto::tls::quic_client_crypto(identity, relay_key, ALPN_RELAY)?;
    Ok(quinn::ClientConfig::new(crypto))
}

/// Completes a QUIC handshake with the relay at `relay` as `identity`, pinning `relay_key`.
pub async fn dial(
    endpoint: &quinn::Endpoint,
    relay: SocketAddr,
    relay_key: PublicKey,
    identity: &Identity,
) -> Result<Connection, DialError> {
    let mut config = client_config(identity, relay_key)?;
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(IDLE_TIMEOUT.try_into().expect("30 s is a valid idle timeout")));
    config.transport_config(Arc::new(transport));
    dial_with(endpoint, relay, config).await
}

/// Completes a QUIC handshake with `config` (from [`client_config`], transport of the caller's).
pub async fn dial_with(
    endpoint: &quinn::Endpoint,
    relay: SocketAddr,
    config: quinn::ClientConfig,
) -> Result<Connection, DialError> {
    Ok(endpoint.connect_with(config, relay, keyway_proto::tls::SERVER_NAME)?.await?)
}

/// A connection from an endpoint of its own (so each peer has its own source address); fails
/// the test if the handshake fails or takes longer than [`crate::PATIENCE`]. The endpoint is
/// returned for its address; dropping it does not close the connection.
pub async fn connect(
    relay: SocketAddr,
    relay_key: PublicKey,
    identity: &Identity,
) -> (quinn::Endpoint, Connection) {
    let endpoint = endpoint();
    let conn = within("connect", dial(&endpoint, relay, relay_key, identity)).await.expect("raw handshake");
    (endpoint, conn)
}

/// A hub's control stream (the first bidirectional stream, carrying `Register`).
pub struct Control {
    pub send: SendStream,
    pub recv: RecvStream,
}

/// Opens the control stream, sends `Register` and reads the relay's answer frame.
pub async fn register(
    conn: &Connection,
    hub: HubName,
    allowed_apps: &[PublicKey],
    pairing_open: bool,
) -> Result<(Control, Frame), FrameIoError> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| FrameIoError::Io(e.into()))?;
    let frame = Frame::Register { name: hub, allowed_apps: allowed_apps.to_vec(), pairing_open };
    write_frame(&mut send, &frame).await?;
    let answer = read_frame(&mut recv).await?;
    Ok((Control { send, recv }, answer))
}

/// Sends a `Ping` on the control stream and checks the `Pong` that answers it.
pub async fn ping(control: &mut Control, nonce: u64) {
    write_frame(&mut control.send, &Frame::Ping { nonce }).await.expect("write Ping");
    assert_eq!(
        within("pong", read_frame(&mut control.recv)).await.expect("read Pong"),
        Frame::Pong { nonce }
    );
}

/// An app's channel stream: `ChannelOpen` for `hub` sent, the answer not yet read.
pub async fn open_session(
    conn: &Connection,
    hub: &str,
    hub_key: PublicKey,
    purpose: SessionPurpose,
) -> (SendStream, RecvStream) {
    let (mut send, recv) = conn.open_bi().await.expect("open a channel stream");
    write_frame(
        &mut send,
        &Frame::ChannelOpen {
            hub: name(hub),
            hub_key,
            purpose,
            channel: keyway_proto::channel::ChannelId::random().expect("channel id"),
        },
    )
    .await
    .expect("write ChannelOpen");
    (send, recv)
}

/// The refusal the relay answers on `recv` (fails the test on any other frame).
pub async fn refusal_of(recv: &mut RecvStream) -> (RefusalReason, String) {
    match within("refusal", read_frame(recv)).await.expect("read the answer") {
        Frame::Refused { reason, message } => (reason, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// The hub side of an accepted channel: the announce read, `ChannelAccepted` sent. Returns the
/// streams, the app's key and the address the relay observed for it.
pub async fn hub_accepts(hub: &Connection) -> (SendStream, RecvStream, PublicKey, SocketAddr) {
    let (mut send, mut recv) = within("hub gets a stream", hub.accept_bi()).await.expect("accept a stream");
    let Frame::ChannelAnnounce { app_key, observed, .. } =
        read_frame(&mut recv).await.expect("read the announce")
    else {
        panic!("expected ChannelAnnounce")
    };
    write_frame(&mut send, &Frame::ChannelAccepted).await.expect("write ChannelAccepted");
    (send, recv, app_key, observed)
}

/// Sends `data` on a new stream of `conn` (then FIN) and returns everything the peer sent
/// back before its own FIN: a round trip through an echoing peer, writing and reading at once
/// so that flow control never stalls a transfer larger than the windows.
pub async fn echo_on(conn: &Connection, data: &[u8]) -> Vec<u8> {
    let (mut send, mut recv) = conn.open_bi().await.expect("open a stream");
    let data = data.to_vec();
    let writer = tokio::spawn(async move {
        send.write_all(&data).await.expect("write the payload");
        send.finish().expect("finish the stream");
    });
    let back = within("the echo", recv.read_to_end(usize::MAX)).await.expect("read the echo");
    writer.await.expect("writer task");
    back
}

/// Opens a stream, writes `bytes` (then FIN if `finish`), and reads the relay's answer frame.
pub async fn send_raw(conn: &Connection, bytes: &[u8], finish: bool) -> Result<Frame, FrameIoError> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| FrameIoError::Io(e.into()))?;
    send.write_all(bytes).await.map_err(|e| FrameIoError::Io(e.into()))?;
    if finish {
        let _ = send.finish();
    }
    read_frame(&mut recv).await
}

/// Encodes a frame (frames built by tests are valid by construction).
pub fn encode(frame: &Frame) -> Vec<u8> {
    frame.encode().expect("test frames encode")
}

/// The application close code of a connection error, if the peer closed with one.
pub fn app_code(err: quinn::ConnectionError) -> Option<u64> {
    match err {
        quinn::ConnectionError::ApplicationClosed(close) => Some(close.error_code.into_inner()),
        _ => None,
    }
}
