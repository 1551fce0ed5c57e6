//! Helpers shared by the portal tests: a cookie-less, redirect-less HTTP
//! client, sign-in through the real form, coordinator API calls, and raw
//! egress bridge sockets to the relay.
#![allow(dead_code)]

use std::time::Duration;

use crabbox_coordinator::testing::TestCoordinator;
use reqwest::header::{HeaderMap, SET_COOKIE};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A bridge socket.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// An HTTP client that follows no redirects and keeps no cookies, so every
/// test sees exactly what the server answered.
pub fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// The value of the hidden input `name` in a page.
pub fn hidden(html: &str, name: &str) -> Option<String> {
    let marker = format!("name=\"{name}\" value=\"");
    let start = html.find(&marker)? + marker.len();
    let end = html[start..].find('"')? + start;
    Some(html[start..end].to_owned())
}

/// `name=value` of the first `Set-Cookie` for `name`, and the whole header line.
pub fn set_cookie(headers: &HeaderMap, name: &str) -> Option<(String, String)> {
    headers
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(|v| (v.split(';').next().unwrap().to_owned(), v.to_owned()))
}

/// A signed-in browser, as far as the server can tell.
#[derive(Debug, Clone)]
pub struct Session {
    /// `crabbox_portal=<value>`.
    pub cookie: String,
    /// The whole `Set-Cookie` line the server sent.
    pub set_cookie: String,
    /// The sign-out form's CSRF token.
    pub csrf: String,
}

/// An answer: status, headers, body text.
pub struct Page {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: String,
}

impl Page {
    /// The `Location` header, or "".
    pub fn location(&self) -> &str {
        self.headers
            .get("location")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

/// `GET path`, with the session's cookie if any.
pub async fn get(
    http: &reqwest::Client,
    coord: &TestCoordinator,
    path: &str,
    s: Option<&Session>,
) -> Page {
    let mut req = http.get(format!("{}{path}", coord.base_url));
    if let Some(s) = s {
        req = req.header("cookie", &s.cookie);
    }
    let resp = req.send().await.unwrap();
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    Page {
        status,
        headers,
        body: resp.text().await.unwrap(),
    }
}

/// `POST path` with a urlencoded form, a cookie header and extra headers.
pub async fn post_form(
    http: &reqwest::Client,
    coord: &TestCoordinator,
    path: &str,
    cookie: Option<&str>,
    form: &[(&str, &str)],
    extra: &[(&str, &str)],
) -> Page {
    let body = form
        .iter()
        .map(|(k, v)| format!("{k}={}", urlencode(v)))
        .collect::<Vec<_>>()
        .join("&");
    let mut req = http
        .post(format!("{}{path}", coord.base_url))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body);
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    Page {
        status,
        headers,
        body: resp.text().await.unwrap(),
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The sign-in form: its login cookie (`name=value`) and CSRF token.
pub async fn login_form(http: &reqwest::Client, coord: &TestCoordinator) -> (String, String) {
    let page = get(http, coord, "/portal/login", None).await;
    assert_eq!(page.status, 200, "{}", page.body);
    let (cookie, _) = set_cookie(&page.headers, "crabbox_portal_login").expect("login cookie");
    let csrf = hidden(&page.body, "csrf").expect("csrf field");
    (cookie, csrf)
}

/// Sign in through the real form (same-origin headers as a browser sends).
pub async fn sign_in(http: &reqwest::Client, coord: &TestCoordinator, token: &str) -> Session {
    sign_in_with(http, coord, token, &coord.base_url, &[]).await
}

/// [`sign_in`] from a page of `origin`, with extra request headers (e.g. `X-Forwarded-Proto`).
pub async fn sign_in_with(
    http: &reqwest::Client,
    coord: &TestCoordinator,
    token: &str,
    origin: &str,
    extra: &[(&str, &str)],
) -> Session {
    let (login_cookie, csrf) = login_form(http, coord).await;
    let mut headers = vec![("origin", origin), ("sec-fetch-site", "same-origin")];
    headers.extend_from_slice(extra);
    let page = post_form(
        http,
        coord,
        "/portal/login",
        Some(&login_cookie),
        &[("token", token), ("csrf", &csrf)],
        &headers,
    )
    .await;
    assert_eq!(page.status, 303, "sign-in failed: {}", page.body);
    assert_eq!(page.location(), "/portal");
    let (cookie, line) = set_cookie(&page.headers, "crabbox_portal").expect("session cookie");
    let mut s = Session {
        cookie,
        set_cookie: line,
        csrf: String::new(),
    };
    let index = get(http, coord, "/portal", Some(&s)).await;
    assert_eq!(index.status, 200, "{}", index.body);
    s.csrf = hidden(&index.body, "csrf").expect("sign-out form");
    s
}

/// A coordinator API call with a bearer token.
pub async fn api(
    coord: &TestCoordinator,
    method: &str,
    path: &str,
    token: &str,
    body: Value,
) -> Value {
    let (status, v) = coord.request(method, path, token, &body).await.unwrap();
    assert!(
        (200..300).contains(&status),
        "{method} {path}: {status} {v}"
    );
    v
}

/// Create a run on a lease; returns its id.
pub async fn create_run(coord: &TestCoordinator, token: &str, lease: &str, cmd: &[&str]) -> String {
    let v = api(
        coord,
        "POST",
        "/v1/runs",
        token,
        json!({"leaseID": lease, "command": cmd}),
    )
    .await;
    v["run"]["id"].as_str().unwrap().to_owned()
}

/// Mint an egress ticket: returns (ticket, session id).
pub async fn ticket(
    coord: &TestCoordinator,
    token: &str,
    lease: &str,
    body: Value,
) -> (String, String) {
    let v = api(
        coord,
        "POST",
        &format!("/v1/leases/{lease}/egress/ticket"),
        token,
        body,
    )
    .await;
    (
        v["ticket"].as_str().unwrap().to_owned(),
        v["sessionID"].as_str().unwrap().to_owned(),
    )
}

/// Open a raw bridge socket to the relay with a ticket.
pub async fn bridge(coord: &TestCoordinator, lease: &str, role: &str, ticket: &str) -> Ws {
    let mut req = coord
        .ws_url(&format!("/v1/leases/{lease}/egress/{role}"))
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("x-crabbox-bridge-ticket", ticket.parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    ws
}
