//! The `keyway-relay` command line: `run`, `pubkey`, `health` and `status`.
//!
//! Every flag also comes from an environment variable (`KEYWAY_RELAY_<FLAG>`) or from a TOML
//! file named by `--config` (keys are flag names), in that order of precedence after the command
//! line. With no flags at all, `keyway-relay run` starts with embedded defaults, creating its
//! key and an empty `authorized_hubs` in the working directory, and prints what a hub owner
//! needs to connect.
//!
//! The config file is applied by turning its options into command-line arguments for the flags
//! that neither the command line nor the environment set (not by exporting variables), so it
//! can be re-read at run time: SIGHUP, or a change of the file, reloads `authorized_hubs` and
//! the limits. Other options (addresses, key, policy) need a restart. SIGTERM or ctrl-c drains
//! gracefully (see `RelayHandle::shutdown`).

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use keyway_proto::cli::{
    config_env, config_path, init_logging, parse_duration, report_exit_error, ConfigError, LogArgs,
};
use keyway_proto::Identity;
use tracing::{error, info, warn};

use crate::{Limits, NamePolicy, Relay, RelayConfig, RelayHandle};

/// How often the config file is checked for changes.
const CONFIG_FILE_POLL: Duration = Duration::from_secs(1);

/// Keyway relay: hubs dial out to it, apps reach them by name; it forwards bytes it cannot read.
#[derive(Debug, Parser)]
#[command(name = "keyway-relay", version, about)]
pub struct Cli {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay.
    Run(Box<RunArgs>),
    /// Print the relay's public key (the one hubs and apps pin).
    Pubkey(PubkeyArgs),
    /// Ask a running relay's `/healthz` (on its metrics listener): exit 0 if healthy, 1 if not,
    /// with the reason. A container's `HEALTHCHECK`.
    Health(HealthArgs),
    /// Show what the running relay (the one using this key file) is doing: hubs online,
    /// channels, limits in force and hit. Asks its local admin socket (`KEY.sock`, mode 0600).
    Status(StatusArgs),
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// TOML file of `run` (only `key` is read from it).
    #[arg(long, env = "KEYWAY_RELAY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The running relay's key file, as given to `run`; its admin socket is `FILE.sock`.
    #[arg(long, env = "KEYWAY_RELAY_KEY", default_value = "keyway-relay.key", value_name = "FILE")]
    pub key: PathBuf,
    /// Print the status as one JSON object (fields: docs/operating-reference.md).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// TOML file with any of these options (keys are the flag names, e.g. `idle_timeout = "90s"`).
    #[arg(long, env = "KEYWAY_RELAY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// UDP address to listen on.
    #[arg(long, env = "KEYWAY_RELAY_LISTEN", default_value = "0.0.0.0:4433")]
    pub listen: SocketAddr,
    /// The relay's private key file (PKCS#8 PEM, mode 0600); created on first run.
    #[arg(long, env = "KEYWAY_RELAY_KEY", default_value = "keyway-relay.key", value_name = "FILE")]
    pub key: PathBuf,
    /// `authorized_hubs` file: one `NAME KEY` line per hub (closed policy, the default). Created
    /// with an explanatory header if missing; re-read when it changes and on SIGHUP.
    #[arg(long, env = "KEYWAY_RELAY_HUBS", default_value = "authorized_hubs", value_name = "FILE")]
    pub hubs: PathBuf,
    /// Open name policy: the first hub key to register a free name keeps it.
    #[arg(long, env = "KEYWAY_RELAY_OPEN")]
    pub open: bool,
    /// Open policy: file where name bindings are kept across restarts.
    #[arg(long, env = "KEYWAY_RELAY_STATE", default_value = "keyway-relay.bindings", value_name = "FILE")]
    pub state: PathBuf,
    /// QUIC idle timeout (hubs send keep-alives well inside it).
    #[arg(long, env = "KEYWAY_RELAY_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// How long to wait for a stream's first frame and for a hub to answer a session.
    #[arg(long, env = "KEYWAY_RELAY_SESSION_OPEN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub session_open_timeout: Duration,
    /// TCP address of the HTTP listener for Prometheus `/metrics` and `/healthz`. Loopback by
    /// default: expose it deliberately (e.g. `0.0.0.0:9464` inside a container).
    #[arg(long, env = "KEYWAY_RELAY_METRICS_LISTEN", default_value = crate::DEFAULT_METRICS_LISTEN)]
    pub metrics_listen: SocketAddr,
    /// Do not start the metrics and health listener.
    #[arg(long, env = "KEYWAY_RELAY_NO_METRICS")]
    pub no_metrics: bool,
    /// On SIGTERM, how long live sessions may continue before the relay closes them.
    #[arg(long, env = "KEYWAY_RELAY_DRAIN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// This node's stable id in a cluster of relays sharing one key (1-63 of a-z, 0-9, '-').
    /// Keep it across restarts: the QUIC reset secrets derive from it. Unset: a single relay.
    #[arg(long, env = "KEYWAY_RELAY_NODE_ID", value_name = "ID")]
    pub node_id: Option<crate::cluster::NodeId>,
    /// Be a node of a cluster that shares hub presence through this store
    /// (`redis://HOST:PORT[/DB]`, or `redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTER` to follow
    /// a Sentinel-managed primary); needs --node-id and the same key file on every node.
    #[arg(long, env = "KEYWAY_RELAY_CLUSTER", value_name = "URL")]
    pub cluster: Option<String>,
    /// Cluster: the UDP address apps and hubs reach this node at, which redirects name
    /// (default: the listen address; set it when that is a wildcard or behind NAT).
    #[arg(long, env = "KEYWAY_RELAY_ADVERTISE", value_name = "ADDR")]
    pub advertise: Option<SocketAddr>,
    /// Cluster: the presence lease of a hub in the store, renewed every third of it. A dead
    /// node's hubs are redirected to it for at most this long, unless they re-register sooner.
    #[arg(long, env = "KEYWAY_RELAY_CLUSTER_LEASE", default_value = "30s", value_parser = parse_duration)]
    pub cluster_lease: Duration,
    #[command(flatten)]
    pub limits: LimitArgs,
}

