//! An in-memory provider: containers are map entries and `exec` does nothing.
//! For unit tests of the runtime and for footprint measurements, never for
//! claims about Docker behaviour.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use async_trait::async_trait;

use super::plan::ContainerPlan;
use super::{ContainerProvider, ContainerRecord, ExecIo, ProviderError, ProviderResult, Status};
use crate::dataplane::exec::{ExecOutput, ExecRequest, ExecResponse};

/// A [`ContainerProvider`] keeping containers in a map: creates, starts and
/// removes are instant, an exec in a running container succeeds with no
/// output, stats are zero. Test and measurement use only.
#[derive(Debug, Default)]
pub struct MemoryProvider {
    containers: Mutex<HashMap<String, ContainerRecord>>,
    next_id: AtomicU64,
    /// Containers ever created.
    pub created: AtomicU64,
}

impl MemoryProvider {
    /// A provider with no containers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets a container's status, as if the engine changed it behind our back.
    pub fn set_status(&self, id: &str, status: Status) {
        if let Some(c) = self.containers.lock().unwrap().get_mut(id) {
            c.status = status;
        }
    }

    /// Inserts a container created by someone else (for refusal tests).
    pub fn insert(&self, record: ContainerRecord) {
        self.containers
            .lock()
            .unwrap()
            .insert(record.id.clone(), record);
    }

    /// Containers that exist now (created and not removed).
    pub fn len(&self) -> usize {
        self.containers.lock().unwrap().len()
    }

    /// Whether no container exists.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait]
impl ContainerProvider for MemoryProvider {
    async fn list(&self, labels: &[(&str, &str)]) -> ProviderResult<Vec<ContainerRecord>> {
        let containers = self.containers.lock().unwrap();
        Ok(containers
            .values()
            .filter(|c| {
                labels
                    .iter()
                    .all(|(k, v)| c.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .cloned()
            .collect())
    }

    async fn create(&self, plan: &ContainerPlan) -> ProviderResult<ContainerRecord> {
        let mut containers = self.containers.lock().unwrap();
        if containers.values().any(|c| c.name == plan.name) {
            return Err(ProviderError::Conflict(format!(
                "name {} is in use",
                plan.name
            )));
        }
        let id = format!("mem{:060}", self.next_id.fetch_add(1, Ordering::Relaxed));
        self.created.fetch_add(1, Ordering::Relaxed);
        let record = ContainerRecord {
            id: id.clone(),
            name: plan.name.clone(),
            image: plan.image.clone(),
            labels: plan.labels.clone(),
            status: Status::Created,
            created: Some(0),
        };
        containers.insert(id, record.clone());
        Ok(record)
    }

    async fn start(&self, id: &str) -> ProviderResult<()> {
        match self.containers.lock().unwrap().get_mut(id) {
            Some(c) => {
                c.status = Status::Running;
                Ok(())
            }
            None => Err(ProviderError::NotFound(format!("no such container: {id}"))),
        }
    }

    async fn inspect(&self, id: &str) -> ProviderResult<Option<ContainerRecord>> {
        // Like Docker: an id or a name.
        let containers = self.containers.lock().unwrap();
        Ok(containers
            .get(id)
            .or_else(|| containers.values().find(|c| c.name == id))
            .cloned())
    }

    async fn remove(&self, id: &str) -> ProviderResult<bool> {
        Ok(self.containers.lock().unwrap().remove(id).is_some())
    }

    async fn exec_io(
        &self,
        id: &str,
        request: &ExecRequest,
        _io: ExecIo<'_>,
    ) -> ProviderResult<ExecResponse> {
        match self.containers.lock().unwrap().get(id) {
            Some(c) if c.status == Status::Running => Ok(ExecResponse {
                execution_id: request.marker.clone(),
                ..ExecOutput::new(request.output_limit).finish(0, false)
            }),
            Some(_) => Err(ProviderError::Failed(format!(
                "container {id} is not running"
            ))),
            None => Err(ProviderError::NotFound(format!("no such container: {id}"))),
        }
    }

    async fn stats(&self, _id: &str) -> ProviderResult<super::ContainerStats> {
        Ok(super::ContainerStats::default())
    }

    async fn ping(&self) -> ProviderResult<()> {
        Ok(())
    }
}
