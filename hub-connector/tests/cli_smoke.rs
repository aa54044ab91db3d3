//! Smoke test of the `keyway-hub` binary: first run creates the key and prints what the relay
//! owner needs; `pubkey` prints the same key.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut lines = Vec::new();
    let line = loop {
        assert!(Instant::now() < deadline, "no authorized_hubs line; got {lines:#?}");
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            if line.starts_with("home kw") {
                break line;
            }
            lines.push(line);
        }
    };
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
