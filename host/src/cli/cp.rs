//! `sandbox cp`: copy one file into or out of a thread's container, streamed
//! both ways. The remote path is absolute anywhere in the container
//! (`alice-1:/tmp/x`) or relative to `/workspace` (`alice-1:x`); the sandbox
//! user's rights inside the container decide what it reaches.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use sandbox_host::files::{FileError, FileLimits};
use sandbox_host::Config;

use super::open;

#[derive(clap::Args)]
pub struct CpArgs {
    /// A local file, `THREAD:PATH`, or `-` for this process's stdin.
    pub source: String,
    /// A local file or directory, `THREAD:PATH`, or `-` for stdout.
    pub destination: String,
}

/// How to copy a directory, which `cp` does not (one file at a time).
const DIRECTORY_HINT: &str = "sandbox cp copies one file; for a directory, stream a tar: \
     `tar -C DIR -cf - . | sandbox exec -i THREAD -- sh -c 'mkdir -p DEST && tar -xf - -C DEST'` \
     (and back: `sandbox exec THREAD -- tar -C DIR -cf - . | tar -xf -`)";

pub async fn run(config: Config, args: CpArgs) -> anyhow::Result<ExitCode> {
    let CpArgs {
        source,
        destination,
    } = args;
    let (from, to) = (operand(&source)?, operand(&destination)?);
    let sandbox = open(config, true).await?;
    match (from, to) {
        // Both directions stream: memory stays bounded whatever the
        // size; files over the cap fail before any byte moves.
        (Operand::Local("-"), Operand::Remote { thread, path }) => {
            let target = remote_target(path, "-")?;
            let backend = sandbox.get_thread_backend(thread).await?;
            let limits = backend.file_limits();
            // The size is announced before any byte moves: stdin is spooled
            // (bounded by the cap) to a temporary file first.
            let (mut file, len) = spool_stdin(limits.max_file_bytes).await?;
            let result = backend
                .upload_from(&target, &mut file, len, Some(0o644), &limits)
                .await?;
            if let Some(error) = result.error {
                bail!("{destination}: {}", file_error(error, &limits));
            }
        }
        (Operand::Remote { thread, path }, Operand::Local("-")) => {
            let backend = sandbox.get_thread_backend(thread).await?;
            let limits = backend.file_limits();
            let mut stdout = tokio::io::stdout();
            if let Err(error) = backend.download_to(path, &mut stdout, &limits).await? {
                bail!("{source}: {}", file_error(error, &limits));
            }
            tokio::io::AsyncWriteExt::flush(&mut stdout).await?;
        }
        (Operand::Local(local), Operand::Remote { thread, path }) => {
            let mut file = tokio::fs::File::open(local)
                .await
                .with_context(|| format!("reading {local}"))?;
            let meta = file.metadata().await?;
            if meta.is_dir() {
                bail!("{local} is a directory: {DIRECTORY_HINT}");
            }
            if !meta.is_file() {
                bail!("{local}: not a regular file");
            }
            let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions());
            let backend = sandbox.get_thread_backend(thread).await?;
            let limits = backend.file_limits();
            let target = remote_target(path, local)?;
            let result = backend
                .upload_from(&target, &mut file, meta.len(), Some(mode), &limits)
                .await?;
            if let Some(error) = result.error {
                bail!("{destination}: {}", file_error(error, &limits));
            }
        }
        (Operand::Remote { thread, path }, Operand::Local(local)) => {
            let target = local_target(local, path)?;
            let backend = sandbox.get_thread_backend(thread).await?;
            let limits = backend.file_limits();
            // Written beside the target under a temporary name, never
            // through a symlink, without setuid / setgid / sticky /
            // world-writable bits, renamed into place when complete.
            if let Err(error) = backend.download_to_file(path, &target, &limits).await? {
                bail!("{source}: {}", file_error(error, &limits));
            }
        }
        _ => bail!("exactly one of SOURCE and DESTINATION must be THREAD:PATH"),
    }
    Ok(ExitCode::SUCCESS)
}

/// A `cp` operand.
#[derive(Debug, PartialEq)]
enum Operand<'a> {
    Remote { thread: &'a str, path: &'a str },
    Local(&'a str),
}

/// `THREAD:PATH` when the text before the first `:` is a valid thread id
/// (the path may contain more `:`); else a local path. Text with a `:` that
/// is neither (no thread id before it, no such local file, no `/` before the
/// `:`) is refused rather than guessed.
fn operand(arg: &str) -> anyhow::Result<Operand<'_>> {
    match arg.split_once(':') {
        Some((thread, path)) if sandbox_host::ThreadId::parse(thread).is_ok() => {
            Ok(Operand::Remote { thread, path })
        }
        Some((before, _)) if !before.contains('/') && !Path::new(arg).exists() => bail!(
            "{arg:?}: {before:?} is not a valid thread id (a remote file is THREAD:PATH); \
             write ./{arg} for a local file whose name has a ':'"
        ),
        _ => Ok(Operand::Local(arg)),
    }
}

/// Where a download goes: `local`, or `local/NAME` when `local` is a
/// directory or ends with `/` (NAME: the remote file's base name).
fn local_target(local: &str, remote_path: &str) -> anyhow::Result<PathBuf> {
    // A symlink is not a directory here: one the workload planted at the
    // destination must not redirect the write.
    let real_dir = std::fs::symlink_metadata(local).is_ok_and(|m| m.is_dir());
    if !(local.ends_with('/') || real_dir) {
        return Ok(PathBuf::from(local));
    }
    let name = Path::new(remote_path)
        .file_name()
        .with_context(|| format!("{remote_path:?} has no file name to copy into {local}"))?;
    Ok(Path::new(local).join(name))
}

