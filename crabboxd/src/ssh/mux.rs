//! The `SshMux{lease}` task: owns one lease's connection. An attempt waits
//! until work arrives, resolves the target, connects (port order, host key,
//! auth), publishes the connection to waiting commands, keeps the task
//! table's labels current, and ends when the connection is lost (retryable:
//! the supervisor's backoff applies before the next connect), after ten
//! idle minutes (clean: the next attempt waits for work again), at lease end
//! (fatal) or when cancelled — then only after its open channels ended (at
//! most three seconds), so commands being killed over it are gone first.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use tokio::{
    sync::{Notify, watch},
    time::Instant,
};

use super::{
    SshError,
    conn::{self, Conn, Stats},
    target::{LeaseFiles, Target},
};
use crate::{
    config::StaticTarget,
    coordinator,
    daemon::{LeaseEnds, LeaseOver},
    supervisor::{TaskCtx, TaskError},
};

/// A connection with no channel and no forward for this long is closed
/// (OpenSSH `ControlPersist=10m`).
pub const IDLE_CLOSE: Duration = Duration::from_secs(600);
/// How long a stopping daemon waits for a connection's channels to end
/// (its commands being killed over it, copies and shells being closed)
/// before it disconnects: sshd signals nothing to a command without a
/// terminal when the connection drops, so disconnecting first would leave
/// the command running on the lease. Three seconds cover the kill's own
/// two seconds between SIGTERM and SIGKILL.
const STOP_DRAIN: Duration = Duration::from_secs(3);
/// How often labels and liveness are refreshed.
const TICK: Duration = Duration::from_secs(2);
/// How often the round-trip time is measured.
const PING_EVERY: Duration = Duration::from_secs(15);

/// What a mux is doing.
#[derive(Debug, Clone)]
pub enum State {
    /// No connection, none wanted.
    Idle,
    /// Connecting.
    Connecting,
    /// Connected.
    Up(Arc<Conn>),
    /// Attempt number `.0` failed (or its connection ended) with this error.
    Failed(u64, Arc<SshError>),
}

/// Shared between the task and the commands using it.
#[derive(Debug)]
pub struct Shared {
    /// The lease.
    pub lease: String,
    /// The state, watched by waiting commands.
    pub state: watch::Sender<State>,
    /// Signalled by a command that needs a connection.
    pub demand: Notify,
    /// The calling client's agent socket, from the latest request.
    pub agent: Mutex<Option<PathBuf>>,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Connection attempts started.
    attempts: std::sync::atomic::AtomicU64,
    /// The counter labels last written to the task table.
    last_labels: Mutex<Vec<String>>,
}

impl Shared {
    /// A fresh, idle mux.
    pub fn new(lease: &str) -> Self {
        Shared {
            lease: lease.to_owned(),
            state: watch::channel(State::Idle).0,
            demand: Notify::new(),
            agent: Mutex::new(None),
            stats: Arc::new(Stats::default()),
            attempts: std::sync::atomic::AtomicU64::new(0),
            last_labels: Mutex::new(Vec::new()),
        }
    }

    /// A live connection: the current one, or the next one the task makes.
    /// A failure of an attempt that ran after this call is returned; a
    /// stale failure from before is not.
    pub async fn conn(&self, wait: Duration) -> Result<Arc<Conn>, SshError> {
        let mut rx = self.state.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        // Only the failure of an attempt running now or started later
        // counts; an older one (a connection lost before this call) does not.
        let min_attempt = {
            let state = rx.borrow_and_update();
            let current = self.attempts.load(Ordering::SeqCst);
            match &*state {
                State::Up(c) if !c.handle.is_closed() => return Ok(Arc::clone(c)),
                State::Connecting => current,
                _ => current + 1,
            }
        };
        loop {
            self.demand.notify_one();
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(SshError::Lost("the SSH mux ended".into())),
                Err(_) => {
                    return Err(SshError::Unreachable(format!(
                        "no SSH connection to {} within {wait:?}",
                        self.lease
                    )));
                }
            }
            let state = rx.borrow_and_update().clone();
            match state {
                State::Up(c) if !c.handle.is_closed() => return Ok(c),
                State::Failed(n, e) if n >= min_attempt => return Err((*e).clone()),
                _ => {}
            }
        }
    }
}

