//! `network = "egress"`: sandboxes without a network of their own that
//! reach the allow-list, and nothing else, through the host's proxy.
//!
//! ```text
//! workload --TCP 127.0.0.1:3128--> agent relay (root, in the container)
//!          --Unix socket /.sandbox/egress/proxy.sock (a read-only bind of
//!            {state}/egress/sockets/{backend}.{profile})--> this host
//!            process's proxy
//!          --TCP--> an allowed destination
//! ```
//!
//! The container's network mode is `none`: its only interface is loopback,
//! so nothing is reachable but the relay, whatever the engine's firewall
//! does. The socket a container sees is its own backend's, for the profile
//! it was made under (fixed by its mount), so the proxy knows whose traffic
//! it carries and which allow-list applies without trusting anything the
//! sandbox says, whichever host process serves it.
//!
//! Every host process sharing a workspace root (`sandbox serve`, a `sandbox
//! exec` beside it or alone) may serve a backend's socket; one does at a time.
//! A process that needs it ([`Egress::ensure`], before every command) checks
//! under a lock that someone answers on it, and binds it itself (a fresh
//! socket renamed over the old name) when no one does. A process that ends
//! removes its sockets; one that crashed leaves a socket that refuses
//! connections, replaced by the next. While no process serves a user, the
//! relay answers the sandbox's requests with a 502 that says so.

mod meter;
mod proxy;
mod rules;

use std::collections::HashMap;
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

use crate::config::{Config, EgressConfig, ProfileName};
use crate::error::SandboxError;
use sandbox_contract::UserId;

/// Where a sandbox finds its proxy socket (a read-only bind mount).
pub const SOCKET_MOUNT: &str = "/.sandbox/egress";
/// The socket's name in that directory.
pub const SOCKET_NAME: &str = "proxy.sock";
/// The port of the agent's relay on the sandbox's loopback.
pub const RELAY_PORT: u16 = 3128;
/// Connections one user's sandboxes hold open to the proxy at once (a
/// CONNECT tunnel counts until it ends); more are closed as they arrive.
pub const MAX_CONNECTIONS_PER_USER: usize = 64;
/// Connections this process carries at once, for every user together: a
/// bound on its file descriptors whatever the number of users.
pub const MAX_CONNECTIONS: usize = 2048;
/// A socket's refusals and accept failures are logged at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);
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

/// This process's side of every backend's egress.
pub struct Egress {
    /// `{state}/egress`: `sockets/{key}/proxy.sock` and `locks/{key}`,
    /// where the key is `{backend}.{profile}` (`.` is in neither).
    dir: PathBuf,
    /// The allow-list of every profile with egress.
    rules: HashMap<ProfileName, Arc<Rules>>,
    meters: Arc<Meters>,
    /// Sockets this process serves, by key.
    served: Mutex<HashMap<String, Served>>,
    /// Sockets another process serves (and whose they are), by key.
    watched: Mutex<HashMap<String, Owner>>,
    /// Each user's connections at once, over all their sockets.
    slots: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Every user's connections at once.
    all_slots: Arc<Semaphore>,
    watchdog: Mutex<Option<JoinHandle<()>>>,
}

/// Whose traffic a socket carries, and under which profile.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Owner {
    backend: String,
    user: UserId,
    profile: ProfileName,
}

/// The name of the socket of `backend`'s containers made under `profile`.
fn socket_key(backend: &str, profile: &ProfileName) -> String {
    format!("{backend}.{profile}")
}

struct Served {
    /// The socket file this process bound: (device, inode).
    file: (u64, u64),
    owner: Owner,
    accept: JoinHandle<()>,
}

impl Egress {
    /// The egress of the host processes whose state directory is
    /// `state_dir`, with the rules of `config`'s profiles.
    pub fn new(state_dir: &Path, config: &Config) -> Result<Arc<Egress>, SandboxError> {
        Ok(Arc::new(Egress {
            dir: state_dir.join("egress"),
            rules: profile_rules(config)?,
            meters: Arc::default(),
            served: Mutex::default(),
            watched: Mutex::default(),
            slots: Mutex::default(),
            all_slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            watchdog: Mutex::default(),
        }))
    }

