//! Environment forwarding for runs: the allowlist (default `CI`,
//! `NODE_OPTIONS`; `env.allow` replaces it; the client's `CRABBOX_ENV_ALLOW`
//! replaces it again; each `--allow-env` appends; `PREFIX*` matches a
//! prefix; a bare `*` is refused), evaluated against the calling client's
//! environment, the one-line summary (names only, secret-shaped ones
//! marked), and the env file the remote wrapper reads from stdin into a
//! shell variable and evaluates (nothing of it is written on the lease).

use crate::ssh::exec::sh_quote;

/// The allowlist when nothing configures one (the reference's).
pub const DEFAULT_ALLOW: &[&str] = &["CI", "NODE_OPTIONS"];

/// Always set by the daemon, never taken from the client.
pub const RESERVED: &[&str] = &["CRABBOX_LEASE_ID", "CRABBOX_RUN_ID", "CRABBOX_SLUG"];

/// The most variables a run forwards, and their bytes (the env file).
pub const MAX_VARS: usize = 256;
/// The most bytes of forwarded names and values.
pub const MAX_BYTES: usize = 256 << 10;

/// Whether `name` is a shell identifier (`[A-Za-z_][A-Za-z0-9_]*`).
pub fn valid_name(name: &str) -> bool {
    let mut b = name.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

fn split(list: &str) -> impl Iterator<Item = String> + '_ {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// The effective allowlist: `client_override` (the client's
/// `CRABBOX_ENV_ALLOW`) replaces `config` (or the default), then every
/// `appended` pattern (each may be a comma list) is added. Refuses a bare
/// `*` and patterns that are not names or `PREFIX*`.
pub fn allowlist(
    config: Option<&[String]>,
    client_override: Option<&str>,
    appended: &[String],
) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = match (client_override, config) {
        (Some(o), _) => split(o).collect(),
        (None, Some(c)) => c
            .iter()
            .flat_map(|p| split(p).collect::<Vec<_>>())
            .collect(),
        (None, None) => DEFAULT_ALLOW.iter().map(|s| (*s).to_owned()).collect(),
    };
    out.extend(appended.iter().flat_map(|p| split(p).collect::<Vec<_>>()));
    for p in &out {
        if p == "*" {
            return Err(
                "a bare `*` would forward every variable of your shell; name them, or use a prefix such as `NPM_CONFIG_*`"
                    .into(),
            );
        }
        let name = p.strip_suffix('*').unwrap_or(p);
        if !valid_name(name) {
            return Err(format!(
                "{p:?} is not a variable name or a `PREFIX*` pattern; use letters, digits and `_`"
            ));
        }
    }
    out.dedup();
    Ok(out)
}

fn matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

/// The client's variables the allowlist lets through, sorted by name:
/// valid names only, never a reserved one or the wrapper's own.
pub fn select(allow: &[String], client_env: &[(String, String)]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = client_env
        .iter()
        .filter(|(n, _)| valid_name(n) && !RESERVED.contains(&n.as_str()) && n != WRAPPER_VAR)
        .filter(|(n, _)| allow.iter().any(|p| matches(p, n)))
        .cloned()
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    // The last of duplicate names wins, as in a shell.
    out.dedup_by(|later, earlier| {
        if later.0 == earlier.0 {
            std::mem::swap(later, earlier);
            true
        } else {
            false
        }
    });
    out
}

/// Whether a name looks like it holds a secret (the reference's rule).
pub fn secret_shaped(name: &str) -> bool {
    let up = name.to_ascii_uppercase();
    [
        "KEY",
        "TOKEN",
        "SECRET",
        "PASSWORD",
        "PASS",
        "CREDENTIAL",
        "AUTH",
    ]
    .iter()
    .any(|w| up.contains(w))
}

/// A forwarded variable, by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarded {
    /// The name.
    pub name: String,
    /// Whether the value is empty.
    pub empty: bool,
    /// Whether the name is secret-shaped.
    pub secret: bool,
    /// The value's length, for secret-shaped names (0 otherwise).
    pub len: usize,
}

/// Names only.
pub fn describe(selected: &[(String, String)]) -> Vec<Forwarded> {
    selected
        .iter()
        .map(|(n, v)| {
            let secret = secret_shaped(n);
            Forwarded {
                name: n.clone(),
                empty: v.is_empty(),
                secret,
                len: if secret { v.len() } else { 0 },
            }
        })
        .collect()
}

/// The one-line summary: `env forwarding vars=CI=set,API_TOKEN=set len=5
/// secret=true`, or `env forwarding matched=none allow=CI,NODE_OPTIONS`.
/// Never a value.
pub fn summary(forwarded: &[Forwarded], allow: &[String]) -> String {
    if forwarded.is_empty() {
        return format!("env forwarding matched=none allow={}", allow.join(","));
    }
    let vars: Vec<String> = forwarded
        .iter()
        .map(|f| {
            let state = if f.empty { "empty" } else { "set" };
            if f.secret {
                format!("{}={state} len={} secret=true", f.name, f.len)
            } else {
                format!("{}={state}", f.name)
            }
        })
        .collect();
    format!("env forwarding vars={}", vars.join(","))
}

