//! Harness for the network test bed. Behind real NATs: the shipped binaries in network namespaces joined by veth pairs, with
//! nftables NATs (masquerade + a stateful forward filter) between them. The bed is built by
//! `tests/netbed/netbed.sh` (topology in `tests/netbed/README.md`); every test builds its own bed
//! under a unique `kwt-<pid>-<n>` prefix and tears it down on drop, pass or fail.
//!
//! Needs root, iproute2, nftables, conntrack, python3 (and chromium for the browser test). Under
//! `CI=true` a bed that cannot be built fails the test; elsewhere the test is skipped with a reason.
//! Times are printed (`NETBED ...` lines), never asserted; every wait is bounded.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

pub const RELAY_ADDR: &str = "203.0.113.10:4433";
pub const NAT_A_WAN: &str = "198.51.100.2";
pub const HUB_IP: &str = "10.1.0.2";
pub const SERVICE: &str = "127.0.0.1:8080";
pub const FORWARD_PORT: &str = "8123";

static SEQ: AtomicUsize = AtomicUsize::new(0);
static STALE: Once = Once::new();

pub fn netbed_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Uid:")).map(|v| v.split_whitespace().next() == Some("0"))
        })
        .unwrap_or(false)
}

pub fn have(tool: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success())
}

/// `Err(reason)` when the bed cannot run here. In CI that is a failure, elsewhere a skip.
fn unavailable(reason: String) -> Option<Bed> {
    if in_ci() {
        panic!("netbed: cannot build the network test bed in CI: {reason}");
    }
    eprintln!("SKIPPED netbed test: {reason} (run as root with iproute2, nftables, conntrack; see tests/netbed/README.md)");
    None
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Flavour {
    /// Port-preserving masquerade (Linux default).
    Preserve,
    /// `masquerade random`: a random external port per mapping (symmetric-like).
    Random,
    /// Port-preserving, with UDP conntrack timeouts of 3 s on every NAT.
    ShortTimeout,
}

impl Flavour {
    fn arg(self) -> &'static str {
        match self {
            Flavour::Preserve => "preserve",
            Flavour::Random => "random",
            Flavour::ShortTimeout => "short-timeout",
        }
    }
}

/// One test bed: its namespaces, a scratch directory with keys and logs, and the processes run in
/// it. Dropping it kills the processes and deletes the namespaces.
pub struct Bed {
    pub prefix: String,
    dir: tempfile::TempDir,
    procs: Vec<(String, Child)>,
    pub label: String,
}

pub struct Keys {
    pub relay: String,
    pub hub: String,
}

impl Bed {
    /// Builds a bed, or returns `None` (skip) outside CI when it cannot be built.
    /// `udp_timeout`: UDP conntrack timeouts (seconds) on every NAT, whatever the flavour.
    pub fn up(label: &str, flavour: Flavour, cgnat: bool, udp_timeout: Option<u32>) -> Option<Bed> {
        if !is_root() {
            return unavailable("not root".into());
        }
        for tool in ["ip", "nft", "conntrack", "python3"] {
            if !have(tool) {
                return unavailable(format!("{tool} not installed"));
            }
        }
        let script = netbed_dir().join("netbed.sh");
        STALE.call_once(|| {
            let _ = Command::new(&script).arg("stale").status();
        });
        let prefix = format!("kwt-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        let bed = Bed {
            prefix: prefix.clone(),
            dir: tempfile::tempdir().expect("tempdir"),
            procs: Vec::new(),
            label: label.to_owned(),
        };
        let mut cmd = Command::new(&script);
        cmd.args(["up", &prefix, flavour.arg()]);
        if cgnat {
            cmd.arg("cgnat");
        }
        if let Some(t) = udp_timeout {
            cmd.env("KWT_UDP_TIMEOUT_ALL", t.to_string());
        }
        let out = cmd.output().expect("run netbed.sh");
        if !out.status.success() {
            // `bed` is dropped here, which tears down whatever was built.
            return unavailable(format!("netbed.sh up failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        Some(bed)
    }

    pub fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.prefix)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn netns_cmd(&self, role: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(role)]).arg(program).current_dir(self.path());
        cmd
    }

