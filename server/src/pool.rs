//! Blocking pools: threads that run the work a shard must never do (storage calls, bcrypt).
//! Each pool has a bounded queue; a full queue is refused at once (the caller answers 503) rather
//! than growing memory or latency without bound. Jobs are `FnOnce` closures. In debug builds a
//! panicking job is caught so that the thread survives (its response sender answers 500 when
//! dropped); release builds use `panic = "abort"`, where a panic ends the process on purpose.

use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};

type Job = Box<dyn FnOnce() + Send + 'static>;

/// A fixed set of threads behind a bounded queue.
pub struct Pool {
    name: &'static str,
    queue: SyncSender<Job>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("name", &self.name).finish()
    }
}

/// The queue was full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy;

impl Pool {
    /// Starts `threads` threads named `ringhub-{name}-N` sharing a queue of `capacity` jobs;
    /// with `low_priority` they run at the lowest CPU priority.
    pub fn new(name: &'static str, threads: usize, capacity: usize, low_priority: bool) -> Self {
        let (queue, jobs) = sync_channel::<Job>(capacity.max(1));
        let jobs = Arc::new(Mutex::new(jobs));
        for n in 0..threads.max(1) {
            let jobs = jobs.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("ringhub-{name}-{n}"))
                .spawn(move || {
                    if low_priority {
                        engine::lower_thread_priority();
                    }
                    work(&jobs);
                });
            if let Err(e) = spawned {
                tracing::error!(pool = name, error = %e, "cannot start a blocking thread");
            }
        }
        Self { name, queue }
    }

    /// Queues `job`; `Err(Busy)` when the queue is full.
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) -> Result<(), Busy> {
        match self.queue.try_send(Box::new(job)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => Err(Busy),
        }
    }
}

fn work(jobs: &Mutex<Receiver<Job>>) {
    loop {
        let job = {
            let receiver = jobs
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            receiver.recv()
        };
        let Ok(job) = job else {
            return;
        };
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
            tracing::error!("a blocking job panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_jobs_and_refuses_past_capacity() {
        let pool = Pool::new("test", 1, 1, false);
        let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<u32>();
        let first = done_tx.clone();
        pool.submit(move || {
            let _ = gate_rx.recv();
            let _ = first.send(1);
        })
        .unwrap();
        // The thread may not have taken the first job yet: fill until refused.
        let mut accepted = 0;
        while accepted < 3 {
            let tx = done_tx.clone();
            if pool
                .submit(move || {
                    let _ = tx.send(2);
                })
                .is_err()
            {
                break;
            }
            accepted += 1;
        }
        assert!(accepted <= 2, "the queue is bounded");
        gate_tx.send(()).unwrap();
        assert_eq!(done_rx.recv().unwrap(), 1);
        pool.submit(|| panic!("a panicking job")).ok();
        std::thread::sleep(std::time::Duration::from_millis(50));
        pool.submit(move || {
            let _ = done_tx.send(3);
        })
        .unwrap();
        let mut seen = Vec::new();
        while let Ok(v) = done_rx.recv_timeout(std::time::Duration::from_secs(2)) {
            seen.push(v);
            if v == 3 {
                break;
            }
        }
        assert_eq!(seen.last(), Some(&3), "the thread survived the panic");
    }
}
