//! The MCP tools: one per daemon RPC, each with a description an agent can
//! act on, a JSON schema of its arguments, and read-only / destructive
//! annotations. Every tool returns JSON text within [`bound::RESULT_LIMIT`];
//! failures become tool errors with crabboxctl's own sentences and hints.

use std::time::Duration;

use crabbox_api::v1::{
    AttachRequest, CopyDirection, CopyRequest, ExecCancel, ExecRequest, ExecStart,
    GetEgressStatusRequest, HeartbeatRequest, KeepLeaseRequest, ListEgressHostsRequest,
    ListLeasesRequest, ListRunsRequest, ListTasksRequest, OutputStream, ReleaseLeaseRequest,
    RunEnd, Signal, StartEgressRequest, StartRunRequest, StdinEof, StopEgressRequest,
    StopKeepingLeaseRequest, StopRunRequest, TaskKind, attach_event, exec_request::Msg,
    exec_response::Event, start_egress_event, start_run_response,
};
use rmcp::{
    ServerHandler,
    handler::server::{router::tool::ToolRouter, wrapper::Parameters},
    model::{CallToolResult, ContentBlock, Implementation, ServerCapabilities, ServerConfig},
    schemars::{self, JsonSchema},
    tool, tool_handler, tool_router,
};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::{sync::mpsc, time::Instant};
use tokio_stream::wrappers::ReceiverStream;

use super::bound::{self, PAYLOAD_BUDGET, RESULT_LIMIT, TailBuffer};
use crate::{
    Ctx,
    commands::{attach, cp, egress, exec as exec_cmd, lease, run as run_cmd},
    connect,
    exit::{self, Failure},
    output,
};

/// Default and longest wait of `exec` for its command.
const EXEC_DEFAULT_SECS: u64 = 120;
const EXEC_MAX_SECS: u64 = 3600;
/// How long a timed-out command gets after SIGTERM before SIGKILL, and after
/// SIGKILL before the tool gives up on its exit status.
const EXEC_GRACE: Duration = Duration::from_secs(5);
/// The largest stdin `exec` forwards.
const EXEC_STDIN_MAX: usize = 1024 * 1024;
/// Raw bytes of each output stream `exec` keeps (the tail).
const EXEC_KEEP: usize = 64 * 1024;

/// Default and longest time `run_output` waits for a first new event.
const RUN_OUTPUT_DEFAULT_WAIT: u64 = 5;
const RUN_OUTPUT_MAX_WAIT: u64 = 60;
/// Once events flow, `run_output` returns after this long without one.
const RUN_OUTPUT_QUIET: Duration = Duration::from_millis(300);
/// Default and longest wait of `run_wait`.
const RUN_WAIT_DEFAULT_SECS: u64 = 300;
const RUN_WAIT_MAX_SECS: u64 = 3600;
/// The output tail `run_wait` returns with the end, per stream.
const RUN_WAIT_TAIL: usize = 16 * 1024;

/// Default and longest time a copy may take.
const COPY_DEFAULT_SECS: u64 = 600;
const COPY_MAX_SECS: u64 = 3600;

/// The MCP server: the daemon's socket and the tool router.
#[derive(Debug, Clone)]
pub struct Crabbox {
    ctx: Ctx,
    tool_router: ToolRouter<Self>,
}

/// Arguments that name one lease.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaseArgs {
    /// The lease id (`cbx_…`), slug, or a static target name from crabboxd.toml.
    pub lease_id: String,
}

/// Arguments of a list tool.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PageArgs {
    /// The `next_cursor` of the previous page; omit for the first page.
    pub cursor: Option<String>,
}

/// Arguments of `lease_keep` and `lease_heartbeat`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KeepArgs {
    /// The lease id (`cbx_…`) or slug.
    pub lease_id: String,
    /// Override the lease's idle timeout, in seconds (at least 15: three heartbeats at the fastest cadence).
    pub idle_timeout_seconds: Option<u64>,
}

/// Arguments of `lease_release`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReleaseArgs {
    /// The lease id (`cbx_…`) or slug.
    pub lease_id: String,
    /// Also ask the coordinator to delete the machine (default false).
    #[serde(default)]
    pub delete: bool,
}

/// Arguments of `exec`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecArgs {
    /// The lease id (`cbx_…`) or a static target name from crabboxd.toml.
    pub lease_id: String,
    /// The command as an argv; every word reaches it unchanged. For pipes,
    /// redirection or `&&`, pass `["sh", "-c", "…"]`.
    pub command: Vec<String>,
    /// The remote working directory (default: the login directory).
    pub cwd: Option<String>,
    /// Text to feed the command's stdin (at most 1 MiB); it then reads EOF.
    /// Without it stdin is empty.
    pub stdin: Option<String>,
    /// How long to wait for the command, in seconds (default 120, at most
    /// 3600). Past it the command gets SIGTERM, then SIGKILL.
    pub timeout_seconds: Option<u64>,
}

/// Arguments of the copy tools.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CopyArgs {
    /// The lease id (`cbx_…`) or a static target name from crabboxd.toml.
    pub lease_id: String,
    /// The path on this machine (relative paths are taken from the
    /// directory crabboxctl mcp runs in).
    pub local_path: String,
    /// The path on the lease (relative paths are taken from the login
    /// directory).
    pub remote_path: String,
    /// How long the copy may take, in seconds (default 600, at most 3600).
    pub timeout_seconds: Option<u64>,
}

/// Arguments of `tasks_list`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TasksArgs {
    /// Only tasks of this kind: api-server, control-channel, lease-keeper,
    /// egress-host, egress-remote-client, ssh-mux, attach-feed, run.
    pub kind: Option<String>,
    /// The `next_cursor` of the previous page; omit for the first page.
    pub cursor: Option<String>,
}

/// Arguments of `egress_start`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EgressStartArgs {
    /// The lease id (`cbx_…`) or slug.
    pub lease_id: String,
    /// Allowlist profiles: `discord`, `slack`, or one from crabboxd.toml.
    /// At least one profile or allow entry is required.
    #[serde(default)]
    pub profiles: Vec<String>,
    /// Allowed hosts: `example.com`, `*.example.com`, IP literals.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Allow private addresses listed literally in `allow` (local demos and
    /// tests only).
    #[serde(default)]
    pub allow_private: bool,
    /// The helper's loopback listen address on the lease (default
    /// 127.0.0.1:3128).
    pub listen: Option<String>,
}