    /// Runs a command in a namespace to completion; panics if it cannot be started.
    pub fn exec(&self, role: &str, args: &[&str]) -> Output {
        self.netns_cmd(role, args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    pub fn exec_ok(&self, role: &str, args: &[&str]) -> String {
        let out = self.exec(role, args);
        assert!(out.status.success(), "{args:?} in {role} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn nft(&self, role: &str, rule: &str) {
        let out =
            self.netns_cmd(role, "nft").arg("-f").arg("-").stdin(Stdio::piped()).spawn().and_then(|mut c| {
                c.stdin.take().expect("stdin").write_all(rule.as_bytes())?;
                c.wait_with_output()
            });
        let out = out.expect("run nft");
        assert!(out.status.success(), "nft {rule:?} in {role}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Starts a long-running process in a namespace; stdout and stderr go to `<name>.log`.
    pub fn spawn(&mut self, role: &str, name: &str, program: &Path, args: &[&str]) {
        let log = std::fs::File::create(self.path().join(format!("{name}.log"))).expect("log file");
        let child = self
            .netns_cmd(role, program)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        self.procs.push((name.to_owned(), child));
    }

    pub fn kill(&mut self, name: &str, signal: &str) {
        let i = self.procs.iter().position(|(n, _)| n == name).unwrap_or_else(|| panic!("no process {name}"));
        let (_, mut child) = self.procs.remove(i);
        let _ = Command::new("kill").args([signal, &child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.wait();
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// How many times the hub registered with the relay so far.
    pub fn registrations(&self) -> usize {
        self.log("hub").matches("registered with the relay").count()
    }

    pub fn wait_for(&self, what: &str, limit: Duration, mut check: impl FnMut(&Bed) -> bool) {
        let deadline = Instant::now() + limit;
        while !check(self) {
            if Instant::now() > deadline {
                self.dump_logs();
                panic!("[{}] gave up waiting for: {what}", self.label);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn dump_logs(&self) {
        for name in ["relay", "hub", "forward", "service"] {
            eprintln!("----- [{}] {name}.log -----\n{}", self.label, self.log(name));
        }
    }

    /// Keys and config files, then the relay (public segment), the web service and the hub
    /// (home network A). `hub_args` are extra `keyway-hub run` flags.
    pub fn start_keyway(&mut self, hub_args: &[&str]) -> Keys {
        let keygen = |file: &str| {
            let (ok, out, err) = run_bin("keyway", &["keygen", "--out", file], self.path());
            assert!(ok, "keygen: {err}");
            out.split_whitespace().find(|w| w.starts_with("kw")).expect("public key printed").to_owned()
        };
        let keys = Keys { relay: keygen("relay.key"), hub: keygen("hub.key") };
        let app = keygen("app.key");
        std::fs::write(self.path().join("authorized_hubs"), format!("home {}\n", keys.hub)).unwrap();
        std::fs::write(self.path().join("authorized_apps"), format!("{app} netbed app\n")).unwrap();
        std::fs::write(self.path().join("blob"), payload(20 << 20, 0x6e65_7462)).unwrap();
        self.start_relay();
        let python = which("python3");
        let service = netbed_dir().join("service.py");
        let service = service.to_str().unwrap().to_owned();
        self.spawn("hub", "service", &python, &[&service, "8080", "blob"]);
        let mut args = vec![
            "run",
            "--relay",
            RELAY_ADDR,
            "--relay-key",
            &keys.relay,
            "--name",
            "home",
            "--key",
            "hub.key",
            "--apps",
            "authorized_apps",
            "--forward",
            SERVICE,
            "--backoff-max",
            "2s",
        ];
        args.extend_from_slice(hub_args);
        let hub = bin_path("keyway-hub");
        self.spawn("hub", "hub", &hub, &args);
        self.wait_for("the hub to register", Duration::from_secs(30), |b| b.registrations() >= 1);
        keys
    }

    pub fn start_relay(&mut self) {
        let relay = bin_path("keyway-relay");
        self.spawn("relay", "relay", &relay, &["run", "--listen", RELAY_ADDR, "--key", "relay.key"]);
    }

    /// `keyway forward` in the app's network B, listening on 127.0.0.1:8123 there.
    pub fn start_forward(&mut self, keys: &Keys, extra: &[&str]) {
        let listen = format!("127.0.0.1:{FORWARD_PORT}");
        let mut args = vec![
            "forward",
            "--relay",
            RELAY_ADDR,
            "--relay-key",
            &keys.relay,
            "--hub",
            "home",
            "--hub-key",
            &keys.hub,
            "--key",
            "app.key",
            "--listen",
            &listen,
        ];
        args.extend_from_slice(extra);
        let keyway = bin_path("keyway");
        self.spawn("app", "forward", &keyway, &args);
    }

    pub fn probe(&self, args: &[&str]) -> String {
        let probe = netbed_dir().join("probe.py");
        let mut full = vec![probe.to_str().unwrap()];
        full.extend_from_slice(args);
        let out = self.netns_cmd("app", which("python3")).args(&full).output().expect("run probe");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Retries `GET /hello` from network B until it answers (bounded); returns the seconds taken.
    pub fn reach(&self, limit_s: u32) -> f64 {
        let line = self.probe(&["wait", FORWARD_PORT, "/hello", "hello from the hub", &limit_s.to_string()]);
        match line.strip_prefix("ok ") {
            Some(rest) => rest.split_whitespace().next().and_then(|s| s.parse().ok()).expect("seconds"),
            None => {
                self.dump_logs();
                panic!("[{}] the app in B never reached the hub in A: {line}", self.label);
            }
        }
    }

    /// The hub's UDP mapping at NAT-A as `(public address:port)` seen from the relay, if any.
    pub fn hub_mapping(&self) -> Option<String> {
        let out = self.exec("nata", &["conntrack", "-L", "-p", "udp", "-s", HUB_IP]);
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().find(|l| l.contains("dport=4433"))?;
        // Reply direction: src=relay dst=<NAT-A public> sport=4433 dport=<mapped port>
        let fields: Vec<&str> = line.split_whitespace().collect();
        let dsts: Vec<&str> = fields.iter().filter_map(|f| f.strip_prefix("dst=")).collect();
        let dports: Vec<&str> = fields.iter().filter_map(|f| f.strip_prefix("dport=")).collect();
        Some(format!("{}:{}", dsts.get(1)?, dports.get(1)?))
    }

    /// SHA-256 (hex) of the 20 MiB file the service in A serves at `/blob`.
    pub fn blob_sha256(&self) -> String {
        sha256_hex(&std::fs::read(self.path().join("blob")).expect("blob"))
    }

    /// One keep-alive HTTP connection from B through `keyway forward`, kept open across steps.
    pub fn session(&mut self) -> Session {
        let probe = netbed_dir().join("probe.py");
        let mut child = self
            .netns_cmd("app", which("python3"))
            .arg(probe)
            .args(["session", FORWARD_PORT])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn probe session");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Session { child, stdin, lines: rx }
    }

    /// Sum of the packet counters of the rules in a chain of the bed's `kwt` table.
    pub fn dropped(&self, role: &str, chain: &str) -> u64 {
        let text = self.exec_ok(role, &["nft", "list", "chain", "ip", "kwt", chain]);
        text.split("packets ").skip(1).filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok()).sum()
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        for (_, child) in &mut self.procs {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            self.dump_logs();
        }
        let _ = Command::new(netbed_dir().join("netbed.sh")).args(["down", &self.prefix]).status();
    }
}

pub fn which(tool: &str) -> PathBuf {
    let out = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().expect("sh");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

pub fn report(scenario: &str, what: impl std::fmt::Display) {
    println!("NETBED {scenario}: {what}");
    eprintln!("NETBED {scenario}: {what}");
}

/// Path of a shipped binary, next to the test executable's profile directory (`cargo test
/// --workspace` builds every binary first). When missing, they are built here.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test exe path");
    let dir = exe.parent().and_then(Path::parent).expect("target profile dir").to_path_buf();
    let path = dir.join(name);
    if !path.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--bins", "-p", "keyway-relay", "-p", "keyway-hub", "-p", "keyway-cli"])
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building the binaries failed");
    }
    path
}

/// Runs a binary (in the root namespace: key generation only) and returns (success, stdout, stderr).
pub fn run_bin(name: &str, args: &[&str], cwd: &Path) -> (bool, String, String) {
    let out = Command::new(bin_path(name)).args(args).current_dir(cwd).output().expect("run binary");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Deterministic pseudo-random bytes, so payloads neither compress nor repeat (the generator
/// every test shares).
pub use keyway_test_support::payload;

/// Lowercase hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// See [`Bed::session`]. The probe process is killed on drop.
pub struct Session {
    child: Child,
    stdin: std::process::ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Session {
    /// One `GET /hello` on the open connection: `"ok <seconds>"` or `"err <what>"`.
    pub fn get(&mut self) -> String {
        if writeln!(self.stdin, "go").and_then(|_| self.stdin.flush()).is_err() {
            return "err probe exited".into();
        }
        self.lines
            .recv_timeout(Duration::from_secs(90))
            .unwrap_or_else(|_| "err no answer within 90 s".into())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
