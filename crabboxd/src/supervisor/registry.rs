//! The task table: one record per task id, kept by the supervisor and read by
//! the API (`ListTasks`, and `WatchTasks` as a snapshot followed by changes).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::SystemTime,
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
}

/// How many changes a watcher may fall behind before it is told it lagged.
pub const WATCH_BUFFER: usize = 1024;

impl Default for TaskRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl TaskRegistry {
    /// An empty table.
    pub fn new() -> Self {
        let (events, _) = broadcast::channel(WATCH_BUFFER);
        TaskRegistry {
            inner: Arc::new(Inner {
                tasks: Mutex::new(BTreeMap::new()),
                events,
            }),
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
        let tasks = self.inner.tasks.lock().unwrap();
        tasks
            .values()
            .filter(|r| kind.is_none_or(|k| r.id.kind == k))
            .cloned()
            .collect()
    }

    /// A snapshot of the table and a receiver of every change after it. Both
    /// are taken under the table lock, so no change falls between them.
    pub fn watch(&self) -> (Vec<TaskRecord>, broadcast::Receiver<RegistryEvent>) {
        let tasks = self.inner.tasks.lock().unwrap();
        let rx = self.inner.events.subscribe();
        (tasks.values().cloned().collect(), rx)
    }

    /// How many tasks are in each state.
    pub fn counts(&self) -> BTreeMap<TaskState, u32> {
        let mut counts = BTreeMap::new();
        for rec in self.inner.tasks.lock().unwrap().values() {
            *counts.entry(rec.state).or_insert(0) += 1;
        }
        counts
    }
}
