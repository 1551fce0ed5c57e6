//! The typed client: connects to crabboxd over its Unix socket, stamps every
//! call with this client's version, and reads the daemon's version back from
//! response metadata.

use std::{
    io,
    path::{Path, PathBuf},
    sync::Arc,
};

use hyper_util::rt::TokioIo;
use tonic::{
    metadata::{MetadataMap, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, Endpoint, Uri},
};

use crate::{
    v1::{
        self, daemon_client::DaemonClient, desktop_client::DesktopClient,
        egress_client::EgressClient, leases_client::LeasesClient, runs_client::RunsClient,
        ssh_client::SshClient,
    },
    version::{self, Skew},
};

/// The Unix-socket channel with version metadata added to every request;
/// every generated service client of the API runs over one of these.
pub type ApiChannel = InterceptedService<Channel, VersionInterceptor>;

/// HTTP/2 flow-control window of one API stream, both ends (daemon and
/// client). h2's default of 64 KiB made a stream of 64 KiB messages (`exec`
/// stdin, a command's output) wait for a window update after each message;
/// this lets a few megabytes be in flight, still a bound on what one client
/// can have queued in the daemon.
pub const STREAM_WINDOW: u32 = 2 << 20;
/// See [`STREAM_WINDOW`]: the whole connection, all its streams together.
pub const CONNECTION_WINDOW: u32 = 8 << 20;
/// The largest HTTP/2 frame either end accepts: h2's 16 KiB default cut a
/// streamed upload into a write and a read per 16 KiB.
pub const MAX_FRAME: u32 = 256 << 10;

/// A connected client of the local API: one HTTP/2 connection, shared by a
/// generated client per service (`daemon()`, `leases()`, `egress()`,
/// `runs()`, `ssh()`). Each accessor is cheap: it clones the channel handle.
#[derive(Debug, Clone)]
pub struct Client {
    channel: ApiChannel,
    socket: PathBuf,
}

/// Why a connection to the daemon could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Nothing exists at the socket path: the daemon is not running (or uses
    /// another path).
    #[error("cannot reach crabboxd at {}: no socket there (is the daemon running?)", path.display())]
    NotRunning {
        /// The socket path tried.
        path: PathBuf,
    },
    /// A socket file exists but nothing accepts on it: the daemon exited
    /// without cleaning up, or is starting.
    #[error("cannot reach crabboxd at {}: connection refused (the daemon is not running; a stale socket is left)", path.display())]
    Refused {
        /// The socket path tried.
        path: PathBuf,
    },
    /// The socket (or its directory) belongs to someone else.
    #[error("cannot reach crabboxd at {}: permission denied (the socket belongs to another user)", path.display())]
    PermissionDenied {
        /// The socket path tried.
        path: PathBuf,
    },
    /// Any other failure, with its cause.
    #[error("cannot reach crabboxd at {}: {source}", path.display())]
    Other {
        /// The socket path tried.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl ConnectError {
    /// The socket path that was tried.
    pub fn path(&self) -> &Path {
        match self {
            ConnectError::NotRunning { path }
            | ConnectError::Refused { path }
            | ConnectError::PermissionDenied { path }
            | ConnectError::Other { path, .. } => path,
        }
    }

    fn classify(path: PathBuf, err: tonic::transport::Error) -> Self {
        // tonic wraps the connector's io::Error; walk the source chain to
        // find it so the CLI can say what is wrong rather than "transport error".
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&err);
        while let Some(e) = cause {
            if let Some(io) = e.downcast_ref::<io::Error>() {
                return match io.kind() {
                    io::ErrorKind::NotFound => ConnectError::NotRunning { path },
                    io::ErrorKind::ConnectionRefused => ConnectError::Refused { path },
                    io::ErrorKind::PermissionDenied => ConnectError::PermissionDenied { path },
                    _ => ConnectError::Other {
                        path,
                        source: Box::new(io::Error::new(io.kind(), io.to_string())),
                    },
                };
            }
            cause = e.source();
        }
        ConnectError::Other {
            path,
            source: Box::new(err),
        }
    }
}

