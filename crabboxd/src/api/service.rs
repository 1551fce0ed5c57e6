//! The `crabbox.daemon.v1.Daemon` service: each RPC reads or asks the
//! daemon's state and converts the answer; no business logic lives here.

use std::{pin::Pin, process};

use crabbox_api::{v1, version};
use futures::{Stream, StreamExt};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::convert;
use crate::{
    coordinator::CoordinatorError,
    daemon::DaemonState,
    diagnostics,
    egress::{EgressError, EgressSpec},
    lease::LeaseError,
    supervisor::RegistryEvent,
    telemetry::{self, LogError},
};

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

/// Maps a domain error to a status with a message a person can act on. Every
/// error the API returns goes through here.
fn status_of_log_error(e: LogError) -> Status {
    match e {
        LogError::Invalid { .. } => Status::invalid_argument(e.to_string()),
        LogError::NotInitialised => Status::failed_precondition(e.to_string()),
    }
}

/// Maps a lease operation's error to a status. Coordinator answers keep
/// their meaning: 404 → NOT_FOUND, 403 → PERMISSION_DENIED, 409 (lease
/// ended, expired, conflicts) → FAILED_PRECONDITION, network and 5xx →
/// UNAVAILABLE (retry later).
fn status_of_lease_error(e: LeaseError) -> Status {
    let msg = e.to_string();
    match e {
        LeaseError::NoCoordinator => Status::failed_precondition(msg),
        LeaseError::NotKept(_) => Status::not_found(msg),
        LeaseError::Persist { .. } => Status::internal(msg),
        LeaseError::Coordinator(c) => match &c {
            CoordinatorError::Status { status: 404, .. } => Status::not_found(msg),
            CoordinatorError::Status { status: 401, .. } => Status::unauthenticated(msg),
            CoordinatorError::Status { status: 403, .. } => Status::permission_denied(msg),
            CoordinatorError::Status { status: 400, .. } => Status::invalid_argument(msg),
            _ if c.is_retryable() => Status::unavailable(msg),
            _ => Status::failed_precondition(msg),
        },
    }
}

/// Maps an egress operation's error to a status, like lease errors.
fn status_of_egress_error(e: EgressError) -> Status {
    let msg = e.to_string();
    match e {
        EgressError::NoCoordinator => Status::failed_precondition(msg),
        EgressError::Policy(_) => Status::invalid_argument(msg),
        EgressError::NotRunning(_) => Status::not_found(msg),
        EgressError::WouldReplace { .. } => Status::failed_precondition(msg),
        EgressError::Persist(_) => Status::internal(msg),
        EgressError::Coordinator(c) => status_of_lease_error(LeaseError::Coordinator(c)),
    }
}

fn lease_id(raw: &str) -> Result<&str, Status> {
    let id = raw.trim();
    if id.is_empty() {
        return Err(Status::invalid_argument("a lease id is required"));
    }
    Ok(id)
}

fn idle(seconds: u64) -> Option<std::time::Duration> {
    (seconds > 0).then(|| std::time::Duration::from_secs(seconds))
}

