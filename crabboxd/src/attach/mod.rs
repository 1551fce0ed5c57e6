//! Run attach streams: one `AttachFeed` task per run follows the run's
//! events (control-socket subscription with backlog paging, HTTP polling
//! from the last sequence on any socket failure) into a buffer that any
//! number of subscribers share: a snapshot after their cursor, then live
//! events, then the run's final state. Rendering is the client's job.
//! A feed's buffer is capped in bytes; a subscriber whose cursor is older
//! pages those events over HTTP first. A feed stops when its last
//! subscriber leaves.

mod feed;

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
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
    /// Events with `seq > after`, in order (empty: [`FeedReceiver`] hands
    /// out every event, so the snapshot never holds a copy of the buffer).
    pub snapshot: Vec<Arc<RunEvent>>,
    /// The run's end, when it already ended (`None`: the receiver ends
    /// with it).
    pub end: Option<RunEnd>,
    /// Every item after the cursor, then the end. Dropping the last
    /// receiver of a feed stops the feed.
    pub rx: FeedReceiver,
}

/// How many wake-ups a subscriber may miss; missing some costs nothing (it
/// reads the buffer by sequence number), so this only bounds memory.
pub const SUBSCRIBER_BUFFER: usize = 1024;
/// How many events a feed keeps for late or slow subscribers, at most.
pub const FEED_CAP: usize = 100_000;
/// How many bytes of events a feed keeps, at most (the oldest go first; a
/// subscriber that needs them pages them over HTTP).
pub const FEED_MAX_BYTES: usize = 8 << 20;
/// The HTTP page size for older events (bounds one page's memory, as the
/// feed's own HTTP pages).
const BACKFILL_PAGE: u32 = 100;

/// A wake-up for subscribers: the buffer grew or the run ended. Carries no
/// event, so slow subscribers never pin events in memory.
#[derive(Debug, Clone, Copy)]
struct Signal;

/// One run's shared buffer.
#[derive(Debug)]
pub struct Feed {
    state: Mutex<FeedState>,
    tx: broadcast::Sender<Signal>,
    max_bytes: usize,
}

#[derive(Debug, Default)]
struct FeedState {
    events: VecDeque<Arc<RunEvent>>,
    bytes: usize,
    /// The cursor the feed started after (its first subscriber's).
    start: u64,
    /// Subscribers holding a receiver (changed under the manager's lock).
    subscribers: usize,
    end: Option<RunEnd>,
}

/// What one buffered event costs, roughly: the record and its strings.
fn event_bytes(e: &RunEvent) -> usize {
    std::mem::size_of::<RunEvent>()
        + e.kind.len()
        + e.created_at.len()
        + [&e.phase, &e.stream, &e.message, &e.data]
            .iter()
            .map(|s| s.as_ref().map_or(0, String::len))
            .sum::<usize>()
}

/// What a subscriber at a cursor gets next from the buffer.
#[derive(Debug)]
enum Next {
    /// The event right after the cursor.
    Event(Arc<RunEvent>),
    /// Events after the cursor are no longer (or were never) buffered:
    /// page `(cursor, before)` over HTTP.
    Page { before: u64 },
    /// The run ended and the cursor is at the end.
    End(RunEnd),
    /// Nothing yet.
    Wait,
}

impl Feed {
    fn new(start: u64, max_bytes: usize) -> Self {
        Feed {
            state: Mutex::new(FeedState {
                start,
                ..FeedState::default()
            }),
            tx: broadcast::channel(SUBSCRIBER_BUFFER).0,
            max_bytes,
        }
    }

    /// The last sequence number buffered (the start cursor before any).
    pub fn cursor(&self) -> u64 {
        let st = self.state.lock().unwrap();
        st.events.back().map_or(st.start, |e| e.seq)
    }

    /// The bytes of events buffered.
    pub fn bytes(&self) -> usize {
        self.state.lock().unwrap().bytes
    }

