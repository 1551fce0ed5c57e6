//! Portal sign-in state: the signed session cookie, CSRF tokens, and the
//! same-origin checks in front of every state-changing form.
//!
//! The cookie never holds the pasted token. It holds how the caller
//! authenticated, the identity, an expiry and a random nonce, signed with a
//! key derived from every configured secret (so rotating any token or the
//! session secret signs everybody out). The CSRF token of a session is
//! `HMAC(key, "csrf:" + nonce)`: a synchronizer token that needs no server
//! state, sent in a hidden form field and compared in constant time.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::app::Shared;
use crate::auth::{AuthKind, Principal};
use crate::config::Config;

/// Name of the session cookie.
pub(crate) const SESSION_COOKIE: &str = "crabbox_portal";
/// Name of the short-lived cookie that binds the sign-in form to its browser.
pub(crate) const LOGIN_COOKIE: &str = "crabbox_portal_login";
/// A session lasts at most this long (less when a `cbxu_` token expires sooner).
pub(crate) const SESSION_TTL_MS: i64 = 12 * 3600 * 1000;
/// The sign-in form must be sent within this long of being shown.
pub(crate) const LOGIN_TTL_S: i64 = 600;
/// Cookies longer than this are not even looked at.
const COOKIE_CAP: usize = 4096;

/// The portal's signing key, derived from the configured secrets.
#[derive(Clone)]
pub(crate) struct Key([u8; 32]);

impl Key {
    /// `HMAC(secrets, "crabbox portal cookie v1")`, each secret length-prefixed
    /// and tagged so no two configurations share a key.
    pub(crate) fn derive(cfg: &Config) -> Self {
        let mut material = Vec::new();
        for (tag, secret) in [
            (b'a', &cfg.admin_token),
            (b's', &cfg.shared_token),
            (b'u', &cfg.session_secret),
        ] {
            if let Some(s) = secret {
                material.push(tag);
                material.extend_from_slice(&(s.expose().len() as u64).to_be_bytes());
                material.extend_from_slice(s.expose().as_bytes());
            }
        }
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&material).expect("hmac accepts any key length");
        mac.update(b"crabbox portal cookie v1");
        Self(mac.finalize().into_bytes().into())
    }

    fn sign(&self, purpose: &str, payload: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("hmac accepts any key length");
        mac.update(purpose.as_bytes());
        mac.update(b"\0");
        mac.update(payload.as_bytes());
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    }

    fn verify(&self, purpose: &str, payload: &str, sig: &str) -> bool {
        let want = self.sign(purpose, payload);
        want.len() == sig.len() && bool::from(want.as_bytes().ct_eq(sig.as_bytes()))
    }

    /// The CSRF token that goes with a nonce.
    pub(crate) fn csrf(&self, nonce: &str) -> String {
        self.sign("csrf", nonce)
    }

    /// Whether `token` is the CSRF token of `nonce`.
    pub(crate) fn csrf_ok(&self, nonce: &str, token: &str) -> bool {
        self.verify("csrf", nonce, token)
    }
}

/// What the session cookie carries (signed, not encrypted: nothing in it is secret).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Claims {
    /// `a` admin, `s` shared, `u` user token.
    pub k: String,
    /// Owner.
    pub o: String,
    /// Org.
    pub g: String,
    /// Expiry, server clock, ms.
    pub exp: i64,
    /// Random nonce; the CSRF token is derived from it.
    pub n: String,
}

impl Claims {
    /// The claims of a freshly authenticated principal.
    pub(crate) fn new(p: &Principal, exp: i64) -> Self {
        let k = match p.kind {
            AuthKind::Admin => "a",
            AuthKind::Shared => "s",
            AuthKind::User => "u",
        };
        Self {
            k: k.into(),
            o: p.owner.clone(),
            g: p.org.clone(),
            exp,
            n: crate::ids::uuid_v4(),
        }
    }

    /// The cookie value: `base64url(json).sig`.
    pub(crate) fn seal(&self, key: &Key) -> String {
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(self).expect("claims serialise"));
        let sig = key.sign("session", &payload);
        format!("{payload}.{sig}")
    }

    /// Verify a cookie value (signature first), its expiry, and that the way
    /// it authenticated is still configured; the principal it stands for.
    pub(crate) fn open(
        key: &Key,
        cfg: &Config,
        value: &str,
        now_ms: i64,
    ) -> Option<(Self, Principal)> {
        if value.len() > COOKIE_CAP {
            return None;
        }
        let (payload, sig) = value.split_once('.')?;
        if !key.verify("session", payload, sig) {
            return None;
        }
        let claims: Claims = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
        if claims.exp <= now_ms {
            return None;
        }
        let principal = match claims.k.as_str() {
            "a" if cfg.admin_token.is_some() => Principal {
                kind: AuthKind::Admin,
                owner: claims.o.clone(),
                org: claims.g.clone(),
                admin: true,
            },
            // The shared identity is pinned server side, now as at sign-in.
            "s" if cfg.shared_token.is_some() => Principal {
                kind: AuthKind::Shared,
                owner: cfg.pinned_shared_owner(),
                org: cfg.default_org.clone().unwrap_or_default(),
                admin: false,
            },
            "u" if cfg.session_secret.is_some() => Principal {
                kind: AuthKind::User,
                owner: claims.o.clone(),
                org: claims.g.clone(),
                admin: false,
            },
            _ => return None,
        };
        Some((claims, principal))
    }
}

