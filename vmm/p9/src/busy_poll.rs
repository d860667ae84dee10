//! Adaptive busy polling for a connection's reader: after serving a request, look for the next
//! one for a short while before sleeping in `read`.
//!
//! A synchronous 9P client sends its next request a few microseconds after reading a reply.
//! If the server's reader is asleep by then, the request costs a wake-up of that thread (and,
//! on an idle host, of its CPU), which on a virtual machine is often longer than serving the
//! request. Polling the socket instead catches the request at once. The window adapts as KVM's
//! halt polling does: it grows while requests arrive soon after the reader would have gone to
//! sleep, and shrinks when the reader sleeps long anyway, so an idle or slow client costs no
//! CPU, and a busy one costs at most `max` of spinning per request.
//!
//! Readers of one listener share an [`AwakeReaders`] count: a reader polls only while at most
//! one reader per two CPUs is awake (serving or polling), so that polling never takes a CPU the
//! clients or the other readers need. With more busy clients than that, readers sleep in
//! `read` as they would without polling.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How many readers of one listener are awake, and how many may be for one to poll.
#[derive(Debug)]
pub struct AwakeReaders {
    awake: AtomicUsize,
    max: usize,
}

impl AwakeReaders {
    /// Polling while at most one reader per two CPUs this process may run on is awake (at
    /// least one).
    pub fn for_this_host() -> Arc<Self> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::new((cpus / 2).max(1))
    }

    /// Polling while at most `max` readers are awake.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(AwakeReaders {
            awake: AtomicUsize::new(0),
            max,
        })
    }

    fn allow_polling(&self) -> bool {
        self.awake.load(Ordering::Relaxed) <= self.max
    }
}

/// Spin-loop hints between two looks at the socket: a look is a system call, and the hints
/// keep the polling CPU from competing with its neighbours while it waits.
const PAUSES_PER_LOOK: u32 = 16;

/// The smallest non-zero window; a window halved below it becomes zero.
const STEP: Duration = Duration::from_micros(5);

/// One connection's polling window; counts its reader as awake from creation until it may
/// sleep, and again once its read returns.
#[derive(Debug)]
pub struct BusyPoll {
    window: Duration,
    max: Duration,
    readers: Arc<AwakeReaders>,
    awake: bool,
}

/// What [`BusyPoll::before_read`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Readiness {
    /// Bytes (or the end of the stream, or an error) are there: the read will not sleep.
    Ready,
    /// Nothing came within the window: the read may sleep; report how long with
    /// [`BusyPoll::slept`] and this instant.
    MaySleep(Instant),
    /// Polling is off: read as usual.
    Off,
}

impl BusyPoll {
    /// A window that starts at `max` and never exceeds it, polling only while `readers`
    /// allows; `max` zero turns polling off.
    pub fn new(max: Duration, readers: Arc<AwakeReaders>) -> Self {
        let awake = !max.is_zero();
        if awake {
            readers.awake.fetch_add(1, Ordering::Relaxed);
        }
        BusyPoll {
            window: max,
            max,
            readers,
            awake,
        }
    }

    /// The current window.
    #[cfg(test)]
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Polls `fd` for readable bytes for up to the current window. `quiet` says whether
    /// nothing of this connection is being served elsewhere (a busy worker needs the CPU more
    /// than a poller); it is asked only when the window and the awake count would allow polling.
    pub fn before_read(&mut self, fd: RawFd, quiet: impl FnOnce() -> bool) -> Readiness {
        if self.max.is_zero() {
            return Readiness::Off;
        }
        let start = Instant::now();
        if !self.window.is_zero() && self.readers.allow_polling() && quiet() {
            let mut byte = 0u8;
            loop {
                // SAFETY: recv writes at most one byte into `byte`, which lives across the call;
                // MSG_PEEK leaves it in the socket and MSG_DONTWAIT never sleeps.
                let n = unsafe {
                    libc::recv(
                        fd,
                        (&mut byte as *mut u8).cast(),
                        1,
                        libc::MSG_PEEK | libc::MSG_DONTWAIT,
                    )
                };
                let would_block = n < 0
                    && matches!(
                        std::io::Error::last_os_error().raw_os_error(),
                        Some(libc::EAGAIN | libc::EINTR)
                    );
                if !would_block {
                    return Readiness::Ready;
                }
                if start.elapsed() >= self.window {
                    break;
                }
                for _ in 0..PAUSES_PER_LOOK {
                    std::hint::spin_loop();
                }
            }
        }
        self.set_awake(false);
        Readiness::MaySleep(Instant::now())
    }

