//! The `keyway-hub` command line: `run` (the connector daemon), `pair` (open a pairing
//! window and print its one-time code), `apps list` / `apps revoke`, and `pubkey`.
//!
//! `pair` and `apps revoke` talk to a running `run` only through files next to
//! `authorized_apps` (the window file, and `authorized_apps` itself), which the connector
//! polls every 250 ms: no socket to secure, and they work the same whether or not the
//! connector is running.
//!
//! Every flag of `run` can also come from an environment variable (`KEYWAY_HUB_*`) or from a
//! TOML file named by `--config` / `KEYWAY_HUB_CONFIG`, layered by
//! [`keyway_proto::cli::apply_config_file`] — convenient for systemd units and containers.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use keyway_proto::cli::parse_duration;
use keyway_proto::pairing::PairingCode;
use keyway_proto::{HubName, Identity, PublicKey};

use crate::HubConfig;

/// Keep a hub reachable through a Keyway relay.
#[derive(Debug, Parser)]
#[command(name = "keyway-hub", version, about)]
pub struct Cli {
    /// TOML file holding options of the subcommand (keys named like its flags).
    #[arg(long, global = true, env = "KEYWAY_HUB_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub log: keyway_proto::cli::LogArgs,
    #[command(subcommand)]
    pub command: Command,
}

impl keyway_proto::cli::LogFormatted for Cli {
    fn log_format(&self) -> keyway_proto::cli::LogFormat {
        self.log.log_format
    }
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the connector: hold the tunnel and forward authorized sessions.
    Run(Box<RunArgs>),
    /// Print the hub's public key.
    Pubkey(PubkeyArgs),
    /// Show what the running connector (the one using this key file) is doing: its relays,
    /// the apps connected now, the last errors. Asks its local admin socket (`KEY.sock`, 0600).
    Status(StatusArgs),
    /// Open a pairing window and print a one-time pairing code (URI and QR code) for an app.
    Pair(Box<PairArgs>),
    /// List or revoke authorized apps.
    #[command(subcommand)]
    Apps(AppsCommand),
}

#[derive(Debug, clap::Args)]
pub struct PairArgs {
    /// Relay address as apps should dial it (HOST:PORT, UDP). If several are given (as `run`
    /// accepts), the code names the first.
    #[arg(long, env = "KEYWAY_HUB_RELAY", required = true, value_delimiter = ',')]
    pub relay: Vec<String>,
    /// The relay's public key (the first one if several are given).
    #[arg(long, env = "KEYWAY_HUB_RELAY_KEY", required = true, value_delimiter = ',')]
    pub relay_key: Vec<PublicKey>,
    /// The hub's name at the relay.
    #[arg(long, env = "KEYWAY_HUB_NAME")]
    pub name: HubName,
    /// The hub's key file.
    #[arg(long, env = "KEYWAY_HUB_KEY")]
    pub key: PathBuf,
    /// The authorized_apps file of the running connector (the window file goes next to it).
    #[arg(long, env = "KEYWAY_HUB_APPS")]
    pub apps: PathBuf,
    /// Label of the new app in authorized_apps, e.g. "Anna's phone".
    #[arg(long, default_value = "")]
    pub label: String,
    /// How long the code stays valid.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub ttl: Duration,
    /// Print the code and return at once instead of waiting for the app to pair.
    #[arg(long)]
    pub no_wait: bool,
    /// Do not print the QR code.
    #[arg(long)]
    pub no_qr: bool,
    #[command(flatten)]
    pub run_only: RunOnlyOptions,
}

