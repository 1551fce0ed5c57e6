//! `crabboxctl ssh --id L [-- CMD…]`: an interactive shell (or one command)
//! on a lease under a PTY, over the daemon's SSH connection: the client's
//! terminal in raw mode (restored on every way out), TERM and window-size
//! changes passed on, the remote exit code as the exit code (128+n for
//! signal n, 255 when the SSH layer failed). `--print` prints the OpenSSH
//! command line equivalent to the daemon's connection (per-lease key,
//! known_hosts, host-key alias, port), for people who want their own ssh.

use std::{
    io::{IsTerminal as _, Write as _},
    os::fd::AsFd as _,
    path::Path,
};

use crabbox_api::v1::{
    GetSshTargetRequest, ShellRequest, ShellStart, WindowSize, shell_request::Msg,
    shell_response::Event,
};
use nix::sys::termios;
use tokio::{io::AsyncReadExt as _, sync::mpsc};
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    Ctx,
    commands::exec::SSH_FAILED,
    connect,
    dirs::shell_quote,
    exit::{Code, remote_status},
    output,
};

/// An interactive shell on a lease, or print how to reach it with OpenSSH.
///
/// Without --print: a login shell (or CMD) under a terminal on the lease,
/// over the daemon's SSH connection; exits with the remote exit code.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The lease id (or a static target from crabboxd.toml).
    #[arg(long = "id", value_name = "LEASE")]
    lease: String,
    /// Print the equivalent OpenSSH command line instead.
    #[arg(long)]
    print: bool,
    /// With --print: print the command line as JSON (unstable format).
    #[arg(long, requires = "print")]
    json: bool,
    /// A command to run under the terminal instead of a login shell (after `--`).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    command: Vec<String>,
}

/// The client's terminal in raw mode; restored when dropped (and before
/// every `exit`).
struct RawMode {
    saved: Option<termios::Termios>,
}

impl RawMode {
    fn enter() -> Self {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return RawMode { saved: None };
        }
        let Ok(saved) = termios::tcgetattr(stdin.as_fd()) else {
            return RawMode { saved: None };
        };
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        if termios::tcsetattr(stdin.as_fd(), termios::SetArg::TCSANOW, &raw).is_err() {
            return RawMode { saved: None };
        }
        RawMode { saved: Some(saved) }
    }

    fn restore(&mut self) {
        if let Some(saved) = self.saved.take() {
            let _ =
                termios::tcsetattr(std::io::stdin().as_fd(), termios::SetArg::TCSADRAIN, &saved);
        }
    }

    /// Restores the terminal and leaves with `code`.
    fn exit(&mut self, code: i32) -> ! {
        let _ = std::io::stdout().flush();
        self.restore();
        std::process::exit(code)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        self.restore();
    }
}

/// The client's terminal size (columns, rows), when it has one.
fn window_size() -> Option<WindowSize> {
    let (w, h) = terminal_size::terminal_size_of(std::io::stdout().as_fd())
        .or_else(|| terminal_size::terminal_size_of(std::io::stdin().as_fd()))?;
    Some(WindowSize {
        cols: u32::from(w.0),
        rows: u32::from(h.0),
    })
}

