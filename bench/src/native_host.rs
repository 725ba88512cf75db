//! The native (non-wasm) run of the per-user policy: `policy_core::Host`
//! over the library's own [`Engine`], so case 3 can price the component
//! boundary against the same policy logic compiled into the host.

use sandbox_contract::{Container, Error};
use sandbox_host::internals::{Engine, RemoveMode};
use sandbox_host::{BackendId, SandboxError};

/// The native policy's host: the same engine, driven synchronously (the
/// in-memory provider never actually waits).
pub(crate) struct NativeHost<'a> {
    pub(crate) engine: &'a Engine,
}

fn now<T>(f: impl std::future::Future<Output = Result<T, SandboxError>>) -> Result<T, Error> {
    use futures_util::FutureExt;
    match f.now_or_never() {
        Some(r) => r.map_err(Error::from),
        None => Err(Error::Other("would block".into())),
    }
}

impl policy_core::Host for NativeHost<'_> {
    fn find(&mut self, backend: &BackendId) -> Result<Option<Container>, Error> {
        now(self.engine.find(backend)).map(|c| c.map(|c| c.container))
    }
    fn list(&mut self) -> Result<Vec<Container>, Error> {
        now(self.engine.list()).map(|v| v.into_iter().map(|c| c.container).collect())
    }
    fn create(&mut self, backend: &BackendId) -> Result<Container, Error> {
        let created = now(self.engine.create(
            backend,
            "native",
            &sandbox_host::config::ProfileName::default_profile(),
        ))?;
        self.engine.hand_out(&created);
        Ok(created.container)
    }
    fn start(&mut self, container_id: &str) -> Result<(), Error> {
        now(self.engine.start(container_id, None))
    }
    fn inspect(&mut self, container_id: &str) -> Result<Option<Container>, Error> {
        now(self.engine.inspect(container_id)).map(|c| c.map(|c| c.container))
    }
    fn remove(&mut self, container_id: &str) -> Result<bool, Error> {
        now(self.engine.remove(container_id, RemoveMode::UnlessBusy))
    }
    fn now_ms(&mut self) -> u64 {
        sandbox_host::now_ms()
    }
    fn config(&mut self) -> Vec<(String, String)> {
        Vec::new()
    }
    fn log(&mut self, _level: policy_core::Level, _message: &str) {}
}
