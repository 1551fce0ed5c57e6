//! `TestLease`: a "lease" for the egress-over-SSH tests — a test network
//! namespace running a real OpenSSH `sshd`, whose user has a home and a
//! `PATH` of its own (`SetEnv`), and whose only route out is a forwarder
//! on the veth to one address of the root namespace (the coordinator).
//! Anything else of the root namespace (its loopback origins) is out of
//! reach from inside except through the egress bridge.

use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use crate::{netns::TestNetns, sshd::TestSshd};

/// A lease: namespace, sshd, home, shim directory and coordinator route.
#[derive(Debug)]
pub struct TestLease {
    /// The namespace.
    pub ns: TestNetns,
    /// The sshd inside it, on `<ns_ip>:22`.
    pub sshd: TestSshd,
    /// The lease user's `$HOME`.
    pub home: PathBuf,
    /// A directory first on the lease user's `PATH` (for shims).
    pub shim: PathBuf,
    /// The coordinator as the lease reaches it (`http://<host_ip>:<port>`).
    pub coordinator_url: String,
    _tmp: tempfile::TempDir,
    forwarder: Option<tokio::task::JoinHandle<()>>,
}

/// Forwards every connection accepted on `listen` to `to`, with
/// `TCP_NODELAY` on both sockets (as on every socket of the real path: a
/// small WebSocket message must not wait out Nagle and a delayed ACK) and
/// 64 KiB copy buffers.
async fn forward(listen: tokio::net::TcpListener, to: SocketAddr) {
    while let Ok((mut inbound, _)) = listen.accept().await {
        tokio::spawn(async move {
            if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional_with_sizes(
                    &mut inbound,
                    &mut outbound,
                    64 << 10,
                    64 << 10,
                )
                .await;
            }
        });
    }
}

impl TestLease {
    /// Whether a lease can be made here (root, iproute2, sshd); `Err` says
    /// why not. Under `CI=true` a missing prerequisite panics.
    pub fn available() -> Result<(), String> {
        crate::sshd::available()?;
        if TestNetns::available() {
            return Ok(());
        }
        let why = "needs root and iproute2 to create a network namespace".to_owned();
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{why}; CI must run it");
        }
        Err(why)
    }

    /// Creates the lease in namespace `tag`, routing only to `coordinator`.
    pub async fn start(tag: u8, coordinator: SocketAddr) -> TestLease {
        let mut lease = Self::start_alone(tag, "").await;
        let fwd = tokio::net::TcpListener::bind((lease.ns.host_ip, 0))
            .await
            .unwrap();
        lease.coordinator_url = format!("http://{}", fwd.local_addr().unwrap());
        lease.forwarder = Some(tokio::spawn(forward(fwd, coordinator)));
        lease
    }

    /// Creates the lease in namespace `tag` with no route to anything (no
    /// coordinator; `coordinator_url` is empty), its sshd configured with
    /// the extra `sshd_config` lines `extra_sshd` (e.g. `AllowTcpForwarding no`).
    pub async fn start_alone(tag: u8, extra_sshd: &str) -> TestLease {
        let ns = TestNetns::create(tag).expect("create the lease namespace");
        let tmp = tempfile::tempdir().unwrap();
        let home = tmp.path().join("home");
        let shim = tmp.path().join("shim");
        for d in [&home, &shim] {
            std::fs::create_dir_all(d).unwrap();
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let extra = format!(
            "SetEnv HOME={} PATH={}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n{extra_sshd}",
            home.display(),
            shim.display()
        );
        let sshd =
            TestSshd::start_with_config(Some((&ns, SocketAddr::from((ns.ns_ip, 22)))), 10, &extra)
                .await;
        TestLease {
            ns,
            sshd,
            home,
            shim,
            coordinator_url: String::new(),
            _tmp: tmp,
            forwarder: None,
        }
    }

    /// The registration body for the coordinator: this sshd, pinned, as
    /// the test's own user, port 22 only.
    pub fn registration(&self, slug: &str) -> serde_json::Value {
        serde_json::json!({
            "provider": "ssh", "target": "linux", "host": self.ns.ns_ip.to_string(),
            "sshUser": self.sshd.user, "sshPort": "22", "sshFallbackPorts": [],
            "sshHostKey": self.sshd.host_key, "slug": slug,
            "ttlSeconds": 3600, "idleTimeoutSeconds": 1800,
        })
    }

    /// `crabboxd.toml` lines that make the daemon use the sshd's client key.
    pub fn daemon_toml(&self) -> String {
        format!("[ssh]\nkey = \"{}\"\n", self.sshd.client_key.display())
    }

    /// Writes an executable shim `name` (a `#!/bin/sh` script) first on the
    /// lease user's `PATH`.
    pub fn shim(&self, name: &str, script: &str) -> PathBuf {
        let p = self.shim.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    /// A path under the lease user's home.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.home.join(rel)
    }

    /// Runs `args` inside the namespace and returns its output.
    pub async fn run(&self, args: &[&str]) -> std::process::Output {
        tokio::process::Command::new("ip")
            .args(["netns", "exec", &self.ns.name])
            .args(args)
            .env("HOME", &self.home)
            .output()
            .await
            .expect("ip netns exec")
    }

    /// `curl -sS --fail --max-time 10 [-x PROXY] URL` inside the namespace:
    /// (success, body, stderr).
    pub async fn curl(&self, proxy: Option<&str>, url: &str) -> (bool, String, String) {
        let mut args = vec!["curl", "-sS", "--fail", "--max-time", "10"];
        if let Some(p) = proxy {
            args.extend(["-x", p]);
        }
        args.push(url);
        let out = self.run(&args).await;
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The directory of the lease-local egress state.
    pub fn egress_state(&self) -> PathBuf {
        self.home.join(".local/state/crabbox/egress")
    }

    /// The lease's `current.json`, if present.
    pub fn current(&self) -> Option<serde_json::Value> {
        let text = std::fs::read_to_string(self.egress_state().join("current.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Whether a process with `pid` exists.
    pub fn alive(pid: u32) -> bool {
        Path::new(&format!("/proc/{pid}")).exists()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    }
}

impl Drop for TestLease {
    fn drop(&mut self) {
        if let Some(f) = &self.forwarder {
            f.abort();
        }
        // Helpers the tests started on the lease run in sessions of their
        // own: end every process whose executable lives under this home.
        let home = self.home.display().to_string();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmd = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmd).starts_with(&home) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}
