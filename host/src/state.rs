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
    let fail = |what: &str, e: io::Error| {
        SandboxError::Other(format!("{what} the state directory {}: {e}", dir.display()))
    };
    let existed = std::fs::symlink_metadata(&dir).is_ok();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| fail("creating", e))?;
    check_root(workspace_root)?;
    if !existed {
        // Root making the store of a user's workspace root (an admin shell
        // before the service's first start) makes it that user's.
        if let Some((uid, gid)) = adopter(&dir) {
            std::os::unix::fs::lchown(&dir, Some(uid), Some(gid))
                .map_err(|e| fail("handing over", e))?;
        }
    }
    let store_owner = check(&dir, euid, None)?;
    for sub in SUBDIRS {
        let path = dir.join(sub);
        match std::fs::symlink_metadata(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Ok(meta) if euid == 0 && meta.is_dir() && meta.uid() != store_owner => {
                // Made by root before what root makes was handed over.
                let gid = std::fs::symlink_metadata(&dir).map_or(0, |m| m.gid());
                std::os::unix::fs::lchown(&path, Some(store_owner), Some(gid))
                    .map_err(|e| fail("handing over", e))?;
                check(&path, euid, Some(store_owner))?;
            }
            _ => {
                check(&path, euid, Some(store_owner))?;
            }
        }
    }
    store_id(&dir).map_err(|e| fail("naming", e))?;
    Ok(dir)
}

/// The workspace root holds the store: nobody but its owner may rename
/// entries in it (a sticky bit stops the others from renaming theirs).
fn check_root(root: &Path) -> Result<(), SandboxError> {
    let meta = std::fs::metadata(root)
        .map_err(|e| SandboxError::Other(format!("workspace root {}: {e}", root.display())))?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(SandboxError::Refused(format!(
            "workspace root {} has mode {mode:o}: other users could replace the host's state \
             directory in it; run `chmod go-w {}` (700 is best)",
            root.display(),
            root.display()
        )));
    }
    Ok(())
}

/// The store's identity, made once at random (`id` in the store): what a
/// container's `sandbox.store` label names, whatever path its host
/// reached the store by.
pub fn store_id(dir: &Path) -> io::Result<String> {
    let path = dir.join("id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        if valid_id(id.trim()) {
            return Ok(id.trim().to_owned());
        }
    }
    let id = random_id();
    let staging = dir.join(format!(".id-{}", std::process::id()));
    let _ = std::fs::remove_file(&staging);
    {
        use std::io::Write;
        let mut file = open(&staging, Create::New)?;
        file.write_all(id.as_bytes())?;
    }
    // A hard link fails when another process named the store first: its
    // name wins.
    let linked = std::fs::hard_link(&staging, &path);
    let _ = std::fs::remove_file(&staging);
    match linked {
        Ok(()) => Ok(id),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let theirs = std::fs::read_to_string(&path)?;
            Ok(theirs.trim().to_owned())
        }
        Err(e) => Err(e),
    }
}

/// Reads the store's id, if it has one.
pub fn read_store_id(workspace_root: &Path) -> Option<String> {
    let id = std::fs::read_to_string(dir(workspace_root).join("id")).ok()?;
    valid_id(id.trim()).then(|| id.trim().to_owned())
}

fn valid_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

fn random_id() -> String {
    let uuid = std::fs::read_to_string("/proc/sys/kernel/random/uuid").unwrap_or_default();
    let hex: String = uuid.chars().filter(char::is_ascii_hexdigit).collect();
    if hex.len() == 32 {
        hex
    } else {
        use std::hash::BuildHasher;
        let a =
            std::collections::hash_map::RandomState::new().hash_one(std::time::SystemTime::now());
        let b = std::collections::hash_map::RandomState::new().hash_one(std::process::id());
        format!("{a:016x}{b:016x}")
    }
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
/// A subdirectory (`store_owner` given) must belong to the store's owner;
/// the store itself to this process's user or root (root may work in any
/// user's store, and then trusts that user).
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
        Some(owner) => found.uid == owner,
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
        // Subdirectories: the store's owner only (root's are handed over).
        assert!(unsafe_because(&found(0, 0o700), me, Some(me)).is_some());
        assert!(unsafe_because(&found(1002, 0o700), me, Some(me)).is_some());
        assert_eq!(unsafe_because(&found(me, 0o700), me, Some(me)), None);
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
