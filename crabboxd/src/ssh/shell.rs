//! Interactive shells: one session channel with a PTY (the client's TERM
//! and size), a login shell or one command line, the client's keystrokes
//! in, the terminal's output out, window-size changes as `window-change`,
//! and the exit code (128+n for signal n). Like a command it runs at most
//! once; closing the channel hangs the terminal up, which ends the shell.

use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use russh::ChannelMsg;
use tokio::sync::mpsc;

use super::{
    SshError,
    conn::Conn,
    exec::{Exit, Session, send_within, sig_name, signal_code, status_code},
};
use crate::supervisor::Supervisor;

/// The longest TERM accepted from a client.
const TERM_MAX: usize = 64;
/// The largest terminal side accepted, in characters.
const SIDE_MAX: u32 = 10_000;

/// A shell to run.
#[derive(Debug, Clone)]
pub struct ShellSpec {
    /// The lease id or static target name.
    pub lease: String,
    /// A command line instead of a login shell.
    pub command: Option<String>,
    /// The client's TERM.
    pub term: String,
    /// Columns.
    pub cols: u32,
    /// Rows.
    pub rows: u32,
    /// The calling client's SSH agent socket, if any.
    pub agent: Option<std::path::PathBuf>,
}

/// Input from the client.
#[derive(Debug, Clone)]
pub enum ShellInput {
    /// Keystrokes.
    Stdin(Bytes),
    /// The client's terminal changed size.
    Resize {
        /// Columns.
        cols: u32,
        /// Rows.
        rows: u32,
    },
}

/// What happens, in order.
#[derive(Debug, Clone)]
pub enum ShellOutput {
    /// The shell started.
    Started {
        /// The port of the connection.
        port: u16,
        /// Set when the connection fell back to another port.
        fallback: Option<String>,
    },
    /// Terminal output.
    Output(Bytes),
    /// The shell ended; the last item.
    Exit(Exit),
}

/// A TERM from a client, checked: printable ASCII words only, else the
/// default.
pub fn term(raw: &str) -> String {
    let ok = !raw.is_empty()
        && raw.len() <= TERM_MAX
        && raw
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+'));
    if ok {
        raw.to_owned()
    } else {
        "xterm-256color".to_owned()
    }
}

fn side(n: u32, default: u32) -> u32 {
    if n == 0 { default } else { n.min(SIDE_MAX) }
}

/// Runs one shell on `conn`, reading `input` and sending what happens to
/// `out`.
pub async fn run(
    supervisor: Supervisor,
    conn: Arc<Conn>,
    spec: ShellSpec,
    input: impl Stream<Item = ShellInput> + Send + Unpin,
    out: mpsc::Sender<Result<ShellOutput, SshError>>,
) {
    let stall = conn.stall;
    if let Err(e) = run_inner(&supervisor, conn, spec, input, &out).await {
        let _ = out.send_timeout(Err(e), stall).await;
    }
}

async fn run_inner(
    supervisor: &Supervisor,
    conn: Arc<Conn>,
    spec: ShellSpec,
    mut input: impl Stream<Item = ShellInput> + Send + Unpin,
    out: &mpsc::Sender<Result<ShellOutput, SshError>>,
) -> Result<(), SshError> {
    let session = Session::open(&conn).await?;
    let channel = &session.channel;
    let lost = |what: &str, e: russh::Error| SshError::Lost(format!("cannot {what}: {e}"));
    channel
        .request_pty(
            true,
            &term(&spec.term),
            side(spec.cols, 80),
            side(spec.rows, 24),
            0,
            0,
            &[],
        )
        .await
        .map_err(|e| lost("ask for a terminal", e))?;
    match &spec.command {
        Some(line) => channel.exec(true, line.as_bytes().to_vec()).await,
        None => channel.request_shell(true).await,
    }
    .map_err(|e| lost("start the shell", e))?;
    // Dropped before the channel ended (the client went away and the
    // request was aborted): the channel is closed, which hangs the
    // terminal up.
    let (mut rd, wr) = session.split_closing(supervisor, &conn.target.lease, "a shell");
    let stats = Arc::clone(&conn.stats);
    let send = |o: ShellOutput| send_within(out, o, &conn, "a shell");
    // Keystrokes and resizes are written concurrently with reading output,
    // so a paste into a terminal that echoes can never deadlock the
    // channel's windows (the reader keeps draining while a write waits).
    let writer = async {
        while let Some(msg) = input.next().await {
            match msg {
                ShellInput::Stdin(b) => {
                    stats
                        .bytes_out
                        .fetch_add(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    if wr.data_bytes(b).await.is_err() {
                        break;
                    }
                }
                ShellInput::Resize { cols, rows } => {
                    let _ = wr.window_change(side(cols, 80), side(rows, 24), 0, 0).await;
                }
            }
        }
        // The client went away (or the channel refused input): hang the
        // terminal up, and keep the write half alive until the reader ends.
        let _ = wr.close().await;
        std::future::pending::<()>().await;
    };
    tokio::pin!(writer);
    // Replies to the two requests, in order: the PTY, then the shell.
    let mut replies = 0;
    let mut exit: Option<Exit> = None;
    loop {
        tokio::select! {
            biased;
            msg = rd.wait() => match msg {
                None | Some(ChannelMsg::Close) => break,
                Some(ChannelMsg::Success) if replies < 2 => {
                    replies += 1;
                    if replies == 2 {
                        send(ShellOutput::Started { port: conn.port, fallback: conn.fallback.clone() }).await?;
                    }
                }
                Some(ChannelMsg::Failure) if replies < 2 => {
                    let what = if replies == 0 { "a terminal (PTY)" } else { "a shell" };
                    return Err(SshError::Channel(format!("{} refused {what}", conn.target.lease)));
                }
                Some(ChannelMsg::Data { data }) | Some(ChannelMsg::ExtendedData { data, .. }) => {
                    stats.bytes_in.fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    if let Err(e) = send(ShellOutput::Output(data)).await {
                        // The client went away, or stopped reading for the
                        // stall deadline: hang the terminal up.
                        let _ = wr.close().await;
                        return Err(e);
                    }
                }
                Some(ChannelMsg::ExitStatus { exit_status }) => {
                    exit = Some(Exit { code: status_code(exit_status), signal: None });
                }
                Some(ChannelMsg::ExitSignal { signal_name, .. }) => {
                    let name = sig_name(&signal_name);
                    exit = Some(Exit { code: signal_code(&name), signal: Some(name) });
                }
                Some(_) => {}
            },
            () = &mut writer => {}
        }
    }
    wr.ended();
    match exit {
        Some(e) => {
            let _ = out.send_timeout(Ok(ShellOutput::Exit(e)), conn.stall).await;
            Ok(())
        }
        None if conn.handle.is_closed() => Err(SshError::Lost(format!(
            "the SSH connection to {} was lost while the shell ran",
            conn.target.lease
        ))),
        None => Err(SshError::Lost(format!(
            "the shell on {} ended without an exit status",
            conn.target.lease
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terms_are_checked() {
        assert_eq!(term("xterm-256color"), "xterm-256color");
        assert_eq!(term("screen.xterm"), "screen.xterm");
        assert_eq!(term(""), "xterm-256color");
        assert_eq!(term("x\u{1b}[2J"), "xterm-256color");
        assert_eq!(term(&"a".repeat(200)), "xterm-256color");
        assert_eq!(side(0, 80), 80);
        assert_eq!(side(u32::MAX, 80), SIDE_MAX);
    }
}
