//! virtio over MMIO: the transport and the devices behind it.
//!
//! Seam with the VM (owned by `vm.rs`): the VM picks an MMIO slot (`base`, `gsi`) for each
//! device, wraps it in an [`MmioTransport`], calls [`MmioTransport::register`] so KVM delivers
//! queue notifications (ioeventfd) and interrupts (irqfd) without a VM exit, maps the transport
//! on its MMIO bus, and announces it with `virtio_mmio.device=4K@<base>:<gsi>` on the command line.
//!
//! This module owns:
//! - [`mmio`]: the virtio-mmio version 2 register file, feature negotiation, the status state
//!   machine, queue setup validation and the per-device event thread that waits on queue
//!   notification eventfds;
//! - [`chain`]: the bounded, validating descriptor-chain walker shared by every device (a bad
//!   chain becomes an error, never a panic or an endless loop);
//! - [`console`]: virtio-console (device 3) carrying one output stream to a host sink;
//! - [`fuzz`]: the hostile-guest generator and oracles behind the `virtio-fuzz` loop and the
//!   cargo-fuzz target;
//! - [`fs9p`]: virtio-9p (device 9) handing requests to a [`p9::Server`] on a worker pool,
//!   with zero-copy file reads into guest buffers;
//! - [`block`]: virtio-blk (device 2) serving a [`disk::Image`], read-only by default;
//! - [`request`]: the request queue block and 9p share (activation, the drain loop, completion);
//! - the [`Interrupt`] line (interrupt status + irq eventfd + the device error state, including
//!   the report of a device thread that panicked) and the per-device [`DeviceStats`] counters.
//!
//! It does not create VMs, map buses or pick addresses: that is the VM's job.

pub mod block;
pub mod chain;
pub mod console;
pub mod fs9p;
pub mod fuzz;
pub mod mmio;
mod request;

#[cfg(test)]
mod tests;

pub use console::VirtioConsole;
pub use fs9p::Virtio9p;
pub use mmio::{ActivateContext, MmioTransport, QueueHandler, VirtioDevice, VirtioError};

use std::any::Any;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;

/// virtio device ID of a console.
pub const TYPE_CONSOLE: u32 = 3;
/// virtio device ID of a 9P transport.
pub const TYPE_9P: u32 = 9;

/// Feature bit: the device complies with virtio 1.0+ (required by this transport).
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// Feature bit: indirect descriptor tables.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
/// Feature bit: `used_event` / `avail_event` notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

/// Interrupt status bit: the device used a buffer.
pub const INT_USED_RING: u32 = 1;
/// Interrupt status bit: the configuration (or the device status) changed.
pub const INT_CONFIG: u32 = 2;

/// Per-device counters, updated lock-free by the event thread and the workers. Whether they
/// count is fixed when the transport is built ([`MmioTransport::with_stats`]) and reaches the
/// device through [`ActivateContext::stats`]. When off (the default), the hot paths test one
/// bool and do nothing else: no clock reads, no atomic adds.
#[derive(Debug, Default)]
pub struct DeviceStats {
    enabled: bool,
    notifications: AtomicU64,
    chains: AtomicU64,
    bytes: AtomicU64,
    service_ns: AtomicU64,
    /// Requests handed to workers, and the sum and peak over them of the requests in flight
    /// (itself included) when each was handed over: the concurrency the driver achieved.
    started: AtomicU64,
    in_flight_sum: AtomicU64,
    in_flight_peak: AtomicU64,
}

/// A started service-time measurement (a no-op when stats are off).
pub struct ServiceTimer(Option<Instant>);

impl DeviceStats {
    /// Counters that count only when `enabled`.
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            ..Self::default()
        }
    }

    /// Whether the counters count (the VM's statistics switch).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Counts one queue notification.
    pub fn notification(&self) {
        if self.enabled {
            self.notifications.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts one processed chain that moved `bytes` payload bytes.
    pub fn chain(&self, bytes: u64) {
        if self.enabled {
            self.chains.fetch_add(1, Ordering::Relaxed);
            self.bytes.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// Counts a request handed to a worker while `in_flight` requests (itself included) are
    /// being served.
    pub fn started(&self, in_flight: u64) {
        if self.enabled {
            self.started.fetch_add(1, Ordering::Relaxed);
            self.in_flight_sum.fetch_add(in_flight, Ordering::Relaxed);
            self.in_flight_peak.fetch_max(in_flight, Ordering::Relaxed);
        }
    }

    /// Starts timing a piece of device work.
    pub fn start(&self) -> ServiceTimer {
        ServiceTimer(self.enabled.then(Instant::now))
    }

    /// Adds the time since `timer` started to the service time.
    pub fn finish(&self, timer: ServiceTimer) {
        if let Some(start) = timer.0 {
            let ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
            self.service_ns.fetch_add(ns, Ordering::Relaxed);
        }
    }

    /// A consistent-enough copy of the counters.
    pub fn snapshot(&self, name: &'static str) -> VirtioStats {
        VirtioStats {
            name,
            notifications: self.notifications.load(Ordering::Relaxed),
            chains: self.chains.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            service_time: Duration::from_nanos(self.service_ns.load(Ordering::Relaxed)),
            requests: self.started.load(Ordering::Relaxed),
            in_flight_sum: self.in_flight_sum.load(Ordering::Relaxed),
            in_flight_peak: self.in_flight_peak.load(Ordering::Relaxed),
        }
    }
}

/// What one device did, as returned by [`MmioTransport::stats`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtioStats {
    /// The device's short name ("9p", "console").
    pub name: &'static str,
    /// Queue notifications received (ioeventfd or MMIO writes).
    pub notifications: u64,
    /// Descriptor chains completed.
    pub chains: u64,
    /// Payload bytes moved (request + reply bytes for 9p, output bytes for console).
    pub bytes: u64,
    /// Time spent serving chains (summed over worker threads for 9p).
    pub service_time: Duration,
    /// Requests handed to workers (request devices only: 9p, block).
    pub requests: u64,
    /// Over those requests, the sum of the requests in flight when each started.
    pub in_flight_sum: u64,
    /// The most requests in flight at once.
    pub in_flight_peak: u64,
}

impl VirtioStats {
    /// The mean number of requests in flight as each request started (1.0: the driver never
    /// had two at once), or None for a device without requests.
    pub fn mean_in_flight(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.in_flight_sum as f64 / self.requests as f64)
    }
}

impl fmt::Display for VirtioStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "virtio-{}: {} notifications, {} chains, {:.1} MiB, {:.3} ms service",
            self.name,
            self.notifications,
            self.chains,
            self.bytes as f64 / (1024.0 * 1024.0),
            self.service_time.as_secs_f64() * 1000.0
        )?;
        if let Some(mean) = self.mean_in_flight() {
            write!(
                f,
                ", in flight: mean {mean:.2}, peak {}",
                self.in_flight_peak
            )?;
        }
        Ok(())
    }
}

