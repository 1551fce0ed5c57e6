//! One authenticated SSH connection: dialling the port candidates (each
//! with its own deadline; the next port only after a TCP connect, ident or
//! key-exchange failure), the host-key check, authentication (per-lease
//! key, configured key, then the caller's agent), and the russh client
//! handler that refuses every channel the server opens.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use russh::{
    ChannelOpenFailure,
    client::{self, ChannelOpenHandle, Handle, Msg, Session},
    keys::{PrivateKeyWithHashAlg, PublicKey, agent::client::AgentClient},
};
use tokio::{net::TcpStream, sync::Semaphore, time::Instant};

use super::{
    SshError,
    hostkey::{HostKeyError, HostKeys},
    target::{LeaseFiles, Target},
};
use crate::supervisor::Supervisor;

/// Deadline of one TCP connect.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of the SSH ident and key exchange on one port.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// Deadline of authentication.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(20);
/// Keepalive interval (OpenSSH `ServerAliveInterval=15`); `[ssh]
/// keepalive_interval` changes it.
pub const KEEPALIVE: Duration = Duration::from_secs(15);
/// The shortest keepalive interval configuration may set.
pub const KEEPALIVE_MIN: Duration = Duration::from_millis(200);
/// Missed keepalives before the connection is dead (`ServerAliveCountMax=2`).
pub const KEEPALIVE_MAX: usize = 2;
/// Concurrent command channels per connection. OpenSSH's `MaxSessions` is
/// 10; two are kept back for the kill channels of cancelled commands.
pub const COMMAND_SESSIONS: usize = 8;
/// Concurrent control channels (process-group kills) per connection.
pub const CONTROL_SESSIONS: usize = 2;
/// How long a channel's output may wait for a reader that stopped reading
/// (a forward's local peer, an interactive shell's client) before the
/// channel is closed; `[ssh] stall_timeout` changes it. Commands (`exec`,
/// runs) have none: a run outlives its client.
pub const STALL: Duration = Duration::from_secs(10);
/// The shortest stall deadline configuration may set.
pub const STALL_MIN: Duration = Duration::from_secs(1);
/// Messages russh queues per channel before its connection waits for the
/// channel's reader. russh grants window on receipt, not on consumption, so
/// this queue is the only backpressure: while one channel's queue is full,
/// the whole connection pauses, which the stall deadline bounds. At most
/// `CHANNEL_QUEUE` × [`MAX_PACKET`] bytes (2 MiB) wait per channel.
pub const CHANNEL_QUEUE: usize = 64;
/// The largest packet the server may send on a channel.
pub const MAX_PACKET: u32 = 32 * 1024;

/// Counters shared by a mux across its connections.
#[derive(Debug, Default)]
pub struct Stats {
    /// Bytes received from the lease (channel data).
    pub bytes_in: AtomicU64,
    /// Bytes sent to the lease (channel data).
    pub bytes_out: AtomicU64,
    /// Channels open now.
    pub channels: AtomicUsize,
    /// Forwards running now (a mux with one is never idle).
    pub forwards: AtomicUsize,
    /// Connections made after the first.
    pub reconnects: AtomicU64,
    /// Connections made.
    pub connects: AtomicU64,
    /// When the last channel closed (or the connection opened).
    pub idle_since: Mutex<Option<Instant>>,
}

/// Counts an open channel while alive.
#[derive(Debug)]
pub struct ChannelGuard {
    stats: Arc<Stats>,
}

impl ChannelGuard {
    /// Counts one more open channel.
    pub fn new(stats: &Arc<Stats>) -> Self {
        stats.channels.fetch_add(1, Ordering::SeqCst);
        ChannelGuard {
            stats: Arc::clone(stats),
        }
    }
}

impl Drop for ChannelGuard {
    fn drop(&mut self) {
        if self.stats.channels.fetch_sub(1, Ordering::SeqCst) == 1 {
            *self.stats.idle_since.lock().unwrap() = Some(Instant::now());
        }
    }
}

/// How long closing an abandoned channel may take.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Holds a channel's write half and closes the channel if the work using it
/// is dropped before the channel ended (its client went away): a dropped
/// russh channel is never closed by itself, so the far side would go on for
/// good — an upload's `cat` waiting for more input, a shell, a download's
/// `tar` streaming the whole tree into a receiver that is gone (russh drops
/// its data), hogging the lease's connection — each holding one of the
/// server's `MaxSessions`. The close is a short, bounded clean-up through
/// the supervisor.
pub struct CloseOnDrop {
    wr: Option<russh::ChannelWriteHalf<Msg>>,
    /// The channel's session permit and its count in the mux's stats, given
    /// back only once an abandoned channel's close was sent (or timed out),
    /// so the daemon never counts a session free that sshd still holds.
    held: Option<(tokio::sync::OwnedSemaphorePermit, ChannelGuard)>,
    ended: std::sync::atomic::AtomicBool,
    supervisor: Supervisor,
    lease: String,
    what: &'static str,
}

