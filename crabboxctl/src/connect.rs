//! Reaching the daemon: connecting with a bound wait, and turning connection
//! failures and gRPC error codes into sentences that say what to do.

use std::{future::Future, path::Path, time::Duration};

use crabbox_api::{
    Client, ConnectError,
    client::skew_of,
    errors::{self, COORDINATOR_DEADLINE},
    version::{self, Skew},
};
use tonic::Code as GrpcCode;

use crate::{
    dirs::{self, shell_quote},
    exit::{Code, Failure},
    service::Platform,
};

/// How long one connection or unary call may take before crabboxctl gives up.
/// The daemon answers local calls in milliseconds; a daemon that accepts but
/// never answers is wedged, and a bounded wait lets scripts notice.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a call that makes the daemon talk to its coordinator may take:
/// longer than the daemon's own bound on that work
/// ([`COORDINATOR_DEADLINE`]), so a slow coordinator is reported as the
/// coordinator's fault (exit 5), never as a wedged daemon (exit 3).
pub const COORDINATOR_CALL_TIMEOUT: Duration =
    Duration::from_secs(COORDINATOR_DEADLINE.as_secs() + 10);

/// Connects to the daemon at `socket`, or fails with exit code 3 and hints
/// that say where it looked and how to start it.
pub async fn connect(socket: &Path) -> anyhow::Result<Client> {
    match tokio::time::timeout(CALL_TIMEOUT, Client::connect(socket)).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(err)) => Err(unreachable(&err).into()),
        Err(_) => Err(wedged(socket, CALL_TIMEOUT).into()),
    }
}

/// Runs one local call under [`CALL_TIMEOUT`], mapping its status with
/// [`rpc_failed`].
pub async fn call<T>(
    socket: &Path,
    rpc: &str,
    fut: impl Future<Output = Result<T, tonic::Status>>,
) -> anyhow::Result<T> {
    call_within(CALL_TIMEOUT, socket, rpc, fut).await
}

/// Runs one call that reaches the coordinator, under
/// [`COORDINATOR_CALL_TIMEOUT`].
pub async fn call_coordinator<T>(
    socket: &Path,
    rpc: &str,
    fut: impl Future<Output = Result<T, tonic::Status>>,
) -> anyhow::Result<T> {
    call_within(COORDINATOR_CALL_TIMEOUT, socket, rpc, fut).await
}

async fn call_within<T>(
    limit: Duration,
    socket: &Path,
    rpc: &str,
    fut: impl Future<Output = Result<T, tonic::Status>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(status)) => Err(rpc_failed(socket, rpc, &status).into()),
        Err(_) => Err(wedged(socket, limit).into()),
    }
}

/// The failure for a daemon that accepted but did not answer within `limit`.
pub fn wedged(socket: &Path, limit: Duration) -> Failure {
    Failure {
        code: Code::Unreachable,
        message: format!(
            "crabboxd at {} did not answer within {}s",
            socket.display(),
            limit.as_secs()
        ),
        hints: vec![
            "see its log with `crabboxctl daemon logs`".into(),
            "restart it with `crabboxctl daemon restart`".into(),
        ],
    }
}

/// The failure for a daemon that cannot be reached: the connect error's
/// sentence (which names the path) and how to start the daemon.
pub fn unreachable(err: &ConnectError) -> Failure {
    let socket = err.path();
    let hints = match err {
        ConnectError::PermissionDenied { .. } => vec![format!(
            "point --socket or CRABBOX_SOCKET at your own daemon's socket, or check who owns {}",
            socket.display()
        )],
        ConnectError::Refused { .. } => {
            let mut h = vec!["crabboxd removes the stale socket when it starts".to_owned()];
            h.extend(start_hints(socket));
            h
        }
        _ => start_hints(socket),
    };
    Failure {
        code: Code::Unreachable,
        message: err.to_string(),
        hints,
    }
}

