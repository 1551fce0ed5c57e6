//! Streaming SSH requests whose client dies: the real daemon, a real
//! `crabboxctl` killed with SIGKILL (so it cannot say goodbye), and a real
//! OpenSSH `sshd` on loopback. The
//! daemon must notice the Unix-socket connection closing, drop the request,
//! and free what it held on the lease: an upload's channel is closed (the
//! remote `cat` ends and its `.crabbox-cp.*` temp file is removed, its
//! session freed), a command's process group is killed.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use crabbox_tests::{TestDaemon, TestSshd, require_sshd};
use tokio::time::Instant;

/// How long the far side may take to be cleaned up after the client died:
/// generous for a loaded machine; the old code held it for good.
const CLEANUP: Duration = Duration::from_secs(15);

async fn daemon(sshd: &TestSshd) -> TestDaemon {
    TestDaemon::builder()
        .env("CRABBOX_LOG", "info,crabboxd=debug")
        .toml(&sshd.target_toml("box"))
        .start()
        .await
}

fn sigkill(child: &tokio::process::Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().expect("running") as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

/// SIGKILLs every client, reaps them, and returns when they were all dead.
async fn sigkill_all(children: &mut [tokio::process::Child]) -> Instant {
    for c in children.iter() {
        sigkill(c);
    }
    for c in children.iter_mut() {
        let _ = c.wait().await;
    }
    Instant::now()
}

/// The bytes of the files under `p` (a file or a directory).
fn bytes_under(p: &Path) -> u64 {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::read_dir(p)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| bytes_under(&e.path()))
            .sum(),
        Ok(m) => m.len(),
        Err(_) => 0,
    }
}

/// The `.crabbox-cp.*` temp files and directories in `dir`, with the bytes
/// they hold.
fn staged(dir: &Path) -> Vec<(PathBuf, u64)> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".crabbox-cp."))
        .map(|e| (e.path(), bytes_under(&e.path())))
        .collect()
}