/// Resolves a lease to its target, once per connection attempt.
#[derive(Debug, Clone)]
pub struct Resolver {
    /// The coordinator, if configured.
    pub coordinator: Option<coordinator::Client>,
    /// Static targets from configuration.
    pub statics: Arc<std::collections::BTreeMap<String, StaticTarget>>,
    /// `[ssh] key`.
    pub default_key: Option<PathBuf>,
    /// The user config dir.
    pub config_dir: PathBuf,
    /// How long a connection with no channel stays open.
    pub idle_close: Duration,
    /// The keepalive interval (dead after two unanswered).
    pub keepalive: Duration,
    /// How long a channel's output may wait for its reader.
    pub stall: Duration,
}

impl Resolver {
    /// The target of `lease`: a static target of that name, else the
    /// coordinator's lease record.
    pub async fn resolve(&self, lease: &str) -> Result<Target, SshError> {
        if let Some(t) = self.statics.get(lease) {
            return Ok(Target::from_static(lease, t, self.default_key.clone()));
        }
        let Some(c) = &self.coordinator else {
            return Err(SshError::NoTarget(format!(
                "no SSH target {lease}: it is not a [targets.{lease}] in crabboxd.toml and no coordinator is configured"
            )));
        };
        let record = c.lease(lease).await.map_err(|e| {
            if e.lease_end().is_some() || !e.is_retryable() {
                SshError::NoTarget(format!("cannot look up lease {lease}: {e}"))
            } else {
                SshError::Unreachable(format!("cannot look up lease {lease}: {e}"))
            }
        })?;
        if !record.is_live() {
            return Err(SshError::LeaseEnded(format!(
                "lease {lease} is {}",
                record.state
            )));
        }
        Target::from_lease(&record, self.default_key.clone()).map_err(SshError::NoTarget)
    }

    /// The per-lease files.
    pub fn files(&self, lease: &str) -> LeaseFiles {
        LeaseFiles::new(&self.config_dir, lease)
    }
}

/// One mux task's inputs; cloned into each attempt.
#[derive(Clone)]
pub struct MuxTask {
    /// Shared with commands.
    pub shared: Arc<Shared>,
    /// Target lookup.
    pub resolver: Resolver,
    /// Lease end.
    pub ends: LeaseEnds,
}

