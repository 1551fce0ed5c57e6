//! Accepting API connections: only the daemon's own user may connect. The
//! directory and socket modes already keep others out; the peer-uid check
//! is the wall that still stands if someone loosens them.

use std::time::Duration;

use futures::Stream;
use tokio::net::{UnixListener, UnixStream};

/// Accepts connections on `listener`, yielding only those whose peer runs
/// as this process's effective uid. Others are closed with a log line. The
/// stream never yields an error: accept failures (for example running out
/// of file descriptors) are logged and retried after a short pause, so a
/// burst of them cannot spin the CPU or end the server.
pub fn same_user_connections(
    listener: UnixListener,
) -> impl Stream<Item = Result<UnixStream, std::io::Error>> {
    let uid = nix::unistd::geteuid().as_raw();
    futures::stream::unfold(listener, move |listener| async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => match stream.peer_cred() {
                    Ok(cred) if cred.uid() == uid => return Some((Ok(stream), listener)),
                    Ok(cred) => {
                        tracing::warn!(
                            peer_uid = cred.uid(),
                            peer_pid = ?cred.pid(),
                            "refused API connection from another user"
                        );
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "refused API connection: cannot read peer credentials")
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed on the API socket");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
}
