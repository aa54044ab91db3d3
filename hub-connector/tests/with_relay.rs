//! Hub-side behaviour against a real in-process relay: revocation of live sessions, apps added
//! without a restart, and an unreachable local service. Waits poll with a generous deadline;
//! nothing asserts how long anything took.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use keyway_client::{Client, ClientConfig, ClientError};
use keyway_hub::{HubConfig, HubHandle};
use keyway_proto::{Identity, PublicKey, RefusalReason};
use keyway_relay::{NamePolicy, Relay, RelayConfig, RelayHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::*;

fn write_apps(path: &Path, apps: &[PublicKey]) {
    let text: String = apps.iter().map(|k| format!("{k} test app\n")).collect();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

struct World {
    dir: tempfile::TempDir,
    relay: RelayHandle,
    hub: HubHandle,
    hub_key: PublicKey,
}

async fn world(relay_seed: u8, hub_seed: u8, apps: &[PublicKey], service: SocketAddr) -> World {
    let dir = tempfile::tempdir().unwrap();
    let hub_id = identity_for(hub_seed, 0);
    let hub_key = hub_id.public_key();
    let hubs_file = dir.path().join("authorized_hubs");
    std::fs::write(&hubs_file, format!("home {hub_key}\n")).unwrap();
    let policy = NamePolicy::Closed { hubs_file };
    let relay =
        Relay::start(RelayConfig::new("127.0.0.1:0".parse().unwrap(), identity_for(relay_seed, 0), policy))
            .await
            .unwrap();
    let apps_file = dir.path().join("authorized_apps");
    write_apps(&apps_file, apps);
    let mut config =
        HubConfig::new(relay.local_addr(), relay.public_key(), home(), hub_id, apps_file, service);
    config.backoff_max = Duration::from_millis(500);
    let hub = keyway_hub::start(config).await.unwrap();
    hub.wait_registered(PATIENCE).await.unwrap();
    World { dir, relay, hub, hub_key }
}

fn client(w: &World, app: Identity) -> Client {
    Client::new(ClientConfig::new(app, w.relay.local_addr(), w.relay.public_key())).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_an_app_key_cuts_its_live_session_and_refuses_it_afterwards() {
    let (revoked, kept) = (identity_for(11, 0), identity_for(12, 0));
    let service = echo_service(b"").await;
    let w = world(10, 13, &[revoked.public_key(), kept.public_key()], service).await;
    let revoked_client = client(&w, revoked.duplicate());
    let kept_client = client(&w, kept.duplicate());

    let mut doomed = revoked_client.connect(&home(), &w.hub_key).await.unwrap();
    let mut survivor = kept_client.connect(&home(), &w.hub_key).await.unwrap();
    assert_eq!(echo_once(&mut doomed, b"one").await.unwrap(), b"one");
    assert_eq!(echo_once(&mut survivor, b"two").await.unwrap(), b"two");
    eventually("both sessions are live at the hub", || async {
        (w.hub.live_sessions(&revoked.public_key()) == 1).then_some(())
    })
    .await;

    write_apps(&w.dir.path().join("authorized_apps"), &[kept.public_key()]);
    // Apply now rather than at the next poll (the poll would do the same within a second).
    let change = w.hub.reload_apps().unwrap().expect("the file changed");
    assert_eq!(change.removed, vec![revoked.public_key()]);

    // The live session ends: reads fail or hit end of stream, nothing more is echoed.
    let mut buf = [0u8; 16];
    let cut = tokio::time::timeout(PATIENCE, async {
        let _ = doomed.write_all(b"more").await;
        doomed.read(&mut buf).await
    })
    .await
    .expect("the revoked session must end");
    assert!(matches!(cut, Ok(0) | Err(_)), "revoked session still delivered data: {cut:?}");

    // The other app is untouched.
    assert_eq!(echo_once(&mut survivor, b"three").await.unwrap(), b"three");

    // New sessions of the revoked key are refused (by the relay once it has the new list, or
    // by the hub before that).
    let err = eventually("revoked app is refused", || async {
        match revoked_client.connect(&home(), &w.hub_key).await {
            Err(e @ ClientError::Refused { .. }) => Some(e),
            _ => None,
        }
    })
    .await;
    assert_eq!(err.refusal(), Some(RefusalReason::AppNotAuthorized), "{err}");
    eventually("only the surviving session is active", || async {
        (w.hub.stats().sessions_active() == 1).then_some(())
    })
    .await;
    w.hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_added_to_the_file_gets_in_without_a_restart() {
    let newcomer = identity_for(21, 0);
    let service = echo_service(b"").await;
    let w = world(20, 22, &[], service).await;
    let app = client(&w, newcomer.duplicate());
    let err = app.connect(&home(), &w.hub_key).await.expect_err("not authorized yet");
    assert_eq!(err.refusal(), Some(RefusalReason::AppNotAuthorized), "{err}");

    // Picked up by the hub's own poll of the file, then published to the relay.
    write_apps(&w.dir.path().join("authorized_apps"), &[newcomer.public_key()]);
    let mut stream =
        eventually("the new app is let in", || async { app.connect(&home(), &w.hub_key).await.ok() }).await;
    assert_eq!(echo_once(&mut stream, b"hi").await.unwrap(), b"hi");
    assert!(w.hub.stats().sessions_accepted() >= 1);
    w.hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_local_service_is_a_typed_refusal() {
    let app_id = identity_for(31, 0);
    // A port that was free a moment ago: connecting to it is refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let w = world(30, 32, &[app_id.public_key()], closed).await;
    let app = client(&w, app_id);
    let err = app.connect(&home(), &w.hub_key).await.expect_err("service is down");
    assert_eq!(err.refusal(), Some(RefusalReason::ServiceUnavailable), "{err}");
    assert_eq!(w.hub.stats().sessions_refused(), 1);
    assert_eq!(w.hub.stats().sessions_accepted(), 0);
    // The tunnel is unaffected: still registered.
    assert_eq!(*w.hub.status().borrow(), keyway_hub::TunnelStatus::Registered);
    w.hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reuses_one_relay_connection_and_redials_after_a_relay_restart() {
    let app_id = identity_for(41, 0);
    let service = echo_service(b"").await;
    let World { dir, relay, hub, hub_key } = world(40, 42, &[app_id.public_key()], service).await;
    let app = Client::new(ClientConfig::new(app_id, relay.local_addr(), relay.public_key())).unwrap();
    for round in 0..3u8 {
        let mut s = app.connect(&home(), &hub_key).await.unwrap();
        assert_eq!(echo_once(&mut s, &[round]).await.unwrap(), [round]);
    }
    // Three streams on one end-to-end connection: the relay introduced one channel, the hub
    // accepted three sessions.
    assert_eq!(relay.stats().sessions_opened(), 1);
    assert_eq!(hub.stats().sessions_accepted(), 3);
    let registrations = hub.stats().registrations();

    // Same key, same address, as a process restart would bring back.
    let addr = relay.local_addr();
    relay.shutdown().await;
    let policy = NamePolicy::Closed { hubs_file: dir.path().join("authorized_hubs") };
    let relay = Relay::start(RelayConfig::new(addr, identity_for(40, 0), policy)).await.unwrap();
    eventually("the hub registers with the new relay", || async {
        (hub.stats().registrations() > registrations).then_some(())
    })
    .await;
    assert!(hub.stats().reconnects() >= 1);
    // The same client notices its connection is gone and dials the new relay.
    let mut s = eventually("the old client reaches the hub again", || async {
        app.connect(&home(), &hub_key).await.ok()
    })
    .await;
    assert_eq!(echo_once(&mut s, b"back").await.unwrap(), b"back");
    hub.shutdown().await;
    app.close().await;
    relay.shutdown().await;
}