/// Options of `run` that `pair` accepts and ignores, so that `pair --config hub.toml` works
/// with the same file (and environment) as the connector.
#[derive(Debug, clap::Args)]
pub struct RunOnlyOptions {
    #[arg(long, env = "KEYWAY_HUB_FORWARD", hide = true)]
    pub forward: Option<String>,
    #[arg(long, env = "KEYWAY_HUB_KEEP_ALIVE", hide = true)]
    pub keep_alive: Option<String>,
    #[arg(long, env = "KEYWAY_HUB_IDLE_TIMEOUT", hide = true)]
    pub idle_timeout: Option<String>,
    #[arg(long, env = "KEYWAY_HUB_PING_INTERVAL", hide = true)]
    pub ping_interval: Option<String>,
    #[arg(long, env = "KEYWAY_HUB_CONNECT_TIMEOUT", hide = true)]
    pub connect_timeout: Option<String>,
    #[arg(long, env = "KEYWAY_HUB_BACKOFF_MIN", hide = true)]
    pub backoff_min: Option<String>,
    #[arg(long, env = "KEYWAY_HUB_BACKOFF_MAX", hide = true)]
    pub backoff_max: Option<String>,
    #[arg(long, env = "KEYWAY_HUB_PROXY_PROTOCOL", hide = true)]
    pub proxy_protocol: Option<String>,
    #[arg(long, env = "KEYWAY_HUB_METRICS_LISTEN", hide = true)]
    pub metrics_listen: Option<String>,
    #[arg(long, env = "KEYWAY_HUB_MAX_CONNECTIONS_PER_APP", hide = true)]
    pub max_connections_per_app: Option<String>,
    #[arg(long, env = "KEYWAY_HUB_MAX_STREAMS_PER_APP", hide = true)]
    pub max_streams_per_app: Option<String>,
    #[arg(long, env = "KEYWAY_HUB_SESSION_TICKETS", hide = true)]
    pub session_tickets: Option<String>,
    #[arg(long, env = "KEYWAY_HUB_MAX_SERVICE_CONNECTS", hide = true)]
    pub max_service_connects: Option<String>,
}

/// `keyway-hub apps …`
#[derive(Debug, Subcommand)]
pub enum AppsCommand {
    /// List authorized apps (key, fingerprint, label).
    List(AppsFileArg),
    /// Revoke an app by key or label: the running connector drops its sessions (and the
    /// relay's) within a poll interval, and every later attempt is refused.
    Revoke(RevokeArgs),
}

