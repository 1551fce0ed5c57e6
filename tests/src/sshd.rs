//! `TestSshd`: a real OpenSSH `sshd` for tests, with a fresh host key, an
//! `authorized_keys` holding a fresh client key, and a temporary config, on
//! loopback (or inside a test network namespace). Ready when sshd itself
//! logs `Server listening on …`; killed with its whole process group on
//! drop.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command as StdCommand, Stdio},
    time::Duration,
};

use tokio::process::{Child, Command};

use crate::netns::TestNetns;

/// sshd, by absolute path (sshd refuses to re-exec itself otherwise).
pub const SSHD: &str = "/usr/sbin/sshd";

/// How long sshd gets to start listening.
const READY: Duration = Duration::from_secs(20);

/// Whether a real sshd can run here; `Err` says why not. In CI (`CI=true`)
/// a missing prerequisite is a failure, not a skip.
pub fn available() -> Result<(), String> {
    let reason = if !nix::unistd::geteuid().is_root() {
        Some("sshd tests need root (sshd's privilege separation and logging in as the test user)")
    } else if !Path::new(SSHD).exists() {
        Some("sshd tests need /usr/sbin/sshd (apt-get install openssh-server)")
    } else {
        None
    };
    match reason {
        None => Ok(()),
        Some(r) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("{r}; CI must run them")
        }
        Some(r) => Err(r.to_owned()),
    }
}

/// Skips the calling test (returns) when sshd cannot run, saying why.
#[macro_export]
macro_rules! require_sshd {
    () => {
        if let Err(why) = $crate::sshd::available() {
            eprintln!("skipped: {why}");
            return;
        }
    };
}

/// Generates an ed25519 key pair at `path` (and `path.pub`).
pub fn keygen(path: &Path) -> String {
    let out = StdCommand::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "crabbox-test", "-f"])
        .arg(path)
        .output()
        .expect("run ssh-keygen");
    assert!(out.status.success(), "ssh-keygen: {out:?}");
    let public = std::fs::read_to_string(path.with_extension("pub")).unwrap();
    let mut words = public.split_whitespace();
    format!("{} {}", words.next().unwrap(), words.next().unwrap())
}

/// A free loopback port: bound, then released for sshd to take (sshd
/// cannot be handed a listener; a port taken in between makes `start`
/// retry on another).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running sshd.
#[derive(Debug)]
pub struct TestSshd {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its host public key, `"<alg> <base64>"`.
    pub host_key: String,
    /// A private key it accepts.
    pub client_key: PathBuf,
    /// The user to log in as (the test's own).
    pub user: String,
    dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    netns: Option<String>,
    max_sessions: u32,
    extra_config: String,
    /// The host key file under `dir`, `host_ed25519` unless replaced.
    host_key_file: String,
    child: Option<Child>,
    log: PathBuf,
}

impl TestSshd {
    /// Starts sshd on a free loopback port.
    pub async fn start() -> TestSshd {
        Self::start_with(None, 10).await
    }

    /// Starts sshd on `addr` inside `netns` (or on a free loopback port when
    /// `None`), with `MaxSessions`.
    pub async fn start_with(netns: Option<(&TestNetns, SocketAddr)>, max_sessions: u32) -> Self {
        Self::start_with_config(netns, max_sessions, "").await
    }

    /// A coordinator registration body for a lease on this sshd: loopback,
    /// its port only, its host key pinned, as the test's own user.
    pub fn registration(&self) -> serde_json::Value {
        serde_json::json!({
            "provider": "ssh", "target": "linux", "host": "127.0.0.1", "sshUser": self.user,
            "sshPort": self.addr.port().to_string(), "sshFallbackPorts": [],
            "sshHostKey": self.host_key, "ttlSeconds": 3600, "idleTimeoutSeconds": 1800,
        })
    }

