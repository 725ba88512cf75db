//! `network = "egress"`: sandboxes without a network of their own that
//! reach the allow-list, and nothing else, through the host's proxy.
//!
//! ```text
//! workload --TCP 127.0.0.1:3128--> agent relay (root, in the container)
//!          --Unix socket /.sandbox/egress/proxy.sock (a read-only bind of
//!            {state}/egress/sockets/{user})--> this host process's proxy
//!          --TCP--> an allowed destination
//! ```
//!
//! The container's network mode is `none`: its only interface is loopback,
//! so nothing is reachable but the relay, whatever the engine's firewall
//! does. The socket a container sees is its own user's, so the proxy knows
//! whose traffic it carries without trusting anything the sandbox says.
//!
//! Every host process sharing a workspace root (`sandbox serve`, a `sandbox
//! exec` beside it or alone) may serve a user's socket; one does at a time.
//! A process that needs it ([`Egress::ensure`], before every command) checks
//! under a lock that someone answers on it, and binds it itself (a fresh
//! socket renamed over the old name) when no one does. A process that ends
//! removes its sockets; one that crashed leaves a socket that refuses
//! connections, replaced by the next. While no process serves a user, the
//! relay answers the sandbox's requests with a 502 that says so.

mod meter;
mod proxy;
mod rules;

use std::collections::{HashMap, HashSet};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

pub use meter::{EgressCounts, Meters};
pub use rules::Rules;

use crate::config::EgressConfig;
use crate::error::SandboxError;

/// Where a sandbox finds its proxy socket (a read-only bind mount).
pub const SOCKET_MOUNT: &str = "/.sandbox/egress";
/// The socket's name in that directory.
pub const SOCKET_NAME: &str = "proxy.sock";
/// The port of the agent's relay on the sandbox's loopback.
pub const RELAY_PORT: u16 = 3128;
/// Connections one user's sandbox holds open to the proxy at once; more
/// are closed as they arrive.
pub const MAX_CONNECTIONS_PER_USER: usize = 64;
/// How often a process checks the sockets another process serves (and
/// takes over those whose server went away).
const WATCH_EVERY: Duration = Duration::from_secs(2);
/// How long a process waits for the socket's lock, and for an answer on it.
const LOCK_PATIENCE: Duration = Duration::from_secs(2);
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// The proxy variables of every sandbox with egress: what pip, npm, curl,
/// git and Python's urllib read.
pub fn proxy_env() -> Vec<String> {
    let url = format!("http://127.0.0.1:{RELAY_PORT}");
    let no_proxy = "localhost,127.0.0.1,::1";
    vec![
        format!("HTTP_PROXY={url}"),
        format!("HTTPS_PROXY={url}"),
        format!("http_proxy={url}"),
        format!("https_proxy={url}"),
        format!("NO_PROXY={no_proxy}"),
        format!("no_proxy={no_proxy}"),
    ]
}

/// This process's side of every user's egress.
pub struct Egress {
    /// `{state}/egress`: `sockets/{user}/proxy.sock` and `locks/{user}`.
    dir: PathBuf,
    rules: Arc<Rules>,
    meters: Arc<Meters>,
    /// Sockets this process serves, by user.
    served: Mutex<HashMap<String, Served>>,
    /// Users whose socket another process serves.
    watched: Mutex<HashSet<String>>,
    watchdog: Mutex<Option<JoinHandle<()>>>,
}

struct Served {
    /// The socket file this process bound: (device, inode).
    file: (u64, u64),
    accept: JoinHandle<()>,
}

impl Egress {
    /// The egress of the host processes whose state directory is
    /// `state_dir`, with `config`'s rules.
    pub fn new(state_dir: &Path, config: &EgressConfig) -> Result<Arc<Egress>, SandboxError> {
        let rules = Rules::new(config).map_err(|e| SandboxError::Refused(e.to_string()))?;
        if rules.is_empty() {
            tracing::warn!(
                "network \"egress\" with an empty [egress] allow: sandboxes reach nothing"
            );
        }
        Ok(Arc::new(Egress {
            dir: state_dir.join("egress"),
            rules: Arc::new(rules),
            meters: Arc::default(),
            served: Mutex::default(),
            watched: Mutex::default(),
            watchdog: Mutex::default(),
        }))
    }

