//! `crabboxctl ssh --id L --print`: the OpenSSH command line equivalent to
//! the daemon's connection (per-lease key, known_hosts, host-key alias,
//! port), for people who want their own ssh.

use std::path::Path;

use crabbox_api::v1::GetSshTargetRequest;

use crate::{
    Ctx, connect,
    dirs::shell_quote,
    exit::{Code, Failure},
};

/// Print how to reach a lease with OpenSSH.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The lease id (or a static target from crabboxd.toml).
    #[arg(long = "id", value_name = "LEASE")]
    lease: String,
    /// Print the equivalent OpenSSH command line.
    #[arg(long)]
    print: bool,
}

/// Runs `crabboxctl ssh`.
pub async fn run(ctx: &Ctx, args: &Args) -> anyhow::Result<Code> {
    if !args.print {
        return Err(Failure {
            code: Code::Usage,
            message: "an interactive shell through the daemon is not available yet".into(),
            hints: vec![
                "run commands with `crabboxctl exec --id LEASE -- CMD…`".into(),
                "or print an OpenSSH command line with `crabboxctl ssh --id LEASE --print`".into(),
            ],
        }
        .into());
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
    argv.push(format!("{}@{}", t.user, t.host));
    outln!("{}", argv.join(" "))?;
    Ok(Code::Ok)
}
