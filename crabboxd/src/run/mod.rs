//! Runs the daemon owns: one `Run{run}` task per `crabboxctl run`. It
//! creates the run at the coordinator, posts `command.started`, runs the
//! command over the lease's mux (the environment the allowlist lets through
//! goes over the channel's stdin into a variable of the remote wrapper,
//! which evaluates and unsets it; nothing is written on the lease), sends
//! stdout and stderr to the starting client and, as run
//! events, to the coordinator (a bounded queue that never slows the command;
//! what it drops is counted and reported), keeps the lease alive with a
//! `LeaseHold` (counted, never persisted: a user's `lease keep` is left
//! alone), and finishes the run with the exit code and the log tail.
//! The run does not depend on its client: only `StopRun` ends it early.
//!
//! * [`env`] — the allowlist, the summary, the env file and the wrapper.
//! * [`output`] — event chunks, the event cap, the log tail.

pub mod env;
pub mod output;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;

use crate::{
    attach::AttachManager,
    coordinator::{self, CoordinatorError, ErrorKind, EventInput, FinishInput, NewRun},
    egress::remote::{self, Remote, RemoteError},
    lease::LeaseManager,
    ssh::{self, Command, ExecSpec, Input, Output, Signal, SshError, SshManager, exec::sh_quote},
    supervisor::{RestartPolicy, Supervisor, TaskCtx, TaskError, TaskHandle, TaskId, TaskKind},
};

use output::{Cutter, LogTail, Stream};

/// Output events waiting for the coordinator, at most (the reference's 32).
pub const EVENT_QUEUE: usize = 32;
/// How long a paused output waits before its partial chunk is posted (so
/// attach clients see a line soon after it is written).
pub const FLUSH_AFTER: Duration = Duration::from_millis(10);
/// How long queued events may take to drain after the command ended.
pub const DRAIN: Duration = Duration::from_secs(5);
/// How long the starting client may refuse output before it loses the
/// stream (the command is not held longer than this by a client).
pub const CLIENT_STALL: Duration = Duration::from_secs(10);
/// Ended runs stay listed this long.
pub const KEEP_ENDED: Duration = Duration::from_secs(600);
/// The exit code of a run whose command could not run or whose connection
/// was lost (ssh's own 255).
pub const SSH_FAILED: i32 = 255;
/// The lease-local file the egress helper publishes (see `egress start`).
pub const EGRESS_CURRENT: &str = "$HOME/.local/state/crabbox/egress/current.json";
/// How long each coordinator call of a start may take (the lease lookup;
/// `create_run` has its own, shorter one). Only the coordinator calls are
/// bounded by it: the SSH checks between them have their own deadline.
pub const COORDINATOR_WAIT: Duration = Duration::from_secs(20);
/// How long each `--egress` check on the lease may take.
pub const EGRESS_CHECK: Duration = Duration::from_secs(30);

/// What a client asks for. Its `Debug` names the client's environment
/// variables, never their values.
#[derive(Clone, Default)]
pub struct RunRequest {
    /// The lease id or slug.
    pub lease: String,
    /// The command.
    pub argv: Vec<String>,
    /// The remote working directory.
    pub cwd: Option<String>,
    /// A label.
    pub label: Option<String>,
    /// The client's environment (never logged).
    pub client_env: Vec<(String, String)>,
    /// The client's `CRABBOX_ENV_ALLOW`, when set.
    pub env_allow: Option<String>,
    /// `--allow-env` patterns.
    pub allow_env: Vec<String>,
    /// `--egress`.
    pub egress: bool,
    /// The client's SSH agent socket.
    pub agent: Option<PathBuf>,
}

impl std::fmt::Debug for RunRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunRequest")
            .field("lease", &self.lease)
            .field("argv", &self.argv)
            .field("cwd", &self.cwd)
            .field("label", &self.label)
            .field(
                "client_env",
                &self.client_env.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .field("env_allow", &self.env_allow)
            .field("allow_env", &self.allow_env)
            .field("egress", &self.egress)
            .finish_non_exhaustive()
    }
}

