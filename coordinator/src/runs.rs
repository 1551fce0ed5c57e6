//! Run routes: create, read, events (append and page), finish with logs, read logs.

use axum::Extension;
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;

use crate::app::Shared;
use crate::auth::Principal;
use crate::body::{Body, Field, LARGE, LogText, OptField, SMALL, StrList, raw_value};
use crate::clock::{iso, parse_iso};
use crate::error::{ApiError, ApiResult};
use crate::ids::{is_cbx_lease_id, run_id};
use crate::model::{OwnerOrg, Run, RunEvent};
use crate::store;

/// Message and data fields are cut to 16 KiB of UTF-8.
const TEXT_CAP: usize = 16 * 1024;
/// Short fields (type, phase, slug, class, serverType) are cut to 128 bytes.
const SHORT_CAP: usize = 128;
/// HTTP page size default and maximum.
pub(crate) const HTTP_PAGE_MAX: i64 = 500;
/// Logs are stored in 64 KiB chunks up to 8 MiB.
const LOG_CHUNK: usize = 64 * 1024;
const LOG_CAP: usize = 8 * 1024 * 1024;
/// A run's `command`: at most 1024 arguments and 64 KiB in all (refused beyond).
const COMMAND_ITEMS: usize = 1024;
const COMMAND_BYTES: usize = 64 * 1024;
/// `results` of a finish, as JSON text (refused beyond; the reference has no bound).
pub(crate) const RESULTS_CAP: usize = 256 * 1024;
/// `telemetry` of a finish, as JSON text (refused beyond).
pub(crate) const TELEMETRY_CAP: usize = 16 * 1024;
const PROVIDERS: &[&str] = &["aws", "hetzner", "azure", "gcp", "daytona"];

/// Cut `s` to at most `max` bytes without splitting a UTF-8 character.
pub(crate) fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A non-empty string field cut to `cap` bytes (UTF-8 safe), as the reference bounds run fields.
fn text(f: &Option<Field<'_>>, cap: usize) -> Option<String> {
    f.str()
        .filter(|s| !s.is_empty())
        .map(|s| truncate_utf8(s, cap).to_owned())
}

/// A finite number, truncated toward zero.
fn int(f: &Option<Field<'_>>) -> Option<i64> {
    f.num().map(|f| f.trunc() as i64)
}

/// `POST /v1/runs` body.
#[derive(Deserialize, Default)]
struct CreateBody<'a> {
    #[serde(borrow, rename = "leaseID")]
    lease_id: Option<Field<'a>>,
    #[serde(borrow)]
    slug: Option<Field<'a>>,
    #[serde(borrow)]
    provider: Option<Field<'a>>,
    #[serde(borrow)]
    target: Option<Field<'a>>,
    #[serde(borrow, rename = "windowsMode")]
    windows_mode: Option<Field<'a>>,
    #[serde(borrow)]
    class: Option<Field<'a>>,
    #[serde(borrow, rename = "serverType")]
    server_type: Option<Field<'a>>,
    #[serde(borrow)]
    command: Option<StrList<'a, COMMAND_ITEMS, COMMAND_BYTES>>,
    #[serde(borrow)]
    label: Option<Field<'a>>,
}

/// `POST /v1/runs/{id}/events` body.
#[derive(Deserialize, Default)]
struct EventBody<'a> {
    #[serde(borrow, rename = "type")]
    kind: Option<Field<'a>>,
    #[serde(borrow)]
    phase: Option<Field<'a>>,
    #[serde(borrow)]
    stream: Option<Field<'a>>,
    #[serde(borrow)]
    message: Option<Field<'a>>,
    #[serde(borrow)]
    data: Option<Field<'a>>,
    #[serde(borrow, rename = "leaseID")]
    lease_id: Option<Field<'a>>,
    #[serde(borrow)]
    slug: Option<Field<'a>>,
    #[serde(borrow)]
    provider: Option<Field<'a>>,
    #[serde(borrow)]
    target: Option<Field<'a>>,
    #[serde(borrow, rename = "windowsMode")]
    windows_mode: Option<Field<'a>>,
    #[serde(borrow)]
    class: Option<Field<'a>>,
    #[serde(borrow, rename = "serverType")]
    server_type: Option<Field<'a>>,
    #[serde(borrow, rename = "exitCode")]
    exit_code: Option<Field<'a>>,
}

