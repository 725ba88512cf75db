//! Background processes as use: a container whose agent keeps running
//! processes (a dev server, a terminal) is not removed for being idle, up
//! to `process_keep_alive_secs` after its last request; and they hold off
//! the replacement of a container whose plan changed (settings, an older
//! host's agent, another profile) for at most [`REPLACE_HOLD`] from when
//! this process first held it, with a warning when held and when the hold
//! ends. A destroy asks them to stop (SIGTERM) and gives them the grace it
//! gives commands in flight. The agent is asked at removal time only (one `procs` frame over
//! its link): nothing polls, and a host restart loses nothing.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sandbox_agent::protocol::DoneStatus;

use super::clock::now_ms;
use super::{Engine, ManagedContainer};
use crate::dataplane::agent::AgentMode;
use crate::dataplane::processes::{ProcessId, ProcessOp, Signal};
use crate::provider::Status;

/// The longest background processes hold off the replacement of a
/// container whose plan changed, from when they first did.
pub const REPLACE_HOLD: Duration = Duration::from_secs(10 * 60);
/// How long the agent has to list its processes for a removal decision
/// (past it, none is taken to run).
const ASK_PATIENCE: Duration = Duration::from_secs(5);
/// Holds remembered at most (one per container being held).
const MAX_HOLDS: usize = 4096;

/// When each held container (by id) was first held by its processes.
#[derive(Default)]
pub(super) struct Holds(std::sync::Mutex<HashMap<String, Instant>>);

impl Engine {
    /// Why `container`'s background processes keep it from a removal that
    /// spares busy containers now, if they do.
    pub(super) async fn held_by_processes(&self, container: &ManagedContainer) -> Option<String> {
        let keep_alive = Duration::from_secs_f64(self.config.process_keep_alive_secs);
        if keep_alive.is_zero()
            || container.status != Status::Running
            || container.agent != AgentMode::Serves
        {
            return None;
        }
        let listed = tokio::time::timeout(
            ASK_PATIENCE,
            self.provider.process(&container.id, &ProcessOp::List),
        )
        .await;
        let running = match listed {
            Ok(Ok((answer, DoneStatus::Ok))) => answer.procs.iter().filter(|p| p.running).count(),
            _ => 0,
        };
        if running == 0 {
            self.holds.0.lock().unwrap().remove(&container.id);
            return None;
        }
        let replacing = container.outdated.clone().or_else(|| {
            let chosen = self.chosen.lock().unwrap();
            chosen
                .get(&container.container.backend_id)
                .filter(|p| p.as_str() != container.profile)
                .map(|p| format!("the policy now chooses profile {p}"))
        });
        match replacing {
            Some(why) => {
                // Counted from the first replacement held off, not from an
                // idle hold before the plan changed.
                let first_held = {
                    let mut holds = self.holds.0.lock().unwrap();
                    if holds.len() >= MAX_HOLDS {
                        holds.clear();
                    }
                    *holds
                        .entry(container.id.clone())
                        .or_insert_with(Instant::now)
                };
                let held = first_held.elapsed();
                if held >= REPLACE_HOLD.min(keep_alive) {
                    tracing::warn!(
                        container = container.name,
                        why,
                        running,
                        held_secs = held.as_secs(),
                        "replacing a container whose plan changed although background processes \
                         run in it: they are killed"
                    );
                    self.holds.0.lock().unwrap().remove(&container.id);
                    return None;
                }
                if held < Duration::from_secs(1) {
                    tracing::warn!(
                        container = container.name,
                        why,
                        running,
                        hold_secs = REPLACE_HOLD.min(keep_alive).as_secs(),
                        "background processes hold off the replacement of a container whose \
                         plan changed, for a bounded time"
                    );
                }
                Some(format!(
                    "container {} is to be replaced ({why}), but {running} background \
                     process(es) run in it: held off for at most {} s more",
                    container.name,
                    REPLACE_HOLD.min(keep_alive).saturating_sub(held).as_secs()
                ))
            }
            None => {
                let idle_ms = now_ms().saturating_sub(container.last_used_ms);
                let idle = Duration::from_millis(idle_ms);
                if idle >= keep_alive {
                    self.holds.0.lock().unwrap().remove(&container.id);
                    return None;
                }
                Some(format!(
                    "container {} has {running} background process(es) running; it is kept \
                     until {} s after its last request (process_keep_alive_secs), {} s from now",
                    container.name,
                    keep_alive.as_secs(),
                    keep_alive.saturating_sub(idle).as_secs()
                ))
            }
        }
    }
}

impl Engine {
    /// A destroy's grace for background processes: SIGTERM to each running
    /// one (SIGHUP to a terminal: an interactive shell ignores SIGTERM), then
    /// until `deadline` for them to end; the container's removal kills what
    /// is left. Never past `deadline`.
    pub(super) async fn stop_processes(
        &self,
        container: &ManagedContainer,
        deadline: tokio::time::Instant,
    ) {
        if container.status != Status::Running || container.agent != AgentMode::Serves {
            return;
        }
        let _ = tokio::time::timeout_at(deadline, self.ask_to_stop(container)).await;
    }

    async fn ask_to_stop(&self, container: &ManagedContainer) {
        let provider = &self.provider;
        let running = || async {
            match provider.process(&container.id, &ProcessOp::List).await {
                Ok((answer, DoneStatus::Ok)) => answer
                    .procs
                    .into_iter()
                    .filter(|p| p.running)
                    .filter_map(|p| Some((p.id.parse::<ProcessId>().ok()?, p.terminal)))
                    .collect(),
                _ => Vec::new(),
            }
        };
        let first: Vec<(ProcessId, bool)> = running().await;
        if first.is_empty() {
            return;
        }
        let signals = first.into_iter().map(|(id, terminal)| {
            let signal = if terminal { Signal::HUP } else { Signal::TERM };
            let op = ProcessOp::Signal { id, signal };
            async move {
                let _ = provider.process(&container.id, &op).await;
            }
        });
        futures_util::future::join_all(signals).await;
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if running().await.is_empty() {
                return;
            }
        }
    }
}
