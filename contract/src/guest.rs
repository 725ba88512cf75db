//! The guest side of the `sandbox` world, for policy components and test
//! fixtures (feature `guest`).
//!
//! - the wit-bindgen bindings of `wit/sandbox.wit`: the imports
//!   ([`sandbox::policy::containers`], [`wasi::config::store`],
//!   [`wasi::logging::logging`]), the `placement` trait to implement
//!   ([`exports::sandbox::policy::placement::Guest`]) and [`export!`], which
//!   works from any crate (`export!(MyPolicy)`);
//! - the one set of conversions between the generated types and this
//!   crate's ([`Error`], [`Status`], [`Container`], [`Removal`]), as `From`
//!   impls, so `?` and `.into()` cross the boundary. A field added to a WIT
//!   record is added here and nowhere else on the guest side.
//!
//! [`export!`]: crate::guest::export

use crate::{Container, Error, Removal, Status};

wit_bindgen::generate!({
    world: "sandbox",
    path: "../wit",
    // The vendored WASI interfaces (wit/deps) too: no WASI bindings crate.
    generate_all,
    // The policies and fixtures export from their own crates: the macro
    // must be public and find these bindings by path.
    pub_export_macro: true,
    default_bindings_module: "sandbox_contract::guest",
});

use sandbox::policy::types as wit;

impl From<wit::Error> for Error {
    fn from(e: wit::Error) -> Self {
        match e {
            wit::Error::InvalidId(m) => Error::InvalidId(m),
            wit::Error::DockerUnavailable(m) => Error::DockerUnavailable(m),
            wit::Error::Refused(m) => Error::Refused(m),
            wit::Error::NotFound(m) => Error::NotFound(m),
            wit::Error::Other(m) => Error::Other(m),
        }
    }
}

impl From<Error> for wit::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidId(m) => wit::Error::InvalidId(m),
            Error::DockerUnavailable(m) => wit::Error::DockerUnavailable(m),
            Error::Refused(m) => wit::Error::Refused(m),
            Error::NotFound(m) => wit::Error::NotFound(m),
            Error::Other(m) => wit::Error::Other(m),
        }
    }
}

impl From<wit::ContainerStatus> for Status {
    fn from(s: wit::ContainerStatus) -> Self {
        match s {
            wit::ContainerStatus::Created => Status::Created,
            wit::ContainerStatus::Running => Status::Running,
            wit::ContainerStatus::Paused => Status::Paused,
            wit::ContainerStatus::Restarting => Status::Restarting,
            wit::ContainerStatus::Removing => Status::Removing,
            wit::ContainerStatus::Exited => Status::Exited,
            wit::ContainerStatus::Dead => Status::Dead,
        }
    }
}

impl From<Status> for wit::ContainerStatus {
    fn from(s: Status) -> Self {
        match s {
            Status::Created => wit::ContainerStatus::Created,
            Status::Running => wit::ContainerStatus::Running,
            Status::Paused => wit::ContainerStatus::Paused,
            Status::Restarting => wit::ContainerStatus::Restarting,
            Status::Removing => wit::ContainerStatus::Removing,
            Status::Exited => wit::ContainerStatus::Exited,
            Status::Dead => wit::ContainerStatus::Dead,
        }
    }
}

impl From<wit::Container> for Container {
    fn from(c: wit::Container) -> Self {
        Container {
            id: c.id,
            name: c.name,
            backend_id: c.backend_id,
            status: c.status.into(),
            last_used_ms: c.last_used_ms,
            in_flight: c.in_flight,
            threads: c.threads,
        }
    }
}

impl From<Container> for wit::Container {
    fn from(c: Container) -> Self {
        wit::Container {
            id: c.id,
            name: c.name,
            backend_id: c.backend_id,
            status: c.status.into(),
            last_used_ms: c.last_used_ms,
            in_flight: c.in_flight,
            threads: c.threads,
        }
    }
}

impl From<wit::Removal> for Removal {
    fn from(r: wit::Removal) -> Self {
        Removal {
            container_id: r.container_id,
            backend_id: r.backend_id,
            reason: r.reason,
        }
    }
}

impl From<Removal> for wit::Removal {
    fn from(r: Removal) -> Self {
        wit::Removal {
            container_id: r.container_id,
            backend_id: r.backend_id,
            reason: r.reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_survives_a_round_trip_through_the_generated_one() {
        for status in Status::ALL {
            let c = Container {
                id: "c1".into(),
                name: "sandbox.ns.alice".into(),
                backend_id: "alice".into(),
                status,
                last_used_ms: 7,
                in_flight: 2,
                threads: 3,
            };
            assert_eq!(Container::from(wit::Container::from(c.clone())), c);
        }
        for e in [
            Error::InvalidId("a".into()),
            Error::DockerUnavailable("b".into()),
            Error::Refused("c".into()),
            Error::NotFound("d".into()),
            Error::Other("e".into()),
        ] {
            assert_eq!(Error::from(wit::Error::from(e.clone())), e);
        }
        let r = Removal {
            container_id: "c1".into(),
            backend_id: "alice".into(),
            reason: "idle 600s".into(),
        };
        assert_eq!(Removal::from(wit::Removal::from(r.clone())), r);
    }
}
