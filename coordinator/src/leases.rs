//! Lease routes: registration, lookup (id or slug), list, heartbeat, release; expiry math.

use axum::Extension;
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use rusqlite::Connection;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use crate::app::Shared;
use crate::auth::Principal;
use crate::body::{Body, Field, OptField, SMALL, raw_value};
use crate::clock::{iso, parse_iso};
use crate::error::{ApiError, ApiResult};
use crate::ids::{is_registered_lease_id, normalize_slug};
use crate::model::Lease;
use crate::store;

/// Reference defaults (`worker/src/config.ts`).
const DEFAULT_TTL: i64 = 5400;
const DEFAULT_IDLE: i64 = 1800;
/// Idle timeouts and TTLs are clamped to one day.
const MAX_SECONDS: i64 = 86_400;
/// Telemetry samples kept per lease.
const TELEMETRY_HISTORY: usize = 60;
/// A heartbeat's `telemetry` sample as JSON text (refused beyond).
pub(crate) const TELEMETRY_CAP: usize = 16 * 1024;
/// Registration string fields: most are names (255 bytes); a host key or a
/// path may be longer. Longer values are refused `400 invalid_registration`.
const NAME_CAP: usize = 255;
const PATH_CAP: usize = 4096;
const HOST_KEY_CAP: usize = 16 * 1024;
/// `sshFallbackPorts` entries kept.
const FALLBACK_PORTS: usize = 16;

/// `PUT /v1/leases/{id}/registration` body.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RegisterBody<'a> {
    #[serde(borrow)]
    host: Option<Field<'a>>,
    #[serde(borrow)]
    provider: Option<Field<'a>>,
    #[serde(borrow)]
    target: Option<Field<'a>>,
    #[serde(borrow)]
    ssh_port: Option<Field<'a>>,
    #[serde(borrow)]
    ssh_fallback_ports: Option<PortList<'a>>,
    #[serde(borrow)]
    ttl_seconds: Option<Field<'a>>,
    #[serde(borrow)]
    idle_timeout_seconds: Option<Field<'a>>,
    #[serde(borrow)]
    slug: Option<Field<'a>>,
    #[serde(borrow)]
    windows_mode: Option<Field<'a>>,
    #[serde(borrow, rename = "cloudID")]
    cloud_id: Option<Field<'a>>,
    #[serde(borrow)]
    profile: Option<Field<'a>>,
    #[serde(borrow)]
    class: Option<Field<'a>>,
    #[serde(borrow)]
    server_type: Option<Field<'a>>,
    #[serde(borrow)]
    server_name: Option<Field<'a>>,
    #[serde(borrow)]
    ssh_user: Option<Field<'a>>,
    #[serde(borrow)]
    ssh_host_key: Option<Field<'a>>,
    #[serde(borrow)]
    work_root: Option<Field<'a>>,
    #[serde(borrow)]
    keep: Option<Field<'a>>,
}

/// `sshFallbackPorts`: an array of ports (strings or numbers), bounded.
#[derive(Default)]
struct PortList<'a> {
    items: Vec<Field<'a>>,
    present: bool,
    overflow: bool,
}

impl<'de: 'a, 'a> Deserialize<'de> for PortList<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = PortList<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list of ports")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out = PortList {
                    present: true,
                    ..PortList::default()
                };
                while let Some(item) = seq.next_element::<Field<'de>>()? {
                    if out.items.len() < FALLBACK_PORTS {
                        out.items.push(item);
                    } else {
                        out.overflow = true;
                    }
                }
                Ok(out)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                while map
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(PortList::default())
            }
            fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Self::Value, E> {
                Ok(PortList::default())
            }
            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(PortList::default())
            }
            fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(PortList::default())
            }
            fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(PortList::default())
            }
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(PortList::default())
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
                Ok(PortList::default())
            }
        }
        // Anything but an array means "no fallback ports", as before.
        d.deserialize_any(V)
    }
}