/// `POST /v1/runs/{id}/finish` body.
#[derive(Deserialize, Default)]
struct FinishBody<'a> {
    #[serde(borrow, rename = "exitCode")]
    exit_code: Option<Field<'a>>,
    #[serde(borrow, rename = "syncMs")]
    sync_ms: Option<Field<'a>>,
    #[serde(borrow, rename = "commandMs")]
    command_ms: Option<Field<'a>>,
    log: Option<LogText<LOG_CAP>>,
    #[serde(rename = "logChunks")]
    log_chunks: Option<LogText<LOG_CAP>>,
    #[serde(borrow, rename = "logTruncated")]
    log_truncated: Option<Field<'a>>,
    #[serde(borrow)]
    results: Option<&'a RawValue>,
    #[serde(borrow)]
    telemetry: Option<&'a RawValue>,
    #[serde(borrow, rename = "blockedStage")]
    blocked_stage: Option<Field<'a>>,
    #[serde(borrow, rename = "retryLikely")]
    retry_likely: Option<Field<'a>>,
}

/// A `cbx_` lease id named by a run or event must be one the caller may
/// manage (admin, or the lease's owner and org), else `404`, like every
/// other lease route: a run can never borrow another owner's lease, and its
/// answer never names another owner. Ids of leases this coordinator has
/// never seen are kept as given (nothing to attribute or disclose).
async fn check_lease_access(
    st: &Shared,
    p: &Principal,
    lease_id: &str,
) -> ApiResult<Option<crate::model::Lease>> {
    let lid = lease_id.to_owned();
    let lease = st.store.call(move |c| store::get_lease(c, &lid)).await?;
    match lease {
        Some(l) if p.admin || p.owns(&l.owner, &l.org) => Ok(Some(l)),
        Some(_) => Err(ApiError::not_found()),
        None => Ok(None),
    }
}

/// Load a run the caller may read, else 404.
async fn readable_run(st: &Shared, p: &Principal, id: String) -> ApiResult<Run> {
    let run = st.store.call(move |c| store::get_run(c, &id)).await?;
    run.filter(|r| r.readable_by(p))
        .ok_or_else(ApiError::not_found)
}

/// `POST /v1/runs` → `201 {"run":…}`; records a `run.started` event.
pub(crate) async fn create(
    State(st): State<Shared>,
    Extension(p): Extension<Principal>,
    body: Body<SMALL>,
) -> ApiResult<impl IntoResponse> {
    let b: CreateBody<'_> = body.json()?;
    let now = st.clock.now_ms();
    // Runs only accept the minted `cbx_` lease id form (§8); anything else is dropped.
    let lease_id = text(&b.lease_id, SHORT_CAP).filter(|id| is_cbx_lease_id(id));
    let command = b.command.unwrap_or_default();
    if command.overflow > 0 {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("command is limited to {COMMAND_ITEMS} arguments and {COMMAND_BYTES} bytes"),
        ));
    }
    let command: Vec<String> = command.items.into_iter().map(|s| s.into_owned()).collect();
    let mut run = Run {
        id: run_id(),
        lease_id: lease_id.clone().unwrap_or_default(),
        slug: text(&b.slug, SHORT_CAP),
        owner: p.owner.clone(),
        org: p.org.clone(),
        lease_owners: Vec::new(),
        provider: text(&b.provider, SHORT_CAP).unwrap_or_default(),
        target: text(&b.target, SHORT_CAP)
            .filter(|t| matches!(t.as_str(), "linux" | "macos" | "windows")),
        windows_mode: text(&b.windows_mode, SHORT_CAP)
            .filter(|t| matches!(t.as_str(), "normal" | "wsl2")),
        class: text(&b.class, SHORT_CAP).unwrap_or_default(),
        server_type: text(&b.server_type, SHORT_CAP).unwrap_or_default(),
        command,
        label: text(&b.label, SHORT_CAP),
        state: "running".into(),
        phase: Some("starting".into()),
        exit_code: None,
        sync_ms: None,
        command_ms: None,
        duration_ms: None,
        log_bytes: 0,
        log_truncated: false,
        blocked_stage: None,
        retry_likely: None,
        results: None,
        telemetry: None,
        started_at: iso(now),
        last_event_at: None,
        event_count: Some(0),
        ended_at: None,
    };
    if let Some(lid) = lease_id {
        // Owners of the attributed lease may read the run (only an admin can
        // attribute a run to a lease of another owner).
        if let Some(l) = check_lease_access(&st, &p, &lid).await? {
            if run.slug.is_none() {
                run.slug = l.slug.clone();
            }
            if !(l.owner == run.owner && l.org == run.org) {
                run.lease_owners.push(OwnerOrg {
                    owner: l.owner,
                    org: l.org,
                });
            }
        }
    }
    let run_id = run.id.clone();
    st.store.call(move |c| store::put_run(c, &run)).await?;
    let started = RunEvent {
        kind: "run.started".into(),
        phase: Some("starting".into()),
        ..Default::default()
    };
    append_event(&st, &run_id, started).await?;
    let run = st
        .store
        .call(move |c| store::get_run(c, &run_id))
        .await?
        .ok_or_else(ApiError::not_found)?;
    Ok((StatusCode::CREATED, Json(json!({ "run": run }))))
}

