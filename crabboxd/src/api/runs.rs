//! The `crabbox.daemon.v1.Runs` service: `Attach`, a subscription to a
//! run's shared `AttachFeed` (snapshot after the cursor, then live events,
//! then the end); `StartRun`, `ListRuns` and `StopRun` over the daemon's
//! `RunManager`.

use std::pin::Pin;

use crabbox_api::v1;
use futures::{Stream, StreamExt};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::{convert, error};
use crate::{
    attach::{FeedItem, RunEnd},
    coordinator::RunEvent,
    daemon::DaemonState,
    run::{self, RunOutput},
};

/// The service implementation.
#[derive(Debug, Clone)]
pub struct RunsService {
    state: DaemonState,
    /// Ends open attach streams when the API stops, so they cannot hold
    /// graceful shutdown open.
    api_stop: CancellationToken,
}

impl RunsService {
    pub fn new(state: DaemonState, api_stop: CancellationToken) -> Self {
        RunsService { state, api_stop }
    }
}

type AttachStream = Pin<Box<dyn Stream<Item = Result<v1::AttachEvent, Status>> + Send>>;
type StartRunStream = Pin<Box<dyn Stream<Item = Result<v1::StartRunResponse, Status>> + Send>>;

fn finished(f: &run::Finished) -> v1::RunFinished {
    v1::RunFinished {
        outcome: match f.outcome {
            run::Outcome::Succeeded => v1::RunOutcome::Succeeded,
            run::Outcome::Failed => v1::RunOutcome::Failed,
            run::Outcome::Unknown => v1::RunOutcome::Unknown,
        } as i32,
        exit_code: f.exit_code,
        signal: f.signal.clone().unwrap_or_default(),
        detail: f.detail.clone().unwrap_or_default(),
        events_posted: f.events_posted,
        events_dropped: f.events_dropped,
        output_truncated: f.output_truncated,
        output_bytes: f.output_bytes,
    }
}

fn started(s: run::Started) -> v1::StartRunResponse {
    v1::StartRunResponse {
        event: Some(v1::start_run_response::Event::Started(v1::RunStarted {
            run_id: s.run_id,
            lease_id: s.lease_id,
            slug: s.slug.unwrap_or_default(),
            forwarded: s
                .forwarded
                .into_iter()
                .map(|f| v1::ForwardedEnv {
                    name: f.name,
                    empty: f.empty,
                    secret: f.secret,
                    len: f.len as u64,
                })
                .collect(),
            env_summary: s.env_summary,
            proxy: s.proxy.unwrap_or_default(),
        })),
    }
}

fn output(o: RunOutput) -> v1::StartRunResponse {
    use v1::start_run_response::Event;
    v1::StartRunResponse {
        event: Some(match o {
            RunOutput::Stdout(b) => Event::Stdout(b.to_vec()),
            RunOutput::Stderr(b) => Event::Stderr(b.to_vec()),
            RunOutput::Finished(f) => Event::Finished(finished(&f)),
        }),
    }
}

fn event(e: &RunEvent) -> v1::AttachEvent {
    v1::AttachEvent {
        event: Some(v1::attach_event::Event::RunEvent(convert::run_event(e))),
    }
}

fn end(e: &RunEnd) -> v1::AttachEvent {
    v1::AttachEvent {
        event: Some(v1::attach_event::Event::End(convert::run_end(e))),
    }
}

#[tonic::async_trait]
impl v1::runs_server::Runs for RunsService {
    type AttachStream = AttachStream;
    type StartRunStream = StartRunStream;