    /// Whether the run has ended.
    pub fn is_ended(&self) -> bool {
        self.state.lock().unwrap().end.is_some()
    }

    /// Appends the event if it is the next one (`seq == cursor + 1`, checked
    /// under the lock, so the feed's worker and a run the daemon owns can
    /// both offer it); `false` when it was not. The oldest events go when
    /// the buffer is over its count or byte cap.
    fn push(&self, event: RunEvent) -> bool {
        let event = Arc::new(event);
        let mut st = self.state.lock().unwrap();
        if event.seq != st.events.back().map_or(st.start, |e| e.seq) + 1 {
            return false;
        }
        st.bytes += event_bytes(&event);
        st.events.push_back(event);
        while st.events.len() > 1 && (st.events.len() > FEED_CAP || st.bytes > self.max_bytes) {
            if let Some(old) = st.events.pop_front() {
                st.bytes -= event_bytes(&old);
            }
        }
        drop(st);
        let _ = self.tx.send(Signal);
        true
    }

    fn finish(&self, end: RunEnd) {
        let mut st = self.state.lock().unwrap();
        if st.end.is_none() {
            st.end = Some(end);
            drop(st);
            let _ = self.tx.send(Signal);
        }
    }

    /// What comes after `cursor`.
    fn next(&self, cursor: u64) -> Next {
        let st = self.state.lock().unwrap();
        let first = st.events.front().map_or(st.start + 1, |e| e.seq);
        let last = st.events.back().map_or(st.start, |e| e.seq);
        if cursor + 1 < first {
            return Next::Page { before: first };
        }
        if cursor < last {
            // Contiguous sequence numbers: the index is the distance.
            return Next::Event(Arc::clone(&st.events[(cursor + 1 - first) as usize]));
        }
        match &st.end {
            Some(end) => Next::End(end.clone()),
            None => Next::Wait,
        }
    }
}

/// A subscriber's receiver: every event after its cursor in order, read
/// from the feed's buffer by sequence number (events older than the buffer
/// are paged over HTTP), then the run's end. Holds the feed: when the last
/// receiver is dropped, the feed stops.
#[derive(Debug)]
pub struct FeedReceiver {
    feed: Arc<Feed>,
    rx: broadcast::Receiver<Signal>,
    cursor: u64,
    /// Events paged over HTTP, handed out before the buffer is read again.
    paged: VecDeque<RunEvent>,
    client: coordinator::Client,
    run: String,
    ended: bool,
    _guard: SubscriberGuard,
}

impl FeedReceiver {
    /// The next item. `Closed` after the end, when the feed is gone, or
    /// when older events could not be paged over HTTP (logged). Never
    /// `Lagged`: a slow subscriber reads on from its own cursor.
    pub async fn recv(&mut self) -> Result<FeedItem, broadcast::error::RecvError> {
        use broadcast::error::RecvError;
        loop {
            if self.ended {
                return Err(RecvError::Closed);
            }
            if let Some(e) = self.paged.pop_front() {
                self.cursor = e.seq;
                return Ok(FeedItem::Event(Arc::new(e)));
            }
            match self.feed.next(self.cursor) {
                Next::Event(e) => {
                    self.cursor = e.seq;
                    return Ok(FeedItem::Event(e));
                }
                Next::End(end) => {
                    self.ended = true;
                    return Ok(FeedItem::End(end));
                }
                Next::Page { before } => self.page(before).await?,
                Next::Wait => match self.rx.recv().await {
                    Ok(Signal) | Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return Err(RecvError::Closed),
                },
            }
        }
    }

