//! Mediated egress (§3.2–§3.6): one-use tickets, session activation and
//! tombstones, bridge upgrades, host⇄client pairing and the relay, status.
//!
//! Session records and tombstones live in SQLite (they survive a restart);
//! tickets and sockets are process-local. Ticket minting, ticket consumption
//! and activation run under one async lock, like the reference's global
//! bridge-ticket lock, so two mints cannot both win a replacement.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Extension;
use axum::Json;
use axum::extract::ws::{WebSocketUpgrade, rejection::WebSocketUpgradeRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::app::Shared;
use crate::auth::{Principal, bearer};
use crate::body::{Body, Field, OptField, SMALL, StrList};
use crate::clock::{iso, parse_iso};
use crate::error::{ApiError, ApiResult};
use crate::ids;
use crate::leases::resolve;
use crate::store;
use crate::ws::DirectHandle;

mod relay;

/// Tickets live 120 s and are used once.
pub const TICKET_TTL_MS: i64 = 120_000;
/// Frames above 12 MiB close the sender with 1009, as the reference's Node runtime.
pub const MAX_FRAME: usize = 12 * 1024 * 1024;
/// The WebSocket library's own limit sits above [`MAX_FRAME`] so that an
/// oversized frame is read whole and refused cleanly with 1009, rather than
/// leaving the stream desynchronised mid-frame.
const LIBRARY_LIMIT: usize = 16 * 1024 * 1024;

const REPLACED_SESSION: &str = "replaced by a newer egress session";

/// Which end of a bridge a socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Role {
    Host,
    Client,
}

impl Role {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "host" => Some(Self::Host),
            "client" => Some(Self::Client),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Host => "host",
            Self::Client => "client",
        }
    }
}

/// A minted, not yet used ticket.
#[derive(Debug, Clone)]
struct Ticket {
    lease_id: String,
    role: Role,
    session_id: String,
    created_ms: i64,
    expires_ms: i64,
}

/// One registered socket of a pair.
#[derive(Clone)]
struct Peer {
    id: u64,
    handle: DirectHandle,
    /// When this socket registered (server clock, ms), for the portal.
    since_ms: i64,
}

/// Host and client sockets of one `(lease, session)`.
#[derive(Default)]
struct Pair {
    host: Option<Peer>,
    client: Option<Peer>,
    /// Bumped whenever membership changes, so relaying sockets can cache
    /// their peer's queue and skip the registry lock on every frame.
    epoch: Arc<AtomicU64>,
}

impl Pair {
    fn slot(&mut self, role: Role) -> &mut Option<Peer> {
        match role {
            Role::Host => &mut self.host,
            Role::Client => &mut self.client,
        }
    }

    fn close_all(&mut self, code: u16, reason: &str) {
        for p in [self.host.take(), self.client.take()].into_iter().flatten() {
            p.handle.close(code, reason);
        }
        self.epoch.fetch_add(1, Ordering::Release);
    }
}

type Key = (String, String);

/// Egress state held in memory.
#[derive(Default)]
pub(crate) struct Egress {
    inner: Mutex<Inner>,
    /// Held from ticket check to socket registration (moved into the upgrade
    /// callback), and by lease teardown, so a socket can never register for a
    /// session or lease that was retired while it was upgrading.
    op_lock: Arc<tokio::sync::Mutex<()>>,
    next_id: AtomicU64,
}

#[derive(Default)]
struct Inner {
    tickets: HashMap<String, Ticket>,
    pairs: HashMap<Key, Pair>,
}

/// The persisted active session of a lease.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SessionRecord {
    #[serde(rename = "leaseID")]
    pub(crate) lease_id: String,
    #[serde(rename = "sessionID")]
    pub(crate) session_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) profile: Option<String>,
    pub(crate) allow: Vec<String>,
    pub(crate) created_at: String,
    pub(crate) updated_at: String,
}

impl Egress {
    /// Lease teardown: wait for in-flight upgrades, then close every socket
    /// of the lease and forget its tickets. Call after the lease state change is committed.
    pub(crate) async fn end_lease(&self, lease_id: &str, code: u16, reason: &str) {
        let _op = self.op_lock.lock().await;
        self.close_lease(lease_id, code, reason);
    }

    /// Close every socket of a lease and forget its tickets.
    fn close_lease(&self, lease_id: &str, code: u16, reason: &str) {
        let mut inner = self.inner.lock().unwrap();
        inner.tickets.retain(|_, t| t.lease_id != lease_id);
        inner.pairs.retain(|(l, _), pair| {
            if l == lease_id {
                pair.close_all(code, reason);
                false
            } else {
                true
            }
        });
    }