/// The limits (reloadable; `0` switches a limit off, except max_streams_per_connection).
#[derive(Debug, Clone, Args)]
pub struct LimitArgs {
    /// Hubs registered at once (re-registration of a registered hub always passes).
    #[arg(long, env = "KEYWAY_RELAY_MAX_HUBS", default_value_t = crate::DEFAULT_MAX_HUBS)]
    pub max_hubs: u32,
    /// Sessions one hub carries at once.
    #[arg(long, env = "KEYWAY_RELAY_MAX_SESSIONS_PER_HUB", default_value_t = crate::DEFAULT_MAX_SESSIONS_PER_HUB)]
    pub max_sessions_per_hub: u32,
    /// Sessions one app key holds at one hub at once (keep it below max_sessions_per_hub).
    #[arg(long, env = "KEYWAY_RELAY_MAX_SESSIONS_PER_APP", default_value_t = crate::DEFAULT_MAX_SESSIONS_PER_APP)]
    pub max_sessions_per_app: u32,
    /// Bidirectional streams a peer may have open on one connection (at least 1).
    #[arg(long, env = "KEYWAY_RELAY_MAX_STREAMS_PER_CONNECTION", default_value_t = crate::DEFAULT_MAX_STREAMS_PER_CONNECTION)]
    pub max_streams_per_connection: u32,
    /// New connections per second from one source IP address.
    #[arg(long, env = "KEYWAY_RELAY_NEW_CONNECTIONS_PER_IP", default_value_t = crate::DEFAULT_NEW_CONNECTIONS_PER_IP)]
    pub new_connections_per_ip: f64,
    /// Connections one source IP address may open back to back.
    #[arg(long, env = "KEYWAY_RELAY_NEW_CONNECTIONS_BURST", default_value_t = crate::DEFAULT_NEW_CONNECTIONS_BURST)]
    pub new_connections_burst: u32,
    /// IPv6 prefix length that counts as one source for the two limits above (1-128; IPv4
    /// sources are single addresses).
    #[arg(long, env = "KEYWAY_RELAY_NEW_CONNECTIONS_IPV6_PREFIX", default_value_t = crate::DEFAULT_NEW_CONNECTIONS_IPV6_PREFIX)]
    pub new_connections_ipv6_prefix: u8,
    /// Payload bytes per second per key (app or hub), both directions and all sessions together.
    #[arg(long, env = "KEYWAY_RELAY_BYTES_PER_SECOND_PER_KEY", default_value_t = crate::DEFAULT_BYTES_PER_SECOND_PER_KEY)]
    pub bytes_per_second_per_key: u64,
    /// Time a QUIC handshake may take.
    #[arg(long, env = "KEYWAY_RELAY_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,
    /// A connection must carry something authorized (a registration, a session), or be an app
    /// a registered hub lists, this long after its handshake (and at every review after) to stay.
    #[arg(long, env = "KEYWAY_RELAY_UNAUTHORIZED_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub unauthorized_grace: Duration,
    /// Connections of unknown keys not yet authorized, all sources together.
    #[arg(long, env = "KEYWAY_RELAY_MAX_UNAUTHORIZED_CONNECTIONS", default_value_t = crate::DEFAULT_MAX_UNAUTHORIZED_CONNECTIONS)]
    pub max_unauthorized_connections: u32,
    /// Idle app connections one registered hub's allow-list may keep on the relay.
    #[arg(long, env = "KEYWAY_RELAY_MAX_IDLE_APPS_PER_HUB", default_value_t = crate::DEFAULT_MAX_IDLE_APPS_PER_HUB)]
    pub max_idle_apps_per_hub: u32,
    /// A session with no byte in either direction for this long is cut.
    #[arg(long, env = "KEYWAY_RELAY_IDLE_SESSION_TIMEOUT", default_value = "1h", value_parser = parse_duration)]
    pub idle_session_timeout: Duration,
    /// New connections per second (all sources) above which QUIC address validation (Retry) is
    /// required.
    #[arg(long, env = "KEYWAY_RELAY_RETRY_THRESHOLD", default_value_t = crate::DEFAULT_RETRY_THRESHOLD)]
    pub retry_threshold: u32,
    /// Datagrams held (all sources) for channels not live yet: an app's first flight, sent
    /// with its channel request, waits here up to 250 ms for the authorization.
    #[arg(long, env = "KEYWAY_RELAY_MAX_HELD_DATAGRAMS", default_value_t = crate::DEFAULT_MAX_HELD_DATAGRAMS)]
    pub max_held_datagrams: u32,
    /// QUIC handshakes worked on at once; over it a new connection is refused before any
    /// handshake work (QUIC CONNECTION_REFUSED; the hub connector retries within seconds). 0: no limit.
    #[arg(long, env = "KEYWAY_RELAY_MAX_HANDSHAKES_IN_FLIGHT", default_value_t = crate::DEFAULT_MAX_HANDSHAKES_IN_FLIGHT)]
    pub max_handshakes_in_flight: u32,
    /// QUIC handshakes one source (an IPv4 address or IPv6 prefix) may have in flight. 0: no limit.
    #[arg(long, env = "KEYWAY_RELAY_MAX_HANDSHAKES_PER_SOURCE", default_value_t = crate::DEFAULT_MAX_HANDSHAKES_PER_SOURCE)]
    pub max_handshakes_per_source: u32,
    /// Pairing sessions one hub carries at once (anyone knowing its name and key may pair
    /// while its window is open). 0: no limit.
    #[arg(long, env = "KEYWAY_RELAY_MAX_PAIRING_SESSIONS_PER_HUB", default_value_t = crate::DEFAULT_MAX_PAIRING_SESSIONS_PER_HUB)]
    pub max_pairing_sessions_per_hub: u32,
    /// Handshakes in flight from which a new connection must prove its address (QUIC Retry)
    /// first. 0: never on this ground.
    #[arg(long, env = "KEYWAY_RELAY_VALIDATE_ABOVE_HANDSHAKES_IN_FLIGHT", default_value_t = crate::DEFAULT_VALIDATE_ABOVE_HANDSHAKES_IN_FLIGHT)]
    pub validate_above_handshakes_in_flight: u32,
    /// Time a handshake from an address not proven by a Retry may take. 0: handshake_timeout.
    #[arg(long, env = "KEYWAY_RELAY_UNVALIDATED_HANDSHAKE_TIMEOUT", default_value = "3s", value_parser = parse_duration)]
    pub unvalidated_handshake_timeout: Duration,
}

