//! Domain ↔ proto conversion, in one place.

use std::{
    collections::HashMap,
    time::{Duration, SystemTime},
};

use crabbox_api::{prost_types, v1};
use tonic::Status;

use crate::{
    config::SourceKind,
    daemon::Phase,
    diagnostics,
    supervisor::{TaskKind, TaskRecord, TaskState},
};

// === time ===

/// A point in time as a proto `Timestamp`.
pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    t.into()
}

/// The coordinator's ISO-8601 text as a `Timestamp`; `None` when it is
/// missing or does not parse (the proto says "absent when unknown").
pub fn coordinator_time(text: Option<&str>) -> Option<prost_types::Timestamp> {
    text.and_then(|t| t.trim().parse().ok())
}

/// A span of time as a proto `Duration`. Every span the daemon has fits.
pub fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(d).unwrap_or(prost_types::Duration {
        seconds: i64::MAX,
        nanos: 0,
    })
}

/// The shortest idle timeout the daemon can keep: three heartbeats per idle
/// period at its fastest cadence (`lease::keeper::MIN_INTERVAL`).
pub const MIN_IDLE_TIMEOUT: Duration =
    Duration::from_secs(3 * crate::lease::MIN_INTERVAL.as_secs());

/// A requested idle timeout: absent or non-positive means none; anything
/// else is whole seconds (the coordinator takes seconds), at least
/// [`MIN_IDLE_TIMEOUT`]: a shorter one would let the lease idle out between
/// two beats, and a managed machine be cleaned up.
pub fn idle_timeout(d: Option<prost_types::Duration>) -> Result<Option<Duration>, Status> {
    let Some(d) = d else { return Ok(None) };
    if d.seconds < 0 || (d.seconds == 0 && d.nanos <= 0) {
        return Ok(None);
    }
    let d = Duration::from_secs(u64::try_from(d.seconds).unwrap_or(0).max(1));
    if d < MIN_IDLE_TIMEOUT {
        return Err(Status::invalid_argument(format!(
            "an idle timeout of {}s is too short to keep: at least {}s (the daemon beats at most every {}s, three times per idle period)",
            d.as_secs(),
            MIN_IDLE_TIMEOUT.as_secs(),
            crate::lease::MIN_INTERVAL.as_secs()
        )));
    }
    Ok(Some(d))
}

// === tasks and the daemon ===

pub fn task_kind(k: TaskKind) -> v1::TaskKind {
    match k {
        TaskKind::ApiServer => v1::TaskKind::ApiServer,
        TaskKind::ControlChannel => v1::TaskKind::ControlChannel,
        TaskKind::LeaseKeeper => v1::TaskKind::LeaseKeeper,
        TaskKind::EgressHost => v1::TaskKind::EgressHost,
        TaskKind::EgressRemoteClient => v1::TaskKind::EgressRemoteClient,
        TaskKind::SshMux => v1::TaskKind::SshMux,
        TaskKind::AttachFeed => v1::TaskKind::AttachFeed,
        TaskKind::Run => v1::TaskKind::Run,
        TaskKind::SshForward => v1::TaskKind::SshForward,
        TaskKind::SshEgress => v1::TaskKind::SshEgress,
    }
}

/// The domain kind of a proto kind; `None` for "unspecified" (no filter).
pub fn task_kind_filter(k: v1::TaskKind) -> Option<TaskKind> {
    TaskKind::ALL.into_iter().find(|d| task_kind(*d) == k)
}

pub fn task_state(s: TaskState) -> v1::TaskState {
    match s {
        TaskState::Starting => v1::TaskState::Starting,
        TaskState::Running => v1::TaskState::Running,
        TaskState::Backoff => v1::TaskState::Backoff,
        TaskState::Stopping => v1::TaskState::Stopping,
        TaskState::Stopped => v1::TaskState::Stopped,
        TaskState::Failed => v1::TaskState::Failed,
    }
}

pub fn task(r: &TaskRecord) -> v1::Task {
    v1::Task {
        id: r.id.to_string(),
        kind: task_kind(r.id.kind) as i32,
        key: r.id.key.clone(),
        state: task_state(r.state) as i32,
        restarts: r.restarts,
        last_error: r.last_error.clone().unwrap_or_default(),
        since: Some(timestamp(r.since)),
        next_attempt: r.next_attempt.map(timestamp),
        labels: r
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<HashMap<_, _>>(),
    }
}

pub fn phase(p: Phase) -> v1::Phase {
    match p {
        Phase::Starting => v1::Phase::Starting,
        Phase::Running => v1::Phase::Running,
        Phase::Draining => v1::Phase::Draining,
    }
}

