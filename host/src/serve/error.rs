//! The API's one error shape: a status and a JSON body
//! `{"error": {"kind", "message"}}`. Clients branch on `kind` (the Python
//! client raises it as `SandboxError.kind`), so a kind is never renamed.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::files::FileError;
use crate::SandboxError;

/// An API error: a status and a JSON body `{"error": {"kind", "message"}}`.
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

pub(super) type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub(super) fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
        }
    }

    /// 400 `bad-request`: the request itself is malformed (a body, a query
    /// or an option out of range), whatever the sandbox would say.
    pub(super) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad-request", message)
    }

    /// 503 `shutdown`: the server's grace period after SIGTERM ended while
    /// the command ran, so it was killed.
    pub(super) fn shutdown() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutdown",
            "the server shut down and its grace period ended: the command was killed",
        )
    }

    /// The stable name clients branch on and metrics count by.
    pub(super) fn kind(&self) -> &'static str {
        self.kind
    }

    /// The kind and message, for an error reported inside a 200 stream.
    pub(super) fn into_parts(self) -> (&'static str, String) {
        (self.kind, self.message)
    }
}

impl From<SandboxError> for ApiError {
    fn from(e: SandboxError) -> Self {
        let status = match &e {
            SandboxError::InvalidId(_) => StatusCode::BAD_REQUEST,
            SandboxError::Refused(_) => StatusCode::FORBIDDEN,
            SandboxError::NotFound(_) => StatusCode::NOT_FOUND,
            SandboxError::DockerUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            SandboxError::PolicyLoad(_) => StatusCode::UNPROCESSABLE_ENTITY,
            SandboxError::PolicyTrap(_) | SandboxError::Other(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiError::new(status, e.kind(), e.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        match e.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body-too-large",
                e.body_text(),
            ),
            // A missing `Content-Type: application/json` keeps axum's 415.
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "bad-request",
                e.body_text(),
            ),
            _ => ApiError::bad_request(e.body_text()),
        }
    }
}

impl From<axum::extract::rejection::BytesRejection> for ApiError {
    fn from(e: axum::extract::rejection::BytesRejection) -> Self {
        match e.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body-too-large",
                e.body_text(),
            ),
            _ => ApiError::bad_request(e.body_text()),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        ApiError::bad_request(e.body_text())
    }
}

/// A per-file error where one file is the whole answer (the raw routes):
/// its status says what happened, its kind is the protocol literal.
impl From<FileError> for ApiError {
    fn from(error: FileError) -> Self {
        let status = match error {
            FileError::FileNotFound => StatusCode::NOT_FOUND,
            FileError::PermissionDenied => StatusCode::FORBIDDEN,
            FileError::IsDirectory | FileError::InvalidPath => StatusCode::BAD_REQUEST,
            FileError::FileTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        };
        ApiError::new(status, error.as_str(), error.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({"error": {"kind": self.kind, "message": self.message}}));
        let mut response = (self.status, body).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            // RFC 9110: a 401 names the scheme the client should use.
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                "Bearer".parse().expect("static header"),
            );
        }
        response
    }
}