/// The run started.
#[derive(Debug, Clone)]
pub struct Started {
    /// The run id.
    pub run_id: String,
    /// The canonical lease id.
    pub lease_id: String,
    /// The slug, if any.
    pub slug: Option<String>,
    /// The forwarded variables, by name.
    pub forwarded: Vec<env::Forwarded>,
    /// The summary line, when forwarding was configured by the client.
    pub env_summary: String,
    /// The egress proxy, with `--egress`.
    pub proxy: Option<String>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Exit code 0.
    Succeeded,
    /// Any other exit code.
    Failed,
    /// No exit code (connection lost, could not start, daemon stopping).
    Unknown,
}

/// The end of a run.
#[derive(Debug, Clone)]
pub struct Finished {
    /// The outcome.
    pub outcome: Outcome,
    /// The exit code (128+n for signals).
    pub exit_code: Option<i32>,
    /// The signal name.
    pub signal: Option<String>,
    /// Why there is no exit code.
    pub detail: Option<String>,
    /// Events posted.
    pub events_posted: u64,
    /// Events dropped (queue full, or the post failed).
    pub events_dropped: u64,
    /// Whether the event cap cut output.
    pub output_truncated: bool,
    /// Output bytes.
    pub output_bytes: u64,
}

/// What the starting client receives after `Started`.
#[derive(Debug, Clone)]
pub enum RunOutput {
    /// stdout bytes.
    Stdout(Bytes),
    /// stderr bytes.
    Stderr(Bytes),
    /// The end; nothing follows.
    Finished(Finished),
}

/// One run in `ListRuns`.
#[derive(Debug, Clone)]
pub struct RunInfo {
    /// The run id.
    pub run_id: String,
    /// The lease id.
    pub lease_id: String,
    /// The command.
    pub argv: Vec<String>,
    /// The label.
    pub label: Option<String>,
    /// When it started.
    pub started_at: SystemTime,
    /// When it ended.
    pub ended_at: Option<SystemTime>,
    /// Its end.
    pub finished: Option<Finished>,
}

/// Why a run could not start or be stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// No coordinator.
    #[error(
        "no coordinator configured: set CRABBOX_COORDINATOR (or broker.url in config.yaml) and restart crabboxd"
    )]
    NoCoordinator,
    /// A bad request.
    #[error("{0}")]
    Invalid(String),
    /// `--egress` without a running helper.
    #[error("{0}")]
    NoEgress(String),
    /// Unknown run.
    #[error("run {0} is not owned by this daemon (see `crabboxctl run list`)")]
    NotFound(String),
    /// The coordinator refused or failed.
    #[error(transparent)]
    Coordinator(#[from] CoordinatorError),
    /// SSH failed before the run was created.
    #[error(transparent)]
    Ssh(#[from] SshError),
}

struct Entry {
    info: Arc<Mutex<RunInfo>>,
    stop: mpsc::Sender<Signal>,
    _handle: TaskHandle,
}

/// Starts, lists and stops runs. Cheap to clone.
#[derive(Clone)]
pub struct RunManager {
    coordinator: Option<coordinator::Client>,
    attach: AttachManager,
    ssh: SshManager,
    leases: LeaseManager,
    supervisor: Supervisor,
    env_allow: Option<Vec<String>>,
    runs: Arc<Mutex<BTreeMap<String, Entry>>>,
}

impl std::fmt::Debug for RunManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunManager").finish_non_exhaustive()
    }
}

fn display(argv: &[String]) -> String {
    argv.iter()
        .map(|a| sh_quote(a))
        .collect::<Vec<_>>()
        .join(" ")
}

impl RunManager {
    /// A manager for the daemon's parts.
    pub fn new(
        coordinator: Option<coordinator::Client>,
        attach: AttachManager,
        ssh: SshManager,
        leases: LeaseManager,
        supervisor: Supervisor,
        env_allow: Option<Vec<String>>,
    ) -> Self {
        RunManager {
            coordinator,
            attach,
            ssh,
            leases,
            supervisor,
            env_allow,
            runs: Arc::default(),
        }
    }

    fn prune(&self) {
        let now = SystemTime::now();
        self.runs.lock().unwrap().retain(|_, e| {
            e.info
                .lock()
                .unwrap()
                .ended_at
                .is_none_or(|t| now.duration_since(t).unwrap_or_default() < KEEP_ENDED)
        });
    }