/// `GET /v1/leases` → `{"leases":[…]}`: the caller's leases (all for admins),
/// optionally filtered by `?state=`.
pub(crate) async fn list(
    State(st): State<Shared>,
    Extension(p): Extension<Principal>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> ApiResult<impl IntoResponse> {
    let all = st.store.call(|c| store::all_leases(c)).await?;
    let state = q
        .get("state")
        .filter(|s| !s.is_empty() && s.as_str() != "all")
        .cloned();
    let leases: Vec<Lease> = all
        .into_iter()
        .filter(|l| p.admin || p.owns(&l.owner, &l.org))
        .filter(|l| state.as_ref().is_none_or(|s| &l.state == s))
        .collect();
    Ok(Json(json!({ "leases": leases })))
}

/// `GET /v1/leases/{id-or-slug}` → `{"lease":…}` (owner visibility only, as the reference).
pub(crate) async fn get_one(
    State(st): State<Shared>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let now = st.clock.now_ms();
    let lease = st
        .store
        .call(move |c| Ok(resolve(c, &id, &p, false, now)))
        .await??;
    Ok(Json(json!({ "lease": lease })))
}

/// Resolve an id or slug to a lease the caller may see (§1.4).
///
/// `admin_mode` is true on mutating routes, where admins resolve any lease;
/// read routes pass false so an admin who is not the owner gets 404, like the reference.
pub(crate) fn resolve(
    c: &Connection,
    ident: &str,
    p: &Principal,
    admin_mode: bool,
    now: i64,
) -> ApiResult<Lease> {
    let visible = |l: &Lease| (admin_mode && p.admin) || p.owns(&l.owner, &l.org);
    if let Some(l) = store::get_lease(c, ident)? {
        return if visible(&l) {
            Ok(l)
        } else {
            Err(ApiError::not_found())
        };
    }
    let slug = normalize_slug(ident);
    if slug.is_empty() {
        return Err(ApiError::not_found());
    }
    let mut found: Vec<Lease> = store::live_by_slug(c, &slug, now)?
        .into_iter()
        .filter(visible)
        .collect();
    match found.len() {
        0 => Err(ApiError::not_found()),
        1 => Ok(found.remove(0)),
        _ => {
            let names: Vec<String> = found
                .iter()
                .map(|l| format!("{}:{}", l.id, l.owner))
                .collect();
            Err(ApiError::internal(format!(
                "ambiguous slug {slug}: {}",
                names.join(", ")
            )))
        }
    }
}

/// Expiry of a lease per §1.6 (registered: last touch + min(ttl, idle);
/// managed: min(created + ttl, touched + idle)); each side at least 1 s.
pub(crate) fn compute_expiry(l: &Lease) -> i64 {
    let ttl = l.ttl_seconds.max(1) * 1000;
    let idle = l.idle_timeout_seconds.max(1) * 1000;
    let created = parse_iso(&l.created_at).unwrap_or(0);
    let touched = l
        .last_touched_at
        .as_deref()
        .and_then(parse_iso)
        .unwrap_or(created);
    if l.lifecycle == "registered" {
        touched + ttl.min(idle)
    } else {
        (created + ttl).min(touched + idle)
    }
}

/// A trimmed, non-empty string field of at most `cap` bytes; longer is `400 invalid_registration`.
fn str_field(f: &Option<Field<'_>>, key: &str, cap: usize) -> ApiResult<Option<String>> {
    let Some(v) = f.str().map(str::trim).filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    if v.len() > cap {
        return Err(ApiError::bad_request(
            "invalid_registration",
            format!("{key} is {} bytes; the limit is {cap} bytes", v.len()),
        ));
    }
    Ok(Some(v.to_owned()))
}

fn int_field(f: &Option<Field<'_>>) -> Option<i64> {
    f.num().map(|f| f.trunc() as i64)
}

/// Whether a provider name has the reference's canonical form `^[a-z0-9][a-z0-9-]{1,63}$`.
fn is_provider_name(s: &str) -> bool {
    let b = s.as_bytes();
    (2..=64).contains(&b.len())
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

fn port_field(f: Option<&Field<'_>>, key: &str) -> Result<Option<String>, ApiError> {
    let raw = match f {
        None | Some(Field::Null) => return Ok(None),
        Some(Field::Str(s)) => s.trim().to_owned(),
        Some(Field::Num(n)) if n.fract() == 0.0 && n.abs() < 1e9 => (*n as i64).to_string(),
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_registration",
                format!("{key} must be a port"),
            ));
        }
    };
    match raw.parse::<u16>() {
        Ok(p) if p > 0 => Ok(Some(p.to_string())),
        _ => Err(ApiError::bad_request(
            "invalid_registration",
            format!("{key} must be a port"),
        )),
    }
}

