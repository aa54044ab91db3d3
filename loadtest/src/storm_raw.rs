//! Reconnect storm at scale: N *raw* hubs (the peer of [`crate::idle`]) registered with a relay
//! process, the relay stopped (SIGTERM or SIGKILL) and started again, and every hub's time
//! until it is registered again.
//!
//! A raw hub is what the relay sees of a `keyway_hub` connector (a quinn connection with the
//! connector's 15 s keep-alive and 60 s idle timeout, a control stream, one `Register`), with
//! the connector's own reconnect policy driving it ([`keyway_hub::reconnect`], same floor and
//! cap): a lost registration redials after the backoff floor (so a verified stateless reset,
//! quinn's `ConnectionError::Reset`, means a redial at once), a connection the relay refused
//! before its handshake (`CONNECTION_REFUSED`: load, rate, draining) is retried within
//! seconds, any other failed attempt (timed out, closed for load) draws the next exponential
//! delay. What it
//! leaves out (per-hub timers, file watchers, the e2e server config, the liveness ping, so a
//! SIGKILL is noticed through the keep-alive and the reset only) would only measure the
//! generator, which shares the relay's cores.
//!
//! Many hubs share one quinn endpoint (one UDP socket), and the endpoints are bound to
//! distinct loopback addresses (`127.0.x.y`, all of 127/8 is loopback on Linux), so the relay's
//! per-source limits see `sources` sources of `hubs / sources` hubs each, the shape of hubs
//! behind shared NATs; the limits the relay runs with are recorded beside the figures.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyway_hub::reconnect::{Ended, Reconnect};
use keyway_proto::io::{read_frame, write_frame};
use keyway_proto::{Frame, PublicKey};
use keyway_test_support::raw::{self, DialError};
use serde_json::json;
use tokio::sync::{watch, Semaphore};

use crate::common::{hub_name, identity_for, percentile, round, unix_time, Policy, ProcUsage, RelayProc};
use crate::Record;

/// Options of the raw-hub storm.
#[derive(Debug, Clone)]
pub struct RawStormOpts {
    pub relay_bin: PathBuf,
    pub hubs: usize,
    /// `TERM` or `KILL`.
    pub signal: String,
    /// Source addresses (one quinn endpoint each) the hubs are spread over.
    pub sources: usize,
    /// The relay's per-source limits during the run: `new_connections_per_ip` (0: none) and
    /// `new_connections_burst`.
    pub per_ip_rate: f64,
    pub per_ip_burst: u32,
    /// The relay's `retry_threshold` (new connections per second before Retry).
    pub retry_threshold: u32,
    /// The relay's `max_handshakes_in_flight` (0: no cap, to measure without it).
    pub max_handshakes_in_flight: u32,
    /// Give up on hubs not back this long after the stop signal.
    pub deadline: Duration,
    /// Registrations in flight while the hubs first come up (before the storm).
    pub concurrency: usize,
    /// Attempts (dial and `Register`) this generator works on at once during the storm; the
    /// others wait for a turn before they dial (0: no bound). See `Ctx::attempts`.
    pub generator_in_flight: usize,
    pub quiet: bool,
}

/// Width of the reconnect-rate buckets.
const BUCKET: Duration = Duration::from_millis(100);
/// The connector's defaults (`keyway_hub::HubConfig::new`): keep-alive, idle timeout,
/// backoff floor and cap, and the time it waits for `Registered`.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
const IDLE_TIMEOUT_MS: u32 = 60_000;
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How attempts and registrations ended, counted over the whole run (all hubs).
#[derive(Default)]
struct Counts {
    /// Connections ended by a verified stateless reset (the relay's new run answering an old
    /// connection's packet).
    resets: AtomicU64,
    /// `GoAway` received on the control stream.
    go_aways: AtomicU64,
    /// Connections that ended otherwise (idle timeout, closed by the relay).
    lost_other: AtomicU64,
    /// Dial attempts the relay refused before any handshake work (draining, per-source rate).
    refused: AtomicU64,
    /// Connections the relay closed with the `LIMIT` code (a limit or a load refusal).
    limit_closed: AtomicU64,
    /// Dials or registrations that timed out.
    timed_out: AtomicU64,
    /// Other failed attempts.
    failed_other: AtomicU64,
    /// `Refused` answers to `Register`.
    register_refused: AtomicU64,
}

