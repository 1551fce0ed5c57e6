//! The JSON records the coordinator stores and returns: leases, runs and run events.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A lease record (protocol §1.5), limited to the fields this coordinator fills.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Lease {
    /// Lease id.
    pub id: String,
    /// Human slug, normalised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slug: Option<String>,
    /// Provider name (`ssh` for registered boxes).
    pub provider: String,
    /// `registered` for leases created through the registration route.
    pub lifecycle: String,
    /// `linux`, `macos` or `windows`.
    pub target: String,
    /// `normal` or `wsl2` for Windows targets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub windows_mode: Option<String>,
    /// Provider-side id.
    #[serde(rename = "cloudID")]
    pub cloud_id: String,
    /// Owner of the lease.
    pub owner: String,
    /// Org label of the lease.
    pub org: String,
    /// Profile name.
    pub profile: String,
    /// Machine class.
    pub class: String,
    /// Provider server type.
    pub server_type: String,
    /// Provider server id (0 for registered boxes).
    #[serde(rename = "serverID")]
    pub server_id: i64,
    /// Provider server name.
    pub server_name: String,
    /// Provider SSH key name.
    pub provider_key: String,
    /// SSH host.
    pub host: String,
    /// SSH user.
    pub ssh_user: String,
    /// SSH port, a string as in the reference.
    pub ssh_port: String,
    /// Fallback SSH ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_fallback_ports: Option<Vec<String>>,
    /// Pinned SSH host key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_host_key: Option<String>,
    /// Work directory on the box.
    pub work_root: String,
    /// Whether release keeps the box.
    pub keep: bool,
    /// Lease TTL in seconds.
    pub ttl_seconds: i64,
    /// Idle timeout in seconds.
    pub idle_timeout_seconds: i64,
    /// Cost estimate (0 for registered boxes).
    #[serde(rename = "estimatedHourlyUSD")]
    pub estimated_hourly_usd: f64,
    /// Cost cap (0 for registered boxes).
    #[serde(rename = "maxEstimatedUSD")]
    pub max_estimated_usd: f64,
    /// `provisioning`, `active`, `released`, `expired` or `failed`.
    pub state: String,
    /// ISO creation time.
    pub created_at: String,
    /// ISO update time.
    pub updated_at: String,
    /// ISO time of the last heartbeat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_touched_at: Option<String>,
    /// ISO expiry time.
    pub expires_at: String,
    /// Latest telemetry sample.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telemetry: Option<Value>,
    /// Up to 60 recent samples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telemetry_history: Option<Vec<Value>>,
    /// ISO time of registration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registered_at: Option<String>,
    /// ISO time of release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released_at: Option<String>,
    /// ISO time the lease stopped being live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
}

impl Lease {
    /// `active` or `provisioning`.
    pub fn is_live(&self) -> bool {
        matches!(self.state.as_str(), "active" | "provisioning")
    }

    /// Expiry as Unix milliseconds.
    pub fn expires_ms(&self) -> i64 {
        crate::clock::parse_iso(&self.expires_at).unwrap_or(0)
    }
}

/// `{owner, org}` of a lease a run is attributed to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OwnerOrg {
    /// Owner.
    pub owner: String,
    /// Org label.
    pub org: String,
}

/// A run record (protocol §1.9).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Run {
    /// `run_` + 12 hex.
    pub id: String,
    /// Lease the run used (`""` when none).
    #[serde(rename = "leaseID")]
    pub lease_id: String,
    /// Slug of that lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slug: Option<String>,
    /// Actor owner.
    pub owner: String,
    /// Actor org.
    pub org: String,
    /// Owners of attributed leases (they may read the run).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lease_owners: Vec<OwnerOrg>,
    /// Provider.
    pub provider: String,
    /// Target OS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Windows mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub windows_mode: Option<String>,
    /// Machine class.
    pub class: String,
    /// Server type.
    pub server_type: String,
    /// Command argv.
    pub command: Vec<String>,
    /// Free-form label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// `running`, `succeeded` or `failed`.
    pub state: String,
    /// Latest phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Exit code once finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
    /// Sync duration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_ms: Option<i64>,
    /// Command duration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_ms: Option<i64>,
    /// Whole run duration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<i64>,
    /// Stored log size.
    pub log_bytes: i64,
    /// Whether the log was cut at the cap.
    pub log_truncated: bool,
    /// Stage that blocked the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked_stage: Option<String>,
    /// Whether a retry would likely help.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_likely: Option<bool>,
    /// Structured results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub results: Option<Value>,
    /// Telemetry summary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telemetry: Option<Value>,
    /// ISO start time.
    pub started_at: String,
    /// ISO time of the latest event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event_at: Option<String>,
    /// Number of events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_count: Option<i64>,
    /// ISO end time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
}

impl Run {
    /// Whether a caller may read this run: admin, actor, or attributed lease owner.
    pub fn readable_by(&self, p: &crate::auth::Principal) -> bool {
        p.admin
            || p.owns(&self.owner, &self.org)
            || self.lease_owners.iter().any(|o| p.owns(&o.owner, &o.org))
    }

    /// Whether a caller may write this run: admin or actor.
    pub fn writable_by(&self, p: &crate::auth::Principal) -> bool {
        p.admin || p.owns(&self.owner, &self.org)
    }
}

/// A run event (protocol §1.9).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RunEvent {
    /// Run id.
    #[serde(rename = "runID")]
    pub run_id: String,
    /// 1-based, contiguous.
    pub seq: i64,
    /// Event type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// `stdout` or `stderr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// Message text, ≤16 KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Data text, ≤16 KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// Lease id (only the `cbx_` form).
    #[serde(rename = "leaseID", default, skip_serializing_if = "Option::is_none")]
    pub lease_id: Option<String>,
    /// Lease slug.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slug: Option<String>,
    /// Provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// Target OS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Windows mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub windows_mode: Option<String>,
    /// Machine class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    /// Server type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_type: Option<String>,
    /// Exit code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
    /// ISO creation time.
    pub created_at: String,
}
