//! File transfer in and out of a backend's container, with deepagents'
//! batch semantics: one result per file, typed per-file errors.
//!
//! Paths follow the deepagents protocol: absolute anywhere in the container,
//! or relative to `/workspace`. The host only normalizes them lexically
//! ([`resolve_file_path`]); they are resolved *inside the container* by a
//! shell script run **as the sandbox user** (the container's configured
//! user, never root), so the sandbox user's own rights decide: a root-owned
//! directory or file is `permission_denied`, a symlink resolves like any
//! path (to a file the user may read or write, or not), and a link the
//! workload swaps in mid-transfer gives nothing the workload could not reach
//! itself with an exec. Bytes stream over that exec's stdin / stdout
//! (Docker's archive API is not used: it runs as root); the host never
//! resolves a sandbox path on the host side.
//!
//! Sizes are bounded: a file whose *apparent* size (sparse files included) is
//! over [`FileLimits::max_file_bytes`] fails alone with
//! [`FileError::FileTooLarge`] before any of its content is read, and the
//! host never accepts more bytes than the size it was announced. Files a
//! download writes on the host ([`HostFile`]) never carry setuid, setgid,
//! sticky or world-writable bits ([`HOST_MODE_MASK`]) and are never written
//! through a symlink at the destination.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWrite;

use super::WORKSPACE_MOUNT;
use crate::error::policy_text;

pub use crate::config::{MAX_BATCH_BYTES, MAX_FILE_BYTES};

/// Environment variable of the `max_file_bytes` setting (bytes, decimal).
pub const MAX_FILE_BYTES_ENV: &str = "SANDBOX_MAX_FILE_BYTES";

/// Permission bits a downloaded file may carry on the host: no setuid,
/// setgid, sticky or world-writable bit, whatever the workload set.
pub const HOST_MODE_MASK: u32 = 0o775;

/// Permission bits an upload may set in the container: no setuid, setgid or
/// sticky bit (they would reach the host workspace).
pub const UPLOAD_MODE_MASK: u32 = 0o777;

/// Longest path component (Linux `NAME_MAX`), in bytes.
pub const NAME_MAX: usize = 255;

/// Longest in-container path, terminating NUL excluded (`PATH_MAX - 1`).
pub const PATH_MAX: usize = 4095;

/// deepagents' `FileOperationError`, plus `file_too_large`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "serve", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum FileError {
    /// Nothing at the path (or a symlink to nothing).
    FileNotFound,
    /// The sandbox user may not read (or write) the file or its directory.
    PermissionDenied,
    /// The path is a directory.
    IsDirectory,
    /// The path fails the lexical checks, is a symlink that cannot be
    /// resolved (a loop), or is not a regular file.
    InvalidPath,
    /// The file's apparent size is over the transfer cap (not a deepagents
    /// literal: `file_too_large`).
    FileTooLarge,
}

impl FileError {
    /// The protocol literal: `file_not_found`, `permission_denied`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            FileError::FileNotFound => "file_not_found",
            FileError::PermissionDenied => "permission_denied",
            FileError::IsDirectory => "is_directory",
            FileError::InvalidPath => "invalid_path",
            FileError::FileTooLarge => "file_too_large",
        }
    }

    fn parse(word: &str) -> Option<Self> {
        Some(match word {
            "file_not_found" => FileError::FileNotFound,
            "permission_denied" => FileError::PermissionDenied,
            "is_directory" => FileError::IsDirectory,
            "invalid_path" => FileError::InvalidPath,
            "file_too_large" => FileError::FileTooLarge,
            _ => return None,
        })
    }
}

impl std::fmt::Display for FileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Size caps of file transfers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileLimits {
    /// Largest apparent size of one file, either direction; a larger file
    /// fails alone with [`FileError::FileTooLarge`].
    pub max_file_bytes: u64,
    /// Largest total content one in-memory download batch holds; a file
    /// that would pass it fails with [`FileError::FileTooLarge`]. Streaming
    /// downloads ignore it.
    pub max_batch_bytes: u64,
}

