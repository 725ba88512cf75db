//! The data plane: what `execute` takes and returns, and the output cap.

use serde::{Deserialize, Serialize};

/// One command to run with `sh -c` in a backend's container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    pub command: String,
    /// Bytes of combined output kept; the rest is dropped and `truncated` set.
    pub output_limit: usize,
}

/// The result of `execute`, with deepagents' `ExecuteResponse` semantics:
/// stdout and stderr combined in arrival order, the exit code, and whether
/// the output was cut at the byte limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResponse {
    pub output: String,
    pub exit_code: i64,
    pub truncated: bool,
}

/// Collects output up to a byte cap; never holds more than the cap.
#[derive(Debug)]
pub struct CappedOutput {
    buf: Vec<u8>,
    limit: usize,
    truncated: bool,
}

impl CappedOutput {
    pub fn new(limit: usize) -> Self {
        CappedOutput {
            buf: Vec::with_capacity(limit.min(64 * 1024)),
            limit,
            truncated: false,
        }
    }

    pub fn push(&mut self, chunk: &[u8]) {
        let room = self.limit.saturating_sub(self.buf.len());
        if chunk.len() > room {
            self.truncated = true;
        }
        self.buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
    }

    /// The output as text (invalid UTF-8 replaced, including a character
    /// cut in half by the cap).
    pub fn finish(self, exit_code: i64) -> ExecResponse {
        ExecResponse {
            output: String::from_utf8_lossy(&self.buf).into_owned(),
            exit_code,
            truncated: self.truncated,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_over_the_cap_is_cut_and_flagged() {
        let mut out = CappedOutput::new(5);
        out.push(b"abc");
        out.push(b"defgh");
        let r = out.finish(0);
        assert_eq!(r.output, "abcde");
        assert!(r.truncated);
    }

    #[test]
    fn output_at_the_cap_is_not_truncated() {
        let mut out = CappedOutput::new(3);
        out.push(b"abc");
        out.push(b"");
        assert!(!out.finish(0).truncated);
    }
}
