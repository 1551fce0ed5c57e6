//! Hostile callers against the real coordinator: clients that never read,
//! amplifying JSON bodies, oversized frames, a bridge peer that stops
//! reading, and runs naming another owner's lease. Memory is measured from
//! `/proc/<pid>/status` of the `crabbox-coordinator` binary.

mod common;

use std::time::Duration;

use common::*;
use crabbox_coordinator::testing::TestCoordinator;
use futures_util::future::join_all;
use futures_util::{FutureExt, SinkExt, StreamExt};
use serde_json::json;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

const MIB: u64 = 1024;

/// A JSON body of about `mib` MiB whose `field` is `[[],[],…]`: a few bytes
/// per token, tens of bytes per token as a JSON tree.
fn amplifying(field: &str, mib: usize) -> String {
    let n = mib * 1024 * 1024 / 3;
    let mut s = String::with_capacity(n * 3 + 64);
    s.push_str(&format!("{{\"{field}\":["));
    for i in 0..n {
        if i > 0 {
            s.push(',');
        }
        s.push_str("[]");
    }
    s.push_str("]}");
    s
}

async fn post_raw(http: &reqwest::Client, url: String, token: &str, body: String) -> (u16, String) {
    let resp = http
        .post(url)
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

/// Item 1: a control client that subscribes to big backlogs and never reads
/// must neither pin the coordinator's memory nor be kept open forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_client_that_never_reads_is_bounded_and_closed() {
    let coord = CoordinatorProcess::start("info");
    let http = http();
    let t = coord.user_token("slow@example.com", "acme");
    // Two runs with 500 events of 16 KiB message + 16 KiB data each: a full
    // page of one of them is about 16 MiB of JSON.
    let mut runs = Vec::new();
    for _ in 0..2 {
        let (s, v) = call_url(
            &http,
            &coord.base_url,
            "POST",
            "/v1/runs",
            &t,
            Some(json!({"command": ["x"]})),
        )
        .await;
        assert_eq!(s, 201, "{v}");
        runs.push(v["run"]["id"].as_str().unwrap().to_owned());
    }
    let big = "m".repeat(16 * 1024);
    for run in &runs {
        let url = format!("{}/v1/runs/{run}/events", coord.base_url);
        let statuses: Vec<(u16, String)> = futures_util::stream::iter(0..500)
            .map(|_| {
                let body = json!({"type": "stdout", "message": big, "data": big}).to_string();
                post_raw(&http, url.clone(), &t, body)
            })
            .buffer_unordered(8)
            .collect()
            .await;
        assert!(statuses.iter().all(|(s, _)| *s == 201));
    }
    drop(http);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sockets_before = coord.socket_fds();
    let rss_before = coord.status_kib("VmRSS");
    coord.reset_peak();

    let auth = format!("Bearer {t}");
    let mut ws = ws_connect(&coord.ws_url("/v1/control"), &[("authorization", &auth)])
        .await
        .unwrap();
    let opened = Instant::now();
    for i in 0..40 {
        let run = &runs[i % 2];
        ws.send(Message::Text(
            json!({"type": "subscribe_run", "runID": run, "after": 0, "limit": 500})
                .to_string()
                .into(),
        ))
        .await
        .unwrap();
    }
    // Never read. Give the coordinator time to queue whatever it queues.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let rss_held = coord.status_kib("VmRSS");
    let peak = coord.status_kib("VmHWM");
    // The socket must be dropped by the coordinator within a deadline.
    let mut closed_after = None;
    while opened.elapsed() < Duration::from_secs(75) {
        if coord.socket_fds() < sockets_before + 1 {
            closed_after = Some(opened.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rss_after = coord.status_kib("VmRSS");
    eprintln!(
        "control never-read: RSS before {} MiB, held {} MiB, peak {} MiB, after close {} MiB; closed after {:?}",
        rss_before / MIB,
        rss_held / MIB,
        peak / MIB,
        rss_after / MIB,
        closed_after
    );
    assert!(
        peak.saturating_sub(rss_before) < 120 * MIB,
        "peak RSS grew by {} MiB",
        peak.saturating_sub(rss_before) / MIB
    );
    let closed_after =
        closed_after.expect("the coordinator never dropped the socket that does not read");
    assert!(
        closed_after < Duration::from_secs(60),
        "closed after {closed_after:?}"
    );
    drop(ws);
}

/// Item 2: amplifying JSON bodies, four at once to every JSON route, keep the
/// coordinator's peak RSS bounded; oversize structured fields are refused 413.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amplifying_json_bodies_are_bounded() {
    let coord = CoordinatorProcess::start("info");
    let http = http();
    let t = coord.user_token("amp@example.com", "acme");
    let base = coord.base_url.clone();
    let lease = "cbx_00000000a11e";
    let (s, v) = call_url(&http, &base, "PUT", &format!("/v1/leases/{lease}/registration"), &t,
        Some(json!({"host": "127.0.0.1", "slug": "amp", "ttlSeconds": 3600, "idleTimeoutSeconds": 600}))).await;
    assert!(s == 201, "{v}");
    let mut runs = Vec::new();
    for _ in 0..4 {
        let (s, v) = call_url(
            &http,
            &base,
            "POST",
            "/v1/runs",
            &t,
            Some(json!({"command": ["x"]})),
        )
        .await;
        assert_eq!(s, 201, "{v}");
        runs.push(v["run"]["id"].as_str().unwrap().to_owned());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = coord.status_kib("VmRSS");
    coord.reset_peak();
    let started = Instant::now();

    // 31 MiB to finish (its limit is 32 MiB), four at once, in each field.
    for field in ["results", "telemetry", "logChunks", "log"] {
        let body = if field == "log" {
            // A string field: linear, but far above the 8 MiB log cap.
            format!("{{\"log\":\"{}\"}}", "l".repeat(31 * 1024 * 1024))
        } else {
            amplifying(field, 31)
        };
        let answers = join_all(runs.iter().map(|run| {
            post_raw(
                &http,
                format!("{base}/v1/runs/{run}/finish"),
                &t,
                body.clone(),
            )
        }))
        .await;
        for (s, text) in &answers {
            match field {
                "results" | "telemetry" => {
                    assert_eq!(*s, 413, "{field}: {text}");
                    assert!(text.contains(field) && text.contains("limit"), "{text}");
                }
                _ => assert!(*s == 200 || *s == 409, "{field}: {s} {text}"),
            }
        }
    }
    // The other JSON routes take 1 MiB: a 31 MiB body is refused before it is read.
    let small_routes = [
        ("POST", "/v1/runs".to_owned()),
        ("POST", format!("/v1/runs/{}/events", runs[0])),
        ("PUT", format!("/v1/leases/{lease}/registration")),
        ("POST", format!("/v1/leases/{lease}/heartbeat")),
        ("POST", format!("/v1/leases/{lease}/egress/ticket")),
    ];
    let body = amplifying("command", 31);
    for (method, path) in &small_routes {
        let answers = join_all((0..4).map(|_| {
            let req = http
                .request(
                    reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
                    format!("{base}{path}"),
                )
                .bearer_auth(&t)
                .header("content-type", "application/json")
                .body(body.clone());
            async move {
                match req.send().await {
                    Ok(r) => r.status().as_u16(),
                    // The server may answer 413 and close before the upload ends.
                    Err(_) => 413,
                }
            }
        }))
        .await;
        assert!(
            answers.iter().all(|s| *s == 413),
            "{method} {path}: {answers:?}"
        );
    }
    // Just under 1 MiB of tokens is parsed, without a tree.
    let body = amplifying("command", 1).replace(&"[],".repeat(4000), "");
    for (method, path) in &small_routes {
        let resp = http
            .request(
                reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
                format!("{base}{path}"),
            )
            .bearer_auth(&t)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert!(
            resp.status().as_u16() < 500,
            "{method} {path}: {}",
            resp.status()
        );
    }
    let peak = coord.status_kib("VmHWM");
    eprintln!(
        "amplifying bodies: RSS before {} MiB, peak {} MiB, took {:?}",
        rss_before / MIB,
        peak / MIB,
        started.elapsed()
    );
    assert!(
        peak.saturating_sub(rss_before) < 300 * MIB,
        "peak RSS grew by {} MiB",
        peak.saturating_sub(rss_before) / MIB
    );

    // Field bounds: the reference's truncations are kept exactly
    // (message/data 16 KiB, short fields 128 bytes, log 8 MiB), structured
    // fields over their cap are refused with a message naming the field.
    let run = &runs[0];
    let (s, v) = call_url(&http, &base, "POST", &format!("/v1/runs/{run}/events"), &t,
        Some(json!({"type": "t".repeat(300), "message": "é".repeat(10_000), "data": "d".repeat(20_000)}))).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["event"]["type"].as_str().unwrap().len(), 128);
    assert_eq!(v["event"]["message"].as_str().unwrap().len(), 16 * 1024);
    assert_eq!(v["event"]["data"].as_str().unwrap().len(), 16 * 1024);
    // A finished run's record stays small whatever was sent; the log keeps 8 MiB.
    let (s, v) = call_url(
        &http,
        &base,
        "POST",
        "/v1/runs",
        &t,
        Some(json!({"command": ["x"]})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let run = v["run"]["id"].as_str().unwrap().to_owned();
    let body = json!({"exitCode": 0, "logChunks": ["a".repeat(5 << 20), "b".repeat(4 << 20)],
        "results": {"passed": 3}, "telemetry": {"load1": 0.5}})
    .to_string();
    let (s, text) = post_raw(&http, format!("{base}/v1/runs/{run}/finish"), &t, body).await;
    assert_eq!(s, 200, "{text}");
    let (s, v) = call_url(&http, &base, "GET", &format!("/v1/runs/{run}"), &t, None).await;
    assert_eq!(s, 200);
    assert_eq!(v["run"]["results"], json!({"passed": 3}));
    assert!(
        v.to_string().len() < 64 * 1024,
        "run record is {} bytes",
        v.to_string().len()
    );
    assert_eq!(
        v["run"]["logBytes"],
        8 * 1024 * 1024,
        "{}",
        v["run"]["logBytes"]
    );
    assert_eq!(v["run"]["logTruncated"], true);
    let (s, v) = call_url(
        &http,
        &base,
        "POST",
        "/v1/runs",
        &t,
        Some(json!({"command": vec!["x".repeat(1024); 100]})),
    )
    .await;
    assert_eq!(s, 413, "{v}");
    assert!(v["message"].as_str().unwrap().contains("command"), "{v}");
    let (s, v) = call_url(
        &http,
        &base,
        "PUT",
        &format!("/v1/leases/{lease}/registration"),
        &t,
        Some(json!({"host": "h".repeat(300)})),
    )
    .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (400, Some("invalid_registration")),
        "{v}"
    );
    assert!(v["message"].as_str().unwrap().contains("host"), "{v}");
}

/// Item 4: a run or event naming another owner's lease is refused, and no
/// answer names the other owner.
#[tokio::test]
async fn runs_need_manage_access_to_the_lease_they_name() {
    let coord = TestCoordinator::start().await;
    let http = http();
    let alice = coord.user_token("alice@example.com", "acme", "alice");
    let mallory = coord.user_token("mallory@example.com", "evil", "mallory");
    let lease = "cbx_0000000a11ce";
    register(&http, &coord, &alice, lease, "alice-box", 3600, 600).await;

    let (s, v) = call(
        &http,
        &coord,
        "POST",
        "/v1/runs",
        Some(&mallory),
        Some(json!({"leaseID": lease, "command": ["id"]})),
    )
    .await;
    assert_eq!(s, 404, "{v}");
    assert!(!v.to_string().contains("alice"), "{v}");

    // Mallory's own run cannot name Alice's lease in an event either.
    let (s, v) = call(
        &http,
        &coord,
        "POST",
        "/v1/runs",
        Some(&mallory),
        Some(json!({"command": ["id"]})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let run = v["run"]["id"].as_str().unwrap().to_owned();
    let (s, v) = call(
        &http,
        &coord,
        "POST",
        &format!("/v1/runs/{run}/events"),
        Some(&mallory),
        Some(json!({"type": "lease.created", "leaseID": lease})),
    )
    .await;
    assert_eq!(s, 404, "{v}");
    let (_, v) = call(
        &http,
        &coord,
        "GET",
        &format!("/v1/runs/{run}"),
        Some(&mallory),
        None,
    )
    .await;
    assert!(!v.to_string().contains("alice"), "{v}");
    // Alice cannot read Mallory's run through her lease.
    let (s, _) = call(
        &http,
        &coord,
        "GET",
        &format!("/v1/runs/{run}"),
        Some(&alice),
        None,
    )
    .await;
    assert_eq!(s, 404);

    // The owner can; an admin can attribute; ids the coordinator never saw are kept.
    let (s, v) = call(
        &http,
        &coord,
        "POST",
        "/v1/runs",
        Some(&alice),
        Some(json!({"leaseID": lease, "command": ["id"]})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["run"]["slug"], "alice-box");
    let run = v["run"]["id"].as_str().unwrap().to_owned();
    let (s, v) = call(
        &http,
        &coord,
        "POST",
        &format!("/v1/runs/{run}/events"),
        Some(&alice),
        Some(json!({"type": "lease.created", "leaseID": lease})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = call(
        &http,
        &coord,
        "POST",
        "/v1/runs",
        Some(&coord.admin_token),
        Some(json!({"leaseID": lease})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = call(
        &http,
        &coord,
        "POST",
        "/v1/runs",
        Some(&mallory),
        Some(json!({"leaseID": "cbx_0000000f4e11"})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
}

/// Sends one message on `ws` and returns the code of the close frame that
/// answers it; a connection dropped without a close frame fails the test.
async fn close_code_after_sending(ws: Ws, msg: Message, what: &str) -> Option<u16> {
    let (mut tx, mut rx) = ws.split();
    let sender = tokio::spawn(async move {
        let _ = tx.send(msg).await;
        tx
    });
    let code = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(m) = rx.next().await {
            match m {
                Ok(Message::Close(f)) => return f.map(|f| u16::from(f.code)),
                Ok(_) => continue,
                Err(e) => panic!("{what}: connection dropped without a close frame: {e}"),
            }
        }
        None
    })
    .await
    .expect("no close within 10 s");
    sender.abort();
    code
}

/// Item 5: frames over the limit are closed 1009 with a close frame, on the
/// control socket and on bridges, even when the library refuses them from the header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frames_are_closed_1009() {
    let coord = TestCoordinator::start().await;
    let http = http();
    let t = coord.user_token("big@example.com", "acme", "big");
    for size in [2 << 20, 40 << 20] {
        let ws = control(&coord, &t).await;
        let msg = Message::Text("x".repeat(size).into());
        let what = format!("control {size}");
        let code = close_code_after_sending(ws, msg, &what).await;
        assert_eq!(code, Some(1009), "control frame of {size} bytes");
    }
    let lease = "cbx_000000b16b16";
    register(&http, &coord, &t, lease, "big", 3600, 600).await;
    for size in [13 << 20, 40 << 20] {
        let (_, h) = ticket(&http, &coord, &t, lease, "host", None).await;
        let host = bridge(&coord, lease, "host", h["ticket"].as_str().unwrap()).await;
        let msg = Message::Binary(vec![7u8; size].into());
        let what = format!("bridge {size}");
        let code = close_code_after_sending(host, msg, &what).await;
        assert_eq!(code, Some(1009), "bridge frame of {size} bytes");
    }
}

type HostRx = futures_util::stream::SplitStream<Ws>;

/// A paired host and client on `lease`.
async fn pair(coord: &TestCoordinator, lease: &str) -> (Ws, Ws, reqwest::Client, String) {
    let http = http();
    let t = coord.user_token("flood@example.com", "acme", "flood");
    register(&http, coord, &t, lease, lease, 3600, 600).await;
    let (_, h) = ticket(&http, coord, &t, lease, "host", None).await;
    let sid = h["sessionID"].as_str().unwrap().to_owned();
    let (_, c) = ticket(&http, coord, &t, lease, "client", Some(&sid)).await;
    let host = bridge(coord, lease, "host", h["ticket"].as_str().unwrap()).await;
    let client = bridge(coord, lease, "client", c["ticket"].as_str().unwrap()).await;
    eventually(|| async {
        let (_, v) = call(
            &http,
            coord,
            "GET",
            &format!("/v1/leases/{lease}/egress/status"),
            Some(&t),
            None,
        )
        .await;
        v["hostConnected"] == true && v["clientConnected"] == true
    })
    .await;
    (host, client, http, t)
}

/// Sends 64 KiB binary frames from the host until its socket fails.
fn flood(mut htx: futures_util::stream::SplitSink<Ws, Message>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let frame = vec![1u8; 64 * 1024];
        while htx
            .send(Message::Binary(frame.clone().into()))
            .await
            .is_ok()
        {}
    })
}

/// A pair on `lease` whose host floods 64 KiB frames from its own task (so
/// its reader stays free) and whose client never reads (nor answers pings).
async fn flooded_pair(
    coord: &TestCoordinator,
    lease: &str,
) -> (
    tokio::task::JoinHandle<()>,
    HostRx,
    Ws,
    reqwest::Client,
    String,
) {
    let (host, client, http, t) = pair(coord, lease).await;
    let (htx, hrx) = host.split();
    let flood = flood(htx);
    // Let the flood fill every buffer between the coordinator and the client.
    tokio::time::sleep(Duration::from_secs(2)).await;
    (flood, hrx, client, http, t)
}

/// The next close frame on a host's reader, within `within`.
async fn host_close(rx: &mut HostRx, within: Duration) -> Option<(u16, String)> {
    tokio::time::timeout(within, async {
        while let Some(m) = rx.next().await {
            match m {
                Ok(Message::Close(Some(f))) => {
                    return Some((u16::from(f.code), f.reason.to_string()));
                }
                Ok(Message::Close(None)) => return Some((1005, String::new())),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
}

/// Item 3a: releasing a lease whose client stopped reading while the host
/// floods still tells the host `1008 "lease ended"` at once — even a host
/// that only looks for frames between its own writes (one task, no split),
/// so the coordinator must keep reading it once the lease is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_reaches_the_host_while_its_client_stopped_reading() {
    let coord = TestCoordinator::start().await;
    let lease = "cbx_00000000f100";
    let (mut host, client, http, t) = pair(&coord, lease).await;
    let release = {
        let (http, t, url) = (
            http.clone(),
            t.clone(),
            format!("{}/v1/leases/{lease}/release", coord.base_url),
        );
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let at = Instant::now();
            let resp = http.post(url).bearer_auth(t).send().await.unwrap();
            (resp.status().as_u16(), at)
        })
    };
    let frame = vec![1u8; 64 * 1024];
    let give_up = Instant::now() + Duration::from_secs(20);
    let close = 'flood: loop {
        let sent =
            tokio::time::timeout_at(give_up, host.send(Message::Binary(frame.clone().into())))
                .await;
        let broken = match sent {
            Err(_) => break 'flood None,
            Ok(r) => r.is_err(),
        };
        while let Some(Some(m)) = host.next().now_or_never() {
            match m {
                Ok(Message::Close(Some(f))) => {
                    break 'flood Some((u16::from(f.code), f.reason.to_string(), Instant::now()));
                }
                Ok(_) => continue,
                Err(_) => break,
            }
        }
        if broken {
            break None;
        }
    };
    let (status, released) = release.await.unwrap();
    assert_eq!(status, 200);
    let (code, reason, at) = close.expect("the host never got a close frame");
    eprintln!(
        "host got {code} {reason:?} {:?} after release",
        at - released
    );
    assert_eq!((code, reason.as_str()), (1008, "lease ended"));
    assert!(
        at - released < Duration::from_secs(5),
        "{:?}",
        at - released
    );
    drop(client);
}

/// Item 3b: a client that neither reads nor answers pings is dropped by
/// liveness although the host keeps writing into it; the host is told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liveness_drops_a_silent_peer_under_a_flood() {
    let coord = TestCoordinator::start_with(|c| {
        c.limits.ping_every = Duration::from_secs(1);
        // Long enough that only liveness can act within the test.
        c.limits.write_timeout = Duration::from_secs(120);
    })
    .await;
    let lease = "cbx_00000000f101";
    let started = Instant::now();
    let (flood, mut host, client, _http, _t) = flooded_pair(&coord, lease).await;
    let close = host_close(&mut host, Duration::from_secs(15)).await;
    eprintln!(
        "liveness: host close {close:?} after {:?}",
        started.elapsed()
    );
    assert_eq!(close, Some((1011, "egress client disconnected".to_owned())));
    flood.abort();
    drop(client);
}

/// Item 3c: with the default liveness, a client that stops reading is
/// dropped by the relay's write deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_deadline_drops_a_peer_that_stopped_reading() {
    let coord = TestCoordinator::start_with(|c| {
        c.limits.write_timeout = Duration::from_secs(2);
    })
    .await;
    let lease = "cbx_00000000f102";
    let started = Instant::now();
    let (flood, mut host, client, _http, _t) = flooded_pair(&coord, lease).await;
    let close = host_close(&mut host, Duration::from_secs(15)).await;
    eprintln!(
        "write deadline: host close {close:?} after {:?}",
        started.elapsed()
    );
    assert_eq!(close, Some((1011, "egress client disconnected".to_owned())));
    flood.abort();
    drop(client);
}

/// A client that reads a download steadily and sends nothing back (a v1
/// reference client) stays paired under a flood: the host's writes into it
/// moving is its liveness while they keep the lock pings would need.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_only_reads_a_flood_stays_paired() {
    let coord = TestCoordinator::start_with(|c| {
        c.limits.ping_every = Duration::from_secs(1);
        c.limits.write_timeout = Duration::from_secs(120);
    })
    .await;
    let lease = "cbx_00000000f103";
    let (host, mut client, _http, _t) = pair(&coord, lease).await;
    let (htx, mut hrx) = host.split();
    let flood = flood(htx);
    let read = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let r = read.clone();
    let reader = tokio::spawn(async move {
        while let Some(Ok(m)) = client.next().await {
            if let Message::Binary(_) = m {
                r.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    });
    let close = host_close(&mut hrx, Duration::from_secs(6)).await;
    let frames = read.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(close, None, "dropped after the client read {frames} frames");
    assert!(frames > 100, "{frames}");
    flood.abort();
    reader.abort();
}
