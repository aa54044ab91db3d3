//! Set-up time in app↔hub round trips, with real delay on both legs.
//!
//! The relay runs as a process; the app's and the hub's path to it each go through a delay
//! link ([`crate::link`], which adds a one-way delay both ways: these kernels have no
//! `netem`), so an app↔hub round trip crosses four delayed hops. One sample at a time
//! (no queueing in the numbers), per mode: the time from the start of the call
//! (`connect_pipelined`, or `connect_early`) to the first echoed byte back, divided by the app↔hub round trip measured on a live stream in the same
//! run.
//!
//! Modes:
//! * `cold`: a new `Client`: relay handshake, channel, full end-to-end handshake, request;
//! * `new_connection`: relay connection up, no ticket: channel, full handshake, request;
//! * `ticket`: relay connection up, a ticket of the hub: channel, resumed handshake, request;
//! * `ticket_early`: as `ticket`, the request as 0-RTT early data (`connect_early`);
//! * `stream`: a new stream on the live end-to-end connection: the request's own round trip.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyway_client::{Client, ClientConfig, HubStream};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{percentile, round, unix_time, OneHub};
use crate::link::{Link, LinkParams};
use crate::Record;

/// Options of the set-up scenario.
#[derive(Debug, Clone)]
pub struct SetupOpts {
    pub relay_bin: PathBuf,
    /// One-way delay of each link (app↔relay and hub↔relay).
    pub delay: Duration,
    /// Samples per mode.
    pub samples: usize,
}

/// A ticket store that keeps nothing: every end-to-end handshake is a full one.
#[derive(Debug)]
struct NoTickets;

impl rustls::client::ClientSessionStore for NoTickets {
    fn set_kx_hint(&self, _: rustls::pki_types::ServerName<'static>, _: rustls::NamedGroup) {}
    fn kx_hint(&self, _: &rustls::pki_types::ServerName<'_>) -> Option<rustls::NamedGroup> {
        None
    }
    fn set_tls12_session(
        &self,
        _: rustls::pki_types::ServerName<'static>,
        _: rustls::client::Tls12ClientSessionValue,
    ) {
    }
    fn tls12_session(
        &self,
        _: &rustls::pki_types::ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        None
    }
    fn remove_tls12_session(&self, _: &rustls::pki_types::ServerName<'static>) {}
    fn insert_tls13_ticket(
        &self,
        _: rustls::pki_types::ServerName<'static>,
        _: rustls::client::Tls13ClientSessionValue,
    ) {
    }
    fn take_tls13_ticket(
        &self,
        _: &rustls::pki_types::ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        None
    }
}

/// Runs every mode and reports each in milliseconds and in app↔hub round trips.
pub async fn run(opts: &SetupOpts) -> anyhow::Result<Vec<Record>> {
    let mut links = Vec::new();
    let params = LinkParams { delay: opts.delay, ..LinkParams::default() };
    let setup = OneHub::start_routed(&opts.relay_bin, (10, 11), async |relay| {
        let link = Link::start(relay, params).await?;
        let addr = link.addr();
        links.push(link);
        Ok(addr)
    })
    .await?;
    let app_link = Link::start(setup.relay.addr, params).await?;
    let app_path = app_link.addr();
    let (name, hub_key) = (setup.name.clone(), setup.hub_key);
    let config = |store: Option<Arc<dyn rustls::client::ClientSessionStore>>| {
        let mut config = ClientConfig::new(setup.app.duplicate(), app_path, setup.relay.key);
        config.session_store = store;
        config
    };

    // The unit: the app↔hub round trip on a live stream.
    let warm = Client::new(config(None))?;
    let mut stream = warm.connect(&name, &hub_key).await?;
    let mut rtts = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        echo_byte(&mut stream).await?;
        rtts.push(ms(t.elapsed()));
    }
    drop(stream);
    let rtt = percentile(&mut rtts, 50.0);

    let no_tickets = Client::new(config(Some(Arc::new(NoTickets))))?;
    no_tickets.connect(&name, &hub_key).await?; // relay connection up
    let mut records = Vec::new();
    for mode in ["cold", "new_connection", "ticket", "ticket_early", "stream"] {
        let mut samples = Vec::with_capacity(opts.samples);
        let mut early_taken = 0usize;
        for _ in 0..opts.samples {
            let (client, cold) = match mode {
                "cold" => (Client::new(config(None))?, true),
                "new_connection" => (no_tickets.clone(), false),
                _ => (warm.clone(), false),
            };
            if matches!(mode, "new_connection" | "ticket" | "ticket_early") {
                client.disconnect(&name, &hub_key).await;
                // Let the close reach the hub, so the next dial is not queued behind it.
                tokio::time::sleep(opts.delay * 6).await;
            }
            let t = Instant::now();
            let early = if mode == "ticket_early" {
                let mut stream = client.connect_early(&name, &hub_key, b"x").await?;
                read_byte(&mut stream).await?;
                stream.early_data()
            } else {
                // Pipelined, as `keyway forward` does: the request leaves with `StreamOpen`
                // instead of a round trip later (`connect` waits for the hub's answer first).
                let mut stream = client.connect_pipelined(&name, &hub_key).await?;
                echo_byte(&mut stream).await?;
                false
            };
            samples.push(ms(t.elapsed()));
            early_taken += usize::from(early);
            if cold {
                client.close().await;
            }
        }
        let p50 = percentile(&mut samples, 50.0);
        let p99 = percentile(&mut samples, 99.0);
        records.push(json!({
            "scenario": "setup", "mode": mode, "samples": samples.len(),
            "delay_ms_each_way": opts.delay.as_millis() as u64,
            "app_hub_rtt_ms": round(rtt, 2), "early_data_taken": early_taken,
            "setup_p50_ms": round(p50, 2), "setup_p99_ms": round(p99, 2),
            "setup_p50_rtts": round(p50 / rtt, 2), "setup_p99_rtts": round(p99 / rtt, 2),
            "time": unix_time(),
        }));
    }
    warm.close().await;
    no_tickets.close().await;
    drop(app_link);
    setup.stop().await;
    drop(links);
    Ok(records)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn echo_byte(stream: &mut HubStream) -> anyhow::Result<()> {
    stream.write_all(b"x").await?;
    read_byte(stream).await
}

async fn read_byte(stream: &mut HubStream) -> anyhow::Result<()> {
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte).await?;
    Ok(())
}
