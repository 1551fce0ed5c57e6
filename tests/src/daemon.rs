//! `TestDaemon`: the real `crabboxd` binary in a throwaway home, with its
//! own runtime, config and state directories, talking on a temp socket.

use std::{
    collections::BTreeMap,
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    time::Duration,
};

use tokio::{net::UnixDatagram, process::Child};

use crate::bins::bin;

/// How long a daemon gets to become ready or to exit. Generous, because
/// CI machines are slow and shared; a healthy daemon takes milliseconds.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Builds a [`TestDaemon`].
#[derive(Debug, Default)]
pub struct TestDaemonBuilder {
    env: BTreeMap<String, String>,
    args: Vec<String>,
    toml: Option<String>,
    yaml: Option<String>,
    home: Option<PathBuf>,
    nofile: Option<(u64, u64)>,
}

impl TestDaemonBuilder {
    /// Runs the daemon under `prlimit --nofile=SOFT:HARD` (same pid).
    pub fn nofile(mut self, soft: u64, hard: u64) -> Self {
        self.nofile = Some((soft, hard));
        self
    }

    /// Sets an environment variable for the daemon.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }

    /// Adds a command-line argument.
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Points the daemon at a coordinator with a token (both through the
    /// environment, as a user would).
    pub fn coordinator(self, url: &str, token: &str) -> Self {
        self.env("CRABBOX_COORDINATOR", url)
            .env("CRABBOX_COORDINATOR_TOKEN", token)
    }

    /// Writes `crabboxd.toml` (mode 0600) before starting.
    pub fn toml(mut self, text: &str) -> Self {
        self.toml = Some(text.into());
        self
    }

    /// Writes the reference CLI's `config.yaml` (mode 0600) before starting.
    pub fn yaml(mut self, text: &str) -> Self {
        self.yaml = Some(text.into());
        self
    }

    /// Uses an existing home (same socket, config and state) instead of a
    /// fresh one, e.g. to start a second daemon beside a first, or to
    /// restart one. The directory is not removed when this daemon drops.
    pub fn home(mut self, home: &Path) -> Self {
        self.home = Some(home.to_path_buf());
        self
    }

    /// Spawns the daemon without waiting for it to be ready.
    pub fn spawn(self) -> TestDaemon {
        let (owned, home) = match self.home {
            Some(path) => (None, path),
            None => {
                let t = tempfile::tempdir().expect("tempdir");
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        let layout = Layout::new(&home);
        fs::create_dir_all(layout.config.join("crabbox")).unwrap();
        fs::create_dir_all(&layout.runtime).unwrap();
        fs::set_permissions(&layout.runtime, fs::Permissions::from_mode(0o700)).unwrap();
        for (name, text) in [("crabboxd.toml", &self.toml), ("config.yaml", &self.yaml)] {
            if let Some(text) = text {
                let p = layout.config.join("crabbox").join(name);
                fs::write(&p, text).unwrap();
                fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
            }
        }
        // Each daemon gets its own notify socket and stderr file, so two
        // daemons in one home do not read each other's notifications.
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let notify = layout.home.join(format!("notify-{n}.sock"));
        let stderr_path = layout.home.join(format!("crabboxd-{n}.stderr"));
        let notify_rx = UnixDatagram::bind(&notify).expect("bind notify socket");
        let stderr = fs::File::create(&stderr_path).unwrap();

        let mut cmd = match self.nofile {
            // prlimit execs the daemon, so the pid stays the daemon's.
            Some((soft, hard)) => {
                let mut c = tokio::process::Command::new("prlimit");
                c.arg(format!("--nofile={soft}:{hard}"))
                    .arg("--")
                    .arg(bin("crabboxd"));
                c
            }
            None => tokio::process::Command::new(bin("crabboxd")),
        };
        cmd.args(&self.args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", &layout.home)
            .env("XDG_CONFIG_HOME", &layout.config)
            .env("XDG_STATE_HOME", &layout.state)
            .env("XDG_DATA_HOME", layout.home.join("data"))
            .env("XDG_RUNTIME_DIR", &layout.runtime)
            .env("NOTIFY_SOCKET", &notify)
            .env("CRABBOX_LOG", "info")
            .envs(&self.env)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true);
        let child = cmd.spawn().expect("spawn crabboxd");
        TestDaemon {
            socket: layout.runtime.join("crabbox").join("crabboxd.sock"),
            layout,
            _owned: owned,
            stderr_path,
            child,
            notify: notify_rx,
        }
    }

    /// Spawns the daemon and waits until it reports READY=1.
    pub async fn start(self) -> TestDaemon {
        let mut d = self.spawn();
        d.wait_ready().await;
        d
    }
}

/// The directories of a test home.
#[derive(Debug, Clone)]
pub struct Layout {
    /// `$HOME`.
    pub home: PathBuf,
    /// `$XDG_CONFIG_HOME`.
    pub config: PathBuf,
    /// `$XDG_STATE_HOME`.
    pub state: PathBuf,
    /// `$XDG_RUNTIME_DIR`.
    pub runtime: PathBuf,
}

impl Layout {
    fn new(home: &Path) -> Self {
        Layout {
            home: home.to_path_buf(),
            config: home.join("config"),
            state: home.join("state"),
            runtime: home.join("run"),
        }
    }
}

/// A running `crabboxd` process. Dropping it kills the process.
#[derive(Debug)]
pub struct TestDaemon {
    /// The API socket (the default path under the test's runtime dir).
    pub socket: PathBuf,
    /// The test home's directories.
    pub layout: Layout,
    _owned: Option<tempfile::TempDir>,
    stderr_path: PathBuf,
    child: Child,
    notify: UnixDatagram,
}

impl TestDaemon {
    /// A builder.
    pub fn builder() -> TestDaemonBuilder {
        TestDaemonBuilder::default()
    }

    /// Starts a daemon with default settings.
    pub async fn start() -> TestDaemon {
        Self::builder().start().await
    }

    /// Waits for the daemon's READY=1 notification; panics with its stderr
    /// if it exits or stays silent.
    pub async fn wait_ready(&mut self) {
        let mut buf = vec![0u8; 4096];
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            tokio::select! {
                r = self.notify.recv(&mut buf) => {
                    let n = r.expect("recv notify");
                    if String::from_utf8_lossy(&buf[..n]).lines().any(|l| l == "READY=1") {
                        return;
                    }
                }
                status = self.child.wait() => {
                    panic!("crabboxd exited before READY ({:?}):\n{}", status, self.stderr());
                }
                _ = tokio::time::sleep_until(deadline) => {
                    panic!("crabboxd not ready after {READY_TIMEOUT:?}:\n{}", self.stderr());
                }
            }
        }
    }

    /// Waits for the next notification containing `needle` (e.g. `STOPPING=1`).
    pub async fn wait_notification(&mut self, needle: &str) -> bool {
        let mut buf = vec![0u8; 4096];
        let wait = async {
            loop {
                let n = self.notify.recv(&mut buf).await.expect("recv notify");
                if String::from_utf8_lossy(&buf[..n]).contains(needle) {
                    return;
                }
            }
        };
        tokio::time::timeout(READY_TIMEOUT, wait).await.is_ok()
    }

    /// A connected API client.
    pub async fn client(&self) -> crabbox_api::Client {
        crabbox_api::Client::connect(&self.socket)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", self.stderr()))
    }

    /// What the daemon wrote to stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("daemon still running")
    }

    /// Sends a signal to the daemon.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), sig).expect("kill");
    }