    /// Adapts the window to a read that could sleep and returned at `now`, having started
    /// at `since`: a request that came within `max` of the window's end would have been caught
    /// by a longer window, so it grows; a longer sleep means the client is slow or idle, and
    /// polling for it only burns CPU, so it shrinks.
    pub fn slept(&mut self, since: Instant, now: Instant) {
        self.set_awake(true);
        let slept = now.saturating_duration_since(since);
        self.window = if slept < self.max {
            (self.window * 2).max(STEP).min(self.max)
        } else if self.window / 2 < STEP {
            Duration::ZERO
        } else {
            self.window / 2
        };
    }

    fn set_awake(&mut self, awake: bool) {
        if awake != self.awake {
            self.awake = awake;
            if awake {
                self.readers.awake.fetch_add(1, Ordering::Relaxed);
            } else {
                self.readers.awake.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for BusyPoll {
    fn drop(&mut self) {
        self.set_awake(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    fn may_sleep(r: Readiness) -> bool {
        matches!(r, Readiness::MaySleep(_))
    }

    #[test]
    fn bytes_already_there_are_ready_and_an_empty_socket_may_sleep() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut p = BusyPoll::new(Duration::from_micros(20), AwakeReaders::new(1));
        assert!(may_sleep(p.before_read(b.as_raw_fd(), || true)));
        p.slept(Instant::now(), Instant::now());
        a.write_all(b"x").unwrap();
        assert_eq!(p.before_read(b.as_raw_fd(), || true), Readiness::Ready);
        // The end of the stream is ready too: the read returns at once.
        drop(a);
        let mut p = BusyPoll::new(Duration::from_micros(20), AwakeReaders::new(1));
        assert_eq!(p.before_read(b.as_raw_fd(), || true), Readiness::Ready);
    }

    #[test]
    fn nobody_polls_while_too_many_readers_are_awake_or_the_connection_is_busy() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(b"x").unwrap();
        let readers = AwakeReaders::new(1);
        let mut first = BusyPoll::new(Duration::from_secs(5), readers.clone());
        // Alone, a reader polls and sees the byte.
        assert_eq!(first.before_read(b.as_raw_fd(), || true), Readiness::Ready);
        // With requests of its connection still being served, it does not look.
        assert!(may_sleep(first.before_read(b.as_raw_fd(), || false)));
        first.slept(Instant::now(), Instant::now());
        // With a second reader awake, neither polls, however long its window.
        let mut second = BusyPoll::new(Duration::from_secs(5), readers.clone());
        assert_eq!(readers.awake.load(Ordering::Relaxed), 2);
        assert!(may_sleep(second.before_read(b.as_raw_fd(), || true)));
        // The second one is asleep now, so the first may poll again.
        assert_eq!(readers.awake.load(Ordering::Relaxed), 1);
        assert_eq!(first.before_read(b.as_raw_fd(), || true), Readiness::Ready);
        drop(first);
        drop(second);
        assert_eq!(readers.awake.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_zero_maximum_turns_polling_off() {
        let (_a, b) = UnixStream::pair().unwrap();
        let readers = AwakeReaders::new(1);
        let mut p = BusyPoll::new(Duration::ZERO, readers.clone());
        assert_eq!(p.before_read(b.as_raw_fd(), || true), Readiness::Off);
        assert_eq!(readers.awake.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn the_window_shrinks_to_zero_for_an_idle_client_and_grows_back_for_a_quick_one() {
        let max = Duration::from_micros(40);
        let mut p = BusyPoll::new(max, AwakeReaders::new(1));
        let t = Instant::now();
        for _ in 0..5 {
            p.slept(t, t + Duration::from_millis(1));
        }
        assert_eq!(p.window(), Duration::ZERO);
        p.slept(t, t + Duration::from_micros(10));
        assert_eq!(p.window(), STEP);
        for _ in 0..10 {
            p.slept(t, t + Duration::from_micros(10));
        }
        assert_eq!(p.window(), max);
    }
}
