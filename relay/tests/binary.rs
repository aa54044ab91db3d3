//! The shipped `keyway-relay` binary, run as an operator would on first start.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::process::{Child, Command, Stdio};

use keyway_test_support::child::Lines;
use keyway_test_support::eventually_blocking;
use keyway_test_support::http::{get_blocking as http_get, series};

const BIN: &str = env!("CARGO_BIN_EXE_keyway-relay");

/// Kills the child even when an assertion fails.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads stdout lines until one contains `needle`; returns all lines read (hang guard only).
fn lines_until(child: &mut Running, needle: &str) -> Vec<String> {
    let mut lines = Lines::new(child.0.stdout.take().unwrap());
    lines.until(&format!("{needle:?}"), |l| l.contains(needle).then_some(()));
    lines.into_seen()
}

#[test]
fn run_with_no_arguments_creates_its_files_and_prints_what_a_hub_owner_needs() {
    let dir = tempfile::tempdir().unwrap();
    // Only the port is overridden (through the environment, as an operator could), since the
    // default 4433 may be taken on a shared machine.
    let mut relay = Running(
        Command::new(BIN)
            .arg("run")
            .current_dir(dir.path())
            .env("KEYWAY_RELAY_LISTEN", "127.0.0.1:0")
            .env_remove("KEYWAY_RELAY_CONFIG")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let lines = lines_until(&mut relay, "keyway-hub run");
    let all = lines.join("\n");

    // The first word starting with "kw" is the relay's public key, and `pubkey` agrees.
    let key = all.split_whitespace().find(|w| w.starts_with("kw")).expect("public key printed").to_owned();
    let parsed: keyway_proto::PublicKey = key.parse().unwrap();
    assert!(all.contains(&parsed.fingerprint()), "{all}");
    assert!(all.contains("add to authorized_hubs: <name> <hub-public-key>"), "{all}");
    assert!(all.contains(&format!("--relay-key {key}")), "{all}");

    let key_file = dir.path().join("keyway-relay.key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let hubs = std::fs::read_to_string(dir.path().join("authorized_hubs")).unwrap();
    assert!(hubs.contains("NAME KEY"), "{hubs}");
    assert!(keyway_proto::lists::parse_authorized_hubs(&hubs).unwrap().is_empty());

    let out = Command::new(BIN).args(["pubkey", "--key"]).arg(&key_file).output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), key);
}

#[test]
fn a_config_file_sets_flags_and_unknown_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("relay.toml"),
        "listen = \"127.0.0.1:0\"\nopen = true\nstate = \"names\"\n",
    )
    .unwrap();
    let mut relay = Running(
        Command::new(BIN)
            .args(["run", "--config", "relay.toml"])
            .current_dir(dir.path())
            .env_remove("KEYWAY_RELAY_LISTEN")
            .env_remove("KEYWAY_RELAY_OPEN")
            .env_remove("KEYWAY_RELAY_STATE")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let all = lines_until(&mut relay, "keyway-hub run").join("\n");
    assert!(all.contains("name policy: open") && all.contains("names"), "{all}");
    assert!(!dir.path().join("authorized_hubs").exists());

    std::fs::write(dir.path().join("bad.toml"), "lissten = \"127.0.0.1:0\"\n").unwrap();
    let out =
        Command::new(BIN).args(["run", "--config", "bad.toml"]).current_dir(dir.path()).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lissten"), "{err}");
}

/// Sends `signal` (e.g. "-HUP") to the child with the system's `kill`.
fn signal(child: &Running, signal: &str) {
    let status = Command::new("kill").arg(signal).arg(child.0.id().to_string()).status().unwrap();
    assert!(status.success());
}

mod quic {
    //! Just enough of a hub to see registrations, refusals and GoAway from the real binary.
    use keyway_proto::io::read_frame;
    use keyway_proto::{Frame, Identity, PublicKey};
    pub use keyway_test_support::raw::connect;
    use keyway_test_support::raw::{self, Control};

    pub struct Hub {
        pub _endpoint: quinn::Endpoint,
        pub conn: quinn::Connection,
        pub control: Control,
    }

    pub async fn register(
        relay: std::net::SocketAddr,
        relay_key: PublicKey,
        id: &Identity,
        name: &str,
        apps: &[PublicKey],
    ) -> (Hub, Frame) {
        let (endpoint, conn) = connect(relay, relay_key, id).await;
        let (control, answer) =
            raw::register(&conn, keyway_test_support::name(name), apps, false).await.unwrap();
        (Hub { _endpoint: endpoint, conn, control }, answer)
    }

    pub async fn next_frame(hub: &mut Hub) -> Frame {
        read_frame(&mut hub.control.recv).await.unwrap()
    }
}

