//! Attach end to end: our coordinator in-process, the real daemon, and
//! `crabboxctl attach` processes. A backlog larger than one control page,
//! events appended while clients page through it, two clients sharing one
//! feed, and the run's exit code as the CLI's.

use std::{process::Stdio, time::Duration};

use crabbox_coordinator::testing::TestCoordinator;
use crabbox_tests::{TestDaemon, bins::bin};

const LEASE: &str = "cbx_00000000a77a";

async fn post(coord: &TestCoordinator, path: &str, body: serde_json::Value) -> serde_json::Value {
    let (status, v) = coord
        .request("POST", path, &coord.shared_token, &body)
        .await
        .unwrap();
    assert!(status == 200 || status == 201, "{path}: {status} {v}");
    v
}

async fn append(coord: &TestCoordinator, run: &str, n: u64) {
    post(
        coord,
        &format!("/v1/runs/{run}/events"),
        serde_json::json!({"type": "stdout", "stream": "stdout", "data": format!("line {n}\n")}),
    )
    .await;
}

/// Our coordinator with a registered lease and a run on it.
async fn coordinator_with_run(command: &str) -> (TestCoordinator, String) {
    let coord = TestCoordinator::start().await;
    coord
        .register_lease(&coord.shared_token, LEASE, "attach-crab")
        .await
        .unwrap();
    let v = post(
        &coord,
        "/v1/runs",
        serde_json::json!({"leaseID": LEASE, "command": [command], "provider": "ssh", "class": "standard", "serverType": "registered"}),
    )
    .await;
    let run = v["run"]["id"].as_str().unwrap().to_owned();
    (coord, run)
}

/// The sequence numbers of `attach --json` event lines (the last line,
/// `{"end": …}`, has none).
fn seqs(stdout: &[u8]) -> Vec<u64> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("end").is_none())
        .map(|v| v["seq"].as_u64().unwrap())
        .collect()
}

fn attach_cmd(d: &TestDaemon, run: &str, json: bool) -> tokio::process::Child {
    let mut cmd = tokio::process::Command::new(bin("crabboxctl"));
    cmd.arg("--socket").arg(&d.socket).arg("attach").arg(run);
    if json {
        cmd.arg("--json");
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_page_a_backlog_while_events_arrive_and_exit_with_the_run() {
    let (coord, run) = coordinator_with_run("make").await;
    // A backlog bigger than two control pages (page = 100).
    for n in 0..250 {
        append(&coord, &run, n).await;
    }
    let d = TestDaemon::builder()
        .coordinator(&coord.base_url, &coord.shared_token)
        .start()
        .await;

    let text_client = attach_cmd(&d, &run, false);
    let json_client = attach_cmd(&d, &run, true);
    // More events while both clients page through the backlog.
    for n in 250..400 {
        append(&coord, &run, n).await;
    }
    post(
        &coord,
        &format!("/v1/runs/{run}/finish"),
        serde_json::json!({"exitCode": 3}),
    )
    .await;

    let text = tokio::time::timeout(Duration::from_secs(60), text_client.wait_with_output())
        .await
        .expect("attach finished")
        .unwrap();
    let json = tokio::time::timeout(Duration::from_secs(60), json_client.wait_with_output())
        .await
        .expect("attach finished")
        .unwrap();
    let stderr = String::from_utf8_lossy(&text.stderr).into_owned();
    assert_eq!(
        text.status.code(),
        Some(3),
        "exits with the run's exit code\n{stderr}\n{}",
        d.stderr()
    );
    assert_eq!(json.status.code(), Some(3));

    // Output in order, every line exactly once.
    let want: String = (0..400).map(|n| format!("line {n}\n")).collect();
    assert_eq!(String::from_utf8_lossy(&text.stdout), want);
    // Other events as reference lines on stderr, then the end.
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(lines[0].starts_with("0001 run.started"), "{stderr}");
    assert!(
        lines.iter().any(|l| l.contains("command.finished")),
        "{stderr}"
    );
    assert!(
        lines
            .last()
            .unwrap()
            .contains(&format!("run {run} failed exit=3")),
        "{stderr}"
    );

    // The JSON client saw exactly 1..=N, no gaps, no duplicates.
    let seqs = seqs(&json.stdout);
    let n = seqs.len() as u64;
    assert_eq!(seqs, (1..=n).collect::<Vec<_>>());
    assert_eq!(
        n,
        1 + 400 + 1,
        "run.started + 400 outputs + command.finished"
    );

    // One feed served both clients.
    let tasks = d.tasks(Some("attach-feed")).await;
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    assert_eq!(tasks[0]["state"], "stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_after_a_cursor_and_to_a_finished_run() {
    let (coord, run) = coordinator_with_run("true").await;
    for n in 0..5 {
        append(&coord, &run, n).await;
    }
    post(
        &coord,
        &format!("/v1/runs/{run}/finish"),
        serde_json::json!({"exitCode": 0}),
    )
    .await;
    let d = TestDaemon::builder()
        .coordinator(&coord.base_url, &coord.shared_token)
        .start()
        .await;
    let out = attach_cmd(&d, &run, true).wait_with_output().await.unwrap();
    assert_eq!(out.status.code(), Some(0));
    let out = d.ctl(&["attach", &run, "--after", "3", "--json"]).await;
    assert_eq!(out.status.code(), Some(0));
    let seqs = seqs(&out.stdout);
    // run.started is 1, the outputs 2..=6, command.finished 7.
    assert_eq!(seqs, vec![4, 5, 6, 7]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_restart_mid_attach_loses_nothing() {
    let (coord, run) = coordinator_with_run("sleep").await;
    let d = TestDaemon::builder()
        .coordinator(&coord.base_url, &coord.shared_token)
        .start()
        .await;
    let client = attach_cmd(&d, &run, true);
    // Once the shared control socket is up, the feed follows the run by
    // push, not by polling.
    d.ctl_json_until(
        &["tasks", "--json", "--kind", "attach-feed"],
        "the feed to follow the run over the control socket",
        Duration::from_secs(30),
        |v| v["tasks"][0]["labels"]["via"] == "control",
    )
    .await;
    for n in 0..50 {
        append(&coord, &run, n).await;
    }
    // The control socket and HTTP both go away and come back.
    let coord = coord.restart().await;
    for n in 50..100 {
        append(&coord, &run, n).await;
    }
    post(
        &coord,
        &format!("/v1/runs/{run}/finish"),
        serde_json::json!({"exitCode": 0}),
    )
    .await;
    let out = tokio::time::timeout(Duration::from_secs(60), client.wait_with_output())
        .await
        .expect("attach finished")
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.stderr()
    );
    let seqs = seqs(&out.stdout);
    assert_eq!(
        seqs,
        (1..=102).collect::<Vec<_>>(),
        "no gaps, no duplicates across the restart"
    );
}
