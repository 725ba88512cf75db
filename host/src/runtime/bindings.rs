//! Host bindings of the `sandbox` world (wit/sandbox.wit).

wasmtime::component::bindgen!({
    world: "sandbox",
    path: "../wit",
    imports: { default: async },
    exports: { default: async },
});
