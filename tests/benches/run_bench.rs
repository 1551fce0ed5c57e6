//! `crabboxctl run` against OpenSSH, in the same process and interleaved
//! round by round (the machine is shared): `run -- true` end to end
//! (create, start, finish) vs `ssh` through a ControlMaster, p50/p99; a
//! command writing 256 MiB to stdout, to the client, vs `ssh … head`; and
//! the latency from the remote write to an `Attach` client of the run,
//! p50/p99. A real sshd on loopback is the lease; our coordinator runs
//! in-process. Needs root (sshd). Run with `cargo bench -p crabbox-tests
//! --bench run_bench` (`--profile dev` measures the dev build);
//! `CRABBOX_BENCH_ROUNDS` sets the rounds (default 40).

use std::{process::Stdio, time::Duration};

use crabbox_api::v1;
use crabbox_coordinator::testing::TestCoordinator;
use crabbox_tests::{TestDaemon, TestSshd, bins::bin};
use tokio::time::Instant;

const LEASE: &str = "cbx_00000000be0c";

fn pct(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e3
}

fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

async fn status_of(mut cmd: tokio::process::Command) -> Duration {
    let t0 = Instant::now();
    let st = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .unwrap();
    assert!(st.success(), "{cmd:?}");
    t0.elapsed()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if let Err(why) = crabbox_tests::sshd::available() {
        eprintln!("skipped: {why}");
        return;
    }
    let rounds: usize = std::env::var("CRABBOX_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let coord = TestCoordinator::start().await;
    coord
        .register_lease(&coord.shared_token, LEASE, "bench-run")
        .await
        .unwrap();
    let sshd = TestSshd::start().await;
    let d = TestDaemon::builder()
        .coordinator(&coord.base_url, &coord.shared_token)
        .env("CRABBOX_LOG", "warn")
        .toml(&sshd.target_toml(LEASE))
        .start()
        .await;
    let tmp = tempfile::tempdir().unwrap();
    let cm = tmp.path().join("cm");
    let ssh = |extra: &[&str]| {
        let mut c = tokio::process::Command::new("ssh");
        c.arg("-i")
            .arg(&sshd.client_key)
            .args([
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "LogLevel=ERROR",
                "-p",
                &sshd.addr.port().to_string(),
            ])
            .arg("-o")
            .arg(format!("ControlPath={}", cm.display()))
            .args(extra)
            .arg(format!("{}@127.0.0.1", sshd.user));
        c
    };
    let st = ssh(&["-o", "ControlMaster=yes", "-o", "ControlPersist=600", "-fN"])
        .status()
        .await
        .unwrap();
    assert!(st.success());
    let run = |args: &[&str]| {
        let mut c = d.ctl_command(&["run", "--id", LEASE, "--"]);
        c.args(args);
        c
    };
    // Warm both paths.
    status_of(run(&["true"])).await;
    let mut c = ssh(&[]);
    c.arg("true");
    status_of(c).await;

    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        ours.push(status_of(run(&["true"])).await);
        let mut c = ssh(&[]);
        c.arg("true");
        theirs.push(status_of(c).await);
    }
    ours.sort();
    theirs.sort();

    let big = (256u64 << 20).to_string();
    let (mut tp_ours, mut tp_theirs) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        tp_ours.push(status_of(run(&["head", "-c", &big, "/dev/zero"])).await);
        let mut c = ssh(&[]);
        c.args(["head", "-c", &big, "/dev/zero"]);
        tp_theirs.push(status_of(c).await);
    }
    tp_ours.sort();
    tp_theirs.sort();
    let mibs = |d: Duration| 256.0 / d.as_secs_f64();

    // Event latency: the command writes its clock; an Attach client of the
    // run reads it.
    let client = d.client().await;
    let samples = 100;
    let script = format!(
        "sleep 1; i=0; while [ $i -lt {samples} ]; do date +%s%N; i=$((i+1)); sleep 0.05; done"
    );
    let mut started = client
        .runs()
        .start_run(v1::StartRunRequest {
            lease_id: LEASE.into(),
            argv: vec!["sh".into(), "-c".into(), script],
            detach: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let Some(v1::start_run_response::Event::Started(s)) =
        started.message().await.unwrap().unwrap().event
    else {
        panic!("no start");
    };
    let mut attach = client
        .runs()
        .attach(v1::AttachRequest {
            run_id: s.run_id.clone(),
            after: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut lat = Vec::new();
    let mut pending = String::new();
    while let Some(m) = attach.message().await.unwrap() {
        match m.event {
            Some(v1::attach_event::Event::RunEvent(e)) if e.r#type == "stdout" => {
                let at = now_ns();
                pending.push_str(&e.data);
                while let Some(nl) = pending.find('\n') {
                    let line: String = pending.drain(..=nl).collect();
                    if let Ok(ts) = line.trim().parse::<u128>() {
                        lat.push(Duration::from_nanos(at.saturating_sub(ts) as u64));
                    }
                }
            }
            Some(v1::attach_event::Event::End(_)) => break,
            _ => {}
        }
    }
    lat.sort();
    let _ = bin("crabboxctl");

    println!(
        "`crabboxctl run` vs OpenSSH, {rounds} interleaved rounds, load {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split(' ')
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!();
    println!("| what | crabboxctl run | OpenSSH (ControlMaster) |");
    println!("|---|---|---|");
    println!(
        "| `true` end to end p50 / p99 | {:.1} / {:.1} ms | {:.1} / {:.1} ms |",
        pct(&ours, 0.5),
        pct(&ours, 0.99),
        pct(&theirs, 0.5),
        pct(&theirs, 0.99)
    );
    println!(
        "| 256 MiB stdout to the client, median of 3 | {:.0} MiB/s | {:.0} MiB/s |",
        mibs(tp_ours[1]),
        mibs(tp_theirs[1])
    );
    println!(
        "| remote write → Attach client p50 / p99 ({} samples) | {:.1} / {:.1} ms | |",
        lat.len(),
        pct(&lat, 0.5),
        pct(&lat, 0.99)
    );
    let _ = ssh(&["-O", "exit"]).status().await;
}