/// `PUT /v1/leases/{id}/registration`: create (201) or refresh (200) a
/// registered lease, which needs no cloud provider (§8).
pub(crate) async fn register(
    State(st): State<Shared>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    body: Body<SMALL>,
) -> ApiResult<impl IntoResponse> {
    if !is_registered_lease_id(&id) {
        return Err(ApiError::bad_request(
            "invalid_lease_id",
            "lease id must match ^[A-Za-z0-9][A-Za-z0-9_.:-]{2,127}$",
        ));
    }
    let b: RegisterBody<'_> = body.json()?;
    let host = str_field(&b.host, "host", NAME_CAP)?
        .ok_or_else(|| ApiError::bad_request("invalid_registration", "host is required"))?;
    let provider = str_field(&b.provider, "provider", NAME_CAP)?
        .unwrap_or_else(|| "ssh".into())
        .to_ascii_lowercase();
    if !is_provider_name(&provider) {
        return Err(ApiError::bad_request(
            "invalid_provider",
            "provider must match ^[a-z0-9][a-z0-9-]{1,63}$",
        ));
    }
    let target = str_field(&b.target, "target", NAME_CAP)?.unwrap_or_else(|| "linux".into());
    if !matches!(target.as_str(), "linux" | "macos" | "windows") {
        return Err(ApiError::bad_request(
            "invalid_target",
            "target must be linux, macos or windows",
        ));
    }
    let ssh_port = port_field(b.ssh_port.as_ref(), "sshPort")?.unwrap_or_else(|| "22".into());
    let fallback = match &b.ssh_fallback_ports {
        Some(list) if list.present => {
            if list.overflow {
                return Err(ApiError::bad_request(
                    "invalid_registration",
                    format!("sshFallbackPorts holds at most {FALLBACK_PORTS} ports"),
                ));
            }
            let mut v = Vec::new();
            for item in &list.items {
                if let Some(port) = port_field(Some(item), "p")? {
                    v.push(port);
                }
            }
            Some(v)
        }
        _ => None,
    };
    let ttl = int_field(&b.ttl_seconds)
        .filter(|v| *v > 0)
        .unwrap_or(DEFAULT_TTL)
        .min(MAX_SECONDS);
    let idle = int_field(&b.idle_timeout_seconds)
        .filter(|v| *v > 0)
        .unwrap_or(DEFAULT_IDLE)
        .min(MAX_SECONDS);
    let slug = str_field(&b.slug, "slug", NAME_CAP)?
        .map(|s| normalize_slug(&s))
        .filter(|s| !s.is_empty());
    let windows_mode = str_field(&b.windows_mode, "windowsMode", NAME_CAP)?;
    let cloud_id = str_field(&b.cloud_id, "cloudID", NAME_CAP)?;
    let profile = str_field(&b.profile, "profile", NAME_CAP)?;
    let class = str_field(&b.class, "class", NAME_CAP)?;
    let server_type = str_field(&b.server_type, "serverType", NAME_CAP)?;
    let server_name = str_field(&b.server_name, "serverName", NAME_CAP)?;
    let ssh_user = str_field(&b.ssh_user, "sshUser", NAME_CAP)?;
    let ssh_host_key = str_field(&b.ssh_host_key, "sshHostKey", HOST_KEY_CAP)?;
    let work_root = str_field(&b.work_root, "workRoot", PATH_CAP)?;
    let keep = b.keep.bool().unwrap_or(false);
    drop(b);
    drop(body);
    let now = st.clock.now_ms();
    let now_iso = iso(now);
    let fresh = Lease {
        id: id.clone(),
        slug,
        provider,
        lifecycle: "registered".into(),
        target,
        windows_mode,
        cloud_id: cloud_id.unwrap_or_else(|| id.clone()),
        owner: p.owner.clone(),
        org: p.org.clone(),
        profile: profile.unwrap_or_else(|| "default".into()),
        class: class.unwrap_or_else(|| "registered".into()),
        server_type: server_type.unwrap_or_else(|| "registered".into()),
        server_id: 0,
        server_name: server_name.unwrap_or_else(|| host.clone()),
        provider_key: String::new(),
        host,
        ssh_user: ssh_user.unwrap_or_else(|| "crabbox".into()),
        ssh_port,
        ssh_fallback_ports: fallback,
        ssh_host_key,
        work_root: work_root.unwrap_or_else(|| "/work/crabbox".into()),
        keep,
        ttl_seconds: ttl,
        idle_timeout_seconds: idle,
        estimated_hourly_usd: 0.0,
        max_estimated_usd: 0.0,
        state: "active".into(),
        created_at: now_iso.clone(),
        updated_at: now_iso.clone(),
        last_touched_at: Some(now_iso.clone()),
        expires_at: String::new(),
        telemetry: None,
        telemetry_history: None,
        registered_at: Some(now_iso),
        released_at: None,
        ended_at: None,
    };
    let (status, lease) = st
        .store
        .call(move |c| {
            let tx = c.transaction()?;
            let existing = store::get_lease(&tx, &fresh.id)?;
            let (status, mut lease) = match existing {
                None => (StatusCode::CREATED, fresh),
                Some(old) if p.admin || p.owns(&old.owner, &old.org) => {
                    let mut l = fresh;
                    // A refresh keeps the lease's identity and history.
                    l.owner = old.owner;
                    l.org = old.org;
                    if old.state == "active" || old.state == "provisioning" {
                        l.created_at = old.created_at;
                        l.registered_at = old.registered_at;
                    }
                    l.telemetry = old.telemetry;
                    l.telemetry_history = old.telemetry_history;
                    (StatusCode::OK, l)
                }
                Some(_) => {
                    return Ok(Err(ApiError::conflict(
                        "lease_conflict",
                        "lease id is registered to another owner",
                    )));
                }
            };
            lease.expires_at = iso(compute_expiry(&lease));
            store::put_lease(&tx, &lease)?;
            tx.commit()?;
            Ok(Ok((status, lease)))
        })
        .await??;
    st.sweeper_wake.notify_one();
    st.changed(Some(&lease.id), None);
    Ok((status, Json(json!({ "lease": lease }))))
}

