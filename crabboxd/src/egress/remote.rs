//! The lease side of egress over SSH: what runs on the lease through its
//! `SshMux` — OS and CPU detection, the content-addressed helper install,
//! starting, probing, re-ticketing and stopping exactly one session's
//! helper, and the lease-local state file other tools read.
//!
//! Every remote command is an argv (quoted words, values as positional
//! parameters); a ticket only ever travels inside a `direct-streamlocal`
//! channel to the helper's 0600 control socket, never in an argv, an
//! environment, a URL or a log line. Lease-side layout (per user, 0700
//! directories, 0600 files):
//!
//! * `$HOME/.cache/crabbox/bin/<sha256>/crabbox-egress-client`
//! * `$HOME/.local/state/crabbox/egress/<session>/` — `helper.pid`,
//!   `control.sock`, `helper.log`, `coordinator` (the URL the helper dials)
//! * `$HOME/.local/state/crabbox/egress/current.json` — the lease's proxy

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::ssh::{
    Command, ExecSpec, Input, Output, SshError, SshManager,
    tunnel::{self, Endpoint},
};

/// The helper's file name, locally and on the lease.
pub const HELPER: &str = "crabbox-egress-client";
/// Output kept from one remote command (the rest is dropped).
const OUTPUT_CAP: usize = 64 * 1024;
/// How long one remote command may take (an upload of a large helper over
/// a slow link included).
const COMMAND_DEADLINE: Duration = Duration::from_secs(120);
/// How long one control-socket exchange may take.
const CONTROL_DEADLINE: Duration = Duration::from_secs(5);
/// The longest control-socket answer read.
const CONTROL_REPLY_CAP: u64 = 64 * 1024;
/// [`Remote::stop`]'s steps, each bounded: reading the pid file (which
/// includes connecting to the lease, so it gets the largest share), `stop`
/// on the control socket, and the script that waits for (or kills) the
/// process and removes the session's state. The script waits at most 2 s
/// before SIGKILL, inside its own deadline.
const STOP_PID_READ: Duration = Duration::from_secs(4);
const STOP_CONTROL: Duration = Duration::from_millis(1500);
const STOP_SCRIPT: Duration = Duration::from_millis(3500);
/// The longest [`Remote::stop`] takes: the sum of its steps' deadlines.
/// Callers bounding a stop give it at least this.
pub const STOP_BUDGET: Duration = STOP_PID_READ
    .saturating_add(STOP_CONTROL)
    .saturating_add(STOP_SCRIPT);

/// Why a lease-side step failed. Messages are sentences naming the lease.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// SSH failed.
    #[error(transparent)]
    Ssh(#[from] SshError),
    /// The lease cannot run the helper (OS, CPU, libc), or a step failed.
    #[error("{0}")]
    Lease(String),
}

/// What one remote command printed.
#[derive(Debug, Default)]
pub struct ShOut {
    /// Exit code (128+n for a signal).
    pub code: i32,
    /// Stdout (at most 64 KiB).
    pub stdout: String,
    /// Stderr (at most 64 KiB).
    pub stderr: String,
}

impl ShOut {
    fn first_err_line(&self) -> String {
        let text = if self.stderr.trim().is_empty() {
            &self.stdout
        } else {
            &self.stderr
        };
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(3)..].join(" / ");
        format!("{:?}", tail.chars().take(400).collect::<String>())
    }
}

/// What `uname -sm` and `$HOME` say about the lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// `Linux`, `Darwin`, …
    pub os: String,
    /// The CPU as Linux names it (`x86_64`, `aarch64`, …).
    pub arch: String,
    /// The login user's home directory.
    pub home: String,
}

/// Maps `uname -m` spellings to the Linux architecture names Rust uses.
pub fn normalize_arch(raw: &str) -> String {
    match raw.trim() {
        "x86_64" | "amd64" => "x86_64".to_owned(),
        "aarch64" | "arm64" | "armv8l" => "aarch64".to_owned(),
        other => other.to_owned(),
    }
}

/// The lease's CPU after [`normalize_arch`], if it can name a directory
/// here (`helpers/<arch>/`) and go into messages: `[a-z0-9_]{1,32}`.
pub fn check_arch(raw: &str) -> Result<String, String> {
    let arch = normalize_arch(raw);
    if (1..=32).contains(&arch.len())
        && arch
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        Ok(arch)
    } else {
        Err(format!(
            "`uname -m` printed {}, which is not a CPU name (want [a-z0-9_], at most 32 characters)",
            preview(raw.trim())
        ))
    }
}