#[derive(Debug, clap::Args)]
pub struct AppsFileArg {
    /// The authorized_apps file.
    #[arg(long, env = "KEYWAY_HUB_APPS")]
    pub apps: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct RevokeArgs {
    /// The authorized_apps file.
    #[arg(long, env = "KEYWAY_HUB_APPS")]
    pub apps: PathBuf,
    /// The app's key (kw…) or its exact label.
    pub app: String,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Relay address (HOST:PORT, UDP). Repeat it (or separate addresses with commas) to keep a
    /// tunnel to each of several relays, so that one relay going down loses nothing; several
    /// addresses with one key are the nodes of one relay cluster (one tunnel, moving on failure).
    #[arg(long, env = "KEYWAY_HUB_RELAY", required = true, value_delimiter = ',')]
    pub relay: Vec<String>,
    /// The relay's public key (pinned). With several relays: one key per --relay, in the same
    /// order, or a single key for all of them (one relay cluster).
    #[arg(long, env = "KEYWAY_HUB_RELAY_KEY", required = true, value_delimiter = ',')]
    pub relay_key: Vec<PublicKey>,
    /// The hub's name at the relay.
    #[arg(long, env = "KEYWAY_HUB_NAME")]
    pub name: HubName,
    /// The hub's key file (created with mode 0600 if missing).
    #[arg(long, env = "KEYWAY_HUB_KEY")]
    pub key: PathBuf,
    /// The authorized_apps file (`KEY [LABEL]` lines; re-read on change; missing = none).
    #[arg(long, env = "KEYWAY_HUB_APPS")]
    pub apps: PathBuf,
    /// The local TCP service to expose, e.g. 127.0.0.1:8123.
    #[arg(long, env = "KEYWAY_HUB_FORWARD")]
    pub forward: SocketAddr,
    /// QUIC keep-alive interval (NAT bindings often expire after 30 s).
    #[arg(long, env = "KEYWAY_HUB_KEEP_ALIVE", default_value = "15s", value_parser = parse_duration)]
    pub keep_alive: Duration,
    /// QUIC idle timeout.
    #[arg(long, env = "KEYWAY_HUB_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Interval of the application-level ping; no answer within it means reconnect.
    #[arg(long, env = "KEYWAY_HUB_PING_INTERVAL", default_value = "20s", value_parser = parse_duration)]
    pub ping_interval: Duration,
    /// Time allowed for the relay to answer the handshake and the registration.
    #[arg(long, env = "KEYWAY_HUB_CONNECT_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Smallest reconnect delay.
    #[arg(long, env = "KEYWAY_HUB_BACKOFF_MIN", default_value = "200ms", value_parser = parse_duration)]
    pub backoff_min: Duration,
    /// Largest reconnect delay.
    #[arg(long, env = "KEYWAY_HUB_BACKOFF_MAX", default_value = "30s", value_parser = parse_duration)]
    pub backoff_max: Duration,
    /// Send a PROXY protocol v2 header (the app's observed address) to the local service
    /// before each session's bytes. Only enable it if the service expects one.
    #[arg(long, env = "KEYWAY_HUB_PROXY_PROTOCOL")]
    pub proxy_protocol: bool,
    /// Serve Prometheus /metrics and /healthz (200 while a tunnel is registered) on this TCP
    /// address, e.g. 127.0.0.1:9465. Off unless given; keep it on loopback or a private network.
    #[arg(long, env = "KEYWAY_HUB_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Cap on one app's concurrent end-to-end connections to this hub (0: none).
    #[arg(long, env = "KEYWAY_HUB_MAX_CONNECTIONS_PER_APP", default_value_t = crate::load::DEFAULT_MAX_CONNECTIONS_PER_APP)]
    pub max_connections_per_app: usize,
    /// Cap on one app's concurrent streams (forwarded connections) to this hub; the streams
    /// over it are refused at once with "over limit" (0: none).
    #[arg(long, env = "KEYWAY_HUB_MAX_STREAMS_PER_APP", default_value_t = crate::load::DEFAULT_MAX_STREAMS_PER_APP)]
    pub max_streams_per_app: usize,
    /// Sessions kept for single-use TLS tickets, which let a returning app resume (and send
    /// 0-RTT early data it marked safe to repeat); about apps × 2. 0 turns resumption off.
    #[arg(long, env = "KEYWAY_HUB_SESSION_TICKETS", default_value_t = crate::config::DEFAULT_SESSION_TICKETS)]
    pub session_tickets: usize,
    /// Connections to the local service opened and not yet answered (for at most 50 ms) at
    /// once; more wait their turn (never refused), so a burst cannot overflow a small listen
    /// backlog (0: no bound).
    #[arg(long, env = "KEYWAY_HUB_MAX_SERVICE_CONNECTS", default_value_t = crate::service::DEFAULT_MAX_SERVICE_CONNECTS)]
    pub max_service_connects: usize,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The running connector's key file, as given to `run`; its admin socket is `FILE.sock`.
    #[arg(long, env = "KEYWAY_HUB_KEY")]
    pub key: PathBuf,
    /// Print the status as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct PubkeyArgs {
    /// The hub's key file.
    #[arg(long, env = "KEYWAY_HUB_KEY")]
    pub key: PathBuf,
}

/// What `status --json` shows (fields: docs/operating-reference.md).
fn status_json(source: &crate::report::StatusSource) -> String {
    let report = source.report();
    let error = |status: &crate::TunnelStatus| match status {
        crate::TunnelStatus::Refused { .. } => Some(status.to_string()),
        _ => None,
    };
    let relays: Vec<serde_json::Value> = report
        .relays
        .iter()
        .map(|r| {
            serde_json::json!({
                "address": r.address.to_string(),
                "registered": r.status == crate::TunnelStatus::Registered,
                "status": r.status.to_string(),
                "last_error": error(&r.status),
                "registrations": r.registrations,
                "reconnects": r.reconnects,
                "channels": r.channels,
            })
        })
        .collect();
    let apps: Vec<serde_json::Value> = report
        .apps
        .iter()
        .map(|a| {
            serde_json::json!({
                "key": a.key, "fingerprint": a.fingerprint, "label": a.label,
                "connections": a.connections, "streams": a.streams,
            })
        })
        .collect();
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "name": report.name,
        "public_key": report.public_key,
        "registered": report.status == crate::TunnelStatus::Registered,
        "status": report.status.to_string(),
        "forward": report.forward.to_string(),
        "relays": relays,
        "apps": apps,
        "sessions_active": report.sessions_active,
        "sessions_accepted": report.sessions_accepted,
        "sessions_refused": report.sessions_refused,
        "service": {
            "connects_in_flight": report.service_in_flight,
            "connects_waiting": report.service_waiting,
            "unanswered": report.service_unanswered,
        },
    })
    .to_string()
}

/// Resolves `HOST:PORT` (or an address literal) to the first address it names.
pub fn resolve(addr: &str) -> anyhow::Result<SocketAddr> {
    Ok(keyway_proto::cli::resolve(addr)?)
}

