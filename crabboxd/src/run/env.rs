//! Environment forwarding for runs: the allowlist (default `CI`,
//! `NODE_OPTIONS`; `env.allow` replaces it; the client's `CRABBOX_ENV_ALLOW`
//! replaces it again; each `--allow-env` appends; `PREFIX*` matches a
//! prefix; a bare `*` is refused), evaluated against the calling client's
//! environment, the one-line summary (names only, secret-shaped ones
//! marked), and the 0600 file the remote wrapper sources and removes.

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
/// valid names only, never a reserved one.
pub fn select(allow: &[String], client_env: &[(String, String)]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = client_env
        .iter()
        .filter(|(n, _)| valid_name(n) && !RESERVED.contains(&n.as_str()))
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

/// The remote wrapper around the command: the env file arrives on stdin
/// into a private temp file, is sourced, removed, then the command runs with
/// stdin from /dev/null. Values are never in a command line.
pub const WRAPPER: &str = "umask 077; f=$(mktemp \"${TMPDIR:-/tmp}/crabbox-env.XXXXXXXX\") || exit 125; \
if ! cat > \"$f\"; then rm -f \"$f\"; exit 125; fi; . \"$f\"; rm -f \"$f\"; unset f; exec \"$@\" </dev/null";

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
        let allow = allowlist(None, None, &["NPM_*".into(), "CRABBOX_*".into()]).unwrap();
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
}
