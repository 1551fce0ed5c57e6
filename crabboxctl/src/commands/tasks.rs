//! `crabboxctl tasks`: ListTasks as a table, or with `--watch` the
//! WatchTasks stream (a snapshot, then one line per change).

use clap::ValueEnum;
use crabbox_api::v1::{ListTasksRequest, TaskKind, WatchTasksRequest, watch_tasks_event::Event};

use crate::{
    Ctx,
    connect::{self, rpc_failed},
    exit::Code,
    output::{self, WatchEventJson},
};

/// List the daemon's supervised tasks, or watch them change.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only tasks of this kind.
    #[arg(long, value_enum)]
    kind: Option<Kind>,

    /// Keep running: print the table, then one line per change until the
    /// daemon stops or you press Ctrl-C. With --json, one JSON object per line.
    #[arg(long, short)]
    watch: bool,

    /// Print JSON (for scripts; the format is unstable until promised).
    #[arg(long)]
    json: bool,
}

/// The task kinds, as the CLI spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Kind {
    ApiServer,
    ControlChannel,
    LeaseKeeper,
    EgressHost,
    EgressRemoteClient,
    SshMux,
    AttachFeed,
    Run,
    SshForward,
    SshEgress,
}

impl From<Kind> for TaskKind {
    fn from(k: Kind) -> Self {
        match k {
            Kind::ApiServer => TaskKind::ApiServer,
            Kind::ControlChannel => TaskKind::ControlChannel,
            Kind::LeaseKeeper => TaskKind::LeaseKeeper,
            Kind::EgressHost => TaskKind::EgressHost,
            Kind::EgressRemoteClient => TaskKind::EgressRemoteClient,
            Kind::SshMux => TaskKind::SshMux,
            Kind::AttachFeed => TaskKind::AttachFeed,
            Kind::Run => TaskKind::Run,
            Kind::SshForward => TaskKind::SshForward,
            Kind::SshEgress => TaskKind::SshEgress,
        }
    }
}

/// Runs `crabboxctl tasks`.
pub async fn run(ctx: &Ctx, args: &Args) -> anyhow::Result<Code> {
    let kind = args.kind.map(TaskKind::from);
    if args.watch {
        return watch(ctx, kind, args.json).await;
    }
    let client = connect::connect(&ctx.socket).await?;
    let req = ListTasksRequest {
        kind: kind.unwrap_or(TaskKind::Unspecified) as i32,
    };
    let tasks = connect::call(&ctx.socket, "ListTasks", client.daemon().list_tasks(req))
        .await?
        .into_inner()
        .tasks;
    if args.json {
        output::print_json(&output::TasksJson {
            tasks: tasks.iter().map(output::task_json).collect(),
        })?;
    } else {
        out!("{}", output::tasks_table(&tasks, output::now_unix_ms()))?;
    }
    Ok(Code::Ok)
}

/// Follows WatchTasks; the daemon filters by kind.
async fn watch(ctx: &Ctx, kind: Option<TaskKind>, json: bool) -> anyhow::Result<Code> {
    let client = connect::connect(&ctx.socket).await?;
    let request = WatchTasksRequest {
        kind: kind.map_or(TaskKind::Unspecified as i32, |k| k as i32),
    };
    loop {
        let mut stream = connect::call(
            &ctx.socket,
            "WatchTasks",
            client.daemon().watch_tasks(request),
        )
        .await?
        .into_inner();
        loop {
            let event = match stream.message().await {
                Ok(Some(msg)) => msg.event,
                Ok(None) => {
                    eprintln!("crabboxd ended the watch (it is shutting down)");
                    return Ok(Code::Ok);
                }
                Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                    // The daemon dropped us for lagging; a fresh watch starts
                    // with a full snapshot, so nothing is silently missed.
                    eprintln!(
                        "note: fell behind the daemon ({}); watching again from a fresh snapshot",
                        status.message()
                    );
                    break;
                }
                Err(status) => return Err(rpc_failed(&ctx.socket, "WatchTasks", &status).into()),
            };
            let now = output::now_unix_ms();
            match event {
                Some(Event::Snapshot(snap)) => {
                    let tasks = snap.tasks;
                    if json {
                        output::print_json_line(&WatchEventJson::Snapshot {
                            tasks: tasks.iter().map(output::task_json).collect(),
                        })?;
                    } else {
                        out!("{}", output::tasks_table(&tasks, now))?;
                    }
                }
                Some(Event::Upsert(task)) => {
                    if json {
                        output::print_json_line(&WatchEventJson::Upsert(output::task_json(&task)))?;
                    } else {
                        outln!("changed: {}", output::task_line(&task, now))?;
                    }
                }
                Some(Event::Removed(removed)) => {
                    if json {
                        output::print_json_line(&WatchEventJson::Removed { id: removed.id })?;
                    } else {
                        outln!("removed: {}", removed.id)?;
                    }
                }
                // Events a newer daemon added that this CLI does not know.
                None => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn every_proto_kind_has_a_flag_value() {
        let mapped: HashSet<i32> = Kind::value_variants()
            .iter()
            .map(|k| TaskKind::from(*k) as i32)
            .collect();
        // Every kind but UNSPECIFIED (0), which means "all" and is the default.
        let all: HashSet<i32> = (1..)
            .take_while(|n| TaskKind::try_from(*n).is_ok())
            .collect();
        assert_eq!(mapped, all);
        for k in Kind::value_variants() {
            let flag = k.to_possible_value().unwrap().get_name().to_owned();
            assert_eq!(flag, output::kind_name(TaskKind::from(*k) as i32));
        }
    }
}
