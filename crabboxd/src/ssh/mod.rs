//! SSH multiplexers: one supervised russh connection per lease
//! (`SshMux{lease}`), shared by every command and copy through it.
//!
//! * [`target`] — where a lease's sshd is (coordinator record or a static
//!   `[targets.<name>]`) and the per-lease files.
//! * [`hostkey`] — pinned host keys enforced exactly, else trust on first
//!   use into the per-lease `known_hosts`.
//! * [`conn`] — dialling the port candidates, the handshake, authentication,
//!   and the client handler that refuses server-opened channels.
//! * [`mux`] — the `SshMux` task: connect on demand, keepalive, idle close,
//!   reconnect with the supervisor's backoff, lease end.
//! * [`exec`] — one command per channel, run at most once, in its own
//!   process group that cancelling kills.
//! * [`copy`] — files and directories both ways over exec channels (an
//!   uploaded regular file as raw bytes into `cat`, trees and downloads as
//!   tar streams), atomic on the far side.
//! * [`forward`] — local forwards: a loopback listener per
//!   `SshForward{lease:local}` task, each connection a tunnel.
//! * [`remote_forward`] — remote forwards (`tcpip-forward`) on 127.0.0.1
//!   of the lease, for the SSH egress transport: refusals diagnosed,
//!   loopback verified, only requested channels accepted.
//! * [`shell`] — interactive shells under a PTY.
//! * [`tunnel`] — byte streams to a TCP address or Unix socket on the
//!   lease (`direct-tcpip`, `direct-streamlocal`), for forwards and helpers.
//! * [`SshManager`] — finds or starts a lease's mux and runs requests on it.

pub mod conn;
pub mod copy;
pub mod exec;
pub mod forward;
pub mod hostkey;
pub mod mux;
pub mod remote_forward;
pub mod shell;
pub mod target;
pub mod tunnel;

use std::{collections::BTreeMap, path::PathBuf, sync::Arc, time::Duration};

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;

use crate::{
    config::Config,
    coordinator,
    daemon::LeaseEnds,
    supervisor::{Backoff, RestartPolicy, Supervisor, TaskHandle, TaskId, TaskKind},
};

pub use exec::{Command, Exit, Input, Output, Signal};
pub use hostkey::HostKeyError;
pub use target::Target;

/// How long a command waits for its lease's connection.
pub const CONNECT_WAIT: Duration = Duration::from_secs(60);

/// Why an SSH operation failed. Messages name the lease, host and port (and
/// files), never key material or the agent socket.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SshError {
    /// No target for the id.
    #[error("{0}")]
    NoTarget(String),
    /// No port answered.
    #[error("{0}")]
    Unreachable(String),
    /// The host key was refused.
    #[error(transparent)]
    HostKey(#[from] HostKeyError),
    /// Authentication failed.
    #[error("{0}")]
    Auth(String),
    /// No usable key.
    #[error("{0}")]
    NoKey(String),
    /// The connection was lost.
    #[error("{0}")]
    Lost(String),
    /// A channel failed.
    #[error("{0}")]
    Channel(String),
    /// The lease is over.
    #[error("{0}")]
    LeaseEnded(String),
    /// The request is invalid.
    #[error("{0}")]
    Invalid(String),
    /// A copy failed.
    #[error("{0}")]
    Copy(String),
    /// A forward cannot start (its port is taken, …).
    #[error("{0}")]
    Forward(String),
    /// No such forward.
    #[error("{0}")]
    NotFound(String),
}

impl SshError {
    /// Whether retrying cannot help (the mux task stops instead of backing
    /// off).
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            SshError::NoTarget(_)
                | SshError::HostKey(_)
                | SshError::Auth(_)
                | SshError::NoKey(_)
                | SshError::LeaseEnded(_)
                | SshError::Invalid(_)
                | SshError::Forward(_)
                | SshError::NotFound(_)
        )
    }
}

/// One command to run.
#[derive(Debug, Clone)]
pub struct ExecSpec {
    /// The lease id or static target name.
    pub lease: String,
    /// What to run.
    pub command: Command,
    /// The remote working directory.
    pub cwd: Option<String>,
    /// The calling client's SSH agent socket, if any.
    pub agent: Option<PathBuf>,
}

/// What `crabboxctl ssh --print` needs to build an OpenSSH command line.
#[derive(Debug, Clone)]
pub struct TargetInfo {
    /// The target.
    pub target: Target,
    /// The per-lease key, when present.
    pub key: Option<PathBuf>,
    /// The per-lease known_hosts.
    pub known_hosts: PathBuf,
    /// The host-key alias used in it.
    pub alias: String,
    /// The port the live connection uses, if connected.
    pub port_in_use: Option<u16>,
}

