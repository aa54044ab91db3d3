//! Smoke test of the `keyway-hub` binary: first run creates the key and prints what the relay
//! owner needs; `pubkey` prints the same key.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::process::{Command, Stdio};

use keyway_test_support::child::Lines;
use keyway_test_support::http::get_blocking as http_get;

#[test]
fn first_run_creates_the_key_and_prints_the_authorized_hubs_line() {
    let dir = tempfile::tempdir().unwrap();
    // A relay that never answers: the connector must still start, print, and keep retrying.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let relay = silent.local_addr().unwrap().to_string();
    let relay_key = keyway_proto::Identity::from_seed([1; 32]).public_key().to_string();
    let key_path = dir.path().join("state/hub.key");
    let mut child = Command::new(env!("CARGO_BIN_EXE_keyway-hub"))
        .args(["run", "--relay", &relay, "--relay-key", &relay_key, "--name", "home", "--key"])
        .arg(&key_path)
        .args(["--apps", "authorized_apps", "--forward", "127.0.0.1:9"])
        .current_dir(dir.path())
        .env_remove("KEYWAY_HUB_CONFIG")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = Lines::new(child.stdout.take().unwrap());
    let line = lines.until("the authorized_hubs line", |l| l.starts_with("home kw").then(|| l.to_owned()));
    assert!(child.try_wait().unwrap().is_none(), "the connector keeps running while the relay is silent");
    let _ = child.kill();
    let _ = child.wait();

    let printed_key = line.split_whitespace().nth(1).unwrap().to_owned();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    let out = Command::new(env!("CARGO_BIN_EXE_keyway-hub"))
        .args(["pubkey", "--key"])
        .arg(&key_path)
        .env_remove("KEYWAY_HUB_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), printed_key);
}

#[test]
fn a_config_file_with_two_relays_and_metrics_runs_one_tunnel_each() {
    let dir = tempfile::tempdir().unwrap();
    // Two relays that never answer: both tunnels stay down, and the hub says so.
    let silent: Vec<std::net::UdpSocket> =
        (0..2).map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
    let relays: Vec<String> = silent.iter().map(|s| s.local_addr().unwrap().to_string()).collect();
    let keys: Vec<String> = [1u8, 2]
        .iter()
        .map(|s| keyway_proto::Identity::from_seed([*s; 32]).public_key().to_string())
        .collect();
    let config = dir.path().join("hub.toml");
    std::fs::write(
        &config,
        format!(
            "relay = [\"{}\", \"{}\"]\nrelay_key = [\"{}\", \"{}\"]\nname = \"home\"\nkey = \"hub.key\"\n\
             apps = \"authorized_apps\"\nforward = \"127.0.0.1:9\"\nmetrics_listen = \"127.0.0.1:0\"\n",
            relays[0], relays[1], keys[0], keys[1]
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_keyway-hub"))
        .arg("run")
        .arg("--config")
        .arg(&config)
        .current_dir(dir.path())
        .env_remove("KEYWAY_HUB_CONFIG")
        .env_remove("KEYWAY_HUB_RELAY")
        .env_remove("KEYWAY_HUB_RELAY_KEY")
        .env_remove("KEYWAY_HUB_METRICS_LISTEN")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = Lines::new(child.stdout.take().unwrap());
    let metrics = lines.until("the metrics line", |l| {
        l.strip_prefix("metrics: http://").map(|rest| rest.split('/').next().unwrap().to_owned())
    });
    let (status, body) = http_get(&metrics, "/healthz");
    let (_, text) = http_get(&metrics, "/metrics");
    assert!(child.try_wait().unwrap().is_none(), "the connector keeps running while the relays are silent");
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!((status, body.as_str()), (503, "no tunnel registered\n"));
    for relay in &relays {
        let series = format!("keyway_hub_tunnel_up{{relay=\"{relay}\"}} 0");
        assert!(text.lines().any(|l| l == series), "{series} not in\n{text}");
    }
}