/// The file the remote wrapper sources: one `export NAME='value'` line per
/// variable, the reserved ones last so nothing overrides them.
pub fn env_file(selected: &[(String, String)], reserved: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (n, v) in selected {
        out.push_str(&format!("export {n}={}\n", sh_quote(v)));
    }
    for (n, v) in reserved {
        out.push_str(&format!("export {n}={}\n", sh_quote(v)));
    }
    out
}

/// The wrapper's own variable: it holds the env file while the wrapper
/// evaluates it, so a forwarded variable of that name is never taken from
/// the client (it would be unset before the command runs).
pub const WRAPPER_VAR: &str = "crabbox_env_text";

/// The remote wrapper around the command: the env file arrives on stdin
/// into a shell variable (never a file on the lease, so nothing is left
/// behind and the login umask is untouched), is evaluated, the variable is
/// unset, then the command runs with stdin from /dev/null. Values are never
/// in a command line, and the file cannot overwrite anything the wrapper
/// still uses: the text was expanded before the first `export` runs.
pub const WRAPPER: &str = "crabbox_env_text=$(cat) || exit 125; eval \"$crabbox_env_text\" || exit 125; \
unset crabbox_env_text; exec \"$@\" </dev/null";

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect()
    }

    #[test]
    fn precedence_default_config_client_then_appended() {
        assert_eq!(allowlist(None, None, &[]).unwrap(), ["CI", "NODE_OPTIONS"]);
        let config = vec!["FOO".to_owned()];
        assert_eq!(allowlist(Some(&config), None, &[]).unwrap(), ["FOO"]);
        assert_eq!(
            allowlist(Some(&config), Some("BAR, BAZ_*"), &["X,Y".into()]).unwrap(),
            ["BAR", "BAZ_*", "X", "Y"]
        );
        assert!(allowlist(None, None, &["*".into()]).is_err());
        assert!(allowlist(None, Some("*"), &[]).is_err());
        assert!(allowlist(None, None, &["A-B".into()]).is_err());
    }

    #[test]
    fn selection_matches_names_and_prefixes_never_reserved_names() {
        let allow = allowlist(
            None,
            None,
            &["NPM_*".into(), "CRABBOX_*".into(), "crabbox_*".into()],
        )
        .unwrap();
        let got = select(
            &allow,
            &env(&[
                ("CI", "1"),
                ("NPM_TOKEN", "s3cret"),
                ("NPMX", "no"),
                ("HOME", "/h"),
                ("CRABBOX_RUN_ID", "fake"),
                ("CRABBOX_OTHER", "ok"),
                ("bad-name", "x"),
                (WRAPPER_VAR, "x"),
            ]),
        );
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["CI", "CRABBOX_OTHER", "NPM_TOKEN"]);
        let line = summary(&describe(&got), &allow);
        assert_eq!(
            line,
            "env forwarding vars=CI=set,CRABBOX_OTHER=set,NPM_TOKEN=set len=6 secret=true"
        );
        assert!(!line.contains("s3cret"));
    }

    #[test]
    fn the_env_file_survives_a_shell_and_reserved_names_come_last() {
        let file = env_file(
            &env(&[("A", "it's $HOME\nline2"), ("CRABBOX_RUN_ID", "fake")]),
            &[("CRABBOX_RUN_ID", "run_1")],
        );
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{file}printf '%s|%s' \"$A\" \"$CRABBOX_RUN_ID\""))
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "it's $HOME\nline2|run_1"
        );
    }

    /// Runs the wrapper under `sh` with umask 022, `TMPDIR` at `tmp`, the
    /// env file on stdin and `script` as the command.
    fn run_wrapper(tmp: &std::path::Path, file: &str, script: &str) -> std::process::Output {
        use std::io::Write as _;
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "umask 022; exec sh -c {} sh sh -c {}",
                sh_quote(WRAPPER),
                sh_quote(script)
            ))
            .env("TMPDIR", tmp)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(file.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    #[test]
    fn the_wrapper_keeps_the_login_umask_and_names_of_its_own_are_safe() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        let v = victim.to_str().unwrap();
        // `f` (the name an earlier wrapper used for its temp file) and
        // names the wrapper uses as a shell (`IFS`) change nothing of it.
        let file = env_file(
            &env(&[("A", "a"), ("IFS", "x"), ("f", v)]),
            &[("CRABBOX_RUN_ID", "run_1")],
        );
        let out = run_wrapper(
            tmp.path(),
            &file,
            "umask; printf '%s|%s|%s|%s' \"$A\" \"$f\" \"$CRABBOX_RUN_ID\" \"${crabbox_env_text-unset}\"; if read -r x; then echo stdin; fi",
        );
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("0022\na|{v}|run_1|unset")
        );
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        let left: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n != "victim")
            .collect();
        assert!(left.is_empty(), "{left:?}");

        // An env file that does not parse runs nothing.
        let out = run_wrapper(tmp.path(), "export A='unterminated\n", "echo ran");
        assert!(!out.status.success());
        assert!(!String::from_utf8_lossy(&out.stdout).contains("ran"));
    }
}
