//! Server-sent event streams that keep portal pages current.
//!
//! A stream wakes on the coordinator's change notifications (lease writes,
//! heartbeats, run events, egress tickets and bridge sockets) and on a slow
//! tick (relative times), re-reads the store with the viewer's scoping, and
//! sends a `replace` event for each page fragment whose HTML changed. Run
//! pages also get `output` events (one per run event, `id` = its seq, so a
//! reconnecting browser resumes with `Last-Event-ID`) and an `end` event.
//!
//! Bounds: at most [`super::LIVE_STREAMS`] streams at once (503 beyond);
//! each ends at [`STREAM_LIFETIME`] or when its session expires, whichever
//! is first (the browser reconnects, with its cookie checked again); a
//! stream holds at most one page of events, read only when the previous
//! one has been written out.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::time::Duration;

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream};
use serde_json::json;
use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::broadcast::{Receiver, error::RecvError};
use tokio::time::Instant;

use super::session::Viewer;
use super::view;
use crate::app::{Change, Shared};

/// A stream ends after this long; the browser reconnects.
pub(crate) const STREAM_LIFETIME: Duration = Duration::from_secs(3600);
/// Pages re-render at least this often (relative times move).
const TICK: Duration = Duration::from_secs(10);
/// Changes arriving within this long of each other are rendered once.
const COALESCE: Duration = Duration::from_millis(100);
/// Events per `output` page, and bytes of records per page.
const PAGE_EVENTS: i64 = 200;
const PAGE_BYTES: usize = 256 * 1024;
/// After a run ended, how long to wait for its final event before ending the stream.
const END_GRACE: Duration = Duration::from_secs(2);

/// Waits for the next reason to re-render.
struct Feed {
    st: Shared,
    /// The session's nonce: a stream ends at the first wake after sign-out.
    nonce: String,
    rx: Receiver<Change>,
    stopping: tokio::sync::watch::Receiver<bool>,
    deadline: Instant,
    tick: tokio::time::Interval,
    _permit: OwnedSemaphorePermit,
}

enum Wake {
    /// Something relevant may have changed.
    Render,
    /// The stream's time is up.
    End,
}

impl Feed {
    /// `None` when [`super::LIVE_STREAMS`] streams are already open.
    fn open(st: &Shared, v: &Viewer) -> Option<Self> {
        let permit = st.portal.streams.clone().try_acquire_owned().ok()?;
        let left = (v.claims.exp - st.clock.now_ms()).max(0) as u64;
        let life = STREAM_LIFETIME.min(Duration::from_millis(left));
        Some(Self {
            st: st.clone(),
            nonce: v.claims.n.clone(),
            rx: st.changes.subscribe(),
            stopping: st.portal.stopping.subscribe(),
            deadline: Instant::now() + life,
            tick: tokio::time::interval_at(Instant::now() + TICK, TICK),
            _permit: permit,
        })
    }

    /// Wait for a change `wanted` accepts, a tick, or the deadline (or
    /// `limit`, if sooner); a session signed out meanwhile ends the stream.
    async fn next(
        &mut self,
        wanted: &(dyn Fn(&Change) -> bool + Send + Sync),
        limit: Option<Duration>,
    ) -> Wake {
        let wake = self.wait(wanted, limit).await;
        if super::session::is_revoked(&self.st, &self.nonce).await {
            Wake::End
        } else {
            wake
        }
    }

    async fn wait(
        &mut self,
        wanted: &(dyn Fn(&Change) -> bool + Send + Sync),
        limit: Option<Duration>,
    ) -> Wake {
        let limit = limit.map_or(self.deadline, |l| (Instant::now() + l).min(self.deadline));
        if *self.stopping.borrow() {
            return Wake::End;
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(limit) => {
                    return if limit >= self.deadline { Wake::End } else { Wake::Render };
                }
                _ = self.tick.tick() => return Wake::Render,
                // Only ever set to true: any change is the shutdown.
                _ = self.stopping.changed() => return Wake::End,
                r = self.rx.recv() => match r {
                    Ok(c) if wanted(&c) => {
                        tokio::time::sleep(COALESCE).await;
                        while self.rx.try_recv().is_ok() {}
                        return Wake::Render;
                    }
                    Ok(_) => {}
                    // Fell behind: re-read everything.
                    Err(RecvError::Lagged(_)) => return Wake::Render,
                    Err(RecvError::Closed) => return Wake::End,
                },
            }
        }
    }
}

