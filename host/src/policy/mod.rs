//! The policy layer: one wasmtime engine, a policy compiled once, instances
//! that each run one call at a time, and the checks on every answer.
//!
//! - [`client::PolicyClient`]: call the policy, verify its answer
//!   ([`answers`]), return verified types; the rest of the host only sees it;
//! - [`lanes`]: one lane per routing key, calls for one key serialised;
//!   [`pool`]: the instances they borrow, as many as the memory budget fits;
//! - `imports`: the world's imports over the [`Engine`](crate::engine::Engine);
//! - [`containment`]: every call, and every instance's start, gets a
//!   guest-CPU deadline (epoch interruption, [`ticker`]: the ticks the
//!   guest ran in; time in host imports or waiting for a CPU excluded), one
//!   wall-clock budget (host imports included) and a bound on host calls;
//!   every instance gets memory, table, instance and resource ceilings, all
//!   charged to one host-wide pool. A trap, an overrun or a call abandoned
//!   mid-way poisons only that instance, and the next call for that key
//!   gets a fresh one that rebuilds its cache by adoption;
//! - [`source`], [`embedded`], [`cache`]: where components come from, the
//!   shipped ones, and compiled components kept on disk.

pub mod answers;
mod bindings;
pub mod cache;
pub mod client;
pub mod containment;
pub mod embedded;
mod imports;
pub mod lanes;
pub mod measure;
pub mod pool;
pub mod source;
pub mod ticker;

use std::sync::Arc;
use std::time::{Duration, Instant};

use sandbox_contract::{Container, Removal, ThreadId, UserId};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Engine as WasmEngine, Store, UpdateDeadline};

use bindings::{placement_call, Placement, PlacementPre};
use containment::{ComponentNeeds, InstanceLimits, MemoryPool, PolicyLimiter};
pub use imports::{InstanceState, Scope};
use ticker::EpochTicker;

use crate::engine::{ownership, Engine};
use crate::error::SandboxError;

/// Component binaries start with this preamble (magic, then the component
/// layer); a core module has version 1 instead.
const WASM_MAGIC: &[u8; 4] = b"\0asm";

/// Guest time after which a policy call yields to other tasks at each epoch
/// tick (before it, ticks only check the budget).
const YIELD_AFTER: Duration = Duration::from_millis(10);

/// The wasmtime engine and the linker of the `sandbox` world.
pub struct PolicyEngine {
    engine: WasmEngine,
    cache: Option<cache::ComponentCache>,
    /// The budget every policy instance's memories and tables draw from,
    /// across swaps.
    memory: Arc<MemoryPool>,
    linker: Linker<InstanceState>,
    _ticker: EpochTicker,
}

impl PolicyEngine {
    /// An engine that keeps compiled components in `cache`, whose instances
    /// together hold at most `memory_total_bytes` of memories and tables.
    pub fn new(
        cache: Option<cache::ComponentCache>,
        memory_total_bytes: usize,
    ) -> wasmtime::Result<Self> {
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
        let engine = WasmEngine::new(&config)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        wasmtime_wasi_config::add_to_linker(&mut linker, imports::config_view)?;
        // Both worlds' `containers` (0.3 and 0.4 are different instance
        // names); `wasi:logging` is the same for both.
        bindings::v0_4::sandbox::policy::containers::add_to_linker::<_, HasSelf<InstanceState>>(
            &mut linker,
            |s| s,
        )?;
        bindings::v0_3::sandbox::policy::containers::add_to_linker::<_, HasSelf<InstanceState>>(
            &mut linker,
            |s| s,
        )?;
        bindings::v0_4::wasi::logging::logging::add_to_linker::<_, HasSelf<InstanceState>>(
            &mut linker,
            |s| s,
        )?;
        let ticker = EpochTicker::start(engine.clone());
        Ok(PolicyEngine {
            engine,
            cache,
            memory: MemoryPool::new(memory_total_bytes),
            linker,
            _ticker: ticker,
        })
    }

