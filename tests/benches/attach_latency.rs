//! Attach latency: the time from an event's `POST /v1/runs/{id}/events` to
//! its arrival at a gRPC `Attach` client of the daemon, p50/p99, through
//! the daemon's shared feed (control-socket push path). Our coordinator
//! runs in-process; the daemon is the real release binary. Run with
//! `cargo bench -p crabbox-tests --bench attach_latency`.

use std::time::Duration;

use crabbox_api::v1;
use crabbox_coordinator::testing::TestCoordinator;
use crabbox_tests::TestDaemon;

fn pct(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e3
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let samples: usize = std::env::var("CRABBOX_BENCH_EVENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(500);
    let coord = TestCoordinator::start().await;
    let lease = "cbx_00000000ba00";
    coord
        .register_lease(&coord.shared_token, lease, "bench")
        .await
        .unwrap();
    let (_, v) = coord
        .request(
            "POST",
            "/v1/runs",
            &coord.shared_token,
            &serde_json::json!({"leaseID": lease, "command": ["bench"]}),
        )
        .await
        .unwrap();
    let run = v["run"]["id"].as_str().unwrap().to_owned();
    let d = TestDaemon::builder()
        .env("CRABBOX_COORDINATOR", &coord.base_url)
        .env("CRABBOX_COORDINATOR_TOKEN", &coord.shared_token)
        .env("CRABBOX_LOG", "warn")
        .start()
        .await;
    let client = d.client().await;
    let mut stream = client
        .runs()
        .attach(v1::AttachRequest {
            run_id: run.clone(),
            after: 0,
        })
        .await
        .unwrap()
        .into_inner();
    // run.started, then wait until the feed is live.
    stream.message().await.unwrap().unwrap();
    let mut lat = Vec::with_capacity(samples);
    for i in 0..samples + 20 {
        let t0 = tokio::time::Instant::now();
        let (status, _) = coord
            .request(
                "POST",
                &format!("/v1/runs/{run}/events"),
                &coord.shared_token,
                &serde_json::json!({"type": "stdout", "stream": "stdout", "data": format!("{i}\n")}),
            )
            .await
            .unwrap();
        assert_eq!(status, 201);
        let got = stream.message().await.unwrap().unwrap();
        assert!(matches!(
            got.event,
            Some(v1::attach_event::Event::RunEvent(_))
        ));
        if i >= 20 {
            lat.push(t0.elapsed());
        }
    }
    lat.sort();
    println!("| measure | p50 (ms) | p99 (ms) | max (ms) | samples |");
    println!("|---|---|---|---|---|");
    println!(
        "| event POST → Attach client (control push) | {:.3} | {:.3} | {:.3} | {} |",
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        lat.last().unwrap().as_secs_f64() * 1e3,
        lat.len()
    );
}
