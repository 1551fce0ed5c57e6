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

/// A daemon using `coord` with its shared token.
async fn daemon_for(coord: &TestCoordinator) -> TestDaemon {
    TestDaemon::builder()
        .coordinator(&coord.base_url, &coord.shared_token)
        .start()
        .await
}

/// Finishes the run at the coordinator, exit code 0.
async fn finish(coord: &TestCoordinator, run: &str) {
    post(
        coord,
        &format!("/v1/runs/{run}/finish"),
        serde_json::json!({"exitCode": 0}),
    )
    .await;
}

/// The output of an attach that must end within `within`.
async fn ended(child: tokio::process::Child, within: Duration) -> std::process::Output {
    tokio::time::timeout(within, child.wait_with_output())
        .await
        .expect("attach ended in time")
        .unwrap()
}

fn attach_cmd(d: &TestDaemon, run: &str, json: bool) -> tokio::process::Child {
    attach_cmd_with(d, run, json, &[])
}

/// `crabboxctl attach RUN [--json] EXTRA…`, its output piped.
fn attach_cmd_with(d: &TestDaemon, run: &str, json: bool, extra: &[&str]) -> tokio::process::Child {
    let mut cmd = tokio::process::Command::new(bin("crabboxctl"));
    cmd.arg("--socket").arg(&d.socket).arg("attach").arg(run);
    if json {
        cmd.arg("--json");
    }
    cmd.args(extra);
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
    let d = daemon_for(&coord).await;

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
    finish(&coord, &run).await;
    let d = daemon_for(&coord).await;
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
    let d = daemon_for(&coord).await;
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
    finish(&coord, &run).await;
    let out = ended(client, Duration::from_secs(60)).await;
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

/// The lines of `attach --json` read so far from a live client.
async fn read_seqs_until(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    seqs: &mut Vec<u64>,
    last: u64,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seqs.last() != Some(&last) {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .expect("attach output in time")
            .unwrap()
            .expect("attach still running");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        seqs.push(v["seq"].as_u64().unwrap());
    }
}

/// On the control socket a quiet feed does not poll the run: it waits for
/// pushes, ends on `command.finished` with one confirming GET, and keeps
/// only a slow backstop poll. Requests are counted at a proxy in front of
/// the real coordinator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_feed_on_the_control_socket_does_not_poll_and_ends_on_command_finished() {
    let (coord, run) = coordinator_with_run("sleep").await;
    let proxy = crabbox_tests::proxy::FaultProxy::start(coord.addr).await;
    let run_gets = proxy.count(&format!("GET /v1/runs/{run} HTTP/1.1"));
    let d = TestDaemon::builder()
        .coordinator(&proxy.url, &coord.shared_token)
        .start()
        .await;
    let client = attach_cmd(&d, &run, true);
    d.ctl_json_until(
        &["tasks", "--json", "--kind", "attach-feed"],
        "the feed to follow the run over the control socket",
        Duration::from_secs(30),
        |v| v["tasks"][0]["labels"]["via"] == "control",
    )
    .await;
    let at_start = run_gets.load(std::sync::atomic::Ordering::SeqCst);
    let quiet = Duration::from_secs(8);
    tokio::time::sleep(quiet).await;
    let polled = run_gets.load(std::sync::atomic::Ordering::SeqCst) - at_start;
    eprintln!(
        "GET /v1/runs/{{id}} on a quiet control feed: {polled} in {quiet:?} ({:.1}/min)",
        polled as f64 * 60.0 / quiet.as_secs_f64()
    );
    assert!(
        polled <= 1,
        "a quiet feed polled {polled} times in {quiet:?}"
    );
    let before_finish = run_gets.load(std::sync::atomic::Ordering::SeqCst);
    let t0 = tokio::time::Instant::now();
    finish(&coord, &run).await;
    let out = tokio::time::timeout(Duration::from_secs(20), client.wait_with_output())
        .await
        .expect("attach ends well before the backstop poll")
        .unwrap();
    eprintln!("attach ended {:?} after the finish", t0.elapsed());
    assert_eq!(out.status.code(), Some(0), "{}", d.stderr());
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    assert_eq!(
        seqs(&out.stdout),
        vec![1, 2],
        "run.started, command.finished"
    );
    let confirming = run_gets.load(std::sync::atomic::Ordering::SeqCst) - before_finish;
    assert_eq!(confirming, 1, "one confirming GET at the end");
}

