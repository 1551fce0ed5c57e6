//! The run-recording routes (protocol doc §1.9, reference §2.3): create a
//! run, post its events, finish it with the exit code and the log tail.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{
    Client, CoordinatorError,
    client::encode,
    types::{Run, RunEnvelope, RunEvent},
};

/// What `POST /v1/runs` records.
#[derive(Debug, Clone, Serialize)]
pub struct NewRun<'a> {
    /// The lease's canonical `cbx_…` id.
    #[serde(rename = "leaseID")]
    pub lease_id: &'a str,
    /// The lease's provider, or empty.
    #[serde(skip_serializing_if = "str::is_empty")]
    pub provider: &'a str,
    /// `linux`.
    pub target: &'a str,
    /// The command.
    pub command: &'a [String],
    /// A label, when given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<&'a str>,
}

/// One event for `POST /v1/runs/{id}/events` (every field optional, as the
/// reference's `CoordinatorRunEventInput`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct EventInput {
    /// `stdout`, `stderr`, `command.started`, `output.truncated`, …
    #[serde(rename = "type")]
    pub kind: String,
    /// The phase, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// `stdout` or `stderr`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream: Option<&'static str>,
    /// A message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Output data (≤ 16 KiB).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
}

/// `POST /v1/runs/{id}/finish`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FinishInput {
    /// The command's exit code.
    pub exit_code: i64,
    /// How long the command ran.
    pub command_ms: u64,
    /// The last ≤ 64 KiB of the log.
    pub log: String,
    /// The retained log in 64 KiB UTF-8-safe chunks.
    pub log_chunks: Vec<String>,
    /// Whether the retained log lost its beginning.
    pub log_truncated: bool,
}

#[derive(Debug, Deserialize)]
struct EventEnvelope {
    event: RunEvent,
}

/// The deadlines of the run routes (the reference's).
pub mod timeouts {
    use std::time::Duration;

    /// One output event.
    pub const EVENT: Duration = Duration::from_secs(2);
    /// A lifecycle event.
    pub const LIFECYCLE: Duration = Duration::from_secs(10);
    /// The finish call.
    pub const FINISH: Duration = Duration::from_secs(60);
}
use timeouts::{FINISH as FINISH_TIMEOUT, LIFECYCLE as LIFECYCLE_TIMEOUT};

fn timed_out(method: &'static str, path: String) -> CoordinatorError {
    CoordinatorError::Timeout { method, path }
}

impl Client {
    /// `POST /v1/runs` → the new run.
    pub async fn create_run(&self, run: &NewRun<'_>) -> Result<Run, CoordinatorError> {
        let env: RunEnvelope =
            tokio::time::timeout(LIFECYCLE_TIMEOUT, self.send("POST", "/v1/runs", Some(run)))
                .await
                .map_err(|_| timed_out("POST", "/v1/runs".into()))??;
        Ok(env.run)
    }

    /// `POST /v1/runs/{id}/events` within `timeout` → the recorded event.
    pub async fn post_run_event(
        &self,
        run: &str,
        event: &EventInput,
        timeout: Duration,
    ) -> Result<RunEvent, CoordinatorError> {
        let path = format!("/v1/runs/{}/events", encode(run));
        let env: EventEnvelope =
            tokio::time::timeout(timeout, self.send("POST", &path, Some(event)))
                .await
                .map_err(|_| timed_out("POST", path.clone()))??;
        Ok(env.event)
    }

    /// `POST /v1/runs/{id}/finish` → the finished run.
    pub async fn finish_run(&self, run: &str, body: &FinishInput) -> Result<Run, CoordinatorError> {
        let path = format!("/v1/runs/{}/finish", encode(run));
        let env: RunEnvelope =
            tokio::time::timeout(FINISH_TIMEOUT, self.send("POST", &path, Some(body)))
                .await
                .map_err(|_| timed_out("POST", path.clone()))??;
        Ok(env.run)
    }
}
