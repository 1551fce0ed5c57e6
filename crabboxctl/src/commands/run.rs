//! `crabboxctl run --id L [--cwd DIR] [--allow-env NAME|PREFIX*]… [--egress]
//! [--label TEXT] [--detach] -- CMD [ARGS…]`: a command on a lease as a run
//! the daemon owns, recorded at the coordinator. Output streams here
//! byte-exact; the exit code is the command's (128+n for signal n). Ctrl-C
//! stops the run (its remote process group; a second Ctrl-C sends SIGKILL);
//! closing the terminal or killing this process does not: `crabboxctl
//! attach <run>` follows it again. `run list` and `run stop <run>` manage
//! the daemon's runs.
//!
//! The allowlist is evaluated by the daemon against this process's
//! environment, which is sent over the 0600 socket; `CRABBOX_ENV_ALLOW` is
//! read here (the daemon's own environment is not the user's shell's).

use std::io::{IsTerminal as _, Write as _};

use crabbox_api::v1::{
    EnvVar, ListRunsRequest, RunFinished, RunOutcome, Signal, StartRunRequest, StopRunRequest,
    start_run_response::Event,
};

use crate::{
    Ctx, connect,
    exit::{Code, remote_status},
    output,
};

/// Run a command on a lease as a daemon-owned run recorded at the coordinator.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Args {
    #[command(subcommand)]
    sub: Option<Sub>,
    #[command(flatten)]
    start: StartArgs,
}