/// The value of cookie `name` in the request, if any.
pub(crate) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

/// Whether the browser reached us over https: the configured public URL
/// says so, or a trusted proxy's `X-Forwarded-Proto` does.
pub(crate) fn is_https(cfg: &Config, headers: &HeaderMap) -> bool {
    if cfg
        .public_url
        .as_deref()
        .is_some_and(|u| u.starts_with("https://"))
    {
        return true;
    }
    cfg.trust_forwarded_proto
        && headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
}

/// A `Set-Cookie` value: HttpOnly, SameSite=Strict, scoped to `/portal`,
/// `Secure` over https.
pub(crate) fn set_cookie(name: &str, value: &str, max_age_s: i64, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/portal; Max-Age={max_age_s}; HttpOnly; SameSite=Strict{secure}"
    ))
    .expect("cookie values are base64url and ASCII")
}

/// The origin browsers send for our own pages.
fn expected_origin(cfg: &Config, headers: &HeaderMap) -> Option<String> {
    if let Some(url) = &cfg.public_url {
        // scheme://host[:port] of the configured URL.
        let (scheme, rest) = url.split_once("://")?;
        let host = rest.split('/').next()?;
        return Some(format!(
            "{}://{}",
            scheme.to_ascii_lowercase(),
            host.to_ascii_lowercase()
        ));
    }
    let host = headers.get(header::HOST)?.to_str().ok()?;
    let scheme = if is_https(cfg, headers) {
        "https"
    } else {
        "http"
    };
    Some(format!("{scheme}://{}", host.to_ascii_lowercase()))
}

/// Refuse a form post another site made the browser send: `Sec-Fetch-Site`
/// must be `same-origin` (or `none`, typed by the user) when present, and
/// `Origin` must be ours when present. The CSRF token is checked as well.
pub(crate) fn same_origin(cfg: &Config, headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site") {
        let site = site.to_str().unwrap_or("");
        if !(site.eq_ignore_ascii_case("same-origin") || site.eq_ignore_ascii_case("none")) {
            return false;
        }
    }
    match headers.get(header::ORIGIN) {
        None => true,
        Some(origin) => {
            let origin = origin.to_str().unwrap_or("").to_ascii_lowercase();
            expected_origin(cfg, headers).is_some_and(|want| want == origin)
        }
    }
}

/// A signed-in portal visitor.
#[derive(Debug, Clone)]
pub(crate) struct Viewer {
    /// Who they are, with the API's scoping rules.
    pub principal: Principal,
    /// The session's claims (expiry, nonce).
    pub claims: Claims,
}

impl Viewer {
    /// The CSRF token for this session's forms.
    pub(crate) fn csrf(&self, st: &Shared) -> String {
        st.portal.key.csrf(&self.claims.n)
    }

    /// How the header names the visitor (no secret: kind, owner, org).
    pub(crate) fn label(&self) -> String {
        let p = &self.principal;
        match p.kind {
            AuthKind::Admin => format!(
                "admin ({})",
                if p.org.is_empty() { "no org" } else { &p.org }
            ),
            AuthKind::Shared => format!("{} · {} (shared token)", p.owner, p.org),
            AuthKind::User => format!("{} · {}", p.owner, p.org),
        }
    }
}

/// An unauthenticated portal request: pages redirect to sign-in, live streams get 401.
pub(crate) struct SignIn;

impl IntoResponse for SignIn {
    fn into_response(self) -> Response {
        let mut r = Redirect::to("/portal/login").into_response();
        *r.status_mut() = StatusCode::SEE_OTHER;
        r
    }
}

impl FromRequestParts<Shared> for Viewer {
    type Rejection = SignIn;

    async fn from_request_parts(parts: &mut Parts, st: &Shared) -> Result<Self, Self::Rejection> {
        let (claims, principal) = signed_in(st, &parts.headers).await.ok_or(SignIn)?;
        Ok(Self { principal, claims })
    }
}

/// The session a request's cookie carries, when it is signed, unexpired and
/// not signed out.
pub(crate) async fn signed_in(st: &Shared, headers: &HeaderMap) -> Option<(Claims, Principal)> {
    let value = cookie(headers, SESSION_COOKIE)?;
    let (claims, principal) = Claims::open(&st.portal.key, &st.cfg, value, st.clock.now_ms())?;
    (!is_revoked(st, &claims.n).await).then_some((claims, principal))
}

