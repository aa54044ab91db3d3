//! The shipped binaries, as a user runs them: relay with embedded defaults, a hub connector in
//! front of a local HTTP server, and `keyway forward` carrying a plain HTTP client.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use keyway_e2e::*;
use keyway_test_support::child::Lines;

/// Reads the child's stdout until a line contains `needle`; returns all lines read.
fn read_until(bin: &mut Bin, needle: &str) -> Vec<String> {
    let mut lines = Lines::new(bin.child.stdout.take().expect("piped stdout"));
    lines.until(&format!("{needle:?}"), |l| l.contains(needle).then_some(()));
    lines.into_seen()
}

fn http_get(port: u16) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    stream.write_all(b"GET / HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

#[test]
fn keygen_writes_a_private_key_file_and_pubkey_reads_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, out, err) = Bin::run("keyway", &["keygen", "--out", "app.key"], dir.path());
    assert!(ok, "keygen failed: {err}");
    let key = out.split_whitespace().find(|w| w.starts_with("kw")).expect("public key printed").to_owned();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("app.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let (ok, out, _) = Bin::run("keyway", &["pubkey", "app.key"], dir.path());
    assert!(ok);
    assert_eq!(out.trim(), key);
    let (ok, _, err) = Bin::run("keyway", &["keygen", "--out", "app.key"], dir.path());
    assert!(!ok, "keygen must refuse to overwrite an identity");
    assert!(err.contains("exists"), "{err}");
}

#[test]
fn a_plain_http_client_reaches_the_hub_through_keyway_forward() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let web = rt.block_on(http_service("hello from the hub"));

    // Keys first, so the relay's authorized_hubs can name the hub.
    let (ok, out, err) = Bin::run("keyway", &["keygen", "--out", "hub.key"], path);
    assert!(ok, "{err}");
    let hub_key = out.split_whitespace().find(|w| w.starts_with("kw")).unwrap().to_owned();
    let (ok, out, err) = Bin::run("keyway", &["keygen", "--out", "app.key"], path);
    assert!(ok, "{err}");
    let app_key = out.split_whitespace().find(|w| w.starts_with("kw")).unwrap().to_owned();
    std::fs::write(path.join("authorized_hubs"), format!("home {hub_key}\n")).unwrap();
    std::fs::write(path.join("authorized_apps"), format!("{app_key} test laptop\n")).unwrap();

    let udp = free_udp_port();
    let relay_addr = format!("127.0.0.1:{udp}");
    let mut relay = Bin::spawn("keyway-relay", &["run", "--listen", &relay_addr], path);
    let lines = read_until(&mut relay, "kw");
    let relay_key = lines
        .iter()
        .flat_map(|l| l.split_whitespace())
        .find(|w| w.starts_with("kw"))
        .expect("relay prints its public key")
        .to_owned();

    let web_addr = web.to_string();
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
            &web_addr,
        ],
        path,
    );
    let tcp = free_tcp_port();
    let listen = format!("127.0.0.1:{tcp}");
    // The forwarder takes everything from a TOML config file (same keys as the flags).
    std::fs::write(
        path.join("forward.toml"),
        format!(
            "relay = \"{relay_addr}\"\nrelay_key = \"{relay_key}\"\nhub = \"home\"\nhub_key = \"{hub_key}\"\n\
             key = \"app.key\"\nlisten = \"{listen}\"\n"
        ),
    )
    .unwrap();
    let _forward = Bin::spawn("keyway", &["forward", "--config", "forward.toml"], path);

    let deadline = Instant::now() + PATIENCE;
    let response = loop {
        match http_get(tcp) {
            Some(r) if r.starts_with("HTTP/1.1 200") => break r,
            other => {
                assert!(Instant::now() < deadline, "no HTTP answer through the tunnel; last: {other:?}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    assert!(response.ends_with("hello from the hub"), "{response}");
    // A second request on a new TCP connection reuses the relay connection.
    assert!(http_get(tcp).is_some_and(|r| r.ends_with("hello from the hub")));
}

#[test]
fn the_relay_runs_with_embedded_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    // `keyway-relay run` with nothing else: creates its key and hubs file, prints its key and
    // what a hub owner needs. The default port may be taken on a busy machine, so this test only
    // overrides the port through the environment, as an operator could.
    let udp = free_udp_port();
    let mut relay = Bin {
        child: std::process::Command::new(Bin::path("keyway-relay"))
            .arg("run")
            .current_dir(path)
            .env("KEYWAY_RELAY_LISTEN", format!("127.0.0.1:{udp}"))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    };
    let lines = read_until(&mut relay, "authorized_hubs");
    let all = lines.join("\n");
    assert!(all.contains("kw"), "{all}");
    assert!(path.join("keyway-relay.key").exists());
    assert!(path.join("authorized_hubs").exists());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path.join("keyway-relay.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
