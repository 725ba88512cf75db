//! Case 5: one user's warm latency alone and while 10 other users
//! cold-start in a loop, with raw bollard on the same container as the
//! engine's floor: nobody's cold start may stall a warm user.

use std::sync::Arc;
use std::time::Duration;

use super::Bench;
use crate::baseline::raw_exec;
use crate::measure::timed;
use crate::report::{ms, percentile};

impl Bench {
    /// (5) B's warm latency alone vs while 10 other users cold-start.
    pub(crate) async fn head_of_line(&mut self) -> anyhow::Result<()> {
        let b = self.sandbox.get_thread_backend("hol-1").await?;
        b.execute("true").await?;
        let n = if self.smoke {
            10
        } else {
            self.iterations.max(60)
        };
        let container = b.ensure_container().await?.id;
        let docker = self.docker.clone();
        let (mut alone, mut raw_alone) = (Vec::new(), Vec::new());
        for _ in 0..n {
            alone.push(timed(async { Ok(b.execute("true").await?) }).await?.1);
            raw_alone.push(timed(raw_exec(&docker, &container)).await?.1);
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let starters: Vec<String> = (0..10).map(|_| self.fresh_user("hols")).collect();
        let mut handles = Vec::new();
        for (i, u) in starters.iter().enumerate() {
            let sandbox = self.sandbox.clone();
            let stop = stop.clone();
            let u = u.clone();
            handles.push(tokio::spawn(async move {
                let mut round = 0;
                let mut cold_starts = 0usize;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    round += 1;
                    let thread = format!("{u}x{i}r{round}-1");
                    let user = thread.split('-').next().unwrap().to_owned();
                    if let Ok(b) = sandbox.get_thread_backend(&thread).await {
                        if b.execute("true").await.is_ok() {
                            cold_starts += 1;
                        }
                    }
                    let _ = sandbox.destroy_user_backend(&user).await;
                }
                cold_starts
            }));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (mut busy, mut raw_busy) = (Vec::new(), Vec::new());
        for _ in 0..n {
            busy.push(timed(async { Ok(b.execute("true").await?) }).await?.1);
            raw_busy.push(timed(raw_exec(&docker, &container)).await?.1);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut cold_total = 0;
        for h in handles {
            cold_total += h.await?;
        }
        let p = |s: &[Duration]| {
            format!(
                "p50 {} / p99 {}",
                ms(percentile(s, 0.5)),
                ms(percentile(s, 0.99))
            )
        };
        let p99 = |s: &[Duration]| percentile(s, 0.99).as_secs_f64();
        self.table.add(
            "5. the engine's floor: raw bollard exec on B's container, same load vs alone",
            p(&raw_busy),
            p(&raw_alone),
            format!("p99 {:.3}", p99(&raw_busy) / p99(&raw_alone)),
            "(context)",
        );
        self.table.add(
            &format!("5. user B warm execute while 10 users cold-start ({cold_total} cold starts) vs alone"),
            p(&busy),
            p(&alone),
            format!(
                "p99 {:.3}",
                percentile(&busy, 0.99).as_secs_f64() / percentile(&alone, 0.99).as_secs_f64()
            ),
            "p99 <= 1.5",
        );
        Ok(())
    }
}
