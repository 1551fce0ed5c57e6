//! Commands over the mux: one session channel per command, no TTY, stdin
//! forwarded with EOF, stdout and stderr kept apart, the remote exit code
//! (signals as 128+n). A command runs at most once: nothing here retries
//! after a channel opened.
//!
//! Every command runs in its own process group (the session sshd already
//! made for it, else `setsid`), whose id the wrapper prints as the first line
//! of stdout before it `exec`s the command. Cancelling kills that group over
//! a second channel, since sshd does not pass signals on; so does a daemon
//! stop, while the mux waits for the channels before it disconnects.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use russh::{ChannelMsg, ChannelOpenFailure};
use tokio::sync::mpsc;

use super::{
    SshError,
    conn::{ChannelGuard, CloseOnDrop, Conn},
};
use crate::supervisor::Supervisor;

/// What to run.
#[derive(Debug, Clone)]
pub enum Command {
    /// An argv; every word is quoted for the remote shell.
    Argv(Vec<String>),
    /// A shell command line, used as is (what `ssh host CMD…` sends; `rsh`).
    Shell(String),
}

/// A signal to end a command with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGINT (Ctrl-C).
    Int,
    /// SIGTERM.
    Term,
    /// SIGHUP.
    Hup,
    /// SIGKILL.
    Kill,
}

impl Signal {
    fn name(self) -> &'static str {
        match self {
            Signal::Int => "INT",
            Signal::Term => "TERM",
            Signal::Hup => "HUP",
            Signal::Kill => "KILL",
        }
    }
}

/// From the client.
#[derive(Debug, Clone)]
pub enum Input {
    /// Bytes for the command's stdin.
    Stdin(Bytes),
    /// Stdin is done.
    Eof,
    /// End the command's process group with this signal.
    Cancel(Signal),
}

/// To the client.
#[derive(Debug, Clone)]
pub enum Output {
    /// The command started.
    Started {
        /// The port of the connection.
        port: u16,
        /// Set when the connection fell back to another port.
        fallback: Option<String>,
    },
    /// Stdout bytes.
    Stdout(Bytes),
    /// Stderr bytes.
    Stderr(Bytes),
    /// The command ended.
    Exit(Exit),
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// The exit code; 128+n for a signal.
    pub code: i32,
    /// The signal name (`TERM`), when it died of one.
    pub signal: Option<String>,
}

/// Single-quotes a word for a POSIX shell.
pub fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        return s.to_owned();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The remote command line: print the process group id, change directory,
/// then `exec` the command in a new process group.
pub fn wrap(command: &Command, cwd: Option<&str>) -> String {
    // When the login shell already leads its own process group (sshd's
    // non-PTY sessions), it prints its pid and `exec`s the command itself:
    // one process start fewer per command than the general path below.
    let mut direct = String::from("printf '%s\\n' \"$$\"; ");
    if let Some(dir) = cwd {
        direct.push_str(&format!("CDPATH= cd -- {} || exit 1; ", sh_quote(dir)));
    }
    match command {
        Command::Argv(argv) => {
            direct.push_str("exec");
            for a in argv {
                direct.push(' ');
                direct.push_str(&sh_quote(a));
            }
        }
        Command::Shell(line) => direct.push_str(&format!("exec sh -c {}", sh_quote(line))),
    }
    let mut body = String::from("printf '%s\\n' \"$$\"; ");
    let mut args: Vec<String> = Vec::new();
    if let Some(dir) = cwd {
        // CDPATH emptied here too: a relative directory found through the
        // remote CDPATH makes `cd` print it, ahead of the command's output.
        body.push_str("CDPATH= cd -- \"$1\" || exit 1; shift; ");
        args.push(sh_quote(dir));
    }
    match command {
        Command::Argv(argv) => {
            body.push_str("exec \"$@\"");
            args.extend(argv.iter().map(|a| sh_quote(a)));
        }
        Command::Shell(line) => {
            body.push_str("exec sh -c \"$1\"");
            args.push(sh_quote(line));
        }
    }
    let inner = format!("{} sh {}", sh_quote(&body), args.join(" "));
    // sshd already makes every non-PTY session its own session and process
    // group; then the command keeps that group (and its pid, so sshd reports
    // its exit status or signal itself). Otherwise `setsid` makes one —
    // without forking, since a shell that is not a group leader calls
    // setsid() in place. `setsid -w` would fork and turn a signal into a
    // message and a raw status, so it is never used.
    format!(
        "pg=; {{ read -r _ _ _ _ pg _ < /proc/$$/stat; }} 2>/dev/null || pg=$(ps -o pgid= -p $$ 2>/dev/null | tr -d ' '); \
if [ \"$pg\" = \"$$\" ]; then {direct}; elif command -v setsid >/dev/null 2>&1; then exec setsid sh -c {inner}; else exec sh -c {inner}; fi"
    )
}

