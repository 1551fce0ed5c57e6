//! Request bodies: read under a process-wide budget of body bytes in flight,
//! then parsed into typed, bounded shapes that never build a JSON tree.
//!
//! A `serde_json::Value` costs tens of bytes per JSON token, so a 31 MiB body
//! of `[],[],…` becomes gigabytes. Here every field is a [`Field`] (a scalar
//! kept, anything else skipped without allocating), a [`StrList`] (bounded
//! count and bytes), a [`LogText`] (concatenated into one capped string) or a
//! borrowed raw JSON span with a byte cap; unknown fields are skipped.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};
use futures_util::StreamExt;
use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use tokio::sync::OwnedSemaphorePermit;

use crate::app::Shared;
use crate::error::{ApiError, ApiResult};

/// Body limit of ordinary JSON routes.
pub(crate) const SMALL: usize = 1024 * 1024;
/// Body limit of `finish`, which carries the run log (8 MiB after decoding;
/// JSON escaping can more than double it).
pub(crate) const LARGE: usize = 32 * 1024 * 1024;

/// The whole body must arrive within this long.
const BODY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

/// A request body read whole (at most `MAX` bytes), holding its share of the
/// budget of body bytes in flight until it is dropped.
pub(crate) struct Body<const MAX: usize> {
    bytes: Bytes,
    is_json: bool,
    _budget: OwnedSemaphorePermit,
}

fn too_large(what: &str, len: usize, max: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("{what} is {len} bytes; the limit is {max} bytes"),
    )
}

impl<const MAX: usize> FromRequest<Shared> for Body<MAX> {
    type Rejection = ApiError;

    async fn from_request(req: Request, st: &Shared) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().contains("application/json"));
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<usize>().ok());
        if let Some(n) = declared
            && n > MAX
        {
            return Err(too_large("request body", n, MAX));
        }
        // Reserve the declared length (or the route's limit when the length
        // is unknown) before reading a byte: concurrent large bodies queue
        // here instead of all being held at once.
        let want = declared.unwrap_or(MAX).max(1);
        let budget = st.body_budget.clone();
        let permit = tokio::time::timeout(
            st.cfg.limits.body_wait,
            budget.acquire_many_owned(u32::try_from(want).unwrap_or(u32::MAX)),
        )
        .await
        .ok()
        .and_then(Result::ok)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "too many large request bodies in flight; retry",
            )
        })?;
        // Read into one buffer sized from the declared length: no second
        // copy of the body while it is assembled.
        let mut buf = Vec::with_capacity(declared.unwrap_or(0));
        let mut stream = req.into_body().into_data_stream();
        // A body that trickles in would hold its share of the budget: the
        // whole body must arrive within the deadline.
        let read = async {
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|_| {
                    ApiError::bad_request("invalid_request", "request body could not be read")
                })?;
                if buf.len() + chunk.len() > MAX {
                    return Err(too_large("request body", buf.len() + chunk.len(), MAX));
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(())
        };
        tokio::time::timeout(BODY_DEADLINE, read)
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    "request body not received in time",
                )
            })??;
        Ok(Self {
            bytes: Bytes::from(buf),
            is_json,
            _budget: permit,
        })
    }
}

impl<const MAX: usize> Body<MAX> {
    /// The raw body (the portal's form posts).
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The body as `T`, honoured only with a JSON content type (as the
    /// reference's `optionalJson`); an empty or non-JSON body is `T::default()`.
    /// Malformed JSON is a 500 as in the reference; a non-object is a 400.
    pub(crate) fn json<'a, T: Deserialize<'a> + Default>(&'a self) -> ApiResult<T> {
        let first = self.bytes.iter().find(|b| !b.is_ascii_whitespace());
        if !self.is_json || first.is_none() {
            return Ok(T::default());
        }
        parse_object(&self.bytes)
    }
}

/// Parse a JSON object into `T`.
pub(crate) fn parse_object<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> ApiResult<T> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        // Still reject malformed text the way the reference does.
        return match serde_json::from_slice::<IgnoredAny>(bytes) {
            Ok(_) => Err(ApiError::bad_request(
                "invalid_request",
                "request body must be a JSON object",
            )),
            Err(_) => Err(ApiError::internal("invalid JSON body")),
        };
    }
    serde_json::from_slice(bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => {
            ApiError::bad_request("invalid_request", format!("request body: {e}"))
        }
        _ => ApiError::internal("invalid JSON body"),
    })
}

