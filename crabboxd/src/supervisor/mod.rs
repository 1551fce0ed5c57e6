//! The supervisor: every long-running thing in the daemon is a managed task
//! with a kind, a key and a handle. It owns spawning, restart policy,
//! cancellation and the task table; it knows nothing of egress, SSH or the
//! coordinator — it supervises futures, not protocols.
//!
//! * One task per [`TaskId`]: [`Supervisor::start`] refuses a second, and
//!   [`Supervisor::replace`] ends the old one before the new one starts, as
//!   one transition per id.
//! * A [`TaskHandle`] cancels its task when dropped.
//! * [`RestartPolicy`] is data; errors are classified once, as
//!   [`TaskError::Fatal`] or [`TaskError::Retryable`], where they arise.
//! * Shutdown: the root [`CancellationToken`] is cancelled, the
//!   [`TaskTracker`] is closed, and [`Supervisor::shutdown`] waits for it
//!   under a grace period.

#![expect(
    clippy::disallowed_methods,
    reason = "supervisor/ is the one module that spawns tasks"
)]

mod dedicated;
pub use dedicated::Dedicated;
mod kind;
mod policy;
mod registry;

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tokio::{
    sync::{Mutex as AsyncMutex, watch},
    time::Instant,
};
use tokio_util::{
    sync::{CancellationToken, WaitForCancellationFuture},
    task::TaskTracker,
};
use tracing::{Instrument, field};

pub use kind::{TaskId, TaskKind};
pub use policy::{Backoff, RestartPolicy};
pub use registry::{
    KEEP_FINAL_FOR, KEEP_FINAL_MAX, RegistryEvent, TaskRecord, TaskRegistry, TaskState,
    WATCH_BUFFER,
};

/// How a task attempt failed. Classify once, where the error arises: the
/// supervisor only looks at the variant.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// Retrying cannot help (lease gone, session replaced, forbidden, bad
    /// configuration): the task stops and records why.
    #[error("{0:#}")]
    Fatal(anyhow::Error),
    /// Retrying may help (network, 5xx, 429, coordinator restart): the task
    /// backs off and runs again, if its policy restarts.
    #[error("{0:#}")]
    Retryable(anyhow::Error),
}

impl TaskError {
    /// A fatal error.
    pub fn fatal(e: impl Into<anyhow::Error>) -> Self {
        TaskError::Fatal(e.into())
    }

    /// A retryable error.
    pub fn retryable(e: impl Into<anyhow::Error>) -> Self {
        TaskError::Retryable(e.into())
    }

    /// Whether the error is fatal.
    pub fn is_fatal(&self) -> bool {
        matches!(self, TaskError::Fatal(_))
    }
}

/// What a task attempt gets: its cancellation token and a way to report
/// health and labels to the task table.
#[derive(Debug, Clone)]
pub struct TaskCtx {
    id: TaskId,
    cancel: CancellationToken,
    registry: TaskRegistry,
    healthy_since: Arc<Mutex<Option<Instant>>>,
}

impl TaskCtx {
    /// The task's id.
    pub fn id(&self) -> &TaskId {
        &self.id
    }

    /// Completes when the task is asked to stop. Cancel-safe: dropping the
    /// future loses nothing, so it can be a `select!` arm in a loop.
    pub fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.cancel.cancelled()
    }

    /// Whether the task has been asked to stop.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// The task's token, for handing to sub-work (use `child_token()`).
    pub fn token(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Reports that the task is up and doing its work. Time spent running
    /// since the attempt's first report counts towards the policy's
    /// `reset_after` (tasks report again after each unit of work, e.g. a
    /// heartbeat, which must not restart the count); the error of an earlier
    /// attempt is cleared (it recovered).
    pub fn running(&self) {
        self.healthy_since
            .lock()
            .unwrap()
            .get_or_insert_with(Instant::now);
        self.registry.upsert(&self.id, |r| {
            r.state = TaskState::Running;
            r.last_error = None;
        });
    }

    /// Sets a label shown in the task table.
    pub fn set_label(&self, key: &str, value: impl Into<String>) {
        let value = value.into();
        self.registry.upsert(&self.id, |r| {
            r.labels.insert(key.to_owned(), value);
        });
    }
}

/// Owns one running task: dropping the handle cancels it.
#[derive(Debug)]
pub struct TaskHandle {
    id: TaskId,
    cancel: CancellationToken,
    done: watch::Receiver<bool>,
}

