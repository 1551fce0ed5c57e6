//! SSH fault injection: a hostile server (tests/src/fakessh.rs, russh's
//! server module) opening channels the daemon never asked for, and a
//! black-holed connection (FaultProxy between the daemon and a real sshd)
//! that keepalives must declare dead.

use std::time::Duration;

use crabbox_tests::{
    TestDaemon, TestSshd, fakessh::HostileSshd, proxy::FaultProxy, require_sshd, show, text,
};
use tokio::io::AsyncBufReadExt as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_the_server_opens_are_all_refused_and_logged() {
    let dir = tempfile::tempdir().unwrap();
    let server = HostileSshd::start(dir.path()).await;
    let key = dir.path().join("client_ed25519");
    crabbox_tests::sshd::keygen(&key);
    let toml = format!(
        "[targets.hostile]\nhost = \"127.0.0.1\"\nuser = \"nobody\"\nport = {}\nfallback_ports = []\nkey = \"{}\"\nhost_key = \"{}\"\n",
        server.addr.port(),
        key.display(),
        server.host_key
    );
    let d = TestDaemon::builder()
        .env("CRABBOX_LOG", "info,crabboxd=debug")
        .toml(&toml)
        .start()
        .await;
    let o = d.ctl(&["exec", "--id", "hostile", "--", "true"]).await;
    assert_eq!(o.status.code(), Some(0), "{}\n{}", show(&o), d.stderr());
    assert_eq!(text(&o.stdout), "ok\n");
    let verdicts = server.verdicts.lock().unwrap().clone();
    assert_eq!(
        verdicts,
        [
            "forwarded-tcpip: refused",
            "x11: refused",
            "auth-agent: refused",
            "session: refused",
            "direct-tcpip: refused",
        ],
        "{}",
        d.stderr()
    );
    let log = d.stderr();
    for kind in [
        "forwarded-tcpip",
        "x11",
        "auth-agent",
        "session",
        "direct-tcpip",
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains("refusing a channel the server opened") && l.contains(kind)),
            "{kind} not logged:\n{log}"
        );
    }
    // The connection itself is fine after the refusals.
    let o = d.ctl(&["exec", "--id", "hostile", "--", "true"]).await;
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_connection_is_declared_dead_by_keepalives_and_the_next_command_reconnects() {
    require_sshd!();
    let sshd = TestSshd::start().await;
    let proxy = FaultProxy::start(sshd.addr).await;
    let toml = format!(
        "[ssh]\nkeepalive_interval = \"1s\"\n\n[targets.box]\nhost = \"127.0.0.1\"\nuser = \"{}\"\nport = {}\nfallback_ports = []\nkey = \"{}\"\n",
        sshd.user,
        proxy.addr.port(),
        sshd.client_key.display()
    );
    let d = TestDaemon::builder()
        .env("CRABBOX_LOG", "info,crabboxd=debug")
        .toml(&toml)
        .start()
        .await;
    let o = d.ctl(&["exec", "--id", "box", "--", "true"]).await;
    assert!(o.status.success(), "{}\n{}", show(&o), d.stderr());

    let mut inflight = d
        .ctl_command(&[
            "exec",
            "--id",
            "box",
            "--",
            "sh",
            "-c",
            "echo started; exec sleep 60",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(inflight.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the command starts")
        .unwrap();
    assert_eq!(first.as_deref(), Some("started"));

    // Traffic black-holed: sockets open, nothing passes either way.
    proxy.freeze_open_connections();
    let t0 = tokio::time::Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(30), inflight.wait())
        .await
        .expect("the command in flight ends instead of hanging")
        .unwrap();
    let took = t0.elapsed();
    let mut err = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut inflight.stderr.take().unwrap(), &mut err)
        .await
        .unwrap();
    assert_eq!(status.code(), Some(255), "{err}\n{}", d.stderr());
    assert!(err.contains("lost"), "a clear error: {err}");
    // About two or three 1 s keepalive intervals, far below the default 15 s ones.
    assert!(
        took < Duration::from_secs(15),
        "declared dead after {took:?}"
    );

    // The next command reconnects (new connections pass the proxy).
    let o = d.ctl(&["exec", "--id", "box", "--", "echo", "again"]).await;
    assert_eq!(text(&o.stdout), "again\n", "{}\n{}", show(&o), d.stderr());
    let tasks = d.tasks(Some("ssh-mux")).await;
    assert_eq!(tasks[0]["labels"]["reconnects"], "1", "{tasks:?}");
}
