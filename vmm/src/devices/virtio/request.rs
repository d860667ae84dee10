//! The request queue of the single-queue request devices (virtio-blk, virtio-9p): taken from
//! the driver at activation, drained on the event thread when the driver notifies it, and
//! completed from whichever worker served each request, and a reset or shutdown waits for the
//! requests still being served. The devices own what a request means; this module owns the
//! ring work and the in-flight count they share.

use super::chain::{self, Chain, ChainError};
use super::mmio::{ActivateContext, VirtioError};
use super::{DeviceStats, Interrupt, ServiceTimer, VIRTIO_RING_F_INDIRECT_DESC};
use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// How long a reset or shutdown waits for in-flight requests before abandoning them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// An activated device's request queue (queue 0) and what serving it needs.
pub(crate) struct RequestQueue {
    /// Guest memory.
    pub mem: Arc<GuestMemoryMmap>,
    queue: Mutex<Queue>,
    /// The interrupt line and the device's error state.
    pub interrupt: Arc<Interrupt>,
    /// The device's counters.
    pub stats: Arc<DeviceStats>,
    /// The device's name in log lines and errors.
    device: &'static str,
    /// The driver accepted indirect descriptors.
    indirect_ok: bool,
    /// Requests handed to workers and not yet served; `idle` is signalled when it drops to 0.
    inflight: Mutex<usize>,
    idle: Condvar,
}

/// Counts a started request finished when dropped, also when its worker unwinds.
pub(crate) struct Serving<'a>(&'a RequestQueue);

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        let mut n = self.0.inflight.lock().unwrap_or_else(|e| e.into_inner());
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.0.idle.notify_all();
        }
    }
}

impl RequestQueue {
    /// Takes queue 0, which the driver must have set up, and the rest of what serving it
    /// needs from `ctx`; `device` names the device in errors.
    pub fn activate(ctx: ActivateContext, device: &'static str) -> Result<Self, VirtioError> {
        let indirect_ok = ctx.has_feature(VIRTIO_RING_F_INDIRECT_DESC);
        let queue = ctx
            .queues
            .into_iter()
            .next()
            .filter(|q| q.ready())
            .ok_or_else(|| VirtioError::Activate {
                device,
                reason: "the driver did not set up the request queue".into(),
            })?;
        Ok(Self {
            mem: ctx.mem,
            queue: Mutex::new(queue),
            interrupt: ctx.interrupt,
            stats: ctx.stats,
            device,
            indirect_ok,
            inflight: Mutex::new(0),
            idle: Condvar::new(),
        })
    }

    /// Counts a request about to be handed to a worker, on the event thread (so that a reset
    /// right after it waits for it); the worker holds [`Self::serving`] while it serves it.
    pub fn started(&self) {
        let mut n = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        *n += 1;
        self.stats.started(*n as u64);
    }

    /// Held by the worker serving a [started](Self::started) request.
    pub fn serving(&self) -> Serving<'_> {
        Serving(self)
    }

    /// Waits until every started request is served, so that none touches guest memory after a
    /// reset or shutdown completes; after [`DRAIN_TIMEOUT`] it logs and abandons them.
    pub fn wait_idle(&self) {
        let n = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        let (n, timeout) = self
            .idle
            .wait_timeout_while(n, DRAIN_TIMEOUT, |n| *n > 0)
            .unwrap_or_else(|e| e.into_inner());
        if timeout.timed_out() {
            log::error!(
                "virtio-{}: {} requests still running after {DRAIN_TIMEOUT:?}; abandoning them",
                self.device,
                *n
            );
        }
    }

    /// Puts the device into its error state (see [`Interrupt::device_error`]).
    pub fn error(&self, what: &dyn fmt::Display) {
        self.interrupt.device_error(self.device, what);
    }

    /// Serves a notification of queue `queue`: unless it is another queue or the device is
    /// broken, drains the request queue (see [`drain_requests`]) into `each`; an error breaks
    /// the device.
    pub fn notified(
        &self,
        queue: usize,
        heads: &mut Vec<u16>,
        each: impl FnMut(Chain) -> Result<(), ChainError>,
    ) {
        if queue != 0 || self.interrupt.is_broken() {
            return;
        }
        if let Err(e) = drain_requests(&self.queue, &self.mem, heads, self.indirect_ok, each) {
            self.error(&e);
        }
    }

    /// Completes a served request: puts chain `head` (`len` bytes written) in the used ring,
    /// interrupting the driver if it asked to be, and if it was added (the device is not
    /// broken) counts the chain's `bytes` and the service time since `timer`.
    pub fn complete(&self, head: u16, len: u32, bytes: u64, timer: ServiceTimer) {
        let added = self.interrupt.complete(
            self.device,
            &mut lock_queue(&self.queue),
            &self.mem,
            head,
            len,
        );
        if added {
            self.stats.chain(bytes);
            self.stats.finish(timer);
        }
    }
}

/// Locks a device's request queue; a worker that panicked while holding it left the ring
/// indexes consistent (every update is a single store), so a poisoned lock is taken as is.
fn lock_queue(queue: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    queue.lock().unwrap_or_else(|e| e.into_inner())
}

/// Serves a request queue's notification: takes batch after batch of available heads (into
/// `heads`, reused between calls, by [`chain::next_batch`]), walks each chain (`indirect_ok`:
/// the driver accepted indirect descriptors) and hands it to `each`, until the ring is empty
/// with notifications back on. The queue lock is held only while popping, so `each` may hand
/// chains to workers that complete them. The first error, from the ring, a walk or `each`,
/// ends the drain.
pub(crate) fn drain_requests(
    queue: &Mutex<Queue>,
    mem: &GuestMemoryMmap,
    heads: &mut Vec<u16>,
    indirect_ok: bool,
    mut each: impl FnMut(Chain) -> Result<(), ChainError>,
) -> Result<(), ChainError> {
    loop {
        let (desc_table, size) = {
            let mut queue = lock_queue(queue);
            if !chain::next_batch(&mut queue, mem, heads)? {
                return Ok(());
            }
            (GuestAddress(queue.desc_table()), queue.size())
        };
        for &head in heads.iter() {
            each(chain::walk(mem, desc_table, size, head, indirect_ok)?)?;
        }
    }
}
