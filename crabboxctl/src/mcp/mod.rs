//! `crabboxctl mcp`: a Model Context Protocol server on stdin/stdout, one
//! more thin client of the daemon's gRPC API. Each tool is one RPC (or one
//! stream read to a bound); results are JSON text of at most 64 KiB with a
//! cursor or run id for the rest; failures are tool errors carrying the
//! sentences and hints the other commands print.
//!
//! Layout: `tools` holds the tool router (one method per tool, with its
//! argument schema and annotations); `bound` fits output and lists into the
//! result budget.

mod bound;
mod tools;

use rmcp::ServiceExt as _;

use crate::{Ctx, exit::Code};

/// Serve the daemon's API to an MCP client (a coding agent) on stdin/stdout.
///
/// Agents start it from their configuration as
/// `{"command": "crabboxctl", "args": ["mcp"]}`. It reads JSON-RPC on stdin,
/// answers on stdout, and ends when stdin closes. Nothing else is written to
/// stdout.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `crabboxctl mcp` until the client closes stdin.
pub async fn run(ctx: &Ctx, _args: &Args) -> anyhow::Result<Code> {
    let server = tools::Crabbox::new(ctx.clone());
    let service = server
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| anyhow::anyhow!("the MCP client did not complete the handshake: {e}"))?;
    service.waiting().await?;
    Ok(Code::Ok)
}
