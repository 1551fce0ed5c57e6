//! The task table: one record per task id, kept by the supervisor and read by
//! the API (`ListTasks`, and `WatchTasks` as a snapshot followed by changes).
//! Records of ended tasks are kept for a bounded time and count.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tokio::sync::broadcast;

use super::{TaskId, TaskKind};

/// Where a task is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TaskState {
    /// Started, not yet reported healthy.
    Starting,
    /// Working (the task said so).
    Running,
    /// Failed with a retryable error; waiting to restart.
    Backoff,
    /// Cancelled and draining.
    Stopping,
    /// Ended and will not restart.
    Stopped,
    /// Ended with a fatal error and will not restart.
    Failed,
}

impl TaskState {
    /// Whether the task has ended for good.
    pub fn is_final(self) -> bool {
        matches!(self, TaskState::Stopped | TaskState::Failed)
    }
}

/// One row of the task table.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRecord {
    /// The task's id.
    pub id: TaskId,
    /// Its state.
    pub state: TaskState,
    /// How many times it was restarted.
    pub restarts: u32,
    /// The last error it ended with, if any (never a secret: task errors are
    /// built from messages that do not contain tokens or tickets).
    pub last_error: Option<String>,
    /// When it entered `state`.
    pub since: SystemTime,
    /// When in `Backoff`: when the next attempt starts.
    pub next_attempt: Option<SystemTime>,
    /// What the task works on (`lease`, `session`, `run` …).
    pub labels: BTreeMap<String, String>,
}

/// A change to the table, as sent to watchers.
#[derive(Debug, Clone)]
pub enum RegistryEvent {
    /// A task was added or changed.
    Upsert(TaskRecord),
    /// A task was removed.
    Removed(TaskId),
}

/// The shared task table. Cheap to clone.
#[derive(Debug, Clone)]
pub struct TaskRegistry {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    // A std mutex: it is held only to copy small records in or out, never
    // across an `.await`, so an async mutex would only add cost.
    tasks: Mutex<BTreeMap<TaskId, TaskRecord>>,
    events: broadcast::Sender<RegistryEvent>,
    keep_final_for: Duration,
    keep_final_max: usize,
}

/// How many changes a watcher may fall behind before it is told it lagged.
pub const WATCH_BUFFER: usize = 1024;
/// How long the record of an ended task stays in the table.
pub const KEEP_FINAL_FOR: Duration = Duration::from_secs(10 * 60);
/// How many records of ended tasks the table keeps at most (the oldest go
/// first).
pub const KEEP_FINAL_MAX: usize = 256;

impl Default for TaskRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl TaskRegistry {
    /// An empty table that keeps ended tasks for [`KEEP_FINAL_FOR`], at
    /// most [`KEEP_FINAL_MAX`] of them.
    pub fn new() -> Self {
        Self::with_retention(KEEP_FINAL_FOR, KEEP_FINAL_MAX)
    }

    /// An empty table that keeps ended tasks for `keep_for`, at most `max`.
    pub fn with_retention(keep_for: Duration, max: usize) -> Self {
        let (events, _) = broadcast::channel(WATCH_BUFFER);
        TaskRegistry {
            inner: Arc::new(Inner {
                tasks: Mutex::new(BTreeMap::new()),
                events,
                keep_final_for: keep_for,
                keep_final_max: max,
            }),
        }
    }

    /// Drops records of ended tasks that are too old or too many, telling
    /// watchers. Called with the table locked.
    fn prune(&self, tasks: &mut BTreeMap<TaskId, TaskRecord>) {
        let now = SystemTime::now();
        let mut ended: Vec<(SystemTime, TaskId)> = tasks
            .values()
            .filter(|r| r.state.is_final())
            .map(|r| (r.since, r.id.clone()))
            .collect();
        if ended.is_empty() {
            return;
        }
        ended.sort();
        let excess = ended.len().saturating_sub(self.inner.keep_final_max);
        for (i, (since, id)) in ended.into_iter().enumerate() {
            let old = now
                .duration_since(since)
                .is_ok_and(|age| age >= self.inner.keep_final_for);
            if i < excess || old {
                tasks.remove(&id);
                let _ = self.inner.events.send(RegistryEvent::Removed(id));
            }
        }
    }

    /// Adds or updates a record and tells watchers. The change is made and
    /// published under one lock so watchers see changes in table order.
    pub fn upsert(&self, id: &TaskId, update: impl FnOnce(&mut TaskRecord)) -> TaskRecord {
        let mut tasks = self.inner.tasks.lock().unwrap();
        let rec = tasks.entry(id.clone()).or_insert_with(|| TaskRecord {
            id: id.clone(),
            state: TaskState::Starting,
            restarts: 0,
            last_error: None,
            since: SystemTime::now(),
            next_attempt: None,
            labels: BTreeMap::new(),
        });
        let before = rec.state;
        update(rec);
        if rec.state != before {
            rec.since = SystemTime::now();
        }
        if rec.state != TaskState::Backoff {
            rec.next_attempt = None;
        }
        let out = rec.clone();
        // A send error only means nobody is watching.
        let _ = self.inner.events.send(RegistryEvent::Upsert(out.clone()));
        if out.state.is_final() && out.state != before {
            self.prune(&mut tasks);
        }
        out
    }

    /// Removes a record, telling watchers.
    pub fn remove(&self, id: &TaskId) -> Option<TaskRecord> {
        let mut tasks = self.inner.tasks.lock().unwrap();
        let rec = tasks.remove(id);
        if rec.is_some() {
            let _ = self.inner.events.send(RegistryEvent::Removed(id.clone()));
        }
        rec
    }

    /// One record.
    pub fn get(&self, id: &TaskId) -> Option<TaskRecord> {
        self.inner.tasks.lock().unwrap().get(id).cloned()
    }

    /// Every record (optionally of one kind), ordered by kind then key.
    pub fn list(&self, kind: Option<TaskKind>) -> Vec<TaskRecord> {
        let mut tasks = self.inner.tasks.lock().unwrap();
        self.prune(&mut tasks);
        tasks
            .values()
            .filter(|r| kind.is_none_or(|k| r.id.kind == k))
            .cloned()
            .collect()
    }

    /// A snapshot of the table and a receiver of every change after it. Both
    /// are taken under the table lock, so no change falls between them.
    pub fn watch(&self) -> (Vec<TaskRecord>, broadcast::Receiver<RegistryEvent>) {
        let mut tasks = self.inner.tasks.lock().unwrap();
        self.prune(&mut tasks);
        let rx = self.inner.events.subscribe();
        (tasks.values().cloned().collect(), rx)
    }

    /// How many tasks are in each state.
    pub fn counts(&self) -> BTreeMap<TaskState, u32> {
        let mut counts = BTreeMap::new();
        let mut tasks = self.inner.tasks.lock().unwrap();
        self.prune(&mut tasks);
        for rec in tasks.values() {
            *counts.entry(rec.state).or_insert(0) += 1;
        }
        counts
    }
}