/// The fields of a heartbeat (HTTP body or control frame) and of a release.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub(crate) struct TouchBody<'a> {
    #[serde(borrow)]
    pub expected_provider: Option<Field<'a>>,
    #[serde(borrow)]
    pub idle_timeout_seconds: Option<Field<'a>>,
    #[serde(borrow)]
    pub telemetry: Option<&'a RawValue>,
}

/// `expectedProvider` as given.
#[derive(Debug, Clone)]
pub(crate) enum Expected {
    /// Absent, null or blank.
    Any,
    /// Not a string.
    Invalid,
    /// A provider name (still to be validated).
    Name(String),
}

/// A heartbeat's effect, owned so it can move to the database thread.
#[derive(Debug, Clone)]
pub(crate) struct Touch {
    expected: Expected,
    idle: Option<f64>,
    telemetry: Option<Value>,
}

impl TouchBody<'_> {
    /// Bound the request: telemetry over [`TELEMETRY_CAP`] is `413`.
    pub(crate) fn into_touch(self) -> ApiResult<Touch> {
        let expected = match &self.expected_provider {
            None | Some(Field::Null) => Expected::Any,
            Some(Field::Str(s)) if s.trim().is_empty() => Expected::Any,
            Some(Field::Str(s)) => Expected::Name(s.trim().chars().take(80).collect()),
            Some(_) => Expected::Invalid,
        };
        Ok(Touch {
            expected,
            idle: self.idle_timeout_seconds.num(),
            telemetry: raw_value("telemetry", self.telemetry, TELEMETRY_CAP)?,
        })
    }
}

