//! Egress host bridges: the `EgressHost` task per lease (the operator end of
//! mediated egress), the lease side over SSH (`remote`: install, start,
//! probe, stop the helper; `client`: the `EgressRemoteClient` task that
//! heals the pair; `start`: `egress start`/`stop` and `desktop launch`
//! end to end; `ssh`: the `SshEgress` task of `egress start --transport
//! ssh`, a remote forward served by the daemon itself) and the `EgressManager` that starts, replaces, stops, lists
//! and restores them and mints tickets for the lease side.
//!
//! The data plane (policy, dialling, the bridge protocol) is the
//! `crabbox-egress` crate; this module only supervises it, and runs the
//! host bridges on a one-thread runtime of their own (`host::BRIDGES`).

pub mod client;
mod host;
pub mod remote;
mod ssh;
pub mod start;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use crabbox_egress::{Policy, PolicyError, SessionStats, StatsSnapshot};
use serde::{Deserialize, Serialize};

use crate::{
    coordinator::{self, CoordinatorError, EgressStatus, Role, Ticket, TicketRequest},
    daemon::LeaseEnds,
    statefile::StateFile,
    supervisor::{Backoff, RestartPolicy, Supervisor, TaskHandle, TaskId, TaskKind, TaskRecord},
};

/// What a host bridge allows, as asked for (and as persisted).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressSpec {
    /// The lease id.
    pub lease: String,
    /// Profile names (built-in `discord`, `slack`, or from configuration).
    #[serde(default)]
    pub profiles: Vec<String>,
    /// Explicit allowlist patterns.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Allow private addresses listed literally (tests and local demos).
    #[serde(default)]
    pub allow_private: bool,
    /// The session to join; when starting, `None` asks for a new one.
    #[serde(default)]
    pub session: Option<String>,
    /// The lease side started by `egress start` (helper, port, paths).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<client::RemoteState>,
}

/// A running (or ended) host bridge.
#[derive(Debug, Clone)]
pub struct EgressInfo {
    /// What it allows; `session` is the session in use.
    pub spec: EgressSpec,
    /// `profile=… allow=…`, as the reference prints it.
    pub summary: String,
    /// Local counters.
    pub stats: StatsSnapshot,
    /// The task's row.
    pub task: Option<TaskRecord>,
    /// The `EgressRemoteClient` task's row, when the lease side runs (the
    /// `SshEgress` task's row for the SSH transport).
    pub remote_task: Option<TaskRecord>,
    /// `coordinator` or `ssh`.
    pub transport: String,
}

/// The coordinator's view of a lease's egress plus ours.
#[derive(Debug)]
pub struct EgressReport {
    /// The local host bridge, if this daemon runs one.
    pub local: Option<EgressInfo>,
    /// The coordinator's status, or why it could not be fetched.
    pub coordinator: Result<EgressStatus, CoordinatorError>,
}

