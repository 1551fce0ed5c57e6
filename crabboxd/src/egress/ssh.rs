//! `egress start --transport ssh`: the `SshEgress{lease}` task. The lease's
//! sshd listens on `127.0.0.1:<port>` (a remote forward on the lease's mux);
//! every forwarded channel is one HTTP proxy connection that the daemon
//! answers itself with `crabbox_egress::proxy::local::serve` — the same
//! proxy code, `Policy`, pinned dialer and counters as the coordinator path,
//! with no helper on the lease and nothing registered at any coordinator.
//! After a lost connection (sshd restarted, network) the task asks for the
//! same port again and rewrites the lease's `current.json` with the pid of
//! the sshd process that holds the new listener.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use crabbox_egress::{
    HostConfig, SessionStats,
    proxy::{LocalConfig, LocalProxy, serve},
};
use futures::{StreamExt as _, stream::FuturesUnordered};
use tokio::sync::mpsc;

use super::{
    EgressError, EgressInfo, EgressManager, EgressSpec,
    client::RemoteState,
    remote::{self, Current, Remote, SessionPaths},
    start::{StartRequest, Started, Step, Stopped},
};
use crate::{
    daemon::LeaseEnds,
    ssh::{
        SshError, SshManager,
        remote_forward::{self, ForwardError, RemoteForward},
        tunnel::Tunnel,
    },
    supervisor::{
        Backoff, RestartPolicy, Supervisor, TaskCtx, TaskError, TaskHandle, TaskId, TaskKind,
    },
};

/// The transport name in `current.json`, status and the task table.
pub const TRANSPORT: &str = "ssh";
/// Proxied connections served at once (each holds a channel and a
/// destination socket; the daemon-wide socket budget still applies). Beyond
/// this a request gets `503`.
pub const MAX_STREAMS: usize = 1024;
/// How often the connection's liveness and the task's labels are checked.
const TICK: Duration = Duration::from_secs(1);
/// How long `egress stop` waits for the lease to drop `current.json`.
const STOP_WAIT: Duration = Duration::from_secs(10);
/// Lost connections and refused re-forwards retry with network backoff;
/// host-key and authentication failures and lease end are fatal.
const POLICY: RestartPolicy = RestartPolicy::OnFailure(Backoff::NETWORK);

/// One SSH egress session the manager knows.
pub(super) struct SshEntry {
    spec: EgressSpec,
    summary: String,
    stats: Arc<SessionStats>,
    state: RemoteState,
    handle: TaskHandle,
}

/// The `SshEgress{lease}` task's inputs, shared by its attempts.
struct SshEgressTask {
    ssh: SshManager,
    lease: String,
    agent: Option<PathBuf>,
    port: u16,
    listen: String,
    session: String,
    started_at: String,
    proxy: Arc<LocalProxy>,
    ends: LeaseEnds,
    /// The forward `egress start` made, for the first attempt.
    first: Mutex<Option<RemoteForward>>,
    /// The sshd pid holding the listener now.
    pid: Arc<AtomicU32>,
    /// For the clean-up of a forward dropped before it was cancelled.
    supervisor: Supervisor,
}

/// Why a forward could not be established, and whether a retry can help:
/// a refused key or host key, sshd settings that forbid the forward
/// (`AllowTcpForwarding`, `PermitListen`, `DisableForwarding`) or expose it
/// (`GatewayPorts`) are fatal; a lost connection or a port still taken is not.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
struct EstablishError {
    error: EgressError,
    fatal: bool,
}

impl EstablishError {
    fn fatal(error: EgressError) -> Self {
        EstablishError { error, fatal: true }
    }

    fn retry(error: EgressError) -> Self {
        EstablishError {
            error,
            fatal: false,
        }
    }
}

impl From<ForwardError> for EstablishError {
    fn from(e: ForwardError) -> Self {
        EstablishError {
            fatal: e.is_fatal(),
            error: EgressError::Invalid(e.to_string()),
        }
    }
}

impl From<SshError> for EstablishError {
    fn from(e: SshError) -> Self {
        ForwardError::Ssh(e).into()
    }
}

/// Finds the sshd process of this connection (an ancestor of the shell,
/// which holds the connection's forwards) and prints the kernel's TCP
/// tables, so the listener's address can be checked.
const VERIFY: &str = r#"p=$$; found=
while [ "${p:-0}" -gt 1 ]; do
  c=$(cat "/proc/$p/comm" 2>/dev/null) || break
  case "$c" in sshd*) found=$p; break;; esac
  p=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | cut -d' ' -f2)
