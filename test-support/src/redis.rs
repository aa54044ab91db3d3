//! A real Redis for the cluster tests: Debian's `redis-server`, started on a free loopback
//! port with a data directory of its own, append-only file on and RDB snapshots off (what
//! `docs/operating.md` asks of a cluster store), killed when dropped; a replica of one, and a
//! Sentinel watching one ([`RedisSentinel`]: the same binary with `--sentinel`). `.ci/run`
//! installs `redis-server`. A test calls [`RedisServer::start_if_available`]: without
//! `redis-server` on the PATH it is skipped with a printed reason, except in CI (`CI=true`),
//! where that is a failure, as the NAT bed does.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::wait::eventually_blocking;

/// One `redis-server` process and its data directory.
pub struct RedisServer {
    addr: SocketAddr,
    dir: PathBuf,
    child: Option<Child>,
    /// Extra arguments (a replica's `--replicaof`).
    extra: Vec<String>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

/// Whether `redis-server` is on the PATH. When it is not: in CI (`CI=true`) a panic, elsewhere
/// a loud skip line and `false`.
pub fn available() -> bool {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("redis-server not found in CI (Debian package redis-server; .ci/run installs it)");
        }
        eprintln!(
            "SKIPPED cluster test: redis-server not found (apt-get install redis-server, or run .ci/run)"
        );
    }
    found
}

impl RedisServer {
    /// [`start`](Self::start) when `redis-server` is installed; `None` (a skip) when not
    /// (see [`available`]).
    pub fn start_if_available() -> Option<Self> {
        available().then(Self::start)
    }

    /// Starts a Redis on a free loopback port and waits until it answers `PING`.
    pub fn start() -> Self {
        Self::start_with(Vec::new())
    }

    /// Starts a replica of `primary` and waits until the primary counts it as connected.
    pub fn start_replica_of(primary: &RedisServer) -> Self {
        let (ip, port) = (primary.addr.ip().to_string(), primary.addr.port().to_string());
        let replica = Self::start_with(vec!["--replicaof".into(), ip, port]);
        eventually_blocking("the replica is connected to its primary", || {
            primary.command("INFO replication").contains("connected_slaves:1").then_some(())
        });
        replica
    }

    fn start_with(extra: Vec<String>) -> Self {
        let port = free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let dir = std::env::temp_dir().join(format!("keyway-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("redis data directory");
        let mut server = Self { addr, dir, child: None, extra };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.addr.port().to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "yes", "--protected-mode", "no"])
            .args(&self.extra)
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (Debian package redis-server; .ci/run installs it)");
        self.child = Some(child);
        let addr = self.addr;
        eventually_blocking("redis-server answers PING", || ping(addr).then_some(()));
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Kills the server (SIGKILL: nothing is flushed beyond what the AOF already has).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and data directory (it reloads its AOF).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Starts it again with its data directory emptied: a Redis that lost everything (no
    /// persistence, or a failover to a replica that had not caught up).
    pub fn restart_empty(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
        std::fs::create_dir_all(&self.dir).expect("redis data directory");
        self.spawn();
    }

    /// Sends one command in the inline protocol and returns the raw reply (for tests that
    /// read what the store holds, e.g. `INFO memory` or a key).
    pub fn command(&self, line: &str) -> String {
        let mut stream = TcpStream::connect(self.addr).expect("connect to redis");
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        stream.write_all(format!("{line}\r\nQUIT\r\n").as_bytes()).expect("write to redis");
        let mut out = String::new();
        let _ = stream.read_to_string(&mut out);
        out
    }
}

/// A Redis Sentinel (`redis-server sentinel.conf --sentinel`) watching one primary as master
/// `name`, with quorum 1 and a 500 ms down-after (a failover within a few seconds), killed when
/// dropped.
pub struct RedisSentinel {
    addr: SocketAddr,
    dir: PathBuf,
    child: Child,
}

impl RedisSentinel {
    pub fn start(primary: &RedisServer, name: &str) -> Self {
        let port = free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let dir = std::env::temp_dir().join(format!("keyway-sentinel-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("sentinel directory");
        let conf = dir.join("sentinel.conf");
        let p = primary.addr;
        let text = format!(
            "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {}\n\
             sentinel monitor {name} {} {} 1\n\
             sentinel down-after-milliseconds {name} 500\n\
             sentinel failover-timeout {name} 3000\n",
            dir.display(),
            p.ip(),
            p.port()
        );
        std::fs::write(&conf, text).expect("write sentinel.conf");
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server --sentinel (Debian package redis-server)");
        eventually_blocking("the sentinel answers PING", || ping(addr).then_some(()));
        Self { addr, dir, child }
    }

    /// `redis+sentinel://127.0.0.1:PORT/NAME`, as a relay node takes it.
    pub fn url(&self, name: &str) -> String {
        format!("redis+sentinel://{}/{name}", self.addr)
    }

    /// The primary the Sentinel names for master `name` now.
    pub fn primary(&self, name: &str) -> Option<SocketAddr> {
        let mut stream = TcpStream::connect(self.addr).ok()?;
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        stream.write_all(format!("SENTINEL get-master-addr-by-name {name}\r\nQUIT\r\n").as_bytes()).ok()?;
        let mut out = String::new();
        let _ = stream.read_to_string(&mut out);
        // *2 $9 127.0.0.1 $4 6379 +OK
        let lines: Vec<&str> = out.lines().collect();
        let ip = lines.get(2)?;
        let port = lines.get(4)?;
        format!("{ip}:{port}").parse().ok()
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ping(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    stream.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
