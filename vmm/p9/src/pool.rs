//! A small fixed-size worker pool with a bounded job queue, used to run 9P requests
//! concurrently. `submit` blocks when the queue is full (back-pressure on the transport);
//! dropping the pool finishes queued jobs and joins the threads.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce() + Send>;

struct Queue {
    jobs: VecDeque<Job>,
    closed: bool,
}

struct Shared {
    q: Mutex<Queue>,
    not_empty: Condvar,
    not_full: Condvar,
    bound: usize,
}

/// A fixed set of worker threads fed from a bounded queue.
pub struct WorkerPool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl WorkerPool {
    /// Starts `threads` workers (at least one) named `name-N`; the queue holds 64 jobs per thread.
    pub fn new(threads: usize, name: &str) -> Self {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            q: Mutex::new(Queue {
                jobs: VecDeque::new(),
                closed: false,
            }),
            not_empty: Condvar::new(),
            not_full: Condvar::new(),
            bound: threads * 64,
        });
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads {
            let s = shared.clone();
            let h = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || worker(&s));
            // A thread that cannot be spawned just leaves the pool smaller; with none at all,
            // submit runs jobs inline.
            if let Ok(h) = h {
                handles.push(h);
            }
        }
        WorkerPool {
            shared,
            threads: handles,
        }
    }

    /// Number of worker threads actually running.
    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    /// Queues a job, blocking while the queue is full.
    pub fn submit(&self, job: Box<dyn FnOnce() + Send>) {
        if self.threads.is_empty() {
            job();
            return;
        }
        let mut q = self.shared.q.lock().unwrap_or_else(|e| e.into_inner());
        while q.jobs.len() >= self.shared.bound {
            q = self
                .shared
                .not_full
                .wait(q)
                .unwrap_or_else(|e| e.into_inner());
        }
        q.jobs.push_back(job);
        drop(q);
        self.shared.not_empty.notify_one();
    }
}

fn worker(s: &Shared) {
    loop {
        let job = {
            let mut q = s.q.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if let Some(j) = q.jobs.pop_front() {
                    break j;
                }
                if q.closed {
                    return;
                }
                q = s.not_empty.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        s.not_full.notify_one();
        // A panicking job must not take the worker down with it.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.shared
            .q
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .closed = true;
        self.shared.not_empty.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn runs_every_job_and_joins() {
        let n = Arc::new(AtomicUsize::new(0));
        {
            let pool = WorkerPool::new(3, "t");
            assert_eq!(pool.threads(), 3);
            for _ in 0..1000 {
                let n = n.clone();
                pool.submit(Box::new(move || {
                    n.fetch_add(1, Ordering::Relaxed);
                }));
            }
            pool.submit(Box::new(|| panic!("job panics")));
        }
        assert_eq!(n.load(Ordering::Relaxed), 1000);
    }
}