done
printf 'sshd %s\n' "${found:-$PPID}"
cat /proc/net/tcp /proc/net/tcp6 2>/dev/null
exit 0"#;

impl SshEgressTask {
    fn remote(&self) -> Remote {
        Remote {
            ssh: self.ssh.clone(),
            lease: self.lease.clone(),
            agent: self.agent.clone(),
        }
    }

    /// Asks for the forward, verifies it is loopback-only and finds the sshd
    /// pid that holds it. Every failure after the grant cancels the forward
    /// (and dropping this future does, through the forward's drop).
    async fn establish(&self) -> Result<(RemoteForward, u32), EstablishError> {
        let conn = self.ssh.connection(&self.lease, self.agent.clone()).await?;
        let forward = remote_forward::request(&self.supervisor, conn, self.port).await?;
        let out = match self.remote().sh(VERIFY, &[], None).await {
            Ok(out) => out,
            Err(e) => {
                forward.cancel().await;
                return Err(EstablishError::retry(e.into()));
            }
        };
        let pid = out
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("sshd "))
            .and_then(|p| p.trim().parse::<u32>().ok())
            .unwrap_or(0);
        let ours: Vec<_> = remote_forward::listeners(&out.stdout)
            .into_iter()
            .filter(|l| l.port == self.port)
            .collect();
        if ours.iter().any(|l| !l.is_loopback()) {
            forward.cancel().await;
            return Err(EstablishError::fatal(EgressError::Invalid(format!(
                "the lease's sshd listens for the forward of {} on a non-loopback address \
                 (GatewayPorts is yes or clientspecified), so anyone who can reach the lease \
                 could exit through this workstation; the forward was cancelled. Set \
                 GatewayPorts no in the lease's sshd_config and reload sshd",
                self.listen
            ))));
        }
        if ours.is_empty() {
            tracing::warn!(lease = %self.lease, port = self.port, "cannot read the lease's /proc/net/tcp: the forward's loopback-only listener is not verified");
        }
        Ok((forward, pid))
    }

    async fn write_current(&self, pid: u32) -> Result<String, EgressError> {
        let current = Current {
            lease: self.lease.clone(),
            session: self.session.clone(),
            endpoint: self.listen.clone(),
            proxy: format!("http://{}", self.listen),
            pid,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            transport: TRANSPORT.to_owned(),
            started_at: self.started_at.clone(),
        };
        Ok(self.remote().write_current(&current).await?)
    }

    async fn run(self: Arc<Self>, ctx: TaskCtx) -> Result<(), TaskError> {
        let ended = self.ends.wait_for(&self.lease);
        tokio::pin!(ended);
        let first = self.first.lock().unwrap().take();
        let forward = match first {
            Some(f) => f,
            None => {
                ctx.set_label("state", "forwarding");
                let made = tokio::select! {
                    r = self.establish() => r,
                    _ = ctx.cancelled() => return Ok(()),
                    over = &mut ended => return over_result(&ctx, over.orderly, over.reason),
                };
                let (forward, pid) = match made {
                    Ok(m) => m,
                    Err(e) => {
                        ctx.set_label("state", "failed");
                        ctx.set_label("last_error", e.to_string());
                        tracing::warn!(lease = %self.lease, error = %e, "ssh egress: cannot forward");
                        return Err(task_err(e));
                    }
                };
                self.pid.store(pid, Ordering::SeqCst);
                if let Err(e) = self.write_current(pid).await {
                    tracing::warn!(lease = %self.lease, error = %e, "ssh egress: cannot rewrite current.json");
                }
                tracing::info!(lease = %self.lease, port = self.port, sshd_pid = pid, "ssh egress: forward back");
                forward
            }
        };
        let pid = self.pid.load(Ordering::SeqCst);
        ctx.set_label("pid", pid.to_string());
        ctx.set_label("port", self.port.to_string());
        ctx.set_label("state", "forwarding");
        ctx.running();
        let mut forward = forward;
        let conn = Arc::clone(forward.conn());
        let mut serving = FuturesUnordered::new();
        let mut tick = tokio::time::interval(TICK);
        let mut last = (u64::MAX, u64::MAX);
        loop {
            tokio::select! {
                Some(channel) = forward.channels.recv() => {
                    let stream = Tunnel::from_channel(channel, Arc::clone(&conn));
                    let proxy = Arc::clone(&self.proxy);
                    serving.push(async move { serve(stream, &proxy).await });
                }
                Some(()) = serving.next(), if !serving.is_empty() => {}
                _ = tick.tick() => {
                    if conn.handle.is_closed() {
                        let e = format!(
                            "the SSH connection to {} was lost; asking for {} again",
                            self.lease, self.listen
                        );
                        ctx.set_label("state", "reconnecting");
                        ctx.set_label("last_error", e.clone());
                        tracing::warn!(lease = %self.lease, "ssh egress: {e}");
                        return Err(TaskError::retryable(anyhow::anyhow!(e)));
                    }
                    let s = self.proxy.stats().snapshot();
                    if (s.active_streams, s.total_streams) != last {
                        last = (s.active_streams, s.total_streams);
                        ctx.set_label("streams", format!("{} open, {} total", s.active_streams, s.total_streams));
                    }
                }
                _ = ctx.cancelled() => {
                    drop(serving);
                    forward.cancel().await;
                    ctx.set_label("state", "stopped");
                    return Ok(());
                }
                over = &mut ended => {
                    drop(serving);
                    forward.cancel().await;
                    ctx.set_label("state", "ended");
                    return over_result(&ctx, over.orderly, over.reason);
                }
            }
        }
    }
}