    /// Whether `profile` is one with egress (its allow-list is parsed).
    pub fn has_profile(&self, profile: &ProfileName) -> bool {
        self.rules.contains_key(profile)
    }

    /// The counters of every user this process carried traffic for.
    pub fn meters(&self) -> &Meters {
        &self.meters
    }

    /// The host directory mounted at [`SOCKET_MOUNT`] in `backend`'s
    /// container made under `profile`, created when missing.
    pub fn socket_dir(
        &self,
        backend: &str,
        profile: &ProfileName,
    ) -> Result<PathBuf, SandboxError> {
        let sockets = self.dir.join("sockets");
        for dir in [&self.dir, &sockets, &self.dir.join("locks")] {
            make_dir(dir, 0o700)?;
        }
        let dir = sockets.join(socket_key(backend, profile));
        // Searchable by the container's root, which has no capability to
        // bypass permissions: it connects on the workload's behalf.
        make_dir(&dir, 0o755)?;
        Ok(dir)
    }

    /// Makes sure some host process answers on the socket of `backend`'s
    /// container made under `profile`, for `user`: this one, when none does.
    pub async fn ensure(
        self: &Arc<Self>,
        backend: &str,
        user: &UserId,
        profile: &ProfileName,
    ) -> Result<(), SandboxError> {
        self.start_watchdog();
        let owner = Owner {
            backend: backend.to_owned(),
            user: user.clone(),
            profile: profile.clone(),
        };
        let key = socket_key(backend, profile);
        let Some(rules) = self.rules.get(profile).cloned() else {
            return Err(SandboxError::Refused(format!(
                "profile {profile} has no egress"
            )));
        };
        if self.serves(&key) {
            return Ok(());
        }
        let dir = self.socket_dir(backend, profile)?;
        let lock = self.dir.join("locks").join(&key);
        let this = self.clone();
        let watched_key = key.clone();
        let watched_owner = owner.clone();
        // Blocking file locks and a short connect: off the async workers.
        let taken = tokio::task::spawn_blocking(move || {
            let _lock = lock_file(&lock)?;
            if probe(&dir) {
                this.watched
                    .lock()
                    .unwrap()
                    .insert(watched_key, watched_owner);
                return Ok(None);
            }
            bind(&dir).map(Some)
        })
        .await
        .map_err(|e| SandboxError::Refused(format!("egress: {e}")))??;
        if let Some((listener, file)) = taken {
            self.watched.lock().unwrap().remove(&key);
            let slots = self
                .slots
                .lock()
                .unwrap()
                .entry(user.as_str().to_owned())
                .or_insert_with(|| Arc::new(Semaphore::new(MAX_CONNECTIONS_PER_USER)))
                .clone();
            let accept = tokio::spawn(accept_loop(
                listener,
                Arc::new(proxy::Context {
                    user: user.as_str().to_owned(),
                    rules,
                    meter: self.meters.of(user.as_str()),
                }),
                [slots, self.all_slots.clone()],
            ));
            tracing::debug!(
                backend,
                profile = profile.as_str(),
                "serving the egress proxy socket"
            );
            let served = Served {
                file,
                owner,
                accept,
            };
            if let Some(old) = self.served.lock().unwrap().insert(key, served) {
                old.accept.abort();
            }
        }
        Ok(())
    }

    /// Stops serving (and watching) the socket of `backend`'s container
    /// made under `profile`, and removes it and its directory: the
    /// container was removed (by this process). Connections already open
    /// end with their tunnels; a process serving it elsewhere finds its
    /// directory gone at its next watch and stops too.
    pub fn withdraw(&self, backend: &str, profile: &str) {
        let Ok(profile) = ProfileName::parse(profile) else {
            return;
        };
        let key = socket_key(backend, &profile);
        self.watched.lock().unwrap().remove(&key);
        if let Some(gone) = self.served.lock().unwrap().remove(&key) {
            gone.accept.abort();
        }
        let dir = self.dir.join("sockets").join(&key);
        let _ = std::fs::remove_file(dir.join(SOCKET_NAME));
        let _ = std::fs::remove_dir(&dir);
    }

