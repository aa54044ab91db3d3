//! Strangers hold nothing (issue 12), against a real relay process: connections with fresh
//! keys that open no stream and keep themselves alive are closed after `unauthorized_grace`,
//! those over `max_unauthorized_connections` at once, and the relay's memory for them stays
//! within the cap, while a legitimate hub and app are served byte-exact throughout.
//!
//! `stranger_probe` (ignored: it takes 70 s) is the attack measured in issue 12, run for the
//! figures in `docs/security.md`: `cargo test -p keyway-e2e --test strangers -- --ignored
//! --nocapture`, with `KEYWAY_PROBE_GRACE=0s` for the relay without the grace.

use std::sync::Arc;
use std::time::Duration;

use keyway_e2e::*;
use keyway_hub::HubConfig;
use keyway_proto::{codes, Identity};
use keyway_test_support::within;

/// A stranger's client config: a fresh key, and keep-alives every second, so only the relay
/// can end the connection.
fn stranger_config(relay_key: keyway_proto::PublicKey) -> quinn::ClientConfig {
    let mut config = raw::client_config(&identity(), relay_key).unwrap();
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(1)));
    transport.max_idle_timeout(Some(Duration::from_secs(30).try_into().unwrap()));
    config.transport_config(Arc::new(transport));
    config
}

fn gauge(relay: &RelayProcess, name: &str) -> f64 {
    metric(&scrape(relay.metrics).unwrap_or_default(), name, &[])
}

/// A legitimate hub (echo service) and its app, through the libraries; the directory holds the
/// hub's `authorized_apps`.
async fn legitimate(
    relay: &RelayProcess,
    hub_id: &Identity,
    app_id: &Identity,
) -> (keyway_hub::HubHandle, keyway_client::Client, tempfile::TempDir) {
    let service = echo_service(b"").await;
    let dir = tempfile::tempdir().unwrap();
    let apps_file = dir.path().join("authorized_apps");
    write_apps(&apps_file, &[app_id.public_key()]);
    let config = HubConfig::new(relay.addr, relay.key, name("home"), hub_id.duplicate(), apps_file, service);
    let hub = keyway_hub::start(config).await.unwrap();
    hub.wait_registered(PATIENCE).await.unwrap();
    let app = keyway_client::Client::new(keyway_client::ClientConfig::new(
        app_id.duplicate(),
        relay.addr,
        relay.key,
    ))
    .unwrap();
    (hub, app, dir)
}

