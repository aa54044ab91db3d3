//! Helpers shared by the relay's integration tests: a closed-policy relay in this process and a
//! raw quinn peer built from `keyway_proto` that speaks frames directly (no hub connector, no
//! client library), so every frame is visible to the test. Not every test file uses every
//! helper.
#![allow(dead_code, unused_imports)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

pub use keyway_proto::io::{read_frame, write_frame};
pub use keyway_proto::tls::quic_client_crypto;
pub use keyway_proto::{Frame, HubName, Identity, PublicKey, RefusalReason, SessionPurpose, ALPN_RELAY};
pub use keyway_relay::{codes, Limits, NamePolicy, Relay, RelayConfig, RelayHandle};
pub use quinn::{Connection, RecvStream, SendStream};

/// Guards against hangs only; nothing here asserts on elapsed time.
pub const PATIENCE: Duration = Duration::from_secs(20);

pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, fut).await.unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// Polls `check` until it holds (state that settles asynchronously on the relay).
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    within(what, async {
        while !check() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

pub static SEED: AtomicU8 = AtomicU8::new(1);

pub fn identity() -> Identity {
    Identity::from_seed([SEED.fetch_add(1, Ordering::Relaxed); 32])
}

pub fn name(n: &str) -> HubName {
    HubName::new(n).unwrap()
}

pub struct TestRelay {
    pub dir: tempfile::TempDir,
    pub hubs_file: PathBuf,
    pub handle: RelayHandle,
}

pub fn write_hubs(path: &PathBuf, hubs: &[(&str, PublicKey)]) {
    let text: String = hubs.iter().map(|(n, k)| format!("{n} {k}\n")).collect();
    std::fs::write(path, format!("# test hubs\n{text}")).unwrap();
}

/// A closed-policy relay admitting `hubs`, with the default limits.
pub async fn closed_relay(hubs: &[(&str, PublicKey)]) -> TestRelay {
    relay_with(hubs, Limits::default()).await
}

/// A closed-policy relay with a metrics listener on a free loopback port and `limits`.
pub async fn relay_with(hubs: &[(&str, PublicKey)], limits: Limits) -> TestRelay {
    let dir = tempfile::tempdir().unwrap();
    let hubs_file = dir.path().join("authorized_hubs");
    write_hubs(&hubs_file, hubs);
    let policy = NamePolicy::Closed { hubs_file: hubs_file.clone() };
    let mut config = RelayConfig::new("127.0.0.1:0".parse().unwrap(), identity(), policy);
    config.limits = limits;
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let handle = Relay::start(config).await.unwrap();
    TestRelay { dir, hubs_file, handle }
}

/// A QUIC connection to the relay from its own endpoint (so each has its own address).
pub async fn connect(relay: &RelayHandle, id: &Identity) -> Connection {
    connect_from(relay, id).await.0
}

/// Also returns the client's own UDP address.
pub async fn connect_from(relay: &RelayHandle, id: &Identity) -> (Connection, SocketAddr) {
    let (crypto, _) = quic_client_crypto(id, relay.public_key(), ALPN_RELAY).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(crypto));
    let local = endpoint.local_addr().unwrap();
    let connecting = endpoint.connect(relay.local_addr(), keyway_proto::tls::SERVER_NAME).unwrap();
    (within("connect", connecting).await.unwrap(), local)
}

pub struct Control {
    pub send: SendStream,
    pub recv: RecvStream,
}

pub async fn register(
    conn: &Connection,
    hub: &str,
    apps: &[PublicKey],
    pairing_open: bool,
) -> (Control, Frame) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let frame = Frame::Register { name: name(hub), allowed_apps: apps.to_vec(), pairing_open };
    write_frame(&mut send, &frame).await.unwrap();
    let answer = within("register answer", read_frame(&mut recv)).await.unwrap();
    (Control { send, recv }, answer)
}

pub async fn registered_hub(
    relay: &RelayHandle,
    id: &Identity,
    hub: &str,
    apps: &[PublicKey],
) -> (Connection, Control) {
    let conn = connect(relay, id).await;
    let (control, answer) = register(&conn, hub, apps, false).await;
    assert_eq!(answer, Frame::Registered { replaced: false });
    (conn, control)
}

pub async fn open_session(
    conn: &Connection,
    hub: &str,
    hub_key: PublicKey,
    purpose: SessionPurpose,
) -> (SendStream, RecvStream) {
    let (mut send, recv) = conn.open_bi().await.unwrap();
    write_frame(&mut send, &Frame::SessionOpen { hub: name(hub), hub_key, purpose }).await.unwrap();
    (send, recv)
}

pub async fn refusal_of(recv: &mut RecvStream) -> (RefusalReason, String) {
    match within("refusal", read_frame(recv)).await.unwrap() {
        Frame::Refused { reason, message } => (reason, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// The hub side of an accepted session: announce read, `SessionAccepted` sent.
pub async fn hub_accepts(hub: &Connection) -> (SendStream, RecvStream, PublicKey, SocketAddr) {
    let (mut send, mut recv) = within("hub gets a stream", hub.accept_bi()).await.unwrap();
    let Frame::SessionAnnounce { app_key, observed, purpose: _ } = read_frame(&mut recv).await.unwrap()
    else {
        panic!("expected SessionAnnounce")
    };
    write_frame(&mut send, &Frame::SessionAccepted).await.unwrap();
    (send, recv, app_key, observed)
}

pub async fn ping(control: &mut Control, nonce: u64) {
    write_frame(&mut control.send, &Frame::Ping { nonce }).await.unwrap();
    assert_eq!(within("pong", read_frame(&mut control.recv)).await.unwrap(), Frame::Pong { nonce });
}

pub fn app_code(err: quinn::ConnectionError) -> Option<u64> {
    match err {
        quinn::ConnectionError::ApplicationClosed(close) => Some(close.error_code.into_inner()),
        _ => None,
    }
}
