//! Shared server state, the route table, and the authentication layer in front of it.

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, Method, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post, put};
use serde_json::json;
use tokio::sync::{Notify, Semaphore};

use crate::auth::{self, Principal};
use crate::clock::Clock;
use crate::config::Config;
use crate::control::Hub;
use crate::egress::Egress;
use crate::error::ApiError;
use crate::store::Store;
use crate::{control, egress, leases, runs};

/// State shared by every route and background task.
pub(crate) struct AppState {
    pub cfg: Config,
    pub store: Store,
    pub clock: Clock,
    /// Live control sockets and their run subscriptions.
    pub hub: Hub,
    /// Egress tickets, live bridges and pairing.
    pub egress: Egress,
    /// Wakes the expiry sweeper when a deadline may have moved earlier.
    pub sweeper_wake: Notify,
    /// Request-body bytes that may be held at once (see `body`).
    pub body_budget: Arc<Semaphore>,
    /// What changed (leases, runs, egress), for the portal's live pages.
    pub changes: tokio::sync::broadcast::Sender<Change>,
    /// Portal state: the cookie key and the bound on live page streams.
    pub portal: crate::portal::PortalState,
}

pub(crate) type Shared = Arc<AppState>;

/// Changes queued toward each live page before it counts as lagging (a
/// lagging page re-reads its whole state, so nothing is lost).
const CHANGE_QUEUE: usize = 256;

/// One change notification: which lease and/or run moved. Pages re-read the
/// store; the notification itself carries no record.
#[derive(Debug, Clone)]
pub(crate) struct Change {
    /// The lease concerned, when known.
    pub lease: Option<String>,
    /// The run concerned, when a run changed.
    pub run: Option<String>,
}

impl AppState {
    pub(crate) fn new(cfg: Config, store: Store) -> Shared {
        let clock = cfg.clock.clone();
        let body_budget = Arc::new(Semaphore::new(cfg.limits.body_bytes_in_flight));
        let cfg_for_portal = cfg.clone();
        Arc::new(Self {
            body_budget,
            cfg,
            store,
            clock,
            hub: Hub::default(),
            egress: Egress::default(),
            sweeper_wake: Notify::new(),
            changes: tokio::sync::broadcast::channel(CHANGE_QUEUE).0,
            portal: crate::portal::PortalState::new(&cfg_for_portal),
        })
    }

    /// Tell live portal pages that a lease (and maybe one of its runs) changed.
    /// Nobody listening is fine; a listener that fell behind re-reads everything.
    pub(crate) fn changed(&self, lease: Option<&str>, run: Option<&str>) {
        let _ = self.changes.send(Change {
            lease: lease.filter(|l| !l.is_empty()).map(str::to_owned),
            run: run.map(str::to_owned),
        });
    }

    /// Authenticate against the configured tokens at the current clock.
    pub(crate) fn authenticate(&self, headers: &HeaderMap) -> Option<Principal> {
        auth::authenticate(&self.cfg, headers, self.clock.now_ms())
    }
}

/// The whole route table.
pub(crate) fn router(state: Shared) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/leases", get(leases::list))
        .route("/v1/leases/{id}", get(leases::get_one))
        .route("/v1/leases/{id}/registration", put(leases::register))
        .route("/v1/leases/{id}/heartbeat", post(leases::heartbeat))
        .route("/v1/leases/{id}/release", post(leases::release))
        .route("/v1/leases/{id}/egress/ticket", any(egress::ticket))
        .route("/v1/leases/{id}/egress/status", any(egress::status))
        .route("/v1/leases/{id}/egress/{role}", get(egress::upgrade))
        .route("/v1/runs", post(runs::create))
        .route("/v1/runs/{id}", get(runs::get_one))
        .route(
            "/v1/runs/{id}/events",
            get(runs::list_events).post(runs::post_event),
        )
        // Bodies are read by `body::Body`, whose per-route limits replace axum's default.
        .route("/v1/runs/{id}/finish", post(runs::finish))
        .route("/v1/runs/{id}/logs", get(runs::logs))
        .route("/v1/control", get(control::upgrade))
        .merge(crate::portal::routes())
        .layer(DefaultBodyLimit::disable())
        .fallback(not_found)
        .method_not_allowed_fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .with_state(state)
}

async fn health() -> impl IntoResponse {
    axum::Json(json!({"ok": true, "service": "crabbox-coordinator"}))
}

async fn not_found() -> ApiError {
    ApiError::not_found()
}

/// Whether a request is an egress bridge upgrade, which bypasses caller
/// authentication: its one-use ticket is its only credential (§1.3).
fn is_bridge_upgrade(req: &Request) -> bool {
    if req.method() != Method::GET {
        return false;
    }
    let upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if !upgrade {
        return false;
    }
    let segs: Vec<&str> = req.uri().path().split('/').collect();
    matches!(segs.as_slice(), ["", "v1", "leases", id, "egress", "host" | "client"] if !id.is_empty())
}

/// Authenticate every route except health and bridge upgrades; failures are
/// `401 {"error":"unauthorized"}` whatever the path, as at the reference edge.
async fn authenticate(State(state): State<Shared>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path();
    // The portal authenticates with its own session cookie (see `portal`).
    if path == "/v1/health" || is_bridge_upgrade(&req) || crate::portal::owns_path(path) {
        return next.run(req).await;
    }
    match state.authenticate(req.headers()) {
        Some(p) => {
            req.extensions_mut().insert(p);
            next.run(req).await
        }
        None => ApiError::unauthorized().into_response(),
    }
}
