//! The host's state directory, `{workspace_root}/.sandbox`: the installed
//! agent, work in flight, last use, threads and the agent-link locks.
//!
//! Every host process that shares a workspace root shares this directory,
//! so it decides what gc may remove and which process writes to an agent.
//! It is trusted only after a check at every start ([`prepare`]): a real
//! directory (no symlink), writable by nobody but its owner and root, and
//! owned by this process's user or root; when root works in a store that
//! another user owns (an admin shell beside the service), what it creates
//! is handed to that owner, so the service can still lock and remove it.
//! Files in it are opened without following links.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::SandboxError;

/// The state directory of the host processes that share `workspace_root`.
/// Workspace names cannot start with `.`, so no workspace can be (or
/// mount) it.
pub fn dir(workspace_root: &Path) -> PathBuf {
    workspace_root.join(".sandbox")
}

/// The subdirectories the host keeps in the state directory.
pub const SUBDIRS: [&str; 6] = [
    "running",
    "last-used",
    "threads",
    "closing",
    "destroyed",
    "links",
];

/// Creates the state directory of `workspace_root` when missing (owner
/// only, and the root too), then checks it and its subdirectories: refused,
/// with what to do, when another user could plant or remove files in it.
/// Returns its path.
pub fn prepare(workspace_root: &Path) -> Result<PathBuf, SandboxError> {
    let dir = dir(workspace_root);
    let euid = nix::unistd::geteuid().as_raw();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| {
            SandboxError::Other(format!(
                "creating the state directory {}: {e}",
                dir.display()
            ))
        })?;
    let store_owner = check(&dir, euid, None)?;
    for sub in SUBDIRS {
        let path = dir.join(sub);
        match std::fs::symlink_metadata(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            _ => {
                check(&path, euid, Some(store_owner))?;
            }
        }
    }
    Ok(dir)
}

/// Checks one directory of the store; returns its owner.
fn check(path: &Path, euid: u32, store_owner: Option<u32>) -> Result<u32, SandboxError> {
    let meta = std::fs::symlink_metadata(path)
        .map_err(|e| SandboxError::Other(format!("the state directory {}: {e}", path.display())))?;
    let found = Found {
        symlink: meta.file_type().is_symlink(),
        dir: meta.is_dir(),
        uid: meta.uid(),
        mode: meta.mode() & 0o7777,
    };
    match unsafe_because(&found, euid, store_owner) {
        None => Ok(found.uid),
        Some(why) => Err(SandboxError::Refused(format!(
            "the state directory {} {why}; it holds what decides which commands are in flight, \
             so the host does not use it as found. Remove it (no sandbox command may be running) \
             or fix it, for example `chown -R {euid} {dir} && chmod -R go-w {dir}`",
            path.display(),
            dir = path.display(),
        ))),
    }
}

/// What a check sees of a directory.
#[derive(Debug, Clone, Copy)]
struct Found {
    symlink: bool,
    dir: bool,
    uid: u32,
    mode: u32,
}

/// Why a directory of the store is unsafe for a process of `euid`, if it is.
/// A subdirectory (`store_owner` given) may belong to the store's owner or
/// root; the store itself to this process's user or root (root may work in
/// any user's store).
fn unsafe_because(found: &Found, euid: u32, store_owner: Option<u32>) -> Option<String> {
    if found.symlink {
        return Some("is a symbolic link".to_owned());
    }
    if !found.dir {
        return Some("is not a directory".to_owned());
    }
    if found.mode & 0o022 != 0 {
        return Some(format!(
            "has mode {:o}: users other than its owner can write to it",
            found.mode
        ));
    }
    let allowed = match store_owner {
        Some(owner) => found.uid == owner || found.uid == 0,
        None => found.uid == euid || found.uid == 0 || euid == 0,
    };
    if !allowed {
        return Some(format!(
            "is owned by uid {}, another user than this process's ({euid})",
            found.uid
        ));
    }
    if store_owner.is_none() && found.uid == 0 && euid != 0 {
        return Some(format!(
            "is owned by root, and this process (uid {euid}) cannot write to it"
        ));
    }
    None
}

