//! How thread ids map to backends: the one thing the two shipped policies
//! disagree on.

use crate::host::{Backend, Result};
use crate::ids;

/// A thread-to-backend mapping. Implementations must be pure: the host
/// routes calls on [`Mapping::backend`]`(thread).id`.
pub trait Mapping {
    /// Stamped on containers (`policy` label) and returned by WIT `name`.
    const NAME: &'static str;

    /// The backend serving a thread.
    fn backend(&self, thread_id: &str) -> Result<Backend>;

    /// The backend with this id (the inverse of [`Mapping::backend`]).
    fn backend_from_id(&self, backend_id: &str) -> Result<Backend>;

    /// The single backend id of a user, when the mapping has one; `None`
    /// when a user's backends must be discovered (one per thread).
    fn sole_backend_of_user(&self, user_id: &str) -> Option<String>;

    /// "user alice" / "thread alice-1", for log lines.
    fn describe(&self, backend: &Backend) -> String;
}

/// The default: all threads of a user share one backend, one container and
/// one workspace. Backend id = user id.
#[derive(Debug, Clone, Copy, Default)]
pub struct PerUser;

impl Mapping for PerUser {
    const NAME: &'static str = "per-user";

    fn backend(&self, thread_id: &str) -> Result<Backend> {
        let thread = ids::parse_thread(thread_id)?;
        Ok(user_backend(thread.user))
    }

    fn backend_from_id(&self, backend_id: &str) -> Result<Backend> {
        ids::validate_user(backend_id)?;
        Ok(user_backend(backend_id))
    }

    fn sole_backend_of_user(&self, user_id: &str) -> Option<String> {
        Some(user_id.to_owned())
    }

    fn describe(&self, backend: &Backend) -> String {
        format!("user {}", backend.user_id)
    }
}

fn user_backend(user: &str) -> Backend {
    Backend {
        id: user.to_owned(),
        user_id: user.to_owned(),
        workspace: user.to_owned(),
    }
}

/// The original behaviour: one backend and one container per thread; the
/// workspace is still the user's. Backend id = thread id.
#[derive(Debug, Clone, Copy, Default)]
pub struct PerThread;

impl Mapping for PerThread {
    const NAME: &'static str = "per-thread";

    fn backend(&self, thread_id: &str) -> Result<Backend> {
        let thread = ids::parse_thread(thread_id)?;
        Ok(Backend {
            id: thread_id.to_owned(),
            user_id: thread.user.to_owned(),
            workspace: thread.user.to_owned(),
        })
    }

    fn backend_from_id(&self, backend_id: &str) -> Result<Backend> {
        self.backend(backend_id)
    }

    fn sole_backend_of_user(&self, _user_id: &str) -> Option<String> {
        None
    }

    fn describe(&self, backend: &Backend) -> String {
        format!("thread {}", backend.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_user_maps_every_thread_of_a_user_to_one_backend() {
        let a = PerUser.backend("alice-1").unwrap();
        let b = PerUser.backend("alice-2-x").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.id, "alice");
        assert_eq!(a.workspace, "alice");
        assert_ne!(PerUser.backend("bob-1").unwrap().id, a.id);
    }

    #[test]
    fn per_thread_keeps_threads_apart_but_shares_the_workspace() {
        let a = PerThread.backend("alice-1").unwrap();
        let b = PerThread.backend("alice-2").unwrap();
        assert_ne!(a.id, b.id);
        assert_eq!(a.workspace, b.workspace);
        assert_eq!(PerThread.backend_from_id("alice-1").unwrap(), a);
    }

    #[test]
    fn backend_from_id_rejects_what_backend_never_produces() {
        assert!(PerUser.backend_from_id("alice-1").is_err());
        assert!(PerThread.backend_from_id("-1").is_err());
    }
}
