//! The browser portal under `/portal`: sign-in with a pasted token, the
//! signed-in identity's leases, a lease's egress session and runs, a run's
//! output following live; server-rendered HTML, one stylesheet, one small
//! script, all served from this binary.
//!
//! * `session` — the signed session cookie, CSRF tokens, same-origin checks.
//! * `view` — view rows built from store records with the API's scoping; templates.
//! * `live` — server-sent event streams that keep pages current.
//!
//! The portal authenticates by cookie, never by bearer token; its routes
//! bypass the API's authentication layer (`owns_path`) and check the cookie
//! themselves. Every response carries a strict Content-Security-Policy and
//! `Cache-Control: no-store`.

mod live;
mod session;
mod view;

use std::sync::Arc;

use askama::Template;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use tokio::sync::Semaphore;

use crate::app::Shared;
use crate::body::Body;
use crate::config::Config;
use crate::error::ApiError;
use session::{Claims, Key, LOGIN_COOKIE, SESSION_COOKIE, Viewer};
use view::{Chrome, LeasePage, LoginPage, MessagePage};

/// A portal form body (sign-in, sign-out) is at most this long.
const FORM_MAX: usize = 16 * 1024;
/// A pasted token is at most this long (the API reads no longer bearer token usefully).
const TOKEN_MAX: usize = 8 * 1024;
/// Live page streams open at once, across all visitors.
pub(crate) const LIVE_STREAMS: usize = 256;

const CSS: &str = include_str!("../../static/portal.css");
const JS: &str = include_str!("../../static/portal.js");

/// Portal state kept in [`crate::app::AppState`].
pub(crate) struct PortalState {
    /// Signs session cookies and CSRF tokens.
    pub(crate) key: Key,
    /// Bounds the live streams open at once.
    pub(crate) streams: Arc<Semaphore>,
    /// Set when the coordinator shuts down: live streams end, so the
    /// graceful shutdown does not wait for them (they last up to an hour).
    pub(crate) stopping: tokio::sync::watch::Sender<bool>,
}

impl PortalState {
    pub(crate) fn new(cfg: &Config) -> Self {
        Self {
            key: Key::derive(cfg),
            streams: Arc::new(Semaphore::new(LIVE_STREAMS)),
            stopping: tokio::sync::watch::Sender::new(false),
        }
    }
}

/// Whether a path is the portal's (and so authenticated by cookie, not bearer).
pub(crate) fn owns_path(path: &str) -> bool {
    path == "/portal" || path.starts_with("/portal/")
}

/// The portal's routes.
pub(crate) fn routes() -> Router<Shared> {
    Router::new()
        .route("/portal", get(index))
        .route("/portal/", get(|| async { Redirect::to("/portal") }))
        .route("/portal/login", get(login_form).post(login))
        .route("/portal/logout", post(logout))
        .route("/portal/leases/{id}", get(lease_page))
        .route("/portal/runs/{id}", get(run_page))
        .route("/portal/live", get(live::index))
        .route("/portal/leases/{id}/live", get(live::lease))
        .route("/portal/runs/{id}/live", get(live::run))
        .route("/portal/static/portal.css", get(css))
        .route("/portal/static/portal.js", get(js))
        .layer(axum::middleware::map_response(harden))
}

/// Headers on every portal answer: no caching, no framing, no inline or
/// foreign script, style or connection, no referrer.
async fn harden(mut r: Response) -> Response {
    let h = r.headers_mut();
    let set = |h: &mut HeaderMap, k: header::HeaderName, v: &'static str| {
        h.insert(k, HeaderValue::from_static(v));
    };
    set(
        h,
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; style-src 'self'; script-src 'self'; connect-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    );
    set(h, header::X_FRAME_OPTIONS, "DENY");
    // `no-referrer` would make browsers send `Origin: null` on form posts,
    // which the same-origin check refuses; `same-origin` leaks nothing off-site.
    set(h, header::REFERRER_POLICY, "same-origin");
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    if !h.contains_key(header::CACHE_CONTROL) {
        set(h, header::CACHE_CONTROL, "no-store");
    }
    r
}

async fn css() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        CSS,
    )
}

async fn js() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        JS,
    )
}

fn chrome(st: &Shared, v: &Viewer) -> Chrome {
    Chrome {
        viewer: v.label(),
        csrf: v.csrf(st),
    }
}

fn render(t: &impl Template, status: StatusCode) -> Response {
    match t.render() {
        Ok(html) => (status, Html(html)).into_response(),
        Err(e) => {
            tracing::error!(err = %e, "portal template failed");
            ApiError::internal("internal_error").into_response()
        }
    }
}

