//! Bounded workspaces (`workspace_quota`): each workspace is an ext4
//! filesystem in a sparse image file of the quota's size, loop-mounted at
//! `{root}/{workspace}` before a container bind-mounts it. The kernel then
//! bounds what a workload writes there (ENOSPC at the quota), whatever it
//! does, with no polling; the host's disk loses at most the quota per
//! workspace. The images live in the host's state directory
//! (`{state}/quota/`), never in a workspace, so no workload sees them.
//!
//! Mounting takes CAP_SYS_ADMIN in the host's mount namespace, which the
//! container engine shares (the host process runs as root, or with that
//! capability and without a private mount namespace). A workspace that
//! already holds data is copied into its new filesystem first; when it does
//! not fit, nothing changes and the create fails with how much it holds. The
//! directory the data came from is kept beside the images
//! (`{name}.before-quota-{unix time}`), for the operator to remove.
//!
//! A mount does not outlive a reboot: the next container of the workspace
//! mounts it again. A larger quota grows a mounted filesystem in place; a
//! smaller one is not applied to a filesystem that exists (said once).

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::config::UserIds;
use crate::error::SandboxError;

/// The workspace filesystems of one workspace root.
#[derive(Debug, Clone)]
pub struct Quotas {
    bytes: u64,
    images: PathBuf,
    owner: UserIds,
    /// Whether this process shares the engine's mount namespace.
    checked: std::sync::Arc<std::sync::OnceLock<Result<(), String>>>,
}

impl Quotas {
    /// Quotas of `bytes` per workspace, images under `state/quota`.
    pub fn new(bytes: u64, state: &Path, owner: UserIds) -> Self {
        Quotas {
            bytes,
            images: state.join("quota"),
            owner,
            checked: Default::default(),
        }
    }

    /// The image file of `workspace`.
    pub fn image(&self, workspace: &str) -> PathBuf {
        self.images.join(format!("{workspace}.img"))
    }

