//! Bounds on lifecycle operations: a host-wide number of concurrent
//! create / start / remove calls, and a per-backend creation rate.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::clock::excused_wait;
use crate::error::{Result, SandboxError};

/// The lifecycle slots and the creation rate of one host.
pub struct Slots {
    /// A storm of cold starts must not starve every other user's executes
    /// in the engine.
    lifecycle: tokio::sync::Semaphore,
    /// backend id -> creation times within the last minute.
    recent_creates: Mutex<HashMap<String, Vec<Instant>>>,
    max_creates_per_minute: usize,
}

impl Slots {
    /// `slots` concurrent lifecycle operations, `max_creates_per_minute`
    /// creations per backend.
    pub fn new(slots: usize, max_creates_per_minute: usize) -> Self {
        Slots {
            lifecycle: tokio::sync::Semaphore::new(slots.max(1)),
            recent_creates: Mutex::new(HashMap::new()),
            max_creates_per_minute,
        }
    }

    /// A slot for a create / start / remove. The wait is the host's queue,
    /// not the policy's doing: it is not charged to a policy call's budget.
    pub async fn lifecycle(&self) -> tokio::sync::SemaphorePermit<'_> {
        excused_wait(self.lifecycle.acquire())
            .await
            .expect("the semaphore is never closed")
    }

    /// Counts a creation for `backend_id`, refusing beyond the rate (a
    /// create/remove loop).
    pub fn admit_create(&self, backend_id: &str) -> Result<()> {
        let window = Duration::from_secs(60);
        let now = Instant::now();
        let mut recent = self.recent_creates.lock().unwrap();
        // Forget backends with no creation in the window: the map stays small.
        if recent.len() > 1024 {
            recent.retain(|_, times| times.iter().any(|t| now - *t < window));
        }
        let times = recent.entry(backend_id.to_owned()).or_default();
        times.retain(|t| now - *t < window);
        let max = self.max_creates_per_minute;
        if times.len() >= max {
            return Err(SandboxError::Refused(format!(
                "backend {backend_id} had {max} containers created in the last minute; \
                 refusing more (max_creates_per_backend_per_minute)"
            )));
        }
        times.push(now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_create_loop_is_cut_off_per_backend() {
        let slots = Slots::new(4, 3);
        for _ in 0..3 {
            slots.admit_create("alice").unwrap();
        }
        assert!(matches!(
            slots.admit_create("alice"),
            Err(SandboxError::Refused(_))
        ));
        slots.admit_create("bob").unwrap();
    }
}