impl TaskHandle {
    /// The task's id.
    pub fn id(&self) -> &TaskId {
        &self.id
    }

    /// Asks the task to stop and waits until it has ended.
    pub async fn stop(self) {
        self.cancel.cancel();
        let mut done = self.done.clone();
        wait_done(&mut done).await;
    }

    /// Waits until the task has ended for good (no more restarts), without
    /// asking it to stop.
    pub async fn finished(&self) {
        let mut done = self.done.clone();
        wait_done(&mut done).await;
    }

    /// Whether the task has ended for good.
    pub fn is_finished(&self) -> bool {
        *self.done.borrow()
    }
}

impl Drop for TaskHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn wait_done(done: &mut watch::Receiver<bool>) {
    // An error means the driver is gone, which also means it ended.
    let _ = done.wait_for(|d| *d).await;
}

/// A second task was started for an id that has a live one.
#[derive(Debug, thiserror::Error)]
#[error("task {0} is already running")]
pub struct AlreadyRunning(pub TaskId);

/// The supervisor. Cheap to clone; clones share the task tree.
#[derive(Debug, Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: CancellationToken,
    tracker: TaskTracker,
    registry: TaskRegistry,
    live: Mutex<HashMap<TaskId, Live>>,
    // One async lock per id serialises start/replace of the same id (so 50
    // concurrent replacements end with exactly one task) without making
    // transitions of different ids wait for each other.
    transitions: Mutex<HashMap<TaskId, Arc<AsyncMutex<()>>>>,
}

#[derive(Debug)]
struct Live {
    generation: u64,
    cancel: CancellationToken,
    done: watch::Receiver<bool>,
}

