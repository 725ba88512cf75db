//! The cache and the container lifecycle, shared by every shipped policy.
//!
//! The cache is an optimisation only: Docker (through the host's labels) is
//! the source of truth. On a miss the policy adopts the container the host
//! labelled for the backend before creating one, so a host restart, a policy
//! swap or a re-instantiated policy instance creates no duplicate.

use std::collections::BTreeMap;

use crate::host::{Backend, Container, Error, Host, Level, Result, Status};
use crate::ids;
use crate::mapping::Mapping;

/// One cached backend and, once ensured, the id of its container.
#[derive(Debug, Clone)]
struct Entry {
    backend: Backend,
    container_id: Option<String>,
}

/// Lifecycle settings from the deployment's `policy-config`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lifecycle {
    /// Remove a backend's container after this long without use.
    pub idle_ttl_ms: Option<u64>,
    /// At most this many live containers; the least recently used go first.
    pub max_containers: Option<usize>,
}

impl Lifecycle {
    /// Reads `idle_ttl_secs` (fractional allowed) and `max_containers`;
    /// unknown keys and unparsable values are ignored (and logged).
    pub fn from_config(config: &[(String, String)], host: &mut impl Host) -> Self {
        let mut lifecycle = Lifecycle::default();
        for (key, value) in config {
            match key.as_str() {
                "idle_ttl_secs" => match value.parse::<f64>() {
                    Ok(secs) if secs > 0.0 && secs.is_finite() => {
                        lifecycle.idle_ttl_ms = Some((secs * 1000.0) as u64)
                    }
                    _ => host.log(Level::Warn, &format!("ignoring idle_ttl_secs = {value:?}")),
                },
                "max_containers" => match value.parse::<usize>() {
                    Ok(max) if max > 0 => lifecycle.max_containers = Some(max),
                    _ => host.log(Level::Warn, &format!("ignoring max_containers = {value:?}")),
                },
                _ => {}
            }
        }
        lifecycle
    }
}

/// A policy: a mapping plus a cache of backends.
#[derive(Debug, Default)]
pub struct Policy<M> {
    mapping: M,
    backends: BTreeMap<String, Entry>,
    lifecycle: Option<Lifecycle>,
}

impl<M: Mapping> Policy<M> {
    pub fn new(mapping: M) -> Self {
        Policy {
            mapping,
            backends: BTreeMap::new(),
            lifecycle: None,
        }
    }

