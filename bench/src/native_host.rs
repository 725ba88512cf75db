//! The native (non-wasm) run of the per-user policy: `policy_core::Host`
//! over the library's own capabilities, so case 3 can price the component
//! boundary against the same policy logic compiled into the host.

use sandbox_host::capabilities::Capabilities;

/// The native policy's host: the same capabilities, driven synchronously
/// (the in-memory provider never actually waits).
pub(crate) struct NativeHost<'a> {
    pub(crate) caps: &'a Capabilities,
}

fn now<T>(
    f: impl std::future::Future<Output = sandbox_host::error::Result<T>>,
) -> policy_core::host::Result<T> {
    use futures_util::FutureExt;
    match f.now_or_never() {
        Some(r) => r.map_err(|e| policy_core::Error::Other(e.to_string())),
        None => Err(policy_core::Error::Other("would block".into())),
    }
}

fn to_core(c: sandbox_host::ManagedContainer) -> policy_core::Container {
    policy_core::Container {
        id: c.id,
        name: c.name,
        backend_id: c.backend_id,
        workspace: c.workspace,
        status: c.status,
        last_used_ms: c.last_used_ms,
    }
}

impl policy_core::Host for NativeHost<'_> {
    fn find(
        &mut self,
        backend_id: &str,
    ) -> policy_core::host::Result<Option<policy_core::Container>> {
        now(self.caps.find(backend_id)).map(|c| c.map(to_core))
    }
    fn list(&mut self) -> policy_core::host::Result<Vec<policy_core::Container>> {
        now(self.caps.list_managed()).map(|v| v.into_iter().map(to_core).collect())
    }
    fn create(
        &mut self,
        backend_id: &str,
        workspace: &str,
    ) -> policy_core::host::Result<policy_core::Container> {
        now(self.caps.create(backend_id, workspace, "native")).map(to_core)
    }
    fn start(&mut self, container_id: &str) -> policy_core::host::Result<()> {
        now(self.caps.start(container_id))
    }
    fn inspect(
        &mut self,
        container_id: &str,
    ) -> policy_core::host::Result<Option<policy_core::Container>> {
        now(self.caps.inspect(container_id)).map(|c| c.map(to_core))
    }
    fn remove(&mut self, container_id: &str) -> policy_core::host::Result<bool> {
        now(self.caps.remove(container_id))
    }
    fn prepare_workspace(&mut self, name: &str) -> policy_core::host::Result<()> {
        self.caps
            .prepare_workspace(name)
            .map_err(|e| policy_core::Error::Other(e.to_string()))
    }
    fn now_ms(&mut self) -> u64 {
        sandbox_host::capabilities::now_ms()
    }
    fn policy_config(&mut self) -> Vec<(String, String)> {
        Vec::new()
    }
    fn log(&mut self, _level: policy_core::Level, _message: &str) {}
}
