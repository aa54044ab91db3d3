//! The `keyway-hub` command line: `run` (the connector daemon) and `pubkey`.
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
use keyway_proto::{HubName, Identity, PublicKey};

use crate::HubConfig;

/// Keep a hub reachable through a Keyway relay.
#[derive(Debug, Parser)]
#[command(name = "keyway-hub", version, about)]
pub struct Cli {
    /// TOML file holding options of the subcommand (keys named like its flags).
    #[arg(long, global = true, env = "KEYWAY_HUB_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the connector: hold the tunnel and forward authorized sessions.
    Run(Box<RunArgs>),
    /// Print the hub's public key.
    Pubkey(PubkeyArgs),
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Relay address (HOST:PORT, UDP).
    #[arg(long, env = "KEYWAY_HUB_RELAY")]
    pub relay: String,
    /// The relay's public key (pinned).
    #[arg(long, env = "KEYWAY_HUB_RELAY_KEY")]
    pub relay_key: PublicKey,
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
}

#[derive(Debug, clap::Args)]
pub struct PubkeyArgs {
    /// The hub's key file.
    #[arg(long, env = "KEYWAY_HUB_KEY")]
    pub key: PathBuf,
}

/// Resolves `HOST:PORT` (or an address literal) to the first address it names.
pub fn resolve(addr: &str) -> anyhow::Result<SocketAddr> {
    keyway_client::cli::resolve(addr)
}

/// Parses `args` after layering the config file. Exits on `--help` or a usage error.
pub fn parse(args: Vec<OsString>) -> anyhow::Result<Cli> {
    keyway_proto::cli::apply_config_file(&Cli::command(), &args, "KEYWAY_HUB_CONFIG")?;
    Ok(Cli::parse_from(args))
}

impl RunArgs {
    /// The connector config these flags describe (resolves the relay address).
    pub fn to_config(&self, identity: Identity) -> anyhow::Result<HubConfig> {
        let mut config = HubConfig::new(
            resolve(&self.relay)?,
            self.relay_key,
            self.name.clone(),
            identity,
            self.apps.clone(),
            self.forward,
        );
        config.keep_alive = self.keep_alive;
        config.idle_timeout = self.idle_timeout;
        config.ping_interval = self.ping_interval;
        config.connect_timeout = self.connect_timeout;
        config.backoff_min = self.backoff_min;
        config.backoff_max = self.backoff_max;
        Ok(config)
    }
}

/// The `keyway-hub` binary.
pub fn main() -> ExitCode {
    let cli = match parse(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("keyway-hub: {e:#}");
            return ExitCode::from(2);
        }
    };
    keyway_proto::cli::init_logging();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keyway-hub: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Pubkey(args) => {
            let identity = Identity::load(&args.key)?;
            println!("{}", identity.public_key());
            Ok(())
        }
        Command::Run(args) => {
            let (identity, created) = Identity::load_or_create(&args.key)?;
            let key = identity.public_key();
            if created {
                println!("created hub key {} (mode 0600)", args.key.display());
            }
            println!("hub public key: {key} (fingerprint {})", key.fingerprint());
            println!("the relay owner adds this line to authorized_hubs:\n{} {key}", args.name);
            let config = args.to_config(identity)?;
            let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            runtime.block_on(async move {
                let hub = crate::start(config).await?;
                keyway_client::cli::shutdown_signal().await;
                hub.shutdown().await;
                Ok(())
            })
        }
    }
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
}
