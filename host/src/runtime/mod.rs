//! The wasmtime runtime: one engine, a policy compiled once, and policy
//! instances that each run one call at a time.
//!
//! Containment: every call gets a guest-CPU deadline (epoch interruption;
//! time in host imports excluded) and every instance a memory limit. A trap
//! poisons only that instance: [`lanes::Lanes`] drops it and the next call
//! for that key gets a fresh one that rebuilds its cache by adoption.

pub mod bindings;
pub mod cache;
mod imports;
pub mod lanes;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Engine, Store, StoreLimitsBuilder, UpdateDeadline};

use bindings::sandbox::policy::types;
use bindings::{Sandbox, SandboxPre};
pub use imports::InstanceState;

use crate::capabilities::Capabilities;
use crate::error::SandboxError;
use crate::naming;

/// How often the epoch advances: the granularity of the policy deadline.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Component binaries start with this preamble (magic, then the component
/// layer); a core module has version 1 instead.
const WASM_MAGIC: &[u8; 4] = b"\0asm";

/// The wasmtime engine and the linker of the `sandbox` world.
pub struct PolicyEngine {
    engine: Engine,
    cache: Option<cache::ComponentCache>,
    linker: Linker<InstanceState>,
    _ticker: EpochTicker,
}

impl PolicyEngine {
    /// An engine that compiles components every time.
    pub fn new() -> wasmtime::Result<Self> {
        Self::with_cache(None)
    }

    /// An engine that keeps compiled components in `cache`.
    pub fn with_cache(cache: Option<cache::ComponentCache>) -> wasmtime::Result<Self> {
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(true);
        config.wasm_component_model(true);
        // Thousands of small instances (one per routing key): reserve no
        // multi-GiB virtual region per memory, or mmap limits end in ENOMEM
        // (measured: ~10k instances). Explicit bounds checks cost nothing
        // measurable for µs-long policy calls.
        config.memory_reservation(0);
        config.memory_guard_size(64 * 1024);
        config.memory_reservation_for_growth(1 << 20);
        let engine = Engine::new(&config)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        Sandbox::add_to_linker::<InstanceState, HasSelf<InstanceState>>(&mut linker, |s| s)?;
        let ticker = EpochTicker::start(engine.clone());
        Ok(PolicyEngine {
            engine,
            cache,
            linker,
            _ticker: ticker,
        })
    }

    /// Compiles and links a policy component, refusing with a message that
    /// names the problem: not wasm, a core module, another world, missing
    /// exports.
    pub fn compile(
        &self,
        bytes: &[u8],
        source: &str,
    ) -> Result<SandboxPre<InstanceState>, SandboxError> {
        let refuse = |why: String| SandboxError::PolicyLoad(format!("{source}: {why}"));
        if bytes.len() < 8 || &bytes[..4] != WASM_MAGIC {
            return Err(refuse("not a WebAssembly file (no \\0asm header)".into()));
        }
        if bytes[4..8] == [1, 0, 0, 0] {
            return Err(refuse(
                "a core WebAssembly module, not a component; build the policy for \
                 wasm32-wasip2 (cargo build --target wasm32-wasip2) so it targets the `sandbox` world"
                    .into(),
            ));
        }
        let component = match &self.cache {
            Some(cache) => cache.load_or_compile(&self.engine, bytes),
            None => Component::new(&self.engine, bytes),
        }
        .map_err(|e| refuse(format!("not a valid component: {e:#}")))?;
        let pre = self.linker.instantiate_pre(&component).map_err(|e| {
            refuse(format!(
                "does not fit the `sandbox` world's imports (a component for another world?): {e:#}"
            ))
        })?;
        SandboxPre::new(pre).map_err(|e| {
            refuse(format!(
                "does not export the `sandbox:policy/policy` interface of the `sandbox` world: {e:#}"
            ))
        })
    }
}

/// A compiled, self-checked policy, ready to instantiate.
pub struct CompiledPolicy {
    pre: SandboxPre<InstanceState>,
    name: String,
    source: String,
    deadline: Duration,
    memory_limit: usize,
}

impl CompiledPolicy {
    /// Compiles `bytes`, instantiates it once and checks that it answers:
    /// a name, and a valid backend id for a well-formed thread id.
    pub async fn load(
        engine: &PolicyEngine,
        bytes: &[u8],
        source: &str,
        caps: &Arc<Capabilities>,
    ) -> Result<Self, SandboxError> {
        let pre = engine.compile(bytes, source)?;
        let config = caps.config();
        let mut policy = CompiledPolicy {
            pre,
            name: String::from("unnamed"),
            source: source.to_owned(),
            deadline: config.policy_deadline(),
            memory_limit: config.policy_memory_bytes,
        };
        let refuse =
            |why: String| SandboxError::PolicyLoad(format!("{source}: self-check failed: {why}"));
        let mut instance = policy
            .instantiate(caps.clone())
            .await
            .map_err(|e| refuse(e.to_string()))?;
        let name = instance.name().await.map_err(|e| refuse(e.to_string()))?;
        let probe = "selfcheck-1";
        let backend = instance
            .backend_id(probe)
            .await
            .map_err(|e| refuse(e.to_string()))?;
        policy_core::ids::validate_backend(&backend)
            .map_err(|e| refuse(format!("backend-id({probe:?}) answered an invalid id: {e}")))?;
        let again = instance
            .backend_id(probe)
            .await
            .map_err(|e| refuse(e.to_string()))?;
        if again != backend {
            return Err(refuse(format!(
                "backend-id({probe:?}) is not deterministic ({backend:?}, then {again:?})"
            )));
        }
        policy.name = naming::sanitize_policy_name(&name);
        Ok(policy)
    }

