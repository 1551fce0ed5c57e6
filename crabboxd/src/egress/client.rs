//! The `EgressRemoteClient{lease}` task: the pair heals itself. Every
//! second it asks the lease's helper for its `status` over the mux (its
//! control socket, `direct-streamlocal`); a helper waiting for a ticket, or
//! one whose bridge stayed down for five checks, gets a fresh client ticket
//! for the **same** session; a helper that is gone (nothing at its control
//! socket) is started again on the same port and re-ticketed. SSH trouble
//! is waited out. It ends when the lease ends, stopping the helper if the
//! lease is still reachable; cancelling it (daemon shutdown, replacement)
//! leaves the helper running, so the browser's settings never change.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::remote::{Current, Remote, RemoteError, SessionPaths};
use crate::{
    coordinator::{self, CoordinatorError, Role, TicketRequest},
    daemon::LeaseEnds,
    ssh::SshError,
    supervisor::{TaskCtx, TaskError},
};

/// How often the helper is checked.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Checks with the bridge down (and the helper not asking) before a
/// fresh ticket is pushed anyway.
const DOWN_CHECKS: u32 = 5;
/// How long the final stop at lease end may take: the stop's own steps
/// are bounded to fit (see `remote::STOP_BUDGET`).
pub const STOP_DEADLINE: Duration = Duration::from_secs(10);
const _: () = assert!(
    super::remote::STOP_BUDGET.as_millis() < STOP_DEADLINE.as_millis(),
    "a helper stop must fit the remote client's deadline"
);

/// The lease side of a running pair, as persisted with its host bridge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteState {
    /// The helper's loopback listen address on the lease.
    pub listen: String,
    /// The coordinator URL the helper dials.
    pub coordinator_url: String,
    /// The helper's path on the lease.
    pub helper: String,
    /// The lease user's home.
    pub home: String,
    /// The lease's CPU.
    pub arch: String,
    /// The helper's version.
    pub version: String,
    /// The helper's pid when last started.
    pub pid: u32,
    /// The session's lease-side paths.
    pub paths: SessionPaths,
    /// When the pair was started, RFC 3339.
    pub started_at: String,
}

/// One remote-client task's inputs; cloned into each attempt.
#[derive(Clone)]
pub struct RemoteClient {
    /// The lease side, over the lease's mux.
    pub remote: Remote,
    /// The coordinator, for client tickets.
    pub client: coordinator::Client,
    /// The session the helper belongs to.
    pub session: String,
    /// Where the helper is and how it was started.
    pub state: RemoteState,
    /// Lease end.
    pub ends: LeaseEnds,
}

enum Problem {
    /// Wait and check again.
    Transient(String),
    /// The session is over (replaced, refused).
    Fatal(CoordinatorError),
    /// The lease is over.
    LeaseOver(String),
}