    pub fn name(&self) -> &'static str {
        M::NAME
    }

    /// The number of cached backends.
    pub fn cached(&self) -> usize {
        self.backends.len()
    }

    /// Pure mapping, no host call.
    pub fn backend_id(&self, thread_id: &str) -> Result<String> {
        Ok(self.mapping.backend(thread_id)?.id)
    }

    /// The seed's `get_thread_backend`: cached, or prepared (workspace) and
    /// cached. Never creates a container.
    pub fn get_thread_backend(&mut self, host: &mut impl Host, thread_id: &str) -> Result<Backend> {
        let backend = self.mapping.backend(thread_id)?;
        if let Some(entry) = self.backends.get(&backend.id) {
            return Ok(entry.backend.clone());
        }
        host.prepare_workspace(&backend.workspace)?;
        self.backends.insert(
            backend.id.clone(),
            Entry {
                backend: backend.clone(),
                container_id: None,
            },
        );
        Ok(backend)
    }

    /// The seed's `_ensure_container`: a running container for the backend.
    pub fn ensure_container(
        &mut self,
        host: &mut impl Host,
        backend_id: &str,
    ) -> Result<Container> {
        let backend = match self.backends.get(backend_id) {
            Some(entry) => entry.backend.clone(),
            None => {
                let backend = self.mapping.backend_from_id(backend_id)?;
                host.prepare_workspace(&backend.workspace)?;
                backend
            }
        };
        let who = self.mapping.describe(&backend);

        let known = match self
            .backends
            .get(backend_id)
            .and_then(|e| e.container_id.clone())
        {
            Some(id) => host.inspect(&id)?,
            None => {
                let adopted = host.find(backend_id)?;
                if let Some(c) = &adopted {
                    host.log(
                        Level::Debug,
                        &format!("Adopted container {} for {who}", c.name),
                    );
                }
                adopted
            }
        };

        let container = match known {
            Some(c) if c.status == Status::Running => c,
            // Never started (a concurrent host may be about to start it): start, don't recreate.
            Some(c) if c.status == Status::Created => {
                self.start_or_recreate(host, &backend, c, &who)?
            }
            Some(c) => {
                host.log(
                    Level::Info,
                    &format!("Container for {who} is {:?}, recreating it", c.status),
                );
                host.remove(&c.id)?;
                self.create_and_start(host, &backend, &who)?
            }
            None => self.create_and_start(host, &backend, &who)?,
        };

        self.backends.insert(
            backend.id.clone(),
            Entry {
                backend,
                container_id: Some(container.id.clone()),
            },
        );
        Ok(container)
    }

    /// Removes every container of the user's backends and forgets them.
    pub fn destroy_user_backend(&mut self, host: &mut impl Host, user_id: &str) -> Result<bool> {
        ids::validate_user(user_id)?;
        let mut targets: Vec<String> = self
            .backends
            .values()
            .filter(|e| e.backend.user_id == user_id)
            .map(|e| e.backend.id.clone())
            .collect();
        match self.mapping.sole_backend_of_user(user_id) {
            Some(id) => targets.push(id),
            None => {
                for c in host.list()? {
                    let owned = self
                        .mapping
                        .backend_from_id(&c.backend_id)
                        .is_ok_and(|b| b.user_id == user_id);
                    if owned {
                        targets.push(c.backend_id);
                    }
                }
            }
        }
        targets.sort();
        targets.dedup();
        let mut destroyed = false;
        for backend_id in targets {
            destroyed |= self.destroy_backend(host, &backend_id)?;
        }
        Ok(destroyed)
    }

    /// The compatibility wrapper: destroys the backend serving the thread
    /// (under the per-user mapping, the whole user's backend).
    pub fn destroy_thread_backend(
        &mut self,
        host: &mut impl Host,
        thread_id: &str,
    ) -> Result<bool> {
        let backend = self.mapping.backend(thread_id)?;
        self.destroy_backend(host, &backend.id)
    }

    fn destroy_backend(&mut self, host: &mut impl Host, backend_id: &str) -> Result<bool> {
        let cached = self.backends.get(backend_id).cloned();
        let container = match cached.as_ref().and_then(|e| e.container_id.clone()) {
            Some(id) => host.inspect(&id)?,
            None => host.find(backend_id)?,
        };
        let removed = match &container {
            Some(c) => host.remove(&c.id)?,
            None => false,
        };
        self.backends.remove(backend_id);
        let was_cached = cached.is_some();
        if removed {
            let backend = match cached {
                Some(e) => e.backend,
                None => self.mapping.backend_from_id(backend_id)?,
            };
            let who = self.mapping.describe(&backend);
            host.log(Level::Info, &format!("Destroyed container for {who}"));
        }
        Ok(removed || was_cached)
    }

    /// The WIT `maintain` export: removes containers idle longer than the
    /// TTL, then the least recently used beyond the capacity. Workspaces are
    /// never touched; a removed backend comes back on its next use.
    pub fn maintain(&mut self, host: &mut impl Host) -> Result<u32> {
        let lifecycle = self.lifecycle(host);
        if lifecycle == Lifecycle::default() {
            return Ok(0);
        }
        let now = host.now_ms();
        let mut live: Vec<Container> = host.list()?;
        let mut removed = 0;
        if let Some(ttl) = lifecycle.idle_ttl_ms {
            for c in live
                .iter()
                .filter(|c| now.saturating_sub(c.last_used_ms) > ttl)
            {
                if host.remove(&c.id)? {
                    removed += 1;
                    self.forget_container(&c.id);
                    let idle = now.saturating_sub(c.last_used_ms) / 1000;
                    host.log(
                        Level::Info,
                        &format!(
                            "Removed idle container of backend {} (idle {idle}s)",
                            c.backend_id
                        ),
                    );
                }
            }
            live.retain(|c| now.saturating_sub(c.last_used_ms) <= ttl);
        }
        if let Some(max) = lifecycle.max_containers {
            removed += self.evict_beyond(host, live, max, None)?;
        }
        Ok(removed)
    }

    fn lifecycle(&mut self, host: &mut impl Host) -> Lifecycle {
        if let Some(l) = self.lifecycle {
            return l;
        }
        let config = host.policy_config();
        let l = Lifecycle::from_config(&config, host);
        self.lifecycle = Some(l);
        l
    }

    /// Removes the least recently used of `live` until at most `max` remain
    /// (`keep` is never chosen).
    fn evict_beyond(
        &mut self,
        host: &mut impl Host,
        mut live: Vec<Container>,
        max: usize,
        keep: Option<&str>,
    ) -> Result<u32> {
        live.retain(|c| Some(c.backend_id.as_str()) != keep);
        live.sort_by_key(|c| c.last_used_ms);
        let mut removed = 0;
        let excess = live.len().saturating_sub(max);
        for c in live.into_iter().take(excess) {
            if host.remove(&c.id)? {
                removed += 1;
                self.forget_container(&c.id);
                host.log(
                    Level::Info,
                    &format!(
                        "Evicted container of backend {} (capacity {max})",
                        c.backend_id
                    ),
                );
            }
        }
        Ok(removed)
    }

    fn forget_container(&mut self, container_id: &str) {
        for entry in self.backends.values_mut() {
            if entry.container_id.as_deref() == Some(container_id) {
                entry.container_id = None;
            }
        }
    }

    fn start_or_recreate(
        &mut self,
        host: &mut impl Host,
        backend: &Backend,
        container: Container,
        who: &str,
    ) -> Result<Container> {
        match host.start(&container.id) {
            Ok(()) => Ok(Container {
                status: Status::Running,
                ..container
            }),
            // Removed between our look and our start: make a new one.
            Err(Error::NotFound(_)) => self.create_and_start(host, backend, who),
            Err(e) => Err(e),
        }
    }

    fn create_and_start(
        &mut self,
        host: &mut impl Host,
        backend: &Backend,
        who: &str,
    ) -> Result<Container> {
        if let Some(max) = self.lifecycle(host).max_containers {
            // Room for the new one: at most max - 1 others may stay.
            let live = host.list()?;
            self.evict_beyond(host, live, max - 1, Some(&backend.id))?;
        }
        let container = host.create(&backend.id, &backend.workspace)?;
        if container.status != Status::Running {
            host.start(&container.id)?;
        }
        host.log(Level::Info, &format!("Created container for {who}"));
        Ok(Container {
            status: Status::Running,
            ..container
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_host::FakeHost;
    use crate::mapping::{PerThread, PerUser};

    #[test]
    fn get_thread_backend_is_lazy_and_prepares_the_workspace() {
        let mut host = FakeHost::default();
        let mut policy = Policy::new(PerUser);
        let b = policy.get_thread_backend(&mut host, "alice-1").unwrap();
        assert_eq!(b.id, "alice");
        assert_eq!(
            host.containers.len(),
            0,
            "no container before the first command"
        );
        assert_eq!(host.workspaces, ["alice"]);
        policy.get_thread_backend(&mut host, "alice-2").unwrap();
        assert_eq!(policy.cached(), 1);
    }

    #[test]
    fn threads_of_one_user_share_one_container() {
        let mut host = FakeHost::default();
        let mut policy = Policy::new(PerUser);
        let a = policy
            .ensure_container(&mut host, &policy.backend_id("alice-1").unwrap())
            .unwrap();
        let b = policy
            .ensure_container(&mut host, &policy.backend_id("alice-2").unwrap())
            .unwrap();
        assert_eq!(a.id, b.id);
        assert_eq!(host.created, 1);
        assert!(host
            .logs
            .contains(&"Created container for user alice".to_string()));
    }

    #[test]
    fn stopped_container_is_recreated() {
        let mut host = FakeHost::default();
        let mut policy = Policy::new(PerUser);
        let a = policy.ensure_container(&mut host, "alice").unwrap();
        host.set_status(&a.id, Status::Exited);
        let b = policy.ensure_container(&mut host, "alice").unwrap();
        assert_ne!(a.id, b.id);
        assert!(
            !host.containers.contains_key(&a.id),
            "the stopped one is removed"
        );
        assert_eq!(b.status, Status::Running);
    }

    #[test]
    fn vanished_container_is_recreated() {
        let mut host = FakeHost::default();
        let mut policy = Policy::new(PerUser);
        let a = policy.ensure_container(&mut host, "alice").unwrap();
        host.containers.remove(&a.id);
        let b = policy.ensure_container(&mut host, "alice").unwrap();
        assert_ne!(a.id, b.id);
        assert_eq!(host.containers.len(), 1);
    }

    #[test]
    fn an_empty_cache_adopts_the_labelled_container() {
        let mut host = FakeHost::default();
        let a = Policy::new(PerUser)
            .ensure_container(&mut host, "alice")
            .unwrap();
        let b = Policy::new(PerUser)
            .ensure_container(&mut host, "alice")
            .unwrap();
        assert_eq!(a.id, b.id);
        assert_eq!(host.created, 1);
    }

    #[test]
    fn a_created_but_unstarted_container_is_started_not_recreated() {
        let mut host = FakeHost::default();
        let c = host.create("alice", "alice").unwrap();
        let got = Policy::new(PerUser)
            .ensure_container(&mut host, "alice")
            .unwrap();
        assert_eq!(got.id, c.id);
        assert_eq!(host.status_of(&c.id), Some(Status::Running));
    }

    #[test]
    fn destroy_returns_true_then_false() {
        let mut host = FakeHost::default();
        let mut policy = Policy::new(PerUser);
        policy.ensure_container(&mut host, "alice").unwrap();
        assert!(policy.destroy_user_backend(&mut host, "alice").unwrap());
        assert!(host.containers.is_empty());
        assert!(host
            .logs
            .contains(&"Destroyed container for user alice".to_string()));
        assert!(!policy.destroy_user_backend(&mut host, "alice").unwrap());
        assert!(!policy.destroy_thread_backend(&mut host, "alice-1").unwrap());
    }

    #[test]
    fn destroy_of_a_lazy_backend_forgets_it() {
        let mut host = FakeHost::default();
        let mut policy = Policy::new(PerUser);
        policy.get_thread_backend(&mut host, "alice-1").unwrap();
        assert!(policy.destroy_thread_backend(&mut host, "alice-9").unwrap());
        assert_eq!(policy.cached(), 0);
    }

    #[test]
    fn destroy_user_finds_containers_another_instance_created() {
        let mut host = FakeHost::default();
        Policy::new(PerThread)
            .ensure_container(&mut host, "alice-1")
            .unwrap();
        Policy::new(PerThread)
            .ensure_container(&mut host, "alice-2")
            .unwrap();
        Policy::new(PerThread)
            .ensure_container(&mut host, "bob-1")
            .unwrap();
        assert!(Policy::new(PerThread)
            .destroy_user_backend(&mut host, "alice")
            .unwrap());
        let left: Vec<_> = host
            .containers
            .values()
            .map(|c| c.backend_id.clone())
            .collect();
        assert_eq!(left, ["bob-1"]);
    }

    #[test]
    fn per_thread_gives_each_thread_its_container() {
        let mut host = FakeHost::default();
        let mut policy = Policy::new(PerThread);
        let a = policy.ensure_container(&mut host, "alice-1").unwrap();
        let b = policy.ensure_container(&mut host, "alice-2").unwrap();
        assert_ne!(a.id, b.id);
        assert_eq!(a.workspace, b.workspace);
        assert!(policy.destroy_thread_backend(&mut host, "alice-1").unwrap());
        assert_eq!(host.containers.len(), 1);
    }

    #[test]
    fn invalid_ids_never_reach_the_host() {
        let mut host = FakeHost::default();
        let mut policy = Policy::new(PerUser);
        for bad in ["../etc", "a/b-1", "", "-x"] {
            assert!(matches!(
                policy.get_thread_backend(&mut host, bad),
                Err(Error::InvalidId(_))
            ));
            assert!(matches!(
                policy.ensure_container(&mut host, bad),
                Err(Error::InvalidId(_))
            ));
            assert!(matches!(
                policy.destroy_user_backend(&mut host, bad),
                Err(Error::InvalidId(_))
            ));
        }
        assert!(host.workspaces.is_empty());
        assert_eq!(host.calls, 0);
    }

    #[test]
    fn idle_containers_are_removed_after_the_ttl_and_come_back() {
        let mut host = FakeHost {
            config: vec![("idle_ttl_secs".into(), "2".into())],
            ..FakeHost::default()
        };
        let mut policy = Policy::new(PerUser);
        let a = policy.ensure_container(&mut host, "alice").unwrap();
        policy.ensure_container(&mut host, "bob").unwrap();
        host.now += 1_500;
        assert_eq!(
            policy.maintain(&mut host).unwrap(),
            0,
            "not idle long enough"
        );
        host.touch(&a.id);
        host.now += 1_000;
        assert_eq!(
            policy.maintain(&mut host).unwrap(),
            1,
            "bob idle 2.5s, alice 1s"
        );
        assert_eq!(host.containers.len(), 1);
        let b = policy.ensure_container(&mut host, "bob").unwrap();
        assert_eq!(b.status, Status::Running, "bob comes back on use");
    }

    #[test]
    fn a_new_backend_beyond_capacity_evicts_the_least_recently_used() {
        let mut host = FakeHost {
            config: vec![("max_containers".into(), "3".into())],
            ..FakeHost::default()
        };
        let mut policy = Policy::new(PerUser);
        for (i, user) in ["u1", "u2", "u3"].iter().enumerate() {
            host.now = 1000 * (i as u64 + 1);
            policy.ensure_container(&mut host, user).unwrap();
        }
        let u1 = host
            .containers
            .values()
            .find(|c| c.backend_id == "u1")
            .unwrap()
            .id
            .clone();
        host.now = 5000;
        host.touch(&u1); // u2 is now the least recently used
        policy.ensure_container(&mut host, "u4").unwrap();
        let mut left: Vec<_> = host
            .containers
            .values()
            .map(|c| c.backend_id.clone())
            .collect();
        left.sort();
        assert_eq!(left, ["u1", "u3", "u4"]);
    }

    #[test]
    fn bad_lifecycle_settings_are_ignored() {
        let mut host = FakeHost {
            config: vec![
                ("idle_ttl_secs".into(), "-1".into()),
                ("max_containers".into(), "x".into()),
            ],
            ..FakeHost::default()
        };
        let mut policy = Policy::new(PerUser);
        policy.ensure_container(&mut host, "alice").unwrap();
        host.now += 1 << 40;
        assert_eq!(policy.maintain(&mut host).unwrap(), 0);
        assert!(host
            .logs
            .iter()
            .any(|l| l.contains("ignoring idle_ttl_secs")));
    }

    #[test]
    fn host_errors_are_passed_through_typed() {
        let mut host = FakeHost {
            unavailable: true,
            ..FakeHost::default()
        };
        let err = Policy::new(PerUser)
            .ensure_container(&mut host, "alice")
            .unwrap_err();
        assert!(matches!(err, Error::DockerUnavailable(_)), "{err:?}");
    }
}
