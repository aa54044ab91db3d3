//! Idle hubs: register N hubs (distinct keys) and hold them idle; report the server's RSS per
//! hub and its CPU while idle, at several N in one run (registration continues from one step
//! to the next).
//!
//! Hubs here are *raw*: a quinn connection plus a control stream carrying one `Register`
//! frame (the raw protocol peer of `keyway_test_support::raw`, the one the relay's tests use,
//! here over a shared endpoint with lean transport settings) rather than a full `keyway_hub`
//! connector. That is
//! exactly what the relay sees of an idle hub (connection, control stream, QUIC keep-alive
//! every 15 s), while the load generator stays cheap: many hubs dial from one quinn endpoint
//! (one UDP socket), no per-hub timers, file watchers or TLS server configs. The target is the
//! real relay process, or [`crate::bare`] to isolate quinn's own share.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use keyway_proto::{Frame, PublicKey};
use keyway_test_support::raw::{self, Control};
use serde_json::json;
use tokio::sync::Semaphore;

use crate::bare::{BareProc, Knobs};
use crate::common::{hub_name, identity_for, round, unix_time, Policy, ProcUsage, RelayProc};
use crate::Record;

/// What the hubs register with.
#[derive(Debug, Clone)]
pub enum Target {
    /// The real relay binary: `nodes` processes (hub `i` registers at node `i % nodes`),
    /// nodes of one cluster sharing the store at `cluster` (`--cluster`, node ids `node-1`…).
    Relay { bin: PathBuf, open: bool, nodes: usize, cluster: Option<String> },
    /// `keyway-loadtest bare-server` (this binary) with these transport knobs.
    Bare { loadtest_bin: PathBuf, knobs: Knobs },
}

/// Options of the idle-hubs scenario.
#[derive(Debug, Clone)]
pub struct IdleOpts {
    pub target: Target,
    /// Hub counts to measure at, ascending.
    pub counts: Vec<usize>,
    /// How long to hold the hubs idle at each step (CPU is averaged over it).
    pub hold: Duration,
    /// Hubs that share one client endpoint (UDP socket).
    pub hubs_per_endpoint: usize,
    /// Registrations in flight at once.
    pub concurrency: usize,
    /// Extra environment for the server process (allocator experiments).
    pub env: Vec<(String, String)>,
    pub quiet: bool,
}

enum Server {
    Relays(Vec<RelayProc>),
    Bare(Box<BareProc>),
}

impl Server {
    /// The usage of all its processes together.
    fn usage(&self) -> anyhow::Result<ProcUsage> {
        match self {
            Server::Relays(nodes) => nodes.iter().try_fold(ProcUsage { rss_kib: 0, cpu_s: 0.0 }, |sum, r| {
                let u = r.usage()?;
                Ok(ProcUsage { rss_kib: sum.rss_kib + u.rss_kib, cpu_s: sum.cpu_s + u.cpu_s })
            }),
            Server::Bare(b) => b.usage(),
        }
    }
    fn targets(&self) -> Vec<(SocketAddr, PublicKey)> {
        match self {
            Server::Relays(nodes) => nodes.iter().map(|r| (r.addr, r.key)).collect(),
            Server::Bare(b) => vec![(b.addr, b.key)],
        }
    }
}

/// One registered idle hub: kept alive by holding its connection and control stream.
struct Held {
    _conn: quinn::Connection,
    _control: Control,
}