/// How to start a daemon that will serve `socket`: the service manager when
/// its unit is installed and the socket is the one it binds, else the
/// background or foreground commands.
pub fn start_hints(socket: &Path) -> Vec<String> {
    if dirs::is_manager_socket(socket)
        && let Some(platform) = Platform::native()
        && platform.installed_unit().is_some()
    {
        return vec![
            format!(
                "start it with `{}` (the {} is installed)",
                platform.start_command(),
                platform.unit_noun()
            ),
            format!("see why it stopped with `{}`", platform.status_command()),
        ];
    }
    if !dirs::is_manager_socket(socket) {
        let flag = format!(" --socket {}", shell_quote(socket));
        return vec![format!(
            "start one there with `crabboxctl{flag} daemon start`, or run `crabboxd{flag}` in the foreground"
        )];
    }
    vec![
        "start it with `crabboxctl daemon start`, or run `crabboxd` in the foreground".to_owned(),
        "or install it as a user service: `crabboxctl daemon install`".to_owned(),
    ]
}

/// Turns a gRPC error from `rpc` into a sentence and an exit code.
pub fn rpc_failed(socket: &Path, rpc: &str, status: &tonic::Status) -> Failure {
    match status.code() {
        GrpcCode::Unimplemented => {
            let daemon = skew_of(status.metadata())
                .and_then(|s| match s {
                    Skew::Minor { daemon } | Skew::Protocol { daemon, .. } => Some(daemon),
                    Skew::None => None,
                })
                .map(|v| format!(" ({v})"))
                .unwrap_or_default();
            Failure::error(format!(
                "crabboxd{daemon} is older than crabboxctl ({}) and does not know {rpc}",
                version::VERSION
            ))
            .hint("run `crabboxctl daemon restart` so the running daemon matches the installed CLI")
        }
        GrpcCode::Unavailable if errors::coordinator_unavailable(status.metadata()).is_some() => {
            let url = errors::coordinator_unavailable(status.metadata()).unwrap_or_default();
            let at = if url.is_empty() {
                "its coordinator".to_owned()
            } else {
                format!("the coordinator at {url}")
            };
            Failure {
                code: Code::CoordinatorUnreachable,
                message: format!(
                    "crabboxd could not reach {at} during {rpc}: {}",
                    status.message()
                ),
                hints: vec![
                    format!("check that {at} is up and reachable from this machine; `crabboxctl doctor` tests it"),
                    "crabboxd itself is running; kept leases and egress hosts keep retrying on their own".to_owned(),
                ],
            }
        }
        GrpcCode::Unavailable => Failure {
            code: Code::Unreachable,
            message: format!(
                "crabboxd at {} went away during {rpc}: {}",
                socket.display(),
                status.message()
            ),
            hints: start_hints(socket),
        },
        GrpcCode::PermissionDenied | GrpcCode::Unauthenticated => Failure::error(format!(
            "crabboxd at {} refused {rpc}: {}",
            socket.display(),
            status.message()
        ))
        .hint("only the user who runs crabboxd may use its socket"),
        _ => {
            let f = Failure::error(format!(
                "{rpc} failed: {} ({})",
                status.message(),
                code_name(status.code())
            ));
            // A daemon of another protocol fails in ways its message cannot
            // explain; the skew sentence can.
            match skew_of(status.metadata()) {
                Some(skew) if skew.is_breaking() => f.hint(skew.to_string()),
                _ => f,
            }
        }
    }
}

