//! Domain error → `tonic::Status`, in one place: every error an RPC returns
//! goes through one of these functions, so codes keep one meaning across
//! services. A coordinator that cannot be reached is UNAVAILABLE with the
//! `x-crabbox-error-source: coordinator` and `x-crabbox-coordinator-url`
//! trailers, so a client never mistakes it for the daemon going away.

use std::future::Future;

use crabbox_api::errors::{
    COORDINATOR_DEADLINE, COORDINATOR_URL_KEY, ERROR_SOURCE_KEY, SOURCE_COORDINATOR,
};
use tonic::{Code, Status, metadata::MetadataMap};

use crate::{
    attach::AttachError,
    coordinator::{CoordinatorError, ErrorKind},
    daemon::DaemonState,
    egress::EgressError,
    lease::LeaseError,
    ssh::SshError,
    telemetry::LogError,
};

pub fn log(e: LogError) -> Status {
    match e {
        LogError::Invalid { .. } => Status::invalid_argument(e.to_string()),
        LogError::NotInitialised => Status::failed_precondition(e.to_string()),
    }
}

/// The configured coordinator's base URL (never credentials; config
/// refuses them), or empty.
pub fn coordinator_url(state: &DaemonState) -> String {
    state
        .config()
        .coordinator
        .as_ref()
        .map(|c| c.url.as_str().trim_end_matches('/').to_owned())
        .unwrap_or_default()
}

/// Maps a lease operation's error to a status.
pub fn lease(e: LeaseError, url: &str) -> Status {
    let msg = e.to_string();
    match e {
        LeaseError::NoCoordinator => Status::failed_precondition(msg),
        LeaseError::NotKept(_) | LeaseError::HeldOnly(_) => Status::not_found(msg),
        LeaseError::Persist { .. } => Status::internal(msg),
        LeaseError::Coordinator(c) => coordinator(&c, msg, url),
    }
}

/// Maps an egress operation's error to a status, like lease errors.
pub fn egress(e: EgressError, url: &str) -> Status {
    let msg = e.to_string();
    match e {
        EgressError::NoCoordinator => Status::failed_precondition(msg),
        EgressError::Policy(_) => Status::invalid_argument(msg),
        EgressError::NotRunning(_) => Status::not_found(msg),
        EgressError::WouldReplace { .. } => Status::failed_precondition(msg),
        EgressError::Persist(_) => Status::internal(msg),
        EgressError::Invalid(_) => Status::failed_precondition(msg),
        EgressError::Remote(crate::egress::remote::RemoteError::Ssh(e)) => ssh(e),
        EgressError::Remote(crate::egress::remote::RemoteError::Lease(_)) => {
            Status::failed_precondition(msg)
        }
        EgressError::Coordinator(c) => coordinator(&c, msg, url),
    }
}

/// Maps a run error to a status.
pub fn run(e: crate::run::RunError, url: &str) -> Status {
    use crate::run::RunError;
    let msg = e.to_string();
    match e {
        RunError::NoCoordinator | RunError::NoEgress(_) => Status::failed_precondition(msg),
        RunError::Invalid(_) => Status::invalid_argument(msg),
        RunError::NotFound(_) => Status::not_found(msg),
        RunError::Coordinator(c) => coordinator(&c, msg, url),
        RunError::Ssh(s) => ssh(s),
    }
}

/// Maps an attach error to a status.
pub fn attach(e: AttachError, url: &str) -> Status {
    let msg = e.to_string();
    match e {
        AttachError::NoCoordinator => Status::failed_precondition(msg),
        AttachError::TooOld(_) => Status::out_of_range(msg),
        AttachError::Coordinator { source, .. } => coordinator(&source, msg, url),
    }
}

