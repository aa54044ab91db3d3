//! The library's logs, handed to the app: a [`LogSink`] the app implements, fed by a `tracing`
//! layer installed once in the process.
//!
//! Inside an app nobody reads stderr, so without this the library's `tracing` events (and the
//! `log` records of rustls) are lost. [`set_logger`] installs, on first use, a global `tracing`
//! subscriber (a [`Registry`] with [`ForeignLayer`]) and a `log` bridge, then hands every event
//! at or above the chosen [`LogLevel`] to the sink as a [`LogRecord`]: the level, the target
//! (the Rust module, e.g. `keyway_client::e2e`) and one line, the message followed by the
//! event's fields as `name=value`. Python routes that to its `logging` module (the `keyway`
//! logger), Kotlin and Swift implement the sink themselves.
//!
//! The level is checked before anything is formatted, and `tracing`'s global maximum level
//! follows it, so levels the app did not ask for cost next to nothing. No key material: the
//! library never logs a private key (identities print only their public key or fingerprint),
//! and the bindings' tests capture every line at `Trace` through pairing and a connect and
//! look for the key in every encoding.
//!
//! A sink that throws (a Kotlin exception, a Python exception the layer did not catch) costs
//! that one record: the call is made behind `catch_unwind`, never on a path that could unwind
//! through the network code. A record logged from inside the sink (the sink calling back into
//! Keyway) is dropped rather than recursing.

use std::cell::Cell;
use std::fmt::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};

use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::subscriber::Interest;
use tracing::{Event, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::{Layer, Registry};

use crate::error::KeywayError;

/// How much the library says, most severe first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, uniffi::Enum)]
pub enum LogLevel {
    /// Something failed that the app did not see as an error of its own call.
    Error,
    /// Something went wrong and was handled (a refused dial, a lost connection redialed).
    Warn,
    /// Connections up and down.
    Info,
    /// Each step of a connect (relay dial, channel, end-to-end handshake, resumption).
    Debug,
    /// Everything, including QUIC's and TLS's own events: for chasing a bug.
    Trace,
}

/// One log line from the library.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct LogRecord {
    pub level: LogLevel,
    /// Where it comes from: the Rust module path (`keyway_client::e2e`, `quinn_proto::…`,
    /// `rustls::…`).
    pub target: String,
    /// The message, then the event's fields as `name=value`.
    pub message: String,
}

/// Where the library's log records go; implemented by the app. Called on the library's own
/// threads (and on the caller's, for calls that log before they return): keep it quick, and
/// do not throw (a throwing sink loses the record).
#[uniffi::export(with_foreign)]
pub trait LogSink: Send + Sync + std::fmt::Debug {
    fn log(&self, record: LogRecord);
}

/// Sends the library's log records at `level` and above to `sink`, replacing any sink set
/// before; `None` stops logging. The first call installs the process-wide `tracing`
/// subscriber; that fails (`Internal`) if another library in the process installed one first.
#[uniffi::export]
pub fn set_logger(sink: Option<Arc<dyn LogSink>>, level: LogLevel) -> Result<(), KeywayError> {
    install()?;
    let level = sink.as_ref().map(|_| level);
    *SINK.write().unwrap_or_else(PoisonError::into_inner) = sink;
    set_level(level);
    Ok(())
}

/// The current sink.
static SINK: RwLock<Option<Arc<dyn LogSink>>> = RwLock::new(None);

/// The current level as [`rank`] gives it; 0 when logging is off.
static LEVEL: AtomicU8 = AtomicU8::new(0);

/// The outcome of installing the subscriber, once per process.
static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();

thread_local! {
    /// Set while this thread is inside the sink: a record logged from there is dropped.
    static IN_SINK: Cell<bool> = const { Cell::new(false) };
}

fn install() -> Result<(), KeywayError> {
    let installed = INSTALLED.get_or_init(|| {
        tracing::subscriber::set_global_default(Registry::default().with(ForeignLayer))
            .map_err(|_| "another tracing subscriber is installed in this process".to_owned())?;
        // rustls logs through `log`; its records join the same sink. A `log` logger set by
        // someone else only means those records go there instead.
        let _ = tracing_log::LogTracer::init();
        Ok(())
    });
    installed.clone().map_err(|detail| KeywayError::Internal { detail })
}

/// 1 (`Error`) to 5 (`Trace`); 0 is off.
fn rank(level: &tracing::Level) -> u8 {
    match *level {
        tracing::Level::ERROR => 1,
        tracing::Level::WARN => 2,
        tracing::Level::INFO => 3,
        tracing::Level::DEBUG => 4,
        tracing::Level::TRACE => 5,
    }
}

fn to_tracing(level: LogLevel) -> tracing::Level {
    match level {
        LogLevel::Error => tracing::Level::ERROR,
        LogLevel::Warn => tracing::Level::WARN,
        LogLevel::Info => tracing::Level::INFO,
        LogLevel::Debug => tracing::Level::DEBUG,
        LogLevel::Trace => tracing::Level::TRACE,
    }
}

fn from_tracing(level: &tracing::Level) -> LogLevel {
    match *level {
        tracing::Level::ERROR => LogLevel::Error,
        tracing::Level::WARN => LogLevel::Warn,
        tracing::Level::INFO => LogLevel::Info,
        tracing::Level::DEBUG => LogLevel::Debug,
        tracing::Level::TRACE => LogLevel::Trace,
    }
}

