//! The control WebSocket `/v1/control` (§2): hello, subscribe_run, ack, heartbeat,
//! ping, and live pushes of run events to subscribed sockets.
//!
//! Unlike the reference, a push never skips ahead of a backlog page: a socket
//! is pushed event `n` only when its cursor is exactly `n - 1`, and page reads
//! and appends for a run are serialised by that run's lock. A subscriber that
//! is still paging gets the rest from its next page, so it sees every event
//! exactly once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Extension;
use axum::extract::State;
use axum::extract::ws::{
    Message, WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection,
};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::app::Shared;
use crate::auth::Principal;
use crate::body::{Field, OptField, parse_object};
use crate::error::ApiError;
use crate::leases::TouchBody;
use crate::model::RunEvent;
use crate::store;
use crate::ws::{SocketHandle, closed, drain, spawn_writer};

/// Client frames (subscribe, ack, heartbeat with telemetry, ping) are small;
/// a larger one is closed `1009`. (Outgoing pages are bounded separately, by
/// [`crate::Limits::page_bytes`].)
pub(crate) const MAX_MESSAGE: usize = 1024 * 1024;
/// Room reserved for a page's envelope (`type`, `runID`, `nextSeq`).
const ENVELOPE: usize = 1024;
/// Default and maximum `subscribe_run` page sizes.
const PAGE_DEFAULT: i64 = 100;
const PAGE_MAX: i64 = 500;

/// Registry of live control sockets and their run cursors.
#[derive(Default)]
pub(crate) struct Hub {
    inner: Mutex<HubInner>,
    run_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    next_id: AtomicU64,
}

#[derive(Default)]
struct HubInner {
    clients: HashMap<u64, SocketHandle>,
    /// run id → (socket id → highest seq delivered to that socket).
    subs: HashMap<String, HashMap<u64, i64>>,
}