/// Arguments of `run_start`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunStartArgs {
    /// The lease id (`cbx_…`) or slug.
    pub lease_id: String,
    /// The command as an argv; every word reaches it unchanged. For pipes,
    /// redirection or `&&`, pass `["sh", "-c", "…"]`.
    pub command: Vec<String>,
    /// The remote working directory (default: the login directory).
    pub cwd: Option<String>,
    /// A label recorded with the run.
    pub label: Option<String>,
    /// Also forward these variables of this process's environment: a name,
    /// or a prefix ending in `*` (a bare `*` is refused). CI and
    /// NODE_OPTIONS are forwarded by default.
    #[serde(default)]
    pub allow_env: Vec<String>,
    /// Send the command's HTTP(S) traffic through the lease's running
    /// egress helper (refused when none runs; start one with egress start).
    #[serde(default)]
    pub egress: bool,
}

/// Arguments of `run_stop`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunStopArgs {
    /// The run id (`run_…`).
    pub run_id: String,
    /// Send SIGKILL at once instead of SIGTERM (SIGKILL follows 2 s later
    /// anyway).
    #[serde(default)]
    pub kill: bool,
}

/// Arguments of `run_output`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunOutputArgs {
    /// The run id (`run_…`).
    pub run_id: String,
    /// Return events after this sequence number: 0 (the default) from the
    /// start, else the `next_cursor` of the previous call.
    #[serde(default)]
    pub cursor: u64,
    /// How long to wait for a first new event when none is there yet, in
    /// seconds (default 5, at most 60).
    pub wait_seconds: Option<u64>,
}

/// Arguments of `run_wait`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunWaitArgs {
    /// The run id (`run_…`).
    pub run_id: String,
    /// Skip events up to this sequence number (default 0).
    #[serde(default)]
    pub cursor: u64,
    /// How long to wait for the end, in seconds (default 300, at most 3600).
    pub timeout_seconds: Option<u64>,
}

/// A tool's outcome as an MCP result: the JSON text of a success (within
/// [`RESULT_LIMIT`]), or a tool error with crabboxctl's message and hints.
fn reply(result: anyhow::Result<Value>) -> CallToolResult {
    match result {
        Ok(v) => {
            let text = v.to_string();
            if text.len() > RESULT_LIMIT {
                // Every tool trims to its budget; this is the last guard,
                // so an agent never receives more than it was promised.
                return CallToolResult::error(vec![ContentBlock::text(format!(
                    "the result would be {} bytes, over the {RESULT_LIMIT}-byte limit; ask for less \
                     (a cursor, a smaller page, or the output in a file on the lease)",
                    text.len()
                ))]);
            }
            CallToolResult::success(vec![ContentBlock::text(text)])
        }
        Err(e) => CallToolResult::error(vec![ContentBlock::text(exit::report(&e).0)]),
    }
}

/// Refuses a local path inside crabbox's own directories or `~/.ssh`
/// ([`crate::dirs::private_roots`]), through links and `..` too.
fn refuse_private(local: &std::path::Path) -> anyhow::Result<()> {
    refuse_inside(local, &crate::dirs::private_roots()?)
}

fn refuse_inside(local: &std::path::Path, roots: &[std::path::PathBuf]) -> anyhow::Result<()> {
    let target = crate::dirs::resolved(local);
    for root in roots {
        if target.starts_with(crate::dirs::resolved(root)) {
            return Err(Failure {
                code: exit::Code::Usage,
                message: format!(
                    "local_path {} is inside {}, which holds crabbox's credentials and state or SSH keys: the copy tools do not read or write there",
                    local.display(),
                    root.display()
                ),
                hints: vec!["copy a file from or into the project's directory instead".into()],
            }
            .into());
        }
    }
    Ok(())
}

/// A failure for arguments the schema cannot catch.
fn bad_args(message: impl Into<String>) -> anyhow::Error {
    Failure {
        code: exit::Code::Usage,
        message: message.into(),
        hints: Vec::new(),
    }
    .into()
}

fn lease_arg(id: &str) -> anyhow::Result<String> {
    let id = id.trim();
    if id.is_empty() {
        return Err(bad_args(
            "lease_id is empty; `lease_list` shows the kept leases",
        ));
    }
    Ok(id.to_owned())
}

fn seconds(given: Option<u64>, default: u64, max: u64) -> Duration {
    Duration::from_secs(given.unwrap_or(default).clamp(1, max))
}

fn to_value(v: &impl serde::Serialize) -> anyhow::Result<Value> {
    Ok(serde_json::to_value(v)?)
}

