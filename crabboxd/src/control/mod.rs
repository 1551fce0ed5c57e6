//! The `ControlChannel` task: one `/v1/control` socket per coordinator,
//! shared by every lease and run. It routes heartbeat replies (keyed by
//! canonical lease id) to the keepers that wait for them; every wait is
//! bounded and a keeper falls back to HTTP in the same tick when the socket
//! is refused, silent or down. It pings on an interval and replaces a
//! socket that stays silent for two intervals. It decides, per
//! `heartbeat_transport`, whether heartbeats use the socket at all.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::sync::{mpsc, oneshot};

use crate::{
    config::HeartbeatTransport,
    coordinator::{
        self, CoordinatorError, RunEvent,
        control::{ClientFrame, Inbound, ServerFrame},
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
    transport: HeartbeatTransport,
    ping_every: Duration,
    /// Set (in `auto`) after the first unanswered control heartbeat: from
    /// then on this coordinator gets HTTP heartbeats only.
    gave_up: AtomicBool,
    // std mutexes: held only to clone or swap small values, never across
    // an await.
    outgoing: Mutex<Option<mpsc::Sender<ClientFrame>>>,
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
/// The control socket's dial, TLS and upgrade together.
const DIAL_TIMEOUT: Duration = Duration::from_secs(30);

/// The control socket reconnects forever with network backoff while it is
/// wanted; a clean close by the coordinator (a restart) reconnects too.
const POLICY: RestartPolicy = RestartPolicy::Always(Backoff::NETWORK);

impl ControlChannel {
    /// A channel to `client`'s coordinator; nothing is dialled until
    /// [`ControlChannel::ensure_started`]. The socket is pinged every
    /// `ping_every`.
    pub fn new(
        client: coordinator::Client,
        supervisor: Supervisor,
        transport: HeartbeatTransport,
        ping_every: Duration,
    ) -> Self {
        ControlChannel {
            inner: Arc::new(Inner {
                client,
                supervisor,
                transport,
                ping_every,
                gave_up: AtomicBool::new(false),
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

    /// Whether lease heartbeats should try this socket: never in `http`,
    /// always in `control`, and in `auto` until one went unanswered.
    pub fn heartbeats_wanted(&self) -> bool {
        match self.inner.transport {
            HeartbeatTransport::Http => false,
            HeartbeatTransport::Control => true,
            HeartbeatTransport::Auto => !self.inner.gave_up.load(Ordering::SeqCst),
        }
    }

    /// Sends a heartbeat for `lease` (its canonical id: the coordinator
    /// answers with the canonical id whatever it was sent, and waiters are
    /// keyed by it) and waits at most `wait` for its answer. Cancel-safe: a
    /// dropped call leaves only a closed waiter, which is skipped.
    ///
    /// In `auto`, an unanswered heartbeat turns control heartbeats off for
    /// this coordinator for the rest of the daemon's life, with one log line.
    pub async fn heartbeat(
        &self,
        lease: &str,
        idle_override_secs: Option<u64>,
        wait: Duration,
    ) -> Result<ControlBeat, ControlError> {
        let result = self.exchange(lease, idle_override_secs, wait).await;
        if result == Err(ControlError::Timeout)
            && self.inner.transport == HeartbeatTransport::Auto
            && !self.inner.gave_up.swap(true, Ordering::SeqCst)
        {
            tracing::warn!(
                coordinator = %self.inner.client.base(),
                wait = ?wait,
                "a control-socket heartbeat got no answer in time; heartbeats to this coordinator \
                 use HTTP only from now on (heartbeat_transport = \"auto\"). An unpatched reference \
                 coordinator 0.46.0 deadlocks on control heartbeats (openclaw/crabbox#1555, fixed by \
                 openclaw/crabbox#1557); set heartbeat_transport = \"control\" once it runs the fix, \
                 or \"http\" to never try"
            );
        }
        result
    }

    async fn exchange(
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
        let frame = ClientFrame::Heartbeat {
            lease: lease.to_owned(),
            idle_override_secs,
        };
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
        let sent = self
            .send(ClientFrame::Subscribe {
                run: run.to_owned(),
                after,
                limit,
            })
            .await;
        if let Err(e) = sent {
            // Not subscribed: the entry would route nothing but stay.
            self.inner.runs.lock().unwrap().remove(run);
            return Err(e);
        }
        Ok(rx)
    }

    /// Asks for the next page of a subscribed run (after a full page).
    pub async fn resubscribe_run(
        &self,
        run: &str,
        after: u64,
        limit: u32,
    ) -> Result<(), ControlError> {
        self.send(ClientFrame::Subscribe {
            run: run.to_owned(),
            after,
            limit,
        })
        .await
    }

    /// Acknowledges a run's events up to `seq`.
    pub async fn ack_run(&self, run: &str, seq: u64) -> Result<(), ControlError> {
        self.send(ClientFrame::Ack {
            run: run.to_owned(),
            seq,
        })
        .await
    }

    /// Forgets a run subscription.
    pub fn unsubscribe_run(&self, run: &str) {
        self.inner.runs.lock().unwrap().remove(run);
    }

    /// The current connection's send queue, if connected.
    fn sender(&self) -> Result<mpsc::Sender<ClientFrame>, ControlError> {
        self.inner
            .outgoing
            .lock()
            .unwrap()
            .clone()
            .ok_or(ControlError::NotConnected)
    }

    async fn send(&self, frame: ClientFrame) -> Result<(), ControlError> {
        let tx = self.sender()?;
        tokio::time::timeout(SEND_WAIT, tx.send(frame))
            .await
            .map_err(|_| ControlError::Timeout)?
            .map_err(|_| ControlError::NotConnected)
    }

    /// One connection: dial, then route frames until it drops.
    async fn run(self, ctx: TaskCtx) -> Result<(), TaskError> {
        // A coordinator that accepts the connection and never answers the
        // upgrade must not leave the socket starting for good.
        let dial = tokio::select! {
            ws = tokio::time::timeout(DIAL_TIMEOUT, self.inner.client.connect_control()) => match ws {
                Ok(ws) => ws,
                Err(_) => {
                    return Err(TaskError::retryable(anyhow::anyhow!(
                        "control socket: no upgrade within {DIAL_TIMEOUT:?}"
                    )));
                }
            },
            _ = ctx.cancelled() => return Ok(()),
        };
        // Even a refused control socket (an older coordinator, a proxy
        // without WebSockets) is retryable: keepers use HTTP meanwhile and
        // the socket is retried with backoff, capped at 30 s.
        let socket = dial.map_err(|e: CoordinatorError| TaskError::retryable(e))?;
        let (mut sink, mut stream) = socket.split();
        let (tx, mut rx) = mpsc::channel::<ClientFrame>(64);
        *self.inner.outgoing.lock().unwrap() = Some(tx);
        ctx.running();
        tracing::info!("control socket connected");
        // Liveness: a ping every interval; an interval in which nothing at
        // all arrived (not even the pong of the previous ping) means the
        // peer is gone or the path is half-open, so the socket is replaced
        // at most two intervals after the last sign of life.
        let every = self.inner.ping_every;
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heard = true;
        let result = loop {
            tokio::select! {
                msg = stream.recv() => match msg {
                    Ok(Inbound::Frame(frame)) => {
                        heard = true;
                        self.route(frame);
                    }
                    Ok(Inbound::Alive) => heard = true,
                    Err(e) => break Err(TaskError::retryable(e)),
                },
                out = rx.recv() => {
                    let Some(frame) = out else { continue };
                    if let Err(e) = sink.send(&frame).await {
                        break Err(TaskError::retryable(e));
                    }
                }
                _ = ping.tick() => {
                    if !heard {
                        tracing::warn!(silent_for = ?every, "control socket silent; replacing it");
                        break Err(TaskError::retryable(anyhow::anyhow!(
                            "control socket silent for {every:?} after a ping; replaced"
                        )));
                    }
                    heard = false;
                    if let Err(e) = sink.ping().await {
                        break Err(TaskError::retryable(e));
                    }
                }
                _ = ctx.cancelled() => {
                    sink.close().await;
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

    fn route(&self, frame: ServerFrame) {
        match frame {
            ServerFrame::Heartbeat {
                lease_id,
                ok,
                expires_at,
                error,
            } => {
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
            ServerFrame::RunEvents { run_id, events } => {
                let mut runs = self.inner.runs.lock().unwrap();
                if let Some(tx) = runs.get(&run_id) {
                    // Never block the read loop on a slow feed: drop its
                    // subscription instead, and it catches up over HTTP.
                    if tx.try_send(events).is_err() {
                        runs.remove(&run_id);
                    }
                }
            }
            ServerFrame::Error { code, message } => {
                tracing::debug!(code = ?code, message = ?message, "control socket error frame");
            }
            _ => {}
        }
    }
}
