//! The `ControlChannel` task: one `/v1/control` WebSocket per coordinator,
//! shared by every lease (and, later, every run). It routes heartbeat
//! replies to the keepers that wait for them; every wait is bounded and a
//! keeper falls back to HTTP in the same tick when the socket is refused,
//! silent or down.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

use crate::{
    coordinator::{
        self, CoordinatorError, RunEvent,
        control::{ServerFrame, ack_frame, heartbeat_frame, subscribe_frame},
    },
    supervisor::{
        Backoff, RestartPolicy, Supervisor, TaskCtx, TaskError, TaskHandle, TaskId, TaskKind,
    },
};

/// A heartbeat answered over the control socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlBeat {
    /// Accepted; the lease now expires at this time (ISO-8601).
    Ok {
        /// `expiresAt`.
        expires_at: Option<String>,
    },
    /// Refused with an error code (`lease_ended`, `not_found`, …).
    Refused {
        /// The code.
        code: String,
    },
}

/// Why a control heartbeat did not get an answer (the caller falls back to
/// HTTP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// The socket is not up (refused, reconnecting, never dialled).
    #[error("control socket not connected")]
    NotConnected,
    /// No answer within the wait.
    #[error("no heartbeat answer on the control socket in time")]
    Timeout,
}

type Waiters = HashMap<String, VecDeque<oneshot::Sender<ControlBeat>>>;

/// The shared control channel of one coordinator. Cheap to clone.
#[derive(Clone)]
pub struct ControlChannel {
    inner: Arc<Inner>,
}

struct Inner {
    client: coordinator::Client,
    supervisor: Supervisor,
    // std mutexes: held only to clone or swap small values, never across
    // an await.
    outgoing: Mutex<Option<mpsc::Sender<String>>>,
    waiters: Mutex<Waiters>,
    runs: Mutex<HashMap<String, mpsc::Sender<Vec<RunEvent>>>>,
    handle: Mutex<Option<TaskHandle>>,
}

impl std::fmt::Debug for ControlChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlChannel").finish_non_exhaustive()
    }
}

/// How many pages a run subscriber may have queued before it is dropped.
const RUN_QUEUE: usize = 256;
/// How long a frame may wait for room in the socket's send queue.
const SEND_WAIT: Duration = Duration::from_secs(5);

/// The control socket reconnects forever with network backoff while it is
/// wanted; a clean close by the coordinator (a restart) reconnects too.
const POLICY: RestartPolicy = RestartPolicy::Always(Backoff::NETWORK);

impl ControlChannel {
    /// A channel to `client`'s coordinator; nothing is dialled until
    /// [`ControlChannel::ensure_started`].
    pub fn new(client: coordinator::Client, supervisor: Supervisor) -> Self {
        ControlChannel {
            inner: Arc::new(Inner {
                client,
                supervisor,
                outgoing: Mutex::new(None),
                waiters: Mutex::new(HashMap::new()),
                runs: Mutex::new(HashMap::new()),
                handle: Mutex::new(None),
            }),
        }
    }

    /// Starts the supervised socket task once, when the first user needs
    /// it (a daemon that keeps no lease holds no socket).
    pub async fn ensure_started(&self) {
        if self.inner.handle.lock().unwrap().is_some() {
            return;
        }
        let id = TaskId::new(
            TaskKind::ControlChannel,
            self.inner.client.base().as_str().trim_end_matches('/'),
        );
        let this = self.clone();
        let started = self
            .inner
            .supervisor
            .start(id, BTreeMap::new(), POLICY, move |ctx| {
                this.clone().run(ctx)
            })
            .await;
        if let Ok(handle) = started {
            let mut slot = self.inner.handle.lock().unwrap();
            if slot.is_none() {
                *slot = Some(handle);
            }
        }
    }

    /// Sends a heartbeat for `lease` and waits at most `wait` for its
    /// answer. Cancel-safe: a dropped call leaves only a closed waiter,
    /// which is skipped.
    pub async fn heartbeat(
        &self,
        lease: &str,
        idle_override_secs: Option<u64>,
        wait: Duration,
    ) -> Result<ControlBeat, ControlError> {
        let tx = self.sender()?;
        let (otx, orx) = oneshot::channel();
        {
            let mut waiters = self.inner.waiters.lock().unwrap();
            let queue = waiters.entry(lease.to_owned()).or_default();
            queue.retain(|w| !w.is_closed());
            queue.push_back(otx);
        }
        let frame = heartbeat_frame(lease, idle_override_secs);
        let exchange = async {
            tx.send(frame)
                .await
                .map_err(|_| ControlError::NotConnected)?;
            orx.await.map_err(|_| ControlError::NotConnected)
        };
        tokio::time::timeout(wait, exchange)
            .await
            .map_err(|_| ControlError::Timeout)?
    }