/// What the hub tasks share.
struct Ctx {
    relay: SocketAddr,
    relay_key: PublicKey,
    transport: Arc<quinn::TransportConfig>,
    apps: Vec<PublicKey>,
    /// Set once the stop signal was sent; registrations after it count as "back".
    t0: std::sync::OnceLock<Instant>,
    /// Per hub: ms after `t0` (+1) of its first registration after it, 0 while not back.
    back_ms: Vec<AtomicU64>,
    /// Per hub: whether it registered at least once (set-up phase).
    up: Vec<AtomicBool>,
    /// Completed handshakes per [`BUCKET`] after `t0`.
    handshakes: Vec<AtomicU32>,
    /// Turns for attempts in flight at once (`None`: unbounded). Real hubs each have a CPU
    /// of their own; this generator does the client side of every hub's handshake on the
    /// cores it shares with the relay, and with 100 000 of them at once its own runtime
    /// stretches every handshake past the 5 s connect timeout, which measures the
    /// generator's collapse, not the relay's. A hub waiting for a turn has not dialed yet
    /// (its connect timeout starts with its dial), as a hub whose CPU is slow to start.
    attempts: Option<Arc<Semaphore>>,
    counts: Counts,
}

impl Ctx {
    fn since_t0(&self) -> Option<Duration> {
        self.t0.get().map(Instant::elapsed)
    }
}

