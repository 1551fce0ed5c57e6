//! Kept leases end to end: our coordinator in-process on port 0, the real
//! daemon configured to use it, and `crabboxctl lease …` / `heartbeat`.

use std::time::Duration;

use crabbox_coordinator::testing::TestCoordinator;
use crabbox_tests::TestDaemon;

const LEASE: &str = "cbx_00000000a001";

async fn setup() -> (TestCoordinator, TestDaemon) {
    let coord = TestCoordinator::start().await;
    coord
        .register_lease(&coord.shared_token, LEASE, "blue-crab")
        .await
        .unwrap();
    let daemon = TestDaemon::builder()
        .coordinator(&coord.base_url, &coord.shared_token)
        .start()
        .await;
    (coord, daemon)
}

async fn lease_at_coordinator(coord: &TestCoordinator) -> serde_json::Value {
    let (status, v) = coord
        .request(
            "GET",
            &format!("/v1/leases/{LEASE}"),
            &coord.shared_token,
            &serde_json::Value::Null,
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{v}");
    v["lease"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_heartbeat_prints_the_reference_fields() {
    let (coord, d) = setup().await;
    let out = d.ctl(&["heartbeat", "--id", LEASE]).await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.starts_with(&format!(
            "heartbeat lease={LEASE} slug=blue-crab provider=ssh state=active idle_timeout=1800s"
        )),
        "{text}"
    );
    let v = d
        .ctl_json(&[
            "heartbeat",
            "--id",
            LEASE,
            "--json",
            "--idle-timeout",
            "20m",
        ])
        .await;
    assert_eq!(v["id"], LEASE);
    assert_eq!(
        v["idleTimeout"], 1200,
        "the override reached the coordinator"
    );
    assert_eq!(
        lease_at_coordinator(&coord).await["idleTimeoutSeconds"],
        1200
    );

    // An idle timeout the daemon cannot keep (under three of its fastest
    // beats) is refused with the minimum, before anything reaches the coordinator.
    for short in ["0s", "5s"] {
        let out = d
            .ctl(&["lease", "keep", "--id", LEASE, "--idle-timeout", short])
            .await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(stderr.contains("at least 15s"), "{stderr}");
    }
    assert_eq!(
        lease_at_coordinator(&coord).await["idleTimeoutSeconds"],
        1200
    );

    // An unknown lease is an error the user can read, with a failing exit.
    let out = d.ctl(&["heartbeat", "--id", "cbx_00000000dead"]).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("404"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_lease_heartbeats_and_release_ends_it() {
    let (coord, d) = setup().await;
    let kept = d.keep_lease_fast(LEASE).await;
    assert_eq!(kept["interval_seconds"], 5, "idle/3 clamped to 5 s");
    // The keep's own heartbeat succeeded: the keeper is running already,
    // not `starting` (its future may not have been polled yet).
    assert_eq!(kept["state"], "running", "{kept}");
    let first_touch = lease_at_coordinator(&coord).await["lastTouchedAt"].clone();

    // The keeper task is in the task table, keyed by the lease.
    let tasks = d.tasks(Some("lease-keeper")).await;
    assert_eq!(tasks.len(), 1);
    assert_eq!(tasks[0]["id"], format!("lease-keeper/{LEASE}"));
    assert_eq!(tasks[0]["labels"]["lease"], LEASE);

    // A second heartbeat arrives within one interval.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while lease_at_coordinator(&coord).await["lastTouchedAt"] == first_touch {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no second heartbeat"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let released = d
        .ctl_json(&["lease", "release", "--id", LEASE, "--json"])
        .await;
    assert_eq!(released["state"], "released");
    let list = d.ctl_json(&["lease", "list", "--json"]).await;
    assert_eq!(list.as_array().unwrap().len(), 0, "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_released_elsewhere_ends_its_keeper_within_one_interval() {
    let (coord, d) = setup().await;
    d.keep_lease_fast(LEASE).await;
    // Someone else releases it at the coordinator.
    let (status, v) = coord
        .request(
            "POST",
            &format!("/v1/leases/{LEASE}/release"),
            &coord.shared_token,
            &serde_json::json!({"delete": false}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{v}");
    let t0 = tokio::time::Instant::now();
    let list = d
        .ctl_json_until(
            &["lease", "list", "--json"],
            "the keeper to see the lease end",
            Duration::from_secs(30),
            // The keeper records the end, then returns, and the supervisor
            // records its final state: wait for both.
            |v| v[0]["ended"] == "lease ended" && v[0]["state"] != "running",
        )
        .await;
    // One interval (5 s) plus scheduling slack.
    assert!(
        t0.elapsed() < Duration::from_secs(8),
        "took {:?}",
        t0.elapsed()
    );
    assert_eq!(list[0]["state"], "failed");
    assert_eq!(list[0]["last_error"], "lease ended");
    assert_eq!(list[0]["restarts"], 0, "lease end is fatal, never retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_leases_survive_a_daemon_kill() {
    let (coord, d) = setup().await;
    d.keep_lease_fast(LEASE).await;
    let home = d.home().to_path_buf();
    d.signal(nix::sys::signal::Signal::SIGKILL);
    let mut d = d;
    d.wait_exit().await;
    let restarted = TestDaemon::builder()
        .home(&home)
        .coordinator(&coord.base_url, &coord.shared_token)
        .start()
        .await;
    let list = restarted
        .ctl_json_until(
            &["lease", "list", "--json"],
            "the restored keeper to heartbeat",
            Duration::from_secs(30),
            |v| v[0]["state"] == "running" && v[0]["last_heartbeat"].is_string(),
        )
        .await;
    assert_eq!(list[0]["id"], LEASE);
    assert_eq!(
        list[0]["interval_seconds"], 5,
        "the idle override was persisted too"
    );
    drop(d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeping_without_a_coordinator_says_what_to_set() {
    let d = TestDaemon::start().await;
    let out = d.ctl(&["lease", "keep", "--id", LEASE]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no coordinator configured") && err.contains("CRABBOX_COORDINATOR"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_ends_its_keeper_within_one_interval() {
    let (coord, d) = setup().await;
    d.keep_lease_fast(LEASE).await;
    // Age the coordinator past the idle timeout: the lease expires there.
    coord.clock.advance(Duration::from_secs(120));
    let t0 = tokio::time::Instant::now();
    // The coordinator answers `lease_expired` while the lease is still
    // marked live, and `lease_ended` once its sweeper has expired it (as the
    // reference does); either ends the keeper.
    let list = d
        .ctl_json_until(
            &["lease", "list", "--json"],
            "the keeper to see the lease expire",
            Duration::from_secs(30),
            // The keeper records the end, then returns, and the supervisor
            // records its final state: wait for both.
            |v| {
                (v[0]["ended"] == "lease expired" || v[0]["ended"] == "lease ended")
                    && v[0]["state"] != "running"
            },
        )
        .await;
    assert!(
        t0.elapsed() < Duration::from_secs(8),
        "took {:?}",
        t0.elapsed()
    );
    assert_eq!(list[0]["state"], "failed");
}

/// A keeper that fails while the coordinator is unreachable shows the
/// error while it backs off, and `running` with no error once it recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovered_keeper_shows_no_old_error() {
    let coord = TestCoordinator::start().await;
    coord
        .register_lease(&coord.shared_token, LEASE, "blue-crab")
        .await
        .unwrap();
    let proxy = crabbox_tests::proxy::FaultProxy::start(coord.addr).await;
    let d = TestDaemon::builder()
        .coordinator(&proxy.url, &coord.shared_token)
        .start()
        .await;
    d.keep_lease_fast(LEASE).await;
    proxy.set_down(true);
    let v = d
        .ctl_json_until(
            &["tasks", "--json", "--kind", "lease-keeper"],
            "the keeper to fail while the coordinator is unreachable",
            Duration::from_secs(30),
            |v| {
                v["tasks"][0]["restarts"].as_u64() >= Some(1)
                    && !v["tasks"][0]["last_error"]
                        .as_str()
                        .unwrap_or_default()
                        .is_empty()
            },
        )
        .await;
    eprintln!("while down: {v}");
    proxy.set_down(false);
    let v = d
        .ctl_json_until(
            &["tasks", "--json", "--kind", "lease-keeper"],
            "the keeper to recover",
            Duration::from_secs(45),
            |v| v["tasks"][0]["state"] == "running",
        )
        .await;
    assert_eq!(
        v["tasks"][0]["last_error"], "",
        "an old error is cleared: {v}"
    );
}
