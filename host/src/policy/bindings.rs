//! Host bindings of the `sandbox` world, private to the policy layer: the
//! current world (`wit/sandbox.wit`, 0.4) and the previous one
//! (`wit/v0.3`, frozen), so policies built for either load. The WIT `types`
//! interface of both is the contract crate's own types (`with:` below), so
//! no second copy exists; import errors are the host's
//! [`SandboxError`](crate::error::SandboxError), converted once at the
//! boundary (`convert_error` in `imports.rs`).

/// `sandbox:policy@0.4.0`.
pub mod v0_4 {
    wasmtime::component::bindgen!({
        world: "sandbox:policy/sandbox@0.4.0",
        path: "../wit",
        imports: { default: async | trappable },
        exports: { default: async },
        with: {
            "sandbox:policy/types": super::contract_types,
        },
        trappable_error_type: {
            "sandbox:policy/types.error" => crate::error::SandboxError,
        },
    });
}

/// `sandbox:policy@0.3.0`: the same imports (linked under their 0.3
/// names, served by the same code) and the exports without `profile`.
pub mod v0_3 {
    wasmtime::component::bindgen!({
        world: "sandbox:policy/sandbox@0.3.0",
        path: ["../wit/deps/config", "../wit/deps/logging", "../wit/v0.3"],
        imports: { default: async | trappable },
        exports: { default: async },
        with: {
            "sandbox:policy/types": super::contract_types,
            "wasi:logging/logging": super::v0_4::wasi::logging::logging,
        },
        trappable_error_type: {
            "sandbox:policy/types.error" => crate::error::SandboxError,
        },
    });
}

/// The WIT `types` interface, as bindgen would have generated it, but made
/// of the contract crate's types (they carry wasmtime's component traits).
pub mod contract_types {
    #[allow(unused_imports)]
    pub use sandbox_contract::{Container, Error, Removal, Status as ContainerStatus};

    /// Turns a host error into the policy's `error`, or into a trap.
    pub trait Host {
        /// The one conversion at the boundary.
        fn convert_error(&mut self, err: crate::error::SandboxError) -> wasmtime::Result<Error>;
    }

    /// What the world's `add_to_linker` asks of every interface's store
    /// (the host links interface by interface, so unused).
    #[allow(dead_code)]
    pub trait HostWithStore<T>: wasmtime::component::HasData + Send {}
    impl<T, D: wasmtime::component::HasData + Send + ?Sized> HostWithStore<T> for D {}

    /// The interface has no functions: nothing to link.
    #[allow(dead_code)]
    pub fn add_to_linker<T, D>(
        _linker: &mut wasmtime::component::Linker<T>,
        _getter: fn(&mut T) -> D::Data<'_>,
    ) -> wasmtime::Result<()>
    where
        D: HostWithStore<T>,
        for<'a> D::Data<'a>: Host,
        T: 'static,
    {
        Ok(())
    }

    impl<T: Host + ?Sized> Host for &mut T {
        fn convert_error(&mut self, err: crate::error::SandboxError) -> wasmtime::Result<Error> {
            T::convert_error(*self, err)
        }
    }
}

/// The exports of a policy instance, of whichever world it was built for.
pub enum Placement {
    V0_4(v0_4::Sandbox),
    V0_3(v0_3::Sandbox),
}

/// A policy component linked and checked against one of the worlds.
pub enum PlacementPre<T: 'static> {
    V0_4(v0_4::SandboxPre<T>),
    V0_3(v0_3::SandboxPre<T>),
}

impl<T: Send + 'static> PlacementPre<T> {
    /// The world's version, for reports.
    pub fn version(&self) -> &'static str {
        match self {
            PlacementPre::V0_4(_) => "0.4",
            PlacementPre::V0_3(_) => "0.3",
        }
    }

    pub fn engine(&self) -> &wasmtime::Engine {
        match self {
            PlacementPre::V0_4(p) => p.engine(),
            PlacementPre::V0_3(p) => p.engine(),
        }
    }

    pub async fn instantiate_async(
        &self,
        store: &mut wasmtime::Store<T>,
    ) -> wasmtime::Result<Placement> {
        Ok(match self {
            PlacementPre::V0_4(p) => Placement::V0_4(p.instantiate_async(store).await?),
            PlacementPre::V0_3(p) => Placement::V0_3(p.instantiate_async(store).await?),
        })
    }
}

/// Calls the same export on either world's bindings (their signatures are
/// the same: the `types` of both are the contract crate's).
macro_rules! placement_call {
    ($bindings:expr, |$p:ident| $call:expr) => {
        match $bindings {
            $crate::policy::bindings::Placement::V0_4(b) => {
                let $p = b.sandbox_policy_placement();
                $call.await
            }
            $crate::policy::bindings::Placement::V0_3(b) => {
                let $p = b.sandbox_policy_placement();
                $call.await
            }
        }
    };
}
pub(crate) use placement_call;
