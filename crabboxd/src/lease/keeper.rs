//! The `LeaseKeeper` task: heartbeats one lease every idle/3 (clamped to
//! 5–60 s) and ends, as fatal, when the coordinator says the lease is over.
//!
//! Heartbeats go over the shared control socket when the `ControlChannel`
//! wants them (see `heartbeat_transport`), and over HTTP
//! (`POST /v1/leases/{id}/heartbeat`) otherwise or in the same tick when
//! the socket gives no answer.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use super::{LeaseManager, LeaseStatus};
use crate::{
    control::{ControlBeat, ControlChannel},
    coordinator::{self, Lease},
    daemon::{LeaseEnds, LeaseOver},
    supervisor::{TaskCtx, TaskError},
};

/// The shortest heartbeat interval.
pub const MIN_INTERVAL: Duration = Duration::from_secs(5);
/// The longest heartbeat interval.
pub const MAX_INTERVAL: Duration = Duration::from_secs(60);

/// The reference CLI's cadence: a third of the idle timeout, clamped to
/// 5–60 s, or 60 s when the idle timeout is unknown. Three beats per idle
/// period means two can be lost before the lease idles out.
pub fn heartbeat_interval(idle_override: Option<Duration>, lease: &Lease) -> Duration {
    let idle = idle_override.or(lease.idle_timeout_seconds.map(Duration::from_secs));
    match idle {
        Some(idle) if !idle.is_zero() => (idle / 3).clamp(MIN_INTERVAL, MAX_INTERVAL),
        _ => MAX_INTERVAL,
    }
}

/// One keeper's inputs; cloned into each attempt.
#[derive(Clone)]
pub struct Keeper {
    pub client: coordinator::Client,
    pub id: String,
    pub idle: Option<Duration>,
    pub status: Arc<Mutex<LeaseStatus>>,
    pub manager: LeaseManager,
    pub ends: LeaseEnds,
    pub control: Option<ControlChannel>,
}

/// How long a heartbeat waits for its answer on the control socket before
/// the same tick falls back to HTTP.
pub const CONTROL_WAIT: Duration = Duration::from_secs(5);