/// Runs the scenario.
pub async fn run(opts: &RawStormOpts) -> anyhow::Result<Vec<Record>> {
    let n = opts.hubs;
    let policy =
        Policy::Closed((0..n as u32).map(|i| (hub_name(i), identity_for(8, i).public_key())).collect());
    let limits = [
        ("--new-connections-per-ip", opts.per_ip_rate.to_string()),
        ("--new-connections-burst", opts.per_ip_burst.to_string()),
        ("--retry-threshold", opts.retry_threshold.to_string()),
        ("--max-handshakes-in-flight", opts.max_handshakes_in_flight.to_string()),
    ];
    let mut relay = RelayProc::start_with(&opts.relay_bin, &policy, &[], &limits).await?;

    let mut transport = crate::bare::Knobs::Lean.transport();
    transport
        .keep_alive_interval(Some(KEEP_ALIVE))
        .max_idle_timeout(Some(quinn::VarInt::from_u32(IDLE_TIMEOUT_MS).into()));
    let sources = opts.sources.clamp(1, n.max(1));
    let endpoints: Vec<quinn::Endpoint> = (0..sources)
        .map(|k| crate::bulk::endpoint_on(SocketAddr::from((source_ip(k), 0)), None))
        .collect::<anyhow::Result<_>>()?;
    let buckets = (opts.deadline.as_millis() / BUCKET.as_millis()) as usize + 1;
    let ctx = Arc::new(Ctx {
        relay: relay.addr,
        relay_key: relay.key,
        transport: Arc::new(transport),
        apps: (0..2).map(|i| identity_for(5, i).public_key()).collect(),
        t0: std::sync::OnceLock::new(),
        back_ms: (0..n).map(|_| AtomicU64::new(0)).collect(),
        up: (0..n).map(|_| AtomicBool::new(false)).collect(),
        handshakes: (0..buckets).map(|_| AtomicU32::new(0)).collect(),
        attempts: (opts.generator_in_flight > 0).then(|| Arc::new(Semaphore::new(opts.generator_in_flight))),
        counts: Counts::default(),
    });

    // Bring the hubs up, `concurrency` first registrations at a time, then let each run its
    // reconnect loop for the rest of the run.
    let (stop_tx, stop_rx) = watch::channel(false);
    let bar = crate::common::progress(n as u64, "registering hubs", opts.quiet);
    let sem = Arc::new(Semaphore::new(opts.concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await?;
        let (ctx, endpoint, stop) = (ctx.clone(), endpoints[i % sources].clone(), stop_rx.clone());
        let bar = bar.clone();
        tasks.spawn(hub(ctx, endpoint, i, stop, permit, bar));
    }
    // Every permit back means every hub has registered once.
    let set_up = Duration::from_secs(60).max(Duration::from_millis(n as u64 * 10));
    match tokio::time::timeout(set_up, sem.acquire_many(opts.concurrency.max(1) as u32)).await {
        Ok(all) => drop(all?),
        Err(_) => anyhow::bail!("the hubs did not all register within {set_up:?}"),
    }
    bar.finish_and_clear();
    let up = ctx.up.iter().filter(|u| u.load(Ordering::Relaxed)).count();
    anyhow::ensure!(up == n, "only {up} of {n} hubs registered before the storm");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = relay.usage()?;

    let t0 = Instant::now();
    let _ = ctx.t0.set(t0);
    relay.stop(&opts.signal).await?;
    let down = t0.elapsed();
    relay.restart().await?;
    let relay_up = t0.elapsed();
    let start_usage = relay.usage()?;
    let gen_start = ProcUsage::read(std::process::id())?;
    let drops_start = udp_rcvbuf_errors();

    let bar = crate::common::progress(n as u64, "hubs back", opts.quiet);
    let mut peak_rss = start_usage.rss_kib;
    let mut end_usage = start_usage;
    let mut back;
    loop {
        back = ctx.back_ms.iter().filter(|b| b.load(Ordering::Relaxed) > 0).count();
        bar.set_position(back as u64);
        if let Ok(u) = relay.usage() {
            peak_rss = peak_rss.max(u.rss_kib);
            end_usage = u;
        }
        if back == n || t0.elapsed() >= opts.deadline {
            break;
        }
        tokio::time::sleep(BUCKET).await;
    }
    let storm_s = t0.elapsed().as_secs_f64() - relay_up.as_secs_f64();
    let gen_end = ProcUsage::read(std::process::id())?;
    let drops = udp_rcvbuf_errors().saturating_sub(drops_start);
    bar.finish_and_clear();
    let _ = stop_tx.send(true);

    let mut times: Vec<f64> = ctx
        .back_ms
        .iter()
        .map(|b| b.load(Ordering::Relaxed))
        .filter(|&ms| ms > 0)
        .map(|ms| (ms - 1) as f64 / 1000.0)
        .collect();
    let last = times.iter().copied().fold(0.0, f64::max);
    let mut regs = vec![0u32; (last / BUCKET.as_secs_f64()) as usize + 1];
    for t in &times {
        if let Some(b) = regs.get_mut((t / BUCKET.as_secs_f64()) as usize) {
            *b += 1;
        }
    }
    let hs: Vec<u32> = ctx.handshakes.iter().map(|h| h.load(Ordering::Relaxed)).collect();
    let per_s = (Duration::from_secs(1).as_millis() / BUCKET.as_millis()) as usize;
    let peak_hs = hs.windows(per_s).map(|w| w.iter().sum::<u32>()).max().unwrap_or(0);
    let first = times.iter().copied().fold(f64::INFINITY, f64::min);
    let c = &ctx.counts;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let record = json!({
        "scenario": "storm", "mode": "raw", "hubs": n, "signal": opts.signal, "failures": n - back,
        "sources": sources, "hubs_per_source": n.div_ceil(sources),
        "per_ip_rate": opts.per_ip_rate, "per_ip_burst": opts.per_ip_burst,
        "retry_threshold": opts.retry_threshold,
        "max_handshakes_in_flight": opts.max_handshakes_in_flight,
        "generator_in_flight": opts.generator_in_flight, "keep_alive_s": KEEP_ALIVE.as_secs_f64(),
        "relay_down_s": round(down.as_secs_f64(), 3), "relay_up_s": round(relay_up.as_secs_f64(), 3),
        "first_back_s": round(first, 3), "p50_back_s": round(percentile(&mut times, 50.0), 3),
        "p99_back_s": round(percentile(&mut times, 99.0), 3), "all_back_s": round(last, 3),
        "peak_per_100ms": regs.iter().max().copied().unwrap_or(0),
        "peak_handshakes_per_s": peak_hs,
        "relay_cpu_pct": round((end_usage.cpu_s - start_usage.cpu_s) / storm_s.max(0.001) * 100.0, 1),
        "generator_cpu_pct": round((gen_end.cpu_s - gen_start.cpu_s) / storm_s.max(0.001) * 100.0, 1),
        "udp_rcvbuf_drops": drops,
        "relay_rss_before_mib": before.rss_kib / 1024, "relay_peak_rss_mib": peak_rss / 1024,
        "resets": get(&c.resets), "go_aways": get(&c.go_aways), "lost_other": get(&c.lost_other),
        "refused": get(&c.refused), "limit_closed": get(&c.limit_closed), "timed_out": get(&c.timed_out),
        "failed_other": get(&c.failed_other), "register_refused": get(&c.register_refused),
        "load_avg": load_avg(), "bucket_ms": BUCKET.as_millis() as u64, "buckets": regs,
        "time": unix_time(),
    });
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    for e in &endpoints {
        e.close(0u32.into(), b"done");
    }
    drop(relay);
    Ok(vec![record])
}

/// The loopback address of source `k`: `127.0.1.1`, `127.0.1.2`, … (250 per third octet), away
/// from `127.0.0.1` where the relay listens.
fn source_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, (k / 250 / 250) as u8, 1 + ((k / 250) % 250) as u8, 1 + (k % 250) as u8)
}

