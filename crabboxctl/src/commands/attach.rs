//! `crabboxctl attach <run> [--after N]`: follow a run's events the way the
//! reference `crabbox attach` prints them, and exit with the run's exit code.

use std::io::Write as _;

use crabbox_api::v1::{AttachRequest, RunEvent, attach_event::Event};

use crate::{Ctx, connect, exit::Code};

/// Follow a run: its output on stdout/stderr, other events as lines on
/// stderr, then exit with the run's exit code (1 if it failed without one).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The run id (`run_…`).
    run: String,
    /// Start after this event sequence number (0: from the beginning).
    #[arg(long, default_value_t = 0)]
    after: u64,
    /// Print each event as a JSON line on stdout instead (unstable format).
    #[arg(long)]
    json: bool,
}

/// The reference's line for a non-output event:
/// `%04d %-18s phase=<phase|-> at=<createdAt> <message or trimmed data>`.
pub fn event_line(e: &RunEvent) -> String {
    let phase = if e.phase.is_empty() { "-" } else { &e.phase };
    let text = if e.message.is_empty() {
        e.data.trim()
    } else {
        &e.message
    };
    format!(
        "{:04} {:<18} phase={phase} at={} {text}",
        e.seq, e.r#type, e.created_at
    )
}

/// Which local stream an output event belongs to, if it is output.
fn output_stream(e: &RunEvent) -> Option<&str> {
    let s = if e.stream.is_empty() {
        e.r#type.as_str()
    } else {
        e.stream.as_str()
    };
    matches!(s, "stdout" | "stderr").then_some(s)
}

/// Runs `crabboxctl attach`.
pub async fn run(ctx: &Ctx, args: &Args) -> anyhow::Result<Code> {
    let mut client = connect::connect(&ctx.socket).await?;
    let req = AttachRequest {
        run_id: args.run.clone(),
        after: args.after,
    };
    let mut stream = connect::call(&ctx.socket, "Attach", client.rpc().attach(req))
        .await?
        .into_inner();
    let mut stdout = std::io::stdout().lock();
    let mut stderr = std::io::stderr().lock();
    loop {
        let msg = match stream.message().await {
            Ok(Some(m)) => m,
            Ok(None) => anyhow::bail!(
                "crabboxd ended the attach stream before the run ended (is it shutting down?)"
            ),
            Err(status) => return Err(connect::rpc_failed(&ctx.socket, "Attach", &status).into()),
        };
        match msg.event {
            Some(Event::RunEvent(e)) if args.json => {
                writeln!(
                    stdout,
                    "{}",
                    serde_json::json!({"seq": e.seq, "type": e.r#type, "phase": e.phase, "stream": e.stream,
                        "message": e.message, "data": e.data, "exitCode": e.exit_code, "createdAt": e.created_at})
                )?;
            }
            Some(Event::RunEvent(e)) => match output_stream(&e) {
                Some(which) => {
                    let bytes = if e.data.is_empty() {
                        &e.message
                    } else {
                        &e.data
                    };
                    if which == "stdout" {
                        stdout.write_all(bytes.as_bytes())?;
                        stdout.flush()?;
                    } else {
                        stderr.write_all(bytes.as_bytes())?;
                    }
                }
                None => writeln!(stderr, "{}", event_line(&e))?,
            },
            Some(Event::End(end)) => {
                writeln!(
                    stderr,
                    "run {} {} exit={}",
                    args.run,
                    end.state,
                    end.exit_code.map_or("-".to_owned(), |c| c.to_string())
                )?;
                stdout.flush()?;
                let code = match end.exit_code {
                    Some(c) => c.clamp(0, 255) as i32,
                    None if end.state == "succeeded" => 0,
                    None => 1,
                };
                // The run's own exit code, which is not one of crabboxctl's
                // codes: leave directly, everything is flushed.
                std::process::exit(code);
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_line_format() {
        let e = RunEvent {
            seq: 7,
            r#type: "sync.finished".into(),
            phase: "sync".into(),
            message: "synced 12 files".into(),
            created_at: "2026-01-01T00:00:00.000Z".into(),
            ..Default::default()
        };
        assert_eq!(
            event_line(&e),
            "0007 sync.finished      phase=sync at=2026-01-01T00:00:00.000Z synced 12 files"
        );
        let out = RunEvent {
            r#type: "stdout".into(),
            ..Default::default()
        };
        assert_eq!(output_stream(&out), Some("stdout"));
    }
}
