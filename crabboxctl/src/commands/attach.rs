//! `crabboxctl attach <run> [--after N]`: follow a run's events the way the
//! reference `crabbox attach` prints them, and exit with the run's exit code
//! (mapped into 0–255 by [`run_exit_status`]).

use std::io::Write as _;

use crabbox_api::v1::{
    AttachRequest, OutputStream, RunEnd, RunEvent, RunOutcome, attach_event::Event,
};

use crate::{
    Ctx, connect,
    exit::{Code, remote_status},
    output,
};

/// Follow a run: its output on stdout/stderr, other events as lines on
/// stderr, then exit with the run's exit code (1 if it failed without one,
/// or with a code outside 0–255 such as a negative one).
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
    let at = output::timestamp_text(e.created_at.as_ref()).unwrap_or_else(|| "-".to_owned());
    format!("{:04} {:<18} phase={phase} at={at} {text}", e.seq, e.r#type)
}

/// The exit status `attach` leaves with for a run's end.
///
/// A code in 0–255 is the run's own, unchanged; a command its shell saw
/// ended by signal n arrives as 128+n and stays so. Anything else cannot be
/// an exit status: a negative code (recorders report -1 for "ended by a
/// signal, which one unknown") or one above 255 becomes 1, so a failed run
/// never looks like success. Without a code, success is 0 and anything
/// else 1.
pub fn run_exit_status(end: &RunEnd) -> u8 {
    match end.exit_code {
        Some(code) => remote_status(code),
        None if end.outcome() == RunOutcome::Succeeded => 0,
        None => 1,
    }
}

/// The outcome's display name (`succeeded`, `failed`, `unknown`).
pub fn outcome_name(end: &RunEnd) -> &'static str {
    match end.outcome() {
        RunOutcome::Succeeded => "succeeded",
        RunOutcome::Failed => "failed",
        RunOutcome::Unknown | RunOutcome::Unspecified => "unknown",
    }
}

/// Runs `crabboxctl attach`.
pub async fn run(ctx: &Ctx, args: &Args) -> anyhow::Result<Code> {
    let client = connect::connect(&ctx.socket).await?;
    let req = AttachRequest {
        run_id: args.run.clone(),
        after: args.after,
    };
    let mut stream = connect::call_coordinator(&ctx.socket, "Attach", client.runs().attach(req))
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
                let stream = match e.stream() {
                    OutputStream::Stdout => Some("stdout"),
                    OutputStream::Stderr => Some("stderr"),
                    OutputStream::Unspecified => None,
                };
                writeln!(
                    stdout,
                    "{}",
                    serde_json::json!({"seq": e.seq, "type": e.r#type, "phase": e.phase, "stream": stream,
                        "message": e.message, "data": e.data, "exitCode": e.exit_code,
                        "createdAt": output::timestamp_text(e.created_at.as_ref())})
                )?;
            }
            Some(Event::RunEvent(e)) => {
                let text = if e.data.is_empty() {
                    &e.message
                } else {
                    &e.data
                };
                match e.stream() {
                    OutputStream::Stdout => {
                        stdout.write_all(text.as_bytes())?;
                        stdout.flush()?;
                    }
                    OutputStream::Stderr => stderr.write_all(text.as_bytes())?,
                    OutputStream::Unspecified => writeln!(stderr, "{}", event_line(&e))?,
                }
            }
            Some(Event::End(end)) => {
                let status = run_exit_status(&end);
                if args.json {
                    // The end as a last line, so a script can tell the run's
                    // exit status from crabboxctl's own codes.
                    writeln!(
                        stdout,
                        "{}",
                        serde_json::json!({"end": {"outcome": outcome_name(&end),
                            "exitCode": end.exit_code, "detail": end.detail, "exitStatus": status}})
                    )?;
                }
                let detail = if end.detail.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", end.detail)
                };
                writeln!(
                    stderr,
                    "run {} {}{detail} exit={}",
                    args.run,
                    outcome_name(&end),
                    end.exit_code.map_or("-".to_owned(), |c| c.to_string())
                )?;
                stdout.flush()?;
                // The run's own exit status, which is not one of crabboxctl's
                // codes: leave directly, everything is flushed.
                std::process::exit(i32::from(status));
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
            created_at: Some("2026-01-01T00:00:00Z".parse().unwrap()),
            ..Default::default()
        };
        assert_eq!(
            event_line(&e),
            "0007 sync.finished      phase=sync at=2026-01-01T00:00:00.000Z synced 12 files"
        );
    }

    #[test]
    fn exit_status_never_hides_a_failure() {
        let end = |outcome: RunOutcome, code: Option<i64>| RunEnd {
            outcome: outcome as i32,
            exit_code: code,
            detail: String::new(),
        };
        for (outcome, code, want) in [
            (RunOutcome::Succeeded, Some(0), 0),
            (RunOutcome::Failed, Some(3), 3),
            // A command its shell saw killed by SIGKILL: 128 + 9.
            (RunOutcome::Failed, Some(137), 137),
            (RunOutcome::Failed, Some(255), 255),
            // Negative codes (-1: ended by a signal) and codes above 255
            // are not exit statuses; clamping made -1 exit 0.
            (RunOutcome::Failed, Some(-1), 1),
            (RunOutcome::Failed, Some(-9), 1),
            (RunOutcome::Failed, Some(256), 1),
            (RunOutcome::Succeeded, None, 0),
            (RunOutcome::Failed, None, 1),
            (RunOutcome::Unknown, None, 1),
        ] {
            assert_eq!(
                run_exit_status(&end(outcome, code)),
                want,
                "{outcome:?} {code:?}"
            );
        }
    }
}