impl LimitArgs {
    /// The library's [`Limits`] these flags describe.
    pub fn to_limits(&self) -> Limits {
        Limits {
            max_hubs: self.max_hubs,
            max_sessions_per_hub: self.max_sessions_per_hub,
            max_sessions_per_app: self.max_sessions_per_app,
            max_streams_per_connection: self.max_streams_per_connection,
            new_connections_per_ip: self.new_connections_per_ip,
            new_connections_burst: self.new_connections_burst,
            new_connections_ipv6_prefix: self.new_connections_ipv6_prefix,
            bytes_per_second_per_key: self.bytes_per_second_per_key,
            handshake_timeout: self.handshake_timeout,
            unauthorized_grace: self.unauthorized_grace,
            max_unauthorized_connections: self.max_unauthorized_connections,
            max_idle_apps_per_hub: self.max_idle_apps_per_hub,
            idle_session_timeout: self.idle_session_timeout,
            retry_threshold: self.retry_threshold,
            max_held_datagrams: self.max_held_datagrams,
            max_handshakes_in_flight: self.max_handshakes_in_flight,
            max_handshakes_per_source: self.max_handshakes_per_source,
            max_pairing_sessions_per_hub: self.max_pairing_sessions_per_hub,
            validate_above_handshakes_in_flight: self.validate_above_handshakes_in_flight,
            unvalidated_handshake_timeout: self.unvalidated_handshake_timeout,
        }
    }
}

