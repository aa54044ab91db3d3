//! Command-line plumbing shared by `keyway-relay`, `keyway-hub` and `keyway`.
//!
//! Every flag can be given three ways, with this precedence: command line, then environment
//! variable, then the TOML file named by `--config`. Rather than keep a second, hand-written
//! struct in sync with each command's flags, [`apply_config_file`] maps each key of the file
//! onto the environment variable of the flag with the same name (`keep_alive` or `keep-alive`
//! → `--keep-alive` → `KEYWAY_HUB_KEEP_ALIVE`) unless that variable is already set, and clap
//! then parses as usual. A key that names no flag is an error, so typos do not pass silently.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a config file could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// (The message alone, without toml's multi-line snippet of the file.)
    #[error("config file {path} is not valid TOML: {}", source.message())]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("config file {path}: unknown option {key:?} (valid options: {valid})")]
    UnknownKey { path: PathBuf, key: String, valid: String },
    #[error("config file {path}: option {key:?} must be a string, number, boolean or list of strings")]
    BadValue { path: PathBuf, key: String },
}

/// Finds `--config FILE` (or `--config=FILE`) in `args`, else the `env_var` variable.
pub fn config_path(args: &[OsString], env_var: &str) -> Option<PathBuf> {
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let arg = arg.to_string_lossy();
        if arg == "--config" {
            return iter.next().map(PathBuf::from);
        }
        if let Some(path) = arg.strip_prefix("--config=") {
            return Some(PathBuf::from(path));
        }
    }
    std::env::var_os(env_var).map(PathBuf::from)
}

/// The environment assignments a config file implies for `command` (a subcommand's
/// `clap::Command`): `(VARIABLE, value)` pairs. Pure, so it is testable without touching
/// the process environment.
pub fn config_env(
    command: &clap::Command,
    path: &Path,
    text: &str,
) -> Result<Vec<(String, String)>, ConfigError> {
    let table: toml::Table =
        text.parse().map_err(|source: toml::de::Error| ConfigError::Parse { path: path.into(), source })?;
    let mut out = Vec::new();
    for (key, value) in table {
        let long = key.replace('_', "-");
        let arg = command
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()) && a.get_env().is_some() && long != "config");
        let Some(env) = arg.and_then(|a| a.get_env()) else {
            let valid: Vec<String> = command
                .get_arguments()
                .filter(|a| a.get_env().is_some())
                .filter_map(|a| a.get_long().map(|l| l.replace('-', "_")))
                .filter(|l| l != "config")
                .collect();
            return Err(ConfigError::UnknownKey { path: path.into(), key, valid: valid.join(", ") });
        };
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Array(items) => {
                // Lists become comma-separated; flags that take lists use `value_delimiter = ','`.
                let strings: Option<Vec<String>> =
                    items.into_iter().map(|v| v.as_str().map(str::to_owned)).collect();
                strings
                    .ok_or_else(|| ConfigError::BadValue { path: path.into(), key: key.clone() })?
                    .join(",")
            }
            _ => return Err(ConfigError::BadValue { path: path.into(), key }),
        };
        out.push((env.to_string_lossy().into_owned(), text));
    }
    Ok(out)
}

/// Reads the config file (if one is named) and exports its options as environment variables
/// that are not already set. Call it before clap parses, while the process is single-threaded.
pub fn apply_config_file(
    command: &clap::Command,
    args: &[OsString],
    env_var: &str,
) -> Result<(), ConfigError> {
    let Some(path) = config_path(args, env_var) else { return Ok(()) };
    let text =
        std::fs::read_to_string(&path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
    // The subcommand whose flags the file configures is the first non-flag argument.
    let sub = args.iter().skip(1).map(|a| a.to_string_lossy()).find(|a| !a.starts_with('-'));
    let target = sub.as_deref().and_then(|name| command.find_subcommand(name)).unwrap_or(command);
    for (var, value) in config_env(target, &path, &text)? {
        if std::env::var_os(&var).is_none() {
            // Safe here: called at start-up before any other thread exists.
            std::env::set_var(var, value);
        }
    }
    Ok(())
}

/// A flag or config value that is not a duration (clap prints it after the flag's name).
#[derive(Debug, thiserror::Error)]
#[error("{text:?} is not a duration like 15s or 500ms: {source}")]
pub struct DurationError {
    pub text: String,
    pub source: humantime::DurationError,
}

/// Parses durations such as `15s`, `500ms`, `2m` for flags and config files.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    humantime::parse_duration(text).map_err(|source| DurationError { text: text.to_owned(), source })
}

/// An address flag that names no usable address. The message names the flag's text; the cause
/// (the resolver's error) is the source, so `BIN: error` prints both.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("cannot resolve {addr:?} (expected HOST:PORT)")]
    Lookup { addr: String, source: std::io::Error },
    #[error("{addr:?} resolves to no address")]
    NoAddress { addr: String },
}

/// Resolves `HOST:PORT` (or an address literal) to the first address it names.
pub fn resolve(addr: &str) -> Result<SocketAddr, ResolveError> {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .map_err(|source| ResolveError::Lookup { addr: addr.to_owned(), source })?
        .next()
        .ok_or_else(|| ResolveError::NoAddress { addr: addr.to_owned() })
}

/// Completes on ctrl-c or SIGTERM: how `keyway forward` and `keyway-hub run` learn to stop.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutting down");
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event (colored on a terminal).
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `fields`, `spans`), from the
    /// first line on, for journald, Loki or any collector.
    Json,
}

/// The `--log-format` flag every binary takes (global: before or after the subcommand).
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct LogArgs {
    /// Log lines on stderr: `text` for people, `json` (one object per line) for collectors.
    #[arg(long, global = true, env = "KEYWAY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Logs to stderr in `format`; the level comes from `RUST_LOG` (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).try_init(),
        LogFormat::Json => builder.json().with_current_span(false).try_init(),
    };
}

