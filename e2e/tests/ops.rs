//! What operators rely on from the shipped binaries (issue 28, item 7): `--log-format json`
//! writes one JSON object per line from the first line; under systemd (`Type=notify`) the
//! relay and the hub say `READY=1`, ping the watchdog and say `STOPPING=1` on SIGTERM, to a
//! real unix datagram socket standing in for systemd; `/metrics` carries
//! `keyway_build_info{version}` and `process_*`; and every metric the Grafana dashboard and
//! the Prometheus rules in `deploy/` query is one the binaries export.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keyway_e2e::*;
use keyway_test_support::eventually_blocking;

/// Datagrams the stand-in for systemd received, until `stop` says enough or time is up.
fn receive(socket: &UnixDatagram, mut stop: impl FnMut(&[String]) -> bool) -> Vec<String> {
    socket.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let deadline = Instant::now() + PATIENCE;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline && !stop(&got) {
        if let Ok(n) = socket.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    got
}

fn sigterm(child: &std::process::Child) {
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
}

/// Every stderr line of a finished child parses as a JSON object with a level and a message.
fn assert_json_lines(what: &str, stderr: impl std::io::Read) -> usize {
    let mut lines = 0;
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap();
        let value: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {line:?}"));
        assert!(value.is_object(), "{what}: not an object: {line}");
        assert!(value.get("level").is_some() && value.get("timestamp").is_some(), "{what}: {line}");
        assert!(value.pointer("/fields/message").is_some(), "{what}: no message: {line}");
        lines += 1;
    }
    lines
}

/// Metric names a PromQL expression uses: identifiers followed by `{`, `[` or `)` that look
/// like ours or the process collector's.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
            i += 1;
        }
        if i > start {
            let word = &text[start..i];
            if word.starts_with("keyway_") || word.starts_with("process_") {
                // Histogram series are exported under their base name's suffixes.
                names.insert(word.to_owned());
            }
        } else {
            i += 1;
        }
    }
    names
}

