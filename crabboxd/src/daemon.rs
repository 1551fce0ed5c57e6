//! `DaemonState`: what every part of the daemon shares — identity, the
//! configuration snapshot, the supervisor, the lifecycle phase — and the
//! one way to ask for shutdown. It is vocabulary, not a feature: no wire
//! formats live here.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::{
    attach::AttachManager, config::Config, control::ControlChannel, coordinator,
    egress::EgressManager, lease::LeaseManager, run::RunManager, ssh::SshManager,
    supervisor::Supervisor,
};

/// "Lease end is one event": whoever learns that a lease is over (a
/// heartbeat answer, a bridge close `1008 lease ended`, a release through
/// the daemon) announces it here, and every task of that lease ends.
/// Leases are named by their canonical id.
#[derive(Debug, Clone)]
pub struct LeaseEnds {
    tx: broadcast::Sender<(String, LeaseOver)>,
    /// Leases being (or lately) released through the daemon, oldest first:
    /// an end the coordinator reports for them (a bridge closed `1008 lease
    /// ended` during the release) is the operator's orderly end.
    releasing: Arc<Mutex<std::collections::VecDeque<String>>>,
}

/// How many released leases [`LeaseEnds`] remembers.
const RELEASED_MEMORY: usize = 256;

/// Why a lease's tasks end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseOver {
    /// What happened, for the task table.
    pub reason: String,
    /// An orderly end the operator asked for (a release through the
    /// daemon): tasks end as `stopped`, not `failed`.
    pub orderly: bool,
}

impl Default for LeaseEnds {
    fn default() -> Self {
        LeaseEnds {
            tx: broadcast::channel(256).0,
            releasing: Arc::default(),
        }
    }
}

impl LeaseEnds {
    /// Announces that `lease` is over, as learned from the coordinator.
    pub fn announce(&self, lease: &str, reason: &str) {
        self.send(lease, reason, false);
    }

    /// Announces an orderly end the operator asked for (a release).
    pub fn announce_orderly(&self, lease: &str, reason: &str) {
        self.send(lease, reason, true);
    }

    /// Marks `lease` as being released through the daemon (before asking
    /// the coordinator), so its tasks take the coordinator's own end
    /// signals for the orderly end they are.
    pub fn releasing(&self, lease: &str) {
        let mut r = self.releasing.lock().unwrap();
        if r.len() >= RELEASED_MEMORY {
            r.pop_front();
        }
        r.push_back(lease.to_owned());
    }

    /// The release failed: the lease is not ending after all.
    pub fn not_releasing(&self, lease: &str) {
        self.releasing.lock().unwrap().retain(|l| l != lease);
    }

    /// A task learned from the coordinator that `lease` is over: the end
    /// to record, announced to the lease's other tasks unless a release
    /// through the daemon is under way (which announces it itself).
    pub fn learned(&self, lease: &str, reason: &str) -> LeaseOver {
        let orderly = self.releasing.lock().unwrap().iter().any(|l| l == lease);
        if !orderly {
            self.announce(lease, reason);
        }
        LeaseOver {
            reason: reason.to_owned(),
            orderly,
        }
    }

    fn send(&self, lease: &str, reason: &str, orderly: bool) {
        tracing::info!(lease, reason, "lease is over; ending its tasks");
        // An error only means no task is listening.
        let _ = self.tx.send((
            lease.to_owned(),
            LeaseOver {
                reason: reason.to_owned(),
                orderly,
            },
        ));
    }

    /// Completes with the reason when `lease` is announced as over.
    /// Subscribe (call this) before the work whose end you want to see;
    /// the returned future is cancel-safe to poll in a `select!` loop only
    /// when pinned and reused.
    pub fn wait_for(
        &self,
        lease: &str,
    ) -> impl std::future::Future<Output = LeaseOver> + Send + 'static {
        let mut rx = self.tx.subscribe();
        let lease = lease.to_owned();
        async move {
            loop {
                match rx.recv().await {
                    Ok((id, over)) if id == lease => return over,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => {
                        return std::future::pending().await;
                    }
                }
            }
        }
    }
}

/// The daemon's lifecycle phase, as reported by `GetStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Configuration loaded; tasks starting.
    Starting,
    /// Serving.
    Running,
    /// Shutting down: tasks are draining.
    Draining,
}

