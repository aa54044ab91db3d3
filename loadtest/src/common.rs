//! What every scenario shares: the relay child process, `/proc` readings, the one-hub set-up,
//! percentiles, progress bars and JSON-lines output. Deterministic identities
//! (`identity_for`), the TCP echo service and payloads are `keyway-test-support`'s, the same
//! the tests use.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use keyway_proto::{HubName, Identity, PublicKey};
pub use keyway_test_support::identity_for;
use keyway_test_support::{payload, try_echo_service};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use crate::Record;

/// Where to find the relay binary: `explicit` if given, else next to the running executable
/// (`target/<profile>/`), else one level up (test executables live in `target/<profile>/deps/`).
pub fn relay_bin(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        return Ok(path.to_path_buf());
    }
    let exe = std::env::current_exe().context("locating the running executable")?;
    let mut dir = exe.parent();
    for _ in 0..2 {
        let Some(d) = dir else { break };
        let candidate = d.join("keyway-relay");
        if candidate.exists() {
            return Ok(candidate);
        }
        dir = d.parent();
    }
    bail!(
        "keyway-relay binary not found next to {}; build it (`cargo build --release -p keyway-relay`) \
         or pass --relay-bin",
        exe.display()
    )
}

/// How the relay admits hub names.
#[derive(Debug, Clone)]
pub enum Policy {
    /// A generated `authorized_hubs` listing these names and keys.
    Closed(Vec<(HubName, PublicKey)>),
    /// `--open`: first key to claim a name keeps it.
    Open,
}

/// A `keyway-relay run` child process on a loopback port, with its key and files in a
/// temporary directory. Killed when dropped.
pub struct RelayProc {
    bin: PathBuf,
    dir: tempfile::TempDir,
    open: bool,
    env: Vec<(String, String)>,
    /// Flags (with their values) that replace the benchmark defaults of [`Self::spawn`].
    overrides: Vec<(String, String)>,
    child: Option<Child>,
    /// The UDP address it listens on (kept across restarts).
    pub addr: SocketAddr,
    /// Its public key (kept across restarts: same key file).
    pub key: PublicKey,
}

impl RelayProc {
    /// Writes the key and hubs file, starts the relay and waits until it listens. `env` is
    /// added to the child's environment (e.g. `MALLOC_ARENA_MAX` for allocator experiments).
    pub async fn start(bin: &Path, policy: &Policy, env: &[(String, String)]) -> anyhow::Result<Self> {
        Self::start_with(bin, policy, env, &[]).await
    }

