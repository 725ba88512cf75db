//! The JSON request bodies of the API, one type per shape. Their JSON
//! Schemas (schemars) are `openapi.json`'s component schemas of the same
//! name, which a test keeps equal.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use schemars::JsonSchema;
use serde::Deserialize;

use super::error::{ApiError, ApiResult};
use crate::exec::ExecOptions;
use crate::files::Upload;

/// The body of `POST /v1/threads/{thread_id}/exec` and `/exec/stream`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "ExecRequest")]
pub(super) struct ExecBody {
    /// Run with `sh -c` in `/workspace`.
    pub(super) command: String,
    /// Wall-clock limit in seconds, in (0, 86400); on expiry every process
    /// of the call is killed (exit 124, reason `timeout`).
    pub(super) timeout_secs: Option<f64>,
    /// Environment variables of the command.
    #[serde(default)]
    pub(super) env: BTreeMap<String, String>,
    /// The working directory: relative to `/workspace` or absolute under
    /// it; created when missing.
    pub(super) workdir: Option<String>,
    /// Bytes written to the command's stdin (UTF-8 text), then closed; not
    /// with `stdin_b64`.
    pub(super) stdin: Option<String>,
    /// stdin as base64, for bytes that are not text; not with `stdin`
    /// (both: 400).
    #[schemars(extend("format" = "byte"))]
    pub(super) stdin_b64: Option<String>,
    /// Your id for this execution (8..=64 of `[A-Za-z0-9_-]`), to cancel it
    /// with `DELETE /v1/executions/{id}`; a random one when absent.
    pub(super) execution_id: Option<String>,
    /// How output bytes are answered; `text` when absent.
    pub(super) encoding: Option<Encoding>,
}

/// How an exec answers the bytes its command printed. Anything but these
/// two words is a 400, not a silent fallback.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub(super) enum Encoding {
    /// Text only (invalid UTF-8 replaced): `stdout`, `stderr`, and streamed
    /// chunks as `data`.
    #[default]
    Text,
    /// The text, plus the exact bytes in base64: `stdout_b64` and
    /// `stderr_b64` beside `stdout` and `stderr`, and streamed chunks as
    /// `data_b64` instead of `data`.
    Base64,
}

impl ExecBody {
    /// The library's options, once the body's values are checked.
    pub(super) fn options(&self) -> ApiResult<ExecOptions> {
        let timeout = match self.timeout_secs {
            Some(t) if t > 0.0 && t.is_finite() && t < 86_400.0 => Some(Duration::from_secs_f64(t)),
            Some(_) => return Err(ApiError::bad_request("timeout_secs must be in (0, 86400)")),
            None => None,
        };
        let stdin = match (&self.stdin, &self.stdin_b64) {
            (Some(_), Some(_)) => {
                return Err(ApiError::bad_request("give stdin or stdin_b64, not both"))
            }
            (Some(text), None) => Some(text.clone().into_bytes()),
            (None, Some(encoded)) => Some(
                base64::engine::general_purpose::STANDARD
                    .decode(encoded.as_bytes())
                    .map_err(|e| ApiError::bad_request(format!("stdin_b64: base64: {e}")))?,
            ),
            (None, None) => None,
        };
        Ok(ExecOptions {
            timeout,
            env: self
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            workdir: self.workdir.clone(),
            stdin,
            execution_id: self.execution_id.clone(),
        })
    }

    pub(super) fn encoding(&self) -> Encoding {
        self.encoding.unwrap_or_default()
    }
}

/// The body of `PUT /v1/threads/{thread_id}/files`: at most 16 MiB of
/// content (decoded) per request; larger files go through `/files/raw`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "UploadRequest")]
pub(super) struct UploadBody {
    /// The files to write, each answered on its own.
    pub(super) files: Vec<UploadFile>,
}

/// One file of an upload batch.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct UploadFile {
    /// Absolute anywhere in the container, or relative to `/workspace`; the
    /// sandbox user's rights inside the container decide
    /// (`permission_denied` otherwise).
    pub(super) path: String,
    /// The whole content, base64.
    #[schemars(extend("format" = "byte"))]
    pub(super) content_b64: String,
    /// Permission bits (setuid, setgid and sticky are dropped); 0644 when
    /// absent.
    pub(super) mode: Option<u32>,
}

impl UploadBody {
    /// The library's uploads, each file's content decoded; bad base64 is a
    /// 400 naming the file.
    pub(super) fn into_uploads(self) -> ApiResult<Vec<Upload>> {
        self.files
            .into_iter()
            .map(|f| {
                let content = base64::engine::general_purpose::STANDARD
                    .decode(f.content_b64.as_bytes())
                    .map_err(|e| ApiError::bad_request(format!("{}: base64: {e}", f.path)))?;
                Ok(Upload {
                    path: f.path,
                    content,
                    mode: f.mode,
                })
            })
            .collect()
    }
}

/// The longest `max_age_secs` of a gc: ten years, as `sandbox gc --max-age`.
pub(super) const MAX_GC_AGE_SECS: u64 = 10 * 365 * 24 * 60 * 60;

/// The optional JSON body of `POST /v1/gc` (the same keys as its query).
/// Unknown keys are refused: a gc never runs on a body it did not read.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "GcRequest")]
pub(super) struct GcBody {
    /// Only report what would be removed; `true` here or in the query
    /// makes the run dry.
    pub(super) dry_run: Option<bool>,
    /// Also remove containers created longer ago than this many seconds
    /// (at most ten years); not with the query's `max_age_secs`.
    #[schemars(range(max = 315_360_000))]
    pub(super) max_age_secs: Option<u64>,
}
