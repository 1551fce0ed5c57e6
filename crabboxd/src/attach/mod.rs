//! Run attach streams: one `AttachFeed` task per run follows the run's
//! events (control-socket subscription with backlog paging, HTTP polling
//! from the last sequence on any socket failure) into a buffer that any
//! number of subscribers share: a snapshot after their cursor, then live
//! events, then the run's final state. Rendering is the client's job.

mod feed;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use tokio::sync::broadcast;

use crate::{
    control::ControlChannel,
    coordinator::{self, RunEvent},
    supervisor::{Backoff, RestartPolicy, Supervisor, TaskHandle, TaskId, TaskKind},
};

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunEnd {
    /// `succeeded`, `failed`, or `unknown` when the feed gave up.
    pub state: String,
    /// The command's exit code, if the coordinator knows it.
    pub exit_code: Option<i64>,
}

/// What a subscriber receives after its snapshot.
#[derive(Debug, Clone)]
pub enum FeedItem {
    /// The next event, in sequence order, without gaps.
    Event(Arc<RunEvent>),
    /// The run ended; nothing follows.
    End(RunEnd),
}

/// A subscription: the buffered events after the cursor, the end if the
/// run already ended, and a receiver of everything after.
#[derive(Debug)]
pub struct Subscription {
    /// Events with `seq > after`, in order.
    pub snapshot: Vec<Arc<RunEvent>>,
    /// The run's end, when it already ended.
    pub end: Option<RunEnd>,
    /// Later items. `Lagged` means this subscriber fell behind and must be
    /// told so; items are never skipped silently.
    pub rx: broadcast::Receiver<FeedItem>,
}

/// How many items a subscriber may fall behind before it is cut off.
pub const SUBSCRIBER_BUFFER: usize = 4096;
/// How many events a feed keeps for late subscribers.
pub const FEED_CAP: usize = 100_000;

/// One run's shared buffer.
#[derive(Debug)]
pub struct Feed {
    state: Mutex<FeedState>,
    tx: broadcast::Sender<FeedItem>,
}

#[derive(Debug, Default)]
struct FeedState {
    events: Vec<Arc<RunEvent>>,
    end: Option<RunEnd>,
}

impl Feed {
    fn new() -> Self {
        Feed {
            state: Mutex::new(FeedState::default()),
            tx: broadcast::channel(SUBSCRIBER_BUFFER).0,
        }
    }

    /// The last sequence number buffered (0 before any).
    pub fn cursor(&self) -> u64 {
        self.state
            .lock()
            .unwrap()
            .events
            .last()
            .map_or(0, |e| e.seq)
    }

    /// Whether the run has ended.
    pub fn is_ended(&self) -> bool {
        self.state.lock().unwrap().end.is_some()
    }

    /// Appends the next event; the caller guarantees `seq == cursor + 1`.
    fn push(&self, event: RunEvent) {
        let event = Arc::new(event);
        let mut st = self.state.lock().unwrap();
        debug_assert_eq!(event.seq, st.events.last().map_or(0, |e| e.seq) + 1);
        if st.events.len() >= FEED_CAP {
            st.events.remove(0);
        }
        st.events.push(Arc::clone(&event));
        // Sent under the lock, so a subscriber's snapshot and its receiver
        // never overlap or leave a hole.
        let _ = self.tx.send(FeedItem::Event(event));
    }

    fn finish(&self, end: RunEnd) {
        let mut st = self.state.lock().unwrap();
        if st.end.is_none() {
            st.end = Some(end.clone());
            let _ = self.tx.send(FeedItem::End(end));
        }
    }

    fn subscribe(&self, after: u64) -> Result<Subscription, u64> {
        let st = self.state.lock().unwrap();
        if let Some(first) = st.events.first()
            && after + 1 < first.seq
        {
            return Err(first.seq);
        }
        Ok(Subscription {
            snapshot: st
                .events
                .iter()
                .filter(|e| e.seq > after)
                .cloned()
                .collect(),
            end: st.end.clone(),
            rx: self.tx.subscribe(),
        })
    }
}