    /// The counters of every user this process carried traffic for.
    pub fn meters(&self) -> &Meters {
        &self.meters
    }

    /// The host directory mounted at [`SOCKET_MOUNT`] in `user`'s
    /// containers, created when missing.
    pub fn socket_dir(&self, user: &str) -> Result<PathBuf, SandboxError> {
        let sockets = self.dir.join("sockets");
        for dir in [&self.dir, &sockets, &self.dir.join("locks")] {
            make_dir(dir, 0o700)?;
        }
        let dir = sockets.join(user);
        // Searchable by the container's root, which has no capability to
        // bypass permissions: it connects on the workload's behalf.
        make_dir(&dir, 0o755)?;
        Ok(dir)
    }

    /// Makes sure some host process answers on `user`'s socket: this one,
    /// when none does.
    pub async fn ensure(self: &Arc<Self>, user: &str) -> Result<(), SandboxError> {
        self.start_watchdog();
        if self.serves(user) {
            return Ok(());
        }
        let dir = self.socket_dir(user)?;
        let lock = self.dir.join("locks").join(user);
        let this = self.clone();
        let user = user.to_owned();
        // Blocking file locks and a short connect: off the async workers.
        let taken = tokio::task::spawn_blocking(move || {
            let _lock = lock_file(&lock)?;
            if probe(&dir) {
                this.watched.lock().unwrap().insert(user);
                return Ok(None);
            }
            bind(&dir).map(|bound| Some((user, bound)))
        })
        .await
        .map_err(|e| SandboxError::Refused(format!("egress: {e}")))??;
        if let Some((user, (listener, file))) = taken {
            self.watched.lock().unwrap().remove(&user);
            let accept = tokio::spawn(accept_loop(
                listener,
                Arc::new(proxy::Context {
                    user: user.clone(),
                    rules: self.rules.clone(),
                    meter: self.meters.of(&user),
                }),
            ));
            tracing::debug!(user, "serving the egress proxy socket");
            if let Some(old) = self
                .served
                .lock()
                .unwrap()
                .insert(user, Served { file, accept })
            {
                old.accept.abort();
            }
        }
        Ok(())
    }

    /// Whether this process serves `user`'s socket, and it is still the
    /// one at the socket's path (another process may have replaced it after
    /// finding it dead); forgets it otherwise.
    fn serves(&self, user: &str) -> bool {
        let path = self.dir.join("sockets").join(user).join(SOCKET_NAME);
        let mut served = self.served.lock().unwrap();
        let Some(ours) = served.get(user) else {
            return false;
        };
        if file_id(&path) == Some(ours.file) {
            return true;
        }
        if let Some(gone) = served.remove(user) {
            gone.accept.abort();
        }
        false
    }

    /// Every [`WATCH_EVERY`], takes over the sockets whose server went away
    /// (a `sandbox exec` that ended), so that work running on after it, a
    /// background job, keeps its egress.
    fn start_watchdog(self: &Arc<Self>) {
        let mut watchdog = self.watchdog.lock().unwrap();
        if watchdog.is_some() {
            return;
        }
        let weak: Weak<Egress> = Arc::downgrade(self);
        *watchdog = Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(WATCH_EVERY).await;
                let Some(egress) = weak.upgrade() else {
                    return;
                };
                let users: Vec<String> = egress.watched.lock().unwrap().iter().cloned().collect();
                let ours: Vec<String> = egress.served.lock().unwrap().keys().cloned().collect();
                for user in users.iter().chain(&ours) {
                    if let Err(e) = egress.ensure(user).await {
                        tracing::warn!(user, error = %e, "egress socket not served");
                    }
                }
            }
        }));
    }
}