/// At most 32 characters of text from the lease, escaped and quoted.
fn preview(s: &str) -> String {
    crate::ssh::target::preview(s, 32)
}

/// A helper binary on this machine for one architecture.
#[derive(Debug, Clone)]
pub struct LocalHelper {
    /// Where it is.
    pub path: PathBuf,
    /// Its bytes.
    pub bytes: Bytes,
    /// Their sha256, hex.
    pub digest: String,
}

/// Where helpers for other architectures go:
/// `<config dir>/crabbox/helpers/<arch>/crabbox-egress-client`.
pub fn helper_dir(config_dir: &Path, arch: &str) -> PathBuf {
    config_dir.join("crabbox").join("helpers").join(arch)
}

/// Finds the helper for `arch`: the one in the documented directory if
/// present, else the daemon's own (beside its executable, or in the
/// release tarball's `bin/`) when the lease's CPU is the daemon's.
pub fn find_helper(config_dir: &Path, arch: &str) -> Result<LocalHelper, RemoteError> {
    let documented = helper_dir(config_dir, arch).join(HELPER);
    let mut candidates = vec![documented.clone()];
    if arch == std::env::consts::ARCH
        && let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        candidates.push(dir.join(HELPER));
        candidates.push(dir.join("..").join("bin").join(HELPER));
    }
    for path in candidates {
        if let Ok(bytes) = std::fs::read(&path) {
            let digest = hex::encode(Sha256::digest(&bytes));
            return Ok(LocalHelper {
                path,
                bytes: Bytes::from(bytes),
                digest,
            });
        }
    }
    Err(RemoteError::Lease(format!(
        "no egress helper for the lease's CPU ({arch}): this daemon is built for {} and {} does not exist; \
         put a Linux {arch} build of {HELPER} there (from the release tarball for {arch}) and run egress start again",
        std::env::consts::ARCH,
        documented.display()
    )))
}

/// The paths of one session's helper on the lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionPaths {
    /// `$HOME/.local/state/crabbox/egress/<session>`.
    pub dir: String,
    /// `<dir>/control.sock`.
    pub control: String,
}

impl SessionPaths {
    /// The paths of `session` under `home`.
    pub fn new(home: &str, session: &str) -> Self {
        let dir = format!("{}/{session}", state_root(home));
        SessionPaths {
            control: format!("{dir}/control.sock"),
            dir,
        }
    }
}

/// `$HOME/.local/state/crabbox/egress`.
pub fn state_root(home: &str) -> String {
    format!("{}/.local/state/crabbox/egress", home.trim_end_matches('/'))
}

/// The lease-local `current.json` (the format other tools on the lease read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Current {
    /// The lease id.
    pub lease: String,
    /// The egress session.
    pub session: String,
    /// `127.0.0.1:3128`.
    pub endpoint: String,
    /// `http://127.0.0.1:3128`.
    pub proxy: String,
    /// The helper's pid.
    pub pid: u32,
    /// The helper's version.
    pub version: String,
    /// `coordinator`.
    pub transport: String,
    /// RFC 3339.
    pub started_at: String,
}

/// A session id becomes a path component on the lease: it must be plain.
pub fn check_session(session: &str) -> Result<(), RemoteError> {
    let ok = !session.is_empty()
        && session.len() <= 96
        && session
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(RemoteError::Lease(format!(
            "the coordinator named the egress session {session:?}, which cannot be a directory name"
        )))
    }
}

/// The lease side of one lease, over its mux.
#[derive(Debug, Clone)]
pub struct Remote {
    /// The SSH multiplexers.
    pub ssh: SshManager,
    /// The lease id.
    pub lease: String,
    /// The calling client's agent socket, if any.
    pub agent: Option<PathBuf>,
}

impl Remote {
    /// Runs `sh -c SCRIPT sh ARGS…` on the lease with `stdin`, collecting
    /// (bounded) output and the exit code.
    pub async fn sh(
        &self,
        script: &str,
        args: &[&str],
        stdin: Option<Bytes>,
    ) -> Result<ShOut, RemoteError> {
        self.sh_within(COMMAND_DEADLINE, script, args, stdin).await
    }

