//! The crabboxctl binary against a scripted in-process `Daemon` service on a
//! temp socket: output shapes, exit codes and hints, without a real crabboxd
//! (the `crabbox-tests` crate covers the real one).

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    pin::Pin,
    process::Output,
    sync::{Arc, Mutex},
};

use crabbox_api::{
    v1::{
        self, CheckStatus, TaskKind, TaskState,
        daemon_server::{Daemon, DaemonServer},
        watch_tasks_event::Event,
    },
    version,
};
use tokio::sync::oneshot;
use tokio_stream::{Stream, wrappers::UnixListenerStream};
use tonic::{Request, Response, Status};

/// What the fake daemon answers; each test changes what it checks.
#[derive(Clone)]
struct Fake {
    version: String,
    diagnostics: Option<Vec<v1::Check>>,
    pid: u32,
    shutdown: Arc<Mutex<Option<oneshot::Sender<()>>>>,
}

fn task(id: &str, kind: TaskKind, state: TaskState) -> v1::Task {
    v1::Task {
        id: id.to_owned(),
        kind: kind as i32,
        key: id
            .split_once('/')
            .map(|(_, k)| k.to_owned())
            .unwrap_or_default(),
        state: state as i32,
        restarts: 1,
        last_error: String::new(),
        since: Some(crabbox_api::prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 0,
        }),
        next_attempt: None,
        labels: Default::default(),
    }
}

impl Fake {
    fn reply<T>(&self, body: T) -> Response<T> {
        let mut r = Response::new(body);
        let md = r.metadata_mut();
        md.insert(version::DAEMON_VERSION_KEY, self.version.parse().unwrap());
        md.insert(
            version::PROTOCOL_KEY,
            version::PROTOCOL.to_string().parse().unwrap(),
        );
        r
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::WatchTasksEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Daemon for Fake {
    async fn get_status(
        &self,
        _: Request<v1::GetStatusRequest>,
    ) -> Result<Response<v1::GetStatusResponse>, Status> {
        Ok(self.reply(v1::GetStatusResponse {
            version: self.version.clone(),
            protocol: version::PROTOCOL,
            pid: self.pid,
            started_at: Some(crabbox_api::prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            coordinator_url: "https://coordinator.test".into(),
            coordinator_token_configured: true,
            log_filter: "info".into(),
            phase: v1::Phase::Running as i32,
            task_counts: vec![v1::TaskStateCount {
                state: TaskState::Running as i32,
                count: 2,
            }],
            ..Default::default()
        }))
    }

    async fn list_tasks(
        &self,
        _: Request<v1::ListTasksRequest>,
    ) -> Result<Response<v1::ListTasksResponse>, Status> {
        Ok(self.reply(v1::ListTasksResponse {
            tasks: vec![
                task("api-server/", TaskKind::ApiServer, TaskState::Running),
                task(
                    "egress-host/lease_1",
                    TaskKind::EgressHost,
                    TaskState::Running,
                ),
            ],
        }))
    }

    type WatchTasksStream = EventStream;

    async fn watch_tasks(
        &self,
        req: Request<v1::WatchTasksRequest>,
    ) -> Result<Response<EventStream>, Status> {
        // Filters by kind the way the daemon does, so the CLI's request is
        // what decides the output.
        let wanted = req.get_ref().kind;
        let keep = |k: TaskKind| wanted == TaskKind::Unspecified as i32 || wanted == k as i32;
        let mut events = vec![Event::Snapshot(v1::TaskSnapshot {
            tasks: [task("api-server/", TaskKind::ApiServer, TaskState::Running)]
                .into_iter()
                .filter(|t| keep(t.kind()))
                .collect(),
        })];
        if keep(TaskKind::SshMux) {
            events.push(Event::Upsert(task(
                "ssh-mux/lease_1",
                TaskKind::SshMux,
                TaskState::Starting,
            )));
            events.push(Event::Removed(v1::TaskRemoved {
                id: "ssh-mux/lease_1".into(),
            }));
        }
        let stream = tokio_stream::iter(
            events
                .into_iter()
                .map(|e| Ok(v1::WatchTasksEvent { event: Some(e) })),
        );
        Ok(self.reply(Box::pin(stream) as EventStream))
    }

    async fn run_diagnostics(
        &self,
        _: Request<v1::RunDiagnosticsRequest>,
    ) -> Result<Response<v1::RunDiagnosticsResponse>, Status> {
        match &self.diagnostics {
            Some(checks) => Ok(self.reply(v1::RunDiagnosticsResponse {
                checks: checks.clone(),
            })),
            None => Err(Status::unimplemented("RunDiagnostics")),
        }
    }

    async fn shutdown(
        &self,
        _: Request<v1::ShutdownRequest>,
    ) -> Result<Response<v1::ShutdownResponse>, Status> {
        if let Some(tx) = self.shutdown.lock().unwrap().take() {
            let _ = tx.send(());
        }
        Ok(self.reply(v1::ShutdownResponse {
            grace: Some(crabbox_api::prost_types::Duration {
                seconds: 0,
                nanos: 500_000_000,
            }),
        }))
    }

    async fn set_log_level(
        &self,
        req: Request<v1::SetLogLevelRequest>,
    ) -> Result<Response<v1::SetLogLevelResponse>, Status> {
        let filter = req.into_inner().filter;
        if filter.contains('[') {
            return Err(Status::invalid_argument(format!(
                "invalid filter `{filter}`"
            )));
        }
        Ok(self.reply(v1::SetLogLevelResponse {
            previous: "info".into(),
            current: filter,
        }))
    }
}

/// A fake daemon serving only the `Daemon` service on `<tempdir>/run/crabboxd.sock` (dir 0700, socket
/// 0600, as the real one). Dropping it leaves the server running until the
/// test's runtime ends.
struct Served {
    dir: tempfile::TempDir,
    socket: PathBuf,
    stopped: oneshot::Receiver<()>,
}

fn serve(fake: impl FnOnce(&mut Fake)) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    fs::create_dir(&run).unwrap();
    fs::set_permissions(&run, fs::Permissions::from_mode(0o700)).unwrap();
    let socket = run.join("crabboxd.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    fs::set_permissions(&socket, fs::Permissions::from_mode(0o600)).unwrap();
    let (tx, rx) = oneshot::channel();
    let (stopped_tx, stopped) = oneshot::channel();
    let mut daemon = Fake {
        version: version::VERSION.to_owned(),
        diagnostics: Some(vec![v1::Check {
            name: "coordinator reachable".into(),
            status: CheckStatus::Ok as i32,
            detail: "GET /v1/health answered 200".into(),
        }]),
        pid: 0,
        shutdown: Arc::new(Mutex::new(Some(tx))),
    };
    fake(&mut daemon);
    let path = socket.clone();
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(DaemonServer::new(daemon))
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                let _ = rx.await;
            })
            .await;
        // As the real daemon does after its drain.
        let _ = fs::remove_file(&path);
        let _ = stopped_tx.send(());
    });
    Served {
        dir,
        socket,
        stopped,
    }
}

