//! What the portal's templates show: view rows built from store records with
//! the API's scoping, relative times, and the egress panel's wording.
//!
//! Nothing here copies a ticket, token, session id or proxy URL into a view:
//! the records it reads hold no tickets, and the egress view takes only
//! profile, allowlist, connection flags and times from a session record.

use askama::Template;

use crate::app::Shared;
use crate::auth::Principal;
use crate::clock::parse_iso;
use crate::egress::SessionRecord;
use crate::error::{ApiError, ApiResult};
use crate::model::{Lease, Run, RunEvent};
use crate::store;

/// Leases listed on the index page at most (newest first).
pub(crate) const INDEX_LEASES: usize = 200;
/// Runs listed on a lease page at most (newest first).
pub(crate) const LEASE_RUNS: i64 = 25;
/// Run events rendered into a run page at most; the live stream sends the rest.
pub(crate) const RUN_PAGE_EVENTS: i64 = 500;
/// Bytes of run event records rendered into a run page at most.
pub(crate) const RUN_PAGE_BYTES: usize = 1024 * 1024;

/// `1h 02m`, `4m 05s`, `12s` for a span in ms (negative spans count as 0).
pub(crate) fn span(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    let (h, m, s) = (s / 3600, (s / 60) % 60, s % 60);
    if h > 0 {
        format!("{h}h {m:02}m")
    } else if m > 0 {
        format!("{m}m {s:02}s")
    } else {
        format!("{s}s")
    }
}

/// `in 4m 05s` / `4m 05s ago` for a time relative to now.
fn relative(at_ms: i64, now: i64) -> String {
    if at_ms >= now {
        format!("in {}", span(at_ms - now))
    } else {
        format!("{} ago", span(now - at_ms))
    }
}

fn rel_iso(iso: Option<&str>, now: i64) -> String {
    iso.and_then(parse_iso)
        .map_or_else(|| "—".to_owned(), |t| relative(t, now))
}

/// The egress panel of a lease (reference portal §5 wording).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EgressView {
    /// Short status: `no session`, `waiting for host`, `host ready`,
    /// `client active`, `unavailable`; coarse: `active` / `unavailable`.
    pub status: String,
    /// Badge word: `connected`, `waiting`, `off` (coarse: `active`, `off`).
    pub badge: String,
    /// Whether the full view (manager) is shown.
    pub full: bool,
    /// Profile, or `custom`.
    pub profile: String,
    /// The allowlist, in full.
    pub allow: Vec<String>,
    /// `discord.com, cdn.discord.com, … +2` or `no allowlist`.
    pub allow_short: String,
    /// `connected 3m 02s ago` or `not connected`.
    pub host: String,
    /// Same, for the lease-side client.
    pub client: String,
    /// Whether host / client sockets are open (for DOM state).
    pub host_on: bool,
    /// See `host_on`.
    pub client_on: bool,
    /// `updated 12s ago`.
    pub updated: String,
}

impl EgressView {
    /// Build the view. `manage` selects the full view; `active` is whether the lease is live.
    pub(crate) fn new(
        record: Option<&SessionRecord>,
        since: (Option<i64>, Option<i64>),
        manage: bool,
        active: bool,
        now: i64,
    ) -> Self {
        let on = active && record.is_some();
        let mut v = Self {
            status: if on { "active" } else { "unavailable" }.into(),
            badge: if on { "active" } else { "off" }.into(),
            full: false,
            profile: String::new(),
            allow: Vec::new(),
            allow_short: String::new(),
            host: String::new(),
            client: String::new(),
            host_on: false,
            client_on: false,
            updated: String::new(),
        };
        if !manage {
            return v;
        }
        v.full = true;
        let Some(r) = record.filter(|_| active) else {
            v.status = if active { "no session" } else { "unavailable" }.into();
            v.badge = "off".into();
            return v;
        };
        let (host, client) = since;
        v.host_on = host.is_some();
        v.client_on = client.is_some();
        // `client active` needs the host; a client alone is still waiting for it.
        (v.status, v.badge) = match (host.is_some(), client.is_some()) {
            (true, true) => ("client active".into(), "connected".into()),
            (true, false) => ("host ready".into(), "waiting".into()),
            _ => ("waiting for host".into(), "waiting".into()),
        };
        let conn = |t: Option<i64>| {
            t.map_or_else(
                || "not connected".to_owned(),
                |t| format!("connected {}", relative(t, now)),
            )
        };
        v.host = conn(host);
        v.client = conn(client);
        v.profile = r
            .profile
            .clone()
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "custom".into());
        v.allow = r.allow.clone();
        v.allow_short = if r.allow.is_empty() {
            "no allowlist".into()
        } else {
            let head = r
                .allow
                .iter()
                .take(3)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ");
            if r.allow.len() > 3 {
                format!("{head} +{}", r.allow.len() - 3)
            } else {
                head
            }
        };
        v.updated = format!("updated {}", rel_iso(Some(&r.updated_at), now));
        v
    }
}

