//! `crabboxctl cp SRC DST`: copy a file or directory tree to or from a
//! lease over the daemon's SSH connection. Exactly one side is `LEASE:path`.
//! Modes are kept; the destination appears atomically; a progress line is
//! shown when stderr is a terminal.

use std::{
    io::{IsTerminal as _, Write as _},
    path::PathBuf,
};

use crabbox_api::v1::{CopyDirection, CopyRequest};

use crate::{
    Ctx, connect,
    exit::{Code, Failure},
};

/// Copy files to or from a lease (`LEASE:path` on one side).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The source: a local path or `LEASE:path`.
    src: String,
    /// The destination: a local path or `LEASE:path`.
    dst: String,
    /// Print nothing but errors.
    #[arg(short, long)]
    quiet: bool,
}

/// `LEASE:path` → (lease, path). A local path never counts as remote: one
/// that starts with `/` or `.`, or has no `:` before its first `/`.
pub fn split_remote(s: &str) -> Option<(&str, &str)> {
    if s.starts_with('/') || s.starts_with('.') {
        return None;
    }
    let (lease, path) = s.split_once(':')?;
    if lease.is_empty() || lease.contains('/') {
        return None;
    }
    Some((lease, if path.is_empty() { "." } else { path }))
}

/// `p` as an absolute path (relative ones against the current directory),
/// as the daemon needs it.
pub fn absolute(p: &str) -> anyhow::Result<PathBuf> {
    let p = PathBuf::from(p);
    Ok(if p.is_absolute() {
        p
    } else {
        std::env::current_dir()?.join(p)
    })
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// Runs `crabboxctl cp`.
pub async fn run(ctx: &Ctx, args: &Args) -> anyhow::Result<Code> {
    let (lease, direction, local, remote) = match (split_remote(&args.src), split_remote(&args.dst))
    {
        (None, Some((lease, path))) => (lease, CopyDirection::Upload, absolute(&args.src)?, path),
        (Some((lease, path)), None) => (lease, CopyDirection::Download, absolute(&args.dst)?, path),
        _ => {
            return Err(Failure {
                code: Code::Usage,
                message: "exactly one of SRC and DST must be LEASE:path".into(),
                hints: vec!["e.g. crabboxctl cp ./dist cbx_0123456789ab:/work/dist".into()],
            }
            .into());
        }
    };
    let client = connect::connect(&ctx.socket).await?;
    let req = CopyRequest {
        lease_id: lease.to_owned(),
        direction: direction as i32,
        local_path: local.display().to_string(),
        remote_path: remote.to_owned(),
        agent_socket: super::exec::agent_socket(),
    };
    let mut stream = connect::call(&ctx.socket, "Copy", client.ssh().copy(req))
        .await?
        .into_inner();
    let tty = std::io::stderr().is_terminal() && !args.quiet;
    let mut stderr = std::io::stderr();
    loop {
        match stream.message().await {
            Ok(Some(p)) => {
                if !p.done_path.is_empty() {
                    if tty {
                        write!(stderr, "\r\x1b[K")?;
                    }
                    if !args.quiet {
                        writeln!(stderr, "copied {:.1} MiB to {}", mib(p.bytes), p.done_path)?;
                    }
                    return Ok(Code::Ok);
                }
                if tty {
                    if p.total_bytes > 0 {
                        let pct = (p.bytes as f64 / p.total_bytes as f64 * 100.0).min(100.0);
                        write!(
                            stderr,
                            "\r\x1b[K{:.1}/{:.1} MiB {pct:.0}%",
                            mib(p.bytes),
                            mib(p.total_bytes)
                        )?;
                    } else {
                        write!(stderr, "\r\x1b[K{:.1} MiB", mib(p.bytes))?;
                    }
                    stderr.flush()?;
                }
            }
            Ok(None) => anyhow::bail!("crabboxd ended the copy without finishing it"),
            Err(status) => {
                if tty {
                    write!(stderr, "\r\x1b[K")?;
                }
                if status.code() == tonic::Code::Unimplemented {
                    return Err(connect::rpc_failed(&ctx.socket, "Copy", &status).into());
                }
                return Err(Failure::error(format!("cp failed: {}", status.message())).into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_sides() {
        assert_eq!(split_remote("cbx_1:/w"), Some(("cbx_1", "/w")));
        assert_eq!(split_remote("lab:"), Some(("lab", ".")));
        assert_eq!(split_remote("./a:b"), None);
        assert_eq!(split_remote("/a:b"), None);
        assert_eq!(split_remote("dir/a:b"), None);
        assert_eq!(split_remote("plain"), None);
    }
}