/// A page of `items`, each rendered by `json`, as `{"<key>": […],
/// "next_cursor": …}`.
fn paged<T, J: serde::Serialize>(
    key: &str,
    items: &[T],
    json: impl Fn(&T) -> J,
    cursor: Option<&str>,
) -> anyhow::Result<Value> {
    let items = items
        .iter()
        .map(|i| to_value(&json(i)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (items, next) = bound::page(items, cursor).map_err(bad_args)?;
    Ok(json!({ key: items, "next_cursor": next }))
}

fn kind_arg(kind: &str) -> anyhow::Result<TaskKind> {
    (1..)
        .map_while(|n| TaskKind::try_from(n).ok())
        .find(|k| output::kind_name(*k as i32) == kind)
        .ok_or_else(|| {
            let all: Vec<String> = (1..)
                .map_while(|n| TaskKind::try_from(n).ok())
                .map(|k| output::kind_name(k as i32))
                .collect();
            bad_args(format!(
                "\"{}\" is not a task kind; use one of {}",
                kind.escape_debug(),
                all.join(", ")
            ))
        })
}

/// An output tail fitted to `budget` JSON bytes: the text and how many
/// bytes before it were left out in all.
fn fitted_tail(buf: &TailBuffer, budget: usize) -> (String, u64) {
    let (text, dropped) = buf.text();
    let (kept, cut) = bound::tail(&text, budget);
    (kept.to_owned(), dropped + cut as u64)
}

/// Fits two output streams into [`PAYLOAD_BUDGET`] together.
fn two_tails(out: &TailBuffer, err: &TailBuffer, budget: usize) -> [(String, u64); 2] {
    let (o, _) = out.text();
    let (e, _) = err.text();
    let (bo, be) = bound::split_budget(bound::json_str_len(&o), bound::json_str_len(&e), budget);
    [fitted_tail(out, bo), fitted_tail(err, be)]
}

fn end_json(end: &RunEnd) -> Value {
    json!({
        "outcome": attach::outcome_name(end),
        "exit_code": end.exit_code,
        "detail": bound::head(&end.detail, TEXT_FIELD_MAX).0,
    })
}

/// At most this much of a run event's or end's free text (phase, message,
/// detail) goes into a result; the data has the rest of the budget.
const TEXT_FIELD_MAX: usize = 4096;

#[tool_router]
impl Crabbox {
    /// A server for the daemon at `ctx.socket`.
    pub fn new(ctx: Ctx) -> Self {
        Crabbox {
            ctx,
            tool_router: Self::tool_router(),
        }
    }

    #[tool(
        description = "List the leases crabboxd keeps alive: id, slug, provider, state, heartbeat interval, last heartbeat, expiry and last error. Paged: pass next_cursor back as cursor for more.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn lease_list(&self, Parameters(args): Parameters<PageArgs>) -> CallToolResult {
        reply(
            async {
                let client = connect::connect(&self.ctx.socket).await?;
                let leases = connect::call(
                    &self.ctx.socket,
                    "ListLeases",
                    client.leases().list_leases(ListLeasesRequest {}),
                )
                .await?
                .into_inner()
                .leases;
                paged("leases", &leases, lease::kept_json, args.cursor.as_deref())
            }
            .await,
        )
    }

    #[tool(
        description = "Keep a lease alive: crabboxd heartbeats it now, then every idle_timeout/3 (5-60 s), until it ends, is released, or lease_stop_keeping; this survives daemon restarts. Returns the kept lease. Use it before working on a lease so it does not idle out.",
        annotations(
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = true
        )
    )]
    async fn lease_keep(&self, Parameters(args): Parameters<KeepArgs>) -> CallToolResult {
        reply(
            async {
                let req = KeepLeaseRequest {
                    lease_id: lease_arg(&args.lease_id)?,
                    idle_timeout: lease::idle_timeout(
                        args.idle_timeout_seconds.map(Duration::from_secs),
                    ),
                };
                let client = connect::connect(&self.ctx.socket).await?;
                let kept = connect::call_coordinator(
                    &self.ctx.socket,
                    "KeepLease",
                    client.leases().keep_lease(req),
                )
                .await?
                .into_inner()
                .lease
                .unwrap_or_default();
                to_value(&lease::kept_json(&kept))
            }
            .await,
        )
    }

    #[tool(
        description = "Stop keeping a lease alive without releasing it: heartbeats stop and the lease idles out at the coordinator later. Nothing on the lease changes.",
        annotations(
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn lease_stop_keeping(&self, Parameters(args): Parameters<LeaseArgs>) -> CallToolResult {
        reply(
            async {
                let lease_id = lease_arg(&args.lease_id)?;
                let client = connect::connect(&self.ctx.socket).await?;
                connect::call(
                    &self.ctx.socket,
                    "StopKeepingLease",
                    client.leases().stop_keeping_lease(StopKeepingLeaseRequest {
                        lease_id: lease_id.clone(),
                    }),
                )
                .await?;
                Ok(json!({"lease_id": lease_id, "kept": false}))
            }
            .await,
        )
    }

    #[tool(
        description = "Release a lease at the coordinator and stop keeping it: the machine is given back (and deleted with delete=true); work on it is lost. Returns the coordinator's final record of the lease.",
        annotations(
            read_only_hint = false,
            destructive_hint = true,
            idempotent_hint = true,
            open_world_hint = true
        )
    )]
    async fn lease_release(&self, Parameters(args): Parameters<ReleaseArgs>) -> CallToolResult {
        reply(
            async {
                let req = ReleaseLeaseRequest {
                    lease_id: lease_arg(&args.lease_id)?,
                    delete: args.delete,
                };
                let client = connect::connect(&self.ctx.socket).await?;
                let lease = connect::call_coordinator(
                    &self.ctx.socket,
                    "ReleaseLease",
                    client.leases().release_lease(req),
                )
                .await?
                .into_inner()
                .lease
                .unwrap_or_default();
                to_value(&lease::LeaseJson::from(&lease))
            }
            .await,
        )
    }

    #[tool(
        description = "Send one heartbeat for a lease now (it does not start keeping it; see lease_keep) and return the coordinator's record: state, idle timeout, last touched and expiry.",
        annotations(
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = true
        )
    )]
    async fn lease_heartbeat(&self, Parameters(args): Parameters<KeepArgs>) -> CallToolResult {
        reply(
            async {
                let req = HeartbeatRequest {
                    lease_id: lease_arg(&args.lease_id)?,
                    idle_timeout: lease::idle_timeout(
                        args.idle_timeout_seconds.map(Duration::from_secs),
                    ),
                };
                let client = connect::connect(&self.ctx.socket).await?;
                let lease = connect::call_coordinator(
                    &self.ctx.socket,
                    "Heartbeat",
                    client.leases().heartbeat(req),
                )
                .await?
                .into_inner()
                .lease
                .unwrap_or_default();
                to_value(&lease::LeaseJson::from(&lease))
            }
            .await,
        )
    }

    #[tool(
        description = "Run one command on a lease over crabboxd's SSH connection (no TTY) and wait for it. Returns exit_code (128+n when killed by signal n), signal, stdout and stderr apart. Output is capped at about 60 KiB together: when a stream is longer only its end is returned and stdout_omitted_bytes/stderr_omitted_bytes say how much came before; for long output start a run (run_output pages it) or redirect to a file on the lease and read it in pieces. A command still running after timeout_seconds gets SIGTERM, then SIGKILL, and timed_out is true.",
        annotations(
            read_only_hint = false,
            destructive_hint = true,
            idempotent_hint = false,
            open_world_hint = true
        )
    )]
    async fn exec(&self, Parameters(args): Parameters<ExecArgs>) -> CallToolResult {
        reply(self.exec_inner(args).await)
    }

    #[tool(
        description = "Copy a file or directory tree from this machine to a lease (modes kept; the destination appears atomically). Returns the bytes moved and the path written on the lease.",
        annotations(
            read_only_hint = false,
            destructive_hint = true,
            idempotent_hint = true,
            open_world_hint = true
        )
    )]
    async fn copy_to_lease(&self, Parameters(args): Parameters<CopyArgs>) -> CallToolResult {
        reply(self.copy(args, CopyDirection::Upload).await)
    }

    #[tool(
        description = "Copy a file or directory tree from a lease to this machine (modes kept; the destination appears atomically). Returns the bytes moved and the local path written.",
        annotations(
            read_only_hint = false,
            destructive_hint = true,
            idempotent_hint = true,
            open_world_hint = true
        )
    )]
    async fn copy_from_lease(&self, Parameters(args): Parameters<CopyArgs>) -> CallToolResult {
        reply(self.copy(args, CopyDirection::Download).await)
    }

    #[tool(
        description = "The daemon's task table: every supervised task (api-server, control-channel, lease-keeper, egress-host, ssh-mux, attach-feed, run, …) with its state (running, backoff, failed, …), restarts, last error and labels. Filter with kind. Paged: pass next_cursor back as cursor for more.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn tasks_list(&self, Parameters(args): Parameters<TasksArgs>) -> CallToolResult {
        reply(
            async {
                let kind = match args.kind.as_deref() {
                    None | Some("") => TaskKind::Unspecified,
                    Some(k) => kind_arg(k)?,
                };
                let client = connect::connect(&self.ctx.socket).await?;
                let tasks = connect::call(
                    &self.ctx.socket,
                    "ListTasks",
                    client
                        .daemon()
                        .list_tasks(ListTasksRequest { kind: kind as i32 }),
                )
                .await?
                .into_inner()
                .tasks;
                paged("tasks", &tasks, output::task_json, args.cursor.as_deref())
            }
            .await,
        )
    }

    #[tool(
        description = "Mediated egress of a lease: the coordinator's view (active session, profile, allowlist, whether host and client are connected) merged with the local host bridge's counters (streams, bytes, recent hosts, last error).",
        annotations(read_only_hint = true, open_world_hint = true)
    )]
    async fn egress_status(&self, Parameters(args): Parameters<LeaseArgs>) -> CallToolResult {
        reply(
            async {
                let lease_id = lease_arg(&args.lease_id)?;
                let client = connect::connect(&self.ctx.socket).await?;
                let st = connect::call_coordinator(
                    &self.ctx.socket,
                    "GetEgressStatus",
                    client.egress().get_egress_status(GetEgressStatusRequest {
                        lease_id: lease_id.clone(),
                    }),
                )
                .await?
                .into_inner();
                let v = to_value(&egress::status_json(&lease_id, &st))?;
                // A long allowlist or host list from the coordinator still
                // fits: the result is one item of a page.
                let (mut items, _) = bound::page(vec![v], None).map_err(bad_args)?;
                Ok(items.remove(0))
            }
            .await,
        )
    }

    #[tool(
        description = "List the egress host bridges this daemon runs, one per lease, with their session, state and counters. Paged: pass next_cursor back as cursor for more.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn egress_list(&self, Parameters(args): Parameters<PageArgs>) -> CallToolResult {
        reply(
            async {
                let client = connect::connect(&self.ctx.socket).await?;
                let hosts = connect::call(
                    &self.ctx.socket,
                    "ListEgressHosts",
                    client.egress().list_egress_hosts(ListEgressHostsRequest {}),
                )
                .await?
                .into_inner()
                .hosts;
                paged("hosts", &hosts, egress::host_json, args.cursor.as_deref())
            }
            .await,
        )
    }

    #[tool(
        description = "Start mediated egress for a lease over its SSH connection: installs the egress helper on the lease, starts the host bridge here and the helper there, and returns once the helper listens (its loopback endpoint on the lease) and is bridged. Programs on the lease then reach only the allowed hosts, exiting from this machine; run_start with egress=true points a run's HTTP(S)_PROXY at it. Needs profiles or allow. Replaces a running egress of the lease (its open connections are cut).",
        annotations(
            read_only_hint = false,
            destructive_hint = true,
            idempotent_hint = false,
            open_world_hint = true
        )
    )]
    async fn egress_start(&self, Parameters(args): Parameters<EgressStartArgs>) -> CallToolResult {
        reply(self.egress_start_inner(args).await)
    }

    #[tool(
        description = "Stop mediated egress for a lease: the host bridge here, the helper on the lease and its lease-local state. Traffic from the lease through this machine stops and open connections are cut. Says what it stopped; nothing to stop is not an error.",
        annotations(
            read_only_hint = false,
            destructive_hint = true,
            idempotent_hint = true,
            open_world_hint = true
        )
    )]
    async fn egress_stop(&self, Parameters(args): Parameters<LeaseArgs>) -> CallToolResult {
        reply(
            async {
                let lease_id = lease_arg(&args.lease_id)?;
                let client = connect::connect(&self.ctx.socket).await?;
                let r = connect::call_coordinator(
                    &self.ctx.socket,
                    "StopEgress",
                    client.egress().stop_egress(StopEgressRequest {
                        lease_id: lease_id.clone(),
                        agent_socket: exec_cmd::agent_socket(),
                    }),
                )
                .await?
                .into_inner();
                Ok(json!({
                    "lease_id": lease_id,
                    "session_id": r.session_id,
                    "host_stopped": r.host_stopped,
                    "helper_stopped": r.helper_stopped,
                    "helper_pid": r.helper_pid,
                    "state_removed": r.state_removed,
                    "lease_error": bound::head(&r.lease_error, 4096).0,
                }))
            }
            .await,
        )
    }

    #[tool(
        description = "Start a command on a lease as a run the daemon owns and records at the coordinator, and return its run_id at once; the run goes on without this call. Read its output with run_output (from cursor 0) and its end with run_wait; stop it with run_stop. The lease is kept alive while it runs.",
        annotations(
            read_only_hint = false,
            destructive_hint = true,
            idempotent_hint = false,
            open_world_hint = true
        )
    )]
    async fn run_start(&self, Parameters(args): Parameters<RunStartArgs>) -> CallToolResult {
        reply(self.run_start_inner(args).await)
    }

    #[tool(
        description = "List the runs this daemon owns (running, or ended in the last ten minutes), newest first: run_id, lease, command, label, running, start and end times, and the end (outcome, exit_code). Paged: pass next_cursor back as cursor for more.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn run_list(&self, Parameters(args): Parameters<PageArgs>) -> CallToolResult {
        reply(
            async {
                let client = connect::connect(&self.ctx.socket).await?;
                let runs = connect::call(
                    &self.ctx.socket,
                    "ListRuns",
                    client.runs().list_runs(ListRunsRequest {}),
                )
                .await?
                .into_inner()
                .runs;
                let run_json = |r: &crabbox_api::v1::RunInfo| {
                    json!({
                        "run_id": r.run_id, "lease_id": r.lease_id, "argv": r.argv,
                        "label": r.label, "running": r.running,
                        "started_at": output::timestamp_text(r.started_at.as_ref()),
                        "ended_at": output::timestamp_text(r.ended_at.as_ref()),
                        "finished": r.finished.as_ref().map(run_cmd::finished_json),
                    })
                };
                paged("runs", &runs, run_json, args.cursor.as_deref())
            }
            .await,
        )
    }

    #[tool(
        description = "Stop a run the daemon owns: its remote process group gets SIGTERM (or SIGKILL with kill=true; SIGKILL follows 2 s later anyway). The run then ends at the coordinator with the command's exit code; run_wait returns it.",
        annotations(
            read_only_hint = false,
            destructive_hint = true,
            idempotent_hint = true,
            open_world_hint = true
        )
    )]
    async fn run_stop(&self, Parameters(args): Parameters<RunStopArgs>) -> CallToolResult {
        reply(
            async {
                let run_id = args.run_id.trim().to_owned();
                if run_id.is_empty() {
                    return Err(bad_args(
                        "run_id is empty; run_list shows the daemon's runs",
                    ));
                }
                let sig = if args.kill {
                    Signal::Kill
                } else {
                    Signal::Term
                };
                let client = connect::connect(&self.ctx.socket).await?;
                let r = connect::call(
                    &self.ctx.socket,
                    "StopRun",
                    client.runs().stop_run(StopRunRequest {
                        run_id: run_id.clone(),
                        signal: sig as i32,
                    }),
                )
                .await?
                .into_inner();
                Ok(json!({"run_id": run_id, "was_running": r.was_running}))
            }
            .await,
        )
    }

    #[tool(
        description = "Read a run's events from a cursor: stdout/stderr output and other events (run.started, command.finished, …) in order, at most about 60 KiB per call. Pass next_cursor back as cursor to read on; when the run has ended, end holds its outcome and exit_code and there is nothing more to read. Waits up to wait_seconds for a first new event.",
        annotations(read_only_hint = true, open_world_hint = true)
    )]
    async fn run_output(&self, Parameters(args): Parameters<RunOutputArgs>) -> CallToolResult {
        reply(self.run_output_inner(args).await)
    }

    #[tool(
        description = "Wait for a run to end and return its outcome (succeeded, failed, unknown), exit_code, and the last part of its stdout and stderr. If it is still running after timeout_seconds, end is null: call again with the returned next_cursor.",
        annotations(read_only_hint = true, open_world_hint = true)
    )]
    async fn run_wait(&self, Parameters(args): Parameters<RunWaitArgs>) -> CallToolResult {
        reply(self.run_wait_inner(args).await)
    }
}