impl CloseOnDrop {
    /// Guards `wr`, the write half of a channel to `lease` doing `what`.
    pub fn new(
        supervisor: &Supervisor,
        wr: russh::ChannelWriteHalf<Msg>,
        lease: &str,
        what: &'static str,
    ) -> Self {
        CloseOnDrop {
            wr: Some(wr),
            held: None,
            ended: std::sync::atomic::AtomicBool::new(false),
            supervisor: supervisor.clone(),
            lease: lease.to_owned(),
            what,
        }
    }

    /// Also holds the channel's session permit and count until it is closed.
    pub fn holding(
        mut self,
        permit: tokio::sync::OwnedSemaphorePermit,
        guard: ChannelGuard,
    ) -> Self {
        self.held = Some((permit, guard));
        self
    }

    /// The channel has ended (the far side closed it): nothing to close.
    pub fn ended(&self) {
        self.ended.store(true, Ordering::Relaxed);
    }
}

impl std::ops::Deref for CloseOnDrop {
    type Target = russh::ChannelWriteHalf<Msg>;

    fn deref(&self) -> &Self::Target {
        self.wr.as_ref().expect("present until dropped")
    }
}

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        let Some(wr) = self.wr.take() else {
            return;
        };
        if self.ended.load(Ordering::Relaxed) {
            return;
        }
        tracing::info!(lease = %self.lease, channel = self.what, "the client went away; closing its channel");
        let held = self.held.take();
        self.supervisor
            .spawn_cleanup("close-abandoned-channel", async move {
                let _ = tokio::time::timeout(CLOSE_WAIT, async {
                    let _ = wr.eof().await;
                    let _ = wr.close().await;
                })
                .await;
                drop(held);
            });
    }
}

/// A live, authenticated connection.
pub struct Conn {
    /// The russh handle.
    pub handle: Handle<ClientHandler>,
    /// The target it reached.
    pub target: Target,
    /// The port in use.
    pub port: u16,
    /// Set when a port other than the first one answered.
    pub fallback: Option<String>,
    /// Permits for command channels (queueing beyond `MaxSessions`).
    pub sessions: Arc<Semaphore>,
    /// Permits for control channels.
    pub control: Arc<Semaphore>,
    /// Round-trip time of the last ping, in microseconds.
    pub rtt_us: AtomicU64,
    /// The mux's counters.
    pub stats: Arc<Stats>,
    /// The remote forwards this connection accepts channels for.
    pub remote_forwards: RemoteForwards,
    /// How long a channel's output may wait for its reader.
    pub stall: Duration,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("target", &self.target.display())
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

/// The russh client handler: checks the host key and refuses every channel
/// the server opens (no agent or X11 forwarding, no reverse channels that
/// were not asked for).
pub struct ClientHandler {
    keys: HostKeys,
    verdict: Arc<Mutex<Option<HostKeyError>>>,
    remote_forwards: RemoteForwards,
}

/// Where the channels of one remote forward go.
pub type ForwardedTx = tokio::sync::mpsc::Sender<russh::Channel<Msg>>;

/// The remote forwards (`tcpip-forward`) this daemon itself asked a
/// connection for: only a `forwarded-tcpip` channel for one of these
/// addresses is accepted (and handed to its receiver); every other one is
/// refused. Only the SSH egress transport registers one
/// ([`super::remote_forward`]).
#[derive(Debug, Clone, Default)]
pub struct RemoteForwards {
    inner: Arc<Mutex<RemoteForwardsInner>>,
}

#[derive(Debug, Default)]
struct RemoteForwardsInner {
    /// The receiver of each forward, with the registration it belongs to.
    routes: std::collections::BTreeMap<(String, u32), (u64, ForwardedTx)>,
    next: u64,
}

/// One registration of [`RemoteForwards::register`]: only it can remove its
/// entry again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registration(u64);

impl RemoteForwards {
    /// Accepts channels for `address:port` into `to`, from now on. Call it
    /// only for a forward the daemon requested on this connection. `None`
    /// when `address:port` is registered already (one forward per address).
    pub fn register(&self, address: &str, port: u32, to: ForwardedTx) -> Option<Registration> {
        let mut inner = self.inner.lock().unwrap();
        let key = (address.to_owned(), port);
        if inner.routes.contains_key(&key) {
            return None;
        }
        inner.next += 1;
        let id = inner.next;
        inner.routes.insert(key, (id, to));
        Some(Registration(id))
    }