async fn ctl(socket: &Path, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_crabboxctl"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .env_remove("CRABBOX_SOCKET")
        .env_remove("CRABBOXD_BIN")
        .env_remove("CRABBOX_CONFIG")
        // Keep the developer's own units, config and logs out of the checks.
        .env("XDG_CONFIG_HOME", socket.with_file_name("config"))
        .env("XDG_STATE_HOME", socket.with_file_name("state"))
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_renders_for_people_and_scripts() {
    let d = serve(|_| {});
    let out = ctl(&d.socket, &["status"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with(&format!(
        "crabboxd {} (protocol 1) is running",
        version::VERSION
    )));
    assert!(stdout.contains("https://coordinator.test (token configured)"));
    assert!(
        out.stderr.is_empty(),
        "no skew, no warning: {}",
        text(&out.stderr)
    );

    let out = ctl(&d.socket, &["status", "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["phase"], "running");
    assert_eq!(v["task_counts"]["running"], 2);
    assert_eq!(v["skew"]["kind"], "none");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_skew_becomes_a_sentence() {
    let d = serve(|f| f.version = "0.0.1-old".into());
    let out = ctl(&d.socket, &["status", "--json"]).await;
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["skew"]["kind"], "minor");
    assert!(text(&out.stderr).contains("run `crabboxctl daemon restart`"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_table_json_and_watch() {
    let d = serve(|_| {});
    let out = ctl(&d.socket, &["tasks"]).await;
    assert_eq!(out.status.code(), Some(0));
    let stdout = text(&out.stdout);
    assert!(stdout.lines().next().unwrap().starts_with("ID"));
    assert!(stdout.contains("egress-host/lease_1"));

    let out = ctl(&d.socket, &["tasks", "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tasks"][1]["kind"], "egress-host");

    let out = ctl(&d.socket, &["tasks", "--watch", "--json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let lines: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["snapshot"]["tasks"][0]["id"], "api-server/");
    assert_eq!(lines[1]["upsert"]["state"], "starting");
    assert_eq!(lines[2]["removed"]["id"], "ssh-mux/lease_1");

    let out = ctl(&d.socket, &["tasks", "--watch", "--kind", "egress-host"]).await;
    let stdout = text(&out.stdout);
    assert_eq!(stdout, "no tasks\n", "other kinds are filtered out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_passes_warns_and_fails() {
    let d = serve(|_| {});
    let out = ctl(&d.socket, &["doctor"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("ok    socket directory"), "{stdout}");
    assert!(stdout.contains("ok    coordinator reachable"), "{stdout}");

    let old = serve(|f| f.diagnostics = None);
    let out = ctl(&old.socket, &["doctor", "--json"]).await;
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let warn = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["status"] == "warn")
        .unwrap();
    assert!(
        warn["detail"]
            .as_str()
            .unwrap()
            .contains("older than crabboxctl")
    );

    let bad = serve(|f| {
        f.diagnostics = Some(vec![v1::Check {
            name: "config file modes".into(),
            status: CheckStatus::Fail as i32,
            detail: "crabboxd.toml is 0644; run chmod 600".into(),
        }])
    });
    let out = ctl(&bad.socket, &["doctor"]).await;
    assert_eq!(out.status.code(), Some(4));
    assert!(text(&out.stdout).contains("FAIL  config file modes"));

    fs::set_permissions(
        d.socket.parent().unwrap(),
        fs::Permissions::from_mode(0o777),
    )
    .unwrap();
    let out = ctl(&d.socket, &["doctor"]).await;
    assert_eq!(out.status.code(), Some(4));
    assert!(text(&out.stdout).contains("chmod 700"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_level_reports_and_refuses() {
    let d = serve(|_| {});
    let out = ctl(&d.socket, &["log-level", "debug"]).await;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(text(&out.stdout), "log filter: info -> debug\n");
    let out = ctl(&d.socket, &["log-level", "bad["]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("invalid filter `bad[`"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_waits_for_the_daemon_to_exit() {
    // A stand-in process for the daemon, so stop has a real pid to wait on.
    let mut stand_in = tokio::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let pid = stand_in.id().unwrap();
    let d = serve(|f| f.pid = pid);
    let stopped = d.stopped;
    let killer = tokio::spawn(async move {
        let _ = stopped.await;
        stand_in.kill().await.unwrap();
    });
    let out = ctl(&d.socket, &["daemon", "stop"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "crabboxd stopped\n");
    killer.await.unwrap();

    let out = ctl(&d.socket, &["daemon", "stop"]).await;
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains("not running"));
    let out = ctl(&d.socket, &["daemon", "status", "--json"]).await;
    assert_eq!(out.status.code(), Some(3));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["running"], false);
    drop(d.dir);
}

#[tokio::test]
async fn unreachable_daemon_exits_3_and_says_where_it_looked() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("crabboxd.sock");
    for cmd in [
        &["status"][..],
        &["tasks", "--json"],
        &["log-level", "info"],
    ] {
        let out = ctl(&socket, cmd).await;
        assert_eq!(out.status.code(), Some(3), "{cmd:?}");
        assert!(out.stdout.is_empty());
        let stderr = text(&out.stderr);
        assert!(stderr.contains(&socket.display().to_string()), "{stderr}");
        assert!(stderr.contains("daemon start"), "{stderr}");
    }
    let out = ctl(&socket, &["doctor"]).await;
    assert_eq!(out.status.code(), Some(4));
}

#[tokio::test]
async fn start_reports_a_daemon_that_exits_early() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("crabboxd");
    fs::write(
        &fake,
        "#!/bin/sh\necho \"error: unknown key \\`nope\\` in $2\" >&2\nexit 64\n",
    )
    .unwrap();
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
    let log = dir.path().join("state/crabboxd.log");
    let socket = dir.path().join("crabboxd.sock");
    let out = ctl(
        &socket,
        &[
            "daemon",
            "start",
            "--daemon-bin",
            fake.to_str().unwrap(),
            "--log-file",
            log.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("exited (exit status: 64)"), "{stderr}");
    assert!(stderr.contains("| error: unknown key `nope`"), "{stderr}");
    assert!(stderr.contains("configuration is invalid"), "{stderr}");
    let mode = fs::metadata(&log).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[tokio::test]
async fn install_dry_run_prints_units_for_both_managers() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("crabboxd.sock");
    let args = [
        "daemon",
        "install",
        "--dry-run",
        "--daemon-bin",
        "/opt/crabbox/bin/crabboxd",
        "--platform",
    ];
    let out = ctl(
        &socket,
        &[&args[..], &["systemd", "--socket-activation"]].concat(),
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("\nExecStart=/opt/crabbox/bin/crabboxd\n"));
    assert!(stdout.contains("ListenStream=%t/crabbox/crabboxd.sock"));
    assert!(stdout.contains("#   systemctl --user enable --now crabboxd.socket"));

    let out = ctl(&socket, &[&args[..], &["launchd"]].concat()).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("<string>/opt/crabbox/bin/crabboxd</string>"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_without_a_service_is_called_older() {
    // The fake serves only `Daemon`, as a daemon from before `Leases` and
    // `Runs` existed would: the router answers UNIMPLEMENTED for the rest.
    let d = serve(|f| f.version = "0.0.1-old".into());
    let out = ctl(&d.socket, &["lease", "list"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("is older than crabboxctl") && stderr.contains("does not know ListLeases"),
        "{stderr}"
    );
    assert!(stderr.contains("crabboxctl daemon restart"), "{stderr}");
    let out = ctl(&d.socket, &["attach", "run_000000000000"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("does not know Attach"));
}
