// The WIT adapter shared by the shipped policy components, `include!`d by
// each of them after it names its `Selected` mapping. It only converts
// between the wit-bindgen types and `policy_core`; every decision is made in
// `policy_core`, where native tests cover it.

use std::cell::RefCell;

use exports::sandbox::policy::policy::Guest;
use policy_core::{Host, Policy};
use sandbox::policy::types as wit;
use sandbox::policy::{containers, context, logging, workspaces};

wit_bindgen::generate!({
    world: "sandbox",
    path: "../../wit",
});

thread_local! {
    static POLICY: RefCell<Policy<Selected>> = RefCell::new(Policy::new(Selected::default()));
}

/// The host's imports, seen through `policy_core::Host`.
struct WitHost;

impl Host for WitHost {
    fn find(&mut self, backend_id: &str) -> Result<Option<policy_core::Container>, policy_core::Error> {
        Ok(containers::find(backend_id).map_err(from_wit)?.map(container_from_wit))
    }

    fn list(&mut self) -> Result<Vec<policy_core::Container>, policy_core::Error> {
        Ok(containers::list_managed().map_err(from_wit)?.into_iter().map(container_from_wit).collect())
    }

    fn create(&mut self, backend_id: &str, workspace: &str) -> Result<policy_core::Container, policy_core::Error> {
        containers::create(backend_id, workspace).map(container_from_wit).map_err(from_wit)
    }

    fn start(&mut self, container_id: &str) -> Result<(), policy_core::Error> {
        containers::start(container_id).map_err(from_wit)
    }

    fn inspect(&mut self, container_id: &str) -> Result<Option<policy_core::Container>, policy_core::Error> {
        Ok(containers::inspect(container_id).map_err(from_wit)?.map(container_from_wit))
    }

    fn remove(&mut self, container_id: &str) -> Result<bool, policy_core::Error> {
        containers::remove(container_id).map_err(from_wit)
    }

    fn prepare_workspace(&mut self, name: &str) -> Result<(), policy_core::Error> {
        workspaces::prepare(name).map_err(from_wit)
    }

    fn now_ms(&mut self) -> u64 {
        context::now_ms()
    }

    fn policy_config(&mut self) -> Vec<(String, String)> {
        context::policy_config()
    }

    fn log(&mut self, level: policy_core::Level, message: &str) {
        let level = match level {
            policy_core::Level::Trace => logging::Level::Trace,
            policy_core::Level::Debug => logging::Level::Debug,
            policy_core::Level::Info => logging::Level::Info,
            policy_core::Level::Warn => logging::Level::Warn,
            policy_core::Level::Error => logging::Level::Error,
        };
        logging::log(level, message);
    }
}

struct Component;

impl Guest for Component {
    fn name() -> String {
        POLICY.with_borrow(|p| p.name().to_owned())
    }

    fn backend_id(thread_id: String) -> Result<String, wit::Error> {
        POLICY.with_borrow(|p| p.backend_id(&thread_id)).map_err(to_wit)
    }

    fn get_thread_backend(thread_id: String) -> Result<wit::Backend, wit::Error> {
        let backend = POLICY
            .with_borrow_mut(|p| p.get_thread_backend(&mut WitHost, &thread_id))
            .map_err(to_wit)?;
        Ok(wit::Backend {
            id: backend.id,
            user_id: backend.user_id,
            workspace: backend.workspace,
        })
    }

    fn ensure_container(backend_id: String) -> Result<wit::Container, wit::Error> {
        POLICY
            .with_borrow_mut(|p| p.ensure_container(&mut WitHost, &backend_id))
            .map(container_to_wit)
            .map_err(to_wit)
    }

    fn destroy_user_backend(user_id: String) -> Result<bool, wit::Error> {
        POLICY
            .with_borrow_mut(|p| p.destroy_user_backend(&mut WitHost, &user_id))
            .map_err(to_wit)
    }

    fn destroy_thread_backend(thread_id: String) -> Result<bool, wit::Error> {
        POLICY
            .with_borrow_mut(|p| p.destroy_thread_backend(&mut WitHost, &thread_id))
            .map_err(to_wit)
    }

    fn maintain() -> Result<u32, wit::Error> {
        POLICY.with_borrow_mut(|p| p.maintain(&mut WitHost)).map_err(to_wit)
    }
}

export!(Component);

fn from_wit(e: wit::Error) -> policy_core::Error {
    match e {
        wit::Error::InvalidId(m) => policy_core::Error::InvalidId(m),
        wit::Error::DockerUnavailable(m) => policy_core::Error::DockerUnavailable(m),
        wit::Error::Refused(m) => policy_core::Error::Refused(m),
        wit::Error::NotFound(m) => policy_core::Error::NotFound(m),
        wit::Error::Other(m) => policy_core::Error::Other(m),
    }
}

fn to_wit(e: policy_core::Error) -> wit::Error {
    match e {
        policy_core::Error::InvalidId(m) => wit::Error::InvalidId(m),
        policy_core::Error::DockerUnavailable(m) => wit::Error::DockerUnavailable(m),
        policy_core::Error::Refused(m) => wit::Error::Refused(m),
        policy_core::Error::NotFound(m) => wit::Error::NotFound(m),
        policy_core::Error::Other(m) => wit::Error::Other(m),
    }
}

fn container_from_wit(c: wit::Container) -> policy_core::Container {
    use policy_core::Status;
    let status = match c.status {
        wit::ContainerStatus::Created => Status::Created,
        wit::ContainerStatus::Running => Status::Running,
        wit::ContainerStatus::Paused => Status::Paused,
        wit::ContainerStatus::Restarting => Status::Restarting,
        wit::ContainerStatus::Removing => Status::Removing,
        wit::ContainerStatus::Exited => Status::Exited,
        wit::ContainerStatus::Dead => Status::Dead,
    };
    policy_core::Container {
        id: c.id,
        name: c.name,
        backend_id: c.backend_id,
        workspace: c.workspace,
        status,
        last_used_ms: c.last_used_ms,
    }
}

fn container_to_wit(c: policy_core::Container) -> wit::Container {
    use policy_core::Status;
    let status = match c.status {
        Status::Created => wit::ContainerStatus::Created,
        Status::Running => wit::ContainerStatus::Running,
        Status::Paused => wit::ContainerStatus::Paused,
        Status::Restarting => wit::ContainerStatus::Restarting,
        Status::Removing => wit::ContainerStatus::Removing,
        Status::Exited => wit::ContainerStatus::Exited,
        Status::Dead => wit::ContainerStatus::Dead,
    };
    wit::Container {
        id: c.id,
        name: c.name,
        backend_id: c.backend_id,
        workspace: c.workspace,
        status,
        last_used_ms: c.last_used_ms,
    }
}
