//! `crabboxctl doctor`: local checks (socket directory and socket modes and
//! owner, daemon reachable, CLI/daemon versions, installed unit) plus the
//! daemon's own RunDiagnostics; with `--id L` also the daemon's SSH checks
//! of that lease (key and mode, known_hosts, agent, the port that answers);
//! one line per check, exit 4 on any failure.

use std::{
    fs,
    os::unix::fs::{FileTypeExt as _, MetadataExt as _},
    path::Path,
};

use crabbox_api::{
    Client,
    v1::{CheckSshRequest, RunDiagnosticsRequest},
    version::Skew,
};

use crate::{
    Ctx, connect, dirs,
    exit::{Code, Failure},
    output::{self, CheckJson, Outcome},
    service::Platform,
};

/// Check the socket, configuration, coordinator and versions; say what to fix.
///
/// Exits 4 when any check fails. The daemon's checks (configuration file
/// modes, coordinator reachability, token presence) need it running; when it
/// is not, crabboxctl checks the configuration file modes itself.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print JSON (for scripts; the format is unstable until promised).
    #[arg(long)]
    json: bool,
    /// Also check the SSH setup of this lease (or static target): key and
    /// its mode, known_hosts, the SSH agent when there is no key file, and
    /// which port answers.
    #[arg(long = "id", value_name = "LEASE")]
    lease: Option<String>,
}

fn check(name: &str, status: Outcome, detail: impl Into<String>) -> CheckJson {
    CheckJson {
        name: name.to_owned(),
        status,
        detail: detail.into(),
        source: "local",
    }
}

/// Runs `crabboxctl doctor`.
pub async fn run(ctx: &Ctx, args: &Args) -> anyhow::Result<Code> {
    let mut checks = vec![socket_dir_check(&ctx.socket), socket_check(&ctx.socket)];
    match connect::connect(&ctx.socket).await {
        Ok(client) => {
            daemon_checks(ctx, client.clone(), &mut checks).await;
            if let Some(lease) = &args.lease {
                ssh_checks(ctx, client, lease, &mut checks).await;
            }
        }
        Err(err) => {
            let detail = match err.downcast_ref::<Failure>() {
                Some(f) => match f.hints.first() {
                    Some(hint) => format!("{}; {hint}", f.message),
                    None => f.message.clone(),
                },
                None => format!("{err:#}"),
            };
            checks.push(check("daemon", Outcome::Fail, detail));
            checks.extend(config_file_checks());
            checks.push(check(
                "coordinator",
                Outcome::Skip,
                "coordinator and token checks need a running crabboxd",
            ));
        }
    }
    checks.extend(unit_check());

    let failures = checks.iter().filter(|c| c.status == Outcome::Fail).count();
    let warnings = checks.iter().filter(|c| c.status == Outcome::Warn).count();
    if args.json {
        output::print_json(&output::DoctorJson {
            checks: &checks,
            failures,
            warnings,
        })?;
    } else {
        out!("{}", output::checks_human(&checks))?;
        outln!(
            "{}",
            match (failures, warnings) {
                (0, 0) => "all checks passed".to_owned(),
                (f, w) => format!("{f} failed, {w} with warnings"),
            }
        )?;
    }
    Ok(if failures > 0 {
        Code::DoctorFailed
    } else {
        Code::Ok
    })
}

async fn daemon_checks(ctx: &Ctx, client: Client, checks: &mut Vec<CheckJson>) {
    match connect::call(&ctx.socket, "GetStatus", client.status()).await {
        Ok((status, skew)) => {
            checks.push(check(
                "daemon",
                Outcome::Ok,
                format!(
                    "crabboxd {} (pid {}) answers at {}",
                    status.version,
                    status.pid,
                    ctx.socket.display()
                ),
            ));
            let outcome = match skew {
                Skew::None => Outcome::Ok,
                Skew::Minor { .. } => Outcome::Warn,
                Skew::Protocol { .. } => Outcome::Fail,
            };
            checks.push(check("versions", outcome, skew.to_string()));
        }
        Err(err) => checks.push(check("daemon", Outcome::Fail, format!("{err:#}"))),
    }
    let diagnostics = connect::call(
        &ctx.socket,
        "RunDiagnostics",
        client.daemon().run_diagnostics(RunDiagnosticsRequest {}),
    )
    .await;
    match diagnostics {
        Ok(reply) => checks.extend(reply.into_inner().checks.into_iter().map(|c| CheckJson {
            name: c.name,
            status: output::outcome_of(c.status),
            detail: c.detail,
            source: "daemon",
        })),
        Err(err) => {
            let detail = match err.downcast_ref::<Failure>() {
                Some(f) => match f.hints.first() {
                    Some(hint) => format!("{}; {hint}", f.message),
                    None => f.message.clone(),
                },
                None => format!("{err:#}"),
            };
            checks.push(check("daemon diagnostics", Outcome::Warn, detail));
        }
    }
}