static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Supervisor {
    /// A supervisor whose tasks are children of `root`.
    pub fn new(root: CancellationToken, registry: TaskRegistry) -> Self {
        Supervisor {
            inner: Arc::new(Inner {
                root,
                tracker: TaskTracker::new(),
                registry,
                live: Mutex::new(HashMap::new()),
                transitions: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The task table.
    pub fn registry(&self) -> &TaskRegistry {
        &self.inner.registry
    }

    /// The root token; cancelled when shutdown starts.
    pub fn root(&self) -> &CancellationToken {
        &self.inner.root
    }

    /// Whether a live (not yet ended) task has this id.
    pub fn is_live(&self, id: &TaskId) -> bool {
        self.inner.live.lock().unwrap().contains_key(id)
    }

    /// Starts a task, unless one with the same id is live.
    ///
    /// `factory` is called once per attempt with a fresh [`TaskCtx`]; the
    /// future it returns should end promptly once `ctx.cancelled()` fires.
    pub async fn start<F, Fut>(
        &self,
        id: TaskId,
        labels: BTreeMap<String, String>,
        policy: RestartPolicy,
        factory: F,
    ) -> Result<TaskHandle, AlreadyRunning>
    where
        F: FnMut(TaskCtx) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), TaskError>> + Send + 'static,
    {
        let lock = self.transition_lock(&id);
        let guard = lock.lock().await;
        if self.is_live(&id) {
            drop(guard);
            drop(lock);
            self.release_transition_lock(&id);
            return Err(AlreadyRunning(id));
        }
        Ok(self.spawn_locked(id, labels, policy, factory))
    }

    /// Replaces the task with this id: the live one (if any) is cancelled and
    /// has ended before the new one starts, so the two never overlap.
    ///
    /// Callers that must keep the old task when a replacement cannot be
    /// prepared (for example when minting a new egress session fails) do that
    /// preparation first and call `replace` only once it succeeded.
    pub async fn replace<F, Fut>(
        &self,
        id: TaskId,
        labels: BTreeMap<String, String>,
        policy: RestartPolicy,
        factory: F,
    ) -> TaskHandle
    where
        F: FnMut(TaskCtx) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), TaskError>> + Send + 'static,
    {
        let lock = self.transition_lock(&id);
        let _guard = lock.lock().await;
        let old = self
            .inner
            .live
            .lock()
            .unwrap()
            .get(&id)
            .map(|l| (l.cancel.clone(), l.done.clone()));
        if let Some((cancel, mut done)) = old {
            cancel.cancel();
            wait_done(&mut done).await;
        }
        self.spawn_locked(id, labels, policy, factory)
    }

    /// Cancels the live task with this id, if any, and waits for it to end.
    pub async fn stop(&self, id: &TaskId) -> bool {
        let lock = self.transition_lock(id);
        let guard = lock.lock().await;
        let old = self
            .inner
            .live
            .lock()
            .unwrap()
            .get(id)
            .map(|l| (l.cancel.clone(), l.done.clone()));
        let stopped = match old {
            Some((cancel, mut done)) => {
                cancel.cancel();
                wait_done(&mut done).await;
                true
            }
            None => false,
        };
        drop(guard);
        drop(lock);
        self.release_transition_lock(id);
        stopped
    }

    /// Runs a short, bounded piece of work that must outlive its caller
    /// (ending a remote command whose client went away). It is tracked, so
    /// shutdown waits for it within the grace period, but it is not a managed
    /// task: no restarts, no row in the task table.
    pub fn spawn_cleanup(
        &self,
        what: &'static str,
        fut: impl Future<Output = ()> + Send + 'static,
    ) {
        let span = tracing::debug_span!("cleanup", what);
        self.inner.tracker.spawn(fut.instrument(span));
    }

    /// Runs the work of one streaming request (an SSH command or shell) on
    /// its own, so it keeps to its deadlines while its client is not
    /// reading. Tracked, so shutdown waits for it; the caller aborts it when
    /// the client goes away (`tokio_util::task::AbortOnDropHandle`).
    pub fn spawn_request(
        &self,
        what: &'static str,
        fut: impl Future<Output = ()> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let span = tracing::debug_span!("request", what);
        self.inner.tracker.spawn(fut.instrument(span))
    }

    /// Runs blocking work of a request (packing or unpacking an archive) on
    /// the blocking pool, tracked so shutdown waits for it.
    pub fn spawn_blocking<F, R>(&self, f: F) -> tokio::task::JoinHandle<R>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        self.inner.tracker.spawn_blocking(f)
    }

    /// Starts shutdown: cancels every task, then waits up to `grace` for all
    /// of them to end. Returns whether they all did.
    pub async fn shutdown(&self, grace: Duration) -> bool {
        self.inner.root.cancel();
        self.inner.tracker.close();
        match tokio::time::timeout(grace, self.inner.tracker.wait()).await {
            Ok(()) => true,
            Err(_) => {
                let left: Vec<String> = self
                    .inner
                    .live
                    .lock()
                    .unwrap()
                    .keys()
                    .map(ToString::to_string)
                    .collect();
                tracing::warn!(grace = ?grace, tasks = ?left, "tasks did not drain within the grace period");
                false
            }
        }
    }

    fn transition_lock(&self, id: &TaskId) -> Arc<AsyncMutex<()>> {
        let mut locks = self.inner.transitions.lock().unwrap();
        Arc::clone(locks.entry(id.clone()).or_default())
    }

    /// Forgets the transition lock of an id that has no live task and that
    /// nobody holds or waits for (only the map has it), so ended ids do not
    /// accumulate. Checked under the map's mutex, which every taker of the
    /// lock goes through, so two locks for one id are never in use at once.
    fn release_transition_lock(&self, id: &TaskId) {
        let live = self.inner.live.lock().unwrap();
        let mut locks = self.inner.transitions.lock().unwrap();
        if !live.contains_key(id) && locks.get(id).is_some_and(|l| Arc::strong_count(l) == 1) {
            locks.remove(id);
        }
    }

    /// How many per-id transition locks exist (ids with a live task or a
    /// transition in progress).
    pub fn transition_locks(&self) -> usize {
        self.inner.transitions.lock().unwrap().len()
    }

    fn spawn_locked<F, Fut>(
        &self,
        id: TaskId,
        labels: BTreeMap<String, String>,
        policy: RestartPolicy,
        factory: F,
    ) -> TaskHandle
    where
        F: FnMut(TaskCtx) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), TaskError>> + Send + 'static,
    {
        let cancel = self.inner.root.child_token();
        let (done_tx, done_rx) = watch::channel(false);
        let generation = GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.live.lock().unwrap().insert(
            id.clone(),
            Live {
                generation,
                cancel: cancel.clone(),
                done: done_rx.clone(),
            },
        );
        // A fresh task starts a fresh record: restarts and errors of a
        // replaced predecessor are not this task's.
        self.inner.registry.upsert(&id, |r| {
            r.state = TaskState::Starting;
            r.restarts = 0;
            r.last_error = None;
            r.labels = labels.clone();
        });
        let span = tracing::info_span!(
            "task",
            task = %id,
            lease = field::Empty,
            session = field::Empty,
            run = field::Empty,
        );
        for key in ["lease", "session", "run"] {
            if let Some(v) = labels.get(key) {
                span.record(key, v.as_str());
            }
        }
        let driver = Driver {
            sup: self.clone(),
            id: id.clone(),
            policy,
            cancel: cancel.clone(),
            generation,
        };
        // The tracker is shared by every task; the driver's own attempts are
        // spawned on it too, so `shutdown` waits for all of them.
        self.inner
            .tracker
            .spawn(driver.run(factory, done_tx).instrument(span));
        TaskHandle {
            id,
            cancel,
            done: done_rx,
        }
    }
}

