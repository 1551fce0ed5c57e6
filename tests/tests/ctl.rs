//! `crabboxctl` against the real daemon: the read commands in human and
//! `--json` form, doctor, log-level, `daemon stop`, and the sentence it says
//! when no daemon answers.

use crabbox_tests::{TestDaemon, bins::bin};

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test]
async fn status_and_tasks_in_json_and_text() {
    let d = TestDaemon::start().await;
    let out = d.ctl(&["status", "--json"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["pid"], d.pid());
    assert_eq!(v["version"], crabbox_api::VERSION);
    assert_eq!(v["phase"], "running");
    assert_eq!(v["socket_path"], d.socket.display().to_string());

    let out = d.ctl(&["status"]).await;
    assert!(out.status.success());
    assert!(
        stdout(&out).contains(&d.pid().to_string()),
        "{}",
        stdout(&out)
    );

    let tasks = d.tasks(None).await;
    assert_eq!(tasks[0]["id"], "api-server");
    assert_eq!(tasks[0]["state"], "running");

    let out = d.ctl(&["tasks"]).await;
    assert!(out.status.success());
    assert!(stdout(&out).contains("api-server"));
}

#[tokio::test]
async fn doctor_reports_every_check_and_fails_on_a_missing_token() {
    let d = TestDaemon::builder()
        .toml("[coordinator]\nurl = \"http://127.0.0.1:9\"\n")
        .start()
        .await;
    let out = d.ctl(&["doctor", "--json"]).await;
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let checks = v["checks"].as_array().unwrap();
    let names: Vec<&str> = checks.iter().map(|c| c["name"].as_str().unwrap()).collect();
    for want in [
        "coordinator token",
        "coordinator reachable",
        "state directory",
    ] {
        assert!(names.contains(&want), "{names:?}");
    }
    assert!(v["failures"].as_u64().unwrap() >= 2);
    let text = d.ctl(&["doctor"]).await;
    assert!(
        stdout(&text).contains("coordinator reachable"),
        "{}",
        stdout(&text)
    );
}

#[tokio::test]
async fn log_level_changes_the_filter() {
    let d = TestDaemon::start().await;
    let out = d.ctl(&["log-level", "debug"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = d.ctl(&["status", "--json"]).await;
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["log_filter"], "debug");
    let bad = d.ctl(&["log-level", "info,=["]).await;
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("invalid log filter"),
        "{}",
        stderr(&bad)
    );
}

#[tokio::test]
async fn daemon_stop_drains_and_the_socket_goes() {
    let mut d = TestDaemon::start().await;
    let out = d.ctl(&["daemon", "stop"]).await;
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(d.wait_exit().await.success());
    assert!(!d.socket.exists());
}

#[tokio::test]
async fn unreachable_daemon_is_a_sentence_with_a_way_out() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nobody-here.sock");
    let out = tokio::process::Command::new(bin("crabboxctl"))
        .arg("--socket")
        .arg(&socket)
        .arg("status")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = stderr(&out);
    assert!(err.contains(&socket.display().to_string()), "{err}");
    assert!(err.contains("crabboxd"), "{err}");
}