async fn ssh_checks(ctx: &Ctx, client: Client, lease: &str, checks: &mut Vec<CheckJson>) {
    let req = CheckSshRequest {
        lease_id: lease.to_owned(),
        agent_socket: crate::commands::exec::agent_socket(),
    };
    match connect::call_coordinator(&ctx.socket, "CheckSsh", client.ssh().check_ssh(req)).await {
        Ok(reply) => checks.extend(reply.into_inner().checks.into_iter().map(|c| CheckJson {
            name: c.name,
            status: output::outcome_of(c.status),
            detail: c.detail,
            source: "daemon",
        })),
        Err(err) => {
            let detail = match err.downcast_ref::<Failure>() {
                Some(f) => f.message.clone(),
                None => format!("{err:#}"),
            };
            checks.push(check("ssh checks", Outcome::Fail, detail));
        }
    }
}

/// Classifies permission bits: exactly `want` is ok; any of `fail_bits` is a
/// failure; other differences only a warning.
fn mode_outcome(mode: u32, want: u32, fail_bits: u32) -> Outcome {
    let mode = mode & 0o777;
    if mode == want {
        Outcome::Ok
    } else if mode & fail_bits != 0 {
        Outcome::Fail
    } else {
        Outcome::Warn
    }
}

fn owner_problem(meta: &fs::Metadata, path: &Path) -> Option<CheckJson> {
    let me = nix::unistd::getuid().as_raw();
    (meta.uid() != me).then(|| {
        check(
            "owner",
            Outcome::Fail,
            format!(
                "{} belongs to uid {}, not to you (uid {me}); remove it or use another --socket",
                path.display(),
                meta.uid()
            ),
        )
    })
}

fn socket_dir_check(socket: &Path) -> CheckJson {
    const NAME: &str = "socket directory";
    let Some(dir) = socket.parent() else {
        return check(NAME, Outcome::Skip, "the socket path has no directory");
    };
    let meta = match fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return check(
                NAME,
                Outcome::Warn,
                format!(
                    "{} does not exist yet; crabboxd creates it (0700) when it starts",
                    dir.display()
                ),
            );
        }
        Err(e) => {
            return check(
                NAME,
                Outcome::Fail,
                format!("cannot read {}: {e}", dir.display()),
            );
        }
    };
    if let Some(mut c) = owner_problem(&meta, dir) {
        c.name = NAME.to_owned();
        return c;
    }
    let mode = meta.mode() & 0o777;
    // Group or other write on the directory would let another user replace
    // the socket; read or search alone only reveals its name.
    match mode_outcome(mode, 0o700, 0o022) {
        Outcome::Ok => check(
            NAME,
            Outcome::Ok,
            format!("{} is yours, mode 0700", dir.display()),
        ),
        outcome => check(
            NAME,
            outcome,
            format!(
                "{} has mode {mode:04o}, want 0700 (only you may reach the socket): run `chmod 700 {}`",
                dir.display(),
                dirs::shell_quote(dir)
            ),
        ),
    }
}

fn socket_check(socket: &Path) -> CheckJson {
    const NAME: &str = "socket";
    let meta = match fs::symlink_metadata(socket) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return check(
                NAME,
                Outcome::Skip,
                format!(
                    "no socket at {} (crabboxd is not running)",
                    socket.display()
                ),
            );
        }
        Err(e) => {
            return check(
                NAME,
                Outcome::Fail,
                format!("cannot read {}: {e}", socket.display()),
            );
        }
    };
    if !meta.file_type().is_socket() {
        return check(
            NAME,
            Outcome::Fail,
            format!(
                "{} is not a socket; remove it so crabboxd can bind there",
                socket.display()
            ),
        );
    }
    if let Some(mut c) = owner_problem(&meta, socket) {
        c.name = NAME.to_owned();
        return c;
    }
    let mode = meta.mode() & 0o777;
    // Any group or other bit on the socket lets another user connect (the
    // daemon still refuses them by peer uid, but it should never get that far).
    match mode_outcome(mode, 0o600, 0o077) {
        Outcome::Ok => check(
            NAME,
            Outcome::Ok,
            format!("{} is yours, mode 0600", socket.display()),
        ),
        outcome => check(
            NAME,
            outcome,
            format!(
                "{} has mode {mode:04o}, want 0600: run `chmod 600 {}` and `crabboxctl daemon restart`",
                socket.display(),
                dirs::shell_quote(socket)
            ),
        ),
    }
}