/// Outcome codes of a heartbeat, shared by HTTP and the control socket.
pub(crate) async fn touch(
    st: &Shared,
    p: Principal,
    ident: String,
    body: Touch,
) -> ApiResult<Lease> {
    let now = st.clock.now_ms();
    let lease = st
        .store
        .call(move |c| {
            let tx = c.transaction()?;
            let out = touch_in(&tx, &p, &ident, &body, now);
            if out.is_ok() {
                tx.commit()?;
            }
            Ok(out)
        })
        .await??;
    // The idle override can move the deadline earlier; let the sweeper re-plan.
    st.sweeper_wake.notify_one();
    st.changed(Some(&lease.id), None);
    Ok(lease)
}

fn check_provider(expected: &Expected, lease: &Lease) -> ApiResult<()> {
    let bad = || {
        ApiError::bad_request(
            "invalid_expected_provider",
            "expectedProvider must be a provider name",
        )
    };
    let s = match expected {
        Expected::Any => return Ok(()),
        Expected::Invalid => return Err(bad()),
        Expected::Name(s) => s,
    };
    if !is_provider_name(s) {
        return Err(bad());
    }
    if *s != lease.provider {
        return Err(ApiError::conflict(
            "provider_identity_mismatch",
            "expectedProvider does not match the lease provider",
        ));
    }
    Ok(())
}

/// `409 lease_ended` / `409 lease_expired` for a lease that is no longer live.
pub(crate) fn check_live(lease: &Lease, now: i64) -> ApiResult<()> {
    if !lease.is_live() {
        return Err(ApiError::conflict("lease_ended", "lease has ended"));
    }
    if lease.expires_ms() <= now {
        return Err(ApiError::conflict("lease_expired", "lease has expired"));
    }
    Ok(())
}

fn touch_in(
    c: &Connection,
    p: &Principal,
    ident: &str,
    body: &Touch,
    now: i64,
) -> ApiResult<Lease> {
    let mut lease = resolve(c, ident, p, true, now)?;
    check_provider(&body.expected, &lease)?;
    check_live(&lease, now)?;
    if let Some(idle) = body.idle.filter(|f| *f >= 1.0) {
        lease.idle_timeout_seconds = (idle.trunc() as i64).min(MAX_SECONDS);
    }
    if let Some(sample) = body
        .telemetry
        .as_ref()
        .and_then(|t| sanitize_telemetry(t, now))
    {
        let hist = lease.telemetry_history.get_or_insert_with(Vec::new);
        let at = sample.get("capturedAt").cloned();
        hist.retain(|s| s.get("capturedAt") != at.as_ref());
        hist.push(sample.clone());
        if hist.len() > TELEMETRY_HISTORY {
            let cut = hist.len() - TELEMETRY_HISTORY;
            hist.drain(..cut);
        }
        lease.telemetry = Some(sample);
    }
    let now_iso = iso(now);
    lease.updated_at = now_iso.clone();
    lease.last_touched_at = Some(now_iso);
    lease.expires_at = iso(compute_expiry(&lease));
    store::put_lease(c, &lease)?;
    Ok(lease)
}

