//! Heartbeats over the shared control socket, and their HTTP fallback when
//! the socket is refused or silent. The happy path runs against our real
//! coordinator; the faults come from a small fake coordinator written here
//! for fault injection (it answers HTTP heartbeats and either refuses the
//! control socket or accepts it and never answers).

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{State, WebSocketUpgrade, ws::Message},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{any, post},
};
use crabbox_coordinator::testing::TestCoordinator;
use crabbox_tests::TestDaemon;

const LEASE: &str = "cbx_00000000c001";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_use_the_shared_control_socket() {
    let coord = TestCoordinator::start().await;
    coord
        .register_lease(&coord.shared_token, LEASE, "ctl-crab")
        .await
        .unwrap();
    let d = TestDaemon::builder()
        .coordinator(&coord.base_url, &coord.shared_token)
        .start()
        .await;
    let kept = d.keep_lease_fast(LEASE).await;
    assert_eq!(kept["via"], "http", "keep answers with one HTTP heartbeat");
    let v = d
        .ctl_json_until(
            &["lease", "list", "--json"],
            "a heartbeat over the control socket",
            Duration::from_secs(20),
            |v| v[0]["via"] == "control",
        )
        .await;
    assert_eq!(v[0]["state"], "running");
    let tasks = d.tasks(Some("control-channel")).await;
    assert_eq!(tasks.len(), 1, "one control socket per coordinator");
    assert_eq!(tasks[0]["key"], coord.base_url);
}

#[derive(Clone)]
struct Fake {
    http_beats: Arc<AtomicUsize>,
    control: ControlFault,
}

#[derive(Clone, Copy)]
enum ControlFault {
    Refuse,
    Silent,
}

async fn heartbeat(State(f): State<Fake>) -> Json<serde_json::Value> {
    f.http_beats.fetch_add(1, Ordering::SeqCst);
    Json(serde_json::json!({"lease": {
        "id": LEASE, "slug": "fake", "provider": "ssh", "state": "active",
        "owner": "o@example.com", "org": "o", "idleTimeoutSeconds": 15,
        "lastTouchedAt": "2026-01-01T00:00:00.000Z", "expiresAt": "2026-01-01T00:00:15.000Z"
    }}))
}

async fn control(State(f): State<Fake>, ws: WebSocketUpgrade) -> Response {
    match f.control {
        ControlFault::Refuse => (
            StatusCode::FORBIDDEN,
            Json(serde_json::json!({"error": "forbidden"})),
        )
            .into_response(),
        ControlFault::Silent => ws.on_upgrade(|mut socket| async move {
            let _ = socket
                .send(Message::Text(
                    r#"{"type":"hello","protocol":1,"clientID":"fake"}"#.into(),
                ))
                .await;
            // Read (and ignore) everything; never answer a heartbeat.
            while let Some(Ok(_)) = socket.recv().await {}
        }),
    }
}

async fn fake(fault: ControlFault) -> (String, Arc<AtomicUsize>) {
    let state = Fake {
        http_beats: Arc::new(AtomicUsize::new(0)),
        control: fault,
    };
    let beats = Arc::clone(&state.http_beats);
    let app = Router::new()
        .route("/v1/leases/{id}/heartbeat", post(heartbeat))
        .route("/v1/control", any(control))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, beats)
}

async fn falls_back(fault: ControlFault) {
    let (url, http_beats) = fake(fault).await;
    let d = TestDaemon::builder()
        .coordinator(&url, "fake-token")
        .start()
        .await;
    d.keep_lease_fast(LEASE).await;
    assert_eq!(http_beats.load(Ordering::SeqCst), 1);
    // The next tick (5 s) tries the control socket, gets no answer within
    // its bounded wait, and still heartbeats over HTTP in the same tick.
    let t0 = tokio::time::Instant::now();
    let deadline = t0 + Duration::from_secs(20);
    while http_beats.load(Ordering::SeqCst) < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no fallback heartbeat\n{}",
            d.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // One interval, plus at most the control wait.
    assert!(
        t0.elapsed() < Duration::from_secs(12),
        "took {:?}",
        t0.elapsed()
    );
    let v = d.ctl_json(&["lease", "list", "--json"]).await;
    assert_eq!(v[0]["via"], "http");
    assert_eq!(v[0]["state"], "running", "{v}");
    assert_eq!(
        v[0]["restarts"], 0,
        "a missing control answer is not a keeper failure"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_control_socket_falls_back_to_http() {
    falls_back(ControlFault::Refuse).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_control_socket_falls_back_to_http_in_the_same_tick() {
    falls_back(ControlFault::Silent).await;
}
