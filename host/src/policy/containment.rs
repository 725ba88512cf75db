//! What one policy call and one policy instance may use, and the host-wide
//! total: the limits that keep an untrusted component from stalling or
//! bloating the host.
//!
//! - **Time.** Each call has one wall-clock budget that includes the time
//!   spent in host imports (WASI sleeps and polls included, so a policy that
//!   sleeps is cut off at the budget). Waiting for a lifecycle slot (the
//!   host's own queue of Docker creates/starts/removes) is not the policy's
//!   doing and is not charged (the engine's `clock::within_budget`). Guest CPU has its own, shorter deadline
//!   (epoch interruption, in `runtime/mod.rs`).
//! - **Host calls.** A bounded number of imports per call.
//! - **Memory.** Per instance: linear memory bytes, table elements, core
//!   instances, tables, memories, resource-table entries. Host-wide: the sum
//!   of every live instance's memories and tables is capped by one shared
//!   budget, so thousands of instances cannot add up past it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use wasmtime::ResourceLimiter;

use crate::config::Config;

/// Bytes charged per table element (a funcref or externref slot).
const TABLE_ELEMENT_BYTES: usize = 16;

/// The per-instance ceilings a policy runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstanceLimits {
    /// Bytes one linear memory may grow to.
    pub memory_bytes: usize,
    /// Elements one table may grow to.
    pub table_elements: usize,
    /// Core wasm instances.
    pub core_instances: usize,
    /// Tables.
    pub tables: usize,
    /// Linear memories.
    pub memories: usize,
    /// Entries in the host resource table (WASI pollables, streams).
    pub resources: usize,
}

impl InstanceLimits {
    /// The operator's ceilings: no instance ever gets more.
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

    /// The limits a component runs under, within these ceilings: exactly
    /// the core instances, memories and tables it declares, its initial
    /// memory and table sizes (headroom is added after the self-check by
    /// [`InstanceLimits::grown_from`]). A component that needs more than a
    /// ceiling is refused with the limit, the amount and the setting.
    pub fn sized(&self, needs: &ComponentNeeds) -> Result<InstanceLimits, String> {
        let over = |what: &str, needed: usize, ceiling: usize, key: &str| {
            format!(
                "it needs {needed} {what} and the ceiling is {ceiling}: raise `{key}` \
                 (SANDBOX_{}) to load it",
                key.to_uppercase()
            )
        };
        let checks = [
            (
                "core wasm instances",
                needs.core_instances,
                self.core_instances,
                "policy_core_instances",
            ),
            (
                "linear memories",
                needs.memories,
                self.memories,
                "policy_memories",
            ),
            ("tables", needs.tables, self.tables, "policy_tables"),
            (
                "bytes of initial linear memory",
                needs.initial_memory_bytes,
                self.memory_bytes,
                "policy_memory_bytes",
            ),
            (
                "initial table elements",
                needs.initial_table_elements,
                self.table_elements,
                "policy_table_elements",
            ),
        ];
        for (what, needed, ceiling, key) in checks {
            if needed > ceiling {
                return Err(over(what, needed, ceiling, key));
            }
        }
        Ok(InstanceLimits {
            core_instances: needs.core_instances.max(1),
            memories: needs.memories,
            tables: needs.tables,
            ..*self
        })
    }

    /// The memory and table limits after the self-check saw `peak`: room
    /// to grow (twice the peak, and at least `GROWTH_HEADROOM_BYTES` or
    /// `GROWTH_HEADROOM_ELEMENTS` more), never above the ceilings. A
    /// policy's memory is a cache: one that outgrows this traps, loses that
    /// instance and starts afresh.
    pub fn grown_from(&self, peak: Peak, ceilings: &InstanceLimits) -> InstanceLimits {
        let pages = |bytes: usize| bytes.div_ceil(WASM_PAGE) * WASM_PAGE;
        let memory = pages(
            peak.memory_bytes
                .saturating_mul(2)
                .max(peak.memory_bytes + GROWTH_HEADROOM_BYTES),
        );
        let elements = peak
            .table_elements
            .saturating_mul(2)
            .max(peak.table_elements + GROWTH_HEADROOM_ELEMENTS);
        InstanceLimits {
            memory_bytes: memory.min(ceilings.memory_bytes),
            table_elements: elements.min(ceilings.table_elements),
            ..*self
        }
    }
}

