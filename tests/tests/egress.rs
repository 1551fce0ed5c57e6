//! Mediated egress end to end on real parts: our coordinator in-process on
//! port 0, the real daemon running the host bridge, the real
//! `crabbox-egress-client` helper with a minted ticket, and curl through it
//! to a loopback origin (reached through the policy's explicit
//! `--allow-private` opt-in).

use std::time::Duration;

use crabbox_coordinator::testing::TestCoordinator;
use crabbox_tests::{
    TestDaemon,
    egress::{EgressHelper, Origin, curl_via},
};

const LEASE: &str = "cbx_00000000e001";

struct World {
    coord: TestCoordinator,
    daemon: TestDaemon,
}

async fn world() -> World {
    let coord = TestCoordinator::start().await;
    coord
        .register_lease(&coord.shared_token, LEASE, "egress-crab")
        .await
        .unwrap();
    let daemon = daemon_for(&coord, None).await;
    World { coord, daemon }
}

async fn daemon_for(coord: &TestCoordinator, home: Option<&std::path::Path>) -> TestDaemon {
    let mut b = TestDaemon::builder().coordinator(&coord.base_url, &coord.shared_token);
    if let Some(h) = home {
        b = b.home(h);
    }
    b.start().await
}

async fn start_host(d: &TestDaemon, origin: &Origin) -> String {
    start_host_named(d, LEASE, origin).await["session_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Starts the host bridge and waits until the coordinator sees it connected.
async fn start_connected_host(d: &TestDaemon, origin: &Origin) -> String {
    let session = start_host(d, origin).await;
    wait_status(d, "the host bridge", |v| {
        v["coordinator"]["hostConnected"] == true
    })
    .await;
    session
}

async fn status(d: &TestDaemon) -> serde_json::Value {
    d.ctl_json(&["egress", "status", "--id", LEASE, "--json"])
        .await
}

async fn wait_status(
    d: &TestDaemon,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    d.ctl_json_until(
        &["egress", "status", "--id", LEASE, "--json"],
        what,
        Duration::from_secs(30),
        pred,
    )
    .await
}

async fn helper(w: &World, session: &str) -> EgressHelper {
    let ticket = w.daemon.home().join(format!("ticket-{}", rand_suffix()));
    let out = w
        .daemon
        .ctl(&[
            "egress",
            "ticket",
            "--id",
            LEASE,
            "--role",
            "client",
            "--out",
            ticket.to_str().unwrap(),
        ])
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    EgressHelper::start(&w.coord.base_url, LEASE, session, &ticket, w.daemon.home()).await
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

async fn fetch_until_ok(proxy: &str, url: &str) -> String {
    // The helper answers a fast 502/503 until its bridge is paired; retry
    // (bounded) rather than guess when pairing finished.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, body, err) = curl_via(proxy, url).await;
        if ok && !body.is_empty() {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "curl never succeeded: {err} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_through_helper_and_daemon_reaches_the_origin() {
    let w = world().await;
    let origin = Origin::start().await;
    let session = start_connected_host(&w.daemon, &origin).await;
    assert!(session.starts_with("egress_"), "{session}");

    let h = helper(&w, &session).await;
    let body = fetch_until_ok(&h.proxy_url(), &origin.url("index.html")).await;
    assert_eq!(body, origin.body, "bytes identical");
    assert!(!origin.peers.lock().unwrap().is_empty());

    let v = wait_status(&w.daemon, "counters", |v| {
        v["local"]["bytes_out"].as_u64().unwrap_or(0) > 0
    })
    .await;
    assert_eq!(v["coordinator"]["clientConnected"], true);
    assert_eq!(v["coordinator"]["sessionID"], session);
    assert_eq!(v["local"]["session_id"], session);
    let hosts = v["local"]["recent_hosts"].as_array().unwrap();
    assert!(hosts.iter().any(|h| h[0] == "127.0.0.1"), "{v}");
    assert_eq!(v["local"]["protocol_version"], 2, "both ends are ours: v2");

    // A destination not on the allowlist is refused by the daemon's policy: 403.
    let (ok, _, err) = curl_via(&h.proxy_url(), "http://localhost:9/").await;
    assert!(!ok);
    assert!(err.contains("403"), "{err}");

    // The ticket is passed by a 0600 file: it never shows in the helper's
    // process list entry.
    let cmdline =
        String::from_utf8_lossy(&std::fs::read(format!("/proc/{}/cmdline", h.pid())).unwrap())
            .into_owned();
    let ticket_like = cmdline
        .split('\0')
        .any(|a| a.len() == 39 && a.starts_with("egress_"));
    assert!(!ticket_like, "{cmdline}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_proxy_is_refused() {
    let w = world().await;
    let out = w.daemon.ctl(&["egress", "host", "--id", LEASE]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("open proxy"), "{err}");
    let out = w
        .daemon
        .ctl(&["egress", "host", "--id", LEASE, "--allow", "*"])
        .await;
    assert!(!out.status.success());
    // A wildcard over a public suffix, and a private address without the opt-in.
    for (allow, says) in [
        ("*.co.uk", "public suffix"),
        ("127.0.0.1", "--allow-private"),
    ] {
        let out = w
            .daemon
            .ctl(&["egress", "host", "--id", LEASE, "--allow", allow])
            .await;
        assert!(!out.status.success(), "{allow} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{allow}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_release_ends_the_host_bridge() {
    let w = world().await;
    let origin = Origin::start().await;
    start_connected_host(&w.daemon, &origin).await;
    let (status, v) = w
        .coord
        .request(
            "POST",
            &format!("/v1/leases/{LEASE}/release"),
            &w.coord.shared_token,
            &serde_json::json!({"delete": false}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{v}");
    let t0 = tokio::time::Instant::now();
    let deadline = t0 + Duration::from_secs(10);
    loop {
        let v = w.daemon.ctl_json(&["egress", "list", "--json"]).await;
        if v[0]["state"] == "failed" {
            assert!(
                v[0]["last_error"].as_str().unwrap().contains("lease"),
                "{v}"
            );
            assert_eq!(v[0]["restarts"], 0, "lease end is fatal, never retried");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{v}\n{}",
            w.daemon.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_restart_restores_the_same_session() {
    let w = world().await;
    let origin = Origin::start().await;
    let session = start_connected_host(&w.daemon, &origin).await;
    let home = w.daemon.home().to_path_buf();
    w.daemon.signal(nix::sys::signal::Signal::SIGKILL);
    let mut old = w.daemon;
    old.wait_exit().await;

    let d = daemon_for(&w.coord, Some(&home)).await;
    let v = wait_status(&d, "the restored bridge", |v| {
        v["coordinator"]["hostConnected"] == true && v["local"]["connected"] == true
    })
    .await;
    assert_eq!(v["local"]["session_id"], session, "restored, not replaced");
    assert_eq!(v["coordinator"]["sessionID"], session);
    drop(old);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_starts_leave_exactly_one_session() {
    let w = world().await;
    let origin = Origin::start().await;
    let allow = origin.addr.ip().to_string();
    let args = [
        "egress",
        "host",
        "--id",
        LEASE,
        "--allow",
        &allow,
        "--allow-private",
        "--json",
    ];
    // 50 CLI processes at once, all polled together.
    let outs = futures::future::join_all((0..50).map(|_| w.daemon.ctl(&args))).await;
    let failures: Vec<String> = outs
        .iter()
        .filter(|o| !o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .collect();
    assert!(
        failures.is_empty(),
        "every start succeeds (each replaces the previous): {failures:?}"
    );

    let v = wait_status(&w.daemon, "the final bridge", |v| {
        v["coordinator"]["hostConnected"] == true && v["local"]["connected"] == true
    })
    .await;
    let session = v["local"]["session_id"].clone();
    assert_eq!(
        v["coordinator"]["sessionID"], session,
        "the coordinator's active session is ours"
    );
    let tasks = w.daemon.tasks(Some("egress-host")).await;
    assert_eq!(tasks.len(), 1);
    // No zombie reconnects afterwards: the session and restarts stay put.
    let before = tasks[0]["restarts"].clone();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let v = status(&w.daemon).await;
    assert_eq!(v["coordinator"]["sessionID"], session);
    assert_eq!(v["local"]["restarts"], before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_restart_reconnects_the_same_session_and_the_helper_heals() {
    let w = world().await;
    let origin = Origin::start().await;
    let session = start_connected_host(&w.daemon, &origin).await;
    let h = helper(&w, &session).await;
    assert_eq!(
        fetch_until_ok(&h.proxy_url(), &origin.url("before")).await,
        origin.body
    );

    // A slow download is in flight when the coordinator restarts.
    let proxy = h.proxy_url();
    let slow_url = origin.url("slow");
    let in_flight = tokio::spawn(async move { curl_via(&proxy, &slow_url).await });
    tokio::time::sleep(Duration::from_millis(500)).await;

    let World { coord, daemon } = w;
    let addr = coord.addr;
    let coord = coord.restart().await;
    assert_eq!(coord.addr, addr, "restarted on the same port");
    let (ok, body, _) = in_flight.await.unwrap();
    assert!(
        !ok && body.len() < 40 * 1024,
        "the transfer in flight was cut by the restart"
    );

    // The daemon's host task reconnects by itself, with the same session.
    let v = wait_status(&daemon, "the host to reconnect", |v| {
        v["coordinator"]["hostConnected"] == true && v["local"]["connected"] == true
    })
    .await;
    assert_eq!(v["local"]["session_id"], session);
    assert_eq!(v["coordinator"]["sessionID"], session);
    assert!(v["local"]["restarts"].as_u64().unwrap() >= 1, "{v}");

    // While the helper has no bridge, the browser gets a fast error, not a hang.
    let t0 = tokio::time::Instant::now();
    let (ok, _, _) = curl_via(&h.proxy_url(), &origin.url("during")).await;
    if !ok {
        assert!(
            t0.elapsed() < Duration::from_secs(8),
            "took {:?}",
            t0.elapsed()
        );
    }

    // The helper keeps its listener; a fresh ticket heals the pair.
    let out = daemon.ctl(&["egress", "ticket", "--id", LEASE]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ticket = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(h.give_ticket(&ticket).await, "ok");
    assert_eq!(
        fetch_until_ok(&h.proxy_url(), &origin.url("after")).await,
        origin.body
    );
    drop(coord);
}

async fn start_host_named(d: &TestDaemon, name: &str, origin: &Origin) -> serde_json::Value {
    d.egress_host_private(name, &origin.addr.ip().to_string())
        .await
}

/// A host bridge started by slug is the lease's one bridge, found by id,
/// and the other way round: tasks are keyed by the canonical id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slug_and_the_id_name_the_same_host_bridge() {
    const SLUG: &str = "egress-crab";
    let w = world().await;
    let origin = Origin::start().await;
    // Slug first, then found by id.
    let session = start_host_named(&w.daemon, SLUG, &origin).await["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let hosts = w.daemon.tasks(Some("egress-host")).await;
    assert_eq!(hosts.len(), 1, "{hosts:?}");
    assert_eq!(hosts[0]["key"], LEASE, "keyed by the canonical id");
    let v = wait_status(&w.daemon, "the host bridge by id", |v| {
        v["coordinator"]["hostConnected"] == true
    })
    .await;
    assert_eq!(v["local"]["session_id"], session, "{v}");
    // Started again by id: it replaces the same task, not a second one.
    start_host_named(&w.daemon, LEASE, &origin).await;
    let hosts = w.daemon.tasks(Some("egress-host")).await;
    assert_eq!(hosts.len(), 1, "one task per lease: {hosts:?}");
    let listed = w.daemon.ctl_json(&["egress", "list", "--json"]).await;
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    // Found by slug: status, then stop.
    let v = w
        .daemon
        .ctl_json(&["egress", "status", "--id", SLUG, "--json"])
        .await;
    assert_eq!(v["local"]["lease_id"], LEASE, "{v}");
    let out = w.daemon.ctl(&["egress", "stop", "--id", SLUG]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = w.daemon.ctl_json(&["egress", "list", "--json"]).await;
    assert!(listed.as_array().unwrap().is_empty(), "{listed}");
}

/// `egress ticket --session S` for another session than the running one is
/// refused (the bridge keeps working); with `--replace` the bridge moves to
/// the new session and the ticket joins it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_for_another_session_needs_replace_and_then_the_host_follows() {
    let w = world().await;
    let origin = Origin::start().await;
    let session = start_connected_host(&w.daemon, &origin).await;
    let other = format!("egress_other{}", rand_suffix());
    let ticket = w.daemon.home().join("other-ticket");
    let args = [
        "egress",
        "ticket",
        "--id",
        LEASE,
        "--session",
        other.as_str(),
        "--out",
        ticket.to_str().unwrap(),
    ];
    let out = w.daemon.ctl(&args).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "refused without --replace");
    assert!(err.contains("--replace") && err.contains(&session), "{err}");
    assert!(!ticket.exists());
    // The running bridge was not touched.
    let v = status(&w.daemon).await;
    assert_eq!(v["coordinator"]["sessionID"], session, "{v}");
    assert_eq!(v["coordinator"]["hostConnected"], true, "{v}");
    assert_eq!(v["local"]["state"], "running", "{v}");

    // With --replace: a real replacement.
    let mut replace = args.to_vec();
    replace.push("--replace");
    let out = w.daemon.ctl(&replace).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(ticket.exists());
    let v = wait_status(&w.daemon, "the host on the new session", |v| {
        v["coordinator"]["sessionID"] == other.as_str() && v["coordinator"]["hostConnected"] == true
    })
    .await;
    assert_eq!(v["local"]["session_id"], other.as_str(), "{v}");
    assert_eq!(v["local"]["state"], "running", "{v}");
    // The ticket works: a helper on the new session reaches the origin.
    let h = EgressHelper::start(&w.coord.base_url, LEASE, &other, &ticket, w.daemon.home()).await;
    let body = fetch_until_ok(&h.proxy_url(), &origin.url("index.html")).await;
    assert_eq!(body, origin.body);
}

/// An orderly end shows as `stopped`: releasing a lease (by slug) through
/// the daemon stops its keeper and its host bridge; a keeper shows
/// `running` as soon as `keep`'s heartbeat succeeded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_through_the_daemon_stops_tasks_and_a_new_keeper_is_running() {
    let w = world().await;
    let origin = Origin::start().await;
    w.daemon.keep_lease_fast(LEASE).await;
    let keeper = w.daemon.tasks(Some("lease-keeper")).await;
    assert_eq!(
        keeper[0]["state"], "running",
        "after keep's good heartbeat: {keeper:?}"
    );
    start_connected_host(&w.daemon, &origin).await;
    let out = w
        .daemon
        .ctl(&["lease", "release", "--id", "egress-crab"])
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = w
        .daemon
        .ctl_json_until(
            &["tasks", "--json"],
            "the lease's tasks to end",
            Duration::from_secs(15),
            |v| {
                v["tasks"].as_array().unwrap().iter().all(|t| {
                    !(t["kind"] == "lease-keeper" || t["kind"] == "egress-host")
                        || t["state"] == "stopped"
                        || t["state"] == "failed"
                })
            },
        )
        .await;
    for t in v["tasks"].as_array().unwrap() {
        if t["kind"] == "lease-keeper" || t["kind"] == "egress-host" {
            assert_eq!(
                t["state"], "stopped",
                "an orderly end is not a failure: {t}"
            );
            assert_eq!(t["key"], LEASE);
        }
    }
}

/// Sends one CONNECT to the helper and returns the whole answer.
async fn raw_connect(proxy: std::net::SocketAddr, dest: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    s.write_all(format!("CONNECT {dest} HTTP/1.1\r\nHost: {dest}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_helper_leaving_is_not_a_failure_the_host_rejoins_at_once() {
    let w = world().await;
    let origin = Origin::start().await;
    let session = start_connected_host(&w.daemon, &origin).await;
    // No peer yet: the protocol is unknown, not v1.
    assert_eq!(status(&w.daemon).await["local"]["protocol_version"], 0);
    for round in 0..4 {
        let h = helper(&w, &session).await;
        fetch_until_ok(&h.proxy_url(), &origin.url("index.html")).await;
        // The helper goes away: the coordinator closes the host with 1011 "egress client disconnected".
        drop(h);
        let left = tokio::time::Instant::now();
        wait_status(&w.daemon, "the host to rejoin", |v| {
            v["coordinator"]["clientConnected"] == false
                && v["coordinator"]["hostConnected"] == true
        })
        .await;
        let v = status(&w.daemon).await;
        eprintln!("round {round}: host back after {:?}", left.elapsed());
        assert!(
            left.elapsed() < Duration::from_secs(5),
            "round {round}: {:?}",
            left.elapsed()
        );
        assert_eq!(
            v["local"]["restarts"], 0,
            "a peer leaving is not a failure: {v}"
        );
        assert_eq!(v["local"]["last_error"], "", "{v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_egress_stop_the_helper_says_the_host_side_was_stopped() {
    let w = world().await;
    let origin = Origin::start().await;
    let session = start_connected_host(&w.daemon, &origin).await;
    let h = helper(&w, &session).await;
    fetch_until_ok(&h.proxy_url(), &origin.url("index.html")).await;
    let out = w.daemon.ctl(&["egress", "stop", "--id", LEASE]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let answer = loop {
        let a = raw_connect(h.listen, &origin.addr.to_string()).await;
        if a.starts_with("HTTP/1.1 503") || tokio::time::Instant::now() > deadline {
            break a;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("host side was stopped"), "{answer}");
    assert!(!answer.contains("reconnecting"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_do_not_lock_the_helper() {
    let w = world().await;
    let origin = Origin::start().await;
    let session = start_connected_host(&w.daemon, &origin).await;
    let h = helper(&w, &session).await;
    fetch_until_ok(&h.proxy_url(), &origin.url("index.html")).await;
    // More idle connections than the helper's 512-connection cap, none sending a byte.
    let mut idle = Vec::new();
    for _ in 0..600 {
        idle.push(tokio::net::TcpStream::connect(h.listen).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = tokio::time::Instant::now();
    let (ok, body, err) = curl_via(&h.proxy_url(), &origin.url("index.html")).await;
    assert!(ok, "a real request was locked out: {err}");
    assert_eq!(body, origin.body);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // The silent ones are closed after the first-byte deadline (5 s).
    tokio::time::sleep(Duration::from_secs(7)).await;
    let mut closed = 0;
    for s in &idle {
        let mut b = [0u8; 1];
        if matches!(s.try_read(&mut b), Ok(0)) {
            closed += 1;
        }
    }
    assert!(
        closed >= 590,
        "only {closed} of 600 idle connections were closed"
    );
}
