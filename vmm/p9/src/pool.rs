//! A small fixed-size worker pool with a bounded job queue, used to run 9P requests
//! concurrently. `submit` blocks when the queue is full (back-pressure on the transport);
//! dropping the pool finishes queued jobs and joins the threads.
//!
//! With statistics on (chosen at creation, [`WorkerPool::with_thread_start`], like the server's
//! [`crate::Config::stats`]) it also counts jobs, the deepest the queue got, time submitters
//! spent waiting for the queue lock and how often a full queue made them wait; off, `submit`
//! pays one branch.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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
    stats: Counters,
}

#[derive(Default)]
struct Counters {
    enabled: bool,
    jobs: AtomicU64,
    max_depth: AtomicU64,
    lock_wait_ns: AtomicU64,
    full_waits: AtomicU64,
}

/// What the pool saw while statistics were on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub threads: usize,
    pub jobs: u64,
    /// The most jobs that were queued at once.
    pub max_depth: u64,
    /// Total time `submit` waited to take the queue lock.
    pub lock_wait: Duration,
    /// How often `submit` found the queue full and had to wait for a worker.
    pub full_waits: u64,
}

impl fmt::Display for PoolStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "worker pool: {} threads, {} jobs, max queue depth {}, queue-lock waits {:.3} ms in total, {} waits on a full queue",
            self.threads,
            self.jobs,
            self.max_depth,
            self.lock_wait.as_secs_f64() * 1e3,
            self.full_waits
        )
    }
}

/// A fixed set of worker threads fed from a bounded queue.
pub struct WorkerPool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

/// Runs first on each new worker thread (e.g. to confine it), before it takes any job.
pub type ThreadStart = Arc<dyn Fn() + Send + Sync>;

impl WorkerPool {
    /// Starts `threads` workers (at least one) named `name-N`, without statistics; the queue
    /// holds 64 jobs per thread.
    pub fn new(threads: usize, name: &str) -> Self {
        Self::with_thread_start(threads, name, Arc::new(|| {}), false)
    }

    /// Like [`WorkerPool::new`], with each worker calling `on_start` first thing, and statistics
    /// collected if `stats` ([`WorkerPool::stats`]).
    pub fn with_thread_start(
        threads: usize,
        name: &str,
        on_start: ThreadStart,
        stats: bool,
    ) -> Self {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            q: Mutex::new(Queue {
                jobs: VecDeque::new(),
                closed: false,
            }),
            not_empty: Condvar::new(),
            not_full: Condvar::new(),
            bound: threads * 64,
            stats: Counters {
                enabled: stats,
                ..Counters::default()
            },
        });
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads {
            let s = shared.clone();
            let on_start = on_start.clone();
            let h = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    on_start();
                    worker(&s)
                });
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

    /// The statistics collected so far (all zero unless the pool was created with them on).
    pub fn stats(&self) -> PoolStats {
        let c = &self.shared.stats;
        PoolStats {
            threads: self.threads.len(),
            jobs: c.jobs.load(Ordering::Relaxed),
            max_depth: c.max_depth.load(Ordering::Relaxed),
            lock_wait: Duration::from_nanos(c.lock_wait_ns.load(Ordering::Relaxed)),
            full_waits: c.full_waits.load(Ordering::Relaxed),
        }
    }

    /// Queues a job, blocking while the queue is full.
    pub fn submit(&self, job: Box<dyn FnOnce() + Send>) {
        if self.threads.is_empty() {
            job();
            return;
        }
        let c = &self.shared.stats;
        let t0 = c.enabled.then(Instant::now);
        let mut q = self.shared.q.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t0) = t0 {
            c.lock_wait_ns
                .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
            if q.jobs.len() >= self.shared.bound {
                c.full_waits.fetch_add(1, Ordering::Relaxed);
            }
        }
        while q.jobs.len() >= self.shared.bound {
            q = self
                .shared
                .not_full
                .wait(q)
                .unwrap_or_else(|e| e.into_inner());
        }
        q.jobs.push_back(job);
        if t0.is_some() {
            c.jobs.fetch_add(1, Ordering::Relaxed);
            c.max_depth
                .fetch_max(q.jobs.len() as u64, Ordering::Relaxed);
        }
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

    #[test]
    fn every_worker_runs_the_start_hook_before_any_job() {
        let started = Arc::new(Mutex::new(Vec::new()));
        let hook_log = started.clone();
        let pool = WorkerPool::with_thread_start(
            3,
            "h",
            Arc::new(move || {
                let me = std::thread::current().name().unwrap_or("").to_string();
                hook_log.lock().unwrap().push(me);
            }),
            false,
        );
        let ran_after_hook = Arc::new(AtomicUsize::new(0));
        for _ in 0..30 {
            let (started, ran) = (started.clone(), ran_after_hook.clone());
            pool.submit(Box::new(move || {
                let me = std::thread::current().name().unwrap_or("").to_string();
                if started.lock().unwrap().contains(&me) {
                    ran.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        drop(pool);
        let mut names = started.lock().unwrap().clone();
        names.sort();
        assert_eq!(names, ["h-0", "h-1", "h-2"]);
        assert_eq!(ran_after_hook.load(Ordering::Relaxed), 30);
    }

    #[test]
    fn counts_jobs_and_queue_depth_only_when_created_with_stats() {
        let off = WorkerPool::new(1, "s");
        off.submit(Box::new(|| {}));
        assert_eq!(off.stats().jobs, 0);
        let pool = WorkerPool::with_thread_start(1, "s", Arc::new(|| {}), true);
        // Hold the only worker so the next jobs pile up in the queue.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        pool.submit(Box::new(move || {
            let _ = rx.recv();
        }));
        for _ in 0..5 {
            pool.submit(Box::new(|| {}));
        }
        let s = pool.stats();
        assert_eq!(s.jobs, 6);
        assert!(s.max_depth >= 5, "{s:?}");
        assert_eq!(s.threads, 1);
        assert!(s.to_string().contains("6 jobs"), "{s}");
        tx.send(()).unwrap();
    }
}