/// Parses `args` after layering the config file. Exits on `--help` or a usage error.
pub fn parse(args: Vec<OsString>) -> anyhow::Result<Cli> {
    // `status` reads the file `run` is given (it needs only `key` from it).
    let sub = args.iter().skip(1).position(|a| !a.to_string_lossy().starts_with('-')).map(|i| i + 1);
    let mut file_args = args.clone();
    if let Some(slot) = sub.and_then(|i| file_args.get_mut(i)).filter(|a| *a == "status") {
        *slot = "run".into();
    }
    keyway_proto::cli::apply_config_file(&Cli::command(), &file_args, "KEYWAY_HUB_CONFIG")?;
    Ok(Cli::parse_from(args))
}

/// Pairs relay addresses with their keys by position; a single key applies to every relay.
pub fn pair_relays<'a, A>(relays: &'a [A], keys: &[PublicKey]) -> anyhow::Result<Vec<(&'a A, PublicKey)>> {
    match (relays.len(), keys) {
        (0, _) => anyhow::bail!("no relay given (--relay)"),
        (_, []) => anyhow::bail!("no relay key given (--relay-key)"),
        (_, [key]) => Ok(relays.iter().map(|r| (r, *key)).collect()),
        (n, keys) if n == keys.len() => Ok(relays.iter().zip(keys.iter().copied()).collect()),
        (n, keys) => anyhow::bail!(
            "{n} relays but {} relay keys: give one key per relay, in the same order (or one key for all)",
            keys.len()
        ),
    }
}

impl RunArgs {
    /// The connector config these flags describe (resolves the relay addresses).
    pub fn to_config(&self, identity: Identity) -> anyhow::Result<HubConfig> {
        let mut relays = Vec::new();
        for (relay, key) in pair_relays(&self.relay, &self.relay_key)? {
            relays.push((resolve(relay)?, key));
        }
        let mut relays = relays.into_iter();
        let Some((first_addr, first_key)) = relays.next() else { anyhow::bail!("no relay given (--relay)") };
        let mut config = HubConfig::new(
            first_addr,
            first_key,
            self.name.clone(),
            identity,
            self.apps.clone(),
            self.forward,
        );
        for (addr, key) in relays {
            config = config.with_relay(addr, key);
        }
        config.keep_alive = self.keep_alive;
        config.idle_timeout = self.idle_timeout;
        config.ping_interval = self.ping_interval;
        config.connect_timeout = self.connect_timeout;
        config.backoff_min = self.backoff_min;
        config.backoff_max = self.backoff_max;
        config.proxy_protocol = self.proxy_protocol;
        config.metrics_listen = self.metrics_listen;
        config.max_connections_per_app = self.max_connections_per_app;
        config.max_streams_per_app = self.max_streams_per_app;
        config.max_service_connects = self.max_service_connects;
        config.session_tickets = self.session_tickets;
        Ok(config)
    }
}

