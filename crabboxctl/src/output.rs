//! Human and `--json` renderers for the daemon's replies: the JSON shapes
//! (serde structs built from the proto types), tables, durations and
//! timestamps.
//!
//! The `--json` format is for scripts but is not yet stable: it may change in
//! any release until the changelog promises it. Enum values are rendered as
//! kebab-case names without their proto prefix (`TASK_STATE_RUNNING` →
//! `running`), timestamps as RFC 3339 UTC text with milliseconds (`null`
//! when unknown), durations as whole seconds in a field named `…_seconds`.

use std::{
    collections::BTreeMap,
    io::{self, Write},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crabbox_api::{
    prost_types,
    v1::{self, CheckStatus, ConfigFileKind, Phase, TaskKind, TaskState},
    version::{self, Skew},
};
use serde::Serialize;

// === JSON shapes ===

/// `crabboxctl status --json`.
#[derive(Debug, Serialize)]
pub struct StatusJson {
    /// The daemon's version.
    pub version: String,
    /// The daemon's local API protocol number.
    pub protocol: u32,
    /// The daemon's process id.
    pub pid: u32,
    /// Daemon start time, RFC 3339 UTC.
    pub started_at: Option<String>,
    /// Lifecycle phase (`starting`, `running`, `draining`).
    pub phase: String,
    /// The socket the daemon serves on.
    pub socket_path: String,
    /// The daemon's state directory.
    pub state_dir: String,
    /// Coordinator base URL without credentials; empty when none.
    pub coordinator_url: String,
    /// Whether a coordinator token is configured (never the token).
    pub coordinator_token_configured: bool,
    /// Configuration files considered, in layering order.
    pub config_files: Vec<ConfigFileJson>,
    /// Task counts by state.
    pub task_counts: BTreeMap<String, u32>,
    /// The current log filter.
    pub log_filter: String,
    /// This CLI's version and protocol.
    pub client: ClientJson,
    /// How the daemon's version relates to the CLI's.
    pub skew: SkewJson,
}

/// A configuration file in [`StatusJson`].
#[derive(Debug, Serialize)]
pub struct ConfigFileJson {
    /// Absolute path.
    pub path: String,
    /// `daemon-toml` or `crabbox-yaml`.
    pub kind: String,
    /// Whether it existed and was read.
    pub loaded: bool,
    /// Permission bits as octal text (`0600`), when it was read.
    pub mode: Option<String>,
}

/// The CLI's own version in [`StatusJson`].
#[derive(Debug, Serialize)]
pub struct ClientJson {
    /// crabboxctl's version.
    pub version: &'static str,
    /// crabboxctl's protocol number.
    pub protocol: u32,
}

/// A version skew in [`StatusJson`].
#[derive(Debug, Serialize)]
pub struct SkewJson {
    /// `none`, `minor` or `protocol`.
    pub kind: &'static str,
    /// The sentence saying what to do.
    pub message: String,
}

/// One task in `crabboxctl tasks --json`.
#[derive(Debug, Serialize)]
pub struct TaskJson {
    /// `<kind>/<key>`.
    pub id: String,
    /// Task kind (`egress-host`, …).
    pub kind: String,
    /// Task key; empty for singletons.
    pub key: String,
    /// Task state (`running`, `backoff`, …).
    pub state: String,
    /// Restarts so far.
    pub restarts: u32,
    /// Last error, or empty.
    pub last_error: String,
    /// When the task entered its state, RFC 3339 UTC.
    pub since: Option<String>,
    /// Next attempt while in backoff, RFC 3339 UTC (`null` otherwise).
    pub next_attempt: Option<String>,
    /// Labels of the task's span.
    pub labels: BTreeMap<String, String>,
}

/// `crabboxctl tasks --json`.
#[derive(Debug, Serialize)]
pub struct TasksJson {
    /// Every matching task.
    pub tasks: Vec<TaskJson>,
}

/// `crabboxctl doctor --json`.
#[derive(Debug, Serialize)]
pub struct DoctorJson<'a> {
    /// Every check, local ones first.
    pub checks: &'a [CheckJson],
    /// How many failed.
    pub failures: usize,
    /// How many warned.
    pub warnings: usize,
}

