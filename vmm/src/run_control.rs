//! How a run ends, as a narrow interface for whoever can end it: [`GuestExit`] says how the guest
//! finished and [`RunControl`] records the first outcome reported (by a vCPU, a device such as
//! the exit port, the timeout or a stop request) and wakes whoever waits for it. Devices depend
//! on this module, never on the VM.

use crate::error::VmError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use vmm_sys_util::eventfd::EventFd;

/// How the guest ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest wrote this status to the exit port.
    Status(u8),
    /// i8042 reset or a guest reboot without a status.
    Reset,
    /// `VmConfig::timeout` elapsed.
    Timeout,
    /// `StopHandle::stop` was called.
    Stopped,
}

/// How a run ends: the first outcome reported wins; everything after it is ignored.
pub struct RunControl {
    stopping: AtomicBool,
    stop_requested: AtomicBool,
    outcome: Mutex<Option<Result<GuestExit, VmError>>>,
    cond: Condvar,
    /// Readable once the run is ending; wakes the event loop.
    pub wake: EventFd,
}

impl RunControl {
    pub fn new() -> Result<Arc<Self>, VmError> {
        Ok(Arc::new(RunControl {
            stopping: AtomicBool::new(false),
            stop_requested: AtomicBool::new(false),
            outcome: Mutex::new(None),
            cond: Condvar::new(),
            wake: EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|e| VmError::Thread(format!("cannot create an eventfd: {e}")))?,
        }))
    }

    /// Reports how the run ends (ignored when an outcome is already known).
    pub fn finish(&self, outcome: Result<GuestExit, VmError>) {
        let mut slot = match self.outcome.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        if slot.is_none() {
            *slot = Some(outcome);
        }
        self.stopping.store(true, Ordering::SeqCst);
        self.cond.notify_all();
        let _ = self.wake.write(1);
    }

    /// Asks the event loop to end the run with [`GuestExit::Stopped`]. Async-signal-safe: an
    /// atomic store and an eventfd write, no locks.
    pub fn request_stop(&self) {
        self.stop_requested.store(true, Ordering::SeqCst);
        let _ = self.wake.write(1);
    }

    /// Whether [`RunControl::request_stop`] was called.
    pub fn stop_requested(&self) -> bool {
        self.stop_requested.load(Ordering::SeqCst)
    }

    /// Whether the run is ending.
    #[inline]
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Blocks until an outcome is reported and takes it.
    pub fn wait(&self) -> Result<GuestExit, VmError> {
        let mut slot = match self.outcome.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        loop {
            if let Some(outcome) = slot.take() {
                // Leave a marker so later finish() calls stay ignored.
                *slot = Some(Ok(GuestExit::Stopped));
                return outcome;
            }
            slot = match self.cond.wait(slot) {
                Ok(s) => s,
                Err(p) => p.into_inner(),
            };
        }
    }
}