    /// Makes `path` the mount point of the bounded filesystem `name` (a
    /// workspace, or `{workspace}.artifacts` for its artifact directories):
    /// created, data moved in, or grown, as needed. Serialized per name
    /// across host processes.
    pub fn attach(&self, name: &str, path: &Path) -> Result<(), SandboxError> {
        self.same_mounts_as_the_engine()?;
        crate::state::create_dir(&self.images).map_err(|e| fail(&self.images, e))?;
        let lock_path = self.images.join(format!("{name}.lock"));
        let lock = crate::state::open(&lock_path, crate::state::Create::OrOpen)
            .map_err(|e| fail(&lock_path, e))?;
        let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| fail(&lock_path, e.into()))?;
        let image = self.image(name);
        if let Some(device) = mounted_from(path)? {
            return self.grow(&image, &device);
        }
        self.clear_leftovers(name)?;
        if !image.exists() {
            // Built aside and renamed once whole: a crash mid-copy leaves
            // no image that looks finished.
            let partial = self.images.join(format!("{name}.partial"));
            self.make(&partial)?;
            if holds_data(path)? {
                self.move_in(name, &partial, path)?;
            }
            std::fs::rename(&partial, &image).map_err(|e| fail(&image, e))?;
        } else if holds_data(path)? {
            // An image exists, yet files were written beside it (its mount
            // was lost while a container wrote the bare directory): kept
            // aside, never merged over what the image holds.
            let aside = self.set_aside(name, path)?;
            tracing::warn!(
                workspace = name,
                kept = %aside.display(),
                "a workspace directory held files while its bounded filesystem was not mounted: \
                 they are kept aside"
            );
        }
        mount(&image, path)?;
        self.own_root(path)?;
        let device = mounted_from(path)?.unwrap_or_default();
        self.grow(&image, &device)
    }

    /// Whether `path` is a mount point now.
    pub fn is_mounted(path: &Path) -> Result<bool, SandboxError> {
        Ok(mounted_from(path)?.is_some())
    }

    /// A staging mount or partial image a crashed attach left.
    fn clear_leftovers(&self, name: &str) -> Result<(), SandboxError> {
        let staging = self.images.join(format!("{name}.staging"));
        if mounted_from(&staging)?.is_some() {
            unmount(&staging)?;
        }
        let _ = std::fs::remove_dir(&staging);
        let _ = std::fs::remove_file(self.images.join(format!("{name}.partial")));
        Ok(())
    }

    /// Mounts made here reach the sandboxes only when this process shares
    /// the engine's mount namespace (not a container, nor a service with a
    /// private one): checked against `dockerd`'s, once.
    fn same_mounts_as_the_engine(&self) -> Result<(), SandboxError> {
        self.checked
            .get_or_init(|| {
                let mine = std::fs::read_link("/proc/self/ns/mnt").map_err(|e| e.to_string())?;
                let out = Command::new("pidof")
                    .arg("dockerd")
                    .output()
                    .map_err(|e| format!("pidof dockerd: {e}"))?;
                let pids = String::from_utf8_lossy(&out.stdout).into_owned();
                let pid = pids.split_whitespace().next().ok_or(
                    "no dockerd is visible from this process, so its mounts cannot be checked \
                     to reach the sandboxes",
                )?;
                let engine = std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
                    .map_err(|e| format!("dockerd's mount namespace: {e}"))?;
                if engine == mine {
                    Ok(())
                } else {
                    Err(
                        "this process runs in another mount namespace than dockerd (a \
                         container, or a service with PrivateTmp, ProtectSystem or ProtectHome): \
                         its mounts would not reach the sandboxes"
                            .to_owned(),
                    )
                }
            })
            .clone()
            .map_err(|why| {
                SandboxError::Refused(format!(
                    "workspace_quota needs the host process beside the engine: {why}"
                ))
            })
    }

    /// A sparse image of the quota's size at `image`, with an empty ext4 in
    /// it, its root owned by the sandbox user, no space reserved for root,
    /// readable by its owner only.
    fn make(&self, image: &Path) -> Result<(), SandboxError> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(image)
            .map_err(|e| fail(image, e))?;
        file.set_len(self.bytes).map_err(|e| fail(image, e))?;
        drop(file);
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0", "-E"])
            .arg(format!(
                "root_owner={}:{},lazy_itable_init=1,nodiscard",
                self.owner.uid, self.owner.gid
            ))
            .arg(image))
        .inspect_err(|_| {
            let _ = std::fs::remove_file(image);
        })
    }

    /// Copies what `path` holds into the image (mounted aside for it), then
    /// moves the directory aside and makes an empty one in its place. When
    /// the copy fails (it does not fit) nothing is moved; a fresh image is
    /// removed again.
    fn move_in(&self, workspace: &str, image: &Path, path: &Path) -> Result<(), SandboxError> {
        let staging = self.images.join(format!("{workspace}.staging"));
        std::fs::create_dir_all(&staging).map_err(|e| fail(&staging, e))?;
        mount(image, &staging)?;
        // No container of the workspace runs (the engine checked), so
        // nothing changes it under the copy; bounded all the same.
        let copied = run(Command::new("timeout")
            .args(["-k", "10", COPY_LIMIT, "cp", "-a"])
            .arg(path.join("."))
            .arg(&staging));
        let unmounted = unmount(&staging);
        let _ = std::fs::remove_dir(&staging);
        if let Err(e) = copied {
            let _ = std::fs::remove_file(image);
            let held = run_output(Command::new("timeout").args(["60", "du", "-sh"]).arg(path))
                .ok()
                .and_then(|out| out.split_whitespace().next().map(str::to_owned))
                .unwrap_or_else(|| "more".to_owned());
            return Err(SandboxError::Refused(format!(
                "workspace {workspace} holds {held}, which does not fit its quota of {} bytes \
                 (workspace_quota): nothing was changed; raise the quota or make room ({e})",
                self.bytes
            )));
        }
        unmounted?;
        let aside = self.set_aside(workspace, path)?;
        tracing::warn!(
            workspace,
            kept = %aside.display(),
            "workspace moved into its bounded filesystem; the directory it was in is kept aside \
             (remove it once checked)"
        );
        Ok(())
    }

    /// Moves the workspace directory beside the images and makes an empty
    /// one in its place: where it went.
    fn set_aside(&self, workspace: &str, path: &Path) -> Result<PathBuf, SandboxError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let aside = self.images.join(format!("{workspace}.before-quota-{now}"));
        std::fs::rename(path, &aside).map_err(|e| fail(path, e))?;
        std::fs::create_dir(path).map_err(|e| fail(path, e))?;
        Ok(aside)
    }

    /// The sandbox user owns the filesystem's root (a workspace directory's
    /// mode), and `lost+found`, root's, is not left in the workspace.
    fn own_root(&self, path: &Path) -> Result<(), SandboxError> {
        std::os::unix::fs::chown(path, Some(self.owner.uid), Some(self.owner.gid))
            .map_err(|e| fail(path, e))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o750))
            .map_err(|e| fail(path, e))?;
        let _ = std::fs::remove_dir(path.join("lost+found"));
        Ok(())
    }

    /// Grows a mounted image to the quota when the quota is larger.
    fn grow(&self, image: &Path, device: &str) -> Result<(), SandboxError> {
        let size = std::fs::metadata(image).map_err(|e| fail(image, e))?.len();
        if size >= self.bytes {
            if size > self.bytes {
                tracing::warn!(
                    image = %image.display(),
                    size,
                    quota = self.bytes,
                    "a workspace filesystem is larger than workspace_quota: it is not shrunk"
                );
            }
            return Ok(());
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(image)
            .map_err(|e| fail(image, e))?;
        file.set_len(self.bytes).map_err(|e| fail(image, e))?;
        run(Command::new("losetup").args(["-c", device]))?;
        run(Command::new("resize2fs").arg(device))?;
        tracing::info!(image = %image.display(), quota = self.bytes, "workspace filesystem grown");
        Ok(())
    }
}

