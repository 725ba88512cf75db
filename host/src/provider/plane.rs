//! The plane: a link to a container's agent that bypasses the engine.
//!
//! Each container whose agent serves gets a directory of the host's state,
//! `{state}/plane/{container name}`, bind-mounted read-only at
//! [`PLANE_MOUNT`]. A host process that needs a link binds a fresh socket
//! in it ([`rendezvous`]): under a temporary name, renamed to `RANDOM.sock`
//! once it listens. The agent's `serve` (root in the container) watches the
//! directory and connects; the host accepts one peer whose uid is 0, takes
//! the socket's name away, and speaks the same wire as on the attach
//! stream, with no engine in between: no dockerd copy per frame, no
//! connection through dockerd per live container.
//!
//! Who can do what:
//! - The workload (another uid, no capability) cannot write the directory
//!   (a read-only mount of a host directory), so it can neither bind,
//!   replace nor remove a socket there. Where the host runs as root the
//!   directory is 0700 and each socket 0600, root's: the workload cannot
//!   even look in, let alone connect. Where it does not (a service user),
//!   the agent, root without `CAP_DAC_OVERRIDE`, connects as "other": the
//!   directory is 0755 and the socket 0666, and the host refuses every
//!   peer whose uid is not 0 ([`rendezvous`] goes on waiting for the
//!   agent).
//! - The host never follows a path the workload can write: the directory
//!   and everything in it are the host's, opened through a handle that
//!   does not follow links.
//! - A socket is used once: after the agent connected, its name goes, so a
//!   restarted agent, or anything else, finds nothing to connect to until
//!   the host offers a new one.
//!
//! gVisor refuses connections to host sockets unless the runtime is told
//! to allow them (`--host-uds`), which would let every gVisor sandbox of
//! the engine reach any host socket mounted into it. The host does not ask
//! for that: containers under runsc get no plane, and their links stay on
//! the attach stream.

use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::container::LogOutput;
use futures_util::StreamExt;
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;

pub use sandbox_agent::protocol::PLANE_MOUNT;
pub use sandbox_agent::protocol::{PLANE_PIPE_SUFFIX, PLANE_SOCKET_SUFFIX};

use crate::error::SandboxError;

/// The label of a container created with a plane directory mounted: the
/// directory's nonce. Each container has a directory of its own,
/// `{name}.{nonce}`: a container made again under the same name never
/// shares one with its predecessor (nor with a host process still
/// opening a link to that one).
pub const PLANE_LABEL: &str = "sandbox.plane";

/// How much of the agent's output one read takes.
const READ_CHUNK: usize = 64 * 1024;

/// The planes of the host processes whose state directory is `state_dir`.
#[derive(Debug, Clone)]
pub struct Planes {
    root: PathBuf,
}

impl Planes {
    pub fn new(state_dir: &Path) -> Self {
        Planes {
            root: state_dir.join("plane"),
        }
    }

    /// The directory of container `name` whose [`PLANE_LABEL`] is `nonce`
    /// (not created); `None` for a label this host never writes.
    pub fn dir(&self, name: &str, nonce: &str) -> Option<PathBuf> {
        let valid = nonce.len() == NONCE_LEN && nonce.bytes().all(|b| b.is_ascii_hexdigit());
        (valid && !name.is_empty() && !name.contains('/') && !name.starts_with('.'))
            .then(|| self.root.join(format!("{name}.{nonce}")))
    }

    /// Creates a fresh directory for container `name`, about to be
    /// created: its path and nonce (the container's [`PLANE_LABEL`]).
    pub fn prepare(&self, name: &str) -> Result<(PathBuf, String), SandboxError> {
        make_dir(&self.root, 0o700)?;
        let nonce = crate::dataplane::exec::new_execution_id()[..NONCE_LEN].to_owned();
        let dir = self
            .dir(name, &nonce)
            .ok_or_else(|| SandboxError::Other(format!("no plane for container {name:?}")))?;
        let root = nix::unistd::geteuid().is_root();
        make_dir(&dir, if root { 0o700 } else { 0o755 })?;
        Ok((dir, nonce))
    }

    /// Removes the directory of container `name` (it was removed) whose
    /// label was `nonce`.
    pub fn remove(&self, name: &str, nonce: &str) {
        let Some(dir) = self.dir(name, nonce) else {
            return;
        };
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let _ = std::fs::remove_dir(&dir);
    }
}

/// Hex digits of a plane directory's nonce.
const NONCE_LEN: usize = 24;

