//! The API's one error shape: a status and a JSON body
//! `{"error": {"kind", "message"}}`. Clients branch on `kind` (the Python
//! client raises it as `SandboxError.kind`), so a kind is never renamed.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use schemars::JsonSchema;
use serde::Serialize;

use crate::files::FileError;
use crate::SandboxError;

/// An API error: a status and a JSON body `{"error": {"kind", "message"}}`.
pub struct ApiError {
    status: StatusCode,
    kind: ErrorKind,
    message: String,
}

pub(super) type ApiResult<T> = Result<T, ApiError>;

/// What went wrong, as a stable word clients branch on (never renamed).
/// The sandbox's own kinds are hyphenated; a file's error, where one file
/// is the whole answer (`/files/raw`), is its per-file literal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub(super) enum ErrorKind {
    /// A thread, user or execution id outside the allow-list (400).
    InvalidId,
    /// The container engine did not answer in time, or failed (503).
    DockerUnavailable,
    /// The host or the policy refused the operation (403).
    Refused,
    /// No such container, backend, execution or route (404).
    NotFound,
    /// The policy component trapped; the call failed, the policy stays (500).
    PolicyTrap,
    /// A policy component failed to load or self-check (422).
    PolicyLoad,
    /// Anything else (500).
    Other,
    /// The request is malformed: its body, its query or an option out of
    /// range (400; 415 without a JSON content type; 411 without
    /// Content-Length on a raw upload).
    BadRequest,
    /// The body is over the server's limit (413).
    BodyTooLarge,
    /// A missing or wrong bearer token (401).
    Unauthorized,
    /// No token is set and the Host header is not an allowed name (403).
    ForbiddenHost,
    /// No token is set and the request came from a web page of another
    /// site: its Origin is not an allowed name (403).
    ForbiddenOrigin,
    /// The server holds as much transfer content as its budget allows:
    /// retry after the `Retry-After` seconds (503).
    Overloaded,
    /// The request body arrived slower than the server's minimum rate (408).
    RequestTimeout,
    /// The route does not take that method (405).
    MethodNotAllowed,
    /// The grace period after SIGTERM ended while the command ran; it was
    /// killed (503).
    Shutdown,
    /// `/files/raw`: nothing at the path (404).
    #[serde(rename = "file_not_found")]
    FileNotFound,
    /// `/files/raw`: the sandbox user may not read or write it (403).
    #[serde(rename = "permission_denied")]
    PermissionDenied,
    /// `/files/raw`: the path is a directory (400).
    #[serde(rename = "is_directory")]
    IsDirectory,
    /// `/files/raw`: the path fails the checks or is not a regular file (400).
    #[serde(rename = "invalid_path")]
    InvalidPath,
    /// `/files/raw`: the file is over `max_file_bytes` (413).
    #[serde(rename = "file_too_large")]
    FileTooLarge,
}

impl ErrorKind {
    /// The word on the wire, also the `kind` label of the error metrics.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidId => "invalid-id",
            ErrorKind::DockerUnavailable => "docker-unavailable",
            ErrorKind::Refused => "refused",
            ErrorKind::NotFound => "not-found",
            ErrorKind::PolicyTrap => "policy-trap",
            ErrorKind::PolicyLoad => "policy-load",
            ErrorKind::Other => "other",
            ErrorKind::BadRequest => "bad-request",
            ErrorKind::BodyTooLarge => "body-too-large",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::ForbiddenHost => "forbidden-host",
            ErrorKind::ForbiddenOrigin => "forbidden-origin",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::RequestTimeout => "request-timeout",
            ErrorKind::MethodNotAllowed => "method-not-allowed",
            ErrorKind::Shutdown => "shutdown",
            ErrorKind::FileNotFound => "file_not_found",
            ErrorKind::PermissionDenied => "permission_denied",
            ErrorKind::IsDirectory => "is_directory",
            ErrorKind::InvalidPath => "invalid_path",
            ErrorKind::FileTooLarge => "file_too_large",
        }
    }
}

/// Every error answer's body.
#[derive(Serialize, JsonSchema)]
#[schemars(rename = "Error")]
pub(super) struct ErrorReply {
    /// What went wrong.
    pub(super) error: ErrorDetail,
}

/// The `error` of an error answer.
#[derive(Serialize, JsonSchema)]
pub(super) struct ErrorDetail {
    /// The stable word to branch on.
    pub(super) kind: ErrorKind,
    /// For humans; its wording may change.
    pub(super) message: String,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
        }
    }

    /// 400 `bad-request`: the request itself is malformed (a body, a query
    /// or an option out of range), whatever the sandbox would say.
    pub(super) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorKind::BadRequest, message)
    }

    /// 500 `other`: a failure of the server itself.
    pub(super) fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, ErrorKind::Other, message)
    }

    /// 503 `shutdown`: the server's grace period after SIGTERM ended while
    /// the command ran, so it was killed.
    pub(super) fn shutdown() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Shutdown,
            "the server shut down and its grace period ended: the command was killed",
        )
    }

    /// 503 `overloaded`: the transfer budget is spent (`Retry-After` set).
    pub(super) fn overloaded(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Overloaded,
            message,
        )
    }

    /// The answer a request body's own failure calls for, when a cause in
    /// its chain is one the server raised: too slow (408), over the
    /// transfer budget (503).
    pub(super) fn from_body_error(error: &(dyn std::error::Error + 'static)) -> Option<Self> {
        let mut cause = Some(error);
        while let Some(e) = cause {
            if let Some(slow) = e.downcast_ref::<super::conn::BodyTooSlow>() {
                return Some(Self::new(
                    StatusCode::REQUEST_TIMEOUT,
                    ErrorKind::RequestTimeout,
                    slow.to_string(),
                ));
            }
            if let Some(over) = e.downcast_ref::<super::budget::OverBudget>() {
                return Some(Self::overloaded(over.to_string()));
            }
            cause = e.source();
        }
        None
    }

    /// The stable name clients branch on and metrics count by.
    pub(super) fn kind(&self) -> &'static str {
        self.kind.as_str()
    }

    /// The message, for humans.
    pub(super) fn message(&self) -> &str {
        &self.message
    }

    /// The body of the error, also the `error` line that ends a 200 stream.
    pub(super) fn into_detail(self) -> ErrorDetail {
        ErrorDetail {
            kind: self.kind,
            message: self.message,
        }
    }
}