/// Ten commands at once on the lease (the daemon runs eight at a time) all
/// succeed within `within`: the sessions abandoned requests held are free
/// again.
async fn ten_execs_succeed(d: &TestDaemon, within: Duration) {
    let t0 = Instant::now();
    let runs = (0..10).map(|i| {
        let i = i.to_string();
        async move {
            d.ctl(&[
                "exec",
                "--id",
                "box",
                "--",
                "sh",
                "-c",
                "sleep 1; echo $0",
                &i,
            ])
            .await
        }
    });
    let outs = tokio::time::timeout(within, futures::future::join_all(runs))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "ten concurrent execs did not finish within {within:?}: a session is still held\n{}",
                d.stderr()
            )
        });
    for (i, o) in outs.iter().enumerate() {
        assert!(
            o.status.success() && String::from_utf8_lossy(&o.stdout) == format!("{i}\n"),
            "exec {i}: {:?}\n{}\n{}",
            o.status,
            String::from_utf8_lossy(&o.stderr),
            d.stderr()
        );
    }
    // A session still held would have made the daemon wait for one.
    assert!(
        !d.stderr().contains("the server refused a channel"),
        "a command had to wait for a session\n{}",
        d.stderr()
    );
    eprintln!("ten execs took {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_copies_leave_no_temp_files_and_free_their_sessions() {
    require_sshd!();
    // The default MaxSessions of 10, the daemon's 8 commands at a time, and
    // three abandoned copies: while they hold their sessions, 8 commands
    // cannot all have one.
    let sshd = TestSshd::start().await;
    let d = daemon(&sshd).await;
    let local = tempfile::tempdir().unwrap();
    let remote = tempfile::tempdir().unwrap();
    let down = tempfile::tempdir().unwrap();
    // Large enough to be mid-transfer for seconds; sparse, so they cost no
    // disk (the receiving side writes what it gets until it is cut off).
    let sparse = |p: &Path| std::fs::File::create(p).unwrap().set_len(4 << 30).unwrap();
    let big = local.path().join("big.bin");
    sparse(&big);
    // The tar writer keeps holes as holes: the tree's file is written out.
    let tree = local.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    {
        use std::io::Write as _;
        let mut f = std::io::BufWriter::new(std::fs::File::create(tree.join("inner.bin")).unwrap());
        let block = vec![0x5a_u8; 1 << 20];
        for _ in 0..512 {
            f.write_all(&block).unwrap();
        }
        f.flush().unwrap();
    }
    sparse(&remote.path().join("src.bin"));
    let r = remote.path().display();
    let copies = [
        // A file upload (raw bytes into `cat`), a tree upload (a tar
        // stream), and a download (a remote `tar`).
        [big.display().to_string(), format!("box:{r}/up.bin")],
        [tree.display().to_string(), format!("box:{r}/")],
        [
            format!("box:{r}/src.bin"),
            down.path().display().to_string(),
        ],
    ];
    let mut children: Vec<_> = copies
        .iter()
        .map(|[src, dst]| {
            d.ctl_command(&["cp", src, dst])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    // Wait until bytes are arriving at each destination.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let moving = |dir: &Path| staged(dir).iter().filter(|(_, n)| *n >= 4 << 20).count();
        if moving(remote.path()) == 2 && moving(down.path()) == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the copies never got going: {:?} {:?}\n{}\nsshd:\n{}",
            staged(remote.path()),
            staged(down.path()),
            d.stderr(),
            sshd.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // What is staged on the far side is the user's alone while it is
    // written (the local file's mode is set only once it is complete).
    for (p, _) in staged(remote.path()) {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{} is mode {mode:o}", p.display());
    }
    let killed = sigkill_all(&mut children).await;

    // The far side sees each channel close: its `cat` or `tar` ends and
    // the temp files go, on both sides.
    let deadline = killed + CLEANUP;
    loop {
        let left: Vec<_> = staged(remote.path())
            .into_iter()
            .chain(staged(down.path()))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{CLEANUP:?} after the clients died temp files are still there: {left:?}\n{}\nsshd:\n{}",
            d.stderr(),
            sshd.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("temp files gone {:?} after the kill", killed.elapsed());
    // Nothing was moved into place: no copy finished on its own.
    for p in [
        remote.path().join("up.bin"),
        remote.path().join("tree"),
        down.path().join("src.bin"),
    ] {
        assert!(!p.exists(), "an abandoned copy completed: {}", p.display());
    }
    // sshd freed their sessions (its log says so), and they are usable
    // again.
    loop {
        let log = sshd.log_text();
        let (opened, closed) = (
            log.matches("Starting session:").count(),
            log.matches("Close session:").count(),
        );
        if opened == 3 && closed == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{CLEANUP:?} after the clients died sshd still holds {} of their sessions\n{}\nsshd:\n{log}",
            opened.saturating_sub(closed),
            d.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("sessions freed {:?} after the kill", killed.elapsed());
    ten_execs_succeed(&d, Duration::from_secs(12)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_exec_client_leaves_no_process_on_the_far_side() {
    require_sshd!();
    let sshd = TestSshd::start().await;
    let d = daemon(&sshd).await;
    let marker = format!("1000.{}{}", std::process::id(), sshd.addr.port());
    // A shell with a child, so a kill of only the direct child would leave
    // the sleep behind.
    let script = format!("sleep {marker}; echo never");
    let mut child = d
        .ctl_command(&["exec", "--id", "box", "--", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let needle = format!("^sleep {marker}$");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !crabbox_tests::pgrep(&needle) {
        assert!(
            Instant::now() < deadline,
            "the sleep never started\n{}",
            d.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // SIGKILL: the client sends no cancel; only the closed connection says
    // it is gone.
    sigkill(&child);
    let _ = child.wait().await;
    let killed = Instant::now();
    let deadline = killed + CLEANUP;
    while crabbox_tests::pgrep(&needle) {
        assert!(
            Instant::now() < deadline,
            "{CLEANUP:?} after the client died its sleep still runs on the far side\n{}",
            d.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("remote command gone {:?} after the kill", killed.elapsed());
}

/// How many shells the shell test abandons at once. Whether the old code
/// closed an abandoned shell raced with its reading its client's end (the
/// request is aborted when its response stream is dropped); with several
/// at once some lose the race.
const SHELLS: usize = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_shell_clients_leave_no_process_on_the_far_side() {
    require_sshd!();
    let sshd = TestSshd::start().await;
    let d = daemon(&sshd).await;
    let markers: Vec<String> = (0..SHELLS)
        .map(|i| format!("100{i}.{}{}", std::process::id(), sshd.addr.port()))
        .collect();
    // Under a PTY, closing the channel hangs the terminal up, which ends
    // the shell and its child.
    let mut children: Vec<_> = markers
        .iter()
        .map(|m| {
            let script = format!("sh -c 'sleep {m}; echo never'");
            d.ctl_command(&["ssh", "--id", "box", "--", &script])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let needles: Vec<String> = markers.iter().map(|m| format!("^sleep {m}$")).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !needles.iter().all(|n| crabbox_tests::pgrep(n)) {
        assert!(
            Instant::now() < deadline,
            "the sleeps never started\n{}",
            d.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let killed = sigkill_all(&mut children).await;
    let deadline = killed + CLEANUP;
    loop {
        let left: Vec<_> = needles.iter().filter(|n| crabbox_tests::pgrep(n)).collect();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{CLEANUP:?} after the clients died {} of {SHELLS} shells still run on the far side\n{}\nsshd:\n{}",
            left.len(),
            d.stderr(),
            sshd.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("remote shells gone {:?} after the kill", killed.elapsed());
}

/// The number of entries under `p`, recursively.
fn entries_under(p: &Path) -> usize {
    std::fs::read_dir(p)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            1 + if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                entries_under(&e.path())
            } else {
                0
            }
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_upload_cut_off_between_entries_is_never_installed() {
    require_sshd!();
    let sshd = TestSshd::start().await;
    let d = daemon(&sshd).await;
    let local = tempfile::tempdir().unwrap();
    let remote = tempfile::tempdir().unwrap();
    // Many small files: a cut often falls on an entry boundary, where
    // `tar -x` sees a complete archive and exits 0.
    let tree = local.path().join("tree");
    let t = tree.clone();
    tokio::task::spawn_blocking(move || {
        for i in 0..40 {
            let dir = t.join(format!("d{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            for j in 0..500 {
                std::fs::write(dir.join(format!("f{j}")), [b'x'; 1000]).unwrap();
            }
        }
    })
    .await
    .unwrap();
    let dst = format!("box:{}/", remote.path().display());
    for round in 0..3 {
        let mut child = d
            .ctl_command(&["cp", tree.to_str().unwrap(), &dst])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let n: usize = staged(remote.path())
                .iter()
                .map(|(p, _)| entries_under(p))
                .sum();
            if n >= 500 * (round + 1) {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the upload ended before it was cut off ({status}); make the tree larger");
            }
            assert!(
                Instant::now() < deadline,
                "the upload never got going\n{}",
                d.stderr()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        sigkill(&child);
        let _ = child.wait().await;
        let deadline = Instant::now() + CLEANUP;
        while !staged(remote.path()).is_empty() {
            assert!(
                Instant::now() < deadline,
                "the cut-off upload's staging directory stayed\n{}",
                d.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            !remote.path().join("tree").exists(),
            "round {round}: a cut-off tree upload was installed at the destination ({} entries)",
            entries_under(&remote.path().join("tree"))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_exec_client_never_gives_the_command_a_clean_end_of_input() {
    require_sshd!();
    let sshd = TestSshd::start().await;
    let d = daemon(&sshd).await;
    let dir = tempfile::tempdir().unwrap();
    let mark = dir.path().join("took-it-for-complete");
    // A command that acts once its input ends: a cut-off input must not
    // look complete to it.
    let script = format!("cat >/dev/null; touch {}", mark.display());
    let mut child = d
        .ctl_command(&["exec", "--id", "box", "--", "sh", "-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    {
        use tokio::io::AsyncWriteExt as _;
        stdin.write_all(b"some of the input\n").await.unwrap();
        stdin.flush().await.unwrap();
    }
    let needle = format!("touch {}", mark.display());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !crabbox_tests::pgrep(&regex_escape(&needle)) {
        assert!(
            Instant::now() < deadline,
            "the command never started\n{}",
            d.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The test keeps its end of the pipe open: only the kill ends the
    // client.
    sigkill(&child);
    let _ = child.wait().await;
    let deadline = Instant::now() + CLEANUP;
    while crabbox_tests::pgrep(&regex_escape(&needle)) {
        assert!(
            Instant::now() < deadline,
            "the command still runs after its client died\n{}",
            d.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !mark.exists(),
        "the command saw a clean end of its input after its client was killed"
    );
    drop(stdin);
}

/// `s` with the characters `pgrep -f` would read as a pattern escaped.
fn regex_escape(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '/' || c == ' ' || c == '-' || c == '_' {
                c.to_string()
            } else {
                format!("\\{c}")
            }
        })
        .collect()
}
