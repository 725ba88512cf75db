//! The cache and the container lifecycle, shared by every shipped policy.
//!
//! The cache is an optimisation only: Docker (through the host's labels) is
//! the source of truth. On a miss the policy adopts the container the host
//! labelled for the backend before creating one, so a host restart, a policy
//! swap or a re-instantiated policy instance creates no duplicate.

use std::collections::BTreeMap;

use sandbox_contract::{
    shown, BackendId, Container, Error, Removal, Result, Status, ThreadId, UserId,
};

use crate::host::{Host, Level};
use crate::mapping::Mapping;

/// What `release-thread` does with the container of the thread's backend
/// (`thread_destroy` in the policy config).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ThreadDestroy {
    /// `"backend"`: remove the backend's container, as `destroy-user` would
    /// (under the per-user mapping, the whole user's container).
    #[default]
    Backend,
    /// `"release"`: remove it only when no thread is left on it
    /// (`threads == 0`); otherwise it stays for the backend's other threads
    /// until the last one is released or it idles out.
    Release,
}

/// Lifecycle settings from the deployment's policy config.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lifecycle {
    /// Remove a backend's container after this long without use.
    pub idle_ttl_ms: Option<u64>,
    /// At most this many live containers; the least recently used go first.
    pub max_containers: Option<usize>,
    pub thread_destroy: ThreadDestroy,
}

impl Lifecycle {
    /// Reads `idle_ttl_secs` (fractional allowed), `max_containers` and
    /// `thread_destroy`; unknown keys are ignored, unusable values are
    /// logged and ignored.
    pub fn from_config(config: &[(String, String)], host: &mut impl Host) -> Self {
        let mut lifecycle = Lifecycle::default();
        let mut ignore = |key: &str, value: &str| {
            host.log(Level::Warn, &format!("ignoring {key} = {}", shown(value)))
        };
        for (key, value) in config {
            match key.as_str() {
                "idle_ttl_secs" => match value.parse::<f64>() {
                    Ok(secs) if secs > 0.0 && secs.is_finite() => {
                        lifecycle.idle_ttl_ms = Some((secs * 1000.0) as u64)
                    }
                    _ => ignore(key, value),
                },
                "max_containers" => match value.parse::<usize>() {
                    Ok(max) if max > 0 => lifecycle.max_containers = Some(max),
                    _ => ignore(key, value),
                },
                "thread_destroy" => match value.as_str() {
                    "backend" => lifecycle.thread_destroy = ThreadDestroy::Backend,
                    "release" => lifecycle.thread_destroy = ThreadDestroy::Release,
                    _ => ignore(key, value),
                },
                _ => {}
            }
        }
        lifecycle
    }
}

/// Which of the operator's profiles each user's backends get, from the
/// policy config: `profile` names the profile of every user not listed,
/// and `profile.NAME = "alice,carol"` lists the users of profile NAME
/// ("trusted users get pypi, others get nothing"). Without either, every
/// backend gets `default` (the host's top-level settings). The host checks
/// every name against the profiles the operator defined. A user listed
/// under two profiles gets neither: their calls fail, naming both, rather
/// than the policy guessing which the operator meant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Profiles {
    pub fallback: Option<String>,
    pub by_user: BTreeMap<String, String>,
    /// Users listed under two profiles, with both names.
    pub conflicts: BTreeMap<String, (String, String)>,
}

impl Profiles {
    /// The host's name for the top-level settings.
    pub const DEFAULT: &'static str = "default";

    pub fn from_config(config: &[(String, String)], host: &mut impl Host) -> Self {
        let mut profiles = Profiles::default();
        for (key, value) in config {
            if key == "profile" {
                profiles.fallback = Some(value.trim().to_owned());
            } else if let Some(name) = key.strip_prefix("profile.") {
                for user in value.split(',').map(str::trim).filter(|u| !u.is_empty()) {
                    if let Some(other) = profiles.by_user.insert(user.to_owned(), name.to_owned()) {
                        host.log(
                            Level::Error,
                            &format!(
                                "user {} is listed in profile.{} and profile.{}: their calls fail until one goes",
                                shown(user),
                                shown(&other),
                                shown(name)
                            ),
                        );
                        profiles
                            .conflicts
                            .insert(user.to_owned(), (other, name.to_owned()));
                    }
                }
            }
        }
        profiles
    }