/// The exit code of an SSH `exit-status`. The protocol carries a u32, but a
/// POSIX status is 0–255: anything above cannot be one, and is reported as
/// 1 so it never reads as success (a plain cast turned 2^31 and above
/// negative, which clients then clamped to 0).
pub(crate) fn status_code(status: u32) -> i32 {
    match u8::try_from(status) {
        Ok(code) => i32::from(code),
        Err(_) => {
            tracing::debug!(status, "exit status above 255; reported as 1");
            1
        }
    }
}

/// The exit code of a signal name, as a shell reports it (128+n).
pub(crate) fn signal_code(name: &str) -> i32 {
    128 + match name {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "ILL" => 4,
        "ABRT" => 6,
        "FPE" => 8,
        "KILL" => 9,
        "USR1" => 10,
        "SEGV" => 11,
        "USR2" => 12,
        "PIPE" => 13,
        "ALRM" => 14,
        "TERM" => 15,
        _ => 0,
    }
}

pub(crate) fn sig_name(s: &russh::Sig) -> String {
    let d = format!("{s:?}");
    match d.strip_prefix("Custom(\"") {
        Some(rest) => rest.trim_end_matches("\")").to_owned(),
        None => d,
    }
}

/// A channel for one command: one of the daemon's command sessions (the
/// permit that keeps it under sshd's `MaxSessions`), the channel, counted in
/// the mux's stats while it lives.
pub(crate) struct Session {
    /// The open channel.
    pub channel: russh::Channel<russh::client::Msg>,
    permit: tokio::sync::OwnedSemaphorePermit,
    guard: ChannelGuard,
}

impl Session {
    /// Waits for a session permit, then opens the channel.
    pub(crate) async fn open(conn: &Conn) -> Result<Session, SshError> {
        let permit = conn
            .sessions
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| SshError::Lost("the connection closed".into()))?;
        let channel = open_session(conn).await?;
        Ok(Session {
            channel,
            permit,
            guard: ChannelGuard::new(&conn.stats),
        })
    }

    /// Splits the started channel; the write half closes the channel if it
    /// is dropped before [`CloseOnDrop::ended`] (the client went away), and
    /// gives the permit and the count back only after that close.
    pub(crate) fn split_closing(
        self,
        supervisor: &Supervisor,
        lease: &str,
        what: &'static str,
    ) -> (russh::ChannelReadHalf, CloseOnDrop) {
        let (rd, wr) = self.channel.split();
        let wr = CloseOnDrop::new(supervisor, wr, lease, what).holding(self.permit, self.guard);
        (rd, wr)
    }
}

