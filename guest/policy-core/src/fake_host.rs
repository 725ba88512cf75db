//! An in-memory [`Host`] for the decision-logic tests.

use std::collections::BTreeMap;

use crate::host::{Container, Error, Host, Level, Result, Status};

#[derive(Debug, Default)]
pub struct FakeHost {
    pub containers: BTreeMap<String, Container>,
    pub workspaces: Vec<String>,
    pub logs: Vec<String>,
    pub created: usize,
    /// Container calls made (workspace and log calls excluded).
    pub calls: usize,
    /// Every container call fails as if the engine were down.
    pub unavailable: bool,
    /// The fake clock, Unix ms.
    pub now: u64,
    pub config: Vec<(String, String)>,
    pub next_id: usize,
}

impl FakeHost {
    pub fn set_status(&mut self, id: &str, status: Status) {
        self.containers.get_mut(id).expect("known container").status = status;
    }

    /// Marks a container used now (the host does this on every execute).
    pub fn touch(&mut self, id: &str) {
        let now = self.now;
        if let Some(c) = self.containers.get_mut(id) {
            c.last_used_ms = now;
        }
    }

    pub fn status_of(&self, id: &str) -> Option<Status> {
        self.containers.get(id).map(|c| c.status)
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
    fn find(&mut self, backend_id: &str) -> Result<Option<Container>> {
        self.call()?;
        Ok(self
            .containers
            .values()
            .find(|c| c.backend_id == backend_id)
            .cloned())
    }

    fn list(&mut self) -> Result<Vec<Container>> {
        self.call()?;
        Ok(self.containers.values().cloned().collect())
    }

    fn create(&mut self, backend_id: &str, workspace: &str) -> Result<Container> {
        self.call()?;
        if let Some(existing) = self
            .containers
            .values()
            .find(|c| c.backend_id == backend_id)
        {
            return Ok(existing.clone());
        }
        self.next_id += 1;
        self.created += 1;
        let c = Container {
            id: format!("c{}", self.next_id),
            name: format!("sbx.test.{backend_id}"),
            backend_id: backend_id.into(),
            workspace: workspace.into(),
            status: Status::Created,
            last_used_ms: self.now,
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
        Ok(self.containers.remove(container_id).is_some())
    }

    fn prepare_workspace(&mut self, name: &str) -> Result<()> {
        if !self.workspaces.iter().any(|w| w == name) {
            self.workspaces.push(name.into());
        }
        Ok(())
    }

    fn now_ms(&mut self) -> u64 {
        self.now
    }

    fn policy_config(&mut self) -> Vec<(String, String)> {
        self.config.clone()
    }

    fn log(&mut self, _level: Level, message: &str) {
        self.logs.push(message.into());
    }
}