/// A coordinator failure, by kind, with `msg` (the caller's sentence).
/// The coordinator's answers keep their meaning: not found, unauthenticated,
/// forbidden, invalid; an ended lease or a conflict is FAILED_PRECONDITION;
/// no answer (network, timeouts, 5xx) is UNAVAILABLE naming the coordinator.
pub fn coordinator(c: &CoordinatorError, msg: String, url: &str) -> Status {
    match c.kind() {
        ErrorKind::NotFound => Status::not_found(msg),
        ErrorKind::Unauthenticated => Status::unauthenticated(msg),
        ErrorKind::Forbidden => Status::permission_denied(msg),
        ErrorKind::Invalid => Status::invalid_argument(msg),
        ErrorKind::LeaseEnded | ErrorKind::Conflict | ErrorKind::Other => {
            Status::failed_precondition(msg)
        }
        ErrorKind::Unavailable => {
            coordinator_unavailable(url, format!("cannot reach the coordinator at {url}: {msg}"))
        }
    }
}

/// UNAVAILABLE, blaming the coordinator at `url` in its trailers.
pub fn coordinator_unavailable(url: &str, msg: String) -> Status {
    let mut md = MetadataMap::new();
    md.insert(ERROR_SOURCE_KEY, SOURCE_COORDINATOR.parse().unwrap());
    if let Ok(v) = url.parse() {
        md.insert(COORDINATOR_URL_KEY, v);
    }
    Status::with_metadata(Code::Unavailable, msg, md)
}

/// Runs one call's coordinator work under [`COORDINATOR_DEADLINE`]: a
/// coordinator that accepts but never answers becomes UNAVAILABLE naming
/// it, before any client deadline (which is longer) runs out and blames the
/// daemon. Dropping the work at the deadline is what a client hanging up
/// does too; every such call is safe to repeat.
pub async fn within_deadline<T>(
    url: &str,
    work: impl Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    match tokio::time::timeout(COORDINATOR_DEADLINE, work).await {
        Ok(result) => result,
        Err(_) => Err(coordinator_unavailable(
            url,
            format!(
                "the coordinator at {url} did not answer within {}s",
                COORDINATOR_DEADLINE.as_secs()
            ),
        )),
    }
}

/// Maps an SSH error to a status: a refused host key, failed
/// authentication, a missing key, an ended lease or a failed copy →
/// FAILED_PRECONDITION (a person must act); unreachable or lost →
/// UNAVAILABLE; unknown target → NOT_FOUND.
pub fn ssh(e: SshError) -> Status {
    let msg = e.to_string();
    match e {
        SshError::NoTarget(_) | SshError::NotFound(_) => Status::not_found(msg),
        SshError::Invalid(_) => Status::invalid_argument(msg),
        SshError::HostKey(_)
        | SshError::Auth(_)
        | SshError::NoKey(_)
        | SshError::LeaseEnded(_)
        | SshError::Copy(_)
        | SshError::Forward(_) => Status::failed_precondition(msg),
        SshError::Unreachable(_) | SshError::Lost(_) => Status::unavailable(msg),
        SshError::Channel(_) => Status::aborted(msg),
    }
}

/// The lease id of a request, trimmed; empty is refused.
pub fn lease_id(raw: &str) -> Result<&str, Status> {
    let id = raw.trim();
    if id.is_empty() {
        return Err(Status::invalid_argument("a lease id is required"));
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16, error: &str) -> CoordinatorError {
        CoordinatorError::Status {
            method: "POST",
            path: "/v1/leases/x/heartbeat".into(),
            status: code,
            code: error.into(),
            message: None,
        }
    }

    #[test]
    fn coordinator_kinds_keep_their_meaning() {
        let url = "http://127.0.0.1:9";
        let code = |e: CoordinatorError| coordinator(&e, e.to_string(), url).code();
        assert_eq!(code(status(404, "not_found")), Code::NotFound);
        assert_eq!(code(status(401, "unauthorized")), Code::Unauthenticated);
        assert_eq!(code(status(403, "forbidden")), Code::PermissionDenied);
        assert_eq!(code(status(400, "bad_request")), Code::InvalidArgument);
        assert_eq!(code(status(409, "lease_ended")), Code::FailedPrecondition);
        let down = coordinator(&status(503, "http_503"), "x".into(), url);
        assert_eq!(down.code(), Code::Unavailable);
        assert!(down.message().contains(url), "{}", down.message());
        assert_eq!(
            crabbox_api::errors::coordinator_unavailable(down.metadata()).as_deref(),
            Some(url)
        );
    }
}