/// The machine's UDP receive-buffer drops so far (`RcvbufErrors` in `/proc/net/snmp`; all
/// sockets, so other processes' drops count too).
fn udp_rcvbuf_errors() -> u64 {
    let text = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut udp = text.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else { return 0 };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// The 1-minute load average, stated beside the figures (the machine is shared).
pub(crate) fn load_avg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// How one registered run of a hub ended.
enum End {
    GoAway(Duration),
    Lost,
}

/// One hub's life: the connector's reconnect loop (see the module doc) until `stop`. Its first
/// attempt holds `first`, so the set-up knows when every hub has been up once.
async fn hub(
    ctx: Arc<Ctx>,
    endpoint: quinn::Endpoint,
    index: usize,
    mut stop: watch::Receiver<bool>,
    first: tokio::sync::OwnedSemaphorePermit,
    bar: indicatif::ProgressBar,
) {
    let id = identity_for(8, index as u32);
    let Ok(mut config) = raw::client_config(&id, ctx.relay_key) else { return };
    config.transport_config(ctx.transport.clone());
    let mut policy = Reconnect::new(BACKOFF_MIN, BACKOFF_MAX);
    let mut first = Some(first);
    loop {
        let ended = match registered_run(&ctx, &endpoint, &config, index).await {
            Ok((conn, control)) => {
                if first.take().is_some() {
                    bar.inc(1);
                }
                match wait_end(&ctx, &conn, control).await {
                    End::GoAway(hint) => Ended::GoAway(hint),
                    End::Lost => Ended::Lost,
                }
            }
            Err(ended) => ended,
        };
        let delay = policy.delay(ended, &mut rand::rng());
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = stop.changed() => return,
        }
    }
}

