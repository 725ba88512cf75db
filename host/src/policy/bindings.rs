//! Host bindings of the `sandbox` world (wit/sandbox.wit), private to the
//! policy layer. The WIT `types` interface is the contract crate's own
//! types (`with:` below), so no second copy exists; import errors are the
//! host's [`SandboxError`](crate::error::SandboxError), converted once at
//! the boundary (`convert_error` in `imports.rs`).

wasmtime::component::bindgen!({
    world: "sandbox",
    path: "../wit",
    imports: { default: async | trappable },
    exports: { default: async },
    with: {
        "sandbox:policy/types": contract_types,
    },
    trappable_error_type: {
        "sandbox:policy/types.error" => crate::error::SandboxError,
    },
});

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