type AttachStream = Pin<Box<dyn Stream<Item = Result<v1::AttachEvent, Status>> + Send>>;

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
            started_at_unix_ms: convert::unix_ms(self.state.started_at()),
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
            grace_ms: self.state.config().shutdown_grace.as_millis() as u64,
        }))
    }

    async fn keep_lease(
        &self,
        req: Request<v1::KeepLeaseRequest>,
    ) -> Result<Response<v1::KeepLeaseResponse>, Status> {
        let req = req.into_inner();
        let id = lease_id(&req.lease_id)?;
        let status = self
            .state
            .leases()
            .keep(id, idle(req.idle_timeout_seconds))
            .await
            .map_err(status_of_lease_error)?;
        let rec = self
            .state
            .supervisor()
            .registry()
            .get(&crate::supervisor::TaskId::new(
                crate::supervisor::TaskKind::LeaseKeeper,
                status.id.as_str(),
            ));
        Ok(Response::new(v1::KeepLeaseResponse {
            lease: Some(convert::kept_lease(&status, rec.as_ref())),
        }))
    }

    async fn release_lease(
        &self,
        req: Request<v1::ReleaseLeaseRequest>,
    ) -> Result<Response<v1::ReleaseLeaseResponse>, Status> {
        let req = req.into_inner();
        let lease = self
            .state
            .leases()
            .release(lease_id(&req.lease_id)?, req.delete)
            .await
            .map_err(status_of_lease_error)?;
        Ok(Response::new(v1::ReleaseLeaseResponse {
            lease: Some(convert::lease(&lease)),
        }))
    }

    async fn stop_keeping_lease(
        &self,
        req: Request<v1::StopKeepingLeaseRequest>,
    ) -> Result<Response<v1::StopKeepingLeaseResponse>, Status> {
        self.state
            .leases()
            .stop(lease_id(&req.get_ref().lease_id)?)
            .await
            .map_err(status_of_lease_error)?;
        Ok(Response::new(v1::StopKeepingLeaseResponse {}))
    }

    async fn list_leases(
        &self,
        _req: Request<v1::ListLeasesRequest>,
    ) -> Result<Response<v1::ListLeasesResponse>, Status> {
        let leases = self
            .state
            .leases()
            .list()
            .await
            .iter()
            .map(|(s, rec)| convert::kept_lease(s, rec.as_ref()))
            .collect();
        Ok(Response::new(v1::ListLeasesResponse { leases }))
    }

    async fn heartbeat(
        &self,
        req: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        let req = req.into_inner();
        let lease = self
            .state
            .leases()
            .heartbeat_once(lease_id(&req.lease_id)?, idle(req.idle_timeout_seconds))
            .await
            .map_err(status_of_lease_error)?;
        Ok(Response::new(v1::HeartbeatResponse {
            lease: Some(convert::lease(&lease)),
        }))
    }

    async fn start_egress_host(
        &self,
        req: Request<v1::StartEgressHostRequest>,
    ) -> Result<Response<v1::StartEgressHostResponse>, Status> {
        let req = req.into_inner();
        let spec = EgressSpec {
            lease: lease_id(&req.lease_id)?.to_owned(),
            profiles: req.profiles,
            allow: req.allow,
            allow_private: req.allow_private,
            session: Some(req.session_id).filter(|s| !s.trim().is_empty()),
        };
        let info = self
            .state
            .egress()
            .start(spec)
            .await
            .map_err(status_of_egress_error)?;
        Ok(Response::new(v1::StartEgressHostResponse {
            host: Some(convert::egress_host(&info)),
        }))
    }

    async fn get_egress_status(
        &self,
        req: Request<v1::GetEgressStatusRequest>,
    ) -> Result<Response<v1::GetEgressStatusResponse>, Status> {
        let report = self
            .state
            .egress()
            .status(lease_id(&req.get_ref().lease_id)?)
            .await
            .map_err(status_of_egress_error)?;
        let (coordinator, coordinator_error) = match &report.coordinator {
            Ok(s) => (Some(convert::coordinator_egress(s)), String::new()),
            Err(e) => (None, e.clone()),
        };
        Ok(Response::new(v1::GetEgressStatusResponse {
            local: report.local.as_ref().map(convert::egress_host),
            coordinator,
            coordinator_error,
        }))
    }

    async fn stop_egress_host(
        &self,
        req: Request<v1::StopEgressHostRequest>,
    ) -> Result<Response<v1::StopEgressHostResponse>, Status> {
        self.state
            .egress()
            .stop(lease_id(&req.get_ref().lease_id)?)
            .await
            .map_err(status_of_egress_error)?;
        Ok(Response::new(v1::StopEgressHostResponse {}))
    }

    async fn list_egress_hosts(
        &self,
        _req: Request<v1::ListEgressHostsRequest>,
    ) -> Result<Response<v1::ListEgressHostsResponse>, Status> {
        let hosts = self
            .state
            .egress()
            .list()
            .await
            .iter()
            .map(convert::egress_host)
            .collect();
        Ok(Response::new(v1::ListEgressHostsResponse { hosts }))
    }

    async fn mint_egress_ticket(
        &self,
        req: Request<v1::MintEgressTicketRequest>,
    ) -> Result<Response<v1::MintEgressTicketResponse>, Status> {
        let req = req.into_inner();
        let role = match req.role.as_str() {
            "client" | "" => crate::coordinator::Role::Client,
            "host" => crate::coordinator::Role::Host,
            other => {
                return Err(Status::invalid_argument(format!(
                    "role must be client or host, not {other:?}"
                )));
            }
        };
        let session = Some(req.session_id).filter(|s| !s.trim().is_empty());
        let ticket = self
            .state
            .egress()
            .ticket(lease_id(&req.lease_id)?, role, session, req.replace)
            .await
            .map_err(status_of_egress_error)?;
        // The one place a ticket leaves the daemon: to its own user, who
        // asked for it over the private socket.
        Ok(Response::new(v1::MintEgressTicketResponse {
            ticket: ticket.ticket.expose().to_owned(),
            session_id: ticket.session_id,
            lease_id: ticket.lease_id,
            expires_at: ticket.expires_at,
        }))
    }

    type AttachStream = AttachStream;

    async fn attach(
        &self,
        req: Request<v1::AttachRequest>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        use crate::attach::{AttachError, FeedItem};
        let req = req.into_inner();
        let run = req.run_id.trim().to_owned();
        if run.is_empty() {
            return Err(Status::invalid_argument("a run id is required"));
        }
        let sub = self
            .state
            .attach()
            .subscribe(&run, req.after)
            .await
            .map_err(|e| match e {
                AttachError::NoCoordinator => Status::failed_precondition(e.to_string()),
                AttachError::TooOld(_) => Status::out_of_range(e.to_string()),
            })?;
        let ev = |e: &crate::coordinator::RunEvent| v1::AttachEvent {
            event: Some(v1::attach_event::Event::RunEvent(convert::run_event(e))),
        };
        let end = |e: &crate::attach::RunEnd| v1::AttachEvent {
            event: Some(v1::attach_event::Event::End(convert::run_end(e))),
        };
        let mut last = req.after;
        let mut first: Vec<Result<v1::AttachEvent, Status>> = sub
            .snapshot
            .iter()
            .map(|e| {
                last = e.seq;
                Ok(ev(e))
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
                let item = tokio::select! {
                    item = rx.recv() => item,
                    _ = stop.cancelled() => return None,
                };
                match item {
                    // The snapshot already covered it (sent before this
                    // receiver was read).
                    Ok(FeedItem::Event(e)) if e.seq <= last => Some((Ok(v1::AttachEvent { event: None }), Some((rx, last)))),
                    Ok(FeedItem::Event(e)) => {
                        let seq = e.seq;
                        Some((Ok(ev(&e)), Some((rx, seq))))
                    }
                    Ok(FeedItem::End(e)) => Some((Ok(end(&e)), None)),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => Some((
                        Err(Status::resource_exhausted(format!(
                            "this client fell behind by {n} events; attach again with --after {last}"
                        ))),
                        None,
                    )),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => None,
                }
            }
        })
        .filter(|item| futures::future::ready(!matches!(item, Ok(v1::AttachEvent { event: None }))));
        let stream = futures::stream::iter(first).chain(live);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn set_log_level(
        &self,
        req: Request<v1::SetLogLevelRequest>,
    ) -> Result<Response<v1::SetLogLevelResponse>, Status> {
        let filter = req.into_inner().filter;
        let previous = telemetry::set_filter(&filter).map_err(status_of_log_error)?;
        tracing::info!(%previous, current = %filter, "log filter changed");
        Ok(Response::new(v1::SetLogLevelResponse {
            previous,
            current: filter,
        }))
    }
}