impl Default for FileLimits {
    fn default() -> Self {
        FileLimits {
            max_file_bytes: MAX_FILE_BYTES,
            max_batch_bytes: MAX_BATCH_BYTES,
        }
    }
}

impl FileLimits {
    /// The caps a configuration sets (`max_file_bytes`, `max_batch_bytes`,
    /// also `SANDBOX_MAX_FILE_BYTES` and `SANDBOX_MAX_BATCH_BYTES`).
    pub fn from_config(config: &crate::config::Config) -> Self {
        FileLimits {
            max_file_bytes: config.max_file_bytes,
            max_batch_bytes: config.max_batch_bytes,
        }
    }
}

/// One file to upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    /// In-container path: absolute, or relative to `/workspace`.
    pub path: String,
    /// The whole file content.
    pub content: Vec<u8>,
    /// Unix permission bits (masked with `UPLOAD_MODE_MASK`); 0o644 when
    /// `None`.
    pub mode: Option<u32>,
}

/// The outcome of one upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "serve", derive(schemars::JsonSchema))]
pub struct UploadResult {
    /// The path as it was requested.
    pub path: String,
    /// Why the file was not written; `None` when it was.
    pub error: Option<FileError>,
}

/// The outcome of one download in a batch: the content, or an error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownloadResult {
    /// The path as it was requested.
    pub path: String,
    /// The whole file, when downloaded.
    pub content: Option<Vec<u8>>,
    /// Permission bits of the file, when downloaded, masked with
    /// `HOST_MODE_MASK`.
    pub mode: Option<u32>,
    /// Why the file was not downloaded; `None` when it was.
    pub error: Option<FileError>,
}

/// A file a streaming download delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileInfo {
    /// Bytes delivered (the file's size when it was opened).
    pub size: u64,
    /// Permission bits, masked with `HOST_MODE_MASK`.
    pub mode: u32,
}

/// The absolute in-container path of a file, or `invalid_path`: an
/// absolute path as given, a relative one joined to `/workspace`, then
/// normalized lexically (`//` and `.` dropped, `..` taking off the component
/// before it, never above `/`). Refused: empty, control characters, a
/// trailing `/`, `/` itself, a component over [`NAME_MAX`] bytes, more than
/// [`PATH_MAX`] in all. Nothing is resolved here: the sandbox user's rights,
/// inside the container, decide what the path reaches.
pub fn resolve_file_path(path: &str) -> Result<String, FileError> {
    if path.is_empty()
        || path.len() > PATH_MAX
        || path.chars().any(char::is_control)
        || path.ends_with('/')
    {
        return Err(FileError::InvalidPath);
    }
    let relative = !path.starts_with('/');
    let base = if relative { WORKSPACE_MOUNT } else { "" };
    let mut parts: Vec<&str> = Vec::new();
    for part in base.split('/').chain(path.split('/')) {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p if p.len() > NAME_MAX => return Err(FileError::InvalidPath),
            p => parts.push(p),
        }
    }
    let resolved = format!("/{}", parts.join("/"));
    if parts.is_empty() || resolved.len() > PATH_MAX {
        return Err(FileError::InvalidPath);
    }
    Ok(resolved)
}

/// The file name of a resolved path (its last component).
pub fn file_name(resolved: &str) -> &str {
    resolved.rsplit('/').next().unwrap_or(resolved)
}

/// `sm PATH`: the size and permission bits (octal) of what PATH names,
/// symlinks followed, as `SIZE MODE` (fails, printing nothing, for a
/// broken symlink or when neither tool can tell). `stat` first; where it
/// fails, GNU `find`: the gVisor Debian 12 ships (release 20221219) refuses the
/// `statx` flags of GNU coreutils 9 with EINVAL (`stat` and `ls` fail in
/// Debian 12 images), and find's `fstatat` passes.
macro_rules! size_and_mode {
    () => {
        r#"sm() { stat -L -c '%s %a' "$1" 2>/dev/null || find -L "$1" -prune ! -type l -printf '%s %m\n' 2>/dev/null | grep .; }
"#
    };
}

