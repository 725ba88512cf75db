//! Threads that run calls, kept for a while after their call ended: a warm
//! execute then costs no thread creation and teardown (a stack mapped,
//! guarded and given back each time, about a tenth of a millisecond on the
//! machines this was measured on).
//!
//! A thread waits [`IDLE`] for its next call and then ends, so an idle
//! sandbox keeps none; at most [`MAX_IDLE`] wait at once. Threads count
//! against the container's pids limit like any: when none can start, the
//! call is refused (the caller's error), never queued behind another call.

use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a thread waits for another call before it ends.
const IDLE: Duration = Duration::from_secs(10);
/// Threads waiting at most.
const MAX_IDLE: usize = 16;

type Job = Box<dyn FnOnce() + Send>;

/// The waiting threads, each by its number and the sender of its next job.
#[derive(Clone, Default)]
pub(crate) struct Workers(Arc<Mutex<Idle>>);

#[derive(Default)]
struct Idle {
    waiting: Vec<(u64, Sender<Job>)>,
    numbered: u64,
}

impl Workers {
    /// Runs `job` on a waiting thread, or on a new one; an error when no
    /// thread can start.
    pub(crate) fn run(&self, job: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
        let mut job: Job = Box::new(job);
        {
            // Popped and sent under the lock that a worker giving up holds
            // while it drains and drops its receiver: a job sent is run.
            let mut idle = self.0.lock().unwrap();
            while let Some((_, worker)) = idle.waiting.pop() {
                match worker.send(job) {
                    Ok(()) => return Ok(()),
                    Err(back) => job = back.0,
                }
            }
        }
        let workers = self.clone();
        std::thread::Builder::new()
            .name("call".into())
            .spawn(move || workers.serve(job))
            .map(drop)
    }

    /// Runs `job`, then the next ones it is given, until none comes within
    /// [`IDLE`] (or enough threads wait already).
    fn serve(&self, mut job: Job) {
        loop {
            job();
            let (tx, rx) = channel();
            let me = {
                let mut idle = self.0.lock().unwrap();
                if idle.waiting.len() >= MAX_IDLE {
                    return;
                }
                idle.numbered += 1;
                let me = idle.numbered;
                idle.waiting.push((me, tx));
                me
            };
            match rx.recv_timeout(IDLE) {
                Ok(next) => job = next,
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                    // Leave the list, and take a job sent before that, all
                    // under the lock senders hold: none comes after.
                    let mut idle = self.0.lock().unwrap();
                    idle.waiting.retain(|(n, _)| *n != me);
                    match rx.try_recv() {
                        Ok(next) => job = next,
                        Err(_) => {
                            drop(rx);
                            return;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_job_runs_once_whoever_hands_it_out() {
        let workers = Workers::default();
        let (done, finished) = channel();
        let senders: Vec<_> = (0..4)
            .map(|t| {
                let (workers, done) = (workers.clone(), done.clone());
                std::thread::spawn(move || {
                    for i in 0..100 {
                        let done = done.clone();
                        workers
                            .run(move || done.send(t * 100 + i).unwrap())
                            .unwrap();
                    }
                })
            })
            .collect();
        for sender in senders {
            sender.join().unwrap();
        }
        let mut seen: Vec<i32> = (0..400)
            .map(|_| finished.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        seen.sort();
        assert_eq!(seen, (0..400).collect::<Vec<_>>());
        // Threads kept for the next jobs, at most MAX_IDLE.
        assert!(workers.0.lock().unwrap().waiting.len() <= MAX_IDLE);
    }
}
