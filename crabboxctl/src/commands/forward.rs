//! `crabboxctl forward --id L [--local 127.0.0.1:PORT] --remote HOST:PORT`:
//! a local forward over the daemon's SSH connection, run by the daemon as a
//! supervised `ssh-forward` task (loopback-only listener; port 0 picks one
//! and the reply says which). `forward list` and `forward stop` manage them.

use crabbox_api::v1::{Forward, ListForwardsRequest, StartForwardRequest, StopForwardRequest};
use serde::Serialize;

use crate::{
    Ctx, connect,
    exit::{Code, Failure},
    output,
};

/// Forward a local loopback port to an address on a lease.
///
/// The daemon listens on the local address (loopback only; port 0, the
/// default, picks a free port) and carries every connection to REMOTE as the
/// lease sees it, over the lease's SSH connection, until the lease ends or
/// `forward stop`. A forward survives reconnects of the SSH connection.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    start: StartArgs,
}

#[derive(Debug, clap::Args)]
struct StartArgs {
    /// The lease id (or a static target from crabboxd.toml).
    #[arg(long = "id", value_name = "LEASE")]
    lease: Option<String>,
    /// The local listen address: 127.0.0.1:PORT, [::1]:PORT or a port.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    local: String,
    /// Where connections go, as the lease sees it: HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    remote: Option<String>,
    /// Print JSON (unstable format).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// List the running forwards.
    List {
        /// Only this lease's forwards.
        #[arg(long = "id", value_name = "LEASE")]
        lease: Option<String>,
        /// Print JSON (unstable format).
        #[arg(long)]
        json: bool,
    },
    /// Stop a forward: by its id (from `forward list`), or --id and --local.
    Stop {
        /// The forward's id, `LEASE:ADDR`.
        #[arg(value_name = "ID", conflicts_with_all = ["lease", "local"])]
        id: Option<String>,
        /// The lease id.
        #[arg(long = "id", value_name = "LEASE", requires = "local")]
        lease: Option<String>,
        /// The local address the forward listens on.
        #[arg(long, value_name = "ADDR", requires = "lease")]
        local: Option<String>,
        /// Print JSON (unstable format).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Serialize)]
struct ForwardJson {
    id: String,
    lease: String,
    local: String,
    remote: String,
    open_connections: u64,
    total_connections: u64,
    refused_connections: u64,
    bytes_out: u64,
    bytes_in: u64,
}

fn json(f: &Forward) -> ForwardJson {
    ForwardJson {
        id: f.id.clone(),
        lease: f.lease_id.clone(),
        local: f.local.clone(),
        remote: f.remote.clone(),
        open_connections: f.open_connections,
        total_connections: f.total_connections,
        refused_connections: f.refused_connections,
        bytes_out: f.bytes_out,
        bytes_in: f.bytes_in,
    }
}

fn usage(message: &str) -> anyhow::Error {
    Failure {
        code: Code::Usage,
        message: message.to_owned(),
        hints: vec![
            "start one with `crabboxctl forward --id LEASE --remote HOST:PORT [--local 127.0.0.1:PORT]`"
                .into(),
            "stop one with `crabboxctl forward stop ID` or `crabboxctl forward stop --id LEASE --local ADDR`"
                .into(),
        ],
    }
    .into()
}

/// Runs `crabboxctl forward`.
pub async fn run(ctx: &Ctx, args: &Args) -> anyhow::Result<Code> {
    match &args.command {
        None => start(ctx, &args.start).await,
        Some(Command::List {
            lease,
            json: as_json,
        }) => {
            let client = connect::connect(&ctx.socket).await?;
            let reply = connect::call(
                &ctx.socket,
                "ListForwards",
                client.ssh().list_forwards(ListForwardsRequest {
                    lease_id: lease.clone().unwrap_or_default(),
                }),
            )
            .await?
            .into_inner();
            if *as_json {
                let all: Vec<ForwardJson> = reply.forwards.iter().map(json).collect();
                output::print_json(&all)?;
            } else if reply.forwards.is_empty() {
                outln!("no forwards")?;
            } else {
                outln!("ID\tLOCAL\tREMOTE\tOPEN\tTOTAL\tOUT\tIN")?;
                for f in &reply.forwards {
                    outln!(
                        "{}\t{}\t{}\t{}\t{}\t{}\t{}",
                        f.id,
                        f.local,
                        f.remote,
                        f.open_connections,
                        f.total_connections,
                        f.bytes_out,
                        f.bytes_in
                    )?;
                }
            }
            Ok(Code::Ok)
        }
        Some(Command::Stop {
            id,
            lease,
            local,
            json: as_json,
        }) => {
            if id.is_none() && lease.is_none() {
                return Err(usage("name the forward to stop"));
            }
            let client = connect::connect(&ctx.socket).await?;
            let f = connect::call(
                &ctx.socket,
                "StopForward",
                client.ssh().stop_forward(StopForwardRequest {
                    id: id.clone().unwrap_or_default(),
                    lease_id: lease.clone().unwrap_or_default(),
                    local: local.clone().unwrap_or_default(),
                }),
            )
            .await?
            .into_inner();
            if *as_json {
                output::print_json(&json(&f))?;
            } else {
                outln!("stopped forward {} ({} -> {})", f.id, f.local, f.remote)?;
            }
            Ok(Code::Ok)
        }
    }
}

async fn start(ctx: &Ctx, args: &StartArgs) -> anyhow::Result<Code> {
    let (Some(lease), Some(remote)) = (&args.lease, &args.remote) else {
        return Err(usage("a forward needs --id LEASE and --remote HOST:PORT"));
    };
    let client = connect::connect(&ctx.socket).await?;
    // Starting waits for the lease's connection (and its lookup).
    let f = connect::call_coordinator(
        &ctx.socket,
        "StartForward",
        client.ssh().start_forward(StartForwardRequest {
            lease_id: lease.clone(),
            local: args.local.clone(),
            remote: remote.clone(),
            agent_socket: crate::commands::exec::agent_socket(),
        }),
    )
    .await?
    .into_inner();
    if args.json {
        output::print_json(&json(&f))?;
    } else {
        outln!(
            "forwarding {} -> {} on {} (id {}; stop with `crabboxctl forward stop {}`)",
            f.local,
            f.remote,
            f.lease_id,
            f.id,
            f.id
        )?;
    }
    Ok(Code::Ok)
}