/// Runs one task's attempts according to its policy.
struct Driver {
    sup: Supervisor,
    id: TaskId,
    policy: RestartPolicy,
    cancel: CancellationToken,
    generation: u64,
}

impl Driver {
    async fn run<F, Fut>(self, mut factory: F, done: watch::Sender<bool>)
    where
        F: FnMut(TaskCtx) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), TaskError>> + Send + 'static,
    {
        let registry = self.sup.registry().clone();
        let mut failures: u32 = 0;
        loop {
            let ctx = TaskCtx {
                id: self.id.clone(),
                cancel: self.cancel.clone(),
                registry: registry.clone(),
                healthy_since: Arc::new(Mutex::new(None)),
            };
            let healthy_since = Arc::clone(&ctx.healthy_since);
            tracing::debug!("attempt starting");
            // Each attempt is its own tokio task so a panic is caught as a
            // JoinError and handled by policy, instead of killing the driver.
            let attempt = self.sup.inner.tracker.spawn(factory(ctx));
            let outcome = match attempt.await {
                Ok(r) => r,
                Err(e) if e.is_panic() => {
                    Err(TaskError::retryable(anyhow::anyhow!("task panicked")))
                }
                Err(e) => Err(TaskError::retryable(anyhow::anyhow!("task aborted: {e}"))),
            };
            let cancelled = self.cancel.is_cancelled();
            let restart = match (&outcome, &self.policy) {
                _ if cancelled => None,
                (Err(TaskError::Fatal(_)), _) => None,
                (Ok(()), RestartPolicy::Always(b)) => Some(*b),
                (Ok(()), _) => None,
                (Err(TaskError::Retryable(_)), p) => p.backoff().copied(),
            };
            let error = outcome.as_ref().err().map(ToString::to_string);
            let Some(backoff) = restart else {
                let state = match (&outcome, cancelled) {
                    (Err(TaskError::Fatal(_)), _) => TaskState::Failed,
                    (Err(_), false) => TaskState::Failed,
                    _ => TaskState::Stopped,
                };
                match &error {
                    Some(e) if state == TaskState::Failed => {
                        tracing::warn!(error = %e, "task failed")
                    }
                    _ => tracing::info!("task stopped"),
                }
                registry.upsert(&self.id, |r| {
                    r.state = state;
                    if error.is_some() {
                        r.last_error = error.clone();
                    }
                });
                break;
            };
            // A task that was healthy for long enough starts its backoff over.
            let healthy_for = healthy_since.lock().unwrap().map(|t| t.elapsed());
            if healthy_for.is_some_and(|d| d >= backoff.reset_after) {
                failures = 0;
            }
            let delay = backoff.delay_random(failures);
            failures = failures.saturating_add(1);
            tracing::info!(error = error.as_deref().unwrap_or("ended"), delay = ?delay, "task will restart");
            registry.upsert(&self.id, |r| {
                r.state = TaskState::Backoff;
                r.restarts += 1;
                r.last_error = error.clone();
                r.next_attempt = Some(SystemTime::now() + delay);
            });
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.cancel.cancelled() => {
                    registry.upsert(&self.id, |r| r.state = TaskState::Stopped);
                    break;
                }
            }
        }
        // Free the id for a successor, unless a replacement already took it.
        {
            let mut live = self.sup.inner.live.lock().unwrap();
            if live
                .get(&self.id)
                .is_some_and(|l| l.generation == self.generation)
            {
                live.remove(&self.id);
            }
        }
        self.sup.release_transition_lock(&self.id);
        let _ = done.send(true);
    }
}

#[cfg(test)]
mod tests;