impl Crabbox {
    async fn exec_inner(&self, args: ExecArgs) -> anyhow::Result<Value> {
        let lease_id = lease_arg(&args.lease_id)?;
        if args.command.is_empty() || args.command[0].is_empty() {
            return Err(bad_args(
                "command is empty; pass an argv such as [\"uname\", \"-a\"] or [\"sh\", \"-c\", \"make test\"]",
            ));
        }
        let stdin = args.stdin.unwrap_or_default().into_bytes();
        if stdin.len() > EXEC_STDIN_MAX {
            return Err(bad_args(format!(
                "stdin is {} bytes, more than exec forwards ({} KiB); copy the data with copy_to_lease and read the file instead",
                stdin.len(),
                EXEC_STDIN_MAX / 1024
            )));
        }
        let limit = seconds(args.timeout_seconds, EXEC_DEFAULT_SECS, EXEC_MAX_SECS);
        let start = ExecStart {
            lease_id: lease_id.clone(),
            argv: args.command,
            command: String::new(),
            cwd: args.cwd.unwrap_or_default(),
            agent_socket: exec_cmd::agent_socket(),
        };
        let chunks: Vec<&[u8]> = stdin.chunks(64 * 1024).collect();
        // Room for every message sent before the stream is read, plus the
        // cancels: no send below waits.
        let (tx, rx) = mpsc::channel::<ExecRequest>(chunks.len() + 4);
        let send = |msg: Msg| {
            tx.try_send(ExecRequest { msg: Some(msg) })
                .map_err(|_| anyhow::anyhow!("crabboxd stopped reading the command's input"))
        };
        send(Msg::Start(start))?;
        for c in chunks {
            send(Msg::Stdin(c.to_vec()))?;
        }
        send(Msg::StdinEof(StdinEof {}))?;

        let client = connect::connect(&self.ctx.socket).await?;
        let mut replies = connect::call(
            &self.ctx.socket,
            "Exec",
            client.ssh().exec(ReceiverStream::new(rx)),
        )
        .await?
        .into_inner();
        let mut stdout = TailBuffer::new(EXEC_KEEP);
        let mut stderr = TailBuffer::new(EXEC_KEEP);
        let mut note = String::new();
        let mut deadline = Instant::now() + limit;
        // 0: running; 1: sent SIGTERM; 2: sent SIGKILL.
        let mut stage = 0;
        loop {
            let msg = tokio::select! {
                m = replies.message() => m,
                _ = tokio::time::sleep_until(deadline) => {
                    if stage == 2 {
                        return Err(Failure::error(format!(
                            "the command on {lease_id} did not end within {}s, nor after SIGTERM and SIGKILL",
                            limit.as_secs()
                        ))
                        .hint("check the lease with `exec` and `ps`; its SSH connection may be stuck")
                        .into());
                    }
                    let sig = if stage == 0 { Signal::Term } else { Signal::Kill };
                    let _ = send(Msg::Cancel(ExecCancel { signal: sig as i32 }));
                    stage += 1;
                    deadline = Instant::now() + EXEC_GRACE;
                    continue;
                }
            };
            match msg {
                Ok(Some(reply)) => match reply.event {
                    Some(Event::Stdout(b)) => stdout.push(&b),
                    Some(Event::Stderr(b)) => stderr.push(&b),
                    Some(Event::Started(s)) => note = s.fallback_note,
                    Some(Event::Exit(e)) => {
                        let [(out, out_cut), (err, err_cut)] =
                            two_tails(&stdout, &stderr, PAYLOAD_BUDGET);
                        return Ok(json!({
                            "lease_id": lease_id,
                            "exit_code": e.code,
                            "signal": (!e.signal.is_empty()).then_some(e.signal),
                            "timed_out": stage > 0,
                            "stdout": out,
                            "stderr": err,
                            "stdout_bytes": stdout.total(),
                            "stderr_bytes": stderr.total(),
                            "stdout_omitted_bytes": out_cut,
                            "stderr_omitted_bytes": err_cut,
                            "note": (!note.is_empty()).then(|| bound::head(&note, 1024).0.to_owned()),
                        }));
                    }
                    None => {}
                },
                Ok(None) => {
                    return Err(Failure::error(
                        "crabboxd ended the command's stream without an exit status",
                    )
                    .into());
                }
                Err(status) if status.code() == tonic::Code::Unimplemented => {
                    return Err(connect::rpc_failed(&self.ctx.socket, "Exec", &status).into());
                }
                // The sentence `crabboxctl exec` prints for an SSH failure.
                Err(status) => return Err(Failure::error(status.message().to_owned()).into()),
            }
        }
    }

