//! The instances of one policy: a pool bounded by memory, lent out for one
//! call at a time.
//!
//! An instance is not owned by a routing key. A call borrows one (the
//! instance its key used last when it is still idle, else a fresh one while
//! the pool has room, else the least recently used idle one), runs, and
//! gives it back. A policy's memory is a cache the host can rebuild (a miss
//! re-adopts the labelled container), so landing on another instance is
//! correct, only slower. How many instances may live at once is the pool's
//! memory budget divided by what one instance takes (measured at the
//! self-check), within `max_policy_instances`: about 240 instances of the
//! Rust per-user policy, 20 of the Python one at the default budget. A call
//! that finds every instance lent waits for one to come back.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{CompiledPolicy, PolicyInstance};
use crate::engine::Engine;
use crate::error::SandboxError;

/// Idle instances, each tagged with the key of its last call.
#[derive(Default)]
struct Idle {
    /// key -> (recency, instance).
    by_key: HashMap<String, (u64, PolicyInstance)>,
    /// recency -> key: the least recently used first.
    order: BTreeMap<u64, String>,
    clock: u64,
}

impl Idle {
    fn len(&self) -> usize {
        self.by_key.len()
    }

    fn take(&mut self, key: &str) -> Option<PolicyInstance> {
        let (seq, instance) = self.by_key.remove(key)?;
        self.order.remove(&seq);
        Some(instance)
    }

    fn take_oldest(&mut self) -> Option<(String, PolicyInstance)> {
        let (_, key) = self.order.pop_first()?;
        let (_, instance) = self.by_key.remove(&key)?;
        Some((key, instance))
    }

    /// Keeps `instance` as `key`'s; an idle instance already tagged with
    /// `key` (possible only for key-less routing calls) is returned, to drop.
    fn put(&mut self, key: String, instance: PolicyInstance) -> Option<PolicyInstance> {
        self.clock += 1;
        let seq = self.clock;
        self.order.insert(seq, key.clone());
        let old = self.by_key.insert(key, (seq, instance))?;
        self.order.remove(&old.0);
        Some(old.1)
    }
}

struct State {
    idle: Idle,
    /// Idle plus lent instances.
    live: usize,
}

/// Room taken in a pool for an instance being made: freed on drop unless
/// the instance was made.
struct Room<'a> {
    pool: &'a InstancePool,
    armed: bool,
}

impl Room<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Room<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.pool.forget();
        }
    }
}

/// The instances of one compiled policy.
pub struct InstancePool {
    policy: Arc<CompiledPolicy>,
    capacity: usize,
    state: Mutex<State>,
    /// One permit per instance that may be lent at once, handed out in
    /// arrival order: a caller that gives an instance back and asks again
    /// at once cannot starve one that was waiting.
    permits: Arc<Semaphore>,
}

/// An instance lent for one call. [`Loan::finish`] gives it back; a loan
/// dropped unfinished (its call's future was dropped mid-way, the store may
/// be mid-call) drops its instance and frees its room in the pool.
pub struct Loan {
    pool: Arc<InstancePool>,
    instance: Option<PolicyInstance>,
    /// The key it is kept under when given back.
    key: String,
    /// Released after the instance is back (fields drop in order).
    _permit: OwnedSemaphorePermit,
}

impl Loan {
    /// The lent instance.
    pub fn instance(&mut self) -> &mut PolicyInstance {
        self.instance
            .as_mut()
            .expect("a loan holds its instance until finished")
    }

    /// Gives the instance back: kept when it is healthy and `keep` (its pool
    /// still runs the current policy), else dropped.
    pub fn finish(mut self, keep: bool) {
        if let Some(instance) = self.instance.take() {
            let key = std::mem::take(&mut self.key);
            self.pool.give_back(instance, key, keep);
        }
    }
}

impl Drop for Loan {
    fn drop(&mut self) {
        if let Some(instance) = self.instance.take() {
            drop(instance);
            self.pool.forget();
        }
    }
}

impl InstancePool {
    /// A pool of at most `capacity` live instances of `policy` (at least one).
    pub fn new(policy: Arc<CompiledPolicy>, capacity: usize) -> Self {
        InstancePool {
            policy,
            capacity: capacity.max(1),
            state: Mutex::new(State {
                idle: Idle::default(),
                live: 0,
            }),
            permits: Arc::new(Semaphore::new(capacity.max(1))),
        }
    }

    /// The policy this pool's instances run.
    pub fn policy(&self) -> &Arc<CompiledPolicy> {
        &self.policy
    }

    /// Most instances alive at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Instances alive now (idle and lent).
    pub fn live(&self) -> usize {
        self.state.lock().unwrap().live
    }

    /// Lends an instance for a call of `key`: the one `key` used last when
    /// idle, else a new one while there is room, else the least recently
    /// used idle one; waits while every instance is lent.
    pub async fn borrow(
        self: &Arc<Self>,
        key: &str,
        host: &Arc<Engine>,
    ) -> Result<Loan, SandboxError> {
        self.lend(key, host).await
    }

    async fn lend(self: &Arc<Self>, key: &str, host: &Arc<Engine>) -> Result<Loan, SandboxError> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the pool's semaphore is never closed");
        let loan = |instance, key| Loan {
            pool: self.clone(),
            instance: Some(instance),
            key,
            _permit: permit,
        };
        let reuse = {
            let mut state = self.state.lock().unwrap();
            if let Some(instance) = state.idle.take(key) {
                Some(instance)
            } else if state.live < self.capacity {
                state.live += 1;
                None
            } else {
                // Every other permit is lent at most, so with the pool full
                // an instance is idle: another key's, whose cache misses.
                match state.idle.take_oldest() {
                    Some((_, instance)) => Some(instance),
                    None => {
                        state.live += 1;
                        None
                    }
                }
            }
        };
        if let Some(instance) = reuse {
            return Ok(loan(instance, key.to_owned()));
        }
        let key = key.to_owned();
        // The room taken above is given back however this ends: an error,
        // or the caller's future dropped while the instance was being made
        // (a client gone, a timeout), which would otherwise leak it for good.
        let room = Room {
            pool: self,
            armed: true,
        };
        let made = match self.policy.instantiate(host.clone()).await {
            Ok(instance) => Ok(instance),
            // The host-wide policy memory may be spent on idle instances:
            // drop the least recently used one and try once more.
            Err(first) => match self.drop_oldest_idle() {
                true => self.policy.instantiate(host.clone()).await,
                false => Err(first),
            },
        };
        let instance = made?;
        room.disarm();
        Ok(loan(instance, key))
    }

    /// Drops the least recently used idle instance; false when none is idle.
    fn drop_oldest_idle(&self) -> bool {
        let oldest = self.state.lock().unwrap().idle.take_oldest();
        match oldest {
            Some((_, instance)) => {
                drop(instance);
                self.forget();
                true
            }
            None => false,
        }
    }

    fn give_back(&self, instance: PolicyInstance, key: String, keep: bool) {
        if !keep || instance.is_poisoned() {
            drop(instance);
            self.forget();
            return;
        }
        let replaced = self.state.lock().unwrap().idle.put(key, instance);
        if let Some(replaced) = replaced {
            drop(replaced);
            self.forget();
        }
    }

    /// One live instance fewer (dropped, or never made).
    fn forget(&self) {
        self.state.lock().unwrap().live -= 1;
    }

    /// Drops every idle instance (a swap retired this pool).
    pub fn drain(&self) {
        let mut state = self.state.lock().unwrap();
        let idle = std::mem::take(&mut state.idle);
        state.live -= idle.len();
        drop(state);
        drop(idle);
    }
}
