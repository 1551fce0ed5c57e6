//! `egress start` / `egress stop` end to end over SSH, with real parts: the
//! "lease" is a network namespace running a real OpenSSH sshd whose only
//! route out goes to the real coordinator; the origin listens on the root
//! namespace's loopback, out of the lease's reach except through the
//! bridge; the real daemon installs and starts the real helper over its
//! SSH mux; curl inside the namespace fetches through the helper.

use std::time::Duration;

use crabbox_coordinator::testing::TestCoordinator;
use crabbox_tests::{TestDaemon, egress::Origin, lease::TestLease, text};

const LEASE: &str = "cbx_00000000e511";

struct World {
    coord: TestCoordinator,
    lease: TestLease,
    daemon: TestDaemon,
    origin: Origin,
}

async fn register(coord: &TestCoordinator, lease: &TestLease, id: &str) {
    coord
        .register_lease_with(&coord.shared_token, id, &lease.registration("egress-start"))
        .await
        .unwrap();
}

async fn daemon_in(
    coord: &TestCoordinator,
    lease: &TestLease,
    home: Option<&std::path::Path>,
) -> TestDaemon {
    let mut b = TestDaemon::builder()
        .coordinator(&coord.base_url, &coord.shared_token)
        .env("CRABBOX_LOG", "info,crabboxd=debug")
        .toml(&lease.daemon_toml());
    if let Some(h) = home {
        b = b.home(h);
    }
    b.start().await
}

async fn world(tag: u8) -> Option<World> {
    if let Err(why) = TestLease::available() {
        eprintln!("skipped: {why}");
        return None;
    }
    let coord = TestCoordinator::start().await;
    let lease = TestLease::start(tag, coord.addr).await;
    register(&coord, &lease, LEASE).await;
    let daemon = daemon_in(&coord, &lease, None).await;
    let origin = Origin::start().await;
    Some(World {
        coord,
        lease,
        daemon,
        origin,
    })
}

impl World {
    async fn start(&self, extra: &[&str]) -> std::process::Output {
        let mut args = vec![
            "egress",
            "start",
            "--id",
            LEASE,
            "--allow",
            "127.0.0.1",
            "--allow-private",
            "--coordinator",
            &self.lease.coordinator_url,
        ];
        args.extend(extra);
        self.daemon.ctl(&args).await
    }

    async fn start_json(&self) -> serde_json::Value {
        let out = self.start(&["--json"]).await;
        assert!(
            out.status.success(),
            "egress start: {}{}\n{}",
            text(&out.stdout),
            text(&out.stderr),
            self.daemon.stderr()
        );
        serde_json::from_slice(&out.stdout).expect("egress start --json prints JSON")
    }