    /// Stops accepting channels for `address:port`, if `reg` still holds it.
    pub fn unregister(&self, address: &str, port: u32, reg: Registration) {
        let mut inner = self.inner.lock().unwrap();
        let key = (address.to_owned(), port);
        if inner.routes.get(&key).is_some_and(|(id, _)| *id == reg.0) {
            inner.routes.remove(&key);
        }
    }

    pub(super) fn route(&self, address: &str, port: u32) -> Option<ForwardedTx> {
        self.inner
            .lock()
            .unwrap()
            .routes
            .get(&(address.to_owned(), port))
            .map(|(_, tx)| tx.clone())
    }
}

async fn refuse(what: &str, reply: ChannelOpenHandle) {
    tracing::warn!(channel = what, "refusing a channel the server opened");
    reply
        .reject(ChannelOpenFailure::AdministrativelyProhibited)
        .await;
}

impl client::Handler for ClientHandler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let key = match key {
            russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } => key.clone(),
            russh::keys::PublicKeyOrCertificate::Certificate(c) => {
                PublicKey::new(c.public_key().clone(), "")
            }
        };
        match self.keys.check(&key) {
            Ok(_) => Ok(true),
            Err(e) => {
                *self.verdict.lock().unwrap() = Some(e);
                Ok(false)
            }
        }
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: russh::Channel<Msg>,
        connected_address: &str,
        connected_port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Only for a remote forward this daemon requested, and only while
        // its receiver has room (bounded: a flood is refused, not queued).
        if let Some(to) = self
            .remote_forwards
            .route(connected_address, connected_port)
            && let Ok(permit) = to.try_reserve()
        {
            reply.accept().await;
            permit.send(channel);
            return Ok(());
        }
        // Peer text: logged quoted and cut, never raw.
        let address: String = connected_address.chars().take(64).collect();
        tracing::warn!(address = ?address, port = connected_port, "refusing a forwarded-tcpip channel for a forward this daemon did not request (or whose queue is full)");
        refuse("forwarded-tcpip", reply).await;
        Ok(())
    }

    async fn server_channel_open_forwarded_streamlocal(
        &mut self,
        _channel: russh::Channel<Msg>,
        _socket_path: &str,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        refuse("forwarded-streamlocal", reply).await;
        Ok(())
    }

    async fn server_channel_open_agent_forward(
        &mut self,
        _channel: russh::Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        refuse("auth-agent", reply).await;
        Ok(())
    }

    async fn server_channel_open_session(
        &mut self,
        _channel: russh::Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        refuse("session", reply).await;
        Ok(())
    }

    async fn server_channel_open_direct_tcpip(
        &mut self,
        _channel: russh::Channel<Msg>,
        _host_to_connect: &str,
        _port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        refuse("direct-tcpip", reply).await;
        Ok(())
    }

    async fn server_channel_open_direct_streamlocal(
        &mut self,
        _channel: russh::Channel<Msg>,
        _socket_path: &str,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        refuse("direct-streamlocal", reply).await;
        Ok(())
    }

    async fn server_channel_open_x11(
        &mut self,
        _channel: russh::Channel<Msg>,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        refuse("x11", reply).await;
        Ok(())
    }
}

/// How to authenticate.
#[derive(Debug, Clone)]
pub enum Credential {
    /// A private key file (never logged beyond its path).
    KeyFile(PathBuf),
    /// The caller's SSH agent socket (never logged).
    Agent(PathBuf),
}

/// Picks the credential: the per-lease key when present, else the
/// configured key, else the caller's agent if it is a socket owned by us.
pub fn credential(
    files: &LeaseFiles,
    target: &Target,
    agent: Option<&Path>,
) -> Result<Credential, SshError> {
    if files.key.is_file() {
        return Ok(Credential::KeyFile(files.key.clone()));
    }
    if let Some(k) = &target.configured_key {
        return Ok(Credential::KeyFile(k.clone()));
    }
    if let Some(a) = agent {
        if agent_socket_ok(a) {
            return Ok(Credential::Agent(a.to_owned()));
        }
        return Err(SshError::NoKey(format!(
            "no SSH key for {}: {} does not exist, no key is configured ([ssh] key or [targets.{}] key in crabboxd.toml), and the SSH agent socket of the calling client is not a socket owned by this user",
            target.lease,
            files.key.display(),
            target.lease
        )));
    }
    Err(SshError::NoKey(format!(
        "no SSH key for {}: {} does not exist, no key is configured ([ssh] key or [targets.{}] key in crabboxd.toml), and the calling client has no SSH agent (SSH_AUTH_SOCK)",
        target.lease,
        files.key.display(),
        target.lease
    )))
}