    async fn copy(&self, args: CopyArgs, direction: CopyDirection) -> anyhow::Result<Value> {
        let lease_id = lease_arg(&args.lease_id)?;
        if args.local_path.is_empty() || args.remote_path.is_empty() {
            return Err(bad_args("local_path and remote_path must both be set"));
        }
        let local = cp::absolute(&args.local_path)?;
        refuse_private(&local)?;
        let limit = seconds(args.timeout_seconds, COPY_DEFAULT_SECS, COPY_MAX_SECS);
        let req = CopyRequest {
            lease_id: lease_id.clone(),
            direction: direction as i32,
            local_path: local.display().to_string(),
            remote_path: args.remote_path.clone(),
            agent_socket: exec_cmd::agent_socket(),
        };
        let client = connect::connect(&self.ctx.socket).await?;
        let copy = async {
            let mut stream = connect::call(&self.ctx.socket, "Copy", client.ssh().copy(req))
                .await?
                .into_inner();
            loop {
                match stream.message().await {
                    Ok(Some(p)) if !p.done_path.is_empty() => return Ok((p.bytes, p.done_path)),
                    Ok(Some(_)) => {}
                    Ok(None) => anyhow::bail!("crabboxd ended the copy without finishing it"),
                    Err(status) if status.code() == tonic::Code::Unimplemented => {
                        return Err(connect::rpc_failed(&self.ctx.socket, "Copy", &status).into());
                    }
                    Err(status) => {
                        return Err(
                            Failure::error(format!("cp failed: {}", status.message())).into()
                        );
                    }
                }
            }
        };
        let (bytes, written) = tokio::time::timeout(limit, copy).await.map_err(|_| {
            Failure::error(format!(
                "the copy did not finish within {}s and was cancelled",
                limit.as_secs()
            ))
            .hint("pass a larger timeout_seconds, or copy a smaller tree")
        })??;
        Ok(json!({
            "lease_id": lease_id,
            "direction": if direction == CopyDirection::Upload { "to_lease" } else { "from_lease" },
            "bytes": bytes,
            "written_path": written,
        }))
    }

