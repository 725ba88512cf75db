//! Pure policy logic shared by the sandbox policy components.
//!
//! Everything a policy *decides* lives here, in plain Rust that native unit
//! tests cover: the id rules ([`ids`]), how threads map to backends
//! ([`mapping`]), and the cache and container lifecycle ([`policy`]). The
//! components in `guest/per-user` and `guest/per-thread` only adapt the WIT
//! imports to the [`Host`] trait and export a [`Policy`].
//!
//! ```
//! use policy_core::{mapping::PerUser, Policy};
//! let policy = Policy::new(PerUser);
//! assert_eq!(policy.backend_id("alice-7f3a").unwrap(), "alice");
//! ```

pub mod host;
pub mod ids;
pub mod mapping;
pub mod policy;

#[cfg(test)]
mod fake_host;

pub use host::{Backend, Container, Error, Host, Level, Status};
pub use mapping::Mapping;
pub use policy::Policy;
