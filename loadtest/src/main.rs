//! `keyway-loadtest`: flags in, JSON lines and SVG figures out. The scenarios live in the
//! library (`keyway_loadtest::*`); this file only parses the command line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use keyway_loadtest::bare::Knobs;
use keyway_loadtest::{bulk, churn, common, handshakes, idle, plot, report, setup, storm, storm_raw, Record};
use keyway_proto::cli::parse_duration;

/// Keyway load generator: relayed vs direct throughput, idle hubs, reconnect storms, churn.
#[derive(Debug, Parser)]
#[command(name = "keyway-loadtest", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Flags every scenario takes.
#[derive(Debug, Args)]
struct Common {
    /// The keyway-relay binary (default: next to this executable).
    #[arg(long, value_name = "FILE")]
    relay_bin: Option<PathBuf>,
    /// Append JSON lines here instead of printing them.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Draw the scenario's figure into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Throughput app → relay → hub → back (end-to-end QUIC through the relay) beside a direct
    /// quinn connection.
    Bulk {
        #[command(flatten)]
        common: Common,
        /// Bytes per run, e.g. 256 (MiB).
        #[arg(long, default_value_t = 256)]
        mib: u64,
        /// Parallel stream counts.
        #[arg(long, value_delimiter = ',', default_value = "1,8")]
        streams: Vec<usize>,
        /// Runs per configuration (median reported).
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        /// Paths to measure: direct, direct-tcp (direct with the hub's TCP hop), relayed.
        #[arg(long, value_delimiter = ',', default_value = "direct,direct-tcp,relayed")]
        paths: Vec<String>,
        /// Round trips to add with a delay link in front of the relay and the direct server,
        /// e.g. 0,20ms,80ms (each combined with every --loss); none: straight loopback.
        #[arg(long, value_delimiter = ',', value_parser = parse_rtt)]
        rtt: Vec<Duration>,
        /// Loss each way on that link, e.g. 0,0.01 (with --rtt; 0 when only this is given).
        #[arg(long, value_delimiter = ',')]
        loss: Vec<f64>,
    },
    /// Many idle registered hubs: server RSS per hub and idle CPU.
    IdleHubs {
        #[command(flatten)]
        common: Common,
        /// Hub counts to measure at (registration continues between steps).
        #[arg(long, value_delimiter = ',', default_value = "1000,5000,20000")]
        counts: Vec<usize>,
        /// Idle hold per step.
        #[arg(long, default_value = "20s", value_parser = parse_duration)]
        hold: Duration,
        /// Hubs sharing one client UDP endpoint.
        #[arg(long, default_value_t = 2000)]
        hubs_per_endpoint: usize,
        /// Registrations in flight.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Relay with the open name policy instead of a generated authorized_hubs.
        #[arg(long)]
        open: bool,
        /// Relay processes; hub i registers at node i % N (RSS and CPU are their sums).
        #[arg(long, default_value_t = 1)]
        nodes: usize,
        /// Make the nodes one cluster sharing this store (`redis://HOST:PORT`).
        #[arg(long, value_name = "URL")]
        cluster: Option<String>,
        /// Register with a bare quinn server using these knobs instead of the relay.
        #[arg(long, value_enum)]
        bare: Option<Knobs>,
        /// Extra environment for the server process, e.g. MALLOC_ARENA_MAX=1 (repeatable).
        #[arg(long = "server-env", value_name = "K=V")]
        env: Vec<String>,
    },
    /// Relay restart under N hub connectors: time until all are back, reconnect curve.
    Storm {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 1000)]
        hubs: usize,
        /// TERM (graceful, GoAway) or KILL.
        #[arg(long, default_value = "TERM")]
        signal: String,
        /// Hub liveness ping interval.
        #[arg(long, default_value = "20s", value_parser = parse_duration)]
        ping_interval: Duration,
        #[arg(long, default_value = "120s", value_parser = parse_duration)]
        deadline: Duration,
        /// Raw hubs (the connector's backoff and reset handling over shared endpoints) instead of
        /// real connectors: for 10 000 hubs and more.
        #[arg(long)]
        raw: bool,
        /// Raw mode: source addresses (127.0.x.y) the hubs are spread over; 0: one per 25 hubs.
        #[arg(long, default_value_t = 0)]
        sources: usize,
        /// Raw mode: the relay's new_connections_per_ip (its default; 0: no limit).
        #[arg(long, default_value_t = 10.0)]
        per_ip_rate: f64,
        /// Raw mode: the relay's new_connections_burst (its default).
        #[arg(long, default_value_t = 30)]
        per_ip_burst: u32,
        /// Raw mode: the relay's retry_threshold (its default).
        #[arg(long, default_value_t = 100)]
        retry_threshold: u32,
        /// Raw mode: the relay's max_handshakes_in_flight (its default; 0: no cap).
        #[arg(long, default_value_t = 256)]
        max_handshakes_in_flight: u32,
        /// Raw mode: first registrations in flight while the hubs come up.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Raw mode: attempts this generator works on at once during the storm (0: all hubs
        /// at once; on a machine shared with the relay the generator then collapses first).
        #[arg(long, default_value_t = 0)]
        generator_in_flight: usize,
    },
    /// Raw hubs dialing and registering at fixed arrival rates: the relay's handshake ceiling and
    /// CPU-seconds per handshake on each side.
    Handshakes {
        #[command(flatten)]
        common: Common,
        /// Arrival rates (attempts per second), one step each.
        #[arg(long, value_delimiter = ',', default_value = "200,400,800")]
        rates: Vec<u32>,
        /// How long each rate is held.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        duration: Duration,
        /// Source addresses (127.0.2.x) the attempts come from.
        #[arg(long, default_value_t = 40)]
        sources: usize,
        /// Extra relay flag and value, e.g. `--relay-flag=--max-handshakes-in-flight=256`.
        #[arg(long = "relay-flag", value_name = "FLAG=VALUE")]
        relay_flags: Vec<String>,
    },
    /// Sessions opened and closed at a steady rate: set-up time and echo RTT, cold and warm.
    Churn {
        #[command(flatten)]
        common: Common,
        /// Sessions per second.
        #[arg(long, default_value_t = 20.0)]
        rate: f64,
        /// Per mode.
        #[arg(long, default_value = "15s", value_parser = parse_duration)]
        duration: Duration,
        /// Echo round trips per session.
        #[arg(long, default_value_t = 10)]
        pings: usize,
    },
    /// Set-up time in app↔hub round trips, one sample at a time, with a delaying UDP forwarder
    /// on the app's and the hub's leg: cold, new connection, ticket, ticket + early data, stream.
    Setup {
        #[command(flatten)]
        common: Common,
        /// One-way delay of each link (an app↔hub round trip crosses four).
        #[arg(long, default_value = "20ms", value_parser = parse_duration)]
        delay: Duration,
        /// Samples per mode.
        #[arg(long, default_value_t = 30)]
        samples: usize,
    },
    /// Redraw a figure from a JSON-lines file.
    Plot { input: PathBuf, output: PathBuf },
    /// Regenerate the results table in a README from a results directory.
    Report {
        #[arg(long, default_value = "loadtest/results")]
        results: PathBuf,
        #[arg(long, default_value = "loadtest/README.md")]
        readme: PathBuf,
        /// The line above the table (machine, date, conditions).
        #[arg(long, default_value = "")]
        machine: String,
    },
    /// (internal) The bare quinn server of the idle-hubs experiment.
    #[command(hide = true)]
    BareServer {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        key: PathBuf,
        #[arg(long, value_enum, default_value = "relay")]
        knobs: Knobs,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(run(cli.command))
}

