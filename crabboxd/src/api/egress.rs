//! The `crabbox.daemon.v1.Egress` service: host bridges and tickets through
//! the `EgressManager`.

use std::pin::Pin;

use crabbox_api::v1;
use futures::{Stream, StreamExt as _};
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};

use super::{
    convert,
    error::{self, lease_id},
};
use crate::{daemon::DaemonState, egress::EgressSpec};

/// The service implementation.
#[derive(Debug, Clone)]
pub struct EgressService {
    state: DaemonState,
}

impl EgressService {
    pub fn new(state: DaemonState) -> Self {
        EgressService { state }
    }
}

fn started(s: &crate::egress::start::Started) -> v1::EgressStarted {
    v1::EgressStarted {
        lease_id: s.host.spec.lease.clone(),
        session_id: s.host.spec.session.clone().unwrap_or_default(),
        summary: s.host.summary.clone(),
        endpoint: s.remote.listen.clone(),
        proxy: format!("http://{}", s.remote.listen),
        pid: s.remote.pid,
        version: s.remote.version.clone(),
        arch: s.remote.arch.clone(),
        helper_path: s.remote.helper.clone(),
        uploaded: s.uploaded,
        state_file: s.state_file.clone(),
        host: Some(convert::egress_host(&s.host)),
        profiles: s.host.spec.profiles.clone(),
        allow: s.allow.clone(),
        transport: s.host.transport.clone(),
    }
}

/// The progress stream of `StartEgress`.
type StartStream = Pin<Box<dyn Stream<Item = Result<v1::StartEgressEvent, Status>> + Send>>;

#[tonic::async_trait]
impl v1::egress_server::Egress for EgressService {
    type StartEgressStream = StartStream;

    async fn start_egress(
        &self,
        req: Request<v1::StartEgressRequest>,
    ) -> Result<Response<Self::StartEgressStream>, Status> {
        let req = req.into_inner();
        let start = crate::egress::start::StartRequest {
            lease: lease_id(&req.lease_id)?.to_owned(),
            profiles: req.profiles,
            allow: req.allow,
            allow_private: req.allow_private,
            listen: req.listen,
            coordinator_url: req.coordinator_url,
            transport: req.transport,
            agent: convert::agent_socket(&req.agent_socket),
        };
        let (steps_tx, steps_rx) = mpsc::channel(16);
        let (done_tx, done_rx) = oneshot::channel();
        let url = error::coordinator_url(&self.state);
        let egress = self.state.egress().clone();
        // The start runs beside the request, so a client that hangs up
        // cannot cut it half way: it ends (or undoes itself) either way, and
        // a failure after its mint is recorded in the task table. Steps go
        // to the client on one channel (at most seven, so a client that
        // stops reading never holds the start), then the outcome.
        self.state
            .supervisor()
            .spawn_cleanup("egress start", async move {
                let result = egress.start_over_ssh(start, &steps_tx).await;
                drop(steps_tx);
                let _ = done_tx.send(result);
            });
        let steps =
            tokio_stream::wrappers::ReceiverStream::new(steps_rx).map(|s| Ok(step_event(s)));
        let end = futures::stream::once(async move {
            match done_rx.await {
                Ok(Ok(s)) => Ok(v1::StartEgressEvent {
                    event: Some(v1::start_egress_event::Event::Started(started(&s))),
                }),
                Ok(Err(e)) => Err(error::egress(e, &url)),
                Err(_) => Err(Status::unavailable(
                    "the daemon stopped during egress start; run it again",
                )),
            }
        });
        Ok(Response::new(Box::pin(steps.chain(end))))
    }