/// A feed stops when its last subscriber leaves; the run can be followed
/// again from the cursor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_without_subscribers_is_reaped_and_the_run_can_be_followed_again() {
    let (coord, run) = coordinator_with_run("sleep").await;
    for n in 0..3 {
        append(&coord, &run, n).await;
    }
    let d = daemon_for(&coord).await;
    let mut client = attach_cmd(&d, &run, true);
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(client.stdout.take().unwrap()));
    let mut got = Vec::new();
    read_seqs_until(&mut lines, &mut got, 4).await;
    assert_eq!(d.tasks(Some("attach-feed")).await[0]["state"], "running");
    client.kill().await.unwrap();
    let v = d
        .ctl_json_until(
            &["tasks", "--json", "--kind", "attach-feed"],
            "the feed to stop once nobody follows it",
            Duration::from_secs(15),
            |v| v["tasks"][0]["state"] == "stopped",
        )
        .await;
    assert_eq!(v["tasks"][0]["last_error"], "", "{v}");
    // Followed again from a cursor, while the run goes on.
    append(&coord, &run, 3).await;
    let args = ["attach", run.as_str(), "--after", "4", "--json"];
    let again = d.ctl(&args);
    let finish = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        post(
            &coord,
            &format!("/v1/runs/{run}/finish"),
            serde_json::json!({"exitCode": 0}),
        )
        .await;
    };
    let (out, _) = tokio::join!(again, finish);
    assert_eq!(out.status.code(), Some(0), "{}", d.stderr());
    assert_eq!(seqs(&out.stdout), vec![5, 6]);
}

/// The resident set of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A feed keeps at most its byte cap (8 MiB) of a 48 MiB run; a subscriber
/// that joins later from an older cursor pages the dropped events over
/// HTTP and still sees every event once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_caps_its_memory_and_a_late_subscriber_pages_older_events_over_http() {
    const EVENTS: u64 = 3000;
    let (coord, run) = coordinator_with_run("make").await;
    // 3000 × 16 KiB ≈ 48 MiB, six times what a feed keeps.
    let chunk = "x".repeat(16 << 10);
    for _ in 0..EVENTS {
        post(
            &coord,
            &format!("/v1/runs/{run}/events"),
            serde_json::json!({"type": "stdout", "stream": "stdout", "data": chunk}),
        )
        .await;
    }
    // One malloc arena and a fixed mmap threshold (large buffers go back
    // to the kernel when freed), so RSS follows live memory rather than
    // how glibc happened to lay out transient page buffers.
    let d = TestDaemon::builder()
        .coordinator(&coord.base_url, &coord.shared_token)
        .env("MALLOC_ARENA_MAX", "1")
        .env("MALLOC_MMAP_THRESHOLD_", "131072")
        .start()
        .await;
    let idle = rss_kib(d.pid());
    let mut first = attach_cmd(&d, &run, true);
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(first.stdout.take().unwrap()));
    let mut got = Vec::new();
    read_seqs_until(&mut lines, &mut got, EVENTS + 1).await;
    let followed = rss_kib(d.pid());
    eprintln!(
        "daemon RSS: {idle} KiB idle, {followed} KiB following a 48 MiB run (+{} KiB)",
        followed.saturating_sub(idle)
    );
    // The old unbounded buffer grew by the whole run (≥ 48 MiB).
    assert!(
        followed.saturating_sub(idle) < 32 << 10,
        "RSS grew from {idle} to {followed} KiB"
    );
    // The late one, from the start.
    let late = attach_cmd(&d, &run, true);
    tokio::time::sleep(Duration::from_secs(2)).await;
    append(&coord, &run, 0).await;
    finish(&coord, &run).await;
    let out = tokio::time::timeout(Duration::from_secs(60), late.wait_with_output())
        .await
        .expect("late attach finished")
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.stderr()
    );
    let all: Vec<u64> = (1..=EVENTS + 3).collect();
    assert_eq!(seqs(&out.stdout), all);
    read_seqs_until(&mut lines, &mut got, EVENTS + 3).await;
    assert_eq!(got, all);
}

/// A first subscriber whose cursor is past the run's last event (a caller
/// skipping ahead) does not break the run's shared feed: a later attach from
/// the start gets every event and the end, and both exit with the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_cursor_past_the_end_does_not_break_the_shared_feed() {
    let (coord, run) = coordinator_with_run("make").await;
    for n in 0..3 {
        append(&coord, &run, n).await;
    }
    let d = daemon_for(&coord).await;
    let ahead = attach_cmd_with(&d, &run, true, &["--after", "1000000"]);
    // Let the first subscriber start the feed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let from_start = attach_cmd(&d, &run, true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for n in 3..6 {
        append(&coord, &run, n).await;
    }
    finish(&coord, &run).await;
    let out = ended(from_start, Duration::from_secs(30)).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // run.started is 1, the outputs 2..=7, command.finished 8.
    assert_eq!(seqs(&out.stdout), (1..=8).collect::<Vec<_>>());
    let out = ended(ahead, Duration::from_secs(30)).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(seqs(&out.stdout).is_empty());
}