/// Sanitise a telemetry sample as the reference does (§1.7); `None` when it has no metric.
pub(crate) fn sanitize_telemetry(t: &Value, now: i64) -> Option<Value> {
    let t = t.as_object()?;
    let mut out = Map::new();
    let captured = t
        .get("capturedAt")
        .and_then(Value::as_str)
        .filter(|s| parse_iso(s).is_some());
    out.insert(
        "capturedAt".into(),
        json!(captured.map(str::to_owned).unwrap_or_else(|| iso(now))),
    );
    if let Some(src) = t.get("source").and_then(Value::as_str) {
        let src: String = src.trim().chars().take(32).collect();
        if !src.is_empty() {
            out.insert("source".into(), json!(src));
        }
    }
    const MAX_SAFE: f64 = 9_007_199_254_740_991.0;
    let mut metrics = 0;
    for key in [
        "load1",
        "load5",
        "load15",
        "cpuCount",
        "memoryUsedBytes",
        "memoryTotalBytes",
        "memoryPercent",
        "diskUsedBytes",
        "diskTotalBytes",
        "diskPercent",
        "uptimeSeconds",
    ] {
        let Some(v) = t
            .get(key)
            .and_then(Value::as_f64)
            .filter(|v| v.is_finite() && *v >= 0.0)
        else {
            continue;
        };
        let v = match key {
            "load1" | "load5" | "load15" => json!(v.min(10_000.0)),
            "memoryPercent" | "diskPercent" => json!(v.min(100.0)),
            "cpuCount" if v >= 1.0 => json!(v.trunc() as i64),
            "cpuCount" => continue,
            _ => json!(v.trunc().min(MAX_SAFE) as i64),
        };
        out.insert(key.into(), v);
        metrics += 1;
    }
    (metrics > 0).then_some(Value::Object(out))
}

/// `POST /v1/leases/{id-or-slug}/heartbeat` → `{"lease":…}`.
pub(crate) async fn heartbeat(
    State(st): State<Shared>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    body: Body<SMALL>,
) -> ApiResult<impl IntoResponse> {
    let touch_body = body.json::<TouchBody<'_>>()?.into_touch()?;
    drop(body);
    let lease = touch(&st, p, id, touch_body).await?;
    Ok(Json(json!({ "lease": lease })))
}

/// `POST /v1/leases/{id-or-slug}/release` → `{"lease":…}`; closes the lease's
/// bridges `1008 "lease ended"` and forgets its egress state.
pub(crate) async fn release(
    State(st): State<Shared>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    body: Body<SMALL>,
) -> ApiResult<impl IntoResponse> {
    let body = body.json::<TouchBody<'_>>()?.into_touch()?;
    let now = st.clock.now_ms();
    let lease = st
        .store
        .call(move |c| {
            let tx = c.transaction()?;
            let out = (|| -> ApiResult<Lease> {
                let mut lease = resolve(&tx, &id, &p, true, now)?;
                check_provider(&body.expected, &lease)?;
                if lease.is_live() {
                    let now_iso = iso(now);
                    lease.state = "released".into();
                    lease.updated_at = now_iso.clone();
                    lease.released_at = Some(now_iso.clone());
                    lease.ended_at = Some(now_iso);
                    store::put_lease(&tx, &lease)?;
                }
                store::clear_egress(&tx, &lease.id)?;
                Ok(lease)
            })();
            if out.is_ok() {
                tx.commit()?;
            }
            Ok(out)
        })
        .await??;
    st.egress.end_lease(&lease.id, 1008, "lease ended").await;
    st.changed(Some(&lease.id), None);
    Ok(Json(json!({ "lease": lease })))
}