    /// Fetches the origin from inside the lease through the helper, until
    /// it works or `within` passed.
    async fn fetch_until_ok(&self, path: &str, within: Duration) -> String {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let (ok, body, err) = self
                .lease
                .curl(Some("http://127.0.0.1:3128"), &self.origin.url(path))
                .await;
            if ok {
                return body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no fetch through the helper within {within:?}: {err}\n{}",
                self.daemon.stderr()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn helper_pid(&self) -> u32 {
        self.lease.current().expect("current.json")["pid"]
            .as_u64()
            .unwrap() as u32
    }
}

/// Every `egress_` + 32 hex (the ticket shape) in `text`.
fn tickets_in(text: &str) -> Vec<String> {
    let mut out = vec![];
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("egress_") {
        let start = i + pos + "egress_".len();
        let hex = b[start..]
            .iter()
            .take_while(|c| c.is_ascii_hexdigit())
            .count();
        if hex == 32 {
            out.push(text[start - 7..start + 32].to_owned());
        }
        i = start;
    }
    out
}

/// Tickets in any process's command line or environment.
fn tickets_in_proc() -> Vec<String> {
    let mut found = vec![];
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if !entry
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|c| c.is_ascii_digit())
        {
            continue;
        }
        for f in ["cmdline", "environ"] {
            let raw = std::fs::read(entry.path().join(f)).unwrap_or_default();
            for t in tickets_in(&String::from_utf8_lossy(&raw)) {
                found.push(format!("{}/{f}: {t}", entry.path().display()));
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_start_installs_the_helper_over_ssh_and_the_lease_fetches_through_it() {
    let Some(w) = world(41).await else { return };
    // Without a helper the origin is out of the lease's reach.
    let (ok, _, _) = w.lease.curl(None, &w.origin.url("direct")).await;
    assert!(
        !ok,
        "the lease must not reach the root namespace's loopback"
    );
    let (ok, _, _) = w
        .lease
        .curl(Some("http://127.0.0.1:3128"), &w.origin.url("none"))
        .await;
    assert!(!ok, "no proxy listens before egress start");

    // Cold: the helper is uploaded.
    let v = w.start_json().await;
    assert_eq!(v["lease_id"], LEASE, "{v}");
    assert_eq!(v["uploaded"], true, "{v}");
    assert_eq!(v["arch"], std::env::consts::ARCH, "{v}");
    assert_eq!(v["endpoint"], "127.0.0.1:3128", "{v}");
    assert_eq!(v["proxy"], "http://127.0.0.1:3128", "{v}");
    assert_eq!(v["steps"].as_array().unwrap().len(), 6, "{v}");
    let session = v["session_id"].as_str().unwrap().to_owned();
    let helper = v["helper_path"].as_str().unwrap();
    assert!(
        helper.starts_with(&format!("{}/.cache/crabbox/bin/", w.lease.home.display())),
        "{helper}"
    );
    // Content-addressed, in private directories.
    let mode = |p: &std::path::Path| {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    };
    let helper_path = std::path::Path::new(helper);
    assert_eq!(mode(helper_path.parent().unwrap()), 0o700);
    assert_eq!(mode(&w.lease.path(".cache/crabbox")), 0o700);

    // The fetch leaves from the daemon's side.
    let body = w.fetch_until_ok("through", Duration::from_secs(20)).await;
    assert_eq!(body, w.origin.body);
    let peers = w.origin.peers.lock().unwrap().clone();
    assert!(
        !peers.is_empty() && peers.iter().all(|p| p.ip().is_loopback()),
        "{peers:?}"
    );

    // The lease-local state says where the proxy is (0600).
    let current = w.lease.current().expect("current.json");
    assert_eq!(current["lease"], LEASE);
    assert_eq!(current["session"], session.as_str());
    assert_eq!(current["endpoint"], "127.0.0.1:3128");
    assert_eq!(current["proxy"], "http://127.0.0.1:3128");
    assert_eq!(current["transport"], "coordinator");
    assert_eq!(current["version"], env!("CARGO_PKG_VERSION"));
    let pid = current["pid"].as_u64().unwrap() as u32;
    assert!(TestLease::alive(pid));
    assert_eq!(mode(&w.lease.egress_state().join("current.json")), 0o600);
    assert_eq!(mode(&w.lease.egress_state().join(&session)), 0o700);

    // The pair is supervised, and `egress status` shows the helper.
    let st = w
        .daemon
        .ctl_json_until(
            &["egress", "status", "--id", LEASE, "--json"],
            "the helper in egress status",
            Duration::from_secs(10),
            |v| v["local"]["helper"]["status"] == "bridged",
        )
        .await;
    let h = &st["local"]["helper"];
    assert_eq!(h["listen"], "127.0.0.1:3128", "{st}");
    assert_eq!(h["pid"], pid, "{st}");
    assert_eq!(h["state"], "running", "{st}");
    let tasks = w.daemon.tasks(Some("egress-remote-client")).await;
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    assert_eq!(tasks[0]["labels"]["session"], session.as_str(), "{tasks:?}");

    // No ticket in any process's argv or environment, or in a log (the
    // scanner finds one where there is one).
    assert_eq!(
        tickets_in("x egress_0123456789abcdef0123456789abcdef y egress_0123456789ab"),
        vec!["egress_0123456789abcdef0123456789abcdef"]
    );
    assert!(tickets_in_proc().is_empty(), "{:?}", tickets_in_proc());
    assert!(tickets_in(&w.daemon.stderr()).is_empty());
    let helper_log =
        std::fs::read_to_string(w.lease.egress_state().join(&session).join("helper.log")).unwrap();
    assert!(
        helper_log.contains("egress client: connected"),
        "{helper_log}"
    );
    assert!(tickets_in(&helper_log).is_empty(), "{helper_log}");
    // Nor the coordinator URL in the helper's command line.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(
        !text(&cmdline).contains(&w.lease.coordinator_url),
        "{}",
        text(&cmdline)
    );

    // Warm: the cached helper is used, and the new session replaces the
    // old pair as one transition.
    let out = w.start(&["--daemon"]).await;
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    // The reference's --daemon is accepted, and said to be what the daemon always does.
    assert_eq!(
        text(&out.stderr).matches("--daemon is accepted").count(),
        1,
        "{}",
        text(&out.stderr)
    );
    let human = text(&out.stdout);
    assert!(
        human.contains("listening: none public; outbound WebSocket only"),
        "{human}"
    );
    assert!(
        human.contains(&format!("crabboxctl egress stop --id {LEASE}")),
        "{human}"
    );
    assert!(
        human.contains(&format!("crabboxctl egress status --id {LEASE}")),
        "{human}"
    );
    let current2 = w.lease.current().unwrap();
    assert_ne!(current2["session"], session.as_str());
    assert!(
        !TestLease::alive(pid),
        "the replaced session's helper was stopped"
    );
    w.fetch_until_ok("warm", Duration::from_secs(20)).await;
    let v = w.start_json().await;
    assert_eq!(v["uploaded"], false, "{v}");
    w.fetch_until_ok("warm2", Duration::from_secs(20)).await;

    // Stop: the helper, its state, the tasks; then again, idempotent.
    let pid = w.helper_pid();
    let out = w.daemon.ctl(&["egress", "stop", "--id", LEASE]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(&format!("pid={pid}")),
        "{}",
        text(&out.stdout)
    );
    assert!(!TestLease::alive(pid));
    assert!(w.lease.current().is_none());
    let remote = w.daemon.tasks(Some("egress-remote-client")).await;
    assert!(remote.iter().all(|t| t["state"] == "stopped"), "{remote:?}");
    let (ok, _, _) = w
        .lease
        .curl(Some("http://127.0.0.1:3128"), &w.origin.url("after"))
        .await;
    assert!(!ok);
    let out = w.daemon.ctl(&["egress", "stop", "--id", LEASE]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("nothing to stop"),
        "{}",
        text(&out.stdout)
    );
    drop(w.coord);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_start_refuses_a_public_listen_and_an_empty_allowlist_before_touching_the_lease() {
    let Some(w) = world(42).await else { return };
    let out = w
        .daemon
        .ctl(&[
            "egress",
            "start",
            "--id",
            LEASE,
            "--allow",
            "127.0.0.1",
            "--listen",
            "0.0.0.0:3128",
        ])
        .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("loopback"),
        "{}",
        text(&out.stderr)
    );
    let out = w.daemon.ctl(&["egress", "start", "--id", LEASE]).await;
    assert!(!out.status.success());
    assert!(!w.lease.path(".cache").exists(), "nothing was installed");
    assert!(
        w.daemon.tasks(Some("ssh-mux")).await.is_empty(),
        "SSH was never used"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_of_another_cpu_without_a_helper_is_refused_naming_the_arch_and_the_directory() {
    let Some(w) = world(43).await else { return };
    w.lease.shim(
        "uname",
        "if [ \"$1\" = -m ]; then echo aarch64; else exec /bin/uname \"$@\"; fi",
    );
    let out = w.start(&[]).await;
    assert!(!out.status.success(), "{}", text(&out.stdout));
    let err = text(&out.stderr);
    assert!(err.contains("aarch64"), "{err}");
    let dir = w
        .daemon
        .layout
        .config
        .join("crabbox/helpers/aarch64/crabbox-egress-client");
    assert!(err.contains(&dir.display().to_string()), "{err}");
    assert!(
        !w.lease.path(".cache/crabbox/bin").exists(),
        "nothing was uploaded"
    );
    assert!(
        w.daemon.tasks(Some("egress-host")).await.is_empty(),
        "no session was minted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_ends_our_helper_and_leaves_another_sessions_helper_running() {
    let Some(w) = world(44).await else { return };
    w.start_json().await;
    let ours = w.helper_pid();
    // Another session's helper on the same lease (another tool, another
    // operator): started by hand, waiting for its ticket on port 3129.
    let bin = std::fs::read_link(format!("/proc/{ours}/exe")).unwrap();
    let other_dir = w.lease.path("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let mut other = tokio::process::Command::new("ip")
        .args(["netns", "exec", &w.lease.ns.name])
        .arg(&bin)
        .args([
            "--coordinator",
            &w.lease.coordinator_url,
            "--id",
            LEASE,
            "--session",
            "egress_0ther0ther0",
        ])
        .args(["--listen", "127.0.0.1:3129", "--control"])
        .arg(other_dir.join("control.sock"))
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let other_pid = other.id().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !other_dir.join("control.sock").exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the other helper did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = w.daemon.ctl(&["egress", "stop", "--id", LEASE]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!TestLease::alive(ours), "our helper was stopped");
    assert!(
        TestLease::alive(other_pid),
        "another session's helper keeps running"
    );
    assert!(other.try_wait().unwrap().is_none());
}

async fn wait_gone(pid: u32, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    while TestLease::alive(pid) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "pid {pid} still runs after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pair_heals_after_a_killed_helper_a_daemon_restart_and_a_coordinator_restart() {
    let Some(mut w) = world(45).await else { return };
    w.start_json().await;
    w.fetch_until_ok("first", Duration::from_secs(20)).await;

    // A killed helper is back on the same port, with no command typed.
    let pid = w.helper_pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_gone(pid, Duration::from_secs(10)).await;
    w.fetch_until_ok("after-kill", Duration::from_secs(40))
        .await;
    let pid2 = w.helper_pid();
    assert_ne!(pid2, pid, "a new helper runs");
    assert!(TestLease::alive(pid2));
    let tasks = w.daemon.tasks(Some("egress-remote-client")).await;
    assert_eq!(tasks[0]["state"], "running", "{tasks:?}");

    // A daemon restart: the same session comes back and the same helper
    // is re-ticketed (browser settings unchanged).
    let session = w.lease.current().unwrap()["session"].clone();
    w.daemon.signal(nix::sys::signal::Signal::SIGTERM);
    w.daemon.wait_exit().await;
    let home = w.daemon.home().to_path_buf();
    let restarted = daemon_in(&w.coord, &w.lease, Some(&home)).await;
    let _old = std::mem::replace(&mut w.daemon, restarted);
    w.fetch_until_ok("after-daemon-restart", Duration::from_secs(40))
        .await;
    assert_eq!(w.lease.current().unwrap()["session"], session);
    assert_eq!(w.helper_pid(), pid2, "the helper kept running");
    assert!(TestLease::alive(pid2));

    // A coordinator restart: both ends come back by themselves.
    let World {
        coord,
        lease,
        daemon,
        origin,
    } = w;
    let coord = coord.restart().await;
    let w = World {
        coord,
        lease,
        daemon,
        origin,
    };
    w.fetch_until_ok("after-coordinator-restart", Duration::from_secs(60))
        .await;
    assert_eq!(w.lease.current().unwrap()["session"], session);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_release_ends_the_host_the_remote_client_and_the_helper() {
    let Some(w) = world(46).await else { return };
    w.start_json().await;
    w.fetch_until_ok("first", Duration::from_secs(20)).await;
    let pid = w.helper_pid();
    let out = w.daemon.ctl(&["lease", "release", "--id", LEASE]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_gone(pid, Duration::from_secs(30)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let host = w.daemon.tasks(Some("egress-host")).await;
        let remote = w.daemon.tasks(Some("egress-remote-client")).await;
        let ended = |ts: &[serde_json::Value]| {
            ts.iter()
                .all(|t| t["state"] == "stopped" || t["state"] == "failed")
        };
        if ended(&host) && ended(&remote) && !remote.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "tasks still run after the release: {host:?} {remote:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_install_leaves_the_running_pair_working() {
    let Some(w) = world(48).await else { return };
    let v = w.start_json().await;
    w.fetch_until_ok("before", Duration::from_secs(20)).await;
    let pid = w.helper_pid();
    // The lease now reports a CPU there is no helper for: the new start
    // fails before any ticket is minted.
    w.lease.shim(
        "uname",
        "if [ \"$1\" = -m ]; then echo aarch64; else exec /bin/uname \"$@\"; fi",
    );
    let out = w.start(&[]).await;
    assert!(!out.status.success(), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("aarch64"),
        "{}",
        text(&out.stderr)
    );
    // The running pair is untouched: same session, same helper, fetches work.
    assert_eq!(w.lease.current().unwrap()["session"], v["session_id"]);
    assert_eq!(w.helper_pid(), pid);
    assert!(TestLease::alive(pid));
    let body = w.fetch_until_ok("after", Duration::from_secs(5)).await;
    assert_eq!(body, w.origin.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_helper_that_cannot_start_leaves_the_running_pair_working() {
    let Some(w) = world(49).await else { return };
    let v = w.start_json().await;
    w.fetch_until_ok("before", Duration::from_secs(20)).await;
    // The next helper's start fails once, after the install and version
    // check passed (the lease's `setsid` refuses one time).
    let marker = w.lease.path(".setsid-broke-once");
    w.lease.shim(
        "setsid",
        &format!(
            "if [ ! -e '{m}' ]; then : > '{m}'; echo 'setsid: broken once' >&2; exit 1; fi\nexec /usr/bin/setsid \"$@\"",
            m = marker.display()
        ),
    );
    let out = w.start(&[]).await;
    assert!(
        !out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(marker.exists(), "the new helper's start was the one broken");
    // The running pair carries on: its session is alive, its helper is back
    // on the same port, and the lease fetches through it.
    let body = w.fetch_until_ok("after", Duration::from_secs(40)).await;
    assert_eq!(body, w.origin.body);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if w.lease
            .current()
            .is_some_and(|c| c["session"] == v["session_id"])
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "current.json: {:?}\n{}",
            w.lease.current(),
            w.daemon.stderr()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let st = w
        .daemon
        .ctl_json(&["egress", "status", "--id", LEASE, "--json"])
        .await;
    assert_eq!(st["local"]["session_id"], v["session_id"], "{st}");
    let tasks = w.daemon.tasks(Some("egress-remote-client")).await;
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    assert_eq!(tasks[0]["state"], "running", "{tasks:?}");
    assert_eq!(tasks[0]["labels"]["session"], v["session_id"], "{tasks:?}");
}

/// The pids of helpers installed under this lease's home.
fn helpers_of(lease: &TestLease) -> Vec<String> {
    let home = lease.home.display().to_string();
    let mut out = vec![];
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let raw = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let line = text(&raw).replace('\0', " ");
        if line.contains(&home) && line.contains("crabbox-egress-client --") {
            out.push(format!("{}: {line}", entry.file_name().to_string_lossy()));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_cut_off_mid_way_leaves_no_helper_and_the_next_start_takes_the_same_port() {
    let Some(w) = world(50).await else { return };
    // The lease cannot reach this coordinator URL: the helper starts and
    // listens, but its bridge never comes up, so the readiness wait fails.
    let mut ctl = w
        .daemon
        .ctl_command(&[
            "egress",
            "start",
            "--id",
            LEASE,
            "--allow",
            "127.0.0.1",
            "--allow-private",
            "--coordinator",
            "http://127.0.0.1:9",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // The client hangs up while the daemon waits for the bridge.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while helpers_of(&w.lease).is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no helper started:\n{}",
            w.daemon.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ctl.kill().await.unwrap();
    // The start still ends, undoes itself, and says so in the task table.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let row = loop {
        let tasks = w.daemon.tasks(Some("egress-remote-client")).await;
        if let Some(t) = tasks.iter().find(|t| t["state"] == "failed") {
            break t.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no failed start in the task table: {tasks:?}\n{}",
            w.daemon.stderr()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let err = row["last_error"].as_str().unwrap_or_default();
    assert!(
        err.contains("bridge did not come up")
            && err.contains(&format!("crabboxctl egress start --id {LEASE}")),
        "{row}"
    );
    assert!(
        helpers_of(&w.lease).is_empty(),
        "{:?}",
        helpers_of(&w.lease)
    );
    assert!(
        w.daemon
            .tasks(Some("egress-host"))
            .await
            .iter()
            .all(|t| t["state"] == "stopped" || t["state"] == "failed"),
        "no host bridge is left running"
    );
    // The next start takes the same port and works.
    let v = w.start_json().await;
    assert_eq!(v["endpoint"], "127.0.0.1:3128", "{v}");
    w.fetch_until_ok("after", Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_mint_holds_up_no_listing() {
    const LONE: &str = "cbx_00000000e512";
    let coord = TestCoordinator::start().await;
    coord
        .register_lease(&coord.shared_token, LONE, "egress-locks")
        .await
        .unwrap();
    let proxy = std::sync::Arc::new(crabbox_tests::proxy::FaultProxy::start(coord.addr).await);
    let d = TestDaemon::builder()
        .coordinator(&proxy.url, &coord.shared_token)
        .start()
        .await;
    d.egress_host_private(LONE, "127.0.0.1").await;
    // From now on the coordinator never answers: every connection to it
    // is frozen soon after it opens.
    let freezer = {
        let proxy = std::sync::Arc::clone(&proxy);
        tokio::spawn(async move {
            loop {
                proxy.freeze_open_connections();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    // A replacement's mint hangs on the coordinator ...
    let mut replacing = d
        .ctl_command(&[
            "egress",
            "host",
            "--id",
            LONE,
            "--allow",
            "127.0.0.2",
            "--allow-private",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        replacing.try_wait().unwrap().is_none(),
        "the mint is still waiting"
    );
    // ... while listing the bridges answers at once.
    let t0 = tokio::time::Instant::now();
    let list = d.ctl_json(&["egress", "list", "--json"]).await;
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(5), "egress list took {took:?}");
    assert!(list.to_string().contains(LONE), "{list}");
    freezer.abort();
    let _ = replacing.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pair_whose_session_was_replaced_elsewhere_frees_its_port() {
    let Some(w) = world(51).await else { return };
    w.start_json().await;
    w.fetch_until_ok("before", Duration::from_secs(20)).await;
    // Another tool mints a host ticket for a new session of this lease:
    // the coordinator tombstones ours, which can never bridge again.
    let (status, v) = w
        .coord
        .request(
            "POST",
            &format!("/v1/leases/{LEASE}/egress/ticket"),
            &w.coord.shared_token,
            &serde_json::json!({"role": "host"}),
        )
        .await
        .unwrap();
    assert!((200..300).contains(&status), "{status} {v}");
    // The remote client gives up on the dead session and stops its
    // helper, rather than leaving one that holds the port.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    loop {
        let tasks = w.daemon.tasks(Some("egress-remote-client")).await;
        if tasks.iter().all(|t| t["state"] == "failed") && helpers_of(&w.lease).is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{tasks:?} {:?}\n{}",
            helpers_of(&w.lease),
            w.daemon.stderr()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The next start takes the same port.
    let v = w.start_json().await;
    assert_eq!(v["endpoint"], "127.0.0.1:3128", "{v}");
    w.fetch_until_ok("after", Duration::from_secs(20)).await;
}