/// One `tasks --watch --json` line.
#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WatchEventJson {
    /// The whole table.
    Snapshot {
        /// Every task.
        tasks: Vec<TaskJson>,
    },
    /// A task was added or changed.
    Upsert(TaskJson),
    /// A task left the table.
    Removed {
        /// The removed task's id.
        id: String,
    },
}

/// One line of `crabboxctl doctor --json`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CheckJson {
    /// What was checked.
    pub name: String,
    /// `ok`, `warn`, `fail` or `skip`.
    pub status: Outcome,
    /// What was found and what to do.
    pub detail: String,
    /// `local` (crabboxctl checked) or `daemon` (RunDiagnostics).
    pub source: &'static str,
}

/// The outcome of one doctor check.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Passed.
    Ok,
    /// Works, but should be fixed.
    Warn,
    /// Broken; makes `doctor` exit 4.
    Fail,
    /// Did not apply.
    Skip,
}

impl Outcome {
    /// The label printed at the start of a human doctor line.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Warn => "warn",
            Outcome::Fail => "FAIL",
            Outcome::Skip => "skip",
        }
    }
}

// === conversions ===

/// Strips a proto enum's prefix and renders it kebab-case; unknown numbers
/// (from a newer daemon) stay visible as `unknown-<n>`.
fn enum_name<E>(value: i32, prefix: &str, name: impl Fn(&E) -> &'static str) -> String
where
    E: TryFrom<i32>,
{
    match E::try_from(value) {
        Ok(e) => {
            let full = name(&e);
            full.strip_prefix(prefix)
                .unwrap_or(full)
                .to_ascii_lowercase()
                .replace('_', "-")
        }
        Err(_) => format!("unknown-{value}"),
    }
}

/// A task kind's display name (`egress-host`).
pub fn kind_name(kind: i32) -> String {
    enum_name(kind, "TASK_KIND_", TaskKind::as_str_name)
}

/// A task state's display name (`backoff`).
pub fn state_name(state: i32) -> String {
    enum_name(state, "TASK_STATE_", TaskState::as_str_name)
}

fn phase_name(phase: i32) -> String {
    enum_name(phase, "PHASE_", Phase::as_str_name)
}

fn config_kind_name(kind: i32) -> String {
    enum_name(kind, "CONFIG_FILE_KIND_", ConfigFileKind::as_str_name)
}

/// Maps a daemon check status to a doctor outcome; an unknown status from a
/// newer daemon is shown as a warning rather than hidden.
pub fn outcome_of(status: i32) -> Outcome {
    match CheckStatus::try_from(status) {
        Ok(CheckStatus::Ok) => Outcome::Ok,
        Ok(CheckStatus::Fail) => Outcome::Fail,
        Ok(CheckStatus::Skipped) => Outcome::Skip,
        Ok(CheckStatus::Warn | CheckStatus::Unspecified) | Err(_) => Outcome::Warn,
    }
}

/// Builds the `status --json` shape.
pub fn status_json(s: &v1::GetStatusResponse, skew: &Skew) -> StatusJson {
    StatusJson {
        version: s.version.clone(),
        protocol: s.protocol,
        pid: s.pid,
        started_at: timestamp_text(s.started_at.as_ref()),
        phase: phase_name(s.phase),
        socket_path: s.socket_path.clone(),
        state_dir: s.state_dir.clone(),
        coordinator_url: s.coordinator_url.clone(),
        coordinator_token_configured: s.coordinator_token_configured,
        config_files: s
            .config_files
            .iter()
            .map(|f| ConfigFileJson {
                path: f.path.clone(),
                kind: config_kind_name(f.kind),
                loaded: f.loaded,
                mode: f.loaded.then(|| format!("{:04o}", f.mode & 0o7777)),
            })
            .collect(),
        task_counts: s
            .task_counts
            .iter()
            .map(|c| (state_name(c.state), c.count))
            .collect(),
        log_filter: s.log_filter.clone(),
        client: ClientJson {
            version: version::VERSION,
            protocol: version::PROTOCOL,
        },
        skew: SkewJson {
            kind: match skew {
                Skew::None => "none",
                Skew::Minor { .. } => "minor",
                Skew::Protocol { .. } => "protocol",
            },
            message: skew.to_string(),
        },
    }
}

/// Builds one task's JSON shape.
pub fn task_json(t: &v1::Task) -> TaskJson {
    TaskJson {
        id: t.id.clone(),
        kind: kind_name(t.kind),
        key: t.key.clone(),
        state: state_name(t.state),
        restarts: t.restarts,
        last_error: t.last_error.clone(),
        since: timestamp_text(t.since.as_ref()),
        next_attempt: timestamp_text(t.next_attempt.as_ref()),
        labels: t
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

// === human rendering ===

/// Renders `crabboxctl status` for people.
pub fn status_human(s: &v1::GetStatusResponse, now_ms: i64) -> String {
    let mut out = String::new();
    let up = s
        .started_at
        .as_ref()
        .map_or("-".to_owned(), |t| ago(unix_ms(t), now_ms));
    out.push_str(&format!(
        "crabboxd {} (protocol {}) is {}, pid {}, up {}\n",
        s.version,
        s.protocol,
        phase_name(s.phase),
        s.pid,
        up
    ));
    let mut row = |k: &str, v: &str| out.push_str(&format!("  {k:<13}{v}\n"));
    row("socket", &s.socket_path);
    row("state dir", &s.state_dir);
    let coordinator = match (s.coordinator_url.is_empty(), s.coordinator_token_configured) {
        (true, _) => "none configured".to_owned(),
        (false, true) => format!("{} (token configured)", s.coordinator_url),
        (false, false) => format!("{} (no token configured)", s.coordinator_url),
    };
    row("coordinator", &coordinator);
    for (i, f) in s.config_files.iter().enumerate() {
        let state = if f.loaded {
            format!("mode {:04o}", f.mode & 0o7777)
        } else {
            "not present".to_owned()
        };
        let label = if i == 0 { "config" } else { "" };
        row(label, &format!("{} ({state})", f.path));
    }
    if s.config_files.is_empty() {
        row("config", "defaults only");
    }
    row("log filter", &s.log_filter);
    let counts = if s.task_counts.is_empty() {
        "none".to_owned()
    } else {
        s.task_counts
            .iter()
            .map(|c| format!("{} {}", c.count, state_name(c.state)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    row("tasks", &counts);
    out
}

/// Renders the task table: one row per task, columns padded to fit.
pub fn tasks_table(tasks: &[v1::Task], now_ms: i64) -> String {
    if tasks.is_empty() {
        return "no tasks\n".to_owned();
    }
    let mut rows = vec![[
        "ID".to_owned(),
        "STATE".to_owned(),
        "RESTARTS".to_owned(),
        "SINCE".to_owned(),
        "LAST ERROR".to_owned(),
    ]];
    for t in tasks {
        rows.push(task_cells(t, now_ms));
    }
    table(&rows)
}

/// One line for a `tasks --watch` change.
pub fn task_line(t: &v1::Task, now_ms: i64) -> String {
    let [id, state, restarts, since, err] = task_cells(t, now_ms);
    let mut line = format!("{id} {state} restarts={restarts} since={since}");
    if !err.is_empty() {
        line.push_str(&format!(" error={err:?}"));
    }
    line
}

fn task_cells(t: &v1::Task, now_ms: i64) -> [String; 5] {
    let mut state = state_name(t.state);
    if let Some(next) = &t.next_attempt {
        state.push_str(&format!(" (retry in {})", until(unix_ms(next), now_ms)));
    }
    let id = if t.id.is_empty() {
        format!("{}/{}", kind_name(t.kind), t.key)
    } else {
        t.id.clone()
    };
    [
        id,
        state,
        t.restarts.to_string(),
        match &t.since {
            None => "-".to_owned(),
            Some(since) => format!("{} ago", ago(unix_ms(since), now_ms)),
        },
        t.last_error.replace('\n', " "),
    ]
}

/// Pads every column but the last to its widest cell.
fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == N {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Renders doctor lines: `ok    name    detail`.
pub fn checks_human(checks: &[CheckJson]) -> String {
    let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    let mut out = String::new();
    for c in checks {
        out.push_str(&format!(
            "{:<4}  {:<width$}  {}\n",
            c.status.label(),
            c.name,
            c.detail
        ));
    }
    out
}

// === time ===

/// A proto timestamp as milliseconds since the Unix epoch.
pub fn unix_ms(t: &prost_types::Timestamp) -> i64 {
    t.seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(t.nanos / 1_000_000))
}

/// A proto timestamp as RFC 3339 text for `--json`; `None` when absent.
pub fn timestamp_text(t: Option<&prost_types::Timestamp>) -> Option<String> {
    t.map(|t| rfc3339(unix_ms(t)))
}

/// A proto duration in whole seconds (negative spans read as zero).
pub fn seconds(d: Option<&prost_types::Duration>) -> Option<u64> {
    d.map(|d| u64::try_from(d.seconds).unwrap_or(0))
}

/// Milliseconds since the Unix epoch, now.
pub fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// How long ago `then_ms` was, as a [`short_duration`].
pub fn ago(then_ms: i64, now_ms: i64) -> String {
    short_duration(Duration::from_millis(
        u64::try_from(now_ms.saturating_sub(then_ms)).unwrap_or(0),
    ))
}

fn until(then_ms: i64, now_ms: i64) -> String {
    ago(now_ms, then_ms)
}

/// A duration in at most two units: `45s`, `3m12s`, `2h5m`, `4d3h`.
pub fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    let (d_, h, m, sec) = (s / 86_400, s / 3_600 % 24, s / 60 % 60, s % 60);
    match (d_, h, m) {
        (0, 0, 0) => format!("{sec}s"),
        (0, 0, _) => format!("{m}m{sec}s"),
        (0, _, _) => format!("{h}h{m}m"),
        _ => format!("{d_}d{h}h"),
    }
}

/// Unix milliseconds as RFC 3339 UTC with millisecond precision.
pub fn rfc3339(unix_ms: i64) -> String {
    let secs = unix_ms.div_euclid(1000);
    let ms = unix_ms.rem_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's days-to-civil algorithm: exact for the proleptic
    // Gregorian calendar, and small enough not to need a date crate.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

// === writing ===

/// Writes to stdout and flushes (so `--watch` lines arrive as they happen),
/// returning errors rather than panicking as `print!` does. Used through the
/// `out!` and `outln!` macros.
pub fn write_stdout(args: std::fmt::Arguments<'_>) -> io::Result<()> {
    let mut out = io::stdout().lock();
    out.write_fmt(args)?;
    out.flush()
}

/// Whether an error is stdout's reader having gone away.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
    })
}

/// Prints a value as pretty JSON on stdout.
pub fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value).map_err(io::Error::from)?;
    writeln!(out)?;
    Ok(())
}

/// Prints a value as one compact JSON line on stdout and flushes, for
/// streams read line by line.
pub fn print_json_line(value: &impl Serialize) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    serde_json::to_writer(&mut out, value).map_err(io::Error::from)?;
    writeln!(out)?;
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str, state: TaskState, err: &str) -> v1::Task {
        v1::Task {
            id: id.to_owned(),
            kind: TaskKind::EgressHost as i32,
            key: "lease_abc".to_owned(),
            state: state as i32,
            restarts: 2,
            last_error: err.to_owned(),
            since: Some(prost_types::Timestamp {
                seconds: 1,
                nanos: 0,
            }),
            next_attempt: None,
            labels: [("lease".to_owned(), "lease_abc".to_owned())].into(),
        }
    }

    #[test]
    fn enum_names_are_kebab_without_prefix() {
        assert_eq!(
            kind_name(TaskKind::EgressRemoteClient as i32),
            "egress-remote-client"
        );
        assert_eq!(state_name(TaskState::Backoff as i32), "backoff");
        assert_eq!(phase_name(Phase::Draining as i32), "draining");
        assert_eq!(state_name(99), "unknown-99");
    }

    #[test]
    fn rfc3339_matches_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1), "1970-01-01T00:00:00.001Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(1_763_777_696_789), "2025-11-22T02:14:56.789Z");
    }

    #[test]
    fn short_durations_use_two_units() {
        assert_eq!(short_duration(Duration::from_secs(45)), "45s");
        assert_eq!(short_duration(Duration::from_secs(192)), "3m12s");
        assert_eq!(short_duration(Duration::from_secs(7_500)), "2h5m");
        assert_eq!(short_duration(Duration::from_secs(356_400)), "4d3h");
    }

    #[test]
    fn task_table_aligns_columns() {
        let tasks = [
            task("egress-host/lease_abc", TaskState::Running, ""),
            task("ssh-mux/l", TaskState::Failed, "host key\nmismatch"),
        ];
        let text = tasks_table(&tasks, 61_000);
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("ID                     STATE"));
        assert!(lines[1].starts_with("egress-host/lease_abc  running"));
        assert!(lines[2].contains("1m0s ago"));
        assert!(lines[2].ends_with("host key mismatch"));
        assert_eq!(tasks_table(&[], 0), "no tasks\n");
    }

    #[test]
    fn task_json_shape() {
        let v = serde_json::to_value(task_json(&task(
            "egress-host/lease_abc",
            TaskState::Backoff,
            "x",
        )))
        .unwrap();
        assert_eq!(v["id"], "egress-host/lease_abc");
        assert_eq!(v["kind"], "egress-host");
        assert_eq!(v["state"], "backoff");
        assert_eq!(v["restarts"], 2);
        assert_eq!(v["since"], "1970-01-01T00:00:01.000Z");
        assert_eq!(v["next_attempt"], serde_json::Value::Null);
        assert!(v.get("since_unix_ms").is_none(), "{v}");
        assert_eq!(v["labels"]["lease"], "lease_abc");
        let removed = serde_json::to_value(WatchEventJson::Removed { id: "a/b".into() }).unwrap();
        assert_eq!(removed, serde_json::json!({"removed": {"id": "a/b"}}));
        let snap = serde_json::to_value(WatchEventJson::Snapshot { tasks: vec![] }).unwrap();
        assert_eq!(snap, serde_json::json!({"snapshot": {"tasks": []}}));
    }

    #[test]
    fn status_json_shape() {
        let s = v1::GetStatusResponse {
            version: "0.0.9".into(),
            protocol: 1,
            pid: 42,
            started_at: Some(prost_types::Timestamp {
                seconds: 1,
                nanos: 0,
            }),
            coordinator_url: "https://coord.example".into(),
            coordinator_token_configured: true,
            config_files: vec![v1::ConfigFile {
                path: "/h/.config/crabbox/crabboxd.toml".into(),
                kind: ConfigFileKind::DaemonToml as i32,
                loaded: true,
                mode: 0o100600,
            }],
            task_counts: vec![v1::TaskStateCount {
                state: TaskState::Running as i32,
                count: 3,
            }],
            socket_path: "/run/user/1/crabbox/crabboxd.sock".into(),
            log_filter: "info".into(),
            phase: Phase::Running as i32,
            state_dir: "/h/.local/state/crabbox".into(),
        };
        let skew = Skew::of(&s.version, s.protocol);
        let v = serde_json::to_value(status_json(&s, &skew)).unwrap();
        assert_eq!(v["phase"], "running");
        assert_eq!(v["started_at"], "1970-01-01T00:00:01.000Z");
        assert_eq!(v["task_counts"]["running"], 3);
        assert_eq!(v["config_files"][0]["kind"], "daemon-toml");
        assert_eq!(v["config_files"][0]["mode"], "0600");
        assert_eq!(v["skew"]["kind"], "minor");
        assert_eq!(v["client"]["version"], version::VERSION);
        let human = status_human(&s, 61_000);
        assert!(human.starts_with("crabboxd 0.0.9 (protocol 1) is running, pid 42, up 1m0s\n"));
        assert!(human.contains("https://coord.example (token configured)"));
        assert!(human.contains("crabboxd.toml (mode 0600)"));
        assert!(human.contains("3 running"));
    }

    #[test]
    fn checks_align_and_label() {
        let checks = [
            CheckJson {
                name: "socket".into(),
                status: Outcome::Ok,
                detail: "fine".into(),
                source: "local",
            },
            CheckJson {
                name: "coordinator".into(),
                status: Outcome::Fail,
                detail: "unreachable".into(),
                source: "daemon",
            },
        ];
        assert_eq!(
            checks_human(&checks),
            "ok    socket       fine\nFAIL  coordinator  unreachable\n"
        );
        assert_eq!(outcome_of(CheckStatus::Skipped as i32), Outcome::Skip);
        assert_eq!(outcome_of(77), Outcome::Warn);
    }
}