fn set_level(level: Option<LogLevel>) {
    LEVEL.store(level.map_or(0, |l| rank(&to_tracing(l))), Ordering::Relaxed);
    let log_max = match level {
        None => tracing_log::log::LevelFilter::Off,
        Some(LogLevel::Error) => tracing_log::log::LevelFilter::Error,
        Some(LogLevel::Warn) => tracing_log::log::LevelFilter::Warn,
        Some(LogLevel::Info) => tracing_log::log::LevelFilter::Info,
        Some(LogLevel::Debug) => tracing_log::log::LevelFilter::Debug,
        Some(LogLevel::Trace) => tracing_log::log::LevelFilter::Trace,
    };
    tracing_log::log::set_max_level(log_max);
    // Recomputes tracing's global maximum level from `max_level_hint` below.
    tracing::callsite::rebuild_interest_cache();
}

fn level_enabled(level: &tracing::Level) -> bool {
    rank(level) <= LEVEL.load(Ordering::Relaxed)
}

/// The layer that hands events to the current [`LogSink`].
struct ForeignLayer;

impl<S: Subscriber> Layer<S> for ForeignLayer {
    fn register_callsite(&self, _: &'static Metadata<'static>) -> Interest {
        // The level changes at run time: ask `enabled` each time (an atomic load).
        Interest::sometimes()
    }

    fn enabled(&self, metadata: &Metadata<'_>, _: Context<'_, S>) -> bool {
        // Spans are not recorded: a record is one event's own message and fields.
        metadata.is_event() && level_enabled(metadata.level())
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(match LEVEL.load(Ordering::Relaxed) {
            0 => LevelFilter::OFF,
            1 => LevelFilter::ERROR,
            2 => LevelFilter::WARN,
            3 => LevelFilter::INFO,
            4 => LevelFilter::DEBUG,
            _ => LevelFilter::TRACE,
        })
    }

    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        if IN_SINK.with(Cell::get) {
            return;
        }
        let Some(sink) = SINK.read().unwrap_or_else(PoisonError::into_inner).clone() else { return };
        // Records bridged from `log` carry their real target and level in `log.*` fields.
        let mut line = Line::default();
        event.record(&mut line);
        let metadata = event.metadata();
        let record = LogRecord {
            level: from_tracing(metadata.level()),
            target: line.log_target.take().unwrap_or_else(|| metadata.target().to_owned()),
            message: line.finish(),
        };
        IN_SINK.with(|f| f.set(true));
        let _ = catch_unwind(AssertUnwindSafe(|| sink.log(record)));
        IN_SINK.with(|f| f.set(false));
    }
}

/// An event's fields as one line: the message, then `name=value` for the others.
#[derive(Default)]
struct Line {
    message: String,
    fields: String,
    log_target: Option<String>,
}

impl Line {
    fn finish(self) -> String {
        match (self.message.is_empty(), self.fields.is_empty()) {
            (_, true) => self.message,
            (true, false) => self.fields,
            (false, false) => format!("{} {}", self.message, self.fields),
        }
    }

    fn field(&mut self, name: &str, value: std::fmt::Arguments<'_>) {
        if !self.fields.is_empty() {
            self.fields.push(' ');
        }
        let _ = write!(self.fields, "{name}={value}");
    }
}

impl Visit for Line {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message.push_str(value),
            "log.target" => self.log_target = Some(value.to_owned()),
            "log.module_path" | "log.file" | "log.line" => {}
            name => self.field(name, format_args!("{value}")),
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => {
                let _ = write!(self.message, "{value:?}");
            }
            "log.target" | "log.module_path" | "log.file" | "log.line" => {}
            name => self.field(name, format_args!("{value:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Debug, Default)]
    struct Captured(Mutex<Vec<LogRecord>>);

    impl LogSink for Captured {
        fn log(&self, record: LogRecord) {
            self.0.lock().unwrap().push(record);
        }
    }

    /// One test for the process-wide state: the level filters, fields are written out, `log`
    /// records arrive with their own target, `None` stops it.
    #[test]
    fn records_reach_the_sink_at_the_chosen_level() {
        let sink = Arc::new(Captured::default());
        set_logger(Some(sink.clone()), LogLevel::Info).unwrap();
        tracing::debug!("not at info");
        tracing::info!(hub = "home", n = 3, "connection up");
        tracing_log::log::warn!(target: "rustls::client", "from log");
        set_logger(Some(sink.clone()), LogLevel::Trace).unwrap();
        tracing::trace!("now at trace");
        set_logger(None, LogLevel::Trace).unwrap();
        tracing::error!("after the sink was removed");
        let got = sink.0.lock().unwrap().clone();
        let lines: Vec<_> = got.iter().map(|r| (r.level, r.target.as_str(), r.message.as_str())).collect();
        let here = module_path!();
        assert_eq!(
            lines,
            [
                (LogLevel::Info, here, "connection up hub=home n=3"),
                (LogLevel::Warn, "rustls::client", "from log"),
                (LogLevel::Trace, here, "now at trace"),
            ]
        );
    }
}
