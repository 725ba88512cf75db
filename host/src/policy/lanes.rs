//! Routing: one lane per routing key, instances from the policy's pool.
//!
//! Calls for one key (a backend id, or a user id for destroy-user) queue on
//! that lane's lock, so a burst of first calls for a user creates one
//! container; calls for different keys hold different locks and run in
//! parallel, so one user's slow cold start never stalls another user. A
//! lane owns no instance: each call borrows one from the policy's
//! [`InstancePool`] (bounded by memory) for its duration. No lock is held
//! across a policy call except the lane's own.
//!
//! The pure `backend-id` mapping has no key yet, and every request starts
//! with it: it runs on a few router instances of its own, outside the
//! pool, so requests are routed even while every pooled instance is lent
//! to slow calls (cold starts, destroys waiting out their grace period).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::Mutex as AsyncMutex;

use super::pool::InstancePool;
use super::{CompiledPolicy, PolicyInstance};
use crate::engine::Engine;
use crate::error::{Result, SandboxError};

/// Lanes kept before idle ones are dropped. A lane is a lock and a counter
/// (about a hundred bytes), so this bounds memory against a flood of ids,
/// not the users served.
const MAX_LANES: usize = 65_536;

/// Router instances, outside the pool.
const ROUTERS: usize = 4;

/// Router calls one user may have running at once: the others are free for
/// other users, so a user whose `backend-id` is slow (or made slow on
/// purpose, with many requests at once) delays nobody else by more than
/// one call's budget per router.
const ROUTER_CALLS_PER_USER: usize = 1;

/// A router's instance and the policy it was made from (to notice a swap).
type Router = Option<(Arc<CompiledPolicy>, PolicyInstance)>;

#[derive(Default)]
struct Lane {
    lock: Arc<AsyncMutex<()>>,
    last_used: AtomicU64,
}

/// A held lane (see [`Lanes::lock`]).
pub struct LaneGuard {
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

/// A user's turn at the routers; the user's entry goes with its last turn.
struct RouterTurn<'a> {
    lanes: &'a Lanes,
    user: &'a str,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Drop for RouterTurn<'_> {
    fn drop(&mut self) {
        let mut turns = self.lanes.router_turns.lock().unwrap();
        self.permit.take();
        // Only the map holds it: no call holds or waits for a turn.
        if turns
            .get(self.user)
            .is_some_and(|turn| Arc::strong_count(turn) == 1)
        {
            turns.remove(self.user);
        }
    }
}

/// The lanes of one host.
pub struct Lanes {
    engine: Arc<Engine>,
    pool: RwLock<Arc<InstancePool>>,
    lanes: Mutex<HashMap<String, Arc<Lane>>>,
    routers: Vec<AsyncMutex<Router>>,
    /// One permit per router: a call holding one always finds a free router.
    router_permits: tokio::sync::Semaphore,
    /// Each user's turn at the routers (see [`ROUTER_CALLS_PER_USER`]);
    /// entries go when no call holds or waits for them.
    router_turns: Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>,
    clock: AtomicU64,
    /// Policy calls that trapped (each instance then replaced).
    pub traps: AtomicU64,
}

impl Lanes {
    pub fn new(engine: Arc<Engine>, policy: Arc<CompiledPolicy>) -> Self {
        let pool = Arc::new(InstancePool::new(
            policy.clone(),
            policy.pool_capacity(engine.config()),
        ));
        Lanes {
            engine,
            pool: RwLock::new(pool),
            lanes: Mutex::new(HashMap::new()),
            routers: (0..ROUTERS).map(|_| AsyncMutex::new(None)).collect(),
            router_permits: tokio::sync::Semaphore::new(ROUTERS),
            router_turns: Mutex::new(HashMap::new()),
            clock: AtomicU64::new(0),
            traps: AtomicU64::new(0),
        }
    }

    /// The policy new calls run on.
    pub fn policy(&self) -> Arc<CompiledPolicy> {
        self.pool().policy().clone()
    }

    /// The pool new calls borrow from.
    pub fn pool(&self) -> Arc<InstancePool> {
        self.pool.read().unwrap().clone()
    }

    /// Makes `policy` the one new calls run on; running calls finish on the
    /// old one, whose instances are then dropped.
    pub fn swap_policy(&self, policy: Arc<CompiledPolicy>) {
        let capacity = policy.pool_capacity(self.engine.config());
        let fresh = Arc::new(InstancePool::new(policy, capacity));
        let old = std::mem::replace(&mut *self.pool.write().unwrap(), fresh);
        old.drain();
    }

