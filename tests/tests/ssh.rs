//! The SSH plane end to end: the real daemon, the real `crabboxctl`, and a
//! real OpenSSH `sshd` (tests/src/sshd.rs) on loopback or in a test network
//! namespace. Tests that need root skip with a reason when not root, except
//! in CI (`CI=true`), where they must run.

use std::time::Duration;

use crabbox_tests::{TestDaemon, TestSshd, require_sshd, show, text};

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
        .ctl(&[
            "exec",
            "--id",
            "box",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 7",
        ])
        .await;
    assert_eq!(o.status.code(), Some(7), "{}\n{}", show(&o), d.stderr());
    assert_eq!(text(&o.stdout), "out\n");
    assert_eq!(text(&o.stderr), "err\n");

    // Words reach the command unchanged.
    let o = d
        .ctl(&[
            "exec", "--id", "box", "--", "printf", "[%s]", "a b", "it's", "$HOME", "*",
        ])
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

    let o = d
        .ctl(&["exec", "--id", "box", "--cwd", "/tmp", "--", "pwd"])
        .await;
    assert_eq!(text(&o.stdout), "/tmp\n", "{}", show(&o));

    // One connection served all of them, and the task table says so.
    let tasks = d.tasks(Some("ssh-mux")).await;
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    let labels = &tasks[0]["labels"];
    assert_eq!(labels["port"], sshd.addr.port().to_string(), "{tasks:?}");
    assert_eq!(labels["reconnects"], "0", "{tasks:?}");
    let _ = Duration::ZERO;
}