    /// Every run this daemon owns (running, or ended in the last ten
    /// minutes), newest first.
    pub fn list(&self) -> Vec<RunInfo> {
        self.prune();
        let mut out: Vec<RunInfo> = self
            .runs
            .lock()
            .unwrap()
            .values()
            .map(|e| e.info.lock().unwrap().clone())
            .collect();
        out.sort_by_key(|r| std::cmp::Reverse(r.started_at));
        out
    }

    /// Ends a run's remote process group with `sig`; `false` when it had
    /// already ended.
    pub async fn stop(&self, run: &str, sig: Signal) -> Result<bool, RunError> {
        let (tx, running) = {
            let runs = self.runs.lock().unwrap();
            let e = runs
                .get(run)
                .ok_or_else(|| RunError::NotFound(run.to_owned()))?;
            (e.stop.clone(), e.info.lock().unwrap().ended_at.is_none())
        };
        if !running {
            return Ok(false);
        }
        tracing::info!(run = %run, signal = ?sig, "stopping a run");
        Ok(tx.send(sig).await.is_ok())
    }

    /// Starts a run: everything that can be refused is checked first
    /// (allowlist, lease, egress), then the run is created at the
    /// coordinator and its task started. Returns at once; the output comes
    /// on the receiver, which the run never waits on for long.
    ///
    /// `gone` says whether the client that asked has gone away; checked once
    /// the run exists at the coordinator, so a client that hung up (or was
    /// interrupted) during the start never has its command run, and the run
    /// it created is finished with that reason.
    pub async fn start(
        &self,
        req: RunRequest,
        gone: impl Fn() -> bool + Send,
    ) -> Result<(Started, mpsc::Receiver<RunOutput>), RunError> {
        let client = self.coordinator.clone().ok_or(RunError::NoCoordinator)?;
        if req.argv.is_empty() {
            return Err(RunError::Invalid("give the command after `--`".into()));
        }
        let allow = env::allowlist(
            self.env_allow.as_deref(),
            req.env_allow.as_deref(),
            &req.allow_env,
        )
        .map_err(RunError::Invalid)?;
        let selected = env::select(&allow, &req.client_env);
        if selected.len() > env::MAX_VARS
            || selected
                .iter()
                .map(|(n, v)| n.len() + v.len())
                .sum::<usize>()
                > env::MAX_BYTES
        {
            return Err(RunError::Invalid(format!(
                "the allowlist matches more than {} variables or {} KiB; narrow it",
                env::MAX_VARS,
                env::MAX_BYTES >> 10
            )));
        }
        let forwarded = env::describe(&selected);
        let env_summary = if req.env_allow.is_some() || !req.allow_env.is_empty() {
            env::summary(&forwarded, &allow)
        } else {
            String::new()
        };
        let name = req.lease.trim();
        let lease = tokio::time::timeout(COORDINATOR_WAIT, client.lease(name))
            .await
            .map_err(|_| CoordinatorError::Timeout {
                method: "GET",
                path: format!("/v1/leases/{name}"),
            })??;
        if !lease.is_live() {
            return Err(RunError::Invalid(format!(
                "lease {} is {}; start a new one",
                lease.id, lease.state
            )));
        }
        let lease_id = lease.id.clone();
        // A static target of the same name wins for SSH, as everywhere.
        let ssh_name = lease_id.clone();
        let proxy = if req.egress {
            Some(egress_proxy(&self.ssh, &ssh_name, req.agent.clone(), &lease_id).await?)
        } else {
            None
        };
        let record = client
            .create_run(&NewRun {
                lease_id: &lease_id,
                provider: &lease.provider,
                target: "linux",
                command: &req.argv,
                label: req.label.as_deref().filter(|l| !l.is_empty()),
            })
            .await?;
        let run_id = record.id.clone();
        // From here on the coordinator has a running run: every way out
        // that does not reach the run's own finish (an error, this request
        // being dropped, the task never running) posts one.
        let unfinished = Unfinished {
            client: client.clone(),
            supervisor: self.supervisor.clone(),
            run_id: run_id.clone(),
            detail: "the daemon created the run but could not start it".into(),
            armed: true,
        };
        tracing::info!(run = %run_id, lease = %lease_id, vars = selected.len(), "run created");
        if gone() {
            let mut unfinished = unfinished;
            unfinished.detail =
                "the client that started the run went away before its command started".into();
            return Err(RunError::Invalid(format!(
                "run {run_id}: {}",
                unfinished.detail
            )));
        }
        let slug = lease.slug.clone().unwrap_or_default();
        let mut file_env = selected;
        if let Some(p) = &proxy {
            for name in [
                "HTTP_PROXY",
                "HTTPS_PROXY",
                "ALL_PROXY",
                "http_proxy",
                "https_proxy",
                "all_proxy",
            ] {
                file_env.retain(|(n, _)| n != name);
                file_env.push((name.to_owned(), p.clone()));
            }
        }
        let env_text = env::env_file(
            &file_env,
            &[
                ("CRABBOX_LEASE_ID", &lease_id),
                ("CRABBOX_RUN_ID", &run_id),
                ("CRABBOX_SLUG", &slug),
            ],
        );
        let info = Arc::new(Mutex::new(RunInfo {
            run_id: run_id.clone(),
            lease_id: lease_id.clone(),
            argv: req.argv.clone(),
            label: req.label.clone().filter(|l| !l.is_empty()),
            started_at: SystemTime::now(),
            ended_at: None,
            finished: None,
        }));
        let (out_tx, out_rx) = mpsc::channel(64);
        let (stop_tx, stop_rx) = mpsc::channel(4);
        let job = Job {
            client,
            ssh: self.ssh.clone(),
            manager: self.clone(),
            run_id: run_id.clone(),
            lease_id: lease_id.clone(),
            ssh_name,
            argv: req.argv,
            cwd: req.cwd,
            agent: req.agent,
            env_text,
            info: Arc::clone(&info),
            unfinished,
        };
        let mut once = Some((job, out_tx, stop_rx));
        let labels = BTreeMap::from([
            ("lease".to_owned(), lease_id.clone()),
            ("run".to_owned(), run_id.clone()),
        ]);
        let handle = self
            .supervisor
            .start(
                TaskId::new(TaskKind::Run, &run_id),
                labels,
                RestartPolicy::Never,
                move |ctx| {
                    let taken = once.take();
                    async move {
                        match taken {
                            Some((job, out, stop)) => job.run(ctx, out, stop).await,
                            None => Ok(()),
                        }
                    }
                },
            )
            .await
            .map_err(|e| RunError::Invalid(format!("run {} is already running", e.0)))?;
        self.prune();
        self.runs.lock().unwrap().insert(
            run_id.clone(),
            Entry {
                info,
                stop: stop_tx,
                _handle: handle,
            },
        );
        Ok((
            Started {
                run_id,
                lease_id,
                slug: lease.slug,
                forwarded,
                env_summary,
                proxy,
            },
            out_rx,
        ))
    }
}