    /// [`Remote::sh`] with its own deadline (connecting included).
    pub async fn sh_within(
        &self,
        deadline: Duration,
        script: &str,
        args: &[&str],
        stdin: Option<Bytes>,
    ) -> Result<ShOut, RemoteError> {
        let mut argv = vec![
            "sh".to_owned(),
            "-c".to_owned(),
            script.to_owned(),
            "sh".to_owned(),
        ];
        argv.extend(args.iter().map(|a| (*a).to_owned()));
        let spec = ExecSpec {
            lease: self.lease.clone(),
            command: Command::Argv(argv),
            cwd: None,
            agent: self.agent.clone(),
        };
        let mut input: Vec<Input> = Vec::new();
        if let Some(data) = stdin {
            // Chunks keep each channel write small; the channel's window
            // paces them.
            let mut off = 0;
            while off < data.len() {
                let end = (off + 256 * 1024).min(data.len());
                input.push(Input::Stdin(data.slice(off..end)));
                off = end;
            }
        }
        input.push(Input::Eof);
        let mut stream = Box::pin(self.ssh.exec(spec, futures::stream::iter(input)));
        let mut out = ShOut::default();
        let collect = async {
            while let Some(item) = stream.next().await {
                match item? {
                    Output::Stdout(b) if out.stdout.len() < OUTPUT_CAP => {
                        out.stdout.push_str(&String::from_utf8_lossy(&b))
                    }
                    Output::Stderr(b) if out.stderr.len() < OUTPUT_CAP => {
                        out.stderr.push_str(&String::from_utf8_lossy(&b))
                    }
                    Output::Exit(e) => {
                        out.code = e.code;
                        return Ok::<_, RemoteError>(());
                    }
                    _ => {}
                }
            }
            Err(RemoteError::Lease(format!(
                "a command on lease {} ended without an exit status",
                self.lease
            )))
        };
        tokio::time::timeout(deadline, collect)
            .await
            .map_err(|_| {
                RemoteError::Lease(format!(
                    "a command on lease {} took longer than {deadline:?}",
                    self.lease
                ))
            })??;
        Ok(out)
    }

    /// `uname -sm` and `$HOME`.
    pub async fn probe(&self) -> Result<Probe, RemoteError> {
        let out = self
            .sh("uname -s; uname -m; printf '%s\\n' \"$HOME\"", &[], None)
            .await?;
        let lines: Vec<&str> = out.stdout.lines().map(str::trim).collect();
        if out.code != 0 || lines.len() < 3 || lines[2].is_empty() || !lines[2].starts_with('/') {
            return Err(RemoteError::Lease(format!(
                "cannot tell the OS, CPU and home directory of lease {} (uname -s, uname -m, $HOME): exit {}, {}",
                self.lease,
                out.code,
                out.first_err_line()
            )));
        }
        let arch = check_arch(lines[1]).map_err(|e| {
            RemoteError::Lease(format!("cannot tell the CPU of lease {}: {e}", self.lease))
        })?;
        // The OS is only compared and shown: anything but a plain name is
        // kept as its escaped preview, so it cannot carry terminal controls.
        let os = lines[0];
        let plain = crate::ssh::target::plain_name(os, 32);
        Ok(Probe {
            os: if plain { os.to_owned() } else { preview(os) },
            arch,
            home: lines[2].to_owned(),
        })
    }

    /// Installs the helper content-addressed under the user's cache; an
    /// upload only when that digest is not there yet, written under a
    /// temporary name, checked and renamed. Returns (path, uploaded).
    pub async fn install(
        &self,
        home: &str,
        helper: &LocalHelper,
    ) -> Result<(String, bool), RemoteError> {
        const SCRIPT: &str = r#"umask 077
d="$HOME/.cache/crabbox/bin/$1"; f="$d/crabbox-egress-client"
if [ -x "$f" ]; then echo present; exit 0; fi
if [ "$2" != upload ]; then echo missing; exit 0; fi
mkdir -p "$d" || exit 3
chmod 700 "$HOME/.cache/crabbox" "$HOME/.cache/crabbox/bin" "$d" || exit 3
t="$d/.tmp-$$"; trap 'rm -f "$t"' EXIT
cat > "$t" || exit 3
if command -v sha256sum >/dev/null 2>&1; then
  h=$(sha256sum "$t" | cut -d' ' -f1)
  if [ "$h" != "$1" ]; then echo "the upload arrived with digest $h" >&2; exit 4; fi
fi
chmod 700 "$t" && mv -f "$t" "$f" || exit 3
trap - EXIT
echo uploaded"#;
        let path = format!(
            "{}/.cache/crabbox/bin/{}/{HELPER}",
            home.trim_end_matches('/'),
            helper.digest
        );
        let check = self.sh(SCRIPT, &[&helper.digest, "check"], None).await?;
        if check.code == 0 && check.stdout.trim() == "present" {
            return Ok((path, false));
        }
        let up = self
            .sh(
                SCRIPT,
                &[&helper.digest, "upload"],
                Some(helper.bytes.clone()),
            )
            .await?;
        if up.code != 0 || up.stdout.trim() != "uploaded" {
            return Err(RemoteError::Lease(format!(
                "cannot install the egress helper on lease {} under $HOME/.cache/crabbox/bin: exit {}, {}",
                self.lease,
                up.code,
                up.first_err_line()
            )));
        }
        Ok((path, true))
    }

