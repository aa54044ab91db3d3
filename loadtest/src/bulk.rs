//! Bulk throughput: app → relay → hub → local echo service → back (one end-to-end QUIC
//! connection whose packets the relay forwards without decrypting them), beside a direct quinn
//! connection that carries the same payload the same way (client writes, server echoes on the
//! same stream) as the physical reference, and (`direct-tcp`) a direct quinn connection whose
//! server bridges each stream to a local TCP echo service as the hub does, so that
//! relayed / direct-tcp is what the relay and the path sockets cost, the TCP hop aside.
//!
//! The number reported is goodput in one direction (bytes echoed back per second) while both
//! directions are loaded, for 1 stream and for N parallel streams, and for the relayed paths
//! the relay process's CPU time (utime + stime from `/proc`) per GiB of payload crossing it
//! (each direction's bytes counted once). Everything except the relay runs in this process, so
//! on a 2-core machine the app, hub and echo service share the cores with the relay process;
//! the direct path only has quinn at both ends. Loopback flatters GSO/GRO (64 KiB MTU, no
//! wire): compare paths within one run, not with other machines.
//!
//! With `--rtt` / `--loss`, every combination runs through a link with that round trip and
//! loss each way ([`crate::link`]): between the app and the relay (the hub stays next to the
//! relay, so the app↔hub round trip is the link's) and between the direct client and its
//! server. Both ends use the end-to-end transport config ([`keyway_path::e2e_transport_config`],
//! its windows) so that the direct reference has the windows a path of ours has.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use keyway_client::{Client, ClientConfig};
use keyway_proto::tls::{quic_client_crypto, quic_server_crypto, AnyKey};
use keyway_proto::ALPN_RELAY;
use serde_json::json;

use crate::common::{echo_transfer, identity_for, median, round, unix_time, ProcUsage};
use crate::link::{Link, LinkParams};
use crate::Record;
use keyway_test_support::try_echo_service;

/// Options of the bulk scenario.
#[derive(Debug, Clone)]
pub struct BulkOpts {
    pub relay_bin: PathBuf,
    /// Bytes per run (split evenly over the streams).
    pub bytes: u64,
    /// Parallel stream counts to measure (e.g. 1 and 8).
    pub streams: Vec<usize>,
    /// Runs per configuration; the summary reports the median.
    pub repeat: usize,
    /// Which of [`PATHS`] to measure.
    pub paths: Vec<String>,
    /// Links to measure through: (round trip, loss each way); empty: straight loopback.
    pub links: Vec<(Duration, f64)>,
    pub quiet: bool,
}

/// Runs the scenario: per repetition, direct and relayed for each stream count, interleaved so
/// that background noise hits both paths alike.
pub async fn run(opts: &BulkOpts) -> anyhow::Result<Vec<Record>> {
    let setup = crate::common::OneHub::start(&opts.relay_bin, (1, 2)).await?;
    let direct = DirectServer::start(None).await?;
    let bridged = DirectServer::start(Some(try_echo_service(b"").await?)).await?;
    let paths: Vec<&str> = PATHS.into_iter().filter(|p| opts.paths.iter().any(|q| q == p)).collect();
    if let Some(unknown) = opts.paths.iter().find(|q| !PATHS.contains(&q.as_str())) {
        anyhow::bail!("unknown bulk path {unknown:?}; known: {}", PATHS.join(", "));
    }
    let links: Vec<Option<(Duration, f64)>> =
        if opts.links.is_empty() { vec![None] } else { opts.links.iter().copied().map(Some).collect() };
    let mut records = Vec::new();
    for link in links {
        // Through a link: one per server (relay, direct, bridged), the same parameters each.
        let through = |server: SocketAddr| async move {
            match link {
                None => Ok::<_, anyhow::Error>((server, None)),
                Some((rtt, loss)) => {
                    let l = Link::start(server, LinkParams::rtt_loss(rtt, loss)).await?;
                    Ok((l.addr(), Some(l)))
                }
            }
        };
        let (relay_addr, _relay_link) = through(setup.relay.addr).await?;
        let (direct_addr, _direct_link) = through(direct.addr).await?;
        let (bridged_addr, _bridged_link) = through(bridged.addr).await?;
        let client = Client::new(ClientConfig::new(setup.app.duplicate(), relay_addr, setup.relay.key))?;
        let direct_conn = direct.connect(direct_addr).await?;
        let bridged_conn = bridged.connect(bridged_addr).await?;
        let conns = Conns { client: &client, direct: &direct_conn, bridged: &bridged_conn };
        records.extend(measure(opts, &setup, &conns, &paths, link).await?);
        client.close().await;
    }
    setup.stop().await;
    Ok(records)
}

