//! The JSON answers of the API, one type per shape (the error shape is in
//! `error`). Their JSON Schemas (schemars) are `openapi.json`'s component
//! schemas of the same name, which a test keeps equal; the Python client
//! (`clients/python`) reads these keys.

use base64::Engine as _;
use schemars::JsonSchema;
use serde::Serialize;

use super::error::ErrorDetail;
use super::requests::Encoding;
use crate::exec::{ExecResponse, StreamKind};
use crate::files::{DownloadResult, FileError, UploadResult};
use crate::{BackendView, GcEntry};

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// An exec's answer: the response as the library gives it, plus each
/// stream's exact bytes in base64 when the request asked for
/// `"encoding": "base64"`.
#[derive(Serialize, JsonSchema)]
#[schemars(rename = "ExecResponse")]
pub(super) struct ExecReply {
    #[serde(flatten)]
    response: ExecResponse,
    /// With encoding `base64` only: the exact bytes `stdout` was decoded
    /// from (a truncation marker between head and tail when `truncated`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "byte"))]
    stdout_b64: Option<String>,
    /// With encoding `base64` only: the exact bytes of `stderr`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "byte"))]
    stderr_b64: Option<String>,
}

impl ExecReply {
    pub(super) fn new(response: ExecResponse, encoding: Encoding) -> Self {
        let (stdout_b64, stderr_b64) = match encoding {
            Encoding::Text => (None, None),
            Encoding::Base64 => (
                Some(b64(&response.stdout_bytes)),
                Some(b64(&response.stderr_bytes)),
            ),
        };
        ExecReply {
            response,
            stdout_b64,
            stderr_b64,
        }
    }
}

/// One NDJSON line of a streamed exec: `started` first, then `output`
/// lines, and last `exit` or `error`.
#[derive(Serialize, JsonSchema)]
#[serde(tag = "type", rename_all = "lowercase")]
pub(super) enum StreamLine {
    /// First: the execution's id, to cancel it by
    /// (`DELETE /v1/executions/{id}`).
    Started {
        /// The execution's id.
        execution_id: String,
    },
    /// A chunk of live output: `data` as text, or `data_b64` in base64
    /// mode (exactly one of them). A reader too slow for the live output
    /// loses chunks, counted in a last note on stderr; the `exit` line
    /// always has the (capped) output.
    Output {
        /// The stream the chunk came from.
        stream: StreamKind,
        /// The chunk as text (encoding `text`).
        #[serde(skip_serializing_if = "Option::is_none")]
        data: Option<String>,
        /// The chunk's exact bytes (encoding `base64`).
        #[serde(skip_serializing_if = "Option::is_none")]
        #[schemars(extend("format" = "byte"))]
        data_b64: Option<String>,
    },
    /// Last, when the command ended: the answer of the plain exec.
    Exit(ExecReply),
    /// Last, when the command could not run to its end (e.g. `shutdown`).
    Error(ErrorDetail),
}

impl StreamLine {
    /// A chunk of live output, encoded as the request asked.
    pub(super) fn output(stream: StreamKind, bytes: &[u8], encoding: Encoding) -> Self {
        let (data, data_b64) = match encoding {
            Encoding::Text => (Some(String::from_utf8_lossy(bytes).into_owned()), None),
            Encoding::Base64 => (None, Some(b64(bytes))),
        };
        StreamLine::Output {
            stream,
            data,
            data_b64,
        }
    }
}

/// The answer of `PUT /v1/threads/{thread_id}/files`.
#[derive(Serialize, JsonSchema)]
#[schemars(rename = "UploadResponse")]
pub(super) struct Uploaded {
    /// One result per file, in the order of the request.
    pub(super) results: Vec<UploadResult>,
}

/// The answer of `GET /v1/threads/{thread_id}/files`.
#[derive(Serialize, JsonSchema)]
#[schemars(rename = "DownloadResponse")]
pub(super) struct Downloaded {
    /// One result per path, in the order of the request.
    pub(super) results: Vec<DownloadedFile>,
}

/// One file of a download batch: its content, or why not.
#[derive(Serialize, JsonSchema)]
pub(super) struct DownloadedFile {
    /// The path as it was requested.
    path: String,
    /// The whole file in base64; null when it was not downloaded.
    #[schemars(extend("format" = "byte"))]
    content_b64: Option<String>,
    /// The file's permission bits; null when it was not downloaded.
    mode: Option<u32>,
    /// Why the file was not downloaded; null when it was.
    error: Option<FileError>,
}

impl DownloadedFile {
    /// A path with nothing at it (no running container holds it).
    pub(super) fn not_found(path: String) -> Self {
        DownloadedFile {
            path,
            content_b64: None,
            mode: None,
            error: Some(FileError::FileNotFound),
        }
    }
}

impl From<DownloadResult> for DownloadedFile {
    fn from(r: DownloadResult) -> Self {
        DownloadedFile {
            path: r.path,
            content_b64: r.content.map(|c| b64(&c)),
            mode: r.mode,
            error: r.error,
        }
    }
}

/// The answer of `PUT /v1/threads/{thread_id}/files/raw`: the file was
/// written.
#[derive(Serialize, JsonSchema)]
pub(super) struct Written {
    /// The path as it was requested.
    pub(super) path: String,
    /// Bytes written (the request's Content-Length).
    pub(super) size: u64,
}

/// The answer of the destroy routes.
#[derive(Serialize, JsonSchema)]
pub(super) struct Destroyed {
    /// Whether a backend was there to destroy (false: nothing to do).
    pub(super) destroyed: bool,
}

/// The answer of `DELETE /v1/executions/{execution_id}`.
#[derive(Serialize, JsonSchema)]
pub(super) struct Cancelled {
    /// Always true: an unknown execution is a 404.
    pub(super) cancelled: bool,
}

/// The answer of `GET /v1/backends`.
#[derive(Serialize, JsonSchema)]
pub(super) struct Backends {
    /// The running policy.
    pub(super) policy: String,
    /// The managed containers.
    pub(super) backends: Vec<BackendView>,
}

/// The answer of `POST /v1/gc`.
#[derive(Serialize, JsonSchema)]
#[schemars(rename = "GcReport")]
pub(super) struct Collected {
    /// Whether the run only reported what it would remove.
    pub(super) dry_run: bool,
    /// What was removed (or, in a dry run, would be).
    pub(super) containers: Vec<GcEntry>,
}

/// The running policy (`GET /v1/policy`, and the answer of a swap).
#[derive(Serialize, JsonSchema)]
#[schemars(rename = "Policy")]
pub(super) struct PolicyName {
    /// The policy's name (its label).
    pub(super) policy: String,
}

/// The answer of `GET /healthz`.
#[derive(Serialize, JsonSchema)]
pub(super) struct Health {
    /// `ok`, or `degraded` (with status 503) when the engine does not
    /// answer.
    pub(super) status: HealthStatus,
    /// `ok`, or why the engine does not answer.
    pub(super) engine: String,
    /// The running policy.
    pub(super) policy: String,
}

/// Whether the server can serve.
#[derive(Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub(super) enum HealthStatus {
    Ok,
    Degraded,
}