pub fn config_file_kind(k: SourceKind) -> v1::ConfigFileKind {
    match k {
        SourceKind::DaemonToml => v1::ConfigFileKind::DaemonToml,
        SourceKind::CrabboxYaml => v1::ConfigFileKind::CrabboxYaml,
    }
}

pub fn check(c: &diagnostics::Check) -> v1::Check {
    let status = match c.status {
        diagnostics::Status::Ok => v1::CheckStatus::Ok,
        diagnostics::Status::Warn => v1::CheckStatus::Warn,
        diagnostics::Status::Fail => v1::CheckStatus::Fail,
        diagnostics::Status::Skipped => v1::CheckStatus::Skipped,
    };
    v1::Check {
        name: c.name.clone(),
        status: status as i32,
        detail: c.detail.clone(),
    }
}

// === leases ===

pub fn lease(l: &crate::coordinator::Lease) -> v1::Lease {
    v1::Lease {
        id: l.id.clone(),
        slug: l.slug.clone().unwrap_or_default(),
        provider: l.provider.clone(),
        state: l.state.clone(),
        owner: l.owner.clone(),
        org: l.org.clone(),
        idle_timeout: l
            .idle_timeout_seconds
            .map(|s| duration(Duration::from_secs(s))),
        last_touched_at: coordinator_time(l.last_touched_at.as_deref()),
        expires_at: coordinator_time(l.expires_at.as_deref()),
    }
}

fn heartbeat_transport(via: Option<&str>) -> v1::HeartbeatTransport {
    match via {
        Some("control") => v1::HeartbeatTransport::Control,
        Some("http") => v1::HeartbeatTransport::Http,
        _ => v1::HeartbeatTransport::Unspecified,
    }
}

pub fn kept_lease(s: &crate::lease::LeaseStatus, task_rec: Option<&TaskRecord>) -> v1::KeptLease {
    v1::KeptLease {
        id: s.id.clone(),
        lease: s.lease.as_ref().map(lease),
        task: task_rec.map(task),
        last_heartbeat: s.last_heartbeat.map(timestamp),
        interval: s.interval.map(duration),
        idle_timeout_override: s.idle_override.map(duration),
        ended: s.ended.clone().unwrap_or_default(),
        last_heartbeat_via: heartbeat_transport(s.via) as i32,
    }
}

// === egress ===

pub fn egress_host(i: &crate::egress::EgressInfo) -> v1::EgressHost {
    let s = &i.stats;
    v1::EgressHost {
        lease_id: i.spec.lease.clone(),
        session_id: i.spec.session.clone().unwrap_or_default(),
        profiles: i.spec.profiles.clone(),
        allow: i.spec.allow.clone(),
        allow_private: i.spec.allow_private,
        summary: i.summary.clone(),
        counters: Some(v1::EgressCounters {
            connected: s.connected,
            protocol_version: u32::from(s.protocol_version),
            active_streams: s.active_streams,
            total_streams: s.total_streams,
            rejected_streams: s.rejected_streams,
            bytes_in: s.bytes_in,
            bytes_out: s.bytes_out,
            recent_hosts: s
                .recent_hosts
                .iter()
                .map(|h| v1::HostCount {
                    host: h.host.clone(),
                    count: h.count,
                })
                .collect(),
        }),
        task: i.task.as_ref().map(task),
        remote: i.spec.remote.as_ref().map(|r| v1::EgressRemote {
            listen: r.listen.clone(),
            pid: i
                .remote_task
                .as_ref()
                .and_then(|t| t.labels.get("pid"))
                .and_then(|p| p.parse().ok())
                .unwrap_or(r.pid),
            version: r.version.clone(),
            arch: r.arch.clone(),
            helper_path: r.helper.clone(),
            task: i.remote_task.as_ref().map(task),
        }),
        transport: i.transport.clone(),
        port: i
            .spec
            .remote
            .as_ref()
            .and_then(|r| crate::egress::remote::split_listen(&r.listen).ok())
            .map_or(0, |(_, p)| u32::from(p)),
    }
}

pub fn coordinator_egress(s: &crate::coordinator::EgressStatus) -> v1::CoordinatorEgressStatus {
    v1::CoordinatorEgressStatus {
        active: s.active,
        session_id: s.session_id.clone(),
        profile: s.profile.clone(),
        allow: s.allow.clone(),
        host_connected: s.host_connected,
        client_connected: s.client_connected,
    }
}