    async fn egress_start_inner(&self, args: EgressStartArgs) -> anyhow::Result<Value> {
        let lease_id = lease_arg(&args.lease_id)?;
        let req = StartEgressRequest {
            lease_id,
            profiles: args.profiles,
            allow: args.allow,
            allow_private: args.allow_private,
            listen: args.listen.unwrap_or_default(),
            coordinator_url: String::new(),
            transport: String::new(),
            agent_socket: exec_cmd::agent_socket(),
        };
        let client = connect::connect(&self.ctx.socket).await?;
        let mut stream = connect::call_coordinator(
            &self.ctx.socket,
            "StartEgress",
            client.egress().start_egress(req),
        )
        .await?
        .into_inner();
        let mut steps = Vec::new();
        loop {
            let msg = connect::call_coordinator(&self.ctx.socket, "StartEgress", stream.message())
                .await?
                .ok_or_else(|| Failure::error("crabboxd ended StartEgress without a result"))?;
            match msg.event {
                // Seven steps; each line cut to 1 KiB.
                Some(start_egress_event::Event::Step(s)) if steps.len() < 16 => {
                    steps.push(json!({
                        "number": s.number,
                        "name": bound::head(&s.name, 64).0,
                        "detail": bound::head(&s.detail, 1024).0,
                    }));
                }
                Some(start_egress_event::Event::Step(_)) => {}
                // The proxy URL stays out of the result; the endpoint is the
                // helper's listen address on the lease.
                Some(start_egress_event::Event::Started(st)) => {
                    let v = json!({
                        "lease_id": st.lease_id,
                        "session_id": st.session_id,
                        "summary": st.summary,
                        "profiles": st.profiles,
                        "allow": st.allow,
                        "endpoint": st.endpoint,
                        "pid": st.pid,
                        "version": st.version,
                        "arch": st.arch,
                        "uploaded": st.uploaded,
                        "steps": steps,
                    });
                    let (mut items, _) = bound::page(vec![v], None).map_err(bad_args)?;
                    return Ok(items.remove(0));
                }
                None => {}
            }
        }
    }

