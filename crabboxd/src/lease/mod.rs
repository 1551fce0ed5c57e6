//! Kept leases: the `LeaseKeeper` task per lease (heartbeats and lease-end
//! detection) and the `LeaseManager` that starts, stops, lists and persists
//! them, so a daemon restart keeps the same leases alive.
//!
//! A lease is kept for two reasons, counted apart: the user's `lease keep`
//! (persisted, restored after a restart) and [`LeaseHold`]s that daemon work
//! such as a run takes for as long as it needs the lease (never persisted).
//! The keeper runs while either holds; releasing the last hold leaves a
//! user's keep alone, and `lease stop` leaves the holds alone.

mod keeper;
mod store;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

pub use keeper::{MIN_INTERVAL, heartbeat_interval};

use crate::{
    control::ControlChannel,
    coordinator::{self, CoordinatorError, Lease},
    daemon::LeaseEnds,
    supervisor::{
        Backoff, RestartPolicy, Supervisor, TaskHandle, TaskId, TaskKind, TaskRecord, TaskState,
    },
};

/// What the daemon knows about one kept lease.
#[derive(Debug, Clone, Default)]
pub struct LeaseStatus {
    /// The lease id.
    pub id: String,
    /// The last record the coordinator returned.
    pub lease: Option<Lease>,
    /// The idle-timeout override given to `keep`, if any.
    pub idle_override: Option<Duration>,
    /// When the last heartbeat succeeded.
    pub last_heartbeat: Option<SystemTime>,
    /// The heartbeat interval in use.
    pub interval: Option<Duration>,
    /// Why the lease stopped being kept (ended, expired, not found).
    pub ended: Option<String>,
    /// How the last heartbeat went: `control` (the shared socket) or
    /// `http` (the fallback).
    pub via: Option<&'static str>,
}

/// Why a lease operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// No coordinator is configured.
    #[error(
        "no coordinator configured: set CRABBOX_COORDINATOR (or broker.url in config.yaml) and restart crabboxd"
    )]
    NoCoordinator,
    /// The lease is not kept by this daemon.
    #[error("lease {0} is not kept by this daemon (see `crabboxctl lease list`)")]
    NotKept(String),
    /// The lease is kept only while daemon work (a run) holds it.
    #[error(
        "lease {0} was not kept with `lease keep`: it is kept only while a run uses it, and that ends with the run (see `crabboxctl run list`)"
    )]
    HeldOnly(String),
    /// The coordinator refused or failed.
    #[error(transparent)]
    Coordinator(#[from] CoordinatorError),
    /// The desired state could not be saved.
    #[error("cannot save kept leases to {path}: {source}")]
    Persist {
        /// The state file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

struct Kept {
    status: Arc<Mutex<LeaseStatus>>,
    _handle: TaskHandle,
}

/// Why a lease is kept: the user's keep (persisted) and the holds of daemon
/// work (counted, never persisted).
#[derive(Debug, Default)]
struct Want {
    /// `lease keep` (or restored from the persisted set).
    user: bool,
    /// The idle-timeout override of the user's keep.
    idle: Option<Duration>,
    /// Live [`LeaseHold`]s.
    holds: usize,
    /// Bumped when the lease is forgotten, so a hold taken before a release
    /// never counts against one taken after it.
    generation: u64,
}

impl Want {
    fn wanted(&self) -> bool {
        self.user || self.holds > 0
    }
}

/// Keeps a lease alive while it lives (see [`LeaseManager::hold`]). Release
/// it with [`LeaseHold::release`]; dropping it releases it too, in the
/// background.
#[must_use = "the lease is kept only while the hold lives"]
pub struct LeaseHold {
    manager: LeaseManager,
    id: String,
    generation: u64,
    released: bool,
}

impl std::fmt::Debug for LeaseHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseHold").field("id", &self.id).finish()
    }
}

impl LeaseHold {
    /// The lease held.
    pub fn lease(&self) -> &str {
        &self.id
    }

    /// Gives the hold back; the keeper stops when nothing else keeps the
    /// lease (no other hold, no user keep), before this returns.
    pub async fn release(mut self) {
        self.released = true;
        if self.manager.unhold(&self.id, self.generation) {
            self.manager.reconcile(&self.id).await;
        }
    }
}

impl Drop for LeaseHold {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        if self.manager.unhold(&self.id, self.generation) {
            let (manager, id) = (self.manager.clone(), self.id.clone());
            self.manager
                .supervisor
                .spawn_cleanup("lease hold released", async move {
                    manager.reconcile(&id).await
                });
        }
    }
}