/// Writes one upload, run as the sandbox user with `$1` the resolved path,
/// `$2` the octal mode (`-`: keep the existing file's, else 644), `$3` the
/// byte count, the content on stdin. Creates missing parent directories
/// wherever the sandbox user may (else `permission_denied`), follows a
/// symlink at the target like any write would, writes a temporary file
/// beside the target (created owner-only), checks the size of what it wrote
/// through the open file, sets the mode, then renames it over the target:
/// an upload that breaks midway leaves the existing file whole. Prints one
/// word: `ok`, `short` (fewer bytes arrived than announced) or an error
/// literal.
pub const UPLOAD_SCRIPT: &str = concat!(
    r#"
exec 2>/dev/null
"#,
    size_and_mode!(),
    r#"p=$1; m=$2; n=$3
d=${p%/*}; d=${d:-/}
umask 022
mkdir -p "$d" || { echo permission_denied; exit 0; }
t=$p
if [ -L "$p" ]; then
  t=$(readlink -f "$p")
  [ -n "$t" ] || { echo invalid_path; exit 0; }
fi
[ -d "$t" ] && { echo is_directory; exit 0; }
[ -e "$t" ] && [ ! -w "$t" ] && { echo permission_denied; exit 0; }
td=${t%/*}; td=${td:-/}
[ -w "$td" ] || { echo permission_denied; exit 0; }
if [ "$m" = - ]; then
  m=644
  if [ -e "$t" ]; then
    a=$(sm "$t") || { echo permission_denied; exit 0; }
    m=$(printf %o $(( 0${a#* } & 0777 )))
  fi
fi
w="${td%/}/.sandbox-upload.$$"
umask 077
{
  cat >&3 || { rm -f "$w"; echo permission_denied; exit 0; }
  i=$(sm /proc/self/fd/3) || { rm -f "$w"; echo permission_denied; exit 0; }
  [ "${i%% *}" = "$n" ] || { rm -f "$w"; echo short; exit 0; }
} 3> "$w" || { rm -f "$w"; echo permission_denied; exit 0; }
chmod "$m" "$w" || { rm -f "$w"; echo permission_denied; exit 0; }
mv -f "$w" "$t" || { rm -f "$w"; echo permission_denied; exit 0; }
echo ok
"#
);

/// How long the download script waits for its open of the file (seconds):
/// a regular file opens at once; a FIFO or device the workload swapped in
/// after the script's checks would block it, until a writer comes.
pub const OPEN_WAIT_SECS: u32 = 5;

/// Reads one download, run as the sandbox user with `$1` the resolved path,
/// `$2` the size cap and `$3` [`OPEN_WAIT_SECS`]. Prints one answer line,
/// `ok SIZE MODE` (then exactly SIZE bytes of content), `file_too_large
/// SIZE`, or an error literal. Only regular files are read: anything else
/// (a FIFO, a device, a socket) is `invalid_path`, never opened when it is
/// one at the check. Files of `/proc` and `/sys` are `invalid_path`: their
/// size is not their content's (0, or a page), so no byte count could be
/// promised. A path that does not resolve is `permission_denied` when the
/// nearest existing directory above it may not be searched (whether the
/// file exists is then not the user's to know), else `file_not_found`. The
/// file is opened once; its type and apparent size are taken from that open
/// file, before any content is read. A check or an open that fails is
/// tried again from the start, five times in all: a file the workload
/// swapped away and back in between is read, and only a failure that holds
/// is reported (an open still refused is `permission_denied`, or
/// `file_not_found` once the file is gone).
///
/// The open cannot wait long: the shell has no non-blocking open, so a FIFO
/// swapped in between the check and the open (with no writer) would block
/// it for good. A watchdog started just before the open answers
/// `invalid_path` and kills the script when the open has not returned
/// within `$3` seconds; the script stops the watchdog (and its timer) as
/// soon as the open returns. The timer writes nowhere, so it never holds
/// the call's output open.
pub const DOWNLOAD_SCRIPT: &str = concat!(
    r#"
exec 2>/dev/null
"#,
    size_and_mode!(),
    r#"p=$1; max=$2
last() { [ -e "$p" ] && echo "$1" || echo file_not_found; exit 0; }
for try in 1 2 3 4 5; do
if [ ! -e "$p" ]; then
  [ -L "$p" ] && { echo file_not_found; exit 0; }
  a=${p%/*}
  while [ -n "$a" ] && [ ! -e "$a" ]; do a=${a%/*}; done
  a=${a:-/}
  [ -d "$a" ] && [ ! -x "$a" ] && { echo permission_denied; exit 0; }
  echo file_not_found; exit 0
fi
[ -d "$p" ] && { echo is_directory; exit 0; }
[ -f "$p" ] || { [ $try = 5 ] && last invalid_path; continue; }
case "$(readlink -f "$p")" in /proc/*|/sys/*) echo invalid_path; exit 0 ;; esac
[ -r "$p" ] || { [ $try = 5 ] && last permission_denied; continue; }
(
  trap 'kill $! 2>/dev/null; exit 0' TERM
  sleep "$3" </dev/null >/dev/null 2>&1 &
  wait $! && { echo invalid_path; kill -9 $$; }
) &
g=$!
{
  kill $g
  [ -f /proc/self/fd/0 ] || { echo invalid_path; exit 0; }
  i=$(sm /proc/self/fd/0) || { echo permission_denied; exit 0; }
  s=${i%% *}; m=${i#* }
  case "$s" in ''|*[!0-9]*) echo permission_denied; exit 0 ;; esac
  [ "$s" -gt "$max" ] && { echo "file_too_large $s"; exit 0; }
  echo "ok $s $m"
  if dd if=/dev/null count=0 iflag=count_bytes; then
    exec dd bs=65536 count="$s" iflag=count_bytes
  fi
  exec head -c "$s"
} < "$p"
kill $g
done
last permission_denied
"#
);

/// The command uploading `len` bytes to `resolved` with `mode` (none:
/// an existing file keeps its mode, a new one gets 0644).
pub fn upload_command(resolved: &str, mode: Option<u32>, len: u64) -> String {
    let mode = mode.map_or("-".to_owned(), |m| format!("{:o}", m & UPLOAD_MODE_MASK));
    format!(
        "set -- {} {mode} {len}\n{UPLOAD_SCRIPT}",
        shell_quote(resolved),
    )
}

/// The command downloading `resolved` if its size is at most `max`.
pub fn download_command(resolved: &str, max: u64) -> String {
    format!(
        "set -- {} {max} {OPEN_WAIT_SECS}\n{DOWNLOAD_SCRIPT}",
        shell_quote(resolved)
    )
}

/// Single-quotes a word for `sh` (paths carry no control characters).
fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', "'\\''"))
}

/// The upload script's answer: `Ok(None)` written, `Ok(Some(e))` refused
/// with a per-file error, `Err` a broken transfer (short, or garbage).
pub fn parse_upload_answer(output: &str) -> Result<Option<FileError>, String> {
    match output.trim() {
        "ok" => Ok(None),
        "short" => Err("fewer bytes arrived than were sent (the transfer was cut)".into()),
        word => FileError::parse(word)
            .map(Some)
            .ok_or_else(|| format!("unexpected answer {:?}", policy_text(word))),
    }
}

/// Longest answer line accepted from the download script.
const MAX_ANSWER: usize = 128;

#[derive(Debug)]
enum SinkState {
    /// Reading the answer line.
    Answer(Vec<u8>),
    /// Passing the announced content on.
    Body {
        size: u64,
        mode: u32,
        remaining: u64,
    },
    /// A per-file error; no byte may follow.
    Refused(FileError),
    /// The transfer broke the protocol.
    Broken(String),
}

/// The stdout of [`DOWNLOAD_SCRIPT`], checked as it streams: the answer line
/// is parsed, a size over the cap is refused before any content (the write
/// fails, so the transfer is aborted), and exactly the announced number of
/// bytes is passed on to `inner`, never more. The container's output is
/// untrusted: anything else breaks the transfer.
pub struct DownloadSink<'a> {
    inner: Target<'a>,
    limit: u64,
    state: SinkState,
}

enum Target<'a> {
    Writer(&'a mut (dyn AsyncWrite + Send + Unpin)),
    /// Reserved once at the announced size: no growth by doubling.
    Memory(&'a mut Vec<u8>),
}

impl<'a> DownloadSink<'a> {
    /// A sink passing the content on to `inner`, refusing files over
    /// `limit` bytes.
    pub fn new(inner: &'a mut (dyn AsyncWrite + Send + Unpin), limit: u64) -> Self {
        Self::with(Target::Writer(inner), limit)
    }

    /// A sink collecting the content in `buffer`, allocated once.
    pub fn in_memory(buffer: &'a mut Vec<u8>, limit: u64) -> Self {
        Self::with(Target::Memory(buffer), limit)
    }

    fn with(inner: Target<'a>, limit: u64) -> Self {
        DownloadSink {
            inner,
            limit,
            state: SinkState::Answer(Vec::new()),
        }
    }

    /// The per-file error decided so far (the script's, or the cap's).
    pub fn refusal(&self) -> Option<FileError> {
        match self.state {
            SinkState::Refused(e) => Some(e),
            _ => None,
        }
    }

    /// The outcome once the transfer ended: the file, a per-file error, or
    /// `Err` when the transfer broke (no answer, garbage, fewer bytes than
    /// announced: the file shrank while it was read).
    pub fn finish(self) -> Result<Result<FileInfo, FileError>, String> {
        match self.state {
            SinkState::Answer(line) => Err(format!(
                "no answer from the container (got {:?})",
                policy_text(&String::from_utf8_lossy(&line))
            )),
            SinkState::Body {
                size,
                mode,
                remaining: 0,
            } => Ok(Ok(FileInfo {
                size,
                mode: mode & HOST_MODE_MASK,
            })),
            SinkState::Body { remaining, .. } => Err(format!(
                "the file shrank while it was read ({remaining} bytes missing)"
            )),
            SinkState::Refused(e) => Ok(Err(e)),
            SinkState::Broken(m) => Err(m),
        }
    }

    fn answer(&mut self, line: &[u8]) -> io::Result<()> {
        let text = String::from_utf8_lossy(line);
        let words: Vec<&str> = text.split(' ').collect();
        let mut over_cap = false;
        self.state = match words.as_slice() {
            ["ok", size, mode] => match (size.parse::<u64>(), u32::from_str_radix(mode, 8)) {
                // The container said it would send more than the cap: abort.
                (Ok(size), Ok(mode)) if mode <= 0o7777 && size > self.limit => {
                    over_cap = true;
                    SinkState::Refused(FileError::FileTooLarge)
                }
                (Ok(size), Ok(mode)) if mode <= 0o7777 => SinkState::Body {
                    size,
                    mode,
                    remaining: size,
                },
                _ => SinkState::Broken(format!("bad answer {:?}", policy_text(&text))),
            },
            ["file_too_large", size] if size.parse::<u64>().is_ok() => {
                SinkState::Refused(FileError::FileTooLarge)
            }
            [word] => match FileError::parse(word) {
                Some(e) => SinkState::Refused(e),
                None => SinkState::Broken(format!("bad answer {:?}", policy_text(&text))),
            },
            _ => SinkState::Broken(format!("bad answer {:?}", policy_text(&text))),
        };
        if let (SinkState::Body { size, .. }, Target::Memory(buffer)) =
            (&self.state, &mut self.inner)
        {
            // At most `limit`: the size was checked above.
            buffer.reserve_exact(*size as usize);
        }
        match &self.state {
            _ if over_cap => Err(io::Error::other("the file is over the size cap")),
            SinkState::Broken(m) => Err(io::Error::new(io::ErrorKind::InvalidData, m.clone())),
            _ => Ok(()),
        }
    }

    fn broken(&mut self, message: &str) -> io::Error {
        self.state = SinkState::Broken(message.to_owned());
        io::Error::new(io::ErrorKind::InvalidData, message.to_owned())
    }
}

impl AsyncWrite for DownloadSink<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match &mut this.state {
            SinkState::Answer(line) => {
                let room = MAX_ANSWER - line.len();
                match buf.iter().take(room + 1).position(|&b| b == b'\n') {
                    Some(end) => {
                        let mut full = std::mem::take(line);
                        full.extend_from_slice(&buf[..end]);
                        this.answer(&full)?;
                        Poll::Ready(Ok(end + 1))
                    }
                    None if buf.len() <= room => {
                        line.extend_from_slice(buf);
                        Poll::Ready(Ok(buf.len()))
                    }
                    None => Poll::Ready(Err(this.broken("the answer line is too long"))),
                }
            }
            SinkState::Body { remaining, .. } => {
                if *remaining == 0 {
                    return Poll::Ready(Err(this.broken("more bytes than the size announced")));
                }
                let n = (buf.len() as u64).min(*remaining) as usize;
                let written = match &mut this.inner {
                    Target::Writer(w) => ready!(Pin::new(&mut **w).poll_write(cx, &buf[..n]))?,
                    Target::Memory(buffer) => {
                        buffer.extend_from_slice(&buf[..n]);
                        n
                    }
                };
                *remaining -= written as u64;
                Poll::Ready(Ok(written))
            }
            SinkState::Refused(_) => Poll::Ready(Err(this.broken("bytes after a refusal"))),
            SinkState::Broken(m) => {
                Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, m.clone())))
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            Target::Writer(w) => Pin::new(&mut **w).poll_flush(cx),
            Target::Memory(_) => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            Target::Writer(w) => Pin::new(&mut **w).poll_shutdown(cx),
            Target::Memory(_) => Poll::Ready(Ok(())),
        }
    }
}

/// A file a download writes on the host. It is created under a temporary
/// name beside its destination (`create_new`: never through a symlink,
/// mode 0600), and renamed over the destination by [`HostFile::commit`]
/// (a symlink planted there is replaced, not followed; a regular file is
/// overwritten). Dropped before that, the temporary file is removed and the
/// destination is untouched.
pub struct HostFile {
    file: Option<tokio::fs::File>,
    temp: PathBuf,
    destination: PathBuf,
}

impl HostFile {
    /// `destination` names the file, or an existing directory (a real one,
    /// or any path ending in `/`), in which `name` is created.
    pub fn create(destination: &Path, name: &str) -> io::Result<Self> {
        let is_dir = match std::fs::symlink_metadata(destination) {
            Ok(meta) if meta.is_dir() => true,
            _ if destination.as_os_str().as_encoded_bytes().ends_with(b"/") => {
                std::fs::metadata(destination)?.is_dir()
            }
            _ => false,
        };
        let destination = if is_dir {
            if name.is_empty() || name == "." || name == ".." || name.contains('/') {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("no file name to create in {}", destination.display()),
                ));
            }
            destination.join(name)
        } else {
            destination.to_owned()
        };
        let dir = match destination.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        use std::os::unix::fs::OpenOptionsExt;
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let mut attempt = 0;
        loop {
            let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let temp = dir.join(format!(".sandbox-cp-{}-{n}.part", std::process::id()));
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&temp)
            {
                Ok(file) => {
                    return Ok(HostFile {
                        file: Some(tokio::fs::File::from_std(file)),
                        temp,
                        destination,
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 16 => attempt += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// The open temporary file, to write the content into.
    pub fn file(&mut self) -> &mut tokio::fs::File {
        self.file.as_mut().expect("open until committed")
    }

    /// Flushes, sets `mode & HOST_MODE_MASK` on the open file, and renames it
    /// over the destination.
    pub async fn commit(mut self, mode: u32) -> io::Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        use tokio::io::AsyncWriteExt;
        let mut file = self.file.take().expect("open until committed");
        file.flush().await?;
        file.set_permissions(std::fs::Permissions::from_mode(mode & HOST_MODE_MASK))
            .await?;
        drop(file);
        std::fs::rename(&self.temp, &self.destination)?;
        self.temp = PathBuf::new();
        Ok(self.destination.clone())
    }
}

impl Drop for HostFile {
    fn drop(&mut self) {
        if !self.temp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Bug: deepagents hands absolute paths anywhere in the container
    /// (`/tmp/x`, `/home/user/x`), and every one outside `/workspace` was
    /// refused as `invalid_path`.
    #[test]
    fn absolute_paths_anywhere_and_relative_ones_under_the_workspace() {
        for (given, resolved) in [
            ("a/b.txt", "/workspace/a/b.txt"),
            ("/workspace/x", "/workspace/x"),
            ("/tmp/x", "/tmp/x"),
            ("/etc/passwd", "/etc/passwd"),
            ("//tmp///./a/./b", "/tmp/a/b"),
            ("/tmp/a/../b", "/tmp/b"),
            ("../x", "/x"),
            ("a/../../etc/x", "/etc/x"),
            ("/../../etc/x", "/etc/x"),
            ("./x", "/workspace/x"),
            (".", "/workspace"),
            ("/workspace", "/workspace"),
        ] {
            assert_eq!(
                resolve_file_path(given).as_deref(),
                Ok(resolved),
                "{given:?}"
            );
        }
    }

    #[test]
    fn the_root_empty_control_characters_and_a_trailing_slash_are_invalid() {
        for bad in [
            "",
            "/",
            "//",
            "/.",
            "/..",
            "/tmp/..",
            "..",
            "../..",
            "a\nb",
            "a\u{7f}",
            "dir/",
            "/tmp/",
            "/workspace/",
        ] {
            assert_eq!(
                resolve_file_path(bad),
                Err(FileError::InvalidPath),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn names_and_paths_over_the_kernel_limits_are_invalid() {
        // Bug: a 300-byte name failed the whole batch with an engine error.
        let longest = "n".repeat(NAME_MAX);
        assert!(resolve_file_path(&longest).is_ok());
        assert_eq!(
            resolve_file_path(&"n".repeat(NAME_MAX + 1)),
            Err(FileError::InvalidPath)
        );
        let deep = vec!["d".repeat(200); 21].join("/");
        assert!(deep.len() > PATH_MAX - "/workspace/".len());
        assert_eq!(resolve_file_path(&deep), Err(FileError::InvalidPath));
        // Absolute paths are held to the same limits.
        let long = format!("/tmp/{}", "n".repeat(NAME_MAX + 1));
        assert_eq!(resolve_file_path(&long), Err(FileError::InvalidPath));
        let fits = format!("/{}", vec!["d".repeat(200); 20].join("/"));
        assert!(fits.len() <= PATH_MAX);
        assert!(resolve_file_path(&fits).is_ok());
        // Relative, the joined `/workspace` counts: in the limit as given,
        // over it once resolved.
        let relative = format!("{}/{}", vec!["d".repeat(200); 20].join("/"), "x".repeat(70));
        assert!(relative.len() <= PATH_MAX && relative.len() + 11 > PATH_MAX);
        assert_eq!(resolve_file_path(&relative), Err(FileError::InvalidPath));
    }

    #[test]
    fn upload_answers_map_to_typed_errors_and_garbage_is_not_trusted() {
        assert_eq!(parse_upload_answer("ok\n"), Ok(None));
        assert_eq!(
            parse_upload_answer("is_directory\n"),
            Ok(Some(FileError::IsDirectory))
        );
        assert!(parse_upload_answer("short\n").is_err());
        assert!(parse_upload_answer("").is_err());
        assert!(parse_upload_answer("ok\nok\n").is_err());
    }

    #[test]
    fn upload_commands_quote_the_path_and_drop_special_bits() {
        let c = upload_command("/workspace/it's", Some(0o6777), 5);
        assert!(c.starts_with("set -- '/workspace/it'\\''s' 777 5\n"), "{c}");
    }

    struct Fed {
        got: Vec<u8>,
        write: io::Result<()>,
        refusal: Option<FileError>,
        outcome: Result<Result<FileInfo, FileError>, String>,
    }

    /// Writes `chunks` through a sink as the provider does, and ends it.
    async fn feed(chunks: &[&[u8]], limit: u64) -> Fed {
        let mut got = Vec::new();
        let (write, refusal, outcome) = {
            let mut sink = DownloadSink::new(&mut got, limit);
            let mut write = Ok(());
            for chunk in chunks {
                if let Err(e) = sink.write_all(chunk).await {
                    write = Err(e);
                    break;
                }
            }
            (write, sink.refusal(), sink.finish())
        };
        Fed {
            got,
            write,
            refusal,
            outcome,
        }
    }

    #[tokio::test]
    async fn a_download_passes_exactly_the_announced_bytes() {
        let f = feed(&[b"ok 5 6777\nab", b"cde"], 10).await;
        assert!(f.write.is_ok());
        assert_eq!(f.got, b"abcde");
        assert_eq!(
            f.outcome.unwrap().unwrap(),
            FileInfo {
                size: 5,
                mode: 0o775
            },
            "setuid, setgid and world-write never reach the host"
        );
    }

    #[tokio::test]
    async fn a_size_over_the_cap_is_refused_before_any_content() {
        // Bug: a 1 GiB sparse file was read whole into memory.
        let f = feed(&[b"ok 4294967296 644\n", &[0; 1024]], 1 << 20).await;
        assert!(f.write.is_err(), "the transfer is aborted");
        assert!(f.got.is_empty());
        assert_eq!(f.refusal, Some(FileError::FileTooLarge));
        assert_eq!(f.outcome.unwrap(), Err(FileError::FileTooLarge));
        let f = feed(&[b"file_too_large 4294967296\n"], 1 << 20).await;
        assert!(f.write.is_ok());
        assert_eq!(f.outcome.unwrap(), Err(FileError::FileTooLarge));
        let f = feed(&[b"ok 1048576 644\n"], 1 << 20).await;
        assert!(f.write.is_ok(), "a file at the cap passes");
    }

    #[tokio::test]
    async fn an_in_memory_download_allocates_once_at_the_announced_size() {
        let mut buffer = Vec::new();
        let mut sink = DownloadSink::in_memory(&mut buffer, 1 << 20);
        sink.write_all(b"ok 100000 644\n").await.unwrap();
        for _ in 0..100 {
            sink.write_all(&[1; 1000]).await.unwrap();
        }
        assert!(sink.finish().unwrap().is_ok());
        assert_eq!(buffer.len(), 100_000);
        assert_eq!(buffer.capacity(), 100_000, "no growth by doubling");
    }

    #[tokio::test]
    async fn a_hostile_stream_cannot_push_more_than_announced_or_garbage() {
        let f = feed(&[b"ok 3 644\nabcdef"], 10).await;
        assert!(f.write.is_err());
        assert_eq!(f.got, b"abc");
        assert!(f.outcome.is_err());
        let f = feed(&[&[b'x'; 4096]], 10).await;
        assert!(f.write.is_err(), "an endless answer line is cut");
        assert!(f.outcome.is_err());
        let f = feed(&[b"ok 10 644\nabc"], 10).await;
        assert!(f.outcome.is_err(), "a short file is not a download");
        let f = feed(&[b"is_directory\nmore"], 10).await;
        assert!(f.write.is_err());
        assert!(f.outcome.is_err());
        let f = feed(&[b"is_directory\n"], 10).await;
        assert_eq!(f.outcome.unwrap(), Err(FileError::IsDirectory));
        let f = feed(&[b"ok 1 99999\n"], 10).await;
        assert!(f.write.is_err(), "a mode out of range is garbage");
    }

    #[tokio::test]
    async fn host_files_are_masked_and_never_written_through_a_symlink() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let dest = dir.path().join("out");
        std::os::unix::fs::symlink(&victim, &dest).unwrap();
        let mut f = HostFile::create(&dest, "ignored").unwrap();
        f.file().write_all(b"new").await.unwrap();
        f.commit(0o6777).await.unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        let meta = std::fs::symlink_metadata(&dest).unwrap();
        assert!(meta.is_file());
        assert_eq!(meta.permissions().mode() & 0o7777, 0o775);
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");

        // A directory destination gets the remote name; an abandoned
        // download leaves nothing behind.
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let f = HostFile::create(&sub, "name.txt").unwrap();
        assert_eq!(f.destination, sub.join("name.txt"));
        drop(f);
        assert_eq!(std::fs::read_dir(&sub).unwrap().count(), 0);
    }
}
