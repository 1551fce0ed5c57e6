//! `crabboxctl exec --id L [--cwd DIR] -- CMD [ARGS…]`: run one command on a
//! lease over the daemon's SSH connection. No TTY; stdin is forwarded (EOF
//! when it closes); stdout and stderr stay apart; the exit code is the
//! remote command's (128+n for signal n). Ctrl-C or SIGTERM ends the remote
//! process group, not just the channel; a second Ctrl-C sends SIGKILL.

use std::io::{IsTerminal as _, Write as _};

use crabbox_api::v1::{
    ExecCancel, ExecRequest, ExecStart, Signal, StdinEof, exec_request::Msg, exec_response::Event,
};
use tokio::{io::AsyncReadExt as _, sync::mpsc};
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    Ctx, connect,
    exit::{Code, remote_status},
};

/// Run a command on a lease (no TTY) and exit with its exit code.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The lease id (or a static target from crabboxd.toml).
    #[arg(long = "id", value_name = "LEASE")]
    lease: String,
    /// The remote working directory.
    #[arg(long, value_name = "DIR")]
    cwd: Option<String>,
    /// Do not forward stdin (the command reads EOF at once).
    #[arg(short = 'n', long)]
    no_stdin: bool,
    /// The command and its arguments (after `--`).
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    command: Vec<String>,
}

/// The exit code when the SSH layer failed (ssh's own 255).
pub const SSH_FAILED: i32 = 255;

/// The calling client's SSH agent socket, passed to the daemon (which uses
/// it only when the lease has no key file and no key is configured).
pub fn agent_socket() -> String {
    std::env::var("SSH_AUTH_SOCK").unwrap_or_default()
}

/// Runs `crabboxctl exec`.
pub async fn run(ctx: &Ctx, args: &Args) -> anyhow::Result<Code> {
    let start = ExecStart {
        lease_id: args.lease.clone(),
        argv: args.command.clone(),
        command: String::new(),
        cwd: args.cwd.clone().unwrap_or_default(),
        agent_socket: agent_socket(),
    };
    stream(ctx, start, !args.no_stdin).await
}

/// Runs one Exec stream to its end and exits the process with the remote
/// exit code (or 255 when the SSH layer failed). Shared with `rsh`.
pub async fn stream(ctx: &Ctx, start: ExecStart, forward_stdin: bool) -> anyhow::Result<Code> {
    let client = connect::connect(&ctx.socket).await?;
    let (tx, rx) = mpsc::channel::<ExecRequest>(16);
    tx.send(ExecRequest {
        msg: Some(Msg::Start(start)),
    })
    .await?;
    let mut replies = connect::call(
        &ctx.socket,
        "Exec",
        client.ssh().exec(ReceiverStream::new(rx)),
    )
    .await?
    .into_inner();

    // Stdin, forwarded until EOF.
    let stdin_tx = tx.clone();
    let stdin = async move {
        if forward_stdin {
            let mut input = tokio::io::stdin();
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                match input.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let msg = ExecRequest {
                            msg: Some(Msg::Stdin(buf[..n].to_vec())),
                        };
                        if stdin_tx.send(msg).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
        let _ = stdin_tx
            .send(ExecRequest {
                msg: Some(Msg::StdinEof(StdinEof {})),
            })
            .await;
        std::future::pending::<()>().await;
    };
    tokio::pin!(stdin);

    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut cancels = 0;
    let cancel = |sig: Signal| ExecRequest {
        msg: Some(Msg::Cancel(ExecCancel { signal: sig as i32 })),
    };
    let mut stdout = std::io::stdout().lock();
    let mut stderr = std::io::stderr();
    loop {
        let msg = tokio::select! {
            m = replies.message() => m,
            _ = &mut stdin => unreachable!("stdin forwarding never ends"),
            _ = sigint.recv() => {
                cancels += 1;
                let _ = tx.send(cancel(if cancels > 1 { Signal::Kill } else { Signal::Int })).await;
                continue;
            }
            _ = sigterm.recv() => {
                cancels += 1;
                let _ = tx.send(cancel(if cancels > 1 { Signal::Kill } else { Signal::Term })).await;
                continue;
            }
        };
        match msg {
            Ok(Some(reply)) => match reply.event {
                Some(Event::Stdout(b)) => {
                    stdout.write_all(&b)?;
                    stdout.flush()?;
                }
                Some(Event::Stderr(b)) => {
                    stderr.write_all(&b)?;
                }
                Some(Event::Started(s)) if !s.fallback_note.is_empty() && stderr.is_terminal() => {
                    writeln!(stderr, "crabboxctl: {}", s.fallback_note)?;
                }
                Some(Event::Started(_)) => {}
                Some(Event::Exit(e)) => {
                    stdout.flush()?;
                    // The remote command's exit code, not one of crabboxctl's:
                    // leave directly, everything is flushed.
                    std::process::exit(i32::from(remote_status(e.code)));
                }
                None => {}
            },
            Ok(None) => {
                eprintln!("crabboxctl: crabboxd ended the command's stream without an exit status");
                std::process::exit(SSH_FAILED);
            }
            Err(status) => {
                stdout.flush()?;
                if status.code() == tonic::Code::Unimplemented {
                    return Err(connect::rpc_failed(&ctx.socket, "Exec", &status).into());
                }
                eprintln!("crabboxctl: {}", status.message());
                std::process::exit(SSH_FAILED);
            }
        }
    }
}