    /// Subscribes to a run's events after `after`: the receiver gets the
    /// first page and then pushes. It ends (`None`) when the socket drops or
    /// the subscriber falls more than a queue behind; either way the caller
    /// falls back to HTTP from its cursor, so nothing is lost.
    pub async fn subscribe_run(
        &self,
        run: &str,
        after: u64,
        limit: u32,
    ) -> Result<mpsc::Receiver<Vec<RunEvent>>, ControlError> {
        let (tx, rx) = mpsc::channel(RUN_QUEUE);
        self.inner.runs.lock().unwrap().insert(run.to_owned(), tx);
        self.send(subscribe_frame(run, after, limit)).await?;
        Ok(rx)
    }

    /// Asks for the next page of a subscribed run (after a full page).
    pub async fn resubscribe_run(
        &self,
        run: &str,
        after: u64,
        limit: u32,
    ) -> Result<(), ControlError> {
        self.send(subscribe_frame(run, after, limit)).await
    }

    /// Acknowledges a run's events up to `seq`.
    pub async fn ack_run(&self, run: &str, seq: u64) -> Result<(), ControlError> {
        self.send(ack_frame(run, seq)).await
    }

    /// Forgets a run subscription.
    pub fn unsubscribe_run(&self, run: &str) {
        self.inner.runs.lock().unwrap().remove(run);
    }

    /// The current connection's send queue, if connected.
    fn sender(&self) -> Result<mpsc::Sender<String>, ControlError> {
        self.inner
            .outgoing
            .lock()
            .unwrap()
            .clone()
            .ok_or(ControlError::NotConnected)
    }

    async fn send(&self, frame: String) -> Result<(), ControlError> {
        let tx = self.sender()?;
        tokio::time::timeout(SEND_WAIT, tx.send(frame))
            .await
            .map_err(|_| ControlError::Timeout)?
            .map_err(|_| ControlError::NotConnected)
    }

    /// One connection: dial, then route frames until it drops.
    async fn run(self, ctx: TaskCtx) -> Result<(), TaskError> {
        let dial = tokio::select! {
            ws = self.inner.client.connect_control() => ws,
            _ = ctx.cancelled() => return Ok(()),
        };
        // Even a refused control socket (an older coordinator, a proxy
        // without WebSockets) is retryable: keepers use HTTP meanwhile and
        // the socket is retried with backoff, capped at 30 s.
        let ws = dial.map_err(|e: CoordinatorError| TaskError::retryable(e))?;
        let (mut sink, mut stream) = ws.split();
        let (tx, mut rx) = mpsc::channel::<String>(64);
        *self.inner.outgoing.lock().unwrap() = Some(tx);
        ctx.running();
        tracing::info!("control socket connected");
        let result = loop {
            tokio::select! {
                msg = stream.next() => match msg {
                    Some(Ok(Message::Text(text))) => self.route(text.as_str()),
                    Some(Ok(Message::Close(frame))) => {
                        break Err(TaskError::retryable(anyhow::anyhow!("control socket closed: {frame:?}")));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => break Err(TaskError::retryable(e)),
                    None => break Err(TaskError::retryable(anyhow::anyhow!("control socket ended"))),
                },
                out = rx.recv() => {
                    let Some(frame) = out else { continue };
                    if let Err(e) = sink.send(Message::text(frame)).await {
                        break Err(TaskError::retryable(e));
                    }
                }
                _ = ctx.cancelled() => {
                    let _ = sink.close().await;
                    break Ok(());
                }
            }
        };
        // Waiters of this connection get no answer: dropping their senders
        // makes them fall back to HTTP at once instead of timing out.
        *self.inner.outgoing.lock().unwrap() = None;
        self.inner.waiters.lock().unwrap().clear();
        self.inner.runs.lock().unwrap().clear();
        result
    }

    fn route(&self, text: &str) {
        match serde_json::from_str::<ServerFrame>(text) {
            Ok(ServerFrame::Heartbeat {
                lease_id,
                ok,
                expires_at,
                error,
            }) => {
                let beat = if ok {
                    ControlBeat::Ok { expires_at }
                } else {
                    ControlBeat::Refused {
                        code: error.unwrap_or_default(),
                    }
                };
                let waiter = {
                    let mut waiters = self.inner.waiters.lock().unwrap();
                    waiters.get_mut(&lease_id).and_then(|q| {
                        // The oldest live waiter for this lease is the one
                        // this answer belongs to (answers come in order).
                        while let Some(w) = q.pop_front() {
                            if !w.is_closed() {
                                return Some(w);
                            }
                        }
                        None
                    })
                };
                if let Some(w) = waiter {
                    let _ = w.send(beat);
                }
            }
            Ok(ServerFrame::RunEvents { run_id, events }) => {
                let mut runs = self.inner.runs.lock().unwrap();
                if let Some(tx) = runs.get(&run_id) {
                    // Never block the read loop on a slow feed: drop its
                    // subscription instead, and it catches up over HTTP.
                    if tx.try_send(events).is_err() {
                        runs.remove(&run_id);
                    }
                }
            }
            Ok(ServerFrame::Error { code, message }) => {
                tracing::debug!(%code, %message, "control socket error frame");
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "unparsable control frame ignored"),
        }
    }
}