/// Reads the lease's egress state over the mux (the `current.json` that
/// `egress start` writes, through the same lease-side code) and checks the
/// helper is alive; the proxy URL it serves.
async fn egress_proxy(
    ssh: &SshManager,
    name: &str,
    agent: Option<PathBuf>,
    lease: &str,
) -> Result<String, RunError> {
    let refuse = |why: String| {
        RunError::NoEgress(format!(
            "no egress helper runs on lease {lease} ({why}); start one with `crabboxctl egress start --id {lease}`, or run without --egress"
        ))
    };
    let lease_side = |e: RemoteError| match e {
        RemoteError::Ssh(e) => RunError::Ssh(e),
        RemoteError::Lease(why) => refuse(why),
    };
    let remote = Remote {
        ssh: ssh.clone(),
        lease: name.to_owned(),
        agent,
    };
    let script = format!("f=\"{EGRESS_CURRENT}\"; [ -f \"$f\" ] || exit 3; head -c 65536 \"$f\"");
    let out = remote
        .sh_within(EGRESS_CHECK, &script, &[], None)
        .await
        .map_err(lease_side)?;
    if out.code == 3 {
        return Err(refuse("no current.json".into()));
    }
    if out.code != 0 {
        return Err(refuse(format!("reading its state exited {}", out.code)));
    }
    let cur: remote::Current = serde_json::from_str(&out.stdout)
        .map_err(|e| refuse(format!("its current.json is not valid: {e}")))?;
    let url = url::Url::parse(&cur.proxy)
        .ok()
        .filter(|u| u.scheme() == "http" && u.username().is_empty() && u.password().is_none());
    let loopback = url
        .as_ref()
        .and_then(|u| u.host())
        .is_some_and(|h| match h {
            url::Host::Domain(d) => d == "localhost",
            url::Host::Ipv4(a) => a.is_loopback(),
            url::Host::Ipv6(a) => a.is_loopback(),
        });
    if !loopback || cur.pid < 2 {
        return Err(refuse(format!(
            "its current.json names {:?} (pid {}), not a loopback http proxy",
            cur.proxy.chars().take(100).collect::<String>(),
            cur.pid
        )));
    }
    let alive = remote
        .sh_within(
            EGRESS_CHECK,
            "kill -0 \"$1\" 2>/dev/null",
            &[&cur.pid.to_string()],
            None,
        )
        .await
        .map_err(lease_side)?;
    if alive.code != 0 {
        return Err(refuse(format!("its pid {} is not running", cur.pid)));
    }
    Ok(cur.proxy)
}

