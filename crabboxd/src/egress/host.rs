//! The `EgressHost` task: one attempt mints a ticket for its session (the
//! first attempt uses the ticket minted at start), opens the host bridge
//! and serves it with `crabbox_egress::run_host` until the bridge drops,
//! the lease ends, or it is cancelled; when the lease side merely left, it
//! rejoins at once within the same attempt. The bridge is dialled and
//! served on the bridges' own runtime ([`BRIDGES`]).

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, Ordering},
};

use std::time::Duration;

use crabbox_egress::{BridgeError, ErrorClass, FatalReason, HostConfig, Policy, SessionStats};
use tokio::{sync::Semaphore, time::Instant};
use tokio_util::sync::CancellationToken;

use super::EgressManager;
use crate::{
    coordinator::{self, CoordinatorError, Role, Ticket, TicketRequest},
    daemon::{LeaseEnds, LeaseOver},
    supervisor::{Dedicated, TaskCtx, TaskError},
};

/// Every host bridge's runtime: one thread for the dial and the serving of
/// all of them, so a bridge's per-message hand-offs never cross threads.
static BRIDGES: Dedicated = Dedicated::new("crabboxd-egress");

/// One host bridge's inputs; cloned into each attempt.
#[derive(Clone)]
pub struct Host {
    pub client: coordinator::Client,
    pub lease: String,
    pub session: String,
    pub policy: Arc<Policy>,
    pub stats: Arc<SessionStats>,
    pub first_ticket: Arc<Mutex<Option<Ticket>>>,
    pub ends: LeaseEnds,
    pub ended: Arc<AtomicBool>,
    pub manager: EgressManager,
    /// Destination sockets of every host bridge of this daemon together.
    pub sockets: Arc<Semaphore>,
}

impl Host {
    /// One attempt. A peer leaving (`1011 egress client disconnected`) is
    /// not a failure: the host rejoins at once with a fresh ticket inside the
    /// same attempt, so the supervisor's backoff never grows for it.
    pub async fn run(self, ctx: TaskCtx) -> Result<(), TaskError> {
        let ended = self.ends.wait_for(&self.lease);
        tokio::pin!(ended);
        loop {
            let ws = tokio::select! {
                ws = self.connect() => match ws {
                    Ok(ws) => ws,
                    Err(e) => return self.refused(e).await,
                },
                _ = ctx.cancelled() => return Ok(()),
                reason = &mut ended => return self.over(reason).await,
            };
            tracing::info!(
                lease = %self.lease,
                session = %self.session,
                policy = %self.policy.summary(),
                "egress host: connected; listening: none public; outbound WebSocket only"
            );
            ctx.running();
            let stop = CancellationToken::new();
            let config = HostConfig {
                stats: Arc::clone(&self.stats),
                socket_budget: Some(Arc::clone(&self.sockets)),
                stop: stop.clone(),
                ..HostConfig::default()
            };
            let up_since = Instant::now();
            // On the bridges' own thread, like the socket it was dialled on.
            let serve = BRIDGES.run(crabbox_egress::run_host(
                ws,
                Arc::clone(&self.policy),
                config,
            ));
            let serve = async move {
                serve
                    .await
                    .unwrap_or_else(|gone| Err(BridgeError::Transport(gone.to_string())))
            };
            tokio::pin!(serve);
            let served = tokio::select! {
                r = &mut serve => r,
                _ = ctx.cancelled() => {
                    // An orderly stop: say goodbye so the lease side can tell its user.
                    stop.cancel();
                    let _ = tokio::time::timeout(Duration::from_secs(3), &mut serve).await;
                    return Ok(());
                }
                reason = &mut ended => return self.over(reason).await,
            };
            match served {
                Err(BridgeError::Closed { code: 1011, reason })
                    if reason.contains("client disconnected") =>
                {
                    // Normal: the helper left (restart, network blip). Rejoin now,
                    // but never more than once a second.
                    let wait = Duration::from_secs(1).saturating_sub(up_since.elapsed());
                    tracing::info!(lease = %self.lease, session = %self.session, rejoin_in = ?wait, "egress host: the lease side left the bridge; rejoining");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = ctx.cancelled() => return Ok(()),
                        reason = &mut ended => return self.over(reason).await,
                    }
                    continue;
                }
                Ok(()) => return Err(TaskError::retryable(anyhow::anyhow!("bridge closed"))),
                Err(e) => {
                    return match e.class() {
                        ErrorClass::Fatal(FatalReason::LeaseEnded) => {
                            let over = self.ends.learned(&self.lease, &e.to_string());
                            self.over(over).await
                        }
                        ErrorClass::Fatal(FatalReason::Replaced) => {
                            self.end();
                            Err(TaskError::fatal(e))
                        }
                        ErrorClass::Retryable => Err(TaskError::retryable(e)),
                    };
                }
            }
        }
    }

    /// Mints a ticket (the first connect uses the one minted at start) and dials the bridge.
    async fn connect(&self) -> Result<crate::coordinator::Bridge, CoordinatorError> {
        let first = self.first_ticket.lock().unwrap().take();
        let ticket = match first {
            Some(t) => t,
            None => {
                self.client
                    .egress_ticket(
                        &self.lease,
                        Role::Host,
                        TicketRequest {
                            session: Some(&self.session),
                            ..Default::default()
                        },
                    )
                    .await?
            }
        };
        // The token command runs here; the socket is dialled on the
        // bridges' runtime, so its I/O (and its TLS handshake) is driven there.
        let dial = self
            .client
            .bridge_dial(&self.lease, Role::Host, &ticket.ticket)
            .await?;
        BRIDGES.run(dial.dial()).await.unwrap_or_else(|gone| {
            Err(CoordinatorError::Bridge {
                path: format!("egress host bridge of {}", self.lease),
                message: gone.to_string(),
            })
        })
    }

    /// Coordinator refusals: a gone lease ends the task (stopped when it
    /// was released through the daemon); a replaced session and missing
    /// rights are final; the rest is retried.
    async fn refused(&self, e: CoordinatorError) -> Result<(), TaskError> {
        if let Some(end) = e.lease_end() {
            let over = self.ends.learned(&self.lease, &end.to_string());
            return self.over(over).await;
        }
        Err(if e.is_retryable() {
            TaskError::retryable(e)
        } else {
            TaskError::fatal(e)
        })
    }

    /// The lease is over: stopped when the operator released it through
    /// the daemon, fatal otherwise.
    async fn over(&self, over: LeaseOver) -> Result<(), TaskError> {
        self.end();
        if over.orderly {
            return Ok(());
        }
        Err(TaskError::fatal(anyhow::anyhow!("{}", over.reason)))
    }

    fn end(&self) {
        self.ended.store(true, Ordering::SeqCst);
        self.manager.over();
    }
}
