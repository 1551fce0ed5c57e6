//! The real `crabboxd` binary: readiness, status, socket hygiene, the
//! single-daemon lock, shutdown by signal and by RPC, live log levels, and
//! configuration errors.

use std::{os::unix::fs::PermissionsExt, time::Duration};

use crabbox_api::v1;
use crabbox_tests::{TestDaemon, bins::bin};
use nix::sys::signal::Signal;

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn status_reports_identity_and_config() {
    let d = TestDaemon::builder()
        .yaml(
            "broker:\n  url: http://127.0.0.1:9/\n  token: yaml-secret-token\nprovider: hetzner\n",
        )
        .start()
        .await;
    let c = d.client().await;
    let (status, skew) = c.status().await.unwrap();
    assert_eq!(skew, crabbox_api::version::Skew::None);
    assert_eq!(status.version, crabbox_api::VERSION);
    assert_eq!(status.protocol, crabbox_api::PROTOCOL);
    assert_eq!(status.pid, d.pid());
    assert_eq!(status.phase(), v1::Phase::Running);
    assert_eq!(status.socket_path, d.socket.display().to_string());
    assert_eq!(status.coordinator_url, "http://127.0.0.1:9");
    assert!(status.coordinator_token_configured);
    let yaml = status
        .config_files
        .iter()
        .find(|f| f.kind() == v1::ConfigFileKind::CrabboxYaml)
        .unwrap();
    assert!(yaml.loaded);
    assert_eq!(yaml.mode, 0o600);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let started = status.started_at.expect("a start time");
    let started_ms = started.seconds * 1000 + i64::from(started.nanos / 1_000_000);
    assert!(started_ms <= now_ms && started_ms > now_ms - 60_000);
    // The API server is listed as a task.
    let tasks = c
        .daemon()
        .list_tasks(v1::ListTasksRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tasks;
    assert_eq!(tasks.len(), 1);
    assert_eq!(tasks[0].kind(), v1::TaskKind::ApiServer);
    assert_eq!(tasks[0].state(), v1::TaskState::Running);
    // The token never leaves the daemon, not even in its log.
    assert!(!format!("{status:?}").contains("yaml-secret-token"));
    assert!(!d.stderr().contains("yaml-secret-token"));
}

#[tokio::test]
async fn every_reply_carries_the_daemon_version() {
    let d = TestDaemon::start().await;
    let c = d.client().await;
    let reply = c
        .daemon()
        .list_tasks(v1::ListTasksRequest::default())
        .await
        .unwrap();
    let skew = crabbox_api::client::skew_of(reply.metadata()).expect("version metadata");
    assert_eq!(skew, crabbox_api::version::Skew::None);
}

#[tokio::test]
async fn socket_and_directory_are_private() {
    let d = TestDaemon::start().await;
    assert_eq!(mode(&d.socket), 0o600);
    assert_eq!(mode(d.socket.parent().unwrap()), 0o700);
    // The state directory too.
    assert_eq!(mode(&d.layout.state.join("crabbox")), 0o700);
}

#[tokio::test]
async fn a_second_daemon_refuses_to_start() {
    let first = TestDaemon::start().await;
    let mut second = TestDaemon::builder().home(first.home()).spawn();
    let status = second.wait_exit().await;
    assert_eq!(status.code(), Some(1), "{}", second.stderr());
    assert!(
        second
            .stderr()
            .contains("another crabboxd is already running"),
        "{}",
        second.stderr()
    );
    // The first one is untouched and still serving on its socket.
    first.client().await.status().await.unwrap();
}

#[tokio::test]
async fn a_stale_socket_is_replaced() {
    let first = TestDaemon::start().await;
    let home = first.home().to_path_buf();
    let socket = first.socket.clone();
    // SIGKILL leaves the socket file behind.
    first.signal(Signal::SIGKILL);
    let mut first = first;
    first.wait_exit().await;
    assert!(socket.exists());
    let second = TestDaemon::builder().home(&home).start().await;
    second.client().await.status().await.unwrap();
    drop(first);
}

#[tokio::test]
async fn sigterm_drains_and_removes_the_socket() {
    let mut d = TestDaemon::start().await;
    d.signal(Signal::SIGTERM);
    assert!(d.wait_notification("STOPPING=1").await, "{}", d.stderr());
    let status = d.wait_exit().await;
    assert!(status.success(), "{status:?}\n{}", d.stderr());
    assert!(!d.socket.exists());
    assert!(d.stderr().contains("SIGTERM received"));
    assert!(d.stderr().contains("crabboxd stopped"));
}

#[tokio::test]
async fn shutdown_rpc_drains_and_removes_the_socket() {
    let mut d = TestDaemon::builder().arg("--log").arg("info").start().await;
    let c = d.client().await;
    let reply = c
        .daemon()
        .shutdown(v1::ShutdownRequest {
            reason: "test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        reply.grace,
        Some(crabbox_api::prost_types::Duration {
            seconds: 10,
            nanos: 0
        })
    );
    let status = d.wait_exit().await;
    assert!(status.success(), "{status:?}\n{}", d.stderr());
    assert!(!d.socket.exists());
    assert!(d.stderr().contains("Shutdown RPC: test"), "{}", d.stderr());
}

#[tokio::test]
async fn set_log_level_takes_effect_live() {
    let d = TestDaemon::start().await;
    let c = d.client().await;
    c.status().await.unwrap();
    assert!(!d.stderr().contains("api call"), "debug hidden at info");

    let reply = c
        .daemon()
        .set_log_level(v1::SetLogLevelRequest {
            filter: "info,crabboxd=debug".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.previous, "info");
    assert_eq!(reply.current, "info,crabboxd=debug");
    let (status, _) = c.status().await.unwrap();
    assert_eq!(status.log_filter, "info,crabboxd=debug");
    assert!(d.stderr().contains("api call"), "{}", d.stderr());

    // A bad filter is refused and the old one stays.
    let err = c
        .daemon()
        .set_log_level(v1::SetLogLevelRequest {
            filter: "info,=[".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let (status, _) = c.status().await.unwrap();
    assert_eq!(status.log_filter, "info,crabboxd=debug");
}

#[tokio::test]
async fn watch_tasks_starts_with_a_snapshot() {
    let d = TestDaemon::start().await;
    let c = d.client().await;
    let mut stream = c
        .daemon()
        .watch_tasks(v1::WatchTasksRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match first.event {
        Some(v1::watch_tasks_event::Event::Snapshot(s)) => {
            assert_eq!(s.tasks.len(), 1);
            assert_eq!(s.tasks[0].id, "api-server");
        }
        other => panic!("first event must be a snapshot, got {other:?}"),
    }
    // A stream held open does not hold shutdown open.
    let mut d = d;
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit().await.success());
}

#[tokio::test]
async fn diagnostics_report_file_modes_and_coordinator() {
    let d = TestDaemon::builder()
        .toml("[coordinator]\nurl = \"http://127.0.0.1:9\"\n")
        .start()
        .await;
    let c = d.client().await;
    let checks = c
        .daemon()
        .run_diagnostics(v1::RunDiagnosticsRequest {})
        .await
        .unwrap()
        .into_inner()
        .checks;
    let by_name = |n: &str| {
        checks
            .iter()
            .find(|c| c.name == n)
            .unwrap_or_else(|| panic!("{n}: {checks:?}"))
    };
    assert_eq!(by_name("crabboxd.toml").status(), v1::CheckStatus::Ok);
    assert_eq!(
        by_name("crabbox config.yaml").status(),
        v1::CheckStatus::Skipped
    );
    assert_eq!(by_name("state directory").status(), v1::CheckStatus::Ok);
    assert_eq!(by_name("coordinator token").status(), v1::CheckStatus::Fail);
    // Port 9 (discard) has no listener on loopback: unreachable.
    let reach = by_name("coordinator reachable");
    assert_eq!(reach.status(), v1::CheckStatus::Fail);
    assert!(reach.detail.contains("/v1/health"), "{}", reach.detail);
}

#[tokio::test]
async fn loose_config_file_mode_is_flagged() {
    let home = tempfile::tempdir().unwrap();
    let cfg = home.path().join("config/crabbox");
    std::fs::create_dir_all(&cfg).unwrap();
    std::fs::write(cfg.join("config.yaml"), "broker:\n  token: t\n").unwrap();
    std::fs::set_permissions(
        cfg.join("config.yaml"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let d = TestDaemon::builder().home(home.path()).start().await;
    let checks = d
        .client()
        .await
        .daemon()
        .run_diagnostics(v1::RunDiagnosticsRequest {})
        .await
        .unwrap()
        .into_inner()
        .checks;
    let yaml = checks
        .iter()
        .find(|c| c.name == "crabbox config.yaml")
        .unwrap();
    assert_eq!(yaml.status(), v1::CheckStatus::Fail);
    assert!(yaml.detail.contains("chmod 600"), "{}", yaml.detail);
}

#[tokio::test]
async fn bad_config_exits_64_naming_key_and_file() {
    let mut d = TestDaemon::builder()
        .toml("[daemon]\nshutdown_grace = \"5s\"\nsokcet = \"/x\"\n")
        .spawn();
    let status = d.wait_exit().await;
    assert_eq!(status.code(), Some(64));
    let err = d.stderr();
    assert!(
        err.contains("sokcet") && err.contains("crabboxd.toml"),
        "{err}"
    );
}

#[tokio::test]
async fn version_flag_prints_the_version() {
    let out = tokio::process::Command::new(bin("crabboxd"))
        .arg("--version")
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(crabbox_api::VERSION));
}

#[tokio::test]
async fn man_page_and_example_config_print() {
    let man = tokio::process::Command::new(bin("crabboxd"))
        .arg("--print-man-page")
        .output()
        .await
        .unwrap();
    assert!(man.status.success());
    let text = String::from_utf8_lossy(&man.stdout);
    assert!(
        text.contains(".TH crabboxd") && text.contains("socket"),
        "{text}"
    );
    let example = tokio::process::Command::new(bin("crabboxd"))
        .arg("--print-example-config")
        .output()
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&example.stdout).contains("[coordinator]"));
}