impl From<SandboxError> for ApiError {
    fn from(e: SandboxError) -> Self {
        let (status, kind) = match &e {
            SandboxError::InvalidId(_) => (StatusCode::BAD_REQUEST, ErrorKind::InvalidId),
            SandboxError::Refused(_) => (StatusCode::FORBIDDEN, ErrorKind::Refused),
            SandboxError::NotFound(_) => (StatusCode::NOT_FOUND, ErrorKind::NotFound),
            SandboxError::DockerUnavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorKind::DockerUnavailable,
            ),
            SandboxError::PolicyLoad(_) => {
                (StatusCode::UNPROCESSABLE_ENTITY, ErrorKind::PolicyLoad)
            }
            SandboxError::PolicyTrap(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, ErrorKind::PolicyTrap)
            }
            SandboxError::Other(_) => (StatusCode::INTERNAL_SERVER_ERROR, ErrorKind::Other),
        };
        ApiError::new(status, kind, e.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        if let Some(cause) = ApiError::from_body_error(&e) {
            return cause;
        }
        match e.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorKind::BodyTooLarge,
                e.body_text(),
            ),
            // A missing `Content-Type: application/json` keeps axum's 415.
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                ErrorKind::BadRequest,
                e.body_text(),
            ),
            _ => ApiError::bad_request(e.body_text()),
        }
    }
}

impl From<axum::extract::rejection::BytesRejection> for ApiError {
    fn from(e: axum::extract::rejection::BytesRejection) -> Self {
        if let Some(cause) = ApiError::from_body_error(&e) {
            return cause;
        }
        match e.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorKind::BodyTooLarge,
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
        let (status, kind) = match error {
            FileError::FileNotFound => (StatusCode::NOT_FOUND, ErrorKind::FileNotFound),
            FileError::PermissionDenied => (StatusCode::FORBIDDEN, ErrorKind::PermissionDenied),
            FileError::IsDirectory => (StatusCode::BAD_REQUEST, ErrorKind::IsDirectory),
            FileError::InvalidPath => (StatusCode::BAD_REQUEST, ErrorKind::InvalidPath),
            FileError::FileTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, ErrorKind::FileTooLarge),
        };
        ApiError::new(status, kind, error.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind) = (self.status, self.kind);
        let body = Json(ErrorReply {
            error: self.into_detail(),
        });
        let mut response = (status, body).into_response();
        if status == StatusCode::UNAUTHORIZED {
            // RFC 9110: a 401 names the scheme the client should use.
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if kind == ErrorKind::Overloaded {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(super::budget::RETRY_AFTER_SECS),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_sandbox_error_keeps_the_kind_the_library_names_it_by() {
        for e in [
            SandboxError::InvalidId(String::new()),
            SandboxError::DockerUnavailable(String::new()),
            SandboxError::Refused(String::new()),
            SandboxError::NotFound(String::new()),
            SandboxError::PolicyTrap(String::new()),
            SandboxError::PolicyLoad(String::new()),
            SandboxError::Other(String::new()),
        ] {
            let kind = e.kind();
            assert_eq!(ApiError::from(e).kind(), kind);
        }
    }

    #[test]
    fn each_file_error_keeps_its_protocol_literal() {
        for e in [
            FileError::FileNotFound,
            FileError::PermissionDenied,
            FileError::IsDirectory,
            FileError::InvalidPath,
            FileError::FileTooLarge,
        ] {
            assert_eq!(ApiError::from(e).kind(), e.as_str());
        }
    }

    #[test]
    fn a_kind_serializes_as_the_word_metrics_count_it_by() {
        let kinds = [
            ErrorKind::InvalidId,
            ErrorKind::DockerUnavailable,
            ErrorKind::Refused,
            ErrorKind::NotFound,
            ErrorKind::PolicyTrap,
            ErrorKind::PolicyLoad,
            ErrorKind::Other,
            ErrorKind::BadRequest,
            ErrorKind::BodyTooLarge,
            ErrorKind::Unauthorized,
            ErrorKind::ForbiddenHost,
            ErrorKind::ForbiddenOrigin,
            ErrorKind::Overloaded,
            ErrorKind::RequestTimeout,
            ErrorKind::MethodNotAllowed,
            ErrorKind::Shutdown,
            ErrorKind::FileNotFound,
            ErrorKind::PermissionDenied,
            ErrorKind::IsDirectory,
            ErrorKind::InvalidPath,
            ErrorKind::FileTooLarge,
        ];
        for kind in kinds {
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.as_str());
        }
    }
}