    /// The policy's name (sanitised), as stamped on its containers.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where the policy came from (a path, or `embedded per-user`).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// A fresh instance with its own store, limits and deadline.
    pub async fn instantiate(
        &self,
        caps: Arc<Capabilities>,
    ) -> Result<PolicyInstance, SandboxError> {
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.memory_limit)
            .instances(8)
            .tables(8)
            .memories(8)
            .trap_on_grow_failure(true)
            .build();
        let state = InstanceState::new(caps, self.name.clone(), limits, self.deadline);
        let mut store = Store::new(self.pre.engine(), state);
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_callback(|ctx| {
            let clock = ctx.data().clock;
            if clock.guest_time() > clock.budget {
                Ok(UpdateDeadline::Interrupt)
            } else {
                // Let other tasks run while a long policy call computes.
                Ok(UpdateDeadline::Yield(1))
            }
        });
        store.set_epoch_deadline(1);
        let bindings =
            self.pre.instantiate_async(&mut store).await.map_err(|e| {
                SandboxError::PolicyTrap(format!("instantiating the policy: {e:#}"))
            })?;
        Ok(PolicyInstance { store, bindings })
    }
}

/// One instance of a policy: its store serialises the calls made on it.
pub struct PolicyInstance {
    store: Store<InstanceState>,
    bindings: Sandbox,
}

/// Converts the outcome of one export call; a trap is distinguished from the
/// policy's own typed error so the caller can drop the instance.
fn outcome<T>(r: wasmtime::Result<Result<T, types::Error>>, what: &str) -> Result<T, SandboxError> {
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.into()),
        Err(trap) => Err(SandboxError::PolicyTrap(format!("{what}: {trap:#}"))),
    }
}

impl PolicyInstance {
    fn arm(&mut self) {
        let data = self.store.data_mut();
        data.clock.started = Instant::now();
        data.clock.in_host = Duration::ZERO;
        self.store.set_epoch_deadline(1);
    }

    pub async fn name(&mut self) -> Result<String, SandboxError> {
        self.arm();
        let r = self
            .bindings
            .sandbox_policy_policy()
            .call_name(&mut self.store)
            .await;
        outcome(r.map(Ok), "name")
    }

    pub async fn backend_id(&mut self, thread_id: &str) -> Result<String, SandboxError> {
        self.arm();
        let r = self
            .bindings
            .sandbox_policy_policy()
            .call_backend_id(&mut self.store, thread_id)
            .await;
        outcome(r, "backend-id")
    }

    pub async fn get_thread_backend(
        &mut self,
        thread_id: &str,
    ) -> Result<types::Backend, SandboxError> {
        self.arm();
        let r = self
            .bindings
            .sandbox_policy_policy()
            .call_get_thread_backend(&mut self.store, thread_id)
            .await;
        outcome(r, "get-thread-backend")
    }

    pub async fn ensure_container(
        &mut self,
        backend_id: &str,
    ) -> Result<types::Container, SandboxError> {
        self.arm();
        let r = self
            .bindings
            .sandbox_policy_policy()
            .call_ensure_container(&mut self.store, backend_id)
            .await;
        outcome(r, "ensure-container")
    }

    pub async fn destroy_user_backend(&mut self, user_id: &str) -> Result<bool, SandboxError> {
        self.arm();
        let r = self
            .bindings
            .sandbox_policy_policy()
            .call_destroy_user_backend(&mut self.store, user_id)
            .await;
        outcome(r, "destroy-user-backend")
    }

    pub async fn maintain(&mut self) -> Result<u32, SandboxError> {
        self.arm();
        let r = self
            .bindings
            .sandbox_policy_policy()
            .call_maintain(&mut self.store)
            .await;
        outcome(r, "maintain")
    }

    pub async fn destroy_thread_backend(&mut self, thread_id: &str) -> Result<bool, SandboxError> {
        self.arm();
        let r = self
            .bindings
            .sandbox_policy_policy()
            .call_destroy_thread_backend(&mut self.store, thread_id)
            .await;
        outcome(r, "destroy-thread-backend")
    }
}

/// Advances the engine's epoch every [`EPOCH_TICK`] until dropped.
struct EpochTicker {
    stop: Arc<AtomicBool>,
}

impl EpochTicker {
    fn start(engine: Engine) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::Builder::new()
            .name("policy-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .expect("spawning the epoch thread");
        EpochTicker { stop }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
