//! `egress start` / `egress stop` / `desktop launch --egress` over SSH: the
//! manager's end-to-end flows on top of the host bridge ([`super::host`]),
//! the lease side ([`super::remote`]) and the `EgressRemoteClient` task
//! ([`super::client`]).

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use tokio::sync::mpsc;

use super::{
    EgressError, EgressInfo, EgressManager, EgressSpec,
    client::{RemoteClient, RemoteState},
    remote::{self, Current, Remote, RemoteError, SessionPaths},
};
use crate::{
    coordinator::{Role, TicketRequest},
    supervisor::{Backoff, RestartPolicy, TaskHandle, TaskId, TaskKind},
};

/// The default helper listen address on the lease.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:3128";
/// How long a started helper gets to listen and bridge.
const READY_WAIT: Duration = Duration::from_secs(20);
/// How long `egress stop` waits for the lease side (the helper stop's own
/// steps fit in it).
const STOP_WAIT: Duration = super::client::STOP_DEADLINE;

/// What `egress start` asks for.
#[derive(Debug, Clone, Default)]
pub struct StartRequest {
    /// The lease id or slug.
    pub lease: String,
    /// Profiles.
    pub profiles: Vec<String>,
    /// Patterns.
    pub allow: Vec<String>,
    /// Private literals allowed.
    pub allow_private: bool,
    /// The helper's listen address; empty: the default.
    pub listen: String,
    /// The coordinator URL as the lease reaches it; empty: the daemon's.
    pub coordinator_url: String,
    /// `coordinator` (or empty) or `ssh`.
    pub transport: String,
    /// The calling client's agent.
    pub agent: Option<PathBuf>,
}

/// One completed step.
#[derive(Debug, Clone)]
pub struct Step {
    /// 1–7.
    pub number: u32,
    /// Short name.
    pub name: &'static str,
    /// One line.
    pub detail: String,
}

impl Step {
    /// Reports a completed step to the start's client (a client that went
    /// away is not an error: the start goes on).
    pub async fn send(
        progress: &mpsc::Sender<Step>,
        number: u32,
        name: &'static str,
        detail: String,
    ) {
        let _ = progress
            .send(Step {
                number,
                name,
                detail,
            })
            .await;
    }
}

/// What `egress start` started.
#[derive(Debug, Clone)]
pub struct Started {
    /// The host bridge.
    pub host: EgressInfo,
    /// The lease side.
    pub remote: RemoteState,
    /// Whether the helper was uploaded.
    pub uploaded: bool,
    /// The lease-local state file.
    pub state_file: String,
    /// The merged allowlist.
    pub allow: Vec<String>,
}

/// What `egress stop` stopped.
#[derive(Debug, Clone, Default)]
pub struct Stopped {
    /// A host bridge was stopped.
    pub host: bool,
    /// The session, when one ran.
    pub session: Option<String>,
    /// The helper's pid, when it was stopped.
    pub helper_pid: Option<u32>,
    /// `current.json` was removed.
    pub state_removed: bool,
    /// Why the lease side could not be reached.
    pub lease_error: Option<String>,
}

/// What `desktop launch` launched.
#[derive(Debug, Clone)]
pub struct Launched {
    /// The argv on the lease.
    pub argv: Vec<String>,
    /// The browser's pid.
    pub pid: u32,
    /// The proxy.
    pub proxy: String,
    /// The session.
    pub session: String,
    /// The profile directory.
    pub profile_dir: String,
}

/// The remote-client task never gives up on SSH trouble (it waits inside);
/// a crash is retried with backoff; a dead session or lease is fatal.
const REMOTE_POLICY: RestartPolicy = RestartPolicy::OnFailure(Backoff::NETWORK);

/// The page a browser opens: never something Chromium would take as a
/// flag (`--proxy-server=direct://` would leave egress behind), never a
/// control character, bounded.
fn check_browser_url(url: &str) -> Result<(), EgressError> {
    if url.starts_with('-') || url.len() > 8192 || url.chars().any(char::is_control) {
        return Err(EgressError::Invalid(format!(
            "{:?} is not a page to open: give a URL such as https://example.com (at most 8 KiB, \
             not starting with '-')",
            url.chars().take(64).collect::<String>()
        )));
    }
    Ok(())
}