/// One run's work, moved into its task.
struct Job {
    client: coordinator::Client,
    ssh: SshManager,
    manager: RunManager,
    run_id: String,
    lease_id: String,
    ssh_name: String,
    argv: Vec<String>,
    cwd: Option<String>,
    agent: Option<PathBuf>,
    env_text: String,
    info: Arc<Mutex<RunInfo>>,
    /// Posts a failed finish if this job is dropped before it finished the run.
    unfinished: Unfinished,
}

/// A run created at the coordinator that nothing has finished yet: dropped
/// while armed, it posts `run.failed` with its detail and a `finish` (exit
/// 255) in the background, bounded by the coordinator calls' own deadlines.
struct Unfinished {
    client: coordinator::Client,
    supervisor: Supervisor,
    run_id: String,
    detail: String,
    armed: bool,
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (client, run, detail) = (
            self.client.clone(),
            self.run_id.clone(),
            std::mem::take(&mut self.detail),
        );
        tracing::warn!(run = %run, detail = %detail, "finishing a run that could not start");
        self.supervisor
            .spawn_cleanup("finish a run that could not start", async move {
                let ev = EventInput {
                    kind: "run.failed".into(),
                    phase: Some("failed".into()),
                    message: Some(detail),
                    ..Default::default()
                };
                if let Err(e) = client
                    .post_run_event(&run, &ev, coordinator::runs_timeouts::LIFECYCLE)
                    .await
                {
                    tracing::warn!(run = %run, error = %e, "cannot record a run event");
                }
                let body = FinishInput {
                    exit_code: i64::from(SSH_FAILED),
                    command_ms: 0,
                    log: String::new(),
                    log_chunks: Vec::new(),
                    log_truncated: false,
                };
                if let Err(e) = client.finish_run(&run, &body).await {
                    tracing::warn!(run = %run, error = %e, "cannot finish the run at the coordinator");
                }
            });
    }
}

/// Counters shared by the run loop and the event poster.
#[derive(Default)]
struct Counts {
    queued: AtomicU64,
    posted: AtomicU64,
    full: AtomicU64,
}

/// The starting client, while it keeps up.
struct ClientOut(Option<mpsc::Sender<RunOutput>>);

impl ClientOut {
    async fn send(&mut self, item: RunOutput) {
        let Some(tx) = &self.0 else { return };
        match tx.send_timeout(item, CLIENT_STALL).await {
            Ok(()) => {}
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                tracing::info!("the starting client stopped reading; the run goes on without it");
                self.0 = None;
            }
            Err(mpsc::error::SendTimeoutError::Closed(_)) => {
                tracing::debug!("the starting client went away; the run goes on");
                self.0 = None;
            }
        }
    }
}