fn over_result(ctx: &TaskCtx, orderly: bool, reason: String) -> Result<(), TaskError> {
    if orderly {
        ctx.token().cancel();
        return Ok(());
    }
    Err(TaskError::fatal(anyhow::anyhow!(reason)))
}

/// A port still taken after a reconnect is worth retrying (the old
/// connection's listener may still be closing); a refused key or sshd
/// settings that forbid or expose the forward are not.
fn task_err(e: EstablishError) -> TaskError {
    if e.fatal {
        TaskError::fatal(e.error)
    } else {
        TaskError::retryable(e.error)
    }
}

/// Per-lease locks: one SSH egress start or stop at a time for a lease, so
/// two starts can never both ask for the lease's port.
#[derive(Clone, Default)]
pub(super) struct LeaseLocks(Arc<Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>>>);

impl LeaseLocks {
    async fn lock(&self, lease: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut map = self.0.lock().unwrap();
            // Locks nobody holds or waits for are dropped (the map stays
            // as small as the leases being started).
            map.retain(|_, l| Arc::strong_count(l) > 1);
            Arc::clone(map.entry(lease.to_owned()).or_default())
        };
        lock.lock_owned().await
    }
}

/// A daemon-made session id (no coordinator is involved).
fn new_session() -> String {
    format!("ssh-{:016x}", rand::random::<u64>())
}

impl EgressManager {
    /// `egress start --transport ssh`, run beside its caller: a client that
    /// hangs up (or a request future dropped at any await) cannot cut it
    /// half way, with a forward granted and nothing serving it. Every lease
    /// command and forward request in it has its own deadline, but the whole
    /// start can take minutes on a slow lease; a stop waits for it at most
    /// 3 s, then refuses.
    pub(super) async fn start_ssh_egress_whole(
        &self,
        req: StartRequest,
        listen: String,
        progress: &mpsc::Sender<Step>,
    ) -> Result<Started, EgressError> {
        let this = self.clone();
        let progress = progress.clone();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        self.supervisor
            .spawn_cleanup("ssh egress start", async move {
                let r = this.start_ssh_egress(req, listen, &progress).await;
                let _ = done_tx.send(r);
            });
        done_rx.await.unwrap_or_else(|_| {
            Err(EgressError::Invalid(
                "the daemon stopped during egress start; run it again".into(),
            ))
        })
    }

