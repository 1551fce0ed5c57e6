//! `crabboxctl log-level <filter>`: SetLogLevel, which swaps the daemon's
//! tracing filter until it exits.

use crabbox_api::v1::SetLogLevelRequest;
use serde::Serialize;

use crate::{Ctx, connect, exit::Code, output};

/// Change the daemon's log filter until it exits (or the filter is set again).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The new filter in CRABBOX_LOG / tracing EnvFilter syntax, for example
    /// `debug` or `info,crabboxd::egress=trace`.
    filter: String,

    /// Print JSON (for scripts; the format is unstable until promised).
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Reply {
    previous: String,
    current: String,
}

/// Runs `crabboxctl log-level`.
pub async fn run(ctx: &Ctx, args: &Args) -> anyhow::Result<Code> {
    let client = connect::connect(&ctx.socket).await?;
    let req = SetLogLevelRequest {
        filter: args.filter.clone(),
    };
    let reply = connect::call(
        &ctx.socket,
        "SetLogLevel",
        client.daemon().set_log_level(req),
    )
    .await?
    .into_inner();
    if args.json {
        output::print_json(&Reply {
            previous: reply.previous,
            current: reply.current,
        })?;
    } else {
        outln!("log filter: {} -> {}", reply.previous, reply.current)?;
    }
    Ok(Code::Ok)
}