fn message(chrome: Chrome, status: StatusCode, title: &str, text: &str) -> Response {
    render(
        &MessagePage {
            chrome,
            title: title.into(),
            text: text.into(),
        },
        status,
    )
}

/// A portal-shaped error: not found (and not visible) pages say so in HTML.
fn page_error(st: &Shared, v: &Viewer, e: ApiError) -> Response {
    if e.status == StatusCode::NOT_FOUND {
        message(
            chrome(st, v),
            StatusCode::NOT_FOUND,
            "Not found",
            "There is nothing here you can see; it may belong to another owner or never have existed.",
        )
    } else {
        e.into_response()
    }
}

/// Bound a path identifier like the API's (lease ids ≤ 128 bytes, run ids shorter).
fn ident_ok(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128
}

async fn index(State(st): State<Shared>, v: Viewer) -> Response {
    match view::index_rows(&st, &v.principal).await {
        Ok(rows) => render(
            &view::IndexPage {
                chrome: chrome(&st, &v),
                rows,
                admin: v.principal.admin,
            },
            StatusCode::OK,
        ),
        Err(e) => page_error(&st, &v, e),
    }
}

async fn lease_page(State(st): State<Shared>, v: Viewer, Path(id): Path<String>) -> Response {
    if !ident_ok(&id) {
        return page_error(&st, &v, ApiError::not_found());
    }
    match view::lease_view(&st, &v.principal, &id).await {
        Ok(lv) => render(
            &LeasePage {
                chrome: chrome(&st, &v),
                v: lv,
            },
            StatusCode::OK,
        ),
        Err(e) => page_error(&st, &v, e),
    }
}

async fn run_page(State(st): State<Shared>, v: Viewer, Path(id): Path<String>) -> Response {
    if !ident_ok(&id) {
        return page_error(&st, &v, ApiError::not_found());
    }
    let head = match view::run_head(&st, &v.principal, &id).await {
        Ok((_, head)) => head,
        Err(e) => return page_error(&st, &v, e),
    };
    let (events, after, _) = match view::events_page(
        &st,
        &head.id,
        0,
        view::RUN_PAGE_EVENTS,
        view::RUN_PAGE_BYTES,
    )
    .await
    {
        Ok(p) => p,
        Err(e) => return page_error(&st, &v, e),
    };
    let (mut stdout, mut stderr, mut lines) = (String::new(), String::new(), Vec::new());
    for e in events {
        match e.stream.as_str() {
            "stdout" => stdout.push_str(&e.text),
            "stderr" => stderr.push_str(&e.text),
            _ => lines.push(e.text),
        }
    }
    render(
        &view::RunPage {
            chrome: chrome(&st, &v),
            head,
            stdout,
            stderr,
            lines,
            after,
        },
        StatusCode::OK,
    )
}

/// A sign-in form bound to this browser by a fresh nonce cookie.
fn login_page(st: &Shared, headers: &HeaderMap, status: StatusCode, error: &str) -> Response {
    let nonce = session::login_nonce(st.clock.now_ms());
    let page = LoginPage {
        chrome: Chrome {
            viewer: String::new(),
            csrf: String::new(),
        },
        form_token: st.portal.key.csrf(&format!("login:{nonce}")),
        error: error.into(),
    };
    let mut r = render(&page, status);
    let secure = session::is_https(&st.cfg, headers);
    r.headers_mut().append(
        header::SET_COOKIE,
        session::set_cookie(LOGIN_COOKIE, &nonce, session::LOGIN_TTL_S, secure),
    );
    r
}

async fn login_form(State(st): State<Shared>, headers: HeaderMap) -> Response {
    // Signed in means what every portal page checks (signed, unexpired, not
    // signed out); a stale cookie gets the form, not a redirect loop.
    if session::signed_in(&st, &headers).await.is_some() {
        return Redirect::to("/portal").into_response();
    }
    login_page(&st, &headers, StatusCode::OK, "")
}

#[derive(Deserialize)]
struct LoginForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    csrf: String,
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

fn cross_site() -> Response {
    message(
        Chrome {
            viewer: String::new(),
            csrf: String::new(),
        },
        StatusCode::FORBIDDEN,
        "Refused",
        "This form did not come from a portal page (cross-site request or an expired form); open the portal again and retry.",
    )
}

fn form<T: serde::de::DeserializeOwned>(body: &Body<FORM_MAX>) -> Option<T> {
    serde_urlencoded::from_bytes(body.bytes()).ok()
}

