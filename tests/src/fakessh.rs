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
}

async fn verdict(kind: &str, r: Result<Channel<Msg>, russh::Error>, to: &Verdicts) {
    let v = match r {
        Ok(_) => format!("{kind}: ACCEPTED"),
        Err(_) => format!("{kind}: refused"),
    };
    to.lock().unwrap().push(v);
}

impl server::Handler for Handler {
    type Error = russh::Error;

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