    /// Pages events `(cursor, before)` over HTTP.
    async fn page(&mut self, before: u64) -> Result<(), broadcast::error::RecvError> {
        let limit = BACKFILL_PAGE.min((before - self.cursor - 1) as u32);
        let page = match self.client.run_events(&self.run, self.cursor, limit).await {
            Ok(page) => page,
            Err(e) => {
                tracing::warn!(run = %self.run, error = %e, "cannot page older run events");
                return Err(broadcast::error::RecvError::Closed);
            }
        };
        let mut next = self.cursor + 1;
        for e in page {
            if e.seq == next && e.seq < before {
                next += 1;
                self.paged.push_back(e);
            }
        }
        if self.paged.is_empty() {
            tracing::warn!(run = %self.run, after = self.cursor, "older run events are missing at the coordinator");
            return Err(broadcast::error::RecvError::Closed);
        }
        Ok(())
    }
}

/// Counts one subscriber of a feed; the last one to go reaps the feed.
struct SubscriberGuard {
    feeds: Arc<Mutex<HashMap<String, FeedEntry>>>,
    run: String,
    feed: Arc<Feed>,
}

impl std::fmt::Debug for SubscriberGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscriberGuard")
            .field("run", &self.run)
            .finish_non_exhaustive()
    }
}

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        let mut feeds = self.feeds.lock().unwrap();
        let left = {
            let mut st = self.feed.state.lock().unwrap();
            st.subscribers = st.subscribers.saturating_sub(1);
            st.subscribers
        };
        if left == 0
            && feeds
                .get(&self.run)
                .is_some_and(|e| Arc::ptr_eq(&e.feed, &self.feed))
        {
            // Dropping the entry drops the task handle, which stops it. A
            // later attach follows the run again from its own cursor.
            feeds.remove(&self.run);
            tracing::debug!(run = %self.run, "last subscriber left; feed stopped");
        }
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
    /// buffered sequence number is given). Late subscribers page older
    /// events over HTTP, so this is no longer returned.
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
    creating: Arc<tokio::sync::Mutex<()>>,
    max_bytes: usize,
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
            creating: Arc::default(),
            max_bytes: FEED_MAX_BYTES,
        }
    }

    /// Offers an event a run the daemon owns just recorded to that run's
    /// feed, if local clients follow it: they get it from the same shared
    /// buffer without waiting for the coordinator's push (which the feed
    /// then skips as already seen).
    pub fn offer(&self, run: &str, event: RunEvent) {
        let feed = self
            .feeds
            .lock()
            .unwrap()
            .get(run)
            .map(|e| Arc::clone(&e.feed));
        if let Some(feed) = feed {
            feed.push(event);
        }
    }

    /// How many feeds are live.
    pub fn feeds(&self) -> usize {
        self.feeds.lock().unwrap().len()
    }

    /// The run's live feed with one more subscriber counted, under the
    /// map's lock (where the last subscriber to leave removes the feed), so
    /// a feed is never reaped under a newcomer.
    fn join(&self, run: &str) -> Option<Arc<Feed>> {
        let feeds = self.feeds.lock().unwrap();
        let e = feeds.get(run)?;
        e.feed.state.lock().unwrap().subscribers += 1;
        Some(Arc::clone(&e.feed))
    }

    /// Subscribes to a run from `after`, starting its feed (from `after`)
    /// if it has none. Every subscriber of a run shares one feed; one whose
    /// cursor is older than the feed's buffer pages the older events over
    /// HTTP before it joins.
    pub async fn subscribe(&self, run: &str, after: u64) -> Result<Subscription, AttachError> {
        let client = self.coordinator.clone().ok_or(AttachError::NoCoordinator)?;
        // Finished feeds nobody listens to any more are dropped; a later
        // attach to the same run simply reads it again.
        self.feeds
            .lock()
            .unwrap()
            .retain(|_, e| !(e.feed.is_ended() && e.feed.state.lock().unwrap().subscribers == 0));
        let feed = match self.join(run) {
            Some(feed) => feed,
            None => {
                // One read first, so an unknown run or an unreachable
                // coordinator is the caller's error now, not a feed that ends
                // in "unknown" seconds later. It is made before the creation
                // lock, which is shared by every run: one slow lookup must
                // not hold up attaches to other runs.
                let record = client
                    .run(run)
                    .await
                    .map_err(|source| AttachError::Coordinator {
                        run: run.to_owned(),
                        source,
                    })?;
                // The shared feed starts no later than the run's last event:
                // a first subscriber's cursor past it (a caller skipping
                // ahead) would otherwise make the feed refuse every event to
                // come, for every subscriber. Each subscriber still skips to
                // its own cursor.
                let start = record.event_count.map_or(after, |n| after.min(n));
                // One creation at a time, so two first subscribers of a run
                // never start two tasks that replace each other.
                let _creating = self.creating.lock().await;
                match self.join(run) {
                    Some(feed) => feed,
                    None => {
                        if let Some(control) = &self.control {
                            control.ensure_started().await;
                        }
                        let feed = Arc::new(Feed::new(start, self.max_bytes));
                        let worker = feed::Worker {
                            client: client.clone(),
                            control: self.control.clone(),
                            run: run.to_owned(),
                            feed: Arc::clone(&feed),
                        };
                        // `replace`: a reaped feed's task may still be draining.
                        let task = self
                            .supervisor
                            .replace(
                                TaskId::new(TaskKind::AttachFeed, run),
                                BTreeMap::from([("run".to_owned(), run.to_owned())]),
                                POLICY,
                                move |ctx| worker.clone().run(ctx),
                            )
                            .await;
                        let mut feeds = self.feeds.lock().unwrap();
                        feed.state.lock().unwrap().subscribers += 1;
                        feeds.insert(
                            run.to_owned(),
                            FeedEntry {
                                feed: Arc::clone(&feed),
                                _task: task,
                            },
                        );
                        feed
                    }
                }
            }
        };
        let rx = feed.tx.subscribe();
        let guard = SubscriberGuard {
            feeds: Arc::clone(&self.feeds),
            run: run.to_owned(),
            feed: Arc::clone(&feed),
        };
        Ok(Subscription {
            snapshot: Vec::new(),
            end: None,
            rx: FeedReceiver {
                feed,
                rx,
                cursor: after,
                paged: VecDeque::new(),
                client,
                run: run.to_owned(),
                ended: false,
                _guard: guard,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64, data_len: usize) -> RunEvent {
        RunEvent {
            seq,
            kind: "stdout".into(),
            data: Some("x".repeat(data_len)),
            created_at: "2026-12-01T00:00:00.000Z".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_feed_keeps_at_most_its_byte_cap_dropping_the_oldest() {
        let cap = 1 << 20;
        let feed = Feed::new(0, cap);
        // 4 MiB of 16 KiB events into a 1 MiB feed.
        for seq in 1..=256 {
            feed.push(event(seq, 16 << 10));
            assert!(feed.bytes() <= cap, "{} bytes at seq {seq}", feed.bytes());
        }
        assert_eq!(feed.cursor(), 256);
        let Next::Page { before: first } = feed.next(0) else {
            panic!("older events must be paged over HTTP");
        };
        assert!(first > 190, "kept from {first}");
        assert!(matches!(feed.next(first - 1), Next::Event(e) if e.seq == first));
        assert!(matches!(feed.next(255), Next::Event(e) if e.seq == 256));
        assert!(matches!(feed.next(256), Next::Wait));
        feed.finish(RunEnd {
            state: "succeeded".into(),
            exit_code: Some(0),
        });
        assert!(matches!(feed.next(256), Next::End(_)));
    }

    #[test]
    fn a_feed_started_at_a_cursor_asks_earlier_subscribers_to_page() {
        let feed = Feed::new(40, FEED_MAX_BYTES);
        assert_eq!(feed.cursor(), 40);
        assert!(matches!(feed.next(40), Next::Wait));
        assert!(matches!(feed.next(10), Next::Page { before: 41 }));
        feed.push(event(41, 10));
        assert!(matches!(feed.next(10), Next::Page { before: 41 }));
        assert!(matches!(feed.next(40), Next::Event(e) if e.seq == 41));
    }
}