fn exported(scrapes: &[String]) -> BTreeSet<String> {
    scrapes
        .iter()
        .flat_map(|t| t.lines())
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn relay_and_hub_log_json_notify_systemd_and_export_what_the_dashboard_queries() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    let (ok, out, err) = Bin::run("keyway", &["keygen", "--out", "hub.key"], path);
    assert!(ok, "{err}");
    let hub_key = out.split_whitespace().find(|w| w.starts_with("kw")).unwrap().to_owned();
    std::fs::write(path.join("authorized_hubs"), format!("home {hub_key}\n")).unwrap();
    std::fs::write(path.join("authorized_apps"), "").unwrap();
    let (ok, out, err) = Bin::run("keyway", &["keygen", "--out", "relay.key"], path);
    assert!(ok, "{err}");
    let relay_key = out.split_whitespace().find(|w| w.starts_with("kw")).unwrap().to_owned();

    let relay_notify = UnixDatagram::bind(path.join("relay.notify")).unwrap();
    let hub_notify = UnixDatagram::bind(path.join("hub.notify")).unwrap();
    let relay_addr = format!("127.0.0.1:{}", free_udp_port());
    let relay_metrics: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
    let hub_metrics: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
    let spawn = |bin: &str, args: &[&str], notify: &str| {
        Command::new(Bin::path(bin))
            .args(args)
            .current_dir(path)
            .env("RUST_LOG", "debug")
            .env("NOTIFY_SOCKET", path.join(notify))
            // 400 ms: a ping every 200 ms.
            .env("WATCHDOG_USEC", "400000")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let metrics = relay_metrics.to_string();
    let mut relay = spawn(
        "keyway-relay",
        &[
            "--log-format",
            "json",
            "run",
            "--listen",
            &relay_addr,
            "--key",
            "relay.key",
            "--metrics-listen",
            &metrics,
        ],
        "relay.notify",
    );
    let hub_metrics_text = hub_metrics.to_string();
    let mut hub = spawn(
        "keyway-hub",
        &[
            "run",
            "--log-format",
            "json",
            "--relay",
            &relay_addr,
            "--relay-key",
            &relay_key,
            "--name",
            "home",
            "--key",
            "hub.key",
            "--apps",
            "authorized_apps",
            "--forward",
            "127.0.0.1:9",
            "--metrics-listen",
            &hub_metrics_text,
        ],
        "hub.notify",
    );

    for (what, socket) in [("relay", &relay_notify), ("hub", &hub_notify)] {
        let got = receive(socket, |got| got.iter().filter(|d| *d == "WATCHDOG=1").count() >= 3);
        let ready = got.iter().position(|d| d.starts_with("READY=1\n") && d.contains("STATUS="));
        assert_eq!(ready, Some(0), "{what}: READY=1 first, then watchdog pings; got {got:?}");
        assert!(got.iter().filter(|d| *d == "WATCHDOG=1").count() >= 3, "{what}: {got:?}");
    }

    eventually_blocking("the hub registered", || {
        keyway_proto::ops_http::probe_health(hub_metrics, Duration::from_secs(5)).ok()
    });
    let scrapes: Vec<String> = [relay_metrics, hub_metrics].iter().map(|m| scrape(*m).unwrap()).collect();
    let version = format!("keyway_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
    for text in &scrapes {
        assert!(text.contains(&version), "no {version} in {text}");
        for name in ["process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"] {
            assert!(text.lines().any(|l| l.starts_with(name)), "no {name}");
        }
    }
    let have = exported(&scrapes);
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    for file in ["grafana/keyway-dashboard.json", "prometheus/keyway-rules.yaml"] {
        let text = std::fs::read_to_string(deploy.join(file)).unwrap();
        let used = metric_names(&text);
        assert!(used.len() > 5, "{file}: {used:?}");
        let missing: Vec<&String> = used.iter().filter(|n| !have.contains(*n)).collect();
        assert!(missing.is_empty(), "{file} queries metrics nobody exports: {missing:?}");
    }

    for (what, child, socket) in [("hub", &mut hub, &hub_notify), ("relay", &mut relay, &relay_notify)] {
        sigterm(child);
        let got = receive(socket, |got| got.iter().any(|d| d == "STOPPING=1"));
        assert!(got.iter().any(|d| d == "STOPPING=1"), "{what}: no STOPPING=1 after SIGTERM: {got:?}");
        let status = child.wait().unwrap();
        assert!(status.success(), "{what} exited with {status}");
        let lines = assert_json_lines(what, child.stderr.take().unwrap());
        assert!(lines >= 3, "{what}: only {lines} log lines");
    }
}

#[test]
fn keyway_forward_logs_json_from_the_first_line_even_when_it_fails() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = Bin::run("keyway", &["keygen", "--out", "app.key"], dir.path());
    assert!(ok, "{err}");
    let hub_key = keyway_test_support::identity().public_key().to_string();
    // The listen address is taken: forward fails at once, and says so in JSON.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    let relay_key = keyway_test_support::identity().public_key().to_string();
    let out = Command::new(Bin::path("keyway"))
        .args([
            "forward",
            "--log-format",
            "json",
            "--relay",
            "127.0.0.1:9",
            "--relay-key",
            &relay_key,
            "--hub",
            "home",
            "--hub-key",
            &hub_key,
            "--key",
            "app.key",
            "--listen",
            &listen,
        ])
        .current_dir(dir.path())
        .env("RUST_LOG", "debug")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let lines = assert_json_lines("keyway forward", &out.stderr[..]);
    assert!(lines >= 1);
    let last = String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or_default().to_owned();
    assert!(last.contains("\"level\":\"ERROR\"") && last.contains("keyway exiting"), "{last}");
}

/// `status --json` of each binary, given the same key file as its `run`, finds the running
/// process through its 0600 admin socket and names what it is doing.
#[test]
fn status_json_of_the_relay_and_the_hub_finds_the_running_processes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let web = rt.block_on(http_service("status test"));
    let keygen = |file: &str| {
        let (ok, out, err) = Bin::run("keyway", &["keygen", "--out", file], path);
        assert!(ok, "{err}");
        out.split_whitespace().find(|w| w.starts_with("kw")).unwrap().to_owned()
    };
    let (hub_key, app_key, relay_key) = (keygen("hub.key"), keygen("app.key"), keygen("relay.key"));
    std::fs::write(path.join("authorized_hubs"), format!("home {hub_key}\n")).unwrap();
    std::fs::write(path.join("authorized_apps"), format!("{app_key} Anna's laptop\n")).unwrap();
    let relay_addr = format!("127.0.0.1:{}", free_udp_port());
    let _relay = Bin::spawn(
        "keyway-relay",
        &["run", "--listen", &relay_addr, "--key", "relay.key", "--no-metrics"],
        path,
    );
    let web = web.to_string();
    let _hub = Bin::spawn(
        "keyway-hub",
        &[
            "run",
            "--relay",
            &relay_addr,
            "--relay-key",
            &relay_key,
            "--name",
            "home",
            "--key",
            "hub.key",
            "--apps",
            "authorized_apps",
            "--forward",
            &web,
        ],
        path,
    );
    let port = free_tcp_port();
    let listen = format!("127.0.0.1:{port}");
    let _forward = Bin::spawn(
        "keyway",
        &[
            "forward",
            "--relay",
            &relay_addr,
            "--relay-key",
            &relay_key,
            "--hub",
            "home",
            "--hub-key",
            &hub_key,
            "--key",
            "app.key",
            "--listen",
            &listen,
        ],
        path,
    );
    let status = |bin: &str, key: &str| -> Option<serde_json::Value> {
        let (ok, out, _) = Bin::run(bin, &["status", "--json", "--key", key], path);
        ok.then(|| serde_json::from_str(&out).unwrap_or_else(|e| panic!("{bin} status: {e}: {out}")))
    };
    // One request through the hub, so an app is connected (keyway forward keeps its
    // end-to-end connection).
    eventually_blocking("a request through keyway forward", || {
        use std::io::{Read, Write};
        let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n\r\n").ok()?;
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).ok()?;
        answer.ends_with("status test").then_some(())
    });
    let hub = eventually_blocking("keyway-hub status shows the app connected", || {
        status("keyway-hub", "hub.key").filter(|s| s["apps"].as_array().is_some_and(|a| !a.is_empty()))
    });
    assert_eq!(hub["name"], "home");
    assert_eq!(hub["public_key"], hub_key.as_str());
    assert_eq!(hub["registered"], true);
    assert_eq!(hub["relays"][0]["address"], relay_addr.as_str());
    assert_eq!(hub["relays"][0]["registered"], true);
    assert_eq!(hub["relays"][0]["last_error"], serde_json::Value::Null);
    assert_eq!(hub["apps"][0]["key"], app_key.as_str());
    assert_eq!(hub["apps"][0]["label"], "Anna's laptop");
    assert!(hub["sessions_accepted"].as_u64().unwrap() >= 1, "{hub}");

    let relay = status("keyway-relay", "relay.key").expect("keyway-relay status answers");
    assert_eq!(relay["listen"], relay_addr.as_str());
    assert_eq!(relay["public_key"], relay_key.as_str());
    assert_eq!(relay["hubs_online"], 1);
    assert!(relay["channels_active"].as_u64().unwrap() >= 1, "{relay}");
    assert!(relay["limit_hits"].as_object().is_some_and(|h| h.contains_key("max_hubs")), "{relay}");

    use std::os::unix::fs::PermissionsExt;
    for socket in ["hub.key.sock", "relay.key.sock"] {
        let mode = std::fs::metadata(path.join(socket)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{socket}");
    }
    // A key file no process runs with: a clear error, exit 1.
    let (ok, _, err) = Bin::run("keyway-hub", &["status", "--json", "--key", "app.key"], path);
    assert!(!ok && err.contains("no running process answers"), "{err}");
}