/// State shared by the API and the tasks. Cheap to clone.
#[derive(Debug, Clone)]
pub struct DaemonState {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: Config,
    socket_path: PathBuf,
    started_at: SystemTime,
    supervisor: Supervisor,
    coordinator: Option<coordinator::Client>,
    leases: LeaseManager,
    egress: EgressManager,
    attach: AttachManager,
    ssh: SshManager,
    runs: RunManager,
    phase: Mutex<Phase>,
    shutdown: CancellationToken,
    shutdown_reason: Mutex<Option<String>>,
}

impl DaemonState {
    /// Builds the shared state.
    pub fn new(
        config: Config,
        socket_path: PathBuf,
        supervisor: Supervisor,
    ) -> anyhow::Result<Self> {
        let coordinator = config
            .coordinator
            .as_ref()
            .map(coordinator::Client::new)
            .transpose()?;
        let ends = LeaseEnds::default();
        // One control socket per coordinator, shared by leases and runs.
        let control = coordinator
            .clone()
            .zip(config.coordinator.as_ref())
            .map(|(c, cfg)| {
                ControlChannel::new(
                    c,
                    supervisor.clone(),
                    cfg.heartbeat_transport,
                    cfg.control_ping_interval,
                )
            });
        let leases = LeaseManager::new(
            coordinator.clone(),
            control.clone(),
            supervisor.clone(),
            config.state_dir.clone(),
            ends.clone(),
        );
        let attach = AttachManager::new(coordinator.clone(), control, supervisor.clone());
        let ssh = SshManager::new(
            &config,
            coordinator.clone(),
            supervisor.clone(),
            ends.clone(),
        );
        let egress = EgressManager::with_ssh(
            coordinator.clone(),
            supervisor.clone(),
            config.state_dir.clone(),
            config.egress_profiles.clone(),
            ends,
            Some(ssh.clone()),
            config.config_dir.clone(),
        );
        let runs = RunManager::new(
            coordinator.clone(),
            ssh.clone(),
            leases.clone(),
            supervisor.clone(),
            config.env_allow.clone(),
        );
        Ok(DaemonState {
            inner: Arc::new(Inner {
                config,
                socket_path,
                started_at: SystemTime::now(),
                supervisor,
                coordinator,
                leases,
                egress,
                attach,
                ssh,
                runs,
                phase: Mutex::new(Phase::Starting),
                shutdown: CancellationToken::new(),
                shutdown_reason: Mutex::new(None),
            }),
        })
    }

    /// The configuration the daemon started with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The API socket path.
    pub fn socket_path(&self) -> &std::path::Path {
        &self.inner.socket_path
    }

    /// When the daemon started.
    pub fn started_at(&self) -> SystemTime {
        self.inner.started_at
    }

    /// The supervisor.
    pub fn supervisor(&self) -> &Supervisor {
        &self.inner.supervisor
    }

    /// The coordinator client, when a coordinator is configured.
    pub fn coordinator(&self) -> Option<&coordinator::Client> {
        self.inner.coordinator.as_ref()
    }

    /// The kept leases.
    pub fn leases(&self) -> &LeaseManager {
        &self.inner.leases
    }

    /// The run attach feeds.
    pub fn attach(&self) -> &AttachManager {
        &self.inner.attach
    }

    /// The SSH multiplexers.
    pub fn ssh(&self) -> &SshManager {
        &self.inner.ssh
    }

    /// The egress host bridges.
    pub fn egress(&self) -> &EgressManager {
        &self.inner.egress
    }

    /// The runs the daemon owns.
    pub fn runs(&self) -> &RunManager {
        &self.inner.runs
    }

    /// The lifecycle phase.
    pub fn phase(&self) -> Phase {
        *self.inner.phase.lock().unwrap()
    }

    /// Moves to another phase.
    pub fn set_phase(&self, phase: Phase) {
        *self.inner.phase.lock().unwrap() = phase;
    }

    /// Asks the daemon to shut down (the `Shutdown` RPC). The first reason
    /// given is kept for the log.
    pub fn request_shutdown(&self, reason: &str) {
        self.inner
            .shutdown_reason
            .lock()
            .unwrap()
            .get_or_insert_with(|| reason.to_owned());
        self.inner.shutdown.cancel();
    }

    /// Completes when shutdown was requested through [`Self::request_shutdown`].
    /// Cancel-safe.
    pub async fn shutdown_requested(&self) -> String {
        self.inner.shutdown.cancelled().await;
        self.inner
            .shutdown_reason
            .lock()
            .unwrap()
            .clone()
            .unwrap_or_default()
    }
}
