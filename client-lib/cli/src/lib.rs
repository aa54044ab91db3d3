//! The `keyway` command line: `keygen`, `pubkey`, `pair` and `forward`.
//!
//! A package of its own, over the `keyway-client` library, so that apps embedding the library
//! compile none of the command-line dependencies (clap, anyhow, tracing-subscriber). It is a
//! library too, so tests can check its flags (`Cli::command()`) without running it.
//!
//! Every flag of `forward` can also come from an environment variable (`KEYWAY_*`) or from a
//! TOML file named by `--config` / `KEYWAY_CONFIG` (keys named like the flags), layered by
//! [`keyway_proto::cli::apply_config_file`]. Output meant for scripts (public keys) goes to
//! stdout; everything for humans goes to stderr.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing))]

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use keyway_client::{Client, ClientConfig};
use keyway_proto::cli::{parse_duration, resolve, shutdown_signal};
use keyway_proto::{HubName, Identity, PublicKey};

/// Reach a Keyway hub by name through a relay.
#[derive(Debug, Parser)]
// `about` is spelled out: it is the text `keyway --help` has always shown (it was the
// description of the keyway-client package, which used to hold this binary).
#[command(
    name = "keyway",
    version,
    about = "Keyway client library: an end-to-end encrypted byte stream to a hub, by name, through a relay"
)]
pub struct Cli {
    /// TOML file holding options of the subcommand (keys named like its flags).
    #[arg(long, global = true, env = "KEYWAY_CONFIG")]
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
    /// Create a new app key (PKCS#8 PEM, mode 0600) and print its public key.
    Keygen(KeygenArgs),
    /// Print the public key of a key file.
    Pubkey(PubkeyArgs),
    /// Listen on a local TCP address and forward each connection to a hub's service.
    Forward(ForwardArgs),
    /// Pair this app key with a hub using the code `keyway-hub pair` printed, and remember
    /// the hub (next to the key, in KEY.hubs.toml) so `forward --hub NAME` needs nothing else.
    Pair(PairArgs),
}

