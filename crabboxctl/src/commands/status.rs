//! `crabboxctl status`: GetStatus, rendered, with the version-skew sentence
//! when crabboxctl and crabboxd differ.

use crabbox_api::version::Skew;

use crate::{Ctx, connect, exit::Code, output};

/// Show the daemon's version, configuration and task counts.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print JSON (for scripts; the format is unstable until promised).
    #[arg(long)]
    json: bool,
}

/// Runs `crabboxctl status`.
pub async fn run(ctx: &Ctx, args: &Args) -> anyhow::Result<Code> {
    let client = connect::connect(&ctx.socket).await?;
    let (status, skew) = connect::call(&ctx.socket, "GetStatus", client.status()).await?;
    if args.json {
        output::print_json(&output::status_json(&status, &skew))?;
    } else {
        out!("{}", output::status_human(&status, output::now_unix_ms()))?;
    }
    // The sentence goes to stderr so `--json` stays parseable and a script
    // still sees it.
    if skew != Skew::None {
        eprintln!("warning: {skew}");
    }
    Ok(Code::Ok)
}