    /// `egress start --transport ssh` end to end.
    async fn start_ssh_egress(
        &self,
        req: StartRequest,
        listen: String,
        progress: &mpsc::Sender<Step>,
    ) -> Result<Started, EgressError> {
        let step = |number, name, detail| Step::send(progress, number, name, detail);
        let (host, port) = remote::split_listen(&listen)?;
        if host != remote_forward::LOOPBACK {
            return Err(EgressError::Invalid(format!(
                "--transport ssh listens on {}:PORT of the lease only (asked for {listen}); use --listen 127.0.0.1:{port}",
                remote_forward::LOOPBACK
            )));
        }
        if !req.coordinator_url.trim().is_empty() {
            return Err(EgressError::Invalid(
                "--coordinator-url has no meaning with --transport ssh (no coordinator is involved); drop it".into(),
            ));
        }
        let ssh = self
            .ssh
            .clone()
            .ok_or_else(|| EgressError::Invalid("this daemon has no SSH multiplexer".into()))?;
        // A coordinator lease is keyed by its canonical id; a static target
        // (or any name when no coordinator is configured) by its name.
        let lease = match self.canonical(&req.lease).await {
            Ok(l) => l,
            Err(_) => req.lease.clone(),
        };
        let mut spec = EgressSpec {
            lease: lease.clone(),
            profiles: req.profiles.clone(),
            allow: req.allow.clone(),
            allow_private: req.allow_private,
            session: None,
            remote: None,
        };
        let policy = Arc::new(self.policy(&spec)?);
        step(
            1,
            "resolve",
            format!(
                "lease {lease}; listen {listen} on the lease (ssh remote forward); {}",
                policy.summary()
            ),
        )
        .await;
        // One start per lease at a time, and one forward per port: a running
        // SSH egress of this lease goes first.
        let _locked = self.ssh_locks.lock(&lease).await;
        self.stop_ssh_task(&lease).await;
        let remote = Remote {
            ssh: ssh.clone(),
            lease: lease.clone(),
            agent: req.agent.clone(),
        };
        let probe = remote.probe().await?;
        step(2, "detect", format!("{} {}", probe.os, probe.arch)).await;

        let session = new_session();
        let started_at =
            humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        let stats = Arc::new(SessionStats::new());
        let proxy = Arc::new(LocalProxy::new(
            Arc::clone(&policy),
            LocalConfig {
                max_streams: MAX_STREAMS,
                // A write toward a destination that makes no progress for the
                // SSH stall deadline closes that stream: russh queues a
                // channel's data inside the connection loop, so a destination
                // that stops reading would otherwise pause the whole
                // connection (every other stream, exec and keepalive).
                stall: Some(ssh.stall_timeout()),
                allow_hint: format!(
                    "restart it with the host allowed: `crabboxctl egress start --id {lease} --transport ssh --allow {{host}}` (or a profile that lists it)"
                ),
                ..LocalConfig::from_host(&HostConfig {
                    stats: Arc::clone(&stats),
                    socket_budget: Some(Arc::clone(&self.sockets)),
                    ..HostConfig::default()
                })
            },
        ));
        let pid = Arc::new(AtomicU32::new(0));
        let task = Arc::new(SshEgressTask {
            ssh,
            lease: lease.clone(),
            agent: req.agent.clone(),
            port,
            listen: listen.clone(),
            session: session.clone(),
            started_at: started_at.clone(),
            proxy,
            ends: self.ends.clone(),
            first: Mutex::new(None),
            pid: Arc::clone(&pid),
            supervisor: self.supervisor.clone(),
        });
        let (forward, sshd_pid) = task.establish().await.map_err(|e| e.error)?;
        step(
            3,
            "forward",
            format!(
                "the lease's sshd (pid {sshd_pid}) listens on {listen}, loopback only; channels for any other address are refused"
            ),
        )
        .await;
        pid.store(sshd_pid, Ordering::SeqCst);
        let state_file = match task.write_current(sshd_pid).await {
            Ok(f) => f,
            Err(e) => {
                forward.cancel().await;
                return Err(e);
            }
        };
        step(4, "state", state_file.clone()).await;
        *task.first.lock().unwrap() = Some(forward);

        spec.session = Some(session.clone());
        let handle = self
            .supervisor
            .replace(
                TaskId::new(TaskKind::SshEgress, lease.as_str()),
                BTreeMap::from([
                    ("lease".to_owned(), lease.clone()),
                    ("session".to_owned(), session.clone()),
                    ("transport".to_owned(), TRANSPORT.to_owned()),
                    ("listen".to_owned(), listen.clone()),
                ]),
                POLICY,
                move |ctx| Arc::clone(&task).run(ctx),
            )
            .await;
        let state = RemoteState {
            listen,
            coordinator_url: String::new(),
            helper: String::new(),
            home: probe.home.clone(),
            arch: probe.arch,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: sshd_pid,
            paths: SessionPaths::new(&probe.home, &session),
            started_at,
        };
        spec.remote = Some(state.clone());
        let entry = SshEntry {
            summary: policy.summary(),
            spec,
            stats,
            state: state.clone(),
            handle,
        };
        let info = self.ssh_info_of(&entry);
        self.ssh_egress.lock().unwrap().insert(lease.clone(), entry);
        step(
            5,
            "serve",
            format!("supervised as ssh-egress {lease}; nothing registered at any coordinator"),
        )
        .await;
        Ok(Started {
            allow: policy.patterns().iter().map(ToString::to_string).collect(),
            host: info,
            remote: state,
            uploaded: false,
            state_file,
        })
    }