#[derive(Debug, Args)]
pub struct PubkeyArgs {
    /// The relay's private key file.
    #[arg(long, env = "KEYWAY_RELAY_KEY", default_value = "keyway-relay.key", value_name = "FILE")]
    pub key: PathBuf,
}

#[derive(Debug, Args)]
pub struct HealthArgs {
    /// TOML file of `run` (only `metrics_listen` is read from it).
    #[arg(long, env = "KEYWAY_RELAY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The relay's metrics listener, as given to `run` (a wildcard address is probed on
    /// loopback).
    #[arg(long, env = "KEYWAY_RELAY_METRICS_LISTEN", default_value = crate::DEFAULT_METRICS_LISTEN)]
    pub metrics_listen: SocketAddr,
    /// How long the whole check may take.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// Header of a freshly created `authorized_hubs`.
const HUBS_HEADER: &str = "\
# Keyway relay: authorized_hubs
#
# One hub per line:  NAME KEY
#   NAME  the hub's name as apps ask for it: 1-63 characters of a-z, 0-9 and '-'
#   KEY   the hub's public key, as `keyway-hub` prints it (starts with \"kw\")
# Example:
#   home kw<52 more characters>
#
# Blank lines and lines starting with '#' are ignored. The relay re-reads this file within a
# second of a change (and on SIGHUP); hubs no longer listed are disconnected.
";

/// Why the command line and config file do not make a valid invocation.
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Clap(#[from] clap::Error),
}

/// Parses `args` (with `args[0]` the program name) together with the config file they or
/// `KEYWAY_RELAY_CONFIG` name. Precedence: command line, environment, file, defaults. Reads
/// the environment but never changes it, so it can run again at reload time.
pub fn parse_args(args: &[OsString]) -> Result<Cli, ArgsError> {
    let command = Cli::command();
    let matches = command.clone().try_get_matches_from(args)?;
    let Some(path) = config_path(args, "KEYWAY_RELAY_CONFIG") else {
        return Ok(Cli::from_arg_matches(&matches)?);
    };
    let Some((sub_name, sub_matches)) = matches.subcommand() else {
        return Ok(Cli::from_arg_matches(&matches)?);
    };
    let Some(sub) = command.find_subcommand(sub_name) else {
        return Ok(Cli::from_arg_matches(&matches)?);
    };
    let text =
        std::fs::read_to_string(&path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
    let mut extra: Vec<OsString> = Vec::new();
    // `health` and `status` read the file `run` is given, keeping only the options they have.
    let file_sub = if matches!(sub_name, "health" | "status") {
        command.find_subcommand("run").unwrap_or(sub)
    } else {
        sub
    };
    for (var, value) in config_env(file_sub, &path, &text)? {
        let Some(arg) = sub.get_arguments().find(|a| a.get_env().is_some_and(|e| e == var.as_str())) else {
            continue;
        };
        let given = matches!(
            sub_matches.value_source(arg.get_id().as_str()),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        );
        let Some(long) = arg.get_long() else { continue };
        if given {
            continue;
        }
        if arg.get_action().takes_values() {
            extra.push(format!("--{long}={value}").into());
        } else if value == "true" {
            extra.push(format!("--{long}").into());
        }
    }
    // The file's options go right after the subcommand, where its flags are accepted.
    let at = args
        .iter()
        .enumerate()
        .skip(1)
        .find(|(_, a)| a.to_str() == Some(sub_name))
        .map_or(args.len(), |(i, _)| i + 1);
    let mut full: Vec<OsString> = args.get(..at).unwrap_or(args).to_vec();
    full.extend(extra);
    full.extend(args.get(at..).unwrap_or_default().iter().cloned());
    Ok(Cli::try_parse_from(full)?)
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    let cli = match parse_args(&args) {
        Ok(cli) => cli,
        Err(ArgsError::Clap(e)) => e.exit(),
        Err(e) => {
            eprintln!("keyway-relay: {e}");
            return ExitCode::from(2);
        }
    };
    let log_format = cli.log.log_format;
    init_logging(log_format);
    let result = match cli.command {
        Command::Pubkey(args) => pubkey(&args),
        Command::Health(args) => health(&args),
        Command::Status(args) => status(&args),
        Command::Run(run_args) => match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
            Ok(rt) => {
                let result = rt.block_on(run(*run_args, args));
                // By now the relay has drained and closed every connection; what is left is
                // state for the OS to take back. Dropping the runtime would first drop each
                // task and connection one by one: 4.8 s between "relay stopped" and a
                // successor's "relay listening" at 100 000 hubs, during which nobody can bind
                // the port and every hub dials a dead one. The process exits right after.
                std::mem::forget(rt);
                result
            }
            Err(e) => Err(e.into()),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report_exit_error("keyway-relay", log_format, e.as_ref());
            ExitCode::FAILURE
        }
    }
}

fn pubkey(args: &PubkeyArgs) -> anyhow::Result<()> {
    let identity = Identity::load(&args.key)?;
    println!("{}", identity.public_key());
    Ok(())
}

fn health(args: &HealthArgs) -> anyhow::Result<()> {
    let addr = keyway_proto::ops_http::probe_address(args.metrics_listen);
    let body = keyway_proto::ops_http::probe_health(addr, args.timeout)?;
    println!("healthy: http://{addr}/healthz answered 200 {body}");
    Ok(())
}

fn status(args: &StatusArgs) -> anyhow::Result<()> {
    let path = keyway_proto::admin::socket_path(&args.key);
    let text = keyway_proto::admin::query(&path, Duration::from_secs(5))?;
    if args.json {
        print!("{text}");
        return Ok(());
    }
    let value: serde_json::Value = serde_json::from_str(&text)?;
    if let Some(fields) = value.as_object() {
        for (key, value) in fields {
            println!("{key}: {value}");
        }
    }
    Ok(())
}

/// What the admin socket reports from: fixed facts and the live numbers.
struct StatusSource {
    stats: std::sync::Arc<crate::RelayStats>,
    listen: SocketAddr,
    key: keyway_proto::PublicKey,
    metrics: Option<SocketAddr>,
    started: SystemTime,
}

/// What `status --json` shows: one object, built when asked.
fn status_json(source: &StatusSource) -> String {
    let stats = &source.stats;
    let hits: serde_json::Map<String, serde_json::Value> =
        crate::LimitKind::ALL.iter().map(|l| (l.label().to_owned(), stats.limit_hits(*l).into())).collect();
    let started_unix = source.started.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "listen": source.listen.to_string(),
        "public_key": source.key.to_string(),
        "fingerprint": source.key.fingerprint().to_string(),
        "metrics": source.metrics.map(|a| a.to_string()),
        "started_unix": started_unix,
        "hubs_online": stats.hubs_connected(),
        "channels_active": stats.channels_active(),
        "connections_active": stats.connections_active(),
        "connections_unauthorized": stats.connections_unauthorized(),
        "hub_registrations": stats.registrations(),
        "sessions_opened": stats.sessions_opened(),
        "refusals": stats.refusals_total(),
        "bytes_app_to_hub": stats.bytes_app_to_hub(),
        "bytes_hub_to_app": stats.bytes_hub_to_app(),
        "limit_hits": hits,
    })
    .to_string()
}

