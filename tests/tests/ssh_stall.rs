//! Stall deadlines of the SSH mux, end to end against a real OpenSSH
//! `sshd`: a reader that stops reading (a forward's local peer, an
//! interactive `crabboxctl ssh`) while the lease writes a lot must not
//! stall the lease's one connection: another command on the same lease
//! still answers, and the stalled channel is closed after the deadline
//! (`[ssh] stall_timeout`, short here) with a warning naming it. And an
//! upload whose far side fails early ends with an error, never a hang.

use std::{net::SocketAddr, process::Stdio, time::Duration};

use crabbox_tests::{TestDaemon, TestSshd, require_sshd, show, text};
use tokio::time::Instant;

/// The stall deadline the tests configure.
const STALL: &str = "2s";
/// How long a command on the same lease may take while another channel is
/// stalled: the deadline plus a generous margin for a loaded machine; the
/// old code never answered.
const PROMPT: Duration = Duration::from_secs(20);

async fn daemon(sshd: &TestSshd) -> TestDaemon {
    TestDaemon::builder()
        .env("CRABBOX_LOG", "info,crabboxd=debug")
        .toml(&format!(
            "[ssh]\nstall_timeout = \"{STALL}\"\n\n{}",
            sshd.target_toml("box")
        ))
        .start()
        .await
}

/// `exec --id box -- echo alive` answers within [`PROMPT`].
async fn exec_answers(d: &TestDaemon, why: &str) {
    let t0 = Instant::now();
    let o = tokio::time::timeout(
        PROMPT,
        d.ctl(&["exec", "--id", "box", "--", "echo", "alive"]),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "exec on the same lease did not answer within {PROMPT:?} while {why}\n{}",
            d.stderr()
        )
    });
    assert!(o.status.success(), "{}\n{}", show(&o), d.stderr());
    assert_eq!(text(&o.stdout), "alive\n", "{}", show(&o));
    eprintln!("exec answered in {:?} while {why}", t0.elapsed());
}

/// Waits until the daemon's log has `needle`.
async fn log_has(d: &TestDaemon, needle: &str) {
    let end = Instant::now() + Duration::from_secs(30);
    while !d.stderr().contains(needle) {
        assert!(
            Instant::now() < end,
            "no {needle:?} in the daemon log:\n{}",
            d.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A TCP server on the lease that writes without end to every connection.
fn firehose() -> (tokio::process::Child, u16) {
    let port = crabbox_tests::sshd::free_port();
    let script = format!(
        r#"
import socket, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", {port}))
s.listen(16)
def pour(c):
    block = b"x" * 65536
    try:
        while True:
            c.sendall(block)
    except OSError:
        pass
while True:
    c, _ = s.accept()
    threading.Thread(target=pour, args=(c,), daemon=True).start()
"#
    );
    let child = tokio::process::Command::new("python3")
        .args(["-c", &script])
        .kill_on_drop(true)
        .spawn()
        .expect("python3");
    (child, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_whose_peer_stops_reading_is_closed_and_the_mux_keeps_answering() {
    use tokio::io::AsyncReadExt as _;
    require_sshd!();
    let sshd = TestSshd::start().await;
    let (_hose, port) = firehose();
    let d = daemon(&sshd).await;
    let f = d
        .ctl_json(&[
            "forward",
            "--id",
            "box",
            "--remote",
            &format!("127.0.0.1:{port}"),
            "--json",
        ])
        .await;
    let addr: SocketAddr = f["local"].as_str().unwrap().parse().unwrap();
    // Wait for the server to listen: a first connection reads some bytes.
    let mut probe = None;
    for _ in 0..100 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut b = [0u8; 1024];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await
            && n > 0
        {
            probe = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut stalled = probe.expect("the firehose answers through the forward");
    // From now on nobody reads it: the socket buffers fill, then the
    // channel's queue.
    tokio::time::sleep(Duration::from_secs(1)).await;
    exec_answers(&d, "a forward's local peer is not reading").await;
    log_has(&d, "the local peer stopped reading").await;
    // The stalled connection was closed: what the kernel buffered drains,
    // then it ends.
    let drained = tokio::time::timeout(Duration::from_secs(30), async {
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0u64;
        loop {
            match stalled.read(&mut buf).await {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n as u64,
            }
        }
    })
    .await
    .expect("the stalled connection is closed");
    eprintln!("the stalled connection ended after {drained} more bytes");
    // The forward itself goes on: a new connection reads again.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut b = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b))
        .await
        .expect("a new connection through the forward")
        .unwrap();
    assert!(n > 0);
    drop(s);
    let tasks = d
        .ctl_json_until(
            &["tasks", "--json", "--kind", "ssh-forward"],
            "the stalled connection is counted",
            Duration::from_secs(10),
            |v| v["tasks"][0]["labels"]["stalled"] == "1",
        )
        .await;
    assert_eq!(tasks["tasks"][0]["state"], "running", "{tasks}");
}

/// Starts `crabboxctl ssh --id box -- CMD` under a pseudo-terminal whose
/// master nobody reads (for `secs` seconds).
const PTY_NO_READ: &str = r#"
import os, pty, sys, time
pid, fd = pty.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
time.sleep(float(sys.argv[1]))
os.kill(pid, 9)
os.waitpid(pid, 0)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shell_whose_terminal_stops_reading_is_closed_and_the_mux_keeps_answering() {
    require_sshd!();
    let sshd = TestSshd::start().await;
    let d = daemon(&sshd).await;
    // Connected first, so the shell and the exec share the one mux.
    exec_answers(&d, "nothing else runs").await;
    let script = d.layout.home.join("pty_no_read.py");
    std::fs::write(&script, PTY_NO_READ).unwrap();
    let ctl = crabbox_tests::bins::bin("crabboxctl");
    let socket = d.socket.display().to_string();
    let mut driver = tokio::process::Command::new("python3")
        .arg(&script)
        .arg("60")
        .arg(&ctl)
        .args(["--socket", &socket, "ssh", "--id", "box", "--", "yes"])
        .env("TERM", "xterm-256color")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("python3");
    tokio::time::sleep(Duration::from_secs(2)).await;
    exec_answers(&d, "a shell's terminal is not reading").await;
    log_has(&d, "channel=\"a shell\"").await;
    let _ = driver.start_kill();
    let _ = driver.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_whose_far_side_fails_early_ends_with_an_error() {
    require_sshd!();
    let sshd = TestSshd::start().await;
    let d = daemon(&sshd).await;
    // Larger than the server's window, so the sender would wait for a
    // window that never opens again.
    let big = d.layout.home.join("big");
    std::fs::write(&big, vec![7u8; 16 << 20]).unwrap();
    let o = tokio::time::timeout(
        PROMPT,
        d.ctl(&["cp", "-q", big.to_str().unwrap(), "box:/no/such/dir/big"]),
    )
    .await
    .unwrap_or_else(|_| panic!("the failed upload did not end\n{}", d.stderr()));
    assert!(!o.status.success(), "{}", show(&o));
    exec_answers(&d, "after a failed upload").await;
}
