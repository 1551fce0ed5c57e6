//! The closed set of task kinds and the `TaskId` that keys one task.

use std::fmt;

/// Everything the daemon supervises. A closed enum, so a reader sees every
/// kind of long-running work in one place and `crabboxctl tasks` can name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TaskKind {
    /// The local API server.
    ApiServer,
    /// The shared `/v1/control` WebSocket to one coordinator.
    ControlChannel,
    /// Heartbeats and lease-end detection for one lease.
    LeaseKeeper,
    /// The operator end of mediated egress for one lease.
    EgressHost,
    /// The lease-side egress helper managed over SSH.
    EgressRemoteClient,
    /// The shared SSH connection to one lease.
    SshMux,
    /// The shared event feed of one run.
    AttachFeed,
    /// One run started through the daemon.
    Run,
    /// One local port forward to a lease over its SSH mux.
    SshForward,
    /// Egress for one lease over its SSH mux (a remote forward served by the daemon).
    SshEgress,
}

impl TaskKind {
    /// Every kind, in display order.
    pub const ALL: [TaskKind; 10] = [
        TaskKind::ApiServer,
        TaskKind::ControlChannel,
        TaskKind::LeaseKeeper,
        TaskKind::EgressHost,
        TaskKind::EgressRemoteClient,
        TaskKind::SshMux,
        TaskKind::AttachFeed,
        TaskKind::Run,
        TaskKind::SshForward,
        TaskKind::SshEgress,
    ];

    /// The kebab-case name used in task ids and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::ApiServer => "api-server",
            TaskKind::ControlChannel => "control-channel",
            TaskKind::LeaseKeeper => "lease-keeper",
            TaskKind::EgressHost => "egress-host",
            TaskKind::EgressRemoteClient => "egress-remote-client",
            TaskKind::SshMux => "ssh-mux",
            TaskKind::AttachFeed => "attach-feed",
            TaskKind::Run => "run",
            TaskKind::SshForward => "ssh-forward",
            TaskKind::SshEgress => "ssh-egress",
        }
    }
}

impl fmt::Display for TaskKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The key of one task: its kind and what it works on (a lease id, a run id,
/// a coordinator URL, or nothing for singletons). There is at most one live
/// task per id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TaskId {
    /// The kind.
    pub kind: TaskKind,
    /// The key within the kind.
    pub key: String,
}

impl TaskId {
    /// Builds an id.
    pub fn new(kind: TaskKind, key: impl Into<String>) -> Self {
        TaskId {
            kind,
            key: key.into(),
        }
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            f.write_str(self.kind.as_str())
        } else {
            write!(f, "{}/{}", self.kind, self.key)
        }
    }
}
