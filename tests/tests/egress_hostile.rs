//! The daemon's host end against a hostile lease side (issue: hostile input):
//! a client-side peer holding a real client ticket, talking v1 JSON through
//! the real coordinator to the real daemon. Descriptors are counted in
//! `/proc/<pid>/fd`, memory read from `/proc/<pid>/status`, the log is the
//! daemon's own stderr.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use crabbox_coordinator::testing::TestCoordinator;
use crabbox_tests::TestDaemon;
use futures::{SinkExt, StreamExt};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

const LEASE: &str = "cbx_00000000e0f1";

async fn world(builder: crabbox_tests::TestDaemonBuilder) -> (TestCoordinator, TestDaemon) {
    let coord = TestCoordinator::start().await;
    coord
        .register_lease(&coord.shared_token, LEASE, "hostile-crab")
        .await
        .unwrap();
    let daemon = builder
        .coordinator(&coord.base_url, &coord.shared_token)
        .start()
        .await;
    (coord, daemon)
}

async fn start_host(d: &TestDaemon) {
    d.egress_host_private(LEASE, "127.0.0.1").await;
}

/// Frames the hostile peer received, collected by a background reader.
type Inbox = Arc<Mutex<Vec<serde_json::Value>>>;

type Sink = futures::stream::SplitSink<crabbox_egress::BridgeSocket, Message>;

/// Joins as the lease side with a real client ticket; returns the sink and what arrives.
async fn hostile_peer(coord: &TestCoordinator, d: &TestDaemon) -> (Sink, Inbox) {
    let path = d
        .home()
        .join(format!("hostile-ticket-{}", std::process::id()));
    let out = d
        .ctl(&[
            "egress",
            "ticket",
            "--id",
            LEASE,
            "--role",
            "client",
            "--out",
            path.to_str().unwrap(),
        ])
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ticket = std::fs::read_to_string(&path).unwrap();
    let url = format!(
        "{}/v1/leases/{LEASE}/egress/client",
        coord.base_url.replacen("http://", "ws://", 1)
    );
    let ws = crabbox_egress::connect_bridge(&url, ticket.trim(), None)
        .await
        .expect("hostile peer joins");
    let (sink, mut stream) = ws.split();
    let inbox: Inbox = Arc::default();
    let i = inbox.clone();
    tokio::spawn(async move {
        while let Some(Ok(msg)) = stream.next().await {
            if let Message::Text(t) = msg
                && let Ok(v) = serde_json::from_str(t.as_str())
            {
                i.lock().unwrap().push(v);
            }
        }
    });
    // Pairing: the host must be there before frames are relayed.
    d.ctl_json_until(
        &["egress", "status", "--id", LEASE, "--json"],
        "both ends paired",
        Duration::from_secs(30),
        |v| {
            v["coordinator"]["hostConnected"] == true && v["coordinator"]["clientConnected"] == true
        },
    )
    .await;
    (sink, inbox)
}

fn open_frame(id: &str, host: &str, port: u16) -> Message {
    Message::text(
        serde_json::json!({"type": "open", "id": id, "host": host, "port": port.to_string()})
            .to_string(),
    )
}