    /// Runs `<helper> --version`; a helper that cannot run there (another
    /// libc, a missing loader) is reported as such.
    pub async fn version(&self, path: &str, arch: &str) -> Result<String, RemoteError> {
        let out = self.sh("exec \"$1\" --version", &[path], None).await?;
        let v = out.stdout.trim();
        match v.strip_prefix(HELPER) {
            Some(rest) if out.code == 0 => Ok(rest.trim().to_owned()),
            _ => Err(RemoteError::Lease(format!(
                "the egress helper cannot run on lease {} ({arch}): `{HELPER} --version` exited {} with {} \
                 (an older glibc or another libc there? put a build that runs on it in the helper directory)",
                self.lease,
                out.code,
                out.first_err_line()
            ))),
        }
    }

    /// Starts the helper detached (`setsid`) in the session's directory,
    /// with no ticket: it listens and waits for one on its control socket.
    /// The coordinator URL goes to a 0600 file over stdin. Returns its pid
    /// once it has written its pid file (listener and control socket bound).
    pub async fn start(
        &self,
        helper: &str,
        paths: &SessionPaths,
        session: &str,
        listen: &str,
        coordinator_url: &str,
    ) -> Result<u32, RemoteError> {
        const SCRIPT: &str = r#"umask 077
bin="$1"; s="$2"; lease="$3"; session="$4"; listen="$5"
mkdir -p "$s" && chmod 700 "$s" || exit 3
cat > "$s/coordinator" || exit 3
rm -f "$s/helper.pid"
setsid "$bin" --coordinator-file "$s/coordinator" --id "$lease" --session "$session" --listen "$listen" \
  --control "$s/control.sock" --pid-file "$s/helper.pid" </dev/null >>"$s/helper.log" 2>&1 &
p=$!
i=0
while [ ! -s "$s/helper.pid" ]; do
  if ! kill -0 "$p" 2>/dev/null; then tail -n 5 "$s/helper.log" >&2; exit 5; fi
  i=$((i+1)); if [ $i -gt 400 ]; then echo "no pid file after 20 s" >&2; exit 6; fi
  sleep 0.05
done
cat "$s/helper.pid""#;
        let out = self
            .sh(
                SCRIPT,
                &[helper, &paths.dir, &self.lease, session, listen],
                Some(Bytes::from(format!("{coordinator_url}\n"))),
            )
            .await?;
        match out.stdout.trim().parse::<u32>() {
            Ok(pid) if out.code == 0 && pid > 1 => Ok(pid),
            _ => Err(RemoteError::Lease(format!(
                "the egress helper did not start on lease {} (listen {listen}): exit {}, {}; its log is {}/helper.log",
                self.lease,
                out.code,
                out.first_err_line(),
                paths.dir
            ))),
        }
    }

    /// One line to the helper's control socket over the mux, and its
    /// one-line answer. The line may carry a ticket: it is never logged.
    pub async fn control(&self, socket: &str, line: &str) -> Result<String, RemoteError> {
        self.control_within(CONTROL_DEADLINE, socket, line).await
    }