impl Keeper {
    /// One attempt: heartbeat at once, then on every tick, until cancelled
    /// (clean end), the lease ends (fatal) or a heartbeat fails (retryable:
    /// the supervisor backs off and the next attempt beats at once).
    pub async fn run(self, ctx: TaskCtx) -> Result<(), TaskError> {
        let ended = self.ends.wait_for(&self.id);
        tokio::pin!(ended);
        // A lease heartbeated moments ago (by `keep`, or before a restart of
        // this task) is not beaten again until its interval is up.
        let pause = {
            let s = self.status.lock().unwrap();
            match (s.last_heartbeat, s.interval) {
                // At most one interval: the wall clock stepping back must not
                // stretch the pause (a lease idles out in three).
                (Some(last), Some(interval)) => (last + interval)
                    .duration_since(SystemTime::now())
                    .unwrap_or_default()
                    .min(interval),
                _ => Duration::ZERO,
            }
        };
        if !pause.is_zero() {
            // That heartbeat was good: the keeper is healthy already.
            ctx.running();
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = ctx.cancelled() => return Ok(()),
            reason = &mut ended => return self.over(reason).await,
        }
        loop {
            // The shared control socket first, once the lease is known; any
            // failure (down, silent, refused) falls back to HTTP in the same
            // tick.
            let known = self.status.lock().unwrap().lease.clone();
            let control = self.control.as_ref().filter(|c| c.heartbeats_wanted());
            if let (Some(control), Some(mut lease)) = (control, known) {
                let idle_secs = self.idle.map(|d| d.as_secs().max(1));
                let beat = tokio::select! {
                    beat = control.heartbeat(&self.id, idle_secs, CONTROL_WAIT) => beat,
                    _ = ctx.cancelled() => return Ok(()),
                    reason = &mut ended => return self.over(reason).await,
                };
                match beat {
                    Ok(ControlBeat::Ok { expires_at }) => {
                        lease.expires_at = expires_at.or(lease.expires_at);
                        let interval = heartbeat_interval(self.idle, &lease);
                        self.record(lease, "control", interval);
                        ctx.running();
                        tokio::select! {
                            _ = tokio::time::sleep(interval) => continue,
                            _ = ctx.cancelled() => return Ok(()),
                            reason = &mut ended => return self.over(reason).await,
                        }
                    }
                    // `not_found` is not an end: the reference answers it to
                    // a manage-share user, whose HTTP heartbeat works (the
                    // HTTP beat below, in the same tick, says whether the
                    // lease is really gone).
                    Ok(ControlBeat::Refused { code })
                        if matches!(code.as_str(), "lease_ended" | "lease_expired") =>
                    {
                        let reason = if code == "lease_ended" {
                            "lease ended"
                        } else {
                            "lease expired"
                        };
                        let over = self.ends.learned(&self.id, reason);
                        return self.over(over).await;
                    }
                    Ok(ControlBeat::Refused { code }) => {
                        tracing::debug!(%code, "control heartbeat refused; falling back to HTTP");
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "control heartbeat failed; falling back to HTTP")
                    }
                }
            }
            let beat = tokio::select! {
                beat = self.client.heartbeat(&self.id, self.idle) => beat,
                _ = ctx.cancelled() => return Ok(()),
                reason = &mut ended => return self.over(reason).await,
            };
            let lease = match beat {
                Ok(lease) => lease,
                Err(e) => {
                    if let Some(end) = e.lease_end() {
                        let over = self.ends.learned(&self.id, &end.to_string());
                        return self.over(over).await;
                    }
                    tracing::warn!(error = %e, "heartbeat failed");
                    return Err(if e.is_retryable() {
                        TaskError::retryable(e)
                    } else {
                        TaskError::fatal(e)
                    });
                }
            };
            let interval = heartbeat_interval(self.idle, &lease);
            self.record(lease, "http", interval);
            ctx.running();
            tracing::debug!(interval = ?interval, "heartbeat ok");
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = ctx.cancelled() => return Ok(()),
                reason = &mut ended => return self.over(reason).await,
            }
        }
    }

    fn record(&self, lease: Lease, via: &'static str, interval: Duration) {
        let mut s = self.status.lock().unwrap();
        s.last_heartbeat = Some(SystemTime::now());
        s.interval = Some(interval);
        s.lease = Some(lease);
        s.via = Some(via);
    }

    /// The lease is over: record why, drop it from the persisted set, and
    /// end — stopped when the operator asked for it (a release), fatal
    /// otherwise (never retried either way).
    async fn over(&self, over: LeaseOver) -> Result<(), TaskError> {
        self.status.lock().unwrap().ended = Some(over.reason.clone());
        self.manager.lease_over(&self.id).await;
        if over.orderly {
            return Ok(());
        }
        Err(TaskError::fatal(anyhow::anyhow!("{}", over.reason)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(idle: Option<u64>) -> Lease {
        Lease {
            idle_timeout_seconds: idle,
            ..Default::default()
        }
    }

    #[test]
    fn interval_is_a_third_of_idle_clamped() {
        assert_eq!(
            heartbeat_interval(None, &lease(Some(1800))),
            Duration::from_secs(60)
        );
        assert_eq!(
            heartbeat_interval(None, &lease(Some(90))),
            Duration::from_secs(30)
        );
        assert_eq!(
            heartbeat_interval(None, &lease(Some(6))),
            Duration::from_secs(5)
        );
        assert_eq!(
            heartbeat_interval(None, &lease(None)),
            Duration::from_secs(60)
        );
        assert_eq!(
            heartbeat_interval(None, &lease(Some(0))),
            Duration::from_secs(60)
        );
        // An explicit override wins over the lease's own value.
        assert_eq!(
            heartbeat_interval(Some(Duration::from_secs(30)), &lease(Some(1800))),
            Duration::from_secs(10)
        );
    }
}