impl Hub {
    /// The lock that serialises appends and page reads of one run.
    pub(crate) fn run_lock(&self, run_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.run_locks.lock().unwrap();
        // Forget locks nobody holds once the map grows, so finished runs do
        // not accumulate; a fresh lock is equivalent to an idle one.
        if locks.len() > 4096 {
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        locks.entry(run_id.to_owned()).or_default().clone()
    }

    /// Push one freshly appended event to every socket whose cursor is right before it.
    /// Called with the run lock held.
    pub(crate) fn push_event(&self, ev: &RunEvent) {
        let mut inner = self.inner.lock().unwrap();
        let HubInner { clients, subs } = &mut *inner;
        let Some(run_subs) = subs.get_mut(&ev.run_id) else {
            return;
        };
        let mut frame: Option<Message> = None;
        for (id, cursor) in run_subs.iter_mut() {
            if *cursor != ev.seq - 1 {
                continue;
            }
            let Some(client) = clients.get(id) else {
                continue;
            };
            let msg = frame
                .get_or_insert_with(|| {
                    let v = json!({"type": "run_events", "runID": ev.run_id, "events": [ev], "nextSeq": ev.seq});
                    Message::Text(v.to_string().into())
                })
                .clone();
            if client.try_send(msg) {
                *cursor = ev.seq;
            } else {
                // A socket that stopped reading gets an explicit close, never a silent gap.
                client.close(1011, "control send failed");
            }
        }
    }

    fn set_cursor(&self, client: u64, run_id: &str, cursor: i64, only_forward: bool) {
        let mut inner = self.inner.lock().unwrap();
        let slot = inner
            .subs
            .entry(run_id.to_owned())
            .or_default()
            .entry(client)
            .or_insert(cursor);
        *slot = if only_forward {
            (*slot).max(cursor)
        } else {
            cursor
        };
    }

    fn is_subscribed(&self, client: u64, run_id: &str) -> bool {
        self.inner
            .lock()
            .unwrap()
            .subs
            .get(run_id)
            .is_some_and(|m| m.contains_key(&client))
    }

    fn remove(&self, client: u64) {
        let mut inner = self.inner.lock().unwrap();
        inner.clients.remove(&client);
        inner.subs.retain(|_, m| {
            m.remove(&client);
            !m.is_empty()
        });
    }

    /// Close every control socket (shutdown).
    pub(crate) fn close_all(&self, code: u16, reason: &str) {
        for c in self.inner.lock().unwrap().clients.values() {
            c.close(code, reason);
        }
    }

    /// Number of open control sockets.
    pub(crate) fn len(&self) -> usize {
        self.inner.lock().unwrap().clients.len()
    }
}

/// `GET /v1/control`: authenticated upgrade; a plain GET is `426 websocket_required`.
pub(crate) async fn upgrade(
    State(st): State<Shared>,
    Extension(p): Extension<Principal>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    match ws {
        Ok(ws) => ws
            .max_message_size(MAX_MESSAGE)
            .max_frame_size(MAX_MESSAGE)
            .on_upgrade(move |socket| serve_socket(st, p, socket)),
        Err(_) => {
            ApiError::bare(StatusCode::UPGRADE_REQUIRED, "websocket_required").into_response()
        }
    }
}

/// Queue a reply, waiting up to the write timeout for the socket to drain
/// (a client that sends requests but never reads is closed, not buffered for).
async fn send(st: &Shared, handle: &SocketHandle, v: Value) {
    let text = v.to_string();
    let sent = match handle
        .reserve(text.len(), st.cfg.limits.write_timeout)
        .await
    {
        Some(bytes) => handle.send_reserved(Message::Text(text.into()), bytes),
        None => false,
    };
    if !sent {
        handle.close(1011, "control send failed");
    }
}

fn error_frame(code: &str, message: &str) -> Value {
    json!({"type": "error", "code": code, "message": message})
}

async fn serve_socket(st: Shared, p: Principal, socket: WebSocket) {
    let id = st.hub.next_id.fetch_add(1, Ordering::Relaxed);
    let limits = st.cfg.limits.clone();
    let (handle, mut stream, mut writer) =
        spawn_writer(socket, &limits, limits.control_queue_bytes);
    // `hello` goes out first, before any read, as the reference does.
    let hello = json!({"type": "hello", "protocol": 1, "clientID": crate::ids::uuid_v4()});
    handle.try_send(Message::Text(hello.to_string().into()));
    st.hub
        .inner
        .lock()
        .unwrap()
        .clients
        .insert(id, handle.clone());
    let mut close_rx = handle.watch();
    // The writer pings every interval; a socket that sends nothing, not even
    // a pong, for a whole interval is dropped (half-open TCP, vanished laptop).
    let mut liveness = tokio::time::interval_at(
        tokio::time::Instant::now() + limits.ping_every,
        limits.ping_every,
    );
    liveness.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut alive = true;
    let mut writer_done = false;
    loop {
        tokio::select! {
            _ = liveness.tick() => {
                if !alive {
                    break;
                }
                alive = false;
            }
            // The writer ends when the peer stopped reading (write timeout) or
            // the socket broke: the connection is over.
            _ = &mut writer => {
                writer_done = true;
                break;
            }
            msg = stream.next() => {
                alive = true;
                match msg {
                    Some(Ok(Message::Text(text))) => on_text(&st, &p, id, &handle, text.as_str()).await,
                    Some(Ok(Message::Binary(_))) => {
                        send(&st, &handle, error_frame("invalid_message", "expected JSON text")).await
                    }
                    Some(Err(e)) if crate::ws::is_too_big(&e) => {
                        // The library stopped at the frame header; reading on
                        // would buffer the rest. Close 1009 and give the frame
                        // time to go out before the connection drops.
                        handle.close(1009, "message too big");
                        let _ = tokio::time::timeout(crate::ws::CLOSE_GRACE, &mut writer).await;
                        writer_done = writer.is_finished();
                        tokio::time::sleep(crate::ws::CLOSE_GRACE).await;
                        break;
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => {}
                }
            }
            _ = closed(&mut close_rx) => {
                drain(&mut stream).await;
                break;
            }
        }
    }
    // Forget the socket's subscriptions and queue at once; the writer gets a
    // short grace to send a pending close frame and is then aborted, so a
    // dead peer pins nothing.
    st.hub.remove(id);
    handle.stop();
    drop(handle);
    if !writer_done
        && tokio::time::timeout(crate::ws::CLOSE_GRACE * 2, &mut writer)
            .await
            .is_err()
    {
        writer.abort();
    }
}

/// A client frame, parsed without building a JSON tree (see `body`).
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Frame<'a> {
    #[serde(borrow, rename = "type")]
    kind: Option<Field<'a>>,
    #[serde(borrow, rename = "runID")]
    run_id: Option<Field<'a>>,
    #[serde(borrow)]
    after: Option<Field<'a>>,
    #[serde(borrow)]
    limit: Option<Field<'a>>,
    #[serde(borrow)]
    seq: Option<Field<'a>>,
    #[serde(borrow, rename = "leaseID")]
    lease_id: Option<Field<'a>>,
    #[serde(borrow)]
    expected_provider: Option<Field<'a>>,
    #[serde(borrow)]
    idle_timeout_seconds: Option<Field<'a>>,
    #[serde(borrow)]
    telemetry: Option<&'a serde_json::value::RawValue>,
}

/// `after`/`limit`/`seq`: finite and ≥ 0, truncated; else absent.
fn num(f: &Option<Field<'_>>) -> Option<i64> {
    f.num().filter(|f| *f >= 0.0).map(|f| f.trunc() as i64)
}

async fn on_text(st: &Shared, p: &Principal, id: u64, handle: &SocketHandle, text: &str) {
    let v: Frame<'_> = match parse_object(text.as_bytes()) {
        Ok(v) => v,
        // Valid JSON that is not an object has no type.
        Err(e) if e.status == axum::http::StatusCode::BAD_REQUEST => Frame::default(),
        Err(_) => return send(st, handle, error_frame("invalid_json", "invalid JSON")).await,
    };
    match v.kind.str() {
        Some("ping") => send(st, handle, json!({"type": "pong"})).await,
        Some("subscribe_run") => subscribe(st, p, id, handle, &v).await,
        Some("ack") => ack(st, p, id, &v).await,
        Some("heartbeat") => heartbeat(st, p, handle, v).await,
        _ => {
            send(
                st,
                handle,
                error_frame("unknown_type", "unknown control message"),
            )
            .await
        }
    }
}

