//! The WIT adapter of the shipped policies (feature `component`): the
//! world's `placement` export over a [`Policy`], and a [`Host`] over the
//! world's imports. It parses ids and passes calls through; the type
//! conversions are the contract's (`sandbox_contract::guest`) and every
//! decision is [`Policy`]'s, where native tests cover it.
//!
//! A policy crate (a `cdylib` built for wasm32-wasip2) is one line:
//!
//! ```ignore
//! policy_core::export_policy!(policy_core::mapping::PerUser);
//! ```

use std::marker::PhantomData;
use std::time::{SystemTime, UNIX_EPOCH};

use sandbox_contract::guest::exports::sandbox::policy::placement::Guest;
use sandbox_contract::guest::sandbox::policy::{containers, types as wit};
use sandbox_contract::guest::wasi::config::store;
use sandbox_contract::guest::wasi::logging::logging;
use sandbox_contract::{BackendId, Container, Result, ThreadId, UserId};

use crate::host::{Host, Level};
use crate::mapping::Mapping;
use crate::policy::Policy;

// For `export_policy!`, so a policy crate needs no direct dependency on the
// contract crate or wit-bindgen.
#[doc(hidden)]
pub use sandbox_contract as __contract;

/// The world's imports, seen through [`Host`].
pub struct WitHost {
    /// The `context` of every log line: the policy's name.
    context: &'static str,
}

impl Host for WitHost {
    fn find(&mut self, backend: &BackendId) -> Result<Option<Container>> {
        Ok(containers::find(backend.as_str())?.map(Into::into))
    }

    fn list(&mut self) -> Result<Vec<Container>> {
        Ok(containers::list()?.into_iter().map(Into::into).collect())
    }

    fn create(&mut self, backend: &BackendId) -> Result<Container> {
        Ok(containers::create(backend.as_str())?.into())
    }

    fn start(&mut self, container_id: &str) -> Result<()> {
        Ok(containers::start(container_id)?)
    }

    fn inspect(&mut self, container_id: &str) -> Result<Option<Container>> {
        Ok(containers::inspect(container_id)?.map(Into::into))
    }

    fn remove(&mut self, container_id: &str) -> Result<bool> {
        Ok(containers::remove(container_id)?)
    }

    fn now_ms(&mut self) -> u64 {
        // WASI's wall clock, the clock of `container.last-used-ms`.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }

    fn config(&mut self) -> Vec<(String, String)> {
        store::get_all().unwrap_or_else(|e| {
            // Without its settings the policy still serves, with defaults.
            self.log(Level::Warn, &format!("cannot read the policy config: {e}"));
            Vec::new()
        })
    }

    fn log(&mut self, level: Level, message: &str) {
        let level = match level {
            Level::Trace => logging::Level::Trace,
            Level::Debug => logging::Level::Debug,
            Level::Info => logging::Level::Info,
            Level::Warn => logging::Level::Warn,
            Level::Error => logging::Level::Error,
        };
        logging::log(level, self.context, message);
    }
}

/// Where a component keeps its [`Policy`]: one per instance, in a
/// thread-local that [`export_policy!`] declares in the policy crate (a
/// generic adapter cannot own a static per mapping).
pub trait Placement: 'static {
    type Mapping: Mapping;

    fn with_policy<R>(f: impl FnOnce(&mut Policy<Self::Mapping>) -> R) -> R;
}

/// The `placement` export of a [`Placement`]: what [`export_policy!`]
/// hands to wit-bindgen's `export!`.
pub struct Adapter<P>(PhantomData<P>);

fn host<P: Placement>() -> WitHost {
    WitHost {
        context: <P::Mapping as Mapping>::NAME,
    }
}

impl<P: Placement> Guest for Adapter<P> {
    fn name() -> String {
        <P::Mapping as Mapping>::NAME.into()
    }

    fn backend_id(thread_id: String) -> Result<String, wit::Error> {
        let thread = ThreadId::parse(&thread_id)?;
        let backend = P::with_policy(|p| p.backend_id(&thread))?;
        Ok(backend.to_string())
    }

    fn profile(backend_id: String) -> Result<String, wit::Error> {
        let backend = BackendId::parse(&backend_id)?;
        Ok(P::with_policy(|p| p.profile(&mut host::<P>(), &backend))?)
    }

    fn ensure_container(backend_id: String) -> Result<wit::Container, wit::Error> {
        let backend = BackendId::parse(&backend_id)?;
        let container = P::with_policy(|p| p.ensure_container(&mut host::<P>(), &backend))?;
        Ok(container.into())
    }

    fn release_thread(thread_id: String) -> Result<bool, wit::Error> {
        let thread = ThreadId::parse(&thread_id)?;
        Ok(P::with_policy(|p| {
            p.release_thread(&mut host::<P>(), &thread)
        })?)
    }

    fn destroy_user(user_id: String) -> Result<bool, wit::Error> {
        let user = UserId::parse(&user_id)?;
        Ok(P::with_policy(|p| p.destroy_user(&mut host::<P>(), &user))?)
    }

    fn maintain(dry_run: bool) -> Result<Vec<wit::Removal>, wit::Error> {
        let removals = P::with_policy(|p| p.maintain(&mut host::<P>(), dry_run))?;
        Ok(removals.into_iter().map(Into::into).collect())
    }
}

/// Exports a [`Mapping`] (a type with `Default`) as the `placement`
/// interface of the `sandbox` world, with the shared lifecycle of
/// [`Policy`]. Use once, in the policy's `cdylib` crate.
#[macro_export]
macro_rules! export_policy {
    ($mapping:ty) => {
        ::std::thread_local! {
            static __POLICY: ::core::cell::RefCell<$crate::Policy<$mapping>> =
                ::core::cell::RefCell::new($crate::Policy::new(
                    <$mapping as ::core::default::Default>::default(),
                ));
        }

        struct __Placement;

        impl $crate::component::Placement for __Placement {
            type Mapping = $mapping;

            fn with_policy<R>(f: impl FnOnce(&mut $crate::Policy<$mapping>) -> R) -> R {
                __POLICY.with_borrow_mut(f)
            }
        }

        type __Component = $crate::component::Adapter<__Placement>;

        $crate::component::__contract::guest::export!(
            __Component with_types_in $crate::component::__contract::guest
        );
    };
}
