//! `crabboxctl rsh [-l USER] LEASE CMD…`: an rsh/ssh-compatible transport
//! over the daemon's SSH connection, for `rsync -e 'crabboxctl rsh'`. As
//! with ssh, the words of CMD are joined with spaces into one shell command
//! line; stdin and stdout are the byte streams, the exit code is the
//! remote's, and 255 means the transport failed.

use crabbox_api::v1::ExecStart;

use crate::{Ctx, commands::exec, exit::Code};

/// An rsh-compatible transport (`rsync -e 'crabboxctl rsh' SRC LEASE:DIR`).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Accepted for rsh compatibility; the lease's own user is used.
    #[arg(short = 'l', value_name = "USER")]
    user: Option<String>,
    /// The lease id (or a static target from crabboxd.toml).
    lease: String,
    /// The remote command line.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    command: Vec<String>,
}

/// Runs `crabboxctl rsh`.
pub async fn run(ctx: &Ctx, args: &Args) -> anyhow::Result<Code> {
    let _ = &args.user;
    let start = ExecStart {
        lease_id: args.lease.clone(),
        argv: Vec::new(),
        command: args.command.join(" "),
        cwd: String::new(),
        agent_socket: exec::agent_socket(),
    };
    exec::stream(ctx, start, true).await
}
