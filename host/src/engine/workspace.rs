//! Workspace directories, `{root}/{name}`, resolved and created by the host.
//!
//! A policy only names a workspace; the host validates the name against the
//! id allow-list, refuses symlinks and anything that resolves outside the
//! root, and owns the directory's creation and ownership.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use sandbox_contract::WorkspaceName;

use crate::config::UserIds;
use crate::error::SandboxError;

/// Mode of a workspace root the host creates: owner only, so files a
/// workload plants in its workspace (setuid binaries included) are out of
/// reach of the host's other users.
pub const ROOT_MODE: u32 = 0o700;

/// The workspace root and the user that owns the workspaces.
#[derive(Debug, Clone)]
pub struct Workspaces {
    root: PathBuf,
    owner: UserIds,
    /// Whether a loose root mode was reported already (once per process).
    warned: Arc<AtomicBool>,
}

impl Workspaces {
    pub fn new(root: impl Into<PathBuf>, owner: UserIds) -> Self {
        Workspaces {
            root: root.into(),
            owner,
            warned: Arc::default(),
        }
    }

    /// Creates the root when missing, owner only ([`ROOT_MODE`], missing
    /// parents too); an existing root is left as it is, with a warning when
    /// other users can enter it.
    fn ensure_root(&self) -> Result<(), SandboxError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(ROOT_MODE)
            .create(&self.root)
            .map_err(|e| io_error(&self.root, e))?;
        if let Some(warning) = self.root_warning() {
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!("{warning}");
            }
        }
        Ok(())
    }

    /// Why the root's mode is unsafe, when it is: group or others may
    /// enter it, and so reach what workloads plant in their workspaces.
    pub fn root_warning(&self) -> Option<String> {
        let mode = std::fs::metadata(&self.root).ok()?.mode() & 0o7777;
        (mode & 0o077 != 0).then(|| {
            format!(
                "workspace root {} has mode {mode:o}: other users of this host can reach \
                 the files sandboxes write there (setuid binaries included); \
                 run `chmod 700 {}`",
                self.root.display(),
                self.root.display()
            )
        })
    }

    pub fn owner(&self) -> UserIds {
        self.owner
    }

    /// The user's artifact directory, `{root}/.artifacts/{name}`, with one
    /// subdirectory per entry of `mounts` (`/blobs` -> `blobs`), each the
    /// sandbox user's; checked and created as workspaces are. Workspace
    /// names cannot start with `.`, so it is never a workspace.
    pub fn prepare_artifacts(
        &self,
        workspace: &WorkspaceName,
        mounts: &[&str],
    ) -> Result<PathBuf, SandboxError> {
        self.ensure_root()?;
        let artifacts = Workspaces {
            root: self.root.join(".artifacts"),
            owner: self.owner,
            warned: Arc::new(AtomicBool::new(true)),
        };
        let dir = artifacts.prepare(workspace)?;
        for mount in mounts {
            let sub = dir.join(mount.trim_start_matches('/'));
            match std::fs::DirBuilder::new().mode(0o700).create(&sub) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_error(&sub, e)),
            }
            let meta = std::fs::symlink_metadata(&sub).map_err(|e| io_error(&sub, e))?;
            if !meta.is_dir() {
                return Err(SandboxError::Refused(format!(
                    "{} is not a directory",
                    sub.display()
                )));
            }
            self.fix_owner(&sub, &meta)?;
        }
        Ok(dir)
    }

    /// The checked host path of a workspace; creates it when missing.
    pub fn prepare(&self, workspace: &WorkspaceName) -> Result<PathBuf, SandboxError> {
        let name = workspace.as_str();
        self.ensure_root()?;
        let root = self
            .root
            .canonicalize()
            .map_err(|e| io_error(&self.root, e))?;
        let path = workspace.path(&root);
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
    /// container runs without CAP_DAC_OVERRIDE). Only a directory this
    /// host's user owns (it made it) is given to the sandbox user: another
    /// user's directory is refused, never taken from them.
    fn fix_owner(&self, path: &Path, meta: &std::fs::Metadata) -> Result<(), SandboxError> {
        if meta.uid() == self.owner.uid && meta.gid() == self.owner.gid {
            return Ok(());
        }
        let host = nix::unistd::geteuid().as_raw();
        if meta.uid() != host && meta.uid() != self.owner.uid {
            return Err(SandboxError::Refused(format!(
                "workspace {} is owned by uid {}, neither the sandbox user ({}:{}) nor this host's \
                 user ({host}): the host does not hand another user's directory to a sandbox. \
                 If it is a workspace of an earlier sandbox user, give it to this one with \
                 `chown -R {}:{} {}`",
                path.display(),
                meta.uid(),
                self.owner.uid,
                self.owner.gid,
                self.owner.uid,
                self.owner.gid,
                path.display()
            )));
        }
        std::os::unix::fs::lchown(path, Some(self.owner.uid), Some(self.owner.gid)).map_err(|e| {
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
        let path = ws.prepare(&name("alice")).unwrap();
        assert!(path.is_dir());
        assert_eq!(path, dir.path().join("root/alice").canonicalize().unwrap());
        assert_eq!(ws.prepare(&name("alice")).unwrap(), path, "idempotent");
    }

    #[test]
    fn a_new_root_is_owner_only() {
        // Bug: the root was created 0755, so a setuid file a workload
        // planted in its workspace was reachable by every user of the host.
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("parent/root");
        let ws = Workspaces::new(&root, me());
        ws.prepare(&name("alice")).unwrap();
        for p in [&root, &dir.path().join("parent")] {
            let mode = std::fs::metadata(p).unwrap().mode() & 0o7777;
            assert_eq!(mode, ROOT_MODE, "{}", p.display());
        }
        assert!(ws.root_warning().is_none());
    }

    #[test]
    fn a_loose_existing_root_is_reported_and_left_alone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let ws = Workspaces::new(&root, me());
        ws.prepare(&name("alice")).unwrap();
        let warning = ws.root_warning().expect("a 0755 root is reported");
        assert!(
            warning.contains("755") && warning.contains("chmod 700"),
            "{warning}"
        );
        let mode = std::fs::metadata(&root).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o755, "the operator's directory is not changed");
    }

    #[test]
    fn traversal_names_cannot_even_be_named() {
        for bad in ["..", "../../etc", "/etc", "a/b", "a\0b", "", "A"] {
            assert!(WorkspaceName::parse(bad).is_err(), "{bad:?}");
        }
    }

    fn name(n: &str) -> WorkspaceName {
        WorkspaceName::parse(n).unwrap()
    }

    #[test]
    fn another_users_directory_is_refused_not_taken() {
        // Bug: a directory of another uid under the root was chowned to
        // the sandbox user. Needs root to plant one (CI runs as root).
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test plants another user's directory: run it as root"
        );
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("carol")).unwrap();
        std::os::unix::fs::chown(root.join("carol"), Some(4242), Some(4242)).unwrap();
        let sandbox_user = UserIds {
            uid: 1000,
            gid: 1000,
        };
        let ws = Workspaces::new(&root, sandbox_user);
        let err = ws.prepare(&name("carol")).unwrap_err();
        assert!(
            matches!(&err, SandboxError::Refused(m) if m.contains("uid 4242") && m.contains("chown -R")),
            "{err}"
        );
        let meta = std::fs::metadata(root.join("carol")).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (4242, 4242), "left as it was");
        // The host's own directory (root's here) is given to the sandbox user.
        std::fs::create_dir(root.join("dave")).unwrap();
        ws.prepare(&name("dave")).unwrap();
        let meta = std::fs::metadata(root.join("dave")).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (1000, 1000));
    }

    #[test]
    fn a_symlink_out_of_the_root_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::os::unix::fs::symlink(dir.path(), root.join("mallory")).unwrap();
        let ws = Workspaces::new(&root, me());
        assert!(matches!(
            ws.prepare(&name("mallory")),
            Err(SandboxError::Refused(_))
        ));
    }
}
