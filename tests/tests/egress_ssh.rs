//! `egress start --transport ssh` end to end with real parts: a lease
//! network namespace running a real OpenSSH sshd with NO route to any
//! coordinator (a static `[targets.box]`, no coordinator configured), the
//! real daemon, real curl and headless Chromium inside the lease, and an
//! HTTPS origin on the root namespace's loopback that only the daemon can
//! reach. The forward comes back on the same port after sshd restarts;
//! sshd settings that forbid it are named.

use std::time::Duration;

use crabbox_coordinator::testing::TestCoordinator;
use crabbox_tests::{
    TestDaemon,
    lease::TestLease,
    page::{PageOrigin, chromium, chromium_flags, loaded_marker, wait_for_dom},
    text,
};

const BOX: &str = "box";
const PROXY: &str = "http://127.0.0.1:3128";

fn show(o: &std::process::Output) -> String {
    format!(
        "exit {:?}\n{}{}",
        o.status.code(),
        text(&o.stdout),
        text(&o.stderr)
    )
}

async fn daemon_for(lease: &TestLease) -> TestDaemon {
    TestDaemon::builder()
        .toml(&lease.sshd.target_toml(BOX))
        .start()
        .await
}

async fn start_ssh_egress(d: &TestDaemon, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "egress",
        "start",
        "--id",
        BOX,
        "--transport",
        "ssh",
        "--allow",
        "127.0.0.1",
        "--allow-private",
        "--json",
    ];
    args.extend(extra);
    d.ctl(&args).await
}

/// `curl -sk [-x PROXY] URL` inside the lease: (exit code, stdout, stderr).
async fn curl(lease: &TestLease, proxy: Option<&str>, url: &str) -> (i32, String, String) {
    let mut args = vec!["curl", "-sSk", "--max-time", "15"];
    if let Some(p) = proxy {
        args.extend(["-x", p]);
    }
    args.push(url);
    let o = lease.run(&args).await;
    (
        o.status.code().unwrap_or(-1),
        text(&o.stdout),
        text(&o.stderr),
    )
}

