//! [`Backend`]: one thread's view of its backend, and the container it
//! ensures (through the policy) before any work.

use sandbox_contract::{BackendId, ThreadId, UserId};

use super::Sandbox;
use crate::engine::usage::Work;
use crate::engine::Engine;
use crate::error::{Result, SandboxError};
use crate::policy::client::VerifiedContainer;

/// The backend of a thread: a lazily created container and a workspace.
#[derive(Clone)]
pub struct Backend {
    id: BackendId,
    user: UserId,
    thread: ThreadId,
    pub(crate) sandbox: Sandbox,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("id", &self.id.as_str())
            .field("user_id", &self.user.as_str())
            .field("thread_id", &self.thread.as_str())
            .finish()
    }
}

impl Backend {
    pub(super) fn new(id: BackendId, user: UserId, thread: ThreadId, sandbox: Sandbox) -> Self {
        Backend {
            id,
            user,
            thread,
            sandbox,
        }
    }

    /// The backend id: the user id under the per-user policy.
    pub fn id(&self) -> &str {
        self.id.as_str()
    }

    pub(super) fn backend_id(&self) -> &BackendId {
        &self.id
    }

    /// The user owning the thread (and the backend).
    pub fn user_id(&self) -> &str {
        self.user.as_str()
    }

    /// The thread's user, whose namespace of execution ids this backend's
    /// executes use.
    pub(super) fn user(&self) -> &UserId {
        &self.user
    }

    /// The workspace name; the host directory is `{root}/{workspace}`.
    pub fn workspace(&self) -> &str {
        self.user.as_str()
    }

    /// The thread this backend was got for.
    pub fn thread_id(&self) -> &str {
        self.thread.as_str()
    }

    /// A running container for this backend: created and started on first
    /// use, re-created when it stopped or vanished.
    pub async fn ensure_container(&self) -> Result<VerifiedContainer> {
        let container = self.ensure_for_thread().await?;
        // A use in itself; work in flight records its own (start and end).
        self.engine().usage().touch(&container.name);
        Ok(container)
    }

    /// The ensured container, with this thread recorded on its backend.
    async fn ensure_for_thread(&self) -> Result<VerifiedContainer> {
        self.ensure_as(&self.id).await
    }

    async fn ensure_as(&self, backend: &BackendId) -> Result<VerifiedContainer> {
        let container = self.sandbox.inner.policy.ensure(backend).await?;
        let usage = self.engine().usage();
        usage.add_thread(&container.name, self.thread.as_str());
        Ok(container)
    }

    /// The container, with work marked in flight on it (from before it is
    /// ensured, so maintenance never removes it between the two) until the
    /// guard drops.
    ///
    /// A policy swapped in after this backend was resolved may not answer
    /// its id (per-thread ids under per-user): the work then goes to the
    /// backend the running policy maps the thread to.
    pub(crate) async fn ensure_for_work(&self) -> Result<(VerifiedContainer, Option<Work>)> {
        match self.ensure_work_as(&self.id).await {
            Err(SandboxError::InvalidId(why)) => {
                let now = self.sandbox.inner.policy.backend_of(&self.thread).await?;
                if now == self.id {
                    return Err(SandboxError::InvalidId(why));
                }
                tracing::debug!(thread = %self.thread, from = %self.id, to = %now, "the policy was swapped: the thread's backend moved");
                self.ensure_work_as(&now).await
            }
            other => other,
        }
    }

    async fn ensure_work_as(
        &self,
        backend: &BackendId,
    ) -> Result<(VerifiedContainer, Option<Work>)> {
        let profile = self.sandbox.inner.policy.profile_of(backend).await?;
        let mut work = self.sandbox.inner.engine.begin_work(backend).await?;
        let mut container = self.ensure_as(backend).await?;
        if container.profile != profile.as_str() {
            // Made under another profile (before a swap, a restart, or by
            // another process): replaced now when nothing else runs on it,
            // else it serves on, under its own profile, until next idle.
            drop(work);
            self.sandbox
                .retire_reprofiled(backend, &container.profile, &profile)
                .await?;
            work = self.sandbox.inner.engine.begin_work(backend).await?;
            container = self.ensure_as(backend).await?;
        }
        self.engine()
            .serve_egress(backend, &container.profile)
            .await;
        Ok((container, work))
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.sandbox.inner.engine
    }
}