/// One session carrying `data` to the echo service and back; `true` if it came back intact.
async fn served(app: &keyway_client::Client, hub_key: &keyway_proto::PublicKey, seed: u64) -> bool {
    let data = payload(256 * 1024, seed);
    let stream = app.connect(&name("home"), hub_key).await.expect("a session");
    round_trip(stream, data.clone()).await.is_ok_and(|back| sha256(&back) == sha256(&data))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_are_cut_after_the_grace_and_the_relay_holds_at_most_the_cap() {
    const CAP: usize = 40;
    const STRANGERS: usize = 60;
    let (hub_id, app_id) = (identity(), identity());
    let cap = CAP.to_string();
    let relay = RelayProcess::start(
        &[("home", hub_id.public_key())],
        &[
            "--unauthorized-grace",
            "2s",
            "--max-unauthorized-connections",
            &cap,
            "--new-connections-per-ip",
            "0",
        ],
    );
    relay.wait_ready().await;
    let pid = relay.bin.child.id();
    let (_hub, app, _dir) = legitimate(&relay, &hub_id, &app_id).await;
    let hub_key = hub_id.public_key();
    assert!(served(&app, &hub_key, 1).await, "served before the strangers");
    let rss_before = rss_kib(pid).unwrap();

    let endpoint = raw::endpoint();
    let mut strangers = Vec::new();
    for _ in 0..STRANGERS {
        let conn = raw::dial_with(&endpoint, relay.addr, stranger_config(relay.key)).await;
        strangers.push(conn.expect("a stranger completes its handshake"));
    }
    let rss_held = rss_kib(pid).unwrap();
    assert!(served(&app, &hub_key, 2).await, "served while strangers are held");

    // Every stranger is closed by the relay with LIMIT: the ones over the cap at once, the
    // others at their review.
    let mut over_cap = 0;
    let mut after_grace = 0;
    for conn in &strangers {
        match within("the relay closes a stranger", conn.closed()).await {
            quinn::ConnectionError::ApplicationClosed(close) => {
                assert_eq!(close.error_code, codes::LIMIT);
                let reason = String::from_utf8_lossy(&close.reason);
                if reason.contains("max_unauthorized_connections") {
                    over_cap += 1;
                } else {
                    assert!(reason.contains("unauthorized_grace"), "{reason}");
                    after_grace += 1;
                }
            }
            other => panic!("a stranger ended otherwise: {other:?}"),
        }
    }
    assert!(after_grace <= CAP, "{after_grace} strangers were held, above the cap of {CAP}");
    assert_eq!(over_cap + after_grace, STRANGERS);
    assert!(over_cap >= STRANGERS - CAP, "only {over_cap} refused at the cap");
    eventually("the relay to hold only the hub and the app", || async {
        (gauge(&relay, "keyway_relay_connections_active") == 2.0
            && gauge(&relay, "keyway_relay_connections_unauthorized") == 0.0)
            .then_some(())
    })
    .await;
    let m = scrape(relay.metrics).unwrap();
    assert_eq!(
        metric(&m, "keyway_relay_unauthorized_closed_total", &[("reason", "stranger")]),
        after_grace as f64
    );
    assert_eq!(
        metric(&m, "keyway_relay_limit_hits_total", &[("limit", "max_unauthorized_connections")]),
        over_cap as f64
    );
    assert!(served(&app, &hub_key, 3).await, "served after the strangers");
    let rss_after = rss_kib(pid).unwrap();
    println!(
        "{{\"measurement\":\"strangers\",\"strangers\":{STRANGERS},\"cap\":{CAP},\"held\":{after_grace},\
         \"refused_at_cap\":{over_cap},\"rss_before_kib\":{rss_before},\"rss_held_kib\":{rss_held},\
         \"rss_after_kib\":{rss_after}}}"
    );
    // At most the cap's worth of connections (35 KiB each, measured; 64 KiB allowed) plus the
    // transient cost of those closed at once and the allocator's slack.
    let bound = rss_before + CAP as u64 * 64 + 8 * 1024;
    assert!(
        rss_held <= bound && rss_after <= bound,
        "relay RSS {rss_before} -> {rss_held} -> {rss_after} KiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a 70 s measurement for docs/security.md, not a test"]
async fn stranger_probe() {
    let grace = std::env::var("KEYWAY_PROBE_GRACE").unwrap_or_else(|_| "10s".into());
    let relay = RelayProcess::start(&[], &["--unauthorized-grace", &grace]);
    relay.wait_ready().await;
    let pid = relay.bin.child.id();
    let rss_start = rss_kib(pid).unwrap();
    let endpoint = raw::endpoint();
    // Just under the default per-source rate (10/s), as in issue 12.
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / 9.5));
    let started = tokio::time::Instant::now();
    let mut conns = Vec::new();
    let mut failed = 0;
    while started.elapsed() < Duration::from_secs(70) {
        tick.tick().await;
        match raw::dial_with(&endpoint, relay.addr, stranger_config(relay.key)).await {
            Ok(conn) => conns.push(conn),
            Err(_) => failed += 1,
        }
    }
    let held = conns.iter().filter(|c| c.close_reason().is_none()).count();
    let active = gauge(&relay, "keyway_relay_connections_active");
    let rss = rss_kib(pid).unwrap();
    println!(
        "{{\"measurement\":\"stranger_probe\",\"grace\":\"{grace}\",\"opened\":{},\"failed\":{failed},\
         \"held\":{held},\"connections_active\":{active},\"rss_start_kib\":{rss_start},\"rss_kib\":{rss}}}",
        conns.len()
    );
}
