//! systemd socket activation: `systemd-socket-activate` (systemd's own
//! activator) holds the listening socket and starts the real `crabboxd` on
//! the first connection, passing the socket as `LISTEN_FDS`. The daemon must
//! serve on it, report its path, and leave the file (systemd's) in place.

use std::{path::Path, process::Stdio, time::Duration};

use crabbox_tests::bins::bin;
use tokio::io::{AsyncBufReadExt, BufReader};

const ACTIVATOR: &str = "/usr/bin/systemd-socket-activate";

#[tokio::test]
async fn serves_on_an_activated_socket() {
    if !Path::new(ACTIVATOR).exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{ACTIVATOR} (package systemd) is required in CI"
        );
        eprintln!("SKIP: {ACTIVATOR} not installed");
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let run = home.path().join("run");
    std::fs::create_dir_all(run.join("crabbox")).unwrap();
    let socket = run.join("crabbox/activated.sock");
    let env = [
        ("HOME", home.path().to_path_buf()),
        ("XDG_CONFIG_HOME", home.path().join("config")),
        ("XDG_STATE_HOME", home.path().join("state")),
        ("XDG_RUNTIME_DIR", run.clone()),
    ];
    let mut cmd = tokio::process::Command::new(ACTIVATOR);
    cmd.arg("-l").arg(&socket);
    for (k, v) in &env {
        cmd.arg("-E").arg(format!("{k}={}", v.display()));
    }
    let mut child = cmd
        .arg(bin("crabboxd"))
        .env_clear()
        .envs(env.iter().map(|(k, v)| (*k, v.as_os_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    // The activator announces its socket on stderr before accepting; wait
    // for that line rather than polling the file system.
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let announced = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("Listening on") {
                return true;
            }
        }
        false
    })
    .await
    .unwrap();
    assert!(announced);
    // Keep draining its stderr so the daemon never blocks on a full pipe.
    let log = tokio::spawn(async move {
        let mut all = String::new();
        while let Ok(Some(line)) = lines.next_line().await {
            all.push_str(&line);
            all.push('\n');
        }
        all
    });

    // The first connection starts the daemon; the client waits for it.
    let client = crabbox_api::Client::connect(&socket).await.unwrap();
    let (status, _) = client.status().await.unwrap();
    assert_eq!(status.socket_path, socket.display().to_string());
    assert_eq!(
        status.pid,
        child.id().unwrap(),
        "the activator execs crabboxd in place"
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .unwrap()
        .unwrap();
    let log = log.await.unwrap();
    assert!(exit.success(), "{exit:?}\n{log}");
    assert!(
        socket.exists(),
        "an activated socket belongs to systemd and stays"
    );
}