fn count_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn status_kib(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// How long `crabboxctl status` (GetStatus) takes, and whether it worked.
async fn time_status(d: &TestDaemon) -> (bool, Duration) {
    let t = Instant::now();
    let out = d.ctl(&["status", "--json"]).await;
    (out.status.success(), t.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_opens_to_a_blackhole_leave_the_api_descriptors() {
    // The common systemd user-unit limit, with no headroom to raise into.
    let (coord, d) = world(TestDaemon::builder().nofile(1024, 1024)).await;
    start_host(&d).await;
    // A loopback blackhole: a listener whose accept queue is full drops SYNs,
    // so every connect to it stays pending for the whole dial budget.
    let hole = tokio::net::TcpSocket::new_v4().unwrap();
    hole.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let hole = hole.listen(1).unwrap();
    let port = hole.local_addr().unwrap().port();
    let _fill: Vec<_> = futures::future::join_all((0..4).map(|_| async move {
        tokio::time::timeout(
            Duration::from_millis(300),
            tokio::net::TcpStream::connect(("127.0.0.1", port)),
        )
        .await
    }))
    .await;
    let (mut sink, inbox) = hostile_peer(&coord, &d).await;
    let pid = d.pid();
    let baseline = count_fds(pid);
    for i in 0..3000 {
        sink.send(open_frame(&format!("h{i}"), "127.0.0.1", port))
            .await
            .unwrap();
    }
    let started = Instant::now();
    let (mut max_fds, mut worst, mut failures) = (0, Duration::ZERO, 0);
    while started.elapsed() < Duration::from_secs(12) {
        max_fds = max_fds.max(count_fds(pid));
        let (ok, took) = time_status(&d).await;
        failures += usize::from(!ok);
        worst = worst.max(took);
        max_fds = max_fds.max(count_fds(pid));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let refused = inbox
        .lock()
        .unwrap()
        .iter()
        .filter(|v| v["type"] == "error")
        .count();
    eprintln!(
        "fds: baseline {baseline}, max {max_fds}; GetStatus worst {worst:?}, failures {failures}; refused opens {refused}"
    );
    assert_eq!(
        failures,
        0,
        "the API failed while opens were pending:\n{}",
        d.stderr()
    );
    assert!(worst < Duration::from_secs(3), "GetStatus took {worst:?}");
    assert!(
        max_fds < baseline + 300,
        "descriptors went from {baseline} to {max_fds} (limit 1024)"
    );
    assert!(
        refused >= 2000,
        "opens beyond the pending cap are refused at once ({refused})"
    );
    let log = d.stderr();
    assert!(log.contains("RLIMIT_NOFILE"), "{log}");
    assert!(log.contains("refusing opens at a limit"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_queues_towards_destinations_that_never_read_stay_within_a_budget() {
    let (coord, d) = world(TestDaemon::builder()).await;
    start_host(&d).await;
    // Accepts and holds, never reads; tiny receive buffers keep the kernel out of it.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = sock.listen(1024).unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let (mut sink, inbox) = hostile_peer(&coord, &d).await;
    const STREAMS: usize = 100;
    // In batches below the per-bridge pending-open cap (64).
    for batch in 0..2 {
        for i in batch * 50..(batch + 1) * 50 {
            sink.send(open_frame(&format!("m{i}"), "127.0.0.1", port))
                .await
                .unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while inbox
            .lock()
            .unwrap()
            .iter()
            .filter(|v| v["type"] == "open_ok")
            .count()
            < (batch + 1) * 50
        {
            assert!(Instant::now() < deadline, "opens were not answered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let pid = d.pid();
    let before = status_kib(pid, "VmRSS:");
    // Up to 6 MiB per stream, round robin, for at most 25 s (the daemon may
    // push back; that is the point).
    use base64::Engine as _;
    let body = base64::engine::general_purpose::STANDARD.encode(vec![0x5au8; 32 * 1024]);
    let sent = tokio::time::timeout(Duration::from_secs(25), async {
        let mut sent = 0usize;
        for _round in 0..192 {
            for i in 0..STREAMS {
                let frame = format!(r#"{{"type":"data","id":"m{i}","body":"{body}"}}"#);
                if sink.send(Message::text(frame)).await.is_err() {
                    return sent;
                }
                sent += 32 * 1024;
            }
        }
        sent
    })
    .await
    .unwrap_or(0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let hwm = status_kib(pid, "VmHWM:");
    let rss = status_kib(pid, "VmRSS:");
    eprintln!(
        "memory: VmRSS before {before} KiB, after {rss} KiB, VmHWM {hwm} KiB; sent {} MiB (0 = the sender was held back for 25 s)",
        sent >> 20
    );
    assert!(
        hwm < before + 200 * 1024,
        "the daemon grew from {before} KiB to a peak of {hwm} KiB"
    );
    let (ok, took) = time_status(&d).await;
    assert!(ok && took < Duration::from_secs(3), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_supplied_hosts_never_forge_log_lines() {
    let (coord, d) = world(TestDaemon::builder()).await;
    start_host(&d).await;
    let (mut sink, inbox) = hostile_peer(&coord, &d).await;
    let forged = "evil.example\n2026-12-01T00:00:00.000000Z  INFO forged: pwned \u{1b}[31mred";
    let huge = "a".repeat(1 << 20);
    sink.send(open_frame("f1", forged, 443)).await.unwrap();
    sink.send(open_frame("f2", &huge, 443)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let errors: Vec<String> = inbox
            .lock()
            .unwrap()
            .iter()
            .filter(|v| v["type"] == "error")
            .map(|v| v["error"].as_str().unwrap_or("").to_owned())
            .collect();
        if errors.len() >= 2 {
            assert!(
                errors.iter().all(|e| e == "invalid destination host"),
                "{errors:?}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no refusal: {errors:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = d.stderr();
    assert!(!log.contains('\u{1b}'), "an escape reached the log");
    assert!(
        !log.lines()
            .any(|l| l.contains("forged: pwned") && !l.contains("open refused")),
        "a forged line:\n{log}"
    );
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 4096, "a log line of {longest} bytes");
    assert!(log.contains("open refused"), "{log}");
}

/// Stream ids and malformed frames are peer text too: a megabyte id is
/// neither kept, echoed nor logged, a long port is refused before it is
/// held, and a malformed frame's value never reaches the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_supplied_ids_and_malformed_frames_stay_out_of_replies_and_logs() {
    let (coord, d) = world(TestDaemon::builder()).await;
    start_host(&d).await;
    let (mut sink, inbox) = hostile_peer(&coord, &d).await;
    let huge = "i".repeat(1 << 20);
    sink.send(open_frame(&huge, "example.com", 443))
        .await
        .unwrap();
    let long_port = serde_json::json!({"type": "open", "id": "p1", "host": "example.com", "port": "4".repeat(4096)});
    sink.send(Message::text(long_port.to_string()))
        .await
        .unwrap();
    for _ in 0..3 {
        let bad = format!(r#"{{"type":"hello","version":"{}"}}"#, "v".repeat(1 << 20));
        sink.send(Message::text(bad)).await.unwrap();
    }
    // The bridge still answers: a refused destination after all of that.
    sink.send(open_frame("after", "not-allowed.example", 443))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let errors = loop {
        let errors: Vec<(String, String)> = inbox
            .lock()
            .unwrap()
            .iter()
            .filter(|v| v["type"] == "error")
            .map(|v| {
                (
                    v["id"].as_str().unwrap_or("").to_owned(),
                    v["error"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect();
        if errors.iter().any(|(id, _)| id == "after") {
            break errors;
        }
        assert!(Instant::now() < deadline, "no refusal: {errors:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        errors.contains(&("p1".into(), "invalid destination port".into())),
        "{errors:?}"
    );
    assert!(
        errors.iter().all(|(id, _)| id.len() < 64),
        "an id was echoed: {} bytes",
        errors.iter().map(|(id, _)| id.len()).max().unwrap_or(0)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = d.stderr();
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 4096, "a log line of {longest} bytes");
    assert!(
        !log.contains("vvvvvvvv") && !log.contains("iiiiiiii"),
        "peer text in the log"
    );
    let warned = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("malformed bridge text frame"))
        .count();
    assert_eq!(warned, 1, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_allowlist_is_refused_promptly_while_the_api_stays_fast() {
    let (_coord, d) = world(TestDaemon::builder()).await;
    let patterns: Vec<String> = (0..100_000).map(|i| format!("h{i}.ex")).collect();
    // Several --allow arguments: one argument may not exceed 128 KiB.
    let chunks: Vec<String> = patterns.chunks(8000).map(|c| c.join(",")).collect();
    let mut args: Vec<&str> = vec!["egress", "host", "--id", LEASE];
    for c in &chunks {
        args.push("--allow");
        args.push(c);
    }
    let d = Arc::new(d);
    let probe = {
        let d = d.clone();
        tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            for _ in 0..15 {
                let (ok, took) = time_status(&d).await;
                assert!(ok);
                worst = worst.max(took);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            worst
        })
    };
    let t = Instant::now();
    let out = d.ctl(&args).await;
    let took = t.elapsed();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let worst = probe.await.unwrap();
    eprintln!("huge allowlist refused in {took:?}; GetStatus worst {worst:?}");
    assert!(!out.status.success());
    assert!(err.contains("at most 4096"), "{err}");
    assert!(took < Duration::from_secs(5), "refusal took {took:?}");
    assert!(worst < Duration::from_secs(2), "GetStatus took {worst:?}");
}