async fn wait_for<F, Fut>(within: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_over_ssh_for_a_static_target_with_no_coordinator() {
    if let Err(why) = TestLease::available() {
        eprintln!("skipped: {why}");
        return;
    }
    let lease = TestLease::start_alone(61, "").await;
    assert!(lease.coordinator_url.is_empty());
    let d = daemon_for(&lease).await;
    let page = PageOrigin::start().await;

    // Inside the lease the origin is out of reach without egress.
    let (code, _, _) = curl(&lease, None, &page.url()).await;
    assert_ne!(code, 0);
    let (code, _, _) = curl(&lease, Some(PROXY), &page.url()).await;
    assert_ne!(code, 0, "nothing listens on the lease's 3128 yet");

    let out = start_ssh_egress(&d, &[]).await;
    assert!(out.status.success(), "{}\n{}", show(&out), d.stderr());
    let started: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(started["transport"], "ssh", "{started}");
    assert_eq!(started["endpoint"], "127.0.0.1:3128", "{started}");
    let pid = started["pid"].as_u64().unwrap() as u32;
    assert!(TestLease::alive(pid), "sshd pid {pid} of {started}");
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert!(comm.starts_with("sshd"), "pid {pid} is {comm:?}");

    // Contract 2: current.json names the transport and the live sshd pid.
    let current = lease.current().expect("current.json");
    assert_eq!(current["transport"], "ssh", "{current}");
    assert_eq!(current["proxy"], PROXY, "{current}");
    assert_eq!(current["pid"].as_u64(), Some(u64::from(pid)), "{current}");
    assert_eq!(current["session"], started["session_id"], "{current}");

    // CONNECT through the forward reaches the origin; the origin sees the
    // daemon's side (the root namespace's loopback), not the lease.
    let (code, body, err) = curl(&lease, Some(PROXY), &page.url()).await;
    assert_eq!(code, 0, "{err}\n{}", d.stderr());
    assert!(body.contains("<html"), "{body}");
    let peers = page.peers.lock().unwrap().clone();
    assert!(
        !peers.is_empty() && peers.iter().all(|p| p.ip().is_loopback()),
        "{peers:?}"
    );

    // A host outside the allowlist: 403 naming it, for CONNECT and absolute-form.
    let (code, _, err) = curl(&lease, Some(PROXY), "https://blocked.example/").await;
    assert_ne!(code, 0);
    assert!(err.contains("403"), "{err}");
    let (_, body, _) = curl(&lease, Some(PROXY), "http://blocked.example/x").await;
    assert!(
        body.contains("blocked.example is not on this egress session's allowlist")
            && body.contains("--transport ssh"),
        "{body}"
    );

    // Status and list show the transport, port, streams, bytes and hosts.
    let st = d
        .ctl_json(&["egress", "status", "--id", BOX, "--json"])
        .await;
    let local = &st["local"];
    assert_eq!(local["transport"], "ssh", "{st}");
    assert_eq!(local["port"], 3128, "{st}");
    assert_eq!(local["connected"], true, "{st}");
    assert!(local["total_streams"].as_u64().unwrap() >= 1, "{st}");
    assert!(local["rejected_streams"].as_u64().unwrap() >= 2, "{st}");
    assert!(local["bytes_in"].as_u64().unwrap() > 0, "{st}");
    assert!(
        local["recent_hosts"].to_string().contains("127.0.0.1"),
        "{st}"
    );
    assert_eq!(st["coordinator_error"], "", "{st}");
    let human = d.ctl(&["egress", "status", "--id", BOX]).await;
    assert!(human.status.success(), "{}", show(&human));
    assert!(
        text(&human.stdout).contains("transport ssh, port 3128"),
        "{}",
        show(&human)
    );
    let list = d.ctl_json(&["egress", "list", "--json"]).await;
    assert!(list.to_string().contains("\"transport\":\"ssh\""), "{list}");
    let tasks = d.tasks(Some("ssh-egress")).await;
    assert_eq!(tasks.len(), 1, "{tasks:?}");

    // sshd restarts (every connection dies): the forward is back on the
    // same port, current.json names the new sshd process, requests work.
    let mut lease = lease;
    let before = page.peers.lock().unwrap().len();
    lease.sshd.restart().await;
    let back = wait_for(Duration::from_secs(60), || async {
        lease
            .current()
            .and_then(|c| c["pid"].as_u64())
            .is_some_and(|p| p != u64::from(pid) && TestLease::alive(p as u32))
    })
    .await;
    assert!(
        back,
        "current.json was not rewritten: {:?}\n{}",
        lease.current(),
        d.stderr()
    );
    let ok = wait_for(Duration::from_secs(30), || async {
        curl(&lease, Some(PROXY), &page.url()).await.0 == 0
    })
    .await;
    assert!(ok, "no egress after the sshd restart\n{}", d.stderr());
    assert!(page.peers.lock().unwrap().len() > before);

    // Headless Chromium in the lease loads the many-resource page through it.
    if let Some(chromium) = chromium() {
        let dom = lease.path("dom.html");
        let flags = chromium_flags(&page.spki).join(" ");
        lease.shim(
            "chromium",
            &format!(
                "exec {chromium} {flags} --dump-dom \"$@\" > {} 2> {}",
                dom.display(),
                lease.path("chromium.err").display()
            ),
        );
        let out = d
            .ctl(&[
                "desktop",
                "launch",
                "--id",
                BOX,
                "--browser",
                "--url",
                &page.url(),
                "--egress",
                "local",
                "--json",
            ])
            .await;
        assert!(out.status.success(), "{}\n{}", show(&out), d.stderr());
        let dom = wait_for_dom(&dom, Duration::from_secs(90)).await;
        assert!(
            dom.contains(&loaded_marker()),
            "the page did not load through the forward: {dom}\n{}",
            std::fs::read_to_string(lease.path("chromium.err")).unwrap_or_default()
        );
        page.served_everything().unwrap();
    } else if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI must run the Chromium part: apt-get install chromium");
    } else {
        eprintln!("Chromium part skipped: needs /usr/bin/chromium");
    }

    // Stopped: the forward is gone, current.json removed, requests fail.
    let out = d.ctl(&["egress", "stop", "--id", BOX, "--json"]).await;
    assert!(out.status.success(), "{}", show(&out));
    let stopped: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stopped["state_removed"], true, "{stopped}");
    assert!(lease.current().is_none());
    let (code, _, _) = curl(&lease, Some(PROXY), &page.url()).await;
    assert_ne!(code, 0, "the page still loads with the forward stopped");
    if let Some(chromium) = chromium() {
        let alone = lease.path("after-stop");
        std::fs::create_dir_all(&alone).unwrap();
        let o = lease
            .run(&[
                "sh",
                "-c",
                &format!(
                    "{chromium} {} --proxy-server={PROXY} --user-data-dir={} --dump-dom {} 2>/dev/null",
                    chromium_flags(&page.spki).join(" "),
                    alone.display(),
                    page.url()
                ),
            ])
            .await;
        assert!(
            !text(&o.stdout).contains(&loaded_marker()),
            "{}",
            text(&o.stdout)
        );
    }
    assert!(
        d.tasks(Some("ssh-egress"))
            .await
            .iter()
            .all(|t| t["state"] != "running")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_name_the_sshd_setting_or_the_taken_port() {
    if let Err(why) = TestLease::available() {
        eprintln!("skipped: {why}");
        return;
    }
    // Forwarding switched off.
    let lease = TestLease::start_alone(62, "AllowTcpForwarding no\n").await;
    let d = daemon_for(&lease).await;
    let out = start_ssh_egress(&d, &[]).await;
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        text(&out.stderr).contains("AllowTcpForwarding"),
        "{}",
        show(&out)
    );
    assert!(lease.current().is_none());
    drop(d);
    drop(lease);

    // GatewayPorts yes binds the forward to every address: cancelled and refused.
    let lease = TestLease::start_alone(63, "GatewayPorts yes\n").await;
    let d = daemon_for(&lease).await;
    let out = start_ssh_egress(&d, &[]).await;
    assert!(!out.status.success(), "{}", show(&out));
    assert!(text(&out.stderr).contains("GatewayPorts"), "{}", show(&out));
    assert!(lease.current().is_none());
    let listening = lease.run(&["sh", "-c", "cat /proc/net/tcp"]).await;
    assert!(
        !text(&listening.stdout).contains(":0C38 00000000:0000 0A"),
        "the wildcard forward was not cancelled: {}",
        text(&listening.stdout)
    );
    drop(d);
    drop(lease);

    // The port is taken on the lease.
    let lease = TestLease::start_alone(64, "").await;
    let d = daemon_for(&lease).await;
    let mut taken = tokio::process::Command::new("ip")
        .args(["netns", "exec", &lease.ns.name, "python3", "-c"])
        .arg("import socket,time\ns=socket.socket()\ns.bind(('127.0.0.1',3130))\ns.listen()\nprint('up',flush=True)\ntime.sleep(120)")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    {
        use tokio::io::AsyncReadExt as _;
        let mut up = [0u8; 2];
        taken
            .stdout
            .as_mut()
            .unwrap()
            .read_exact(&mut up)
            .await
            .unwrap();
    }
    let out = start_ssh_egress(&d, &["--listen", "127.0.0.1:3130"]).await;
    assert!(!out.status.success(), "{}", show(&out));
    assert!(text(&out.stderr).contains("port in use"), "{}", show(&out));
    // Another port works on the same lease.
    let out = start_ssh_egress(&d, &["--listen", "127.0.0.1:3131"]).await;
    assert!(out.status.success(), "{}\n{}", show(&out), d.stderr());
    let _ = taken.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_lease_over_ssh_and_run_egress() {
    if let Err(why) = TestLease::available() {
        eprintln!("skipped: {why}");
        return;
    }
    const LEASE: &str = "cbx_00000000e513";
    let coord = TestCoordinator::start().await;
    let lease = TestLease::start(65, coord.addr).await;
    coord
        .register_lease_with(&coord.shared_token, LEASE, &lease.registration("sshegress"))
        .await
        .unwrap();
    let d = TestDaemon::builder()
        .coordinator(&coord.base_url, &coord.shared_token)
        .toml(&lease.daemon_toml())
        .start()
        .await;
    let page = PageOrigin::start().await;
    let out = d
        .ctl(&[
            "egress",
            "start",
            "--id",
            LEASE,
            "--transport",
            "ssh",
            "--allow",
            "127.0.0.1",
            "--allow-private",
            "--json",
        ])
        .await;
    assert!(out.status.success(), "{}\n{}", show(&out), d.stderr());
    // Nothing was registered at the coordinator: its status is inactive.
    let (code, status) = coord
        .request(
            "GET",
            &format!("/v1/leases/{LEASE}/egress/status"),
            &coord.shared_token,
            &serde_json::Value::Null,
        )
        .await
        .unwrap();
    assert_eq!(code, 200, "{status}");
    assert_eq!(status["active"], false, "{status}");
    assert!(d.tasks(Some("egress-host")).await.is_empty());

    // `run --egress` finds the proxy through current.json, unchanged.
    let o = d
        .ctl(&[
            "run",
            "--id",
            LEASE,
            "--egress",
            "--",
            "sh",
            "-c",
            &format!(
                "printf '%s|' \"$HTTPS_PROXY\"; curl -sk --max-time 15 {} | head -c 64",
                page.url()
            ),
        ])
        .await;
    assert!(o.status.success(), "{}\n{}", show(&o), d.stderr());
    assert!(
        text(&o.stdout).starts_with(&format!("{PROXY}|")),
        "{}",
        show(&o)
    );
    assert!(text(&o.stdout).contains("<"), "{}", show(&o));
    assert!(!page.peers.lock().unwrap().is_empty());
    let out = d.ctl(&["egress", "stop", "--id", LEASE]).await;
    assert!(out.status.success(), "{}", show(&out));
    assert!(lease.current().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_channels_for_a_port_not_requested_are_refused() {
    if let Err(why) = crabbox_tests::sshd::available() {
        eprintln!("skipped: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = crabbox_tests::fakessh::HostileSshd::start_forwarding(dir.path()).await;
    let key = dir.path().join("client_ed25519");
    crabbox_tests::sshd::keygen(&key);
    let toml = format!(
        "[targets.hostile]\nhost = \"127.0.0.1\"\nuser = \"nobody\"\nport = {}\nfallback_ports = []\nkey = \"{}\"\nhost_key = \"{}\"\n",
        server.addr.port(),
        key.display(),
        server.host_key
    );
    let d = TestDaemon::builder().toml(&toml).start().await;
    let out = d
        .ctl(&[
            "egress",
            "start",
            "--id",
            "hostile",
            "--transport",
            "ssh",
            "--allow",
            "example.com",
            "--listen",
            "127.0.0.1:3140",
        ])
        .await;
    assert!(out.status.success(), "{}\n{}", show(&out), d.stderr());
    let seen = wait_for(Duration::from_secs(10), || async {
        server.verdicts.lock().unwrap().len() >= 2
    })
    .await;
    let verdicts = server.verdicts.lock().unwrap().clone();
    assert!(seen, "{verdicts:?}\n{}", d.stderr());
    assert_eq!(
        verdicts,
        [
            "forwarded-tcpip other port: refused",
            "forwarded-tcpip requested port: ACCEPTED",
        ],
        "{}",
        d.stderr()
    );
    assert!(
        d.stderr().contains("address=\"127.0.0.1\" port=3141"),
        "{}",
        d.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_cut_by_a_hung_up_client_leaves_no_listener_behind() {
    if let Err(why) = TestLease::available() {
        eprintln!("skipped: {why}");
        return;
    }
    let lease = TestLease::start_alone(66, "").await;
    let d = daemon_for(&lease).await;
    let page = PageOrigin::start().await;
    // The client is killed at points spread over a start (connect, probe,
    // forward, verify, current.json): however far it got, the next start
    // gets the port (no forward left behind in sshd with nobody serving it).
    for cut_ms in (0..=300).step_by(10) {
        // Nothing holds the port, so the cut start can be granted it.
        // (The first time none runs, and the stop says so.)
        d.ctl(&["egress", "stop", "--id", BOX]).await;
        let mut cut = d
            .ctl_command(&[
                "egress",
                "start",
                "--id",
                BOX,
                "--transport",
                "ssh",
                "--allow",
                "127.0.0.1",
                "--allow-private",
                "--json",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(cut_ms)).await;
        let _ = cut.start_kill();
        let _ = cut.wait().await;
        let out = start_ssh_egress(&d, &[]).await;
        assert!(
            out.status.success(),
            "after a start cut at {cut_ms} ms: {}\n{}",
            show(&out),
            d.stderr()
        );
        // The cut start may still finish after this one and take over the
        // lease's egress (the last start wins): traffic flows either way.
        let ok = wait_for(Duration::from_secs(30), || async {
            curl(&lease, Some(PROXY), &page.url()).await.0 == 0
        })
        .await;
        assert!(
            ok,
            "no egress after a start cut at {cut_ms} ms\n{}",
            d.stderr()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_forbidden_after_a_reconnect_is_fatal_not_retried() {
    if let Err(why) = TestLease::available() {
        eprintln!("skipped: {why}");
        return;
    }
    let mut lease = TestLease::start_alone(67, "").await;
    let d = daemon_for(&lease).await;
    let out = start_ssh_egress(&d, &[]).await;
    assert!(out.status.success(), "{}\n{}", show(&out), d.stderr());
    // sshd comes back with forwarding switched off: asking again cannot help.
    lease.sshd.add_config("AllowTcpForwarding no\n");
    lease.sshd.restart().await;
    let failed = wait_for(Duration::from_secs(60), || async {
        d.tasks(Some("ssh-egress"))
            .await
            .iter()
            .any(|t| t["state"] == "failed")
    })
    .await;
    let tasks = d.tasks(Some("ssh-egress")).await;
    assert!(
        failed,
        "the task kept retrying a refusal no retry can change: {tasks:?}\n{}",
        d.stderr()
    );
    assert!(
        serde_json::to_string(&tasks)
            .unwrap()
            .contains("AllowTcpForwarding"),
        "{tasks:?}"
    );
}