/// One row of the index table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LeaseRow {
    /// Lease id.
    pub id: String,
    /// Slug or `—`.
    pub slug: String,
    /// `active`, `released`, `expired`, …
    pub state: String,
    /// Owner and org (admins see others' leases).
    pub owner: String,
    /// `in 59m 12s` or `ended`.
    pub expires: String,
    /// Idle time left, or `—`.
    pub idle_left: String,
    /// Last heartbeat, relative.
    pub heartbeat: String,
    /// Egress badge word.
    pub egress: String,
}

fn lease_row(l: &Lease, egress: &EgressView, now: i64) -> LeaseRow {
    let live = l.is_live() && l.expires_ms() > now;
    let touched = l
        .last_touched_at
        .as_deref()
        .and_then(parse_iso)
        .or_else(|| parse_iso(&l.created_at));
    LeaseRow {
        id: l.id.clone(),
        slug: l.slug.clone().unwrap_or_else(|| "—".into()),
        state: l.state.clone(),
        owner: format!("{} · {}", l.owner, l.org),
        expires: if live {
            relative(l.expires_ms(), now)
        } else {
            "ended".into()
        },
        idle_left: match (live, touched) {
            (true, Some(t)) => span(t + l.idle_timeout_seconds.max(1) * 1000 - now),
            _ => "—".into(),
        },
        heartbeat: rel_iso(l.last_touched_at.as_deref(), now),
        egress: egress.badge.clone(),
    }
}

/// Whether the viewer may see a lease on the portal: its owner, or an admin
/// (as on the API's list and mutating routes).
pub(crate) fn sees_lease(p: &Principal, l: &Lease) -> bool {
    p.admin || p.owns(&l.owner, &l.org)
}

/// The index rows of a viewer: their leases (all for admins), newest first.
pub(crate) async fn index_rows(st: &Shared, p: &Principal) -> ApiResult<Vec<LeaseRow>> {
    let p2 = p.clone();
    let rows = st
        .store
        .call(move |c| {
            let mut out = Vec::new();
            for l in store::all_leases(c)?
                .into_iter()
                .filter(|l| sees_lease(&p2, l))
            {
                if out.len() == INDEX_LEASES {
                    break;
                }
                let rec: Option<SessionRecord> = store::get_egress_session(c, &l.id)?;
                out.push((l, rec));
            }
            Ok(out)
        })
        .await?;
    let now = st.clock.now_ms();
    Ok(rows
        .iter()
        .map(|(l, rec)| {
            let since = rec.as_ref().map_or((None, None), |r| {
                st.egress.connected_since(&l.id, &r.session_id)
            });
            let live = l.is_live() && l.expires_ms() > now;
            lease_row(
                l,
                &EgressView::new(rec.as_ref(), since, true, live, now),
                now,
            )
        })
        .collect())
}

/// One row of a lease page's runs table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RunRow {
    /// Run id.
    pub id: String,
    /// `running`, `succeeded`, `failed`.
    pub state: String,
    /// Exit code or `—`.
    pub exit: String,
    /// The command line, shell-ish.
    pub command: String,
    /// Started, relative.
    pub started: String,
}

fn run_row(r: &Run, now: i64) -> RunRow {
    RunRow {
        id: r.id.clone(),
        state: r.state.clone(),
        exit: r.exit_code.map_or_else(|| "—".into(), |c| c.to_string()),
        command: command_line(&r.command),
        started: rel_iso(Some(&r.started_at), now),
    }
}

/// A command as one line: arguments with spaces or quotes are single-quoted.
pub(crate) fn command_line(cmd: &[String]) -> String {
    let line = cmd
        .iter()
        .map(|a| {
            if !a.is_empty()
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@%+".contains(&b))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ");
    crate::runs::truncate_utf8(&line, 1024).to_owned()
}

/// The lease facts panel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LeaseFacts {
    /// The index-style summary.
    pub row: LeaseRow,
    /// `ssh` etc.
    pub provider: String,
    /// `linux` etc.
    pub target: String,
    /// `user@host:port`.
    pub ssh: String,
    /// Work root on the lease.
    pub work_root: String,
    /// TTL and idle timeout.
    pub timeouts: String,
    /// Created, relative.
    pub created: String,
    /// Whether the lease is live (commands shown).
    pub live: bool,
}