/// Runs `crabboxctl ssh`.
pub async fn run(ctx: &Ctx, args: &Args) -> anyhow::Result<Code> {
    if !args.print {
        return shell(ctx, args).await;
    }
    let client = connect::connect(&ctx.socket).await?;
    let t = connect::call(
        &ctx.socket,
        "GetSshTarget",
        client.ssh().get_ssh_target(GetSshTargetRequest {
            lease_id: args.lease.clone(),
        }),
    )
    .await?
    .into_inner();
    let port = if t.port_in_use != 0 {
        t.port_in_use
    } else {
        t.ports.first().copied().unwrap_or(22)
    };
    let mut argv: Vec<String> = vec!["ssh".into()];
    if !t.key_path.is_empty() {
        argv.extend([
            "-i".into(),
            shell_quote(Path::new(&t.key_path)),
            "-o".into(),
            "IdentitiesOnly=yes".into(),
        ]);
    }
    let strict = if t.host_key_pinned {
        "yes"
    } else {
        "accept-new"
    };
    for o in [
        "ForwardAgent=no".to_owned(),
        "ForwardX11=no".to_owned(),
        "ServerAliveInterval=15".to_owned(),
        "ServerAliveCountMax=2".to_owned(),
        format!("StrictHostKeyChecking={strict}"),
        format!(
            "UserKnownHostsFile={}",
            shell_quote(Path::new(&t.known_hosts_path))
        ),
        "GlobalKnownHostsFile=none".to_owned(),
        format!("HostKeyAlias={}", t.host_key_alias),
    ] {
        argv.push("-o".into());
        argv.push(o);
    }
    argv.extend(["-p".into(), port.to_string()]);
    // The daemon checks a lease's user and host, but this line is pasted
    // into a shell: quoted like the paths, and after `--` so it can never
    // be read as an option.
    argv.push("--".into());
    argv.push(shell_quote(Path::new(&format!("{}@{}", t.user, t.host))));
    if args.json {
        output::print_json(&serde_json::json!({
            "lease": t.lease_id,
            "command": argv.join(" "),
        }))?;
    } else {
        outln!("{}", argv.join(" "))?;
    }
    Ok(Code::Ok)
}

async fn shell(ctx: &Ctx, args: &Args) -> anyhow::Result<Code> {
    let client = connect::connect(&ctx.socket).await?;
    let (tx, rx) = mpsc::channel::<ShellRequest>(16);
    tx.send(ShellRequest {
        msg: Some(Msg::Start(ShellStart {
            lease_id: args.lease.clone(),
            command: args.command.join(" "),
            term: std::env::var("TERM").unwrap_or_default(),
            size: window_size(),
            agent_socket: crate::commands::exec::agent_socket(),
        })),
    })
    .await?;
    let mut replies = connect::call(
        &ctx.socket,
        "Shell",
        client.ssh().shell(ReceiverStream::new(rx)),
    )
    .await?
    .into_inner();

    let mut raw = RawMode::enter();
    let stdin_tx = tx.clone();
    let stdin = async move {
        let mut input = tokio::io::stdin();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match input.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let msg = ShellRequest {
                        msg: Some(Msg::Stdin(buf[..n].to_vec())),
                    };
                    if stdin_tx.send(msg).await.is_err() {
                        break;
                    }
                }
            }
        }
        // The terminal stays open until the shell ends.
        std::future::pending::<()>().await;
    };
    tokio::pin!(stdin);
    use tokio::signal::unix::{SignalKind, signal};
    let mut winch = signal(SignalKind::window_change())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut stdout = std::io::stdout().lock();
    loop {
        let msg = tokio::select! {
            m = replies.message() => m,
            _ = &mut stdin => unreachable!("stdin forwarding never ends"),
            _ = winch.recv() => {
                if let Some(size) = window_size() {
                    let _ = tx.send(ShellRequest { msg: Some(Msg::Resize(size)) }).await;
                }
                continue;
            }
            _ = term.recv() => raw.exit(128 + 15),
            _ = hup.recv() => raw.exit(128 + 1),
        };
        match msg {
            Ok(Some(reply)) => match reply.event {
                Some(Event::Output(b)) => {
                    stdout.write_all(&b)?;
                    stdout.flush()?;
                }
                Some(Event::Started(_)) | None => {}
                Some(Event::Exit(e)) => {
                    drop(stdout);
                    raw.exit(i32::from(remote_status(e.code)));
                }
            },
            Ok(None) => {
                drop(stdout);
                raw.restore();
                eprintln!("crabboxctl: crabboxd ended the shell's stream without an exit status");
                raw.exit(SSH_FAILED);
            }
            Err(status) => {
                drop(stdout);
                raw.restore();
                if status.code() == tonic::Code::Unimplemented {
                    return Err(connect::rpc_failed(&ctx.socket, "Shell", &status).into());
                }
                eprintln!("crabboxctl: {}", status.message());
                raw.exit(SSH_FAILED);
            }
        }
    }
}
