//! Session churn and latency: sessions opened and closed at a steady rate through a relay
//! process to one hub; per session the set-up time (start of `connect` → first echoed byte
//! back) and a few small echo round trips.
//!
//! *Cold*: a new [`Client`] per session, so a new QUIC connection (full handshake with the
//! relay) and a full end-to-end TLS handshake with the hub. *Warm*: one shared client, so the
//! session is one stream on the existing relay connection, and the end-to-end TLS session
//! resumes where rustls' ticket cache allows it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use keyway_client::{Client, ClientConfig};
use keyway_proto::{HubName, PublicKey};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{percentile, round, unix_time};
use crate::Record;

/// Options of the churn scenario.
#[derive(Debug, Clone)]
pub struct ChurnOpts {
    pub relay_bin: PathBuf,
    /// Sessions started per second.
    pub rate: f64,
    /// How long to keep starting sessions, per mode.
    pub duration: Duration,
    /// Echo round trips measured per session.
    pub pings: usize,
    pub quiet: bool,
}

/// One session's timings.
struct Sample {
    setup: Duration,
    rtts: Vec<Duration>,
}

/// Runs the scenario: cold, then warm.
pub async fn run(opts: &ChurnOpts) -> anyhow::Result<Vec<Record>> {
    let setup = crate::common::OneHub::start(&opts.relay_bin, (8, 9)).await?;
    let (name, hub_key, app_id) = (setup.name.clone(), setup.hub_key, setup.app.duplicate());
    let new_client = {
        let (addr, key) = (setup.relay.addr, setup.relay.key);
        move || Client::new(ClientConfig::new(app_id.duplicate(), addr, key))
    };

    let mut records = Vec::new();
    for mode in ["cold", "warm"] {
        let shared = if mode == "warm" {
            let client = new_client()?;
            // Warm-up session: dials the relay and fills the TLS ticket cache; not measured.
            session(&client, &name, &hub_key, 0).await?;
            Some(client)
        } else {
            None
        };
        let total = (opts.rate * opts.duration.as_secs_f64()).ceil().max(1.0) as u64;
        let bar = crate::common::progress(total, &format!("{mode} sessions"), opts.quiet);
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / opts.rate.max(0.001)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut tasks = tokio::task::JoinSet::new();
        let started = Instant::now();
        for _ in 0..total {
            tick.tick().await;
            let client = match &shared {
                Some(c) => c.clone(),
                None => new_client()?,
            };
            let (name, pings, cold) = (name.clone(), opts.pings, shared.is_none());
            let bar = bar.clone();
            tasks.spawn(async move {
                let sample = session(&client, &name, &hub_key, pings).await;
                if cold {
                    // Closing is part of churn, but not of the set-up time measured.
                    client.close().await;
                }
                bar.inc(1);
                sample
            });
        }
        let mut samples = Vec::new();
        let mut failures = 0u64;
        let mut first_error = None;
        while let Some(done) = tasks.join_next().await {
            match done.map_err(anyhow::Error::from).and_then(|r| r) {
                Ok(s) => samples.push(s),
                Err(e) => {
                    failures += 1;
                    first_error.get_or_insert_with(|| format!("{e:#}"));
                }
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        bar.finish_and_clear();
        if let Some(client) = shared {
            client.close().await;
        }
        let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
        let mut setup: Vec<f64> = samples.iter().map(|s| ms(&s.setup)).collect();
        let mut rtt: Vec<f64> = samples.iter().flat_map(|s| s.rtts.iter().map(ms)).collect();
        records.push(json!({
            "scenario": "churn", "mode": mode, "sessions": samples.len(), "failures": failures,
            "first_error": first_error, "rate_per_s": opts.rate, "achieved_per_s": round(total as f64 / elapsed, 1),
            "setup_p50_ms": round(percentile(&mut setup, 50.0), 3),
            "setup_p99_ms": round(percentile(&mut setup, 99.0), 3),
            "rtt_p50_ms": round(percentile(&mut rtt, 50.0), 3),
            "rtt_p99_ms": round(percentile(&mut rtt, 99.0), 3),
            "time": unix_time(),
        }));
    }
    setup.stop().await;
    Ok(records)
}

/// One session: connect, one byte echoed (set-up complete), `pings` small round trips, close.
async fn session(
    client: &Client,
    name: &HubName,
    hub_key: &PublicKey,
    pings: usize,
) -> anyhow::Result<Sample> {
    let start = Instant::now();
    let mut stream = client.connect(name, hub_key).await?;
    let mut byte = [0u8; 1];
    stream.write_all(b"x").await?;
    stream.read_exact(&mut byte).await?;
    let setup = start.elapsed();
    let mut rtts = Vec::with_capacity(pings);
    let msg = [7u8; 64];
    let mut back = [0u8; 64];
    for _ in 0..pings {
        let t = Instant::now();
        stream.write_all(&msg).await?;
        stream.read_exact(&mut back).await?;
        rtts.push(t.elapsed());
    }
    stream.shutdown().await?;
    Ok(Sample { setup, rtts })
}
