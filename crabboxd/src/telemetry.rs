//! Logging: a tracing subscriber writing to journald under systemd
//! (`JOURNAL_STREAM` set) and to stderr otherwise, with a filter that the
//! `SetLogLevel` RPC can replace while the daemon runs.
//!
//! Whatever the filter, the libraries that dump requests (headers included:
//! the coordinator bearer token, bridge tickets) at `debug`/`trace` are
//! clamped to `info` by a second, fixed filter ([`clamp`]).

use std::sync::{Mutex, OnceLock};

use tracing_subscriber::{
    EnvFilter, Layer, Registry,
    filter::{LevelFilter, Targets},
    layer::{Context, SubscriberExt},
    reload,
    util::SubscriberInitExt,
};

/// Targets whose `debug`/`trace` output can carry secrets: WebSocket and HTTP
/// clients log the request they send (with `Authorization` and
/// `X-Crabbox-Bridge-Ticket`), TLS and HTTP/2 log frames, SSH logs packets.
pub const CLAMPED_TARGETS: &[&str] = &[
    "tungstenite",
    "tokio_tungstenite",
    "hyper",
    "hyper_util",
    "hyper_rustls",
    "reqwest",
    "h2",
    "http",
    "rustls",
    "tokio_rustls",
    "webpki",
    "tonic",
    "tower",
    "tower_http",
    "axum",
    "russh",
    "russh_keys",
];

/// A filter that lets everything through except [`CLAMPED_TARGETS`] above `info`.
/// It sits beside the reloadable filter, so no `SetLogLevel` can lift it.
pub fn clamp() -> Targets {
    CLAMPED_TARGETS.iter().fold(
        Targets::new().with_default(LevelFilter::TRACE),
        |t, target| t.with_target(*target, LevelFilter::INFO),
    )
}

/// [`clamp`] as it sits in the subscriber: it filters as [`clamp`] does, and
/// gives as its level hint the live filter's. tracing takes the more verbose
/// of two filtering layers' hints, and [`clamp`]'s own (`trace`, its default)
/// would make every disabled `debug!`/`trace!` call site (yamux has them on
/// every frame) ask both filters on every call; an event passes only if both
/// let it through, so the live filter's hint is the stack's.
struct Clamp {
    targets: Targets,
    live: reload::Handle<EnvFilter, Registry>,
}

impl<S: tracing::Subscriber> Layer<S> for Clamp {
    fn register_callsite(
        &self,
        metadata: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        Layer::<S>::register_callsite(&self.targets, metadata)
    }

    fn enabled(&self, metadata: &tracing::Metadata<'_>, ctx: Context<'_, S>) -> bool {
        Layer::<S>::enabled(&self.targets, metadata, ctx)
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        self.live
            .with_current(Layer::<Registry>::max_level_hint)
            .ok()
            .flatten()
    }
}

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
        .with(Clamp {
            targets: clamp(),
            live: reload.clone(),
        })
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
