//! The virtio-mmio (version 2) transport: the register file a driver sees at a 4 KiB MMIO
//! window, feature negotiation, the device status state machine, queue setup validation, and
//! the event thread that turns queue notifications into calls on the device's
//! [`QueueHandler`].
//!
//! Notifications always arrive through one eventfd per queue: KVM writes it directly when the
//! VM registered an ioeventfd ([`MmioTransport::register`]), and an MMIO write to QueueNotify
//! (no ioeventfd, or unit tests) writes the same eventfd. Interrupts always leave through the
//! [`Interrupt`] eventfd, which KVM injects as `gsi` once registered as an irqfd. Every value
//! the guest controls is validated; a bad queue setup or chain is logged once and puts the
//! device into DEVICE_NEEDS_RESET, never panics the monitor. Register accesses that are merely
//! ignored (wrong width, wrong state) log at debug level only, so a guest cannot flood the log.

use super::{
    DeviceStats, Interrupt, VirtioStats, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::devices::bus::BusDevice;
use crate::snapshot::codec::{Decoder, Encoder};
use crate::snapshot::DecodeError;
use kvm_ioctls::{IoEventAddress, VmFd};
use std::os::fd::AsRawFd;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Errors of the virtio layer.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    #[error("cannot create an eventfd: {0}; check the process's open-file limit (ulimit -n)")]
    EventFd(#[source] std::io::Error),
    #[error(
        "cannot register the {what} with KVM: {source}; is the MMIO slot or GSI already in use?"
    )]
    Register {
        what: String,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot start the virtio-{device} event thread: {source}; check thread limits")]
    Thread {
        device: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("virtio-{device} offers no queues or an invalid queue size (must be a power of two, 1..=32768)")]
    BadQueues { device: &'static str },
    #[error("9p mount tag {tag:?} must be 1 to {max} bytes")]
    BadTag { tag: String, max: usize },
    #[error("virtio-{device} cannot start: {reason}")]
    Activate {
        device: &'static str,
        reason: String,
    },
}

/// A virtio device model (9p, console, ...), independent of the transport.
pub trait VirtioDevice: Send {
    /// virtio device ID (9 for 9p, 3 for console).
    fn device_type(&self) -> u32;
    /// Short name for logs, threads and stats ("9p", "console").
    fn name(&self) -> &'static str;
    /// Device-specific feature bits. The transport adds VIRTIO_F_VERSION_1,
    /// VIRTIO_RING_F_INDIRECT_DESC and VIRTIO_RING_F_EVENT_IDX itself.
    fn device_features(&self) -> u64;
    /// The maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads the device configuration space (offset relative to 0x100). Bytes beyond the
    /// configuration space read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space; the default ignores writes.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "virtio-{}: ignored config write of {} bytes at {offset:#x}",
            self.name(),
            data.len()
        );
    }
    /// Starts the device after DRIVER_OK. The returned handler runs on the transport's event
    /// thread; dropping it must stop all device work (wait for in-flight requests).
    fn activate(&mut self, ctx: ActivateContext) -> Result<Box<dyn QueueHandler>, VirtioError>;
    /// Returns the device to its initial state after the handler has been dropped.
    fn reset(&mut self) {}
}

/// Everything a device needs to serve its queues.
pub struct ActivateContext {
    /// Guest memory.
    pub mem: Arc<GuestMemoryMmap>,
    /// The queues, in index order, as the driver configured them (a queue the driver left
    /// unused has `ready() == false`).
    pub queues: Vec<Queue>,
    /// The features the driver accepted.
    pub features: u64,
    /// The interrupt line and the error state.
    pub interrupt: Arc<Interrupt>,
    /// The device's counters; [`DeviceStats::enabled`] is the VM's statistics switch.
    pub stats: Arc<DeviceStats>,
}

impl ActivateContext {
    /// Whether the driver accepted feature bit `bit`.
    pub fn has_feature(&self, bit: u32) -> bool {
        self.features & (1u64 << bit) != 0
    }
}

/// Serves queue notifications for an activated device, on the transport's event thread.
pub trait QueueHandler: Send {
    /// The driver notified queue `queue` (an index below the number of queues).
    fn notify(&mut self, queue: usize);
}