/// A wasm page.
const WASM_PAGE: usize = 64 * 1024;

/// Least room to grow past the self-check's peak: linear memory bytes.
pub const GROWTH_HEADROOM_BYTES: usize = 32 << 20;

/// Least room to grow past the self-check's peak: table elements.
pub const GROWTH_HEADROOM_ELEMENTS: usize = 4096;

/// What a component declares it needs to instantiate: counted from its
/// binary (core instances) and from wasmtime's view of its core modules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ComponentNeeds {
    /// Core module instantiations, nested components included.
    pub core_instances: usize,
    /// Linear memories its core modules define.
    pub memories: usize,
    /// Tables its core modules define.
    pub tables: usize,
    /// The largest initial size of one memory, in bytes.
    pub initial_memory_bytes: usize,
    /// The largest initial size of one table, in elements.
    pub initial_table_elements: usize,
}

impl ComponentNeeds {
    /// Reads the needs of a compiled `component` built from `bytes`.
    pub fn of(component: &wasmtime::component::Component, bytes: &[u8]) -> Result<Self, String> {
        let mut core_instances = 0usize;
        for payload in wasmparser::Parser::new(0).parse_all(bytes) {
            let payload = payload.map_err(|e| format!("reading the component: {e}"))?;
            if let wasmparser::Payload::InstanceSection(reader) = payload {
                for instance in reader {
                    let instance = instance.map_err(|e| format!("reading the component: {e}"))?;
                    if matches!(instance, wasmparser::Instance::Instantiate { .. }) {
                        core_instances += 1;
                    }
                }
            }
        }
        let resources = component.resources_required().ok_or_else(|| {
            "it instantiates a core module it imports, so what it needs cannot be known before it runs".to_owned()
        })?;
        let size = |n: Option<u64>| usize::try_from(n.unwrap_or(0)).unwrap_or(usize::MAX);
        Ok(ComponentNeeds {
            core_instances,
            memories: resources.num_memories as usize,
            tables: resources.num_tables as usize,
            // wasmtime counts memory sizes in wasm pages.
            initial_memory_bytes: size(resources.max_initial_memory_size).saturating_mul(WASM_PAGE),
            initial_table_elements: size(resources.max_initial_table_size),
        })
    }
}

/// The most one instance used: its largest memory and table, and all its
/// memories and tables in bytes (what it takes from the pool).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Peak {
    /// The largest size one memory reached, in bytes.
    pub memory_bytes: usize,
    /// The largest size one table reached, in elements.
    pub table_elements: usize,
    /// Bytes charged to the host-wide pool (memories and tables together).
    pub charged_bytes: usize,
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
    peak: Peak,
    /// Set when a growth was refused: the call that asked traps.
    pub refused: Option<String>,
}

impl PolicyLimiter {
    pub fn new(limits: InstanceLimits, pool: Arc<MemoryPool>) -> Self {
        PolicyLimiter {
            limits,
            pool,
            charged: 0,
            peak: Peak::default(),
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

    /// The most this instance used so far.
    pub fn peak(&self) -> Peak {
        Peak {
            charged_bytes: self.charged,
            ..self.peak
        }
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
        self.grow(desired.saturating_sub(current), "memory.grow")?;
        self.peak.memory_bytes = self.peak.memory_bytes.max(desired);
        Ok(true)
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
        self.grow(extra, "table.grow")?;
        self.peak.table_elements = self.peak.table_elements.max(desired);
        Ok(true)
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
}