    fn close_session(&self, lease_id: &str, session: &str, code: u16, reason: &str) {
        let mut inner = self.inner.lock().unwrap();
        if let Some(mut pair) = inner
            .pairs
            .remove(&(lease_id.to_owned(), session.to_owned()))
        {
            pair.close_all(code, reason);
        }
    }

    /// Close every bridge socket (shutdown).
    pub(crate) fn close_all(&self, code: u16, reason: &str) {
        let mut inner = self.inner.lock().unwrap();
        for pair in inner.pairs.values_mut() {
            pair.close_all(code, reason);
        }
        inner.pairs.clear();
    }

    /// Number of registered bridge sockets.
    pub(crate) fn socket_count(&self) -> usize {
        let inner = self.inner.lock().unwrap();
        inner
            .pairs
            .values()
            .map(|p| p.host.is_some() as usize + p.client.is_some() as usize)
            .sum()
    }

    /// Since when the host and the client of a session are connected (ms), if they are.
    pub(crate) fn connected_since(
        &self,
        lease_id: &str,
        session: &str,
    ) -> (Option<i64>, Option<i64>) {
        let inner = self.inner.lock().unwrap();
        inner
            .pairs
            .get(&(lease_id.to_owned(), session.to_owned()))
            .map_or((None, None), |p| {
                (
                    p.host.as_ref().map(|h| h.since_ms),
                    p.client.as_ref().map(|c| c.since_ms),
                )
            })
    }

    fn connected(&self, lease_id: &str, session: &str) -> (bool, bool) {
        let inner = self.inner.lock().unwrap();
        inner
            .pairs
            .get(&(lease_id.to_owned(), session.to_owned()))
            .map_or((false, false), |p| (p.host.is_some(), p.client.is_some()))
    }
}

/// Activate `session` for a lease (§3.3). Returns the session it replaced, whose
/// sockets the caller must close with `1012 "replaced by a newer egress session"`.
fn activate(
    c: &Connection,
    lease_id: &str,
    session: &str,
    profile: Option<String>,
    allow: Vec<String>,
    at_ms: i64,
) -> anyhow::Result<Option<String>> {
    if store::is_tombstoned(c, lease_id, session)? {
        return Ok(None);
    }
    let current: Option<SessionRecord> = store::get_egress_session(c, lease_id)?;
    let mut replaced = None;
    let at = iso(at_ms);
    let record = match current {
        Some(cur) if cur.session_id == session => SessionRecord {
            allow: if allow.is_empty() { cur.allow } else { allow },
            profile: profile.or(cur.profile),
            updated_at: at,
            ..cur
        },
        Some(cur) => {
            // An older ticket cannot displace a newer session.
            if parse_iso(&cur.created_at).unwrap_or(0) > at_ms {
                return Ok(None);
            }
            store::add_tombstone(c, lease_id, &cur.session_id)?;
            replaced = Some(cur.session_id.clone());
            // Profile and allow-list carry over from the previous record, as in the reference.
            SessionRecord {
                lease_id: lease_id.to_owned(),
                session_id: session.to_owned(),
                profile: profile.or(cur.profile),
                allow: if allow.is_empty() { cur.allow } else { allow },
                created_at: at.clone(),
                updated_at: at,
            }
        }
        None => SessionRecord {
            lease_id: lease_id.to_owned(),
            session_id: session.to_owned(),
            profile,
            allow,
            created_at: at.clone(),
            updated_at: at,
        },
    };
    store::put_egress_session(c, lease_id, &record)?;
    Ok(replaced)
}

/// `POST …/egress/ticket` body.
#[derive(Deserialize, Default)]
struct TicketBody<'a> {
    #[serde(borrow)]
    role: Option<Field<'a>>,
    #[serde(borrow, rename = "sessionID")]
    session_id: Option<Field<'a>>,
    #[serde(borrow, rename = "sessionId")]
    session_id_alt: Option<Field<'a>>,
    #[serde(borrow)]
    profile: Option<Field<'a>>,
    /// Patterns past the first 1024 (or 256 KiB) are not even looked at;
    /// at most 100 distinct ones are kept.
    #[serde(borrow)]
    allow: Option<StrList<'a, 1024, { 256 * 1024 }>>,
}

fn bound_profile(v: Option<&str>) -> Option<String> {
    let p: String = v?.trim().chars().take(80).collect();
    (!p.is_empty()).then_some(p)
}

