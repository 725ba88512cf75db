//! Where a policy component comes from, and reading it safely: a regular
//! file of bounded size, never a device or a FIFO.

use crate::config::Config;
use crate::error::{Result, SandboxError};

/// Where a policy component comes from.
#[derive(Debug, Clone)]
pub enum PolicySource {
    /// A component shipped in the binary: `per-user` or `per-thread`.
    Builtin(String),
    /// A `.wasm` component on disk.
    File(std::path::PathBuf),
    /// Component bytes, with a label for messages.
    Bytes {
        /// Names the component in messages and errors.
        label: String,
        /// The component itself (at most 64 MiB).
        bytes: Vec<u8>,
    },
}

impl PolicySource {
    /// The configured policy file, or the embedded per-user policy.
    pub fn from_config(config: &Config) -> Self {
        match &config.policy {
            Some(path) => PolicySource::File(path.clone()),
            None => PolicySource::Builtin("per-user".into()),
        }
    }

    pub(crate) fn read(&self) -> Result<(String, Vec<u8>)> {
        match self {
            PolicySource::Builtin(name) => super::embedded::builtin(name)
                .map(|b| (format!("embedded {name}"), b.to_vec()))
                .ok_or_else(|| {
                    SandboxError::PolicyLoad(format!("no built-in policy named {name:?}"))
                }),
            PolicySource::File(path) => read_component(path)
                .map(|b| (path.display().to_string(), b))
                .map_err(|e| SandboxError::PolicyLoad(format!("{}: {e}", path.display()))),
            PolicySource::Bytes { label, bytes } => {
                check_component_size(bytes.len() as u64)
                    .map_err(|e| SandboxError::PolicyLoad(format!("{label}: {e}")))?;
                Ok((label.clone(), bytes.clone()))
            }
        }
    }
}

/// The largest policy component loaded (a componentize-py policy is ~20 MB).
pub const MAX_COMPONENT_BYTES: u64 = 64 * 1024 * 1024;

fn check_component_size(len: u64) -> std::io::Result<()> {
    if len > MAX_COMPONENT_BYTES {
        return Err(std::io::Error::other(format!(
            "{len} bytes is over the {MAX_COMPONENT_BYTES}-byte limit for policy components"
        )));
    }
    Ok(())
}

/// Reads a component file: a regular file of bounded size only. A device
/// (`/dev/zero`) or a FIFO would otherwise be read without end, or block.
fn read_component(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    // Non-blocking open: opening a FIFO must not wait for a writer.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other(
            "not a regular file (a device, FIFO or directory cannot be a policy component)",
        ));
    }
    check_component_size(meta.len())?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // Bounded even if the file grows while it is read.
    file.take(MAX_COMPONENT_BYTES + 1).read_to_end(&mut bytes)?;
    check_component_size(bytes.len() as u64)?;
    Ok(bytes)
}

#[cfg(test)]
mod component_file_tests {
    use super::*;

    #[test]
    fn devices_and_fifos_are_refused_without_reading_or_blocking() {
        // The bug: `policy check /dev/zero` read 4.6 GB in 5 s.
        let err = read_component(std::path::Path::new("/dev/zero")).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let err = read_component(&fifo).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }

    #[test]
    fn an_oversized_component_is_refused_by_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.wasm");
        let f = std::fs::File::create(&big).unwrap();
        f.set_len(MAX_COMPONENT_BYTES + 1).unwrap(); // sparse: costs nothing
        let err = read_component(&big).unwrap_err();
        assert!(
            err.to_string().contains("limit for policy components"),
            "{err}"
        );
    }
}