/// Why an egress operation failed.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    /// No coordinator is configured.
    #[error(
        "no coordinator configured: set CRABBOX_COORDINATOR (or broker.url in config.yaml) and restart crabboxd"
    )]
    NoCoordinator,
    /// The allowlist is invalid or empty.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// No host bridge runs for the lease.
    #[error("no egress host runs for lease {0} (see `crabboxctl egress list`)")]
    NotRunning(String),
    /// A ticket for another session would replace the running one.
    #[error(
        "lease {lease} runs egress session {running}; a ticket for {asked} would replace it and end the host bridge; pass --replace to move the host bridge to {asked}"
    )]
    WouldReplace {
        /// The lease.
        lease: String,
        /// The session the local host bridge runs.
        running: String,
        /// The session asked for.
        asked: String,
    },
    /// The coordinator refused or failed.
    #[error(transparent)]
    Coordinator(#[from] CoordinatorError),
    /// The desired state could not be saved.
    #[error("cannot save egress state: {0}")]
    Persist(std::io::Error),
    /// The request is invalid, or the lease cannot take it.
    #[error("{0}")]
    Invalid(String),
    /// A step on the lease failed.
    #[error(transparent)]
    Remote(#[from] remote::RemoteError),
}

struct Entry {
    spec: EgressSpec,
    policy: Arc<Policy>,
    stats: Arc<SessionStats>,
    /// Set by the task when its lease or session is over: the entry stays
    /// for status but is never persisted again. An atomic the task owns, so
    /// ending never waits for the manager's lock (a transition holding that
    /// lock may be waiting for this very task to end).
    ended: Arc<AtomicBool>,
    _handle: TaskHandle,
    /// The `EgressRemoteClient` task, when `egress start` started the lease side.
    remote: Option<TaskHandle>,
}

/// Starts, replaces, stops and lists host bridges. Cheap to clone.
#[derive(Clone)]
pub struct EgressManager {
    coordinator: Option<coordinator::Client>,
    supervisor: Supervisor,
    store: StateFile<EgressSpec>,
    profiles: BTreeMap<String, Vec<String>>,
    ends: LeaseEnds,
    // Never held across network I/O; transitions of a lease serialise on
    // `transitions` instead.
    hosts: Arc<tokio::sync::Mutex<BTreeMap<String, Entry>>>,
    /// One transition lock per lease (see [`EgressManager::transition`]).
    transitions: Arc<Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    /// Destination sockets all host bridges may hold together, sized from
    /// the open-file limit so the API keeps descriptors in reserve.
    sockets: Arc<tokio::sync::Semaphore>,
    /// The SSH multiplexers, for the lease side.
    ssh: Option<crate::ssh::SshManager>,
    /// SSH-transport egress sessions, by lease (never persisted: the
    /// forward lives on a connection).
    ssh_egress: Arc<Mutex<BTreeMap<String, ssh::SshEntry>>>,
    /// One SSH egress start or stop at a time per lease.
    ssh_locks: ssh::LeaseLocks,
    /// Where helpers for other CPUs are looked for.
    config_dir: PathBuf,
}

impl std::fmt::Debug for EgressManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EgressManager").finish_non_exhaustive()
    }
}

/// Host bridges reconnect with network backoff; replaced sessions, lease
/// end and refusals are fatal.
const POLICY: RestartPolicy = RestartPolicy::OnFailure(Backoff::NETWORK);
/// How long a stop waits behind a transition of the same lease.
pub(super) const STOP_QUEUE: std::time::Duration = std::time::Duration::from_secs(3);

impl EgressManager {
    /// A manager persisting to `<state_dir>/egress.json`, with the named
    /// profiles from configuration.
    pub fn new(
        coordinator: Option<coordinator::Client>,
        supervisor: Supervisor,
        state_dir: PathBuf,
        profiles: BTreeMap<String, Vec<String>>,
        ends: LeaseEnds,
    ) -> Self {
        Self::with_ssh(
            coordinator,
            supervisor,
            state_dir,
            profiles,
            ends,
            None,
            PathBuf::new(),
        )
    }

    /// A manager that can also drive the lease side over SSH, looking for
    /// helpers of other CPUs under `<config_dir>/crabbox/helpers/<arch>/`.
    pub fn with_ssh(
        coordinator: Option<coordinator::Client>,
        supervisor: Supervisor,
        state_dir: PathBuf,
        profiles: BTreeMap<String, Vec<String>>,
        ends: LeaseEnds,
        ssh: Option<crate::ssh::SshManager>,
        config_dir: PathBuf,
    ) -> Self {
        EgressManager {
            ssh,
            ssh_egress: Arc::new(Mutex::new(BTreeMap::new())),
            ssh_locks: ssh::LeaseLocks::default(),
            config_dir,
            coordinator,
            supervisor,
            store: StateFile::new(state_dir.join("egress.json")),
            profiles,
            ends,
            hosts: Arc::new(tokio::sync::Mutex::new(BTreeMap::new())),
            transitions: Arc::default(),
            sockets: Arc::new(tokio::sync::Semaphore::new(
                crate::platform::nofile::egress_socket_budget(),
            )),
        }
    }

    fn client(&self) -> Result<&coordinator::Client, EgressError> {
        self.coordinator.as_ref().ok_or(EgressError::NoCoordinator)
    }