fn code_name(code: GrpcCode) -> String {
    format!("{code:?}")
        .chars()
        .flat_map(|c| {
            let lower = c.to_ascii_lowercase();
            let sep = c.is_ascii_uppercase().then_some('-');
            sep.into_iter().chain(std::iter::once(lower))
        })
        .skip(1)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn unreachable_names_the_path_and_how_to_start() {
        let path = PathBuf::from("/tmp/t e/d.sock");
        let f = unreachable(&ConnectError::NotRunning { path });
        assert_eq!(f.code, Code::Unreachable);
        assert!(f.message.contains("/tmp/t e/d.sock"), "{}", f.message);
        assert!(
            f.hints[0].contains("crabboxctl --socket '/tmp/t e/d.sock' daemon start"),
            "{:?}",
            f.hints
        );
        assert!(f.hints[0].contains("crabboxd --socket"), "{:?}", f.hints);
    }

    #[test]
    fn refused_mentions_the_stale_socket() {
        let f = unreachable(&ConnectError::Refused {
            path: "/x/d.sock".into(),
        });
        assert!(f.hints[0].contains("stale socket"));
        assert_eq!(f.code, Code::Unreachable);
    }

    #[test]
    fn unimplemented_says_the_daemon_is_older() {
        let mut status = tonic::Status::unimplemented("no such method");
        status
            .metadata_mut()
            .insert(version::DAEMON_VERSION_KEY, "0.0.1".parse().unwrap());
        status
            .metadata_mut()
            .insert(version::PROTOCOL_KEY, "1".parse().unwrap());
        let f = rpc_failed(Path::new("/x.sock"), "RunDiagnostics", &status);
        assert_eq!(f.code, Code::Error);
        assert_eq!(
            f.message,
            format!(
                "crabboxd (0.0.1) is older than crabboxctl ({}) and does not know RunDiagnostics",
                version::VERSION
            )
        );
        assert!(f.hints[0].contains("crabboxctl daemon restart"));
    }

    #[test]
    fn a_coordinator_outage_is_exit_5_not_a_gone_daemon() {
        let mut status = tonic::Status::unavailable(
            "cannot reach the coordinator at http://127.0.0.1:9: connection refused",
        );
        let md = status.metadata_mut();
        md.insert(errors::ERROR_SOURCE_KEY, "coordinator".parse().unwrap());
        md.insert(
            errors::COORDINATOR_URL_KEY,
            "http://127.0.0.1:9".parse().unwrap(),
        );
        let f = rpc_failed(Path::new("/x.sock"), "KeepLease", &status);
        assert_eq!(f.code, Code::CoordinatorUnreachable);
        assert!(
            f.message.starts_with(
                "crabboxd could not reach the coordinator at http://127.0.0.1:9 during KeepLease"
            ),
            "{}",
            f.message
        );
        assert!(
            f.hints.iter().all(|h| !h.contains("start it")),
            "{:?}",
            f.hints
        );
        // Without the trailers it is the daemon's transport: exit 3.
        let f = rpc_failed(
            Path::new("/x.sock"),
            "KeepLease",
            &tonic::Status::unavailable("connection reset"),
        );
        assert_eq!(f.code, Code::Unreachable);
        assert!(COORDINATOR_CALL_TIMEOUT > COORDINATOR_DEADLINE);
    }

    #[test]
    fn other_codes_keep_the_daemon_message() {
        let f = rpc_failed(
            Path::new("/x.sock"),
            "SetLogLevel",
            &tonic::Status::invalid_argument("bad filter `x=`"),
        );
        assert_eq!(
            f.message,
            "SetLogLevel failed: bad filter `x=` (invalid-argument)"
        );
        let f = rpc_failed(
            Path::new("/x.sock"),
            "GetStatus",
            &tonic::Status::unavailable("gone"),
        );
        assert_eq!(f.code, Code::Unreachable);
        let mut status = tonic::Status::internal("cannot decode");
        let md = status.metadata_mut();
        md.insert(version::DAEMON_VERSION_KEY, "9.0.0".parse().unwrap());
        md.insert(version::PROTOCOL_KEY, "2".parse().unwrap());
        let f = rpc_failed(Path::new("/x.sock"), "ListTasks", &status);
        assert!(
            f.hints[0].contains("speaks local API protocol 2"),
            "{:?}",
            f.hints
        );
    }
}