/// Refuse a raw JSON field longer than `max` bytes with 413, else parse it.
pub(crate) fn raw_value(
    name: &str,
    raw: Option<&RawValue>,
    max: usize,
) -> ApiResult<Option<serde_json::Value>> {
    let Some(raw) = raw else { return Ok(None) };
    if raw.get().len() > max {
        return Err(too_large(name, raw.get().len(), max));
    }
    let v: serde_json::Value =
        serde_json::from_str(raw.get()).map_err(|_| ApiError::internal("invalid JSON body"))?;
    Ok((!v.is_null()).then_some(v))
}

/// One JSON value where a scalar is expected: strings are borrowed from the
/// body when unescaped, numbers and booleans kept, anything else skipped
/// without allocating (so wrong types are ignored, as the reference does).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Field<'a> {
    Str(Cow<'a, str>),
    Num(f64),
    Bool(bool),
    Null,
    Other,
}

impl Field<'_> {
    /// The string, if this is one.
    pub fn str(&self) -> Option<&str> {
        match self {
            Self::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The number, if this is a finite one.
    pub fn num(&self) -> Option<f64> {
        match self {
            Self::Num(n) if n.is_finite() => Some(*n),
            _ => None,
        }
    }

    /// The boolean, if this is one.
    pub fn bool(&self) -> Option<bool> {
        match self {
            Self::Bool(b) => Some(*b),
            _ => None,
        }
    }
}

/// Accessors on an optional field.
pub(crate) trait OptField {
    fn str(&self) -> Option<&str>;
    fn num(&self) -> Option<f64>;
    fn bool(&self) -> Option<bool>;
}

impl OptField for Option<Field<'_>> {
    fn str(&self) -> Option<&str> {
        self.as_ref().and_then(Field::str)
    }
    fn num(&self) -> Option<f64> {
        self.as_ref().and_then(Field::num)
    }
    fn bool(&self) -> Option<bool> {
        self.as_ref().and_then(Field::bool)
    }
}

struct FieldVisitor;

impl<'de> Visitor<'de> for FieldVisitor {
    type Value = Field<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Field::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Field::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Field::Str(Cow::Owned(v)))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Field::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Field::Num(v as f64))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Field::Num(v as f64))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Field::Num(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Field::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Field::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Field::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Field::Other)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Field<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(FieldVisitor)
    }
}

/// A list of strings (or one string) with at most `N` items and `B` bytes;
/// items past either bound are skipped and counted in `overflow`.
/// Non-string items are ignored.
#[derive(Debug, Default, Clone)]
pub(crate) struct StrList<'a, const N: usize, const B: usize> {
    pub items: Vec<Cow<'a, str>>,
    /// String items dropped by the bounds.
    pub overflow: usize,
}

struct ListVisitor<'a, const N: usize, const B: usize>(PhantomData<&'a ()>);

impl<'de, const N: usize, const B: usize> Visitor<'de> for ListVisitor<'de, N, B> {
    type Value = StrList<'de, N, B>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of strings")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = StrList {
            items: Vec::new(),
            overflow: 0,
        };
        let mut bytes = 0;
        while let Some(item) = seq.next_element::<Field<'de>>()? {
            if let Field::Str(s) = item {
                if out.items.len() < N && bytes + s.len() <= B {
                    bytes += s.len();
                    out.items.push(s);
                } else {
                    out.overflow += 1;
                }
            }
        }
        Ok(out)
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        self.one(Cow::Borrowed(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        self.one(Cow::Owned(v.to_owned()))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(StrList::default())
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(StrList::default())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(StrList::default())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(StrList::default())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(StrList::default())
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(StrList::default())
    }
}