/// Largest queue size the virtio spec allows.
const MAX_QUEUE_SIZE: u16 = 32768;
const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x554d_4551; // same vendor value QEMU and Firecracker report

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
/// Offset of the QueueNotify register (the ioeventfd address is `base + QUEUE_NOTIFY`).
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_AVAIL_LOW: u64 = 0x090;
const REG_QUEUE_AVAIL_HIGH: u64 = 0x094;
const REG_QUEUE_USED_LOW: u64 = 0x0a0;
const REG_QUEUE_USED_HIGH: u64 = 0x0a4;
const REG_SHM_SEL: u64 = 0x0ac;
const REG_SHM_LEN_LOW: u64 = 0x0b0;
const REG_SHM_LEN_HIGH: u64 = 0x0b4;
const REG_SHM_BASE_LOW: u64 = 0x0b8;
const REG_SHM_BASE_HIGH: u64 = 0x0bc;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
/// Start of the device configuration space.
pub const CONFIG_SPACE: u64 = 0x100;
/// Size of the MMIO window of one device.
pub const MMIO_WINDOW: u64 = 0x1000;

/// Device status bits (virtio 1.2, 2.1).
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_DEVICE_NEEDS_RESET: u32 = 64;
pub const STATUS_FAILED: u32 = 128;

#[derive(Debug, Clone, Copy, Default)]
struct QueueConfig {
    max: u16,
    size: u16,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
    /// Where the device resumes in the rings (next available and next used index); zero
    /// except on a transport restored from a snapshot.
    next_index: u16,
}

fn set_low(v: &mut u64, low: u32) {
    *v = (*v & !0xffff_ffff) | u64::from(low);
}

fn set_high(v: &mut u64, high: u32) {
    *v = (*v & 0xffff_ffff) | (u64::from(high) << 32);
}

struct Running {
    stop: EventFd,
    thread: JoinHandle<()>,
}

struct State {
    device: Box<dyn VirtioDevice>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    bad_feature_page: bool,
    queue_sel: u32,
    queues: Vec<QueueConfig>,
    config_generation: u32,
    running: Option<Running>,
}

/// A virtio device behind the MMIO transport.
pub struct MmioTransport {
    state: Mutex<State>,
    mem: Arc<GuestMemoryMmap>,
    queue_evts: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
    stats: Arc<DeviceStats>,
    name: &'static str,
    device_type: u32,
    offered: u64,
}

