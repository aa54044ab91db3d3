//! Reconnect storm: N real `keyway_hub` connectors registered with a relay process; the relay
//! is restarted (SIGTERM: graceful, hubs get `GoAway` with a spread retry hint; or SIGKILL:
//! hubs find out from their liveness ping) and we time until every hub is registered again.
//! Failures (hubs not back by the deadline) must be zero. The reconnect curve (registrations
//! per 100 ms bucket after the stop signal) shows whether the jitter spreads the storm.
//!
//! Each connector binds its own UDP socket (`keyway_hub::start` owns its endpoint; it has no
//! way to share one), so N is bounded by file descriptors and per-socket cost here.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use keyway_hub::{HubConfig, HubHandle};
use serde_json::json;

use crate::common::{hub_name, identity_for, percentile, round, unix_time, Policy, RelayProc};
use crate::Record;

/// Options of the storm scenario.
#[derive(Debug, Clone)]
pub struct StormOpts {
    pub relay_bin: PathBuf,
    pub hubs: usize,
    /// `TERM` or `KILL`.
    pub signal: String,
    /// Hub liveness ping interval (how fast a hub notices a relay killed without `GoAway`).
    pub ping_interval: Duration,
    /// Give up on hubs not back after this long.
    pub deadline: Duration,
    pub quiet: bool,
}

/// Width of the reconnect-rate buckets.
const BUCKET: Duration = Duration::from_millis(100);

/// Runs the scenario.
pub async fn run(opts: &StormOpts) -> anyhow::Result<Vec<Record>> {
    let n = opts.hubs as u32;
    let ids: Vec<_> = (0..n).map(|i| identity_for(6, i)).collect();
    let policy =
        Policy::Closed(ids.iter().enumerate().map(|(i, id)| (hub_name(i as u32), id.public_key())).collect());
    let mut relay = RelayProc::start(&opts.relay_bin, &policy, &[]).await?;
    let dir = tempfile::tempdir()?;
    let apps_file = dir.path().join("authorized_apps");
    std::fs::write(&apps_file, format!("{} loadtest app\n", identity_for(7, 0).public_key()))?;
    let service = keyway_test_support::try_echo_service(b"").await?;

    let bar = crate::common::progress(n as u64, "starting hubs", opts.quiet);
    let mut hubs: Vec<HubHandle> = Vec::with_capacity(opts.hubs);
    for (i, id) in ids.iter().enumerate() {
        let mut config = HubConfig::new(
            relay.addr,
            relay.key,
            hub_name(i as u32),
            id.duplicate(),
            apps_file.clone(),
            service,
        );
        config.ping_interval = opts.ping_interval;
        hubs.push(keyway_hub::start(config).await?);
    }
    for hub in &hubs {
        hub.wait_registered(opts.deadline).await?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let base: Vec<u64> = hubs.iter().map(|h| h.stats().registrations()).collect();
    let before = relay.usage()?;

    let t0 = Instant::now();
    relay.stop(&opts.signal).await?;
    let down = t0.elapsed();
    relay.restart().await?;
    let relay_up = t0.elapsed();
    let start_usage = relay.usage()?;
    let (mut end_usage, mut peak_rss) = (start_usage, start_usage.rss_kib);

    let bar = crate::common::progress(n as u64, "hubs back", opts.quiet);
    let mut back: Vec<Option<Duration>> = vec![None; hubs.len()];
    let mut left = hubs.len();
    while left > 0 && t0.elapsed() < opts.deadline {
        for (i, hub) in hubs.iter().enumerate() {
            if back[i].is_none() && hub.stats().registrations() > base[i] {
                back[i] = Some(t0.elapsed());
                left -= 1;
                bar.inc(1);
            }
        }
        if let Ok(u) = relay.usage() {
            peak_rss = peak_rss.max(u.rss_kib);
            end_usage = u;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    bar.finish_and_clear();
    let storm_s = (t0.elapsed() - relay_up).as_secs_f64().max(0.001);

    let times: Vec<f64> = back.iter().flatten().map(Duration::as_secs_f64).collect();
    let last = times.iter().copied().fold(0.0, f64::max);
    let mut buckets = vec![0u32; (last / BUCKET.as_secs_f64()) as usize + 1];
    for t in &times {
        if let Some(b) = buckets.get_mut((t / BUCKET.as_secs_f64()) as usize) {
            *b += 1;
        }
    }
    let extra: u64 =
        hubs.iter().zip(&base).map(|(h, b)| h.stats().registrations().saturating_sub(b + 1)).sum();
    let mut sorted = times.clone();
    let record = json!({
        "scenario": "storm", "hubs": opts.hubs, "signal": opts.signal, "failures": left,
        "relay_down_s": round(down.as_secs_f64(), 3), "relay_up_s": round(relay_up.as_secs_f64(), 3),
        "first_back_s": round(times.iter().copied().fold(f64::INFINITY, f64::min), 3),
        "p50_back_s": round(percentile(&mut sorted, 50.0), 3),
        "p99_back_s": round(percentile(&mut sorted, 99.0), 3), "all_back_s": round(last, 3),
        "relay_cpu_pct": round((end_usage.cpu_s - start_usage.cpu_s) / storm_s * 100.0, 1),
        "relay_rss_before_mib": before.rss_kib / 1024, "relay_peak_rss_mib": peak_rss / 1024,
        "load_avg": crate::storm_raw::load_avg(),
        "peak_per_100ms": buckets.iter().max().copied().unwrap_or(0),
        "extra_registrations": extra, "bucket_ms": BUCKET.as_millis() as u64, "buckets": buckets,
        "ping_interval_s": opts.ping_interval.as_secs_f64(), "time": unix_time(),
    });
    // Dropping the handles stops the connectors; no need to wait for each graceful close.
    drop(hubs);
    drop(relay);
    Ok(vec![record])
}