/// Whether `sock` is a socket owned by this user (the only agent sockets
/// the daemon uses).
pub fn agent_socket_ok(sock: &Path) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    std::fs::metadata(sock)
        .is_ok_and(|m| m.file_type().is_socket() && m.uid() == nix::unistd::geteuid().as_raw())
}

/// How many keys the agent at `sock` holds (for `doctor`).
pub async fn agent_keys(sock: &Path) -> Result<usize, String> {
    if !agent_socket_ok(sock) {
        return Err(
            "the SSH agent socket of the calling client is not a socket owned by this user".into(),
        );
    }
    let probe = async {
        let mut agent = AgentClient::connect_uds(sock)
            .await
            .map_err(|e| format!("cannot reach the SSH agent: {e}"))?;
        agent
            .request_identities()
            .await
            .map(|ids| ids.len())
            .map_err(|e| format!("the SSH agent failed: {e}"))
    };
    tokio::time::timeout(Duration::from_secs(5), probe)
        .await
        .unwrap_or_else(|_| Err("the SSH agent did not answer within 5 s".into()))
}

/// Whether an SSH server answers on `host:port`: its ident line, or why
/// not (for `doctor`; nothing is authenticated).
pub async fn probe_port(host: &str, port: u16) -> Result<String, String> {
    use tokio::io::AsyncReadExt as _;
    let mut s = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host, port))).await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err(format!("no answer within {CONNECT_TIMEOUT:?}")),
    };
    let mut buf = vec![0u8; 256];
    let mut got = 0;
    let read = async {
        while got < buf.len() {
            let n = s.read(&mut buf[got..]).await.map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            got += n;
            if buf[..got].contains(&b'\n') {
                break;
            }
        }
        Ok::<_, String>(())
    };
    match tokio::time::timeout(Duration::from_secs(5), read).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err("connected, but no SSH ident within 5 s".into()),
    }
    let text = String::from_utf8_lossy(&buf[..got]);
    match text.lines().find(|l| l.starts_with("SSH-")) {
        Some(l) => Ok(l
            .trim()
            .chars()
            .filter(|c| !c.is_control())
            .take(80)
            .collect()),
        None => Err("connected, but the answer is not SSH".into()),
    }
}

/// Ciphers in order of preference: AES-GCM first (ring and OpenSSH both use
/// the CPU's AES instructions, several times faster than ChaCha20 on
/// x86-64 and arm64 for bulk copies), then russh's own order.
const CIPHERS: &[russh::cipher::Name] = &[
    russh::cipher::AES_128_GCM,
    russh::cipher::AES_256_GCM,
    russh::cipher::CHACHA20_POLY1305,
    russh::cipher::AES_256_CTR,
    russh::cipher::AES_192_CTR,
    russh::cipher::AES_128_CTR,
];

fn ssh_config(keepalive: Duration) -> Arc<client::Config> {
    Arc::new(client::Config {
        preferred: russh::Preferred {
            cipher: std::borrow::Cow::Borrowed(CIPHERS),
            ..Default::default()
        },
        keepalive_interval: Some(keepalive),
        keepalive_max: KEEPALIVE_MAX,
        nodelay: true,
        // Larger windows keep bulk copies off the round-trip time.
        window_size: 8 * 1024 * 1024,
        maximum_packet_size: MAX_PACKET,
        channel_buffer_size: CHANNEL_QUEUE,
        ..Default::default()
    })
}

