//! Restarts: the hub coming and going, and the relay restarting under a registered hub.

use keyway_e2e::*;
use keyway_proto::RefusalReason;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_see_hub_offline_while_it_is_down_and_succeed_when_it_is_back() {
    let (hub_id, app_id) = (identity(), identity());
    let relay = TestRelay::start(&[("home", hub_id.public_key())]).await;
    let service = echo_service(b"hello\n").await;
    let (hub, _) = start_hub(&relay, "home", hub_id.duplicate(), &[app_id.public_key()], service).await;
    hub.wait_registered(PATIENCE).await.unwrap();
    let app = client(&relay, app_id.duplicate());
    app.connect(&name("home"), &hub_id.public_key()).await.expect("first session");

    hub.shutdown().await;
    let err = eventually("relay notices the hub is gone", || async {
        match app.connect(&name("home"), &hub_id.public_key()).await {
            Err(e) if e.refusal() == Some(RefusalReason::HubOffline) => Some(e),
            _ => None,
        }
    })
    .await;
    assert!(err.to_string().contains("home"));

    let (hub, _) = start_hub(&relay, "home", hub_id.duplicate(), &[app_id.public_key()], service).await;
    hub.wait_registered(PATIENCE).await.unwrap();
    let stream = app.connect(&name("home"), &hub_id.public_key()).await.expect("session after restart");
    let back = round_trip(stream, b"ping".to_vec()).await.unwrap();
    assert_eq!(back, b"hello\nping");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_re_registers_by_itself_after_a_relay_restart() {
    let (hub_id, app_id) = (identity(), identity());
    let relay = TestRelay::start(&[("home", hub_id.public_key())]).await;
    let service = echo_service(b"").await;
    let (hub, _) = start_hub(&relay, "home", hub_id.duplicate(), &[app_id.public_key()], service).await;
    hub.wait_registered(PATIENCE).await.unwrap();
    let registrations = hub.stats().registrations();

    let relay = relay.restart().await;
    eventually("hub registers again", || async {
        (hub.stats().registrations() > registrations && relay.handle.stats().hubs_connected() == 1)
            .then_some(())
    })
    .await;
    let app = client(&relay, app_id);
    let stream = app.connect(&name("home"), &hub_id.public_key()).await.expect("session via new relay");
    assert_eq!(round_trip(stream, b"still here".to_vec()).await.unwrap(), b"still here");
    assert!(hub.stats().reconnects() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_connection_for_the_same_hub_replaces_the_old_one_at_once() {
    let (hub_id, app_id) = (identity(), identity());
    let relay = TestRelay::start(&[("home", hub_id.public_key())]).await;
    let old_service = echo_service(b"old\n").await;
    let new_service = echo_service(b"new\n").await;
    let (old, _) = start_hub(&relay, "home", hub_id.duplicate(), &[app_id.public_key()], old_service).await;
    old.wait_registered(PATIENCE).await.unwrap();
    // Simulate the hub coming back on a new connection while the relay still holds the old one.
    let (new, _) = start_hub(&relay, "home", hub_id.duplicate(), &[app_id.public_key()], new_service).await;
    new.wait_registered(PATIENCE).await.unwrap();
    assert!(relay.handle.stats().replacements() >= 1);
    // Stop the old connector so it cannot win the name back, then sessions go to the new one.
    old.shutdown().await;
    let app = client(&relay, app_id);
    let stream = eventually("session reaches the new hub", || async {
        app.connect(&name("home"), &hub_id.public_key()).await.ok()
    })
    .await;
    let back = round_trip(stream, Vec::new()).await.unwrap();
    assert_eq!(back, b"new\n");
}

/// A relay that crashes (SIGKILL: no GoAway, no close) and comes back with the same key answers
/// the packets of connections it no longer knows with a stateless reset derived from its key:
/// the hub and the app learn at once that their connections are gone. Without it the app's
/// first `connect` after the restart would wait out its session timeout on a dead connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_relay_crash_cached_connections_are_reset_and_the_first_connect_succeeds() {
    cached_connections_are_reset_after_a_crash(&[]).await;
}

/// The same for a cluster node, whose reset key and connection IDs (which name the node,
/// `keyway_proto::cid`) derive from its node id: the restarted node still recognises its old
/// IDs as its own and resets them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_node_crash_its_own_cached_connections_are_reset() {
    cached_connections_are_reset_after_a_crash(&["--node-id", "relay-1"]).await;
}

async fn cached_connections_are_reset_after_a_crash(relay_args: &[&str]) {
    let (hub_id, app_id) = (identity(), identity());
    let mut relay = RelayProcess::start(&[("home", hub_id.public_key())], relay_args);
    relay.wait_ready().await;
    let service = echo_service(b"").await;
    let dir = tempfile::tempdir().unwrap();
    let apps_file = dir.path().join("authorized_apps");
    write_apps(&apps_file, &[app_id.public_key()]);
    let mut config = keyway_hub::HubConfig::new(
        relay.addr,
        relay.key,
        name("home"),
        hub_id.duplicate(),
        apps_file,
        service,
    );
    // A short keep-alive so the hub sends a packet (and gets its reset) soon after the crash.
    config.keep_alive = std::time::Duration::from_secs(1);
    let hub = keyway_hub::start(config).await.unwrap();
    hub.wait_registered(PATIENCE).await.unwrap();
    let app = keyway_client::Client::new(keyway_client::ClientConfig::new(
        app_id.duplicate(),
        relay.addr,
        relay.key,
    ))
    .unwrap();
    let stream = app.connect(&name("home"), &hub_id.public_key()).await.expect("session before the crash");
    assert_eq!(round_trip(stream, b"before".to_vec()).await.unwrap(), b"before");
    let registrations = hub.stats().registrations();

    relay.crash_and_restart().await;
    eventually("hub registers with the restarted relay", || async {
        (hub.stats().registrations() > registrations).then_some(())
    })
    .await;
    // The app's cached connection belongs to the dead process: the first connect must notice
    // the reset, redial and succeed, not fail with a timeout.
    let stream =
        app.connect(&name("home"), &hub_id.public_key()).await.expect("first connect after the crash");
    assert_eq!(round_trip(stream, b"after".to_vec()).await.unwrap(), b"after");
}

/// After a crash, hubs are back within about one keep-alive interval because the restarted
/// relay answers every keep-alive of the dead run with a stateless reset, not at quinn's
/// default pace of one reset per 20 ms for the whole endpoint (which left most of 1 000 hubs
/// waiting for their liveness ping: 40 s). The liveness ping (60 s) and the idle timeout
/// (120 s) are set far beyond the bound checked here, so only the reset can bring the hubs
/// back that soon. The bound is one keep-alive interval, the reconnect jitter and a generous
/// slack for a busy machine; it is the property under test, not a speed measurement
/// (`keyway-loadtest storm --signal KILL` measures that).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_relay_crash_every_hub_is_back_within_one_keep_alive_through_the_reset() {
    use std::time::{Duration, Instant};
    const HUBS: usize = 300;
    const KEEP_ALIVE: Duration = Duration::from_secs(10);
    const BACKOFF_MIN: Duration = Duration::from_millis(200);
    const SLACK: Duration = Duration::from_secs(8);
    let ids: Vec<_> = (0..HUBS).map(|_| identity()).collect();
    let names: Vec<String> = (0..HUBS).map(|i| format!("hub{i}")).collect();
    let hubs_list: Vec<(&str, _)> =
        names.iter().map(String::as_str).zip(ids.iter().map(|id| id.public_key())).collect();
    // Per-IP admission lifted: every hub dials from 127.0.0.1, as no real deployment does.
    let mut relay = RelayProcess::start(&hubs_list, &["--new-connections-per-ip", "0"]);
    relay.wait_ready().await;
    let service = echo_service(b"").await;
    let dir = tempfile::tempdir().unwrap();
    let apps_file = dir.path().join("authorized_apps");
    write_apps(&apps_file, &[identity().public_key()]);
    let mut hubs = Vec::with_capacity(HUBS);
    for (id, hub_name) in ids.iter().zip(&names) {
        let mut config = keyway_hub::HubConfig::new(
            relay.addr,
            relay.key,
            name(hub_name),
            id.duplicate(),
            apps_file.clone(),
            service,
        );
        config.keep_alive = KEEP_ALIVE;
        config.ping_interval = Duration::from_secs(60);
        config.idle_timeout = Duration::from_secs(120);
        config.backoff_min = BACKOFF_MIN;
        hubs.push(keyway_hub::start(config).await.unwrap());
    }
    for hub in &hubs {
        hub.wait_registered(PATIENCE).await.unwrap();
    }
    let before: Vec<u64> = hubs.iter().map(|h| h.stats().registrations()).collect();

    relay.crash_and_restart().await;
    let crashed = Instant::now();
    // Jitter: the first reconnect delay is at most twice the minimum backoff.
    let bound = KEEP_ALIVE + 2 * BACKOFF_MIN + SLACK;
    let mut back = vec![false; HUBS];
    while back.iter().any(|b| !b) && crashed.elapsed() < bound {
        for ((hub, was), back) in hubs.iter().zip(&before).zip(back.iter_mut()) {
            *back |= hub.stats().registrations() > *was;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let missing = back.iter().filter(|b| !**b).count();
    assert_eq!(missing, 0, "{missing} of {HUBS} hubs not back within {bound:?} of the crash");
}