/// Where an upload goes: `path`, or `path/NAME` when `path` is empty, `.`,
/// `/workspace` or ends with `/` (`/tmp/`; NAME: the local file's base name).
fn remote_target(path: &str, local: &str) -> anyhow::Result<String> {
    if !(path.is_empty() || path.ends_with('/') || matches!(path, "." | "/workspace")) {
        return Ok(path.to_owned());
    }
    if local == "-" {
        bail!("stdin has no file name: name the file, THREAD:DIR/NAME");
    }
    let name = Path::new(local)
        .file_name()
        .with_context(|| format!("{local:?} has no file name"))?;
    let name = name
        .to_str()
        .with_context(|| format!("{local:?}: the file name is not valid UTF-8"))?;
    let dir = path.trim_end_matches('/');
    Ok(if dir.is_empty() || dir == "." {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    })
}

/// This process's stdin in a temporary file (removed when dropped), and
/// its length; refused past `cap` bytes.
async fn spool_stdin(cap: u64) -> anyhow::Result<(tokio::fs::File, u64)> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
    let spool =
        tokio::fs::File::from_std(tempfile::tempfile().context("a temporary file for stdin")?);
    let mut writer = spool.try_clone().await?;
    let mut stdin = tokio::io::stdin().take(cap + 1);
    let len = tokio::io::copy(&mut stdin, &mut writer)
        .await
        .context("reading stdin")?;
    if len > cap {
        bail!("stdin is over the {cap}-byte cap of one file");
    }
    writer.flush().await?;
    let mut file = spool;
    file.seek(std::io::SeekFrom::Start(0)).await?;
    Ok((file, len))
}

/// A per-file error of `cp`, with the cap when it is the size, and how to
/// copy a directory when it is one.
fn file_error(error: FileError, limits: &FileLimits) -> String {
    match error {
        FileError::IsDirectory => format!("{error}: {DIRECTORY_HINT}"),
        FileError::FileTooLarge => format!(
            "{error} (over the {}-byte cap; {} raises it)",
            limits.max_file_bytes,
            sandbox_host::files::MAX_FILE_BYTES_ENV
        ),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bug: `sandbox cp alice-1:out.txt .` failed with "Is a directory".
    #[test]
    fn a_download_into_a_directory_keeps_the_remote_name() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        assert_eq!(
            local_target(d, "out/x.txt").unwrap(),
            dir.path().join("x.txt")
        );
        assert_eq!(
            local_target(".", "/workspace/x.txt").unwrap(),
            Path::new(".").join("x.txt")
        );
        assert_eq!(
            local_target("new/", "x.txt").unwrap(),
            Path::new("new/x.txt"),
            "a trailing / names a directory"
        );
        let file = format!("{d}/y.txt");
        assert_eq!(local_target(&file, "x.txt").unwrap(), Path::new(&file));
        assert!(local_target(d, "").is_err(), "no file name to copy into it");
    }

    #[test]
    fn an_upload_into_a_remote_directory_keeps_the_local_name() {
        assert_eq!(remote_target("in/", "/tmp/a.txt").unwrap(), "in/a.txt");
        assert_eq!(remote_target("", "a.txt").unwrap(), "a.txt");
        assert_eq!(remote_target(".", "./d/a.txt").unwrap(), "a.txt");
        assert_eq!(
            remote_target("/workspace/", "a.txt").unwrap(),
            "/workspace/a.txt"
        );
        assert_eq!(
            remote_target("/workspace", "a.txt").unwrap(),
            "/workspace/a.txt"
        );
        assert_eq!(remote_target("in/b.txt", "a.txt").unwrap(), "in/b.txt");
    }

    /// Remote paths outside /workspace (deepagents' `/tmp/x`) are passed
    /// through as given: the container decides what the user may reach.
    #[test]
    fn absolute_remote_paths_anywhere_are_taken_as_given() {
        assert_eq!(
            operand("alice-1:/tmp/x").unwrap(),
            Operand::Remote {
                thread: "alice-1",
                path: "/tmp/x"
            }
        );
        assert_eq!(remote_target("/tmp/", "d/a.txt").unwrap(), "/tmp/a.txt");
        assert_eq!(remote_target("/tmp/x", "a.txt").unwrap(), "/tmp/x");
        assert_eq!(
            local_target(".", "/tmp/deep/x.txt").unwrap(),
            Path::new(".").join("x.txt")
        );
    }

    /// Bug: `cp 'a:b-1:x' dst` was ambiguous, and text with a `:` but no
    /// thread id before it was silently taken as a local path.
    #[test]
    fn operands_split_at_the_first_colon_after_a_thread_id() {
        assert_eq!(
            operand("alice-1:out.txt").unwrap(),
            Operand::Remote {
                thread: "alice-1",
                path: "out.txt"
            }
        );
        assert_eq!(
            operand("a:b-1:x").unwrap(),
            Operand::Remote {
                thread: "a",
                path: "b-1:x"
            },
            "the path keeps its own ':'"
        );
        assert_eq!(operand("notes.txt").unwrap(), Operand::Local("notes.txt"));
        assert_eq!(operand("./x:y").unwrap(), Operand::Local("./x:y"));
        let err = operand("Bad Thread:x").unwrap_err().to_string();
        assert!(err.contains("not a valid thread id"), "{err}");
        assert!(err.contains("./Bad Thread:x"), "{err}");
        // An existing local file with such a name is still a local file.
        let dir = tempfile::tempdir().unwrap();
        let existing = dir.path().join("A:b");
        std::fs::write(&existing, "").unwrap();
        let existing = existing.to_str().unwrap();
        assert_eq!(operand(existing).unwrap(), Operand::Local(existing));
    }
}
