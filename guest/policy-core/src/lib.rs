//! Pure policy logic shared by the sandbox policy components.
//!
//! Everything a policy *decides* lives here, in plain Rust that native unit
//! tests cover: how threads map to backends ([`mapping`]) and the cache and
//! container lifecycle ([`policy`]), over what the policy asks of its host
//! ([`Host`]). The ids, records and error are the contract's
//! (`sandbox-contract`). With the `component` feature, [`export_policy!`]
//! turns a [`Mapping`] into a component of the `sandbox` world, so a
//! shipped policy is one line.
//!
//! ```
//! use policy_core::{mapping::PerUser, Policy};
//! use sandbox_contract::ThreadId;
//! let policy = Policy::new(PerUser);
//! let thread = ThreadId::parse("alice-7f3a").unwrap();
//! assert_eq!(policy.backend_id(&thread).unwrap().as_str(), "alice");
//! ```

#[cfg(feature = "component")]
pub mod component;
pub mod host;
pub mod mapping;
pub mod policy;

#[cfg(test)]
mod fake_host;

pub use host::{Host, Level};
pub use mapping::Mapping;
pub use policy::{Lifecycle, Policy, ThreadDestroy};