struct Entry {
    shared: Arc<mux::Shared>,
    handle: TaskHandle,
}

struct ForwardEntry {
    lease: String,
    local: std::net::SocketAddr,
    remote: tunnel::Endpoint,
    stats: Arc<forward::ForwardStats>,
    handle: TaskHandle,
}

impl ForwardEntry {
    fn info(&self, id: &str) -> forward::ForwardInfo {
        forward::ForwardInfo::new(id, &self.lease, self.local, &self.remote, &self.stats)
    }
}

/// Finds or starts the `SshMux` of a lease and runs work on it. Cheap to
/// clone.
#[derive(Clone)]
pub struct SshManager {
    supervisor: Supervisor,
    resolver: mux::Resolver,
    ends: LeaseEnds,
    muxes: Arc<tokio::sync::Mutex<BTreeMap<String, Entry>>>,
    forwards: Arc<tokio::sync::Mutex<BTreeMap<String, ForwardEntry>>>,
}

impl std::fmt::Debug for SshManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshManager").finish_non_exhaustive()
    }
}

/// Muxes reconnect with network backoff (when work arrives); host-key,
/// authentication and lease-end failures are fatal until the next request.
const POLICY: RestartPolicy = RestartPolicy::Always(Backoff::NETWORK);

impl SshManager {
    /// A manager for the daemon's configuration.
    pub fn new(
        config: &Config,
        coordinator: Option<coordinator::Client>,
        supervisor: Supervisor,
        ends: LeaseEnds,
    ) -> Self {
        SshManager {
            supervisor,
            resolver: mux::Resolver {
                coordinator,
                statics: Arc::new(config.ssh_targets.clone()),
                default_key: config.ssh_key.clone(),
                config_dir: config.config_dir.clone(),
                idle_close: config.ssh_idle_close.unwrap_or(mux::IDLE_CLOSE),
                keepalive: config
                    .ssh_keepalive_interval
                    .unwrap_or(conn::KEEPALIVE)
                    .max(conn::KEEPALIVE_MIN),
                stall: config
                    .ssh_stall_timeout
                    .unwrap_or(conn::STALL)
                    .max(conn::STALL_MIN),
            },
            ends,
            muxes: Arc::new(tokio::sync::Mutex::new(BTreeMap::new())),
            forwards: Arc::new(tokio::sync::Mutex::new(BTreeMap::new())),
        }
    }

    /// The lease's mux, started if it is not running.
    async fn mux(&self, lease: &str) -> Result<Arc<mux::Shared>, SshError> {
        target::check_lease_id(lease).map_err(|e| SshError::Invalid(e.to_string()))?;
        let mut muxes = self.muxes.lock().await;
        if let Some(e) = muxes.get(lease)
            && !e.handle.is_finished()
        {
            return Ok(Arc::clone(&e.shared));
        }
        let shared = Arc::new(mux::Shared::new(lease));
        let task = mux::MuxTask {
            shared: Arc::clone(&shared),
            resolver: self.resolver.clone(),
            ends: self.ends.clone(),
        };
        let labels = BTreeMap::from([("lease".to_owned(), lease.to_owned())]);
        let handle = self
            .supervisor
            .replace(
                TaskId::new(TaskKind::SshMux, lease),
                labels,
                POLICY,
                move |ctx| task.clone().run(ctx),
            )
            .await;
        muxes.insert(
            lease.to_owned(),
            Entry {
                shared: Arc::clone(&shared),
                handle,
            },
        );
        Ok(shared)
    }

    /// A live connection to the lease, connecting if needed.
    pub async fn connection(
        &self,
        lease: &str,
        agent: Option<PathBuf>,
    ) -> Result<Arc<conn::Conn>, SshError> {
        self.connection_within(lease, agent, CONNECT_WAIT).await
    }

    /// A live connection to the lease, waiting at most `wait` for it.
    pub async fn connection_within(
        &self,
        lease: &str,
        agent: Option<PathBuf>,
        wait: Duration,
    ) -> Result<Arc<conn::Conn>, SshError> {
        let shared = self.mux(lease).await?;
        if let Some(a) = agent {
            *shared.agent.lock().unwrap() = Some(a);
        }
        shared.conn(wait).await
    }

