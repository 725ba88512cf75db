//! The host's clocks: the wall clock every last-use time is measured on, and
//! the budget clock of one policy call, which does not charge the call for
//! time spent in the host's own queues (a lifecycle slot, a drain).

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The wall clock in Unix ms (0 before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Time a call spent queued for a lifecycle slot: not charged to its budget.
#[derive(Debug, Default)]
struct Excused {
    total: Duration,
    waiting_since: Option<Instant>,
}

impl Excused {
    fn at(&self, now: Instant) -> Duration {
        self.total
            + self
                .waiting_since
                .map_or(Duration::ZERO, |since| now - since)
    }
}

tokio::task_local! {
    static EXCUSED: Arc<Mutex<Excused>>;
}

/// Waits for `fut` (a queue the host owns), not charging the wait to the
/// policy call running on this task, if any.
pub async fn excused_wait<F: Future>(fut: F) -> F::Output {
    let ledger = EXCUSED.try_with(Arc::clone).ok();
    if let Some(l) = &ledger {
        l.lock().unwrap().waiting_since = Some(Instant::now());
    }
    let out = fut.await;
    if let Some(l) = &ledger {
        let mut l = l.lock().unwrap();
        if let Some(since) = l.waiting_since.take() {
            l.total += since.elapsed();
        }
    }
    out
}

/// The call ran past its wall-clock budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverBudget(pub Duration);

/// Runs one policy call within `budget` of wall-clock time (host imports
/// included, lifecycle-slot waits excused). On `Err` the call's future was
/// dropped mid-call: its instance must be discarded.
pub async fn within_budget<F: Future>(budget: Duration, fut: F) -> Result<F::Output, OverBudget> {
    let ledger = Arc::new(Mutex::new(Excused::default()));
    let started = Instant::now();
    let fut = EXCUSED.scope(ledger.clone(), fut);
    tokio::pin!(fut);
    loop {
        let excused = ledger.lock().unwrap().at(Instant::now());
        let deadline = tokio::time::Instant::from_std(started + budget + excused);
        match tokio::time::timeout_at(deadline, &mut fut).await {
            Ok(out) => return Ok(out),
            Err(_) => {
                let now = Instant::now();
                let excused = ledger.lock().unwrap().at(now);
                if now.duration_since(started).saturating_sub(excused) >= budget {
                    return Err(OverBudget(budget));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_call_past_its_budget_is_cut_off_but_host_queue_waits_are_excused() {
        let budget = Duration::from_millis(100);
        let slow = within_budget(budget, tokio::time::sleep(Duration::from_secs(30))).await;
        assert_eq!(slow, Err(OverBudget(budget)));
        let queued = within_budget(budget, async {
            excused_wait(tokio::time::sleep(Duration::from_millis(250))).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        })
        .await;
        assert_eq!(queued, Ok(()));
    }
}