fn bound_allow(list: Option<&StrList<'_, 1024, { 256 * 1024 }>>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for s in list.into_iter().flat_map(|l| l.items.iter()) {
        let s = s.trim().to_ascii_lowercase();
        if s.is_empty() || s.len() > 253 || !seen.insert(s.clone()) {
            continue;
        }
        out.push(s);
        if out.len() == 100 {
            break;
        }
    }
    out
}

/// `POST /v1/leases/{id-or-slug}/egress/ticket` → `{ticket, leaseID, role, sessionID, expiresAt}`.
pub(crate) async fn ticket(
    State(st): State<Shared>,
    Extension(p): Extension<Principal>,
    Path(ident): Path<String>,
    method: axum::http::Method,
    body: Body<SMALL>,
) -> ApiResult<Response> {
    if method != axum::http::Method::POST {
        return Err(ApiError::not_found());
    }
    let b: TicketBody<'_> = body.json()?;
    let now = st.clock.now_ms();
    let role = b.role.str().map(str::to_owned);
    let requested = b
        .session_id
        .as_ref()
        .or(b.session_id_alt.as_ref())
        .and_then(Field::str)
        .filter(|s| ids::is_session_id(s))
        .map(str::to_owned);
    let profile = bound_profile(b.profile.str());
    let allow = bound_allow(b.allow.as_ref());
    drop(b);
    drop(body);

    let _op = st.egress.op_lock.lock().await;
    let (lease_id, session, replaced, role) = st
        .store
        .call(move |c| {
            let tx = c.transaction()?;
            let out = (|| {
                let lease = resolve(&tx, &ident, &p, true, now)?;
                if lease.state != "active" || lease.expires_ms() <= now {
                    return Err(ApiError::conflict(
                        "egress_unavailable",
                        "lease is not active",
                    ));
                }
                let Some(role) = role.as_deref().and_then(Role::parse) else {
                    return Err(ApiError::bad_request(
                        "invalid_egress_role",
                        "egress ticket role must be host or client",
                    ));
                };
                if let Some(s) = &requested
                    && store::is_tombstoned(&tx, &lease.id, s)?
                {
                    return Err(ApiError::conflict(
                        "egress_session_replaced",
                        "egress session was replaced by a newer session",
                    ));
                }
                let session = requested.unwrap_or_else(ids::egress_session);
                let replaced = activate(&tx, &lease.id, &session, profile, allow, now)?;
                Ok((lease.id, session, replaced, role))
            })();
            if out.is_ok() {
                tx.commit()?;
            }
            Ok(out)
        })
        .await??;
    if let Some(old) = replaced {
        st.egress
            .close_session(&lease_id, &old, 1012, REPLACED_SESSION);
    }
    st.changed(Some(&lease_id), None);
    let ticket = ids::egress_ticket();
    let expires_ms = now + TICKET_TTL_MS;
    {
        let mut inner = st.egress.inner.lock().unwrap();
        inner.tickets.retain(|_, t| t.expires_ms > now);
        inner.tickets.insert(
            ticket.clone(),
            Ticket {
                lease_id: lease_id.clone(),
                role,
                session_id: session.clone(),
                created_ms: now,
                expires_ms,
            },
        );
    }
    Ok(Json(json!({
        "ticket": ticket,
        "leaseID": lease_id,
        "role": role.as_str(),
        "sessionID": session,
        "expiresAt": iso(expires_ms),
    }))
    .into_response())
}

/// The bridge ticket of an upgrade: `X-Crabbox-Bridge-Ticket`, else
/// `Authorization: Bearer`, else `?ticket=` only when explicitly allowed.
fn find_ticket(
    st: &Shared,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
) -> Option<String> {
    if let Some(t) = headers
        .get("x-crabbox-bridge-ticket")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        && ids::is_ticket(t)
    {
        return Some(t.to_owned());
    }
    if let Some(t) = bearer(headers)
        && ids::is_ticket(t)
    {
        return Some(t.to_owned());
    }
    if st.cfg.allow_query_bridge_tickets {
        return query.get("ticket").filter(|t| ids::is_ticket(t)).cloned();
    }
    None
}

fn ticket_required() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "egress_ticket_required",
        "valid egress bridge ticket required",
    )
}

