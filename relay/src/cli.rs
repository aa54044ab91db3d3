//! The `keyway-relay` command line: `run` and `pubkey`.
//!
//! Every flag also comes from an environment variable (`KEYWAY_RELAY_<FLAG>`) or from a TOML
//! file named by `--config` (keys are flag names), in that order of precedence after the command
//! line. With no flags at all, `keyway-relay run` starts with embedded defaults, creating its
//! key and an empty `authorized_hubs` in the working directory, and prints what a hub owner
//! needs to connect.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand};
use keyway_proto::cli::{apply_config_file, init_logging, parse_duration};
use keyway_proto::Identity;
use tracing::{error, info};

use crate::{NamePolicy, Relay, RelayConfig, RelayHandle};

/// Keyway relay: hubs dial out to it, apps reach them by name; it forwards bytes it cannot read.
#[derive(Debug, Parser)]
#[command(name = "keyway-relay", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay.
    Run(RunArgs),
    /// Print the relay's public key (the one hubs and apps pin).
    Pubkey(PubkeyArgs),
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
}

#[derive(Debug, Args)]
pub struct PubkeyArgs {
    /// The relay's private key file.
    #[arg(long, env = "KEYWAY_RELAY_KEY", default_value = "keyway-relay.key", value_name = "FILE")]
    pub key: PathBuf,
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

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Err(e) = apply_config_file(&Cli::command(), &args, "KEYWAY_RELAY_CONFIG") {
        eprintln!("keyway-relay: {e}");
        return ExitCode::from(2);
    }
    let cli = Cli::parse_from(args);
    init_logging();
    let result = match cli.command {
        Command::Pubkey(args) => pubkey(&args),
        Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(run(args))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keyway-relay: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn pubkey(args: &PubkeyArgs) -> anyhow::Result<()> {
    let identity = Identity::load(&args.key)?;
    println!("{}", identity.public_key());
    Ok(())
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

async fn run(args: RunArgs) -> anyhow::Result<()> {
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
    let relay = Relay::start(config).await?;
    print_banner(&args, &relay, created_key, created_hubs);
    serve(relay).await;
    Ok(())
}

/// What an operator and a hub owner need, on stdout (logs go to stderr).
fn print_banner(args: &RunArgs, relay: &RelayHandle, created_key: bool, created_hubs: bool) {
    let key = relay.public_key();
    let addr = relay.local_addr();
    let reachable =
        if addr.ip().is_unspecified() { format!("<relay-host>:{}", addr.port()) } else { addr.to_string() };
    println!("keyway-relay listening on {addr} (UDP)");
    println!("relay public key: {key}");
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

/// Serves until SIGTERM or ctrl-c (then shuts down gracefully); SIGHUP reloads the hubs file.
async fn serve(relay: RelayHandle) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (signal(SignalKind::hangup()), signal(SignalKind::terminate())) {
            (Ok(mut hup), Ok(mut term)) => loop {
                tokio::select! {
                    _ = hup.recv() => match relay.reload() {
                        Ok(()) => info!("reloaded on SIGHUP"),
                        Err(e) => error!("reload on SIGHUP failed: {e}"),
                    },
                    _ = term.recv() => break,
                    _ = tokio::signal::ctrl_c() => break,
                }
            },
            (Err(e), _) | (_, Err(e)) => {
                error!("cannot install signal handlers: {e}; only ctrl-c stops the relay");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    relay.shutdown().await;
}
