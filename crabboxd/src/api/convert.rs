//! Domain ↔ proto conversion, in one place.

use std::{collections::HashMap, time::SystemTime};

use crabbox_api::v1;

use crate::{
    config::SourceKind,
    daemon::Phase,
    diagnostics,
    supervisor::{TaskKind, TaskRecord, TaskState},
};

/// Milliseconds since the Unix epoch.
pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

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
        since_unix_ms: unix_ms(r.since),
        next_attempt_unix_ms: r.next_attempt.map(unix_ms).unwrap_or(0),
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

pub fn lease(l: &crate::coordinator::Lease) -> v1::Lease {
    v1::Lease {
        id: l.id.clone(),
        slug: l.slug.clone().unwrap_or_default(),
        provider: l.provider.clone(),
        state: l.state.clone(),
        owner: l.owner.clone(),
        org: l.org.clone(),
        idle_timeout_seconds: l.idle_timeout_seconds.unwrap_or(0),
        last_touched_at: l.last_touched_at.clone().unwrap_or_default(),
        expires_at: l.expires_at.clone().unwrap_or_default(),
    }
}

pub fn kept_lease(s: &crate::lease::LeaseStatus, task_rec: Option<&TaskRecord>) -> v1::KeptLease {
    v1::KeptLease {
        id: s.id.clone(),
        lease: s.lease.as_ref().map(lease),
        task: task_rec.map(task),
        last_heartbeat_unix_ms: s.last_heartbeat.map(unix_ms).unwrap_or(0),
        interval_ms: s.interval.map(|d| d.as_millis() as u64).unwrap_or(0),
        idle_timeout_override_seconds: s.idle_override.map(|d| d.as_secs()).unwrap_or(0),
        ended: s.ended.clone().unwrap_or_default(),
        last_heartbeat_via: s.via.unwrap_or_default().to_owned(),
    }
}

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

pub fn run_event(e: &crate::coordinator::RunEvent) -> v1::RunEvent {
    v1::RunEvent {
        seq: e.seq,
        r#type: e.kind.clone(),
        phase: e.phase.clone().unwrap_or_default(),
        stream: e.stream.clone().unwrap_or_default(),
        message: e.message.clone().unwrap_or_default(),
        data: e.data.clone().unwrap_or_default(),
        exit_code: e.exit_code,
        created_at: e.created_at.clone(),
    }
}

pub fn run_end(e: &crate::attach::RunEnd) -> v1::RunEnd {
    v1::RunEnd {
        state: e.state.clone(),
        exit_code: e.exit_code,
    }
}
