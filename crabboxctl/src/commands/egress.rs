//! `crabboxctl egress start|stop|host|status|list|ticket`: mediated egress
//! for a lease end to end over SSH (`start`, `stop`), the daemon's host
//! bridges alone, and tickets for starting the lease-side helper by hand.

use std::{
    io::{IsTerminal as _, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::PathBuf,
};

use crabbox_api::v1::{
    EgressHost, EgressRole, GetEgressStatusRequest, GetEgressStatusResponse,
    ListEgressHostsRequest, MintEgressTicketRequest, StartEgressHostRequest, StartEgressRequest,
    StopEgressRequest, start_egress_event::Event,
};
use serde::Serialize;

use crate::{Ctx, connect, exit::Code, output};

/// Run mediated egress for a lease: the browser in the lease exits from here.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Start egress for a lease end to end: install and start the helper on
    /// the lease over SSH, start the host bridge here, and keep the pair
    /// healthy; needs --profile or --allow.
    Start {
        /// The lease id or slug.
        #[arg(long)]
        id: String,
        /// Allowlist profile: `discord`, `slack`, or one from configuration. Repeatable.
        #[arg(long = "profile")]
        profiles: Vec<String>,
        /// Allowed hosts: `example.com`, `*.example.com`, IP literals; comma-separated or repeated.
        #[arg(long, value_delimiter = ',')]
        allow: Vec<String>,
        /// The helper's loopback address on the lease.
        #[arg(long, default_value = "127.0.0.1:3128")]
        listen: String,
        /// The coordinator URL as the lease reaches it (default: the daemon's).
        #[arg(long)]
        coordinator: Option<String>,
        /// How the lease's traffic reaches this machine: `coordinator` (a helper on the
        /// lease bridged through the coordinator) or `ssh` (a remote forward on the lease's
        /// SSH connection, answered by this daemon; no helper, no coordinator).
        #[arg(long, default_value = "coordinator")]
        transport: String,
        /// Accepted for the reference's scripts: crabboxd always keeps egress running.
        #[arg(long)]
        daemon: bool,
        /// Allow private addresses listed literally in --allow (tests and local demos only).
        #[arg(long)]
        allow_private: bool,
        /// Print JSON (unstable format).
        #[arg(long)]
        json: bool,
    },
    /// Start (or replace) the host bridge of a lease; needs --profile or --allow.
    Host {
        /// The lease id.
        #[arg(long)]
        id: String,
        /// Allowlist profile: `discord`, `slack`, or one from configuration. Repeatable.
        #[arg(long = "profile")]
        profiles: Vec<String>,
        /// Allowed hosts: `example.com`, `*.example.com`, IP literals; comma-separated or repeated.
        #[arg(long, value_delimiter = ',')]
        allow: Vec<String>,
        /// Allow private addresses listed literally in --allow (tests and local demos only).
        #[arg(long)]
        allow_private: bool,
        /// Join this session instead of starting a new one.
        #[arg(long)]
        session: Option<String>,
        /// Print JSON (unstable format).
        #[arg(long)]
        json: bool,
    },
    /// Show the coordinator's egress status merged with local counters.
    Status {
        /// The lease id.
        #[arg(long)]
        id: String,
        /// Print JSON (unstable format).
        #[arg(long)]
        json: bool,
    },
    /// Stop egress for a lease: the host bridge and exactly this session's
    /// helper on the lease (never other sessions' helpers). Idempotent.
    Stop {
        /// The lease id.
        #[arg(long)]
        id: String,
        /// Print JSON (unstable format).
        #[arg(long)]
        json: bool,
    },
    /// List the local host bridges.
    List {
        /// Print JSON (unstable format).
        #[arg(long)]
        json: bool,
    },
    /// Mint a one-use, 120 s ticket for the lease-side helper.
    Ticket {
        /// The lease id.
        #[arg(long)]
        id: String,
        /// Which end the ticket is for: the lease-side helper or the host end.
        #[arg(long, value_enum, default_value_t = Role::Client)]
        role: Role,
        /// The session; default: the local host bridge's session.
        #[arg(long)]
        session: Option<String>,
        /// Allow a session other than the local host bridge's: the bridge
        /// moves to it and its old session ends.
        #[arg(long)]
        replace: bool,
        /// Write the ticket to this file (created 0600) instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// The ends of a bridge, as the CLI spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Role {
    /// The lease-side helper (`crabbox-egress-client`).
    Client,
    /// The operator end.
    Host,
}

impl From<Role> for EgressRole {
    fn from(r: Role) -> Self {
        match r {
            Role::Client => EgressRole::Client,
            Role::Host => EgressRole::Host,
        }
    }
}

/// The JSON shape of a local host bridge (`egress list --json`).
#[derive(Debug, Serialize)]
pub struct HostJson {
    lease_id: String,
    session_id: String,
    summary: String,
    state: String,
    restarts: u32,
    last_error: String,
    connected: bool,
    protocol_version: u32,
    active_streams: u64,
    total_streams: u64,
    rejected_streams: u64,
    bytes_in: u64,
    bytes_out: u64,
    recent_hosts: Vec<(String, u64)>,
    helper: Option<serde_json::Value>,
    transport: String,
    port: u32,
}

/// Builds a host bridge's JSON shape.
pub fn host_json(h: &EgressHost) -> HostJson {
    let c = h.counters.clone().unwrap_or_default();
    HostJson {
        lease_id: h.lease_id.clone(),
        session_id: h.session_id.clone(),
        summary: h.summary.clone(),
        state: h
            .task
            .as_ref()
            .map(|t| output::state_name(t.state))
            .unwrap_or_default(),
        restarts: h.task.as_ref().map_or(0, |t| t.restarts),
        last_error: h
            .task
            .as_ref()
            .map(|t| t.last_error.clone())
            .unwrap_or_default(),
        connected: c.connected,
        protocol_version: c.protocol_version,
        active_streams: c.active_streams,
        total_streams: c.total_streams,
        rejected_streams: c.rejected_streams,
        bytes_in: c.bytes_in,
        bytes_out: c.bytes_out,
        recent_hosts: c
            .recent_hosts
            .iter()
            .map(|h| (h.host.clone(), h.count))
            .collect(),
        helper: h.remote.as_ref().map(|r| {
            let t = r.task.clone().unwrap_or_default();
            serde_json::json!({
                "listen": r.listen, "pid": r.pid, "version": r.version, "arch": r.arch,
                "helper_path": r.helper_path, "state": output::state_name(t.state),
                "status": t.labels.get("helper").cloned().unwrap_or_default(),
                "restarts": t.restarts, "last_error": t.last_error,
            })
        }),
        transport: if h.transport.is_empty() {
            "coordinator".to_owned()
        } else {
            h.transport.clone()
        },
        port: h.port,
    }
}

/// The JSON shape of `egress status --json`: the local bridge and the
/// coordinator's view (in the reference's field names).
#[derive(Debug, Serialize)]
pub struct StatusJson {
    lease_id: String,
    local: Option<HostJson>,
    coordinator: Option<serde_json::Value>,
    coordinator_error: String,
}

/// Builds `egress status --json` for lease `id`.
pub fn status_json(id: &str, st: &GetEgressStatusResponse) -> StatusJson {
    let coordinator = st.coordinator.as_ref().map(|c| {
        serde_json::json!({
            "active": c.active, "sessionID": c.session_id, "profile": c.profile,
            "allow": c.allow, "hostConnected": c.host_connected, "clientConnected": c.client_connected,
        })
    });
    StatusJson {
        lease_id: id.to_owned(),
        local: st.local.as_ref().map(host_json),
        coordinator,
        coordinator_error: st.coordinator_error.clone(),
    }
}

fn host_lines(h: &EgressHost) -> String {
    let j = host_json(h);
    if j.transport == "ssh" {
        return ssh_lines(h, &j);
    }
    let mut s = format!(
        "egress host: lease={} session={} {}\n  state {} (restarts {}), bridge {}, protocol {}\n  streams {} active / {} total / {} refused, bytes in {} out {}",
        j.lease_id,
        j.session_id,
        j.summary,
        j.state,
        j.restarts,
        if j.connected { "up" } else { "down" },
        // 0: no peer has shown which version it speaks yet.
        match j.protocol_version {
            0 => "unknown".to_owned(),
            v => format!("v{v}"),
        },
        j.active_streams,
        j.total_streams,
        j.rejected_streams,
        j.bytes_in,
        j.bytes_out
    );
    push_recent_hosts(&mut s, &j.recent_hosts);
    if !j.last_error.is_empty() {
        s.push_str(&format!("\n  last error {}", j.last_error));
    }
    if let Some(r) = &h.remote {
        let t = r.task.clone().unwrap_or_default();
        s.push_str(&format!(
            "\n  helper on the lease: listen {} pid {} version {} ({}), remote client {} {}",
            r.listen,
            r.pid,
            r.version,
            r.arch,
            output::state_name(t.state),
            t.labels.get("helper").cloned().unwrap_or_default()
        ));
    }
    s
}

/// Appends the `recent hosts h×n …` line, when there are any.
fn push_recent_hosts(s: &mut String, hosts: &[(String, u64)]) {
    if hosts.is_empty() {
        return;
    }
    let hosts: Vec<String> = hosts.iter().map(|(h, n)| format!("{h}×{n}")).collect();
    s.push_str(&format!("\n  recent hosts {}", hosts.join(" ")));
}

/// `egress status` / `egress list` for the SSH transport.
fn ssh_lines(h: &EgressHost, j: &HostJson) -> String {
    let t = h
        .remote
        .as_ref()
        .and_then(|r| r.task.clone())
        .unwrap_or_default();
    let listen = h
        .remote
        .as_ref()
        .map(|r| r.listen.clone())
        .unwrap_or_default();
    let pid = h.remote.as_ref().map_or(0, |r| r.pid);
    let mut s = format!(
        "egress ssh: lease={} session={} {}\n  transport ssh, port {} (listen {listen} on the lease, sshd pid {pid}), forward {}, state {} (restarts {})\n  streams {} active / {} total / {} refused, bytes in {} out {}",
        j.lease_id,
        j.session_id,
        j.summary,
        j.port,
        if j.connected { "up" } else { "down" },
        j.state,
        j.restarts,
        j.active_streams,
        j.total_streams,
        j.rejected_streams,
        j.bytes_in,
        j.bytes_out
    );
    push_recent_hosts(&mut s, &j.recent_hosts);
    if !t.last_error.is_empty() {
        s.push_str(&format!("\n  last error {}", t.last_error));
    }
    s
}

/// Runs `crabboxctl egress …`.
pub async fn run(ctx: &Ctx, args: &Args) -> anyhow::Result<Code> {
    let client = connect::connect(&ctx.socket).await?;
    match &args.command {
        Command::Host {
            id,
            profiles,
            allow,
            allow_private,
            session,
            json,
        } => {
            let req = StartEgressHostRequest {
                lease_id: id.clone(),
                profiles: profiles.clone(),
                allow: allow.clone(),
                allow_private: *allow_private,
                session_id: session.clone().unwrap_or_default(),
            };
            let host = connect::call_coordinator(
                &ctx.socket,
                "StartEgressHost",
                client.egress().start_egress_host(req),
            )
            .await?
            .into_inner()
            .host
            .unwrap_or_default();
            if *json {
                output::print_json(&host_json(&host))?;
            } else {
                outln!(
                    "egress host: lease={} session={} {}\nlistening: none public; outbound WebSocket only",
                    host.lease_id,
                    host.session_id,
                    host.summary
                )?;
                if *allow_private {
                    outln!(
                        "warning: private addresses listed in --allow may be dialled (--allow-private)"
                    )?;
                }
            }
        }
        Command::Status { id, json } => {
            let req = GetEgressStatusRequest {
                lease_id: id.clone(),
            };
            let st = connect::call_coordinator(
                &ctx.socket,
                "GetEgressStatus",
                client.egress().get_egress_status(req),
            )
            .await?
            .into_inner();
            if *json {
                output::print_json(&status_json(id, &st))?;
            } else {
                let ssh = st.local.as_ref().is_some_and(|h| h.transport == "ssh");
                match &st.coordinator {
                    // The SSH transport involves no coordinator.
                    None if ssh => {}
                    // The reference's two renderings (protocol doc §3.6).
                    Some(c) => match (c.host_connected, c.client_connected) {
                        (Some(h), Some(cl)) => outln!(
                            "egress: lease={id} session={} profile={} host={h} client={cl} allow={}",
                            if c.session_id.is_empty() {
                                "-"
                            } else {
                                &c.session_id
                            },
                            if c.profile.is_empty() {
                                "-"
                            } else {
                                &c.profile
                            },
                            c.allow.join(",")
                        )?,
                        _ => outln!("egress: lease={id} active={}", c.active)?,
                    },
                    None => outln!(
                        "egress: lease={id} coordinator status unavailable: {}",
                        st.coordinator_error
                    )?,
                }
                match &st.local {
                    Some(h) => outln!("{}", host_lines(h))?,
                    None => outln!("no local egress host for this lease")?,
                }
            }
        }
        Command::Start {
            id,
            profiles,
            allow,
            listen,
            coordinator,
            transport,
            daemon,
            allow_private,
            json,
        } => {
            if *daemon && !*json {
                eprintln!(
                    "note: --daemon is accepted for existing scripts; crabboxd always keeps egress running in the background"
                );
            }
            return start(
                ctx,
                &client,
                StartEgressRequest {
                    lease_id: id.clone(),
                    profiles: profiles.clone(),
                    allow: allow.clone(),
                    allow_private: *allow_private,
                    listen: listen.clone(),
                    coordinator_url: coordinator.clone().unwrap_or_default(),
                    transport: transport.clone(),
                    agent_socket: super::exec::agent_socket(),
                },
                *json,
            )
            .await;
        }
        Command::Stop { id, json } => {
            let req = StopEgressRequest {
                lease_id: id.clone(),
                agent_socket: super::exec::agent_socket(),
            };
            let r = connect::call_coordinator(
                &ctx.socket,
                "StopEgress",
                client.egress().stop_egress(req),
            )
            .await?
            .into_inner();
            if *json {
                output::print_json(&serde_json::json!({
                    "lease_id": id,
                    "session_id": r.session_id,
                    "host_stopped": r.host_stopped,
                    "helper_stopped": r.helper_stopped,
                    "helper_pid": r.helper_pid,
                    "state_removed": r.state_removed,
                    "lease_error": r.lease_error,
                }))?;
            } else if !r.host_stopped {
                outln!("egress: nothing to stop for {id} (no egress runs for it here)")?;
            } else {
                outln!(
                    "egress host daemon: stopped lease={id} session={}",
                    r.session_id
                )?;
                if r.helper_stopped {
                    outln!(
                        "egress remote client: stopped lease={id} pid={}",
                        r.helper_pid
                    )?;
                } else if !r.lease_error.is_empty() {
                    outln!(
                        "egress remote client: not stopped (the lease did not answer: {}); it ends with its session",
                        r.lease_error
                    )?;
                }
                if r.state_removed {
                    outln!("removed the lease-local egress state")?;
                }
            }
        }
        Command::List { json } => {
            let hosts = connect::call(
                &ctx.socket,
                "ListEgressHosts",
                client.egress().list_egress_hosts(ListEgressHostsRequest {}),
            )
            .await?
            .into_inner()
            .hosts;
            if *json {
                output::print_json(&hosts.iter().map(host_json).collect::<Vec<_>>())?;
            } else if hosts.is_empty() {
                outln!("no egress hosts")?;
            } else {
                for h in &hosts {
                    outln!("{}", host_lines(h))?;
                }
            }
        }
        Command::Ticket {
            id,
            role,
            session,
            replace,
            out,
        } => {
            let req = MintEgressTicketRequest {
                lease_id: id.clone(),
                role: EgressRole::from(*role) as i32,
                session_id: session.clone().unwrap_or_default(),
                replace: *replace,
            };
            let t = connect::call_coordinator(
                &ctx.socket,
                "MintEgressTicket",
                client.egress().mint_egress_ticket(req),
            )
            .await?
            .into_inner();
            match out {
                Some(path) => {
                    // Created 0600 from the start: the ticket is never
                    // readable by anyone else, even briefly.
                    let _ = std::fs::remove_file(path);
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(path)?;
                    writeln!(f, "{}", t.ticket)?;
                    eprintln!(
                        "wrote a {} ticket for session {} to {} (one use, expires {})",
                        if *role == Role::Host {
                            "host"
                        } else {
                            "client"
                        },
                        t.session_id,
                        path.display(),
                        output::timestamp_text(t.expires_at.as_ref())
                            .unwrap_or_else(|| "in 120s".to_owned())
                    );
                }
                None => outln!("{}", t.ticket)?,
            }
        }
    }
    Ok(Code::Ok)
}

/// `egress start`: one line per step on a terminal, then the summary.
async fn start(
    ctx: &Ctx,
    client: &crabbox_api::Client,
    req: StartEgressRequest,
    json: bool,
) -> anyhow::Result<Code> {
    let lease = req.lease_id.clone();
    let mut stream = connect::call_coordinator(
        &ctx.socket,
        "StartEgress",
        client.egress().start_egress(req),
    )
    .await?
    .into_inner();
    let tty = std::io::stderr().is_terminal() && !json;
    let mut steps = Vec::new();
    loop {
        let msg = match stream.message().await {
            Ok(Some(m)) => m,
            Ok(None) => anyhow::bail!("crabboxd ended StartEgress without a result"),
            Err(status) => {
                return Err(connect::rpc_failed(&ctx.socket, "StartEgress", &status).into());
            }
        };
        match msg.event {
            Some(Event::Step(s)) => {
                if tty {
                    eprintln!("[{}/7] {}: {}", s.number, s.name, s.detail);
                }
                steps.push(
                    serde_json::json!({"number": s.number, "name": s.name, "detail": s.detail}),
                );
            }
            Some(Event::Started(st)) => {
                if json {
                    output::print_json(&serde_json::json!({
                        "lease_id": st.lease_id,
                        "session_id": st.session_id,
                        "summary": st.summary,
                        "profiles": st.profiles,
                        "allow": st.allow,
                        "endpoint": st.endpoint,
                        "proxy": st.proxy,
                        "pid": st.pid,
                        "version": st.version,
                        "arch": st.arch,
                        "helper_path": st.helper_path,
                        "uploaded": st.uploaded,
                        "state_file": st.state_file,
                        "transport": if st.transport.is_empty() { "coordinator" } else { st.transport.as_str() },
                        "steps": steps,
                    }))?;
                } else {
                    let profile = if st.profiles.is_empty() {
                        "-".to_owned()
                    } else {
                        st.profiles.join(",")
                    };
                    outln!(
                        "egress: lease={} session={} profile={profile} allow={}",
                        st.lease_id,
                        st.session_id,
                        st.allow.join(",")
                    )?;
                    if st.transport == "ssh" {
                        outln!(
                            "egress ssh: lease={} listen={} (remote forward; sshd pid {}) state={}",
                            st.lease_id,
                            st.endpoint,
                            st.pid,
                            st.state_file
                        )?;
                        outln!(
                            "listening: 127.0.0.1 of the lease only; no helper, no coordinator"
                        )?;
                        outln!("proxy for programs on the lease: {}", st.proxy)?;
                        outln!("status: crabboxctl egress status --id {lease}")?;
                        outln!("stop:   crabboxctl egress stop --id {lease}")?;
                        return Ok(Code::Ok);
                    }
                    outln!(
                        "egress client: lease={} listen={} pid={} version={} state={}",
                        st.lease_id,
                        st.endpoint,
                        st.pid,
                        st.version,
                        st.state_file
                    )?;
                    outln!("listening: none public; outbound WebSocket only")?;
                    outln!("proxy for programs on the lease: {}", st.proxy)?;
                    outln!("status: crabboxctl egress status --id {lease}")?;
                    outln!("stop:   crabboxctl egress stop --id {lease}")?;
                }
                return Ok(Code::Ok);
            }
            None => {}
        }
    }
}