    async fn run_start_inner(&self, args: RunStartArgs) -> anyhow::Result<Value> {
        let lease_id = lease_arg(&args.lease_id)?;
        if args.command.is_empty() || args.command[0].is_empty() {
            return Err(bad_args(
                "command is empty; pass an argv such as [\"make\", \"test\"] or [\"sh\", \"-c\", \"…\"]",
            ));
        }
        let req = StartRunRequest {
            lease_id,
            argv: args.command,
            cwd: args.cwd.unwrap_or_default(),
            label: args.label.unwrap_or_default(),
            client_env: run_cmd::client_env(),
            env_allow: std::env::var("CRABBOX_ENV_ALLOW").ok(),
            allow_env: args.allow_env,
            egress: args.egress,
            detach: true,
            agent_socket: exec_cmd::agent_socket(),
        };
        let client = connect::connect(&self.ctx.socket).await?;
        let mut replies =
            connect::call_coordinator(&self.ctx.socket, "StartRun", client.runs().start_run(req))
                .await?
                .into_inner();
        let first =
            connect::call_coordinator(&self.ctx.socket, "StartRun", replies.message()).await?;
        match first.and_then(|m| m.event) {
            // The proxy URL stays out of the result: `egress` says whether
            // one is used.
            Some(start_run_response::Event::Started(s)) => Ok(json!({
                "run_id": s.run_id,
                "lease_id": s.lease_id,
                "slug": s.slug,
                "egress": !s.proxy.is_empty(),
                "forwarded_env": s.forwarded.iter().map(|f| &f.name).collect::<Vec<_>>(),
                "env_summary": s.env_summary,
                "next": "read its output with run_output (cursor 0) and its end with run_wait",
            })),
            _ => Err(Failure::error("crabboxd ended StartRun before the run started").into()),
        }
    }

    async fn attach(
        &self,
        run_id: &str,
        after: u64,
    ) -> anyhow::Result<tonic::Streaming<crabbox_api::v1::AttachEvent>> {
        let run_id = run_id.trim();
        if run_id.is_empty() {
            return Err(bad_args(
                "run_id is empty; it is the `run_…` id a run was started with",
            ));
        }
        let client = connect::connect(&self.ctx.socket).await?;
        Ok(connect::call_coordinator(
            &self.ctx.socket,
            "Attach",
            client.runs().attach(AttachRequest {
                run_id: run_id.to_owned(),
                after,
            }),
        )
        .await?
        .into_inner())
    }

