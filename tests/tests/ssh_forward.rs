//! Local forwards, interactive shells and the SSH doctor checks end to end:
//! the real daemon, the real `crabboxctl`, real curl, and a real OpenSSH
//! `sshd` (tests/src/sshd.rs) — in a test network namespace when one can be
//! made, so the HTTP server behind the forward is reachable only through
//! the lease's sshd. Tests that need root skip with a reason when not root,
//! except in CI (`CI=true`), where they must run.

use std::{net::SocketAddr, process::Output, time::Duration};

use crabbox_tests::{TestDaemon, TestSshd, netns::TestNetns, require_sshd, show, text};

/// A lease: sshd (in a namespace when possible) and an HTTP server on the
/// lease's own loopback serving one file.
struct Lease {
    sshd: TestSshd,
    ns: Option<TestNetns>,
    http_port: u16,
    http: tokio::process::Child,
    body: String,
    _www: tempfile::TempDir,
}

impl Lease {
    async fn start(tag: u8) -> Lease {
        let ns = TestNetns::available().then(|| TestNetns::create(tag).expect("netns"));
        let sshd = match &ns {
            Some(ns) => {
                TestSshd::start_with(Some((ns, SocketAddr::from((ns.ns_ip, 22)))), 10).await
            }
            None => TestSshd::start().await,
        };
        let www = tempfile::tempdir().unwrap();
        let body = format!("hello through the forward {}\n", std::process::id());
        std::fs::write(www.path().join("hello.txt"), &body).unwrap();
        let http_port = crabbox_tests::sshd::free_port();
        let mut cmd = match &ns {
            Some(ns) => {
                let mut c = tokio::process::Command::new("ip");
                c.args(["netns", "exec", &ns.name, "python3"]);
                c
            }
            None => tokio::process::Command::new("python3"),
        };
        let http = cmd
            .args(["-m", "http.server", "--bind", "127.0.0.1", "--directory"])
            .arg(www.path())
            .arg(http_port.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 -m http.server");
        let lease = Lease {
            sshd,
            ns,
            http_port,
            http,
            body,
            _www: www,
        };
        // Ready when it answers on the lease's loopback.
        for _ in 0..200 {
            let probe = format!(
                "exec 3<>/dev/tcp/127.0.0.1/{http_port} 2>/dev/null && echo up || echo down"
            );
            let mut c = lease.on_lease(&["bash", "-c", &probe]);
            if let Ok(o) = c.output()
                && text(&o.stdout).trim() == "up"
            {
                return lease;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the lease's HTTP server did not start");
    }

    fn on_lease(&self, argv: &[&str]) -> std::process::Command {
        match &self.ns {
            Some(ns) => {
                let mut c = std::process::Command::new("ip");
                c.args(["netns", "exec", &ns.name]).args(argv);
                c
            }
            None => {
                let mut c = std::process::Command::new(argv[0]);
                c.args(&argv[1..]);
                c
            }
        }
    }

    fn remote(&self) -> String {
        format!("127.0.0.1:{}", self.http_port)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let _ = self.http.start_kill();
    }
}

async fn curl(url: &str) -> Output {
    tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "30", url])
        .output()
        .await
        .expect("run curl")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_carries_curl_to_a_server_on_the_lease_lists_and_stops() {
    require_sshd!();
    let lease = Lease::start(31).await;
    let d = TestDaemon::builder()
        .env("CRABBOX_LOG", "info,crabboxd=debug")
        .toml(&lease.sshd.target_toml("box"))
        .start()
        .await;

    // A non-loopback listener is refused with a sentence.
    let o = d
        .ctl(&[
            "forward",
            "--id",
            "box",
            "--local",
            "0.0.0.0:0",
            "--remote",
            &lease.remote(),
        ])
        .await;
    assert!(!o.status.success(), "{}", show(&o));
    assert!(text(&o.stderr).contains("loopback only"), "{}", show(&o));

    // Port 0 picks one, and the reply says which.
    let f = d
        .ctl_json(&[
            "forward",
            "--id",
            "box",
            "--remote",
            &lease.remote(),
            "--json",
        ])
        .await;
    let local = f["local"].as_str().unwrap().to_owned();
    let id = f["id"].as_str().unwrap().to_owned();
    let addr: SocketAddr = local.parse().unwrap();
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{f}");
    assert_eq!(id, format!("box:{local}"));

    let url = format!("http://{local}/hello.txt");
    let o = curl(&url).await;
    assert!(o.status.success(), "{}\n{}", show(&o), d.stderr());
    assert_eq!(text(&o.stdout), lease.body);

    // Several at once.
    let many = futures::future::join_all((0..8).map(|_| curl(&url))).await;
    for o in &many {
        assert_eq!(text(&o.stdout), lease.body, "{}", show(o));
    }

    // The list and the task table show it, with its counters.
    let list = d.ctl_json(&["forward", "list", "--json"]).await;
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["remote"], lease.remote().as_str());
    assert!(
        list[0]["total_connections"].as_u64().unwrap() >= 9,
        "{list:?}"
    );
    assert!(
        list[0]["bytes_in"].as_u64().unwrap() >= 9 * lease.body.len() as u64,
        "{list:?}"
    );
    let tasks = d.tasks(Some("ssh-forward")).await;
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    assert_eq!(tasks[0]["labels"]["local"], local.as_str(), "{tasks:?}");
    assert_eq!(tasks[0]["labels"]["remote"], lease.remote().as_str());
    assert_eq!(tasks[0]["state"], "running", "{tasks:?}");
    // The forward rides the lease's one mux.
    assert_eq!(d.tasks(Some("ssh-mux")).await.len(), 1);

    // Stop by id: the port closes.
    let o = d.ctl(&["forward", "stop", &id]).await;
    assert!(o.status.success(), "{}", show(&o));
    let list = d.ctl_json(&["forward", "list", "--json"]).await;
    assert_eq!(list.as_array().unwrap().len(), 0, "{list:?}");
    assert!(std::net::TcpStream::connect(addr).is_err());
    let o = d.ctl(&["forward", "stop", &id]).await;
    assert!(!o.status.success(), "stopping twice: {}", show(&o));
    assert!(text(&o.stderr).contains("forward list"), "{}", show(&o));

    // A chosen port, stopped by lease and address.
    let port = crabbox_tests::sshd::free_port();
    let chosen = format!("127.0.0.1:{port}");
    let f = d
        .ctl_json(&[
            "forward",
            "--id",
            "box",
            "--local",
            &chosen,
            "--remote",
            &lease.remote(),
            "--json",
        ])
        .await;
    assert_eq!(f["local"], chosen.as_str());
    let o = curl(&format!("http://{chosen}/hello.txt")).await;
    assert_eq!(text(&o.stdout), lease.body, "{}", show(&o));
    let o = d
        .ctl(&["forward", "stop", "--id", "box", "--local", &chosen])
        .await;
    assert!(o.status.success(), "{}", show(&o));
    assert!(
        d.ctl_json(&["forward", "list", "--json"])
            .await
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_survives_an_sshd_restart() {
    require_sshd!();
    let mut lease = Lease::start(32).await;
    let d = TestDaemon::builder()
        .env("CRABBOX_LOG", "info,crabboxd=debug")
        .toml(&lease.sshd.target_toml("box"))
        .start()
        .await;
    let f = d
        .ctl_json(&[
            "forward",
            "--id",
            "box",
            "--remote",
            &lease.remote(),
            "--json",
        ])
        .await;
    let url = format!("http://{}/hello.txt", f["local"].as_str().unwrap());
    let o = curl(&url).await;
    assert_eq!(text(&o.stdout), lease.body, "{}", show(&o));

    lease.sshd.restart().await;
    // The next connection waits for the mux to reconnect, then goes through.
    let o = curl(&url).await;
    assert_eq!(text(&o.stdout), lease.body, "{}\n{}", show(&o), d.stderr());
    let tasks = d.tasks(Some("ssh-forward")).await;
    assert_eq!(tasks[0]["state"], "running", "{tasks:?}");
    let mux = d.tasks(Some("ssh-mux")).await;
    assert_eq!(mux[0]["labels"]["reconnects"], "1", "{mux:?}");
}

/// Drives `crabboxctl ssh` under a pseudo-terminal (python3's `pty`): the
/// far side has a terminal, follows a resize, and the exit code comes back.
const PTY_DRIVER: &str = r#"
import os, pty, sys, time, fcntl, termios, struct, select

def setsize(fd, rows, cols):
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

pid, fd = pty.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
setsize(fd, 24, 80)
buf = b""
def expect(pat, timeout=30):
    global buf
    end = time.time() + timeout
    while pat not in buf:
        left = end - time.time()
        if left <= 0:
            sys.stdout.write("TIMEOUT waiting for %r; got %r\n" % (pat, buf))
            sys.exit(100)
        r, _, _ = select.select([fd], [], [], left)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                chunk = b""
            if not chunk:
                sys.stdout.write("EOF waiting for %r; got %r\n" % (pat, buf))
                sys.exit(101)
            buf += chunk
    i = buf.index(pat) + len(pat)
    seen, buf = buf[:i], buf[i:]
    return seen

os.write(fd, b"stty -echo; echo READY-$((40+2))\n")
expect(b"READY-42")
os.write(fd, b"tty | sed 's/^/TTY=/'\n")
expect(b"TTY=/dev/pts/")
os.write(fd, b"stty size | sed 's/^/SIZE=/'\n")
expect(b"SIZE=24 80")
setsize(fd, 40, 100)
time.sleep(0.5)
os.write(fd, b"stty size | sed 's/^/SIZE=/'\n")
expect(b"SIZE=40 100")
os.write(fd, b"exit 3\n")
_, status = os.waitpid(pid, 0)
print("EXIT=%d" % os.waitstatus_to_exitcode(status))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_shell_has_a_terminal_follows_resizes_and_passes_the_exit_code() {
    require_sshd!();
    let sshd = TestSshd::start().await;
    let d = TestDaemon::builder()
        .env("CRABBOX_LOG", "info,crabboxd=debug")
        .toml(&sshd.target_toml("box"))
        .start()
        .await;
    let script = d.layout.home.join("pty_driver.py");
    std::fs::write(&script, PTY_DRIVER).unwrap();
    let ctl = crabbox_tests::bins::bin("crabboxctl");
    let socket = d.socket.display().to_string();
    let out = tokio::process::Command::new("python3")
        .arg(&script)
        .arg(&ctl)
        .args(["--socket", &socket, "ssh", "--id", "box"])
        .env("TERM", "xterm-256color")
        .output()
        .await
        .expect("python3");
    let stdout = text(&out.stdout);
    assert!(stdout.contains("EXIT=3"), "{}\n{}", show(&out), d.stderr());

    // A command instead of a login shell, and its exit code.
    let script2 = d.layout.home.join("pty_cmd.py");
    std::fs::write(
        &script2,
        r#"
import os, pty, sys
pid, fd = pty.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
buf = b""
while True:
    try:
        c = os.read(fd, 4096)
    except OSError:
        break
    if not c:
        break
    buf += c
_, status = os.waitpid(pid, 0)
print("OUT=%r EXIT=%d" % (buf, os.waitstatus_to_exitcode(status)))
"#,
    )
    .unwrap();
    let out = tokio::process::Command::new("python3")
        .arg(&script2)
        .arg(&ctl)
        .args([
            "--socket", &socket, "ssh", "--id", "box", "--", "test", "-t", "0", "&&", "exit", "7",
        ])
        .output()
        .await
        .expect("python3");
    assert!(
        text(&out.stdout).contains("EXIT=7"),
        "{}\n{}",
        show(&out),
        d.stderr()
    );
}

fn check<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name:?} in {report}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_checks_the_key_mode_known_hosts_and_the_port() {
    use std::os::unix::fs::PermissionsExt as _;
    require_sshd!();
    let sshd = TestSshd::start().await;
    let toml = format!(
        "{}host_key = \"{}\"\n",
        sshd.target_toml("box"),
        sshd.host_key
    );
    let d = TestDaemon::builder().toml(&toml).start().await;

    // A good run.
    let o = d.ctl(&["doctor", "--id", "box", "--json"]).await;
    let report: serde_json::Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", show(&o)));
    for name in ["ssh target", "ssh key", "known_hosts", "ssh port"] {
        assert_eq!(check(&report, name)["status"], "ok", "{name}: {report}");
    }
    assert!(
        check(&report, "ssh port")["detail"]
            .as_str()
            .unwrap()
            .contains(&sshd.addr.port().to_string()),
        "{report}"
    );
    assert!(
        check(&report, "known_hosts")["detail"]
            .as_str()
            .unwrap()
            .contains("pinned"),
        "{report}"
    );

    // A key others can read fails, saying how to fix it.
    std::fs::set_permissions(&sshd.client_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = d.ctl(&["doctor", "--id", "box", "--json"]).await;
    assert_eq!(o.status.code(), Some(4), "{}", show(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let key = check(&report, "ssh key");
    assert_eq!(key["status"], "fail", "{report}");
    assert!(
        key["detail"].as_str().unwrap().contains("chmod 600"),
        "{report}"
    );
    std::fs::set_permissions(&sshd.client_key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // A pinned lease's known_hosts is put back to the one pinned entry.
    let kh = d.layout.config.join("crabbox/testboxes/box/known_hosts");
    let other = crabbox_tests::sshd::keygen(&sshd.dir().join("other"));
    let mut text_kh = std::fs::read_to_string(&kh).unwrap();
    text_kh.push_str(&format!("crabbox-lease-x {other}\n"));
    std::fs::write(&kh, text_kh).unwrap();
    let o = d.ctl(&["doctor", "--id", "box", "--json"]).await;
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(check(&report, "known_hosts")["status"], "ok", "{report}");
    assert_eq!(std::fs::read_to_string(&kh).unwrap().lines().count(), 1);

    // An unpinned lease's known_hosts with a line that is not a host key
    // is not sane, and the check says how to reset it.
    let d_tofu = TestDaemon::builder()
        .toml(&sshd.target_toml("tofu"))
        .start()
        .await;
    let o = d_tofu.ctl(&["exec", "--id", "tofu", "--", "true"]).await;
    assert!(o.status.success(), "{}", show(&o));
    let kh = d_tofu
        .layout
        .config
        .join("crabbox/testboxes/tofu/known_hosts");
    let mut text_kh = std::fs::read_to_string(&kh).unwrap();
    text_kh.push_str("garbage line\n");
    std::fs::write(&kh, text_kh).unwrap();
    std::fs::set_permissions(&kh, std::fs::Permissions::from_mode(0o600)).unwrap();
    let o = d_tofu.ctl(&["doctor", "--id", "tofu", "--json"]).await;
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let c = check(&report, "known_hosts");
    assert_eq!(c["status"], "fail", "{report}");
    assert!(c["detail"].as_str().unwrap().contains("rm "), "{report}");

    // A closed port fails.
    let closed = crabbox_tests::sshd::free_port();
    let toml = format!(
        "[targets.down]\nhost = \"127.0.0.1\"\nuser = \"{}\"\nport = {closed}\nfallback_ports = []\nkey = \"{}\"\n",
        sshd.user,
        sshd.client_key.display()
    );
    let d2 = TestDaemon::builder().toml(&toml).start().await;
    let o = d2.ctl(&["doctor", "--id", "down", "--json"]).await;
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(check(&report, "ssh port")["status"], "fail", "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_ends_with_its_lease() {
    use crabbox_coordinator::testing::TestCoordinator;
    use tokio::io::AsyncReadExt as _;
    require_sshd!();
    let sshd = TestSshd::start().await;
    let coord = TestCoordinator::start().await;
    let lease = "cbx_00000000fe01";
    coord
        .register_lease_with(&coord.shared_token, lease, &sshd.registration())
        .await
        .unwrap();
    let d = TestDaemon::builder()
        .coordinator(&coord.base_url, &coord.shared_token)
        .start()
        .await;
    let dir = d.layout.config.join("crabbox/testboxes").join(lease);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(&sshd.client_key, dir.join("id_ed25519")).unwrap();

    // Forward to the lease's own sshd: its ident line comes back.
    let remote = format!("127.0.0.1:{}", sshd.addr.port());
    let f = d
        .ctl_json(&["forward", "--id", lease, "--remote", &remote, "--json"])
        .await;
    let addr: SocketAddr = f["local"].as_str().unwrap().parse().unwrap();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut banner = vec![0u8; 8];
    tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut banner))
        .await
        .expect("the ident line through the forward")
        .unwrap();
    assert_eq!(&banner, b"SSH-2.0-");
    drop(s);

    // Lease end (a release through the daemon) ends the forward: stopped,
    // the port closed, the list empty.
    let o = d.ctl(&["lease", "release", "--id", lease]).await;
    assert!(o.status.success(), "{}", show(&o));
    d.ctl_json_until(
        &["tasks", "--json", "--kind", "ssh-forward"],
        "the forward ended",
        Duration::from_secs(20),
        |v| v["tasks"][0]["state"] == "stopped",
    )
    .await;
    assert!(std::net::TcpStream::connect(addr).is_err());
    let list = d.ctl_json(&["forward", "list", "--json"]).await;
    assert!(list.as_array().unwrap().is_empty(), "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_waiting_for_a_lost_connection_are_bounded() {
    require_sshd!();
    let mut sshd = TestSshd::start().await;
    let d = TestDaemon::builder()
        .env("CRABBOX_LOG", "info,crabboxd=debug")
        .toml(&sshd.target_toml("box"))
        .start()
        .await;
    let remote = format!("127.0.0.1:{}", sshd.addr.port());
    let f = d
        .ctl_json(&["forward", "--id", "box", "--remote", &remote, "--json"])
        .await;
    let addr: SocketAddr = f["local"].as_str().unwrap().parse().unwrap();
    // The box's sshd is replaced by a tarpit that accepts and never
    // speaks: the mux's reconnect hangs in its handshake, and new
    // connections wait for it — at most 32.
    sshd.kill().await;
    let tarpit = tokio::net::TcpListener::bind(sshd.addr).await.unwrap();
    let pit = tokio::spawn(async move {
        let mut socks = Vec::new();
        while let Ok((s, _)) = tarpit.accept().await {
            socks.push(s);
        }
    });
    d.ctl_json_until(
        &["tasks", "--json", "--kind", "ssh-mux"],
        "the mux saw the loss",
        Duration::from_secs(20),
        |v| v["tasks"][0]["labels"]["state"] != "connected",
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..48 {
        held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let list = d
        .ctl_json_until(
            &["forward", "list", "--json"],
            "48 accepted",
            Duration::from_secs(20),
            |v| v[0]["total_connections"] == 48,
        )
        .await;
    assert_eq!(list[0]["refused_connections"], 16, "{list}\n{}", d.stderr());
    drop(held);
    pit.abort();
}
