//! SQLite storage: schema and migrations, and the one connection every route shares.
//!
//! All SQL runs on one dedicated thread that owns the connection and takes
//! jobs from a queue, so a slow statement never parks an async worker, a
//! heartbeat cannot stall routes that do not touch the database, and a burst
//! of requests does not fan out into hundreds of blocking threads contending
//! for one connection.

use std::path::Path;
use std::sync::mpsc;

use anyhow::Context;
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::model::{Lease, Run, RunEvent};

/// Ordered, append-only migrations; `PRAGMA user_version` counts the applied ones.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE leases (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    org TEXT NOT NULL,
    state TEXT NOT NULL,
    slug TEXT,
    expires_ms INTEGER NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX leases_state_expiry ON leases(state, expires_ms);
CREATE INDEX leases_slug ON leases(slug);
CREATE TABLE runs (id TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE run_events (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
CREATE TABLE run_logs (
    run_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    chunk TEXT NOT NULL,
    PRIMARY KEY (run_id, idx)
) WITHOUT ROWID;
CREATE TABLE egress_sessions (lease_id TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE egress_tombstones (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    lease_id TEXT NOT NULL,
    session_id TEXT NOT NULL
);
CREATE INDEX egress_tombstones_lease ON egress_tombstones(lease_id, session_id);
"#,
    // The portal lists a lease's recent runs.
    r#"
CREATE INDEX runs_lease ON runs(json_extract(record, '$.leaseID'));
"#,
    // Portal sessions signed out before they expire.
    r#"
CREATE TABLE portal_revoked (nonce TEXT PRIMARY KEY, expires_ms INTEGER NOT NULL) WITHOUT ROWID;
"#,
];

/// Tombstones kept per lease (oldest evicted first).
pub const MAX_TOMBSTONES: i64 = 256;

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// The shared database handle. Cloning is cheap; the storage thread ends
/// when the last clone is dropped.
#[derive(Clone)]
pub struct Store {
    jobs: mpsc::Sender<Job>,
}

impl Store {
    /// Open (creating if needed) the database and apply migrations.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            create_private_dir(dir)?;
        }
        // Create the file 0600 before SQLite opens it, so it is never readable
        // by others, not even briefly; SQLite gives the -wal/-shm files the same mode.
        restrict_file(path)?;
        let conn =
            Connection::open(path).with_context(|| format!("open database {}", path.display()))?;
        // WAL lets readers proceed during a write and makes commits cheap;
        // NORMAL sync is durable across process crashes, which is what a
        // coordinator restart needs.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&conn)?;
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("coordinator-sqlite".into())
            .spawn(move || {
                let mut conn = conn;
                for job in queue {
                    // A panicking job must not take the storage thread down with it;
                    // SQLite rolls back the job's open transaction when it is dropped.
                    let _ =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&mut conn)));
                }
            })?;
        Ok(Self { jobs })
    }

    /// Run `f` with the connection on the storage thread and await its result.
    pub async fn call<T, F>(&self, f: F) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> anyhow::Result<T> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move |c| {
                let _ = tx.send(f(c));
            }))
            .map_err(|_| anyhow::anyhow!("storage thread stopped"))?;
        rx.await.context("storage job panicked")?
    }
}

fn migrate(conn: &Connection) -> anyhow::Result<()> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(sql)
            .with_context(|| format!("migration {}", i + 1))?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

/// Create `dir` (and parents) with mode 0700 for the leaf.
pub fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

