//! `crabboxctl run` end to end: the real daemon and CLI, our coordinator
//! in-process, and a real OpenSSH `sshd` on loopback as the lease. Output
//! byte-exact and apart, exit codes, the events and the finish at the
//! coordinator, a run that outlives its client with two attach clients
//! following it, environment forwarding that never shows in a process
//! list, a slow coordinator that never slows the command, and Ctrl-C
//! leaving nothing behind.

use std::{
    process::{Output, Stdio},
    time::Duration,
};

use crabbox_coordinator::testing::TestCoordinator;
use crabbox_tests::{TestDaemon, TestSshd, bins::bin, proxy::FaultProxy, require_sshd, text};
use tokio::{io::AsyncReadExt as _, time::Instant};

const LEASE: &str = "cbx_00000000c0de";

fn show(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status,
        text(&o.stdout[..o.stdout.len().min(4000)]),
        text(&o.stderr)
    )
}

struct Setup {
    coord: TestCoordinator,
    _sshd: TestSshd,
    d: TestDaemon,
}

/// Our coordinator with `LEASE` registered, an sshd standing in for the
/// lease (a static target of the lease's id), and a daemon using both —
/// through `proxy` when given.
async fn setup(slow: bool) -> (Setup, Option<std::sync::Arc<FaultProxy>>) {
    setup_with(slow, "").await
}

/// Like [`setup`], with extra `sshd_config` lines for the lease's sshd.
async fn setup_with(slow: bool, sshd_config: &str) -> (Setup, Option<std::sync::Arc<FaultProxy>>) {
    let coord = TestCoordinator::start().await;
    coord
        .register_lease(&coord.shared_token, LEASE, "run-crab")
        .await
        .unwrap();
    let sshd = TestSshd::start_with_config(None, 10, sshd_config).await;
    let proxy = if slow {
        Some(std::sync::Arc::new(FaultProxy::start(coord.addr).await))
    } else {
        None
    };
    let url = proxy
        .as_ref()
        .map_or(coord.base_url.clone(), |p| p.url.clone());
    let d = TestDaemon::builder()
        .env("CRABBOX_LOG", "info,crabboxd=debug")
        .coordinator(&url, &coord.shared_token)
        .toml(&sshd.target_toml(LEASE))
        .start()
        .await;
    (
        Setup {
            coord,
            _sshd: sshd,
            d,
        },
        proxy,
    )
}

async fn get(coord: &TestCoordinator, path: &str) -> serde_json::Value {
    let (status, v) = coord
        .request("GET", path, &coord.shared_token, &serde_json::Value::Null)
        .await
        .unwrap();
    assert_eq!(status, 200, "{path}: {v}");
    v
}

async fn events(coord: &TestCoordinator, run: &str) -> Vec<serde_json::Value> {
    get(coord, &format!("/v1/runs/{run}/events?after=0&limit=500")).await["events"]
        .as_array()
        .unwrap()
        .clone()
}

/// The newest run the daemon owns.
async fn newest_run(d: &TestDaemon) -> Option<serde_json::Value> {
    let v = d.ctl_json(&["run", "list", "--json"]).await;
    v.as_array().unwrap().first().cloned()
}