impl Client {
    /// Connects to the daemon listening on `socket`.
    ///
    /// The connection is made eagerly so that a missing daemon is reported
    /// here, as a [`ConnectError`] naming the path, rather than on the first
    /// call.
    pub async fn connect(socket: impl AsRef<Path>) -> Result<Self, ConnectError> {
        let socket = socket.as_ref().to_path_buf();
        let path = Arc::new(socket.clone());
        // The URI is never dialled; the connector below ignores it and opens
        // the Unix socket instead. HTTP/2 still needs an authority.
        // The API's HTTP/2 windows and frame size, as the daemon serves them.
        let endpoint = Endpoint::from_static("http://crabboxd.sock")
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME);
        let channel = endpoint
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = Arc::clone(&path);
                async move {
                    let stream = tokio::net::UnixStream::connect(path.as_path()).await?;
                    Ok::<_, io::Error>(TokioIo::new(stream))
                }
            }))
            .await
            .map_err(|e| ConnectError::classify(socket.clone(), e))?;
        let channel = InterceptedService::new(channel, VersionInterceptor);
        Ok(Client { channel, socket })
    }

    /// The `Daemon` service: status, tasks, diagnostics, log level, shutdown.
    pub fn daemon(&self) -> DaemonClient<ApiChannel> {
        DaemonClient::new(self.channel.clone())
    }

    /// The `Leases` service: keeping, releasing and heartbeating leases.
    pub fn leases(&self) -> LeasesClient<ApiChannel> {
        LeasesClient::new(self.channel.clone())
    }

    /// The `Egress` service: host bridges and helper tickets.
    pub fn egress(&self) -> EgressClient<ApiChannel> {
        EgressClient::new(self.channel.clone())
    }

    /// The `Runs` service: following runs.
    pub fn runs(&self) -> RunsClient<ApiChannel> {
        RunsClient::new(self.channel.clone())
    }

    /// The channel itself, for a generated client of any other service of
    /// the package (`FooClient::new(client.channel())`).
    pub fn channel(&self) -> ApiChannel {
        self.channel.clone()
    }

    /// The `Ssh` service: commands, copies and OpenSSH details for leases.
    pub fn ssh(&self) -> SshClient<ApiChannel> {
        SshClient::new(self.channel.clone())
    }

    /// The `Desktop` service: programs launched in a lease's display.
    pub fn desktop(&self) -> DesktopClient<ApiChannel> {
        DesktopClient::new(self.channel.clone())
    }

    /// The socket path this client is connected to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Calls `GetStatus` and compares the daemon's version with this
    /// client's.
    pub async fn status(&self) -> Result<(v1::GetStatusResponse, Skew), tonic::Status> {
        let reply = self.daemon().get_status(v1::GetStatusRequest {}).await?;
        let skew = skew_of(reply.metadata()).unwrap_or_else(|| {
            let status = reply.get_ref();
            Skew::of(&status.version, status.protocol)
        });
        Ok((reply.into_inner(), skew))
    }
}

/// Reads the daemon's version and protocol from a reply's metadata and
/// compares them with this client's. `None` when the daemon sent none.
pub fn skew_of(metadata: &MetadataMap) -> Option<Skew> {
    let daemon = metadata.get(version::DAEMON_VERSION_KEY)?.to_str().ok()?;
    let protocol = metadata
        .get(version::PROTOCOL_KEY)?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    Some(Skew::of(daemon, protocol))
}

/// Adds this client's version and protocol to every request.
#[derive(Debug, Clone, Copy, Default)]
pub struct VersionInterceptor;

impl Interceptor for VersionInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let md = req.metadata_mut();
        md.insert(
            version::CLIENT_VERSION_KEY,
            MetadataValue::from_static(version::VERSION),
        );
        md.insert(
            version::PROTOCOL_KEY,
            MetadataValue::from(version::PROTOCOL),
        );
        Ok(req)
    }
}
