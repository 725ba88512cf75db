//! What one policy call and one policy instance may use, and the host-wide
//! total: the limits that keep an untrusted component from stalling or
//! bloating the host.
//!
//! - **Time.** Each call has one wall-clock budget that includes the time
//!   spent in host imports (WASI sleeps and polls included, so a policy that
//!   sleeps is cut off at the budget). Waiting for a lifecycle slot (the
//!   host's own queue of Docker creates/starts/removes) is not the policy's
//!   doing and is not charged. Guest CPU has its own, shorter deadline
//!   (epoch interruption, in `runtime/mod.rs`).
//! - **Host calls.** A bounded number of imports per call.
//! - **Memory.** Per instance: linear memory bytes, table elements, core
//!   instances, tables, memories, resource-table entries. Host-wide: the sum
//!   of every live instance's memories and tables is capped by one shared
//!   budget, so thousands of instances cannot add up past it.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmtime::ResourceLimiter;

use crate::config::Config;

/// Bytes charged per table element (a funcref or externref slot).
const TABLE_ELEMENT_BYTES: usize = 16;

/// The per-instance ceilings a policy runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstanceLimits {
    pub memory_bytes: usize,
    pub table_elements: usize,
    pub core_instances: usize,
    pub tables: usize,
    pub memories: usize,
    pub resources: usize,
}

impl InstanceLimits {
    pub fn from_config(config: &Config) -> Self {
        InstanceLimits {
            memory_bytes: config.policy_memory_bytes,
            table_elements: config.policy_table_elements,
            core_instances: config.policy_core_instances,
            tables: config.policy_tables,
            memories: config.policy_memories,
            resources: config.policy_resources,
        }
    }
}

/// The host-wide budget every instance's memories and tables draw from.
#[derive(Debug)]
pub struct MemoryPool {
    capacity: usize,
    used: AtomicUsize,
}

impl MemoryPool {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(MemoryPool {
            capacity,
            used: AtomicUsize::new(0),
        })
    }

    /// Bytes currently charged to live instances.
    #[cfg(test)]
    pub fn used(&self) -> usize {
        self.used.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn try_charge(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|&n| n <= self.capacity)
            })
            .is_ok()
    }

    fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// One store's limiter: its own ceilings, charged against the shared pool.
/// What it charged is released when the store (and so this) is dropped.
pub struct PolicyLimiter {
    limits: InstanceLimits,
    pool: Arc<MemoryPool>,
    charged: usize,
    /// Set when a growth was refused: the call that asked traps.
    pub refused: Option<String>,
}

impl PolicyLimiter {
    pub fn new(limits: InstanceLimits, pool: Arc<MemoryPool>) -> Self {
        PolicyLimiter {
            limits,
            pool,
            charged: 0,
            refused: None,
        }
    }

    /// Refuses (and remembers why) a growth past the instance's own limit.
    fn within(
        &mut self,
        desired: usize,
        limit: usize,
        what: &str,
        unit: &str,
    ) -> wasmtime::Result<()> {
        if desired <= limit {
            return Ok(());
        }
        let why =
            format!("{what} to {desired} {unit} exceeds the instance limit of {limit} {unit}");
        self.refused = Some(why.clone());
        Err(wasmtime::Error::msg(why))
    }

    fn grow(&mut self, extra: usize, what: &str) -> wasmtime::Result<bool> {
        if self.pool.try_charge(extra) {
            self.charged += extra;
            Ok(true)
        } else {
            let why = format!(
                "{what}: the host-wide policy memory budget of {} bytes is exhausted",
                self.pool.capacity()
            );
            self.refused = Some(why.clone());
            Err(wasmtime::Error::msg(why))
        }
    }
}

impl Drop for PolicyLimiter {
    fn drop(&mut self) {
        self.pool.release(self.charged);
    }
}

impl ResourceLimiter for PolicyLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let limit = self.limits.memory_bytes;
        self.within(desired, limit, "memory.grow", "bytes")?;
        self.grow(desired.saturating_sub(current), "memory.grow")
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let limit = self.limits.table_elements;
        self.within(desired, limit, "table.grow", "elements")?;
        let extra = desired.saturating_sub(current) * TABLE_ELEMENT_BYTES;
        self.grow(extra, "table.grow")
    }

    fn instances(&self) -> usize {
        self.limits.core_instances
    }

    fn tables(&self) -> usize {
        self.limits.tables
    }

    fn memories(&self) -> usize {
        self.limits.memories
    }
}

