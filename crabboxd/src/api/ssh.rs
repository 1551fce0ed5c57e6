//! The `crabbox.daemon.v1.Ssh` service: exec, shells, copy, forwards,
//! checks and OpenSSH details for a lease. Each RPC converts its request, hands it to the `SshManager` and
//! converts what comes back; SSH errors map to gRPC codes in `error.rs`.

use std::{path::PathBuf, pin::Pin};

use crabbox_api::v1;
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::{convert, error};
use crate::{daemon::DaemonState, diagnostics, ssh};

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

/// A forward's local address: `127.0.0.1:PORT`, `[::1]:PORT`, a bare port
/// (on 127.0.0.1), or empty (`127.0.0.1:0`). Loopback is checked later.
fn local_addr(raw: &str) -> Result<std::net::SocketAddr, Status> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Ok(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    }
    if let Ok(port) = raw.parse::<u16>() {
        return Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    }
    raw.parse().map_err(|_| {
        Status::invalid_argument(format!(
            "the local address {raw:?} is not IP:PORT (for example 127.0.0.1:8080)"
        ))
    })
}

fn forward(f: ssh::forward::ForwardInfo) -> v1::Forward {
    v1::Forward {
        id: f.id,
        lease_id: f.lease,
        local: f.local.to_string(),
        remote: f.remote.to_string(),
        open_connections: f.open,
        total_connections: f.total,
        bytes_out: f.bytes_out,
        bytes_in: f.bytes_in,
        refused_connections: f.refused,
    }
}

fn input(msg: v1::ExecRequest) -> Option<ssh::Input> {
    use v1::exec_request::Msg;
    match msg.msg? {
        Msg::Stdin(b) => Some(ssh::Input::Stdin(b.into())),
        Msg::StdinEof(_) => Some(ssh::Input::Eof),
        Msg::Cancel(c) => Some(ssh::Input::Cancel(convert::signal(c.signal))),
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

type ShellStream = Pin<Box<dyn Stream<Item = Result<v1::ShellResponse, Status>> + Send>>;
type ExecStream = Pin<Box<dyn Stream<Item = Result<v1::ExecResponse, Status>> + Send>>;
type CopyStream = Pin<Box<dyn Stream<Item = Result<v1::CopyResponse, Status>> + Send>>;

#[tonic::async_trait]
impl v1::ssh_server::Ssh for SshService {
    type ExecStream = ExecStream;
    type CopyStream = CopyStream;
    type ShellStream = ShellStream;

    async fn shell(
        &self,
        req: Request<Streaming<v1::ShellRequest>>,
    ) -> Result<Response<ShellStream>, Status> {
        use v1::{shell_request::Msg, shell_response::Event};
        let mut inbound = req.into_inner();
        let first = inbound.message().await?;
        let Some(v1::ShellRequest {
            msg: Some(Msg::Start(start)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "a Shell stream must start with `start`",
            ));
        };
        let size = start.size.unwrap_or_default();
        let spec = ssh::shell::ShellSpec {
            lease: lease_id(&start.lease_id)?,
            command: (!start.command.is_empty()).then_some(start.command),
            term: start.term,
            cols: size.cols,
            rows: size.rows,
            agent: convert::agent_socket(&start.agent_socket),
        };
        tracing::debug!(rpc = "Shell", lease = %spec.lease, "api call");
        // The stream ends at the first error (the client went away).
        let input = inbound
            .take_while(|r| futures::future::ready(r.is_ok()))
            .filter_map(|r| {
                futures::future::ready(match r.ok().and_then(|m| m.msg) {
                    Some(Msg::Stdin(b)) => Some(ssh::shell::ShellInput::Stdin(b.into())),
                    Some(Msg::Resize(w)) => Some(ssh::shell::ShellInput::Resize {
                        cols: w.cols,
                        rows: w.rows,
                    }),
                    // A second `start` is ignored: a shell runs once.
                    Some(Msg::Start(_)) | None => None,
                })
            });
        let out = self.state.ssh().shell(spec, Box::pin(input)).map(|r| {
            r.map(|o| {
                let event = match o {
                    ssh::shell::ShellOutput::Started { port, fallback } => {
                        Event::Started(v1::ExecStarted {
                            port: u32::from(port),
                            fallback_note: fallback.unwrap_or_default(),
                        })
                    }
                    ssh::shell::ShellOutput::Output(b) => Event::Output(b.to_vec()),
                    ssh::shell::ShellOutput::Exit(e) => Event::Exit(v1::ExecExit {
                        code: e.code,
                        signal: e.signal.unwrap_or_default(),
                    }),
                };
                v1::ShellResponse { event: Some(event) }
            })
            .map_err(error::ssh)
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn start_forward(
        &self,
        req: Request<v1::StartForwardRequest>,
    ) -> Result<Response<v1::Forward>, Status> {
        let req = req.into_inner();
        let lease = lease_id(&req.lease_id)?;
        let local = local_addr(&req.local)?;
        let remote = ssh::forward::parse_remote(&req.remote).map_err(error::ssh)?;
        tracing::debug!(rpc = "StartForward", lease = %lease, local = %local, "api call");
        let info = self
            .state
            .ssh()
            .start_forward(ssh::forward::ForwardSpec {
                lease,
                local,
                remote,
                agent: convert::agent_socket(&req.agent_socket),
            })
            .await
            .map_err(error::ssh)?;
        Ok(Response::new(forward(info)))
    }

    async fn list_forwards(
        &self,
        req: Request<v1::ListForwardsRequest>,
    ) -> Result<Response<v1::ListForwardsResponse>, Status> {
        let req = req.into_inner();
        let lease = req.lease_id.trim();
        let forwards = self
            .state
            .ssh()
            .list_forwards((!lease.is_empty()).then_some(lease))
            .await;
        Ok(Response::new(v1::ListForwardsResponse {
            forwards: forwards.into_iter().map(forward).collect(),
        }))
    }

    async fn stop_forward(
        &self,
        req: Request<v1::StopForwardRequest>,
    ) -> Result<Response<v1::Forward>, Status> {
        let req = req.into_inner();
        let id = req.id.trim();
        let info = if !id.is_empty() {
            self.state.ssh().stop_forward(Some(id), None).await
        } else {
            let lease = lease_id(&req.lease_id).map_err(|_| {
                Status::invalid_argument(
                    "name a forward: its id, or a lease id and a local address",
                )
            })?;
            let local = local_addr(&req.local)?;
            self.state
                .ssh()
                .stop_forward(None, Some((lease.as_str(), local)))
                .await
        }
        .map_err(error::ssh)?;
        Ok(Response::new(forward(info)))
    }

    async fn check_ssh(
        &self,
        req: Request<v1::CheckSshRequest>,
    ) -> Result<Response<v1::CheckSshResponse>, Status> {
        let req = req.into_inner();
        let lease = lease_id(&req.lease_id)?;
        ssh::target::check_lease_id(&lease).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let agent = convert::agent_socket(&req.agent_socket);
        let checks = diagnostics::ssh(&self.state, &lease, agent.as_deref()).await;
        Ok(Response::new(v1::CheckSshResponse {
            checks: checks.iter().map(convert::check).collect(),
        }))
    }

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
            agent: convert::agent_socket(&start.agent_socket),
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
            agent: convert::agent_socket(&req.agent_socket),
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
