//! `crabboxctl heartbeat --id L`: one heartbeat now, printed the way the
//! reference `crabbox heartbeat` prints it.

use crabbox_api::v1::HeartbeatRequest;

use super::lease::{LeaseJson, heartbeat_line, idle_timeout};
use crate::{Ctx, connect, exit::Code, output};

/// Send one heartbeat for a lease now and print the coordinator's record.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The lease id or slug.
    #[arg(long)]
    id: String,
    /// Override the idle timeout, e.g. `45m`.
    #[arg(long, value_parser = humantime::parse_duration)]
    idle_timeout: Option<std::time::Duration>,
    /// Print JSON `{id,slug,provider,state,lastTouchedAt,idleTimeout,expiresAt,…}`.
    #[arg(long)]
    json: bool,
}

/// Runs `crabboxctl heartbeat`.
pub async fn run(ctx: &Ctx, args: &Args) -> anyhow::Result<Code> {
    let client = connect::connect(&ctx.socket).await?;
    let req = HeartbeatRequest {
        lease_id: args.id.clone(),
        idle_timeout: idle_timeout(args.idle_timeout),
    };
    let lease = connect::call_coordinator(&ctx.socket, "Heartbeat", client.leases().heartbeat(req))
        .await?
        .into_inner()
        .lease
        .unwrap_or_default();
    if args.json {
        output::print_json(&LeaseJson::from(&lease))?;
    } else {
        outln!("{}", heartbeat_line(&lease))?;
    }
    Ok(Code::Ok)
}