/// Why attaching failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// No coordinator is configured.
    #[error(
        "no coordinator configured: set CRABBOX_COORDINATOR (or broker.url in config.yaml) and restart crabboxd"
    )]
    NoCoordinator,
    /// The cursor is older than what the feed still holds (the first
    /// buffered sequence number is given).
    #[error("events before {0} are no longer buffered; attach with a later --after")]
    TooOld(u64),
    /// The run could not be read before its feed started (unknown run,
    /// no right to it, coordinator unreachable).
    #[error("run {run}: {source}")]
    Coordinator {
        /// The run id.
        run: String,
        /// The coordinator's failure.
        source: coordinator::CoordinatorError,
    },
}

/// Starts feeds and hands out subscriptions. Cheap to clone.
#[derive(Clone)]
pub struct AttachManager {
    coordinator: Option<coordinator::Client>,
    control: Option<ControlChannel>,
    supervisor: Supervisor,
    feeds: Arc<Mutex<HashMap<String, FeedEntry>>>,
}

/// A run's feed and the task that fills it (dropping the entry stops it).
struct FeedEntry {
    feed: Arc<Feed>,
    _task: TaskHandle,
}

impl std::fmt::Debug for AttachManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttachManager").finish_non_exhaustive()
    }
}

/// A feed is retried with network backoff; a run that cannot be read
/// (404, 403) fails for good.
const POLICY: RestartPolicy = RestartPolicy::OnFailure(Backoff::NETWORK);

impl AttachManager {
    /// A manager for runs of `coordinator`, sharing its control channel.
    pub fn new(
        coordinator: Option<coordinator::Client>,
        control: Option<ControlChannel>,
        supervisor: Supervisor,
    ) -> Self {
        AttachManager {
            coordinator,
            control,
            supervisor,
            feeds: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Subscribes to a run from `after`, starting its feed if it has none.
    /// Every subscriber of a run shares one feed.
    pub async fn subscribe(&self, run: &str, after: u64) -> Result<Subscription, AttachError> {
        let client = self.coordinator.clone().ok_or(AttachError::NoCoordinator)?;
        // Finished feeds nobody listens to any more are dropped; a later
        // attach to the same run simply reads it again.
        self.feeds
            .lock()
            .unwrap()
            .retain(|_, e| !(e.feed.is_ended() && e.feed.tx.receiver_count() == 0));
        let existing = self
            .feeds
            .lock()
            .unwrap()
            .get(run)
            .map(|e| Arc::clone(&e.feed));
        let feed = match existing {
            Some(feed) => feed,
            None => {
                // One read first, so an unknown run or an unreachable
                // coordinator is the caller's error now, not a feed that
                // ends in "unknown" seconds later.
                client
                    .run(run)
                    .await
                    .map_err(|source| AttachError::Coordinator {
                        run: run.to_owned(),
                        source,
                    })?;
                if let Some(control) = &self.control {
                    control.ensure_started().await;
                }
                let feed = Arc::new(Feed::new());
                let worker = feed::Worker {
                    client,
                    control: self.control.clone(),
                    run: run.to_owned(),
                    feed: Arc::clone(&feed),
                };
                let started = self
                    .supervisor
                    .start(
                        TaskId::new(TaskKind::AttachFeed, run),
                        BTreeMap::from([("run".to_owned(), run.to_owned())]),
                        POLICY,
                        move |ctx| worker.clone().run(ctx),
                    )
                    .await;
                let mut feeds = self.feeds.lock().unwrap();
                match (started, feeds.get(run)) {
                    // Another subscriber won the race; share its feed.
                    (_, Some(e)) => Arc::clone(&e.feed),
                    (Ok(handle), None) => {
                        feeds.insert(
                            run.to_owned(),
                            FeedEntry {
                                feed: Arc::clone(&feed),
                                _task: handle,
                            },
                        );
                        feed
                    }
                    (Err(_), None) => feed,
                }
            }
        };
        feed.subscribe(after).map_err(AttachError::TooOld)
    }
}
