//! Housekeeping over a sandbox's containers: the policy's `maintain` (idle
//! time, capacity), run periodically and by `gc`, and `gc`'s own rules for
//! containers no backend owns any more. Nothing here removes a container
//! with work in flight: the engine refuses it ([`RemoveMode::UnlessBusy`]).
//!
//! What `maintain` says it removed is checked against the engine (a list
//! before and after): only removals that happened are reported, and a
//! container it claimed but left still gets the host's own orphan check.
//! gc leaves the containers of a policy this process never ran (told by
//! their digest label) alone unless told otherwise
//! ([`GcOptions::other_policies`]): a CLI run without the server's
//! `--policy` must not collect the server's containers, nor apply its own
//! policy's idle and capacity rules to them. Containers of a policy this
//! process swapped out are its own leftovers, and go.

use std::time::Duration;

use sandbox_contract::{BackendId, Removal, Status};

use super::Sandbox;
use crate::engine::clock::now_ms;
use crate::engine::ownership::PolicyMark;
use crate::engine::{ManagedContainer, RemoveMode};
use crate::error::{Result, SandboxError};

/// One container `gc` found (or, in a dry run, would remove).
#[derive(Debug, Clone, serde::Serialize)]
#[cfg_attr(feature = "serve", derive(schemars::JsonSchema))]
pub struct GcEntry {
    /// The container, as it was found.
    pub container: ManagedContainer,
    /// Why it goes (the policy's reasons start with `policy:`).
    pub reason: String,
    /// False on a dry run, and when the removal was deferred.
    pub removed: bool,
}

/// What a gc may collect beyond the policy's own decisions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcOptions {
    /// Also collect containers created longer ago than this.
    pub max_age: Option<Duration>,
    /// Only tell what would be removed.
    pub dry_run: bool,
    /// Also collect the containers of a policy this process never ran
    /// (another component digest; another name on containers of older
    /// hosts, which carry no digest), and let the running policy's
    /// `maintain` see them. Off, they are left alone but for the host's
    /// orphan rules (stopped, dead, a backend label no backend can have,
    /// an outdated agent).
    pub other_policies: bool,
    /// Also replace (remove while idle) the containers whose plan is not
    /// this process's (see [`ManagedContainer::outdated`]). Off by default:
    /// a process started with other settings than the service (a root
    /// shell's default sandbox user, another config file) must not remove
    /// the service's containers; the service's own maintenance replaces
    /// them.
    pub replace_outdated: bool,
}

/// What a gc did (or, in a dry run, would do).
#[derive(Debug, Clone, Default)]
pub struct GcReport {
    /// The containers removed (or that would be), and deferred ones.
    pub entries: Vec<GcEntry>,
    /// Containers of a policy this process never ran, left alone (see
    /// [`GcOptions::other_policies`]).
    pub other_policies: Vec<ManagedContainer>,
    /// Containers of host processes with another workspace root, left
    /// alone (their work in flight is recorded there).
    pub elsewhere: Vec<ManagedContainer>,
    /// Outdated containers left in place (without
    /// [`GcOptions::replace_outdated`]), each with why.
    pub outdated: Vec<ManagedContainer>,
    /// Removals `maintain` claimed that the engine does not show: the
    /// container is still there, or was never there.
    pub unconfirmed: Vec<Removal>,
}

/// A `maintain` run, checked against the engine.
struct Maintained {
    /// The containers listed before it ran.
    before: Vec<ManagedContainer>,
    /// The containers listed after it ran (`before` on a dry run).
    after: Vec<ManagedContainer>,
    /// Its removals that happened (on a dry run, its plan's removals of
    /// containers that exist), with the container as it was.
    done: Vec<(Removal, ManagedContainer)>,
    /// Its claims the engine does not confirm.
    unconfirmed: Vec<Removal>,
}

impl Sandbox {
    /// Runs the policy's `maintain` now: the removals it made (idle time,
    /// capacity), as the engine confirms them (a claimed removal of a
    /// container still there is not one), or with `dry_run` the ones it
    /// would make.
    pub async fn maintain(&self, dry_run: bool) -> Result<Vec<Removal>> {
        if dry_run {
            return self.inner.policy.maintain(true).await;
        }
        let checked = self.maintain_checked(false).await?;
        Ok(checked.done.into_iter().map(|(r, _)| r).collect())
    }

