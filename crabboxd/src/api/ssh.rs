//! The `crabbox.daemon.v1.Ssh` service: exec, copy and OpenSSH details for a
//! lease. Each RPC converts its request, hands it to the `SshManager` and
//! converts what comes back; SSH errors map to gRPC codes in `error.rs`.

use std::{path::PathBuf, pin::Pin};

use crabbox_api::v1;
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::error;
use crate::{daemon::DaemonState, ssh};

/// The service implementation.
#[derive(Debug, Clone)]
pub struct SshService {
    state: DaemonState,
}

impl SshService {
    pub fn new(state: DaemonState) -> Self {
        SshService { state }
    }
}

fn lease_id(raw: &str) -> Result<String, Status> {
    error::lease_id(raw).map(str::to_owned)
}

fn agent(raw: &str) -> Option<PathBuf> {
    (!raw.is_empty()).then(|| PathBuf::from(raw))
}

fn signal(s: i32) -> ssh::Signal {
    match v1::Signal::try_from(s).unwrap_or(v1::Signal::Unspecified) {
        v1::Signal::Int => ssh::Signal::Int,
        v1::Signal::Hup => ssh::Signal::Hup,
        v1::Signal::Kill => ssh::Signal::Kill,
        v1::Signal::Term | v1::Signal::Unspecified => ssh::Signal::Term,
    }
}

fn input(msg: v1::ExecRequest) -> Option<ssh::Input> {
    use v1::exec_request::Msg;
    match msg.msg? {
        Msg::Stdin(b) => Some(ssh::Input::Stdin(b.into())),
        Msg::StdinEof(_) => Some(ssh::Input::Eof),
        Msg::Cancel(c) => Some(ssh::Input::Cancel(signal(c.signal))),
        // A second `start` is ignored: a command runs once.
        Msg::Start(_) => None,
    }
}

fn output(o: ssh::Output) -> v1::ExecResponse {
    use v1::exec_response::Event;
    let event = match o {
        ssh::Output::Started { port, fallback } => Event::Started(v1::ExecStarted {
            port: u32::from(port),
            fallback_note: fallback.unwrap_or_default(),
        }),
        ssh::Output::Stdout(b) => Event::Stdout(b.to_vec()),
        ssh::Output::Stderr(b) => Event::Stderr(b.to_vec()),
        ssh::Output::Exit(e) => Event::Exit(v1::ExecExit {
            code: e.code,
            signal: e.signal.unwrap_or_default(),
        }),
    };
    v1::ExecResponse { event: Some(event) }
}

type ExecStream = Pin<Box<dyn Stream<Item = Result<v1::ExecResponse, Status>> + Send>>;
type CopyStream = Pin<Box<dyn Stream<Item = Result<v1::CopyResponse, Status>> + Send>>;

#[tonic::async_trait]
impl v1::ssh_server::Ssh for SshService {
    type ExecStream = ExecStream;
    type CopyStream = CopyStream;

    async fn exec(
        &self,
        req: Request<Streaming<v1::ExecRequest>>,
    ) -> Result<Response<ExecStream>, Status> {
        let mut inbound = req.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("an Exec stream must start with `start`"))?;
        let Some(v1::exec_request::Msg::Start(start)) = first.msg else {
            return Err(Status::invalid_argument(
                "an Exec stream must start with `start`",
            ));
        };
        let command = match (start.argv.is_empty(), start.command.is_empty()) {
            (false, true) => ssh::Command::Argv(start.argv),
            (true, false) => ssh::Command::Shell(start.command),
            _ => {
                return Err(Status::invalid_argument(
                    "give exactly one of `argv` and `command`",
                ));
            }
        };
        let spec = ssh::ExecSpec {
            lease: lease_id(&start.lease_id)?,
            command,
            cwd: (!start.cwd.is_empty()).then_some(start.cwd),
            agent: agent(&start.agent_socket),
        };
        tracing::debug!(rpc = "Exec", lease = %spec.lease, "api call");
        let inbound = inbound.filter_map(|r| {
            futures::future::ready(match r {
                Ok(m) => input(m).map(Ok),
                Err(e) => Some(Err(e)),
            })
        });
        let input = ssh::input_until_error(Box::pin(inbound));
        let out = self
            .state
            .ssh()
            .exec(spec, input)
            .map(|r| r.map(output).map_err(error::ssh));
        Ok(Response::new(Box::pin(out)))
    }

    async fn copy(&self, req: Request<v1::CopyRequest>) -> Result<Response<CopyStream>, Status> {
        let req = req.into_inner();
        let lease = lease_id(&req.lease_id)?;
        let local = PathBuf::from(&req.local_path);
        if !local.is_absolute() {
            return Err(Status::invalid_argument(format!(
                "the local path {:?} must be absolute",
                req.local_path
            )));
        }
        if req.remote_path.is_empty() {
            return Err(Status::invalid_argument("a remote path is required"));
        }
        let direction = match v1::CopyDirection::try_from(req.direction) {
            Ok(v1::CopyDirection::Upload) => ssh::copy::Direction::Upload {
                local,
                remote: req.remote_path,
            },
            Ok(v1::CopyDirection::Download) => ssh::copy::Direction::Download {
                remote: req.remote_path,
                local,
            },
            _ => return Err(Status::invalid_argument("the copy direction is required")),
        };
        tracing::debug!(rpc = "Copy", lease = %lease, "api call");
        let spec = ssh::copy::CopySpec {
            lease,
            direction,
            agent: agent(&req.agent_socket),
        };
        let out = self.state.ssh().copy(spec).map(|r| {
            r.map(|p| v1::CopyResponse {
                bytes: p.bytes,
                total_bytes: p.total.unwrap_or(0),
                done_path: p.done.unwrap_or_default(),
            })
            .map_err(error::ssh)
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn get_ssh_target(
        &self,
        req: Request<v1::GetSshTargetRequest>,
    ) -> Result<Response<v1::GetSshTargetResponse>, Status> {
        let lease = lease_id(&req.into_inner().lease_id)?;
        let info = self
            .state
            .ssh()
            .target_info(&lease)
            .await
            .map_err(error::ssh)?;
        let source = match info.target.origin {
            ssh::target::Origin::Coordinator => v1::TargetSource::Coordinator,
            ssh::target::Origin::Static => v1::TargetSource::Static,
        };
        Ok(Response::new(v1::GetSshTargetResponse {
            lease_id: info.target.lease.clone(),
            host: info.target.host.clone(),
            user: info.target.user.clone(),
            ports: info.target.ports.iter().map(|p| u32::from(*p)).collect(),
            port_in_use: info.port_in_use.map(u32::from).unwrap_or(0),
            key_path: info
                .key
                .map(|k| k.display().to_string())
                .unwrap_or_default(),
            known_hosts_path: info.known_hosts.display().to_string(),
            host_key_alias: info.alias,
            host_key_pinned: info.target.pin.is_some(),
            source: source as i32,
        }))
    }
}