/// Opens a session channel, waiting while the server is at `MaxSessions`
/// (it answers "administratively prohibited" for a channel beyond it).
pub(crate) async fn open_session(
    conn: &Conn,
) -> Result<russh::Channel<russh::client::Msg>, SshError> {
    let mut delay = Duration::from_millis(20);
    for _ in 0..40 {
        match conn.handle.channel_open_session().await {
            Ok(c) => return Ok(c),
            Err(russh::Error::ChannelOpenFailure(
                ChannelOpenFailure::AdministrativelyProhibited
                | ChannelOpenFailure::ResourceShortage,
            )) => {
                tracing::debug!(delay = ?delay, "the server refused a channel (MaxSessions?); retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(500));
            }
            Err(e) => {
                return Err(SshError::Lost(format!(
                    "cannot open a channel to {}: {e}",
                    conn.target.lease
                )));
            }
        }
    }
    Err(SshError::Channel(format!(
        "{} refused every new channel for 15 s (sshd MaxSessions?)",
        conn.target.lease
    )))
}

/// Sends one item to a shell's client, waiting at most the connection's
/// stall deadline for room: a client that stops reading gets its channel closed
/// (a warning names the lease and `what`), so it cannot hold the channel's
/// queue — and with it the whole connection — for longer than that.
pub(crate) async fn send_within<T>(
    out: &mpsc::Sender<Result<T, SshError>>,
    item: T,
    conn: &Conn,
    what: &str,
) -> Result<(), SshError> {
    match out.send_timeout(Ok(item), conn.stall).await {
        Ok(()) => Ok(()),
        Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
            tracing::warn!(
                lease = %conn.target.lease,
                channel = what,
                stall = ?conn.stall,
                "the client stopped reading; closing the channel"
            );
            Err(SshError::Channel(format!(
                "the client of {what} on {} read nothing for {:?}; the channel was closed",
                conn.target.lease, conn.stall
            )))
        }
        Err(mpsc::error::SendTimeoutError::Closed(_)) => {
            Err(SshError::Channel("the client went away".into()))
        }
    }
}

/// Kills a remote process group over a control channel: `sig`, then
/// SIGKILL after two seconds if anything is left.
pub async fn kill_group(conn: &Conn, pgid: u32, sig: Signal) -> Result<(), SshError> {
    // `kill -- -1` would signal every process of the user: never.
    if pgid < 2 {
        return Err(SshError::Channel(format!(
            "refusing to signal process group {pgid}"
        )));
    }
    let _permit = conn
        .control
        .acquire()
        .await
        .map_err(|_| SshError::Lost("the connection closed".into()))?;
    let mut ch = open_session(conn).await?;
    let _guard = ChannelGuard::new(&conn.stats);
    let script = format!(
        "kill -{s} -- -{pgid} 2>/dev/null; i=0; while kill -0 -- -{pgid} 2>/dev/null && [ $i -lt 20 ]; do sleep 0.1; i=$((i+1)); done; kill -KILL -- -{pgid} 2>/dev/null; exit 0",
        s = sig.name()
    );
    ch.exec(true, script)
        .await
        .map_err(|e| SshError::Lost(format!("cannot send the kill: {e}")))?;
    let _ = ch.eof().await;
    let drain = async { while ch.wait().await.is_some() {} };
    let _ = tokio::time::timeout(Duration::from_secs(10), drain).await;
    tracing::info!(pgid, signal = sig.name(), "ended a remote process group");
    Ok(())
}

/// Kills the group if the command is dropped before it ended (the client
/// went away): a short, bounded clean-up, not a long-lived task. It holds
/// the channel's read half, so a command dropped before its process-group
/// line arrived is still found: the clean-up reads that line first.
struct Orphan {
    supervisor: Supervisor,
    conn: Arc<Conn>,
    pgid: Option<u32>,
    done: bool,
    rd: Option<russh::ChannelReadHalf>,
    /// The process-group line so far; `None` once it was read.
    first_line: Option<Vec<u8>>,
}

impl Orphan {
    fn rd(&mut self) -> &mut russh::ChannelReadHalf {
        self.rd.as_mut().expect("held until dropped")
    }
}

/// Reads the rest of the wrapper's process-group line from `rd`.
async fn read_pgid(rd: &mut russh::ChannelReadHalf, mut line: Vec<u8>) -> Option<u32> {
    while !line.contains(&b'\n') {
        match rd.wait().await? {
            ChannelMsg::Data { data } => line.extend_from_slice(&data),
            ChannelMsg::Close | ChannelMsg::Eof => return None,
            _ => {}
        }
        if line.len() > PGID_LINE_MAX {
            return None;
        }
    }
    let end = line.iter().position(|b| *b == b'\n')?;
    String::from_utf8_lossy(&line[..end]).trim().parse().ok()
}