    /// `maintain`, between two lists of the engine's containers.
    async fn maintain_checked(&self, dry_run: bool) -> Result<Maintained> {
        let before = self.list().await?;
        let claimed = self.inner.policy.maintain(dry_run).await?;
        let after = if dry_run {
            before.clone()
        } else {
            self.list().await?
        };
        let is = |c: &ManagedContainer, id: &str| c.id == id || c.name == id;
        let mut done = Vec::new();
        let mut unconfirmed = Vec::new();
        for removal in claimed {
            if removal.container_id.is_empty() {
                // The note that the plan was cut ("... and N more").
                continue;
            }
            let was = before.iter().find(|c| is(c, &removal.container_id));
            let gone = !after.iter().any(|c| is(c, &removal.container_id));
            match was {
                Some(container) if gone || dry_run => {
                    if !done
                        .iter()
                        .any(|(_, c): &(Removal, ManagedContainer)| c.id == container.id)
                    {
                        done.push((removal, container.clone()));
                    }
                }
                _ => {
                    tracing::warn!(
                        container = %sandbox_contract::shown(&removal.container_id),
                        still_there = was.is_some(),
                        "the policy claimed a removal the engine does not show"
                    );
                    unconfirmed.push(removal);
                }
            }
        }
        Ok(Maintained {
            before,
            after,
            done,
            unconfirmed,
        })
    }

    /// Finds (and unless `dry_run`, removes) what should go: the policy's
    /// idle and capacity decisions, then managed containers no backend owns
    /// any more (stopped or dead ones, ones whose backend label is not a
    /// backend id, and with `max_age` ones created longer ago), and ones
    /// made by an older host whose agent is outdated (the next use creates
    /// a current one), and ones a policy this process swapped out made. The
    /// running containers of a policy this process never ran are left alone
    /// (see [`Sandbox::gc_with`] to include them). Only containers labelled
    /// for this namespace are considered; busy ones are deferred.
    pub async fn gc(&self, max_age: Option<Duration>, dry_run: bool) -> Result<Vec<GcEntry>> {
        let options = GcOptions {
            max_age,
            dry_run,
            other_policies: false,
            replace_outdated: false,
        };
        Ok(self.gc_with(options).await?.entries)
    }

    /// [`Sandbox::gc`] with its options, and what it left alone and what the
    /// policy claimed in vain: with [`GcOptions::other_policies`] the
    /// containers of policies this process never ran are collected too
    /// ("created by policy X, not the running policy").
    pub async fn gc_with(&self, options: GcOptions) -> Result<GcReport> {
        let running = self.inner.engine.running_policy();
        let checked = {
            let _own_only =
                (!options.other_policies).then(|| self.inner.engine.maintain_own_only());
            self.maintain_checked(options.dry_run).await?
        };
        let mut report = GcReport {
            unconfirmed: checked.unconfirmed,
            ..GcReport::default()
        };
        for (removal, container) in checked.done {
            report.entries.push(GcEntry {
                container,
                reason: format!("policy: {}", removal.reason),
                removed: !options.dry_run,
            });
        }
        // What the policy really removed is gone from `after`; a dry run's
        // plan is reported once.
        let candidates = if options.dry_run {
            checked.before
        } else {
            checked.after
        };
        let now = (now_ms() / 1000) as i64;
        for container in candidates {
            if report
                .entries
                .iter()
                .any(|e| e.container.id == container.id)
            {
                continue;
            }
            if container.managed_elsewhere.is_some() {
                report.elsewhere.push(container);
                continue;
            }
            let here = self.inner.engine.made_here(&container);
            let outdated = self
                .inner
                .engine
                .outdated(&container)
                .filter(|_| options.replace_outdated);
            let Some(reason) = orphaned(&container, &running, here, &options, now).or(outdated)
            else {
                if container.outdated.is_some() {
                    report.outdated.push(container.clone());
                }
                if !here {
                    report.other_policies.push(container);
                }
                continue;
            };
            let (reason, removed) = if options.dry_run {
                (reason, false)
            } else {
                self.collect(&container, reason).await?
            };
            tracing::info!(container = container.name, reason, removed, "gc");
            report.entries.push(GcEntry {
                container,
                reason,
                removed,
            });
        }
        Ok(report)
    }

