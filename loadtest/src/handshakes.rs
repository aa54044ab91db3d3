//! The relay's handshake ceiling: raw hubs (as in [`crate::storm_raw`]) dialing and
//! registering at a fixed arrival rate, one step per rate, and what each side spends on one.
//!
//! A reconnect storm is a burst of exactly this work, but a storm measures it at overload,
//! where timed-out attempts hide what a handshake costs. Here the arrival rate is set and
//! held for a while, so at a sustainable rate every attempt completes and the CPU-seconds per
//! handshake of the relay (from `/proc/PID`) and of this generator (from `/proc/self`, doing
//! the client side of every handshake on the same machine) are steady-state figures; the
//! step where the relay stops keeping up (completed below offered, latency rising, timeouts)
//! is the ceiling. The relay runs with the per-source limits and Retry lifted (as in the
//! other scenarios) unless `--cap` sets its handshake cap, so the admission is measured apart.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keyway_proto::{Frame, PublicKey};
use keyway_test_support::raw::{self, DialError};
use serde_json::json;

use crate::common::{hub_name, identity_for, percentile, round, unix_time, Policy, ProcUsage, RelayProc};
use crate::Record;

/// Options of the handshake-rate scenario.
#[derive(Debug, Clone)]
pub struct HandshakeOpts {
    pub relay_bin: PathBuf,
    /// Arrival rates (attempts per second), one step each.
    pub rates: Vec<u32>,
    /// How long each rate is held.
    pub duration: Duration,
    /// Source addresses (one client endpoint each) the attempts are spread over.
    pub sources: usize,
    /// Extra relay flags (`--max-handshakes-in-flight 256`), as `(flag, value)`.
    pub relay_flags: Vec<(String, String)>,
    pub quiet: bool,
}

/// How long an attempt may take (the connector's connect timeout).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Step {
    registered: AtomicU64,
    refused: AtomicU64,
    timed_out: AtomicU64,
    failed: AtomicU64,
    /// Attempt start to `Registered`, seconds.
    latencies: Mutex<Vec<f64>>,
}