async fn wait_for_run(d: &TestDaemon) -> String {
    for _ in 0..200 {
        if let Some(r) = newest_run(d).await {
            return r["runId"].as_str().unwrap().to_owned();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no run appeared:\n{}", d.stderr());
}

/// The run at the coordinator once it is no longer running.
async fn finished_run(coord: &TestCoordinator, run: &str) -> serde_json::Value {
    for _ in 0..300 {
        let v = get(coord, &format!("/v1/runs/{run}")).await;
        if v["run"]["state"] != "running" {
            return v["run"].clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("run {run} did not finish");
}

fn stream_data(evs: &[serde_json::Value], stream: &str) -> String {
    evs.iter()
        .filter(|e| e["type"] == stream)
        .map(|e| e["data"].as_str().unwrap_or_default())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_is_byte_exact_and_recorded_with_the_exit_code() {
    require_sshd!();
    let (s, _) = setup(false).await;
    let d = &s.d;

    // Binary bytes, then a 3-byte character straddling the 16 KiB event
    // boundary, on stdout; stderr apart.
    let script = "printf '\\000\\001\\377\\n'; head -c 16380 /dev/zero | tr '\\000' a; printf '\\342\\202\\254tail\\n'; printf 'err\\n' >&2; exit 7";
    let o = d
        .ctl(&[
            "run", "--id", LEASE, "--label", "exact", "--", "sh", "-c", script,
        ])
        .await;
    let mut want = b"\x00\x01\xff\n".to_vec();
    want.extend(std::iter::repeat_n(b'a', 16380));
    want.extend("€tail\n".as_bytes());
    assert_eq!(o.status.code(), Some(7), "{}\n{}", show(&o), d.stderr());
    assert!(o.stdout == want, "stdout differs: {}", show(&o));
    assert_eq!(text(&o.stderr), "err\n");

    let run = newest_run(d).await.unwrap();
    let id = run["runId"].as_str().unwrap().to_owned();
    assert_eq!(run["label"], "exact");
    assert_eq!(run["finished"]["exitCode"], 7, "{run}");
    let rec = finished_run(&s.coord, &id).await;
    assert_eq!(rec["exitCode"], 7, "{rec}");
    assert_eq!(rec["state"], "failed");
    assert_eq!(rec["leaseID"], LEASE);
    let evs = events(&s.coord, &id).await;
    let kinds: Vec<&str> = evs.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"run.started"), "{kinds:?}");
    assert!(kinds.contains(&"command.started"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"command.finished"), "{kinds:?}");
    assert_eq!(evs.last().unwrap()["exitCode"], 7);
    // What the events carry is what the client printed (the binary bytes as
    // JSON text can carry them), no character split across events.
    let (got, exp) = (stream_data(&evs, "stdout"), text(&want));
    if got != exp {
        let at = got
            .chars()
            .zip(exp.chars())
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(exp.len()));
        panic!(
            "events' stdout differs at char {at}: {} vs {} bytes; got {:?}, want {:?}",
            got.len(),
            exp.len(),
            got.chars()
                .skip(at.saturating_sub(5))
                .take(20)
                .collect::<String>(),
            exp.chars()
                .skip(at.saturating_sub(5))
                .take(20)
                .collect::<String>()
        );
    }
    assert_eq!(stream_data(&evs, "stderr"), "err\n");
    assert!(
        evs.iter()
            .filter_map(|e| e["data"].as_str())
            .all(|d| d.len() <= 16 << 10 && !d.starts_with("\u{fffd}tail"))
    );
    // The log at the coordinator has the whole output.
    let log = rec["logBytes"].as_u64().unwrap();
    assert!(log >= want.len() as u64 - 4, "{rec}");

    let o = d.ctl(&["run", "--id", LEASE, "--", "true"]).await;
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let o = d
        .ctl(&["run", "--id", "run-crab", "--", "sh", "-c", "kill -TERM $$"])
        .await;
    assert_eq!(o.status.code(), Some(143), "{}", show(&o));
    let id = newest_run(d).await.unwrap()["runId"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(finished_run(&s.coord, &id).await["exitCode"], 143);

    // A run keeps its lease: the keeper ran for it and stopped after.
    assert!(d.stderr().contains("run finished"), "{}", d.stderr());
}

fn attach(d: &TestDaemon, run: &str, json: bool) -> tokio::process::Child {
    let mut cmd = tokio::process::Command::new(bin("crabboxctl"));
    cmd.arg("--socket").arg(&d.socket).arg("attach").arg(run);
    if json {
        cmd.arg("--json");
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

fn seqs(stdout: &[u8]) -> Vec<u64> {
    text(stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("end").is_none())
        .map(|v| v["seq"].as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_outlives_its_client_and_attach_clients_share_it() {
    require_sshd!();
    let (s, _) = setup(false).await;
    let d = &s.d;
    let mut starter = d
        .ctl_command(&[
            "run",
            "--id",
            LEASE,
            "--",
            "sh",
            "-c",
            "for i in 1 2 3 4 5 6 7 8; do echo line $i; sleep 0.4; done; exit 3",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let run = wait_for_run(d).await;
    let a = attach(d, &run, true);
    let b = attach(d, &run, true);
    // The starting client sees output, then dies mid-run.
    let mut out = starter.stdout.take().unwrap();
    let mut first = [0u8; 7];
    out.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"line 1\n");
    starter.kill().await.unwrap();

    let (a, b) = (
        a.wait_with_output().await.unwrap(),
        b.wait_with_output().await.unwrap(),
    );
    assert_eq!(a.status.code(), Some(3), "{}\n{}", show(&a), d.stderr());
    assert_eq!(b.status.code(), Some(3), "{}", show(&b));
    assert_eq!(seqs(&a.stdout), seqs(&b.stdout));
    let rec = finished_run(&s.coord, &run).await;
    assert_eq!(rec["exitCode"], 3, "{rec}");
    let listed = newest_run(d).await.unwrap();
    assert_eq!(listed["finished"]["exitCode"], 3, "{listed}");

    // Attaching afterwards replays it all.
    let o = attach(d, &run, false).wait_with_output().await.unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", show(&o));
    let want: String = (1..=8).map(|i| format!("line {i}\n")).collect();
    assert_eq!(text(&o.stdout), want);
}

/// Every `/proc/<pid>/cmdline` that contains `needle`.
fn cmdlines_with(needle: &str) -> Vec<String> {
    cmdlines_where(|line| line.contains(needle))
}

/// Every `/proc/<pid>/cmdline` (NULs as spaces) that `pick` accepts.
fn cmdlines_where(pick: impl Fn(&str) -> bool) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Ok(raw) = std::fs::read(entry.path().join("cmdline")) {
            let line = text(&raw).replace('\0', " ");
            if pick(&line) {
                out.push(format!("{}: {line}", entry.file_name().to_string_lossy()));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_values_arrive_without_a_command_line_and_reserved_names_hold() {
    require_sshd!();
    let (s, _) = setup(false).await;
    let d = &s.d;
    let secret = format!("v4lue-{}-zq", std::process::id());
    let child = d
        .ctl_command(&[
            "run",
            "--id",
            LEASE,
            "--allow-env",
            "MY_API_TOKEN",
            "--allow-env",
            "PFX_*",
            "--",
            "sh",
            "-c",
            "printf '%s|%s|%s|%s|%s|%s' \"$MY_API_TOKEN\" \"$CI\" \"$PFX_ONE\" \"${OUTSIDE-unset}\" \"$CRABBOX_RUN_ID\" \"$CRABBOX_LEASE_ID\"; sleep 3",
        ])
        .env("MY_API_TOKEN", &secret)
        .env("CI", "yes")
        .env("PFX_ONE", "1")
        .env("OUTSIDE", "nope")
        .env("CRABBOX_RUN_ID", "forged")
        .env("CRABBOX_LEASE_ID", "forged")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // While it runs, no process on the lease (the same machine) shows the
    // value in its command line.
    let started = Instant::now();
    let mut scans = 0;
    while started.elapsed() < Duration::from_millis(2500) {
        let hits = cmdlines_with(&secret);
        assert!(hits.is_empty(), "the value is in a command line: {hits:?}");
        scans += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(scans > 10);
    let o = child.wait_with_output().await.unwrap();
    assert!(o.status.success(), "{}\n{}", show(&o), d.stderr());
    let got = text(&o.stdout);
    let parts: Vec<&str> = got.split('|').collect();
    assert_eq!(&parts[..4], [secret.as_str(), "yes", "1", "unset"], "{got}");
    assert!(parts[4].starts_with("run_"), "{got}");
    assert_eq!(parts[5], LEASE);
    // The summary names the variables, marks the secret one, never a value.
    let err = text(&o.stderr);
    assert!(
        err.contains("env forwarding vars=CI=set,MY_API_TOKEN=set len=")
            && err.contains("secret=true"),
        "{err}"
    );
    assert!(!err.contains(&secret) && !d.stderr().contains(&secret));
    // The env file was removed.
    let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("crabbox-env."))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // CRABBOX_ENV_ALLOW replaces the default: CI no longer travels.
    let o = d
        .ctl_command(&[
            "run",
            "--id",
            LEASE,
            "--",
            "sh",
            "-c",
            "printf '%s' \"${CI-unset}\"",
        ])
        .env("CI", "yes")
        .env("CRABBOX_ENV_ALLOW", "OTHER")
        .output()
        .await
        .unwrap();
    assert_eq!(text(&o.stdout), "unset", "{}", show(&o));

    // A bare `*` is refused with a sentence.
    let o = d
        .ctl(&["run", "--id", LEASE, "--allow-env", "*", "--", "true"])
        .await;
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("bare `*`"), "{}", show(&o));
}

/// The `crabbox-env.*` files in the lease's (this machine's) temp directory.
fn env_files() -> Vec<std::ffi::OsString> {
    std::fs::read_dir("/tmp")
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().starts_with("crabbox-env."))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_keeps_the_login_umask_and_cannot_steer_the_wrapper() {
    require_sshd!();
    // A login umask other than 077, for sshd (started by this test
    // process, alone in it) to pass on to its sessions.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    let (s, _) = setup(false).await;
    let d = &s.d;
    // The login's umask, from a command that has no run wrapper.
    let o = d
        .ctl(&["exec", "--id", LEASE, "--", "sh", "-c", "umask"])
        .await;
    assert!(o.status.success(), "{}\n{}", show(&o), d.stderr());
    let login = text(&o.stdout);
    assert_eq!(login, "0022\n");

    // `f` named the wrapper's temp file once: forwarding it pointed the
    // clean-up at another file. And the wrapper's own variable is never
    // taken from the client.
    let victim_dir = tempfile::tempdir().unwrap();
    let victim = victim_dir.path().join("victim");
    std::fs::write(&victim, "keep").unwrap();
    let before = env_files();
    let o = d
        .ctl_command(&[
            "run",
            "--id",
            LEASE,
            "--allow-env",
            "f",
            "--allow-env",
            "crabbox_env_text",
            "--",
            "sh",
            "-c",
            "umask; printf '%s|%s' \"$f\" \"${crabbox_env_text-unset}\"",
        ])
        .env("f", &victim)
        .env("crabbox_env_text", "forged")
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    assert!(o.status.success(), "{}\n{}", show(&o), d.stderr());
    assert_eq!(
        text(&o.stdout),
        format!("{login}{}|unset", victim.display()),
        "{}",
        show(&o)
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
    let after = env_files();
    let new: Vec<_> = after.iter().filter(|n| !before.contains(n)).collect();
    assert!(new.is_empty(), "left behind: {new:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_leaves_nothing_of_the_command_behind() {
    require_sshd!();
    let (s, _) = setup(false).await;
    let d = &s.d;
    let marker = format!("{}", 4000 + std::process::id() % 1000);
    let script = format!("sleep {marker}1 & sleep {marker}2 & wait");
    let child = d
        .ctl_command(&["run", "--id", LEASE, "--", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    // The `sleep` processes themselves (not the command lines holding the
    // script).
    let sleeps = || cmdlines_where(|l| l.starts_with(&format!("sleep {marker}")));
    while sleeps().len() < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{}",
            d.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let o = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("crabboxctl ends after Ctrl-C")
        .unwrap();
    assert_eq!(o.status.code(), Some(130), "{}\n{}", show(&o), d.stderr());
    let left = sleeps();
    assert!(left.is_empty(), "left behind: {left:?}");
    let run = newest_run(d).await.unwrap();
    assert_eq!(run["finished"]["exitCode"], 130, "{run}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_stop_ends_the_commands_it_was_running() {
    require_sshd!();
    let (mut s, _) = setup(false).await;
    let marker = format!("{}", 5000 + std::process::id() % 1000);
    // A run and plain execs, each a command that would outlive them: sshd
    // signals nothing when a connection without a terminal drops. One
    // ignores SIGTERM, so only the SIGKILL two seconds later ends it.
    let mut clients = Vec::new();
    for (verb, script) in [
        ("run", format!("sleep {marker}1")),
        ("exec", format!("sleep {marker}2")),
        ("exec", format!("trap '' TERM; sleep {marker}3")),
    ] {
        clients.push(
            s.d.ctl_command(&[verb, "--id", LEASE, "--", "sh", "-c", &script])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
    }
    let sleeps = || cmdlines_where(|l| l.starts_with(&format!("sleep {marker}")));
    let started = Instant::now();
    while sleeps().len() < 3 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{}",
            s.d.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // `daemon stop` is a SIGTERM to the daemon.
    s.d.signal(nix::sys::signal::Signal::SIGTERM);
    let status = s.d.wait_exit().await;
    assert!(status.success(), "{status:?}\n{}", s.d.stderr());
    let left = sleeps();
    // Not left running for the next test when this one fails.
    for l in &left {
        if let Some(pid) = l.split(':').next().and_then(|p| p.parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    assert!(left.is_empty(), "left behind: {left:?}\n{}", s.d.stderr());
    drop(clients);
}

/// Peak resident memory of a process, from /proc/<pid>/status.
fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_coordinator_never_slows_the_command_and_drops_are_reported() {
    require_sshd!();
    let (s, proxy) = setup(true).await;
    let proxy = proxy.unwrap();
    let d = &s.d;
    // Many small writes (each its own event), then 10 MiB at once.
    let script = "i=0; while [ $i -lt 80 ]; do echo line $i; i=$((i+1)); sleep 0.03; done; head -c 10485760 /dev/zero | tr '\\000' x; echo; echo DONE";
    let mut child = d
        .ctl_command(&["run", "--id", LEASE, "--", "sh", "-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once the run exists, the coordinator stalls every connection the
    // daemon holds, over and over, until the command's output is all here.
    wait_for_run(d).await;
    let stalling = {
        let proxy = std::sync::Arc::clone(&proxy);
        tokio::spawn(async move {
            loop {
                proxy.freeze_open_connections();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let started = Instant::now();
    let mut out = child.stdout.take().unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    while !got.ends_with(b"DONE\n") {
        let n = out.read(&mut buf).await.unwrap();
        if n == 0 {
            let o = child.wait_with_output().await.unwrap();
            panic!("stdout ended early: {}\n{}", show(&o), d.stderr());
        }
        got.extend_from_slice(&buf[..n]);
    }
    let took = started.elapsed();
    stalling.abort();
    // 80 events at a stalled coordinator would take 160 s one by one; the
    // command (80 × 30 ms plus 10 MiB) is done long before.
    assert!(took < Duration::from_secs(40), "the command took {took:?}");
    let lines: usize = (0..80).map(|i: usize| format!("line {i}\n").len()).sum();
    assert_eq!(got.len(), lines + 10 * 1024 * 1024 + 1 + 5);
    let o = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("the run finishes")
        .unwrap();
    assert!(o.status.success(), "{}\n{}", show(&o), d.stderr());
    let err = text(&o.stderr);
    assert!(err.contains("output events of run"), "{err}");
    let run = newest_run(d).await.unwrap();
    let dropped = run["finished"]["eventsDropped"].as_u64().unwrap();
    assert!(dropped > 0, "{run}");
    let id = run["runId"].as_str().unwrap();
    let rec = finished_run(&s.coord, id).await;
    assert_eq!(rec["exitCode"], 0);
    let evs = events(&s.coord, id).await;
    assert!(
        evs.iter().any(|e| e["type"] == "output.dropped"
            && e["message"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{dropped} output events"))),
        "{evs:?}"
    );
    // Memory stays bounded: 10 MiB passed through, far less stayed.
    let hwm = vm_hwm_kib(d.pid());
    assert!(hwm < 120 * 1024, "daemon peak RSS {hwm} KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_points_the_proxy_at_a_live_helper_and_refuses_a_stale_one() {
    require_sshd!();
    // The lease's user has a home of its own (sshd's `SetEnv`), where
    // `egress start` would write its state; nothing of this machine's.
    let home = tempfile::tempdir().unwrap();
    let dir = home.path().join(".local/state/crabbox/egress");
    let current = dir.join("current.json");
    let (s, _) = setup_with(false, &format!("SetEnv HOME={}\n", home.path().display())).await;
    let d = &s.d;
    let show_env = [
        "sh",
        "-c",
        "printf '%s|%s|%s|%s' \"${HTTP_PROXY-}\" \"${https_proxy-}\" \"${ALL_PROXY-}\" \"${all_proxy-}\"",
    ];
    // Nothing runs: refused with a sentence naming `egress start`.
    let mut args = vec!["run", "--id", LEASE, "--egress", "--"];
    args.extend(show_env);
    let o = d.ctl(&args).await;
    assert!(!o.status.success(), "{}", show(&o));
    assert!(
        text(&o.stderr).contains("crabboxctl egress start"),
        "{}",
        show(&o)
    );

    // A live helper (a live pid) in current.json: the proxy is set.
    let mut helper = tokio::process::Command::new("sleep")
        .arg("60")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let proxy = "http://127.0.0.1:3128";
    let body =
        serde_json::json!({"lease": LEASE, "session": "egress_test", "endpoint": "127.0.0.1:3128",
        "proxy": proxy, "pid": helper.id().unwrap(), "version": "0.1.0", "transport": "coordinator",
        "started_at": "2026-12-02T00:00:00Z"})
        .to_string();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(&current, &body).unwrap();
    let o = d.ctl(&args).await;
    assert!(o.status.success(), "{}\n{}", show(&o), d.stderr());
    assert_eq!(text(&o.stdout), format!("{proxy}|{proxy}|{proxy}|{proxy}"));
    // Without --egress nothing is set.
    let o = d
        .ctl(&[&["run", "--id", LEASE, "--"][..], &show_env[..]].concat())
        .await;
    assert_eq!(text(&o.stdout), "|||", "{}", show(&o));

    // The helper is gone (a stale pid): refused.
    helper.kill().await.unwrap();
    let _ = helper.wait().await;
    let o = d.ctl(&args).await;
    assert!(!o.status.success(), "{}", show(&o));
    let err = text(&o.stderr);
    assert!(
        err.contains("is not running") && err.contains("egress start"),
        "{err}"
    );
}

/// The lease-keeper rows that run.
async fn live_keepers(d: &TestDaemon) -> Vec<serde_json::Value> {
    d.tasks(Some("lease-keeper"))
        .await
        .into_iter()
        .filter(|t| t["state"] == "running" || t["state"] == "starting")
        .collect()
}

async fn wait_keepers(d: &TestDaemon, want: usize, why: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let k = live_keepers(d).await;
        if k.len() == want {
            return;
        }
        assert!(Instant::now() < deadline, "{why}: {k:?}\n{}", d.stderr());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn restart_killed(
    coord: &TestCoordinator,
    d: &mut TestDaemon,
    sshd: &TestSshd,
) -> TestDaemon {
    let home = d.home().to_path_buf();
    d.signal(nix::sys::signal::Signal::SIGKILL);
    d.wait_exit().await;
    TestDaemon::builder()
        .home(&home)
        .env("CRABBOX_LOG", "info,crabboxd=debug")
        .coordinator(&coord.base_url, &coord.shared_token)
        .toml(&sshd.target_toml(LEASE))
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_holds_its_lease_without_a_keep_and_leaves_the_users_keep_alone() {
    require_sshd!();
    let coord = TestCoordinator::start().await;
    coord
        .register_lease(&coord.shared_token, LEASE, "run-crab")
        .await
        .unwrap();
    let sshd = TestSshd::start_with_config(None, 10, "").await;
    let mut d = TestDaemon::builder()
        .env("CRABBOX_LOG", "info,crabboxd=debug")
        .coordinator(&coord.base_url, &coord.shared_token)
        .toml(&sshd.target_toml(LEASE))
        .start()
        .await;

    // A run keeps its lease alive while it runs, but that is no user's
    // keep: `lease stop` says the lease is not kept.
    let run = d
        .ctl_command(&["run", "--id", LEASE, "--", "sh", "-c", "sleep 4; echo done"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_run(&d).await;
    wait_keepers(&d, 1, "the run's lease is kept while it runs").await;
    let o = d.ctl(&["lease", "stop", "--id", LEASE]).await;
    assert!(!o.status.success(), "{}", show(&o));
    assert!(text(&o.stderr).contains("not kept"), "{}", show(&o));
    assert_eq!(live_keepers(&d).await.len(), 1, "the run still holds it");

    // The user keeps the lease during the run; the run's end leaves that
    // keep running.
    d.keep_lease_fast(LEASE).await;
    let o = run.wait_with_output().await.unwrap();
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(text(&o.stdout), "done\n");
    tokio::time::sleep(Duration::from_millis(500)).await;
    wait_keepers(&d, 1, "the user's keep outlives the run").await;
    let list = d.ctl_json(&["lease", "list", "--json"]).await;
    assert_eq!(list[0]["id"], LEASE, "{list}");
    assert_eq!(
        list[0]["interval_seconds"], 5,
        "the user's keep, unchanged: {list}"
    );

    // ... and it is still persisted: a killed daemon restores it.
    // (`d` owns the home directory the restarted daemons use.)
    let mut d2 = restart_killed(&coord, &mut d, &sshd).await;
    wait_keepers(&d2, 1, "the user's keep is restored").await;
    let o = d2.ctl(&["lease", "stop", "--id", LEASE]).await;
    assert!(o.status.success(), "{}", show(&o));
    wait_keepers(&d2, 0, "stopped").await;

    // A daemon killed mid-run restores no keep the user did not make.
    let _run = d2
        .ctl_command(&["run", "--id", LEASE, "--", "sleep", "30"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_for_run(&d2).await;
    wait_keepers(&d2, 1, "the second run's lease is kept").await;
    let d3 = restart_killed(&coord, &mut d2, &sshd).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(live_keepers(&d3).await.is_empty(), "{}", d3.stderr());
    let list = d3.ctl_json(&["lease", "list", "--json"]).await;
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_ssh_check_is_not_cut_by_the_coordinator_deadline_and_a_lost_lease_finishes_the_run()
{
    require_sshd!();
    // The lease's `head` answers after 22 s: longer than a coordinator call
    // may take (20 s), well within what an SSH step may.
    let home = tempfile::tempdir().unwrap();
    let shims = home.path().join("shims");
    std::fs::create_dir_all(&shims).unwrap();
    let head = shims.join("head");
    std::fs::write(&head, "#!/bin/sh\nsleep 22\nexec /usr/bin/head \"$@\"\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&head, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let (mut s, _) = setup_with(
        false,
        &format!(
            "SetEnv HOME={} PATH={}:/usr/bin:/bin\n",
            home.path().display(),
            shims.display()
        ),
    )
    .await;
    let mut helper = tokio::process::Command::new("sleep")
        .arg("90")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let dir = home.path().join(".local/state/crabbox/egress");
    std::fs::create_dir_all(&dir).unwrap();
    let proxy = "http://127.0.0.1:3128";
    std::fs::write(
        dir.join("current.json"),
        serde_json::json!({"lease": LEASE, "session": "egress_test", "endpoint": "127.0.0.1:3128",
            "proxy": proxy, "pid": helper.id().unwrap(), "version": "0.1.0",
            "transport": "coordinator", "started_at": "2026-12-02T00:00:00Z"})
        .to_string(),
    )
    .unwrap();
    let started = Instant::now();
    let o =
        s.d.ctl(&[
            "run",
            "--id",
            LEASE,
            "--egress",
            "--",
            "sh",
            "-c",
            "printf %s \"$HTTP_PROXY\"",
        ])
        .await;
    assert!(o.status.success(), "{}\n{}", show(&o), s.d.stderr());
    assert!(started.elapsed() > Duration::from_secs(20));
    assert_eq!(text(&o.stdout), proxy);
    let run = newest_run(&s.d).await.unwrap()["runId"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(finished_run(&s.coord, &run).await["exitCode"], 0);
    helper.kill().await.unwrap();

    // The lease's sshd is gone after the run was created: the run ends
    // with 255 at the coordinator too, with the reason as an event.
    s._sshd.kill().await;
    let o = s.d.ctl(&["run", "--id", LEASE, "--", "true"]).await;
    assert_eq!(o.status.code(), Some(255), "{}", show(&o));
    let run = newest_run(&s.d).await.unwrap()["runId"]
        .as_str()
        .unwrap()
        .to_owned();
    let rec = finished_run(&s.coord, &run).await;
    assert_eq!(rec["exitCode"], 255, "{rec}");
    let evs = events(&s.coord, &run).await;
    assert!(evs.iter().any(|e| e["type"] == "run.failed"), "{evs:?}");
}

/// Every run the coordinator recorded, read from its database.
fn coordinator_runs(coord: &TestCoordinator) -> Vec<serde_json::Value> {
    let db = rusqlite::Connection::open_with_flags(
        coord.db_path(),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let mut q = db.prepare("SELECT record FROM runs").unwrap();
    q.query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(|r| serde_json::from_str(&r.unwrap()).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_during_the_start_leaves_no_run_running_and_runs_no_command() {
    require_sshd!();
    let (s, proxy) = setup(true).await;
    let proxy = proxy.unwrap();
    let d = &s.d;
    // The coordinator creates the run at once, but its answer (the run
    // record) reaches the daemon 3 s late; the client is interrupted after
    // one, before the daemon knows the run's id.
    proxy.delay("{\"run\":{", Duration::from_secs(3));
    let marker = tempfile::tempdir().unwrap();
    let ran = marker.path().join("ran");
    let mut starter = d
        .ctl_command(&["run", "--id", LEASE, "--", "touch", ran.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    starter.kill().await.unwrap();
    // The coordinator created the run; it is finished, with the reason, and
    // the command never ran. `run.failed` marks the record failed before the
    // finish that carries the exit code lands, so wait for the finish.
    let deadline = Instant::now() + Duration::from_secs(30);
    let run = loop {
        let runs = coordinator_runs(&s.coord);
        if let Some(r) = runs
            .iter()
            .find(|r| r["state"] != "running" && !r["exitCode"].is_null())
        {
            break r.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the run is not finished at the coordinator: {runs:?}\n{}",
            d.stderr()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(run["exitCode"], 255, "{run}");
    let evs = events(&s.coord, run["id"].as_str().unwrap()).await;
    assert!(
        evs.iter().any(|e| e["type"] == "run.failed"
            && e["message"]
                .as_str()
                .unwrap_or_default()
                .contains("went away")),
        "{evs:?}"
    );
    assert!(!ran.exists(), "the command of an abandoned start ran");
}