    /// Compiles and links a policy component, refusing with a message that
    /// names the problem: not wasm, a core module, another world, missing
    /// exports, needs that cannot be known.
    pub async fn compile(&self, bytes: &[u8], source: &str) -> Result<Compiled, SandboxError> {
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
        let started = Instant::now();
        // Seconds of CPU for a large component (and a wait on another
        // process compiling it): off the async runtime's workers.
        let (engine, cache, owned) = (self.engine.clone(), self.cache.clone(), bytes.to_vec());
        let (component, cached) = tokio::task::spawn_blocking(move || match &cache {
            Some(cache) => cache.load_or_compile(&engine, &owned),
            None => Component::new(&engine, &owned).map(|c| (c, false)),
        })
        .await
        .map_err(|e| refuse(format!("compiling stopped: {e}")))?
        .map_err(|e| refuse(format!("not a valid component: {e:#}")))?;
        let compile_time = started.elapsed();
        let needs = ComponentNeeds::of(&component, bytes).map_err(refuse)?;
        let pre = self.linker.instantiate_pre(&component).map_err(|e| {
            refuse(format!(
                "does not fit the `sandbox` world's imports (a component for another world?): {e:#}"
            ))
        })?;
        let pre = match bindings::v0_4::SandboxPre::new(pre.clone()) {
            Ok(pre) => PlacementPre::V0_4(pre),
            Err(current) => match bindings::v0_3::SandboxPre::new(pre) {
                Ok(pre) => PlacementPre::V0_3(pre),
                Err(previous) => {
                    return Err(refuse(format!(
                        "does not export the `sandbox:policy/placement` interface of the \
                         `sandbox` world, 0.4 or 0.3 (a policy for an older version of the \
                         world, or for another world?): as 0.4: {current:#}; as 0.3: {previous:#}"
                    )))
                }
            },
        };
        Ok(Compiled {
            pre,
            needs,
            compile_time,
            cached,
        })
    }
}

/// A component compiled and linked, not yet instantiated.
pub struct Compiled {
    pre: PlacementPre<InstanceState>,
    /// What it declares it needs.
    pub needs: ComponentNeeds,
    /// Compiling it, or reading it from the component cache.
    pub compile_time: Duration,
    /// Whether it came from the component cache.
    pub cached: bool,
}

/// What loading a policy measured: for `sandbox policy check`, the logs,
/// and sizing the instance pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadReport {
    /// The version of the `sandbox` world it was built for (`0.4`, `0.3`).
    pub world: &'static str,
    /// What the component declares it needs.
    pub needs: ComponentNeeds,
    /// Compiling it, or reading it from the component cache.
    pub compile_time: Duration,
    /// Whether it came from the component cache.
    pub cached: bool,
    /// Instantiating it once (the self-check's instance).
    pub instantiate_time: Duration,
    /// The most the self-check's instance used.
    pub peak: containment::Peak,
    /// The limits every instance runs under (sized from the above, within
    /// the ceilings).
    pub limits: InstanceLimits,
}

/// A compiled, self-checked policy, ready to instantiate.
pub struct CompiledPolicy {
    pre: PlacementPre<InstanceState>,
    name: String,
    source: String,
    deadline: Duration,
    call_timeout: Duration,
    host_calls: u32,
    limits: InstanceLimits,
    pool: Arc<MemoryPool>,
    report: LoadReport,
}