    /// The canonical id of a lease named by id or slug: host bridges are
    /// keyed by it, so one lease has one bridge whatever the user typed.
    /// A name that keys a bridge already, or is cached, costs no request.
    async fn canonical(&self, name: &str) -> Result<String, EgressError> {
        if self.hosts.lock().await.contains_key(name)
            || self.ssh_egress.lock().unwrap().contains_key(name)
        {
            return Ok(name.to_owned());
        }
        let client = self.client()?;
        if let Some(id) = client.known_lease_id(name) {
            return Ok(id);
        }
        Ok(client.canonical_lease_id(name).await?)
    }

    /// Builds the policy for a spec: configured profiles are defined first,
    /// so a configured profile may shadow a built-in one.
    pub fn policy(&self, spec: &EgressSpec) -> Result<Policy, PolicyError> {
        let mut b = Policy::builder();
        for (name, patterns) in &self.profiles {
            b = b.define_profile(name, patterns);
        }
        for p in &spec.profiles {
            b = b.profile(p);
        }
        b.allow(&spec.allow)
            .allow_private(spec.allow_private)
            .build()
    }

    /// Starts a host bridge for a lease, replacing any it has, as one
    /// transition: the new session is minted first; only when that works is
    /// the old task ended (its session is dead at the coordinator, so it can
    /// never reconnect) and the new one started. A failed mint leaves the
    /// old bridge working.
    pub async fn start(&self, mut spec: EgressSpec) -> Result<EgressInfo, EgressError> {
        // Building a policy is linear and bounded (at most 16 384 raw entries,
        // 4096 distinct patterns, set-based dedup); it still runs on the
        // blocking pool, so a large allowlist never holds a runtime thread
        // that other API calls wait on.
        let policy = {
            let (me, spec) = (self.clone(), spec.clone());
            match self
                .supervisor
                .spawn_blocking(move || me.policy(&spec))
                .await
            {
                Ok(built) => Arc::new(built?),
                // A blocking task is never cancelled once started: the error is a panic.
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        };
        let client = self.client()?.clone();
        spec.lease = self.canonical(&spec.lease).await?;
        let _t = self.transition(&spec.lease).await;
        self.start_locked(client, spec, policy).await
    }

    /// The lease's transition lock: starts and stops of one lease never
    /// interleave (so the task left running belongs to the session that
    /// replaced the other). It is held across network I/O, but only other
    /// transitions of the same lease wait for it — never the hosts map,
    /// which lists, status and the host tasks use.
    pub(super) async fn transition(&self, lease: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.transitions.lock().unwrap();
            // Locks nobody holds or waits for are dropped as others are made.
            locks.retain(|_, l| Arc::strong_count(l) > 1);
            Arc::clone(locks.entry(lease.to_owned()).or_default())
        };
        lock.lock_owned().await
    }

    /// The lease's transition lock for a stop, which does not queue behind a
    /// start for long (a start may take minutes): refused after a moment.
    pub(super) async fn transition_for_stop(
        &self,
        lease: &str,
    ) -> Result<tokio::sync::OwnedMutexGuard<()>, EgressError> {
        tokio::time::timeout(STOP_QUEUE, self.transition(lease))
            .await
            .map_err(|_| {
                EgressError::Invalid(format!(
                    "an egress start for lease {lease} is in progress; stop it again when it has ended \
                     (see crabboxctl egress status --id {lease})"
                ))
            })
    }

    /// [`EgressManager::start`] under the lease's transition lock: the mint
    /// and the task replacement run with no lock of the hosts map held.
    pub(super) async fn start_locked(
        &self,
        client: coordinator::Client,
        mut spec: EgressSpec,
        policy: Arc<Policy>,
    ) -> Result<EgressInfo, EgressError> {
        let allow: Vec<String> = policy.patterns().iter().map(ToString::to_string).collect();
        let profile = policy.profiles().join(",");
        let ticket = client
            .egress_ticket(
                &spec.lease,
                Role::Host,
                TicketRequest {
                    session: spec.session.as_deref(),
                    profile: Some(&profile),
                    allow: &allow,
                },
            )
            .await?;
        spec.session = Some(ticket.session_id.clone());
        let (entry, info) = self.spawn(client, spec, policy, Some(ticket)).await;
        let mut hosts = self.hosts.lock().await;
        hosts.insert(entry.spec.lease.clone(), entry);
        self.persist(&hosts)?;
        Ok(info)
    }