/// Time a call spent queued for a lifecycle slot: not charged to its budget.
#[derive(Debug, Default)]
struct Excused {
    total: Duration,
    waiting_since: Option<Instant>,
}

impl Excused {
    fn at(&self, now: Instant) -> Duration {
        self.total
            + self
                .waiting_since
                .map_or(Duration::ZERO, |since| now - since)
    }
}

tokio::task_local! {
    static EXCUSED: Arc<Mutex<Excused>>;
}

/// Waits for `fut` (a queue the host owns), not charging the wait to the
/// policy call running on this task, if any.
pub async fn excused_wait<F: Future>(fut: F) -> F::Output {
    let ledger = EXCUSED.try_with(Arc::clone).ok();
    if let Some(l) = &ledger {
        l.lock().unwrap().waiting_since = Some(Instant::now());
    }
    let out = fut.await;
    if let Some(l) = &ledger {
        let mut l = l.lock().unwrap();
        if let Some(since) = l.waiting_since.take() {
            l.total += since.elapsed();
        }
    }
    out
}

/// The call ran past its wall-clock budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverBudget(pub Duration);

/// Runs one policy call within `budget` of wall-clock time (host imports
/// included, lifecycle-slot waits excused). On `Err` the call's future was
/// dropped mid-call: its instance must be discarded.
pub async fn within_budget<F: Future>(budget: Duration, fut: F) -> Result<F::Output, OverBudget> {
    let ledger = Arc::new(Mutex::new(Excused::default()));
    let started = Instant::now();
    let fut = EXCUSED.scope(ledger.clone(), fut);
    tokio::pin!(fut);
    loop {
        let excused = ledger.lock().unwrap().at(Instant::now());
        let deadline = tokio::time::Instant::from_std(started + budget + excused);
        match tokio::time::timeout_at(deadline, &mut fut).await {
            Ok(out) => return Ok(out),
            Err(_) => {
                let now = Instant::now();
                let excused = ledger.lock().unwrap().at(now);
                if now.duration_since(started).saturating_sub(excused) >= budget {
                    return Err(OverBudget(budget));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> InstanceLimits {
        InstanceLimits {
            memory_bytes: 1 << 20,
            table_elements: 100,
            core_instances: 4,
            tables: 2,
            memories: 1,
            resources: 10,
        }
    }

    #[test]
    fn the_pool_bounds_the_sum_of_instances_and_is_released_on_drop() {
        // The bug: 30 users x 60 MiB held 1.9 GB because only each instance was capped.
        let pool = MemoryPool::new(3 << 19);
        let mut a = PolicyLimiter::new(limits(), pool.clone());
        let mut b = PolicyLimiter::new(limits(), pool.clone());
        assert!(a.memory_growing(0, 1 << 20, None).unwrap());
        assert!(b.memory_growing(0, 1 << 20, None).is_err(), "over the pool");
        assert!(b.refused.is_some());
        drop(a);
        assert_eq!(pool.used(), 0);
        assert!(b.memory_growing(0, 1 << 20, None).unwrap());
    }

    #[test]
    fn tables_count_against_the_instance_and_the_pool() {
        // The bug: table.grow of 20M funcrefs per call was not limited at all.
        let pool = MemoryPool::new(1 << 30);
        let mut a = PolicyLimiter::new(limits(), pool.clone());
        assert!(a.table_growing(0, 100, None).unwrap());
        assert!(a.table_growing(100, 101, None).is_err());
        assert_eq!(pool.used(), 100 * TABLE_ELEMENT_BYTES);
    }

    #[tokio::test]
    async fn a_call_past_its_budget_is_cut_off_but_host_queue_waits_are_excused() {
        let budget = Duration::from_millis(100);
        let slow = within_budget(budget, tokio::time::sleep(Duration::from_secs(30))).await;
        assert_eq!(slow, Err(OverBudget(budget)));
        let queued = within_budget(budget, async {
            excused_wait(tokio::time::sleep(Duration::from_millis(250))).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        })
        .await;
        assert_eq!(queued, Ok(()));
    }
}