/// A device's interrupt line and error state: the interrupt status register, the eventfd that
/// KVM turns into a guest interrupt (irqfd), and the DEVICE_NEEDS_RESET flag.
#[derive(Debug)]
pub struct Interrupt {
    irq: EventFd,
    status: AtomicU32,
    needs_reset: AtomicBool,
    error_reported: AtomicBool,
    /// The first panic of a device thread, kept across resets for the run outcome.
    panic_report: Mutex<Option<String>>,
}

impl Interrupt {
    pub(crate) fn new() -> Result<Self, VirtioError> {
        Ok(Self {
            irq: EventFd::new(libc::EFD_NONBLOCK).map_err(VirtioError::EventFd)?,
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            error_reported: AtomicBool::new(false),
            panic_report: Mutex::new(None),
        })
    }

    /// Tells the driver that buffers were used.
    pub fn signal_used(&self) {
        self.raise(INT_USED_RING);
    }

    /// Puts the finished chain `head` (`len` bytes written) in the used ring of `queue` and
    /// interrupts the driver if it asked to be; a broken device adds nothing (false), a ring
    /// error breaks it. The caller holds the queue's lock.
    pub(crate) fn complete(
        &self,
        device: &str,
        queue: &mut virtio_queue::Queue,
        mem: &vm_memory::GuestMemoryMmap,
        head: u16,
        len: u32,
    ) -> bool {
        use virtio_queue::QueueT;
        if self.is_broken() {
            return false;
        }
        let result = queue
            .add_used(mem, head, len)
            .and_then(|()| queue.needs_notification(mem));
        match result {
            Ok(true) => self.signal_used(),
            Ok(false) => {}
            Err(e) => self.device_error(device, &chain::ChainError::Ring(e.to_string())),
        }
        true
    }

    /// Puts the device into its error state: sets DEVICE_NEEDS_RESET and raises a
    /// configuration-change interrupt. Only the first error is logged, so a misbehaving guest
    /// cannot flood the log.
    pub fn device_error(&self, device: &str, what: &dyn fmt::Display) {
        if self.enter_error_state() {
            log::error!("virtio-{device}: {what}; device stopped until the driver resets it");
        }
    }

    /// A device thread (the event thread or a worker) panicked: logs it, keeps the report for
    /// the run outcome and puts the device into its error state, as for [`Self::device_error`].
    /// The caller stops serving; the driver can reset the device and start it again.
    pub fn device_panicked(&self, device: &str, payload: &(dyn Any + Send)) {
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("no message");
        let report = format!(
            "virtio-{device}: a device thread panicked ({message}); the device was stopped \
             until the driver resets it; this is a bootbox bug"
        );
        log::error!("{report}");
        self.panic_report
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(report);
        self.enter_error_state();
    }

    /// The first panic of a device thread, if one panicked.
    pub fn panic_report(&self) -> Option<String> {
        self.panic_report
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Sets DEVICE_NEEDS_RESET and raises a configuration-change interrupt the first time;
    /// returns whether this was the first error since the last reset.
    fn enter_error_state(&self) -> bool {
        let first = !self.error_reported.swap(true, Ordering::AcqRel);
        if first {
            self.raise(INT_CONFIG);
        }
        // Published last, so whoever sees DEVICE_NEEDS_RESET also sees the interrupt.
        self.needs_reset.store(true, Ordering::Release);
        first
    }

    /// Whether the device is in its error state (stop processing queues).
    pub fn is_broken(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }

    /// The eventfd written on every interrupt (registered as an irqfd with KVM).
    pub fn eventfd(&self) -> &EventFd {
        &self.irq
    }

    /// The interrupt status register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    fn raise(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::AcqRel);
        if let Err(e) = self.irq.write(1) {
            log::warn!("virtio: cannot signal the interrupt eventfd: {e}");
        }
    }

    /// Sets the interrupt status register to a value saved in a snapshot (no interrupt is
    /// raised: a pending one is in the restored interrupt controller).
    pub(crate) fn restore_status(&self, bits: u32) {
        self.status
            .store(bits & (INT_USED_RING | INT_CONFIG), Ordering::Release);
    }

    fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    fn clear(&self) {
        self.status.store(0, Ordering::Release);
        self.needs_reset.store(false, Ordering::Release);
        self.error_reported.store(false, Ordering::Release);
        // Drop a pending count so a stale interrupt is not delivered after a reset.
        let _ = self.irq.read();
    }
}

/// Reads `data.len()` bytes of a device's configuration space `config` at `offset`; bytes past
/// its end read as zero (what the transport hands to every device's `read_config`).
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}
