//! `HostileSshd`: a test-only SSH server built on russh's `server` module,
//! for what a real sshd never does. It accepts any public key, answers
//! every `exec` like the daemon's wrapper expects (a process group line,
//! `ok`, exit 0) — and first opens the channels a client never asked for
//! (`forwarded-tcpip`, `x11`, `auth-agent`, `session`, `direct-tcpip`),
//! recording how the client answered each.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
};

use russh::{
    Channel, ChannelId,
    server::{self, Auth, ChannelOpenHandle, Msg, Session, VerifiedPublicKey},
};
use tokio::net::TcpListener;

/// How the client answered one server-opened channel: `"<kind>: refused"`
/// or `"<kind>: ACCEPTED"`.
pub type Verdicts = Arc<Mutex<Vec<String>>>;

/// A running hostile server.
pub struct HostileSshd {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its host public key, `"<alg> <base64>"`.
    pub host_key: String,
    /// How the client answered each channel it opened, in order.
    pub verdicts: Verdicts,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HostileSshd {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone)]
struct Handler {
    verdicts: Verdicts,
    /// [`HostileSshd::start_forwarding`]: grant remote forwards, then open
    /// `forwarded-tcpip` channels for another port and for the granted one.
    forwarding: bool,
}

/// What every `exec` prints in forwarding mode after the wrapper's lines:
/// enough for `uname -s; uname -m; $HOME`.
const FORWARDING_EXEC_OUT: &[u8] = b"4242\nLinux\nx86_64\n/nonexistent-hostile-home\n";

async fn verdict(kind: &str, r: Result<Channel<Msg>, russh::Error>, to: &Verdicts) {
    let v = match r {
        Ok(_) => format!("{kind}: ACCEPTED"),
        Err(_) => format!("{kind}: refused"),
    };
    to.lock().unwrap().push(v);
}

impl server::Handler for Handler {
    type Error = russh::Error;

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        if !self.forwarding {
            return Ok(false);
        }
        let (h, to, address, port) = (
            session.handle(),
            Arc::clone(&self.verdicts),
            address.to_owned(),
            *port,
        );
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            verdict(
                "forwarded-tcpip other port",
                h.channel_open_forwarded_tcpip(address.clone(), port + 1, "127.0.0.1", 4444)
                    .await,
                &to,
            )
            .await;
            verdict(
                "forwarded-tcpip requested port",
                h.channel_open_forwarded_tcpip(address, port, "127.0.0.1", 4445)
                    .await,
                &to,
            )
            .await;
        });
        Ok(true)
    }

    async fn auth_publickey(
        &mut self,
        _user: &str,
        _key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        _channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply.accept().await;
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)?;
        let h = session.handle();
        if self.forwarding {
            tokio::spawn(async move {
                let _ = h
                    .data(channel, bytes::Bytes::from_static(FORWARDING_EXEC_OUT))
                    .await;
                let _ = h.exit_status_request(channel, 0).await;
                let _ = h.eof(channel).await;
                let _ = h.close(channel).await;
            });
            return Ok(());
        }
        let to = Arc::clone(&self.verdicts);
        tokio::spawn(async move {
            verdict(
                "forwarded-tcpip",
                h.channel_open_forwarded_tcpip("127.0.0.1", 8080, "10.9.9.9", 4444)
                    .await,
                &to,
            )
            .await;
            verdict("x11", h.channel_open_x11("10.9.9.9", 6010).await, &to).await;
            verdict("auth-agent", h.channel_open_agent().await, &to).await;
            verdict("session", h.channel_open_session().await, &to).await;
            verdict(
                "direct-tcpip",
                h.channel_open_direct_tcpip("127.0.0.1", 22, "10.9.9.9", 4444)
                    .await,
                &to,
            )
            .await;
            let _ = h
                .data(channel, bytes::Bytes::from_static(b"4242\nok\n"))
                .await;
            let _ = h.exit_status_request(channel, 0).await;
            let _ = h.eof(channel).await;
            let _ = h.close(channel).await;
        });
        Ok(())
    }
}

impl HostileSshd {
    /// Starts on a free loopback port with a host key made in `dir`.
    pub async fn start(dir: &Path) -> HostileSshd {
        Self::start_mode(dir, false).await
    }

    /// A server that grants every remote forward (`tcpip-forward`) and,
    /// 300 ms later, opens a `forwarded-tcpip` channel for the granted port
    /// plus one (`"forwarded-tcpip other port: …"`) and then one for the
    /// granted port (`"forwarded-tcpip requested port: …"`); every `exec`
    /// answers like a Linux box.
    pub async fn start_forwarding(dir: &Path) -> HostileSshd {
        Self::start_mode(dir, true).await
    }

    async fn start_mode(dir: &Path, forwarding: bool) -> HostileSshd {
        let key_path = dir.join("hostile_host_ed25519");
        let host_key = crate::sshd::keygen(&key_path);
        let key = russh::keys::load_secret_key(&key_path, None).expect("host key");
        let config = Arc::new(server::Config {
            keys: vec![key],
            auth_rejection_time: std::time::Duration::from_millis(10),
            ..Default::default()
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let verdicts: Verdicts = Arc::default();
        let v = Arc::clone(&verdicts);
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let handler = Handler {
                    verdicts: Arc::clone(&v),
                    forwarding,
                };
                let config = Arc::clone(&config);
                tokio::spawn(async move {
                    if let Ok(s) = server::run_stream(config, sock, handler).await {
                        let _ = s.await;
                    }
                });
            }
        });
        HostileSshd {
            addr,
            host_key,
            verdicts,
            task,
        }
    }
}