/// `GET /v1/runs/{id}` → `{"run":…}`.
pub(crate) async fn get_one(
    State(st): State<Shared>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let run = readable_run(&st, &p, id).await?;
    Ok(Json(json!({ "run": run })))
}

/// Parse `after` as the reference does: a non-negative number, truncated, else 0.
pub(crate) fn parse_after(v: Option<&str>) -> i64 {
    v.and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|f| f.is_finite() && *f >= 0.0)
        .map_or(0, |f| f.trunc() as i64)
}

/// Parse `limit`: missing, ≤0 or NaN → the maximum; else min(trunc, max).
pub(crate) fn parse_limit(v: Option<&str>, max: i64) -> i64 {
    match v.and_then(|s| s.trim().parse::<f64>().ok()) {
        Some(f) if f.is_finite() && f >= 1.0 => (f.trunc() as i64).min(max),
        Some(f) if f.is_infinite() && f > 0.0 => max,
        _ => max,
    }
}

/// `GET /v1/runs/{id}/events?after=&limit=` → `{"events":[…]}`.
pub(crate) async fn list_events(
    State(st): State<Shared>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> ApiResult<impl IntoResponse> {
    let run = readable_run(&st, &p, id).await?;
    let after = parse_after(q.get("after").map(String::as_str));
    let limit = parse_limit(q.get("limit").map(String::as_str), HTTP_PAGE_MAX);
    let events = st
        .store
        .call(move |c| store::events_after(c, &run.id, after, limit))
        .await?;
    Ok(Json(json!({ "events": events })))
}

/// Bound an event request as the reference does (§1.9): strings are cut
/// (UTF-8 safe) to 128 bytes, or 16 KiB for `message` and `data`.
fn event_from_body(b: &EventBody<'_>) -> RunEvent {
    RunEvent {
        kind: text(&b.kind, SHORT_CAP).unwrap_or_else(|| "event".into()),
        phase: text(&b.phase, SHORT_CAP),
        stream: text(&b.stream, SHORT_CAP).filter(|s| matches!(s.as_str(), "stdout" | "stderr")),
        message: text(&b.message, TEXT_CAP),
        data: text(&b.data, TEXT_CAP),
        lease_id: text(&b.lease_id, SHORT_CAP).filter(|id| is_cbx_lease_id(id)),
        slug: text(&b.slug, SHORT_CAP),
        provider: text(&b.provider, SHORT_CAP).filter(|p| PROVIDERS.contains(&p.as_str())),
        target: text(&b.target, SHORT_CAP)
            .filter(|t| matches!(t.as_str(), "linux" | "macos" | "windows")),
        windows_mode: text(&b.windows_mode, SHORT_CAP)
            .filter(|t| matches!(t.as_str(), "normal" | "wsl2")),
        class: text(&b.class, SHORT_CAP),
        server_type: text(&b.server_type, SHORT_CAP),
        exit_code: int(&b.exit_code),
        ..Default::default()
    }
}

/// `POST /v1/runs/{id}/events` → `201 {"event":…}` (actor or admin only).
pub(crate) async fn post_event(
    State(st): State<Shared>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    body: Body<SMALL>,
) -> ApiResult<impl IntoResponse> {
    let b: EventBody<'_> = body.json()?;
    let run = readable_run(&st, &p, id).await?;
    if !run.writable_by(&p) {
        return Err(ApiError::not_found());
    }
    let ev = event_from_body(&b);
    drop(b);
    drop(body);
    // Any lease an event names (its run's or another) must be one the caller manages.
    if let Some(lid) = &ev.lease_id
        && check_lease_access(&st, &p, lid).await?.is_none()
        && *lid != run.lease_id
    {
        return Err(ApiError::not_found());
    }
    let ev = append_event(&st, &run.id, ev).await?;
    Ok((StatusCode::CREATED, Json(json!({ "event": ev }))))
}

/// Append an event to a run and push it to subscribed control sockets.
///
/// The append and the push happen under the run's lock, the same lock a
/// `subscribe_run` page read takes, so a subscriber sees every event exactly
/// once whether it arrives in a page or as a push (see `control.rs`).
pub(crate) async fn append_event(
    st: &Shared,
    run_id: &str,
    mut ev: RunEvent,
) -> ApiResult<RunEvent> {
    let lock = st.hub.run_lock(run_id);
    let _guard = lock.lock().await;
    let now = st.clock.now_ms();
    let id = run_id.to_owned();
    let ev = st
        .store
        .call(move |c| {
            let tx = c.transaction()?;
            let Some(mut run) = store::get_run(&tx, &id)? else {
                return Ok(None);
            };
            ev.run_id = id.clone();
            ev.seq = store::next_seq(&tx, &id)?;
            ev.created_at = iso(now);
            if ev.phase.is_none() && ev.kind == "run.failed" {
                ev.phase = Some("failed".into());
            }
            store::put_event(&tx, &ev)?;
            run.event_count = Some(ev.seq);
            run.last_event_at = Some(ev.created_at.clone());
            if let Some(phase) = &ev.phase {
                run.phase = Some(phase.clone());
            }
            if ev.kind == "run.failed" && run.state == "running" {
                run.state = "failed".into();
            }
            store::put_run(&tx, &run)?;
            tx.commit()?;
            Ok(Some((ev, run.lease_id)))
        })
        .await?
        .ok_or_else(ApiError::not_found)?;
    let (ev, lease_id) = ev;
    st.hub.push_event(&ev);
    st.changed(Some(&lease_id), Some(&ev.run_id));
    Ok(ev)
}

/// `POST /v1/runs/{id}/finish` → `{"run":…}`; stores the log (64 KiB chunks,
/// 8 MiB cap) and records `command.finished`.
pub(crate) async fn finish(
    State(st): State<Shared>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    body: Body<LARGE>,
) -> ApiResult<impl IntoResponse> {
    let mut b: FinishBody<'_> = body.json()?;
    let results = raw_value("results", b.results, RESULTS_CAP)?;
    let telemetry = raw_value("telemetry", b.telemetry, TELEMETRY_CAP)?;
    let mut run = readable_run(&st, &p, id).await?;
    if !run.writable_by(&p) {
        return Err(ApiError::not_found());
    }
    if run.ended_at.is_some() {
        return Err(ApiError::conflict("run_finished", "run already finished"));
    }
    let now = st.clock.now_ms();
    let exit_code = int(&b.exit_code).unwrap_or(0);
    // `logChunks` wins when it holds any string, else `log`; either is kept
    // up to 8 MiB and the rest dropped with `logTruncated`, as the reference.
    let log = match (b.log_chunks.take(), b.log.take()) {
        (Some(chunks), _) if chunks.present => chunks,
        (_, log) => log.unwrap_or_default(),
    };
    let truncated = b.log_truncated.bool().unwrap_or(false) || log.truncated;
    let log = log.text;
    let state = if exit_code == 0 && run.state != "failed" {
        "succeeded"
    } else {
        "failed"
    };
    run.state = state.into();
    run.phase = Some(state.into());
    run.exit_code = Some(exit_code);
    run.sync_ms = int(&b.sync_ms);
    run.command_ms = int(&b.command_ms);
    run.duration_ms = Some(now - parse_iso(&run.started_at).unwrap_or(now));
    run.log_bytes = log.len() as i64;
    run.log_truncated = truncated;
    run.results = results;
    run.telemetry = telemetry;
    run.blocked_stage = text(&b.blocked_stage, SHORT_CAP);
    run.retry_likely = b.retry_likely.bool();
    run.ended_at = Some(iso(now));
    drop(b);
    // The request body (and its share of the in-flight budget) is no longer needed.
    drop(body);
    let run_id = run.id.clone();
    st.store
        .call(move |c| {
            let tx = c.transaction()?;
            let mut chunks = Vec::new();
            let mut rest = log.as_str();
            while !rest.is_empty() {
                let head = truncate_utf8(rest, LOG_CHUNK);
                // A chunk boundary inside a 4-byte character could leave an empty head.
                let head = if head.is_empty() {
                    &rest[..rest.chars().next().map_or(0, char::len_utf8)]
                } else {
                    head
                };
                chunks.push(head);
                rest = &rest[head.len()..];
            }
            store::put_log(&tx, &run.id, &chunks)?;
            // Keep the event counters that appends maintain.
            if let Some(cur) = store::get_run(&tx, &run.id)? {
                run.event_count = cur.event_count;
                run.last_event_at = cur.last_event_at;
            }
            store::put_run(&tx, &run)?;
            tx.commit()?;
            Ok(())
        })
        .await?;
    let done = RunEvent {
        kind: "command.finished".into(),
        phase: Some(state.into()),
        exit_code: Some(exit_code),
        ..Default::default()
    };
    append_event(&st, &run_id, done).await?;
    let run = st
        .store
        .call(move |c| store::get_run(c, &run_id))
        .await?
        .ok_or_else(ApiError::not_found)?;
    Ok(Json(json!({ "run": run })))
}

/// `GET /v1/runs/{id}/logs` → the stored log as `text/plain`.
pub(crate) async fn logs(
    State(st): State<Shared>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let run = readable_run(&st, &p, id).await?;
    let log = st.store.call(move |c| store::get_log(c, &run.id)).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], log))
}