/// Dials the target's ports in order and authenticates. Only a TCP
/// connect, ident or key-exchange failure moves on to the next port; a
/// refused host key or failed authentication is final.
pub async fn connect(
    target: &Target,
    files: &LeaseFiles,
    cred: &Credential,
    stats: &Arc<Stats>,
    keepalive: Duration,
    stall: Duration,
) -> Result<Conn, SshError> {
    let keys = HostKeys::new(&target.lease, files.clone(), target.pin.as_deref())
        .map_err(SshError::HostKey)?;
    keys.install_pin().map_err(SshError::HostKey)?;
    let mut tried = Vec::new();
    for (i, &port) in target.ports.iter().enumerate() {
        let stream = match tokio::time::timeout(
            CONNECT_TIMEOUT,
            TcpStream::connect((target.host.as_str(), port)),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tried.push(format!("{port}: {e}"));
                continue;
            }
            Err(_) => {
                tried.push(format!("{port}: no answer within {CONNECT_TIMEOUT:?}"));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let verdict = Arc::new(Mutex::new(None));
        let remote_forwards = RemoteForwards::default();
        let handler = ClientHandler {
            keys: keys.clone(),
            verdict: Arc::clone(&verdict),
            remote_forwards: remote_forwards.clone(),
        };
        let handle = match tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            client::connect_stream(ssh_config(keepalive), stream, handler),
        )
        .await
        {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                if let Some(v) = verdict.lock().unwrap().take() {
                    return Err(SshError::HostKey(v));
                }
                tried.push(format!("{port}: SSH handshake failed: {e}"));
                continue;
            }
            Err(_) => {
                tried.push(format!(
                    "{port}: no SSH handshake within {HANDSHAKE_TIMEOUT:?}"
                ));
                continue;
            }
        };
        let mut handle = handle;
        match tokio::time::timeout(AUTH_TIMEOUT, authenticate(&mut handle, target, cred)).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(SshError::Auth(format!(
                    "authentication to {}@{}:{port} did not finish within {AUTH_TIMEOUT:?}",
                    target.user, target.host
                )));
            }
        }
        let fallback = (i > 0).then(|| {
            format!(
                "using ssh port {port} for {} (configured {} not ready: {})",
                target.host,
                target.ports[0],
                tried.join("; ")
            )
        });
        if let Some(f) = &fallback {
            tracing::info!(lease = %target.lease, "{f}");
        }
        stats.connects.fetch_add(1, Ordering::SeqCst);
        *stats.idle_since.lock().unwrap() = Some(Instant::now());
        return Ok(Conn {
            handle,
            target: target.clone(),
            port,
            fallback,
            sessions: Arc::new(Semaphore::new(COMMAND_SESSIONS)),
            control: Arc::new(Semaphore::new(CONTROL_SESSIONS)),
            rtt_us: AtomicU64::new(0),
            stats: Arc::clone(stats),
            remote_forwards,
            stall,
        });
    }
    Err(SshError::Unreachable(format!(
        "cannot reach SSH on {} (tried ports {})",
        target.host,
        tried.join("; ")
    )))
}

async fn authenticate(
    handle: &mut Handle<ClientHandler>,
    target: &Target,
    cred: &Credential,
) -> Result<(), SshError> {
    let failed = |what: &str, methods: Option<String>| {
        SshError::Auth(format!(
            "authentication of {}@{} with {what} failed{}",
            target.user,
            target.host,
            methods
                .map(|m| format!(" (the server accepts: {m})"))
                .unwrap_or_default()
        ))
    };
    let hash = handle
        .best_supported_rsa_hash()
        .await
        .map_err(|e| SshError::Lost(format!("SSH session ended during authentication: {e}")))?
        .flatten();
    match cred {
        Credential::KeyFile(path) => {
            let key = russh::keys::load_secret_key(path, None).map_err(|e| {
                SshError::NoKey(format!(
                    "cannot use the SSH key {}: {e} (an encrypted key needs ssh-agent: add it with ssh-add and remove the key setting)",
                    path.display()
                ))
            })?;
            let what = format!("the key {}", path.display());
            let r = handle
                .authenticate_publickey(
                    target.user.clone(),
                    PrivateKeyWithHashAlg::new(Arc::new(key), hash),
                )
                .await
                .map_err(|e| {
                    SshError::Lost(format!("SSH session ended during authentication: {e}"))
                })?;
            match r {
                russh::client::AuthResult::Success => Ok(()),
                russh::client::AuthResult::Failure {
                    remaining_methods, ..
                } => Err(failed(&what, Some(format!("{remaining_methods:?}")))),
            }
        }
        Credential::Agent(sock) => {
            let mut agent = AgentClient::connect_uds(sock)
                .await
                .map_err(|e| SshError::NoKey(format!("cannot reach the SSH agent: {e}")))?;
            let ids = agent
                .request_identities()
                .await
                .map_err(|e| SshError::NoKey(format!("the SSH agent failed: {e}")))?;
            if ids.is_empty() {
                return Err(SshError::NoKey(
                    "the SSH agent holds no keys (add one with ssh-add)".into(),
                ));
            }
            for id in ids {
                let key = match id {
                    russh::keys::agent::AgentIdentity::PublicKey { key, .. } => key,
                    _ => continue,
                };
                match handle
                    .authenticate_publickey_with(target.user.clone(), key, hash, &mut agent)
                    .await
                {
                    Ok(russh::client::AuthResult::Success) => return Ok(()),
                    Ok(_) => continue,
                    Err(e) => tracing::debug!(error = %e, "agent key refused"),
                }
            }
            Err(failed("every key of the SSH agent", None))
        }
    }
}