/// Says why the process is exiting with an error: `BIN: error` as text, or one more JSON log
/// line (level ERROR) when logs are JSON, so that every line stays parseable.
pub fn report_exit_error(bin: &str, format: LogFormat, error: &(dyn std::error::Error + 'static)) {
    match format {
        LogFormat::Text => eprintln!("{bin}: {}", error_report(error)),
        LogFormat::Json => tracing::error!(error = %error_report(error), "{bin} exiting"),
    }
}

/// A parsed command line that names its log format.
pub trait LogFormatted {
    fn log_format(&self) -> LogFormat;
}

/// The `main` of a CLI: a parse error exits 2, otherwise logging starts and `run` decides:
/// success exits 0, an error exits 1. Errors are reported as `BIN: error` with their causes
/// ([`error_report`]), or as a JSON log line ([`report_exit_error`]).
pub fn run_main<C: LogFormatted, E: AsRef<dyn std::error::Error + Send + Sync + 'static>>(
    bin: &str,
    parsed: Result<C, E>,
    run: impl FnOnce(C) -> Result<(), E>,
) -> std::process::ExitCode {
    let cli = match parsed {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("{bin}: {}", error_report(e.as_ref()));
            return std::process::ExitCode::from(2);
        }
    };
    let format = cli.log_format();
    init_logging(format);
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            report_exit_error(bin, format, e.as_ref());
            std::process::ExitCode::FAILURE
        }
    }
}

/// One line for a human: the error and its causes joined by `: `, each cause said once.
///
/// Many of our error messages already name their cause (so that `to_string()` alone, as an
/// app shows it, is complete) *and* keep it as `#[source]` (so that programs can inspect it).
/// Printing the whole chain, as `anyhow`'s `{:#}` does, would then say the cause twice
/// ("cannot bind …: os error 99: os error 99"); a cause whose text the line already holds is
/// left out.
pub fn error_report(error: &(dyn std::error::Error + 'static)) -> String {
    let mut report = error.to_string();
    let mut cause = error.source();
    while let Some(current) = cause {
        let text = current.to_string();
        if !text.is_empty() && !report.contains(&text) {
            report.push_str(": ");
            report.push_str(&text);
        }
        cause = current.source();
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, Command};

    #[derive(Debug, thiserror::Error)]
    enum Inner {
        #[error("os error 99")]
        Os,
    }

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("cannot bind 10.0.0.1:4433: {0}")]
        Bind(#[source] Inner),
        #[error("cannot bind")]
        BindQuiet(#[source] Inner),
    }

    #[test]
    fn error_report_says_each_cause_once() {
        assert_eq!(error_report(&Outer::Bind(Inner::Os)), "cannot bind 10.0.0.1:4433: os error 99");
        assert_eq!(error_report(&Outer::BindQuiet(Inner::Os)), "cannot bind: os error 99");
        let wrapped = std::io::Error::other(Outer::Bind(Inner::Os));
        assert_eq!(error_report(&wrapped), "cannot bind 10.0.0.1:4433: os error 99");
    }

    fn command() -> Command {
        Command::new("t")
            .arg(Arg::new("config").long("config").env("T_CONFIG"))
            .arg(Arg::new("keep-alive").long("keep-alive").env("T_KEEP_ALIVE"))
            .arg(Arg::new("relay").long("relay").env("T_RELAY"))
    }

    #[test]
    fn keys_map_to_flag_environment_variables() {
        let env =
            config_env(&command(), Path::new("x.toml"), "keep_alive = \"15s\"\nrelay = [\"a\", \"b\"]\n")
                .unwrap();
        assert_eq!(env, vec![("T_KEEP_ALIVE".into(), "15s".into()), ("T_RELAY".into(), "a,b".into())]);
    }

    #[test]
    fn unknown_keys_and_bad_toml_are_named() {
        let err = config_env(&command(), Path::new("x.toml"), "keepalive = 1").unwrap_err();
        assert!(err.to_string().contains("keepalive") && err.to_string().contains("keep_alive"), "{err}");
        assert!(matches!(config_env(&command(), Path::new("x.toml"), "= ="), Err(ConfigError::Parse { .. })));
        assert!(matches!(
            config_env(&command(), Path::new("x.toml"), "config = \"y\""),
            Err(ConfigError::UnknownKey { .. })
        ));
    }

    #[test]
    fn config_path_from_args_or_env() {
        let args: Vec<OsString> = ["bin", "run", "--config", "a.toml"].iter().map(Into::into).collect();
        assert_eq!(config_path(&args, "NOPE_UNSET_VAR"), Some(PathBuf::from("a.toml")));
        let args: Vec<OsString> = ["bin", "--config=b.toml"].iter().map(Into::into).collect();
        assert_eq!(config_path(&args, "NOPE_UNSET_VAR"), Some(PathBuf::from("b.toml")));
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("15s").unwrap(), Duration::from_secs(15));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        let err = parse_duration("soon").unwrap_err();
        assert!(err.to_string().starts_with("\"soon\" is not a duration like 15s or 500ms: "), "{err}");
    }

    #[test]
    fn resolve_accepts_literals_and_names_failures() {
        assert_eq!(resolve("127.0.0.1:4433").unwrap(), "127.0.0.1:4433".parse().unwrap());
        let err = resolve("no-port").unwrap_err();
        assert!(matches!(err, ResolveError::Lookup { .. }), "{err:?}");
        assert_eq!(err.to_string(), "cannot resolve \"no-port\" (expected HOST:PORT)");
        assert!(std::error::Error::source(&err).is_some());
    }
}
