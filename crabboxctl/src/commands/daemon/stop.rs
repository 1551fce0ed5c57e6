//! `daemon stop`: the Shutdown RPC, then a bounded wait until the daemon's
//! process has drained and exited.

use std::{path::Path, time::Duration};

use crabbox_api::{Client, ConnectError, v1::ShutdownRequest};
use nix::{errno::Errno, sys::signal::kill, unistd::Pid};

use crate::{
    Ctx, connect,
    exit::{Code, Failure},
};

/// Flags of `daemon stop`.
#[derive(Debug, clap::Args)]
pub struct StopArgs {
    /// How long to wait for the daemon to exit, in seconds [default: its
    /// drain grace period plus 10 seconds].
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
}

/// Runs `daemon stop`.
pub async fn stop(ctx: &Ctx, args: &StopArgs) -> anyhow::Result<Code> {
    if !stop_running(ctx, args.timeout.map(Duration::from_secs)).await? {
        outln!(
            "crabboxd is not running (nothing answers at {})",
            ctx.socket.display()
        )?;
    }
    Ok(Code::Ok)
}

/// Stops the daemon at the context's socket if one answers; `Ok(false)` when
/// none was running.
pub async fn stop_running(ctx: &Ctx, timeout: Option<Duration>) -> anyhow::Result<bool> {
    let client =
        match tokio::time::timeout(connect::CALL_TIMEOUT, Client::connect(&ctx.socket)).await {
            Ok(Ok(client)) => client,
            Ok(Err(ConnectError::NotRunning { .. } | ConnectError::Refused { .. })) => {
                return Ok(false);
            }
            Ok(Err(err)) => return Err(connect::unreachable(&err).into()),
            Err(_) => return Err(connect::wedged(&ctx.socket, connect::CALL_TIMEOUT).into()),
        };
    shutdown_and_wait(&ctx.socket, client, timeout).await?;
    Ok(true)
}

/// Sends Shutdown and waits until the daemon's process is gone.
///
/// The process, not the socket, is what is waited for: the daemon may remove
/// its socket before its drain ends, and a socket-activated socket stays
/// (systemd owns it). A new daemon can start only once the old one has
/// released its lock, which it does by exiting.
async fn shutdown_and_wait(
    socket: &Path,
    client: Client,
    timeout: Option<Duration>,
) -> anyhow::Result<()> {
    let (status, _) = connect::call(socket, "GetStatus", client.status()).await?;
    let req = ShutdownRequest {
        reason: "crabboxctl daemon stop".to_owned(),
    };
    let grace = connect::call(socket, "Shutdown", client.daemon().shutdown(req))
        .await?
        .into_inner()
        .grace
        .and_then(|g| Duration::try_from(g).ok())
        .unwrap_or_default();
    // Our own connection would otherwise be one more thing to drain.
    drop(client);
    let limit = timeout.unwrap_or(grace + Duration::from_secs(10));
    let pid = status.pid;
    eprintln!(
        "stopping crabboxd (pid {pid}); it drains its tasks for up to {}",
        crate::output::short_duration(grace)
    );
    let deadline = tokio::time::Instant::now() + limit;
    let mut delay = Duration::from_millis(10);
    while !exited(pid, socket) {
        if tokio::time::Instant::now() >= deadline {
            return Err(Failure::error(format!(
                "crabboxd (pid {pid}) is still running {}s after it was asked to stop",
                limit.as_secs()
            ))
            .hint("see what it is waiting for with `crabboxctl daemon logs`")
            .hint(format!(
                "`kill -TERM {pid}` asks again; `kill -KILL {pid}` ends it without draining"
            ))
            .into());
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(200));
    }
    outln!("crabboxd stopped")?;
    Ok(())
}

/// Whether the daemon's process has exited. A zombie counts as exited: a
/// test harness that spawned the daemon may not have reaped it yet. Without
/// a usable pid, the socket's disappearance is the signal.
fn exited(pid: u32, socket: &Path) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return !socket.exists();
    };
    if raw <= 0 {
        return !socket.exists();
    }
    match kill(Pid::from_raw(raw), None) {
        Err(Errno::ESRCH) => true,
        _ => is_zombie(raw),
    }
}

fn is_zombie(pid: i32) -> bool {
    // Only Linux exposes this cheaply; elsewhere a zombie waits for the
    // timeout, which only affects harnesses that never reap.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // The state follows the parenthesised command name, which may
            // itself contain spaces or parentheses.
            let after = &stat[stat.rfind(')')? + 1..];
            after.split_whitespace().next().map(|s| s == "Z")
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_process_has_not_exited_and_a_reaped_one_has() {
        let me = std::process::id();
        assert!(!exited(me, Path::new("/nonexistent")));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Unreaped, it is a zombie, which counts as exited.
        for _ in 0..1000 {
            if is_zombie(i32::try_from(pid).unwrap()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(exited(pid, Path::new("/nonexistent")));
        child.wait().unwrap();
        assert!(exited(pid, Path::new("/nonexistent")));
    }

    #[test]
    fn without_a_pid_the_socket_decides() {
        assert!(exited(0, Path::new("/nonexistent")));
        assert!(!exited(0, Path::new("/")));
    }
}