    /// Starts a local forward as an `SshForward{lease:local}` task, once
    /// the lease's connection is up (so a wrong lease or key is reported
    /// here, not on the first connection).
    pub async fn start_forward(
        &self,
        mut spec: forward::ForwardSpec,
    ) -> Result<forward::ForwardInfo, SshError> {
        target::check_lease_id(&spec.lease).map_err(|e| SshError::Invalid(e.to_string()))?;
        forward::check_local(&spec.local)?;
        let conn = self.connection(&spec.lease, spec.agent.clone()).await?;
        let listener = crabbox_egress::proxy::listen::bind(spec.local)
            .map_err(|e| SshError::Forward(format!("cannot listen on {}: {e}", spec.local)))?;
        spec.local = listener
            .local_addr()
            .map_err(|e| SshError::Forward(format!("cannot listen on {}: {e}", spec.local)))?;
        let id = format!("{}:{}", spec.lease, spec.local);
        let stats = Arc::new(forward::ForwardStats::default());
        let task = Arc::new(forward::ForwardTask {
            manager: self.clone(),
            spec: spec.clone(),
            listener: std::sync::Mutex::new(Some(listener)),
            stats: Arc::clone(&stats),
            mux_stats: Arc::clone(&conn.stats),
            ends: self.ends.clone(),
        });
        drop(conn);
        let labels = BTreeMap::from([
            ("lease".to_owned(), spec.lease.clone()),
            ("local".to_owned(), spec.local.to_string()),
            ("remote".to_owned(), spec.remote.to_string()),
        ]);
        let mut forwards = self.forwards.lock().await;
        forwards.retain(|_, f| !f.handle.is_finished());
        let handle = self
            .supervisor
            .start(
                TaskId::new(TaskKind::SshForward, id.clone()),
                labels,
                RestartPolicy::Never,
                move |ctx| Arc::clone(&task).run(ctx),
            )
            .await
            .map_err(|e| SshError::Forward(e.to_string()))?;
        let entry = ForwardEntry {
            lease: spec.lease,
            local: spec.local,
            remote: spec.remote,
            stats,
            handle,
        };
        let info = entry.info(&id);
        forwards.insert(id, entry);
        Ok(info)
    }

    /// The running forwards (of one lease, when given), by id.
    pub async fn list_forwards(&self, lease: Option<&str>) -> Vec<forward::ForwardInfo> {
        let mut forwards = self.forwards.lock().await;
        forwards.retain(|_, f| !f.handle.is_finished());
        forwards
            .iter()
            .filter(|(_, f)| lease.is_none_or(|l| f.lease == l))
            .map(|(id, f)| f.info(id))
            .collect()
    }

    /// Stops a forward by id, or by lease and local address.
    pub async fn stop_forward(
        &self,
        id: Option<&str>,
        by_addr: Option<(&str, std::net::SocketAddr)>,
    ) -> Result<forward::ForwardInfo, SshError> {
        let mut forwards = self.forwards.lock().await;
        forwards.retain(|_, f| !f.handle.is_finished());
        let key = forwards
            .iter()
            .find(|(k, f)| {
                id.is_some_and(|i| i == k.as_str())
                    || by_addr.is_some_and(|(l, a)| f.lease == l && f.local == a)
            })
            .map(|(k, _)| k.clone());
        let Some(key) = key else {
            let what = match (id, by_addr) {
                (Some(i), _) => format!("no forward {i:?} is running"),
                (None, Some((l, a))) => format!("no forward of {l} listens on {a}"),
                (None, None) => "no forward was named".to_owned(),
            };
            return Err(SshError::NotFound(format!(
                "{what} (see `crabboxctl forward list`)"
            )));
        };
        let entry = forwards.remove(&key).expect("found above");
        drop(forwards);
        let info = entry.info(&key);
        entry.handle.stop().await;
        tracing::info!(forward = %key, "forward stopped");
        Ok(info)
    }

    /// Runs one command; the stream ends after `Output::Exit` or an error.
    pub fn exec(
        &self,
        spec: ExecSpec,
        input: impl Stream<Item = Input> + Send + Unpin + 'static,
    ) -> impl Stream<Item = Result<Output, SshError>> + Send + 'static {
        let (tx, rx) = mpsc::channel(32);
        let this = self.clone();
        let fut = async move {
            let conn = match this.connection(&spec.lease, spec.agent.clone()).await {
                Ok(c) => c,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            exec::run(
                this.supervisor.clone(),
                conn,
                spec.command,
                spec.cwd,
                input,
                tx,
            )
            .await;
        };
        self.detached("ssh-exec", fut, rx)
    }