    async fn start_run(
        &self,
        req: Request<v1::StartRunRequest>,
    ) -> Result<Response<Self::StartRunStream>, Status> {
        let req = req.into_inner();
        let lease = error::lease_id(&req.lease_id)?.to_owned();
        tracing::debug!(rpc = "StartRun", lease = %lease, "api call");
        let detach = req.detach;
        let request = run::RunRequest {
            lease,
            argv: req.argv,
            cwd: (!req.cwd.is_empty()).then_some(req.cwd),
            label: (!req.label.is_empty()).then_some(req.label),
            client_env: req
                .client_env
                .into_iter()
                .map(|v| (v.name, v.value))
                .collect(),
            env_allow: req.env_allow,
            allow_env: req.allow_env,
            egress: req.egress,
            agent: convert::agent_socket(&req.agent_socket),
        };
        let url = error::coordinator_url(&self.state);
        // No deadline over the whole start: the coordinator calls have
        // theirs, the SSH checks theirs (an SSH connect may take longer
        // than a coordinator answer should), and a run the coordinator
        // created is finished on every way out.
        //
        // The start runs beside this request, so a client hanging up cannot
        // cut it between the coordinator's answer and the run's task; the
        // start sees the client gone and finishes the run it created.
        let (tx, done) = tokio::sync::oneshot::channel();
        let runs = self.state.runs().clone();
        self.state
            .supervisor()
            .spawn_cleanup("start a run", async move {
                let result = runs.start(request, || tx.is_closed()).await;
                let _ = tx.send(result);
            });
        let (first, rx) = done
            .await
            .map_err(|_| {
                Status::unavailable("the daemon stopped while starting the run; run it again")
            })?
            .map_err(|e| error::run(e, &url))?;
        let head = futures::stream::once(futures::future::ready(Ok(started(first))));
        if detach {
            return Ok(Response::new(Box::pin(head)));
        }
        // The client's stream only reads the run's output; dropping it
        // (the client went away) leaves the run going.
        let stop = self.api_stop.clone();
        let rest = tokio_stream::wrappers::ReceiverStream::new(rx)
            .map(|o| Ok(output(o)))
            .take_until(async move { stop.cancelled().await });
        Ok(Response::new(Box::pin(head.chain(rest))))
    }

    async fn list_runs(
        &self,
        _req: Request<v1::ListRunsRequest>,
    ) -> Result<Response<v1::ListRunsResponse>, Status> {
        let runs = self
            .state
            .runs()
            .list()
            .into_iter()
            .map(|r| v1::RunInfo {
                run_id: r.run_id,
                lease_id: r.lease_id,
                argv: r.argv,
                label: r.label.unwrap_or_default(),
                started_at: Some(convert::timestamp(r.started_at)),
                ended_at: r.ended_at.map(convert::timestamp),
                running: r.finished.is_none(),
                finished: r.finished.as_ref().map(finished),
            })
            .collect();
        Ok(Response::new(v1::ListRunsResponse { runs }))
    }

    async fn stop_run(
        &self,
        req: Request<v1::StopRunRequest>,
    ) -> Result<Response<v1::StopRunResponse>, Status> {
        let req = req.into_inner();
        let run = req.run_id.trim().to_owned();
        if run.is_empty() {
            return Err(Status::invalid_argument("a run id is required"));
        }
        let url = error::coordinator_url(&self.state);
        let was_running = self
            .state
            .runs()
            .stop(&run, convert::signal(req.signal))
            .await
            .map_err(|e| error::run(e, &url))?;
        Ok(Response::new(v1::StopRunResponse { was_running }))
    }

    async fn attach(
        &self,
        req: Request<v1::AttachRequest>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let req = req.into_inner();
        let run = req.run_id.trim().to_owned();
        if run.is_empty() {
            return Err(Status::invalid_argument("a run id is required"));
        }
        let url = error::coordinator_url(&self.state);
        let sub = error::within_deadline(&url, async {
            self.state
                .attach()
                .subscribe(&run, req.after)
                .await
                .map_err(|e| error::attach(e, &url))
        })
        .await?;
        let mut last = req.after;
        let mut first: Vec<Result<v1::AttachEvent, Status>> = sub
            .snapshot
            .iter()
            .map(|e| {
                last = e.seq;
                Ok(event(e))
            })
            .collect();
        if let Some(e) = &sub.end {
            first.push(Ok(end(e)));
            return Ok(Response::new(Box::pin(futures::stream::iter(first))));
        }
        let stop = self.api_stop.clone();
        let live = futures::stream::unfold(Some((sub.rx, last)), move |st| {
            let stop = stop.clone();
            async move {
                let (mut rx, last) = st?;
                loop {
                    let item = tokio::select! {
                        item = rx.recv() => item,
                        _ = stop.cancelled() => return None,
                    };
                    return match item {
                        // The snapshot already covered it (sent before this
                        // receiver was read).
                        Ok(FeedItem::Event(e)) if e.seq <= last => continue,
                        Ok(FeedItem::Event(e)) => Some((Ok(event(&e)), Some((rx, e.seq)))),
                        Ok(FeedItem::End(e)) => Some((Ok(end(&e)), None)),
                        Err(RecvError::Lagged(n)) => Some((
                            Err(Status::resource_exhausted(format!(
                                "this client fell behind by {n} events; attach again with --after {last}"
                            ))),
                            None,
                        )),
                        Err(RecvError::Closed) => None,
                    };
                }
            }
        });
        let stream = futures::stream::iter(first).chain(live);
        Ok(Response::new(Box::pin(stream)))
    }
}