    /// Removes one orphan through its backend's lane (never beside a
    /// running ensure), unless work is in flight on it.
    pub(super) async fn collect(
        &self,
        container: &ManagedContainer,
        reason: String,
    ) -> Result<(String, bool)> {
        let engine = self.inner.engine.clone();
        let id = container.id.clone();
        let removed = self
            .inner
            .policy
            .in_lane(&container.backend_id, async || {
                engine.remove(&id, RemoveMode::UnlessBusy).await
            })
            .await;
        match removed {
            Ok(removed) => Ok((reason, removed)),
            Err(SandboxError::Refused(_)) => Ok((
                format!(
                    "{reason}; deferred while {} command(s) run on it",
                    container.in_flight
                ),
                false,
            )),
            Err(e) => Err(e),
        }
    }
}

impl Sandbox {
    /// Removes `backend`'s container, made under profile `made`, when the
    /// policy now chooses `profile` for it and nothing runs on it: the
    /// ensure that follows makes one under the new profile. While work
    /// runs it stays (and is replaced when next idle).
    pub(super) async fn retire_reprofiled(
        &self,
        backend: &BackendId,
        made: &str,
        profile: &crate::config::ProfileName,
    ) -> Result<()> {
        // Not found, or not this process's to touch: the ensure decides.
        let Ok(Some(container)) = self.inner.engine.find(backend).await else {
            return Ok(());
        };
        if container.profile == profile.as_str() {
            return Ok(());
        }
        let why = format!("the policy now chooses profile {profile} (made under {made})");
        let (why, removed) = self.collect(&container, why).await?;
        tracing::info!(container = container.name, why, removed, "profile changed");
        Ok(())
    }