/// Everything a lease page shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LeaseView {
    /// Lease id (also in `facts.row`).
    pub id: String,
    /// Facts.
    pub facts: LeaseFacts,
    /// Egress panel.
    pub egress: EgressView,
    /// Recent runs the viewer may read.
    pub runs: Vec<RunRow>,
    /// Whether the viewer manages the lease (commands shown).
    pub manage: bool,
}

/// Load a lease page's view, or 404 when the viewer may not see the lease.
pub(crate) async fn lease_view(st: &Shared, p: &Principal, ident: &str) -> ApiResult<LeaseView> {
    let now = st.clock.now_ms();
    let (p2, ident) = (p.clone(), ident.to_owned());
    let (lease, rec, runs) = st
        .store
        .call(move |c| {
            // Admins resolve any lease, like the API's mutating routes; others their own.
            let lease = match crate::leases::resolve(c, &ident, &p2, true, now) {
                Ok(l) => l,
                Err(e) => return Ok(Err(e)),
            };
            let rec: Option<SessionRecord> = store::get_egress_session(c, &lease.id)?;
            let runs: Vec<Run> = store::runs_for_lease(c, &lease.id, LEASE_RUNS)?
                .into_iter()
                .filter(|r| r.readable_by(&p2))
                .collect();
            Ok(Ok((lease, rec, runs)))
        })
        .await??;
    let manage = sees_lease(p, &lease);
    let live = lease.is_live() && lease.expires_ms() > now;
    let since = rec.as_ref().map_or((None, None), |r| {
        st.egress.connected_since(&lease.id, &r.session_id)
    });
    let egress = EgressView::new(rec.as_ref(), since, manage, live, now);
    let row = lease_row(&lease, &egress, now);
    let facts = LeaseFacts {
        row,
        provider: lease.provider.clone(),
        target: lease.target.clone(),
        ssh: format!("{}@{}:{}", lease.ssh_user, lease.host, lease.ssh_port),
        work_root: lease.work_root.clone(),
        timeouts: format!(
            "ttl {} · idle {}",
            span(lease.ttl_seconds * 1000),
            span(lease.idle_timeout_seconds * 1000)
        ),
        created: rel_iso(Some(&lease.created_at), now),
        live,
    };
    Ok(LeaseView {
        id: lease.id.clone(),
        facts,
        egress,
        runs: runs.iter().map(|r| run_row(r, now)).collect(),
        manage,
    })
}

/// The run page header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RunHead {
    /// Run id.
    pub id: String,
    /// State.
    pub state: String,
    /// Phase or `—`.
    pub phase: String,
    /// Exit code or `—`.
    pub exit: String,
    /// Command line.
    pub command: String,
    /// Lease id (empty when none).
    pub lease_id: String,
    /// Whether the viewer may open the lease page.
    pub lease_link: bool,
    /// Started, relative.
    pub started: String,
    /// Duration or `running for …`.
    pub duration: String,
    /// Whether the run has ended.
    pub ended: bool,
}

/// Load a run the viewer may read (the API's rule), with its header.
pub(crate) async fn run_head(st: &Shared, p: &Principal, id: &str) -> ApiResult<(Run, RunHead)> {
    let (p2, id) = (p.clone(), id.to_owned());
    let (run, lease_link) = st
        .store
        .call(move |c| {
            let Some(run) = store::get_run(c, &id)?.filter(|r| r.readable_by(&p2)) else {
                return Ok(None);
            };
            let link = !run.lease_id.is_empty()
                && store::get_lease(c, &run.lease_id)?.is_some_and(|l| sees_lease(&p2, &l));
            Ok(Some((run, link)))
        })
        .await?
        .ok_or_else(ApiError::not_found)?;
    let now = st.clock.now_ms();
    let ended = run.ended_at.is_some();
    let started = parse_iso(&run.started_at).unwrap_or(now);
    let head = RunHead {
        id: run.id.clone(),
        state: run.state.clone(),
        phase: run.phase.clone().unwrap_or_else(|| "—".into()),
        exit: run.exit_code.map_or_else(|| "—".into(), |c| c.to_string()),
        command: command_line(&run.command),
        lease_id: run.lease_id.clone(),
        lease_link,
        started: rel_iso(Some(&run.started_at), now),
        duration: match run.duration_ms {
            Some(d) => span(d),
            None if ended => "—".into(),
            None => format!("running for {}", span(now - started)),
        },
        ended,
    };
    Ok((run, head))
}