    /// Waits (bounded) for the daemon to exit.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        match tokio::time::timeout(READY_TIMEOUT, self.child.wait()).await {
            Ok(status) => status.expect("wait"),
            Err(_) => panic!(
                "crabboxd did not exit in {READY_TIMEOUT:?}:\n{}",
                self.stderr()
            ),
        }
    }

    /// Runs `crabboxctl --socket <socket> <args>` with the daemon's
    /// environment and returns its output.
    pub async fn ctl(&self, args: &[&str]) -> std::process::Output {
        tokio::process::Command::new(bin("crabboxctl"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .env("HOME", &self.layout.home)
            .env("XDG_CONFIG_HOME", &self.layout.config)
            .env("XDG_STATE_HOME", &self.layout.state)
            .env("XDG_RUNTIME_DIR", &self.layout.runtime)
            .env_remove("CRABBOX_SOCKET")
            .stdin(Stdio::null())
            .output()
            .await
            .expect("run crabboxctl")
    }

    /// A `crabboxctl --socket <socket> <args>` command with the daemon's
    /// environment, to spawn with custom stdio (stdin data, signals).
    pub fn ctl_command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(bin("crabboxctl"));
        cmd.arg("--socket")
            .arg(&self.socket)
            .args(args)
            .env("HOME", &self.layout.home)
            .env("XDG_CONFIG_HOME", &self.layout.config)
            .env("XDG_STATE_HOME", &self.layout.state)
            .env("XDG_RUNTIME_DIR", &self.layout.runtime)
            .env_remove("CRABBOX_SOCKET")
            .env_remove("SSH_AUTH_SOCK")
            .kill_on_drop(true);
        cmd
    }

    /// Runs `crabboxctl <args>` with `stdin` as its standard input.
    pub async fn ctl_stdin(&self, args: &[&str], stdin: &[u8]) -> std::process::Output {
        use tokio::io::AsyncWriteExt as _;
        let mut child = self
            .ctl_command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run crabboxctl");
        let mut input = child.stdin.take().unwrap();
        let data = stdin.to_vec();
        let writer = async move {
            let _ = input.write_all(&data).await;
            drop(input);
        };
        let (_, out) = tokio::join!(writer, child.wait_with_output());
        out.expect("crabboxctl output")
    }

    /// Runs `crabboxctl <args>` (which must include `--json`), asserts it
    /// succeeded, and parses its output.
    pub async fn ctl_json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.ctl(args).await;
        assert!(
            out.status.success(),
            "crabboxctl {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("crabboxctl printed JSON")
    }

    /// Starts an egress host bridge for `lease` allowing the address `allow`
    /// (private addresses opted in, as loopback origins need) and returns
    /// `egress host --json`'s answer; panics if crabboxctl fails.
    pub async fn egress_host_private(&self, lease: &str, allow: &str) -> serde_json::Value {
        self.ctl_json(&[
            "egress",
            "host",
            "--id",
            lease,
            "--allow",
            allow,
            "--allow-private",
            "--json",
        ])
        .await
    }

    /// Repeats [`TestDaemon::ctl_json`] until `pred` holds, for at most
    /// `timeout`; panics naming `what` with the last output and the daemon's
    /// log. For state that changes over time (heartbeats, reconnects).
    pub async fn ctl_json_until(
        &self,
        args: &[&str],
        what: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let v = self.ctl_json(args).await;
            if pred(&v) {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}: {v}\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `crabboxctl lease keep --id <lease> --idle-timeout 15s --json`: a
    /// 15 s idle timeout gives the shortest heartbeat interval (5 s), so
    /// tests see several heartbeats quickly.
    pub async fn keep_lease_fast(&self, lease: &str) -> serde_json::Value {
        self.ctl_json(&[
            "lease",
            "keep",
            "--id",
            lease,
            "--idle-timeout",
            "15s",
            "--json",
        ])
        .await
    }

    /// `crabboxctl tasks --json [--kind KIND]`: the task rows.
    pub async fn tasks(&self, kind: Option<&str>) -> Vec<serde_json::Value> {
        let mut args = vec!["tasks", "--json"];
        args.extend(kind.map(|k| ["--kind", k]).into_iter().flatten());
        let v = self.ctl_json(&args).await;
        v["tasks"].as_array().expect("a task list").clone()
    }

    /// The home directory.
    pub fn home(&self) -> &Path {
        &self.layout.home
    }

    /// The exit status, if the daemon has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
