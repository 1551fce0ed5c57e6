//! `crabboxctl lease keep|release|stop|list`: the daemon's kept leases.

use crabbox_api::v1::{
    KeepLeaseRequest, KeptLease, Lease, ListLeasesRequest, ReleaseLeaseRequest,
    StopKeepingLeaseRequest,
};
use serde::Serialize;

use crate::{Ctx, connect, exit::Code, output};

/// Keep leases alive through the daemon, release them, or list them.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Keep a lease alive: heartbeat now, then every idle/3 (5–60 s) until it
    /// ends, is released, or `lease stop`. Survives daemon restarts.
    Keep {
        /// The lease id or slug.
        #[arg(long)]
        id: String,
        /// Override the lease's idle timeout, e.g. `45m` or `2h`.
        #[arg(long, value_parser = humantime::parse_duration)]
        idle_timeout: Option<std::time::Duration>,
        /// Print JSON (unstable format).
        #[arg(long)]
        json: bool,
    },
    /// Release a lease at the coordinator and stop keeping it.
    Release {
        /// The lease id or slug.
        #[arg(long)]
        id: String,
        /// Ask the coordinator to delete the machine.
        #[arg(long)]
        delete: bool,
        /// Print JSON (unstable format).
        #[arg(long)]
        json: bool,
    },
    /// Stop keeping a lease without releasing it (it idles out).
    Stop {
        /// The lease id.
        #[arg(long)]
        id: String,
    },
    /// List the leases the daemon keeps.
    List {
        /// Print JSON (unstable format).
        #[arg(long)]
        json: bool,
    },
}

/// The JSON shape of a lease, in the reference CLI's field names.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseJson {
    id: String,
    slug: String,
    provider: String,
    state: String,
    owner: String,
    org: String,
    idle_timeout: u64,
    last_touched_at: String,
    expires_at: String,
}

impl From<&Lease> for LeaseJson {
    fn from(l: &Lease) -> Self {
        LeaseJson {
            id: l.id.clone(),
            slug: l.slug.clone(),
            provider: l.provider.clone(),
            state: l.state.clone(),
            owner: l.owner.clone(),
            org: l.org.clone(),
            idle_timeout: l.idle_timeout_seconds,
            last_touched_at: l.last_touched_at.clone(),
            expires_at: l.expires_at.clone(),
        }
    }
}

#[derive(Debug, Serialize)]
struct KeptJson {
    id: String,
    lease: Option<LeaseJson>,
    state: String,
    restarts: u32,
    last_error: String,
    last_heartbeat_unix_ms: i64,
    interval_ms: u64,
    ended: String,
    via: String,
}

fn kept_json(k: &KeptLease) -> KeptJson {
    KeptJson {
        id: k.id.clone(),
        lease: k.lease.as_ref().map(LeaseJson::from),
        state: k
            .task
            .as_ref()
            .map(|t| output::state_name(t.state))
            .unwrap_or_default(),
        restarts: k.task.as_ref().map(|t| t.restarts).unwrap_or(0),
        last_error: k
            .task
            .as_ref()
            .map(|t| t.last_error.clone())
            .unwrap_or_default(),
        last_heartbeat_unix_ms: k.last_heartbeat_unix_ms,
        interval_ms: k.interval_ms,
        ended: k.ended.clone(),
        via: k.last_heartbeat_via.clone(),
    }
}

fn kept_line(k: &KeptLease, now_ms: i64) -> String {
    let j = kept_json(k);
    let beat = if j.last_heartbeat_unix_ms > 0 {
        format!("{} ago", output::ago(j.last_heartbeat_unix_ms, now_ms))
    } else {
        "never".to_owned()
    };
    let mut line = format!(
        "{}  {}  every {}s  last heartbeat {}",
        j.id,
        if j.ended.is_empty() {
            j.state
        } else {
            j.ended.clone()
        },
        j.interval_ms / 1000,
        beat
    );
    if let Some(l) = &j.lease {
        line.push_str(&format!("  expires {}", l.expires_at));
    }
    if !j.last_error.is_empty() {
        line.push_str(&format!("  ({})", j.last_error));
    }
    line
}

/// The reference CLI's one-line rendering of a lease after a heartbeat.
pub fn heartbeat_line(l: &Lease) -> String {
    let slug = if l.slug.is_empty() { "-" } else { &l.slug };
    format!(
        "heartbeat lease={} slug={} provider={} state={} idle_timeout={}s last_touched={} expires={}",
        l.id, slug, l.provider, l.state, l.idle_timeout_seconds, l.last_touched_at, l.expires_at
    )
}

/// Runs `crabboxctl lease …`.
pub async fn run(ctx: &Ctx, args: &Args) -> anyhow::Result<Code> {
    let mut client = connect::connect(&ctx.socket).await?;
    match &args.command {
        Command::Keep {
            id,
            idle_timeout,
            json,
        } => {
            let req = KeepLeaseRequest {
                lease_id: id.clone(),
                idle_timeout_seconds: idle_timeout.map_or(0, |d| d.as_secs().max(1)),
            };
            let kept = connect::call(&ctx.socket, "KeepLease", client.rpc().keep_lease(req))
                .await?
                .into_inner()
                .lease
                .unwrap_or_default();
            if *json {
                output::print_json(&kept_json(&kept))?;
            } else {
                outln!("keeping {}", kept_line(&kept, output::now_unix_ms()))?;
            }
        }
        Command::Release { id, delete, json } => {
            let req = ReleaseLeaseRequest {
                lease_id: id.clone(),
                delete: *delete,
            };
            let lease = connect::call(&ctx.socket, "ReleaseLease", client.rpc().release_lease(req))
                .await?
                .into_inner()
                .lease
                .unwrap_or_default();
            if *json {
                output::print_json(&LeaseJson::from(&lease))?;
            } else {
                outln!("released lease={} state={}", lease.id, lease.state)?;
            }
        }
        Command::Stop { id } => {
            let req = StopKeepingLeaseRequest {
                lease_id: id.clone(),
            };
            connect::call(
                &ctx.socket,
                "StopKeepingLease",
                client.rpc().stop_keeping_lease(req),
            )
            .await?;
            outln!("no longer keeping {id}")?;
        }
        Command::List { json } => {
            let leases = connect::call(
                &ctx.socket,
                "ListLeases",
                client.rpc().list_leases(ListLeasesRequest {}),
            )
            .await?
            .into_inner()
            .leases;
            if *json {
                output::print_json(&leases.iter().map(kept_json).collect::<Vec<_>>())?;
            } else if leases.is_empty() {
                outln!("no kept leases")?;
            } else {
                let now = output::now_unix_ms();
                for k in &leases {
                    outln!("{}", kept_line(k, now))?;
                }
            }
        }
    }
    Ok(Code::Ok)
}