    /// [`Remote::control`] with its own deadline.
    pub async fn control_within(
        &self,
        deadline: Duration,
        socket: &str,
        line: &str,
    ) -> Result<String, RemoteError> {
        let exchange = async {
            let mut t = self
                .ssh
                .tunnel(
                    &self.lease,
                    self.agent.clone(),
                    &Endpoint::Unix(socket.to_owned()),
                )
                .await?;
            t.write_all(format!("{line}\n").as_bytes())
                .await
                .map_err(|e| {
                    RemoteError::Lease(format!("writing to the helper's control socket: {e}"))
                })?;
            t.flush().await.ok();
            let mut answer = String::new();
            BufReader::new((&mut t).take(CONTROL_REPLY_CAP))
                .read_line(&mut answer)
                .await
                .map_err(|e| {
                    RemoteError::Lease(format!("reading the helper's control socket: {e}"))
                })?;
            if answer.is_empty() {
                return Err(RemoteError::Lease(
                    "the helper's control socket closed without an answer".into(),
                ));
            }
            Ok(answer.trim().to_owned())
        };
        tokio::time::timeout(deadline, exchange)
            .await
            .map_err(|_| {
                RemoteError::Lease(format!(
                    "the helper's control socket on lease {} did not answer within {deadline:?}",
                    self.lease
                ))
            })?
    }

    /// The helper's `status` answer.
    pub async fn status(&self, socket: &str) -> Result<HelperStatus, RemoteError> {
        let answer = self.control(socket, "status").await?;
        serde_json::from_str(&answer)
            .map_err(|e| RemoteError::Lease(format!("the helper's status is not JSON ({e})")))
    }

    /// Hands the helper a ticket over its control socket.
    pub async fn give_ticket(&self, socket: &str, ticket: &str) -> Result<(), RemoteError> {
        let answer = self.control(socket, &format!("ticket {ticket}")).await?;
        if answer == "ok" {
            Ok(())
        } else {
            Err(RemoteError::Lease(format!(
                "the helper refused the ticket: {answer:?}"
            )))
        }
    }

