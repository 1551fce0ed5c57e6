//! `crabboxctl lease keep|release|stop|list`: the daemon's kept leases.

use crabbox_api::{
    prost_types,
    v1::{
        HeartbeatTransport, KeepLeaseRequest, KeptLease, Lease, ListLeasesRequest,
        ReleaseLeaseRequest, StopKeepingLeaseRequest,
    },
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
        /// Override the lease's idle timeout, e.g. `45m` or `2h` (at least 15s).
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

/// The JSON shape of a lease, in the reference CLI's field names:
/// `idleTimeout` in seconds, times as RFC 3339 text (`null` when unknown).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseJson {
    id: String,
    slug: String,
    provider: String,
    state: String,
    owner: String,
    org: String,
    idle_timeout: Option<u64>,
    last_touched_at: Option<String>,
    expires_at: Option<String>,
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
            idle_timeout: output::seconds(l.idle_timeout.as_ref()),
            last_touched_at: output::timestamp_text(l.last_touched_at.as_ref()),
            expires_at: output::timestamp_text(l.expires_at.as_ref()),
        }
    }
}

/// The JSON shape of a kept lease (`lease list --json`, `lease keep --json`).
#[derive(Debug, Serialize)]
pub struct KeptJson {
    id: String,
    lease: Option<LeaseJson>,
    state: String,
    restarts: u32,
    last_error: String,
    last_heartbeat: Option<String>,
    interval_seconds: Option<u64>,
    idle_timeout_override_seconds: Option<u64>,
    ended: String,
    via: Option<&'static str>,
}

/// Builds a kept lease's JSON shape.
pub fn kept_json(k: &KeptLease) -> KeptJson {
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
        last_heartbeat: output::timestamp_text(k.last_heartbeat.as_ref()),
        interval_seconds: output::seconds(k.interval.as_ref()),
        idle_timeout_override_seconds: output::seconds(k.idle_timeout_override.as_ref()),
        ended: k.ended.clone(),
        via: match k.last_heartbeat_via() {
            HeartbeatTransport::Control => Some("control"),
            HeartbeatTransport::Http => Some("http"),
            HeartbeatTransport::Unspecified => None,
        },
    }
}

/// A request's idle-timeout override: whole seconds, at least one.
pub fn idle_timeout(d: Option<std::time::Duration>) -> Option<prost_types::Duration> {
    d.map(|d| prost_types::Duration {
        seconds: i64::try_from(d.as_secs().max(1)).unwrap_or(i64::MAX),
        nanos: 0,
    })
}

fn or_dash(t: Option<&prost_types::Timestamp>) -> String {
    output::timestamp_text(t).unwrap_or_else(|| "-".to_owned())
}

fn kept_line(k: &KeptLease, now_ms: i64) -> String {
    let j = kept_json(k);
    let beat = match &k.last_heartbeat {
        Some(t) => format!("{} ago", output::ago(output::unix_ms(t), now_ms)),
        None => "never".to_owned(),
    };
    let mut line = format!(
        "{}  {}  every {}s  last heartbeat {}",
        j.id,
        if j.ended.is_empty() {
            j.state
        } else {
            j.ended.clone()
        },
        j.interval_seconds.unwrap_or(0),
        beat
    );
    if let Some(l) = &k.lease {
        line.push_str(&format!("  expires {}", or_dash(l.expires_at.as_ref())));
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
        l.id,
        slug,
        l.provider,
        l.state,
        output::seconds(l.idle_timeout.as_ref()).unwrap_or(0),
        or_dash(l.last_touched_at.as_ref()),
        or_dash(l.expires_at.as_ref())
    )
}

/// Runs `crabboxctl lease …`.
pub async fn run(ctx: &Ctx, args: &Args) -> anyhow::Result<Code> {
    let client = connect::connect(&ctx.socket).await?;
    match &args.command {
        Command::Keep {
            id,
            idle_timeout,
            json,
        } => {
            let req = KeepLeaseRequest {
                lease_id: id.clone(),
                idle_timeout: self::idle_timeout(*idle_timeout),
            };
            let kept = connect::call_coordinator(
                &ctx.socket,
                "KeepLease",
                client.leases().keep_lease(req),
            )
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
            let lease = connect::call_coordinator(
                &ctx.socket,
                "ReleaseLease",
                client.leases().release_lease(req),
            )
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
                client.leases().stop_keeping_lease(req),
            )
            .await?;
            outln!("no longer keeping {id}")?;
        }
        Command::List { json } => {
            let leases = connect::call(
                &ctx.socket,
                "ListLeases",
                client.leases().list_leases(ListLeasesRequest {}),
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
