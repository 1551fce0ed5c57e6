//! Remote forwards (`tcpip-forward`) on a lease's connection: the lease's
//! sshd listens on `127.0.0.1:<port>` and opens a `forwarded-tcpip`
//! channel to us per connection. Only the address and port requested here
//! are accepted ([`super::conn::RemoteForwards`]); a refused request is
//! diagnosed (port taken, or which sshd setting forbids it), and the
//! listener is verified to be loopback-only from the lease's
//! `/proc/net/tcp{,6}`.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use russh::{Channel, client::Msg};
use tokio::sync::mpsc;

use super::{
    SshError,
    conn::{Conn, Registration},
    tunnel::{self, Endpoint},
};
use crate::supervisor::Supervisor;

/// Forwarded channels waiting to be served; beyond this the handler refuses
/// new ones (a flood is refused, not queued).
pub const CHANNEL_QUEUE: usize = 128;
/// How long sshd may take to answer a (cancel-)forward request.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(15);
/// The only address a remote forward is requested on.
pub const LOOPBACK: &str = "127.0.0.1";

/// Why a remote forward was refused, typed by whether retrying can help.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// Something already listens on the port (on the lease, or another
    /// forward of this daemon): it may be free later.
    #[error("{0}")]
    InUse(String),
    /// The lease's sshd settings forbid it (`AllowTcpForwarding`,
    /// `PermitListen`, `DisableForwarding`): retrying cannot help.
    #[error("{0}")]
    Forbidden(String),
    /// The connection failed or the request is invalid.
    #[error(transparent)]
    Ssh(#[from] SshError),
}

impl ForwardError {
    /// Whether retrying cannot help.
    pub fn is_fatal(&self) -> bool {
        match self {
            ForwardError::InUse(_) => false,
            ForwardError::Forbidden(_) => true,
            ForwardError::Ssh(e) => !matches!(e, SshError::Lost(_)) && e.is_fatal(),
        }
    }
}

/// A granted remote forward. [`RemoteForward::cancel`] asks sshd to close
/// the listener and waits for the answer; dropping it without that (an error
/// path, a cancelled future) stops accepting its channels at once and sends
/// the same request as a short, bounded clean-up, so sshd never keeps
/// listening on the lease for a forward nobody serves.
pub struct RemoteForward {
    conn: Arc<Conn>,
    port: u16,
    registration: Registration,
    supervisor: Supervisor,
    /// sshd may be listening for this forward (granted, or asked and not
    /// refused): dropping it must cancel.
    live: bool,
    /// Channels for this forward, one per connection to the listener.
    pub channels: mpsc::Receiver<Channel<Msg>>,
}

impl std::fmt::Debug for RemoteForward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteForward")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl RemoteForward {
    /// The listening port on the lease.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The connection the forward lives on.
    pub fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }

    /// Sends `cancel-tcpip-forward` (bounded), then drops the forward. If
    /// this future is dropped before the answer, the drop sends it again.
    pub async fn cancel(mut self) {
        // The port stays registered (its channels refused, as nobody reads
        // them) until sshd has answered: a new forward of the same port on
        // this connection can be asked for only after the old listener is
        // gone, so no cancel of ours can close a newer forward's listener.
        cancel_on(&self.conn, self.port).await;
        self.live = false;
    }
}

/// `cancel-tcpip-forward` of `127.0.0.1:port`, bounded by [`REQUEST_DEADLINE`].
async fn cancel_on(conn: &Conn, port: u16) {
    if conn.handle.is_closed() {
        // The listener went with the connection.
        return;
    }
    let r = tokio::time::timeout(
        REQUEST_DEADLINE,
        conn.handle.cancel_tcpip_forward(LOOPBACK, u32::from(port)),
    )
    .await;
    if !matches!(r, Ok(Ok(()))) {
        tracing::debug!(port, "cancel-tcpip-forward not acknowledged");
    }
}

impl Drop for RemoteForward {
    fn drop(&mut self) {
        self.conn.stats.forwards.fetch_sub(1, Ordering::SeqCst);
        if !self.live {
            self.conn
                .remote_forwards
                .unregister(LOOPBACK, u32::from(self.port), self.registration);
            return;
        }
        let conn = Arc::clone(&self.conn);
        let port = self.port;
        let registration = self.registration;
        tracing::info!(
            port,
            "a remote forward was dropped without a cancel; asking the lease's sshd to close its listener"
        );
        // The port stays registered until sshd has answered (see `cancel`):
        // a late cancel can then never close a newer forward's listener.
        self.supervisor
            .spawn_cleanup("cancel-remote-forward", async move {
                cancel_on(&conn, port).await;
                conn.remote_forwards
                    .unregister(LOOPBACK, u32::from(port), registration);
            });
    }
}