    /// Whether something accepts on `listen` as the lease sees it.
    pub async fn listening(&self, listen: &str) -> Result<bool, RemoteError> {
        let (host, port) = split_listen(listen)?;
        match self
            .ssh
            .tunnel(
                &self.lease,
                self.agent.clone(),
                &Endpoint::Tcp { host, port },
            )
            .await
        {
            Ok(t) => {
                drop::<tunnel::Tunnel>(t);
                Ok(true)
            }
            Err(SshError::Channel(_)) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes `current.json` (0600, atomically).
    pub async fn write_current(&self, current: &Current) -> Result<String, RemoteError> {
        const SCRIPT: &str = r#"umask 077
d="$HOME/.local/state/crabbox/egress"
mkdir -p "$d" && chmod 700 "$d" || exit 3
t="$d/.current.json.tmp-$$"
cat > "$t" && mv -f "$t" "$d/current.json" || { rm -f "$t"; exit 3; }
printf '%s\n' "$d/current.json""#;
        let json = serde_json::to_string(current).expect("serialisable");
        let out = self.sh(SCRIPT, &[], Some(Bytes::from(json + "\n"))).await?;
        if out.code != 0 {
            return Err(RemoteError::Lease(format!(
                "cannot write the lease-local egress state on lease {}: {}",
                self.lease,
                out.first_err_line()
            )));
        }
        Ok(out.stdout.trim().to_owned())
    }

    /// Stops exactly one session's helper: `stop` on its control socket,
    /// else its pid file's process when that process's command line names
    /// this session; removes the session's directory and `current.json`
    /// when it names this session. Returns (helper pid stopped, state removed).
    /// Takes at most [`STOP_BUDGET`].
    pub async fn stop(
        &self,
        paths: &SessionPaths,
        session: &str,
    ) -> Result<(Option<u32>, bool), RemoteError> {
        // The pid first: `stop` removes the pid file.
        // A failed read (a slow connect) does not end the stop: the control
        // socket and the script are still tried.
        let pid = match self
            .sh_within(
                STOP_PID_READ,
                "cat \"$1/helper.pid\" 2>/dev/null",
                &[&paths.dir],
                None,
            )
            .await
        {
            Ok(out) => out.stdout.trim().parse::<u32>().ok(),
            Err(e) => {
                tracing::debug!(lease = %self.lease, error = %e, "cannot read the helper's pid file");
                None
            }
        };
        let stopped_by_socket = matches!(
            self.control_within(STOP_CONTROL, &paths.control, "stop").await,
            Ok(a) if a == "ok"
        );
        const SCRIPT: &str = r#"s="$1"; session="$2"; p="$3"; killed=
if [ -n "$p" ] && [ -r "/proc/$p/cmdline" ]; then
  if tr '\0' '\n' < "/proc/$p/cmdline" | grep -qx -- "$session" && tr '\0' '\n' < "/proc/$p/cmdline" | grep -q 'crabbox-egress-client$'; then
    if [ "$4" = kill ]; then kill "$p" 2>/dev/null && killed=1; fi
    i=0; while kill -0 "$p" 2>/dev/null && [ $i -lt 20 ]; do sleep 0.1; i=$((i+1)); done
    kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null && killed=1
  fi
fi
rm -rf -- "$s"
c="$HOME/.local/state/crabbox/egress/current.json"
removed=no
if [ -f "$c" ] && grep -qF "\"session\":\"$session\"" "$c"; then rm -f "$c" && removed=yes; fi
echo "killed=${killed:-no} removed=$removed""#;
        let pid_arg = pid.map(|p| p.to_string()).unwrap_or_default();
        let how = if stopped_by_socket { "wait" } else { "kill" };
        let out = self
            .sh_within(
                STOP_SCRIPT,
                SCRIPT,
                &[&paths.dir, session, &pid_arg, how],
                None,
            )
            .await?;
        if out.code != 0 {
            return Err(RemoteError::Lease(format!(
                "cannot stop the egress helper of session {session} on lease {}: {}",
                self.lease,
                out.first_err_line()
            )));
        }
        let killed = out.stdout.contains("killed=1");
        let removed = out.stdout.contains("removed=yes");
        Ok((pid.filter(|_| stopped_by_socket || killed), removed))
    }
}

/// The helper's `status` answer (the fields the daemon uses).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct HelperStatus {
    /// Whether a bridge is up.
    #[serde(default)]
    pub bridged: bool,
    /// Whether it waits for a fresh ticket.
    #[serde(default)]
    pub waiting_ticket: bool,
    /// Its pid.
    #[serde(default)]
    pub pid: u32,
    /// Its session.
    #[serde(default)]
    pub session: String,
    /// Its version.
    #[serde(default)]
    pub version: String,
}

/// `host:port` of a loopback listen address.
pub fn split_listen(listen: &str) -> Result<(String, u16), RemoteError> {
    let addr = crabbox_egress::proxy::validate_listen(listen)
        .map_err(|e| RemoteError::Lease(e.to_string()))?;
    Ok((addr.ip().to_string(), addr.port()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_names_follow_linux() {
        assert_eq!(normalize_arch("x86_64\n"), "x86_64");
        assert_eq!(normalize_arch("arm64"), "aarch64");
        assert_eq!(normalize_arch("riscv64"), "riscv64");
    }

    #[test]
    fn an_arch_must_be_a_plain_name() {
        assert_eq!(check_arch("x86_64\n").unwrap(), "x86_64");
        assert_eq!(check_arch("arm64").unwrap(), "aarch64");
        assert_eq!(check_arch("riscv64").unwrap(), "riscv64");
        assert_eq!(check_arch("i686").unwrap(), "i686");
        let long = "a".repeat(33);
        for bad in [
            "",
            "../../etc",
            "x86 64",
            "X86_64",
            "a/b",
            "\u{1b}[31mred",
            long.as_str(),
        ] {
            assert!(check_arch(bad).is_err(), "{bad:?}");
        }
        assert!(check_arch(&"a".repeat(32)).is_ok());
        // The message quotes a short, escaped preview.
        let e = check_arch(&format!("\u{1b}[2J{}", "z".repeat(500))).unwrap_err();
        assert!(!e.contains('\u{1b}') && e.contains("\\u{1b}"), "{e}");
        assert!(e.len() < 160, "{e}");
    }

    #[test]
    fn a_missing_helper_names_the_arch_and_the_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let e = find_helper(tmp.path(), "riscv64").unwrap_err().to_string();
        assert!(e.contains("riscv64"), "{e}");
        assert!(
            e.contains(&helper_dir(tmp.path(), "riscv64").display().to_string()),
            "{e}"
        );
    }

    #[test]
    fn session_ids_must_be_plain() {
        assert!(check_session("egress_0123abcd").is_ok());
        for bad in ["", "../x", "a b", "a/b"] {
            assert!(check_session(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn listen_must_be_loopback() {
        assert_eq!(split_listen("127.0.0.1:3128").unwrap().1, 3128);
        assert!(split_listen("0.0.0.0:3128").is_err());
    }
}
