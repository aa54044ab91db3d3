//! The end-to-end QUIC data plane end to end: real relay, real hub connector, real client
//! library over real UDP; the app and hub run one end-to-end QUIC connection whose packets the
//! relay forwards, each session a stream on it. (The 100 MiB byte-exact transfer is in
//! `transfer.rs`.)

use std::sync::Arc;

use keyway_client::{Client, ClientConfig, ClientError};
use keyway_e2e::*;
use keyway_proto::RefusalReason;
use keyway_test_support::within;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn quic_client(relay: &TestRelay, id: keyway_proto::Identity) -> Client {
    Client::new(ClientConfig::new(id, relay.addr(), relay.key())).expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_streams_from_one_app_are_all_served() {
    let (hub_id, app_id) = (identity(), identity());
    let relay = TestRelay::start(&[("home", hub_id.public_key())]).await;
    let service = echo_service(b"").await;
    let (hub, _) = start_hub(&relay, "home", hub_id.duplicate(), &[app_id.public_key()], service).await;
    hub.wait_registered(PATIENCE).await.expect("hub registers");

    let client = Arc::new(quic_client(&relay, app_id));
    // All open before any closes, so they are concurrent on one end-to-end connection.
    let mut streams = Vec::new();
    for _ in 0..1000 {
        streams.push(client.connect(&name("home"), &hub_id.public_key()).await.expect("stream"));
    }
    let tasks: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(i, stream)| {
            tokio::spawn(async move {
                let data = payload(4096, i as u64);
                let back = round_trip(stream, data.clone()).await.expect("round trip");
                assert_eq!(back, data, "stream {i} came back wrong");
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("stream task");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_over_its_stream_cap_is_refused_at_once_and_others_are_not_starved() {
    let hub_id = identity();
    let apps: Vec<_> = (0..3).map(|_| identity()).collect();
    let relay = TestRelay::start(&[("home", hub_id.public_key())]).await;
    let service = echo_service(b"").await;
    let keys: Vec<_> = apps.iter().map(|a| a.public_key()).collect();
    let apps_file = relay.dir.path().join("authorized_apps.capped");
    write_apps(&apps_file, &keys);
    let mut config = keyway_hub::HubConfig::new(
        relay.addr(),
        relay.key(),
        name("home"),
        hub_id.duplicate(),
        apps_file,
        service,
    );
    config.max_streams_per_app = 10;
    let hub = keyway_hub::start(config).await.expect("hub starts");
    hub.wait_registered(PATIENCE).await.expect("hub registers");

    let greedy = quic_client(&relay, apps[0].duplicate());
    let mut held = Vec::new();
    for _ in 0..10 {
        held.push(greedy.connect(&name("home"), &hub_id.public_key()).await.expect("within the cap"));
    }
    let err = greedy.connect(&name("home"), &hub_id.public_key()).await.expect_err("over the cap");
    assert!(
        matches!(&err, ClientError::Refused { reason: RefusalReason::OverLimit, message } if message.contains("max_streams_per_app")),
        "{err}"
    );
    // The other apps still get all of theirs while the greedy one holds its cap.
    for app in &apps[1..] {
        let client = quic_client(&relay, app.duplicate());
        for i in 0..10u64 {
            let stream = client.connect(&name("home"), &hub_id.public_key()).await.expect("not starved");
            let data = payload(1000, i);
            assert_eq!(round_trip(stream, data.clone()).await.expect("round trip"), data);
        }
    }
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_app_is_cut_mid_transfer_and_cannot_come_back() {
    let (hub_id, app_id) = (identity(), identity());
    let relay = TestRelay::start(&[("home", hub_id.public_key())]).await;
    let service = echo_service(b"").await;
    let (hub, apps_file) =
        start_hub(&relay, "home", hub_id.duplicate(), &[app_id.public_key()], service).await;
    hub.wait_registered(PATIENCE).await.expect("hub registers");

    let client = quic_client(&relay, app_id);
    let mut stream = client.connect(&name("home"), &hub_id.public_key()).await.expect("stream");
    // Keep bytes flowing until the revocation lands.
    let chunk = payload(64 << 10, 1);
    let mut back = vec![0u8; chunk.len()];
    stream.write_all(&chunk).await.expect("write");
    stream.read_exact(&mut back).await.expect("echo");
    write_apps(&apps_file, &[]);
    let cut = tokio::time::timeout(PATIENCE, async {
        loop {
            if stream.write_all(&chunk).await.is_err() || stream.read_exact(&mut back).await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(cut.is_ok(), "the transfer kept going after the revocation");
    let again = client.connect(&name("home"), &hub_id.public_key()).await.expect_err("revoked");
    assert!(
        matches!(&again, ClientError::Refused { reason: RefusalReason::AppNotAuthorized, .. }),
        "{again}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_hub_key_and_a_down_service_are_typed_errors() {
    let (hub_id, app_id, other) = (identity(), identity(), identity());
    let relay = TestRelay::start(&[("home", hub_id.public_key())]).await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (hub, _) = start_hub(&relay, "home", hub_id.duplicate(), &[app_id.public_key()], closed).await;
    hub.wait_registered(PATIENCE).await.expect("hub registers");
    let client = quic_client(&relay, app_id);
    let err = client.connect(&name("home"), &other.public_key()).await.expect_err("wrong key");
    assert!(matches!(err, ClientError::Refused { reason: RefusalReason::HubKeyMismatch, .. }), "{err}");
    let err = client.connect(&name("home"), &hub_id.public_key()).await.expect_err("service down");
    assert!(matches!(err, ClientError::Refused { reason: RefusalReason::ServiceUnavailable, .. }), "{err}");
    // The end-to-end connection survives a refused stream: the next one is refused the same
    // way, not with a connection error.
    let err = client.connect(&name("home"), &hub_id.public_key()).await.expect_err("still down");
    assert!(matches!(err, ClientError::Refused { reason: RefusalReason::ServiceUnavailable, .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_tcp_connections_through_one_forward_are_all_served_byte_exact() {
    let (hub_id, app_id) = (identity(), identity());
    let relay = TestRelay::start(&[("home", hub_id.public_key())]).await;
    let service = echo_service(b"").await;
    let (hub, _) = start_hub(&relay, "home", hub_id.duplicate(), &[app_id.public_key()], service).await;
    hub.wait_registered(PATIENCE).await.expect("hub registers");

    // `keyway forward`'s own loop, on a local port, with default limits everywhere.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let local = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let forward = tokio::spawn(keyway_client::forward::run(
        quic_client(&relay, app_id),
        name("home"),
        hub_id.public_key(),
        listener,
        async move {
            let _ = stopped.await;
        },
    ));
    // Every connection is open (and has sent its first bytes) before any is read back, so all
    // 1 000 are concurrent streams of one end-to-end connection.
    let mut conns = Vec::new();
    for i in 0..1000u64 {
        let mut tcp = tokio::net::TcpStream::connect(local).await.expect("local connect");
        let data = payload(2048, i);
        tcp.write_all(&data).await.expect("write");
        conns.push((tcp, data));
    }
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, (mut tcp, data))| {
            tokio::spawn(async move {
                let mut back = vec![0u8; data.len()];
                within("echo", tcp.read_exact(&mut back))
                    .await
                    .unwrap_or_else(|e| panic!("connection {i}: {e}"));
                assert_eq!(back, data, "connection {i} came back wrong");
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("connection task");
    }
    assert!(hub.stats().sessions_accepted() >= 1000);
    let _ = stop.send(());
    forward.await.expect("forward task").expect("forward loop");
}

/// A graceful relay shutdown writes `GoAway` on each app's channel stream: an app that only
/// keeps a warm end-to-end connection closes it at once, and one with a stream open keeps
/// carrying that stream's bytes and closes once it is done. So the drain ends when the streams
/// do, not at its deadline, which here lies far beyond the test's patience.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_relay_lets_open_streams_finish_and_closes_warm_idle_connections() {
    let (hub_id, idle_id, busy_id) = (identity(), identity(), identity());
    let relay = TestRelay::start_with(&[("home", hub_id.public_key())], |config| {
        config.drain_timeout = std::time::Duration::from_secs(3600);
    })
    .await;
    let service = echo_service(b"").await;
    let apps = [idle_id.public_key(), busy_id.public_key()];
    let (hub, _) = start_hub(&relay, "home", hub_id.duplicate(), &apps, service).await;
    hub.wait_registered(PATIENCE).await.unwrap();
    let (idle, busy) = (quic_client(&relay, idle_id), quic_client(&relay, busy_id));
    let warm = idle.connect(&name("home"), &hub_id.public_key()).await.expect("idle app's session");
    assert_eq!(round_trip(warm, b"warm".to_vec()).await.unwrap(), b"warm");
    let mut open = busy.connect(&name("home"), &hub_id.public_key()).await.expect("busy app's session");
    open.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    open.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"before");
    let stats = relay.handle.stats();
    assert_eq!(stats.channels_active(), 2, "both apps hold a channel");

    let TestRelay { dir: _dir, handle, .. } = relay;
    let shutdown = tokio::spawn(handle.shutdown());
    eventually("the idle app closes its warm connection", || async {
        (stats.channels_active() == 1).then_some(())
    })
    .await;
    // The open stream still carries bytes after the `GoAway`, and holds the drain.
    open.write_all(b"after the goaway").await.unwrap();
    let mut buf = [0u8; 16];
    within("the echo after the GoAway", open.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"after the goaway");
    assert!(!shutdown.is_finished(), "the drain waits for the open stream");
    assert_eq!(stats.channels_active(), 1);

    drop(open);
    within("the drain ends once the last stream is done", shutdown).await.unwrap();
    assert_eq!(stats.channels_active(), 0);
    hub.shutdown().await;
}
