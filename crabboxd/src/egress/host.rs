//! The `EgressHost` task: one attempt mints a ticket for its session (the
//! first attempt uses the ticket minted at start), opens the host bridge
//! and serves it with `crabbox_egress::run_host` until the bridge drops,
//! the lease ends, or it is cancelled.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, Ordering},
};

use crabbox_egress::{ErrorClass, FatalReason, HostConfig, Policy, SessionStats};

use super::EgressManager;
use crate::{
    coordinator::{self, CoordinatorError, Role, Ticket, TicketRequest},
    daemon::{LeaseEnds, LeaseOver},
    supervisor::{TaskCtx, TaskError},
};

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
}

impl Host {
    /// One attempt.
    pub async fn run(self, ctx: TaskCtx) -> Result<(), TaskError> {
        let ended = self.ends.wait_for(&self.lease);
        tokio::pin!(ended);
        let connect = async {
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
            self.client
                .connect_bridge(&self.lease, Role::Host, &ticket.ticket)
                .await
        };
        let ws = tokio::select! {
            ws = connect => match ws {
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
        let config = HostConfig {
            stats: Arc::clone(&self.stats),
            ..HostConfig::default()
        };
        let served = tokio::select! {
            r = crabbox_egress::run_host(ws, Arc::clone(&self.policy), config) => r,
            _ = ctx.cancelled() => return Ok(()),
            reason = &mut ended => return self.over(reason).await,
        };
        match served {
            Ok(()) => Err(TaskError::retryable(anyhow::anyhow!("bridge closed"))),
            Err(e) => match e.class() {
                ErrorClass::Fatal(FatalReason::LeaseEnded) => {
                    let over = self.ends.learned(&self.lease, &e.to_string());
                    self.over(over).await
                }
                ErrorClass::Fatal(FatalReason::Replaced) => {
                    self.end();
                    Err(TaskError::fatal(e))
                }
                ErrorClass::Retryable => Err(TaskError::retryable(e)),
            },
        }
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
