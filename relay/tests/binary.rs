//! The shipped `keyway-relay` binary, run as an operator would on first start.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_keyway-relay");

/// Kills the child even when an assertion fails.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads stdout lines until one contains `needle` (hang guard only, no timing assertion).
fn lines_until(child: &mut Running, needle: &str) -> Vec<String> {
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no {needle:?} in {lines:#?}"));
        let done = line.contains(needle);
        lines.push(line);
        if done {
            return lines;
        }
    }
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
