//! Routing: one lane per routing key, each with its own policy instance.
//!
//! Calls for one key (a backend id, or a user id for destroy-user) queue on
//! that lane's lock, so a burst of first calls for a user creates one
//! container; calls for different keys hold different locks and run in
//! parallel, so one user's slow cold start never stalls another user. No
//! lock is held across a policy call except the lane's own.
//!
//! The pure `backend-id` mapping runs on a small pool of router instances
//! instead, since it has no key yet.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::Mutex as AsyncMutex;

use super::{CompiledPolicy, PolicyInstance};
use crate::engine::Engine;
use crate::error::{Result, SandboxError};

const ROUTERS: usize = 4;

/// An instance and the policy it was made from (to notice a swap).
struct Slot {
    policy: Arc<CompiledPolicy>,
    instance: PolicyInstance,
}

#[derive(Default)]
struct Lane {
    slot: Arc<AsyncMutex<Option<Slot>>>,
    last_used: AtomicU64,
}

/// A held lane (see [`Lanes::lock`]).
pub struct LaneGuard {
    _guard: tokio::sync::OwnedMutexGuard<Option<Slot>>,
}

/// The lanes of one host.
pub struct Lanes {
    engine: Arc<Engine>,
    policy: RwLock<Arc<CompiledPolicy>>,
    lanes: Mutex<HashMap<String, Arc<Lane>>>,
    routers: Vec<AsyncMutex<Option<Slot>>>,
    hasher: RandomState,
    max_lanes: usize,
    clock: AtomicU64,
    /// Policy calls that trapped (each instance then replaced).
    pub traps: AtomicU64,
}

impl Lanes {
    pub fn new(engine: Arc<Engine>, policy: Arc<CompiledPolicy>) -> Self {
        let max_lanes = engine.config().max_policy_instances;
        Lanes {
            engine,
            policy: RwLock::new(policy),
            lanes: Mutex::new(HashMap::new()),
            routers: (0..ROUTERS).map(|_| AsyncMutex::new(None)).collect(),
            hasher: RandomState::new(),
            max_lanes,
            clock: AtomicU64::new(0),
            traps: AtomicU64::new(0),
        }
    }

    /// The policy new calls run on.
    pub fn policy(&self) -> Arc<CompiledPolicy> {
        self.policy.read().unwrap().clone()
    }

    /// Makes `policy` the one new calls run on; running calls finish on the
    /// old one, and each lane re-instantiates on its next call.
    pub fn swap_policy(&self, policy: Arc<CompiledPolicy>) {
        *self.policy.write().unwrap() = policy;
    }

    /// Policy instances alive in lanes (router instances excluded).
    pub fn lane_count(&self) -> usize {
        self.lanes.lock().unwrap().len()
    }

    /// Runs `f` on the instance of `key`'s lane, after every earlier call
    /// for that key.
    pub async fn call<T>(
        &self,
        key: &str,
        f: impl AsyncFnOnce(&mut PolicyInstance) -> Result<T>,
    ) -> Result<T> {
        let lane = self.lane(key);
        let mut slot = lane.slot.lock().await;
        lane.last_used.store(
            self.clock.fetch_add(1, Ordering::Relaxed),
            Ordering::Relaxed,
        );
        self.run(&mut slot, key, f).await
    }

    /// Holds `key`'s lane (no instance is made) until the guard drops: for
    /// host work that must not run beside a policy call of that key.
    pub async fn lock(&self, key: &str) -> LaneGuard {
        let lane = self.lane(key);
        let guard = lane.slot.clone().lock_owned().await;
        LaneGuard { _guard: guard }
    }

    /// Runs a key-less call (the pure mapping) on a router instance.
    pub async fn route<T>(
        &self,
        hint: &str,
        f: impl AsyncFnOnce(&mut PolicyInstance) -> Result<T>,
    ) -> Result<T> {
        let free = self.routers.iter().find_map(|r| r.try_lock().ok());
        let mut slot = match free {
            Some(slot) => slot,
            None => {
                self.routers[self.hasher.hash_one(hint) as usize % ROUTERS]
                    .lock()
                    .await
            }
        };
        self.run(&mut slot, "(router)", f).await
    }

    async fn run<T>(
        &self,
        slot: &mut Option<Slot>,
        key: &str,
        f: impl AsyncFnOnce(&mut PolicyInstance) -> Result<T>,
    ) -> Result<T> {
        let current = self.policy();
        // A call abandoned mid-way (its request dropped) leaves the store
        // mid-call: never enter it again, start afresh.
        let stale = !matches!(slot, Some(s) if Arc::ptr_eq(&s.policy, &current) && !s.instance.is_poisoned());
        if stale {
            let instance = current.instantiate(self.engine.clone()).await?;
            *slot = Some(Slot {
                policy: current,
                instance,
            });
        }
        let instance = &mut slot.as_mut().expect("slot was just filled").instance;
        let result = f(instance).await;
        if let Err(SandboxError::PolicyTrap(why)) = &result {
            tracing::warn!(key, error = %why, "policy instance trapped; it is replaced on the next call");
            self.traps.fetch_add(1, Ordering::Relaxed);
            *slot = None;
        } else if matches!(slot, Some(s) if s.instance.is_poisoned()) {
            *slot = None;
        }
        result
    }

    fn lane(&self, key: &str) -> Arc<Lane> {
        let mut lanes = self.lanes.lock().unwrap();
        if let Some(lane) = lanes.get(key) {
            return lane.clone();
        }
        if lanes.len() >= self.max_lanes {
            evict_idle(&mut lanes, self.max_lanes - self.max_lanes / 10 - 1);
        }
        let lane = Arc::new(Lane::default());
        lanes.insert(key.to_owned(), lane.clone());
        lane
    }
}

/// Drops the least recently used lanes nobody is using until `target`
/// remain (or only busy ones do). Their caches are rebuilt by adoption.
fn evict_idle(lanes: &mut HashMap<String, Arc<Lane>>, target: usize) {
    let mut idle: Vec<(u64, String)> = lanes
        .iter()
        .filter(|(_, lane)| Arc::strong_count(lane) == 1 && lane.slot.try_lock().is_ok())
        .map(|(key, lane)| (lane.last_used.load(Ordering::Relaxed), key.clone()))
        .collect();
    idle.sort_unstable();
    let excess = lanes.len().saturating_sub(target);
    for (_, key) in idle.into_iter().take(excess) {
        lanes.remove(&key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lanes(n: u64) -> HashMap<String, Arc<Lane>> {
        (0..n)
            .map(|i| {
                let lane = Lane::default();
                lane.last_used.store(i, Ordering::Relaxed);
                (format!("k{i}"), Arc::new(lane))
            })
            .collect()
    }

    #[test]
    fn eviction_drops_the_least_recently_used_idle_lanes() {
        let mut map = lanes(10);
        evict_idle(&mut map, 7);
        assert_eq!(map.len(), 7);
        for gone in ["k0", "k1", "k2"] {
            assert!(!map.contains_key(gone), "{gone}");
        }
    }

    #[test]
    fn eviction_never_drops_a_lane_in_use() {
        // The bug it prevents: dropping a lane a caller holds would let a
        // second instance of the same key run beside the first.
        let mut map = lanes(4);
        let held = map["k0"].clone();
        let locked = map["k1"].slot.clone();
        let _guard = locked.try_lock_owned().unwrap();
        evict_idle(&mut map, 0);
        assert!(map.contains_key("k0") && map.contains_key("k1"));
        assert_eq!(map.len(), 2);
        drop(held);
    }
}