/// `GET /v1/leases/{id-or-slug}/egress/{host|client}`: the bridge upgrade,
/// authorised solely by a one-use ticket (§3.4).
pub(crate) async fn upgrade(
    State(st): State<Shared>,
    Path((ident, role)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let Some(role) = Role::parse(&role) else {
        return Err(ApiError::not_found());
    };
    let Ok(ws) = ws else {
        return Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            "egress bridge requires a websocket upgrade",
        ));
    };
    let now = st.clock.now_ms();
    let presented = find_ticket(&st, &headers, &query).ok_or_else(ticket_required)?;
    let op = st.egress.op_lock.clone().lock_owned().await;
    let ticket = {
        let inner = st.egress.inner.lock().unwrap();
        inner.tickets.get(&presented).cloned()
    };
    let ticket = ticket
        .filter(|t| t.expires_ms > now && t.role == role)
        .ok_or_else(ticket_required)?;
    let lease_id = ticket.lease_id.clone();
    let lease = st
        .store
        .call(move |c| store::get_lease(c, &lease_id))
        .await?
        .ok_or_else(ApiError::not_found)?;
    let slug_matches = lease
        .slug
        .as_deref()
        .is_some_and(|s| ids::normalize_slug(&ident) == s);
    if ident != lease.id && !slug_matches {
        return Err(ApiError::not_found());
    }
    // The ticket is consumed once it is otherwise valid, before the state checks.
    st.egress.inner.lock().unwrap().tickets.remove(&presented);
    let (lid, sid, at) = (
        lease.id.clone(),
        ticket.session_id.clone(),
        ticket.created_ms,
    );
    let replaced = st
        .store
        .call(move |c| {
            let tx = c.transaction()?;
            if store::is_tombstoned(&tx, &lid, &sid)? {
                return Ok(Err(ApiError::conflict(
                    "egress_session_replaced",
                    "egress session was replaced by a newer session",
                )));
            }
            // Read again in the transaction that activates the session: a
            // release committed since the read above must not get a fresh
            // session for a lease that is over.
            let active = store::get_lease(&tx, &lid)?
                .is_some_and(|l| l.state == "active" && l.expires_ms() > now);
            if !active {
                return Ok(Err(ApiError::conflict(
                    "egress_unavailable",
                    "lease is not active",
                )));
            }
            let replaced = activate(&tx, &lid, &sid, None, Vec::new(), at)?;
            tx.commit()?;
            Ok(Ok(replaced))
        })
        .await??;
    if let Some(old) = replaced {
        st.egress
            .close_session(&lease.id, &old, 1012, REPLACED_SESSION);
    }
    let key = (lease.id.clone(), ticket.session_id.clone());
    Ok(ws
        .max_message_size(LIBRARY_LIMIT)
        .max_frame_size(LIBRARY_LIMIT)
        .on_upgrade(move |socket| relay::relay(st, key, role, socket, op)))
}

/// `GET /v1/leases/{id-or-slug}/egress/status` (any method).
pub(crate) async fn status(
    State(st): State<Shared>,
    Extension(p): Extension<Principal>,
    Path(ident): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let now = st.clock.now_ms();
    let p2 = p.clone();
    let (lease, record) = st
        .store
        .call(move |c| {
            let lease = match resolve(c, &ident, &p2, false, now) {
                Ok(l) => l,
                Err(e) => return Ok(Err(e)),
            };
            let rec: Option<SessionRecord> = store::get_egress_session(c, &lease.id)?;
            Ok(Ok((lease, rec)))
        })
        .await??;
    let manage = p.admin || p.owns(&lease.owner, &lease.org);
    let slug = lease.slug.clone().unwrap_or_default();
    let active = record.is_some();
    let body = match (manage, record) {
        (true, Some(r)) => {
            let (host, client) = st.egress.connected(&lease.id, &r.session_id);
            json!({
                "leaseID": lease.id, "slug": slug, "active": true,
                "sessionID": r.session_id, "profile": r.profile.unwrap_or_default(), "allow": r.allow,
                "hostConnected": host, "clientConnected": client,
                "createdAt": r.created_at, "updatedAt": r.updated_at,
            })
        }
        (true, None) => json!({
            "leaseID": lease.id, "slug": slug, "active": false,
            "sessionID": "", "profile": "", "allow": [],
            "hostConnected": false, "clientConnected": false,
            "createdAt": "", "updatedAt": "",
        }),
        // Callers without manage access see only whether a session is active.
        (false, _) => json!({
            "leaseID": lease.id, "slug": slug, "active": active,
            "sessionID": "", "profile": "", "allow": [], "createdAt": "", "updatedAt": "",
        }),
    };
    Ok(Json(body))
}