/// Starts, stops and lists lease keepers. Cheap to clone.
#[derive(Clone)]
pub struct LeaseManager {
    coordinator: Option<coordinator::Client>,
    control: Option<ControlChannel>,
    supervisor: Supervisor,
    store: store::Store,
    ends: LeaseEnds,
    kept: Arc<tokio::sync::Mutex<BTreeMap<String, Kept>>>,
    /// Why each lease is kept. A plain mutex, never held across an await.
    wants: Arc<Mutex<BTreeMap<String, Want>>>,
    /// Serialises starting and stopping keepers (never held across network
    /// I/O): each transition reads the latest `wants`, so concurrent holds,
    /// releases, keeps and stops always converge.
    transitions: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for LeaseManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseManager").finish_non_exhaustive()
    }
}

/// The restart policy of lease keepers: a failed heartbeat is retried with
/// network backoff; lease end is fatal.
const POLICY: RestartPolicy = RestartPolicy::OnFailure(Backoff::NETWORK);

impl LeaseManager {
    /// A manager that persists its desired state under `state_dir`.
    pub fn new(
        coordinator: Option<coordinator::Client>,
        control: Option<ControlChannel>,
        supervisor: Supervisor,
        state_dir: PathBuf,
        ends: LeaseEnds,
    ) -> Self {
        LeaseManager {
            coordinator,
            control,
            supervisor,
            store: store::Store::new(state_dir.join("leases.json")),
            ends,
            kept: Arc::new(tokio::sync::Mutex::new(BTreeMap::new())),
            wants: Arc::default(),
            transitions: Arc::default(),
        }
    }

    fn client(&self) -> Result<&coordinator::Client, LeaseError> {
        self.coordinator.as_ref().ok_or(LeaseError::NoCoordinator)
    }

    /// Sends one heartbeat now, without keeping the lease.
    pub async fn heartbeat_once(
        &self,
        id: &str,
        idle: Option<Duration>,
    ) -> Result<Lease, LeaseError> {
        Ok(self.client()?.heartbeat(id, idle).await?)
    }

    /// Starts keeping a lease: one heartbeat now (so a wrong id, a missing
    /// right or an ended lease is reported to the caller, not to a log),
    /// then a supervised keeper. Keeping a kept lease replaces its keeper,
    /// e.g. to change the idle timeout.
    pub async fn keep(&self, id: &str, idle: Option<Duration>) -> Result<LeaseStatus, LeaseError> {
        let client = self.client()?.clone();
        let lease = client.heartbeat(id, idle).await?;
        let id = lease.id.clone();
        let _t = self.transitions.lock().await;
        {
            let mut wants = self.wants.lock().unwrap();
            let w = wants.entry(id.clone()).or_default();
            w.user = true;
            w.idle = idle;
        }
        let status = self.start_keeper(client, &id, idle, Some(lease)).await;
        self.persist().await?;
        Ok(status)
    }

    /// Keeps a lease alive for as long as the returned hold lives, without
    /// making it a user's keep: nothing is persisted, so a daemon killed
    /// while holding it does not restore it. Holds are counted; a kept
    /// lease's keeper is shared, not replaced.
    pub async fn hold(&self, id: &str) -> Result<LeaseHold, LeaseError> {
        self.client()?;
        let generation = {
            let mut wants = self.wants.lock().unwrap();
            let w = wants.entry(id.to_owned()).or_default();
            w.holds += 1;
            w.generation
        };
        let hold = LeaseHold {
            manager: self.clone(),
            id: id.to_owned(),
            generation,
            released: false,
        };
        self.reconcile(id).await;
        Ok(hold)
    }

    /// Counts a hold off; whether the keeper may have to stop.
    fn unhold(&self, id: &str, generation: u64) -> bool {
        let mut wants = self.wants.lock().unwrap();
        let Some(w) = wants.get_mut(id).filter(|w| w.generation == generation) else {
            return false;
        };
        w.holds = w.holds.saturating_sub(1);
        if !w.wanted() {
            wants.remove(id);
            return true;
        }
        false
    }