    /// [`Self::start`] with some limit flags set to `overrides` (`("--retry-threshold", "100")`)
    /// instead of the benchmark's "no limit" values, e.g. the per-source limits an operator sets.
    pub async fn start_with(
        bin: &Path,
        policy: &Policy,
        env: &[(String, String)],
        overrides: &[(&str, String)],
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let (identity, _) = Identity::load_or_create(&dir.path().join("relay.key"))?;
        let open = match policy {
            Policy::Open => true,
            Policy::Closed(hubs) => {
                let mut text = String::with_capacity(hubs.len() * 72);
                for (name, key) in hubs {
                    text.push_str(&format!("{name} {key}\n"));
                }
                std::fs::write(dir.path().join("authorized_hubs"), text)?;
                false
            }
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], free_udp_port()?));
        let mut relay = Self {
            bin: bin.to_path_buf(),
            dir,
            open,
            env: env.to_vec(),
            overrides: overrides.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect(),
            child: None,
            addr,
            key: identity.public_key(),
        };
        relay.spawn().await?;
        Ok(relay)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let d = self.dir.path();
        let mut cmd = Command::new(&self.bin);
        cmd.arg("run")
            .arg("--listen")
            .arg(self.addr.to_string())
            .arg("--key")
            .arg(d.join("relay.key"))
            .arg("--hubs")
            .arg(d.join("authorized_hubs"))
            .arg("--state")
            .arg(d.join("bindings"));
        if self.open {
            cmd.arg("--open");
        }
        // The relay's default limits protect a small self-hosted relay from strangers; a
        // benchmark from one source address would measure them instead (the per-IP connection
        // bucket, the cap on connections not yet authorized, max_hubs, the per-app and per-key
        // caps). An operator sizing a relay for N hubs lifts them the same way. No metrics
        // listener: runs may overlap on its default port.
        let mut flags: Vec<(String, String)> = [
            ("--max-hubs", "0"),
            ("--max-sessions-per-hub", "0"),
            ("--max-sessions-per-app", "0"),
            ("--new-connections-per-ip", "0"),
            ("--max-unauthorized-connections", "0"),
            ("--bytes-per-second-per-key", "0"),
            ("--retry-threshold", "4294967295"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        for (k, v) in &self.overrides {
            match flags.iter_mut().find(|(f, _)| f == k) {
                Some(slot) => slot.1 = v.clone(),
                None => flags.push((k.clone(), v.clone())),
            }
        }
        for (k, v) in &flags {
            cmd.arg(k).arg(v);
        }
        cmd.arg("--no-metrics");
        // Info logs cost a line per registration; at 20 000 hubs that would be measured too.
        let log = std::fs::OpenOptions::new().create(true).append(true).open(d.join("relay.log"))?;
        cmd.env("RUST_LOG", std::env::var("KEYWAY_LOADTEST_RELAY_LOG").unwrap_or_else(|_| "warn".into()))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true);
        let mut child = cmd.spawn().with_context(|| format!("starting {}", self.bin.display()))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("relay stdout not piped"))?;
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(line) = lines.next_line().await? {
                if line.starts_with("keyway-relay listening on") {
                    return Ok(());
                }
            }
            Err(anyhow!("relay exited before listening"))
        })
        .await;
        match ready {
            Ok(Ok(())) => {}
            Ok(Err(e)) => bail!("{e}; see {}", d.join("relay.log").display()),
            Err(_) => bail!("relay did not start listening within 20 s"),
        }
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.child = Some(child);
        Ok(())
    }

    /// The child's process id.
    pub fn pid(&self) -> anyhow::Result<u32> {
        self.child.as_ref().and_then(Child::id).ok_or_else(|| anyhow!("relay is not running"))
    }

    /// Stops the relay with `signal` (`TERM`: graceful, hubs get `GoAway`; `KILL`: abrupt) and
    /// waits for it to exit.
    pub async fn stop(&mut self, signal: &str) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else { return Ok(()) };
        let pid = child.id().ok_or_else(|| anyhow!("relay already exited"))?;
        let status = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().await?;
        if !status.success() {
            bail!("kill -{signal} {pid} failed");
        }
        tokio::time::timeout(Duration::from_secs(120), child.wait())
            .await
            .context("relay did not exit within 120 s")??;
        Ok(())
    }

    /// Starts the relay again on the same address with the same key and files.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.spawn().await
    }

    /// Resident set size and CPU time of the relay process.
    pub fn usage(&self) -> anyhow::Result<ProcUsage> {
        ProcUsage::read(self.pid()?)
    }
}

/// A free loopback UDP port (bound and released; fine on one machine).
pub fn free_udp_port() -> std::io::Result<u16> {
    std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr().map(|a| a.port())
}

/// Memory and CPU of a process from `/proc`.
#[derive(Debug, Clone, Copy)]
pub struct ProcUsage {
    /// `VmRSS` in KiB.
    pub rss_kib: u64,
    /// `utime + stime` in seconds.
    pub cpu_s: f64,
}

impl ProcUsage {
    pub fn read(pid: u32) -> anyhow::Result<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the parenthesised command name (which may contain spaces): field 3 is
        // at index 0, so utime (14) and stime (15) are at 11 and 12.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).ok_or_else(|| anyhow!("bad /proc stat"))?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        // USER_HZ is 100 on every Linux ABI we run on.
        let cpu_s = (ticks(11) + ticks(12)) as f64 / 100.0;
        Ok(Self { rss_kib, cpu_s })
    }
}

/// One relay process admitting one hub, that hub (the real connector) forwarding to a local
/// echo service, and the app key it authorizes: the set-up the bulk and churn scenarios share.
pub struct OneHub {
    pub relay: RelayProc,
    pub hub: keyway_hub::HubHandle,
    pub name: HubName,
    pub hub_key: PublicKey,
    pub app: Identity,
    _dir: tempfile::TempDir,
}

impl OneHub {
    /// Starts relay, service and hub and waits for the registration. `purposes` (hub, app)
    /// keep the keys distinct from other scenarios'.
    pub async fn start(relay_bin: &Path, purposes: (u8, u8)) -> anyhow::Result<Self> {
        Self::start_routed(relay_bin, purposes, async |relay| Ok(relay)).await
    }