    /// The profile of `user`'s backends.
    pub fn of(&self, user: &UserId) -> Result<&str> {
        if let Some((a, b)) = self.conflicts.get(user.as_str()) {
            return Err(Error::Refused(format!(
                "user {user} is listed in profile.{} and profile.{} of the policy config",
                shown(a),
                shown(b)
            )));
        }
        Ok(self
            .by_user
            .get(user.as_str())
            .or(self.fallback.as_ref())
            .map(String::as_str)
            .unwrap_or(Self::DEFAULT))
    }
}

/// A policy: a mapping plus a cache of the containers it ensured.
#[derive(Debug, Default)]
pub struct Policy<M> {
    mapping: M,
    /// The container last ensured for each backend.
    containers: BTreeMap<BackendId, String>,
    /// Read from the host's config on first use: fixed for an instance.
    lifecycle: Option<Lifecycle>,
    /// Likewise.
    profiles: Option<Profiles>,
}

impl<M: Mapping> Policy<M> {
    pub fn new(mapping: M) -> Self {
        Policy {
            mapping,
            containers: BTreeMap::new(),
            lifecycle: None,
            profiles: None,
        }
    }

    pub fn name(&self) -> &'static str {
        M::NAME
    }

    /// The number of backends with a cached container.
    pub fn cached(&self) -> usize {
        self.containers.len()
    }

    /// WIT `backend-id`: the pure mapping, no host call.
    pub fn backend_id(&self, thread: &ThreadId) -> Result<BackendId> {
        self.mapping.backend(thread)
    }

    /// WIT `profile`: the profile of the backend's user (see [`Profiles`]);
    /// pure, reads only the config.
    pub fn profile(&mut self, host: &mut impl Host, backend: &BackendId) -> Result<String> {
        let user = backend.user()?;
        if self.profiles.is_none() {
            let config = host.config();
            self.profiles = Some(Profiles::from_config(&config, host));
        }
        match &self.profiles {
            Some(p) => p.of(&user).map(str::to_owned),
            None => Ok(Profiles::DEFAULT.to_owned()),
        }
    }

    /// WIT `ensure-container`: a running container for the backend, adopted
    /// when the host already labelled one, started when it was only
    /// created, re-created when it stopped or vanished.
    pub fn ensure_container(
        &mut self,
        host: &mut impl Host,
        backend: &BackendId,
    ) -> Result<Container> {
        if !self.mapping.produces(backend) {
            return Err(Error::InvalidId(format!(
                "backend id {} is not one the {} policy answers",
                shown(backend.as_str()),
                M::NAME
            )));
        }
        let who = self.mapping.describe(backend);
        let container = match self.lookup(host, backend, &who)? {
            Some(c) if c.status == Status::Running => c,
            // Never started (a concurrent host may be about to start it): start, don't recreate.
            Some(c) if c.status == Status::Created => {
                self.start_or_recreate(host, backend, c, &who)?
            }
            Some(c) => {
                host.log(
                    Level::Info,
                    &format!("Container for {who} is {}, recreating it", c.status),
                );
                host.remove(&c.id)?;
                self.create_and_start(host, backend, &who)?
            }
            None => self.create_and_start(host, backend, &who)?,
        };
        self.containers
            .insert(backend.clone(), container.id.clone());
        Ok(container)
    }

    /// WIT `release-thread`: by default destroys the thread's backend; with
    /// `thread_destroy = "release"` only when no thread is left on it (the
    /// host has already dropped this one from `threads`).
    pub fn release_thread(&mut self, host: &mut impl Host, thread: &ThreadId) -> Result<bool> {
        let backend = self.mapping.backend(thread)?;
        match self.lifecycle(host).thread_destroy {
            ThreadDestroy::Backend => self.destroy_backend(host, &backend),
            ThreadDestroy::Release => {
                let who = self.mapping.describe(&backend);
                match self.lookup(host, &backend, &who)? {
                    Some(c) if c.threads > 0 => {
                        host.log(
                            Level::Debug,
                            &format!(
                                "Kept container for {who}: {} thread(s) still use it",
                                c.threads
                            ),
                        );
                        Ok(false)
                    }
                    Some(c) => self.remove_backend_container(host, &backend, &c, &who),
                    None => {
                        self.containers.remove(&backend);
                        Ok(false)
                    }
                }
            }
        }
    }

    /// WIT `destroy-user`: removes the containers of every backend of the
    /// user and forgets them; false when there was none.
    pub fn destroy_user(&mut self, host: &mut impl Host, user: &UserId) -> Result<bool> {
        let of_user = |b: &BackendId| b.user().ok().as_ref() == Some(user);
        let mut targets: Vec<BackendId> = self
            .containers
            .keys()
            .filter(|b| of_user(b))
            .cloned()
            .collect();
        match self.mapping.sole_backend_of_user(user) {
            Some(backend) => targets.push(backend),
            None => {
                for c in host.list()? {
                    if let Ok(b) = BackendId::parse(&c.backend_id) {
                        if of_user(&b) && self.mapping.produces(&b) {
                            targets.push(b);
                        }
                    }
                }
            }
        }
        targets.sort();
        targets.dedup();
        let mut destroyed = false;
        for backend in targets {
            destroyed |= self.destroy_backend(host, &backend)?;
        }
        Ok(destroyed)
    }

    /// WIT `maintain`: removes the containers idle longer than the TTL, then
    /// the least recently used beyond the capacity, never one with work in
    /// flight. With `dry_run` it removes nothing and returns that plan;
    /// otherwise it returns the removals done (a removal the host refuses
    /// is skipped). Workspaces are never touched; a removed backend comes
    /// back on its next use.
    pub fn maintain(&mut self, host: &mut impl Host, dry_run: bool) -> Result<Vec<Removal>> {
        let plan = self.plan(host)?;
        if dry_run {
            return Ok(plan);
        }
        let mut done = Vec::with_capacity(plan.len());
        for removal in plan {
            if self.execute(host, &removal)? {
                done.push(removal);
            }
        }
        Ok(done)
    }

    fn plan(&mut self, host: &mut impl Host) -> Result<Vec<Removal>> {
        let lifecycle = self.lifecycle(host);
        if lifecycle.idle_ttl_ms.is_none() && lifecycle.max_containers.is_none() {
            return Ok(Vec::new());
        }
        let now = host.now_ms();
        let mut live = host.list()?;
        let mut plan = Vec::new();
        if let Some(ttl) = lifecycle.idle_ttl_ms {
            let idle_for = |c: &Container| now.saturating_sub(c.last_used_ms);
            let (idle, busy_or_recent): (Vec<_>, Vec<_>) = live
                .into_iter()
                .partition(|c| c.in_flight == 0 && idle_for(c) > ttl);
            plan.extend(
                idle.iter()
                    .map(|c| removal(c, format!("idle {}s", idle_for(c) / 1000))),
            );
            live = busy_or_recent;
        }
        if let Some(max) = lifecycle.max_containers {
            plan.extend(evictions(live, max, None));
        }
        Ok(plan)
    }

    /// Carries out one planned removal: whether the container was removed.
    fn execute(&mut self, host: &mut impl Host, removal: &Removal) -> Result<bool> {
        match host.remove(&removal.container_id) {
            Ok(removed) => {
                self.forget_container(&removal.container_id);
                if removed {
                    host.log(
                        Level::Info,
                        &format!(
                            "Removed container of backend {} ({})",
                            removal.backend_id, removal.reason
                        ),
                    );
                }
                Ok(removed)
            }
            // Work started on it since the policy looked: it stays.
            Err(Error::Refused(why)) => {
                host.log(
                    Level::Warn,
                    &format!(
                        "Kept container of backend {} ({}): the host refused to remove it: {why}",
                        removal.backend_id, removal.reason
                    ),
                );
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    fn lifecycle(&mut self, host: &mut impl Host) -> Lifecycle {
        if let Some(l) = self.lifecycle {
            return l;
        }
        let config = host.config();
        let l = Lifecycle::from_config(&config, host);
        self.lifecycle = Some(l);
        l
    }

    /// The backend's container: the cached one if it still exists, else the
    /// one the host labelled for the backend (adoption).
    fn lookup(
        &mut self,
        host: &mut impl Host,
        backend: &BackendId,
        who: &str,
    ) -> Result<Option<Container>> {
        if let Some(id) = self.containers.get(backend).cloned() {
            if let Some(c) = host.inspect(&id)? {
                return Ok(Some(c));
            }
        }
        let found = host.find(backend)?;
        if let Some(c) = &found {
            host.log(
                Level::Debug,
                &format!("Adopted container {} for {who}", c.name),
            );
        }
        Ok(found)
    }

    fn destroy_backend(&mut self, host: &mut impl Host, backend: &BackendId) -> Result<bool> {
        let who = self.mapping.describe(backend);
        match self.lookup(host, backend, &who)? {
            Some(c) => self.remove_backend_container(host, backend, &c, &who),
            None => {
                self.containers.remove(backend);
                Ok(false)
            }
        }
    }

    fn remove_backend_container(
        &mut self,
        host: &mut impl Host,
        backend: &BackendId,
        container: &Container,
        who: &str,
    ) -> Result<bool> {
        let removed = host.remove(&container.id)?;
        self.containers.remove(backend);
        if removed {
            host.log(Level::Info, &format!("Destroyed container for {who}"));
        }
        Ok(removed)
    }

    fn forget_container(&mut self, container_id: &str) {
        self.containers.retain(|_, id| id != container_id);
    }

    fn start_or_recreate(
        &mut self,
        host: &mut impl Host,
        backend: &BackendId,
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
        backend: &BackendId,
        who: &str,
    ) -> Result<Container> {
        if let Some(max) = self.lifecycle(host).max_containers {
            let live = host.list()?;
            for eviction in evictions(live, max, Some(backend)) {
                self.execute(host, &eviction)?;
            }
        }
        let container = host.create(backend)?;
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

/// The least recently used of `live` beyond the capacity `max`; when
/// `making_room_for` a new container of that backend, beyond `max - 1`
/// others. Busy containers count towards the capacity but are never chosen.
fn evictions(
    mut live: Vec<Container>,
    max: usize,
    making_room_for: Option<&BackendId>,
) -> Vec<Removal> {
    let mut room = max;
    if let Some(new) = making_room_for {
        live.retain(|c| c.backend_id != new.as_str());
        room -= 1;
    }
    let excess = live.len().saturating_sub(room);
    live.retain(|c| c.in_flight == 0);
    live.sort_by_key(|c| c.last_used_ms);
    live.iter()
        .take(excess)
        .map(|c| removal(c, format!("capacity {max}")))
        .collect()
}

fn removal(c: &Container, reason: String) -> Removal {
    Removal {
        container_id: c.id.clone(),
        backend_id: c.backend_id.clone(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_host::FakeHost;
    use crate::mapping::{PerThread, PerUser};

    fn backend(b: &str) -> BackendId {
        BackendId::parse(b).unwrap()
    }

    fn thread(t: &str) -> ThreadId {
        ThreadId::parse(t).unwrap()
    }

    fn user(u: &str) -> UserId {
        UserId::parse(u).unwrap()
    }

    #[test]
    fn profiles_follow_the_config_and_default_to_default() {
        let mut host = FakeHost::default();
        let mut p = Policy::new(PerUser);
        assert_eq!(p.profile(&mut host, &backend("alice")).unwrap(), "default");
        let mut host = FakeHost::with_config(&[
            ("profile", "offline"),
            ("profile.trusted", "alice, carol"),
            ("profile.ops", "dave"),
        ]);
        let mut p = Policy::new(PerUser);
        assert_eq!(p.profile(&mut host, &backend("alice")).unwrap(), "trusted");
        assert_eq!(p.profile(&mut host, &backend("carol")).unwrap(), "trusted");
        assert_eq!(p.profile(&mut host, &backend("dave")).unwrap(), "ops");
        assert_eq!(p.profile(&mut host, &backend("bob")).unwrap(), "offline");
        let mut p = Policy::new(PerThread);
        assert_eq!(
            p.profile(&mut host, &backend("alice-7f3a")).unwrap(),
            "trusted",
            "every backend of a user"
        );
        let mut host =
            FakeHost::with_config(&[("profile.open", "alice"), ("profile.closed", "bob,alice")]);
        let mut p = Policy::new(PerUser);
        let err = p.profile(&mut host, &backend("alice")).unwrap_err();
        assert!(
            err.to_string()
                .contains(r#"profile."open" and profile."closed""#),
            "{err}"
        );
        assert_eq!(p.profile(&mut host, &backend("bob")).unwrap(), "closed");
    }

    #[test]
    fn threads_of_one_user_share_one_container() {
        let mut host = FakeHost::default();
        let mut policy = Policy::new(PerUser);
        let first = policy.backend_id(&thread("alice-1")).unwrap();
        let second = policy.backend_id(&thread("alice-2")).unwrap();
        let a = policy.ensure_container(&mut host, &first).unwrap();
        let b = policy.ensure_container(&mut host, &second).unwrap();
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
        let a = policy
            .ensure_container(&mut host, &backend("alice"))
            .unwrap();
        host.set_status(&a.id, Status::Exited);
        let b = policy
            .ensure_container(&mut host, &backend("alice"))
            .unwrap();
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
        let a = policy
            .ensure_container(&mut host, &backend("alice"))
            .unwrap();
        host.containers.remove(&a.id);
        let b = policy
            .ensure_container(&mut host, &backend("alice"))
            .unwrap();
        assert_ne!(a.id, b.id);
        assert_eq!(host.containers.len(), 1);
    }

    #[test]
    fn an_empty_cache_adopts_the_labelled_container() {
        let mut host = FakeHost::default();
        let a = Policy::new(PerUser)
            .ensure_container(&mut host, &backend("alice"))
            .unwrap();
        let b = Policy::new(PerUser)
            .ensure_container(&mut host, &backend("alice"))
            .unwrap();
        assert_eq!(a.id, b.id);
        assert_eq!(host.created, 1);
    }

    #[test]
    fn a_created_but_unstarted_container_is_started_not_recreated() {
        let mut host = FakeHost::default();
        let c = host.create(&backend("alice")).unwrap();
        let got = Policy::new(PerUser)
            .ensure_container(&mut host, &backend("alice"))
            .unwrap();
        assert_eq!(got.id, c.id);
        assert_eq!(host.status_of(&c.id), Some(Status::Running));
    }

    #[test]
    fn destroy_user_returns_true_then_false() {
        let mut host = FakeHost::default();
        let mut policy = Policy::new(PerUser);
        policy
            .ensure_container(&mut host, &backend("alice"))
            .unwrap();
        assert!(policy.destroy_user(&mut host, &user("alice")).unwrap());
        assert!(host.containers.is_empty());
        assert_eq!(policy.cached(), 0);
        assert!(host
            .logs
            .contains(&"Destroyed container for user alice".to_string()));
        assert!(!policy.destroy_user(&mut host, &user("alice")).unwrap());
        assert!(!policy
            .release_thread(&mut host, &thread("alice-1"))
            .unwrap());
    }

    #[test]
    fn destroy_user_finds_containers_another_instance_created() {
        let mut host = FakeHost::default();
        for b in ["alice-1", "alice-2", "bob-1"] {
            Policy::new(PerThread)
                .ensure_container(&mut host, &backend(b))
                .unwrap();
        }
        assert!(Policy::new(PerThread)
            .destroy_user(&mut host, &user("alice"))
            .unwrap());
        assert_eq!(host.backends(), ["bob-1"]);
    }

    #[test]
    fn per_thread_gives_each_thread_its_container() {
        let mut host = FakeHost::default();
        let mut policy = Policy::new(PerThread);
        let a = policy
            .ensure_container(&mut host, &backend("alice-1"))
            .unwrap();
        let b = policy
            .ensure_container(&mut host, &backend("alice-2"))
            .unwrap();
        assert_ne!(a.id, b.id);
        assert!(policy
            .release_thread(&mut host, &thread("alice-1"))
            .unwrap());
        assert_eq!(host.backends(), ["alice-2"]);
    }

    #[test]
    fn a_backend_the_mapping_never_answers_never_reaches_the_host() {
        let mut host = FakeHost::default();
        // Valid backend ids, but never an answer of these mappings.
        for foreign in ["alice-1", "Alice"] {
            assert!(matches!(
                Policy::new(PerUser).ensure_container(&mut host, &backend(foreign)),
                Err(Error::InvalidId(_))
            ));
        }
        assert!(matches!(
            Policy::new(PerThread).ensure_container(&mut host, &backend("Alice-1")),
            Err(Error::InvalidId(_))
        ));
        assert_eq!(host.calls, 0);
    }

    #[test]
    fn releasing_a_thread_destroys_its_backend_by_default() {
        let mut host = FakeHost::default();
        let mut policy = Policy::new(PerUser);
        let c = policy
            .ensure_container(&mut host, &backend("alice"))
            .unwrap();
        // alice-2 still uses the container: the documented behaviour
        // removes it anyway, since the backend is the whole user's.
        host.set_threads(&c.id, 1);
        assert!(policy
            .release_thread(&mut host, &thread("alice-1"))
            .unwrap());
        assert!(host.containers.is_empty());
        assert_eq!(policy.cached(), 0);
    }

    #[test]
    fn with_thread_destroy_release_the_container_stays_until_its_last_thread_is_released() {
        let mut host = FakeHost::with_config(&[("thread_destroy", "release")]);
        let mut policy = Policy::new(PerUser);
        let c = policy
            .ensure_container(&mut host, &backend("alice"))
            .unwrap();
        // The host dropped alice-1 from `threads`; alice-2 remains.
        host.set_threads(&c.id, 1);
        assert!(!policy
            .release_thread(&mut host, &thread("alice-1"))
            .unwrap());
        assert_eq!(host.status_of(&c.id), Some(Status::Running));
        assert!(host.remove_calls.is_empty());
        // Then alice-2 is released too.
        host.set_threads(&c.id, 0);
        assert!(policy
            .release_thread(&mut host, &thread("alice-2"))
            .unwrap());
        assert!(host.containers.is_empty());
        assert!(!policy
            .release_thread(&mut host, &thread("alice-3"))
            .unwrap());
    }

    #[test]
    fn idle_containers_are_removed_after_the_ttl_and_come_back() {
        let mut host = FakeHost::with_config(&[("idle_ttl_secs", "2")]);
        let mut policy = Policy::new(PerUser);
        let a = policy
            .ensure_container(&mut host, &backend("alice"))
            .unwrap();
        let b = policy.ensure_container(&mut host, &backend("bob")).unwrap();
        host.now += 1_500;
        assert_eq!(
            policy.maintain(&mut host, false).unwrap(),
            [],
            "not idle long enough"
        );
        host.touch(&a.id);
        host.now += 1_000;
        let removed = policy.maintain(&mut host, false).unwrap();
        assert_eq!(
            removed,
            [Removal {
                container_id: b.id,
                backend_id: "bob".into(),
                reason: "idle 2s".into(),
            }],
            "bob idle 2.5s, alice 1s"
        );
        assert_eq!(host.backends(), ["alice"]);
        let b = policy.ensure_container(&mut host, &backend("bob")).unwrap();
        assert_eq!(b.status, Status::Running, "bob comes back on use");
    }

    #[test]
    fn a_new_backend_beyond_capacity_evicts_the_least_recently_used() {
        let mut host = FakeHost::with_config(&[("max_containers", "3")]);
        let mut policy = Policy::new(PerUser);
        for (i, u) in ["u1", "u2", "u3"].iter().enumerate() {
            host.now = 1000 * (i as u64 + 1);
            policy.ensure_container(&mut host, &backend(u)).unwrap();
        }
        host.now = 5000;
        host.touch(&host.id_of("u1")); // u2 is now the least recently used
        policy.ensure_container(&mut host, &backend("u4")).unwrap();
        assert_eq!(host.backends(), ["u1", "u3", "u4"]);
        assert!(host
            .logs
            .iter()
            .any(|l| l == "Removed container of backend u2 (capacity 3)"));
    }

    #[test]
    fn a_dry_run_removes_nothing_and_returns_the_plan_a_real_run_executes() {
        let mut host = FakeHost::with_config(&[("idle_ttl_secs", "10"), ("max_containers", "2")]);
        // u1 and u2 go idle, u3 to u5 stay fresh; the capacity then takes u3.
        for (i, u) in ["u1", "u2", "u3", "u4", "u5"].iter().enumerate() {
            host.now = 1000 * i as u64;
            host.create(&backend(u)).unwrap();
        }
        host.now = 13_000;
        for u in ["u3", "u4", "u5"] {
            host.now += 100;
            host.touch(&host.id_of(u));
        }
        let mut policy = Policy::new(PerUser);
        let plan = policy.maintain(&mut host, true).unwrap();
        let shown: Vec<_> = plan
            .iter()
            .map(|r| format!("{} {}", r.backend_id, r.reason))
            .collect();
        assert_eq!(shown, ["u1 idle 13s", "u2 idle 12s", "u3 capacity 2"]);
        assert!(host.remove_calls.is_empty(), "a dry run calls no remove");
        assert_eq!(host.containers.len(), 5);

        let done = policy.maintain(&mut host, false).unwrap();
        assert_eq!(done, plan);
        assert_eq!(host.backends(), ["u4", "u5"]);
    }

    #[test]
    fn a_busy_container_is_neither_idle_nor_evicted() {
        // alice's command has run since t = 0; bob was last used at t = 10 ms.
        let setup = |config: &[(&str, &str)]| {
            let mut host = FakeHost::with_config(config);
            let alice = host.create(&backend("alice")).unwrap().id;
            host.set_in_flight(&alice, 1);
            host.now = 10;
            let bob = host.create(&backend("bob")).unwrap().id;
            host.now = 60_000;
            (host, bob)
        };

        let (mut host, bob) = setup(&[("idle_ttl_secs", "1")]);
        let done = Policy::new(PerUser).maintain(&mut host, false).unwrap();
        assert_eq!(done.len(), 1, "{done:?}");
        assert_eq!(done[0].container_id, bob, "only bob is idle");
        assert_eq!(host.backends(), ["alice"]);

        // Over capacity, the least recently used is alice, but she is busy:
        // bob goes instead.
        let (mut host, bob) = setup(&[("max_containers", "1")]);
        let done = Policy::new(PerUser).maintain(&mut host, false).unwrap();
        assert_eq!(done.len(), 1, "{done:?}");
        assert_eq!(done[0].container_id, bob);
        assert_eq!(done[0].reason, "capacity 1");
        assert_eq!(host.backends(), ["alice"]);
        assert_eq!(host.remove_calls, [bob], "alice was never even asked for");
    }

    #[test]
    fn a_refused_removal_is_skipped_logged_and_not_counted() {
        let mut host = FakeHost::with_config(&[("idle_ttl_secs", "1")]);
        let mut policy = Policy::new(PerUser);
        let a = policy
            .ensure_container(&mut host, &backend("alice"))
            .unwrap();
        let b = policy.ensure_container(&mut host, &backend("bob")).unwrap();
        host.now += 5_000;
        // Work started on alice's container after the policy listed it.
        host.refuse.insert(a.id.clone());
        let done = policy.maintain(&mut host, false).unwrap();
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].container_id, b.id);
        assert_eq!(host.backends(), ["alice"]);
        assert!(host
            .logs
            .iter()
            .any(|l| l.starts_with("Kept container of backend alice (idle 5s)")));
    }

    #[test]
    fn bad_lifecycle_settings_are_ignored() {
        let mut host = FakeHost::with_config(&[
            ("idle_ttl_secs", "-1"),
            ("max_containers", "x"),
            ("thread_destroy", "sometimes"),
        ]);
        let mut policy = Policy::new(PerUser);
        let c = policy
            .ensure_container(&mut host, &backend("alice"))
            .unwrap();
        host.now += 1 << 40;
        assert_eq!(policy.maintain(&mut host, false).unwrap(), []);
        for key in ["idle_ttl_secs", "max_containers", "thread_destroy"] {
            assert!(
                host.logs
                    .iter()
                    .any(|l| l.starts_with(&format!("ignoring {key}"))),
                "{key}: {:?}",
                host.logs
            );
        }
        // thread_destroy fell back to "backend".
        host.set_threads(&c.id, 3);
        assert!(policy
            .release_thread(&mut host, &thread("alice-1"))
            .unwrap());
    }

    #[test]
    fn host_errors_are_passed_through_typed() {
        let mut host = FakeHost {
            unavailable: true,
            ..FakeHost::default()
        };
        let mut policy = Policy::new(PerUser);
        let err = policy
            .ensure_container(&mut host, &backend("alice"))
            .unwrap_err();
        assert!(matches!(err, Error::DockerUnavailable(_)), "{err:?}");
        let err = policy.destroy_user(&mut host, &user("alice")).unwrap_err();
        assert!(matches!(err, Error::DockerUnavailable(_)), "{err:?}");
    }
}
