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
    let (hub_id, app_id) = (identity(), identity());
    let mut relay = RelayProcess::start(&[("home", hub_id.public_key())], &[]);
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