/// Creates the hubs file with its header if it does not exist. Returns whether it was created.
fn ensure_hubs_file(path: &Path) -> anyhow::Result<bool> {
    use std::io::Write;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::OpenOptions::new().write(true).create_new(true).open(path) {
        Ok(mut file) => {
            file.write_all(HUBS_HEADER.as_bytes())?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(anyhow::anyhow!("cannot create hubs file {}: {e}", path.display())),
    }
}

async fn run(args: RunArgs, argv: Vec<OsString>) -> anyhow::Result<()> {
    let (identity, created_key) = Identity::load_or_create(&args.key)?;
    if created_key {
        info!(path = %args.key.display(), "created a new relay key");
    }
    let (policy, created_hubs) = if args.open {
        (NamePolicy::Open { state_file: Some(args.state.clone()) }, false)
    } else {
        let created = ensure_hubs_file(&args.hubs)?;
        (NamePolicy::Closed { hubs_file: args.hubs.clone() }, created)
    };
    let mut config = RelayConfig::new(args.listen, identity, policy);
    config.idle_timeout = args.idle_timeout;
    config.session_open_timeout = args.session_open_timeout;
    config.limits = args.limits.to_limits();
    config.metrics_listen = (!args.no_metrics).then_some(args.metrics_listen);
    config.drain_timeout = args.drain_timeout;
    config.node_id = args.node_id.clone();
    if let Some(url) = &args.cluster {
        let mut cluster = crate::cluster::ClusterConfig::new(crate::cluster::StoreConfig::Redis(url.clone()));
        cluster.advertise = args.advertise;
        cluster.lease = args.cluster_lease;
        config.cluster = Some(cluster);
    }
    let relay = Relay::start(config).await?;
    // Signal handlers go in before the banner: whoever waits for the banner (an operator's
    // script, a test) may send SIGHUP at once, and without a handler that would kill the relay.
    #[cfg(unix)]
    let signals = {
        use tokio::signal::unix::{signal, SignalKind};
        (signal(SignalKind::hangup()), signal(SignalKind::terminate()))
    };
    #[cfg(not(unix))]
    let signals = ();
    print_banner(&args, &relay, created_key, created_hubs);
    // `keyway-relay status` finds this relay by its key file. Another relay already serving
    // that socket (cluster nodes sharing one key file in one directory) keeps it.
    #[cfg(unix)]
    let _admin = {
        let source = StatusSource {
            stats: relay.stats(),
            listen: relay.local_addr(),
            key: relay.public_key(),
            metrics: relay.metrics_addr(),
            started: SystemTime::now(),
        };
        match keyway_proto::admin::serve(keyway_proto::admin::socket_path(&args.key), move || {
            status_json(&source)
        }) {
            Ok(admin) => Some(admin),
            Err(e) => {
                warn!("no admin socket, `keyway-relay status` will not find this relay: {e}");
                None
            }
        }
    };
    #[cfg(unix)]
    keyway_proto::sd_notify::ready(&format!("listening on {} (UDP)", relay.local_addr()));
    let config_file = config_path(&argv, "KEYWAY_RELAY_CONFIG");
    serve(relay, argv, config_file, signals).await;
    Ok(())
}

/// What an operator and a hub owner need, on stdout (logs go to stderr).
fn print_banner(args: &RunArgs, relay: &RelayHandle, created_key: bool, created_hubs: bool) {
    let key = relay.public_key();
    let addr = relay.local_addr();
    let reachable =
        if addr.ip().is_unspecified() { format!("<relay-host>:{}", addr.port()) } else { addr.to_string() };
    println!("keyway-relay listening on {addr} (UDP)");
    if let Some(metrics) = relay.metrics_addr() {
        println!("metrics: http://{metrics}/metrics health: http://{metrics}/healthz");
    }
    println!("relay public key: {key}");
    if let Some(node) = &args.node_id {
        // What a load balancer that routes on connection IDs needs (docs/operating.md).
        let server = keyway_proto::cid::ServerId::of_node(node.as_str());
        match &args.cluster {
            Some(url) => println!("cluster node {node} (store {url}), connection-id server id {server}"),
            None => println!("node {node}, connection-id server id {server}"),
        }
    }
    println!("relay fingerprint: {}", key.fingerprint());
    if created_key {
        println!("(new key written to {})", args.key.display());
    }
    if args.open {
        println!(
            "name policy: open; the first hub key to register a free name keeps it (bindings in {})",
            args.state.display()
        );
    } else {
        let hubs = args.hubs.display();
        let created = if created_hubs { ", just created" } else { "" };
        println!("name policy: closed; hubs are admitted by {hubs}{created}");
        println!("to admit a hub, add its name and key as one line, e.g.:");
        println!("add to {hubs}: <name> <hub-public-key>");
    }
    println!("then on the hub run:");
    println!(
        "keyway-hub run --relay {reachable} --relay-key {key} --name <name> --key hub.key \
         --apps authorized_apps --forward 127.0.0.1:<service-port>"
    );
}

/// Re-reads the command line and config file and applies what can change at run time: the
/// limits, and `authorized_hubs`. On any error the running configuration stays in force.
fn reload(relay: &RelayHandle, argv: &[OsString], why: &str) {
    match parse_args(argv) {
        Ok(Cli { command: Command::Run(args), .. }) => match relay.set_limits(args.limits.to_limits()) {
            Ok(()) => info!("limits reloaded ({why})"),
            Err(e) => error!("limits not reloaded ({why}): {e}"),
        },
        Ok(_) => {}
        Err(e) => error!("config not reloaded ({why}); keeping the running one: {e}"),
    }
    match relay.reload() {
        Ok(()) => info!("authorized hubs reloaded ({why})"),
        Err(e) => error!("authorized hubs not reloaded ({why}): {e}"),
    }
}

/// What a file looked like, to notice changes by polling.
fn stamp(path: &Path) -> Option<(Option<SystemTime>, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok(), meta.len()))
}