fn finish(common: &Common, records: Vec<Record>) -> anyhow::Result<()> {
    common::write_records(&records, common.out.as_deref())?;
    if let Some(path) = &common.plot {
        plot::scenario(path, &records)?;
    }
    Ok(())
}

fn relay_bin(common: &Common) -> anyhow::Result<PathBuf> {
    common::relay_bin(common.relay_bin.as_deref())
}

/// A round trip: `0` or a duration (`20ms`).
fn parse_rtt(text: &str) -> Result<Duration, String> {
    if text.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    parse_duration(text).map_err(|e| e.to_string())
}

/// Every (round trip, loss) pair of `--rtt` × `--loss`; none when neither is given.
fn link_combinations(rtt: &[Duration], loss: &[f64]) -> Vec<(Duration, f64)> {
    if rtt.is_empty() && loss.is_empty() {
        return Vec::new();
    }
    let rtt = if rtt.is_empty() { vec![Duration::ZERO] } else { rtt.to_vec() };
    let loss = if loss.is_empty() { vec![0.0] } else { loss.to_vec() };
    rtt.iter().flat_map(|&r| loss.iter().map(move |&l| (r, l))).collect()
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Bulk { common, mib, streams, repeat, paths, rtt, loss } => {
            let links = link_combinations(&rtt, &loss);
            let opts = bulk::BulkOpts {
                relay_bin: relay_bin(&common)?,
                bytes: mib << 20,
                streams,
                repeat,
                paths,
                links,
                quiet: common.quiet,
            };
            finish(&common, bulk::run(&opts).await?)
        }
        Command::IdleHubs {
            common,
            counts,
            hold,
            hubs_per_endpoint,
            concurrency,
            open,
            nodes,
            cluster,
            bare,
            env,
        } => {
            let target = match bare {
                Some(knobs) => idle::Target::Bare { loadtest_bin: std::env::current_exe()?, knobs },
                None => idle::Target::Relay { bin: relay_bin(&common)?, open, nodes, cluster },
            };
            let env = env
                .iter()
                .map(|kv| kv.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
                .collect::<Option<Vec<_>>>()
                .context("--server-env takes KEY=VALUE")?;
            let opts = idle::IdleOpts {
                target,
                counts,
                hold,
                hubs_per_endpoint,
                concurrency,
                env,
                quiet: common.quiet,
            };
            finish(&common, idle::run(&opts).await?)
        }
        Command::Storm {
            common,
            hubs,
            signal,
            deadline,
            raw: true,
            sources,
            per_ip_rate,
            per_ip_burst,
            retry_threshold,
            max_handshakes_in_flight,
            concurrency,
            generator_in_flight,
            ..
        } => {
            let opts = storm_raw::RawStormOpts {
                relay_bin: relay_bin(&common)?,
                hubs,
                signal: signal.to_uppercase(),
                sources: if sources == 0 { hubs.div_ceil(25) } else { sources },
                per_ip_rate,
                per_ip_burst,
                retry_threshold,
                max_handshakes_in_flight,
                deadline,
                concurrency,
                generator_in_flight,
                quiet: common.quiet,
            };
            finish(&common, storm_raw::run(&opts).await?)
        }
        Command::Storm { common, hubs, signal, ping_interval, deadline, .. } => {
            let opts = storm::StormOpts {
                relay_bin: relay_bin(&common)?,
                hubs,
                signal: signal.to_uppercase(),
                ping_interval,
                deadline,
                quiet: common.quiet,
            };
            finish(&common, storm::run(&opts).await?)
        }
        Command::Handshakes { common, rates, duration, sources, relay_flags } => {
            let relay_flags = relay_flags
                .iter()
                .map(|kv| kv.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
                .collect::<Option<Vec<_>>>()
                .context("--relay-flag takes FLAG=VALUE")?;
            let opts = handshakes::HandshakeOpts {
                relay_bin: relay_bin(&common)?,
                rates,
                duration,
                sources,
                relay_flags,
                quiet: common.quiet,
            };
            finish(&common, handshakes::run(&opts).await?)
        }
        Command::Churn { common, rate, duration, pings } => {
            let opts = churn::ChurnOpts {
                relay_bin: relay_bin(&common)?,
                rate,
                duration,
                pings,
                quiet: common.quiet,
            };
            finish(&common, churn::run(&opts).await?)
        }
        Command::Setup { common, delay, samples } => {
            let opts = setup::SetupOpts { relay_bin: relay_bin(&common)?, delay, samples };
            finish(&common, setup::run(&opts).await?)
        }
        Command::Plot { input, output } => plot::scenario(&output, &common::read_records(&input)?),
        Command::Report { results, readme, machine } => write_report(&results, &readme, &machine),
        Command::BareServer { listen, key, knobs } => keyway_loadtest::bare::serve(listen, &key, knobs).await,
    }
}

fn write_report(results: &Path, readme: &Path, machine: &str) -> anyhow::Result<()> {
    let table = report::table(results, machine)?;
    let text = std::fs::read_to_string(readme).with_context(|| format!("reading {}", readme.display()))?;
    std::fs::write(readme, report::splice(&text, &table)?)?;
    Ok(())
}