    /// Removes the outdated containers (made by an older host, or before
    /// the settings changed: see [`ManagedContainer::outdated`]) that have
    /// no work in flight, each through its backend's lane: their next use
    /// creates a current one. The number removed.
    pub async fn retire_outdated(&self) -> Result<usize> {
        let mut removed = 0;
        for container in self.list().await? {
            let Some(why) = self.inner.engine.outdated(&container) else {
                continue;
            };
            if container.managed_elsewhere.is_none()
                && self.collect(&container, why.clone()).await?.1
            {
                tracing::info!(
                    container = container.name,
                    why,
                    "outdated: removed while idle"
                );
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// Why no backend owns `container` any more, if none does. Ownership comes
/// from the host's own labels, never from asking the policy again: a policy
/// whose backend ids do not map to themselves must not get live containers
/// collected. Stopped, dead and mislabelled containers are orphans whoever
/// made them. A container made by a policy this host swapped out (`here`,
/// but not by `running`) is one too; one made by a policy this host never
/// ran (another host's: a server with another `--policy`) is one only with
/// [`GcOptions::other_policies`], and only then does `max_age` reach it.
fn orphaned(
    container: &ManagedContainer,
    running: &PolicyMark,
    here: bool,
    options: &GcOptions,
    now_secs: i64,
) -> Option<String> {
    if BackendId::parse(&container.backend_id).is_err() {
        return Some("its backend label is not a valid backend id".to_owned());
    }
    if matches!(container.status, Status::Exited | Status::Dead) {
        return Some(container.status.as_str().to_owned());
    }
    if !here && !options.other_policies {
        return None;
    }
    if !running.made(&container.policy, container.policy_digest.as_deref()) {
        return Some(format!(
            "created by policy {:?} ({}), not the running policy {} ({})",
            container.policy,
            container.policy_digest.as_deref().unwrap_or("no digest"),
            running.name,
            running.digest
        ));
    }
    match (options.max_age, container.created) {
        (Some(max), Some(created)) if now_secs - created >= max.as_secs() as i64 => {
            Some(format!("older than {}s", max.as_secs()))
        }
        _ => None,
    }
}

impl Sandbox {
    /// Calls `maintain` every `maintenance_interval_secs` while this sandbox
    /// (any clone) is alive, when running inside a tokio runtime.
    pub(super) fn start_maintenance(&self) {
        let interval = self.config().maintenance_interval_secs;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if !(interval > 0.0 && interval.is_finite()) {
            return;
        }
        let weak = std::sync::Arc::downgrade(&self.inner);
        runtime.spawn(async move {
            let period = Duration::from_secs_f64(interval);
            loop {
                tokio::time::sleep(period).await;
                let Some(inner) = weak.upgrade() else { break };
                let sandbox = Sandbox { inner };
                match sandbox.maintain(false).await {
                    Ok(removed) if removed.is_empty() => {}
                    Ok(removed) => {
                        tracing::info!(removed = removed.len(), "maintenance removed containers")
                    }
                    Err(e) => tracing::warn!(error = %e, "maintenance failed"),
                }
                if let Err(e) = sandbox.retire_outdated().await {
                    tracing::warn!(error = %e, "retiring outdated containers failed");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandbox_contract::Container;

    fn container(policy: &str, backend: &str, status: Status, created: i64) -> ManagedContainer {
        ManagedContainer {
            container: Container {
                id: "c".into(),
                name: "n".into(),
                backend_id: backend.into(),
                status,
                last_used_ms: 0,
                in_flight: 0,
                threads: 0,
            },
            workspace: "alice".into(),
            policy: policy.into(),
            policy_digest: Some(format!("sha256:{policy}")),
            created: Some(created),
            agent: Default::default(),
            profile: "default".into(),
            outdated: None,
            managed_elsewhere: None,
            plane: None,
        }
    }

    fn running(name: &str) -> PolicyMark {
        PolicyMark {
            name: name.into(),
            digest: format!("sha256:{name}"),
        }
    }

    fn aged(max_age: Option<u64>, other_policies: bool) -> GcOptions {
        GcOptions {
            max_age: max_age.map(Duration::from_secs),
            dry_run: false,
            other_policies,
            replace_outdated: false,
        }
    }

    #[test]
    fn orphans_are_told_by_the_host_labels() {
        let plain = aged(None, false);
        let me = running("per-user");
        let live = container("per-user", "alice", Status::Running, 100);
        assert_eq!(orphaned(&live, &me, true, &plain, 200), None);
        let stopped = container("per-user", "alice", Status::Exited, 100);
        assert_eq!(
            orphaned(&stopped, &me, true, &plain, 200).as_deref(),
            Some("exited")
        );
        let bad = container("per-user", "../x", Status::Running, 100);
        assert!(orphaned(&bad, &me, true, &plain, 200).is_some());
        assert!(orphaned(&live, &me, true, &aged(Some(50), false), 200).is_some());
        assert_eq!(
            orphaned(&live, &me, true, &aged(Some(500), false), 200),
            None
        );
    }

    #[test]
    fn another_hosts_policys_containers_are_left_alone_unless_told() {
        let theirs = container("per-thread", "alice-1", Status::Running, 100);
        let me = running("per-user");
        let (plain, told) = (aged(None, false), aged(None, true));
        assert_eq!(orphaned(&theirs, &me, false, &plain, 200), None);
        assert_eq!(
            orphaned(&theirs, &me, false, &aged(Some(0), false), 200),
            None
        );
        let why = orphaned(&theirs, &me, false, &told, 200).unwrap();
        assert!(why.contains("not the running policy"), "{why}");
        // Swapped out here: this host's own leftovers.
        assert!(orphaned(&theirs, &me, true, &plain, 200).is_some());
        // Another build under the same name is another policy.
        let mut rebuilt = container("per-user", "alice", Status::Running, 100);
        rebuilt.policy_digest = Some("sha256:other-build".into());
        assert_eq!(orphaned(&rebuilt, &me, false, &plain, 200), None);
        assert!(orphaned(&rebuilt, &me, false, &told, 200).is_some());
        // Orphans are the host's whoever made them.
        let stopped = container("per-thread", "alice-1", Status::Dead, 100);
        let why = orphaned(&stopped, &me, false, &plain, 200);
        assert_eq!(why.as_deref(), Some("dead"));
        // A container of an older host, without a digest: by its name.
        let mut older = container("per-user", "alice", Status::Running, 100);
        older.policy_digest = None;
        let why = orphaned(&older, &me, true, &aged(Some(0), false), 200);
        assert_eq!(why.as_deref(), Some("older than 0s"));
    }
}