impl CompiledPolicy {
    /// Compiles `bytes`, sizes its limits from what it declares (refused
    /// past the operator's ceilings), instantiates it once and checks that
    /// it answers: a name, and a valid backend id for a well-formed thread
    /// id. The memory the check used sizes the limits every instance gets.
    pub async fn load(
        engine: &PolicyEngine,
        bytes: &[u8],
        source: &str,
        host: &Arc<Engine>,
    ) -> Result<Self, SandboxError> {
        let compiled = engine.compile(bytes, source).await?;
        let config = host.config();
        let ceilings = InstanceLimits::from_config(config);
        let limits = ceilings
            .sized(&compiled.needs)
            .map_err(|why| SandboxError::PolicyLoad(format!("{source}: refused: {why}")))?;
        let world = compiled.pre.version();
        let mut policy = CompiledPolicy {
            pre: compiled.pre,
            name: String::from("unnamed"),
            source: source.to_owned(),
            deadline: config.policy_deadline(),
            call_timeout: Duration::from_millis(config.policy_call_timeout_ms),
            host_calls: config.policy_host_calls,
            limits,
            pool: engine.memory.clone(),
            report: LoadReport {
                world,
                needs: compiled.needs,
                compile_time: compiled.compile_time,
                cached: compiled.cached,
                instantiate_time: Duration::ZERO,
                peak: containment::Peak::default(),
                limits,
            },
        };
        let refuse =
            |why: String| SandboxError::PolicyLoad(format!("{source}: self-check failed: {why}"));
        let started = Instant::now();
        let mut instance = policy
            .instantiate(host.clone())
            .await
            .map_err(|e| refuse(e.to_string()))?;
        policy.report.instantiate_time = started.elapsed();
        let name = instance.name().await.map_err(|e| refuse(e.to_string()))?;
        // The same checks every later answer gets (answers.rs).
        let probe = ThreadId::parse("selfcheck-1").expect("a valid thread id");
        let first = instance
            .backend_id(probe.as_str())
            .await
            .map_err(|e| refuse(format!("backend-id({probe}): {e}")))?;
        let backend =
            answers::backend_of_thread(&probe, &first).map_err(|e| refuse(e.to_string()))?;
        let second = instance
            .backend_id(probe.as_str())
            .await
            .map_err(|e| refuse(e.to_string()))?;
        answers::deterministic(&probe, &backend, &second).map_err(|e| refuse(e.to_string()))?;
        if ThreadId::parse(backend.as_str()).is_ok() {
            let again = instance.backend_id(backend.as_str()).await;
            answers::identity(&backend, again).map_err(|e| refuse(e.to_string()))?;
        }
        policy.name = ownership::sanitize_policy_name(&name);
        let peak = instance.store.data().limiter.peak();
        policy.limits = limits.grown_from(peak, &ceilings);
        policy.report.peak = peak;
        policy.report.limits = policy.limits;
        Ok(policy)
    }

    /// What loading measured.
    pub fn report(&self) -> &LoadReport {
        &self.report
    }

    /// How many instances the pool may keep alive: `policy_pool_bytes`
    /// over what one instance took at the self-check (its memories and
    /// tables), within `max_policy_instances`.
    pub fn pool_capacity(&self, config: &crate::config::Config) -> usize {
        let per_instance = self.report.peak.charged_bytes.max(1);
        (config.policy_pool_bytes / per_instance).clamp(1, config.max_policy_instances)
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
    pub async fn instantiate(&self, host: Arc<Engine>) -> Result<PolicyInstance, SandboxError> {
        let limiter = PolicyLimiter::new(self.limits, self.pool.clone());
        let state = InstanceState::new(
            host,
            self.name.clone(),
            limiter,
            self.deadline,
            self.host_calls,
            self.limits.resources,
        );
        let mut store = Store::new(self.pre.engine(), state);
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_callback(|mut ctx| {
            let state = ctx.data_mut();
            state.clock.tick();
            if state.clock.guest_time() > state.clock.budget || state.call.exhausted.is_some() {
                Ok(UpdateDeadline::Interrupt)
            } else if state.clock.guest_time() < YIELD_AFTER {
                // A short call that merely crosses a tick runs on: a yield
                // would queue it behind every ready task while it holds its
                // pool instance (the 50-user p99 of the Python policy).
                Ok(UpdateDeadline::Continue(1))
            } else {
                // Let other tasks run while a long policy call computes.
                Ok(UpdateDeadline::Yield(1))
            }
        });
        store.set_epoch_deadline(1);
        let instantiate = self.pre.instantiate_async(&mut store);
        let bindings =
            match crate::engine::clock::within_budget(self.call_timeout, instantiate).await {
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
    bindings: Placement,
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
        let r = crate::engine::clock::within_budget(timeout, async { $call.await }).await;
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
        data.clock.ticks = 0;
        data.clock.after_import = false;
        data.call = imports::CallState::new(scope);
        data.clear_guest_stderr();
        self.store.set_epoch_deadline(1);
    }

    fn finish<T>(
        &mut self,
        what: &str,
        r: Result<
            wasmtime::Result<Result<T, sandbox_contract::Error>>,
            crate::engine::clock::OverBudget,
        >,
    ) -> Result<T, SandboxError> {
        // What the guest wrote to stderr (a Python traceback) names the
        // failure better than the wasm backtrace does.
        let stderr = self.store.data_mut().take_guest_stderr();
        let state = self.store.data();
        let trap = |detail: String| SandboxError::policy_trap(&format!("{what}: {detail}"));
        let out = match r {
            Err(over) => Err(trap(format!(
                "exceeded its wall-clock budget of {} ms (host calls included)",
                over.0.as_millis()
            ))),
            Ok(Err(e)) => Err(trap(imports::with_guest_stderr(
                state
                    .call
                    .exhausted
                    .clone()
                    .or_else(|| state.limiter.refused.clone())
                    .unwrap_or_else(|| format!("{e:#}")),
                stderr,
            ))),
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err(e))) => Err(e.into()),
        };
        self.poisoned = matches!(out, Err(SandboxError::PolicyTrap(_)));
        out
    }

