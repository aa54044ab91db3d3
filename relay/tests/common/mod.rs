//! Helpers shared by the relay's integration tests: a closed-policy relay in this process and a
//! raw quinn peer built from `keyway_proto` that speaks frames directly (no hub connector, no
//! client library), so every frame is visible to the test. Not every test file uses every
//! helper.
#![allow(dead_code, unused_imports)]

use std::net::SocketAddr;
use std::path::PathBuf;

pub use keyway_proto::io::{read_frame, write_frame};
pub use keyway_proto::{Frame, HubName, Identity, PublicKey, RefusalReason, SessionPurpose, ALPN_RELAY};
pub use keyway_relay::{codes, Limits, NamePolicy, Relay, RelayConfig, RelayHandle};
pub use keyway_test_support::raw;
pub use keyway_test_support::raw::{app_code, hub_accepts, open_session, ping, refusal_of, Control};
pub use keyway_test_support::{eventually, identity, name, within, PATIENCE};
pub use quinn::{Connection, RecvStream, SendStream};

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
    let (endpoint, conn) =
        keyway_test_support::raw::connect(relay.local_addr(), relay.public_key(), id).await;
    (conn, endpoint.local_addr().unwrap())
}

/// Registers `hub` on a new control stream: the stream and the relay's answer.
pub async fn register(
    conn: &Connection,
    hub: &str,
    apps: &[PublicKey],
    pairing_open: bool,
) -> (Control, Frame) {
    within("register answer", keyway_test_support::raw::register(conn, name(hub), apps, pairing_open))
        .await
        .unwrap()
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