impl Drop for Orphan {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let conn = Arc::clone(&self.conn);
        let known = self.pgid;
        let rd = self.rd.take();
        let line = self.first_line.take();
        if known.is_none() && (rd.is_none() || line.is_none()) {
            return;
        }
        // Dropped unfinished: its client went away, or its stream failed.
        tracing::info!(pgid = ?known, "command dropped before it ended; ending the remote command");
        // Counted as an open channel until the kill is done, so a stopping
        // mux waits for it before it disconnects (taken here, before the
        // command's own channel is given back).
        let guard = ChannelGuard::new(&conn.stats);
        self.supervisor
            .spawn_cleanup("kill-orphaned-command", async move {
                let _guard = guard;
                let _ = tokio::time::timeout(Duration::from_secs(15), async move {
                    let pgid = match (known, rd, line) {
                        (Some(p), _, _) => Some(p),
                        (None, Some(mut rd), Some(line)) => {
                            tokio::time::timeout(Duration::from_secs(5), read_pgid(&mut rd, line))
                                .await
                                .ok()
                                .flatten()
                        }
                        _ => None,
                    };
                    if let Some(pgid) = pgid {
                        let _ = kill_group(&conn, pgid, Signal::Term).await;
                    }
                })
                .await;
            });
    }
}

/// The longest first line (the process group id) the wrapper may print.
const PGID_LINE_MAX: usize = 32;

/// Runs one command on `conn`, reading `input` and sending what happens to
/// `out`. Returns when the command ended, failed, or `out` is gone.
pub async fn run(
    supervisor: Supervisor,
    conn: Arc<Conn>,
    command: Command,
    cwd: Option<String>,
    input: impl Stream<Item = Input> + Send + Unpin,
    out: mpsc::Sender<Result<Output, SshError>>,
) {
    let result = run_inner(supervisor, Arc::clone(&conn), command, cwd, input, &out).await;
    if let Err(e) = result {
        let _ = out.send(Err(e)).await;
    }
}

async fn run_inner(
    supervisor: Supervisor,
    conn: Arc<Conn>,
    command: Command,
    cwd: Option<String>,
    mut input: impl Stream<Item = Input> + Send + Unpin,
    out: &mpsc::Sender<Result<Output, SshError>>,
) -> Result<(), SshError> {
    // The permit and the channel's count live in `session` until this
    // returns; the channel itself moves into the halves below.
    let session = Session::open(&conn).await?;
    tracing::trace!("exec: channel open");
    let channel = session.channel;
    let line = wrap(&command, cwd.as_deref());
    channel
        .exec(true, line)
        .await
        .map_err(|e| SshError::Lost(format!("cannot start the command: {e}")))?;
    let stats = Arc::clone(&conn.stats);
    let (rd, wr) = channel.split();
    let stopping = supervisor.root().clone();
    let mut orphan = Orphan {
        supervisor,
        conn: Arc::clone(&conn),
        pgid: None,
        done: false,
        rd: Some(rd),
        first_line: Some(Vec::new()),
    };
    let (cancel_tx, mut cancel_rx) = mpsc::channel::<Signal>(4);
    // Stdin is written concurrently with reading output, so a command that
    // echoes its input can never deadlock the channel's windows.
    let writer = async {
        let mut eof = false;
        while let Some(msg) = input.next().await {
            match msg {
                Input::Stdin(b) if !eof => {
                    stats.bytes_out.fetch_add(b.len() as u64, Ordering::Relaxed);
                    if wr.data_bytes(b).await.is_err() {
                        break;
                    }
                }
                Input::Stdin(_) => {}
                Input::Eof => {
                    if !eof {
                        eof = true;
                        let _ = wr.eof().await;
                    }
                }
                Input::Cancel(sig) => {
                    let _ = cancel_tx.send(sig).await;
                }
            }
        }
        if !eof {
            let _ = wr.eof().await;
        }
        // Keep the write half (and the channel) alive until the reader ends.
        std::future::pending::<()>().await;
    };
    tokio::pin!(writer);
    let mut exit: Option<Exit> = None;
    let mut started = false;
    let mut cancelled = false;
    let mut pending: Option<Signal> = None;
    loop {
        let msg = tokio::select! {
            biased;
            msg = orphan.rd().wait() => Some(msg),
            Some(sig) = cancel_rx.recv(), if !cancelled => {
                // Before the group id is known the command may still be
                // starting: the kill waits for it.
                pending.get_or_insert(sig);
                None
            }
            () = stopping.cancelled(), if pending.is_none() => {
                // The daemon is stopping while a client still follows the
                // command: end it as a cancel would, while the mux waits
                // for this channel (sshd would leave it running once the
                // connection drops).
                tracing::info!("the daemon is stopping; ending the remote command");
                pending = Some(Signal::Term);
                None
            }
            _ = &mut writer => unreachable!("the writer never ends"),
        };
        if let Some(msg) = msg
            && !handle(msg, &mut exit, &mut started, &mut orphan, &conn, out).await?
        {
            orphan.done = true;
            return finish(exit, &conn, out).await;
        }
        let (Some(pgid), Some(sig)) = (orphan.pgid, pending) else {
            continue;
        };
        if cancelled {
            continue;
        }
        cancelled = true;
        // The kill runs while output keeps flowing.
        let kill = kill_group(&conn, pgid, sig);
        tokio::pin!(kill);
        loop {
            let msg = tokio::select! {
                r = &mut kill => {
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "kill failed");
                    }
                    break;
                }
                msg = orphan.rd().wait() => msg,
            };
            if !handle(msg, &mut exit, &mut started, &mut orphan, &conn, out).await? {
                orphan.done = true;
                return finish(exit, &conn, out).await;
            }
        }
    }
}