impl Drop for Egress {
    /// Removes the sockets this process still serves, so the relays answer
    /// at once that no one does (or the next process takes them over).
    fn drop(&mut self) {
        if let Some(watchdog) = self.watchdog.get_mut().unwrap().take() {
            watchdog.abort();
        }
        for (user, served) in self.served.get_mut().unwrap().drain() {
            served.accept.abort();
            let path = self.dir.join("sockets").join(&user).join(SOCKET_NAME);
            if file_id(&path) == Some(served.file) {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

/// Accepts the relay's connections for one user, at most
/// [`MAX_CONNECTIONS_PER_USER`] at once.
async fn accept_loop(listener: UnixListener, cx: Arc<proxy::Context>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS_PER_USER));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(user = cx.user.as_str(), error = %e, "egress accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(
                user = cx.user.as_str(),
                "egress: {MAX_CONNECTIONS_PER_USER} connections open; closing a new one"
            );
            continue;
        };
        cx.meter.connected();
        let cx = cx.clone();
        tokio::spawn(async move {
            proxy::serve_connection(stream, cx).await;
            drop(slot);
        });
    }
}

fn make_dir(dir: &Path, mode: u32) -> Result<(), SandboxError> {
    match std::fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => {
            // The umask may have taken bits the mode needs.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
                .map_err(|e| io_error(dir, e))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let meta = std::fs::symlink_metadata(dir).map_err(|e| io_error(dir, e))?;
            if meta.is_dir() {
                Ok(())
            } else {
                Err(SandboxError::Refused(format!(
                    "{} is not a directory",
                    dir.display()
                )))
            }
        }
        Err(e) => Err(io_error(dir, e)),
    }
}

fn io_error(path: &Path, e: std::io::Error) -> SandboxError {
    SandboxError::Refused(format!("egress: {}: {e}", path.display()))
}

fn file_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|meta| (meta.dev(), meta.ino()))
}

/// Holds an exclusive lock on `path` (created when missing) until dropped.
fn lock_file(path: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, SandboxError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| io_error(path, e))?;
    let deadline = std::time::Instant::now() + LOCK_PATIENCE;
    let mut file = file;
    loop {
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((back, _)) if std::time::Instant::now() < deadline => {
                file = back;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err((_, errno)) => {
                return Err(SandboxError::Refused(format!(
                    "egress: {} stayed locked: {errno}",
                    path.display()
                )))
            }
        }
    }
}

/// A path to `name` in `dir` short enough for a socket address (at most
/// 107 bytes), through an open handle of `dir` that resolves it.
struct ShortPath {
    _dir: std::fs::File,
    prefix: String,
}

impl ShortPath {
    fn new(dir: &Path) -> Result<Self, SandboxError> {
        let handle = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_PATH | nix::libc::O_DIRECTORY | nix::libc::O_NOFOLLOW)
            .open(dir)
            .map_err(|e| io_error(dir, e))?;
        let prefix = format!("/proc/self/fd/{}", handle.as_raw_fd());
        Ok(ShortPath {
            _dir: handle,
            prefix,
        })
    }

    fn of(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("{}/{name}", self.prefix))
    }
}

/// Whether some process answers on the socket in `dir`.
fn probe(dir: &Path) -> bool {
    let Ok(short) = ShortPath::new(dir) else {
        return false;
    };
    let Ok(stream) = std::os::unix::net::UnixStream::connect(short.of(SOCKET_NAME)) else {
        return false;
    };
    // The connection is accepted and dropped by the server: say nothing.
    let _ = stream.set_read_timeout(Some(PROBE_TIMEOUT));
    true
}

/// Binds a fresh socket in `dir` and renames it over [`SOCKET_NAME`].
fn bind(dir: &Path) -> Result<(UnixListener, (u64, u64)), SandboxError> {
    let short = ShortPath::new(dir)?;
    let temporary = format!(".{SOCKET_NAME}.{}", std::process::id());
    let _ = std::fs::remove_file(dir.join(&temporary));
    let listener = std::os::unix::net::UnixListener::bind(short.of(&temporary))
        .map_err(|e| io_error(&dir.join(&temporary), e))?;
    let bound = dir.join(&temporary);
    // The container's root and workload connect as "others".
    std::fs::set_permissions(&bound, std::fs::Permissions::from_mode(0o666))
        .map_err(|e| io_error(&bound, e))?;
    let file = file_id(&bound)
        .ok_or_else(|| SandboxError::Refused(format!("egress: {} vanished", bound.display())))?;
    std::fs::rename(&bound, dir.join(SOCKET_NAME)).map_err(|e| io_error(&bound, e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| io_error(&bound, e))?;
    let listener = UnixListener::from_std(listener).map_err(|e| io_error(&bound, e))?;
    Ok((listener, file))
}
