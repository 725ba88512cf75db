//! The vocabulary of the `sandbox` WIT world (`wit/sandbox.wit`), in one
//! place for the host, the shipped policies and the test fixtures.
//!
//! - [`ids`]: the id newtypes, parsed once; a [`BackendId`] knows its
//!   container name and its user, a [`WorkspaceName`] its path.
//! - [`Status`], [`Container`], [`Removal`]: the WIT records, field for
//!   field. With the `host` feature they carry wasmtime's component traits,
//!   so the host's bindings use them directly (bindgen `with:`).
//! - [`Error`]: the WIT `error` variant, the one error type of the contract.
//! - `guest` (feature `guest`): the wit-bindgen bindings of the world for
//!   policy components, and the only conversions between their generated
//!   types and these ones.
//!
//! No dependencies by default; builds for wasm32-wasip2 and natively.
//!
//! ```
//! use sandbox_contract::{BackendId, ThreadId};
//! let thread = ThreadId::parse("alice-7f3a").unwrap();
//! assert_eq!(thread.user().as_str(), "alice");
//! let backend = BackendId::parse("alice").unwrap();
//! assert_eq!(backend.container_name("default"), "sandbox.default.alice");
//! assert_eq!(backend.user().unwrap(), thread.user());
//! ```

#[cfg(feature = "guest")]
pub mod guest;
pub mod ids;
mod types;

pub use ids::{shown, BackendId, ThreadId, UserId, WorkspaceName};
pub use types::{Container, Error, Removal, Result, Status};