    /// Stops the lease's `SshEgress` task, if one runs, and forgets it;
    /// the session it ran.
    async fn stop_ssh_task(&self, lease: &str) -> Option<String> {
        let entry = self.ssh_egress.lock().unwrap().remove(lease)?;
        entry.handle.stop().await;
        Some(entry.spec.session.unwrap_or_default())
    }

    /// `egress stop` for an SSH egress: the task (which cancels the
    /// forward) and the lease's `current.json` when it names this session.
    /// `None` when the lease runs no SSH egress. Behind a running start it
    /// waits at most [`super::STOP_QUEUE`], then refuses with a sentence, as
    /// the coordinator transport's stop does.
    pub(super) async fn stop_ssh_egress(
        &self,
        lease: &str,
        agent: Option<PathBuf>,
    ) -> Result<Option<Stopped>, EgressError> {
        let locked = tokio::time::timeout(super::STOP_QUEUE, self.ssh_locks.lock(lease))
            .await
            .map_err(|_| {
                EgressError::Invalid(format!(
                    "an egress start for lease {lease} is in progress; stop it again when it has ended \
                     (see crabboxctl egress status --id {lease})"
                ))
            })?;
        let session = self.stop_ssh_task(lease).await;
        drop(locked);
        let Some(session) = session else {
            return Ok(None);
        };
        let mut out = Stopped {
            host: true,
            session: Some(session.clone()),
            ..Stopped::default()
        };
        let Some(ssh) = self.ssh.clone() else {
            return Ok(Some(out));
        };
        let remote = Remote {
            ssh,
            lease: lease.to_owned(),
            agent,
        };
        const SCRIPT: &str = r#"c="$HOME/.local/state/crabbox/egress/current.json"
if [ -f "$c" ] && grep -qF "\"session\":\"$1\"" "$c"; then rm -f "$c" && echo removed; fi
exit 0"#;
        match tokio::time::timeout(STOP_WAIT, remote.sh(SCRIPT, &[&session], None)).await {
            Ok(Ok(o)) => out.state_removed = o.stdout.contains("removed"),
            Ok(Err(e)) => out.lease_error = Some(e.to_string()),
            Err(_) => {
                out.lease_error = Some(format!("lease {lease} did not answer within {STOP_WAIT:?}"))
            }
        }
        Ok(Some(out))
    }

    fn ssh_info_of(&self, e: &SshEntry) -> EgressInfo {
        let task = self
            .supervisor
            .registry()
            .get(&TaskId::new(TaskKind::SshEgress, e.spec.lease.as_str()));
        let mut stats = e.stats.snapshot();
        // "Connected": the forward is up (no bridge, no protocol version).
        stats.connected = task
            .as_ref()
            .is_some_and(|t| t.labels.get("state").map(String::as_str) == Some("forwarding"))
            && !e.handle.is_finished();
        EgressInfo {
            spec: e.spec.clone(),
            summary: e.summary.clone(),
            stats,
            remote_task: task.clone(),
            task,
            transport: TRANSPORT.to_owned(),
        }
    }

    /// The SSH egress of a lease, if one runs.
    pub fn ssh_info(&self, lease: &str) -> Option<EgressInfo> {
        let map = self.ssh_egress.lock().unwrap();
        map.get(lease).map(|e| self.ssh_info_of(e))
    }

    /// Every SSH egress.
    pub(super) fn ssh_list(&self) -> Vec<EgressInfo> {
        let map = self.ssh_egress.lock().unwrap();
        map.values().map(|e| self.ssh_info_of(e)).collect()
    }

    /// The listen address and session of a lease's running SSH egress.
    pub(super) fn ssh_pair(&self, lease: &str) -> Option<(String, String)> {
        let map = self.ssh_egress.lock().unwrap();
        map.get(lease).filter(|e| !e.handle.is_finished()).map(|e| {
            (
                e.state.listen.clone(),
                e.spec.session.clone().unwrap_or_default(),
            )
        })
    }
}