/// One attempt: dial and register. `Ok` once registered (counted), else how it failed for the
/// reconnect policy (counted by kind).
async fn registered_run(
    ctx: &Ctx,
    endpoint: &quinn::Endpoint,
    config: &quinn::ClientConfig,
    index: usize,
) -> Result<(quinn::Connection, raw::Control), Ended> {
    let c = &ctx.counts;
    // Only during the storm: the set-up has its own bound (`concurrency`).
    let _turn = match (&ctx.attempts, ctx.since_t0()) {
        (Some(turns), Some(_)) => Some(turns.clone().acquire_owned().await.map_err(|_| Ended::Failed)?),
        _ => None,
    };
    let dialed =
        tokio::time::timeout(CONNECT_TIMEOUT, raw::dial_with(endpoint, ctx.relay, config.clone())).await;
    let conn = match dialed {
        Ok(Ok(conn)) => conn,
        Ok(Err(DialError::Handshake(e))) => return Err(count_failure(c, &e)),
        Ok(Err(_)) => {
            c.failed_other.fetch_add(1, Ordering::Relaxed);
            return Err(Ended::Failed);
        }
        Err(_) => {
            c.timed_out.fetch_add(1, Ordering::Relaxed);
            return Err(Ended::Failed);
        }
    };
    if let Some(t) = ctx.since_t0() {
        if let Some(b) = ctx.handshakes.get((t.as_millis() / BUCKET.as_millis()) as usize) {
            b.fetch_add(1, Ordering::Relaxed);
        }
    }
    let name = hub_name(index as u32);
    match tokio::time::timeout(CONNECT_TIMEOUT, raw::register(&conn, name, &ctx.apps, false)).await {
        Ok(Ok((control, Frame::Registered { .. }))) => {
            ctx.up[index].store(true, Ordering::Relaxed);
            if let Some(t) = ctx.since_t0() {
                let ms = u64::try_from(t.as_millis()).unwrap_or(u64::MAX - 1) + 1;
                let _ = ctx.back_ms[index].compare_exchange(0, ms, Ordering::Relaxed, Ordering::Relaxed);
            }
            Ok((conn, control))
        }
        Ok(Ok(_)) => {
            c.register_refused.fetch_add(1, Ordering::Relaxed);
            Err(Ended::Refused)
        }
        Ok(Err(_)) => Err(match conn.close_reason() {
            Some(e) => count_failure(c, &e),
            None => {
                c.failed_other.fetch_add(1, Ordering::Relaxed);
                Ended::Failed
            }
        }),
        Err(_) => {
            c.timed_out.fetch_add(1, Ordering::Relaxed);
            Err(Ended::Failed)
        }
    }
}

/// Counts a failed attempt by kind and says how it ended for the reconnect policy.
fn count_failure(c: &Counts, e: &quinn::ConnectionError) -> Ended {
    use quinn::ConnectionError as E;
    let (counter, ended) = match e {
        E::ConnectionClosed(close) if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED => {
            (&c.refused, Ended::RefusedForLoad)
        }
        E::ApplicationClosed(close) if close.error_code == keyway_proto::codes::LIMIT => {
            (&c.limit_closed, Ended::Failed)
        }
        E::TimedOut => (&c.timed_out, Ended::Failed),
        _ => (&c.failed_other, Ended::Failed),
    };
    counter.fetch_add(1, Ordering::Relaxed);
    ended
}

/// Holds a registered hub's connection until the relay ends it: `GoAway` on the control
/// stream, or the connection lost (a stateless reset after a crash, counted apart).
async fn wait_end(ctx: &Ctx, conn: &quinn::Connection, mut control: raw::Control) -> End {
    let c = &ctx.counts;
    loop {
        let frame = tokio::select! {
            frame = read_frame(&mut control.recv) => frame,
            _ = conn.closed() => break,
        };
        match frame {
            Ok(Frame::GoAway { retry_after_ms, .. }) => {
                c.go_aways.fetch_add(1, Ordering::Relaxed);
                return End::GoAway(Duration::from_millis(retry_after_ms.into()));
            }
            Ok(Frame::Ping { nonce }) => {
                if write_frame(&mut control.send, &Frame::Pong { nonce }).await.is_err() {
                    break;
                }
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    match conn.closed().await {
        quinn::ConnectionError::Reset => c.resets.fetch_add(1, Ordering::Relaxed),
        _ => c.lost_other.fetch_add(1, Ordering::Relaxed),
    };
    End::Lost
}