impl MmioTransport {
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap) -> Result<Self, VirtioError> {
        let name = device.name();
        let sizes = device.queue_max_sizes();
        if sizes.is_empty()
            || sizes
                .iter()
                .any(|&s| s == 0 || !s.is_power_of_two() || s > MAX_QUEUE_SIZE)
        {
            return Err(VirtioError::BadQueues { device: name });
        }
        let queues = sizes
            .iter()
            .map(|&max| QueueConfig {
                max,
                ..QueueConfig::default()
            })
            .collect::<Vec<_>>();
        let queue_evts = (0..queues.len())
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map_err(VirtioError::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        let offered = device.device_features()
            | 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_RING_F_EVENT_IDX;
        Ok(Self {
            name,
            device_type: device.device_type(),
            offered,
            state: Mutex::new(State {
                device,
                status: 0,
                device_features_sel: 0,
                driver_features_sel: 0,
                driver_features: 0,
                bad_feature_page: false,
                queue_sel: 0,
                queues,
                config_generation: 0,
                running: None,
            }),
            mem: Arc::new(mem),
            queue_evts,
            interrupt: Arc::new(Interrupt::new()?),
            stats: Arc::new(DeviceStats::default()),
        })
    }

    /// Registers queue notifications (ioeventfd at `base + 0x50`) and the interrupt (irqfd on
    /// `gsi`) with KVM.
    pub fn register(&self, vm: &VmFd, base: u64, gsi: u32) -> Result<(), VirtioError> {
        let notify = IoEventAddress::Mmio(base + REG_QUEUE_NOTIFY);
        for (index, evt) in self.queue_evts.iter().enumerate() {
            // The datamatch is a u32, so KVM matches 4-byte writes of exactly `index`.
            let datamatch = u32::try_from(index).unwrap_or(u32::MAX);
            vm.register_ioevent(evt, &notify, datamatch)
                .map_err(|source| VirtioError::Register {
                    what: format!(
                        "virtio-{} queue {index} notification at {:#x}",
                        self.name,
                        base + REG_QUEUE_NOTIFY
                    ),
                    source,
                })?;
        }
        vm.register_irqfd(self.interrupt.eventfd(), gsi)
            .map_err(|source| VirtioError::Register {
                what: format!("virtio-{} interrupt on GSI {gsi}", self.name),
                source,
            })
    }

    /// The device's short name ("9p", "console").
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Turns the device's counters on or off (off after [`MmioTransport::new`]); the device
    /// sees the switch in [`ActivateContext::stats`].
    pub fn with_stats(mut self, enabled: bool) -> Self {
        self.stats = Arc::new(DeviceStats::new(enabled));
        self
    }

    /// The device's counters (all zero unless turned on with [`MmioTransport::with_stats`]).
    pub fn stats(&self) -> VirtioStats {
        self.stats.snapshot(self.name)
    }

    /// Why the device was stopped, if one of its threads panicked during the run.
    pub fn panic_report(&self) -> Option<String> {
        self.interrupt.panic_report()
    }

    /// The interrupt eventfd (KVM's irqfd; tests read it to see interrupts).
    pub fn interrupt_evt(&self) -> &EventFd {
        self.interrupt.eventfd()
    }

    /// The notification eventfd of each queue (KVM's ioeventfds).
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device status as the driver reads it (including DEVICE_NEEDS_RESET).
    pub fn device_status(&self) -> u32 {
        let status = self.lock().status;
        self.status_with_error(status)
    }

    /// Stops the device's event thread and waits for in-flight work, flushing device output.
    /// Call this before exiting so the last output is not lost; the device can be re-started
    /// only by a driver reset.
    pub fn shutdown(&self) {
        let mut state = self.lock();
        stop(&mut state);
    }

    /// The transport's state for a snapshot: the registers the driver set (status, features,
    /// selectors, configuration generation), the interrupt status and, per queue, its size,
    /// readiness, ring addresses and the index the device resumes at. Stops the device's event
    /// thread first (in-flight work completes, so every chain it took is in the used ring and
    /// the used index in guest memory is where the device stands); call it on a stopped VM
    /// that is being snapshotted, not on one that goes on running.
    pub fn save_state(&self) -> Vec<u8> {
        let mut state = self.lock();
        stop(&mut state);
        let mut e = Encoder::default();
        for v in [
            state.status,
            state.device_features_sel,
            state.driver_features_sel,
            state.queue_sel,
            state.config_generation,
            self.interrupt.status(),
        ] {
            e.u32(v);
        }
        e.u64(state.driver_features);
        e.u32(state.queues.len() as u32);
        for q in &state.queues {
            let next = if q.ready {
                self.mem
                    .read_obj::<u16>(GuestAddress(q.used.wrapping_add(2)))
                    .unwrap_or(0)
            } else {
                0
            };
            e.u32(u32::from(q.size));
            e.u8(u8::from(q.ready));
            e.u64(q.desc);
            e.u64(q.avail);
            e.u64(q.used);
            e.u32(u32::from(next));
        }
        e.into_bytes()
    }

    /// Puts a fresh transport (same device, same memory layout) into a state saved by
    /// [`MmioTransport::save_state`] and, when the driver had started it, starts the device on
    /// the restored queues. Everything is validated first (queue count and sizes against this
    /// device, ring addresses against guest memory, accepted features against the offered
    /// ones); bad bytes are an error and leave the transport untouched.
    pub fn restore_state(&self, bytes: &[u8]) -> Result<(), DecodeError> {
        let mut d = Decoder::new(bytes);
        let mut regs = [0u32; 6];
        for (i, r) in regs.iter_mut().enumerate() {
            *r = d.u32(&format!("virtio-{} register {i}", self.name))?;
        }
        let [status, device_features_sel, driver_features_sel, queue_sel, config_generation, interrupt_status] =
            regs;
        let driver_features = d.u64("driver features")?;
        let mut state = self.lock();
        if state.status != 0 || state.running.is_some() {
            return Err(DecodeError::new(
                format!("virtio-{} state", self.name),
                "can only be restored into a transport the driver has not touched",
            ));
        }
        let count = d.u32("queue count")? as usize;
        if count != state.queues.len() {
            return Err(DecodeError::new(
                format!("virtio-{} queue count", self.name),
                format!("{count} saved, the device has {}", state.queues.len()),
            ));
        }
        let mut queues = state.queues.clone();
        for (i, q) in queues.iter_mut().enumerate() {
            let what = format!("virtio-{} queue {i}", self.name);
            let size = d.u32(&what)?;
            q.size = u16::try_from(size)
                .ok()
                .filter(|&s| s <= q.max)
                .ok_or_else(|| DecodeError::new(&what, format!("size {size} above {}", q.max)))?;
            q.ready = d.u8(&what)? != 0;
            q.desc = d.u64(&what)?;
            q.avail = d.u64(&what)?;
            q.used = d.u64(&what)?;
            let next = d.u32(&what)?;
            q.next_index = u16::try_from(next)
                .map_err(|_| DecodeError::new(&what, format!("ring index {next}")))?;
            if q.ready {
                validate_queue(&self.mem, q, 1).map_err(|why| DecodeError::new(&what, why))?;
            }
        }
        d.finish(&format!("virtio-{} state", self.name))?;
        if driver_features & !self.offered != 0 {
            return Err(DecodeError::new(
                format!("virtio-{} driver features", self.name),
                format!(
                    "{driver_features:#x} were not all offered ({:#x})",
                    self.offered
                ),
            ));
        }
        state.queues = queues;
        state.device_features_sel = device_features_sel;
        state.driver_features_sel = driver_features_sel;
        state.driver_features = driver_features;
        state.queue_sel = queue_sel;
        state.config_generation = config_generation;
        self.interrupt.restore_status(interrupt_status);
        state.status = status;
        if status & STATUS_DRIVER_OK != 0 && status & STATUS_FAILED == 0 {
            self.activate(&mut state);
            if self.interrupt.is_broken() {
                return Err(DecodeError::new(
                    format!("virtio-{}", self.name),
                    "the device could not be started on the restored queues",
                ));
            }
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the registers inconsistent in a way that
        // matters more than stopping the VMM would, so keep going with the inner value.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn status_with_error(&self, status: u32) -> u32 {
        if self.interrupt.is_broken() {
            status | STATUS_DEVICE_NEEDS_RESET
        } else {
            status
        }
    }

    fn setup_error(&self, what: &dyn std::fmt::Display) {
        self.interrupt.device_error(self.name, what);
    }

    fn read_reg(&self, state: &State, offset: u64) -> u32 {
        let queue = state.queues.get(state.queue_sel as usize);
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device_type,
            REG_VENDOR_ID => VENDOR,
            REG_DEVICE_FEATURES => match state.device_features_sel {
                0 => self.offered as u32,
                1 => (self.offered >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max)),
            REG_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready)),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status_with_error(state.status),
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH => u32::MAX, // no shared memory regions
            REG_SHM_BASE_LOW | REG_SHM_BASE_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => state.config_generation,
            _ => {
                log::debug!(
                    "virtio-{}: read of write-only/unknown register {offset:#x}",
                    self.name
                );
                0
            }
        }
    }

    fn queue_setup_allowed(&self, state: &State, offset: u64) -> bool {
        let ok = state.status & STATUS_FEATURES_OK != 0 && state.status & STATUS_DRIVER_OK == 0;
        if !ok {
            log::debug!(
                "virtio-{}: queue register {offset:#x} written in status {:#x}; ignored",
                self.name,
                state.status
            );
        }
        ok
    }

    fn write_reg(&self, state: &mut State, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => state.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => state.driver_features_sel = value,
            REG_DRIVER_FEATURES => {
                if state.status & STATUS_DRIVER == 0 || state.status & STATUS_FEATURES_OK != 0 {
                    log::debug!(
                        "virtio-{}: driver features written in status {:#x}; ignored",
                        self.name,
                        state.status
                    );
                    return;
                }
                match state.driver_features_sel {
                    0 => set_low(&mut state.driver_features, value),
                    1 => set_high(&mut state.driver_features, value),
                    _ if value != 0 => state.bad_feature_page = true,
                    _ => {}
                }
            }
            REG_QUEUE_SEL => state.queue_sel = value,
            REG_QUEUE_NOTIFY => self.notify_from_mmio(value),
            REG_INTERRUPT_ACK => self.interrupt.ack(value),
            REG_STATUS => self.write_status(state, value),
            REG_QUEUE_NUM | REG_QUEUE_READY | REG_QUEUE_DESC_LOW | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_AVAIL_LOW | REG_QUEUE_AVAIL_HIGH | REG_QUEUE_USED_LOW
            | REG_QUEUE_USED_HIGH => self.write_queue_reg(state, offset, value),
            REG_SHM_SEL => {}
            _ => log::debug!(
                "virtio-{}: write of read-only/unknown register {offset:#x}",
                self.name
            ),
        }
    }

    fn write_queue_reg(&self, state: &mut State, offset: u64, value: u32) {
        if offset == REG_QUEUE_READY && value == 0 {
            // Linux deactivates queues this way when tearing down, in any state, and checks
            // that QueueReady reads back 0. It never affects a running device's own queue copy.
            if let Some(q) = state.queues.get_mut(state.queue_sel as usize) {
                q.ready = false;
            }
            return;
        }
        if !self.queue_setup_allowed(state, offset) {
            return;
        }
        let sel = state.queue_sel;
        let Some(q) = state.queues.get_mut(sel as usize) else {
            log::debug!(
                "virtio-{}: queue {sel} does not exist; write ignored",
                self.name
            );
            return;
        };
        if q.ready && offset != REG_QUEUE_READY {
            log::debug!(
                "virtio-{}: queue {sel} register {offset:#x} written while the queue is ready; ignored",
                self.name
            );
            return;
        }
        match offset {
            REG_QUEUE_NUM => q.size = u16::try_from(value).unwrap_or(0),
            REG_QUEUE_DESC_LOW => set_low(&mut q.desc, value),
            REG_QUEUE_DESC_HIGH => set_high(&mut q.desc, value),
            REG_QUEUE_AVAIL_LOW => set_low(&mut q.avail, value),
            REG_QUEUE_AVAIL_HIGH => set_high(&mut q.avail, value),
            REG_QUEUE_USED_LOW => set_low(&mut q.used, value),
            REG_QUEUE_USED_HIGH => set_high(&mut q.used, value),
            REG_QUEUE_READY => {
                let q = *q;
                match validate_queue(&self.mem, &q, value) {
                    Ok(()) => {
                        if let Some(q) = state.queues.get_mut(sel as usize) {
                            q.ready = true;
                        }
                    }
                    Err(why) => self.setup_error(&format!("queue {sel}: {why}")),
                }
            }
            _ => {}
        }
    }

    fn notify_from_mmio(&self, value: u32) {
        match self.queue_evts.get(value as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    log::warn!("virtio-{}: cannot signal queue {value}: {e}", self.name);
                }
            }
            None => log::debug!(
                "virtio-{}: notification for queue {value}, which does not exist",
                self.name
            ),
        }
    }

    fn write_status(&self, state: &mut State, value: u32) {
        // DEVICE_NEEDS_RESET is the device's bit; drivers echo it back when they OR in theirs.
        let value = value & !STATUS_DEVICE_NEEDS_RESET;
        if value == 0 {
            self.reset(state);
            return;
        }
        let old = state.status;
        if value & STATUS_FAILED != 0 {
            log::warn!(
                "virtio-{}: the driver gave up on the device (FAILED)",
                self.name
            );
            state.status |= STATUS_FAILED;
            return;
        }
        if value & old != old {
            log::debug!(
                "virtio-{}: status {value:#x} clears bits of {old:#x} without a reset; ignored",
                self.name
            );
            return;
        }
        let mut status = old;
        for bit in [
            STATUS_ACKNOWLEDGE,
            STATUS_DRIVER,
            STATUS_FEATURES_OK,
            STATUS_DRIVER_OK,
        ] {
            if value & bit == 0 || status & bit != 0 {
                continue;
            }
            let prerequisite = match bit {
                STATUS_ACKNOWLEDGE => true,
                STATUS_DRIVER => status & STATUS_ACKNOWLEDGE != 0,
                STATUS_FEATURES_OK => status & STATUS_DRIVER != 0,
                _ => status & STATUS_FEATURES_OK != 0,
            };
            if !prerequisite {
                log::debug!(
                    "virtio-{}: status bit {bit:#x} set out of order (status {status:#x}); ignored",
                    self.name
                );
                break;
            }
            if bit == STATUS_FEATURES_OK && !self.features_acceptable(state) {
                // Leaving FEATURES_OK clear tells the driver the subset was refused.
                break;
            }
            status |= bit;
            if bit == STATUS_DRIVER_OK {
                state.status = status;
                self.activate(state);
                return;
            }
        }
        let unknown =
            value & !(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        if unknown != 0 {
            log::warn!(
                "virtio-{}: unknown status bits {unknown:#x} ignored",
                self.name
            );
        }
        state.status = status;
    }

    fn features_acceptable(&self, state: &State) -> bool {
        let unoffered = state.driver_features & !self.offered;
        if unoffered != 0 || state.bad_feature_page {
            log::warn!(
                "virtio-{}: driver accepted features {unoffered:#x} that were not offered",
                self.name
            );
            return false;
        }
        if state.driver_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            log::warn!(
                "virtio-{}: driver did not accept VIRTIO_F_VERSION_1 (legacy drivers are not supported)",
                self.name
            );
            return false;
        }
        true
    }

    fn activate(&self, state: &mut State) {
        if self.interrupt.is_broken() {
            log::warn!(
                "virtio-{}: DRIVER_OK while the device needs a reset; not started",
                self.name
            );
            return;
        }
        let event_idx = state.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::with_capacity(state.queues.len());
        for cfg in &state.queues {
            match build_queue(cfg, event_idx) {
                Ok(q) => queues.push(q),
                Err(why) => {
                    self.setup_error(&why);
                    return;
                }
            }
        }
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues,
            features: state.driver_features,
            interrupt: self.interrupt.clone(),
            stats: self.stats.clone(),
        };
        let handler = match state.device.activate(ctx) {
            Ok(h) => h,
            Err(e) => {
                self.setup_error(&e);
                return;
            }
        };
        match self.spawn(handler) {
            Ok(running) => state.running = Some(running),
            Err(e) => self.setup_error(&e),
        }
    }

    fn spawn(&self, mut handler: Box<dyn QueueHandler>) -> Result<Running, VirtioError> {
        let thread_err = |source| VirtioError::Thread {
            device: self.name,
            source,
        };
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(VirtioError::EventFd)?;
        let stop_evt = stop.try_clone().map_err(VirtioError::EventFd)?;
        let evts = self
            .queue_evts
            .iter()
            .map(|e| e.try_clone().map_err(VirtioError::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        let stats = self.stats.clone();
        let interrupt = self.interrupt.clone();
        let name = self.name;
        let thread = std::thread::Builder::new()
            .name(format!("virtio-{name}"))
            .spawn(move || {
                crate::sandbox::enter_thread(crate::sandbox::ThreadRole::Device);
                let served = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    event_loop(name, &evts, &stop_evt, &stats, handler.as_mut())
                }));
                if let Err(payload) = served {
                    // The thread stops serving; the device waits in DEVICE_NEEDS_RESET.
                    interrupt.device_panicked(name, &*payload);
                }
                // Dropping the handler here waits for in-flight work before the join returns.
                drop(handler);
            })
            .map_err(thread_err)?;
        Ok(Running { stop, thread })
    }

    fn reset(&self, state: &mut State) {
        stop(state);
        state.device.reset();
        state.status = 0;
        state.device_features_sel = 0;
        state.driver_features_sel = 0;
        state.driver_features = 0;
        state.bad_feature_page = false;
        state.queue_sel = 0;
        for q in &mut state.queues {
            *q = QueueConfig {
                max: q.max,
                ..QueueConfig::default()
            };
        }
        for evt in &self.queue_evts {
            let _ = evt.read(); // forget notifications sent before the reset
        }
        self.interrupt.clear();
    }
}

