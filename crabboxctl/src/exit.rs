//! Exit codes and the one error type that carries a code and hints; `main`
//! turns every failure into a message, hints and one of these codes.

use std::fmt;

/// The process exit codes of crabboxctl, documented in `--help` and
/// docs/operations.md. Scripts may rely on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// The command did what was asked.
    Ok = 0,
    /// Any other failure (the daemon answered with an error, a file could not
    /// be written, a service manager command failed).
    Error = 1,
    /// Bad usage: unknown flags or arguments (clap exits with 2 itself).
    Usage = 2,
    /// crabboxd could not be reached on its socket.
    Unreachable = 3,
    /// `crabboxctl doctor` found at least one failed check.
    DoctorFailed = 4,
    /// crabboxd answered, but could not reach its coordinator.
    CoordinatorUnreachable = 5,
}

impl From<Code> for std::process::ExitCode {
    fn from(code: Code) -> Self {
        std::process::ExitCode::from(code as u8)
    }
}

/// The EXIT STATUS section of `crabboxctl --help` and the man page.
pub const EXIT_CODES_HELP: &str = "\
Exit status:
  0   success
  1   error (the daemon refused the request, a file or service manager command failed)
  2   usage error (unknown flag or argument)
  3   crabboxd could not be reached on its socket (also `daemon status` when it is not running)
  4   `crabboxctl doctor` found at least one failed check
  5   crabboxd answered but could not reach its coordinator (down, unreachable or not answering)
  (64 is crabboxd's own exit code for a bad configuration; crabboxctl never uses it)

`attach` exits with the run's own exit status instead (0-255 as the run reported
it, 128+n for a command its shell saw killed by signal n; a negative code or one
above 255 becomes 1), which overlaps 1-5: with --json its last line
`{\"end\": …}` tells the run's status apart from crabboxctl's own failures.

--json output is for scripts, but its format is not yet stable and may change
in any release until it is promised in the changelog.";

/// The process exit status for a remote command's exit code: 0–255
/// unchanged (128+n for signal n among them), anything else 1, so a code
/// that cannot be an exit status never reads as success (a clamp turned a
/// negative code into 0) nor as 255, which means the SSH layer failed.
pub fn remote_status(code: impl Into<i64>) -> u8 {
    u8::try_from(code.into()).unwrap_or(1)
}

/// A failure with its exit code and what the user can do about it.
///
/// Commands return it inside `anyhow::Error`; `main` finds it by downcasting
/// so the context chain above it is still printed.
#[derive(Debug)]
pub struct Failure {
    /// The exit code.
    pub code: Code,
    /// One sentence saying what went wrong.
    pub message: String,
    /// Commands or steps that fix it, one per line.
    pub hints: Vec<String>,
}

impl Failure {
    /// A failure with exit code 1 and no hints.
    pub fn error(message: impl Into<String>) -> Self {
        Failure {
            code: Code::Error,
            message: message.into(),
            hints: Vec::new(),
        }
    }

    /// Adds a hint line.
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hints.push(hint.into());
        self
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// Renders an error for stderr and picks its exit code: the message chain on
/// one line, then the hints of the first [`Failure`] in the chain.
pub fn report(err: &anyhow::Error) -> (String, Code) {
    let failure = err.chain().find_map(|e| e.downcast_ref::<Failure>());
    let mut out = format!("error: {err:#}");
    let code = match failure {
        Some(f) => {
            for hint in &f.hints {
                out.push_str("\nhint: ");
                out.push_str(hint);
            }
            f.code
        }
        None => Code::Error,
    };
    (out, code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_codes_outside_0_255_are_failures() {
        assert_eq!(remote_status(0), 0);
        assert_eq!(remote_status(143), 143);
        assert_eq!(remote_status(255), 255);
        for c in [-1, i32::MIN, 256, i32::MAX] {
            assert_eq!(remote_status(c), 1, "{c}");
        }
        // Run ends carry an i64.
        assert_eq!(remote_status(7_i64), 7);
        assert_eq!(remote_status(1_i64 << 32), 1);
    }

    #[test]
    fn plain_errors_exit_1() {
        let (text, code) = report(&anyhow::anyhow!("boom"));
        assert_eq!(code, Code::Error);
        assert_eq!(text, "error: boom");
    }

    #[test]
    fn failures_keep_their_code_and_hints_under_context() {
        let err = anyhow::Error::new(Failure {
            code: Code::Unreachable,
            message: "cannot reach crabboxd at /x.sock".into(),
            hints: vec!["run `crabboxd`".into()],
        })
        .context("status");
        let (text, code) = report(&err);
        assert_eq!(code, Code::Unreachable);
        assert_eq!(
            text,
            "error: status: cannot reach crabboxd at /x.sock\nhint: run `crabboxd`"
        );
    }

    #[test]
    fn codes_are_the_documented_numbers() {
        for (code, n) in [
            (Code::Ok, 0),
            (Code::Error, 1),
            (Code::Usage, 2),
            (Code::Unreachable, 3),
            (Code::DoctorFailed, 4),
            (Code::CoordinatorUnreachable, 5),
        ] {
            assert_eq!(code as u8, n);
            assert!(EXIT_CODES_HELP.contains(&format!("  {n}   ")));
        }
    }
}
