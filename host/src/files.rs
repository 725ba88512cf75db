//! File transfer in and out of a backend's workspace, with deepagents'
//! batch semantics: one result per file, typed per-file errors.
//!
//! Paths (absolute under `/workspace`, or relative to it) are checked
//! lexically by the host, then resolved *inside the container* as the
//! sandbox user (symlinks that leave `/workspace` are refused, permissions
//! are the sandbox user's); bytes move as tar through the Docker API, never
//! by following paths on the host.

use serde::{Deserialize, Serialize};

use crate::exec::resolve_workdir;
use crate::plan::WORKSPACE_MOUNT;

/// deepagents' `FileOperationError`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileError {
    FileNotFound,
    PermissionDenied,
    IsDirectory,
    InvalidPath,
}

impl FileError {
    fn parse(word: &str) -> Option<Self> {
        Some(match word {
            "file_not_found" => FileError::FileNotFound,
            "permission_denied" => FileError::PermissionDenied,
            "is_directory" => FileError::IsDirectory,
            "invalid_path" => FileError::InvalidPath,
            _ => return None,
        })
    }
}

/// One file to upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    pub path: String,
    pub content: Vec<u8>,
    /// Unix permission bits; 0o644 when `None`.
    pub mode: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadResult {
    pub path: String,
    pub error: Option<FileError>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownloadResult {
    pub path: String,
    pub content: Option<Vec<u8>>,
    /// Unix permission bits of the file, when downloaded.
    pub mode: Option<u32>,
    pub error: Option<FileError>,
}

/// The absolute in-container path of a file, or `invalid_path`.
pub fn resolve_file_path(path: &str) -> Result<String, FileError> {
    if path.is_empty() || path.chars().any(char::is_control) || path.ends_with('/') {
        return Err(FileError::InvalidPath);
    }
    match resolve_workdir(Some(path)) {
        Ok(p) if p != WORKSPACE_MOUNT => Ok(p),
        _ => Err(FileError::InvalidPath),
    }
}

/// Resolves upload targets in the container as the sandbox user: creates
/// missing parent directories (only under `/workspace`), and prints one
/// line per path: `ok <resolved parent>` or an error word.
pub const UPLOAD_CHECK: &str = r#"
for p in "$@"; do
  d=${p%/*}; a=$d
  while [ ! -e "$a" ] && [ -n "$a" ]; do a=${a%/*}; done
  ra=$(readlink -f "${a:-/}")
  case "$ra/" in /workspace/*) ;; *) echo invalid_path; continue ;; esac
  mkdir -p "$d" 2>/dev/null || { echo permission_denied; continue; }
  rd=$(readlink -f "$d")
  case "$rd/" in /workspace/*) ;; *) echo invalid_path; continue ;; esac
  if [ -L "$p" ]; then
    rp=$(readlink -f "$p")
    case "$rp" in /workspace/*) ;; *) echo invalid_path; continue ;; esac
  fi
  [ -d "$p" ] && { echo is_directory; continue; }
  [ -e "$p" ] && [ ! -w "$p" ] && { echo permission_denied; continue; }
  [ -w "$rd" ] || { echo permission_denied; continue; }
  echo "ok $rd"
done
"#;

/// Resolves download sources in the container as the sandbox user: one
/// line per path, `ok <resolved path>` or an error word.
pub const DOWNLOAD_CHECK: &str = r#"
for p in "$@"; do
  if [ ! -e "$p" ] && [ ! -L "$p" ]; then echo file_not_found; continue; fi
  r=$(readlink -f "$p")
  case "$r" in /workspace/*) ;; *) echo invalid_path; continue ;; esac
  [ -e "$r" ] || { echo file_not_found; continue; }
  [ -d "$r" ] && { echo is_directory; continue; }
  [ -r "$r" ] || { echo permission_denied; continue; }
  echo "ok $r"
done
"#;

/// Parses the check script's output: one `Ok(resolved)` or error per path.
pub fn parse_check(output: &str, expected: usize) -> Option<Vec<Result<String, FileError>>> {
    let lines: Vec<Result<String, FileError>> = output
        .lines()
        .map(|line| match line.strip_prefix("ok ") {
            Some(resolved) => Ok(resolved.to_owned()),
            None => Err(FileError::parse(line.trim()).unwrap_or(FileError::InvalidPath)),
        })
        .collect();
    (lines.len() == expected).then_some(lines)
}

/// A tar holding `entries` (name, content, mode) owned by `uid:gid`.
pub fn tar_of(entries: &[(&str, &[u8], u32)], uid: u32, gid: u32) -> std::io::Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    for (name, content, mode) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(content.len() as u64);
        header.set_mode(*mode);
        header.set_uid(uid.into());
        header.set_gid(gid.into());
        header.set_mtime(now);
        header.set_cksum();
        tar.append_data(&mut header, name, *content)?;
    }
    tar.into_inner()
}

/// The first regular file of a tar, with its mode.
pub fn first_file(tar_bytes: &[u8]) -> std::io::Result<Option<(Vec<u8>, u32)>> {
    use std::io::Read;
    let mut archive = tar::Archive::new(tar_bytes);
    for entry in archive.entries()? {
        let mut entry = entry?;
        if entry.header().entry_type().is_file() {
            let mode = entry.header().mode()? & 0o7777;
            let mut content = Vec::with_capacity(entry.size() as usize);
            entry.read_to_end(&mut content)?;
            return Ok(Some((content, mode)));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_paths_are_confined_lexically() {
        assert_eq!(resolve_file_path("a/b.txt").unwrap(), "/workspace/a/b.txt");
        assert_eq!(resolve_file_path("/workspace/x").unwrap(), "/workspace/x");
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "/workspace",
            "/workspace/",
            "a\nb",
            "dir/",
        ] {
            assert_eq!(
                resolve_file_path(bad),
                Err(FileError::InvalidPath),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn check_output_maps_to_typed_errors() {
        let parsed = parse_check("ok /workspace/a\nis_directory\nfile_not_found\n", 3).unwrap();
        assert_eq!(parsed[0], Ok("/workspace/a".into()));
        assert_eq!(parsed[1], Err(FileError::IsDirectory));
        assert_eq!(parsed[2], Err(FileError::FileNotFound));
        assert!(
            parse_check("ok /workspace/a\n", 2).is_none(),
            "a short answer is not trusted"
        );
    }

    #[test]
    fn tar_round_trip_keeps_bytes_and_mode() {
        let data = [0u8, 255, 10, 13, 0];
        let tar = tar_of(&[("f", &data, 0o751)], 1000, 1000).unwrap();
        let (content, mode) = first_file(&tar).unwrap().unwrap();
        assert_eq!(content, data);
        assert_eq!(mode, 0o751);
    }
}