#[test]
fn sighup_reloads_limits_and_hubs_and_sigterm_drains() {
    use keyway_proto::{Frame, Identity, RefusalReason};
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    let base = "listen = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\ndrain_timeout = \"30s\"\n";
    let strangers =
        "unauthorized_grace = \"10s\"\nmax_sessions_per_app = 64\nnew_connections_ipv6_prefix = 64\n";
    std::fs::write(&config, format!("{base}max_hubs = 7\n{strangers}")).unwrap();
    let mut relay = Running(
        Command::new(BIN)
            .args(["run", "--config", "relay.toml"])
            .current_dir(dir.path())
            .env_remove("KEYWAY_RELAY_LISTEN")
            .env_remove("KEYWAY_RELAY_METRICS_LISTEN")
            .env_remove("KEYWAY_RELAY_MAX_HUBS")
            .env_remove("KEYWAY_RELAY_DRAIN_TIMEOUT")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let all = lines_until(&mut relay, "keyway-hub run").join("\n");
    let word_after = |prefix: &str| {
        all.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned()
    };
    let udp: std::net::SocketAddr = word_after("keyway-relay listening on ").parse().unwrap();
    let relay_key: keyway_proto::PublicKey = word_after("relay public key: ").parse().unwrap();
    let metrics = word_after("metrics: http://").trim_end_matches("/metrics").to_owned();
    assert_eq!(http_get(&metrics, "/healthz").0, 200);
    let limit = |m: &str| series(&http_get(m, "/metrics").1, "keyway_relay_limit{limit=\"max_hubs\"}");
    assert_eq!(limit(&metrics), Some(7.0));

    // SIGHUP re-reads the config file's limits (those that bound strangers too)...
    let strangers =
        "unauthorized_grace = \"30s\"\nmax_sessions_per_app = 8\nnew_connections_ipv6_prefix = 56\n";
    std::fs::write(&config, format!("{base}max_hubs = 9\n{strangers}")).unwrap();
    signal(&relay, "-HUP");
    eventually_blocking("max_hubs reloaded", || (limit(&metrics) == Some(9.0)).then_some(()));
    let exposition = http_get(&metrics, "/metrics").1;
    for (name, value) in
        [("unauthorized_grace", 30.0), ("max_sessions_per_app", 8.0), ("new_connections_ipv6_prefix", 56.0)]
    {
        let series_name = format!("keyway_relay_limit{{limit=\"{name}\"}}");
        assert_eq!(series(&exposition, &series_name), Some(value), "{name} reloaded");
    }

    // ...and authorized_hubs: a hub added is admitted, a hub removed is disconnected at once.
    let hub = Identity::generate().unwrap();
    let hubs = dir.path().join("authorized_hubs");
    let header = std::fs::read_to_string(&hubs).unwrap();
    std::fs::write(&hubs, format!("{header}home {}\n", hub.public_key())).unwrap();
    signal(&relay, "-HUP");
    let mut registered = eventually_blocking("hub admitted after reload", || {
        let (h, answer) = rt.block_on(quic::register(udp, relay_key, &hub, "home", &[]));
        (answer == Frame::Registered { replaced: false }).then_some(h)
    });
    std::fs::write(&hubs, &header).unwrap();
    signal(&relay, "-HUP");
    match rt.block_on(quic::next_frame(&mut registered)) {
        Frame::Refused { reason, .. } => assert_eq!(reason, RefusalReason::NameNotAuthorized),
        other => panic!("expected a revocation, got {other:?}"),
    }

    // SIGTERM: the hub hears GoAway, /healthz turns 503, and the process exits cleanly.
    std::fs::write(&hubs, format!("{header}home {}\n", hub.public_key())).unwrap();
    signal(&relay, "-HUP");
    let app = Identity::generate().unwrap();
    let mut hub_conn = eventually_blocking("hub back", || {
        let (h, answer) = rt.block_on(quic::register(udp, relay_key, &hub, "home", &[app.public_key()]));
        let registered =
            answer == Frame::Registered { replaced: false } || answer == Frame::Registered { replaced: true };
        registered.then_some(h)
    });
    // A live session, which the drain must wait for.
    let (mut app_send, mut app_recv, mut hub_send, _held) = rt.block_on(async {
        use keyway_proto::io::{read_frame, write_frame};
        let (endpoint, conn) = quic::connect(udp, relay_key, &app).await;
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let open = Frame::ChannelOpen {
            hub: "home".parse().unwrap(),
            hub_key: hub.public_key(),
            purpose: keyway_proto::SessionPurpose::Connect,
            channel: keyway_proto::channel::ChannelId::random().expect("channel id"),
        };
        write_frame(&mut send, &open).await.unwrap();
        let (mut hub_send, mut hub_recv) = hub_conn.conn.accept_bi().await.unwrap();
        assert!(matches!(read_frame(&mut hub_recv).await.unwrap(), Frame::ChannelAnnounce { .. }));
        write_frame(&mut hub_send, &Frame::ChannelAccepted).await.unwrap();
        assert!(matches!(read_frame(&mut recv).await.unwrap(), Frame::ChannelReady { .. }));
        (send, recv, hub_send, (endpoint, conn, hub_recv))
    });
    signal(&relay, "-TERM");
    assert!(matches!(rt.block_on(quic::next_frame(&mut hub_conn)), Frame::GoAway { .. }));
    let (status, body) = http_get(&metrics, "/healthz");
    assert_eq!((status, body.as_str()), (503, "draining\n"));
    assert_eq!(series(&http_get(&metrics, "/metrics").1, "keyway_relay_channels_active"), Some(1.0));
    // The session ends; the drain is over and the process exits cleanly.
    rt.block_on(async {
        app_send.finish().unwrap();
        hub_send.finish().unwrap();
        let _ = app_recv.read_to_end(1024).await;
    });
    let status = relay.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let _ = &hub_conn.control.send;
}