/// `POST /portal/login`: check the form came from our sign-in page, then the
/// token exactly as the API would; on success set the session cookie.
async fn login(State(st): State<Shared>, headers: HeaderMap, body: Body<FORM_MAX>) -> Response {
    if !session::same_origin(&st.cfg, &headers) {
        tracing::warn!("portal sign-in refused: cross-site request");
        return cross_site();
    }
    let Some(f) = form::<LoginForm>(&body) else {
        return login_page(
            &st,
            &headers,
            StatusCode::BAD_REQUEST,
            "The form could not be read; try again.",
        );
    };
    drop(body);
    let nonce = session::cookie(&headers, LOGIN_COOKIE).unwrap_or("");
    if !session::login_nonce_fresh(nonce, st.clock.now_ms())
        || !st.portal.key.csrf_ok(&format!("login:{nonce}"), &f.csrf)
    {
        tracing::warn!("portal sign-in refused: form token missing or stale");
        return cross_site();
    }
    let token = f.token.trim();
    if token.is_empty() || token.len() > TOKEN_MAX {
        return login_page(
            &st,
            &headers,
            StatusCode::UNAUTHORIZED,
            "That token was not accepted. Paste the admin, shared or cbxu_ token exactly.",
        );
    }
    let mut auth = HeaderMap::new();
    let Ok(value) = HeaderValue::from_str(&format!("Bearer {token}")) else {
        return login_page(
            &st,
            &headers,
            StatusCode::UNAUTHORIZED,
            "That token was not accepted. Paste the admin, shared or cbxu_ token exactly.",
        );
    };
    auth.insert(header::AUTHORIZATION, value);
    let now = st.clock.now_ms();
    let Some(principal) = crate::auth::authenticate(&st.cfg, &auth, now) else {
        tracing::info!("portal sign-in refused: token not accepted");
        return login_page(
            &st,
            &headers,
            StatusCode::UNAUTHORIZED,
            "That token was not accepted. Paste the admin, shared or cbxu_ token exactly.",
        );
    };
    // A user token's session ends when the token does.
    let mut exp = now + session::SESSION_TTL_MS;
    if token.starts_with(crate::auth::USER_TOKEN_PREFIX)
        && let Some(secret) = st.cfg.session_secret.as_ref()
        && let Some(claims) = crate::auth::verify_user_token(secret, token, now / 1000)
    {
        exp = exp.min(claims.exp * 1000);
    }
    let claims = Claims::new(&principal, exp);
    tracing::info!(owner = ?principal.owner, org = ?principal.org, kind = ?principal.kind, "portal sign-in");
    let secure = session::is_https(&st.cfg, &headers);
    let mut r = Redirect::to("/portal").into_response();
    *r.status_mut() = StatusCode::SEE_OTHER;
    let h = r.headers_mut();
    h.append(
        header::SET_COOKIE,
        session::set_cookie(
            SESSION_COOKIE,
            &claims.seal(&st.portal.key),
            (exp - now) / 1000,
            secure,
        ),
    );
    h.append(
        header::SET_COOKIE,
        session::set_cookie(LOGIN_COOKIE, "", 0, secure),
    );
    r
}

/// `POST /portal/logout`: same-origin and CSRF-checked; clears the cookie.
async fn logout(
    State(st): State<Shared>,
    headers: HeaderMap,
    v: Viewer,
    body: Body<FORM_MAX>,
) -> Response {
    let ok = session::same_origin(&st.cfg, &headers)
        && form::<CsrfForm>(&body).is_some_and(|f| st.portal.key.csrf_ok(&v.claims.n, &f.csrf));
    if !ok {
        tracing::warn!("portal sign-out refused: cross-site request or bad form token");
        return cross_site();
    }
    // The cookie is stateless; signing out records its nonce as revoked
    // until it would have expired anyway.
    let (nonce, exp, now) = (v.claims.n.clone(), v.claims.exp, st.clock.now_ms());
    if let Err(e) = st
        .store
        .call(move |c| crate::store::revoke_portal_session(c, &nonce, exp, now))
        .await
    {
        tracing::error!(err = %format!("{e:#}"), "portal sign-out could not be recorded");
        return ApiError::internal("internal_error").into_response();
    }
    tracing::info!(owner = ?v.principal.owner, "portal sign-out");
    let secure = session::is_https(&st.cfg, &headers);
    let mut r = Redirect::to("/portal/login").into_response();
    *r.status_mut() = StatusCode::SEE_OTHER;
    r.headers_mut().append(
        header::SET_COOKIE,
        session::set_cookie(SESSION_COOKIE, "", 0, secure),
    );
    r
}