impl<'de, const N: usize, const B: usize> ListVisitor<'de, N, B> {
    fn one<E: de::Error>(self, s: Cow<'de, str>) -> Result<StrList<'de, N, B>, E> {
        let fits = s.len() <= B && N > 0;
        Ok(StrList {
            overflow: usize::from(!fits),
            items: if fits { vec![s] } else { Vec::new() },
        })
    }
}

impl<'de: 'a, 'a, const N: usize, const B: usize> Deserialize<'de> for StrList<'a, N, B> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ListVisitor(PhantomData))
    }
}

/// A run log sent as `logChunks` (an array of strings, concatenated) or `log`,
/// kept up to `CAP` bytes (UTF-8 safe); the rest is dropped and `truncated`
/// set, exactly as the reference stores logs.
#[derive(Debug, Default)]
pub(crate) struct LogText<const CAP: usize> {
    pub text: String,
    pub truncated: bool,
    /// Whether any string was present (an empty array falls back to `log`).
    pub present: bool,
}

impl<const CAP: usize> LogText<CAP> {
    fn push(&mut self, s: &str) {
        self.present = true;
        let room = CAP - self.text.len();
        if s.len() <= room {
            self.text.push_str(s);
        } else {
            self.text.push_str(crate::runs::truncate_utf8(s, room));
            self.truncated = true;
        }
    }
}

struct LogVisitor<const CAP: usize>;

impl<'de, const CAP: usize> Visitor<'de> for LogVisitor<CAP> {
    type Value = LogText<CAP>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("log text")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = LogText::default();
        let mut any = false;
        while let Some(item) = seq.next_element::<Field<'de>>()? {
            if let Field::Str(s) = item {
                any = true;
                if !s.is_empty() {
                    out.push(&s);
                }
            }
        }
        out.present = any;
        Ok(out)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        let mut out = LogText::default();
        out.push(v);
        Ok(out)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(LogText::default())
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(LogText::default())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(LogText::default())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(LogText::default())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(LogText::default())
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(LogText::default())
    }
}

impl<'de, const CAP: usize> Deserialize<'de> for LogText<CAP> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(LogVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Default, Debug)]
    struct Probe<'a> {
        #[serde(borrow)]
        a: Option<Field<'a>>,
        #[serde(borrow)]
        list: Option<StrList<'a, 2, 8>>,
        log: Option<LogText<5>>,
        #[serde(borrow)]
        raw: Option<&'a RawValue>,
    }

    #[test]
    fn fields_are_lenient_and_bounded() {
        let p: Probe<'_> = parse_object(
            br#"{"a":[[],[],{}],"list":["ab","cd","ef"],"log":["abc","def"],"raw":{"x":1},"junk":[[],[]]}"#,
        )
        .unwrap();
        assert_eq!(p.a, Some(Field::Other));
        let list = p.list.unwrap();
        assert_eq!((list.items.len(), list.overflow), (2, 1));
        let log = p.log.unwrap();
        assert_eq!((log.text.as_str(), log.truncated), ("abcde", true));
        assert_eq!(p.raw.unwrap().get(), r#"{"x":1}"#);
        let p: Probe<'_> = parse_object(br#"{"a":"x\ny"}"#).unwrap();
        assert_eq!(p.a.str(), Some("x\ny"));
        assert!(parse_object::<Probe<'_>>(b"[1]").unwrap_err().status == StatusCode::BAD_REQUEST);
        assert!(
            parse_object::<Probe<'_>>(b"{").unwrap_err().status
                == StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}