/// Whether a session was signed out; a store that cannot answer counts as
/// signed out.
pub(crate) async fn is_revoked(st: &Shared, nonce: &str) -> bool {
    let nonce = nonce.to_owned();
    st.store
        .call(move |c| crate::store::is_portal_session_revoked(c, &nonce))
        .await
        .unwrap_or(true)
}

/// A fresh sign-in form nonce: when it was issued, then a random part.
pub(crate) fn login_nonce(now_ms: i64) -> String {
    format!("{}.{}", now_ms / 1000, crate::ids::uuid_v4())
}

/// Whether a sign-in form nonce was issued within [`LOGIN_TTL_S`] (the
/// cookie's Max-Age is only a request to the browser).
pub(crate) fn login_nonce_fresh(nonce: &str, now_ms: i64) -> bool {
    let Some((issued, rest)) = nonce.split_once('.') else {
        return false;
    };
    let Ok(issued) = issued.parse::<i64>() else {
        return false;
    };
    let age = now_ms / 1000 - issued;
    !rest.is_empty() && (0..=LOGIN_TTL_S).contains(&age)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[test]
    fn a_sign_in_nonce_is_fresh_for_ten_minutes_only() {
        let now = 1_800_000_000_000;
        let n = login_nonce(now);
        assert!(login_nonce_fresh(&n, now));
        assert!(login_nonce_fresh(&n, now + LOGIN_TTL_S * 1000));
        assert!(!login_nonce_fresh(&n, now + (LOGIN_TTL_S + 1) * 1000));
        assert!(!login_nonce_fresh(&n, now - 2000), "issued in the future");
        for bad in ["", "uuid-only", "x.y", "1800000000."] {
            assert!(!login_nonce_fresh(bad, now), "{bad:?}");
        }
    }

    fn cfg() -> Config {
        let mut c = Config::new("/tmp/x");
        c.admin_token = Some(Secret::new("admin-secret"));
        c.shared_token = Some(Secret::new("shared-secret"));
        c.session_secret = Some(Secret::new("session-secret"));
        c
    }

    fn user() -> Principal {
        Principal {
            kind: AuthKind::User,
            owner: "a@example.com".into(),
            org: "acme".into(),
            admin: false,
        }
    }

    #[test]
    fn cookie_round_trip_and_rejections() {
        let c = cfg();
        let key = Key::derive(&c);
        let claims = Claims::new(&user(), 10_000);
        let v = claims.seal(&key);
        assert!(!v.contains("secret"));
        let (back, p) = Claims::open(&key, &c, &v, 5_000).unwrap();
        assert_eq!((back, p), (claims.clone(), user()));
        assert!(Claims::open(&key, &c, &v, 10_000).is_none(), "expired");
        // A key from another configuration (a rotated token) refuses it.
        let mut rotated = cfg();
        rotated.shared_token = Some(Secret::new("shared-2"));
        assert!(Claims::open(&Key::derive(&rotated), &rotated, &v, 5_000).is_none());
        // An edited payload (admin claims) fails the signature.
        let mut forged = claims;
        forged.k = "a".into();
        let forged_payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap());
        let sig = v.split_once('.').unwrap().1;
        assert!(Claims::open(&key, &c, &format!("{forged_payload}.{sig}"), 5_000).is_none());
    }

    #[test]
    fn csrf_token_is_bound_to_the_nonce() {
        let key = Key::derive(&cfg());
        let t = key.csrf("n1");
        assert!(key.csrf_ok("n1", &t));
        assert!(!key.csrf_ok("n2", &t));
        assert!(!key.csrf_ok("n1", ""));
    }

    #[test]
    fn cross_site_posts_are_refused() {
        let c = cfg();
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "127.0.0.1:8080".parse().unwrap());
        assert!(
            same_origin(&c, &h),
            "no browser headers: the CSRF token decides"
        );
        h.insert(header::ORIGIN, "http://127.0.0.1:8080".parse().unwrap());
        assert!(same_origin(&c, &h));
        h.insert(header::ORIGIN, "http://evil.example".parse().unwrap());
        assert!(!same_origin(&c, &h));
        h.insert(header::ORIGIN, "http://127.0.0.1:8080".parse().unwrap());
        h.insert("sec-fetch-site", "cross-site".parse().unwrap());
        assert!(!same_origin(&c, &h));
        h.insert("sec-fetch-site", "same-site".parse().unwrap());
        assert!(!same_origin(&c, &h));
    }

    #[test]
    fn secure_behind_https() {
        let mut c = cfg();
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-proto", "https".parse().unwrap());
        assert!(!is_https(&c, &h), "untrusted proxy header");
        c.trust_forwarded_proto = true;
        assert!(is_https(&c, &h));
        c.trust_forwarded_proto = false;
        c.public_url = Some("https://crabbox.example.com".into());
        assert!(is_https(&c, &HeaderMap::new()));
        assert!(
            set_cookie("x", "y", 1, true)
                .to_str()
                .unwrap()
                .ends_with("; Secure")
        );
    }
}
