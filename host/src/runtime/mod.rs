//! The wasmtime runtime: one engine, a policy compiled once, and policy
//! instances that each run one call at a time.
//!
//! Containment ([`containment`]): every call gets a guest-CPU deadline
//! (epoch interruption; time in host imports excluded), one wall-clock
//! budget (host imports included) and a bound on host calls; every instance
//! gets memory, table, instance and resource ceilings, all charged to one
//! host-wide pool. A trap, an overrun or a call abandoned mid-way poisons
//! only that instance: [`lanes::Lanes`] drops it and the next call for that
//! key gets a fresh one that rebuilds its cache by adoption.

pub mod bindings;
pub mod cache;
pub mod containment;
mod imports;
pub mod lanes;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Engine, Store, UpdateDeadline};

use bindings::sandbox::policy::types;
use bindings::{Sandbox, SandboxPre};
use containment::{InstanceLimits, MemoryPool, PolicyLimiter};
pub use imports::{InstanceState, Scope};

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
    call_timeout: Duration,
    host_calls: u32,
    limits: InstanceLimits,
    pool: Arc<MemoryPool>,
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
            call_timeout: Duration::from_millis(config.policy_call_timeout_ms),
            host_calls: config.policy_host_calls,
            limits: InstanceLimits::from_config(config),
            pool: caps.policy_memory().clone(),
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
        let limiter = PolicyLimiter::new(self.limits, self.pool.clone());
        let state = InstanceState::new(
            caps,
            self.name.clone(),
            limiter,
            self.deadline,
            self.host_calls,
            self.limits.resources,
        );
        let mut store = Store::new(self.pre.engine(), state);
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_callback(|ctx| {
            let state = ctx.data();
            if state.clock.guest_time() > state.clock.budget || state.call.exhausted.is_some() {
                Ok(UpdateDeadline::Interrupt)
            } else {
                // Let other tasks run while a long policy call computes.
                Ok(UpdateDeadline::Yield(1))
            }
        });
        store.set_epoch_deadline(1);
        let instantiate = self.pre.instantiate_async(&mut store);
        let bindings = match containment::within_budget(self.call_timeout, instantiate).await {
            Ok(Ok(bindings)) => bindings,
            Ok(Err(e)) => {
                let why = store.data().limiter.refused.clone();
                return Err(SandboxError::policy_trap(&format!(
                    "instantiating the policy: {}",
                    why.unwrap_or_else(|| format!("{e:#}"))
                )));
            }
            Err(over) => {
                return Err(SandboxError::policy_trap(&format!(
                    "instantiating the policy took longer than its budget of {} ms",
                    over.0.as_millis()
                )))
            }
        };
        Ok(PolicyInstance {
            store,
            bindings,
            call_timeout: self.call_timeout,
            poisoned: false,
        })
    }
}

/// One instance of a policy: its store serialises the calls made on it.
pub struct PolicyInstance {
    store: Store<InstanceState>,
    bindings: Sandbox,
    call_timeout: Duration,
    /// A call started and did not finish (trapped, overran, or its future
    /// was dropped): the store may be mid-call and must not be entered again.
    poisoned: bool,
}

/// Runs one export under the call's scope and budgets, converting the
/// outcome: a trap, an exhausted budget or an overrun poisons the instance
/// (the caller drops it); the policy's own typed error does not.
macro_rules! policy_call {
    ($self:ident, $scope:expr, $what:literal, |$b:ident, $s:ident| $call:expr) => {{
        $self.arm($scope);
        let $b = &$self.bindings;
        let $s = &mut $self.store;
        let timeout = $self.call_timeout;
        let r = containment::within_budget(timeout, async { $call.await }).await;
        $self.finish($what, r)
    }};
}

impl PolicyInstance {
    /// Whether an earlier call was abandoned or failed mid-call.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    fn arm(&mut self, scope: Scope) {
        self.poisoned = true;
        let data = self.store.data_mut();
        data.clock.started = Instant::now();
        data.clock.in_host = Duration::ZERO;
        data.call = imports::CallState::new(scope);
        self.store.set_epoch_deadline(1);
    }

    fn finish<T>(
        &mut self,
        what: &str,
        r: Result<wasmtime::Result<Result<T, types::Error>>, containment::OverBudget>,
    ) -> Result<T, SandboxError> {
        let state = self.store.data();
        let trap = |detail: String| SandboxError::policy_trap(&format!("{what}: {detail}"));
        let out = match r {
            Err(over) => Err(trap(format!(
                "exceeded its wall-clock budget of {} ms (host calls included)",
                over.0.as_millis()
            ))),
            Ok(Err(e)) => Err(trap(
                state
                    .call
                    .exhausted
                    .clone()
                    .or_else(|| state.limiter.refused.clone())
                    .unwrap_or_else(|| format!("{e:#}")),
            )),
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err(e))) => Err(e.into()),
        };
        self.poisoned = matches!(out, Err(SandboxError::PolicyTrap(_)));
        out
    }

    pub async fn name(&mut self) -> Result<String, SandboxError> {
        policy_call!(self, Scope::Pure, "name", |b, s| async {
            b.sandbox_policy_policy().call_name(s).await.map(Ok)
        })
    }

    pub async fn backend_id(&mut self, thread_id: &str) -> Result<String, SandboxError> {
        policy_call!(self, Scope::Pure, "backend-id", |b, s| b
            .sandbox_policy_policy()
            .call_backend_id(s, thread_id))
    }

    /// Runs in the lane of `key` (the thread's backend id).
    pub async fn get_thread_backend(
        &mut self,
        key: &str,
        thread_id: &str,
    ) -> Result<types::Backend, SandboxError> {
        policy_call!(
            self,
            Scope::Lane(key.to_owned()),
            "get-thread-backend",
            |b, s| b
                .sandbox_policy_policy()
                .call_get_thread_backend(s, thread_id)
        )
    }

    pub async fn ensure_container(
        &mut self,
        backend_id: &str,
    ) -> Result<types::Container, SandboxError> {
        policy_call!(
            self,
            Scope::Ensure(backend_id.to_owned()),
            "ensure-container",
            |b, s| b
                .sandbox_policy_policy()
                .call_ensure_container(s, backend_id)
        )
    }

    pub async fn destroy_user_backend(&mut self, user_id: &str) -> Result<bool, SandboxError> {
        policy_call!(
            self,
            Scope::Lane(user_id.to_owned()),
            "destroy-user-backend",
            |b, s| b
                .sandbox_policy_policy()
                .call_destroy_user_backend(s, user_id)
        )
    }

    pub async fn maintain(&mut self) -> Result<u32, SandboxError> {
        policy_call!(self, Scope::Maintain, "maintain", |b, s| b
            .sandbox_policy_policy()
            .call_maintain(s))
    }

    /// Runs in the lane of `key` (the thread's backend id).
    pub async fn destroy_thread_backend(
        &mut self,
        key: &str,
        thread_id: &str,
    ) -> Result<bool, SandboxError> {
        policy_call!(
            self,
            Scope::Lane(key.to_owned()),
            "destroy-thread-backend",
            |b, s| b
                .sandbox_policy_policy()
                .call_destroy_thread_backend(s, thread_id)
        )
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
