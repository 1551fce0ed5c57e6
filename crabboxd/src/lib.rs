//! `crabboxd`: the per-user Crabbox workstation daemon.
//!
//! It runs once per user (under systemd, launchd or in the foreground) and
//! supervises, as managed tasks in one process, everything the operator side
//! of Crabbox keeps running: egress host bridges, lease keepers
//! (heartbeats over the shared control WebSocket) and run attach feeds.
//! `crabboxctl`, editors and agents drive it through a gRPC API on a private
//! Unix socket.
//!
//! The entry point is [`run`]: it takes a loaded [`config::Config`], a bound
//! [`platform::socket::ApiListener`] and a shutdown future, serves until
//! shutdown, drains every task within the grace period, and returns.
//!
//! # Layout
//!
//! * `main.rs` — flags, logging, config load, socket bind, exit codes.
//! * [`config`] — layered configuration and the `Secret` type; with
//!   [`telemetry`], the only reader of environment variables.
//! * [`daemon`] — `DaemonState`, shared by the API and the tasks, and the
//!   lifecycle phase.
//! * [`supervisor`] — task kinds, restart policy, handles, the task table.
//! * [`api`] — the gRPC service; the only module that knows proto types.
//! * [`coordinator`] — the coordinator HTTP client; the only module that
//!   knows the coordinator's wire shapes.
//! * [`attach`] — run attach feeds shared by any number of subscribers.
//! * [`control`] — the shared `/v1/control` socket (heartbeats, run events).
//! * [`lease`] — kept leases: the `LeaseKeeper` task and its manager.
//! * [`egress`] — egress: the `EgressHost` bridge task and its manager, and
//!   the lease side over SSH (`egress start`, the helper's keeper, the SSH transport).
//! * [`ssh`] — SSH multiplexers: the `SshMux` task per lease, commands and copies over it.
//! * [`run`](mod@run) — runs the daemon owns: the `Run` task per `crabboxctl run`,
//!   its environment forwarding and its output events.
//! * [`statefile`] — persisted desired state, restored on start.
//! * [`diagnostics`] — the checks behind `crabboxctl doctor`.
//! * [`drive`] — streaming replies whose work runs inside the stream.
//! * [`platform`] — OS glue: private files, the socket and its lock, systemd
//!   notifications.
//! * [`telemetry`] — tracing to journald or stderr, live filter changes.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod api;
pub mod attach;
pub mod config;
pub mod control;
pub mod coordinator;
pub mod daemon;
pub mod diagnostics;
pub mod drive;
pub mod egress;
pub mod lease;
pub mod platform;
pub mod run;
pub mod ssh;
pub mod statefile;
pub mod supervisor;
pub mod telemetry;

use std::{collections::BTreeMap, future::Future, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::{
    config::Config,
    daemon::{DaemonState, Phase},
    platform::{notify, socket::ApiListener},
    supervisor::{Supervisor, TaskId, TaskKind, TaskRegistry, TaskState},
};

/// How long in-flight API calls get to finish after the tasks drained.
const API_DRAIN: Duration = Duration::from_secs(2);

/// Runs the daemon until `shutdown` completes or a `Shutdown` RPC arrives,
/// then drains every task within the configured grace period, stops the API
/// and removes the socket. Shorthand for [`Daemon::new`] then [`Daemon::run`].
pub async fn run(
    config: Config,
    listener: ApiListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    Daemon::new(config, listener)?.run(shutdown).await
}

/// A daemon that is set up (state directory, supervisor, shared state) but
/// not yet serving. Embedders and tests use [`Daemon::state`] to reach the
/// supervisor before calling [`Daemon::run`].
#[derive(Debug)]
pub struct Daemon {
    state: DaemonState,
    listener: ApiListener,
}

impl Daemon {
    /// Prepares the state directory (0700) and the shared state.
    pub fn new(config: Config, listener: ApiListener) -> anyhow::Result<Self> {
        platform::fs::ensure_private_dir(&config.state_dir).map_err(|e| {
            anyhow::anyhow!(
                "cannot prepare the state directory {}: {e}",
                config.state_dir.display()
            )
        })?;
        let supervisor = Supervisor::new(CancellationToken::new(), TaskRegistry::new());
        let state = DaemonState::new(config, listener.path().to_owned(), supervisor)?;
        Ok(Daemon { state, listener })
    }

    /// The shared state (configuration, supervisor, phase).
    pub fn state(&self) -> &DaemonState {
        &self.state
    }

    /// Serves until `shutdown` completes or a `Shutdown` RPC arrives, then
    /// drains every task within the grace period, stops the API and removes
    /// the socket (by dropping the listener).
    ///
    /// Shutdown has three parts: *decide* (one `select!` over the caller's
    /// signal future, the RPC and the API server failing), *tell* (the root
    /// cancellation token) and *wait* (the supervisor's tracker, bounded by
    /// the grace period).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Daemon {
            state,
            mut listener,
        } = self;
        let grace = state.config().shutdown_grace;
        let supervisor = state.supervisor().clone();
        let registry = supervisor.registry().clone();
        let uds = tokio::net::UnixListener::from_std(listener.take()?)?;
        let api_stop = CancellationToken::new();
        let api_id = TaskId::new(TaskKind::ApiServer, "");
        registry.upsert(&api_id, |r| {
            r.state = TaskState::Running;
            r.labels =
                BTreeMap::from([("socket".to_owned(), listener.path().display().to_string())]);
        });
        // The API server is not a supervised task: it must outlive the drain
        // (so `crabboxctl` can watch it) and the daemon cannot run without it,
        // so a failure ends the daemon instead of restarting.
        let server = api::serve(state.clone(), uds, api_stop.clone());
        tokio::pin!(server);

        // Desired state from before a restart comes back first.
        state.leases().restore().await;
        state.egress().restore().await;
        state.set_phase(Phase::Running);
        notify::ready();
        notify::status("serving");
        tracing::info!(
            socket = %listener.path().display(),
            version = crabbox_api::VERSION,
            pid = std::process::id(),
            "crabboxd ready"
        );

        let reason = tokio::select! {
            _ = shutdown => "signal".to_owned(),
            reason = state.shutdown_requested() => reason,
            res = &mut server => {
                registry.upsert(&api_id, |r| r.state = TaskState::Failed);
                return Err(match res {
                    Ok(()) => anyhow::anyhow!("the API server stopped unexpectedly"),
                    Err(e) => e.context("the API server failed"),
                });
            }
        };

        tracing::info!(%reason, grace = ?grace, "shutting down");
        state.set_phase(Phase::Draining);
        notify::stopping();
        // Keep serving the API while tasks drain, so clients can watch it.
        let drain = supervisor.shutdown(grace);
        tokio::pin!(drain);
        let mut server_done = false;
        let drained = loop {
            tokio::select! {
                drained = &mut drain => break drained,
                res = &mut server, if !server_done => {
                    server_done = true;
                    if let Err(e) = res {
                        tracing::warn!(error = %e, "API server failed during shutdown");
                    }
                }
            }
        };
        registry.upsert(&api_id, |r| r.state = TaskState::Stopping);
        api_stop.cancel();
        if !server_done && tokio::time::timeout(API_DRAIN, &mut server).await.is_err() {
            tracing::warn!("API calls still in flight after {API_DRAIN:?}; closing them");
        }
        drop(listener);
        tracing::info!(drained, "crabboxd stopped");
        Ok(())
    }
}