    /// Like [`TestSshd::start_with`], with extra `sshd_config` lines (for
    /// example `SetEnv HOME=… PATH=…` to give the lease's user a home and
    /// commands of its own).
    pub async fn start_with_config(
        netns: Option<(&TestNetns, SocketAddr)>,
        max_sessions: u32,
        extra_config: &str,
    ) -> Self {
        std::fs::create_dir_all("/run/sshd").expect("create /run/sshd");
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let host_key = keygen(&dir.join("host_ed25519"));
        let client_key = dir.join("client_ed25519");
        let client_pub = keygen(&client_key);
        std::fs::write(dir.join("authorized_keys"), format!("{client_pub}\n")).unwrap();
        let user = nix::unistd::User::from_uid(nix::unistd::geteuid())
            .ok()
            .flatten()
            .map(|u| u.name)
            .unwrap_or_else(|| "root".into());
        let mut s = TestSshd {
            addr: netns
                .map(|(_, a)| a)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], free_port()))),
            host_key,
            client_key,
            user,
            dir,
            _tmp: Some(tmp),
            netns: netns.map(|(n, _)| n.name.clone()),
            max_sessions,
            extra_config: extra_config.to_owned(),
            host_key_file: "host_ed25519".to_owned(),
            child: None,
            log: PathBuf::new(),
        };
        for _ in 0..5 {
            if s.spawn().await {
                return s;
            }
            if s.netns.is_some() {
                break;
            }
            s.addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        }
        panic!("sshd did not start:\n{}", s.log_text());
    }

    /// The sshd log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The temporary directory holding the keys and config.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn config(&self) -> String {
        let d = self.dir.display();
        format!(
            "ListenAddress {addr}\nHostKey {d}/{hk}\nAuthorizedKeysFile {d}/authorized_keys\n\
             PidFile none\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin prohibit-password\n\
             MaxSessions {ms}\nMaxStartups 100:30:200\nLogLevel VERBOSE\nAcceptEnv none\n{extra}",
            addr = self.addr,
            hk = self.host_key_file,
            ms = self.max_sessions,
            extra = self.extra_config
        )
    }

    async fn spawn(&mut self) -> bool {
        let config = self.dir.join("sshd_config");
        std::fs::write(&config, self.config()).unwrap();
        self.log = self.dir.join(format!("sshd-{}.log", self.addr.port()));
        let log = std::fs::File::create(&self.log).unwrap();
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, SSHD]);
                c
            }
            None => Command::new(SSHD),
        };
        cmd.arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn sshd");
        let deadline = tokio::time::Instant::now() + READY;
        loop {
            if self.log_text().contains("Server listening on") {
                self.child = Some(child);
                return true;
            }
            if child.try_wait().ok().flatten().is_some() || tokio::time::Instant::now() > deadline {
                let _ = child.kill().await;
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills sshd and every process it started: the connection handlers
    /// (which sshd puts in sessions of their own) and the commands they run,
    /// as when the box goes down.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                for p in descendants(pid as i32).into_iter().chain([pid as i32]) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(p),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            let _ = child.wait().await;
        }
    }

    /// Appends `sshd_config` lines, in effect from the next [`TestSshd::restart`].
    pub fn add_config(&mut self, lines: &str) {
        self.extra_config.push_str(lines);
    }

    /// Replaces the host key with a new ECDSA (nistp256) one, the only key
    /// sshd offers from the next [`TestSshd::restart`]; `host_key` follows.
    pub fn use_ecdsa_host_key(&mut self) {
        let path = self.dir.join("host_ecdsa");
        let out = StdCommand::new("ssh-keygen")
            .args([
                "-q",
                "-t",
                "ecdsa",
                "-b",
                "256",
                "-N",
                "",
                "-C",
                "crabbox-test",
                "-f",
            ])
            .arg(&path)
            .output()
            .expect("run ssh-keygen");
        assert!(out.status.success(), "ssh-keygen: {out:?}");
        let public = std::fs::read_to_string(path.with_extension("pub")).unwrap();
        let mut words = public.split_whitespace();
        self.host_key = format!("{} {}", words.next().unwrap(), words.next().unwrap());
        self.host_key_file = "host_ecdsa".to_owned();
    }

    /// Starts sshd again on the same address with the same keys.
    pub async fn restart(&mut self) {
        self.kill().await;
        for _ in 0..50 {
            if self.spawn().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("sshd did not restart:\n{}", self.log_text());
    }

    /// A `[targets.<name>]` section for `crabboxd.toml` reaching this sshd
    /// with its client key, trusting on first use.
    pub fn target_toml(&self, name: &str) -> String {
        format!(
            "[targets.{name}]\nhost = \"{}\"\nuser = \"{}\"\nport = {}\nkey = \"{}\"\n",
            self.addr.ip(),
            self.user,
            self.addr.port(),
            self.client_key.display()
        )
    }
}

/// Every process below `root`, from `/proc`.
fn descendants(root: i32) -> Vec<i32> {
    let mut parents = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        if let Some(ppid) = rest
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<i32>().ok())
        {
            parents.push((pid, ppid));
        }
    }
    let mut out = vec![];
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(child, parent) in &parents {
            if parent == p && !out.contains(&child) {
                out.push(child);
                frontier.push(child);
            }
        }
    }
    out
}

impl Drop for TestSshd {
    fn drop(&mut self) {
        if let Some(child) = &self.child
            && let Some(pid) = child.id()
        {
            for p in descendants(pid as i32).into_iter().chain([pid as i32]) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}
