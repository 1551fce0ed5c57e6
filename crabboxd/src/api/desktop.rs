//! The `Desktop` service: programs launched in a lease's display (the
//! browser, through the lease's egress helper).

use crabbox_api::v1;
use tonic::{Request, Response, Status};

use super::{
    convert,
    error::{self, lease_id},
};
use crate::daemon::DaemonState;

/// The `crabbox.daemon.v1.Desktop` service.
#[derive(Debug, Clone)]
pub struct DesktopService {
    state: DaemonState,
}

impl DesktopService {
    /// The service over the daemon's shared state.
    pub fn new(state: DaemonState) -> Self {
        DesktopService { state }
    }
}

#[tonic::async_trait]
impl v1::desktop_server::Desktop for DesktopService {
    async fn launch_browser(
        &self,
        req: Request<v1::LaunchBrowserRequest>,
    ) -> Result<Response<v1::LaunchBrowserResponse>, Status> {
        let req = req.into_inner();
        let id = lease_id(&req.lease_id)?;
        let url = error::coordinator_url(&self.state);
        let agent = convert::agent_socket(&req.agent_socket);
        let l = self
            .state
            .egress()
            .launch_browser(id, req.url.trim(), agent)
            .await
            .map_err(|e| error::egress(e, &url))?;
        Ok(Response::new(v1::LaunchBrowserResponse {
            argv: l.argv,
            pid: l.pid,
            proxy: l.proxy,
            session_id: l.session,
            profile_dir: l.profile_dir,
        }))
    }
}
