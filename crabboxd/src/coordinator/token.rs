//! Where the bearer token comes from: a literal, or the stdout of a token
//! command run the way the reference CLI runs it (15 s timeout, ≤ 16 KiB,
//! exactly one line). The token never leaves a `Secret`.

use std::{process::Stdio, sync::Arc, time::Duration};

use tokio::io::AsyncReadExt;

use crate::config::{Secret, TokenSource};

/// The token command's time budget.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(15);
/// The most output a token command may print.
const MAX_OUTPUT: usize = 16 * 1024;

/// Supplies the token for each request.
#[derive(Debug, Clone)]
pub struct TokenProvider {
    source: Option<Arc<TokenSource>>,
}

impl TokenProvider {
    /// A provider for `source` (none: requests go without a token).
    pub fn new(source: Option<TokenSource>) -> Self {
        TokenProvider {
            source: source.map(Arc::new),
        }
    }

    /// The token to send, if any. A command is run on every call, so a
    /// rotated token is picked up without restarting the daemon.
    pub async fn token(&self) -> Result<Option<Secret>, String> {
        match self.source.as_deref() {
            None => Ok(None),
            Some(TokenSource::Literal { token, .. }) => Ok(Some(token.clone())),
            Some(TokenSource::Command { argv, origin }) => run(argv)
                .await
                .map(Some)
                .map_err(|e| format!("token command from {origin}: {e}")),
        }
    }
}

async fn run(argv: &[String]) -> Result<Secret, String> {
    let (program, args) = argv.split_first().ok_or("the command is empty")?;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut out = Vec::new();
    let read = async {
        // Read one byte past the limit to tell "exactly at" from "over".
        (&mut stdout)
            .take(MAX_OUTPUT as u64 + 1)
            .read_to_end(&mut out)
            .await
            .map_err(|e| format!("reading its output: {e}"))?;
        child
            .wait()
            .await
            .map_err(|e| format!("waiting for it: {e}"))
    };
    let status = tokio::time::timeout(COMMAND_TIMEOUT, read)
        .await
        .map_err(|_| format!("{program} did not finish within {COMMAND_TIMEOUT:?}"))??;
    if !status.success() {
        return Err(format!("{program} exited with {status}"));
    }
    if out.len() > MAX_OUTPUT {
        return Err(format!("{program} printed more than {MAX_OUTPUT} bytes"));
    }
    let text = String::from_utf8(out).map_err(|_| format!("{program} printed non-UTF-8 output"))?;
    let line = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(&text);
    // Errors never quote the output: it may be a token with a stray space.
    if line.is_empty() {
        return Err(format!("{program} printed an empty token"));
    }
    if line.contains(['\r', '\n', '\0']) {
        return Err(format!("{program} must print exactly one line"));
    }
    if line.trim() != line {
        return Err(format!("{program} printed a token with surrounding spaces"));
    }
    Ok(Secret::new(line))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(script: &str) -> TokenProvider {
        TokenProvider::new(Some(TokenSource::Command {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            origin: "test".into(),
        }))
    }

    #[tokio::test]
    async fn one_line_with_one_trailing_newline() {
        let t = cmd("printf 'tok-123\\n'").token().await.unwrap().unwrap();
        assert_eq!(t.expose(), "tok-123");
        let t = cmd("printf 'tok-123\\r\\n'")
            .token()
            .await
            .unwrap()
            .unwrap();
        assert_eq!(t.expose(), "tok-123");
    }

    #[tokio::test]
    async fn bad_outputs_are_refused_without_quoting_them() {
        for (script, want) in [
            ("printf 'a\\nb\\n'", "exactly one line"),
            ("printf ' secret-ish '", "surrounding spaces"),
            ("printf ''", "empty"),
            ("exit 3", "exited"),
            ("head -c 20000 /dev/zero | tr '\\\\0' a", "more than"),
        ] {
            let err = cmd(script).token().await.unwrap_err();
            assert!(err.contains(want), "{script}: {err}");
            assert!(!err.contains("secret-ish"), "{err}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_command_times_out() {
        let err = cmd("sleep 100").token().await.unwrap_err();
        assert!(err.contains("did not finish"), "{err}");
    }
}