/// Handles one channel message; `false` when the channel is over.
async fn handle(
    msg: Option<ChannelMsg>,
    exit: &mut Option<Exit>,
    started: &mut bool,
    orphan: &mut Orphan,
    conn: &Arc<Conn>,
    out: &mpsc::Sender<Result<Output, SshError>>,
) -> Result<bool, SshError> {
    // No stall deadline for commands: a run outlives its client, and a
    // paused reader (`exec -- cat log | less`) must not kill the command.
    let send = |o: Output| async move {
        out.send(Ok(o))
            .await
            .map_err(|_| SshError::Channel("the client went away".into()))
    };
    match msg {
        None | Some(ChannelMsg::Close) => return Ok(false),
        Some(ChannelMsg::Data { data }) => {
            conn.stats
                .bytes_in
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            let mut data: Bytes = data;
            if let Some(buf) = &mut orphan.first_line {
                let nl = data.iter().position(|b| *b == b'\n');
                let take = nl.map_or(data.len(), |i| i + 1);
                buf.extend_from_slice(&data[..take]);
                if buf.len() > PGID_LINE_MAX {
                    return Err(SshError::Channel(
                        "the remote wrapper printed no process group id".into(),
                    ));
                }
                if nl.is_none() {
                    return Ok(true);
                }
                let text = String::from_utf8_lossy(buf).trim().to_owned();
                let pgid: u32 = text.parse().map_err(|_| {
                    SshError::Channel(format!(
                        "the remote wrapper printed {text:?} instead of a process group id"
                    ))
                })?;
                orphan.pgid = Some(pgid);
                tracing::trace!(pgid, "exec: started");
                orphan.first_line = None;
                *started = true;
                send(Output::Started {
                    port: conn.port,
                    fallback: conn.fallback.clone(),
                })
                .await?;
                data = data.slice(take..);
                if data.is_empty() {
                    return Ok(true);
                }
            }
            send(Output::Stdout(data)).await?;
        }
        Some(ChannelMsg::ExtendedData { data, ext }) => {
            conn.stats
                .bytes_in
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            if ext == 1 {
                send(Output::Stderr(data)).await?;
            }
        }
        Some(ChannelMsg::ExitStatus { exit_status }) => {
            tracing::trace!(exit_status, "exec: exit");
            *exit = Some(Exit {
                code: status_code(exit_status),
                signal: None,
            });
        }
        Some(ChannelMsg::ExitSignal { signal_name, .. }) => {
            let name = sig_name(&signal_name);
            *exit = Some(Exit {
                code: signal_code(&name),
                signal: Some(name),
            });
        }
        Some(ChannelMsg::Failure) if !*started => {
            return Err(SshError::Channel(
                "the server refused to run the command".into(),
            ));
        }
        Some(_) => {}
    }
    Ok(true)
}