    /// Restores the bridges that ran before a daemon restart, reconnecting
    /// the same sessions instead of replacing them.
    pub async fn restore(&self) {
        let Ok(client) = self.client().cloned() else {
            return;
        };
        let saved = match self.store.load() {
            Ok(saved) => saved,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read egress state; starting with none");
                return;
            }
        };
        let mut hosts = self.hosts.lock().await;
        for spec in saved {
            let policy = match self.policy(&spec) {
                Ok(p) => Arc::new(p),
                Err(e) => {
                    tracing::warn!(lease = %spec.lease, error = %e, "not restoring egress");
                    continue;
                }
            };
            tracing::info!(lease = %spec.lease, session = ?spec.session, "restoring egress host");
            let (entry, _) = self.spawn(client.clone(), spec, policy, None).await;
            hosts.insert(entry.spec.lease.clone(), entry);
        }
        drop(hosts);
        self.restore_remotes().await;
    }

    async fn spawn(
        &self,
        client: coordinator::Client,
        spec: EgressSpec,
        policy: Arc<Policy>,
        first_ticket: Option<Ticket>,
    ) -> (Entry, EgressInfo) {
        let stats = Arc::new(SessionStats::new());
        let ended = Arc::new(AtomicBool::new(false));
        let session = spec.session.clone().unwrap_or_default();
        let host = host::Host {
            client,
            lease: spec.lease.clone(),
            session: session.clone(),
            policy: Arc::clone(&policy),
            stats: Arc::clone(&stats),
            first_ticket: Arc::new(Mutex::new(first_ticket)),
            ends: self.ends.clone(),
            ended: Arc::clone(&ended),
            manager: self.clone(),
            sockets: Arc::clone(&self.sockets),
        };
        let id = TaskId::new(TaskKind::EgressHost, spec.lease.as_str());
        let handle = self
            .supervisor
            .replace(
                id.clone(),
                BTreeMap::from([
                    ("lease".to_owned(), spec.lease.clone()),
                    ("session".to_owned(), session),
                ]),
                POLICY,
                move |ctx| host.clone().run(ctx),
            )
            .await;
        let info = EgressInfo {
            summary: policy.summary(),
            stats: stats.snapshot(),
            task: self.supervisor.registry().get(&id),
            remote_task: None,
            spec: spec.clone(),
            transport: "coordinator".to_owned(),
        };
        (
            Entry {
                spec,
                policy,
                stats,
                ended,
                _handle: handle,
                remote: None,
            },
            info,
        )
    }

    /// Stops the host bridge of a lease (the coordinator session stays
    /// until the lease ends or another is started).
    pub async fn stop(&self, name: &str) -> Result<(), EgressError> {
        let lease = self
            .canonical(name)
            .await
            .map_err(|_| EgressError::NotRunning(name.to_owned()))?;
        let _t = self.transition_for_stop(&lease).await?;
        if self.hosts.lock().await.remove(&lease).is_none() {
            return Err(EgressError::NotRunning(name.to_owned()));
        }
        self.supervisor
            .stop(&TaskId::new(TaskKind::EgressHost, lease))
            .await;
        let hosts = self.hosts.lock().await;
        self.persist(&hosts)
    }

    /// Called by a host task whose lease or session is over (after it set
    /// its `ended` flag): drop it from the persisted set so a restart does
    /// not bring it back (ended entries are never persisted).
    fn over(&self) {
        match self.hosts.try_lock() {
            Ok(hosts) => {
                if let Err(e) = self.persist(&hosts) {
                    tracing::warn!(error = %e, "cannot update egress state");
                }
            }
            // Held for a moment (it is never held across network I/O):
            // persist once it is free, without making the task wait.
            Err(_) => {
                let me = self.clone();
                self.supervisor
                    .spawn_cleanup("persist egress state", async move {
                        let hosts = me.hosts.lock().await;
                        if let Err(e) = me.persist(&hosts) {
                            tracing::warn!(error = %e, "cannot update egress state");
                        }
                    });
            }
        }
    }

    /// The local host bridge of a lease (by id or slug), if any.
    pub async fn info(&self, name: &str) -> Option<EgressInfo> {
        let lease = self.canonical(name).await.ok()?;
        let hosts = self.hosts.lock().await;
        hosts.get(&lease).map(|e| self.info_of(e))
    }

    fn info_of(&self, e: &Entry) -> EgressInfo {
        EgressInfo {
            spec: e.spec.clone(),
            summary: e.policy.summary(),
            stats: e.stats.snapshot(),
            task: self
                .supervisor
                .registry()
                .get(&TaskId::new(TaskKind::EgressHost, e.spec.lease.as_str())),
            remote_task: e.spec.remote.as_ref().and_then(|_| {
                self.supervisor.registry().get(&TaskId::new(
                    TaskKind::EgressRemoteClient,
                    e.spec.lease.as_str(),
                ))
            }),
            transport: "coordinator".to_owned(),
        }
    }

    /// Every local host bridge.
    pub async fn list(&self) -> Vec<EgressInfo> {
        let mut all: Vec<EgressInfo> = {
            let hosts = self.hosts.lock().await;
            hosts.values().map(|e| self.info_of(e)).collect()
        };
        all.extend(self.ssh_list());
        all.sort_by(|a, b| a.spec.lease.cmp(&b.spec.lease));
        all
    }

    /// The coordinator's status merged with the local bridge's counters.
    pub async fn status(&self, name: &str) -> Result<EgressReport, EgressError> {
        let client = self.client()?;
        let lease = self.canonical(name).await?;
        let coordinator = client.egress_status(&lease).await;
        Ok(EgressReport {
            local: self.info(&lease).await,
            coordinator,
        })
    }

    /// Mints a ticket for `role` in the lease's current session (the
    /// session of the local host bridge unless one is given), for starting
    /// the lease-side helper by hand.
    ///
    /// A ticket for another session than the local bridge's would make the
    /// coordinator replace that session and end the bridge, so it is refused
    /// unless `replace` is set; then it is a real replacement: the host
    /// bridge moves to the new session first (as [`EgressManager::start`]
    /// does), and the ticket joins it.
    pub async fn ticket(
        &self,
        name: &str,
        role: Role,
        session: Option<String>,
        replace: bool,
    ) -> Result<Ticket, EgressError> {
        let lease = self.canonical(name).await?;
        let local = {
            let hosts = self.hosts.lock().await;
            hosts
                .get(&lease)
                .filter(|e| !e.ended.load(Ordering::SeqCst))
                .map(|e| e.spec.clone())
        };
        let running = local.as_ref().and_then(|s| s.session.clone());
        let session = match (session, running) {
            (Some(asked), Some(running)) if asked != running => {
                if !replace {
                    return Err(EgressError::WouldReplace {
                        lease,
                        running,
                        asked,
                    });
                }
                let mut spec = local.expect("a running session has a spec");
                spec.session = Some(asked.clone());
                tracing::info!(lease = %lease, from = %running, to = %asked, "egress host follows a new session");
                self.start(spec).await?;
                asked
            }
            (Some(asked), _) => asked,
            (None, Some(running)) => running,
            (None, None) => return Err(EgressError::NotRunning(name.to_owned())),
        };
        Ok(self
            .client()?
            .egress_ticket(
                &lease,
                role,
                TicketRequest {
                    session: Some(&session),
                    ..Default::default()
                },
            )
            .await?)
    }

    fn persist(&self, hosts: &BTreeMap<String, Entry>) -> Result<(), EgressError> {
        let saved: Vec<EgressSpec> = hosts
            .values()
            .filter(|e| !e.ended.load(Ordering::SeqCst))
            .map(|e| e.spec.clone())
            .collect();
        self.store.save(&saved).map_err(EgressError::Persist)
    }
}
