//! The SSH plane end to end: the real daemon, the real `crabboxctl`, and a
//! real OpenSSH `sshd` (tests/src/sshd.rs) on loopback or in a test network
//! namespace. Tests that need root skip with a reason when not root, except
//! in CI (`CI=true`), where they must run.

use std::{process::Output, time::Duration};

use crabbox_tests::{TestDaemon, TestSshd, require_sshd};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn show(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status,
        text(&o.stdout),
        text(&o.stderr)
    )
}

async fn daemon_for(toml: &str) -> TestDaemon {
    TestDaemon::builder()
        .env("CRABBOX_LOG", "info,crabboxd=debug")
        .toml(toml)
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_round_trip_keeps_streams_apart_and_passes_exit_codes() {
    require_sshd!();
    let sshd = TestSshd::start().await;
    let d = daemon_for(&sshd.target_toml("box")).await;

    let o = d
        .ctl(&["exec", "--id", "box", "--", "sh", "-c", "echo out; echo err >&2; exit 7"])
        .await;
    assert_eq!(o.status.code(), Some(7), "{}\n{}", show(&o), d.stderr());
    assert_eq!(text(&o.stdout), "out\n");
    assert_eq!(text(&o.stderr), "err\n");

    // Words reach the command unchanged.
    let o = d
        .ctl(&["exec", "--id", "box", "--", "printf", "[%s]", "a b", "it's", "$HOME", "*"])
        .await;
    assert_eq!(text(&o.stdout), "[a b][it's][$HOME][*]", "{}", show(&o));

    // Stdin is forwarded, and EOF arrives when it closes.
    let o = d
        .ctl_stdin(&["exec", "--id", "box", "--", "wc", "-c"], b"hello")
        .await;
    assert_eq!(text(&o.stdout).trim(), "5", "{}", show(&o));
    assert_eq!(o.status.code(), Some(0));

    // A signal is 128+n.
    let o = d
        .ctl(&["exec", "--id", "box", "--", "sh", "-c", "kill -TERM $$"])
        .await;
    assert_eq!(o.status.code(), Some(143), "{}", show(&o));

    let o = d.ctl(&["exec", "--id", "box", "--cwd", "/tmp", "--", "pwd"]).await;
    assert_eq!(text(&o.stdout), "/tmp\n", "{}", show(&o));

    // One connection served all of them, and the task table says so.
    let tasks = d.tasks(Some("ssh-mux")).await;
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    let labels = &tasks[0]["labels"];
    assert_eq!(labels["port"], sshd.addr.port().to_string(), "{tasks:?}");
    assert_eq!(labels["reconnects"], "0", "{tasks:?}");
    let _ = Duration::ZERO;
}
