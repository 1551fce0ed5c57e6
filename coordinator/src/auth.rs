//! Caller authentication (protocol §4): admin → shared → signed `cbxu_` user token.

use axum::http::HeaderMap;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::config::{Config, Secret};

/// How a caller authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthKind {
    /// `CRABBOX_ADMIN_TOKEN`.
    Admin,
    /// `CRABBOX_SHARED_TOKEN`.
    Shared,
    /// A signed `cbxu_` user token.
    User,
}

/// An authenticated caller: who it is and whether it is an admin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// How the caller authenticated.
    pub kind: AuthKind,
    /// Owner (an email or login).
    pub owner: String,
    /// Org label.
    pub org: String,
    /// Admins see and manage everything.
    pub admin: bool,
}

impl Principal {
    /// Whether this caller owns a record with the given owner and org.
    pub fn owns(&self, owner: &str, org: &str) -> bool {
        self.owner == owner && self.org == org
    }
}

/// The bearer token of a request: the second space-separated part of
/// `Authorization` when the first is `bearer` (any case). Like the reference,
/// `Bearer  x` (two spaces) yields an empty token.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let mut parts = value.split(' ');
    let scheme = parts.next()?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    parts.next()
}

/// Constant-time string equality (length differences are not hidden, which
/// reveals nothing useful about a random token).
fn ct_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Authenticate a request, in the reference's precedence order.
pub fn authenticate(cfg: &Config, headers: &HeaderMap, now_ms: i64) -> Option<Principal> {
    let token = bearer(headers)?;
    if token.is_empty() {
        return None;
    }
    let default_org = cfg.default_org.clone().unwrap_or_default();
    if let Some(admin) = &cfg.admin_token
        && ct_eq(token, admin.expose())
    {
        let owner = header(headers, "x-crabbox-owner")
            .unwrap_or("unknown")
            .to_owned();
        let org = header(headers, "x-crabbox-org")
            .map(str::to_owned)
            .unwrap_or(default_org);
        return Some(Principal {
            kind: AuthKind::Admin,
            owner,
            org,
            admin: true,
        });
    }
    if let Some(shared) = &cfg.shared_token
        && ct_eq(token, shared.expose())
    {
        // The shared token's identity is pinned server side: caller-supplied
        // owner/org headers are ignored on purpose.
        return Some(Principal {
            kind: AuthKind::Shared,
            owner: cfg.pinned_shared_owner(),
            org: default_org,
            admin: false,
        });
    }
    if token.starts_with(USER_TOKEN_PREFIX) {
        let secret = user_token_key(cfg)?;
        let claims = verify_user_token(secret, token, now_ms / 1000)?;
        return Some(Principal {
            kind: AuthKind::User,
            owner: claims.owner,
            org: claims.org,
            admin: false,
        });
    }
    None
}

/// Prefix of signed user tokens.
pub const USER_TOKEN_PREFIX: &str = "cbxu_";

/// The HMAC key for user tokens, or `None` when the configuration forbids
/// user tokens (no secret, or a secret equal to the shared token).
fn user_token_key(cfg: &Config) -> Option<&Secret> {
    let secret = cfg.session_secret.as_ref()?;
    if let Some(shared) = &cfg.shared_token
        && secret == shared
    {
        return None;
    }
    Some(secret)
}

/// The identity carried by a verified user token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserClaims {
    /// Token owner.
    pub owner: String,
    /// Token org.
    pub org: String,
    /// Login name.
    pub login: String,
    /// Expiry, Unix seconds.
    pub exp: i64,
}

fn sign(secret: &Secret, payload: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes())
        .expect("hmac accepts any key length");
    mac.update(payload.as_bytes());
    URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
}

/// Issue a `cbxu_` token in the reference format (§4.2). The GitHub
/// credential field is omitted: our coordinator does not revalidate GitHub.
pub fn issue_user_token(
    secret: &Secret,
    owner: &str,
    org: &str,
    login: &str,
    iat: i64,
    ttl_secs: i64,
) -> String {
    // Field order follows the reference issuer (serde_json keeps insertion
    // order only with preserve_order, so build the object text by hand).
    let body = format!(
        "{{\"typ\":\"crabbox-user\",\"version\":3,\"ownerSource\":\"github-verified-email\",\"jti\":{},\"owner\":{},\"org\":{},\"login\":{},\"iat\":{},\"exp\":{}}}",
        json!(crate::ids::uuid_v4()),
        json!(owner),
        json!(org),
        json!(login),
        iat,
        iat + ttl_secs
    );
    let payload = URL_SAFE_NO_PAD.encode(body.as_bytes());
    let sig = sign(secret, &payload);
    format!("{USER_TOKEN_PREFIX}{payload}.{sig}")
}

/// Verify a `cbxu_` token: signature first (constant time), then claims.
pub fn verify_user_token(secret: &Secret, token: &str, now_s: i64) -> Option<UserClaims> {
    let rest = token.strip_prefix(USER_TOKEN_PREFIX)?;
    let mut parts = rest.split('.');
    let (payload, sig) = (parts.next()?, parts.next()?);
    if parts.next().is_some() || payload.is_empty() || sig.is_empty() {
        return None;
    }
    if !ct_eq(&sign(secret, payload), sig) {
        return None;
    }
    let bytes = URL_SAFE_NO_PAD.decode(payload).ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    let obj = v.as_object()?;
    let s = |k: &str| obj.get(k).and_then(Value::as_str).map(str::to_owned);
    let n = |k: &str| obj.get(k).and_then(Value::as_i64);
    if obj.contains_key("admin")
        || s("typ").as_deref() != Some("crabbox-user")
        || n("version") != Some(3)
        || s("ownerSource").as_deref() != Some("github-verified-email")
        || !crate::ids::is_uuid_v4(&s("jti")?)
    {
        return None;
    }
    // Our issuer omits the sealed GitHub credential; when present it must be a string.
    if obj.get("githubCredential").is_some_and(|c| !c.is_string()) {
        return None;
    }
    let (iat, exp) = (n("iat")?, n("exp")?);
    if iat <= 0 || iat > now_s + 60 || exp <= iat || exp <= now_s {
        return None;
    }
    Some(UserClaims {
        owner: s("owner")?,
        org: s("org")?,
        login: s("login")?,
        exp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trip_and_rejections() {
        let secret = Secret::new("s3cret");
        let t = issue_user_token(&secret, "a@example.com", "acme", "a", 1_000, 3_600);
        let c = verify_user_token(&secret, &t, 1_100).unwrap();
        assert_eq!(
            (c.owner.as_str(), c.org.as_str(), c.login.as_str()),
            ("a@example.com", "acme", "a")
        );
        assert!(verify_user_token(&secret, &t, 5_000).is_none(), "expired");
        assert!(
            verify_user_token(&Secret::new("other"), &t, 1_100).is_none(),
            "forged"
        );
        let mut tampered = t.clone();
        tampered.push('x');
        assert!(verify_user_token(&secret, &tampered, 1_100).is_none());
    }
}