async fn readable(st: &Shared, p: &Principal, run_id: &str) -> bool {
    let (p, run_id) = (p.clone(), run_id.to_owned());
    st.store
        .call(move |c| Ok(store::get_run(c, &run_id)?.is_some_and(|r| r.readable_by(&p))))
        .await
        .unwrap_or(false)
}

async fn subscribe(st: &Shared, p: &Principal, id: u64, handle: &SocketHandle, v: &Frame<'_>) {
    let run_id = v.run_id.str().unwrap_or_default().to_owned();
    if run_id.is_empty() || !readable(st, p, &run_id).await {
        return send(st, handle, error_frame("not_found", "run not found")).await;
    }
    let mut after = num(&v.after).unwrap_or(0);
    let limit = num(&v.limit).unwrap_or(PAGE_DEFAULT).min(PAGE_MAX);
    let limits = &st.cfg.limits;
    // A page is at most `limit` events and at most `page_bytes`. A page cut
    // short by bytes is continued here in further `run_events` frames, each
    // waiting for the socket to drain, until the backlog is caught up or a
    // frame is a full page (whose reader asks for the next one itself). A
    // client that treats a short page as "caught up" therefore misses nothing.
    loop {
        // Room for the frame is reserved before the run lock, so appends never
        // wait on a slow reader.
        let Some(room) = handle
            .reserve(limits.page_bytes + ENVELOPE, limits.write_timeout)
            .await
        else {
            return handle.close(1011, "control send failed");
        };
        // Hold the run lock across the page read, the cursor update and the
        // enqueue, so no append can slip between them (see the module docs).
        let lock = st.hub.run_lock(&run_id);
        let _guard = lock.lock().await;
        let (rid, budget) = (run_id.clone(), limits.page_bytes);
        let page = match st
            .store
            .call(move |c| store::page_after(c, &rid, after, limit, budget))
            .await
        {
            Ok(page) => page,
            Err(_) => {
                drop(room);
                return send(
                    st,
                    handle,
                    error_frame("internal_error", "run events unavailable"),
                )
                .await;
            }
        };
        let cursor = page.last_seq.unwrap_or(after);
        st.hub.set_cursor(id, &run_id, cursor, false);
        let frame = format!(
            "{{\"type\":\"run_events\",\"runID\":{},\"events\":[{}],\"nextSeq\":{cursor}}}",
            Value::String(run_id.clone()),
            page.records.join(",")
        );
        if !handle.send_reserved(Message::Text(frame.into()), room) {
            return handle.close(1011, "control send failed");
        }
        if !page.cut {
            return;
        }
        after = cursor;
    }
}

async fn ack(st: &Shared, p: &Principal, id: u64, v: &Frame<'_>) {
    let (Some(run_id), Some(seq)) = (v.run_id.str(), num(&v.seq)) else {
        return;
    };
    if !st.hub.is_subscribed(id, run_id) {
        // An ack can start a subscription (as in the reference), but only for a readable run.
        if !readable(st, p, run_id).await {
            return;
        }
        let lock = st.hub.run_lock(run_id);
        let _guard = lock.lock().await;
        st.hub.set_cursor(id, run_id, seq, false);
        return;
    }
    // Acks only move forward: moving back would stop pushes until the next page.
    st.hub.set_cursor(id, run_id, seq, true);
}

async fn heartbeat(st: &Shared, p: &Principal, handle: &SocketHandle, v: Frame<'_>) {
    let lease_id = v.lease_id.str().unwrap_or_default().to_owned();
    if lease_id.is_empty() {
        return send(
            st,
            handle,
            json!({"type": "heartbeat", "leaseID": lease_id, "ok": false, "error": "not_found"}),
        )
        .await;
    }
    let body = TouchBody {
        expected_provider: v.expected_provider,
        idle_timeout_seconds: v.idle_timeout_seconds,
        telemetry: v.telemetry,
    };
    let touched = match body.into_touch() {
        Ok(t) => crate::leases::touch(st, p.clone(), lease_id.clone(), t).await,
        Err(e) => Err(e),
    };
    match touched {
        // Answered with the lease's canonical id, whether it was named by
        // id or by slug, as the reference does.
        Ok(lease) => {
            send(
                st,
                handle,
                json!({"type": "heartbeat", "leaseID": lease.id, "ok": true, "expiresAt": lease.expires_at}),
            )
            .await
        }
        Err(e) => {
            send(
                st,
                handle,
                json!({"type": "heartbeat", "leaseID": lease_id, "ok": false, "error": e.code}),
            )
            .await
        }
    }
}