fn busy() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "too many live portal pages are open; reload later",
    )
        .into_response()
}

fn replace(id: &str, html: String) -> Event {
    Event::default()
        .event("replace")
        .data(json!({"id": id, "html": html}).to_string())
}

fn sse(s: impl Stream<Item = Result<Event, Infallible>> + Send + 'static) -> Response {
    Sse::new(s).keep_alive(KeepAlive::default()).into_response()
}

type Fragments = Vec<(&'static str, String)>;
type Wanted = Box<dyn Fn(&Change) -> bool + Send + Sync>;

struct FragState<R> {
    feed: Feed,
    wanted: Wanted,
    last: HashMap<&'static str, String>,
    queue: VecDeque<Event>,
    first: bool,
    render: R,
}

/// A stream of `replace` events: `render` yields the page's fragments (or
/// `None` once the viewer may no longer see the page, which ends the stream).
fn fragments<R, Fut>(
    feed: Feed,
    wanted: Wanted,
    render: R,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static
where
    R: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Option<Fragments>> + Send,
{
    let s = FragState {
        feed,
        wanted,
        last: HashMap::new(),
        queue: VecDeque::new(),
        first: true,
        render,
    };
    stream::unfold(s, |mut s| async move {
        loop {
            if let Some(ev) = s.queue.pop_front() {
                return Some((Ok(ev), s));
            }
            // Render at once when the stream opens (a change may have
            // landed between the page and this stream), then on wakes.
            if !s.first && matches!(s.feed.next(&*s.wanted, None).await, Wake::End) {
                return None;
            }
            s.first = false;
            let frags = (s.render)().await?;
            for (id, html) in frags {
                if s.last.get(id) != Some(&html) {
                    s.last.insert(id, html.clone());
                    s.queue.push_back(replace(id, html));
                }
            }
        }
    })
}

fn html(t: &impl Template) -> Option<String> {
    t.render()
        .map_err(|e| tracing::error!(err = %e, "portal template failed"))
        .ok()
}

/// `GET /portal/live`: the index table.
pub(crate) async fn index(State(st): State<Shared>, v: Viewer) -> Response {
    let Some(feed) = Feed::open(&st, &v) else {
        return busy();
    };
    let admin = v.principal.admin;
    let p = v.principal.clone();
    let render = move || {
        let (st, p) = (st.clone(), p.clone());
        async move {
            let rows = view::index_rows(&st, &p).await.ok()?;
            let body = html(&view::LeaseRows { rows: &rows, admin })?;
            Some(vec![("lease-rows", body)])
        }
    };
    sse(fragments(
        feed,
        Box::new(|c: &Change| c.lease.is_some()),
        render,
    ))
}

/// `GET /portal/leases/{id}/live`: the lease facts, egress panel and runs.
pub(crate) async fn lease(State(st): State<Shared>, v: Viewer, Path(id): Path<String>) -> Response {
    if !super::ident_ok(&id) {
        return StatusCode::NOT_FOUND.into_response();
    }
    // Resolve once: changes name leases by id, the URL may use the slug.
    let lease_id = match view::lease_view(&st, &v.principal, &id).await {
        Ok(lv) => lv.id,
        Err(e) => return (e.status, "not found").into_response(),
    };
    let Some(feed) = Feed::open(&st, &v) else {
        return busy();
    };
    let p = v.principal.clone();
    let lid = lease_id.clone();
    let render = move || {
        let (st, p, lid) = (st.clone(), p.clone(), lid.clone());
        async move {
            let lv = view::lease_view(&st, &p, &lid).await.ok()?;
            Some(vec![
                ("lease-facts", html(&view::FactsFrag { v: &lv })?),
                ("egress", html(&view::EgressFrag { v: &lv })?),
                ("lease-runs", html(&view::RunsFrag { v: &lv })?),
            ])
        }
    };
    let wanted: Wanted = Box::new(move |c: &Change| c.lease.as_deref() == Some(lease_id.as_str()));
    sse(fragments(feed, wanted, render))
}

/// `?after=` of a run stream.
#[derive(serde::Deserialize)]
pub(crate) struct After {
    after: Option<i64>,
}

struct RunState {
    feed: Feed,
    st: Shared,
    p: crate::auth::Principal,
    run_id: String,
    cursor: i64,
    last_head: String,
    queue: VecDeque<Event>,
    /// Whether the backlog may hold more than the last page read.
    behind: bool,
    /// Whether the run's final `command.finished` event has been sent.
    finished_seen: bool,
    /// When the run was first seen ended without its final event.
    ended_at: Option<Instant>,
    done: bool,
}

/// `GET /portal/runs/{id}/live`: the run header and its events from
/// `Last-Event-ID` (or `?after=`) on, ending once the run has.
pub(crate) async fn run(
    State(st): State<Shared>,
    v: Viewer,
    Path(id): Path<String>,
    Query(q): Query<After>,
    headers: HeaderMap,
) -> Response {
    if !super::ident_ok(&id) {
        return StatusCode::NOT_FOUND.into_response();
    }
    let run_id = match view::run_head(&st, &v.principal, &id).await {
        Ok((run, _)) => run.id,
        Err(e) => return (e.status, "not found").into_response(),
    };
    let after = headers
        .get("last-event-id")
        .and_then(|h| h.to_str().ok())
        .and_then(|s| s.trim().parse::<i64>().ok())
        .or(q.after)
        .unwrap_or(0)
        .max(0);
    let Some(feed) = Feed::open(&st, &v) else {
        return busy();
    };
    let s = RunState {
        feed,
        st,
        p: v.principal.clone(),
        run_id,
        cursor: after,
        last_head: String::new(),
        queue: VecDeque::new(),
        behind: true,
        finished_seen: false,
        ended_at: None,
        done: false,
    };
    sse(stream::unfold(s, |mut s| async move {
        loop {
            if let Some(ev) = s.queue.pop_front() {
                return Some((Ok(ev), s));
            }
            if s.done {
                return None;
            }
            if !s.behind {
                let rid = s.run_id.clone();
                let wanted = move |c: &Change| c.run.as_deref() == Some(rid.as_str());
                let limit = s.ended_at.map(|_| END_GRACE);
                if matches!(s.feed.next(&wanted, limit).await, Wake::End) {
                    return None;
                }
            }
            // The header first: if it says "ended", every event but the
            // final one is already stored and the page below reads it.
            let (_, head) = view::run_head(&s.st, &s.p, &s.run_id).await.ok()?;
            let (events, cursor, full) =
                view::events_page(&s.st, &s.run_id, s.cursor, PAGE_EVENTS, PAGE_BYTES)
                    .await
                    .ok()?;
            s.cursor = cursor;
            s.behind = full;
            for e in events {
                s.finished_seen |= e.kind == "command.finished";
                let ev = Event::default()
                    .event("output")
                    .id(e.seq.to_string())
                    .data(serde_json::to_string(&e).unwrap_or_default());
                s.queue.push_back(ev);
            }
            if let Some(h) = html(&view::RunHeadFrag { head: &head })
                && h != s.last_head
            {
                s.last_head = h.clone();
                s.queue.push_back(replace("run-head", h));
            }
            if head.ended && !s.behind {
                let grace_over = s.ended_at.is_some_and(|t| t.elapsed() >= END_GRACE);
                if s.finished_seen || grace_over {
                    s.queue.push_back(Event::default().event("end").data("{}"));
                    s.done = true;
                } else if s.ended_at.is_none() {
                    s.ended_at = Some(Instant::now());
                }
            }
        }
    }))
}