/// The connections one link's measurements run on.
struct Conns<'a> {
    client: &'a Client,
    direct: &'a (quinn::Endpoint, quinn::Connection),
    bridged: &'a (quinn::Endpoint, quinn::Connection),
}

/// Every repetition, stream count and path through one link; the runs and their summaries.
async fn measure(
    opts: &BulkOpts,
    setup: &crate::common::OneHub,
    conns: &Conns<'_>,
    paths: &[&str],
    link: Option<(Duration, f64)>,
) -> anyhow::Result<Vec<Record>> {
    let (name, hub_key) = (setup.name.clone(), setup.hub_key);
    let (rtt_ms, loss) = match link {
        Some((rtt, loss)) => (Some(round(rtt.as_secs_f64() * 1e3, 3)), Some(loss)),
        None => (None, None),
    };
    let mut records = Vec::new();
    let runs = opts.repeat * opts.streams.len() * paths.len();
    let bar = crate::common::progress(runs as u64, "bulk runs", opts.quiet);
    for run in 0..opts.repeat {
        for &streams in &opts.streams {
            let streams = streams.max(1);
            let per_stream = (opts.bytes / streams as u64).max(1);
            for &path in paths {
                // Open every stream first, then start all transfers together: the time is the
                // wall time from the common start to the last echoed byte.
                let before = setup.relay.usage()?.cpu_s;
                let own_before = ProcUsage::read(std::process::id())?.cpu_s;
                let slowest = if path == "direct" || path == "direct-tcp" {
                    let (_, conn) = if path == "direct" { conns.direct } else { conns.bridged };
                    let mut set = Vec::with_capacity(streams);
                    for _ in 0..streams {
                        let (send, recv) = conn.open_bi().await?;
                        set.push(tokio::io::join(recv, send));
                    }
                    transfer_all(set, per_stream).await?
                } else {
                    let mut set = Vec::with_capacity(streams);
                    for _ in 0..streams {
                        set.push(conns.client.connect(&name, &hub_key).await?);
                    }
                    transfer_all(set, per_stream).await?
                };
                let relay_cpu_s = setup.relay.usage()?.cpu_s - before;
                let own_cpu_s = ProcUsage::read(std::process::id())?.cpu_s - own_before;
                let total = per_stream * streams as u64;
                let gbps = total as f64 * 8.0 / slowest.as_secs_f64() / 1e9;
                // Both directions cross the relay: 2 × total payload bytes.
                let gib = 2.0 * total as f64 / f64::from(1u32 << 30);
                let cpu_per_gib = (path == "relayed").then(|| round(relay_cpu_s / gib, 3));
                // Both ends (direct) or app, hub and echo service (relayed): what the path costs
                // outside the relay, per GiB of payload in each direction as for the relay.
                let ends_cpu_per_gib = round(own_cpu_s / gib, 3);
                records.push(json!({
                    "scenario": "bulk", "kind": "run", "path": path, "streams": streams, "run": run,
                    "rtt_ms": rtt_ms, "loss": loss,
                    "bytes": total, "secs": round(slowest.as_secs_f64(), 4), "gbps": round(gbps, 3),
                    "relay_cpu_s_per_gib": cpu_per_gib, "ends_cpu_s_per_gib": ends_cpu_per_gib,
                    "time": unix_time(),
                }));
                bar.inc(1);
            }
        }
    }
    bar.finish_and_clear();

    for &streams in &opts.streams {
        let streams = streams.max(1);
        let pick = |path: &str, field: &str| {
            let mut v: Vec<f64> = records
                .iter()
                .filter(|r| r["kind"] == "run" && r["path"] == path && r["streams"] == streams)
                .filter_map(|r| r[field].as_f64())
                .collect();
            median(&mut v)
        };
        let (direct_gbps, relayed_gbps) = (pick("direct", "gbps"), pick("relayed", "gbps"));
        let bridged_gbps = pick("direct-tcp", "gbps");
        records.push(json!({
            "scenario": "bulk", "kind": "summary", "streams": streams, "repeat": opts.repeat,
            "rtt_ms": rtt_ms, "loss": loss,
            "bytes": opts.bytes, "direct_gbps": round(direct_gbps, 3), "relayed_gbps": round(relayed_gbps, 3),
            "ratio": round(relayed_gbps / direct_gbps, 3),
            "direct_tcp_gbps": round(bridged_gbps, 3),
            "ratio_same_shape": round(relayed_gbps / bridged_gbps, 3),
            "direct_tcp_ends_cpu_s_per_gib": round(pick("direct-tcp", "ends_cpu_s_per_gib"), 3),
            "relay_cpu_s_per_gib": round(pick("relayed", "relay_cpu_s_per_gib"), 3),
            "direct_ends_cpu_s_per_gib": round(pick("direct", "ends_cpu_s_per_gib"), 3),
            "relayed_ends_cpu_s_per_gib": round(pick("relayed", "ends_cpu_s_per_gib"), 3),
            "time": unix_time(),
        }));
    }
    Ok(records)
}