fn restrict_file(path: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("create {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

fn to_json<T: Serialize>(v: &T) -> anyhow::Result<String> {
    Ok(serde_json::to_string(v)?)
}

fn from_json<T: DeserializeOwned>(s: &str) -> anyhow::Result<T> {
    Ok(serde_json::from_str(s)?)
}

// === leases ===

/// Load one lease by exact id.
pub fn get_lease(c: &Connection, id: &str) -> anyhow::Result<Option<Lease>> {
    let rec: Option<String> = c
        .query_row("SELECT record FROM leases WHERE id = ?1", [id], |r| {
            r.get(0)
        })
        .optional()?;
    rec.map(|s| from_json(&s)).transpose()
}

/// Insert or replace a lease.
pub fn put_lease(c: &Connection, l: &Lease) -> anyhow::Result<()> {
    c.execute(
        "INSERT INTO leases (id, owner, org, state, slug, expires_ms, record) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT(id) DO UPDATE SET owner = ?2, org = ?3, state = ?4, slug = ?5, expires_ms = ?6, record = ?7",
        params![l.id, l.owner, l.org, l.state, l.slug, l.expires_ms(), to_json(l)?],
    )?;
    Ok(())
}

/// Every lease, newest first.
pub fn all_leases(c: &Connection) -> anyhow::Result<Vec<Lease>> {
    let mut st = c.prepare("SELECT record FROM leases ORDER BY rowid DESC")?;
    let rows = st.query_map([], |r| r.get::<_, String>(0))?;
    rows.map(|r| from_json(&r?)).collect()
}

/// Live leases with a given normalised slug whose expiry is after `now_ms`.
pub fn live_by_slug(c: &Connection, slug: &str, now_ms: i64) -> anyhow::Result<Vec<Lease>> {
    let mut st = c.prepare(
        "SELECT record FROM leases WHERE slug = ?1 AND state IN ('active','provisioning') AND expires_ms > ?2 ORDER BY id",
    )?;
    let rows = st.query_map(params![slug, now_ms], |r| r.get::<_, String>(0))?;
    rows.map(|r| from_json(&r?)).collect()
}

/// The soonest expiry among live leases.
pub fn next_expiry(c: &Connection) -> anyhow::Result<Option<i64>> {
    Ok(c.query_row(
        "SELECT MIN(expires_ms) FROM leases WHERE state IN ('active','provisioning')",
        [],
        |r| r.get::<_, Option<i64>>(0),
    )?)
}

/// Live leases whose expiry is at or before `now_ms`.
pub fn due_leases(c: &Connection, now_ms: i64) -> anyhow::Result<Vec<Lease>> {
    let mut st = c.prepare(
        "SELECT record FROM leases WHERE state IN ('active','provisioning') AND expires_ms <= ?1",
    )?;
    let rows = st.query_map([now_ms], |r| r.get::<_, String>(0))?;
    rows.map(|r| from_json(&r?)).collect()
}

// === runs ===

/// Load one run.
pub fn get_run(c: &Connection, id: &str) -> anyhow::Result<Option<Run>> {
    let rec: Option<String> = c
        .query_row("SELECT record FROM runs WHERE id = ?1", [id], |r| r.get(0))
        .optional()?;
    rec.map(|s| from_json(&s)).transpose()
}

/// Insert or replace a run.
pub fn put_run(c: &Connection, r: &Run) -> anyhow::Result<()> {
    c.execute(
        "INSERT INTO runs (id, record) VALUES (?1, ?2) ON CONFLICT(id) DO UPDATE SET record = ?2",
        params![r.id, to_json(r)?],
    )?;
    Ok(())
}

/// A lease's runs, newest first, at most `limit`.
pub fn runs_for_lease(c: &Connection, lease_id: &str, limit: i64) -> anyhow::Result<Vec<Run>> {
    let mut st = c.prepare_cached(
        "SELECT record FROM runs WHERE json_extract(record, '$.leaseID') = ?1 ORDER BY rowid DESC LIMIT ?2",
    )?;
    let rows = st.query_map(params![lease_id, limit], |r| r.get::<_, String>(0))?;
    rows.map(|r| from_json(&r?)).collect()
}

/// The next event sequence number of a run.
pub fn next_seq(c: &Connection, run_id: &str) -> anyhow::Result<i64> {
    let max: Option<i64> = c.query_row(
        "SELECT MAX(seq) FROM run_events WHERE run_id = ?1",
        [run_id],
        |r| r.get(0),
    )?;
    Ok(max.unwrap_or(0) + 1)
}

/// Store one event (its `seq` must be [`next_seq`]).
pub fn put_event(c: &Connection, e: &RunEvent) -> anyhow::Result<()> {
    c.execute(
        "INSERT INTO run_events (run_id, seq, record) VALUES (?1, ?2, ?3)",
        params![e.run_id, e.seq, to_json(e)?],
    )?;
    Ok(())
}

/// Events with `seq > after`, ascending, at most `limit`.
pub fn events_after(
    c: &Connection,
    run_id: &str,
    after: i64,
    limit: i64,
) -> anyhow::Result<Vec<RunEvent>> {
    let mut st = c.prepare_cached(
        "SELECT record FROM run_events WHERE run_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
    )?;
    let rows = st.query_map(params![run_id, after, limit], |r| r.get::<_, String>(0))?;
    rows.map(|r| from_json(&r?)).collect()
}

/// A page of stored event records, bounded in count and in bytes.
pub struct Page {
    /// The events' JSON records, ascending by seq.
    pub records: Vec<String>,
    /// Seq of the last record, if any.
    pub last_seq: Option<i64>,
    /// Whether the byte bound stopped the page before `limit` events while more existed.
    pub cut: bool,
}

/// Events with `seq > after`, at most `limit` of them and at most `max_bytes`
/// of records (but always at least one when any exists). Rows past the bound
/// are never read.
pub fn page_after(
    c: &Connection,
    run_id: &str,
    after: i64,
    limit: i64,
    max_bytes: usize,
) -> anyhow::Result<Page> {
    let mut st = c.prepare_cached(
        "SELECT seq, record FROM run_events WHERE run_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
    )?;
    let mut rows = st.query(params![run_id, after, limit])?;
    let mut page = Page {
        records: Vec::new(),
        last_seq: None,
        cut: false,
    };
    let mut bytes = 0;
    while let Some(row) = rows.next()? {
        let record: String = row.get(1)?;
        if !page.records.is_empty() && bytes + record.len() + 1 > max_bytes {
            page.cut = true;
            break;
        }
        bytes += record.len() + 1;
        page.last_seq = Some(row.get(0)?);
        page.records.push(record);
    }
    Ok(page)
}

/// Replace a run's log with the given chunks.
pub fn put_log(c: &Connection, run_id: &str, chunks: &[&str]) -> anyhow::Result<()> {
    c.execute("DELETE FROM run_logs WHERE run_id = ?1", [run_id])?;
    let mut st = c.prepare("INSERT INTO run_logs (run_id, idx, chunk) VALUES (?1, ?2, ?3)")?;
    for (i, chunk) in chunks.iter().enumerate() {
        st.execute(params![run_id, i as i64, chunk])?;
    }
    Ok(())
}

/// A run's whole log.
pub fn get_log(c: &Connection, run_id: &str) -> anyhow::Result<String> {
    let mut st = c.prepare("SELECT chunk FROM run_logs WHERE run_id = ?1 ORDER BY idx")?;
    let rows = st.query_map([run_id], |r| r.get::<_, String>(0))?;
    let mut out = String::new();
    for r in rows {
        out.push_str(&r?);
    }
    Ok(out)
}

// === portal ===

/// Revoked portal sessions kept at most (the soonest to expire go first).
pub const MAX_REVOKED: i64 = 65_536;

/// Revoke a portal session nonce until `expires_ms`, forgetting expired ones.
pub fn revoke_portal_session(
    c: &Connection,
    nonce: &str,
    expires_ms: i64,
    now_ms: i64,
) -> anyhow::Result<()> {
    c.execute(
        "DELETE FROM portal_revoked WHERE expires_ms <= ?1",
        [now_ms],
    )?;
    c.execute(
        "INSERT OR REPLACE INTO portal_revoked (nonce, expires_ms) VALUES (?1, ?2)",
        params![nonce, expires_ms],
    )?;
    c.execute(
        "DELETE FROM portal_revoked WHERE nonce NOT IN
           (SELECT nonce FROM portal_revoked ORDER BY expires_ms DESC LIMIT ?1)",
        [MAX_REVOKED],
    )?;
    Ok(())
}

/// Whether a portal session nonce was signed out.
pub fn is_portal_session_revoked(c: &Connection, nonce: &str) -> anyhow::Result<bool> {
    Ok(c.query_row(
        "SELECT 1 FROM portal_revoked WHERE nonce = ?1",
        [nonce],
        |_| Ok(()),
    )
    .optional()?
    .is_some())
}

// === egress ===

/// The active egress session record of a lease, as JSON.
pub fn get_egress_session<T: DeserializeOwned>(
    c: &Connection,
    lease_id: &str,
) -> anyhow::Result<Option<T>> {
    let rec: Option<String> = c
        .query_row(
            "SELECT record FROM egress_sessions WHERE lease_id = ?1",
            [lease_id],
            |r| r.get(0),
        )
        .optional()?;
    rec.map(|s| from_json(&s)).transpose()
}

/// Write the active egress session record of a lease.
pub fn put_egress_session<T: Serialize>(
    c: &Connection,
    lease_id: &str,
    rec: &T,
) -> anyhow::Result<()> {
    c.execute(
        "INSERT INTO egress_sessions (lease_id, record) VALUES (?1, ?2) ON CONFLICT(lease_id) DO UPDATE SET record = ?2",
        params![lease_id, to_json(rec)?],
    )?;
    Ok(())
}

/// Whether `session` is tombstoned for `lease_id`.
pub fn is_tombstoned(c: &Connection, lease_id: &str, session: &str) -> anyhow::Result<bool> {
    Ok(c.query_row(
        "SELECT 1 FROM egress_tombstones WHERE lease_id = ?1 AND session_id = ?2",
        params![lease_id, session],
        |_| Ok(()),
    )
    .optional()?
    .is_some())
}

/// Tombstone a session, evicting the oldest beyond [`MAX_TOMBSTONES`].
pub fn add_tombstone(c: &Connection, lease_id: &str, session: &str) -> anyhow::Result<()> {
    if is_tombstoned(c, lease_id, session)? {
        return Ok(());
    }
    c.execute(
        "INSERT INTO egress_tombstones (lease_id, session_id) VALUES (?1, ?2)",
        params![lease_id, session],
    )?;
    c.execute(
        "DELETE FROM egress_tombstones WHERE lease_id = ?1 AND id NOT IN
           (SELECT id FROM egress_tombstones WHERE lease_id = ?1 ORDER BY id DESC LIMIT ?2)",
        params![lease_id, MAX_TOMBSTONES],
    )?;
    Ok(())
}

/// Forget a lease's egress state entirely (lease teardown).
pub fn clear_egress(c: &Connection, lease_id: &str) -> anyhow::Result<()> {
    c.execute(
        "DELETE FROM egress_sessions WHERE lease_id = ?1",
        [lease_id],
    )?;
    c.execute(
        "DELETE FROM egress_tombstones WHERE lease_id = ?1",
        [lease_id],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn database_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state").join("c.db");
        let _store = Store::open(&path).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        let wal = path.with_extension("db-wal");
        if wal.exists() {
            assert_eq!(mode(&wal), 0o600);
        }
    }
}