fn stop(state: &mut State) {
    if let Some(running) = state.running.take() {
        if let Err(e) = running.stop.write(1) {
            log::error!("virtio: cannot stop the event thread: {e}");
            return;
        }
        if running.thread.join().is_err() {
            log::error!("virtio: the device event thread panicked");
        }
    }
}

fn validate_queue(mem: &GuestMemoryMmap, q: &QueueConfig, ready: u32) -> Result<(), String> {
    if ready != 1 {
        return Err(format!("QueueReady written with {ready}, expected 0 or 1"));
    }
    if q.size == 0 || !q.size.is_power_of_two() || q.size > q.max {
        return Err(format!(
            "size {} is not a power of two between 1 and {}",
            q.size, q.max
        ));
    }
    let n = u64::from(q.size);
    let areas = [
        ("descriptor table", q.desc, 16, 16 * n),
        ("available ring", q.avail, 2, 6 + 2 * n),
        ("used ring", q.used, 4, 6 + 8 * n),
    ];
    for (what, addr, align, len) in areas {
        if addr & (align - 1) != 0 {
            return Err(format!("{what} at {addr:#x} is not {align}-byte aligned"));
        }
        if !mem.check_range(GuestAddress(addr), len as usize) {
            return Err(format!("{what} {addr:#x}+{len:#x} is outside guest memory"));
        }
    }
    Ok(())
}