impl Job {
    async fn run(
        mut self,
        ctx: TaskCtx,
        out: mpsc::Sender<RunOutput>,
        stop: mpsc::Receiver<Signal>,
    ) -> Result<(), TaskError> {
        ctx.running();
        // Counted and never persisted: the lease is kept while the run
        // lives, a user's `lease keep` is left alone when it ends, and a
        // daemon killed mid-run restores no keep the user did not make.
        let hold = match self.manager.leases.hold(&self.lease_id).await {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!(lease = %self.lease_id, error = %e, "cannot keep the lease for a run");
                None
            }
        };
        let (finished, client_out) = self.execute(&ctx, ClientOut(Some(out)), stop).await;
        ctx.set_label(
            "exit",
            finished
                .exit_code
                .map_or_else(|| "unknown".to_owned(), |c| c.to_string()),
        );
        {
            let mut info = self.info.lock().unwrap();
            info.ended_at = Some(SystemTime::now());
            info.finished = Some(finished.clone());
        }
        // Listed as ended before the client hears the end.
        let mut client_out = client_out;
        client_out.send(RunOutput::Finished(finished)).await;
        if let Some(hold) = hold {
            hold.release().await;
        }
        Ok(())
    }

    async fn lifecycle(&self, ev: EventInput) {
        if let Err(e) = self
            .client
            .post_run_event(&self.run_id, &ev, coordinator::runs_timeouts::LIFECYCLE)
            .await
        {
            tracing::warn!(run = %self.run_id, kind = %ev.kind, error = %e, "cannot record a run event");
        }
    }

    async fn execute(
        &mut self,
        ctx: &TaskCtx,
        mut client_out: ClientOut,
        stop: mpsc::Receiver<Signal>,
    ) -> (Finished, ClientOut) {
        let counts = Arc::new(Counts::default());
        let (ev_tx, ev_rx) = mpsc::channel::<EventInput>(EVENT_QUEUE);
        // First in the queue, so a slow coordinator never delays the command.
        let mut batch = vec![EventInput {
            kind: "command.started".into(),
            phase: Some("command".into()),
            message: Some(display(&self.argv)),
            ..Default::default()
        }];
        queue(&ev_tx, &mut batch, &counts);
        let poster = post_events(
            self.client.clone(),
            self.manager.attach.clone(),
            self.run_id.clone(),
            ev_rx,
            Arc::clone(&counts),
        );
        tokio::pin!(poster);
        let mut argv = vec![
            "sh".to_owned(),
            "-c".to_owned(),
            env::WRAPPER.to_owned(),
            "sh".to_owned(),
        ];
        argv.extend(self.argv.iter().cloned());
        let spec = ExecSpec {
            lease: self.ssh_name.clone(),
            command: Command::Argv(argv),
            cwd: self.cwd.clone(),
            agent: self.agent.clone(),
        };
        let input = futures::stream::iter([
            Input::Stdin(Bytes::from(self.env_text.clone().into_bytes())),
            Input::Eof,
        ])
        .chain(tokio_stream::wrappers::ReceiverStream::new(stop).map(Input::Cancel));
        let mut exec = Box::pin(self.ssh.exec(spec, Box::pin(input)));
        let began = tokio::time::Instant::now();
        let mut cutter = Cutter::default();
        let mut tail = LogTail::default();
        let mut exit: Option<ssh::Exit> = None;
        let mut failure: Option<String> = None;
        let mut flush_at: Option<tokio::time::Instant> = None;
        let mut poster_done = false;
        loop {
            let item = tokio::select! {
                item = exec.next() => item,
                () = async { tokio::time::sleep_until(flush_at.unwrap()).await }, if flush_at.is_some() => {
                    flush_at = None;
                    cutter.flush(false, &mut batch);
                    queue(&ev_tx, &mut batch, &counts);
                    continue;
                }
                () = &mut poster, if !poster_done => { poster_done = true; continue; }
                () = ctx.cancelled() => {
                    failure = Some("the daemon stopped while the command ran; it was ended".into());
                    break;
                }
            };
            let Some(item) = item else { break };
            match item {
                Ok(Output::Started { .. }) => {}
                Ok(Output::Stdout(b)) => {
                    tail.push(&b);
                    cutter.push(Stream::Stdout, &b, &mut batch);
                    client_out.send(RunOutput::Stdout(b)).await;
                }
                Ok(Output::Stderr(b)) => {
                    tail.push(&b);
                    cutter.push(Stream::Stderr, &b, &mut batch);
                    client_out.send(RunOutput::Stderr(b)).await;
                }
                Ok(Output::Exit(e)) => {
                    exit = Some(e);
                }
                Err(e) => {
                    failure = Some(e.to_string());
                }
            }
            queue(&ev_tx, &mut batch, &counts);
            if cutter.has_pending() && flush_at.is_none() {
                flush_at = Some(tokio::time::Instant::now() + FLUSH_AFTER);
            }
        }
        // Dropping the stream ends a command still running (daemon stop).
        drop(exec);
        let command_ms = began.elapsed().as_millis() as u64;
        cutter.flush(true, &mut batch);
        queue(&ev_tx, &mut batch, &counts);
        drop(ev_tx);
        if !poster_done && tokio::time::timeout(DRAIN, &mut poster).await.is_err() {
            tracing::info!(run = %self.run_id, "output events still queued after {DRAIN:?}; counted as dropped");
        }
        let queued = counts.queued.load(Ordering::Relaxed);
        let posted = counts.posted.load(Ordering::Relaxed);
        let dropped = counts.full.load(Ordering::Relaxed) + (queued - posted);
        if dropped > 0 {
            self.lifecycle(EventInput {
                kind: "output.dropped".into(),
                phase: Some("command".into()),
                message: Some(format!(
                    "{dropped} output events were dropped because the coordinator was slower than the command or failed; the finish log has the tail"
                )),
                ..Default::default()
            })
            .await;
        }
        if let Some(why) = &failure {
            self.lifecycle(EventInput {
                kind: "run.failed".into(),
                phase: Some("failed".into()),
                message: Some(why.chars().take(1000).collect()),
                ..Default::default()
            })
            .await;
        }
        let code = exit.as_ref().map(|e| e.code);
        let (log, log_chunks, log_truncated) = tail.finish();
        let body = FinishInput {
            exit_code: i64::from(code.unwrap_or(SSH_FAILED)),
            command_ms,
            log,
            log_chunks,
            log_truncated,
        };
        // The finish below is this run's own: nothing else posts one.
        self.unfinished.armed = false;
        let mut delay = Duration::from_millis(500);
        for attempt in 0..4 {
            match self.client.finish_run(&self.run_id, &body).await {
                Ok(_) => break,
                Err(e) if e.is_retryable() && attempt < 3 => {
                    tracing::info!(run = %self.run_id, error = %e, "finish failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(e) => {
                    tracing::warn!(run = %self.run_id, error = %e, "cannot finish the run at the coordinator");
                    break;
                }
            }
        }
        let finished = Finished {
            outcome: match code {
                Some(0) => Outcome::Succeeded,
                Some(_) => Outcome::Failed,
                None => Outcome::Unknown,
            },
            exit_code: code,
            signal: exit.and_then(|e| e.signal),
            detail: failure,
            events_posted: posted,
            events_dropped: dropped,
            output_truncated: cutter.truncated(),
            output_bytes: tail.total(),
        };
        tracing::info!(
            run = %self.run_id,
            exit = ?finished.exit_code,
            posted,
            dropped,
            "run finished"
        );
        (finished, client_out)
    }
}