/// Creates `dir` with `mode`, or checks that it is a directory of this
/// process's user (never a link) and sets `mode`.
fn make_dir(dir: &Path, mode: u32) -> Result<(), SandboxError> {
    let error = |e: std::io::Error| SandboxError::Other(format!("{}: {e}", dir.display()));
    match std::fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let meta = std::fs::symlink_metadata(dir).map_err(error)?;
            if !meta.is_dir() || meta.uid() != nix::unistd::geteuid().as_raw() {
                return Err(SandboxError::Other(format!(
                    "{} is not a directory of this process's user",
                    dir.display()
                )));
            }
        }
        Err(e) => return Err(error(e)),
    }
    // The umask may have taken bits away.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(error)
}

/// Offers a socket in `dir` (a container's plane directory) and waits up to
/// `patience` for its agent to connect: the connection, or why none came.
pub async fn rendezvous(dir: &Path, patience: Duration) -> Result<UnixStream, String> {
    offer(dir, PLANE_SOCKET_SUFFIX)?.accept(patience).await
}

/// A socket offered in a plane directory, listening under its name until
/// accepted or dropped (the name goes either way).
pub struct Offer {
    listener: tokio::net::UnixListener,
    /// The name the agent is told (without the suffix).
    name: String,
    dir: PathBuf,
    _gone: Remove,
}

/// Binds a fresh socket in `dir` under a temporary name and renames it to
/// `RANDOM` + `suffix` once it listens ([`PLANE_SOCKET_SUFFIX`]: for the
/// agent's watch; a pipe's, for the request that names it).
pub fn offer(dir: &Path, suffix: &str) -> Result<Offer, String> {
    let handle = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc_flags())
        .open(dir)
        .map_err(|e| format!("the plane directory {}: {e}", dir.display()))?;
    let meta = handle
        .metadata()
        .map_err(|e| format!("the plane directory {}: {e}", dir.display()))?;
    if meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(format!(
            "the plane directory {} is not this process's user's",
            dir.display()
        ));
    }
    // Through the handle: no link on the way is followed, and the address
    // stays short whatever the state directory's path.
    let at = |name: &str| PathBuf::from(format!("/proc/self/fd/{}/{name}", handle.as_raw_fd()));
    let name = crate::dataplane::exec::new_execution_id()[..24].to_owned();
    let (binding, offered) = (format!(".{name}.tmp"), format!("{name}{suffix}"));
    let listener = std::os::unix::net::UnixListener::bind(at(&binding))
        .map_err(|e| format!("binding a plane socket in {}: {e}", dir.display()))?;
    // By their full paths: the handle closes when this returns.
    let gone = Remove(vec![dir.join(&binding), dir.join(&offered)]);
    let mode = if nix::unistd::geteuid().is_root() {
        0o600
    } else {
        0o666
    };
    std::fs::set_permissions(at(&binding), std::fs::Permissions::from_mode(mode))
        .and_then(|()| std::fs::rename(at(&binding), at(&offered)))
        .and_then(|()| listener.set_nonblocking(true))
        .map_err(|e| format!("offering a plane socket in {}: {e}", dir.display()))?;
    let listener = tokio::net::UnixListener::from_std(listener)
        .map_err(|e| format!("offering a plane socket: {e}"))?;
    Ok(Offer {
        listener,
        name,
        dir: dir.to_owned(),
        _gone: gone,
    })
}