/// The `keyway-hub` binary.
pub fn main() -> ExitCode {
    keyway_proto::cli::run_main("keyway-hub", parse(std::env::args_os().collect()), run)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Pubkey(args) => {
            let identity = Identity::load(&args.key)?;
            println!("{}", identity.public_key());
            Ok(())
        }
        Command::Pair(args) => pair(*args),
        Command::Status(args) => {
            let path = keyway_proto::admin::socket_path(&args.key);
            let text = keyway_proto::admin::query(&path, Duration::from_secs(5))?;
            if args.json {
                print!("{text}");
            } else {
                let value: serde_json::Value = serde_json::from_str(&text)?;
                for (key, value) in value.as_object().into_iter().flatten() {
                    println!("{key}: {value}");
                }
            }
            Ok(())
        }
        Command::Apps(AppsCommand::List(args)) => {
            let apps = crate::apps::list_apps(&args.apps)?;
            if apps.is_empty() {
                eprintln!("no authorized apps in {} (pair one with `keyway-hub pair`)", args.apps.display());
            }
            for app in apps {
                println!("{}  {}  {}", app.key, app.key.fingerprint(), app.label);
            }
            Ok(())
        }
        Command::Apps(AppsCommand::Revoke(args)) => {
            let selector = crate::apps::AppSelector::parse(&args.app);
            for app in crate::apps::revoke_apps(&args.apps, &selector)? {
                println!("revoked {} ({}) {}", app.key, app.key.fingerprint(), app.label);
            }
            eprintln!(
                "a running connector cuts this app's sessions within {} ms and the relay refuses it from then on",
                crate::connector::POLL_INTERVAL.as_millis()
            );
            Ok(())
        }
        Command::Run(args) => {
            let (identity, created) = Identity::load_or_create(&args.key)?;
            let key = identity.public_key();
            if created {
                println!("created hub key {} (mode 0600)", args.key.display());
            }
            println!("hub public key: {key} (fingerprint {})", key.fingerprint());
            let owner = if args.relay.len() > 1 { "owner of each relay" } else { "relay owner" };
            println!("the {owner} adds this line to authorized_hubs:\n{} {key}", args.name);
            let key_file = args.key.clone();
            let config = args.to_config(identity)?;
            let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            runtime.block_on(async move {
                let hub = crate::start(config).await?;
                if let Some(addr) = hub.metrics_addr() {
                    println!("metrics: http://{addr}/metrics health: http://{addr}/healthz");
                }
                // `keyway-hub status` finds this connector by its key file.
                #[cfg(unix)]
                let _admin = {
                    let source = hub.status_source();
                    match keyway_proto::admin::serve(keyway_proto::admin::socket_path(&key_file), move || {
                        status_json(&source)
                    }) {
                        Ok(admin) => Some(admin),
                        Err(e) => {
                            tracing::warn!(
                                "no admin socket, `keyway-hub status` will not find this connector: {e}"
                            );
                            None
                        }
                    }
                };
                // Ready once started: the tunnels connect (and reconnect) on their own.
                #[cfg(unix)]
                keyway_proto::sd_notify::ready("connecting to its relays");
                keyway_proto::cli::shutdown_signal().await;
                #[cfg(unix)]
                keyway_proto::sd_notify::stopping();
                hub.shutdown().await;
                Ok(())
            })
        }
    }
}

fn pair(args: PairArgs) -> anyhow::Result<()> {
    let identity = Identity::load(&args.key)?;
    let Some((relay, relay_key)) = pair_relays(&args.relay, &args.relay_key)?.into_iter().next() else {
        anyhow::bail!("no relay given (--relay)")
    };
    let before: Vec<PublicKey> = crate::apps::list_apps(&args.apps)?.into_iter().map(|a| a.key).collect();
    let secret = crate::pairing::open_window(&args.apps, &args.label, args.ttl)?;
    let code = PairingCode {
        relay: relay.clone(),
        relay_key,
        hub: args.name.clone(),
        hub_key: identity.public_key(),
        secret,
    };
    let window = crate::pairing::window_path(&args.apps);
    eprintln!(
        "pairing window open for {} (label {:?}); on the app run: keyway pair CODE --key app.key",
        humantime::format_duration(args.ttl),
        args.label
    );
    // The code goes to stdout (and only there): it is the one place the secret exists.
    println!("{code}");
    if !args.no_qr {
        match render_qr(&code) {
            Ok(qr) => eprintln!("{qr}"),
            Err(e) => eprintln!("(no QR code: {e})"),
        }
    }
    if args.no_wait {
        return Ok(());
    }
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let waited = async {
            loop {
                tokio::time::sleep(crate::connector::POLL_INTERVAL).await;
                match crate::pairing::read_window(&window)? {
                    Some(w) if w.is_open() => continue,
                    Some(_) => {
                        crate::pairing::close_window(&window)?;
                        anyhow::bail!(
                            "the pairing window closed without a pairing (expired or too many wrong secrets)"
                        );
                    }
                    None => {
                        let now = crate::apps::list_apps(&args.apps)?;
                        match now.into_iter().find(|a| !before.contains(&a.key)) {
                            Some(app) => {
                                eprintln!("paired: {} ({}) {}", app.key, app.key.fingerprint(), app.label);
                                return Ok(());
                            }
                            None => anyhow::bail!("the pairing window was closed without a pairing"),
                        }
                    }
                }
            }
        };
        tokio::select! {
            result = waited => result,
            _ = keyway_proto::cli::shutdown_signal() => {
                crate::pairing::close_window(&window)?;
                anyhow::bail!("interrupted; pairing window closed")
            }
        }
    })
}