impl RemoteClient {
    /// Runs until cancelled, the lease ends, or the session is over.
    pub async fn run(self, ctx: TaskCtx) -> Result<(), TaskError> {
        let lease = self.remote.lease.clone();
        let ended = self.ends.wait_for(&lease);
        tokio::pin!(ended);
        ctx.running();
        ctx.set_label("listen", self.state.listen.clone());
        ctx.set_label("pid", self.state.pid.to_string());
        let mut tick = tokio::time::interval(CHECK_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut down = 0u32;
        let mut last_problem = String::new();
        let mut pid = self.state.pid;
        loop {
            tokio::select! {
                _ = ctx.cancelled() => return Ok(()),
                over = &mut ended => {
                    self.stop_helper().await;
                    return if over.orderly { Ok(()) } else { Err(TaskError::fatal(anyhow::anyhow!("{}", over.reason))) };
                }
                _ = tick.tick() => {}
            }
            let checked = tokio::select! {
                r = self.check(&mut down, &mut pid) => r,
                _ = ctx.cancelled() => return Ok(()),
                over = &mut ended => {
                    self.stop_helper().await;
                    return if over.orderly { Ok(()) } else { Err(TaskError::fatal(anyhow::anyhow!("{}", over.reason))) };
                }
            };
            match checked {
                Ok(state) => {
                    ctx.set_label("helper", state);
                    ctx.set_label("pid", pid.to_string());
                    if !last_problem.is_empty() {
                        tracing::info!(lease = %lease, session = %self.session, "egress remote client: the helper is back");
                        last_problem.clear();
                    }
                }
                Err(Problem::Transient(why)) => {
                    if why != last_problem {
                        tracing::warn!(lease = %lease, session = %self.session, problem = %why, "egress remote client: cannot check the helper; retrying");
                        ctx.set_label("problem", why.clone());
                        last_problem = why;
                    }
                }
                Err(Problem::Fatal(e)) => {
                    // The session is over (replaced, refused): its helper can
                    // never bridge again and would hold the port.
                    self.stop_helper().await;
                    return Err(TaskError::fatal(e));
                }
                Err(Problem::LeaseOver(reason)) => {
                    let over = self.ends.learned(&lease, &reason);
                    self.stop_helper().await;
                    return if over.orderly {
                        Ok(())
                    } else {
                        Err(TaskError::fatal(anyhow::anyhow!("{}", over.reason)))
                    };
                }
            }
        }
    }

    /// One check; returns the helper's state for the task's labels.
    async fn check(&self, down: &mut u32, pid: &mut u32) -> Result<&'static str, Problem> {
        let control = &self.state.paths.control;
        match self.remote.status(control).await {
            Ok(st) if st.bridged => {
                *down = 0;
                *pid = st.pid;
                Ok("bridged")
            }
            Ok(st) => {
                *down += 1;
                *pid = st.pid;
                if st.waiting_ticket || *down >= DOWN_CHECKS {
                    tracing::info!(lease = %self.remote.lease, session = %self.session, "egress remote client: the helper's bridge is down; handing it a fresh ticket");
                    self.reticket().await?;
                    *down = 0;
                    return Ok("re-ticketed");
                }
                Ok("bridge down")
            }
            // Nothing at the control socket: the helper is gone.
            Err(RemoteError::Ssh(SshError::Channel(_))) => {
                tracing::info!(lease = %self.remote.lease, session = %self.session, listen = %self.state.listen, "egress remote client: the helper is gone; starting it again on the same port");
                let new_pid = self
                    .remote
                    .start(
                        &self.state.helper,
                        &self.state.paths,
                        &self.session,
                        &self.state.listen,
                        &self.state.coordinator_url,
                    )
                    .await
                    .map_err(|e| Problem::Transient(e.to_string()))?;
                *pid = new_pid;
                self.reticket().await?;
                let current = Current {
                    lease: self.remote.lease.clone(),
                    session: self.session.clone(),
                    endpoint: self.state.listen.clone(),
                    proxy: format!("http://{}", self.state.listen),
                    pid: new_pid,
                    version: self.state.version.clone(),
                    transport: "coordinator".into(),
                    started_at: self.state.started_at.clone(),
                };
                if let Err(e) = self.remote.write_current(&current).await {
                    tracing::warn!(lease = %self.remote.lease, error = %e, "egress remote client: cannot update current.json");
                }
                Ok("restarted")
            }
            Err(RemoteError::Ssh(e)) if matches!(e, SshError::LeaseEnded(_)) => {
                Err(Problem::LeaseOver(e.to_string()))
            }
            Err(e) => Err(Problem::Transient(e.to_string())),
        }
    }

    /// Mints a client ticket for the same session and hands it over.
    async fn reticket(&self) -> Result<(), Problem> {
        let ticket = self
            .client
            .egress_ticket(
                &self.remote.lease,
                Role::Client,
                TicketRequest {
                    session: Some(&self.session),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| {
                if let Some(end) = e.lease_end() {
                    Problem::LeaseOver(end.to_string())
                } else if e.is_retryable() {
                    Problem::Transient(e.to_string())
                } else {
                    Problem::Fatal(e)
                }
            })?;
        self.remote
            .give_ticket(&self.state.paths.control, ticket.ticket.expose())
            .await
            .map_err(|e| Problem::Transient(e.to_string()))
    }

    /// Best effort at lease end: stop this session's helper if the lease
    /// still answers.
    async fn stop_helper(&self) {
        match tokio::time::timeout(
            STOP_DEADLINE,
            self.remote.stop(&self.state.paths, &self.session),
        )
        .await
        {
            Ok(Ok((pid, _))) => {
                tracing::info!(lease = %self.remote.lease, session = %self.session, pid = ?pid, "egress remote client: stopped the helper at lease end")
            }
            Ok(Err(e)) => {
                tracing::info!(lease = %self.remote.lease, error = %e, "egress remote client: the lease did not answer at its end; the helper ends with its bridge")
            }
            Err(_) => {
                tracing::info!(lease = %self.remote.lease, "egress remote client: the lease did not answer at its end in time")
            }
        }
    }
}
