//! The one error shape of the API: `{"error":{"code","message"}}` with the
//! status that fits.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use mediastore::Error;
use serde_json::json;

/// An error answered to a client.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code, e.g. `unknown_ref`.
    pub code: &'static str,
    /// What went wrong, for a human.
    pub message: String,
}

impl ApiError {
    /// An error with this status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400 `bad_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        use std::io::ErrorKind;
        let (status, code) = match &e {
            Error::InvalidRef { .. } => (StatusCode::BAD_REQUEST, "invalid_ref"),
            Error::InvalidPolicy { .. } => (StatusCode::BAD_REQUEST, "invalid_policy"),
            Error::InvalidScope { .. } => (StatusCode::BAD_REQUEST, "invalid_scope"),
            Error::InvalidConfig(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Error::UnknownRef(_) => (StatusCode::NOT_FOUND, "unknown_ref"),
            Error::FileVanished { .. } => (StatusCode::GONE, "file_vanished"),
            Error::File { source, .. } if source.kind() == ErrorKind::NotFound => {
                (StatusCode::NOT_FOUND, "file_not_found")
            }
            Error::File { .. } => (StatusCode::BAD_REQUEST, "bad_file"),
            Error::NotOwned { .. } => (StatusCode::FORBIDDEN, "not_owned"),
            Error::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Error::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            Error::QuotaExceeded { .. } | Error::Full(_) => {
                (StatusCode::INSUFFICIENT_STORAGE, "quota_exceeded")
            }
            Error::Io { source, .. } if source.kind() == ErrorKind::StorageFull => {
                (StatusCode::INSUFFICIENT_STORAGE, "storage_full")
            }
            Error::Io { .. } | Error::InUse { .. } | Error::Corrupt { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable")
            }
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        if status.is_server_error() {
            tracing::error!(error = %e, "request failed");
        }
        Self::new(status, code, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        let mut resp = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"mediastore\""),
            );
        }
        resp
    }
}

/// The code for a status the framework answered on its own (no route, bad
/// method, unreadable path).
pub fn code_for_status(status: StatusCode) -> &'static str {
    match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY | StatusCode::BAD_REQUEST => "bad_request",
        s if s.is_server_error() => "internal",
        _ => "error",
    }
}