/// The pairing code as a terminal QR code (two modules per character cell, so it fits).
/// Part of the command line, not of the library: an embedder shows the code its own way.
pub fn render_qr(code: &PairingCode) -> Result<String, qrcode::types::QrError> {
    let qr = qrcode::QrCode::new(code.to_string().as_bytes())?;
    Ok(qr
        .render::<qrcode::render::unicode::Dense1x2>()
        .dark_color(qrcode::render::unicode::Dense1x2::Light)
        .light_color(qrcode::render::unicode::Dense1x2::Dark)
        .quiet_zone(true)
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> PublicKey {
        Identity::from_seed([seed; 32]).public_key()
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_flags_parse_with_defaults() {
        let rk = key(1).to_string();
        let cli = Cli::try_parse_from([
            "keyway-hub",
            "run",
            "--relay",
            "127.0.0.1:4433",
            "--relay-key",
            &rk,
            "--name",
            "home",
            "--key",
            "hub.key",
            "--apps",
            "apps",
            "--forward",
            "127.0.0.1:8123",
            "--ping-interval",
            "5s",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else { panic!("not run") };
        let config = run.to_config(Identity::from_seed([2; 32])).unwrap();
        assert_eq!(config.ping_interval, Duration::from_secs(5));
        assert_eq!(config.keep_alive, Duration::from_secs(15));
        assert_eq!(config.backoff_min, Duration::from_millis(200));
        assert_eq!(config.backoff_max, Duration::from_secs(30));
        assert_eq!(config.name.as_str(), "home");
        assert_eq!(config.relay_key, key(1));
        assert!(config.validate().is_ok());
    }

    #[test]
    fn config_file_keys_map_to_run_flags() {
        let cmd = Cli::command();
        let run = cmd.find_subcommand("run").unwrap();
        let env = keyway_proto::cli::config_env(
            run,
            std::path::Path::new("hub.toml"),
            "relay = \"relay.example:443\"\nkeep_alive = \"10s\"\nping-interval = \"20s\"\nname = \"home\"\n",
        )
        .unwrap();
        assert!(env.contains(&("KEYWAY_HUB_RELAY".into(), "relay.example:443".into())));
        assert!(env.contains(&("KEYWAY_HUB_KEEP_ALIVE".into(), "10s".into())));
        assert!(env.contains(&("KEYWAY_HUB_PING_INTERVAL".into(), "20s".into())));
        assert!(env.contains(&("KEYWAY_HUB_NAME".into(), "home".into())));
        let err = keyway_proto::cli::config_env(run, std::path::Path::new("hub.toml"), "keepalive = \"1s\"")
            .unwrap_err();
        assert!(err.to_string().contains("keep_alive"), "{err}");
    }

    #[test]
    fn pair_accepts_the_connectors_config_file() {
        let cmd = Cli::command();
        let pair = cmd.find_subcommand("pair").unwrap();
        let text = "relay = \"r:1\"\nname = \"home\"\nforward = \"127.0.0.1:8123\"\nkeep_alive = \"10s\"\nproxy_protocol = true\n";
        let env = keyway_proto::cli::config_env(pair, std::path::Path::new("hub.toml"), text).unwrap();
        assert!(env.contains(&("KEYWAY_HUB_RELAY".into(), "r:1".into())));
        let rk = key(1).to_string();
        let cli = Cli::try_parse_from([
            "keyway-hub",
            "pair",
            "--relay",
            "r:1",
            "--relay-key",
            &rk,
            "--name",
            "home",
            "--key",
            "k",
            "--apps",
            "a",
            "--label",
            "Anna's phone",
            "--ttl",
            "2m",
        ])
        .unwrap();
        let Command::Pair(p) = cli.command else { panic!("not pair") };
        assert_eq!((p.ttl, p.label.as_str(), p.no_wait), (Duration::from_secs(120), "Anna's phone", false));
    }

    fn run_args(extra: &[&str]) -> Result<Box<RunArgs>, clap::Error> {
        let mut args = vec![
            "keyway-hub",
            "run",
            "--name",
            "home",
            "--key",
            "k",
            "--apps",
            "a",
            "--forward",
            "127.0.0.1:1",
        ];
        args.extend_from_slice(extra);
        let cli = Cli::try_parse_from(args)?;
        let Command::Run(run) = cli.command else { panic!("not run") };
        Ok(run)
    }

    #[test]
    fn several_relays_pair_with_their_keys_by_position() {
        let (k1, k2, k3) = (key(1).to_string(), key(3).to_string(), key(4).to_string());
        let keys = format!("{k1},{k2}");
        // Repeated flags and comma-separated lists (what a TOML list becomes) mix freely.
        let run = run_args(&[
            "--relay",
            "127.0.0.1:4433,127.0.0.1:4434",
            "--relay",
            "127.0.0.1:4435",
            "--relay-key",
            &keys,
            "--relay-key",
            &k3,
            "--metrics-listen",
            "127.0.0.1:9465",
        ])
        .unwrap();
        let config = run.to_config(Identity::from_seed([2; 32])).unwrap();
        let relays: Vec<(String, PublicKey)> =
            config.relays().iter().map(|r| (r.addr.to_string(), r.key)).collect();
        assert_eq!(
            relays,
            vec![
                ("127.0.0.1:4433".to_owned(), key(1)),
                ("127.0.0.1:4434".to_owned(), key(3)),
                ("127.0.0.1:4435".to_owned(), key(4)),
            ]
        );
        assert_eq!(config.metrics_listen, Some("127.0.0.1:9465".parse().unwrap()));
        assert!(config.validate().is_ok());

        // One key for every relay (relays sharing an identity).
        let run = run_args(&["--relay", "127.0.0.1:4433", "--relay", "127.0.0.1:4434", "--relay-key", &k1])
            .unwrap();
        let config = run.to_config(Identity::from_seed([2; 32])).unwrap();
        assert!(config.relays().iter().all(|r| r.key == key(1)));
        assert_eq!(config.metrics_listen, None);

        // Counts that do not pair up, and the same relay twice, are errors.
        let run =
            run_args(&["--relay", "127.0.0.1:1,127.0.0.1:2,127.0.0.1:3", "--relay-key", &keys]).unwrap();
        let err = run.to_config(Identity::from_seed([2; 32])).unwrap_err().to_string();
        assert!(err.contains("3 relays but 2 relay keys"), "{err}");
        let run = run_args(&["--relay", "127.0.0.1:1,127.0.0.1:1", "--relay-key", &k1]).unwrap();
        let config = run.to_config(Identity::from_seed([2; 32])).unwrap();
        assert!(config.validate().unwrap_err().to_string().contains("listed twice"));
        assert!(run_args(&["--relay-key", &k1]).is_err(), "--relay is required");
    }

    #[test]
    fn toml_lists_of_relays_become_comma_separated_variables() {
        let cmd = Cli::command();
        let run = cmd.find_subcommand("run").unwrap();
        let text = "relay = [\"a.example:4433\", \"b.example:4433\"]\nrelay_key = [\"kw1\", \"kw2\"]\nmetrics_listen = \"127.0.0.1:9465\"\n";
        let env = keyway_proto::cli::config_env(run, std::path::Path::new("hub.toml"), text).unwrap();
        assert!(env.contains(&("KEYWAY_HUB_RELAY".into(), "a.example:4433,b.example:4433".into())));
        assert!(env.contains(&("KEYWAY_HUB_RELAY_KEY".into(), "kw1,kw2".into())));
        assert!(env.contains(&("KEYWAY_HUB_METRICS_LISTEN".into(), "127.0.0.1:9465".into())));
        // `pair` reads the same file.
        let pair = cmd.find_subcommand("pair").unwrap();
        assert!(keyway_proto::cli::config_env(pair, std::path::Path::new("hub.toml"), text).is_ok());
    }

    #[test]
    fn bad_timer_combinations_are_rejected() {
        let rk = key(1).to_string();
        let cli = Cli::try_parse_from([
            "keyway-hub",
            "run",
            "--relay",
            "127.0.0.1:4433",
            "--relay-key",
            &rk,
            "--name",
            "home",
            "--key",
            "k",
            "--apps",
            "a",
            "--forward",
            "127.0.0.1:1",
            "--keep-alive",
            "90s",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else { panic!("not run") };
        let config = run.to_config(Identity::from_seed([2; 32])).unwrap();
        assert!(config.validate().unwrap_err().to_string().contains("keep-alive"));
    }

    #[test]
    fn qr_renders() {
        let code = PairingCode {
            relay: "127.0.0.1:4433".into(),
            relay_key: keyway_proto::Identity::from_seed([1; 32]).public_key(),
            hub: keyway_proto::HubName::new("home").unwrap(),
            hub_key: keyway_proto::Identity::from_seed([2; 32]).public_key(),
            secret: vec![1; 16],
        };
        let qr = render_qr(&code).unwrap();
        assert!(qr.lines().count() > 20, "{qr}");
    }
}
