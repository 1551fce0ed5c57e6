//! The `AttachFeed` task: fills one run's feed, in order and without gaps,
//! from the control socket (subscribe, page through the backlog, ack) and
//! from `GET /v1/runs/{id}/events?after=` whenever the socket is missing,
//! fails, or pushes an event ahead of the cursor; while on HTTP it polls
//! and goes back to the socket once it is up. Ends with the run: on the
//! control path at `command.finished` (one confirming `GET /v1/runs/{id}`),
//! with only a slow backstop poll while the run is quiet.

use std::{sync::Arc, time::Duration};

use super::{Feed, RunEnd};
use crate::{
    control::ControlChannel,
    coordinator::{self, CoordinatorError, RunEvent},
    supervisor::{TaskCtx, TaskError},
};

/// The control page size (the reference CLI's).
const PAGE: u32 = 100;
/// The HTTP page size: the control page's, so one page in flight is at most
/// ~1.6 MiB of 16 KiB events (the coordinator allows 500).
const HTTP_PAGE: u32 = 100;
/// How often the HTTP fallback polls.
const POLL: Duration = Duration::from_millis(500);
/// How long the control path waits for a page or a push before checking
/// whether the run ended without its `command.finished` reaching us.
const BACKSTOP: Duration = Duration::from_secs(30);
/// The events after which a run is over (the coordinator's own
/// `command.finished`, and the CLI's `run.failed`).
const FINAL_EVENTS: [&str; 2] = ["command.finished", "run.failed"];
/// How long the control path waits for the first page before falling back.
const FIRST_PAGE_WAIT: Duration = Duration::from_secs(5);

/// One feed's inputs.
#[derive(Clone)]
pub struct Worker {
    pub client: coordinator::Client,
    pub control: Option<ControlChannel>,
    pub run: String,
    pub feed: Arc<Feed>,
}

impl Worker {
    /// One attempt: control first, HTTP after any socket trouble, until the
    /// run ends (clean end) or cannot be read (fatal).
    pub async fn run(self, ctx: TaskCtx) -> Result<(), TaskError> {
        ctx.running();
        // Control when the socket is up; otherwise one HTTP round, then try
        // the socket again (it may have connected meanwhile).
        let work = async {
            loop {
                if let Some(control) = &self.control
                    && let Some(end) = self.follow_control(control, &ctx).await?
                {
                    return Ok(end);
                }
                ctx.set_label("via", "http");
                self.pull(None).await?;
                if let Some(end) = self.ended().await? {
                    return Ok(end);
                }
                tokio::time::sleep(POLL).await;
            }
        };
        let end = tokio::select! {
            end = work => end.map_err(|e| self.classify(e))?,
            _ = ctx.cancelled() => return Ok(()),
        };
        tracing::info!(state = %end.state, exit_code = ?end.exit_code, "run ended");
        self.feed.finish(end);
        Ok(())
    }

    /// Follows the control subscription. `Ok(None)`: the socket is not
    /// usable; continue over HTTP from the feed's cursor.
    async fn follow_control(
        &self,
        control: &ControlChannel,
        ctx: &TaskCtx,
    ) -> Result<Option<RunEnd>, CoordinatorError> {
        let Ok(mut rx) = control
            .subscribe_run(&self.run, self.feed.cursor(), PAGE)
            .await
        else {
            return Ok(None);
        };
        ctx.set_label("via", "control");
        let mut first = true;
        let result = loop {
            let wait = if first { FIRST_PAGE_WAIT } else { BACKSTOP };
            match tokio::time::timeout(wait, rx.recv()).await {
                Ok(Some(events)) => {
                    first = false;
                    let page_len = events.len();
                    let mut finished = false;
                    for event in events {
                        finished |= FINAL_EVENTS.contains(&event.kind.as_str());
                        self.accept(event).await?;
                    }
                    // The run said it is over: confirm once and end.
                    if finished && let Some(end) = self.ended().await? {
                        break Ok(Some(end));
                    }
                    let cursor = self.feed.cursor();
                    if control.ack_run(&self.run, cursor).await.is_err() {
                        break Ok(None);
                    }
                    // A full page means more backlog: ask for the next one.
                    // Pushes that arrive meanwhile are merged by sequence.
                    if page_len >= PAGE as usize
                        && control
                            .resubscribe_run(&self.run, cursor, PAGE)
                            .await
                            .is_err()
                    {
                        break Ok(None);
                    }
                }
                // The socket dropped, or this feed fell behind its queue.
                Ok(None) => break Ok(None),
                Err(_) if first => break Ok(None),
                Err(_) => {
                    if let Some(end) = self.ended().await? {
                        break Ok(Some(end));
                    }
                }
            }
        };
        control.unsubscribe_run(&self.run);
        result
    }

    /// Adds an event in order: duplicates are dropped; an event ahead of the
    /// cursor (a push that skipped a backlog) first pulls the gap over HTTP.
    async fn accept(&self, event: RunEvent) -> Result<(), CoordinatorError> {
        let cursor = self.feed.cursor();
        if event.seq <= cursor {
            return Ok(());
        }
        if event.seq > cursor + 1 {
            self.fill_gap(event.seq - 1).await?;
        }
        if event.seq == self.feed.cursor() + 1 {
            self.feed.push(event);
        }
        Ok(())
    }

    async fn fill_gap(&self, up_to: u64) -> Result<(), CoordinatorError> {
        self.pull(Some(up_to)).await
    }

    /// Pulls pages over HTTP from the cursor, appending events in order
    /// (up to `up_to` when given), until a page brings nothing new.
    async fn pull(&self, up_to: Option<u64>) -> Result<(), CoordinatorError> {
        while up_to.is_none_or(|u| self.feed.cursor() < u) {
            let before = self.feed.cursor();
            let page = self.client.run_events(&self.run, before, HTTP_PAGE).await?;
            for e in page {
                if e.seq == self.feed.cursor() + 1 && up_to.is_none_or(|u| e.seq <= u) {
                    self.feed.push(e);
                }
            }
            if self.feed.cursor() == before {
                break;
            }
        }
        Ok(())
    }

    /// When the run is no longer running: drain the last events over HTTP
    /// and return its end.
    async fn ended(&self) -> Result<Option<RunEnd>, CoordinatorError> {
        let run = self.client.run(&self.run).await?;
        if run.is_running() {
            return Ok(None);
        }
        self.pull(None).await?;
        Ok(Some(RunEnd {
            state: run.state,
            exit_code: run.exit_code,
        }))
    }

    fn classify(&self, e: CoordinatorError) -> TaskError {
        if e.is_retryable() {
            TaskError::retryable(e)
        } else {
            // The run cannot be read (404, 403): tell subscribers and stop.
            self.feed.finish(RunEnd {
                state: format!("unknown ({e})"),
                exit_code: None,
            });
            TaskError::fatal(e)
        }
    }
}