/// Asks the lease's sshd to listen on `127.0.0.1:port` for us. A refusal
/// is `SshError::Forward` naming why: the port is taken on the lease (probed
/// through a `direct-tcpip` tunnel), or the sshd settings that forbid it.
pub async fn request(
    supervisor: &Supervisor,
    conn: Arc<Conn>,
    port: u16,
) -> Result<RemoteForward, ForwardError> {
    if port == 0 {
        return Err(ForwardError::Ssh(SshError::Invalid(
            "a remote forward needs a fixed port (the lease's programs are told it), not 0".into(),
        )));
    }
    let (tx, rx) = mpsc::channel(CHANNEL_QUEUE);
    // Registered first: the first channel may arrive right after the reply.
    let Some(registration) = conn.remote_forwards.register(LOOPBACK, u32::from(port), tx) else {
        return Err(ForwardError::InUse(format!(
            "port in use: this daemon already holds a remote forward of {LOOPBACK}:{port} on this lease; \
             stop that egress first, or pick another port with --listen {LOOPBACK}:PORT"
        )));
    };
    conn.stats.forwards.fetch_add(1, Ordering::SeqCst);
    // From the request on, sshd may listen for us (even if its answer is
    // late): a drop before a refusal cancels.
    let mut forward = RemoteForward {
        conn: Arc::clone(&conn),
        port,
        registration,
        supervisor: supervisor.clone(),
        live: true,
        channels: rx,
    };
    let asked = tokio::time::timeout(
        REQUEST_DEADLINE,
        conn.handle.tcpip_forward(LOOPBACK, u32::from(port)),
    )
    .await;
    match asked {
        Ok(Ok(_)) => Ok(forward),
        Err(_) => Err(ForwardError::Ssh(SshError::Lost(format!(
            "the lease's sshd did not answer a remote forward of {LOOPBACK}:{port} within {REQUEST_DEADLINE:?}"
        )))),
        Ok(Err(_)) if conn.handle.is_closed() => Err(ForwardError::Ssh(SshError::Lost(format!(
            "the SSH connection was lost asking for a remote forward of {LOOPBACK}:{port}"
        )))),
        Ok(Err(_)) => {
            // Refused: sshd holds no listener for us.
            forward.live = false;
            drop(forward);
            Err(diagnose(conn, port).await)
        }
    }
}

/// sshd answers a refused forward with a bare failure: tell a port that is
/// taken from forwarding that is switched off.
async fn diagnose(conn: Arc<Conn>, port: u16) -> ForwardError {
    let probe = tunnel::open(
        conn,
        &Endpoint::Tcp {
            host: LOOPBACK.to_owned(),
            port,
        },
    )
    .await;
    match probe {
        Ok(_) => ForwardError::InUse(format!(
            "port in use: something on the lease already listens on {LOOPBACK}:{port}; stop it, or pick another port with --listen {LOOPBACK}:PORT"
        )),
        // The probe's own connection trouble says nothing of sshd_config.
        Err(e @ SshError::Lost(_)) => ForwardError::Ssh(e),
        Err(_) => ForwardError::Forbidden(format!(
            "the lease's sshd refused a remote forward of {LOOPBACK}:{port}: its sshd_config forbids it \
             (AllowTcpForwarding must be yes or remote, PermitListen must allow {LOOPBACK}:{port} or {port}, \
             and DisableForwarding must be no), or the port is reserved; change sshd_config on the lease and \
             reload sshd, or use --transport coordinator"
        )),
    }
}

/// One listening socket of `/proc/net/tcp{,6}`: its address (hex, as the
/// kernel prints it) and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    /// The local address in the kernel's hex notation.
    pub addr_hex: String,
    /// The port.
    pub port: u16,
}

