//! The `crabbox.daemon.v1.Egress` service: host bridges and tickets through
//! the `EgressManager`.

use crabbox_api::v1;
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

#[tonic::async_trait]
impl v1::egress_server::Egress for EgressService {
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
                .ticket(id, convert::egress_role(role), session)
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