/// Runs the scenario.
pub async fn run(opts: &IdleOpts) -> anyhow::Result<Vec<Record>> {
    let max = opts.counts.iter().copied().max().unwrap_or(0);
    let (server, label) = match &opts.target {
        Target::Relay { bin, open, nodes, cluster } => {
            let policy = if *open {
                Policy::Open
            } else {
                let hubs = (0..max as u32).map(|i| (hub_name(i), identity_for(4, i).public_key())).collect();
                Policy::Closed(hubs)
            };
            let mut label = if *open { "relay-open" } else { "relay" }.to_owned();
            let mut relays = Vec::new();
            for n in 1..=(*nodes).max(1) {
                let mut env = opts.env.clone();
                if let Some(url) = cluster {
                    env.push(("KEYWAY_RELAY_CLUSTER".into(), url.clone()));
                    env.push(("KEYWAY_RELAY_NODE_ID".into(), format!("node-{n}")));
                }
                relays.push(RelayProc::start(bin, &policy, &env).await?);
            }
            if cluster.is_some() {
                label = format!("{label} cluster x{}", relays.len());
            } else if relays.len() > 1 {
                label = format!("{label} x{}", relays.len());
            }
            (Server::Relays(relays), label)
        }
        Target::Bare { loadtest_bin, knobs } => (
            Server::Bare(Box::new(BareProc::start(loadtest_bin, *knobs, &opts.env).await?)),
            format!("bare-quinn-{}", knobs.as_str()),
        ),
    };
    let label = if opts.env.is_empty() {
        label
    } else {
        let env: Vec<String> = opts.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("{label} {}", env.join(" "))
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let baseline = server.usage()?;
    let targets = server.targets();

    // Client side: lean windows keep the generator's own memory down (nothing is sent anyway);
    // the keep-alive is the hub connector's default, so the server sees realistic idle traffic.
    let mut transport = Knobs::Lean.transport();
    transport
        .keep_alive_interval(Some(Duration::from_secs(15)))
        .max_idle_timeout(Some(quinn::VarInt::from_u32(60_000).into()));
    let transport = Arc::new(transport);
    let n_endpoints = max.div_ceil(opts.hubs_per_endpoint.max(1)).max(1);
    let endpoints: Vec<quinn::Endpoint> =
        (0..n_endpoints).map(|_| crate::bulk::endpoint(None)).collect::<anyhow::Result<_>>()?;
    let apps: Vec<PublicKey> = (0..2).map(|i| identity_for(5, i).public_key()).collect();

    let mut held: Vec<Held> = Vec::with_capacity(max);
    let mut failures = 0usize;
    let mut records = Vec::new();
    let bar = crate::common::progress(max as u64, "registering hubs", opts.quiet);
    for &count in &opts.counts {
        let start = Instant::now();
        let first = held.len();
        let sem = Arc::new(Semaphore::new(opts.concurrency.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        for i in first..count {
            let permit = sem.clone().acquire_owned().await?;
            let endpoint = endpoints[i % n_endpoints].clone();
            let (addr, key) = targets[i % targets.len()];
            let transport = transport.clone();
            let apps = apps.clone();
            tasks.spawn(async move {
                let held = register(&endpoint, addr, key, i as u32, transport, apps).await;
                drop(permit);
                held
            });
            // Reap finished registrations as we go so the JoinSet does not hold them all.
            while let Some(done) = tasks.try_join_next() {
                collect(done, &mut held, &mut failures, &bar);
            }
        }
        while let Some(done) = tasks.join_next().await {
            collect(done, &mut held, &mut failures, &bar);
        }
        let reg_secs = start.elapsed().as_secs_f64();
        // Let the handshakes' garbage settle before reading RSS.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = server.usage()?;
        tokio::time::sleep(opts.hold).await;
        let after = server.usage()?;
        let n = held.len().max(1) as f64;
        let cpu = (after.cpu_s - before.cpu_s) / opts.hold.as_secs_f64() * 100.0;
        records.push(json!({
            "scenario": "idle-hubs", "server": label, "nodes": targets.len(), "hubs": held.len(), "failures": failures,
            "endpoints": n_endpoints, "baseline_rss_kib": baseline.rss_kib, "rss_kib": after.rss_kib,
            "per_hub_kib": round((after.rss_kib.saturating_sub(baseline.rss_kib)) as f64 / n, 2),
            "idle_cpu_pct": round(cpu, 2), "hold_s": opts.hold.as_secs_f64(),
            "register_per_s": round((count - first) as f64 / reg_secs, 1), "time": unix_time(),
        }));
        bar.println(format!("{}", records.last().unwrap_or(&json!(null))));
    }
    bar.finish_and_clear();
    drop(held);
    for e in &endpoints {
        e.close(0u32.into(), b"done");
    }
    drop(server);
    Ok(records)
}

fn collect(
    done: Result<anyhow::Result<Held>, tokio::task::JoinError>,
    held: &mut Vec<Held>,
    failures: &mut usize,
    bar: &indicatif::ProgressBar,
) {
    match done.map_err(anyhow::Error::from).and_then(|r| r) {
        Ok(h) => held.push(h),
        Err(e) => {
            *failures += 1;
            if *failures <= 5 {
                bar.println(format!("registration failed: {e:#}"));
            }
        }
    }
    bar.inc(1);
}

/// Dials, opens the control stream and registers hub `index` the way `keyway_hub` does.
async fn register(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    relay_key: PublicKey,
    index: u32,
    transport: Arc<quinn::TransportConfig>,
    allowed_apps: Vec<PublicKey>,
) -> anyhow::Result<Held> {
    let id = identity_for(4, index);
    let mut config = raw::client_config(&id, relay_key)?;
    config.transport_config(transport);
    let conn = tokio::time::timeout(Duration::from_secs(30), raw::dial_with(endpoint, addr, config))
        .await
        .map_err(|_| anyhow!("handshake timed out"))??;
    let register = raw::register(&conn, hub_name(index), &allowed_apps, false);
    match tokio::time::timeout(Duration::from_secs(30), register).await {
        Ok(Ok((control, Frame::Registered { .. }))) => Ok(Held { _conn: conn, _control: control }),
        Ok(Ok((_, other))) => bail!("hub {index}: expected Registered, got {other:?}"),
        Ok(Err(e)) => bail!("hub {index}: {e}"),
        Err(_) => bail!("hub {index}: no answer to Register"),
    }
}