    /// Whether this process serves the socket `key`, and it is still the
    /// one at the socket's path (another process may have replaced it
    /// after finding it dead); forgets it otherwise.
    fn serves(&self, key: &str) -> bool {
        let path = self.dir.join("sockets").join(key).join(SOCKET_NAME);
        let mut served = self.served.lock().unwrap();
        let Some(ours) = served.get(key) else {
            return false;
        };
        if file_id(&path) == Some(ours.file) {
            return true;
        }
        if let Some(gone) = served.remove(key) {
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
                let mut owners: Vec<Owner> =
                    egress.watched.lock().unwrap().values().cloned().collect();
                owners.extend(
                    egress
                        .served
                        .lock()
                        .unwrap()
                        .values()
                        .map(|s| s.owner.clone()),
                );
                for o in owners {
                    let key = socket_key(&o.backend, &o.profile);
                    if !egress.dir.join("sockets").join(&key).is_dir() {
                        // Its container was removed (by whichever process).
                        egress.watched.lock().unwrap().remove(&key);
                        if let Some(gone) = egress.served.lock().unwrap().remove(&key) {
                            gone.accept.abort();
                        }
                        continue;
                    }
                    if let Err(e) = egress.ensure(&o.backend, &o.user, &o.profile).await {
                        tracing::warn!(backend = o.backend, error = %e, "egress socket not served");
                    }
                }
            }
        }));
    }
}

/// The allow-list of every profile of `config` with egress, parsed: an
/// unusable entry is refused (when the host starts) naming its profile.
pub fn profile_rules(config: &Config) -> Result<HashMap<ProfileName, Arc<Rules>>, SandboxError> {
    let mut rules = HashMap::new();
    for profile in config.profiles().into_iter().filter(|p| p.has_egress()) {
        let list = EgressConfig {
            allow: profile.allow.clone(),
            hosts: config.egress.hosts.clone(),
            metrics_per_user: config.egress.metrics_per_user,
        };
        let parsed = Rules::new(&list)
            .map_err(|e| SandboxError::Refused(format!("profile {}: {e}", profile.name)))?;
        if parsed.is_empty() {
            tracing::warn!(
                profile = profile.name.as_str(),
                "network \"egress\" with an empty allow-list: sandboxes reach nothing"
            );
        }
        rules.insert(profile.name, Arc::new(parsed));
    }
    Ok(rules)
}

impl Drop for Egress {
    /// Removes the sockets this process still serves, so the relays answer
    /// at once that no one does (or the next process takes them over).
    fn drop(&mut self) {
        if let Some(watchdog) = self.watchdog.get_mut().unwrap().take() {
            watchdog.abort();
        }
        for (key, served) in self.served.get_mut().unwrap().drain() {
            served.accept.abort();
            let path = self.dir.join("sockets").join(&key).join(SOCKET_NAME);
            if file_id(&path) == Some(served.file) {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

/// Accepts the relay's connections on one socket; `[user, all]` bound the
/// user's connections over all their sockets
/// ([`MAX_CONNECTIONS_PER_USER`]) and this process's
/// ([`MAX_CONNECTIONS`]). A connection holds its slots until it ends, and
/// a CONNECT tunnel until the tunnel ends.
async fn accept_loop(listener: UnixListener, cx: Arc<proxy::Context>, slots: [Arc<Semaphore>; 2]) {
    let [user_slots, all_slots] = slots;
    let mut warned: Option<tokio::time::Instant> = None;
    let mut warn = |what: &dyn Fn()| {
        if warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
            what();
            warned = Some(tokio::time::Instant::now());
        }
    };
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn(
                    &|| tracing::warn!(user = cx.user.as_str(), error = %e, "egress accept failed"),
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (Ok(user_slot), Ok(all_slot)) = (
            user_slots.clone().try_acquire_owned(),
            all_slots.clone().try_acquire_owned(),
        ) else {
            warn(&|| {
                tracing::warn!(
                    user = cx.user.as_str(),
                    "egress: {MAX_CONNECTIONS_PER_USER} connections of this user or \
                     {MAX_CONNECTIONS} in all are open; closing new ones"
                )
            });
            cx.meter.refused();
            continue;
        };
        cx.meter.connected();
        let cx = cx.clone();
        tokio::spawn(proxy::serve_connection(
            stream,
            cx,
            Arc::new((user_slot, all_slot)),
        ));
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
