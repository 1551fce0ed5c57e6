//! The coordinator's JSON records, reduced to the fields the daemon uses.
//! Unknown fields are ignored: the reference record has dozens more.

use serde::Deserialize;

/// `{"lease": …}`, the envelope of every lease route.
#[derive(Debug, Deserialize)]
pub(super) struct LeaseEnvelope {
    /// The lease.
    pub lease: Lease,
}

/// A lease record (protocol doc §1.5), the fields the daemon uses.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct Lease {
    /// `cbx_…` or a registered id.
    pub id: String,
    /// The human slug, if any.
    pub slug: Option<String>,
    /// `aws`, `hetzner`, `ssh`, …
    pub provider: String,
    /// `provisioning`, `active`, `released`, `expired` or `failed`.
    pub state: String,
    /// The owner's email.
    pub owner: String,
    /// The org label.
    pub org: String,
    /// The idle timeout in seconds.
    pub idle_timeout_seconds: Option<u64>,
    /// The TTL in seconds.
    pub ttl_seconds: Option<u64>,
    /// ISO-8601.
    pub last_touched_at: Option<String>,
    /// ISO-8601.
    pub expires_at: Option<String>,
    /// The SSH host (an address or name).
    pub host: String,
    /// The SSH user; empty means the default (`crabbox`).
    pub ssh_user: String,
    /// The SSH port, as a string (`"2222"`); empty means the default.
    pub ssh_port: String,
    /// Ports to try after `ssh_port`. Absent means the default (`["22"]`);
    /// present and empty means no fallback.
    pub ssh_fallback_ports: Option<Vec<String>>,
    /// The host key pinned by the coordinator, `"<alg> <base64>"`.
    pub ssh_host_key: Option<String>,
}

impl Lease {
    /// Whether the lease is live (`active` or `provisioning`).
    pub fn is_live(&self) -> bool {
        self.state == "active" || self.state == "provisioning"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_reference_record_ignoring_unknown_fields() {
        let json = r#"{"lease":{"id":"cbx_0123456789ab","slug":"blue-crab","provider":"aws",
            "lifecycle":"managed","target":"linux","serverID":12,"sshPort":"2222","owner":"a@b.c",
            "org":"acme","state":"active","idleTimeoutSeconds":1800,"ttlSeconds":5400,
            "lastTouchedAt":"2026-11-22T00:00:00.000Z","expiresAt":"2026-11-22T00:30:00.000Z",
            "telemetry":{"load1":0.4}}}"#;
        let env: LeaseEnvelope = serde_json::from_str(json).unwrap();
        assert_eq!(env.lease.id, "cbx_0123456789ab");
        assert_eq!(env.lease.idle_timeout_seconds, Some(1800));
        assert!(env.lease.is_live());
        assert_eq!(env.lease.ssh_port, "2222");
        assert_eq!(env.lease.ssh_fallback_ports, None);
    }
}

/// `{"run": …}`.
#[derive(Debug, Deserialize)]
pub(super) struct RunEnvelope {
    /// The run.
    pub run: Run,
}

/// A run record (protocol doc §1.9), the fields the daemon uses.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct Run {
    /// `run_…`.
    pub id: String,
    /// `running`, `succeeded` or `failed`.
    pub state: String,
    /// The command's exit code, once finished.
    pub exit_code: Option<i64>,
    /// Events recorded so far (the last `seq`), when the coordinator says.
    pub event_count: Option<u64>,
}

impl Run {
    /// Whether the run is still going.
    pub fn is_running(&self) -> bool {
        self.state == "running"
    }
}

/// `{"events": […]}`.
#[derive(Debug, Deserialize)]
pub(super) struct EventsEnvelope {
    /// The page.
    #[serde(default)]
    pub events: Vec<RunEvent>,
}

/// One run event (protocol doc §1.9), the fields `attach` shows.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct RunEvent {
    /// 1-based, contiguous.
    pub seq: u64,
    /// `stdout`, `stderr`, `command.finished`, …
    #[serde(rename = "type")]
    pub kind: String,
    /// The phase, if any.
    pub phase: Option<String>,
    /// `stdout` or `stderr`, for output events.
    pub stream: Option<String>,
    /// A message (≤ 16 KiB).
    pub message: Option<String>,
    /// Output data (≤ 16 KiB).
    pub data: Option<String>,
    /// The exit code, on `command.finished`.
    pub exit_code: Option<i64>,
    /// ISO-8601.
    pub created_at: String,
}