async fn finish(
    exit: Option<Exit>,
    conn: &Conn,
    out: &mpsc::Sender<Result<Output, SshError>>,
) -> Result<(), SshError> {
    match exit {
        Some(e) => {
            let _ = out.send(Ok(Output::Exit(e))).await;
            Ok(())
        }
        None if conn.handle.is_closed() => Err(SshError::Lost(format!(
            "the SSH connection to {} was lost while the command ran; it was not run again, and whether it finished is unknown",
            conn.target.lease
        ))),
        None => Err(SshError::Lost(format!(
            "the channel to {} closed without an exit status; the command was not run again",
            conn.target.lease
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_a_shell() {
        let cases = ["plain", "", "a b", "it's", "$HOME", "a\nb", "*"];
        for c in cases {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("printf %s {}", sh_quote(c)))
                .output()
                .unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout), c);
        }
    }

    #[test]
    fn the_wrapper_prints_its_group_then_runs_the_argv() {
        let tmp = tempfile::tempdir().unwrap();
        let line = wrap(
            &Command::Argv(vec![
                "sh".into(),
                "-c".into(),
                "pwd; echo \"$1\"; exit 3".into(),
                "x".into(),
                "a b".into(),
            ]),
            Some(tmp.path().to_str().unwrap()),
        );
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&line)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let mut lines = text.lines();
        let pgid: u32 = lines.next().unwrap().parse().unwrap();
        assert!(pgid > 1);
        assert_eq!(
            lines.next().unwrap(),
            tmp.path().canonicalize().unwrap().to_str().unwrap()
        );
        assert_eq!(lines.next().unwrap(), "a b");
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(signal_code("TERM"), 143);

        // A shell that already leads its process group (as under sshd)
        // takes the direct path: the command keeps the shell's pid.
        let line = wrap(
            &Command::Argv(vec!["sh".into(), "-c".into(), "echo $$; exit 4".into()]),
            Some(tmp.path().to_str().unwrap()),
        );
        let out = std::process::Command::new("setsid")
            .args(["sh", "-c", &line])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(
            lines[0], lines[1],
            "the command runs in the shell's own process"
        );
        assert_eq!(out.status.code(), Some(4));
    }

    #[test]
    fn a_relative_cwd_never_prints_through_cdpath() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("base");
        std::fs::create_dir_all(base.join("sub")).unwrap();
        // The login directory has a `sub` too: that is the one meant.
        let elsewhere = tmp.path().join("elsewhere");
        std::fs::create_dir_all(elsewhere.join("sub")).unwrap();
        let line = wrap(&Command::Argv(vec!["pwd".into()]), Some("sub"));
        let want = elsewhere.join("sub").canonicalize().unwrap();
        // Both paths: the general one (the shell does not lead its group)
        // and the direct one (it does, under `setsid`).
        for setsid in [false, true] {
            let mut cmd = if setsid {
                let mut c = std::process::Command::new("setsid");
                c.arg("sh");
                c
            } else {
                std::process::Command::new("sh")
            };
            let out = cmd
                .arg("-c")
                .arg(&line)
                .current_dir(&elsewhere)
                .env("CDPATH", &base)
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            let text = String::from_utf8_lossy(&out.stdout);
            let lines: Vec<&str> = text.lines().collect();
            assert_eq!(lines.len(), 2, "setsid {setsid}: {text}");
            assert!(lines[0].parse::<u32>().is_ok(), "{text}");
            assert_eq!(lines[1], want.to_str().unwrap(), "{text}");
        }
    }

    #[test]
    fn an_exit_status_outside_0_255_is_a_failure() {
        assert_eq!(status_code(0), 0);
        assert_eq!(status_code(7), 7);
        assert_eq!(status_code(255), 255);
        for s in [256, 1 << 31, u32::MAX, (1 << 31) + 1, 0xC000_0005] {
            assert_eq!(status_code(s), 1, "{s}");
        }
    }
}
