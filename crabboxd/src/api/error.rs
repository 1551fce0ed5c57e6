//! Domain error → `tonic::Status`, in one place: every error an RPC returns
//! goes through one of these functions, so codes keep one meaning across
//! services.

use tonic::Status;

use crate::{
    coordinator::CoordinatorError, egress::EgressError, lease::LeaseError, telemetry::LogError,
};

pub fn log(e: LogError) -> Status {
    match e {
        LogError::Invalid { .. } => Status::invalid_argument(e.to_string()),
        LogError::NotInitialised => Status::failed_precondition(e.to_string()),
    }
}

/// Maps a lease operation's error to a status. Coordinator answers keep
/// their meaning: 404 → NOT_FOUND, 403 → PERMISSION_DENIED, 409 (lease
/// ended, expired, conflicts) → FAILED_PRECONDITION, network and 5xx →
/// UNAVAILABLE (retry later).
pub fn lease(e: LeaseError) -> Status {
    let msg = e.to_string();
    match e {
        LeaseError::NoCoordinator => Status::failed_precondition(msg),
        LeaseError::NotKept(_) => Status::not_found(msg),
        LeaseError::Persist { .. } => Status::internal(msg),
        LeaseError::Coordinator(c) => coordinator(&c, msg),
    }
}

/// Maps an egress operation's error to a status, like lease errors.
pub fn egress(e: EgressError) -> Status {
    let msg = e.to_string();
    match e {
        EgressError::NoCoordinator => Status::failed_precondition(msg),
        EgressError::Policy(_) => Status::invalid_argument(msg),
        EgressError::NotRunning(_) => Status::not_found(msg),
        EgressError::WouldReplace { .. } => Status::failed_precondition(msg),
        EgressError::Persist(_) => Status::internal(msg),
        EgressError::Coordinator(c) => coordinator(&c, msg),
    }
}

/// A coordinator failure, with `msg` (the caller's sentence for it).
pub fn coordinator(c: &CoordinatorError, msg: String) -> Status {
    match c {
        CoordinatorError::Status { status: 404, .. } => Status::not_found(msg),
        CoordinatorError::Status { status: 401, .. } => Status::unauthenticated(msg),
        CoordinatorError::Status { status: 403, .. } => Status::permission_denied(msg),
        CoordinatorError::Status { status: 400, .. } => Status::invalid_argument(msg),
        _ if c.is_retryable() => Status::unavailable(msg),
        _ => Status::failed_precondition(msg),
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