/// The domain role of a proto role; UNSPECIFIED is the helper's (client).
pub fn egress_role(r: v1::EgressRole) -> crate::coordinator::Role {
    match r {
        v1::EgressRole::Host => crate::coordinator::Role::Host,
        v1::EgressRole::Client | v1::EgressRole::Unspecified => crate::coordinator::Role::Client,
    }
}

// === runs ===

fn output_stream(e: &crate::coordinator::RunEvent) -> v1::OutputStream {
    // The reference CLI sets `stream` on output events; older recorders
    // only name the stream in `type`.
    match e.stream.as_deref().unwrap_or(e.kind.as_str()) {
        "stdout" => v1::OutputStream::Stdout,
        "stderr" => v1::OutputStream::Stderr,
        _ => v1::OutputStream::Unspecified,
    }
}

pub fn run_event(e: &crate::coordinator::RunEvent) -> v1::RunEvent {
    v1::RunEvent {
        seq: e.seq,
        r#type: e.kind.clone(),
        phase: e.phase.clone().unwrap_or_default(),
        stream: output_stream(e) as i32,
        message: e.message.clone().unwrap_or_default(),
        data: e.data.clone().unwrap_or_default(),
        exit_code: e.exit_code,
        created_at: coordinator_time(Some(&e.created_at)),
    }
}

pub fn run_end(e: &crate::attach::RunEnd) -> v1::RunEnd {
    let (outcome, detail) = match e.state.as_str() {
        "succeeded" => (v1::RunOutcome::Succeeded, String::new()),
        "failed" => (v1::RunOutcome::Failed, String::new()),
        // The feed reports a run it could not read as `unknown (<why>)`.
        other => (
            v1::RunOutcome::Unknown,
            other
                .strip_prefix("unknown (")
                .and_then(|s| s.strip_suffix(')'))
                .unwrap_or(other)
                .to_owned(),
        ),
    };
    v1::RunEnd {
        outcome: outcome as i32,
        exit_code: e.exit_code,
        detail,
    }
}

/// The calling client's SSH agent socket from a request field: `None` when
/// empty. The daemon checks it (a socket owned by its uid) before use.
pub fn agent_socket(raw: &str) -> Option<std::path::PathBuf> {
    Some(raw.trim())
        .filter(|s| !s.is_empty())
        .map(std::path::PathBuf::from)
}

/// A proto signal as the SSH plane's; unspecified means TERM.
pub fn signal(s: i32) -> crate::ssh::Signal {
    use crate::ssh::Signal;
    match v1::Signal::try_from(s).unwrap_or(v1::Signal::Unspecified) {
        v1::Signal::Int => Signal::Int,
        v1::Signal::Hup => Signal::Hup,
        v1::Signal::Kill => Signal::Kill,
        v1::Signal::Term | v1::Signal::Unspecified => Signal::Term,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinator_times_parse_or_are_absent() {
        let t = coordinator_time(Some("2026-01-02T03:04:05.678Z")).unwrap();
        assert_eq!(t.to_string(), "2026-01-02T03:04:05.678Z");
        assert_eq!(coordinator_time(Some("yesterday")), None);
        assert_eq!(coordinator_time(None), None);
    }

    #[test]
    fn idle_timeouts_are_whole_seconds_or_none() {
        let d = |seconds, nanos| Some(prost_types::Duration { seconds, nanos });
        assert_eq!(idle_timeout(None).unwrap(), None);
        assert_eq!(idle_timeout(d(0, 0)).unwrap(), None);
        assert_eq!(idle_timeout(d(-5, 0)).unwrap(), None);
        for short in [d(0, 1), d(1, 0), d(14, 999)] {
            let err = idle_timeout(short).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(err.message().contains("at least 15s"), "{}", err.message());
        }
        assert_eq!(
            idle_timeout(d(15, 0)).unwrap(),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            idle_timeout(d(2700, 0)).unwrap(),
            Some(Duration::from_secs(2700))
        );
    }

    #[test]
    fn run_ends_are_outcomes() {
        let end = |state: &str| crate::attach::RunEnd {
            state: state.to_owned(),
            exit_code: None,
        };
        assert_eq!(
            run_end(&end("succeeded")).outcome(),
            v1::RunOutcome::Succeeded
        );
        assert_eq!(run_end(&end("failed")).outcome(), v1::RunOutcome::Failed);
        let unknown = run_end(&end("unknown (coordinator said 404)"));
        assert_eq!(unknown.outcome(), v1::RunOutcome::Unknown);
        assert_eq!(unknown.detail, "coordinator said 404");
    }
}
