//! The `{"error","message"}` error shape every route answers with (protocol §1.3).

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An HTTP error answer: a status, a machine code and an optional human message.
///
/// The reference omits `message` for `not_found`, `unauthorized` and uncaught
/// errors, so `message` is optional and only serialised when present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status of the answer.
    pub status: StatusCode,
    /// Machine-readable code, the `error` field.
    pub code: String,
    /// Human-readable text, the `message` field.
    pub message: Option<String>,
}

impl ApiError {
    /// An error with both `error` and `message`.
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            code: code.to_owned(),
            message: Some(message.into()),
        }
    }

    /// An error with only the `error` field.
    pub fn bare(status: StatusCode, code: impl Into<String>) -> Self {
        Self {
            status,
            code: code.into(),
            message: None,
        }
    }

    /// `404 {"error":"not_found"}`.
    pub fn not_found() -> Self {
        Self::bare(StatusCode::NOT_FOUND, "not_found")
    }

    /// `401 {"error":"unauthorized"}`.
    pub fn unauthorized() -> Self {
        Self::bare(StatusCode::UNAUTHORIZED, "unauthorized")
    }

    /// `403 {"error":"forbidden","message":"lease manage access required"}`.
    pub fn forbidden_manage() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "lease manage access required",
        )
    }

    /// `400 {"error":<code>,"message":…}` for a request we cannot use.
    pub fn bad_request(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// `409` with a code and message.
    pub fn conflict(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    /// An internal failure: `500 {"error":"<text>"}` with no `message`, as the
    /// reference does for uncaught errors. The text must never hold a secret.
    pub fn internal(text: impl Into<String>) -> Self {
        Self::bare(StatusCode::INTERNAL_SERVER_ERROR, text)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.message {
            Some(m) => write!(f, "{} {}: {}", self.status.as_u16(), self.code, m),
            None => write!(f, "{} {}", self.status.as_u16(), self.code),
        }
    }
}

impl std::error::Error for ApiError {}

impl From<anyhow::Error> for ApiError {
    fn from(err: anyhow::Error) -> Self {
        // Storage errors carry no secrets (tokens never reach SQL), but we
        // still log the detail and answer with a generic code.
        tracing::error!(err = %format!("{err:#}"), "internal error");
        Self::internal("internal_error")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = match self.message {
            Some(m) => json!({ "error": self.code, "message": m }),
            None => json!({ "error": self.code }),
        };
        (self.status, Json(body)).into_response()
    }
}

/// Result type of route handlers.
pub type ApiResult<T> = Result<T, ApiError>;
