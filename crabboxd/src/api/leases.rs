//! The `crabbox.daemon.v1.Leases` service: keeping, releasing and
//! heartbeating leases through the `LeaseManager`.

use crabbox_api::v1;
use tonic::{Request, Response, Status};

use super::{
    convert,
    error::{self, lease_id},
};
use crate::{
    daemon::DaemonState,
    supervisor::{TaskId, TaskKind},
};

/// The service implementation.
#[derive(Debug, Clone)]
pub struct LeasesService {
    state: DaemonState,
}

impl LeasesService {
    pub fn new(state: DaemonState) -> Self {
        LeasesService { state }
    }
}

#[tonic::async_trait]
impl v1::leases_server::Leases for LeasesService {
    async fn keep_lease(
        &self,
        req: Request<v1::KeepLeaseRequest>,
    ) -> Result<Response<v1::KeepLeaseResponse>, Status> {
        let req = req.into_inner();
        let id = lease_id(&req.lease_id)?;
        let idle = convert::idle_timeout(req.idle_timeout)?;
        let url = error::coordinator_url(&self.state);
        let status = error::within_deadline(&url, async {
            self.state
                .leases()
                .keep(id, idle)
                .await
                .map_err(|e| error::lease(e, &url))
        })
        .await?;
        let rec = self
            .state
            .supervisor()
            .registry()
            .get(&TaskId::new(TaskKind::LeaseKeeper, status.id.as_str()));
        Ok(Response::new(v1::KeepLeaseResponse {
            lease: Some(convert::kept_lease(&status, rec.as_ref())),
        }))
    }

    async fn release_lease(
        &self,
        req: Request<v1::ReleaseLeaseRequest>,
    ) -> Result<Response<v1::ReleaseLeaseResponse>, Status> {
        let req = req.into_inner();
        let id = lease_id(&req.lease_id)?;
        let url = error::coordinator_url(&self.state);
        let lease = error::within_deadline(&url, async {
            self.state
                .leases()
                .release(id, req.delete)
                .await
                .map_err(|e| error::lease(e, &url))
        })
        .await?;
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
            .map_err(|e| error::lease(e, &error::coordinator_url(&self.state)))?;
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
        let id = lease_id(&req.lease_id)?;
        let idle = convert::idle_timeout(req.idle_timeout)?;
        let url = error::coordinator_url(&self.state);
        let lease = error::within_deadline(&url, async {
            self.state
                .leases()
                .heartbeat_once(id, idle)
                .await
                .map_err(|e| error::lease(e, &url))
        })
        .await?;
        Ok(Response::new(v1::HeartbeatResponse {
            lease: Some(convert::lease(&lease)),
        }))
    }
}
