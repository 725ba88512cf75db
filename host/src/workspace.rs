//! Workspace directories, `{root}/{name}`, resolved and created by the host.
//!
//! A policy only names a workspace; the host validates the name against the
//! id allow-list, refuses symlinks and anything that resolves outside the
//! root, and owns the directory's creation and ownership.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::config::UserIds;
use crate::error::SandboxError;

/// The workspace root and the user that owns the workspaces.
#[derive(Debug, Clone)]
pub struct Workspaces {
    root: PathBuf,
    owner: UserIds,
}

impl Workspaces {
    pub fn new(root: impl Into<PathBuf>, owner: UserIds) -> Self {
        Workspaces {
            root: root.into(),
            owner,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn owner(&self) -> UserIds {
        self.owner
    }

    /// The checked host path of a workspace; creates it when missing.
    pub fn prepare(&self, name: &str) -> Result<PathBuf, SandboxError> {
        policy_core::ids::validate_workspace(name).map_err(SandboxError::from)?;
        std::fs::create_dir_all(&self.root).map_err(|e| io_error(&self.root, e))?;
        let root = self
            .root
            .canonicalize()
            .map_err(|e| io_error(&self.root, e))?;
        let path = root.join(name);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(SandboxError::Refused(format!(
                    "workspace {name:?} is a symlink; workspaces must be plain directories under {}",
                    root.display()
                )));
            }
            Ok(meta) if !meta.is_dir() => {
                return Err(SandboxError::Refused(format!(
                    "workspace {name:?} exists and is not a directory"
                )));
            }
            Ok(meta) => self.fix_owner(&path, &meta)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                match std::fs::DirBuilder::new().mode(0o750).create(&path) {
                    Ok(()) => {}
                    // Created concurrently by another host: fine.
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(io_error(&path, e)),
                }
                let meta = std::fs::symlink_metadata(&path).map_err(|e| io_error(&path, e))?;
                if !meta.is_dir() {
                    return Err(SandboxError::Refused(format!(
                        "workspace {name:?} is not a directory"
                    )));
                }
                self.fix_owner(&path, &meta)?;
            }
            Err(e) => return Err(io_error(&path, e)),
        }
        // Defence in depth: the name is already a single safe component.
        let resolved = path.canonicalize().map_err(|e| io_error(&path, e))?;
        if resolved.parent() != Some(root.as_path()) {
            return Err(SandboxError::Refused(format!(
                "workspace {name:?} resolves outside {}",
                root.display()
            )));
        }
        Ok(resolved)
    }

    /// The sandbox user must own its workspace or it cannot write it (the
    /// container runs without CAP_DAC_OVERRIDE).
    fn fix_owner(&self, path: &Path, meta: &std::fs::Metadata) -> Result<(), SandboxError> {
        if meta.uid() == self.owner.uid && meta.gid() == self.owner.gid {
            return Ok(());
        }
        std::os::unix::fs::chown(path, Some(self.owner.uid), Some(self.owner.gid)).map_err(|e| {
            SandboxError::Other(format!(
                "workspace {} is owned by {}:{} and cannot be given to the sandbox user {}:{}: {e}",
                path.display(),
                meta.uid(),
                meta.gid(),
                self.owner.uid,
                self.owner.gid
            ))
        })
    }
}

fn io_error(path: &Path, e: io::Error) -> SandboxError {
    SandboxError::Other(format!("workspace {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> UserIds {
        UserIds {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        }
    }

    #[test]
    fn creates_the_workspace_under_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let ws = Workspaces::new(dir.path().join("root"), me());
        let path = ws.prepare("alice").unwrap();
        assert!(path.is_dir());
        assert_eq!(path, dir.path().join("root/alice").canonicalize().unwrap());
        assert_eq!(ws.prepare("alice").unwrap(), path, "idempotent");
    }

    #[test]
    fn traversal_names_are_refused_and_nothing_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let ws = Workspaces::new(dir.path().join("root"), me());
        for bad in ["..", "../../etc", "/etc", "a/b", "a\0b", "", "A"] {
            assert!(
                matches!(ws.prepare(bad), Err(SandboxError::InvalidId(_))),
                "{bad:?}"
            );
        }
        assert!(!dir.path().join("etc").exists());
    }

    #[test]
    fn a_symlink_out_of_the_root_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::os::unix::fs::symlink(dir.path(), root.join("mallory")).unwrap();
        let ws = Workspaces::new(&root, me());
        assert!(matches!(
            ws.prepare("mallory"),
            Err(SandboxError::Refused(_))
        ));
    }
}
