//! How an error says where it came from: the trailers the daemon adds to a
//! status that the coordinator caused, and the deadline the daemon keeps
//! for coordinator work inside one call, which clients wait longer than.

use std::time::Duration;

use tonic::metadata::MetadataMap;

/// Trailer naming the party that failed; today only
/// [`SOURCE_COORDINATOR`]. A status without it is the daemon's own.
pub const ERROR_SOURCE_KEY: &str = "x-crabbox-error-source";
/// [`ERROR_SOURCE_KEY`] value: the daemon could not get an answer from its
/// coordinator (unreachable, timed out, 5xx).
pub const SOURCE_COORDINATOR: &str = "coordinator";
/// Trailer with the coordinator's base URL (never credentials), on a status
/// whose source is the coordinator.
pub const COORDINATOR_URL_KEY: &str = "x-crabbox-coordinator-url";

/// The longest the daemon spends on coordinator requests inside one call
/// (`KeepLease`, `Heartbeat`, `StartEgressHost`, the first fetch of
/// `Attach`, …) before it answers UNAVAILABLE naming the coordinator. A
/// client's deadline for such calls must be longer, or it would blame the
/// daemon for a slow coordinator.
pub const COORDINATOR_DEADLINE: Duration = Duration::from_secs(20);

/// The coordinator a status blames, when the daemon said the coordinator
/// could not be reached: `Some(url)` (the URL may be empty if the daemon
/// sent none).
pub fn coordinator_unavailable(metadata: &MetadataMap) -> Option<String> {
    let source = metadata.get(ERROR_SOURCE_KEY)?.to_str().ok()?;
    if source != SOURCE_COORDINATOR {
        return None;
    }
    Some(
        metadata
            .get(COORDINATOR_URL_KEY)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_coordinator_trailers() {
        let mut md = MetadataMap::new();
        assert_eq!(coordinator_unavailable(&md), None);
        md.insert(ERROR_SOURCE_KEY, SOURCE_COORDINATOR.parse().unwrap());
        assert_eq!(coordinator_unavailable(&md), Some(String::new()));
        md.insert(COORDINATOR_URL_KEY, "http://127.0.0.1:9".parse().unwrap());
        assert_eq!(
            coordinator_unavailable(&md).as_deref(),
            Some("http://127.0.0.1:9")
        );
        md.insert(ERROR_SOURCE_KEY, "daemon".parse().unwrap());
        assert_eq!(coordinator_unavailable(&md), None);
    }
}