impl Listener {
    /// Whether the address is 127.0.0.0/8 or `::1` (or `::ffff:127.x`).
    pub fn is_loopback(&self) -> bool {
        let h = self.addr_hex.to_ascii_uppercase();
        match h.len() {
            // Little-endian 32-bit: 127.x.y.z prints as ..7F.
            8 => h.ends_with("7F"),
            32 => {
                h == "00000000000000000000000001000000"
                    || (h.starts_with("0000000000000000FFFF0000") && h.ends_with("7F"))
            }
            _ => false,
        }
    }
}

/// The listening sockets in the text of `/proc/net/tcp` and `/proc/net/tcp6`.
pub fn listeners(proc_net_tcp: &str) -> Vec<Listener> {
    proc_net_tcp
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let _slot = fields.next()?;
            let local = fields.next()?;
            let _remote = fields.next()?;
            let state = fields.next()?;
            if state != "0A" {
                return None;
            }
            let (addr, port) = local.rsplit_once(':')?;
            Some(Listener {
                addr_hex: addr.to_owned(),
                port: u16::from_str_radix(port, 16).ok()?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_requested_address_and_port_are_routed() {
        let forwards = super::super::conn::RemoteForwards::default();
        let (tx, _rx) = mpsc::channel(1);
        let reg = forwards.register(LOOPBACK, 3128, tx).unwrap();
        assert!(forwards.route(LOOPBACK, 3128).is_some());
        for (addr, port) in [
            (LOOPBACK, 8080),
            ("0.0.0.0", 3128),
            ("localhost", 3128),
            ("127.0.0.2", 3128),
        ] {
            assert!(forwards.route(addr, port).is_none(), "{addr}:{port}");
        }
        forwards.unregister(LOOPBACK, 3128, reg);
        assert!(forwards.route(LOOPBACK, 3128).is_none());
    }

    #[test]
    fn a_second_registration_is_refused_and_cannot_remove_the_first() {
        let forwards = super::super::conn::RemoteForwards::default();
        let (first_tx, mut first_rx) = mpsc::channel::<Channel<Msg>>(1);
        let first = forwards.register(LOOPBACK, 3128, first_tx).unwrap();
        let (second_tx, _second_rx) = mpsc::channel::<Channel<Msg>>(1);
        assert!(
            forwards
                .register(LOOPBACK, 3128, second_tx.clone())
                .is_none(),
            "a second forward of the same port must not replace the first's receiver"
        );
        let routed = forwards.route(LOOPBACK, 3128).unwrap();
        assert!(routed.same_channel(&forwards.route(LOOPBACK, 3128).unwrap()));
        assert!(!routed.same_channel(&second_tx));
        drop(routed);
        // An old registration of the key (a forward already gone) removes nothing.
        let (other_tx, _other_rx) = mpsc::channel::<Channel<Msg>>(1);
        let other = forwards.register(LOOPBACK, 8080, other_tx).unwrap();
        forwards.unregister(LOOPBACK, 3128, other);
        assert!(forwards.route(LOOPBACK, 3128).is_some());
        forwards.unregister(LOOPBACK, 3128, first);
        assert!(forwards.route(LOOPBACK, 3128).is_none());
        // The key is free again, and a stale registration cannot remove the new one.
        let (again_tx, _again_rx) = mpsc::channel::<Channel<Msg>>(1);
        let again = forwards.register(LOOPBACK, 3128, again_tx).unwrap();
        forwards.unregister(LOOPBACK, 3128, first);
        assert!(forwards.route(LOOPBACK, 3128).is_some());
        forwards.unregister(LOOPBACK, 3128, again);
        assert!(first_rx.try_recv().is_err());
    }

    #[test]
    fn finds_listeners_and_tells_loopback_from_wildcard() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:0C38 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 1234 1 0 100 0 0 10 0
   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 99 1 0 100 0 0 10 0
   2: 0100007F:0C38 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000  1000        0 1235 1 0 20 4 30 10 -1
  sl  local_address                         remote_address                        st
   0: 00000000000000000000000001000000:0C38 00000000000000000000000000000000:0000 0A 0 0
   1: 00000000000000000000000000000000:0C39 00000000000000000000000000000000:0000 0A 0 0
";
        let l = listeners(text);
        assert_eq!(l.len(), 4);
        let on = |port| l.iter().filter(move |x| x.port == port);
        assert!(on(3128).all(Listener::is_loopback));
        assert_eq!(on(3128).count(), 2);
        assert!(!on(22).any(Listener::is_loopback));
        assert!(!on(3129).any(Listener::is_loopback));
    }
}
