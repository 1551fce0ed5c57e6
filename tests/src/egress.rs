//! Egress fixtures: a loopback HTTP origin that records who connected, and
//! the real `crabbox-egress-client` helper process started with a ticket
//! file, its listen address read from its own log line.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpListener,
    process::Child,
};

use crate::bins::bin;

/// A tiny HTTP/1.1 origin on `127.0.0.1:0`: answers every request with a
/// fixed body and `Connection: close`, and records each peer address.
#[derive(Debug, Clone)]
pub struct Origin {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The body it serves.
    pub body: String,
    /// The peer address of every connection it accepted.
    pub peers: Arc<Mutex<Vec<SocketAddr>>>,
}

impl Origin {
    /// Starts the origin with a body that names it uniquely.
    pub async fn start() -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let body = format!("hello from origin {addr} {}\n", std::process::id());
        let peers = Arc::new(Mutex::new(Vec::new()));
        let (b, p) = (body.clone(), Arc::clone(&peers));
        tokio::spawn(async move {
            while let Ok((mut s, peer)) = listener.accept().await {
                p.lock().unwrap().push(peer);
                let body = b.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 8192];
                    let mut head = Vec::new();
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    // `/slow…` streams 40 KiB over about two seconds, for
                    // interrupting a transfer in flight.
                    if head.windows(5).any(|w| w == b"/slow") {
                        let chunk = vec![b'x'; 1024];
                        let head = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            40 * 1024
                        );
                        if s.write_all(head.as_bytes()).await.is_err() {
                            return;
                        }
                        for _ in 0..40 {
                            if s.write_all(&chunk).await.is_err() {
                                return;
                            }
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        }
                    } else {
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = s.write_all(resp.as_bytes()).await;
                    }
                    let _ = s.shutdown().await;
                });
            }
        });
        Origin { addr, body, peers }
    }

    /// `http://127.0.0.1:<port>/<path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{path}", self.addr)
    }
}

/// The real lease-side helper process.
#[derive(Debug)]
pub struct EgressHelper {
    /// Its proxy address.
    pub listen: SocketAddr,
    /// Its log file.
    pub log: PathBuf,
    /// Its control socket.
    pub control: PathBuf,
    child: Child,
}

impl EgressHelper {
    /// Starts `crabbox-egress-client` on `127.0.0.1:0` with the ticket in
    /// `ticket_file` (0600) and waits for its "listening" log line.
    pub async fn start(
        coordinator: &str,
        lease: &str,
        session: &str,
        ticket_file: &Path,
        dir: &Path,
    ) -> EgressHelper {
        Self::start_with_prefix(&[], coordinator, lease, session, ticket_file, dir).await
    }

    /// Like [`EgressHelper::start`], but runs the helper under a command
    /// prefix (e.g. `ip netns exec <ns>` to put it in a test namespace).
    pub async fn start_with_prefix(
        prefix: &[&str],
        coordinator: &str,
        lease: &str,
        session: &str,
        ticket_file: &Path,
        dir: &Path,
    ) -> EgressHelper {
        let log = dir.join(format!("egress-client-{session}.log"));
        let control = dir.join(format!("egress-client-{session}.sock"));
        let helper = bin("crabbox-egress-client");
        let mut cmd = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = tokio::process::Command::new(first);
                c.args(rest).arg(&helper);
                c
            }
            None => tokio::process::Command::new(&helper),
        };
        let mut child = cmd
            .args([
                "--coordinator",
                coordinator,
                "--id",
                lease,
                "--session",
                session,
                "--listen",
                "127.0.0.1:0",
            ])
            .arg("--ticket-file")
            .arg(ticket_file)
            .arg("--control")
            .arg(&control)
            .env_remove("CRABBOX_EGRESS_TICKET")
            .env("XDG_RUNTIME_DIR", dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn crabbox-egress-client");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut seen = String::new();
        let listen = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                seen.push_str(&line);
                seen.push('\n');
                if let Some(rest) = line.split("listen=").nth(1)
                    && line.contains("listening")
                {
                    let addr = rest.split_whitespace().next().unwrap();
                    return Some(addr.parse::<SocketAddr>().unwrap());
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("helper never said where it listens:\n{seen}"));
        // Keep draining its log into a file so it never blocks on stderr.
        let log_path = log.clone();
        tokio::spawn(async move {
            let mut all = seen;
            while let Ok(Some(line)) = lines.next_line().await {
                all.push_str(&line);
                all.push('\n');
                let _ = std::fs::write(&log_path, &all);
            }
        });
        EgressHelper {
            listen,
            log,
            control,
            child,
        }
    }

    /// Hands the helper a fresh ticket over its 0600 control socket, the
    /// way the daemon heals a pair after the bridge dropped. Returns the
    /// helper's one-line answer.
    pub async fn give_ticket(&self, ticket: &str) -> String {
        let mut s = tokio::net::UnixStream::connect(&self.control)
            .await
            .expect("control socket");
        s.write_all(format!("ticket {ticket}\n").as_bytes())
            .await
            .unwrap();
        let mut answer = String::new();
        BufReader::new(s).read_line(&mut answer).await.unwrap();
        answer.trim().to_owned()
    }

    /// `http://<listen>`, for `curl -x`.
    pub fn proxy_url(&self) -> String {
        format!("http://{}", self.listen)
    }

    /// The helper's pid.
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap()
    }
}

/// Runs `curl -sS --fail --max-time 10 -x <proxy> <url>` (so a 502 from
/// the proxy is a failure) and returns
/// (success, stdout, stderr).
pub async fn curl_via(proxy: &str, url: &str) -> (bool, String, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "10", "-x", proxy, url])
        .output()
        .await
        .expect("run curl (apt-get install curl)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