    /// [`Self::start`] with the hub's path to the relay chosen by `route` (given the relay's
    /// address, it returns the address the hub dials instead, e.g. a delaying forwarder's).
    pub async fn start_routed(
        relay_bin: &Path,
        purposes: (u8, u8),
        route: impl AsyncFnOnce(SocketAddr) -> anyhow::Result<SocketAddr>,
    ) -> anyhow::Result<Self> {
        let hub_id = identity_for(purposes.0, 0);
        let app = identity_for(purposes.1, 0);
        let name = hub_name(0);
        let hub_key = hub_id.public_key();
        let relay = RelayProc::start(relay_bin, &Policy::Closed(vec![(name.clone(), hub_key)]), &[]).await?;
        let dir = tempfile::tempdir()?;
        let apps_file = dir.path().join("authorized_apps");
        std::fs::write(
            &apps_file,
            format!(
                "{} loadtest app
",
                app.public_key()
            ),
        )?;
        let service = try_echo_service(b"").await?;
        let config = keyway_hub::HubConfig::new(
            route(relay.addr).await?,
            relay.key,
            name.clone(),
            hub_id,
            apps_file,
            service,
        );
        let hub = keyway_hub::start(config).await?;
        hub.wait_registered(Duration::from_secs(20)).await?;
        Ok(Self { relay, hub, name, hub_key, app, _dir: dir })
    }

    /// Stops the hub, then the relay.
    pub async fn stop(self) {
        self.hub.shutdown().await;
        drop(self.relay);
    }
}

/// The hub name of hub `index`.
pub fn hub_name(index: u32) -> HubName {
    #[allow(clippy::expect_used)] // `h` + digits is always a valid name
    HubName::new(&format!("h{index}")).expect("valid hub name")
}

/// The seed of [`echo_transfer`]'s block (the bytes it has always sent).
const BLOCK_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// Writes `bytes` into `stream` while reading the echo back; returns the time until the last
/// byte came back. The payload is random so nothing downstream can compress it.
pub async fn echo_transfer<S>(stream: S, bytes: u64) -> anyhow::Result<Duration>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    const CHUNK: usize = 256 * 1024;
    let block: std::sync::Arc<[u8]> = payload(CHUNK, BLOCK_SEED).into();
    let (mut r, mut w) = tokio::io::split(stream);
    let start = Instant::now();
    let writer = tokio::spawn(async move {
        let mut left = bytes;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            w.write_all(block.get(..n).unwrap_or_default()).await?;
            left -= n as u64;
        }
        w.shutdown().await?;
        Ok::<_, std::io::Error>(w)
    });
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    while got < bytes {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            bail!("echo ended after {got} of {bytes} bytes");
        }
        got += n as u64;
    }
    let elapsed = start.elapsed();
    writer.await??;
    Ok(elapsed)
}

/// The `p`-th percentile (0..=100, nearest rank) of `values`, which it sorts.
pub fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
    values.get(rank.clamp(1, values.len()) - 1).copied().unwrap_or(f64::NAN)
}

/// The median of `values`.
pub fn median(values: &mut [f64]) -> f64 {
    percentile(values, 50.0)
}

/// A progress bar on stderr; hidden when `quiet` (tests) or when stderr is not a terminal.
pub fn progress(len: u64, what: &str, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) =
        ProgressStyle::with_template("{msg:>24} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec})")
    {
        bar.set_style(style);
    }
    bar.set_message(what.to_owned());
    bar
}

/// Writes records as JSON lines to `out` (a file, appended to) or stdout.
pub fn write_records(records: &[Record], out: Option<&Path>) -> anyhow::Result<()> {
    let mut sink: Box<dyn Write> = match out {
        Some(path) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?,
        ),
        None => Box::new(std::io::stdout().lock()),
    };
    for record in records {
        writeln!(sink, "{record}")?;
    }
    sink.flush()?;
    Ok(())
}

/// Reads JSON lines (blank lines skipped).
pub fn read_records(path: &Path) -> anyhow::Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("bad JSON line in {}", path.display())))
        .collect()
}

/// Seconds since the Unix epoch, for stamping records.
pub fn unix_time() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Rounds to `digits` decimals so the JSON stays readable.
pub fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}