/// The daemon checks its configuration files itself; these run only when it
/// is down, so a broken setup is still diagnosed.
fn config_file_checks() -> Vec<CheckJson> {
    let Ok(files) = dirs::config_files() else {
        return vec![check("config files", Outcome::Skip, "no home directory")];
    };
    files
        .iter()
        .filter_map(|path| {
            let meta = fs::metadata(path).ok()?;
            let mode = meta.mode() & 0o777;
            let name = format!(
                "config {}",
                path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
            );
            Some(if mode & 0o077 == 0 {
                check(&name, Outcome::Ok, format!("{} has mode {mode:04o}", path.display()))
            } else {
                check(
                    &name,
                    Outcome::Fail,
                    format!(
                        "{} has mode {mode:04o} and may hold a token, want 0600: run `chmod 600 {}`",
                        path.display(),
                        dirs::shell_quote(path)
                    ),
                )
            })
        })
        .collect()
}

/// When a user unit or agent is installed, its ExecStart must still exist
/// (an upgrade that moved the binary leaves a unit that cannot start).
fn unit_check() -> Option<CheckJson> {
    let platform = Platform::native()?;
    let unit = platform.installed_unit()?;
    let text = fs::read_to_string(&unit).ok()?;
    let program = program_of(platform, &text)?;
    Some(if Path::new(&program).is_file() {
        check(
            "service",
            Outcome::Ok,
            format!("{} {} runs {program}", platform.unit_noun(), unit.display()),
        )
    } else {
        check(
            "service",
            Outcome::Fail,
            format!(
                "{} {} runs {program}, which does not exist: run `crabboxctl daemon install` again",
                platform.unit_noun(),
                unit.display()
            ),
        )
    })
}

/// The program a rendered unit or plist starts.
fn program_of(platform: Platform, text: &str) -> Option<String> {
    match platform {
        Platform::Systemd => {
            let exec = text.lines().find_map(|l| l.strip_prefix("ExecStart="))?;
            let exec = exec.trim();
            Some(
                match exec.strip_prefix('"') {
                    Some(quoted) => quoted
                        .split_once('"')
                        .map(|(p, _)| p.replace("\\\\", "\\"))?,
                    None => exec.split_whitespace().next()?.to_owned(),
                }
                .replace("%%", "%")
                .replace("$$", "$"),
            )
        }
        Platform::Launchd => {
            let args = text.split("<key>ProgramArguments</key>").nth(1)?;
            let first = args.split("<string>").nth(1)?.split("</string>").next()?;
            Some(
                first
                    .replace("&lt;", "<")
                    .replace("&gt;", ">")
                    .replace("&quot;", "\"")
                    .replace("&amp;", "&"),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn modes_classify() {
        assert_eq!(mode_outcome(0o700, 0o700, 0o022), Outcome::Ok);
        assert_eq!(mode_outcome(0o40700, 0o700, 0o022), Outcome::Ok);
        assert_eq!(mode_outcome(0o750, 0o700, 0o022), Outcome::Warn);
        assert_eq!(mode_outcome(0o777, 0o700, 0o022), Outcome::Fail);
        assert_eq!(mode_outcome(0o640, 0o600, 0o077), Outcome::Fail);
        assert_eq!(mode_outcome(0o400, 0o600, 0o077), Outcome::Warn);
    }

    #[test]
    fn socket_dir_modes_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        fs::create_dir(&run).unwrap();
        let socket = run.join("crabboxd.sock");
        fs::set_permissions(&run, fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(socket_dir_check(&socket).status, Outcome::Ok);
        fs::set_permissions(&run, fs::Permissions::from_mode(0o777)).unwrap();
        let c = socket_dir_check(&socket);
        assert_eq!(c.status, Outcome::Fail);
        assert!(c.detail.contains("chmod 700"), "{}", c.detail);
        assert_eq!(
            socket_dir_check(&dir.path().join("nope/crabboxd.sock")).status,
            Outcome::Warn
        );
    }

    #[test]
    fn socket_modes_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.sock");
        assert_eq!(socket_check(&path).status, Outcome::Skip);
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(socket_check(&path).status, Outcome::Ok);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).unwrap();
        assert_eq!(socket_check(&path).status, Outcome::Fail);
        let file = dir.path().join("file");
        fs::write(&file, "").unwrap();
        assert!(socket_check(&file).detail.contains("not a socket"));
    }

    #[test]
    fn unit_programs_parse_back() {
        let unit = "[Service]\nExecStart=\"/home/a b/100%%/crabboxd\"\n";
        assert_eq!(
            program_of(Platform::Systemd, unit).as_deref(),
            Some("/home/a b/100%/crabboxd")
        );
        assert_eq!(
            program_of(Platform::Systemd, "ExecStart=/usr/bin/crabboxd --x\n").as_deref(),
            Some("/usr/bin/crabboxd")
        );
        let plist = "<key>ProgramArguments</key>\n<array>\n<string>/U/a&amp;b/crabboxd</string>";
        assert_eq!(
            program_of(Platform::Launchd, plist).as_deref(),
            Some("/U/a&b/crabboxd")
        );
    }
}