/// Moves a batch of events into the queue without waiting: what does not
/// fit is counted as dropped.
fn queue(tx: &mpsc::Sender<EventInput>, batch: &mut Vec<EventInput>, counts: &Counts) {
    for ev in batch.drain(..) {
        match tx.try_send(ev) {
            Ok(()) => {
                counts.queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                counts.full.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Posts queued events one at a time, 2 s each; a 404 stops posting (the
/// run is gone), other failures are counted and warned about once.
async fn post_events(
    client: coordinator::Client,
    attach: AttachManager,
    run: String,
    mut rx: mpsc::Receiver<EventInput>,
    counts: Arc<Counts>,
) {
    let mut warned = false;
    let mut disabled = false;
    while let Some(ev) = rx.recv().await {
        // What is not posted counts as dropped (queued − posted).
        if disabled {
            continue;
        }
        match client
            .post_run_event(&run, &ev, coordinator::runs_timeouts::EVENT)
            .await
        {
            Ok(recorded) => {
                counts.posted.fetch_add(1, Ordering::Relaxed);
                attach.offer(&run, recorded);
            }
            Err(e) => {
                if e.kind() == ErrorKind::NotFound {
                    disabled = true;
                }
                if !warned {
                    warned = true;
                    tracing::warn!(run = %run, error = %e, "cannot post output events; counting what is lost");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RunRequest;

    #[test]
    fn a_request_debug_names_the_environment_but_never_its_values() {
        let r = RunRequest {
            client_env: vec![("API_TOKEN".into(), "s3cret-value".into())],
            ..Default::default()
        };
        let d = format!("{r:?}");
        assert!(d.contains("API_TOKEN"), "{d}");
        assert!(!d.contains("s3cret-value"), "{d}");
    }
}
