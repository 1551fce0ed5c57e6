//! A bounded loopback load test: 200 concurrent egress pairs relaying both
//! ways and 1000 control sockets heartbeating at once, all within a deadline.

mod common;

use std::time::Duration;

use common::*;
use crabbox_coordinator::testing::TestCoordinator;
use futures_util::SinkExt;
use futures_util::future::join_all;
use serde_json::json;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

const PAIRS: usize = 200;
const CONTROL: usize = 1000;
const ROUNDS: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_bridges_and_control_sockets() {
    let coord = TestCoordinator::start().await;
    let http = http();
    let t = coord.user_token("load@example.com", "acme", "load");
    let started = Instant::now();

    let pairs = join_all((0..PAIRS).map(|i| {
        let (coord, http, t) = (&coord, &http, &t);
        async move {
            let lease = format!("cbx_{i:012x}");
            register(http, coord, t, &lease, &format!("load-{i}"), 3600, 600).await;
            let (_, h) = ticket(http, coord, t, &lease, "host", None).await;
            let sid = h["sessionID"].as_str().unwrap().to_owned();
            let (_, c) = ticket(http, coord, t, &lease, "client", Some(&sid)).await;
            let host = bridge(coord, &lease, "host", h["ticket"].as_str().unwrap()).await;
            let client = bridge(coord, &lease, "client", c["ticket"].as_str().unwrap()).await;
            (lease, host, client)
        }
    }))
    .await;
    let setup = started.elapsed();

    // Wait until every pair is registered on both sides, then relay.
    eventually(|| async {
        let mut all = true;
        for i in [0, PAIRS / 2, PAIRS - 1] {
            let (_, v) = call(
                &http,
                &coord,
                "GET",
                &format!("/v1/leases/cbx_{i:012x}/egress/status"),
                Some(&t),
                None,
            )
            .await;
            all &= v["hostConnected"] == true && v["clientConnected"] == true;
        }
        all
    })
    .await;
    let relay_start = Instant::now();
    join_all(
        pairs
            .into_iter()
            .map(|(lease, mut host, mut client)| async move {
                for r in 0..ROUNDS {
                    let payload = format!("{lease}:{r}").into_bytes();
                    host.send(Message::Binary(payload.clone().into()))
                        .await
                        .unwrap();
                    assert_eq!(
                        next_msg(&mut client).await,
                        Message::Binary(payload.clone().into())
                    );
                    client
                        .send(Message::Text(format!("{lease}:{r}").into()))
                        .await
                        .unwrap();
                    assert_eq!(
                        next_msg(&mut host).await,
                        Message::Text(format!("{lease}:{r}").into())
                    );
                }
            }),
    )
    .await;
    let relay = relay_start.elapsed();

    let ctl_start = Instant::now();
    let sockets = join_all((0..CONTROL).map(|_| control(&coord, &t))).await;
    join_all(
        sockets
            .into_iter()
            .enumerate()
            .map(|(i, mut ws)| async move {
                assert_eq!(next_json(&mut ws).await["type"], "hello");
                let lease = format!("cbx_{:012x}", i % PAIRS);
                send_json(&mut ws, json!({"type":"heartbeat","leaseID":lease})).await;
                let r = next_json(&mut ws).await;
                assert_eq!(
                    (r["type"].as_str(), r["ok"].as_bool()),
                    (Some("heartbeat"), Some(true)),
                    "{r}"
                );
                send_json(&mut ws, json!({"type":"ping"})).await;
                assert_eq!(next_json(&mut ws).await["type"], "pong");
                ws
            }),
    )
    .await;
    let ctl = ctl_start.elapsed();
    eprintln!(
        "load: setup {PAIRS} pairs {setup:?}, relay {ROUNDS} rounds {relay:?}, {CONTROL} control sockets {ctl:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "load test took {:?}",
        started.elapsed()
    );
}