#[derive(Debug, clap::Subcommand)]
enum Sub {
    /// List the runs this daemon owns (running, or ended in the last 10 minutes).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop a run: its remote process group gets SIGTERM (SIGKILL 2 s later).
    Stop {
        /// The run id (`run_…`).
        run: String,
        /// Send SIGKILL at once.
        #[arg(long)]
        kill: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `run --id L … -- CMD`.
#[derive(Debug, clap::Args)]
struct StartArgs {
    /// The lease id or slug.
    #[arg(long = "id", value_name = "LEASE", required = true)]
    lease: Option<String>,
    /// The remote working directory.
    #[arg(long, value_name = "DIR")]
    cwd: Option<String>,
    /// Also forward this variable (or every one starting with PREFIX); repeatable.
    #[arg(long = "allow-env", value_name = "NAME|PREFIX*")]
    allow_env: Vec<String>,
    /// Point HTTP(S)_PROXY and ALL_PROXY at the lease's running egress helper.
    #[arg(long)]
    egress: bool,
    /// A label recorded with the run.
    #[arg(long, value_name = "TEXT")]
    label: Option<String>,
    /// Print the run id and return at once; the run goes on.
    #[arg(long)]
    detach: bool,
    /// Print the start and the end as JSON lines on stderr (with --detach:
    /// the start on stdout); the command's output is unchanged.
    #[arg(long)]
    json: bool,
    /// The command and its arguments (after `--`).
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    command: Vec<String>,
}

/// The exit code when the command has none (it could not run, or the
/// connection was lost): ssh's own 255.
pub const NO_EXIT_CODE: i32 = 255;

/// Runs `crabboxctl run …`.
pub async fn run(ctx: &Ctx, args: &Args) -> anyhow::Result<Code> {
    match &args.sub {
        Some(Sub::List { json }) => list(ctx, *json).await,
        Some(Sub::Stop { run, kill, json }) => stop(ctx, run, *kill, *json).await,
        None => start(ctx, &args.start).await,
    }
}

fn outcome_name(f: &RunFinished) -> &'static str {
    match f.outcome() {
        RunOutcome::Succeeded => "succeeded",
        RunOutcome::Failed => "failed",
        RunOutcome::Unknown | RunOutcome::Unspecified => "unknown",
    }
}

/// A run's end as JSON (`run --json`, `run list --json`).
pub fn finished_json(f: &RunFinished) -> serde_json::Value {
    serde_json::json!({"outcome": outcome_name(f), "exitCode": f.exit_code, "signal": f.signal,
        "detail": f.detail, "eventsPosted": f.events_posted, "eventsDropped": f.events_dropped,
        "outputTruncated": f.output_truncated, "outputBytes": f.output_bytes})
}

async fn list(ctx: &Ctx, json: bool) -> anyhow::Result<Code> {
    let client = connect::connect(&ctx.socket).await?;
    let runs = connect::call(
        &ctx.socket,
        "ListRuns",
        client.runs().list_runs(ListRunsRequest {}),
    )
    .await?
    .into_inner()
    .runs;
    if json {
        let v: Vec<serde_json::Value> = runs
            .iter()
            .map(|r| {
                serde_json::json!({"runId": r.run_id, "leaseId": r.lease_id, "argv": r.argv,
                    "label": r.label, "running": r.running,
                    "startedAt": output::timestamp_text(r.started_at.as_ref()),
                    "endedAt": output::timestamp_text(r.ended_at.as_ref()),
                    "finished": r.finished.as_ref().map(finished_json)})
            })
            .collect();
        output::print_json(&v)?;
        return Ok(Code::Ok);
    }
    if runs.is_empty() {
        output::write_stdout(format_args!(
            "no runs (start one with `crabboxctl run --id LEASE -- CMD`)\n"
        ))?;
        return Ok(Code::Ok);
    }
    let now = output::now_unix_ms();
    for r in &runs {
        let state = match &r.finished {
            None => "running".to_owned(),
            Some(f) => format!(
                "{} exit={}",
                outcome_name(f),
                f.exit_code.map_or("-".to_owned(), |c| c.to_string())
            ),
        };
        let since = r
            .started_at
            .as_ref()
            .map(|t| output::ago(output::unix_ms(t), now))
            .unwrap_or_default();
        output::write_stdout(format_args!(
            "{}  {}  {:<18}  {:>8}  {}\n",
            r.run_id,
            r.lease_id,
            state,
            since,
            r.argv.join(" ")
        ))?;
    }
    Ok(Code::Ok)
}

async fn stop(ctx: &Ctx, run: &str, kill: bool, json: bool) -> anyhow::Result<Code> {
    let client = connect::connect(&ctx.socket).await?;
    let sig = if kill { Signal::Kill } else { Signal::Term };
    let reply = connect::call(
        &ctx.socket,
        "StopRun",
        client.runs().stop_run(StopRunRequest {
            run_id: run.to_owned(),
            signal: sig as i32,
        }),
    )
    .await?
    .into_inner();
    if json {
        output::print_json(&serde_json::json!({"runId": run, "wasRunning": reply.was_running}))?;
    } else if reply.was_running {
        output::write_stdout(format_args!(
            "stopping run {run}; `crabboxctl attach {run}` shows its end\n"
        ))?;
    } else {
        output::write_stdout(format_args!("run {run} had already ended\n"))?;
    }
    Ok(Code::Ok)
}

/// This process's environment, for the daemon's allowlist to choose from.
pub fn client_env() -> Vec<EnvVar> {
    std::env::vars_os()
        .filter_map(|(k, v)| {
            Some(EnvVar {
                name: k.into_string().ok()?,
                value: v.into_string().ok()?,
            })
        })
        .collect()
}

async fn start(ctx: &Ctx, args: &StartArgs) -> anyhow::Result<Code> {
    // Ctrl-C from now on stops the run (once it exists), never this
    // process alone.
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let client = connect::connect(&ctx.socket).await?;
    let req = StartRunRequest {
        lease_id: args.lease.clone().unwrap_or_default(),
        argv: args.command.clone(),
        cwd: args.cwd.clone().unwrap_or_default(),
        label: args.label.clone().unwrap_or_default(),
        client_env: client_env(),
        env_allow: std::env::var("CRABBOX_ENV_ALLOW").ok(),
        allow_env: args.allow_env.clone(),
        egress: args.egress,
        detach: args.detach,
        agent_socket: super::exec::agent_socket(),
    };
    let mut replies =
        connect::call_coordinator(&ctx.socket, "StartRun", client.runs().start_run(req))
            .await?
            .into_inner();
    let mut stdout = std::io::stdout().lock();
    let mut stderr = std::io::stderr();
    let mut run_id = String::new();
    let mut stops = 0;
    let mut pending: Option<Signal> = None;
    loop {
        let sig = tokio::select! {
            m = replies.message() => {
                match m {
                    Ok(Some(reply)) => {
                        match reply.event {
                            Some(Event::Started(s)) => {
                                run_id = s.run_id.clone();
                                if let Some(sig) = pending.take() {
                                    // Ctrl-C came while the run was being created.
                                    stops += 1;
                                    let _ = client.clone().runs().stop_run(StopRunRequest {
                                        run_id: run_id.clone(),
                                        signal: sig as i32,
                                    }).await;
                                }
                                if !s.env_summary.is_empty() {
                                    writeln!(stderr, "crabboxctl: {}", s.env_summary)?;
                                }
                                let start = serde_json::json!({"runId": s.run_id, "leaseId": s.lease_id,
                                    "slug": s.slug, "proxy": s.proxy,
                                    "forwarded": s.forwarded.iter().map(|f| &f.name).collect::<Vec<_>>()});
                                if args.detach {
                                    if args.json {
                                        output::print_json(&start)?;
                                    } else {
                                        writeln!(stdout, "{}", s.run_id)?;
                                    }
                                    return Ok(Code::Ok);
                                }
                                if args.json {
                                    writeln!(stderr, "{start}")?;
                                } else if stderr.is_terminal() {
                                    writeln!(stderr, "crabboxctl: recording run {} on {}", s.run_id, s.lease_id)?;
                                }
                            }
                            Some(Event::Stdout(b)) => {
                                stdout.write_all(&b)?;
                                stdout.flush()?;
                            }
                            Some(Event::Stderr(b)) => stderr.write_all(&b)?,
                            Some(Event::Finished(f)) => {
                                stdout.flush()?;
                                if args.json {
                                    writeln!(stderr, "{}", serde_json::json!({"runId": run_id, "end": finished_json(&f)}))?;
                                }
                                if f.events_dropped > 0 {
                                    writeln!(stderr, "crabboxctl: {} output events of run {run_id} were dropped (the coordinator was slower than the command); the full tail is in the run's log", f.events_dropped)?;
                                }
                                if !f.detail.is_empty() {
                                    writeln!(stderr, "crabboxctl: run {run_id}: {}", f.detail)?;
                                }
                                let code = f.exit_code.map_or(NO_EXIT_CODE, |c| i32::from(remote_status(c)));
                                // The command's exit code, not one of
                                // crabboxctl's: leave directly, all is flushed.
                                std::process::exit(code);
                            }
                            None => {}
                        }
                        continue;
                    }
                    Ok(None) => {
                        stdout.flush()?;
                        eprintln!("crabboxctl: crabboxd ended the stream of run {run_id} before the run ended; `crabboxctl attach {run_id}` follows it");
                        std::process::exit(NO_EXIT_CODE);
                    }
                    Err(status) => {
                        stdout.flush()?;
                        if run_id.is_empty() {
                            return Err(connect::rpc_failed(&ctx.socket, "StartRun", &status).into());
                        }
                        eprintln!("crabboxctl: {}; `crabboxctl attach {run_id}` follows the run", status.message());
                        std::process::exit(NO_EXIT_CODE);
                    }
                }
            }
            _ = sigint.recv() => Signal::Int,
            _ = sigterm.recv() => Signal::Term,
        };
        if run_id.is_empty() {
            // Not created yet: stop it as soon as it is.
            pending.get_or_insert(sig);
            continue;
        }
        stops += 1;
        let sig = if stops > 1 { Signal::Kill } else { sig };
        let c = client.clone();
        let _ = c
            .runs()
            .stop_run(StopRunRequest {
                run_id: run_id.clone(),
                signal: sig as i32,
            })
            .await;
    }
}
