//! Errors that tell the truth, end to end with the real daemon: a
//! coordinator that is down (closed port) or silent (accepts, never
//! answers) is exit 5 and UNAVAILABLE naming the coordinator — never "the
//! daemon went away"; an unknown run or lease is NOT_FOUND at once; a run's
//! negative exit code never makes `attach` succeed.

use std::time::Duration;

use crabbox_api::{errors, v1};
use crabbox_coordinator::testing::TestCoordinator;
use crabbox_tests::TestDaemon;
use tokio::net::TcpListener;

const LEASE: &str = "cbx_00000000e770";

/// A loopback URL where nothing listens: bind port 0, then close it.
async fn closed_port() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    url
}

/// A coordinator that accepts connections and never answers; the listener
/// and every accepted socket stay open until the returned task is dropped.
async fn silent_coordinator() -> (String, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    (url, task)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `lease keep` and `heartbeat` against an unreachable coordinator: exit 5,
/// a sentence naming the coordinator, in bounded time.
async fn coordinator_failures_are_exit_5(url: &str, within: Duration) {
    let d = TestDaemon::builder()
        .coordinator(url, "test-token")
        .start()
        .await;
    // All at once, so a silent coordinator costs one deadline, not three.
    let cli = |args: &'static [&'static str]| {
        let d = &d;
        async move {
            let t0 = tokio::time::Instant::now();
            let out = d.ctl(args).await;
            (args, out, t0.elapsed())
        }
    };
    let grpc = async {
        let t0 = tokio::time::Instant::now();
        let status = d
            .client()
            .await
            .leases()
            .heartbeat(v1::HeartbeatRequest {
                lease_id: LEASE.into(),
                idle_timeout: None,
            })
            .await
            .unwrap_err();
        (status, t0.elapsed())
    };
    let (keep, beat, (status, grpc_took)) = tokio::join!(
        cli(&["lease", "keep", "--id", LEASE]),
        cli(&["heartbeat", "--id", LEASE]),
        grpc
    );
    for (args, out, took) in [keep, beat] {
        let stderr = text(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(5),
            "{args:?}: {stderr}\n{}",
            d.stderr()
        );
        assert!(
            stderr.contains("could not reach the coordinator at"),
            "{stderr}"
        );
        assert!(stderr.contains(url), "{stderr}");
        assert!(
            !stderr.contains("start the daemon") && !stderr.contains("went away"),
            "{stderr}"
        );
        assert!(took < within, "{args:?} took {took:?}");
    }
    // The same over gRPC: UNAVAILABLE with trailers that name it.
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(
        errors::coordinator_unavailable(status.metadata()).as_deref(),
        Some(url)
    );
    assert!(grpc_took < within, "{grpc_took:?}");
    // And the daemon is fine: its own calls still answer.
    let out = d.ctl(&["status"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[tokio::test]
async fn a_closed_coordinator_port_is_exit_5_not_a_dead_daemon() {
    let url = closed_port().await;
    coordinator_failures_are_exit_5(&url, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn a_silent_coordinator_is_exit_5_within_the_daemons_deadline() {
    let (url, _held) = silent_coordinator().await;
    // The daemon answers at its coordinator deadline (20 s), before the
    // client's own (30 s), which used to fire first and blame the daemon.
    coordinator_failures_are_exit_5(&url, errors::COORDINATOR_DEADLINE + Duration::from_secs(8))
        .await;
}

#[tokio::test]
async fn attach_with_the_coordinator_down_is_unavailable_promptly() {
    let url = closed_port().await;
    let d = TestDaemon::builder()
        .coordinator(&url, "test-token")
        .start()
        .await;
    let t0 = tokio::time::Instant::now();
    let out = d.ctl(&["attach", "run_00000000beef"]).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}\n{}", d.stderr());
    assert!(stderr.contains(&url), "{stderr}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}

#[tokio::test]
async fn unknown_runs_and_leases_are_not_found_at_once() {
    let coord = TestCoordinator::start().await;
    let d = TestDaemon::builder()
        .coordinator(&coord.base_url, &coord.shared_token)
        .start()
        .await;
    let client = d.client().await;

    // Attach to a run the coordinator does not know: NOT_FOUND, at once
    // (it used to stream for 5 s and end OK with the 404 inside the end).
    let t0 = tokio::time::Instant::now();
    let status = client
        .runs()
        .attach(v1::AttachRequest {
            run_id: "run_000000000404".into(),
            after: 0,
        })
        .await
        .expect_err("attach to an unknown run fails");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    assert!(status.message().contains("run_000000000404"), "{status:?}");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    let out = d.ctl(&["attach", "run_000000000404"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("(not-found)"),
        "{}",
        text(&out.stderr)
    );

    // Egress status of a lease nobody knows: NOT_FOUND, not an empty report.
    let status = client
        .egress()
        .get_egress_status(v1::GetEgressStatusRequest {
            lease_id: "cbx_0000000f0f0f".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    let out = d
        .ctl(&["egress", "status", "--id", "cbx_0000000f0f0f"])
        .await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("not-found"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test]
async fn a_negative_exit_code_makes_attach_fail() {
    let coord = TestCoordinator::start().await;
    coord
        .register_lease(&coord.shared_token, LEASE, "exit-crab")
        .await
        .unwrap();
    let post = |path: String, body: serde_json::Value| {
        let coord = &coord;
        async move {
            let (status, v) = coord
                .request("POST", &path, &coord.shared_token, &body)
                .await
                .unwrap();
            assert!(status == 200 || status == 201, "{path}: {status} {v}");
            v
        }
    };
    let d = TestDaemon::builder()
        .coordinator(&coord.base_url, &coord.shared_token)
        .start()
        .await;
    for (code, want) in [(-1i64, 1), (137, 137)] {
        let v = post(
            "/v1/runs".into(),
            serde_json::json!({"leaseID": LEASE, "command": ["sleep"], "provider": "ssh", "class": "standard", "serverType": "registered"}),
        )
        .await;
        let run = v["run"]["id"].as_str().unwrap().to_owned();
        post(
            format!("/v1/runs/{run}/finish"),
            serde_json::json!({"exitCode": code}),
        )
        .await;
        let out = d.ctl(&["attach", &run, "--json"]).await;
        assert_eq!(
            out.status.code(),
            Some(want),
            "exit code {code}: {}\n{}",
            text(&out.stderr),
            text(&out.stdout)
        );
        let last: serde_json::Value =
            serde_json::from_str(text(&out.stdout).lines().last().unwrap()).unwrap();
        assert_eq!(last["end"]["exitCode"], code);
        assert_eq!(last["end"]["exitStatus"], want);
        assert_eq!(last["end"]["outcome"], "failed");
    }
}