/// How long moving a workspace into its filesystem may take.
const COPY_LIMIT: &str = "1800";

/// Whether `path` holds anything but empty directories (which a host
/// process recreates on a bare directory: nothing to keep).
fn holds_data(path: &Path) -> Result<bool, SandboxError> {
    for entry in std::fs::read_dir(path).map_err(|e| fail(path, e))? {
        let entry = entry.map_err(|e| fail(path, e))?;
        let empty_dir = entry.file_type().is_ok_and(|t| t.is_dir())
            && std::fs::read_dir(entry.path()).is_ok_and(|mut d| d.next().is_none());
        if !empty_dir {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The device mounted at `path`, if something is (from the kernel's mount
/// table).
fn mounted_from(path: &Path) -> Result<Option<String>, SandboxError> {
    let table = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| fail(Path::new("/proc/self/mountinfo"), e))?;
    let wanted = path.to_string_lossy();
    Ok(table.lines().rev().find_map(|line| {
        // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS ... - FSTYPE SOURCE ...
        let mut fields = line.split(' ');
        let point = fields.nth(4)?;
        if unescape(point) != wanted {
            return None;
        }
        let after = line.split(" - ").nth(1)?;
        after.split(' ').nth(1).map(str::to_owned)
    }))
}

/// Mount table paths escape space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

fn mount(image: &Path, at: &Path) -> Result<(), SandboxError> {
    run(Command::new("mount")
        .args(["-t", "ext4", "-o", "loop,nosuid,nodev"])
        .arg(image)
        .arg(at))
    .map_err(|e| {
        SandboxError::Refused(format!(
            "mounting the workspace filesystem {} at {} failed: workspace_quota needs the host \
             process to mount filesystems (root, or CAP_SYS_ADMIN in the engine's mount \
             namespace): {e}",
            image.display(),
            at.display()
        ))
    })
}

fn unmount(at: &Path) -> Result<(), SandboxError> {
    run(Command::new("umount").arg(at))
}

fn run(cmd: &mut Command) -> Result<(), SandboxError> {
    run_output(cmd).map(drop)
}

fn run_output(cmd: &mut Command) -> Result<String, SandboxError> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .map_err(|e| SandboxError::Other(format!("{shown}: {e}")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(SandboxError::Other(format!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

fn fail(path: &Path, e: io::Error) -> SandboxError {
    SandboxError::Other(format!("workspace quota, {}: {e}", path.display()))
}

impl super::Engine {
    /// The workspace `workspace` and its artifact directories, prepared,
    /// and each its own bounded filesystem when `workspace_quota` is set:
    /// their host paths. Moving data in is refused while a container of the
    /// workspace runs (another thread's, under a per-thread policy, or one
    /// made before the quota): it could change the files under the copy, or
    /// go on writing into the directory set aside.
    pub(super) async fn bounded_workspace(
        &self,
        workspace: &sandbox_contract::WorkspaceName,
    ) -> Result<(PathBuf, PathBuf), SandboxError> {
        let dirs = crate::provider::plan::ARTIFACT_DIRS;
        let path = self.workspaces.prepare(workspace)?;
        let artifacts = self.workspaces.prepare_artifacts(workspace, &dirs)?;
        let Some(quotas) = self.quotas.clone() else {
            return Ok((path, artifacts));
        };
        if !Quotas::is_mounted(&path)? || !Quotas::is_mounted(&artifacts)? {
            let running = self
                .provider
                .list(&[
                    (super::label::MANAGED, "true"),
                    (super::label::NAMESPACE, self.namespace()),
                    (super::label::WORKSPACE, workspace.as_str()),
                ])
                .await?
                .into_iter()
                .filter(|c| c.status == crate::provider::Status::Running)
                .count();
            if running > 0 {
                return Err(SandboxError::Refused(format!(
                    "workspace {} is to move into its bounded filesystem (workspace_quota), but \
                     {running} container(s) made before still use it: it moves once they are \
                     gone (replaced when idle, or destroy them)",
                    workspace.as_str()
                )));
            }
        }
        // Files and mounts: off the runtime's threads.
        let (name, at, stash) = (
            workspace.as_str().to_owned(),
            path.clone(),
            artifacts.clone(),
        );
        tokio::task::spawn_blocking(move || {
            quotas.attach(&name, &at)?;
            quotas.attach(&format!("{name}.artifacts"), &stash)
        })
        .await
        .map_err(|e| SandboxError::Other(format!("workspace quota: {e}")))??;
        // The artifact directories on the mounted filesystem.
        let artifacts = self.workspaces.prepare_artifacts(workspace, &dirs)?;
        Ok((path, artifacts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_table_paths_are_unescaped() {
        assert_eq!(unescape("/a\\040b\\134c"), "/a b\\c");
    }
}