    /// Starts or stops the keeper of `id` to match why it is kept now.
    async fn reconcile(&self, id: &str) {
        let Ok(client) = self.client().cloned() else {
            return;
        };
        let _t = self.transitions.lock().await;
        let want = {
            let wants = self.wants.lock().unwrap();
            wants.get(id).filter(|w| w.wanted()).map(|w| w.idle)
        };
        // The running keeper's idle override, if one runs.
        let running = {
            let kept = self.kept.lock().await;
            kept.get(id).and_then(|k| {
                let s = k.status.lock().unwrap();
                s.ended.is_none().then_some(s.idle_override)
            })
        }
        .filter(|_| {
            self.supervisor
                .is_live(&TaskId::new(TaskKind::LeaseKeeper, id))
        });
        match want {
            // Not running, or running with an override the user removed.
            Some(idle) if running != Some(idle) => {
                tracing::debug!(lease = %id, "keeping a lease for daemon work");
                self.start_keeper(client, id, idle, None).await;
            }
            None => {
                if let Err(e) = self.stop_keeper(id, "no longer kept").await {
                    tracing::warn!(lease = %id, error = %e, "cannot update kept leases");
                }
            }
            Some(_) => {}
        }
    }

    /// Restores the leases kept before a daemon restart. Each keeper finds
    /// out on its first heartbeat whether its lease still lives.
    pub async fn restore(&self) {
        let Ok(client) = self.client().cloned() else {
            return;
        };
        let saved = match self.store.load() {
            Ok(saved) => saved,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read kept leases; starting with none");
                return;
            }
        };
        let _t = self.transitions.lock().await;
        for lease in saved {
            tracing::info!(lease = %lease.id, "restoring kept lease");
            let idle = lease.idle_timeout_seconds.map(Duration::from_secs);
            {
                let mut wants = self.wants.lock().unwrap();
                let w = wants.entry(lease.id.clone()).or_default();
                w.user = true;
                w.idle = idle;
            }
            self.start_keeper(client.clone(), &lease.id, idle, None)
                .await;
        }
    }

    async fn start_keeper(
        &self,
        client: coordinator::Client,
        id: &str,
        idle: Option<Duration>,
        lease: Option<Lease>,
    ) -> LeaseStatus {
        let fresh = lease.is_some();
        let status = Arc::new(Mutex::new(LeaseStatus {
            id: id.to_owned(),
            interval: lease.as_ref().map(|l| heartbeat_interval(idle, l)),
            last_heartbeat: lease.as_ref().map(|_| SystemTime::now()),
            via: lease.as_ref().map(|_| "http"),
            lease,
            idle_override: idle,
            ended: None,
        }));
        if let Some(control) = &self.control {
            control.ensure_started().await;
        }
        let keeper = keeper::Keeper {
            client,
            id: id.to_owned(),
            idle,
            status: Arc::clone(&status),
            manager: self.clone(),
            ends: self.ends.clone(),
            control: self.control.clone(),
        };
        let handle = self
            .supervisor
            .replace(
                TaskId::new(TaskKind::LeaseKeeper, id),
                BTreeMap::from([("lease".to_owned(), id.to_owned())]),
                POLICY,
                move |ctx| keeper.clone().run(ctx),
            )
            .await;
        // A keeper started on a heartbeat that just succeeded is healthy
        // before its future first runs; say so, or the reply to `keep`
        // would show it `starting`.
        if fresh {
            let task = TaskId::new(TaskKind::LeaseKeeper, id);
            let registry = self.supervisor.registry();
            if registry
                .get(&task)
                .is_some_and(|r| r.state == TaskState::Starting)
            {
                registry.upsert(&task, |r| {
                    if r.state == TaskState::Starting {
                        r.state = TaskState::Running;
                    }
                });
            }
        }
        let snapshot = status.lock().unwrap().clone();
        self.kept.lock().await.insert(
            id.to_owned(),
            Kept {
                status,
                _handle: handle,
            },
        );
        snapshot
    }

    /// Releases a lease at the coordinator, stops keeping it, and ends every
    /// other task of the lease.
    pub async fn release(&self, id: &str, delete: bool) -> Result<Lease, LeaseError> {
        let client = self.client()?;
        // Tasks are keyed by the canonical id: mark it first, so a bridge
        // the coordinator closes during the release ends as stopped.
        let canonical = client.canonical_lease_id(id).await.ok();
        if let Some(c) = &canonical {
            self.ends.releasing(c);
        }
        let lease = match client.release(id, delete).await {
            Ok(lease) => lease,
            Err(e) => {
                if let Some(c) = &canonical {
                    self.ends.not_releasing(c);
                }
                return Err(e.into());
            }
        };
        self.ends.releasing(&lease.id);
        // Tasks are keyed by the canonical id, whatever the user typed.
        self.forget(&lease.id, "released through the daemon")
            .await?;
        self.ends
            .announce_orderly(&lease.id, "lease released through the daemon");
        client.forget_lease(&lease.id);
        Ok(lease)
    }

    /// Stops keeping a lease (named by id or slug) without releasing it.
    /// Work holding the lease (a run) keeps its keeper going until it ends.
    pub async fn stop(&self, name: &str) -> Result<(), LeaseError> {
        let id = self.kept_id(name).await;
        let was_kept = {
            let mut wants = self.wants.lock().unwrap();
            match wants.get_mut(&id) {
                Some(w) if w.user => {
                    w.user = false;
                    w.idle = None;
                    if !w.wanted() {
                        wants.remove(&id);
                    }
                    Ok(())
                }
                Some(w) if w.holds > 0 => Err(LeaseError::HeldOnly(name.to_owned())),
                _ => Err(LeaseError::NotKept(name.to_owned())),
            }
        };
        was_kept?;
        self.reconcile(&id).await;
        self.persist().await
    }

    /// The canonical id of a kept lease named by id or slug (the name
    /// itself when it is not known).
    async fn kept_id(&self, name: &str) -> String {
        if self.kept.lock().await.contains_key(name) {
            return name.to_owned();
        }
        if let Some(id) = self.kept.lock().await.iter().find_map(|(id, k)| {
            let s = k.status.lock().unwrap();
            s.lease
                .as_ref()
                .filter(|l| l.slug.as_deref() == Some(name))
                .map(|_| id.clone())
        }) {
            return id;
        }
        match self.client() {
            Ok(c) => c
                .canonical_lease_id(name)
                .await
                .unwrap_or_else(|_| name.to_owned()),
            Err(_) => name.to_owned(),
        }
    }

    /// Stops a keeper whatever keeps it (the lease was released) and drops
    /// it from the persisted set; holds taken before no longer count.
    async fn forget(&self, id: &str, why: &str) -> Result<(), LeaseError> {
        let _t = self.transitions.lock().await;
        {
            let mut wants = self.wants.lock().unwrap();
            let generation = wants.get(id).map_or(0, |w| w.generation + 1);
            wants.insert(
                id.to_owned(),
                Want {
                    generation,
                    ..Want::default()
                },
            );
        }
        self.stop_keeper(id, why).await
    }

    /// Stops a keeper (under the transition lock) and persists.
    async fn stop_keeper(&self, id: &str, why: &str) -> Result<(), LeaseError> {
        let removed = self.kept.lock().await.remove(id);
        if let Some(kept) = removed {
            kept.status.lock().unwrap().ended = Some(why.to_owned());
            // Dropping the handle cancels the task; wait for it to end so a
            // caller that releases and then lists sees it gone.
            self.supervisor
                .stop(&TaskId::new(TaskKind::LeaseKeeper, id))
                .await;
        }
        self.persist().await
    }

    /// Called by a keeper when the coordinator says its lease is over: the
    /// lease is dropped from the persisted set, so a restart does not try
    /// to keep it again. (The keeper's own task ends as fatal.)
    async fn lease_over(&self, id: &str) {
        if let Err(e) = self.persist_without(id).await {
            tracing::warn!(lease = %id, error = %e, "cannot update kept leases");
        }
    }

    /// Every kept lease, with its task row.
    pub async fn list(&self) -> Vec<(LeaseStatus, Option<TaskRecord>)> {
        let kept = self.kept.lock().await;
        kept.iter()
            .map(|(id, k)| {
                let rec = self
                    .supervisor
                    .registry()
                    .get(&TaskId::new(TaskKind::LeaseKeeper, id.as_str()));
                (k.status.lock().unwrap().clone(), rec)
            })
            .collect()
    }

    async fn persist(&self) -> Result<(), LeaseError> {
        self.persist_without("").await
    }

    async fn persist_without(&self, skip: &str) -> Result<(), LeaseError> {
        let kept = self.kept.lock().await;
        let saved: Vec<store::SavedLease> = {
            // Only the user's keeps: a hold ends with the work that took it.
            let wants = self.wants.lock().unwrap();
            kept.iter()
                .filter(|(id, k)| {
                    id.as_str() != skip
                        && k.status.lock().unwrap().ended.is_none()
                        && wants.get(id.as_str()).is_some_and(|w| w.user)
                })
                .map(|(id, _)| store::SavedLease {
                    id: id.clone(),
                    idle_timeout_seconds: wants[id.as_str()].idle.map(|d| d.as_secs()),
                })
                .collect()
        };
        self.store
            .save(&saved)
            .map_err(|source| LeaseError::Persist {
                path: self.store.path().to_owned(),
                source,
            })
    }
}
