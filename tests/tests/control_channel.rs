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
    control_beats: Arc<AtomicUsize>,
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
        ControlFault::Silent => ws.on_upgrade(move |mut socket| async move {
            let _ = socket
                .send(Message::Text(
                    r#"{"type":"hello","protocol":1,"clientID":"fake"}"#.into(),
                ))
                .await;
            // Read (and count) everything; never answer a heartbeat, as a
            // wedged reference 0.46.0 does (its WebSocket layer still pongs).
            while let Some(Ok(msg)) = socket.recv().await {
                if let Message::Text(t) = msg
                    && t.as_str().contains(r#""type":"heartbeat""#)
                {
                    f.control_beats.fetch_add(1, Ordering::SeqCst);
                }
            }
        }),
    }
}

async fn fake(fault: ControlFault) -> (String, Arc<AtomicUsize>) {
    let (url, http, _) = fake_counting(fault).await;
    (url, http)
}

/// The fake's URL and its counts of HTTP and control-socket heartbeats.
async fn fake_counting(fault: ControlFault) -> (String, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let state = Fake {
        http_beats: Arc::new(AtomicUsize::new(0)),
        control_beats: Arc::new(AtomicUsize::new(0)),
        control: fault,
    };
    let beats = Arc::clone(&state.http_beats);
    let control_beats = Arc::clone(&state.control_beats);
    let app = Router::new()
        .route("/v1/leases/{id}/heartbeat", post(heartbeat))
        .route("/v1/control", any(control))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, beats, control_beats)
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

/// Waits until `count` reaches `n`, for at most `secs`.
async fn wait_count(count: &AtomicUsize, n: usize, secs: u64, d: &TestDaemon) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while count.load(Ordering::SeqCst) < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "count stayed at {}\n{}",
            count.load(Ordering::SeqCst),
            d.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A coordinator that accepts the control socket and never answers a
/// heartbeat (an unpatched reference 0.46.0, openclaw/crabbox#1555): in
/// `auto`, one control heartbeat goes unanswered, then heartbeats are HTTP
/// only, and the daemon says so once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_transport_stops_control_heartbeats_after_the_first_unanswered_one() {
    let (url, http_beats, control_beats) = fake_counting(ControlFault::Silent).await;
    let d = TestDaemon::builder()
        .coordinator(&url, "fake-token")
        .start()
        .await;
    d.keep_lease_fast(LEASE).await;
    // keep (HTTP) + three ticks, 5 s apart; the first tick also waits 5 s
    // for its control answer.
    wait_count(&http_beats, 4, 40, &d).await;
    assert_eq!(
        control_beats.load(Ordering::SeqCst),
        1,
        "only the first tick tries the control socket\n{}",
        d.stderr()
    );
    let log = d.stderr();
    assert_eq!(
        log.matches("openclaw/crabbox#1557").count(),
        1,
        "one log line naming the upstream fix\n{log}"
    );
    let v = d.ctl_json(&["lease", "list", "--json"]).await;
    assert_eq!(v[0]["via"], "http");
    assert_eq!(v[0]["state"], "running", "{v}");
}

/// `control` keeps trying the socket on every tick; `http` never does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_and_http_transports_are_honoured() {
    let (url, http_beats, control_beats) = fake_counting(ControlFault::Silent).await;
    let d = TestDaemon::builder()
        .coordinator(&url, "fake-token")
        .env("CRABBOX_HEARTBEAT_TRANSPORT", "control")
        .start()
        .await;
    d.keep_lease_fast(LEASE).await;
    wait_count(&control_beats, 2, 40, &d).await;
    assert!(
        http_beats.load(Ordering::SeqCst) >= 2,
        "each miss falls back to HTTP"
    );
    assert!(!d.stderr().contains("openclaw/crabbox#1557"));
    drop(d);

    let (url, http_beats, control_beats) = fake_counting(ControlFault::Silent).await;
    let d = TestDaemon::builder()
        .coordinator(&url, "fake-token")
        .toml("[coordinator]\nheartbeat_transport = \"http\"\n")
        .start()
        .await;
    d.keep_lease_fast(LEASE).await;
    wait_count(&http_beats, 3, 30, &d).await;
    assert_eq!(control_beats.load(Ordering::SeqCst), 0);
}

/// A control socket whose path goes silent (a proxy that stops forwarding
/// but keeps both TCP connections open) is replaced within two ping
/// intervals, and the replacement works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_control_socket_is_replaced_within_two_ping_intervals() {
    let coord = TestCoordinator::start().await;
    coord
        .register_lease(&coord.shared_token, LEASE, "ctl-crab")
        .await
        .unwrap();
    let proxy = crabbox_tests::proxy::FaultProxy::start(coord.addr).await;
    let d = TestDaemon::builder()
        .coordinator(&proxy.url, &coord.shared_token)
        .toml("[coordinator]\ncontrol_ping_interval = \"1s\"\nheartbeat_transport = \"control\"\n")
        .start()
        .await;
    d.keep_lease_fast(LEASE).await;
    d.ctl_json_until(
        &["lease", "list", "--json"],
        "a heartbeat over the control socket",
        Duration::from_secs(20),
        |v| v[0]["via"] == "control",
    )
    .await;
    let before = d.tasks(Some("control-channel")).await;
    assert_eq!(before[0]["state"], "running");
    let restarts = before[0]["restarts"].as_u64().unwrap();
    let accepted = proxy.accepted();
    proxy.freeze_open_connections();
    let t0 = tokio::time::Instant::now();
    let after = d
        .ctl_json_until(
            &["tasks", "--json", "--kind", "control-channel"],
            "the silent control socket to be replaced",
            Duration::from_secs(15),
            |v| {
                v["tasks"][0]["restarts"].as_u64() > Some(restarts)
                    && v["tasks"][0]["state"] == "running"
            },
        )
        .await;
    let took = t0.elapsed();
    eprintln!("silent control socket replaced after {took:?} (ping interval 1 s)");
    assert!(
        after["tasks"][0]["last_error"]
            .as_str()
            .unwrap_or_default()
            .is_empty(),
        "the new socket is up: {after}"
    );
    // Two intervals to notice, plus a reconnect; generous for a loaded host.
    assert!(took < Duration::from_secs(8), "took {took:?}");
    assert!(proxy.accepted() > accepted, "a new connection was dialled");
}