    async fn stop_egress(
        &self,
        req: Request<v1::StopEgressRequest>,
    ) -> Result<Response<v1::StopEgressResponse>, Status> {
        let req = req.into_inner();
        let id = lease_id(&req.lease_id)?;
        let url = error::coordinator_url(&self.state);
        let out = self
            .state
            .egress()
            .stop_over_ssh(id, convert::agent_socket(&req.agent_socket))
            .await
            .map_err(|e| error::egress(e, &url))?;
        Ok(Response::new(v1::StopEgressResponse {
            host_stopped: out.host,
            helper_stopped: out.helper_pid.is_some(),
            helper_pid: out.helper_pid.unwrap_or(0),
            session_id: out.session.unwrap_or_default(),
            state_removed: out.state_removed,
            lease_error: out.lease_error.unwrap_or_default(),
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
            remote: None,
        };
        let url = error::coordinator_url(&self.state);
        let info = error::within_deadline(&url, async {
            self.state
                .egress()
                .start(spec)
                .await
                .map_err(|e| error::egress(e, &url))
        })
        .await?;
        Ok(Response::new(v1::StartEgressHostResponse {
            host: Some(convert::egress_host(&info)),
        }))
    }

    async fn get_egress_status(
        &self,
        req: Request<v1::GetEgressStatusRequest>,
    ) -> Result<Response<v1::GetEgressStatusResponse>, Status> {
        let id = lease_id(&req.get_ref().lease_id)?;
        // The SSH transport involves no coordinator: the local view is all.
        if let Some(local) = self.state.egress().ssh_info(id) {
            return Ok(Response::new(v1::GetEgressStatusResponse {
                local: Some(convert::egress_host(&local)),
                coordinator: None,
                coordinator_error: String::new(),
            }));
        }
        let url = error::coordinator_url(&self.state);
        let report = error::within_deadline(&url, async {
            self.state
                .egress()
                .status(id)
                .await
                .map_err(|e| error::egress(e, &url))
        })
        .await?;
        let (coordinator, coordinator_error) = match &report.coordinator {
            Ok(s) => (Some(convert::coordinator_egress(s)), String::new()),
            // Without a local bridge the coordinator's answer is all there
            // is: an unknown lease is NOT_FOUND, an unreachable coordinator
            // UNAVAILABLE, rather than an empty report.
            Err(e) if report.local.is_none() => {
                return Err(error::coordinator(
                    e,
                    format!("egress status of lease {id}: {e}"),
                    &url,
                ));
            }
            Err(e) => (None, e.to_string()),
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
            .map_err(|e| error::egress(e, &error::coordinator_url(&self.state)))?;
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
        let role = match v1::EgressRole::try_from(req.role) {
            Ok(r) => r,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "role {} is not EGRESS_ROLE_CLIENT or EGRESS_ROLE_HOST",
                    req.role
                )));
            }
        };
        let session = Some(req.session_id).filter(|s| !s.trim().is_empty());
        let id = lease_id(&req.lease_id)?;
        let url = error::coordinator_url(&self.state);
        let ticket = error::within_deadline(&url, async {
            self.state
                .egress()
                .ticket(id, convert::egress_role(role), session, req.replace)
                .await
                .map_err(|e| error::egress(e, &url))
        })
        .await?;
        // The one place a ticket leaves the daemon: to its own user, who
        // asked for it over the private socket.
        Ok(Response::new(v1::MintEgressTicketResponse {
            ticket: ticket.ticket.expose().to_owned(),
            session_id: ticket.session_id,
            lease_id: ticket.lease_id,
            expires_at: convert::coordinator_time(Some(&ticket.expires_at)),
            role: match convert::egress_role(role) {
                crate::coordinator::Role::Host => v1::EgressRole::Host,
                crate::coordinator::Role::Client => v1::EgressRole::Client,
            } as i32,
        }))
    }
}

fn step_event(s: crate::egress::start::Step) -> v1::StartEgressEvent {
    v1::StartEgressEvent {
        event: Some(v1::start_egress_event::Event::Step(v1::EgressStep {
            number: s.number,
            name: s.name.to_owned(),
            detail: s.detail,
        })),
    }
}
