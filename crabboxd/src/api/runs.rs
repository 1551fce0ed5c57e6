//! The `crabbox.daemon.v1.Runs` service: `Attach`, a subscription to a
//! run's shared `AttachFeed` (snapshot after the cursor, then live events,
//! then the end).

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
