//! How thread ids map to backends: the one thing the two shipped policies
//! disagree on.

use sandbox_contract::{BackendId, Result, ThreadId, UserId};

/// A thread-to-backend mapping. Implementations must be pure (the host
/// routes every request on [`Mapping::backend`]) and the identity on their
/// own outputs: `backend(backend(t)) == backend(t)`. The host relies on the
/// latter to tell this policy's containers from another policy's.
pub trait Mapping {
    /// Stamped on containers (`policy` label) and returned by WIT `name`.
    const NAME: &'static str;

    /// The backend serving a thread; it belongs to the thread's user.
    fn backend(&self, thread: &ThreadId) -> Result<BackendId>;

    /// The single backend of a user, when the mapping has one; `None` when
    /// a user's backends must be discovered (one per thread).
    fn sole_backend_of_user(&self, user: &UserId) -> Option<BackendId>;

    /// "user alice" / "thread alice-1", for log lines.
    fn describe(&self, backend: &BackendId) -> String;

    /// Whether `backend` is one of this mapping's outputs. By the identity
    /// rule, that is: read as a thread id, it maps to itself.
    fn produces(&self, backend: &BackendId) -> bool {
        ThreadId::parse(backend.as_str())
            .and_then(|thread| self.backend(&thread))
            .is_ok_and(|again| &again == backend)
    }
}

/// The default: all threads of a user share one backend, one container and
/// the user's workspace. Backend id = user id.
#[derive(Debug, Clone, Copy, Default)]
pub struct PerUser;

impl Mapping for PerUser {
    const NAME: &'static str = "per-user";

    fn backend(&self, thread: &ThreadId) -> Result<BackendId> {
        // A user id is always a valid backend id.
        BackendId::parse(thread.user().as_str())
    }

    fn sole_backend_of_user(&self, user: &UserId) -> Option<BackendId> {
        BackendId::parse(user.as_str()).ok()
    }

    fn describe(&self, backend: &BackendId) -> String {
        format!("user {backend}")
    }
}

/// One backend and one container per thread; the workspace is still the
/// user's. Backend id = thread id.
#[derive(Debug, Clone, Copy, Default)]
pub struct PerThread;

impl Mapping for PerThread {
    const NAME: &'static str = "per-thread";

    fn backend(&self, thread: &ThreadId) -> Result<BackendId> {
        BackendId::parse(thread.as_str())
    }

    fn sole_backend_of_user(&self, _user: &UserId) -> Option<BackendId> {
        None
    }

    fn describe(&self, backend: &BackendId) -> String {
        format!("thread {backend}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thread(t: &str) -> ThreadId {
        ThreadId::parse(t).unwrap()
    }

    fn backend(b: &str) -> BackendId {
        BackendId::parse(b).unwrap()
    }

    #[test]
    fn per_user_maps_every_thread_of_a_user_to_one_backend() {
        let a = PerUser.backend(&thread("alice-1")).unwrap();
        let b = PerUser.backend(&thread("alice-2-x")).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.as_str(), "alice");
        assert_eq!(a.user().unwrap().as_str(), "alice");
        assert_ne!(PerUser.backend(&thread("bob-1")).unwrap(), a);
    }

    #[test]
    fn per_thread_keeps_threads_apart_within_the_user() {
        let a = PerThread.backend(&thread("alice-1")).unwrap();
        let b = PerThread.backend(&thread("alice-2")).unwrap();
        assert_ne!(a, b);
        assert_eq!(a.user().unwrap(), b.user().unwrap());
    }

    #[test]
    fn both_mappings_are_the_identity_on_their_outputs() {
        for t in ["alice", "alice-1", "bob-2-x"] {
            let by_user = PerUser.backend(&thread(t)).unwrap();
            assert_eq!(PerUser.backend(&thread(by_user.as_str())).unwrap(), by_user);
            assert!(PerUser.produces(&by_user));
            let by_thread = PerThread.backend(&thread(t)).unwrap();
            assert_eq!(
                PerThread.backend(&thread(by_thread.as_str())).unwrap(),
                by_thread
            );
            assert!(PerThread.produces(&by_thread));
        }
    }

    #[test]
    fn a_backend_the_mapping_never_answers_is_not_its_own() {
        assert!(!PerUser.produces(&backend("alice-1")));
        assert!(!PerUser.produces(&backend("Alice")));
        assert!(!PerThread.produces(&backend("Alice-1")));
        assert!(PerThread.produces(&backend("alice")));
    }
}