    /// Runs `f` on an instance, after every earlier call for `key`.
    pub async fn call<T>(
        &self,
        key: &str,
        f: impl AsyncFnOnce(&mut PolicyInstance) -> Result<T>,
    ) -> Result<T> {
        let lane = self.lane(key);
        let _turn = lane.lock.lock().await;
        lane.last_used.store(
            self.clock.fetch_add(1, Ordering::Relaxed),
            Ordering::Relaxed,
        );
        self.run(key, f).await
    }

    /// Holds `key`'s lane (no instance is borrowed) until the guard drops:
    /// for host work that must not run beside a policy call of that key.
    pub async fn lock(&self, key: &str) -> LaneGuard {
        let lane = self.lane(key);
        let guard = lane.lock.clone().lock_owned().await;
        LaneGuard { _guard: guard }
    }

    /// Runs a key-less call (the pure mapping of `thread`) on a router
    /// instance: in the thread's user's turn, then on the first router free
    /// (both queues first come, first served).
    pub async fn route<T>(
        &self,
        thread: &str,
        f: impl AsyncFnOnce(&mut PolicyInstance) -> Result<T>,
    ) -> Result<T> {
        let user = thread.split('-').next().unwrap_or(thread);
        let permit = self.router_turn(user).acquire_owned().await;
        let _turn = RouterTurn {
            lanes: self,
            user,
            permit: Some(permit.expect("router turns are never closed")),
        };
        let _router = self
            .router_permits
            .acquire()
            .await
            .expect("router permits are never closed");
        let mut slot = self
            .routers
            .iter()
            .find_map(|r| r.try_lock().ok())
            .expect("a permit holder always finds a free router");
        let current = self.policy();
        let fresh = matches!(&*slot, Some((p, i)) if Arc::ptr_eq(p, &current) && !i.is_poisoned());
        if !fresh {
            // Dropped first: a poisoned or old instance never runs again.
            *slot = None;
            *slot = Some((
                current.clone(),
                current.instantiate(self.engine.clone()).await?,
            ));
        }
        let (_, instance) = slot.as_mut().expect("the slot was just filled");
        let result = f(instance).await;
        if let Err(SandboxError::PolicyTrap(why)) = &result {
            tracing::warn!(key = "(router)", error = %why, "policy instance trapped; it is dropped");
            self.traps.fetch_add(1, Ordering::Relaxed);
            *slot = None;
        }
        result
    }

    /// The semaphore of `user`'s turns at the routers.
    fn router_turn(&self, user: &str) -> Arc<tokio::sync::Semaphore> {
        let mut turns = self.router_turns.lock().unwrap();
        if turns.len() >= MAX_LANES {
            // Left by calls dropped while they waited: none holds them.
            turns.retain(|_, turn| Arc::strong_count(turn) > 1);
        }
        turns
            .entry(user.to_owned())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(ROUTER_CALLS_PER_USER)))
            .clone()
    }

    async fn run<T>(
        &self,
        key: &str,
        f: impl AsyncFnOnce(&mut PolicyInstance) -> Result<T>,
    ) -> Result<T> {
        let pool = self.pool();
        let mut loan = pool.borrow(key, &self.engine).await?;
        // A call whose future is dropped mid-way drops its loan unfinished:
        // the instance (maybe mid-call) goes, its room in the pool is freed.
        let result = f(loan.instance()).await;
        let trapped = matches!(&result, Err(SandboxError::PolicyTrap(_)));
        if let Err(SandboxError::PolicyTrap(why)) = &result {
            tracing::warn!(key, error = %why, "policy instance trapped; it is dropped");
            self.traps.fetch_add(1, Ordering::Relaxed);
        }
        let current = Arc::ptr_eq(&pool, &self.pool());
        loan.finish(current && !trapped);
        result
    }

    fn lane(&self, key: &str) -> Arc<Lane> {
        let mut lanes = self.lanes.lock().unwrap();
        if let Some(lane) = lanes.get(key) {
            return lane.clone();
        }
        if lanes.len() >= MAX_LANES {
            evict_idle(&mut lanes, MAX_LANES - MAX_LANES / 10 - 1);
        }
        let lane = Arc::new(Lane::default());
        lanes.insert(key.to_owned(), lane.clone());
        lane
    }
}

/// Drops the least recently used lanes nobody is using until `target`
/// remain (or only busy ones do).
fn evict_idle(lanes: &mut HashMap<String, Arc<Lane>>, target: usize) {
    let mut idle: Vec<(u64, String)> = lanes
        .iter()
        .filter(|(_, lane)| Arc::strong_count(lane) == 1 && lane.lock.try_lock().is_ok())
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
        let locked = map["k1"].lock.clone();
        let _guard = locked.try_lock_owned().unwrap();
        evict_idle(&mut map, 0);
        assert!(map.contains_key("k0") && map.contains_key("k1"));
        assert_eq!(map.len(), 2);
        drop(held);
    }
}
