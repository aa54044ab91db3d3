//! A hub connector with several relays: one tunnel to each, sessions through any of them, one
//! relay draining and stopping while the others keep serving, and the hub's `/metrics` and
//! `/healthz` following all of it. Real in-process relays on loopback UDP, no mocks. Waits poll
//! with a generous deadline (a hang guard); nothing asserts how long anything took.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keyway_client::{Client, ClientConfig};
use keyway_hub::{HubConfig, HubHandle, TunnelStatus};
use keyway_proto::{Identity, PublicKey};
use keyway_relay::{NamePolicy, Relay, RelayConfig, RelayHandle};

use common::*;
use keyway_test_support::http::{get as http_get, series};

/// A relay that admits `home` with `hub_key`; live sessions may drain for up to `PATIENCE`.
async fn relay(dir: &std::path::Path, seed: u8, hub_key: PublicKey) -> RelayHandle {
    let hubs_file = dir.join(format!("authorized_hubs.{seed}"));
    std::fs::write(&hubs_file, format!("home {hub_key}\n")).unwrap();
    let mut config = RelayConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        identity_for(seed, 0),
        NamePolicy::Closed { hubs_file },
    );
    config.drain_timeout = PATIENCE;
    Relay::start(config).await.unwrap()
}

struct World {
    _dir: tempfile::TempDir,
    a: RelayHandle,
    b: RelayHandle,
    hub: HubHandle,
    hub_key: PublicKey,
    app: Identity,
}

/// Two relays, A and B, and a hub (with `/metrics` on loopback) keeping a tunnel to each.
async fn world(seed: u8) -> World {
    let dir = tempfile::tempdir().unwrap();
    let hub_id = identity_for(seed, 0);
    let hub_key = hub_id.public_key();
    let app = identity_for(seed + 1, 0);
    let a = relay(dir.path(), seed + 2, hub_key).await;
    let b = relay(dir.path(), seed + 3, hub_key).await;
    let apps_file = dir.path().join("authorized_apps");
    std::fs::write(&apps_file, format!("{} test app\n", app.public_key())).unwrap();
    let mut config =
        HubConfig::new(a.local_addr(), a.public_key(), home(), hub_id, apps_file, echo_service(b"").await)
            .with_relay(b.local_addr(), b.public_key());
    config.backoff_max = Duration::from_millis(500);
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let hub = keyway_hub::start(config).await.unwrap();
    World { _dir: dir, a, b, hub, hub_key, app }
}

fn client(relay: &RelayHandle, app: &Identity) -> Client {
    Client::new(ClientConfig::new(app.duplicate(), relay.local_addr(), relay.public_key())).unwrap()
}

async fn wait_relay_status(hub: &HubHandle, relay: SocketAddr, what: &str, want: fn(&TunnelStatus) -> bool) {
    let mut rx = hub.relay_status(relay).expect("a configured relay");
    tokio::time::timeout(PATIENCE, rx.wait_for(want))
        .await
        .unwrap_or_else(|_| panic!("gave up waiting for: {what}; statuses {:?}", hub.relay_statuses()))
        .unwrap();
}

async fn both_registered(w: &World) {
    for relay in [w.a.local_addr(), w.b.local_addr()] {
        wait_relay_status(&w.hub, relay, "tunnel registered", |s| *s == TunnelStatus::Registered).await;
    }
}

async fn scrape(hub: &HubHandle) -> String {
    let (status, body) = http_get(hub.metrics_addr().expect("metrics listener"), "/metrics").await;
    assert_eq!(status, 200);
    body
}