impl Offer {
    /// The name a request gives the agent.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The agent's connection, taken within `patience` (any other peer is
    /// refused); the socket's name goes.
    pub async fn accept(self, patience: Duration) -> Result<UnixStream, String> {
        let dir = &self.dir;
        let accepted = tokio::time::timeout(patience, async {
            let mut refused = 0u32;
            loop {
                let (stream, _) = self.listener.accept().await?;
                match stream.peer_cred() {
                    Ok(peer) if peer.uid() == 0 => return Ok::<_, std::io::Error>(stream),
                    peer => {
                        refused += 1;
                        // Said once per socket: a flood costs no log.
                        if refused == 1 {
                            tracing::warn!(
                                dir = %dir.display(),
                                peer = ?peer.map(|p| (p.uid(), p.pid())),
                                "a peer other than the sandbox agent connected to its plane \
                                 socket: refused"
                            );
                        }
                        // A flood of them costs a pause each.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        })
        .await;
        match accepted {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => Err(format!("accepting on the plane socket: {e}")),
            Err(_) => Err(format!(
                "the sandbox agent did not connect to the plane socket within {} ms",
                patience.as_millis()
            )),
        }
    }
}

fn libc_flags() -> i32 {
    nix::libc::O_PATH | nix::libc::O_DIRECTORY | nix::libc::O_NOFOLLOW
}

/// Removes its paths when dropped (whichever name the socket has by then).
struct Remove(Vec<PathBuf>);

impl Drop for Remove {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// What the agent writes on `read`, as the attach stream's output items (so
/// one reader serves both kinds of link).
pub fn output_of(
    read: tokio::net::unix::OwnedReadHalf,
) -> impl futures_util::Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send {
    futures_util::stream::unfold(Some(read), |read| async move {
        let mut read = read?;
        let mut buffer = vec![0u8; READ_CHUNK];
        match read.read(&mut buffer).await {
            Ok(0) => None,
            Ok(n) => {
                buffer.truncate(n);
                Some((
                    Ok(LogOutput::StdOut {
                        message: buffer.into(),
                    }),
                    Some(read),
                ))
            }
            Err(err) => Some((Err(bollard::errors::Error::IOError { err }), None)),
        }
    })
    .fuse()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The socket offered in `dir`, once there.
    async fn offered(dir: &Path) -> PathBuf {
        for _ in 0..200 {
            let found = std::fs::read_dir(dir).unwrap().flatten().find(|e| {
                e.file_name()
                    .to_string_lossy()
                    .ends_with(PLANE_SOCKET_SUFFIX)
            });
            if let Some(entry) = found {
                return entry.path();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("no socket offered in {}", dir.display());
    }

    /// Connects to `path` as `uid` from a child process (its `pre_exec`
    /// runs after the uid change); whether the connect succeeded.
    fn connect_as(uid: u32, path: &Path) -> bool {
        let path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        let mut command = std::process::Command::new("/bin/true");
        command.uid(uid).gid(uid);
        // SAFETY: only async-signal-safe calls on memory made before the fork.
        unsafe {
            command.pre_exec(move || {
                let fd = nix::libc::socket(nix::libc::AF_UNIX, nix::libc::SOCK_STREAM, 0);
                let mut address: nix::libc::sockaddr_un = std::mem::zeroed();
                address.sun_family = nix::libc::AF_UNIX as nix::libc::sa_family_t;
                for (i, b) in path.as_bytes().iter().enumerate() {
                    address.sun_path[i] = *b as nix::libc::c_char;
                }
                let connected = nix::libc::connect(
                    fd,
                    std::ptr::addr_of!(address).cast(),
                    std::mem::size_of::<nix::libc::sockaddr_un>() as u32,
                );
                nix::libc::_exit(if connected == 0 { 0 } else { 1 });
            });
        }
        command.status().unwrap().success()
    }

    #[tokio::test]
    async fn only_a_root_peer_is_taken_and_the_socket_is_used_once() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root (to connect as another uid)");
            return;
        }
        let root = tempfile::tempdir().unwrap();
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let planes = Planes::new(root.path());
        let (dir, nonce) = planes.prepare("c1").unwrap();
        assert_eq!(planes.dir("c1", &nonce), Some(dir.clone()));
        assert_eq!(planes.dir("c1", "../x"), None);
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let waiting = tokio::spawn({
            let dir = dir.clone();
            async move { rendezvous(&dir, Duration::from_secs(5)).await }
        });
        let socket = offered(&dir).await;
        assert_eq!(
            std::fs::symlink_metadata(&socket)
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        // Another uid cannot reach the directory...
        assert!(!connect_as(1000, &socket));
        // ...and were it let in (a host that is not root makes the socket
        // 0666 and the directory 0755), its connection is refused.
        for open in [root.path().join("plane"), dir.clone()] {
            std::fs::set_permissions(open, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(connect_as(1000, &socket));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished());
        // The agent (root) is taken, and the name goes.
        let mut agent = tokio::net::UnixStream::connect(&socket).await.unwrap();
        let mut host = waiting.await.unwrap().unwrap();
        agent.write_all(b"hello\n").await.unwrap();
        let mut line = [0u8; 6];
        host.read_exact(&mut line).await.unwrap();
        assert_eq!(&line, b"hello\n");
        assert!(std::fs::symlink_metadata(&socket).is_err());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        // No one connecting: a bounded wait, and nothing left behind.
        let err = rendezvous(&dir, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(err.contains("did not connect"), "{err}");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        // A link planted where the directory should be is not followed.
        planes.remove("c1", &nonce);
        assert!(!dir.exists());
        std::os::unix::fs::symlink("/tmp", &dir).unwrap();
        assert!(rendezvous(&dir, Duration::from_millis(100)).await.is_err());
    }
}
