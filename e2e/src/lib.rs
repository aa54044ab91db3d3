//! Shared harness for Keyway's end-to-end tests.
//!
//! Everything here is real: a [`keyway_relay`] relay on a loopback UDP port, [`keyway_hub`]
//! connectors and [`keyway_client`] clients speaking QUIC to it, and plain TCP services behind
//! the hubs. [`Bin`] runs the shipped binaries as child processes for the CLI-level tests.
//! Waiting is done by polling a condition with a generous deadline; tests never assert how
//! long something took.
//!
//! What needs no relay, hub or client library (waits and [`PATIENCE`], the echo service,
//! payloads, identities, the [`raw`] protocol peer) comes from `keyway-test-support` and is
//! re-exported here, so tests import one harness.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use keyway_client::{Client, ClientConfig};
use keyway_hub::{HubConfig, HubHandle};
use keyway_proto::{Identity, PublicKey};
use keyway_relay::{NamePolicy, Relay, RelayConfig, RelayHandle};
pub use keyway_test_support::{echo_service, eventually, fresh_seed, identity, name, payload, raw, PATIENCE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A relay with a closed name policy in its own temporary directory.
pub struct TestRelay {
    pub dir: tempfile::TempDir,
    pub handle: RelayHandle,
    pub hubs_file: PathBuf,
    pub seed: [u8; 32],
}

impl TestRelay {
    pub async fn start(hubs: &[(&str, PublicKey)]) -> Self {
        Self::start_with(hubs, |_| {}).await
    }

    pub async fn start_with(hubs: &[(&str, PublicKey)], tweak: impl FnOnce(&mut RelayConfig)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let hubs_file = dir.path().join("authorized_hubs");
        write_hubs(&hubs_file, hubs);
        let seed = fresh_seed();
        let handle = start_relay("127.0.0.1:0".parse().unwrap(), seed, &hubs_file, tweak).await;
        Self { dir, handle, hubs_file, seed }
    }

    pub fn addr(&self) -> SocketAddr {
        self.handle.local_addr()
    }

    pub fn key(&self) -> PublicKey {
        self.handle.public_key()
    }

    /// Stops this relay and starts a new one with the same key, address and hubs file,
    /// as a process restart would.
    pub async fn restart(self) -> Self {
        let addr = self.addr();
        let Self { dir, handle, hubs_file, seed } = self;
        handle.shutdown().await;
        let handle = start_relay(addr, seed, &hubs_file, |_| {}).await;
        Self { dir, handle, hubs_file, seed }
    }
}

async fn start_relay(
    listen: SocketAddr,
    seed: [u8; 32],
    hubs_file: &Path,
    tweak: impl FnOnce(&mut RelayConfig),
) -> RelayHandle {
    let policy = NamePolicy::Closed { hubs_file: hubs_file.to_path_buf() };
    let mut config = RelayConfig::new(listen, Identity::from_seed(seed), policy);
    tweak(&mut config);
    Relay::start(config).await.expect("relay starts")
}

pub fn write_hubs(path: &Path, hubs: &[(&str, PublicKey)]) {
    let text: String = hubs.iter().map(|(n, k)| format!("{n} {k}\n")).collect();
    std::fs::write(path, text).expect("write authorized_hubs");
}

pub fn write_apps(path: &Path, apps: &[PublicKey]) {
    let text: String = apps.iter().map(|k| format!("{k} test app\n")).collect();
    std::fs::write(path, text).expect("write authorized_apps");
}

/// Starts a hub connector for `name` that forwards to `service`, allowing `apps`.
pub async fn start_hub(
    relay: &TestRelay,
    name_: &str,
    id: Identity,
    apps: &[PublicKey],
    service: SocketAddr,
) -> (HubHandle, PathBuf) {
    let apps_file = relay.dir.path().join(format!("authorized_apps.{name_}"));
    write_apps(&apps_file, apps);
    let mut config = HubConfig::new(relay.addr(), relay.key(), name(name_), id, apps_file.clone(), service);
    config.backoff_max = Duration::from_millis(500);
    let hub = keyway_hub::start(config).await.expect("hub starts");
    (hub, apps_file)
}

pub fn client(relay: &TestRelay, id: Identity) -> Client {
    Client::new(ClientConfig::new(id, relay.addr(), relay.key())).expect("client")
}

/// A minimal HTTP/1.1 server answering every request with `body`.
pub async fn http_service(body: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(resp.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

/// Sends `data` over `stream`, closes the write side, and returns everything read back.
pub async fn round_trip<S>(stream: S, data: Vec<u8>) -> std::io::Result<Vec<u8>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (mut r, mut w) = tokio::io::split(stream);
    let writer = tokio::spawn(async move {
        for chunk in data.chunks(256 * 1024) {
            w.write_all(chunk).await?;
        }
        w.shutdown().await?;
        Ok::<_, std::io::Error>(w)
    });
    let mut back = Vec::new();
    r.read_to_end(&mut back).await?;
    let _w = writer.await.map_err(std::io::Error::other)??;
    Ok(back)
}

/// The `keyway-relay` binary as a child process on a loopback port, with a metrics listener
/// and a fixed key (so it can be killed and started again as "the same relay").
pub struct RelayProcess {
    pub bin: Bin,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
    pub key: PublicKey,
    seed: [u8; 32],
    extra: Vec<String>,
    pub dir: tempfile::TempDir,
}

impl RelayProcess {
    /// Starts a closed-policy relay admitting `hubs`, with `extra` flags for `run`.
    pub fn start(hubs: &[(&str, PublicKey)], extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let seed = fresh_seed();
        Identity::from_seed(seed).save(&dir.path().join("relay.key")).expect("save relay key");
        write_hubs(&dir.path().join("authorized_hubs"), hubs);
        let addr: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().expect("addr");
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().expect("addr");
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let bin = Self::spawn(&dir, addr, metrics, &extra);
        Self { bin, addr, metrics, key: Identity::from_seed(seed).public_key(), seed, extra, dir }
    }

    fn spawn(dir: &tempfile::TempDir, addr: SocketAddr, metrics: SocketAddr, extra: &[String]) -> Bin {
        let (addr, metrics) = (addr.to_string(), metrics.to_string());
        let mut args = vec!["run", "--listen", &addr, "--key", "relay.key", "--hubs", "authorized_hubs"];
        args.extend(["--metrics-listen", &metrics]);
        args.extend(extra.iter().map(String::as_str));
        Bin::spawn("keyway-relay", &args, dir.path())
    }

    /// Waits until `/metrics` answers (the QUIC listener is up before the metrics listener).
    pub async fn wait_ready(&self) {
        eventually("relay metrics endpoint", || async {
            scrape(self.metrics).filter(|t| t.contains("keyway_relay"))
        })
        .await;
    }

    /// SIGKILL (no GoAway, no close: a crash), then the same relay again on the same port.
    pub async fn crash_and_restart(&mut self) {
        let _ = self.bin.child.kill();
        let _ = self.bin.child.wait();
        self.bin = Self::spawn(&self.dir, self.addr, self.metrics, &self.extra);
        self.wait_ready().await;
    }

    /// The relay's seed (tests that need its identity).
    pub fn identity(&self) -> Identity {
        Identity::from_seed(self.seed)
    }
}

/// A shipped binary run as a child process; killed when dropped.
pub struct Bin {
    pub child: Child,
}

impl Bin {
    /// Path of a workspace binary. `cargo test --workspace` builds every binary before any test
    /// runs, but `cargo test -p keyway-e2e` does not, and a stale binary would test old code:
    /// so each test process runs `cargo build` for the binaries once (a no-op when fresh).
    pub fn path(name: &str) -> PathBuf {
        static BUILT: std::sync::Once = std::sync::Once::new();
        let exe = std::env::current_exe().expect("test exe path");
        let dir = exe.parent().and_then(Path::parent).expect("target profile dir").to_path_buf();
        let release = dir.file_name().is_some_and(|d| d == "release");
        BUILT.call_once(|| {
            // The same units as `cargo test --workspace` (so the same feature resolution): a
            // no-op right after it, instead of rebuilding rustls and quinn for `--bins` alone.
            let mut args = vec!["build", "--workspace", "--bins", "--tests"];
            if release {
                args.push("--release");
            }
            // Cargo sets package variables (CARGO_PKG_NAME, CARGO_MANIFEST_DIR, ...) for this
            // test process; passed on, they would differ from the outer cargo's environment and
            // make build scripts that watch them (ring's) rerun, rebuilding the TLS stack.
            let mut cargo = Command::new(env!("CARGO"));
            for (key, _) in std::env::vars_os() {
                let key_text = key.to_string_lossy();
                let package_var =
                    ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_CRATE_", "CARGO_BIN_", "CARGO_CFG_"]
                        .iter()
                        .any(|p| key_text.starts_with(p))
                        || [
                            "CARGO_PRIMARY_PACKAGE",
                            "CARGO_TARGET_TMPDIR",
                            "CARGO_RUSTC_CURRENT_DIR",
                            "OUT_DIR",
                        ]
                        .contains(&key_text.as_ref());
                if package_var {
                    cargo.env_remove(&key);
                }
            }
            let status = cargo.args(args).status().expect("run cargo build");
            assert!(status.success(), "building the binaries failed");
        });
        dir.join(name)
    }

    pub fn spawn(name: &str, args: &[&str], cwd: &Path) -> Self {
        let child = Command::new(Self::path(name))
            .args(args)
            .current_dir(cwd)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Self { child }
    }

    /// Runs a binary to completion and returns (success, stdout, stderr).
    pub fn run(name: &str, args: &[&str], cwd: &Path) -> (bool, String, String) {
        let out = Command::new(Self::path(name))
            .args(args)
            .current_dir(cwd)
            .output()
            .unwrap_or_else(|e| panic!("run {name}: {e}"));
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Bin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free loopback UDP port (bound and released; good enough for tests on one machine).
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).expect("free port").port()
}

/// A free loopback TCP port.
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|s| s.local_addr()).expect("free port").port()
}

/// Fetches a Prometheus text exposition over plain HTTP/1.1.
pub fn scrape(addr: SocketAddr) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    text.split_once("\r\n\r\n").map(|(_, body)| body.to_owned())
}

/// Sums the samples of metric `name` whose label set contains every `key="value"` in `labels`.
pub fn metric(exposition: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric_name, label_text) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric_name != name {
                return None;
            }
            let all =
                labels.iter().all(|(k, v)| label_text.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
            all.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// Resident set size of a process in KiB, from `/proc/PID/status`.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}
