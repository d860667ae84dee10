//! Ctrl-C (SIGINT), SIGTERM and SIGHUP: blocked in every thread from the start, and turned
//! into a VM stop by a waiting thread. Before the process confines itself (while the
//! warm-start snapshot is made) a scoped waiter does the same and ends with its work, so no
//! unconfined thread outlives that stage; a signal that arrives between waiters stays pending
//! for the next one, and one that arrives before any VM runs is found by [`Signals::pending`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use vmm::vm::StopHandle;

use crate::failure::Failure;
use crate::EXIT_INTERRUPTED;

/// How often the scoped waiter looks whether its work is done.
const SCOPED_POLL: Duration = Duration::from_millis(50);

/// The blocked stop signals.
#[derive(Clone, Copy)]
pub struct Signals {
    set: libc::sigset_t,
}

/// The failure a stop signal turns into before the job's VM runs.
pub fn interrupted(while_doing: &str) -> Failure {
    Failure {
        code: EXIT_INTERRUPTED,
        message: format!("interrupted while {while_doing}; nothing was left behind"),
    }
}

impl Signals {
    /// Blocks the stop signals in the calling thread and every thread it starts later; call
    /// it before any thread starts.
    pub fn block() -> Signals {
        // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it, and
        // pthread_sigmask only changes this thread's mask (inherited by threads spawned later).
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                libc::sigaddset(&mut set, sig);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            Signals { set }
        }
    }

    /// Whether a stop signal is waiting to be taken (it stays pending).
    pub fn pending(&self) -> bool {
        // SAFETY: sigset_t is plain data; sigpending fills it, sigismember reads it.
        unsafe {
            let mut pending: libc::sigset_t = std::mem::zeroed();
            if libc::sigpending(&mut pending) != 0 {
                return false;
            }
            [libc::SIGINT, libc::SIGTERM, libc::SIGHUP]
                .iter()
                .any(|&s| libc::sigismember(&pending, s) == 1)
        }
    }

    /// `Err(interrupted)` when a stop signal is pending: a checkpoint between steps that run
    /// no VM.
    pub fn check(&self, while_doing: &str) -> Result<(), Failure> {
        if self.pending() {
            Err(interrupted(while_doing))
        } else {
            Ok(())
        }
    }

    /// Takes one stop signal, waiting at most `timeout`.
    fn take(&self, timeout: Duration) -> bool {
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `set` is an initialised sigset_t, the info pointer may be null and `ts` is
        // a valid timespec.
        unsafe { libc::sigtimedwait(&self.set, std::ptr::null_mut(), &ts) > 0 }
    }

    /// Starts a thread that waits for the first stop signal and stops the VM with it. The
    /// thread lives as long as the process.
    pub fn watch(self, stop: StopHandle) {
        let set = self.set;
        let spawned = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                vmm::sandbox::enter_thread(vmm::sandbox::ThreadRole::SignalWaiter);
                let mut sig: libc::c_int = 0;
                // SAFETY: `set` is an initialised sigset_t and `sig` a valid out-pointer.
                if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                    stop.stop();
                }
            });
        if let Err(e) = spawned {
            log::warn!("Ctrl-C handling is off ({e})");
        }
    }

    /// Runs `body` while a waiter turns a stop signal into `stop`; the waiter ends with
    /// `body`. Returns what `body` returned and whether a signal was taken.
    pub fn during<R>(&self, stop: StopHandle, body: impl FnOnce() -> R) -> (R, bool) {
        let done = AtomicBool::new(false);
        let taken = AtomicBool::new(false);
        let result = std::thread::scope(|scope| {
            let waiter = std::thread::Builder::new()
                .name("signals".into())
                .spawn_scoped(scope, || {
                    while !done.load(Ordering::Acquire) {
                        if self.take(SCOPED_POLL) {
                            taken.store(true, Ordering::Release);
                            stop.stop();
                            return;
                        }
                    }
                });
            if let Err(e) = &waiter {
                log::warn!("Ctrl-C handling is off while the snapshot is made ({e})");
            }
            let result = body();
            done.store(true, Ordering::Release);
            result
        });
        (result, taken.load(Ordering::Acquire))
    }
}