fn lease_err(e: RemoteError) -> EgressError {
    EgressError::Remote(e)
}

/// A session id of our own, in the coordinator's accepted shape
/// (`egress_` + 12 lowercase hex, as the coordinator makes them).
fn new_session_id() -> String {
    format!("egress_{}", hex::encode(rand::random::<[u8; 6]>()))
}

/// Whether two listen addresses are the same socket address.
fn same_listen(a: &str, b: &str) -> bool {
    match (remote::split_listen(a), remote::split_listen(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// The `egress start` that would start this again, for a message.
fn rerun_command(lease: &str, req: &StartRequest) -> String {
    let mut cmd = format!("crabboxctl egress start --id {lease}");
    if !req.profiles.is_empty() {
        cmd.push_str(&format!(" --profile {}", req.profiles.join(",")));
    }
    if !req.allow.is_empty() {
        cmd.push_str(&format!(" --allow {}", req.allow.join(",")));
    }
    if req.allow_private {
        cmd.push_str(" --allow-private");
    }
    if !req.listen.trim().is_empty() {
        cmd.push_str(&format!(" --listen {}", req.listen.trim()));
    }
    if !req.coordinator_url.trim().is_empty() {
        cmd.push_str(&format!(" --coordinator {}", req.coordinator_url.trim()));
    }
    cmd
}

/// What an `egress start` changed so far, so a failure at any step is
/// undone in one place ([`Transition::fail`]).
struct Transition {
    manager: EgressManager,
    remote: Remote,
    lease: String,
    rerun: String,
    /// The running pair this start replaces: its lease side and session.
    old: Option<(RemoteState, String)>,
    /// Whether its host bridge still runs (its session is alive), so that
    /// it can be brought back.
    old_alive: bool,
    /// Its remote client was stopped.
    old_paused: bool,
    /// Its helper was stopped.
    old_stopped: bool,
    /// The new helper (its paths and session), once its start was tried.
    started: Option<(SessionPaths, String)>,
    /// The new session was (or may have been) minted: the old one is dead.
    minted: bool,
}

impl Transition {
    /// Undoes what the start did and says what is left. Before the mint the
    /// old pair comes back (its remote client restarts its helper on the
    /// same port and re-tickets the same session); after it the old session
    /// cannot come back, so nothing is left running — no helper, no host
    /// bridge — and the remote client's row says so and what to run.
    async fn fail(self, e: EgressError) -> EgressError {
        let m = &self.manager;
        if let Some((paths, session)) = &self.started {
            match self.remote.stop(paths, session).await {
                Ok((pid, _)) => {
                    tracing::info!(lease = %self.lease, session = %session, pid = ?pid, "egress start failed: stopped its helper")
                }
                Err(err) => {
                    tracing::warn!(lease = %self.lease, session = %session, error = %err, "egress start failed: cannot stop its helper")
                }
            }
        }
        let remote_id = TaskId::new(TaskKind::EgressRemoteClient, self.lease.as_str());
        if !self.minted {
            if let Some((state, session)) = self.old
                && self.old_paused
                && self.old_alive
            {
                tracing::info!(lease = %self.lease, session = %session, error = %e, "egress start failed before its mint: the running pair carries on");
                match m
                    .spawn_remote(self.remote.clone(), session.clone(), state)
                    .await
                {
                    Ok(handle) => {
                        let mut hosts = m.hosts.lock().await;
                        if let Some(entry) = hosts.get_mut(&self.lease)
                            && entry.spec.session.as_deref() == Some(session.as_str())
                        {
                            entry.remote = Some(handle);
                        }
                    }
                    Err(err) => {
                        tracing::warn!(lease = %self.lease, error = %err, "cannot restart the running pair's remote client")
                    }
                }
            }
            return e;
        }
        if let Some((state, session)) = &self.old
            && !self.old_stopped
            && let Err(err) = self.remote.stop(&state.paths, session).await
        {
            tracing::warn!(lease = %self.lease, error = %err, "cannot stop the replaced session's helper");
        }
        let entry = m.hosts.lock().await.remove(&self.lease);
        m.supervisor
            .stop(&TaskId::new(TaskKind::EgressHost, self.lease.as_str()))
            .await;
        {
            let hosts = m.hosts.lock().await;
            if let Err(err) = m.persist(&hosts) {
                tracing::warn!(error = %err, "cannot update egress state");
            }
        }
        let session = entry.and_then(|e| e.spec.session).unwrap_or_default();
        let msg = format!(
            "{e}; egress start had already minted a new session, which replaces any earlier one, \
             so nothing runs for lease {} now (no helper, no host bridge): run `{}` again",
            self.lease, self.rerun
        );
        tracing::warn!(lease = %self.lease, error = %msg, "egress start failed after its mint");
        m.supervisor.registry().upsert(&remote_id, |r| {
            r.state = crate::supervisor::TaskState::Failed;
            r.last_error = Some(msg.clone());
            r.labels.insert("lease".into(), self.lease.clone());
            r.labels.insert("session".into(), session);
        });
        EgressError::Invalid(msg)
    }
}

impl EgressManager {
    fn remote(&self, lease: &str, agent: Option<PathBuf>) -> Result<Remote, EgressError> {
        Ok(Remote {
            ssh: self
                .ssh
                .clone()
                .ok_or_else(|| EgressError::Invalid("this daemon has no SSH multiplexer".into()))?,
            lease: lease.to_owned(),
            agent,
        })
    }

    /// Starts the `EgressRemoteClient{lease}` task for a pair.
    pub(super) async fn spawn_remote(
        &self,
        remote: Remote,
        session: String,
        state: RemoteState,
    ) -> Result<TaskHandle, EgressError> {
        let client = self.client()?.clone();
        let task = RemoteClient {
            remote: remote.clone(),
            client,
            session: session.clone(),
            state,
            ends: self.ends.clone(),
        };
        Ok(self
            .supervisor
            .replace(
                TaskId::new(TaskKind::EgressRemoteClient, remote.lease.as_str()),
                BTreeMap::from([
                    ("lease".to_owned(), remote.lease.clone()),
                    ("session".to_owned(), session),
                ]),
                REMOTE_POLICY,
                move |ctx| task.clone().run(ctx),
            )
            .await)
    }

    /// `egress start` end to end; each completed step goes to `progress`.
    pub async fn start_over_ssh(
        &self,
        req: StartRequest,
        progress: &mpsc::Sender<Step>,
    ) -> Result<Started, EgressError> {
        let step = |number, name, detail| Step::send(progress, number, name, detail);
        // 1. Refuse what is wrong before touching anything.
        let listen = if req.listen.trim().is_empty() {
            DEFAULT_LISTEN.to_owned()
        } else {
            req.listen.trim().to_owned()
        };
        remote::split_listen(&listen).map_err(|e| {
            EgressError::Invalid(format!(
                "{e}; the helper listens on the lease's loopback only (for example --listen 127.0.0.1:3128)"
            ))
        })?;
        match req.transport.trim() {
            "" | "coordinator" => {}
            "ssh" => return self.start_ssh_egress_whole(req, listen, progress).await,
            other => {
                return Err(EgressError::Invalid(format!(
                    "transport {other:?} is not available; use --transport coordinator (the default) or --transport ssh"
                )));
            }
        }
        let mut spec = EgressSpec {
            lease: req.lease.clone(),
            profiles: req.profiles.clone(),
            allow: req.allow.clone(),
            allow_private: req.allow_private,
            session: None,
            remote: None,
        };
        let policy = self.policy(&spec)?;
        let client = self.client()?.clone();
        let coordinator_url = if req.coordinator_url.trim().is_empty() {
            client.base().as_str().trim_end_matches('/').to_owned()
        } else {
            crate::config::parse_coordinator_url(req.coordinator_url.trim())
                .map_err(EgressError::Invalid)?
                .as_str()
                .trim_end_matches('/')
                .to_owned()
        };
        let lease = self.canonical(&req.lease).await?;
        spec.lease = lease.clone();
        step(
            1,
            "resolve",
            format!("lease {lease}; listen {listen}; {}", policy.summary()),
        )
        .await;

        // 2. OS and CPU.
        let remote = self.remote(&lease, req.agent.clone())?;
        let probe = remote.probe().await.map_err(lease_err)?;
        if probe.os != "Linux" {
            return Err(EgressError::Invalid(format!(
                "egress start supports Linux leases only; lease {lease} runs {} ({})",
                probe.os, probe.arch
            )));
        }
        step(2, "detect", format!("{} {}", probe.os, probe.arch)).await;

        // 3. The helper for that CPU, installed before any ticket is minted
        //    (a failure here leaves a running pair alone).
        let helper = {
            let (dir, arch) = (self.config_dir.clone(), probe.arch.clone());
            match self
                .supervisor
                .spawn_blocking(move || remote::find_helper(&dir, &arch))
                .await
            {
                Ok(found) => found.map_err(lease_err)?,
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        };
        let (helper_path, uploaded) = remote
            .install(&probe.home, &helper)
            .await
            .map_err(lease_err)?;
        let version = remote
            .version(&helper_path, &probe.arch)
            .await
            .map_err(lease_err)?;
        step(
            3,
            "install",
            format!(
                "{} {version} at {helper_path} ({})",
                remote::HELPER,
                if uploaded {
                    format!("uploaded {} bytes", helper.bytes.len())
                } else {
                    "already there".to_owned()
                }
            ),
        )
        .await;

        // 4. The new helper, before any mint: everything that can fail on
        //    the lease is done while the old pair's session is still alive.
        //    The old pair's remote client is paused (it would restart its
        //    helper), its helper stopped when it holds our port, and ours
        //    started, waiting for a ticket, on a fresh state dir named after
        //    a session id of our own (as the reference CLI picks its own).
        //    Every failure from here goes through `Transition::fail`.
        let _t = self.transition(&lease).await;
        // A pair whose host ended (its session replaced elsewhere) still
        // has a helper to stop; only a live one can be brought back.
        let (old, old_alive) = {
            let hosts = self.hosts.lock().await;
            let e = hosts.get(&lease);
            (
                e.and_then(|e| e.spec.remote.clone().zip(e.spec.session.clone())),
                e.is_some_and(|e| !e.ended.load(std::sync::atomic::Ordering::SeqCst)),
            )
        };
        let session = new_session_id();
        remote::check_session(&session).map_err(lease_err)?;
        let paths = SessionPaths::new(&probe.home, &session);
        let rerun = rerun_command(&lease, &req);
        let mut tx = Transition {
            manager: self.clone(),
            remote: remote.clone(),
            lease: lease.clone(),
            rerun,
            old,
            old_alive,
            old_paused: false,
            old_stopped: false,
            started: None,
            minted: false,
        };
        let result: Result<Started, EgressError> = async {
            if let Some((old_state, old_session)) = &tx.old {
                self.supervisor
                    .stop(&TaskId::new(TaskKind::EgressRemoteClient, lease.as_str()))
                    .await;
                tx.old_paused = true;
                if same_listen(&old_state.listen, &listen) {
                    match remote.stop(&old_state.paths, old_session).await {
                        Ok((pid, _)) => {
                            tracing::info!(lease = %lease, old = %old_session, pid = ?pid, "egress start: stopped the running helper to free its port");
                        }
                        Err(e) => {
                            tracing::warn!(lease = %lease, old = %old_session, error = %e, "egress start: cannot stop the running helper");
                        }
                    }
                    tx.old_stopped = true;
                }
            }
            // Recorded before it runs, so a failure anywhere stops it.
            tx.started = Some((paths.clone(), session.clone()));
            let pid = remote
                .start(&helper_path, &paths, &session, &listen, &coordinator_url)
                .await
                .map_err(lease_err)?;

            // The pair as it will be persisted: saved with the new session
            // from the mint on, so a daemon killed before the end still
            // supervises (or, next time, stops) this helper.
            let started_at =
                humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
            let state = RemoteState {
                listen: listen.clone(),
                coordinator_url: coordinator_url.clone(),
                helper: helper_path.clone(),
                home: probe.home.clone(),
                arch: probe.arch.clone(),
                version: version.clone(),
                pid,
                paths: paths.clone(),
                started_at: started_at.clone(),
            };

            // 5. Mint the new session and move the host bridge to it; the
            //    old session is dead at the coordinator from here on.
            spec.session = Some(session.clone());
            spec.remote = Some(state.clone());
            let host = match self
                .start_locked(client.clone(), spec, std::sync::Arc::new(policy.clone()))
                .await
            {
                Ok(host) => {
                    tx.minted = true;
                    host
                }
                // Only a definite refusal (a 4xx answer) leaves the old
                // session alive; a timeout or a lost connection may come
                // after the coordinator committed the mint, and a failed
                // save comes after it.
                Err(e) => {
                    tx.minted = !matches!(
                        &e,
                        EgressError::Coordinator(crate::coordinator::CoordinatorError::Status { status, .. })
                            if (400..500).contains(status)
                    );
                    return Err(e);
                }
            };
            if let Some((old_state, old_session)) = &tx.old
                && !tx.old_stopped
            {
                if let Err(e) = remote.stop(&old_state.paths, old_session).await {
                    tracing::warn!(lease = %lease, old = %old_session, error = %e, "egress start: cannot stop the replaced session's helper");
                }
                tx.old_stopped = true;
            }
            let ticket = client
                .egress_ticket(
                    &lease,
                    Role::Client,
                    TicketRequest {
                        session: Some(&session),
                        ..Default::default()
                    },
                )
                .await?;
            remote
                .give_ticket(&paths.control, ticket.ticket.expose())
                .await
                .map_err(lease_err)?;
            step(
                4,
                "start",
                format!(
                    "pid {pid} (setsid), session {session}; ticket handed over its control socket"
                ),
            )
            .await;

            // Its listener accepts (probed through the mux) and its bridge is up.
            let deadline = tokio::time::Instant::now() + READY_WAIT;
            // A warm helper is up within a few tens of milliseconds: look
            // again soon at first, then every 100 ms.
            let mut pause = Duration::from_millis(10);
            loop {
                let listening = remote.listening(&listen).await.map_err(lease_err)?;
                let bridged =
                    listening && remote.status(&paths.control).await.is_ok_and(|s| s.bridged);
                if bridged {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    return Err(EgressError::Remote(RemoteError::Lease(format!(
                        "the egress helper on lease {lease} {} within {READY_WAIT:?}; its log is {}/helper.log",
                        if listening {
                            "listens but its bridge did not come up"
                        } else {
                            "did not listen"
                        },
                        paths.dir
                    ))));
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            step(5, "listen", format!("{listen} accepts; bridge up")).await;

            // 6. Lease-local state for other tools on the lease.
            let current = Current {
                lease: lease.clone(),
                session: session.clone(),
                endpoint: listen.clone(),
                proxy: format!("http://{listen}"),
                pid,
                version: version.clone(),
                transport: "coordinator".into(),
                started_at: started_at.clone(),
            };
            let state_file = remote.write_current(&current).await.map_err(lease_err)?;
            step(6, "state", state_file.clone()).await;

            // 7. Supervise the pair (it was remembered with the mint).
            let handle = self
                .spawn_remote(remote.clone(), session.clone(), state.clone())
                .await?;
            {
                let mut hosts = self.hosts.lock().await;
                if let Some(e) = hosts.get_mut(&lease)
                    && e.spec.session.as_deref() == Some(session.as_str())
                {
                    e.spec.remote = Some(state.clone());
                    e.remote = Some(handle);
                }
                self.persist(&hosts)?;
            }
            let host = self.info(&lease).await.unwrap_or(host);
            Ok(Started {
                allow: policy.patterns().iter().map(ToString::to_string).collect(),
                host,
                remote: state,
                uploaded,
                state_file,
            })
        }
        .await;
        match result {
            Ok(started) => Ok(started),
            Err(e) => Err(tx.fail(e).await),
        }
    }

    /// `egress stop`: the host bridge, the remote-client task and exactly
    /// this session's helper. Idempotent.
    pub async fn stop_over_ssh(
        &self,
        name: &str,
        agent: Option<PathBuf>,
    ) -> Result<Stopped, EgressError> {
        if let Some(out) = self.stop_ssh_egress(name, agent.clone()).await? {
            return Ok(out);
        }
        let lease = match self.canonical(name).await {
            Ok(l) => l,
            Err(EgressError::Coordinator(e)) if e.lease_end().is_some() => name.to_owned(),
            Err(e) => return Err(e),
        };
        if lease != name
            && let Some(out) = self.stop_ssh_egress(&lease, agent.clone()).await?
        {
            return Ok(out);
        }
        let _t = self.transition_for_stop(&lease).await?;
        let entry = self.hosts.lock().await.remove(&lease);
        let mut out = Stopped::default();
        self.supervisor
            .stop(&TaskId::new(TaskKind::EgressRemoteClient, lease.as_str()))
            .await;
        if entry.is_some() {
            self.supervisor
                .stop(&TaskId::new(TaskKind::EgressHost, lease.as_str()))
                .await;
            out.host = true;
        }
        {
            let hosts = self.hosts.lock().await;
            self.persist(&hosts)?;
        }
        let Some(entry) = entry else {
            return Ok(out);
        };
        out.session = entry.spec.session.clone();
        if let (Some(state), Some(session)) = (&entry.spec.remote, &entry.spec.session) {
            let remote = self.remote(&lease, agent)?;
            // Bounded, so an unreachable lease answers within the caller's
            // deadline; the helper then ends with its session.
            match tokio::time::timeout(STOP_WAIT, remote.stop(&state.paths, session)).await {
                Ok(Ok((pid, removed))) => {
                    out.helper_pid = pid;
                    out.state_removed = removed;
                }
                Ok(Err(e)) => out.lease_error = Some(e.to_string()),
                Err(_) => {
                    out.lease_error =
                        Some(format!("lease {lease} did not answer within {STOP_WAIT:?}"))
                }
            }
        }
        Ok(out)
    }

    /// Restarts the remote-client tasks of restored pairs.
    pub(super) async fn restore_remotes(&self) {
        let pairs: Vec<(String, String, RemoteState)> = {
            let hosts = self.hosts.lock().await;
            hosts
                .values()
                .filter_map(|e| {
                    Some((
                        e.spec.lease.clone(),
                        e.spec.session.clone()?,
                        e.spec.remote.clone()?,
                    ))
                })
                .collect()
        };
        for (lease, session, state) in pairs {
            let Ok(remote) = self.remote(&lease, None) else {
                return;
            };
            tracing::info!(lease = %lease, session = %session, "restoring the egress remote client");
            match self.spawn_remote(remote, session.clone(), state).await {
                Ok(handle) => {
                    let mut hosts = self.hosts.lock().await;
                    if let Some(e) = hosts.get_mut(&lease) {
                        e.remote = Some(handle);
                    }
                }
                Err(e) => {
                    tracing::warn!(lease = %lease, error = %e, "not restoring the egress remote client")
                }
            }
        }
    }

    /// `desktop launch --browser --egress`: the lease's browser, detached in
    /// its display, through the running helper, on a profile of its own per
    /// egress session.
    pub async fn launch_browser(
        &self,
        name: &str,
        url: &str,
        agent: Option<PathBuf>,
    ) -> Result<Launched, EgressError> {
        check_browser_url(url)?;
        let lease = self.canonical(name).await?;
        let pair = {
            let hosts = self.hosts.lock().await;
            hosts
                .get(&lease)
                .filter(|e| !e.ended.load(std::sync::atomic::Ordering::SeqCst))
                .and_then(|e| e.spec.remote.clone().zip(e.spec.session.clone()))
        };
        if pair.is_none()
            && let Some((listen, session)) = self.ssh_pair(&lease)
        {
            // The SSH transport: sshd holds the listener; no helper to ask.
            return self
                .launch_with(&lease, &listen, &session, url, agent)
                .await;
        }
        let Some((state, session)) = pair else {
            return Err(EgressError::Invalid(format!(
                "no egress runs for lease {lease}, so a browser would not go through it; start it first: \
                 crabboxctl egress start --id {lease} --profile <profile>"
            )));
        };
        let remote = self.remote(&lease, agent.clone())?;
        let st = remote.status(&state.paths.control).await.map_err(|e| {
            EgressError::Invalid(format!(
                "the egress helper of lease {lease} does not answer ({e}); the daemon restarts it within seconds — \
                 try again, or see crabboxctl tasks --kind egress-remote-client"
            ))
        })?;
        if !st.bridged {
            tracing::info!(lease = %lease, "desktop launch: the helper's bridge is down; the remote client re-tickets it");
        }
        self.launch_with(&lease, &state.listen, &session, url, agent)
            .await
    }

    /// Launches the lease's browser through the proxy at `listen`.
    async fn launch_with(
        &self,
        lease: &str,
        listen: &str,
        session: &str,
        url: &str,
        agent: Option<PathBuf>,
    ) -> Result<Launched, EgressError> {
        let remote = self.remote(lease, agent)?;
        const SCRIPT: &str = r#"umask 077
listen="$1"; session="$2"; url="$3"
b=
if [ -r /var/lib/crabbox/browser.env ]; then
  b=$(sed -n 's/^BROWSER=//p' /var/lib/crabbox/browser.env | head -n 1 | tr -d "\"'")
  [ -n "$b" ] || b=$(sed -n 's/^CHROME_BIN=//p' /var/lib/crabbox/browser.env | head -n 1 | tr -d "\"'")
fi
if [ -z "$b" ]; then
  for c in chromium google-chrome chromium-browser google-chrome-stable; do
    if command -v "$c" >/dev/null 2>&1; then b=$c; break; fi
  done
fi
if [ -z "$b" ]; then echo "no browser on the lease (/var/lib/crabbox/browser.env, chromium, google-chrome)" >&2; exit 3; fi
if [ -z "${DISPLAY:-}" ]; then
  if [ -r /var/lib/crabbox/desktop.env ]; then d=$(sed -n 's/^DISPLAY=//p' /var/lib/crabbox/desktop.env | head -n 1 | tr -d "\"'"); fi
  DISPLAY=${d:-:99}; export DISPLAY
fi
p="$HOME/.cache/crabbox/browser-profiles/$session"
mkdir -p "$p" && chmod 700 "$p" || exit 3
CRABBOX_BROWSER_PROFILE=$p; export CRABBOX_BROWSER_PROFILE
set -- "$b" "--user-data-dir=$p" "--proxy-server=http://$listen" "--proxy-bypass-list=<-loopback>"
[ -n "$url" ] && set -- "$@" "$url"
setsid "$@" </dev/null >>"$p.log" 2>&1 &
pid=$!
printf 'pid %s\n' "$pid"
printf 'profile %s\n' "$p"
for a in "$@"; do printf 'arg %s\n' "$a"; done
sleep 1
if ! kill -0 "$pid" 2>/dev/null; then
  wait "$pid"; code=$?
  if [ "$code" != 0 ]; then echo "the browser exited at once with $code:" >&2; tail -n 5 "$p.log" >&2; exit 4; fi
fi"#;
        let out = remote
            .sh(SCRIPT, &[listen, session, url], None)
            .await
            .map_err(lease_err)?;
        let mut pid = 0;
        let mut profile_dir = String::new();
        let mut argv = Vec::new();
        for line in out.stdout.lines() {
            if let Some(p) = line.strip_prefix("pid ") {
                pid = p.trim().parse().unwrap_or(0);
            } else if let Some(p) = line.strip_prefix("profile ") {
                profile_dir = p.to_owned();
            } else if let Some(a) = line.strip_prefix("arg ") {
                argv.push(a.to_owned());
            }
        }
        if out.code != 0 || pid == 0 {
            return Err(EgressError::Remote(RemoteError::Lease(format!(
                "cannot launch the browser on lease {lease}: exit {}, {:?}",
                out.code,
                out.stderr.trim()
            ))));
        }
        Ok(Launched {
            argv,
            pid,
            proxy: format!("http://{listen}"),
            session: session.to_owned(),
            profile_dir,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::check_browser_url;

    #[test]
    fn a_browser_url_is_never_a_flag() {
        assert!(check_browser_url("").is_ok());
        assert!(check_browser_url("https://example.com/a?b=-c").is_ok());
        for bad in [
            "--proxy-server=direct://",
            "-renderer-cmd-prefix=sh",
            "https://x\n--flag",
        ] {
            assert!(check_browser_url(bad).is_err(), "{bad:?}");
        }
        assert!(check_browser_url(&"a".repeat(8193)).is_err());
    }
}