    async fn run_output_inner(&self, args: RunOutputArgs) -> anyhow::Result<Value> {
        let wait = seconds(
            args.wait_seconds,
            RUN_OUTPUT_DEFAULT_WAIT,
            RUN_OUTPUT_MAX_WAIT,
        );
        let mut stream = self.attach(&args.run_id, args.cursor).await?;
        let mut events: Vec<Value> = Vec::new();
        let mut used = 0;
        let mut cursor = args.cursor;
        let mut end = None;
        let mut more = false;
        let first_deadline = Instant::now() + wait;
        loop {
            // The first event may take the whole wait; after it, a quiet
            // spell ends the page, and the wait still bounds the call.
            let until = if events.is_empty() {
                first_deadline
            } else {
                (Instant::now() + RUN_OUTPUT_QUIET).min(first_deadline)
            };
            let msg = match tokio::time::timeout_at(until, stream.message()).await {
                Err(_) => break,
                Ok(m) => m,
            };
            match msg {
                Ok(Some(ev)) => match ev.event {
                    Some(attach_event::Event::RunEvent(e)) => {
                        let mut v = json!({"seq": e.seq, "type": e.r#type});
                        if !e.phase.is_empty() {
                            v["phase"] = json!(bound::head(&e.phase, TEXT_FIELD_MAX).0);
                        }
                        match e.stream() {
                            OutputStream::Stdout => v["stream"] = json!("stdout"),
                            OutputStream::Stderr => v["stream"] = json!("stderr"),
                            OutputStream::Unspecified => {}
                        }
                        if !e.message.is_empty() {
                            v["message"] = json!(bound::head(&e.message, TEXT_FIELD_MAX).0);
                        }
                        if let Some(code) = e.exit_code {
                            v["exit_code"] = json!(code);
                        }
                        let base = bound::json_len(&v);
                        let data_len = bound::json_str_len(&e.data);
                        if used + base + data_len + 12 > PAYLOAD_BUDGET {
                            if !events.is_empty() {
                                more = true;
                                break;
                            }
                            // One event larger than a whole result: its
                            // data's start, marked, so the cursor moves on.
                            let room = PAYLOAD_BUDGET.saturating_sub(base + 40);
                            let (kept, cut) = bound::head(&e.data, room);
                            v["data"] = json!(kept);
                            v["data_omitted_bytes"] = json!(cut);
                        } else if !e.data.is_empty() {
                            v["data"] = json!(e.data);
                        }
                        used += bound::json_len(&v) + 1;
                        cursor = e.seq;
                        events.push(v);
                    }
                    Some(attach_event::Event::End(e)) => {
                        end = Some(end_json(&e));
                        break;
                    }
                    None => {}
                },
                Ok(None) => break,
                Err(status) => {
                    return Err(connect::rpc_failed(&self.ctx.socket, "Attach", &status).into());
                }
            }
        }
        Ok(json!({
            "run_id": args.run_id.trim(),
            "events": events,
            "next_cursor": cursor,
            "more": more,
            "end": end,
        }))
    }

    async fn run_wait_inner(&self, args: RunWaitArgs) -> anyhow::Result<Value> {
        let limit = seconds(
            args.timeout_seconds,
            RUN_WAIT_DEFAULT_SECS,
            RUN_WAIT_MAX_SECS,
        );
        let mut stream = self.attach(&args.run_id, args.cursor).await?;
        let mut stdout = TailBuffer::new(RUN_WAIT_TAIL * 2);
        let mut stderr = TailBuffer::new(RUN_WAIT_TAIL * 2);
        let mut cursor = args.cursor;
        let mut end = None;
        let deadline = Instant::now() + limit;
        loop {
            let msg = match tokio::time::timeout_at(deadline, stream.message()).await {
                Err(_) => break,
                Ok(m) => m,
            };
            match msg {
                Ok(Some(ev)) => match ev.event {
                    Some(attach_event::Event::RunEvent(e)) => {
                        cursor = e.seq;
                        match e.stream() {
                            OutputStream::Stdout => stdout.push(e.data.as_bytes()),
                            OutputStream::Stderr => stderr.push(e.data.as_bytes()),
                            OutputStream::Unspecified => {}
                        }
                    }
                    Some(attach_event::Event::End(e)) => {
                        end = Some(end_json(&e));
                        break;
                    }
                    None => {}
                },
                Ok(None) => break,
                Err(status) => {
                    return Err(connect::rpc_failed(&self.ctx.socket, "Attach", &status).into());
                }
            }
        }
        let [(out, out_cut), (err, err_cut)] = two_tails(&stdout, &stderr, 2 * RUN_WAIT_TAIL);
        Ok(json!({
            "run_id": args.run_id.trim(),
            "end": end,
            "next_cursor": cursor,
            "stdout_tail": out,
            "stderr_tail": err,
            "stdout_omitted_bytes": out_cut,
            "stderr_omitted_bytes": err_cut,
        }))
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Crabbox {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new(
                "crabboxctl",
                crabbox_api::version::VERSION,
            ))
            .with_instructions(
                "Crabbox leases remote machines. These tools drive the local crabboxd daemon: \
                 keep a lease alive (lease_keep), run commands on it (exec, or run_start for a \
                 recorded run), copy files (copy_to_lease, copy_from_lease), follow runs \
                 (run_output, run_wait), look at \
                 mediated egress (egress_status) and the daemon's tasks (tasks_list). Results are \
                 JSON of at most 64 KiB; follow next_cursor for more. Errors say what to do next.",
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_paths_inside_private_roots_are_refused_through_links_and_dots() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("config/crabbox");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("crabboxd.toml"), "").unwrap();
        let project = tmp.path().join("project");
        std::fs::create_dir_all(&project).unwrap();
        std::os::unix::fs::symlink(&root, project.join("link")).unwrap();
        let roots = vec![root.clone()];
        for bad in [
            root.join("crabboxd.toml"),
            root.join("new-file"),
            project.join("link/crabboxd.toml"),
            project.join("../config/crabbox/crabboxd.toml"),
            project.join("missing/../../config/crabbox"),
        ] {
            let err = refuse_inside(&bad, &roots).unwrap_err();
            assert!(
                err.to_string()
                    .contains("copy tools do not read or write there"),
                "{bad:?}: {err}"
            );
        }
        for ok in [
            project.join("out.tar"),
            project.join("sub/new"),
            tmp.path().join("config/other"),
        ] {
            refuse_inside(&ok, &roots).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
    }

    #[test]
    fn a_result_over_the_limit_is_a_tool_error_not_a_long_answer() {
        let fits = reply(Ok(json!("x".repeat(RESULT_LIMIT - 16))));
        assert_ne!(fits.is_error, Some(true));
        let over = reply(Ok(json!("x".repeat(RESULT_LIMIT))));
        assert_eq!(over.is_error, Some(true));
    }

    fn server() -> Crabbox {
        Crabbox::new(Ctx {
            socket: "/nonexistent/crabboxd.sock".into(),
        })
    }

    #[test]
    fn every_tool_has_a_description_a_schema_and_annotations() {
        let tools = server().tool_router.list_all();
        assert!(tools.len() >= 14, "{}", tools.len());
        for t in &tools {
            let d = t.description.as_deref().unwrap_or_default();
            assert!(d.len() > 40, "{}: {d}", t.name);
            assert_eq!(
                t.input_schema.get("type"),
                Some(&json!("object")),
                "{}",
                t.name
            );
            let a = t
                .annotations
                .as_ref()
                .unwrap_or_else(|| panic!("{}", t.name));
            assert!(a.read_only_hint.is_some(), "{}", t.name);
        }
        let by = |n: &str| {
            tools
                .iter()
                .find(|t| t.name == n)
                .unwrap()
                .annotations
                .clone()
                .unwrap()
        };
        for ro in [
            "lease_list",
            "tasks_list",
            "egress_status",
            "egress_list",
            "run_output",
            "run_wait",
        ] {
            assert_eq!(by(ro).read_only_hint, Some(true), "{ro}");
        }
        for d in [
            "lease_release",
            "egress_start",
            "egress_stop",
            "run_stop",
            "exec",
            "copy_to_lease",
            "copy_from_lease",
            "run_start",
        ] {
            assert_eq!(by(d).destructive_hint, Some(true), "{d}");
            assert_eq!(by(d).read_only_hint, Some(false), "{d}");
        }
    }

    #[test]
    fn task_kinds_are_the_cli_names() {
        assert_eq!(kind_arg("ssh-mux").unwrap(), TaskKind::SshMux);
        let e = kind_arg("nope").unwrap_err().to_string();
        assert!(
            e.contains("\"nope\" is not a task kind") && e.contains("lease-keeper"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn an_unreachable_daemon_is_a_tool_error_with_the_cli_sentence() {
        let r = server().lease_list(Parameters(PageArgs::default())).await;
        assert_eq!(r.is_error, Some(true));
        let text = serde_json::to_value(&r.content).unwrap().to_string();
        assert!(text.contains("/nonexistent/crabboxd.sock"), "{text}");
        assert!(text.contains("hint: "), "{text}");
    }
}
