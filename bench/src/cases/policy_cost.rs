//! Case 3: the policy's own cost on the in-memory provider (no engine): the
//! component's warm get-thread-backend + ensure-container against native
//! policy-core, and as a share of one warm exec, to show the wasm boundary
//! is noise.

use std::sync::Arc;
use std::time::{Duration, Instant};

use policy_core::mapping::PerUser;
use sandbox_host::config::Config;
use sandbox_host::internals::Engine;
use sandbox_host::MemoryProvider;
use sandbox_host::{PolicySource, Sandbox, ThreadId};

use super::{my_ids, Bench};
use crate::native_host::NativeHost;
use crate::report::{ms, percentile, ratio};

impl Bench {
    /// (3) the policy's own cost, on the in-memory provider.
    pub(crate) async fn policy_cost(&mut self, exec_median: Duration) -> anyhow::Result<()> {
        let root = tempfile::tempdir()?;
        let config = Config {
            workspace_root: root.path().to_owned(),
            sandbox_user: Some(my_ids()),
            ..self.config.clone()
        };
        let provider = Arc::new(MemoryProvider::new());
        let sandbox = Sandbox::with_provider(
            config.clone(),
            provider.clone(),
            PolicySource::Builtin("per-user".into()),
        )
        .await?;
        let backend = sandbox.get_thread_backend("alice-1").await?;
        backend.ensure_container().await?;
        let rounds = if self.smoke { 200 } else { 5000 };
        let mut wasm = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let start = Instant::now();
            let b = sandbox.get_thread_backend("alice-1").await?;
            b.ensure_container().await?;
            wasm.push(start.elapsed());
        }

        let engine = Engine::new(config, provider);
        let mut native_policy = policy_core::Policy::new(PerUser);
        let mut host = NativeHost { engine: &engine };
        let thread = ThreadId::parse("alice-1")?;
        let id = native_policy.backend_id(&thread)?;
        native_policy.ensure_container(&mut host, &id)?;
        let mut native = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let start = Instant::now();
            let thread = ThreadId::parse("alice-1")?;
            let id = native_policy.backend_id(&thread)?;
            native_policy.ensure_container(&mut host, &id)?;
            native.push(start.elapsed());
        }
        let us = |d: Duration| format!("{:.1} us", d.as_secs_f64() * 1e6);
        let wasm_med = percentile(&wasm, 0.5);
        self.table.add(
            "3. warm get-thread-backend + ensure-container: component (full host path) vs native policy-core",
            format!("{} (p95 {})", us(wasm_med), us(percentile(&wasm, 0.95))),
            format!("{} (p95 {})", us(percentile(&native, 0.5)), us(percentile(&native, 0.95))),
            format!("{:.1}x", ratio(&wasm, &native)),
            "(context)",
        );
        self.table.add(
            "3. policy path as a share of one warm exec round trip",
            us(wasm_med),
            ms(exec_median),
            format!(
                "{:.3}%",
                100.0 * wasm_med.as_secs_f64() / exec_median.as_secs_f64()
            ),
            "<= 1%",
        );
        Ok(())
    }
}