/// Runs the scenario.
pub async fn run(opts: &HandshakeOpts) -> anyhow::Result<Vec<Record>> {
    let per_step: Vec<usize> =
        opts.rates.iter().map(|r| (f64::from(*r) * opts.duration.as_secs_f64()).ceil() as usize).collect();
    let total: usize = per_step.iter().sum();
    let policy =
        Policy::Closed((0..total as u32).map(|i| (hub_name(i), identity_for(9, i).public_key())).collect());
    let flags: Vec<(&str, String)> = opts.relay_flags.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let relay = RelayProc::start_with(&opts.relay_bin, &policy, &[], &flags).await?;
    let mut transport = crate::bare::Knobs::Lean.transport();
    transport
        .keep_alive_interval(Some(Duration::from_secs(15)))
        .max_idle_timeout(Some(quinn::VarInt::from_u32(60_000).into()));
    let transport = Arc::new(transport);
    let sources = opts.sources.max(1);
    let endpoints: Vec<quinn::Endpoint> = (0..sources)
        .map(|k| {
            crate::bulk::endpoint_on(
                SocketAddr::from((Ipv4Addr::new(127, 0, 2, 1 + (k % 250) as u8), 0)),
                None,
            )
        })
        .collect::<anyhow::Result<_>>()?;
    let apps: Arc<Vec<PublicKey>> = Arc::new((0..2).map(|i| identity_for(5, i).public_key()).collect());

    let mut records = Vec::new();
    let mut first = 0usize;
    for (rate, count) in opts.rates.iter().copied().zip(per_step) {
        // Client configs are built before the step: the generator's CPU then counts only
        // the handshake and the Register, the work a real hub does on its own CPU.
        let configs: Vec<(usize, quinn::ClientConfig)> = (first..first + count)
            .map(|i| {
                let mut c = raw::client_config(&identity_for(9, i as u32), relay.key)?;
                c.transport_config(transport.clone());
                Ok((i, c))
            })
            .collect::<anyhow::Result<_>>()?;
        first += count;
        let step = Arc::new(Step::default());
        let held = Arc::new(Mutex::new(Vec::with_capacity(count)));
        let relay_start = relay.usage()?;
        let gen_start = ProcUsage::read(std::process::id())?;
        let t0 = Instant::now();
        let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        for (k, (i, config)) in configs.into_iter().enumerate() {
            tokio::time::sleep_until((t0 + interval * k as u32).into()).await;
            let (step, held, apps) = (step.clone(), held.clone(), apps.clone());
            let endpoint = endpoints[k % sources].clone();
            let addr = relay.addr;
            tasks.spawn(async move {
                let start = Instant::now();
                match attempt(&endpoint, addr, config, i, &apps).await {
                    Ok(conn) => {
                        step.registered.fetch_add(1, Ordering::Relaxed);
                        step.latencies
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(start.elapsed().as_secs_f64());
                        held.lock().unwrap_or_else(|e| e.into_inner()).push(conn);
                    }
                    Err(Failure::Refused) => drop(step.refused.fetch_add(1, Ordering::Relaxed)),
                    Err(Failure::TimedOut) => drop(step.timed_out.fetch_add(1, Ordering::Relaxed)),
                    Err(Failure::Other) => drop(step.failed.fetch_add(1, Ordering::Relaxed)),
                }
            });
        }
        let offered_s = t0.elapsed().as_secs_f64();
        while tasks.join_next().await.is_some() {}
        let busy_s = t0.elapsed().as_secs_f64();
        let relay_end = relay.usage()?;
        let gen_end = ProcUsage::read(std::process::id())?;
        let load = crate::storm_raw::load_avg();
        let done = step.registered.load(Ordering::Relaxed);
        let mut lat = std::mem::take(&mut *step.latencies.lock().unwrap_or_else(|e| e.into_inner()));
        let per = |cpu: f64| if done == 0 { f64::NAN } else { cpu / done as f64 * 1e6 };
        let relay_cpu = relay_end.cpu_s - relay_start.cpu_s;
        let gen_cpu = gen_end.cpu_s - gen_start.cpu_s;
        records.push(json!({
            "scenario": "handshakes", "offered_per_s": rate, "attempts": count,
            "offered_s": round(offered_s, 3), "busy_s": round(busy_s, 3),
            "registered": done, "refused": step.refused.load(Ordering::Relaxed),
            "timed_out": step.timed_out.load(Ordering::Relaxed), "failed": step.failed.load(Ordering::Relaxed),
            "completed_per_s": round(done as f64 / busy_s.max(0.001), 1),
            "p50_ms": round(percentile(&mut lat, 50.0) * 1e3, 1), "p99_ms": round(percentile(&mut lat, 99.0) * 1e3, 1),
            "relay_cpu_s": round(relay_cpu, 2), "generator_cpu_s": round(gen_cpu, 2),
            "relay_us_per_handshake": round(per(relay_cpu), 0),
            "generator_us_per_handshake": round(per(gen_cpu), 0),
            "relay_rss_mib": relay_end.rss_kib / 1024, "sources": sources,
            "relay_flags": opts.relay_flags.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>(),
            "load_avg": load, "time": unix_time(),
        }));
        if !opts.quiet {
            eprintln!("{}", records.last().map(ToString::to_string).unwrap_or_default());
        }
        // The next step starts from an empty relay.
        for (conn, _control) in std::mem::take(&mut *held.lock().unwrap_or_else(|e| e.into_inner())) {
            conn.close(0u32.into(), b"step done");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    for e in &endpoints {
        e.close(0u32.into(), b"done");
    }
    drop(relay);
    Ok(records)
}

enum Failure {
    Refused,
    TimedOut,
    Other,
}

/// Dial and register one hub within the connect timeout.
async fn attempt(
    endpoint: &quinn::Endpoint,
    relay: SocketAddr,
    config: quinn::ClientConfig,
    index: usize,
    apps: &[PublicKey],
) -> Result<(quinn::Connection, raw::Control), Failure> {
    let work = async {
        let conn = match raw::dial_with(endpoint, relay, config).await {
            Ok(conn) => conn,
            Err(DialError::Handshake(quinn::ConnectionError::ConnectionClosed(c)))
                if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
            {
                return Err(Failure::Refused)
            }
            Err(_) => return Err(Failure::Other),
        };
        match raw::register(&conn, hub_name(index as u32), apps, false).await {
            // The control stream is held with the connection: ending it would deregister.
            Ok((control, Frame::Registered { .. })) => Ok((conn, control)),
            _ => Err(Failure::Other),
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, work).await.unwrap_or(Err(Failure::TimedOut))
}