/// A run event as the page shows it: output text on its stream, or a line.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct EventView {
    /// Sequence number.
    pub seq: i64,
    /// Event type.
    pub kind: String,
    /// `stdout`, `stderr`, or empty for a non-output event.
    pub stream: String,
    /// Output text, or the event's line.
    pub text: String,
}

/// An event's stream, as the daemon reads it: `stream`, else a `type` naming one.
pub(crate) fn event_view(e: &RunEvent) -> EventView {
    let stream = match e.stream.as_deref().unwrap_or(e.kind.as_str()) {
        s @ ("stdout" | "stderr") => s.to_owned(),
        _ => String::new(),
    };
    let text = if stream.is_empty() {
        let mut line = format!("{:>4} {}", e.seq, e.kind);
        if let Some(phase) = &e.phase {
            line.push_str(&format!(" phase={phase}"));
        }
        if let Some(code) = e.exit_code {
            line.push_str(&format!(" exit={code}"));
        }
        if let Some(m) = e.message.as_deref().or(e.data.as_deref()) {
            line.push(' ');
            line.push_str(m.trim());
        }
        line
    } else {
        e.data
            .clone()
            .or_else(|| e.message.clone())
            .unwrap_or_default()
    };
    EventView {
        seq: e.seq,
        kind: e.kind.clone(),
        stream,
        text,
    }
}

/// A page of a run's events after `after` (bounded in count and bytes) and
/// the last seq read.
pub(crate) async fn events_page(
    st: &Shared,
    run_id: &str,
    after: i64,
    limit: i64,
    bytes: usize,
) -> ApiResult<(Vec<EventView>, i64, bool)> {
    let rid = run_id.to_owned();
    let page = st
        .store
        .call(move |c| store::page_after(c, &rid, after, limit, bytes))
        .await?;
    let mut out = Vec::with_capacity(page.records.len());
    for rec in &page.records {
        let e: RunEvent = serde_json::from_str(rec).map_err(anyhow::Error::from)?;
        out.push(event_view(&e));
    }
    let full = page.cut || out.len() as i64 == limit;
    Ok((out, page.last_seq.unwrap_or(after), full))
}

// === templates ===

/// The header every page shares.
pub(crate) struct Chrome {
    /// Who is signed in (empty on the sign-in page).
    pub viewer: String,
    /// The CSRF token of the sign-out form.
    pub csrf: String,
}

/// `GET /portal`.
#[derive(Template)]
#[template(path = "portal/index.html")]
pub(crate) struct IndexPage {
    /// Header.
    pub chrome: Chrome,
    /// Lease rows.
    pub rows: Vec<LeaseRow>,
    /// Whether the viewer is an admin (the owner column).
    pub admin: bool,
}

/// The index's table body, for live updates.
#[derive(Template)]
#[template(path = "portal/lease_rows.html")]
pub(crate) struct LeaseRows<'a> {
    /// Rows.
    pub rows: &'a [LeaseRow],
    /// Owner column.
    pub admin: bool,
}

/// `GET /portal/leases/{id}`.
#[derive(Template)]
#[template(path = "portal/lease.html")]
pub(crate) struct LeasePage {
    /// Header.
    pub chrome: Chrome,
    /// The lease.
    pub v: LeaseView,
}

/// The lease facts panel alone.
#[derive(Template)]
#[template(path = "portal/lease_facts.html")]
pub(crate) struct FactsFrag<'a> {
    /// The lease.
    pub v: &'a LeaseView,
}

/// The egress panel alone.
#[derive(Template)]
#[template(path = "portal/egress.html")]
pub(crate) struct EgressFrag<'a> {
    /// The lease.
    pub v: &'a LeaseView,
}

/// The runs table alone.
#[derive(Template)]
#[template(path = "portal/lease_runs.html")]
pub(crate) struct RunsFrag<'a> {
    /// The lease.
    pub v: &'a LeaseView,
}

/// `GET /portal/runs/{id}`.
#[derive(Template)]
#[template(path = "portal/run.html")]
pub(crate) struct RunPage {
    /// Header.
    pub chrome: Chrome,
    /// Run header.
    pub head: RunHead,
    /// Output on stdout, concatenated.
    pub stdout: String,
    /// Output on stderr, concatenated.
    pub stderr: String,
    /// Non-output event lines.
    pub lines: Vec<String>,
    /// Seq of the last event rendered (the live stream continues after it).
    pub after: i64,
}