/// The SIGHUP and SIGTERM streams, installed before the banner (see `run`).
#[cfg(unix)]
type Signals = (std::io::Result<tokio::signal::unix::Signal>, std::io::Result<tokio::signal::unix::Signal>);
#[cfg(not(unix))]
type Signals = ();

/// Serves until SIGTERM or ctrl-c (then drains and shuts down gracefully); SIGHUP, or a change
/// of the config file, reloads the limits and the hubs file.
async fn serve(relay: RelayHandle, argv: Vec<OsString>, config_file: Option<PathBuf>, signals: Signals) {
    let mut last = config_file.as_deref().and_then(stamp);
    let mut poll = tokio::time::interval(CONFIG_FILE_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let config_changed = |last: &mut Option<(Option<SystemTime>, u64)>| {
        let now = config_file.as_deref().and_then(stamp);
        let changed = now != *last;
        *last = now;
        changed
    };
    #[cfg(unix)]
    {
        match signals {
            (Ok(mut hup), Ok(mut term)) => loop {
                tokio::select! {
                    _ = hup.recv() => reload(&relay, &argv, "SIGHUP"),
                    _ = poll.tick() => if config_changed(&mut last) {
                        reload(&relay, &argv, "config file changed");
                    },
                    _ = term.recv() => {
                        info!("SIGTERM: draining");
                        break;
                    }
                    _ = tokio::signal::ctrl_c() => break,
                }
            },
            (Err(e), _) | (_, Err(e)) => {
                warn!("cannot install signal handlers: {e}; only ctrl-c stops the relay");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (&argv, &mut last, &mut poll, config_changed, signals);
        let _ = tokio::signal::ctrl_c().await;
    }
    #[cfg(unix)]
    keyway_proto::sd_notify::stopping();
    relay.shutdown().await;
}
