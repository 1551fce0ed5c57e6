//! The `crabbox.daemon.v1.Daemon` service: status, the task table,
//! diagnostics, log level and shutdown. Each RPC reads or asks the daemon's
//! state and converts the answer; no business logic lives here.

use std::{pin::Pin, process};

use crabbox_api::{v1, version};
use futures::{Stream, StreamExt};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::{convert, error};
use crate::{daemon::DaemonState, diagnostics, supervisor::RegistryEvent, telemetry};

/// The service implementation.
#[derive(Debug, Clone)]
pub struct DaemonService {
    state: DaemonState,
    /// Ends open `WatchTasks` streams when the API stops, so they cannot
    /// hold graceful shutdown open.
    api_stop: CancellationToken,
}

impl DaemonService {
    pub fn new(state: DaemonState, api_stop: CancellationToken) -> Self {
        DaemonService { state, api_stop }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<v1::WatchTasksEvent, Status>> + Send>>;

#[tonic::async_trait]
impl v1::daemon_server::Daemon for DaemonService {
    async fn get_status(
        &self,
        _req: Request<v1::GetStatusRequest>,
    ) -> Result<Response<v1::GetStatusResponse>, Status> {
        tracing::debug!(rpc = "GetStatus", "api call");
        let config = self.state.config();
        let counts = self
            .state
            .supervisor()
            .registry()
            .counts()
            .into_iter()
            .map(|(state, count)| v1::TaskStateCount {
                state: convert::task_state(state) as i32,
                count,
            })
            .collect();
        let reply = v1::GetStatusResponse {
            version: version::VERSION.to_owned(),
            protocol: version::PROTOCOL,
            pid: process::id(),
            started_at: Some(convert::timestamp(self.state.started_at())),
            coordinator_url: config
                .coordinator
                .as_ref()
                .map(|c| c.url.as_str().trim_end_matches('/').to_owned())
                .unwrap_or_default(),
            coordinator_token_configured: config
                .coordinator
                .as_ref()
                .is_some_and(|c| c.token.is_some()),
            config_files: config
                .files
                .iter()
                .map(|f| v1::ConfigFile {
                    path: f.path.display().to_string(),
                    kind: convert::config_file_kind(f.kind) as i32,
                    loaded: f.mode.is_some(),
                    mode: f.mode.unwrap_or(0),
                })
                .collect(),
            task_counts: counts,
            socket_path: self.state.socket_path().display().to_string(),
            log_filter: telemetry::current_filter().unwrap_or_else(|| config.log_filter.clone()),
            phase: convert::phase(self.state.phase()) as i32,
            state_dir: config.state_dir.display().to_string(),
        };
        Ok(Response::new(reply))
    }

    async fn list_tasks(
        &self,
        req: Request<v1::ListTasksRequest>,
    ) -> Result<Response<v1::ListTasksResponse>, Status> {
        tracing::debug!(rpc = "ListTasks", "api call");
        let kind = convert::task_kind_filter(req.get_ref().kind());
        let tasks = self
            .state
            .supervisor()
            .registry()
            .list(kind)
            .iter()
            .map(convert::task)
            .collect();
        Ok(Response::new(v1::ListTasksResponse { tasks }))
    }

    type WatchTasksStream = WatchStream;

    async fn watch_tasks(
        &self,
        req: Request<v1::WatchTasksRequest>,
    ) -> Result<Response<Self::WatchTasksStream>, Status> {
        let kind = convert::task_kind_filter(req.get_ref().kind());
        let wanted = move |id: &crate::supervisor::TaskId| kind.is_none_or(|k| id.kind == k);
        let (snapshot, rx) = self.state.supervisor().registry().watch();
        let first = v1::WatchTasksEvent {
            event: Some(v1::watch_tasks_event::Event::Snapshot(v1::TaskSnapshot {
                tasks: snapshot
                    .iter()
                    .filter(|r| wanted(&r.id))
                    .map(convert::task)
                    .collect(),
            })),
        };
        let stop = self.api_stop.clone();
        let changes = futures::stream::unfold(Some(rx), move |rx| {
            let stop = stop.clone();
            async move {
                let mut rx = rx?;
                let event = loop {
                    let ev = tokio::select! {
                        ev = rx.recv() => ev,
                        _ = stop.cancelled() => return None,
                    };
                    match &ev {
                        Ok(RegistryEvent::Upsert(r)) if !wanted(&r.id) => continue,
                        Ok(RegistryEvent::Removed(id)) if !wanted(id) => continue,
                        _ => break ev,
                    }
                };
                let item = match event {
                    Ok(RegistryEvent::Upsert(r)) => Ok(v1::WatchTasksEvent {
                        event: Some(v1::watch_tasks_event::Event::Upsert(convert::task(&r))),
                    }),
                    Ok(RegistryEvent::Removed(id)) => Ok(v1::WatchTasksEvent {
                        event: Some(v1::watch_tasks_event::Event::Removed(v1::TaskRemoved {
                            id: id.to_string(),
                        })),
                    }),
                    Err(RecvError::Lagged(n)) => {
                        // Never skip silently: say how much was missed and end.
                        return Some((
                            Err(Status::resource_exhausted(format!(
                                "this watcher fell behind by {n} task changes; watch again for a fresh snapshot"
                            ))),
                            None,
                        ));
                    }
                    Err(RecvError::Closed) => return None,
                };
                Some((item, Some(rx)))
            }
        });
        let stream = futures::stream::once(async move { Ok(first) }).chain(changes);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn run_diagnostics(
        &self,
        _req: Request<v1::RunDiagnosticsRequest>,
    ) -> Result<Response<v1::RunDiagnosticsResponse>, Status> {
        let checks = diagnostics::run(&self.state).await;
        Ok(Response::new(v1::RunDiagnosticsResponse {
            checks: checks.iter().map(convert::check).collect(),
        }))
    }

    async fn shutdown(
        &self,
        req: Request<v1::ShutdownRequest>,
    ) -> Result<Response<v1::ShutdownResponse>, Status> {
        let reason = match req.get_ref().reason.trim() {
            "" => "Shutdown RPC".to_owned(),
            r => format!("Shutdown RPC: {r}"),
        };
        tracing::info!(%reason, "shutdown requested");
        self.state.request_shutdown(&reason);
        Ok(Response::new(v1::ShutdownResponse {
            grace: Some(convert::duration(self.state.config().shutdown_grace)),
        }))
    }

    async fn set_log_level(
        &self,
        req: Request<v1::SetLogLevelRequest>,
    ) -> Result<Response<v1::SetLogLevelResponse>, Status> {
        let filter = req.into_inner().filter;
        let previous = telemetry::set_filter(&filter).map_err(error::log)?;
        tracing::info!(%previous, current = %filter, "log filter changed");
        Ok(Response::new(v1::SetLogLevelResponse {
            previous,
            current: filter,
        }))
    }
}