/// How [`open`] treats an existing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Create {
    /// Fail when it exists.
    New,
    /// Open it, or create it (empty) when missing.
    OrOpen,
}

/// Opens `path` in the store for writing, owner only, never through a
/// symbolic link; a file root creates in another user's store is given to
/// that user.
pub fn open(path: &Path, create: Create) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options
        .write(true)
        .mode(0o600)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits());
    match create {
        Create::New => options.create_new(true),
        Create::OrOpen => options.create(true).truncate(false),
    };
    let file = options.open(path)?;
    if let Some((uid, gid)) = adopter(path) {
        std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
    }
    Ok(file)
}

/// Opens an existing file of the store for reading (locks), not through a
/// symbolic link.
pub fn open_existing(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path)
}

/// Creates the directory `path` (owner only) in the store when missing; an
/// existing one must be a real directory.
pub fn create_dir(path: &Path) -> io::Result<()> {
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => {
            if let Some((uid, gid)) = adopter(path) {
                std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            if std::fs::symlink_metadata(path)?.is_dir() {
                Ok(())
            } else {
                Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} is not a directory", path.display()),
                ))
            }
        }
        Err(e) => Err(e),
    }
}

/// Whom a new entry at `path` is given to: the owner of its directory,
/// when this process is root and that owner is not.
fn adopter(path: &Path) -> Option<(u32, u32)> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let parent = std::fs::symlink_metadata(path.parent()?).ok()?;
    (parent.uid() != 0).then(|| (parent.uid(), parent.gid()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(uid: u32, mode: u32) -> Found {
        Found {
            symlink: false,
            dir: true,
            uid,
            mode,
        }
    }

    #[test]
    fn a_store_others_can_write_or_plant_is_refused() {
        let me = 1000;
        assert_eq!(unsafe_because(&found(me, 0o700), me, None), None);
        assert_eq!(unsafe_because(&found(me, 0o755), me, None), None);
        for mode in [0o777, 0o770, 0o702, 0o1777] {
            assert!(
                unsafe_because(&found(me, mode), me, None)
                    .unwrap()
                    .contains("can write"),
                "{mode:o}"
            );
        }
        let link = Found {
            symlink: true,
            ..found(me, 0o700)
        };
        assert!(unsafe_because(&link, me, None).unwrap().contains("link"));
        let file = Found {
            dir: false,
            ..found(me, 0o600)
        };
        assert!(unsafe_because(&file, me, None)
            .unwrap()
            .contains("not a directory"));
    }

    #[test]
    fn only_this_user_or_root_owns_the_store_and_root_may_use_anyones() {
        let me = 1000;
        assert!(unsafe_because(&found(1001, 0o700), me, None)
            .unwrap()
            .contains("uid 1001"));
        assert!(unsafe_because(&found(0, 0o700), me, None)
            .unwrap()
            .contains("owned by root"));
        assert_eq!(unsafe_because(&found(1001, 0o700), 0, None), None);
        assert_eq!(unsafe_because(&found(0, 0o700), 0, None), None);
        // Subdirectories: the store's owner or root.
        assert_eq!(unsafe_because(&found(0, 0o700), me, Some(me)), None);
        assert!(unsafe_because(&found(1002, 0o700), me, Some(me)).is_some());
    }

    #[test]
    fn prepare_creates_the_store_owner_only_and_refuses_a_loose_one() {
        let root = tempfile::tempdir().unwrap();
        let dir = prepare(root.path()).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        std::fs::create_dir(dir.join("running")).unwrap();
        std::fs::set_permissions(
            dir.join("running"),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .unwrap();
        let err = prepare(root.path()).unwrap_err().to_string();
        assert!(
            err.contains("running") && err.contains("can write"),
            "{err}"
        );
    }

    #[test]
    fn files_are_never_opened_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::os::unix::fs::symlink(&target, dir.path().join("link")).unwrap();
        assert!(open(&dir.path().join("link"), Create::OrOpen).is_err());
        assert!(!target.exists(), "nothing created where the link points");
        assert!(open(&dir.path().join("plain"), Create::New).is_ok());
        assert!(open(&dir.path().join("plain"), Create::New).is_err());
    }
}