#[derive(Debug, clap::Args)]
pub struct PairArgs {
    /// The pairing code (a keyway://pair?... URI), or `-` to read it from stdin (keeps the
    /// one-time secret out of the process list and shell history).
    pub code: String,
    /// This app's key file (created with mode 0600 if missing).
    #[arg(long, env = "KEYWAY_KEY")]
    pub key: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct KeygenArgs {
    /// Where to write the new key; an existing file is never overwritten.
    #[arg(long, env = "KEYWAY_OUT")]
    pub out: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct PubkeyArgs {
    /// The key file.
    pub file: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct ForwardArgs {
    /// Relay address (HOST:PORT, UDP). Default: what pairing with the hub recorded. Repeated
    /// (or comma-separated) with one --relay-key: the nodes of one relay cluster, the first
    /// asked first and the others when it does not answer.
    #[arg(long, env = "KEYWAY_RELAY", value_delimiter = ',')]
    pub relay: Vec<String>,
    /// The relay's public key (pinned). Default: what pairing with the hub recorded.
    #[arg(long, env = "KEYWAY_RELAY_KEY")]
    pub relay_key: Option<PublicKey>,
    /// Name of the hub to reach.
    #[arg(long, env = "KEYWAY_HUB")]
    pub hub: HubName,
    /// The hub's public key (pinned). Default: what pairing with the hub recorded.
    #[arg(long, env = "KEYWAY_HUB_KEY")]
    pub hub_key: Option<PublicKey>,
    /// This app's key file (create one with `keyway keygen`).
    #[arg(long, env = "KEYWAY_KEY")]
    pub key: PathBuf,
    /// Local TCP address to listen on, e.g. 127.0.0.1:8123.
    #[arg(long, env = "KEYWAY_LISTEN")]
    pub listen: SocketAddr,
    /// Give up on a relay that does not answer within this time (UDP may be blocked).
    #[arg(long, env = "KEYWAY_CONNECT_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// QUIC keep-alive interval towards the relay.
    #[arg(long, env = "KEYWAY_KEEP_ALIVE", default_value = "15s", value_parser = parse_duration)]
    pub keep_alive: Duration,
    /// QUIC idle timeout towards the relay.
    #[arg(long, env = "KEYWAY_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Send each connection's first bytes as 0-RTT early data when a new end-to-end connection
    /// resumes: one round trip saved, but a request may then run twice (a lost answer, a
    /// retry). Only for services whose first request is safe to repeat (HTTP GETs).
    #[arg(long, env = "KEYWAY_EARLY_DATA")]
    pub early_data: bool,
}

/// Whether a config file should be layered in: always for `forward`, and for other
/// subcommands only when `--config` is on the command line (so a `KEYWAY_CONFIG` meant for
/// `forward` does not break `keyway keygen`).
fn wants_config(args: &[OsString]) -> bool {
    let sub = args.iter().skip(1).map(|a| a.to_string_lossy()).find(|a| !a.starts_with('-'));
    sub.as_deref() == Some("forward")
        || args
            .iter()
            .any(|a| a.to_string_lossy() == "--config" || a.to_string_lossy().starts_with("--config="))
}

/// Parses `args` after layering the config file. Exits on `--help` or a usage error.
pub fn parse(args: Vec<OsString>) -> anyhow::Result<Cli> {
    if wants_config(&args) {
        keyway_proto::cli::apply_config_file(&Cli::command(), &args, "KEYWAY_CONFIG")?;
    }
    Ok(Cli::parse_from(args))
}

/// The `keyway` binary.
pub fn main() -> ExitCode {
    keyway_proto::cli::run_main("keyway", parse(std::env::args_os().collect()), run)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Keygen(args) => keygen(&args.out),
        Command::Pubkey(args) => {
            let identity = Identity::load(&args.file)?;
            println!("{}", identity.public_key());
            Ok(())
        }
        Command::Forward(args) => {
            let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            runtime.block_on(forward(args))
        }
        Command::Pair(args) => {
            let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            runtime.block_on(pair(args))
        }
    }
}

async fn pair(args: PairArgs) -> anyhow::Result<()> {
    let text = if args.code == "-" {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).context("cannot read the pairing code from stdin")?;
        line
    } else {
        args.code.clone()
    };
    let code: keyway_client::PairingCode = text.parse()?;
    let (identity, created) = Identity::load_or_create(&args.key)?;
    let key = identity.public_key();
    if created {
        eprintln!("created app key {} (mode 0600)", args.key.display());
    }
    eprintln!("pairing app key {} with hub {} via relay {}", key.fingerprint(), code.hub, code.relay);
    let paired = keyway_client::pair(&code, identity).await?;
    let store_path = keyway_client::known_hubs::path_for_key(&args.key);
    let mut store = keyway_client::known_hubs::KnownHubs::load(&store_path)?;
    store.insert(paired.clone());
    store.save()?;
    eprintln!(
        "paired with hub {} (key {}); recorded in {}\nnow run: keyway forward --hub {} --key {} --listen 127.0.0.1:PORT",
        paired.hub,
        paired.hub_key.fingerprint(),
        store_path.display(),
        paired.hub,
        args.key.display()
    );
    Ok(())
}

/// Fills the relay and hub key of `args` from the app key's known hubs where not given.
fn resolve_target(args: &ForwardArgs) -> anyhow::Result<(String, PublicKey, PublicKey)> {
    if let (Some(relay), Some(relay_key), Some(hub_key)) = (args.relay.first(), args.relay_key, args.hub_key)
    {
        return Ok((relay.clone(), relay_key, hub_key));
    }
    let store_path = keyway_client::known_hubs::path_for_key(&args.key);
    let store = keyway_client::known_hubs::KnownHubs::load(&store_path)?;
    let known = store.get(&args.hub).with_context(|| {
        format!(
            "hub {} is not in {}: pair with it first (keyway pair CODE --key {}) or pass \
             --relay, --relay-key and --hub-key",
            args.hub,
            store_path.display(),
            args.key.display()
        )
    })?;
    Ok((
        args.relay.first().cloned().unwrap_or_else(|| known.relay.clone()),
        args.relay_key.unwrap_or(known.relay_key),
        args.hub_key.unwrap_or(known.hub_key),
    ))
}

fn keygen(out: &Path) -> anyhow::Result<()> {
    let identity = Identity::generate()?;
    identity.save(out)?;
    let key = identity.public_key();
    eprintln!("wrote {} (fingerprint {}); public key:", out.display(), key.fingerprint());
    println!("{key}");
    Ok(())
}

async fn forward(args: ForwardArgs) -> anyhow::Result<()> {
    let identity = Identity::load(&args.key).with_context(|| {
        format!("cannot load the app key (create one with: keyway keygen --out {})", args.key.display())
    })?;
    let (relay, relay_key, hub_key) = resolve_target(&args)?;
    let relay = resolve(&relay)?;
    let mut config = ClientConfig::new(identity, relay, relay_key);
    config.other_nodes = args.relay.iter().skip(1).map(|r| resolve(r)).collect::<Result<_, _>>()?;
    config.connect_timeout = args.connect_timeout;
    config.keep_alive = args.keep_alive;
    config.idle_timeout = args.idle_timeout;
    let client = Client::new(config)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(
        listen = %listener.local_addr()?,
        hub = %args.hub,
        hub_key = %hub_key.fingerprint(),
        relay = %relay,
        app_key = %client.public_key(),
        "forwarding"
    );
    let options = keyway_client::forward::Options { early_data: args.early_data };
    keyway_client::forward::run_with(client.clone(), args.hub, hub_key, listener, options, shutdown_signal())
        .await?;
    client.close().await;
    Ok(())
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
    fn forward_flags_parse_with_defaults() {
        let (rk, hk) = (key(1).to_string(), key(2).to_string());
        let cli = Cli::try_parse_from([
            "keyway",
            "forward",
            "--relay",
            "127.0.0.1:4433",
            "--relay-key",
            &rk,
            "--hub",
            "home",
            "--hub-key",
            &hk,
            "--key",
            "app.key",
            "--listen",
            "127.0.0.1:8123",
            "--keep-alive",
            "10s",
        ])
        .unwrap();
        let Command::Forward(f) = cli.command else { panic!("not forward") };
        assert_eq!(f.relay_key, Some(key(1)));
        assert_eq!(f.hub.as_str(), "home");
        assert_eq!(f.keep_alive, Duration::from_secs(10));
        assert_eq!(f.connect_timeout, Duration::from_secs(5));
        assert_eq!(f.idle_timeout, Duration::from_secs(60));
    }

    #[test]
    fn bad_keys_and_names_are_usage_errors() {
        let hk = key(2).to_string();
        let base = ["keyway", "forward", "--relay", "r:1", "--key", "k", "--listen", "127.0.0.1:1"];
        let with = |extra: &[&str]| {
            let mut args: Vec<&str> = base.to_vec();
            args.extend_from_slice(extra);
            Cli::try_parse_from(args)
        };
        assert!(with(&["--relay-key", "nope", "--hub", "home", "--hub-key", &hk]).is_err());
        assert!(with(&["--relay-key", &hk, "--hub", "Home!", "--hub-key", &hk]).is_err());
        assert!(with(&["--relay-key", &hk, "--hub", "home", "--hub-key", &hk]).is_ok());
        assert!(with(&["--hub", "home"]).is_ok(), "relay and keys may come from pairing");
    }

    #[test]
    fn forward_without_relay_needs_a_paired_hub() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("app.key");
        let key_arg = key_file.to_str().unwrap();
        let args = |extra: &[&str]| {
            let mut a =
                vec!["keyway", "forward", "--hub", "home", "--key", key_arg, "--listen", "127.0.0.1:1"];
            a.extend_from_slice(extra);
            let Command::Forward(f) = Cli::try_parse_from(a).unwrap().command else { panic!("not forward") };
            f
        };
        let err = resolve_target(&args(&[])).unwrap_err().to_string();
        assert!(err.contains("pair with it first"), "{err}");
        let mut store =
            keyway_client::known_hubs::KnownHubs::load(&keyway_client::known_hubs::path_for_key(&key_file))
                .unwrap();
        store.insert(keyway_client::PairedHub {
            relay: "127.0.0.1:9".into(),
            relay_key: key(1),
            hub: "home".parse().unwrap(),
            hub_key: key(2),
        });
        store.save().unwrap();
        assert_eq!(resolve_target(&args(&[])).unwrap(), ("127.0.0.1:9".into(), key(1), key(2)));
        let rk = key(3).to_string();
        assert_eq!(resolve_target(&args(&["--relay-key", &rk])).unwrap().1, key(3), "flags win");
    }

    #[test]
    fn config_file_keys_map_to_forward_flags() {
        let cmd = Cli::command();
        let forward = cmd.find_subcommand("forward").unwrap();
        let env = keyway_proto::cli::config_env(
            forward,
            Path::new("k.toml"),
            "relay = \"relay.example:443\"\nhub_key = \"x\"\nkeep_alive = \"20s\"\n",
        )
        .unwrap();
        assert!(env.contains(&("KEYWAY_RELAY".into(), "relay.example:443".into())));
        assert!(env.contains(&("KEYWAY_HUB_KEY".into(), "x".into())));
        assert!(env.contains(&("KEYWAY_KEEP_ALIVE".into(), "20s".into())));
        assert!(keyway_proto::cli::config_env(forward, Path::new("k.toml"), "relai = \"x\"").is_err());
    }

    #[test]
    fn config_is_only_layered_for_forward_or_when_asked() {
        let args = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        assert!(wants_config(&args(&["keyway", "forward"])));
        assert!(!wants_config(&args(&["keyway", "keygen", "--out", "x"])));
        assert!(wants_config(&args(&["keyway", "--config=c.toml", "keygen"])));
    }
}