    pub async fn name(&mut self) -> Result<String, SandboxError> {
        policy_call!(self, Scope::Pure, "name", |b, s| async {
            placement_call!(b, |p| p.call_name(&mut *s)).map(Ok)
        })
    }

    pub async fn backend_id(&mut self, thread_id: &str) -> Result<String, SandboxError> {
        policy_call!(self, Scope::Pure, "backend-id", |b, s| async {
            placement_call!(b, |p| p.call_backend_id(&mut *s, thread_id))
        })
    }

    /// The profile the policy names for `backend` (unchecked); a policy of
    /// the 0.3 world cannot name one: `None`, without a call.
    pub async fn profile(
        &mut self,
        backend: &sandbox_contract::BackendId,
    ) -> Result<Option<String>, SandboxError> {
        if matches!(self.bindings, Placement::V0_3(_)) {
            return Ok(None);
        }
        policy_call!(self, Scope::Pure, "profile", |b, s| async {
            match b {
                Placement::V0_4(b) => b
                    .sandbox_policy_placement()
                    .call_profile(&mut *s, backend.as_str())
                    .await
                    .map(|r| r.map(Some)),
                Placement::V0_3(_) => Ok(Ok(None)),
            }
        })
    }

    pub async fn ensure_container(
        &mut self,
        backend: &sandbox_contract::BackendId,
        profile: &crate::config::ProfileName,
    ) -> Result<Container, SandboxError> {
        let scope = Scope::Ensure {
            backend: backend.clone(),
            profile: profile.clone(),
        };
        policy_call!(self, scope, "ensure-container", |b, s| async {
            placement_call!(b, |p| p.call_ensure_container(&mut *s, backend.as_str()))
        })
    }

    /// Removals in it drain until `deadline`.
    pub async fn release_thread(
        &mut self,
        thread: &ThreadId,
        deadline: tokio::time::Instant,
    ) -> Result<bool, SandboxError> {
        let scope = Scope::Destroy {
            user: thread.user(),
            deadline,
        };
        policy_call!(self, scope, "release-thread", |b, s| async {
            placement_call!(b, |p| p.call_release_thread(&mut *s, thread.as_str()))
        })
    }

    /// Removals in it drain until `deadline`.
    pub async fn destroy_user(
        &mut self,
        user: &UserId,
        deadline: tokio::time::Instant,
    ) -> Result<bool, SandboxError> {
        let scope = Scope::Destroy {
            user: user.clone(),
            deadline,
        };
        policy_call!(self, scope, "destroy-user", |b, s| async {
            placement_call!(b, |p| p.call_destroy_user(&mut *s, user.as_str()))
        })
    }

    pub async fn maintain(&mut self, dry_run: bool) -> Result<Vec<Removal>, SandboxError> {
        policy_call!(
            self,
            Scope::Maintain { dry_run },
            "maintain",
            |b, s| async { placement_call!(b, |p| p.call_maintain(&mut *s, dry_run)) }
        )
    }
}
