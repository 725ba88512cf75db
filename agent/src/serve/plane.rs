//! The plane: the host's direct line to `serve`, bypassing the engine.
//!
//! The host mounts a directory of its state read-only at [`PLANE_MOUNT`];
//! a host process that wants to talk binds a socket there (under a
//! temporary name, renamed to `NAME.sock` once it listens) and waits for
//! this process to connect. `serve` watches the directory (inotify: a host
//! bind shows up at once; a scan every [`RESCAN`] as well, should a watch
//! miss it, every 2 s where none can be set) and connects to each new socket once, as root: the host accepts
//! only a peer of uid 0, and the workload, another uid, can neither search
//! the directory nor write the socket when the host is root. Each
//! connection is a session like the attach stream: `hello` first, then
//! requests in, replies out, on threads of its own.
//!
//! The attach stream stays: it is the way in when no host process offers
//! a socket (gVisor refuses host sockets: the host offers none there), and
//! a session that breaks costs the calls it carried, as a broken attach
//! stream does.

use std::collections::HashSet;
use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sandbox_agent::protocol::{PLANE_MOUNT, PLANE_SOCKET_SUFFIX};

use super::{Replies, Server, READ_BUFFER};

/// Sessions open at once (each is two threads); a socket offered past it
/// is left for a later scan.
const MAX_SESSIONS: usize = 16;
/// How often the directory is scanned whatever the watch says (a safety
/// net: the watch wakes the watcher at once; an idle sandbox should cost
/// nothing, and a thousand of them wake rarely).
const RESCAN: Duration = Duration::from_secs(30);
/// The watcher's stack: it holds a small buffer and a set of names.
const STACK: usize = 128 * 1024;

/// The plane directory as opened when `serve` started: `/proc/self/fd/N`
/// of a handle to it. Every later lookup goes through the handle, so a
/// workload that could rename a directory on the way (an image with a
/// writable `/.sandbox`) cannot put a directory of its own in its place.
static DIR: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The plane directory's path through its handle, if it is mounted.
pub(crate) fn dir() -> Option<&'static str> {
    DIR.get().map(String::as_str)
}

/// Opens the plane directory, when mounted, and watches it on a thread of
/// its own.
pub(super) fn start(server: Arc<Server>) {
    let path = std::ffi::CString::new(PLANE_MOUNT).expect("no NUL in the mount path");
    // SAFETY: open with a static path; the descriptor is kept for good.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 || DIR.set(format!("/proc/self/fd/{fd}")).is_err() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("plane".into())
        .stack_size(STACK)
        .spawn(move || watch(server));
    if let Err(e) = spawned {
        eprintln!("sandbox-agent serve: the plane watcher: {e}");
    }
}

/// Connects to every socket offered, now and whenever the directory
/// changes; never returns.
fn watch(server: Arc<Server>) {
    let open = Arc::new(AtomicUsize::new(0));
    let watch = Watch::new();
    let mut tried: HashSet<String> = HashSet::new();
    loop {
        let Some(dir) = dir() else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            std::thread::sleep(RESCAN);
            continue;
        };
        let mut present = HashSet::new();
        for entry in entries.flatten() {
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if !name.ends_with(PLANE_SOCKET_SUFFIX) {
                continue;
            }
            present.insert(name.clone());
            if tried.contains(&name) || open.load(Ordering::SeqCst) >= MAX_SESSIONS {
                continue;
            }
            tried.insert(name.clone());
            // A socket whose host process went away refuses: skipped.
            if let Ok(stream) = UnixStream::connect(entry.path()) {
                session(server.clone(), stream, open.clone());
            }
        }
        // Names are never reused: forget those gone.
        tried.retain(|name| present.contains(name));
        watch.wait(RESCAN);
    }
}

/// Serves one host process on `stream`, on two threads.
fn session(server: Arc<Server>, stream: UnixStream, open: Arc<AtomicUsize>) {
    let Ok(writer) = stream.try_clone() else {
        return;
    };
    open.fetch_add(1, Ordering::SeqCst);
    let ended = open.clone();
    let reader = std::thread::Builder::new()
        .name("session".into())
        .spawn(move || {
            // However the session ends (a panic included), it is counted out.
            struct Ended(Arc<AtomicUsize>);
            impl Drop for Ended {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, Ordering::SeqCst);
                }
            }
            let _ended = Ended(ended);
            let Ok(replies) = Replies::start(writer) else {
                return;
            };
            server.hello(&replies);
            server.run(
                &mut BufReader::with_capacity(READ_BUFFER, &stream),
                &replies,
            );
            // The host closed its end: so does this one (the writer's next
            // line fails; calls in flight still finish).
            let _ = stream.shutdown(std::net::Shutdown::Both);
        });
    if reader.is_err() {
        open.fetch_sub(1, Ordering::SeqCst);
        // The pids limit is spent: the host falls back to the attach stream.
        eprintln!("sandbox-agent serve: no thread for a plane session");
    }
}

/// An inotify watch of the plane directory (none where it cannot be set:
/// the scan alone then).
struct Watch(Option<libc::c_int>);

impl Watch {
    fn new() -> Self {
        // SAFETY: plain syscalls; the path is a static C string.
        unsafe {
            let fd = libc::inotify_init1(libc::IN_CLOEXEC);
            if fd < 0 {
                return Watch(None);
            }
            let Some(dir) = dir() else {
                libc::close(fd);
                return Watch(None);
            };
            let path = std::ffi::CString::new(dir).expect("no NUL in a descriptor path");
            let mask = libc::IN_CREATE | libc::IN_MOVED_TO;
            if libc::inotify_add_watch(fd, path.as_ptr(), mask) < 0 {
                libc::close(fd);
                return Watch(None);
            }
            Watch(Some(fd))
        }
    }

    /// Waits for a change in the directory, or `most`.
    fn wait(&self, most: Duration) {
        let Some(fd) = self.0 else {
            std::thread::sleep(most.min(Duration::from_secs(2)));
            return;
        };
        let mut poll = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let mut buffer = [0u8; 4096];
        // SAFETY: one pollfd; a read into a local buffer of its length.
        unsafe {
            if libc::poll(&mut poll, 1, most.as_millis() as libc::c_int) > 0 {
                // The events themselves do not matter: the scan reads the
                // directory.
                libc::read(fd, buffer.as_mut_ptr().cast(), buffer.len());
            }
        }
    }
}