    /// Runs `fut` as a task of its own (not inside the response stream, so
    /// its stall deadlines run while the client is not reading) and streams
    /// what it sends; dropping the stream aborts it.
    fn detached<T: Send + 'static>(
        &self,
        what: &'static str,
        fut: impl std::future::Future<Output = ()> + Send + 'static,
        rx: mpsc::Receiver<T>,
    ) -> impl Stream<Item = T> + Send + 'static {
        let task =
            tokio_util::task::AbortOnDropHandle::new(self.supervisor.spawn_request(what, fut));
        futures::stream::unfold((rx, task), |(mut rx, task)| async move {
            rx.recv().await.map(|item| (item, (rx, task)))
        })
    }

    /// Runs an interactive shell under a PTY; the stream ends after
    /// `ShellOutput::Exit` or an error.
    pub fn shell(
        &self,
        spec: shell::ShellSpec,
        input: impl Stream<Item = shell::ShellInput> + Send + Unpin + 'static,
    ) -> impl Stream<Item = Result<shell::ShellOutput, SshError>> + Send + 'static {
        let (tx, rx) = mpsc::channel(32);
        let this = self.clone();
        let fut = async move {
            let conn = match this.connection(&spec.lease, spec.agent.clone()).await {
                Ok(c) => c,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            shell::run(this.supervisor.clone(), conn, spec, input, tx).await;
        };
        self.detached("ssh-shell", fut, rx)
    }

    /// Copies files or a directory tree to or from a lease.
    pub fn copy(
        &self,
        spec: copy::CopySpec,
    ) -> impl Stream<Item = Result<copy::Progress, SshError>> + Send + 'static {
        let (tx, rx) = mpsc::channel(32);
        let this = self.clone();
        let fut = async move {
            let conn = match this.connection(&spec.lease, spec.agent.clone()).await {
                Ok(c) => c,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            if let Err(e) = copy::run(&this.supervisor, conn, spec, &tx).await {
                let _ = tx.send(Err(e)).await;
            }
        };
        crate::drive::drive(fut, rx)
    }

    /// The stall deadline (`[ssh] stall_timeout`): how long a channel's data
    /// may wait for a reader that stopped reading before that channel is
    /// closed.
    pub fn stall_timeout(&self) -> Duration {
        self.resolver.stall
    }

    /// Opens a byte stream to `to` as the lease sees it, over the lease's
    /// mux (connecting if needed).
    pub async fn tunnel(
        &self,
        lease: &str,
        agent: Option<PathBuf>,
        to: &tunnel::Endpoint,
    ) -> Result<tunnel::Tunnel, SshError> {
        let conn = self.connection(lease, agent).await?;
        tunnel::open(conn, to).await
    }

    /// The per-lease key file of `lease` (used when present).
    pub fn lease_key_path(&self, lease: &str) -> PathBuf {
        self.resolver.files(lease).key
    }

    /// What the per-lease known_hosts holds, checked against the target's
    /// pin (for `doctor`).
    pub fn audit_host_keys(&self, target: &Target) -> Result<hostkey::Audit, SshError> {
        let files = self.resolver.files(&target.lease);
        Ok(hostkey::HostKeys::new(&target.lease, files, target.pin.as_deref())?.audit())
    }

    /// The lease's target and per-lease files, for an OpenSSH command line.
    pub async fn target_info(&self, lease: &str) -> Result<TargetInfo, SshError> {
        target::check_lease_id(lease).map_err(|e| SshError::Invalid(e.to_string()))?;
        let target = self.resolver.resolve(lease).await?;
        let files = self.resolver.files(lease);
        if let Some(pin) = &target.pin {
            hostkey::HostKeys::new(lease, files.clone(), Some(pin))?.install_pin()?;
        }
        let port_in_use = {
            let muxes = self.muxes.lock().await;
            muxes
                .get(lease)
                .and_then(|e| match &*e.shared.state.borrow() {
                    mux::State::Up(c) if !c.handle.is_closed() => Some(c.port),
                    _ => None,
                })
        };
        Ok(TargetInfo {
            key: files
                .key
                .is_file()
                .then(|| files.key.clone())
                .or_else(|| target.configured_key.clone()),
            known_hosts: files.known_hosts.clone(),
            alias: files.alias.clone(),
            target,
            port_in_use,
        })
    }
}

/// Adapts a fallible input stream: an error (the client went away) is a
/// cancel with SIGTERM, after which the stream stays pending — never an
/// end, which would be an EOF on the command's stdin and let it take cut-off
/// input for complete before the kill lands. Only a clean end of the stream
/// ends it.
pub fn input_until_error<S, E>(s: S) -> impl Stream<Item = Input> + Send + Unpin + 'static
where
    S: Stream<Item = Result<Input, E>> + Send + Unpin + 'static,
    E: 'static,
{
    futures::stream::unfold((s, false), |(mut s, failed)| async move {
        if failed {
            return std::future::pending().await;
        }
        match s.next().await {
            Some(Ok(i)) => Some((i, (s, false))),
            Some(Err(_)) => Some((Input::Cancel(Signal::Term), (s, true))),
            None => None,
        }
    })
    .boxed()
}