/// The per-lease known_hosts of `lease` under the daemon's config dir.
fn known_hosts(d: &TestDaemon, lease: &str) -> std::path::PathBuf {
    d.layout
        .config
        .join("crabbox/testboxes")
        .join(lease)
        .join("known_hosts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_keys_pinned_exactly_or_trusted_on_first_use() {
    use std::os::unix::fs::PermissionsExt as _;
    require_sshd!();
    let sshd = TestSshd::start().await;
    let other = crabbox_tests::sshd::keygen(&sshd.dir().join("unrelated"));
    let toml = format!(
        "{}host_key = \"{}\"\n{}host_key = \"{}\"\n{}",
        sshd.target_toml("pinned"),
        sshd.host_key,
        sshd.target_toml("wrong"),
        other,
        sshd.target_toml("tofu"),
    );
    let home_dir = tempfile::tempdir().unwrap();
    let home = home_dir.path().to_path_buf();
    let d = TestDaemon::builder().home(&home).toml(&toml).start().await;

    // The pinned key is accepted.
    let o = d.ctl(&["exec", "--id", "pinned", "--", "true"]).await;
    assert!(o.status.success(), "{}\n{}", show(&o), d.stderr());

    // A wrong pin is refused with a sentence, never tried on another port.
    let o = d
        .ctl(&[
            "exec",
            "--id",
            "wrong",
            "--",
            "touch",
            "/nonexistent-should-not-run",
        ])
        .await;
    assert_eq!(o.status.code(), Some(255), "{}", show(&o));
    let err = text(&o.stderr);
    assert!(
        err.contains("does not match the key pinned for it") && err.contains("refusing to connect"),
        "{err}"
    );
    assert!(
        !err.contains(other.split(' ').nth(1).unwrap()),
        "no key material: {err}"
    );

    // Trust on first use writes the per-lease file, 0600, one entry.
    let file = known_hosts(&d, "tofu");
    assert!(!file.exists());
    let o = d.ctl(&["exec", "--id", "tofu", "--", "true"]).await;
    assert!(o.status.success(), "{}", show(&o));
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let entries = std::fs::read_to_string(&file).unwrap();
    assert_eq!(entries.lines().count(), 1, "{entries}");
    assert!(
        entries.contains(sshd.host_key.split(' ').nth(1).unwrap()),
        "{entries}"
    );

    // The same lease name now answered by another sshd (another host key),
    // for a daemon started again in the same home: refused, naming the file
    // and how to reset it.
    drop(d);
    let impostor = TestSshd::start().await;
    let toml = impostor.target_toml("tofu");
    let d2 = TestDaemon::builder().home(&home).toml(&toml).start().await;
    let o = d2
        .ctl(&[
            "exec",
            "--id",
            "tofu",
            "--",
            "touch",
            "/nonexistent-should-not-run",
        ])
        .await;
    assert_eq!(o.status.code(), Some(255), "{}", show(&o));
    let err = text(&o.stderr);
    assert!(err.contains("host key of tofu changed"), "{err}");
    assert!(
        err.contains(&file.display().to_string()),
        "names the file: {err}"
    );
    assert!(err.contains("ssh-keygen -f"), "says how to reset: {err}");
    // The recorded key was not replaced.
    assert_eq!(std::fs::read_to_string(&file).unwrap(), entries);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_key_of_another_algorithm_is_refused_as_a_changed_key() {
    require_sshd!();
    let mut sshd = TestSshd::start().await;
    let home_dir = tempfile::tempdir().unwrap();
    let home = home_dir.path().to_path_buf();
    let toml = sshd.target_toml("tofu");
    let d = TestDaemon::builder().home(&home).toml(&toml).start().await;
    // The first connection records the sshd's ed25519 key.
    let o = d.ctl(&["exec", "--id", "tofu", "--", "true"]).await;
    assert!(o.status.success(), "{}\n{}", show(&o), d.stderr());
    let file = known_hosts(&d, "tofu");
    let entries = std::fs::read_to_string(&file).unwrap();
    assert!(entries.contains(" ssh-ed25519 "), "{entries}");
    drop(d);

    // The same address now offers only an ECDSA key (as an interceptor
    // without the ed25519 key would): refused like a changed key, not
    // trusted as a first sight of an ECDSA key.
    sshd.use_ecdsa_host_key();
    sshd.restart().await;
    let marker = sshd.dir().join("should-not-run");
    let d2 = TestDaemon::builder().home(&home).toml(&toml).start().await;
    let o = d2
        .ctl(&[
            "exec",
            "--id",
            "tofu",
            "--",
            "touch",
            marker.to_str().unwrap(),
        ])
        .await;
    assert_eq!(o.status.code(), Some(255), "{}\n{}", show(&o), d2.stderr());
    let err = text(&o.stderr);
    assert!(err.contains("host key of tofu changed"), "{err}");
    assert!(err.contains("ssh-keygen -f"), "says how to reset: {err}");
    // The key refused is the ECDSA one the server offered.
    let fp = std::process::Command::new("ssh-keygen")
        .arg("-lf")
        .arg(sshd.dir().join("host_ecdsa.pub"))
        .output()
        .unwrap();
    let fp = text(&fp.stdout);
    let fp = fp.split_whitespace().nth(1).unwrap();
    assert!(fp.starts_with("SHA256:") && err.contains(fp), "{fp}: {err}");
    assert!(!marker.exists());
    // Nothing was recorded, so the next try is refused too.
    assert_eq!(std::fs::read_to_string(&file).unwrap(), entries);
    let o = d2.ctl(&["exec", "--id", "tofu", "--", "true"]).await;
    assert_eq!(o.status.code(), Some(255), "{}", show(&o));
    assert!(text(&o.stderr).contains("changed"), "{}", show(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_lease_with_pinned_key_and_per_lease_key_file() {
    use crabbox_coordinator::testing::TestCoordinator;
    require_sshd!();
    let sshd = TestSshd::start().await;
    let coord = TestCoordinator::start().await;
    let lease = "cbx_00000000bb01";
    coord
        .register_lease_with(&coord.shared_token, lease, &sshd.registration())
        .await
        .unwrap();
    let d = TestDaemon::builder()
        .coordinator(&coord.base_url, &coord.shared_token)
        .start()
        .await;
    // No key configured anywhere: without the per-lease key file there is
    // nothing to authenticate with, and the error says where it looked.
    let o = d.ctl(&["exec", "--id", lease, "--", "true"]).await;
    assert_eq!(o.status.code(), Some(255), "{}", show(&o));
    assert!(
        text(&o.stderr).contains("id_ed25519 does not exist"),
        "{}",
        show(&o)
    );
    // The per-lease key is used when present.
    let dir = d.layout.config.join("crabbox/testboxes").join(lease);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(&sshd.client_key, dir.join("id_ed25519")).unwrap();
    let o = d.ctl(&["exec", "--id", lease, "--", "echo", "hi"]).await;
    assert_eq!(text(&o.stdout), "hi\n", "{}\n{}", show(&o), d.stderr());
    // The pin was installed alone, and --print uses it.
    let kh = std::fs::read_to_string(known_hosts(&d, lease)).unwrap();
    assert_eq!(kh.lines().count(), 1, "{kh}");
    let o = d.ctl(&["ssh", "--id", lease, "--print"]).await;
    let line = text(&o.stdout);
    assert!(line.starts_with("ssh -i "), "{line}");
    assert!(line.contains("StrictHostKeyChecking=yes"), "{line}");
    assert!(line.contains(&format!("-p {}", sshd.addr.port())), "{line}");
    // The destination comes last, after `--`.
    assert!(
        line.trim_end()
            .ends_with(&format!(" -- {}@127.0.0.1", sshd.user)),
        "{line}"
    );
    // The printed command line works with OpenSSH itself (options go
    // before the `--`, a command after the destination).
    let printed: Vec<String> = line
        .split_whitespace()
        .map(|w| w.trim_matches('\'').to_owned())
        .collect();
    let out = tokio::process::Command::new(&printed[0])
        .args(["-o", "BatchMode=yes"])
        .args(&printed[1..])
        .args(["echo", "openssh"])
        .output()
        .await
        .unwrap();
    assert_eq!(text(&out.stdout), "openssh\n", "{out:?}");

    // Lease end (a release through the daemon) closes the mux, and the
    // lease is not reached again.
    let o = d.ctl(&["lease", "release", "--id", lease]).await;
    assert!(o.status.success(), "{}", show(&o));
    d.ctl_json_until(
        &["tasks", "--json", "--kind", "ssh-mux"],
        "the mux ended",
        Duration::from_secs(20),
        // An orderly end: stopped, not failed.
        |v| v["tasks"][0]["state"] == "stopped" && v["tasks"][0]["labels"]["state"] == "ended",
    )
    .await;
    let o = d.ctl(&["exec", "--id", lease, "--", "true"]).await;
    assert_eq!(o.status.code(), Some(255), "{}", show(&o));
    assert!(text(&o.stderr).contains("released"), "{}", show(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn falls_back_to_the_open_port_and_runs_a_255_command_once() {
    use crabbox_tests::netns::TestNetns;
    require_sshd!();
    // The layout: a box where 2222 is closed and 22 is open, in a
    // network namespace; loopback with a closed port when netns is missing.
    let ns = TestNetns::available().then(|| TestNetns::create(21).expect("netns"));
    let (sshd, host_port) = match &ns {
        Some(ns) => {
            let addr = std::net::SocketAddr::from((ns.ns_ip, 22));
            (TestSshd::start_with(Some((ns, addr)), 10).await, 2222)
        }
        None => (TestSshd::start().await, crabbox_tests::sshd::free_port()),
    };
    let toml = format!(
        "[targets.fb]\nhost = \"{}\"\nuser = \"{}\"\nport = {host_port}\nfallback_ports = [{}]\nkey = \"{}\"\n",
        sshd.addr.ip(),
        sshd.user,
        sshd.addr.port(),
        sshd.client_key.display()
    );
    let d = daemon_for(&toml).await;
    let counter = sshd.dir().join("runs");
    let script = format!("echo ran >> {}; exit 255", counter.display());
    let o = d
        .ctl(&["exec", "--id", "fb", "--", "sh", "-c", &script])
        .await;
    assert_eq!(o.status.code(), Some(255), "{}\n{}", show(&o), d.stderr());
    // It says so: in the log and the task table.
    let says = format!("using ssh port {} for {}", sshd.addr.port(), sshd.addr.ip());
    assert!(d.stderr().contains(&says), "{}", d.stderr());
    let tasks = d.tasks(Some("ssh-mux")).await;
    assert_eq!(
        tasks[0]["labels"]["port"],
        sshd.addr.port().to_string(),
        "{tasks:?}"
    );
    assert!(
        tasks[0]["labels"]["note"].as_str().unwrap().contains(&says),
        "{tasks:?}"
    );
    // Run exactly once, not again on another port.
    let o = d.ctl(&["exec", "--id", "fb", "--", "true"]).await;
    assert!(o.status.success());
    assert_eq!(std::fs::read_to_string(&counter).unwrap(), "ran\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sshd_restart_fails_the_command_in_flight_and_the_next_reconnects() {
    require_sshd!();
    let mut sshd = TestSshd::start().await;
    let d = daemon_for(&sshd.target_toml("box")).await;
    let o = d.ctl(&["exec", "--id", "box", "--", "true"]).await;
    assert!(o.status.success(), "{}", show(&o));
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
    // Wait until it runs, then take sshd away.
    let mut stdout = inflight.stdout.take().unwrap();
    let mut buf = [0u8; 8];
    use tokio::io::AsyncReadExt as _;
    let n = tokio::time::timeout(Duration::from_secs(20), stdout.read(&mut buf))
        .await
        .expect("the command started")
        .unwrap();
    assert_eq!(&buf[..n], b"started\n");
    sshd.kill().await;
    let mut child = inflight;
    child.stdout = Some(stdout);
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("a command in flight ends, it does not hang")
        .unwrap();
    assert_eq!(out.status.code(), Some(255), "{}", show(&out));
    assert!(
        text(&out.stderr).contains("was lost while the command ran"),
        "{}",
        show(&out)
    );
    sshd.restart().await;
    let o = d.ctl(&["exec", "--id", "box", "--", "echo", "again"]).await;
    assert_eq!(text(&o.stdout), "again\n", "{}\n{}", show(&o), d.stderr());
    let tasks = d.tasks(Some("ssh-mux")).await;
    assert_eq!(tasks[0]["labels"]["reconnects"], "1", "{tasks:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_execs_against_max_sessions_10_all_succeed() {
    require_sshd!();
    let sshd = TestSshd::start_with(None, 10).await;
    let d = daemon_for(&sshd.target_toml("box")).await;
    let mut client = d.client().await;
    let runs = (0..100).map(|i| {
        let mut ssh = client.ssh().clone();
        async move {
            use crabbox_api::v1::{
                ExecRequest, ExecStart, StdinEof, exec_request::Msg, exec_response::Event,
            };
            let reqs = vec![
                ExecRequest {
                    msg: Some(Msg::Start(ExecStart {
                        lease_id: "box".into(),
                        argv: vec![
                            "sh".into(),
                            "-c".into(),
                            "sleep 0.1; echo $0".into(),
                            i.to_string(),
                        ],
                        ..Default::default()
                    })),
                },
                ExecRequest {
                    msg: Some(Msg::StdinEof(StdinEof {})),
                },
            ];
            let mut stream = ssh.exec(futures::stream::iter(reqs)).await?.into_inner();
            let mut out = Vec::new();
            let mut code = None;
            while let Some(m) = stream.message().await? {
                match m.event {
                    Some(Event::Stdout(b)) => out.extend(b),
                    Some(Event::Exit(e)) => code = Some(e.code),
                    _ => {}
                }
            }
            Ok::<_, tonic::Status>((i, String::from_utf8(out).unwrap(), code))
        }
    });
    let results = futures::future::join_all(runs).await;
    for r in results {
        let (i, out, code) = r.unwrap_or_else(|e| panic!("{e}\n{}", d.stderr()));
        assert_eq!(out, format!("{i}\n"));
        assert_eq!(code, Some(0));
    }
    let _ = &mut client;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_ends_the_remote_process_group() {
    require_sshd!();
    let sshd = TestSshd::start().await;
    let d = daemon_for(&sshd.target_toml("box")).await;
    let marker = format!("1000.{}{}", std::process::id(), sshd.addr.port());
    // A shell with a child, so a kill of only the direct child would leave
    // the sleep behind.
    let script = format!("sleep {marker}; echo never");
    let mut child = d
        .ctl_command(&["exec", "--id", "box", "--", "sh", "-c", &script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let needle = format!("^sleep {marker}$");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !crabbox_tests::pgrep(&needle) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sleep never started\n{}",
            d.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("crabboxctl ends after Ctrl-C")
        .unwrap();
    assert_eq!(status.code(), Some(130), "{}", d.stderr());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while crabbox_tests::pgrep(&needle) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a sleep was left on the far side"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes a small tree with modes worth keeping.
fn make_tree(root: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
    std::fs::create_dir_all(root.join("empty")).unwrap();
    std::fs::write(root.join("a.txt"), "alpha\n").unwrap();
    std::fs::write(
        root.join("sub/b.bin"),
        (0..=255u8).cycle().take(100_000).collect::<Vec<_>>(),
    )
    .unwrap();
    std::fs::write(root.join("sub/deeper/run.sh"), "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(
        root.join("sub/deeper/run.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(root.join("secret"), "s\n").unwrap();
    std::fs::set_permissions(root.join("secret"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink("a.txt", root.join("link")).unwrap();
}

/// Every path under `root` with its kind, mode and contents.
fn snapshot(root: &std::path::Path) -> Vec<(String, u32, Vec<u8>)> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        let rel = p.strip_prefix(root).unwrap().display().to_string();
        let mode = meta.permissions().mode() & 0o7777;
        if meta.file_type().is_symlink() {
            out.push((
                rel,
                0,
                std::fs::read_link(&p)
                    .unwrap()
                    .display()
                    .to_string()
                    .into_bytes(),
            ));
        } else if meta.is_dir() {
            out.push((rel, mode, Vec::new()));
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        } else {
            out.push((rel, mode, std::fs::read(&p).unwrap()));
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cp_moves_a_64_mib_file_and_a_tree_both_ways_byte_identical() {
    use std::os::unix::fs::PermissionsExt as _;
    require_sshd!();
    let sshd = TestSshd::start().await;
    let d = daemon_for(&sshd.target_toml("box")).await;
    let local = tempfile::tempdir().unwrap();
    // The "remote" side is this machine too, in its own directory.
    let remote = tempfile::tempdir().unwrap();

    // 64 MiB of incompressible bytes.
    let big = local.path().join("big.bin");
    let mut data = vec![0u8; 64 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(&big, &data).unwrap();
    std::fs::set_permissions(&big, std::fs::Permissions::from_mode(0o640)).unwrap();
    let up = format!("box:{}/big.bin", remote.path().display());
    let o = d.ctl(&["cp", big.to_str().unwrap(), &up]).await;
    assert!(o.status.success(), "{}\n{}", show(&o), d.stderr());
    let there = remote.path().join("big.bin");
    assert!(
        std::fs::read(&there).unwrap() == data,
        "upload is byte-identical"
    );
    assert_eq!(
        std::fs::metadata(&there).unwrap().permissions().mode() & 0o777,
        0o640
    );
    // Nothing staged is left beside it.
    let names: Vec<_> = std::fs::read_dir(remote.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");

    let back = local.path().join("back.bin");
    let o = d.ctl(&["cp", &up, back.to_str().unwrap()]).await;
    assert!(o.status.success(), "{}", show(&o));
    assert!(
        std::fs::read(&back).unwrap() == data,
        "download is byte-identical"
    );
    assert_eq!(
        std::fs::metadata(&back).unwrap().permissions().mode() & 0o777,
        0o640
    );

    // A tree, into an existing remote directory, then back into a local one.
    let tree = local.path().join("tree");
    make_tree(&tree);
    let o = d
        .ctl(&[
            "cp",
            tree.to_str().unwrap(),
            &format!("box:{}", remote.path().display()),
        ])
        .await;
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(snapshot(&remote.path().join("tree")), snapshot(&tree));
    let down = tempfile::tempdir().unwrap();
    let o = d
        .ctl(&[
            "cp",
            &format!("box:{}/tree", remote.path().display()),
            down.path().to_str().unwrap(),
        ])
        .await;
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(snapshot(&down.path().join("tree")), snapshot(&tree));

    // A failing copy leaves nothing half-written.
    let o = d
        .ctl(&[
            "cp",
            "box:/nonexistent/x",
            down.path().join("x").to_str().unwrap(),
        ])
        .await;
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(!down.path().join("x").exists());
    let left: Vec<_> = std::fs::read_dir(down.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 1, "only the tree: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsync_runs_over_crabboxctl_rsh() {
    require_sshd!();
    if std::process::Command::new("rsync")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI must have rsync"
        );
        eprintln!("skipped: rsync is not installed");
        return;
    }
    let sshd = TestSshd::start().await;
    let d = daemon_for(&sshd.target_toml("box")).await;
    let local = tempfile::tempdir().unwrap();
    let remote = tempfile::tempdir().unwrap();
    let tree = local.path().join("tree");
    make_tree(&tree);
    let rsh = format!(
        "{} --socket {} rsh",
        crabbox_tests::bins::bin("crabboxctl").display(),
        d.socket.display()
    );
    let dst = format!("box:{}/copy/", remote.path().display());
    let out = tokio::process::Command::new("rsync")
        .args(["-a", "-e", &rsh])
        .arg(format!("{}/", tree.display()))
        .arg(&dst)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}\n{}", show(&out), d.stderr());
    assert_eq!(snapshot(&remote.path().join("copy")), snapshot(&tree));
    // And back, as a second rsync over the same connection.
    let back = local.path().join("back");
    let out = tokio::process::Command::new("rsync")
        .args(["-a", "-e", &rsh])
        .arg(&dst)
        .arg(format!("{}/", back.display()))
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(snapshot(&back), snapshot(&tree));
    let tasks = d.tasks(Some("ssh-mux")).await;
    assert_eq!(tasks[0]["labels"]["reconnects"], "0", "{tasks:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_material_or_agent_path_in_the_log_at_trace() {
    require_sshd!();
    let sshd = TestSshd::start().await;
    let d = TestDaemon::builder()
        .env("CRABBOX_LOG", "trace")
        .toml(&sshd.target_toml("box"))
        .start()
        .await;
    // An agent path that must not be logged, though it is passed along.
    let agent_dir = tempfile::tempdir().unwrap();
    let agent = agent_dir.path().join("agent-do-not-log.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&agent).unwrap();
    let o = d
        .ctl_command(&["exec", "--id", "box", "--", "echo", "ok"])
        .env("SSH_AUTH_SOCK", &agent)
        .output()
        .await
        .unwrap();
    assert_eq!(text(&o.stdout), "ok\n", "{}\n{}", show(&o), d.stderr());
    let o = d
        .ctl(&[
            "cp",
            "box:/etc/hostname",
            agent_dir.path().to_str().unwrap(),
        ])
        .await;
    assert!(o.status.success(), "{}", show(&o));
    let log = d.stderr();
    assert!(log.contains("TRACE"), "the log is at trace");
    assert!(!log.contains("agent-do-not-log"), "agent path in the log");
    // Every line of the private key's body (base64) must be absent.
    let key = std::fs::read_to_string(&sshd.client_key).unwrap();
    for line in key
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 16)
    {
        assert!(!log.contains(line), "private key material in the log");
    }
    // So must the raw key bytes, in the forms a debug print would use.
    let decoded: Vec<u8> = {
        use std::io::Read as _;
        let body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
        std::process::Command::new("base64")
            .arg("-d")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write as _;
                c.stdin.take().unwrap().write_all(body.as_bytes())?;
                let mut v = Vec::new();
                c.stdout.take().unwrap().read_to_end(&mut v)?;
                c.wait()?;
                Ok(v)
            })
            .unwrap()
    };
    // The ed25519 seed is the last 64-byte private block; check a window of it.
    let tail = &decoded[decoded.len().saturating_sub(100)..decoded.len().saturating_sub(40)];
    let as_hex: String = tail.iter().map(|b| format!("{b:02x}")).collect();
    assert!(
        !log.contains(&as_hex[..32]),
        "private key bytes (hex) in the log"
    );
    let as_list = tail[..8]
        .iter()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    assert!(
        !log.contains(&as_list),
        "private key bytes (debug list) in the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_closes_and_the_next_command_reconnects() {
    require_sshd!();
    let sshd = TestSshd::start().await;
    let toml = format!("[ssh]\nidle_close = \"3s\"\n\n{}", sshd.target_toml("box"));
    let d = daemon_for(&toml).await;
    let o = d.ctl(&["exec", "--id", "box", "--", "true"]).await;
    assert!(o.status.success(), "{}", show(&o));
    // A running command keeps the connection open past the idle time.
    let o = d.ctl(&["exec", "--id", "box", "--", "sleep", "5"]).await;
    assert!(o.status.success(), "{}", show(&o));
    let tasks = d.tasks(Some("ssh-mux")).await;
    assert_eq!(tasks[0]["labels"]["reconnects"], "0", "{tasks:?}");
    // With nothing open it closes...
    d.ctl_json_until(
        &["tasks", "--json", "--kind", "ssh-mux"],
        "the idle connection to close",
        Duration::from_secs(20),
        |v| v["tasks"][0]["labels"]["state"] == "idle",
    )
    .await;
    assert!(
        d.stderr().contains("closing the idle SSH connection"),
        "{}",
        d.stderr()
    );
    // ...and work that arrives later connects again.
    let o = d.ctl(&["exec", "--id", "box", "--", "echo", "back"]).await;
    assert_eq!(text(&o.stdout), "back\n", "{}", show(&o));
    let tasks = d.tasks(Some("ssh-mux")).await;
    assert_eq!(tasks[0]["labels"]["reconnects"], "1", "{tasks:?}");
}