fn build_queue(cfg: &QueueConfig, event_idx: bool) -> Result<Queue, String> {
    let mut q = Queue::new(cfg.max).map_err(|e| format!("queue: {e}"))?;
    if !cfg.ready {
        return Ok(q); // unused by the driver; the device ignores it
    }
    q.try_set_size(cfg.size)
        .map_err(|e| format!("queue size: {e}"))?;
    q.try_set_desc_table_address(GuestAddress(cfg.desc))
        .map_err(|e| format!("descriptor table: {e}"))?;
    q.try_set_avail_ring_address(GuestAddress(cfg.avail))
        .map_err(|e| format!("available ring: {e}"))?;
    q.try_set_used_ring_address(GuestAddress(cfg.used))
        .map_err(|e| format!("used ring: {e}"))?;
    q.set_event_idx(event_idx);
    q.set_next_avail(cfg.next_index);
    q.set_next_used(cfg.next_index);
    q.set_ready(true);
    Ok(q)
}

fn event_loop(
    name: &str,
    evts: &[EventFd],
    stop: &EventFd,
    stats: &DeviceStats,
    handler: &mut dyn QueueHandler,
) {
    let mut fds: Vec<libc::pollfd> = evts
        .iter()
        .chain(std::iter::once(stop))
        .map(|e| libc::pollfd {
            fd: e.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `fds` is a valid, exclusively borrowed array of `fds.len()` pollfd structs
        // whose descriptors stay open for the whole call (owned by `evts` and `stop`).
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("virtio-{name}: poll failed: {err}; device stopped");
            return;
        }
        if fds.last().is_some_and(|f| f.revents != 0) {
            return;
        }
        for (index, (fd, evt)) in fds.iter().zip(evts).enumerate() {
            if fd.revents & libc::POLLIN != 0 && evt.read().is_ok() {
                stats.notification();
                handler.notify(index);
            }
        }
    }
}

impl Drop for MmioTransport {
    fn drop(&mut self) {
        let mut state = self.lock();
        stop(&mut state);
    }
}

impl BusDevice for MmioTransport {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let state = self.lock();
        if offset >= CONFIG_SPACE {
            state.device.read_config(offset - CONFIG_SPACE, data);
            return;
        }
        if data.len() != 4 || offset & 3 != 0 {
            log::debug!(
                "virtio-{}: {}-byte read at register {offset:#x}; registers are 32-bit",
                self.name,
                data.len()
            );
            data.fill(0);
            return;
        }
        let value = self.read_reg(&state, offset);
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let mut state = self.lock();
        if offset >= CONFIG_SPACE {
            state.device.write_config(offset - CONFIG_SPACE, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            log::debug!(
                "virtio-{}: {}-byte write at register {offset:#x}; registers are 32-bit",
                self.name,
                data.len()
            );
            return;
        };
        if offset & 3 != 0 {
            log::debug!(
                "virtio-{}: unaligned register write at {offset:#x}",
                self.name
            );
            return;
        }
        let value = u32::from_le_bytes(bytes);
        self.write_reg(&mut state, offset, value);
    }
}