fn up(relay: &RelayHandle) -> String {
    format!("keyway_hub_tunnel_up{{relay=\"{}\"}}", relay.local_addr())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_with_two_relays_registers_on_both_and_serves_apps_through_either() {
    let w = world(10).await;
    w.hub.wait_registered(PATIENCE).await.unwrap();
    both_registered(&w).await;
    let statuses = w.hub.relay_statuses();
    assert_eq!(
        statuses,
        vec![(w.a.local_addr(), TunnelStatus::Registered), (w.b.local_addr(), TunnelStatus::Registered)]
    );
    eventually("both relays count the hub", || async {
        (w.a.stats().hubs_connected() == 1 && w.b.stats().hubs_connected() == 1).then_some(())
    })
    .await;

    // Through B, then through A: the same hub, the same service.
    let mut via_b = client(&w.b, &w.app).connect(&home(), &w.hub_key).await.unwrap();
    assert_eq!(echo_once(&mut via_b, b"via b").await.unwrap(), b"via b");
    let mut via_a = client(&w.a, &w.app).connect(&home(), &w.hub_key).await.unwrap();
    assert_eq!(echo_once(&mut via_a, b"via a").await.unwrap(), b"via a");
    assert_eq!((w.a.stats().sessions_opened(), w.b.stats().sessions_opened()), (1, 1));
    assert_eq!(w.hub.stats().sessions_accepted(), 2);
    assert_eq!(w.hub.stats().registrations(), 2);
    eventually("both sessions are live at the hub", || async {
        (w.hub.live_sessions(&w.app.public_key()) == 2).then_some(())
    })
    .await;
    drop((via_a, via_b));
    w.hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_one_relay_drains_and_stops_apps_keep_reaching_the_hub_through_the_other() {
    let World { _dir, a, b, hub, hub_key, app } = world(20).await;
    let (a_addr, b_addr) = (a.local_addr(), b.local_addr());
    hub.wait_registered(PATIENCE).await.unwrap();
    for relay in [a_addr, b_addr] {
        wait_relay_status(&hub, relay, "tunnel registered", |s| *s == TunnelStatus::Registered).await;
    }
    // Every change of the hub's overall status from here on.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorder = {
        let (seen, mut rx) = (seen.clone(), hub.status());
        rx.mark_unchanged();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                seen.lock().unwrap().push(rx.borrow_and_update().clone());
            }
        })
    };

    // A live session through A keeps A draining (it waits for live sessions) ...
    let via_a_client = client(&a, &app);
    let mut via_a = via_a_client.connect(&home(), &hub_key).await.unwrap();
    assert_eq!(echo_once(&mut via_a, b"before").await.unwrap(), b"before");
    let b_client = client(&b, &app);
    let draining = tokio::spawn(a.shutdown());

    // ... during which only A's tunnel goes back to connecting, after its GoAway.
    wait_relay_status(&hub, a_addr, "A's tunnel leaves after GoAway", |s| *s == TunnelStatus::Connecting)
        .await;
    assert!(!draining.is_finished(), "relay A still drains its live session");
    assert_eq!(*hub.status().borrow(), TunnelStatus::Registered);
    let mut via_b = b_client.connect(&home(), &hub_key).await.unwrap();
    assert_eq!(echo_once(&mut via_b, b"during").await.unwrap(), b"during");
    // The session already on A is not lost either: the drain lets it finish.
    assert_eq!(echo_once(&mut via_a, b"still").await.unwrap(), b"still");

    // The last session on A ends, so A stops.
    drop(via_a);
    drop(via_a_client);
    tokio::time::timeout(PATIENCE, draining).await.expect("relay A finishes draining").unwrap();

    // B still serves, new sessions included; A's tunnel keeps trying (and failing).
    let mut again = b_client.connect(&home(), &hub_key).await.unwrap();
    assert_eq!(echo_once(&mut again, b"after").await.unwrap(), b"after");
    assert_eq!(echo_once(&mut via_b, b"old one").await.unwrap(), b"old one");
    let statuses = hub.relay_statuses();
    assert_eq!(statuses, vec![(a_addr, TunnelStatus::Connecting), (b_addr, TunnelStatus::Registered)]);
    assert_eq!(hub.stats().reconnects(), 1, "only A's tunnel reconnected");
    assert_eq!(hub.stats().registrations(), 2, "B's tunnel never had to register again");
    assert_eq!(*hub.status().borrow(), TunnelStatus::Registered);
    recorder.abort();
    let seen = seen.lock().unwrap().clone();
    assert!(seen.is_empty(), "the hub stayed registered overall, yet its status moved: {seen:?}");
    drop((via_b, again));
    hub.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_metrics_and_health_follow_tunnels_and_sessions() {
    let World { _dir, a, b, hub, hub_key, app } = world(30).await;
    let metrics = hub.metrics_addr().expect("metrics listener");
    assert!(metrics.ip().is_loopback());
    for relay in [a.local_addr(), b.local_addr()] {
        wait_relay_status(&hub, relay, "tunnel registered", |s| *s == TunnelStatus::Registered).await;
    }
    assert_eq!(http_get(metrics, "/healthz").await.0, 200);
    let text = scrape(&hub).await;
    assert_eq!(series(&text, &up(&a)), Some(1.0), "{text}");
    assert_eq!(series(&text, &up(&b)), Some(1.0), "{text}");
    assert_eq!(series(&text, "keyway_hub_sessions_total{result=\"accepted\"}"), Some(0.0), "{text}");
    assert_eq!(series(&text, "keyway_hub_sessions_active"), Some(0.0), "{text}");
    assert_eq!(series(&text, "keyway_hub_authorized_apps"), Some(1.0), "{text}");
    assert!(!text.contains(&app.public_key().to_string()), "no per-app labels");

    // A real session through A moves the session counters.
    let mut via_a = client(&a, &app).connect(&home(), &hub_key).await.unwrap();
    assert_eq!(echo_once(&mut via_a, b"count me").await.unwrap(), b"count me");
    let text = scrape(&hub).await;
    assert_eq!(series(&text, "keyway_hub_sessions_total{result=\"accepted\"}"), Some(1.0), "{text}");
    assert_eq!(series(&text, "keyway_hub_sessions_announced_total"), Some(1.0), "{text}");
    assert_eq!(series(&text, "keyway_hub_sessions_active"), Some(1.0), "{text}");
    drop(via_a);
    eventually("the ended session leaves sessions_active", || async {
        (series(&scrape(&hub).await, "keyway_hub_sessions_active") == Some(0.0)).then_some(())
    })
    .await;

    // Relay A stops: its tunnel_up goes to 0, B's stays 1, the hub stays healthy.
    let (up_a, up_b) = (up(&a), up(&b));
    let reconnects_a = format!("keyway_hub_reconnects_total{{relay=\"{}\"}}", a.local_addr());
    a.shutdown().await;
    let text = eventually("tunnel_up of A drops to 0", || async {
        let text = scrape(&hub).await;
        (series(&text, &up_a) == Some(0.0)).then_some(text)
    })
    .await;
    assert_eq!(series(&text, &up_b), Some(1.0), "{text}");
    assert_eq!(series(&text, &reconnects_a), Some(1.0), "{text}");
    let b_label = format!("{{relay=\"{}\"}}", b.local_addr());
    assert_eq!(series(&text, &format!("keyway_hub_reconnects_total{b_label}")), Some(0.0), "{text}");
    assert_eq!(series(&text, &format!("keyway_hub_registrations_total{b_label}")), Some(1.0), "{text}");
    assert_eq!(http_get(metrics, "/healthz").await.0, 200);

    // B stops too: no tunnel left, /healthz says so.
    b.shutdown().await;
    let (status, body) = eventually("/healthz turns 503", || async {
        let (status, body) = http_get(metrics, "/healthz").await;
        (status == 503).then_some((status, body))
    })
    .await;
    assert_eq!((status, body.as_str()), (503, "no tunnel registered\n"));
    let text = scrape(&hub).await;
    assert_eq!((series(&text, &up_a), series(&text, &up_b)), (Some(0.0), Some(0.0)), "{text}");
    assert_eq!(http_get(metrics, "/nope").await.0, 404);
    hub.shutdown().await;
}