/// The paths measured, in the order each repetition runs them.
pub const PATHS: [&str; 3] = ["direct", "direct-tcp", "relayed"];

/// Runs [`echo_transfer`] on every stream at once; returns the wall time until all are done.
async fn transfer_all<S>(streams: Vec<S>, bytes: u64) -> anyhow::Result<Duration>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let start = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for stream in streams {
        tasks.spawn(echo_transfer(stream, bytes));
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(start.elapsed())
}

/// A quinn server that echoes every bidirectional stream (or, given `bridge_to`, bridges it to
/// that TCP service with `copy_bidirectional` as the hub does), with the relay's crypto
/// (Ed25519 raw keys, ring) and the relay's transport defaults, plus a connection to it.
struct DirectServer {
    _server: quinn::Endpoint,
    addr: SocketAddr,
    server_key: keyway_proto::PublicKey,
}

impl DirectServer {
    async fn start(bridge_to: Option<SocketAddr>) -> anyhow::Result<Self> {
        let server_id = identity_for(3, 0);
        let crypto = quic_server_crypto(&server_id, Arc::new(AnyKey), ALPN_RELAY)?;
        let mut config = quinn::ServerConfig::with_crypto(crypto);
        let mut transport = e2e_transport()?;
        transport.max_concurrent_bidi_streams(1024u32.into());
        config.transport_config(Arc::new(transport));
        let server = endpoint(Some(config))?;
        let addr = server.local_addr()?;
        let accept = server.clone();
        tokio::spawn(async move {
            while let Some(incoming) = accept.accept().await {
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                        tokio::spawn(async move {
                            match bridge_to {
                                None => {
                                    let _ = tokio::io::copy(&mut recv, &mut send).await;
                                }
                                Some(service) => {
                                    let Ok(mut tcp) = tokio::net::TcpStream::connect(service).await else {
                                        return;
                                    };
                                    let _ = tcp.set_nodelay(true);
                                    let mut quic = tokio::io::join(recv, send);
                                    let _ = tokio::io::copy_bidirectional(&mut quic, &mut tcp).await;
                                    return;
                                }
                            }
                            let _ = send.finish();
                        });
                    }
                });
            }
        });
        Ok(Self { _server: server, addr, server_key: server_id.public_key() })
    }

    /// A client endpoint and its connection to the server, dialed at `via` (the server's
    /// address, or a link in front of it).
    async fn connect(&self, via: SocketAddr) -> anyhow::Result<(quinn::Endpoint, quinn::Connection)> {
        let (crypto, _) = quic_client_crypto(&identity_for(3, 1), self.server_key, ALPN_RELAY)?;
        let mut config = quinn::ClientConfig::new(crypto);
        config.transport_config(Arc::new(e2e_transport()?));
        let client = endpoint(None)?;
        let conn = client.connect_with(config, via, keyway_proto::tls::SERVER_NAME)?.await?;
        Ok((client, conn))
    }
}

/// The end-to-end connection's transport config (windows, MTU bound), as both ends of a relayed
/// session use it.
fn e2e_transport() -> anyhow::Result<quinn::TransportConfig> {
    Ok(keyway_path::e2e_transport_config(Duration::ZERO, Duration::from_secs(30))?)
}

/// A loopback endpoint with 4 MiB socket buffers, like the relay's and the client's.
pub fn endpoint(server: Option<quinn::ServerConfig>) -> anyhow::Result<quinn::Endpoint> {
    endpoint_on(SocketAddr::from(([127, 0, 0, 1], 0)), server)
}

/// [`endpoint`] on a given IPv4 address.
pub fn endpoint_on(addr: SocketAddr, server: Option<quinn::ServerConfig>) -> anyhow::Result<quinn::Endpoint> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    let _ = socket.set_recv_buffer_size(4 << 20);
    let _ = socket.set_send_buffer_size(4 << 20);
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    let runtime = quinn::default_runtime().ok_or_else(|| anyhow::anyhow!("no tokio runtime"))?;
    Ok(quinn::Endpoint::new(quinn::EndpointConfig::default(), server, socket.into(), runtime)?)
}