impl MuxTask {
    /// One attempt: one connection's life.
    pub async fn run(self, ctx: TaskCtx) -> Result<(), TaskError> {
        let ended = self.ends.wait_for(&self.shared.lease);
        tokio::pin!(ended);
        ctx.set_label("state", "idle");
        tokio::select! {
            _ = self.shared.demand.notified() => {}
            _ = ctx.cancelled() => return Ok(()),
            reason = &mut ended => return self.over(&ctx, self.shared.attempts.load(Ordering::SeqCst) + 1, reason),
        }
        let attempt = self.shared.attempts.fetch_add(1, Ordering::SeqCst) + 1;
        self.shared.state.send_replace(State::Connecting);
        ctx.set_label("state", "connecting");
        let connect = async {
            let target = self.resolver.resolve(&self.shared.lease).await?;
            ctx.set_label("target", target.display());
            let files = self.resolver.files(&self.shared.lease);
            let agent = self.shared.agent.lock().unwrap().clone();
            let cred = conn::credential(&files, &target, agent.as_deref())?;
            conn::connect(
                &target,
                &files,
                &cred,
                &self.shared.stats,
                self.resolver.keepalive,
                self.resolver.stall,
            )
            .await
        };
        let conn = tokio::select! {
            c = connect => c,
            _ = ctx.cancelled() => { self.shared.state.send_replace(State::Idle); return Ok(()) }
            reason = &mut ended => return self.over(&ctx, attempt, reason),
        };
        let conn = match conn {
            Ok(c) => Arc::new(c),
            Err(e) => {
                let fatal = e.is_fatal();
                ctx.set_label("last_error", e.to_string());
                ctx.set_label("state", "failed");
                tracing::warn!(error = %e, "ssh connect failed");
                self.shared
                    .state
                    .send_replace(State::Failed(attempt, Arc::new(e.clone())));
                return Err(if fatal {
                    TaskError::fatal(e)
                } else {
                    TaskError::retryable(e)
                });
            }
        };
        if self.shared.stats.connects.load(Ordering::SeqCst) > 1 {
            self.shared.stats.reconnects.fetch_add(1, Ordering::SeqCst);
        }
        ctx.set_label("port", conn.port.to_string());
        if let Some(f) = &conn.fallback {
            ctx.set_label("note", f.clone());
        }
        self.measure_rtt(&conn).await;
        self.shared.last_labels.lock().unwrap().clear();
        self.labels(&ctx, &conn);
        ctx.set_label("state", "connected");
        tracing::info!(target = %conn.target.display(), port = conn.port, "ssh connected");
        self.shared.state.send_replace(State::Up(Arc::clone(&conn)));
        ctx.running();
        let mut tick = tokio::time::interval(TICK);
        let mut last_ping = Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = ctx.cancelled() => {
                    self.drain(&conn).await;
                    self.close(&conn, "the daemon is stopping").await;
                    self.labels(&ctx, &conn);
                    ctx.set_label("state", "closed");
                    self.shared.state.send_replace(State::Idle);
                    return Ok(());
                }
                reason = &mut ended => {
                    self.close(&conn, "the lease ended").await;
                    self.labels(&ctx, &conn);
                    ctx.set_label("state", "ended");
                    return self.over(&ctx, attempt, reason);
                }
            }
            if conn.handle.is_closed() {
                let e = SshError::Lost(format!(
                    "the SSH connection to {} (port {}) was lost",
                    conn.target.host, conn.port
                ));
                ctx.set_label("last_error", e.to_string());
                ctx.set_label("state", "lost");
                tracing::warn!(error = %e, "ssh connection lost");
                self.shared
                    .state
                    .send_replace(State::Failed(attempt, Arc::new(e.clone())));
                return Err(TaskError::retryable(e));
            }
            if last_ping.elapsed() >= PING_EVERY {
                last_ping = Instant::now();
                self.measure_rtt(&conn).await;
            }
            self.labels(&ctx, &conn);
            let idle = self.shared.stats.channels.load(Ordering::SeqCst) == 0
                && self.shared.stats.forwards.load(Ordering::SeqCst) == 0
                && self
                    .shared
                    .stats
                    .idle_since
                    .lock()
                    .unwrap()
                    .is_some_and(|t| t.elapsed() >= self.resolver.idle_close);
            if idle {
                tracing::info!("closing the idle SSH connection");
                self.close(&conn, "idle").await;
                ctx.set_label("state", "idle");
                self.shared.state.send_replace(State::Idle);
                return Ok(());
            }
        }
    }

    async fn measure_rtt(&self, conn: &Conn) {
        let start = Instant::now();
        if let Ok(Ok(())) =
            tokio::time::timeout(Duration::from_secs(5), conn.handle.send_ping()).await
        {
            conn.rtt_us
                .store(start.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
    }

    /// Refreshes the counters in the task table, only when they changed
    /// (every label change is an event for `tasks --watch`).
    fn labels(&self, ctx: &TaskCtx, conn: &Conn) {
        let s = &self.shared.stats;
        let rtt = conn.rtt_us.load(Ordering::Relaxed);
        let values = [
            ("rtt", format!("{:.1}ms", rtt as f64 / 1000.0)),
            ("channels", s.channels.load(Ordering::SeqCst).to_string()),
            ("bytes_in", s.bytes_in.load(Ordering::Relaxed).to_string()),
            ("bytes_out", s.bytes_out.load(Ordering::Relaxed).to_string()),
            (
                "reconnects",
                s.reconnects.load(Ordering::SeqCst).to_string(),
            ),
        ];
        let mut last = self.shared.last_labels.lock().unwrap();
        for (i, (k, v)) in values.into_iter().enumerate() {
            if last.get(i) != Some(&v) {
                ctx.set_label(k, v.clone());
                if last.len() <= i {
                    last.resize(i + 1, String::new());
                }
                last[i] = v;
            }
        }
    }

    /// Waits, at most [`STOP_DRAIN`], until no channel of `conn` is open.
    async fn drain(&self, conn: &Conn) {
        let deadline = Instant::now() + STOP_DRAIN;
        let open = || conn.stats.channels.load(Ordering::SeqCst);
        if open() == 0 {
            return;
        }
        tracing::info!(
            channels = open(),
            "waiting for the connection's channels to end before closing it"
        );
        while open() > 0 && !conn.handle.is_closed() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if open() > 0 {
            tracing::info!(
                channels = open(),
                "closing the connection with channels still open"
            );
        }
    }

    async fn close(&self, conn: &Conn, why: &str) {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            conn.handle
                .disconnect(russh::Disconnect::ByApplication, why, "en"),
        )
        .await;
    }

    /// The lease is over: waiting commands get the reason; the task ends
    /// for good — stopped after a release through the daemon, failed when
    /// the coordinator ended the lease.
    fn over(&self, ctx: &TaskCtx, attempt: u64, over: LeaseOver) -> Result<(), TaskError> {
        let e = SshError::LeaseEnded(over.reason);
        self.shared
            .state
            .send_replace(State::Failed(attempt, Arc::new(e.clone())));
        if over.orderly {
            // Cancelling itself makes the clean end final (no restart).
            ctx.token().cancel();
            return Ok(());
        }
        Err(TaskError::fatal(e))
    }
}