/// The run header alone.
#[derive(Template)]
#[template(path = "portal/run_head.html")]
pub(crate) struct RunHeadFrag<'a> {
    /// Run header.
    pub head: &'a RunHead,
}

/// `GET /portal/login`.
#[derive(Template)]
#[template(path = "portal/login.html")]
pub(crate) struct LoginPage {
    /// Header (no viewer).
    pub chrome: Chrome,
    /// The form's CSRF token.
    pub form_token: String,
    /// Why the last attempt failed, if it did.
    pub error: String,
}

/// A short page for refusals (cross-site form, not found).
#[derive(Template)]
#[template(path = "portal/message.html")]
pub(crate) struct MessagePage {
    /// Header.
    pub chrome: Chrome,
    /// Title.
    pub title: String,
    /// One sentence with a way out.
    pub text: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(allow: &[&str], profile: Option<&str>) -> SessionRecord {
        SessionRecord {
            lease_id: "cbx_000000000001".into(),
            session_id: "egress_secret_session".into(),
            profile: profile.map(Into::into),
            allow: allow.iter().map(|s| s.to_string()).collect(),
            created_at: "2026-12-01T00:00:00.000Z".into(),
            updated_at: "2026-12-01T00:00:00.000Z".into(),
        }
    }

    #[test]
    fn egress_wording_follows_the_reference() {
        let now = parse_iso("2026-12-01T00:01:00.000Z").unwrap();
        let r = rec(&["a.com", "b.com", "c.com", "d.com", "e.com"], None);
        let v = EgressView::new(Some(&r), (None, None), true, true, now);
        assert_eq!(
            (v.status.as_str(), v.badge.as_str()),
            ("waiting for host", "waiting")
        );
        assert_eq!(v.profile, "custom");
        assert_eq!(v.allow_short, "a.com, b.com, c.com +2");
        let v = EgressView::new(Some(&r), (Some(now), None), true, true, now);
        assert_eq!(
            (v.status.as_str(), v.badge.as_str()),
            ("host ready", "waiting")
        );
        // A client alone still waits for the host.
        let v = EgressView::new(Some(&r), (None, Some(now)), true, true, now);
        assert_eq!(v.status, "waiting for host");
        let v = EgressView::new(Some(&r), (Some(now - 5000), Some(now)), true, true, now);
        assert_eq!(
            (v.status.as_str(), v.badge.as_str()),
            ("client active", "connected")
        );
        assert_eq!(v.host, "connected 5s ago");
        // Non-managers get the coarse view: active or not, nothing else.
        let r = rec(&["a.com"], Some("discord"));
        let v = EgressView::new(Some(&r), (Some(now), None), false, true, now);
        assert_eq!(
            (v.status.as_str(), v.badge.as_str(), v.full),
            ("active", "active", false)
        );
        assert!(v.profile.is_empty() && v.allow.is_empty() && v.host.is_empty());
        let v = EgressView::new(None, (None, None), false, true, now);
        assert_eq!(
            (v.status.as_str(), v.badge.as_str()),
            ("unavailable", "off")
        );
        let v = EgressView::new(None, (None, None), true, true, now);
        assert_eq!((v.status.as_str(), v.badge.as_str()), ("no session", "off"));
    }

    #[test]
    fn spans_and_commands() {
        assert_eq!(span(3_723_000), "1h 02m");
        assert_eq!(span(245_000), "4m 05s");
        assert_eq!(span(-5), "0s");
        let cmd = ["sh", "-c", "echo 'hi' there"].map(String::from);
        assert_eq!(command_line(&cmd), r"sh -c 'echo '\''hi'\'' there'");
    }

    #[test]
    fn output_events_go_to_their_stream() {
        let e = RunEvent {
            seq: 3,
            kind: "stdout".into(),
            data: Some("hello\n".into()),
            ..Default::default()
        };
        assert_eq!(event_view(&e).stream, "stdout");
        let e = RunEvent {
            seq: 4,
            kind: "output".into(),
            stream: Some("stderr".into()),
            data: Some("oops\n".into()),
            ..Default::default()
        };
        assert_eq!(
            (event_view(&e).stream.as_str(), event_view(&e).text.as_str()),
            ("stderr", "oops\n")
        );
        let e = RunEvent {
            seq: 5,
            kind: "command.finished".into(),
            phase: Some("succeeded".into()),
            exit_code: Some(0),
            ..Default::default()
        };
        assert_eq!(
            event_view(&e).text,
            "   5 command.finished phase=succeeded exit=0"
        );
    }
}
