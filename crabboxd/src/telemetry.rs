//! Logging: a tracing subscriber writing to journald under systemd
//! (`JOURNAL_STREAM` set) and to stderr otherwise, with a filter that the
//! `SetLogLevel` RPC can replace while the daemon runs.

use std::sync::{Mutex, OnceLock};

use tracing_subscriber::{
    EnvFilter, Registry, layer::SubscriberExt, reload, util::SubscriberInitExt,
};

/// The live filter and the handle that swaps it.
struct LogControl {
    reload: reload::Handle<EnvFilter, Registry>,
    current: Mutex<String>,
}

// The subscriber is process-global, so its reload handle is too.
static CONTROL: OnceLock<LogControl> = OnceLock::new();

/// Why a filter change was refused.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The filter does not parse.
    #[error("invalid log filter {filter:?}: {message}")]
    Invalid {
        /// The filter given.
        filter: String,
        /// The parser's message.
        message: String,
    },
    /// Logging was not initialised by this process (e.g. the daemon runs
    /// embedded in a test).
    #[error("logging is not managed by this process")]
    NotInitialised,
}

/// Installs the global subscriber with `filter`. Under systemd (the
/// `JOURNAL_STREAM` variable is set) events go to journald with their fields
/// as journal fields; otherwise to stderr.
#[expect(
    clippy::disallowed_methods,
    reason = "telemetry reads JOURNAL_STREAM before any configuration exists"
)]
pub fn init(filter: &str) -> anyhow::Result<()> {
    let parsed = parse(filter)?;
    let (filter_layer, reload) = reload::Layer::new(parsed);
    let journald = if std::env::var_os("JOURNAL_STREAM").is_some() {
        tracing_journald::layer()
            .map(|l| l.with_syslog_identifier("crabboxd".into()))
            .ok()
    } else {
        None
    };
    let stderr = journald.is_none().then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(true)
            // Colour only for a person at a terminal, never into log files.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
    });
    tracing_subscriber::registry()
        .with(filter_layer)
        .with(journald)
        .with(stderr)
        .try_init()?;
    let _ = CONTROL.set(LogControl {
        reload,
        current: Mutex::new(filter.to_owned()),
    });
    Ok(())
}

/// The filter in effect, if logging is managed by this process.
pub fn current_filter() -> Option<String> {
    CONTROL.get().map(|c| c.current.lock().unwrap().clone())
}

/// Replaces the filter, returning the previous one. An invalid filter is
/// refused and the old one stays.
pub fn set_filter(filter: &str) -> Result<String, LogError> {
    let parsed = parse(filter)?;
    let control = CONTROL.get().ok_or(LogError::NotInitialised)?;
    let mut current = control.current.lock().unwrap();
    control
        .reload
        .reload(parsed)
        .map_err(|e| LogError::Invalid {
            filter: filter.to_owned(),
            message: e.to_string(),
        })?;
    Ok(std::mem::replace(&mut *current, filter.to_owned()))
}

fn parse(filter: &str) -> Result<EnvFilter, LogError> {
    EnvFilter::try_new(filter).map_err(|e| LogError::Invalid {
        filter: filter.to_owned(),
        message: e.to_string(),
    })
}
