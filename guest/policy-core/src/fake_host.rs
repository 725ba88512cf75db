//! An in-memory [`Host`] for the decision-logic tests.

use std::collections::{BTreeMap, BTreeSet};

use sandbox_contract::{BackendId, Container, Error, Result, Status};

use crate::host::{Host, Level};

#[derive(Debug, Default)]
pub struct FakeHost {
    pub containers: BTreeMap<String, Container>,
    pub logs: Vec<String>,
    pub created: usize,
    /// Container calls made (clock, config and log calls excluded).
    pub calls: usize,
    /// The ids `remove` was called with, in order.
    pub remove_calls: Vec<String>,
    /// Every container call fails as if the engine were down.
    pub unavailable: bool,
    /// Containers whose removal is refused, as the host refuses to remove
    /// a container with work in flight from `maintain`.
    pub refuse: BTreeSet<String>,
    /// The fake clock, Unix ms.
    pub now: u64,
    pub config: Vec<(String, String)>,
    pub next_id: usize,
}

impl FakeHost {
    pub fn with_config(pairs: &[(&str, &str)]) -> Self {
        FakeHost {
            config: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..FakeHost::default()
        }
    }

    fn get_mut(&mut self, id: &str) -> &mut Container {
        self.containers.get_mut(id).expect("known container")
    }

    pub fn set_status(&mut self, id: &str, status: Status) {
        self.get_mut(id).status = status;
    }

    /// What the host records as threads are routed to and released from
    /// the container's backend.
    pub fn set_threads(&mut self, id: &str, threads: u32) {
        self.get_mut(id).threads = threads;
    }

    /// Commands running on the container; the host marks it used now.
    pub fn set_in_flight(&mut self, id: &str, in_flight: u32) {
        let now = self.now;
        let c = self.get_mut(id);
        c.in_flight = in_flight;
        c.last_used_ms = now;
    }

    /// Marks a container used now (the host does this on every command).
    pub fn touch(&mut self, id: &str) {
        let now = self.now;
        self.get_mut(id).last_used_ms = now;
    }

    pub fn status_of(&self, id: &str) -> Option<Status> {
        self.containers.get(id).map(|c| c.status)
    }

    /// The id of the backend's container.
    pub fn id_of(&self, backend: &str) -> String {
        self.containers
            .values()
            .find(|c| c.backend_id == backend)
            .expect("a container for the backend")
            .id
            .clone()
    }

    /// The backends that have a container, sorted.
    pub fn backends(&self) -> Vec<String> {
        let mut all: Vec<_> = self
            .containers
            .values()
            .map(|c| c.backend_id.clone())
            .collect();
        all.sort();
        all
    }

    fn call(&mut self) -> Result<()> {
        self.calls += 1;
        if self.unavailable {
            return Err(Error::DockerUnavailable("engine down".into()));
        }
        Ok(())
    }
}

impl Host for FakeHost {
    fn find(&mut self, backend: &BackendId) -> Result<Option<Container>> {
        self.call()?;
        Ok(self
            .containers
            .values()
            .find(|c| c.backend_id == backend.as_str())
            .cloned())
    }

    fn list(&mut self) -> Result<Vec<Container>> {
        self.call()?;
        Ok(self.containers.values().cloned().collect())
    }

    fn create(&mut self, backend: &BackendId) -> Result<Container> {
        self.call()?;
        if let Some(existing) = self
            .containers
            .values()
            .find(|c| c.backend_id == backend.as_str())
        {
            return Ok(existing.clone());
        }
        self.next_id += 1;
        self.created += 1;
        let c = Container {
            id: format!("c{}", self.next_id),
            name: backend.container_name("test"),
            backend_id: backend.to_string(),
            status: Status::Created,
            last_used_ms: self.now,
            in_flight: 0,
            threads: 0,
        };
        self.containers.insert(c.id.clone(), c.clone());
        Ok(c)
    }

    fn start(&mut self, container_id: &str) -> Result<()> {
        self.call()?;
        match self.containers.get_mut(container_id) {
            Some(c) => {
                c.status = Status::Running;
                Ok(())
            }
            None => Err(Error::NotFound(container_id.into())),
        }
    }

    fn inspect(&mut self, container_id: &str) -> Result<Option<Container>> {
        self.call()?;
        Ok(self.containers.get(container_id).cloned())
    }

    fn remove(&mut self, container_id: &str) -> Result<bool> {
        self.call()?;
        self.remove_calls.push(container_id.into());
        if self.refuse.contains(container_id) {
            return Err(Error::Refused(format!("{container_id} has work in flight")));
        }
        Ok(self.containers.remove(container_id).is_some())
    }

    fn now_ms(&mut self) -> u64 {
        self.now
    }

    fn config(&mut self) -> Vec<(String, String)> {
        self.config.clone()
    }

    fn log(&mut self, _level: Level, message: &str) {
        self.logs.push(message.into());
    }
}
