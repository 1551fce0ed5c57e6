//! The local API: tonic services on the Unix socket, one per domain and one
//! file each — `daemon.rs` (`Daemon`), `leases.rs` (`Leases`), `egress.rs`
//! (`Egress`), `runs.rs` (`Runs`), `ssh.rs` (`Ssh`), `desktop.rs`
//! (`Desktop`). This module is the only one that knows
//! the proto types (`crabbox_api::v1`); it converts to and from domain types
//! in `convert`, maps domain errors to `tonic::Status` in `error`, checks
//! the peer uid of every connection (`peer`), and stamps every reply with
//! the daemon's version.

mod convert;
mod daemon;
mod desktop;
mod egress;
mod error;
mod leases;
mod peer;
mod runs;
mod ssh;

use crabbox_api::{
    v1::{
        daemon_server::DaemonServer, desktop_server::DesktopServer, egress_server::EgressServer,
        leases_server::LeasesServer, runs_server::RunsServer, ssh_server::SshServer,
    },
    version,
};
use tokio_util::sync::CancellationToken;
use tonic::{body::Body, transport::Server};

use crate::daemon::DaemonState;

// The API's HTTP/2 windows and frame size, the same on the client's end.
use crabbox_api::client::{CONNECTION_WINDOW, MAX_FRAME, STREAM_WINDOW};

/// Serves the API on `listener` until `stop` is cancelled, then ends open
/// watch and attach streams, finishes in-flight calls and returns.
pub async fn serve(
    state: DaemonState,
    listener: tokio::net::UnixListener,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crabbox_api::v1::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    // grpcurl and older tools still ask the v1alpha reflection service.
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crabbox_api::v1::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let incoming = peer::same_user_connections(listener);
    Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .layer(tower::util::MapResponseLayer::new(stamp_version))
        .add_service(DaemonServer::new(daemon::DaemonService::new(
            state.clone(),
            stop.clone(),
        )))
        .add_service(LeasesServer::new(leases::LeasesService::new(state.clone())))
        .add_service(EgressServer::new(egress::EgressService::new(state.clone())))
        .add_service(RunsServer::new(runs::RunsService::new(
            state.clone(),
            stop.clone(),
        )))
        .add_service(SshServer::new(ssh::SshService::new(state.clone())))
        .add_service(DesktopServer::new(desktop::DesktopService::new(state)))
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
        .await?;
    Ok(())
}

/// Adds the daemon's version and protocol to every reply's initial
/// metadata, so a client can detect a skew from any call.
fn stamp_version(mut resp: http::Response<Body>) -> http::Response<Body> {
    let headers = resp.headers_mut();
    headers.insert(
        version::DAEMON_VERSION_KEY,
        http::HeaderValue::from_static(version::VERSION),
    );
    headers.insert(
        version::PROTOCOL_KEY,
        http::HeaderValue::from(version::PROTOCOL),
    );
    resp
}
