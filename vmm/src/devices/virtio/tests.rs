//! Unit tests of the virtio layer, driven by a fake driver that lays out split rings in a
//! `GuestMemoryMmap` and talks to the transport only through `BusDevice` reads and writes (and
//! the eventfds KVM would use). No KVM needed.

use super::chain::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use super::fs9p::RequestHandler;
use super::mmio::*;
use super::*;
use crate::devices::bus::BusDevice;
use p9::{ReplyBuf, WorkerPool};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// virtio-blk's tests: a child module, so they drive the same fake driver.
#[path = "block_tests.rs"]
mod block_tests;

const MEM_SIZE: usize = 32 << 20;
/// Data buffers live above the rings.
const DATA: u64 = 0x10_0000;
/// Guard against hangs only; never a performance threshold.
const HANG: Duration = Duration::from_secs(20);

const F_VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
const F_INDIRECT: u64 = 1 << VIRTIO_RING_F_INDIRECT_DESC;
const F_EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

#[derive(Clone, Copy)]
struct Ring {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_avail: u16,
    next_desc: u16,
}

/// A minimal split-ring virtio driver.
struct Driver {
    t: Arc<MmioTransport>,
    mem: GuestMemoryMmap,
    rings: Vec<Ring>,
}

impl Driver {
    fn new(device: Box<dyn VirtioDevice>) -> Self {
        Self::with_stats(device, false)
    }

    fn with_stats(device: Box<dyn VirtioDevice>, stats: bool) -> Self {
        let mem = memory();
        let t = Arc::new(
            MmioTransport::new(device, mem.clone())
                .unwrap()
                .with_stats(stats),
        );
        Driver {
            t,
            mem,
            rings: Vec::new(),
        }
    }

    fn r32(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w32(&self, off: u64, v: u32) {
        self.t.write(off, &v.to_le_bytes());
    }

    fn status(&self) -> u32 {
        self.r32(0x70)
    }

    fn add_status(&self, bit: u32) {
        self.w32(0x70, self.status() | bit);
    }

    fn device_features(&self) -> u64 {
        self.w32(0x14, 0);
        let lo = self.r32(0x10);
        self.w32(0x14, 1);
        let hi = self.r32(0x10);
        u64::from(lo) | u64::from(hi) << 32
    }

    fn write_features(&self, f: u64) {
        self.w32(0x24, 0);
        self.w32(0x20, f as u32);
        self.w32(0x24, 1);
        self.w32(0x20, (f >> 32) as u32);
    }

    /// Reset, ACKNOWLEDGE, DRIVER, features; returns whether FEATURES_OK stuck.
    fn negotiate(&mut self, features: u64) -> bool {
        self.w32(0x70, 0);
        self.rings.clear();
        self.add_status(STATUS_ACKNOWLEDGE);
        self.add_status(STATUS_DRIVER);
        self.write_features(features);
        self.add_status(STATUS_FEATURES_OK);
        self.status() & STATUS_FEATURES_OK != 0
    }

    fn program_queue(&self, q: u32, size: u16, desc: u64, avail: u64, used: u64) {
        self.w32(0x30, q);
        self.w32(0x38, u32::from(size));
        self.w32(0x80, desc as u32);
        self.w32(0x84, (desc >> 32) as u32);
        self.w32(0x90, avail as u32);
        self.w32(0x94, (avail >> 32) as u32);
        self.w32(0xa0, used as u32);
        self.w32(0xa4, (used >> 32) as u32);
        self.w32(0x44, 1);
    }

    /// Rings of queue q at 0x10000 * (q + 1): descriptors, then avail, then used ring.
    fn setup_queue(&mut self, q: u32, size: u16) {
        // Like a driver: never more entries than the device offers for this queue.
        self.w32(0x30, q);
        let size = size.min(self.r32(0x34) as u16);
        let base = 0x1_0000 * (u64::from(q) + 1);
        let ring = Ring {
            size,
            desc: base,
            avail: base + 0x4000,
            used: base + 0x8000,
            next_avail: 0,
            next_desc: 0,
        };
        for off in (0..0xc000).step_by(8) {
            self.mem.write_obj(0u64, GuestAddress(base + off)).unwrap();
        }
        self.program_queue(q, size, ring.desc, ring.avail, ring.used);
        assert_eq!(self.r32(0x44), 1, "queue {q} ready");
        let idx = q as usize;
        if self.rings.len() <= idx {
            self.rings.resize(idx + 1, ring);
        }
        self.rings[idx] = ring;
    }

    /// Full bring-up with `features` and `queues` queues of `size`.
    fn start(&mut self, features: u64, queues: u32, size: u16) {
        assert!(self.negotiate(features));
        for q in 0..queues {
            self.setup_queue(q, size);
        }
        self.add_status(STATUS_DRIVER_OK);
        assert_eq!(self.status() & STATUS_DRIVER_OK, STATUS_DRIVER_OK);
    }

    fn write_desc(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let a = table + 16 * u64::from(i);
        self.mem.write_obj(addr, GuestAddress(a)).unwrap();
        self.mem.write_obj(len, GuestAddress(a + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(a + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(a + 14)).unwrap();
    }

    /// Writes a chain of (addr, len, device-writable) buffers into free descriptors; returns
    /// the head (not yet published).
    fn chain(&mut self, q: usize, bufs: &[(u64, u32, bool)]) -> u16 {
        let r = self.rings[q];
        let head = r.next_desc;
        for (k, &(addr, len, writable)) in bufs.iter().enumerate() {
            let i = (head + k as u16) % r.size;
            let last = k + 1 == bufs.len();
            let mut flags = if writable { VRING_DESC_F_WRITE } else { 0 };
            if !last {
                flags |= VRING_DESC_F_NEXT;
            }
            self.write_desc(r.desc, i, addr, len, flags, (i + 1) % r.size);
        }
        self.rings[q].next_desc = (head + bufs.len() as u16) % r.size;
        head
    }

    fn publish(&mut self, q: usize, head: u16) {
        let r = self.rings[q];
        let slot = r.avail + 4 + 2 * u64::from(r.next_avail % r.size);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        let idx = r.next_avail.wrapping_add(1);
        self.mem.write_obj(idx, GuestAddress(r.avail + 2)).unwrap();
        self.rings[q].next_avail = idx;
    }

    fn set_avail_idx(&mut self, q: usize, idx: u16) {
        let r = self.rings[q];
        self.mem.write_obj(idx, GuestAddress(r.avail + 2)).unwrap();
    }

    fn kick(&self, q: u32) {
        self.w32(REG_QUEUE_NOTIFY, q);
    }

    fn used_idx(&self, q: usize) -> u16 {
        self.mem
            .read_obj::<u16>(GuestAddress(self.rings[q].used + 2))
            .unwrap()
    }

    /// The used element at used-ring position `pos`: (head, len).
    fn used_elem(&self, q: usize, pos: u16) -> (u32, u32) {
        let r = self.rings[q];
        let a = r.used + 4 + 8 * u64::from(pos % r.size);
        (
            self.mem.read_obj(GuestAddress(a)).unwrap(),
            self.mem.read_obj(GuestAddress(a + 4)).unwrap(),
        )
    }

    fn wait_used(&self, q: usize, idx: u16) {
        let start = Instant::now();
        while self.used_idx(q) != idx {
            assert!(
                start.elapsed() < HANG,
                "used index stuck at {} (want {idx})",
                self.used_idx(q)
            );
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn wait_broken(&self) {
        let start = Instant::now();
        while self.status() & STATUS_DEVICE_NEEDS_RESET == 0 {
            assert!(
                start.elapsed() < HANG,
                "device never entered its error state"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn fill(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

#[derive(Clone, Default)]
struct SharedSink(Arc<Mutex<Vec<u8>>>);

impl Write for SharedSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn console() -> (Driver, SharedSink) {
    console_with_stats(false)
}

fn console_with_stats(stats: bool) -> (Driver, SharedSink) {
    let sink = SharedSink::default();
    let device = Box::new(VirtioConsole::new(Box::new(sink.clone())));
    (Driver::with_stats(device, stats), sink)
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

// ---------------------------------------------------------------- transport registers

#[test]
fn identification_registers() {
    let (d, _) = console();
    assert_eq!(d.r32(0x0), 0x7472_6976);
    assert_eq!(d.r32(0x4), 2);
    assert_eq!(d.r32(0x8), TYPE_CONSOLE);
    assert_ne!(d.r32(0xc), 0);
    // Registers are 32-bit: narrower reads return zero and change nothing.
    let mut b = [0xffu8; 2];
    d.t.read(0, &mut b);
    assert_eq!(b, [0, 0]);
    // Queue count via QueueNumMax: two queues, the third does not exist.
    d.w32(0x30, 1);
    assert_eq!(d.r32(0x34), 256);
    d.w32(0x30, 2);
    assert_eq!(d.r32(0x34), 0);
}

#[test]
fn feature_negotiation() {
    let (mut d, _) = console();
    let offered = d.device_features();
    assert_eq!(offered, F_VERSION_1 | F_INDIRECT | F_EVENT_IDX);
    d.w32(0x14, 2);
    assert_eq!(d.r32(0x10), 0, "feature pages above 1 are empty");

    // Without VERSION_1 the device refuses FEATURES_OK.
    assert!(!d.negotiate(F_INDIRECT));
    // Accepting something not offered is refused.
    assert!(!d.negotiate(F_VERSION_1 | 1 << 5));
    // A non-zero page above 1 is refused.
    d.w32(0x70, 0);
    d.add_status(STATUS_ACKNOWLEDGE);
    d.add_status(STATUS_DRIVER);
    d.write_features(F_VERSION_1);
    d.w32(0x24, 2);
    d.w32(0x20, 1);
    d.add_status(STATUS_FEATURES_OK);
    assert_eq!(d.status() & STATUS_FEATURES_OK, 0);
    // A subset with VERSION_1 is fine; later feature writes are ignored.
    assert!(d.negotiate(F_VERSION_1 | F_EVENT_IDX));
    d.write_features(0);
    d.setup_queue(0, 16);
    d.setup_queue(1, 16);
    d.add_status(STATUS_DRIVER_OK);
    assert_eq!(d.status(), 15);
}

#[test]
fn status_state_machine_and_reset() {
    let (mut d, sink) = console();
    // Bits out of order are ignored.
    d.w32(0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER_OK);
    assert_eq!(d.status(), STATUS_ACKNOWLEDGE);
    d.w32(0x70, 0);
    d.add_status(STATUS_ACKNOWLEDGE);
    d.add_status(STATUS_DRIVER);
    d.add_status(STATUS_DRIVER_OK);
    assert_eq!(d.status(), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    // Queue registers are refused before FEATURES_OK.
    d.program_queue(0, 16, 0x1_0000, 0x1_4000, 0x1_8000);
    assert_eq!(d.r32(0x44), 0);
    // Clearing bits without a reset is ignored.
    d.w32(0x70, STATUS_ACKNOWLEDGE);
    assert_eq!(d.status(), STATUS_ACKNOWLEDGE | STATUS_DRIVER);

    // Run, reset, run again: the device must work after re-initialisation.
    for round in 0..3u8 {
        d.start(F_VERSION_1, 2, 16);
        d.fill(DATA, &[b'a' + round; 10]);
        let h = d.chain(1, &[(DATA, 10, false)]);
        d.publish(1, h);
        d.kick(1);
        d.wait_used(1, 1);
        // Linux's teardown deactivates queues in any state and expects QueueReady to read 0.
        d.w32(0x30, 0);
        d.w32(0x44, 0);
        assert_eq!(d.r32(0x44), 0);
        d.w32(0x70, 0);
        assert_eq!(d.status(), 0);
        d.w32(0x30, 1);
        assert_eq!(d.r32(0x44), 0, "reset clears QueueReady");
        assert_eq!(d.r32(0x60), 0, "reset clears the interrupt status");
    }
    assert_eq!(*sink.0.lock().unwrap(), b"aaaaaaaaaabbbbbbbbbbcccccccccc");
    // FAILED is recorded.
    d.add_status(STATUS_ACKNOWLEDGE);
    d.add_status(STATUS_FAILED);
    assert_ne!(d.status() & STATUS_FAILED, 0);
}

#[test]
fn queue_setup_validation() {
    let max = 256u16;
    let bad: &[(&str, u16, u64, u64, u64)] = &[
        ("zero size", 0, 0x1_0000, 0x1_4000, 0x1_8000),
        ("not a power of two", 24, 0x1_0000, 0x1_4000, 0x1_8000),
        ("above max", max * 2, 0x1_0000, 0x1_4000, 0x1_8000),
        ("unaligned descriptors", 16, 0x1_0008, 0x1_4000, 0x1_8000),
        ("unaligned avail", 16, 0x1_0000, 0x1_4001, 0x1_8000),
        ("unaligned used", 16, 0x1_0000, 0x1_4000, 0x1_8002),
        (
            "descriptors outside memory",
            16,
            MEM_SIZE as u64,
            0x1_4000,
            0x1_8000,
        ),
        (
            "used ring crossing the end",
            16,
            0x1_0000,
            0x1_4000,
            MEM_SIZE as u64 - 8,
        ),
        (
            "high address bits",
            16,
            0x1_0000 | 1 << 40,
            0x1_4000,
            0x1_8000,
        ),
    ];
    for &(what, size, desc, avail, used) in bad {
        let (mut d, _) = console();
        assert!(d.negotiate(F_VERSION_1));
        d.program_queue(1, size, desc, avail, used);
        assert_eq!(d.r32(0x44), 0, "{what}: queue must not become ready");
        assert_ne!(
            d.status() & STATUS_DEVICE_NEEDS_RESET,
            0,
            "{what}: DEVICE_NEEDS_RESET"
        );
        // DRIVER_OK on a broken device does not start it; a reset recovers.
        d.add_status(STATUS_DRIVER_OK);
        d.w32(0x70, 0);
        assert_eq!(d.status(), 0, "{what}: reset clears the error");
        d.start(F_VERSION_1, 2, 16);
    }
}

#[test]
fn console_needs_its_transmit_queue() {
    let (mut d, _) = console();
    assert!(d.negotiate(F_VERSION_1));
    d.setup_queue(0, 16);
    d.add_status(STATUS_DRIVER_OK);
    assert_ne!(d.status() & STATUS_DEVICE_NEEDS_RESET, 0);
}

#[test]
fn console_offers_a_tiny_receive_queue_and_a_full_transmit_queue() {
    // Linux allocates a page per receive entry at probe time; the console has no input.
    let (d, _) = console();
    d.w32(0x30, 0);
    assert_eq!(d.r32(0x34), 4);
    d.w32(0x30, 1);
    assert_eq!(d.r32(0x34), 256);
}

#[test]
fn interrupt_status_ack_and_eventfd() {
    let (mut d, _) = console();
    d.start(F_VERSION_1, 2, 16);
    let _ = d.t.interrupt_evt().read();
    let h = d.chain(1, &[(DATA, 1, false)]);
    d.publish(1, h);
    // Notify through the queue eventfd, as KVM's ioeventfd would.
    d.t.queue_evts()[1].write(1).unwrap();
    d.wait_used(1, 1);
    assert_eq!(d.used_elem(1, 0), (u32::from(h), 0));
    let start = Instant::now();
    while d.r32(0x60) & INT_USED_RING == 0 {
        assert!(start.elapsed() < HANG);
        std::thread::yield_now();
    }
    assert!(d.t.interrupt_evt().read().unwrap() >= 1);
    d.w32(0x64, INT_USED_RING);
    assert_eq!(d.r32(0x60), 0);
}

#[test]
fn event_idx_suppresses_interrupts() {
    let (mut d, _) = console();
    d.start(F_VERSION_1 | F_EVENT_IDX, 2, 16);
    let _ = d.t.interrupt_evt().read();
    // used_event (after the available ring's 16 entries) = 5: no interrupt for the first chain.
    let used_event = d.rings[1].avail + 4 + 2 * 16;
    d.mem.write_obj(5u16, GuestAddress(used_event)).unwrap();
    let h = d.chain(1, &[(DATA, 1, false)]);
    d.publish(1, h);
    d.kick(1);
    d.wait_used(1, 1);
    assert!(d.t.interrupt_evt().read().is_err(), "no interrupt expected");
    // The device asked to be notified at the next avail index (after the used ring's elements).
    let avail_event = d.rings[1].used + 4 + 8 * 16;
    let start = Instant::now();
    while d.mem.read_obj::<u16>(GuestAddress(avail_event)).unwrap() != 1 {
        assert!(start.elapsed() < HANG, "avail_event never advanced");
        std::thread::yield_now();
    }
    // used_event = 1: the second chain must interrupt.
    d.mem.write_obj(1u16, GuestAddress(used_event)).unwrap();
    let h = d.chain(1, &[(DATA, 1, false)]);
    d.publish(1, h);
    d.kick(1);
    d.wait_used(1, 2);
    let start = Instant::now();
    while d.t.interrupt_evt().read().is_err() {
        assert!(start.elapsed() < HANG, "interrupt expected");
        std::thread::yield_now();
    }
}

// ---------------------------------------------------------------- console

#[test]
fn console_keeps_order_across_chains_and_segments() {
    let (mut d, sink) = console();
    d.start(F_VERSION_1 | F_EVENT_IDX | F_INDIRECT, 2, 64);
    let mut expect = Vec::new();
    let mut used = 0u16;
    for batch in 0..5u32 {
        for c in 0..7u32 {
            // three segments per chain, in scattered, descending addresses
            let k = batch * 7 + c;
            let segs: Vec<(u64, u32, bool)> = (0..3u32)
                .map(|s| {
                    let addr = DATA + 0x80_0000 - u64::from(k * 3 + s) * 0x1000;
                    let data = pattern(100 + (k * 3 + s) as usize, k * 3 + s);
                    d.fill(addr, &data);
                    expect.extend_from_slice(&data);
                    (addr, data.len() as u32, false)
                })
                .collect();
            let h = d.chain(1, &segs);
            d.publish(1, h);
            used += 1;
        }
        d.kick(1);
        d.wait_used(1, used);
    }
    let got = sink.0.lock().unwrap();
    assert_eq!(got.len(), expect.len());
    assert!(*got == expect, "output reordered or corrupted");
    drop(got);
    d.t.shutdown();
}

#[test]
fn console_large_transfer_is_byte_exact() {
    let (mut d, sink) = console_with_stats(true);
    d.start(F_VERSION_1 | F_EVENT_IDX, 2, 256);
    const TOTAL: usize = 16 << 20;
    const CHUNK: usize = 64 << 10;
    let data = pattern(TOTAL, 7);
    d.fill(DATA, &data);
    let mut used = 0u16;
    for (n, _) in data.chunks(CHUNK).enumerate() {
        let h = d.chain(1, &[(DATA + (n * CHUNK) as u64, CHUNK as u32, false)]);
        d.publish(1, h);
        used = used.wrapping_add(1);
        if used & 63 == 0 {
            d.kick(1);
            d.wait_used(1, used);
        }
    }
    d.kick(1);
    d.wait_used(1, used);
    let got = sink.0.lock().unwrap();
    assert_eq!(got.len(), TOTAL);
    assert!(*got == data, "16 MiB arrived but differs");
    let stats = d.t.stats();
    assert_eq!(stats.name, "console");
    assert!(stats.chains >= (TOTAL / CHUNK) as u64);
    assert!(stats.bytes >= TOTAL as u64);
    assert!(stats.to_string().starts_with("virtio-console: "));
}

#[test]
fn console_counts_nothing_when_stats_are_off() {
    let (mut d, sink) = console();
    d.start(F_VERSION_1, 2, 16);
    transmit_first(&mut d, b"quiet");
    assert_eq!(&*sink.0.lock().unwrap(), b"quiet");
    let stats = d.t.stats();
    assert_eq!((stats.notifications, stats.chains, stats.bytes), (0, 0, 0));
}

// ---------------------------------------------------------------- panicking devices

/// A device whose queue handler panics on its first `panics` notifications, then counts the
/// rest.
struct Panicky {
    panics: Arc<Mutex<u32>>,
    served: Arc<Mutex<u32>>,
}

struct PanickyHandler {
    panics: Arc<Mutex<u32>>,
    served: Arc<Mutex<u32>>,
}

impl QueueHandler for PanickyHandler {
    fn notify(&mut self, _queue: usize) {
        let mut left = self.panics.lock().unwrap();
        if *left > 0 {
            *left -= 1;
            drop(left);
            panic!("handler bug");
        }
        *self.served.lock().unwrap() += 1;
    }
}

impl VirtioDevice for Panicky {
    fn device_type(&self) -> u32 {
        TYPE_CONSOLE
    }
    fn name(&self) -> &'static str {
        "panicky"
    }
    fn device_features(&self) -> u64 {
        0
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16]
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn activate(&mut self, _ctx: ActivateContext) -> Result<Box<dyn QueueHandler>, VirtioError> {
        Ok(Box::new(PanickyHandler {
            panics: self.panics.clone(),
            served: self.served.clone(),
        }))
    }
}

#[test]
fn a_panicking_queue_handler_resets_the_device_and_is_reported() {
    let served = Arc::new(Mutex::new(0));
    let mut d = Driver::new(Box::new(Panicky {
        panics: Arc::new(Mutex::new(1)),
        served: served.clone(),
    }));
    d.start(F_VERSION_1, 1, 16);
    assert_eq!(d.t.panic_report(), None);
    let _ = d.t.interrupt_evt().read();
    d.kick(0);
    d.wait_broken();
    assert_ne!(d.r32(0x60) & INT_CONFIG, 0, "config interrupt");
    assert!(d.t.interrupt_evt().read().is_ok(), "irq eventfd");
    let report = d.t.panic_report().expect("the panic is reported");
    assert!(
        report.contains("virtio-panicky") && report.contains("handler bug"),
        "{report}"
    );
    // The event thread stopped serving: a later kick reaches no handler.
    d.kick(0);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(*served.lock().unwrap(), 0);
    // A driver reset brings the device back; the report stays for the run outcome.
    d.w32(0x70, 0);
    d.start(F_VERSION_1, 1, 16);
    d.kick(0);
    let start = Instant::now();
    while *served.lock().unwrap() == 0 {
        assert!(start.elapsed() < HANG, "the reset device never served");
        std::thread::sleep(Duration::from_micros(200));
    }
    assert_eq!(d.status() & STATUS_DEVICE_NEEDS_RESET, 0);
    assert!(d.t.panic_report().is_some());
    d.t.shutdown();
}

/// A 9P server that panics on every request.
struct PanickingServer;

impl RequestHandler for PanickingServer {
    fn handle(&self, _request: &[u8], _reply: &mut dyn ReplyBuf) -> usize {
        panic!("server bug");
    }
}

#[test]
fn a_panicking_9p_request_resets_the_device_without_leaking_it_in_flight() {
    let mut d = ninep_driver(Arc::new(PanickingServer), 1);
    d.fill(DATA, b"boom");
    let h = d.chain(0, &[(DATA, 4, false), (DATA + 0x100, 4, true)]);
    d.publish(0, h);
    d.kick(0);
    d.wait_broken();
    let report = d.t.panic_report().expect("the panic is reported");
    assert!(
        report.contains("virtio-9p") && report.contains("server bug"),
        "{report}"
    );
    // The request no longer counts as in flight, so stopping does not wait it out.
    let start = Instant::now();
    d.t.shutdown();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

// ---------------------------------------------------------------- malformed chains

/// Lays out a malformed chain on the console's transmit queue (size 16) and expects the error
/// state: DEVICE_NEEDS_RESET, a config interrupt, no panic; then a reset brings it back.
fn expect_error(what: &str, features: u64, build: impl FnOnce(&mut Driver)) {
    let (mut d, sink) = console();
    d.start(F_VERSION_1 | features, 2, 16);
    let _ = d.t.interrupt_evt().read();
    build(&mut d);
    d.kick(1);
    d.wait_broken();
    assert_ne!(d.r32(0x60) & INT_CONFIG, 0, "{what}: config interrupt");
    assert!(d.t.interrupt_evt().read().is_ok(), "{what}: irq eventfd");
    // Further kicks are ignored, not crashes.
    d.kick(1);
    d.kick(0);
    d.w32(0x70, 0);
    assert_eq!(d.status(), 0);
    // Recovery: a good chain works after re-initialisation.
    sink.0.lock().unwrap().clear();
    d.start(F_VERSION_1, 2, 16);
    transmit_first(&mut d, b"ok");
    assert_eq!(*sink.0.lock().unwrap(), b"ok", "{what}: recovered");
}

/// Sends `bytes` as the first chain on a freshly started console's transmit queue and waits
/// until the device used it.
fn transmit_first(d: &mut Driver, bytes: &[u8]) {
    d.fill(DATA, bytes);
    let h = d.chain(1, &[(DATA, bytes.len() as u32, false)]);
    d.publish(1, h);
    d.kick(1);
    d.wait_used(1, 1);
}

fn desc(d: &Driver, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    d.write_desc(d.rings[1].desc, i, addr, len, flags, next);
}

#[test]
fn malformed_head_out_of_range() {
    expect_error("head", 0, |d| d.publish(1, 16));
}

#[test]
fn malformed_next_out_of_range() {
    expect_error("next", 0, |d| {
        desc(d, 0, DATA, 8, VRING_DESC_F_NEXT, 99);
        d.publish(1, 0);
    });
}

#[test]
fn malformed_loop() {
    expect_error("loop", 0, |d| {
        desc(d, 0, DATA, 8, VRING_DESC_F_NEXT, 1);
        desc(d, 1, DATA, 8, VRING_DESC_F_NEXT, 0);
        d.publish(1, 0);
    });
}

#[test]
fn malformed_self_loop() {
    expect_error("self loop", 0, |d| {
        desc(d, 3, DATA, 8, VRING_DESC_F_NEXT, 3);
        d.publish(1, 3);
    });
}

#[test]
fn malformed_buffer_outside_memory() {
    expect_error("outside", 0, |d| {
        desc(d, 0, MEM_SIZE as u64 + 0x1000, 8, 0, 0);
        d.publish(1, 0);
    });
}

#[test]
fn malformed_buffer_crossing_the_end() {
    expect_error("crossing", 0, |d| {
        desc(d, 0, MEM_SIZE as u64 - 4, 8, 0, 0);
        d.publish(1, 0);
    });
}

#[test]
fn malformed_buffer_wrapping_the_address_space() {
    expect_error("wrapping", 0, |d| {
        desc(d, 0, u64::MAX - 2, 16, 0, 0);
        d.publish(1, 0);
    });
}

#[test]
fn malformed_writable_buffer_in_transmit_queue() {
    expect_error("direction", 0, |d| {
        let h = d.chain(1, &[(DATA, 8, false), (DATA + 8, 8, true)]);
        d.publish(1, h);
    });
}

#[test]
fn malformed_readable_after_writable() {
    expect_error("order", 0, |d| {
        let h = d.chain(1, &[(DATA, 8, true), (DATA + 8, 8, false)]);
        d.publish(1, h);
    });
}

#[test]
fn malformed_chain_longer_than_four_gib() {
    // Each buffer is all of guest memory (valid on its own); 129 of them exceed 2^32 bytes.
    let (mut d, _) = console();
    d.start(F_VERSION_1, 2, 256);
    let bufs: Vec<(u64, u32, bool)> = (0..129).map(|_| (0, MEM_SIZE as u32, false)).collect();
    let h = d.chain(1, &bufs);
    d.publish(1, h);
    d.kick(1);
    d.wait_broken();
}

#[test]
fn malformed_avail_index_runs_ahead() {
    expect_error("avail idx", 0, |d| d.set_avail_idx(1, 17));
}

#[test]
fn malformed_indirect_not_negotiated() {
    expect_error("indirect not negotiated", 0, |d| {
        d.write_desc(DATA, 0, DATA + 0x1000, 8, 0, 0);
        desc(d, 0, DATA, 16, VRING_DESC_F_INDIRECT, 0);
        d.publish(1, 0);
    });
}

#[test]
fn malformed_indirect_nested() {
    expect_error("nested", F_INDIRECT, |d| {
        d.write_desc(DATA, 0, DATA + 0x1000, 16, VRING_DESC_F_INDIRECT, 0);
        desc(d, 0, DATA, 16, VRING_DESC_F_INDIRECT, 0);
        d.publish(1, 0);
    });
}

#[test]
fn malformed_indirect_with_next() {
    expect_error("indirect+next", F_INDIRECT, |d| {
        d.write_desc(DATA, 0, DATA + 0x1000, 8, 0, 0);
        desc(d, 0, DATA, 16, VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, 1);
        desc(d, 1, DATA, 8, 0, 0);
        d.publish(1, 0);
    });
}

#[test]
fn malformed_indirect_bad_lengths() {
    for len in [0u32, 24, 16 * 1025] {
        expect_error("indirect length", F_INDIRECT, |d| {
            desc(d, 0, DATA, len, VRING_DESC_F_INDIRECT, 0);
            d.publish(1, 0);
        });
    }
}

#[test]
fn malformed_indirect_table_outside_memory() {
    expect_error("indirect table outside", F_INDIRECT, |d| {
        desc(d, 0, MEM_SIZE as u64 - 16, 32, VRING_DESC_F_INDIRECT, 0);
        d.publish(1, 0);
    });
}

#[test]
fn malformed_indirect_loop_and_bad_next() {
    expect_error("indirect loop", F_INDIRECT, |d| {
        d.write_desc(DATA, 0, DATA + 0x1000, 8, VRING_DESC_F_NEXT, 1);
        d.write_desc(DATA, 1, DATA + 0x1000, 8, VRING_DESC_F_NEXT, 0);
        desc(d, 0, DATA, 32, VRING_DESC_F_INDIRECT, 0);
        d.publish(1, 0);
    });
    expect_error("indirect next", F_INDIRECT, |d| {
        d.write_desc(DATA, 0, DATA + 0x1000, 8, VRING_DESC_F_NEXT, 2);
        desc(d, 0, DATA, 32, VRING_DESC_F_INDIRECT, 0);
        d.publish(1, 0);
    });
}

#[test]
fn malformed_too_many_descriptors() {
    // 15 direct descriptors, then an indirect table of 1024: 1039 in all.
    expect_error("too many", F_INDIRECT, |d| {
        for i in 0..15u16 {
            desc(d, i, DATA, 1, VRING_DESC_F_NEXT, i + 1);
        }
        desc(d, 15, DATA + 0x10_0000, 16 * 1024, VRING_DESC_F_INDIRECT, 0);
        for i in 0..1024u16 {
            let flags = if i == 1023 { 0 } else { VRING_DESC_F_NEXT };
            d.write_desc(DATA + 0x10_0000, i, DATA, 1, flags, i + 1);
        }
        d.publish(1, 0);
    });
}

#[test]
fn indirect_chain_is_accepted() {
    let (mut d, sink) = console();
    d.start(F_VERSION_1 | F_INDIRECT, 2, 16);
    let table = DATA + 0x1_0000;
    d.fill(DATA, b"hello, ");
    d.fill(DATA + 0x100, b"indirect world");
    d.write_desc(table, 0, DATA, 7, VRING_DESC_F_NEXT, 2);
    d.write_desc(table, 2, DATA + 0x100, 14, 0, 0);
    desc(&d, 0, table, 48, VRING_DESC_F_INDIRECT, 0);
    d.publish(1, 0);
    d.kick(1);
    d.wait_used(1, 1);
    assert_eq!(*sink.0.lock().unwrap(), b"hello, indirect world");
    assert_eq!(d.status() & STATUS_DEVICE_NEEDS_RESET, 0);
}

/// The available ring laid 2 bytes before the used ring: its index is the used ring's flags,
/// which the drain itself flips when it turns notifications off (1) and on (0). After the one
/// request it pops, every re-enable "reveals" a request no pop finds; the drain must end.
#[test]
fn a_drain_over_overlapping_rings_ends() {
    use virtio_queue::{Queue, QueueT};
    let mem = memory();
    let (desc, avail) = (0x1_0000u64, 0x2_0002u64);
    let used = avail + 2;
    // Descriptor 0: one 16-byte device-readable buffer (the head that the used index, 0,
    // names in the overlapping avail ring).
    mem.write_obj(DATA, GuestAddress(desc)).unwrap();
    mem.write_obj(16u32, GuestAddress(desc + 8)).unwrap();
    let mut queue = Queue::new(16).unwrap();
    queue.try_set_size(16).unwrap();
    queue
        .try_set_desc_table_address(GuestAddress(desc))
        .unwrap();
    queue
        .try_set_avail_ring_address(GuestAddress(avail))
        .unwrap();
    queue.try_set_used_ring_address(GuestAddress(used)).unwrap();
    queue.set_ready(true);
    let queue = Mutex::new(queue);
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut heads = Vec::new();
        let mut chains = Vec::new();
        let r = super::request::drain_requests(&queue, &mem, &mut heads, false, |c| {
            chains.push(c.head);
            Ok(())
        });
        let _ = done.send((r, chains));
    });
    let (r, chains) = finished
        .recv_timeout(HANG)
        .expect("the drain spins on rings laid over each other");
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(chains, [0], "the one request the ring held is served once");
}

/// The console's transmit queue with its available ring 2 bytes before its used ring (see
/// `a_drain_over_overlapping_rings_ends`): the console's own drain must end too, so the device
/// thread goes idle and a reset, which waits for it, returns.
#[test]
fn a_console_drain_over_overlapping_rings_ends() {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut d, sink) = console();
        assert!(d.negotiate(F_VERSION_1));
        d.setup_queue(0, 16);
        let (desc, avail) = (0x3_0000u64, 0x4_0002u64);
        d.program_queue(1, 16, desc, avail, avail + 2);
        d.write_desc(desc, 0, DATA, 2, 0, 0);
        d.fill(DATA, b"hi");
        d.add_status(STATUS_DRIVER_OK);
        d.kick(1);
        let start = Instant::now();
        while sink.0.lock().unwrap().is_empty() && start.elapsed() < HANG {
            std::thread::sleep(Duration::from_micros(200));
        }
        d.w32(0x70, 0); // joins the device thread
        let _ = done.send(sink.0.lock().unwrap().clone());
    });
    let out = finished
        .recv_timeout(HANG)
        .expect("the console's drain spins on rings laid over each other");
    assert_eq!(out, b"hi", "the one request the ring held is written once");
}

// ---------------------------------------------------------------- 9p device

#[test]
fn ninep_tag_validation_and_config_space() {
    let pool = Arc::new(WorkerPool::new(1, "t9p"));
    let echo: Arc<dyn RequestHandler> = Arc::new(Echo);
    assert!(Virtio9p::with_handler("", echo.clone(), pool.clone()).is_err());
    assert!(Virtio9p::with_handler(&"x".repeat(37), echo.clone(), pool.clone()).is_err());
    let dev = Virtio9p::with_handler("share", echo, pool).unwrap();
    let d = Driver::new(Box::new(dev));
    assert_eq!(d.r32(0x8), TYPE_9P);
    assert_eq!(d.device_features() & 1, 1, "VIRTIO_9P_MOUNT_TAG");
    let mut len = [0u8; 2];
    d.t.read(0x100, &mut len);
    assert_eq!(u16::from_le_bytes(len), 5);
    let mut tag = [0u8; 8];
    d.t.read(0x102, &mut tag);
    assert_eq!(&tag, b"share\0\0\0");
    let mut one = [0u8; 1];
    d.t.read(0x104, &mut one);
    assert_eq!(one, [b'a']);
}

/// Replies with the request bytes reversed.
struct Echo;

impl RequestHandler for Echo {
    fn handle(&self, request: &[u8], reply: &mut dyn ReplyBuf) -> usize {
        let r: Vec<u8> = request.iter().rev().copied().collect();
        let n = r.len().min(reply.capacity());
        reply.write_at(0, &r[..n]).map(|()| n).unwrap_or(0)
    }
}

/// Requests starting with b"slow" wait until the used ring holds an entry (the "fast" one).
struct Gate {
    mem: GuestMemoryMmap,
    used_idx: GuestAddress,
}

impl RequestHandler for Gate {
    fn handle(&self, request: &[u8], reply: &mut dyn ReplyBuf) -> usize {
        if request.starts_with(b"slow") {
            let start = Instant::now();
            while self.mem.read_obj::<u16>(self.used_idx).unwrap() == 0 && start.elapsed() < HANG {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        reply.write_at(0, &request[..4]).unwrap();
        4
    }
}

fn ninep_driver(handler: Arc<dyn RequestHandler>, threads: usize) -> Driver {
    ninep_driver_with(handler, Arc::new(WorkerPool::new(threads, "t9p")), false)
}

fn ninep_driver_with(
    handler: Arc<dyn RequestHandler>,
    pool: Arc<WorkerPool>,
    stats: bool,
) -> Driver {
    let mut d = Driver::with_stats(
        Box::new(Virtio9p::with_handler("share", handler, pool).unwrap()),
        stats,
    );
    d.start(F_VERSION_1 | F_INDIRECT | F_EVENT_IDX | 1, 1, 64);
    d
}

#[test]
fn ninep_scatter_gather_through_the_handler() {
    let mut d = ninep_driver(Arc::new(Echo), 2);
    let req = pattern(3000, 1);
    d.fill(DATA, &req[..1000]);
    d.fill(DATA + 0x5000, &req[1000..]);
    let h = d.chain(
        0,
        &[
            (DATA, 1000, false),
            (DATA + 0x5000, 2000, false),
            (DATA + 0x9000, 1, true),
            (DATA + 0xa000, 2999, true),
            (DATA + 0xf000, 100, true),
        ],
    );
    d.publish(0, h);
    d.kick(0);
    d.wait_used(0, 1);
    assert_eq!(d.used_elem(0, 0), (u32::from(h), 3000));
    let mut got = d.read(DATA + 0x9000, 1);
    got.extend(d.read(DATA + 0xa000, 2999));
    let want: Vec<u8> = req.iter().rev().copied().collect();
    assert_eq!(got, want);
}

#[test]
fn ninep_device_and_pool_count_only_with_the_stats_switch() {
    for on in [true, false] {
        let pool = Arc::new(WorkerPool::with_thread_start(1, "t9p", Arc::new(|| {}), on));
        let mut d = ninep_driver_with(Arc::new(Echo), pool.clone(), on);
        d.fill(DATA, b"ping");
        let h = d.chain(0, &[(DATA, 4, false), (DATA + 0x100, 4, true)]);
        d.publish(0, h);
        d.kick(0);
        d.wait_used(0, 1);
        d.t.shutdown();
        let jobs = pool.stats().jobs;
        let stats = d.t.stats();
        let chains = stats.chains;
        if on {
            assert_eq!((jobs, chains), (1, 1));
            // One request alone: one in flight.
            assert_eq!((stats.requests, stats.in_flight_peak), (1, 1));
            assert_eq!(stats.mean_in_flight(), Some(1.0));
            assert!(stats.to_string().ends_with("in flight: mean 1.00, peak 1"));
        } else {
            assert_eq!((jobs, chains), (0, 0));
            assert_eq!((stats.requests, stats.in_flight_peak), (0, 0));
            assert_eq!(stats.mean_in_flight(), None);
        }
    }
}

#[test]
fn ninep_completes_out_of_order() {
    let mem = memory();
    let gate = Gate {
        mem: mem.clone(),
        used_idx: GuestAddress(0x1_0000 + 0x8000 + 2), // queue 0's used ring (see setup_queue)
    };
    let pool = Arc::new(WorkerPool::new(2, "t9p"));
    let dev = Virtio9p::with_handler("share", Arc::new(gate), pool).unwrap();
    let t = Arc::new(
        MmioTransport::new(Box::new(dev), mem.clone())
            .unwrap()
            .with_stats(true),
    );
    let mut d = Driver {
        t,
        mem,
        rings: Vec::new(),
    };
    d.start(F_VERSION_1 | F_INDIRECT | F_EVENT_IDX | 1, 1, 64);
    d.fill(DATA, b"slow");
    d.fill(DATA + 0x100, b"fast");
    let slow = d.chain(0, &[(DATA, 4, false), (DATA + 0x1000, 4, true)]);
    let fast = d.chain(0, &[(DATA + 0x100, 4, false), (DATA + 0x2000, 4, true)]);
    d.publish(0, slow);
    d.publish(0, fast);
    d.kick(0);
    d.wait_used(0, 2);
    assert_eq!(d.used_elem(0, 0).0, u32::from(fast), "fast finishes first");
    assert_eq!(d.used_elem(0, 1).0, u32::from(slow));
    assert_eq!(d.read(DATA + 0x1000, 4), b"slow");
    assert_eq!(d.read(DATA + 0x2000, 4), b"fast");
    // "slow" started alone and was still running when "fast" started beside it.
    let stats = d.t.stats();
    assert_eq!((stats.requests, stats.in_flight_peak), (2, 2));
    assert_eq!(stats.mean_in_flight(), Some(1.5));
}

#[test]
fn ninep_malformed_chains_break_the_device() {
    // readable after writable
    let mut d = ninep_driver(Arc::new(Echo), 1);
    let h = d.chain(0, &[(DATA, 8, true), (DATA + 8, 8, false)]);
    d.publish(0, h);
    d.kick(0);
    d.wait_broken();
    // request larger than MAX_REQUEST_BYTES (three buffers of all guest memory)
    let mut d = ninep_driver(Arc::new(Echo), 1);
    let h = d.chain(
        0,
        &[
            (0, MEM_SIZE as u32, false),
            (0, MEM_SIZE as u32, false),
            (0, MEM_SIZE as u32, false),
        ],
    );
    d.publish(0, h);
    d.kick(0);
    d.wait_broken();
    // a loop
    let mut d = ninep_driver(Arc::new(Echo), 1);
    d.write_desc(d.rings[0].desc, 0, DATA, 8, VRING_DESC_F_NEXT, 0);
    d.publish(0, 0);
    d.kick(0);
    d.wait_broken();
}

#[test]
fn guest_reply_preadv_lands_in_scattered_buffers() {
    let mem = memory();
    let content = pattern(20_000, 3);
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(&content).unwrap();
    let bufs = [
        chain::Buffer {
            addr: GuestAddress(DATA),
            len: 11,
        },
        chain::Buffer {
            addr: GuestAddress(DATA + 0x3000),
            len: 4096,
        },
        chain::Buffer {
            addr: GuestAddress(DATA + 0x1000),
            len: 7,
        },
        chain::Buffer {
            addr: GuestAddress(DATA + 0x9001),
            len: 10_000,
        },
    ];
    let mut reply = fs9p::GuestReply::new(&mem, &bufs);
    assert_eq!(reply.capacity(), 11 + 4096 + 7 + 10_000);
    reply.write_at(0, b"HEADER").unwrap();
    use std::os::fd::AsFd;
    let n = reply.read_from(6, 14_000, file.as_fd(), 1234).unwrap();
    assert_eq!(n, 14_000);
    let mut got = Vec::new();
    for b in &bufs {
        let mut v = vec![0; b.len as usize];
        mem.read_slice(&mut v, b.addr).unwrap();
        got.extend(v);
    }
    assert_eq!(&got[..6], b"HEADER");
    assert_eq!(&got[6..14_006], &content[1234..15_234]);
    // Past EOF: short read.
    assert_eq!(reply.read_from(0, 100, file.as_fd(), 19_950).unwrap(), 50);
    // Out of the reply area: refused, nothing written.
    assert!(reply.read_from(14_000, 200, file.as_fd(), 0).is_err());
    assert!(reply.write_at(usize::MAX, b"x").is_err());
}

// ---------------------------------------------------------------- 9p against the real server

fn msg9p(ty: u8, tag: u16, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(7 + body.len());
    m.extend_from_slice(&((7 + body.len()) as u32).to_le_bytes());
    m.push(ty);
    m.extend_from_slice(&tag.to_le_bytes());
    m.extend_from_slice(body);
    m
}

fn str9p(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A shared directory, removed on drop.
fn share_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("virtio-9p-{name}-"))
        .tempdir()
        .unwrap()
}

/// Sends one request (at `DATA`) and returns the reply gathered from `replies`.
/// Tversion (msize 512000), Tattach fid 1, Twalk 1 -> 2 "data", Tlopen 2 read-only: the
/// session the read tests start from. Each reply must be the matching R-message.
fn open_data_file(d: &mut Driver, used: &mut u16) {
    let small = [(DATA + 0x1_0000, 4096u32)];
    let mut body = 512_000u32.to_le_bytes().to_vec();
    str9p(&mut body, "9P2000.L");
    assert_eq!(
        roundtrip(d, used, &msg9p(100, 0xffff, &body), &small)[4],
        101
    );
    let mut body = 1u32.to_le_bytes().to_vec();
    body.extend_from_slice(&u32::MAX.to_le_bytes());
    str9p(&mut body, "root");
    str9p(&mut body, "");
    body.extend_from_slice(&0u32.to_le_bytes());
    assert_eq!(roundtrip(d, used, &msg9p(104, 1, &body), &small)[4], 105);
    let mut body = 1u32.to_le_bytes().to_vec();
    body.extend_from_slice(&2u32.to_le_bytes());
    body.extend_from_slice(&1u16.to_le_bytes());
    str9p(&mut body, "data");
    assert_eq!(roundtrip(d, used, &msg9p(110, 2, &body), &small)[4], 111);
    let mut body = 2u32.to_le_bytes().to_vec();
    body.extend_from_slice(&0u32.to_le_bytes());
    assert_eq!(roundtrip(d, used, &msg9p(12, 3, &body), &small)[4], 13);
}

fn roundtrip(d: &mut Driver, used: &mut u16, req: &[u8], replies: &[(u64, u32)]) -> Vec<u8> {
    d.fill(DATA, req);
    let mut bufs = vec![(DATA, req.len() as u32, false)];
    bufs.extend(replies.iter().map(|&(a, l)| (a, l, true)));
    let h = d.chain(0, &bufs);
    d.publish(0, h);
    d.kick(0);
    *used = used.wrapping_add(1);
    d.wait_used(0, *used);
    let (head, len) = d.used_elem(0, used.wrapping_sub(1));
    assert_eq!(head, u32::from(h));
    let mut out = Vec::new();
    for &(a, l) in replies {
        out.extend(d.read(a, l as usize));
    }
    out.truncate(len as usize);
    let size = u32::from_le_bytes(out[..4].try_into().unwrap());
    assert_eq!(size, len, "reply size field matches the used length");
    out
}

fn real_ninep(share: &tempfile::TempDir) -> Driver {
    let server = p9::Server::new(share.path(), p9::Config::default()).unwrap();
    let pool = Arc::new(WorkerPool::new(2, "t9p"));
    let mut d = Driver::new(Box::new(Virtio9p::new("share", server, pool).unwrap()));
    d.start(F_VERSION_1 | F_INDIRECT | F_EVENT_IDX | 1, 1, 128);
    d
}

const RLERROR: u8 = 7;

#[test]
fn ninep_version_attach_getattr_roundtrip() {
    let share = share_dir("attach");
    std::fs::write(share.path().join("f"), b"x").unwrap();
    let mut d = real_ninep(&share);
    let mut used = 0u16;
    let one = [(DATA + 0x1_0000, 8192u32)];

    let mut body = 65536u32.to_le_bytes().to_vec();
    str9p(&mut body, "9P2000.L");
    let r = roundtrip(&mut d, &mut used, &msg9p(100, 0xffff, &body), &one);
    assert_eq!(r[4], 101, "Rversion");
    assert_eq!(&r[13..], b"9P2000.L");

    let mut body = 1u32.to_le_bytes().to_vec();
    body.extend_from_slice(&u32::MAX.to_le_bytes());
    str9p(&mut body, "root");
    str9p(&mut body, "");
    body.extend_from_slice(&0u32.to_le_bytes());
    let r = roundtrip(&mut d, &mut used, &msg9p(104, 1, &body), &one);
    assert_eq!(r[4], 105, "Rattach: {r:?}");
    assert_eq!(r[7] & 0x80, 0x80, "root qid is a directory");

    let mut body = 1u32.to_le_bytes().to_vec();
    body.extend_from_slice(&0x3fffu64.to_le_bytes());
    let r = roundtrip(&mut d, &mut used, &msg9p(24, 2, &body), &one);
    assert_eq!(r[4], 25, "Rgetattr: {r:?}");
    let mode = u32::from_le_bytes(r[7 + 8 + 13..7 + 8 + 13 + 4].try_into().unwrap());
    assert_eq!(mode & libc::S_IFMT, libc::S_IFDIR);

    // An unknown fid is an Rlerror, not a device error.
    let mut body = 99u32.to_le_bytes().to_vec();
    body.extend_from_slice(&0x3fffu64.to_le_bytes());
    let r = roundtrip(&mut d, &mut used, &msg9p(24, 3, &body), &one);
    assert_eq!(r[4], RLERROR);
    assert_eq!(d.status() & STATUS_DEVICE_NEEDS_RESET, 0);
}

#[test]
fn ninep_zero_copy_read_lands_in_scattered_guest_buffers() {
    let share = share_dir("read");
    let content = pattern(300_000, 9);
    std::fs::write(share.path().join("data"), &content).unwrap();
    let mut d = real_ninep(&share);
    let mut used = 0u16;

    open_data_file(&mut d, &mut used);

    // Tread 200_000 bytes at offset 12_345 into six scattered, oddly sized guest buffers; the
    // 11-byte Rread header itself straddles the first two.
    let scattered = [
        (DATA + 0x20_0000, 7u32),
        (DATA + 0x30_0003, 100),
        (DATA + 0x28_0000, 4096),
        (DATA + 0x40_0001, 65_536),
        (DATA + 0x60_0000, 1),
        (DATA + 0x50_0000, 140_000),
    ];
    let (offset, count) = (12_345u64, 200_000u32);
    let mut body = 2u32.to_le_bytes().to_vec();
    body.extend_from_slice(&offset.to_le_bytes());
    body.extend_from_slice(&count.to_le_bytes());
    let r = roundtrip(&mut d, &mut used, &msg9p(116, 4, &body), &scattered);
    assert_eq!(r[4], 117, "Rread");
    let n = u32::from_le_bytes(r[7..11].try_into().unwrap()) as usize;
    assert_eq!(n, count as usize);
    assert!(
        r[11..] == content[offset as usize..offset as usize + n],
        "file bytes differ in guest memory"
    );

    // A read at the end of the file is short, and still exact.
    let mut body = 2u32.to_le_bytes().to_vec();
    body.extend_from_slice(&299_990u64.to_le_bytes());
    body.extend_from_slice(&1000u32.to_le_bytes());
    let r = roundtrip(&mut d, &mut used, &msg9p(116, 5, &body), &scattered);
    assert_eq!(&r[11..], &content[299_990..]);
}

// ---------------------------------------------------------------- benchmark (run by hand)

/// Streams 100 MB through a console into /dev/null and prints the rate, in two shapes: batches
/// of 64 KiB chains, and one 4 KiB chain at a time with the driver spinning for its completion
/// (what Linux's hvc path does). Run with:
/// `cargo test -p vmm --release --lib console_throughput -- --ignored --nocapture`
#[test]
#[ignore = "benchmark; run by hand in release mode"]
fn console_throughput() {
    const TOTAL: usize = 100_000_000;
    for (label, chunk, batch) in [
        ("64 KiB x 64 per kick", 64 << 10, 64u16),
        ("4 KiB, synchronous", 4096, 1),
    ] {
        let null = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .unwrap();
        let mut d = Driver::new(Box::new(VirtioConsole::new(Box::new(null))));
        d.start(F_VERSION_1 | F_EVENT_IDX, 2, 256);
        d.fill(DATA, &pattern(16 << 20, 1));
        let chains = TOTAL.div_ceil(chunk);
        let start = Instant::now();
        let mut used = 0u16;
        for n in 0..chains {
            let off = (n * chunk) % (16 << 20);
            let h = d.chain(1, &[(DATA + off as u64, chunk as u32, false)]);
            d.publish(1, h);
            used = used.wrapping_add(1);
            if used & (batch - 1) == 0 || n + 1 == chains {
                d.kick(1);
                while d.used_idx(1) != used {
                    std::hint::spin_loop();
                }
            }
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "console {label}: {} MB in {:.3} s = {:.0} MB/s",
            TOTAL / 1_000_000,
            secs,
            TOTAL as f64 / secs / 1e6
        );
    }
}

/// Type-200 requests block until released; everything else is answered at once with its type.
#[derive(Default)]
struct Blocker {
    state: Mutex<(bool, bool)>, // (a blocked request started, released)
    cv: std::sync::Condvar,
}

impl RequestHandler for Blocker {
    fn handle(&self, request: &[u8], reply: &mut dyn ReplyBuf) -> usize {
        if request.get(4) == Some(&200) {
            let mut s = self.state.lock().unwrap();
            s.0 = true;
            self.cv.notify_all();
            let _s = self.cv.wait_timeout_while(s, HANG, |s| !s.1).unwrap();
        }
        let r = msg9p(
            request[4] + 1,
            u16::from_le_bytes([request[5], request[6]]),
            &[],
        );
        reply.write_at(0, &r).unwrap();
        r.len()
    }
}

#[test]
fn ninep_rflush_follows_the_flushed_reply() {
    let blocker = Arc::new(Blocker::default());
    let mut d = ninep_driver(blocker.clone(), 2);
    d.fill(DATA, &msg9p(200, 5, &[]));
    let slow = d.chain(0, &[(DATA, 7, false), (DATA + 0x1000, 16, true)]);
    d.publish(0, slow);
    d.kick(0);
    {
        let s = blocker.state.lock().unwrap();
        let _s = blocker.cv.wait_timeout_while(s, HANG, |s| !s.0).unwrap();
    }
    // Tflush of an unknown tag is answered at once.
    d.fill(DATA + 0x100, &msg9p(108, 7, &9u16.to_le_bytes()));
    let other = d.chain(0, &[(DATA + 0x100, 9, false), (DATA + 0x2000, 16, true)]);
    d.publish(0, other);
    d.kick(0);
    d.wait_used(0, 1);
    assert_eq!(d.used_elem(0, 0).0, u32::from(other));
    // Tflush of the blocked tag waits for it.
    d.fill(DATA + 0x200, &msg9p(108, 6, &5u16.to_le_bytes()));
    let flush = d.chain(0, &[(DATA + 0x200, 9, false), (DATA + 0x3000, 16, true)]);
    d.publish(0, flush);
    d.kick(0);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        d.used_idx(0),
        1,
        "Rflush must not overtake the flushed request"
    );
    {
        let mut s = blocker.state.lock().unwrap();
        s.1 = true;
        blocker.cv.notify_all();
    }
    d.wait_used(0, 3);
    assert_eq!(d.used_elem(0, 1).0, u32::from(slow));
    assert_eq!(d.used_elem(0, 2).0, u32::from(flush));
    assert_eq!(d.read(DATA + 0x3000, 7)[4], 109, "Rflush");
}

#[test]
fn ninep_many_concurrent_reads_all_complete_exactly() {
    let share = share_dir("many");
    let content = pattern(1 << 20, 11);
    std::fs::write(share.path().join("data"), &content).unwrap();
    let mut d = real_ninep(&share);
    let mut used = 0u16;
    open_data_file(&mut d, &mut used);

    // 60 Treads in flight at once (two descriptors each), 16 KiB apiece at staggered offsets.
    const N: u16 = 60;
    const LEN: u32 = 16 << 10;
    let mut heads = Vec::new();
    for i in 0..N {
        let mut body = 2u32.to_le_bytes().to_vec();
        body.extend_from_slice(&(u64::from(i) * 10_007).to_le_bytes());
        body.extend_from_slice(&LEN.to_le_bytes());
        let req = msg9p(116, 100 + i, &body);
        let req_addr = DATA + 0x100 * u64::from(i);
        d.fill(req_addr, &req);
        let reply_addr = DATA + 0x10_0000 + 0x8000 * u64::from(i);
        let h = d.chain(
            0,
            &[
                (req_addr, req.len() as u32, false),
                (reply_addr, LEN + 11, true),
            ],
        );
        heads.push((h, i, reply_addr));
    }
    for &(h, _, _) in &heads {
        d.publish(0, h);
    }
    d.kick(0);
    used = used.wrapping_add(N);
    d.wait_used(0, used);
    let mut seen = std::collections::HashSet::new();
    for pos in 0..N {
        let (head, len) = d.used_elem(0, used.wrapping_sub(N).wrapping_add(pos));
        assert_eq!(len, LEN + 11);
        let &(_, i, addr) = heads.iter().find(|(h, ..)| u32::from(*h) == head).unwrap();
        assert!(seen.insert(i), "chain {i} completed twice");
        let r = d.read(addr, (LEN + 11) as usize);
        assert_eq!(u16::from_le_bytes([r[5], r[6]]), 100 + i, "tag");
        let off = usize::from(i) * 10_007;
        assert!(
            r[11..] == content[off..off + LEN as usize],
            "data of read {i}"
        );
    }
    assert_eq!(seen.len(), usize::from(N));
}

/// Reads a 64 MiB file through the 9p device (the real server, zero-copy into guest memory) in
/// 256 KiB Treads, 16 in flight, and prints the rate. Run with:
/// `cargo test -p vmm --release --lib ninep_read_throughput -- --ignored --nocapture`
#[test]
#[ignore = "benchmark; run by hand in release mode"]
fn ninep_read_throughput() {
    const FILE: usize = 64 << 20;
    const LEN: u32 = 256 << 10;
    const INFLIGHT: u16 = 16;
    let share = share_dir("bench");
    std::fs::write(share.path().join("data"), pattern(FILE, 5)).unwrap();
    let mut d = real_ninep(&share);
    let mut used = 0u16;
    open_data_file(&mut d, &mut used);
    let start = Instant::now();
    let mut offset = 0u64;
    while offset < FILE as u64 {
        for i in 0..INFLIGHT {
            let mut body = 2u32.to_le_bytes().to_vec();
            body.extend_from_slice(&offset.to_le_bytes());
            body.extend_from_slice(&LEN.to_le_bytes());
            let req_addr = DATA + 0x100 * u64::from(i);
            d.fill(req_addr, &msg9p(116, i, &body));
            let reply = DATA + 0x10_0000 + u64::from(i) * u64::from(LEN + 4096);
            let h = d.chain(0, &[(req_addr, 23, false), (reply, LEN + 11, true)]);
            d.publish(0, h);
            offset += u64::from(LEN);
        }
        d.kick(0);
        used = used.wrapping_add(INFLIGHT);
        while d.used_idx(0) != used {
            std::hint::spin_loop();
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "9p Tread 256 KiB x {INFLIGHT} in flight: {} MiB in {secs:.3} s = {:.0} MB/s",
        FILE >> 20,
        FILE as f64 / secs / 1e6
    );
}

// ---------------------------------------------------------------- snapshot state

/// Sends `text` as one chain on the console's transmit queue and waits until `used` chains
/// are used.
fn console_send(d: &mut Driver, addr: u64, text: &[u8], used: u16) {
    d.fill(addr, text);
    let h = d.chain(1, &[(addr, text.len() as u32, false)]);
    d.publish(1, h);
    d.kick(1);
    d.wait_used(1, used);
}

#[test]
fn transport_state_restores_into_a_fresh_transport_that_resumes_the_rings() {
    let (mut d, sink) = console();
    d.start(F_VERSION_1 | F_EVENT_IDX, 2, 16);
    console_send(&mut d, DATA, b"one ", 1);
    console_send(&mut d, DATA + 0x1000, b"two ", 2);
    let saved = d.t.save_state();
    assert_eq!(&*sink.0.lock().unwrap(), b"one two ");

    // A new transport with a new sink over the same guest memory, as after a restore.
    let sink2 = SharedSink::default();
    let fresh = Arc::new(
        MmioTransport::new(
            Box::new(VirtioConsole::new(Box::new(sink2.clone()))),
            d.mem.clone(),
        )
        .unwrap(),
    );
    fresh.restore_state(&saved).unwrap();
    let mut d2 = Driver {
        t: fresh,
        mem: d.mem.clone(),
        rings: d.rings.clone(),
    };
    assert_eq!(d2.status(), d.status(), "status survives");
    assert_eq!(d2.status() & STATUS_DRIVER_OK, STATUS_DRIVER_OK);
    // The restored device resumes at ring index 2: it neither replays "one two " nor waits
    // for an index it will never see.
    console_send(&mut d2, DATA + 0x2000, b"three", 3);
    assert_eq!(&*sink2.0.lock().unwrap(), b"three");
    assert_eq!(&*sink.0.lock().unwrap(), b"one two ");
    d2.t.shutdown();
}

#[test]
fn transport_state_refuses_bad_bytes_and_a_used_transport() {
    let (mut d, _sink) = console();
    d.start(F_VERSION_1, 2, 16);
    let saved = d.t.save_state();
    let fresh = || {
        MmioTransport::new(
            Box::new(VirtioConsole::new(Box::new(SharedSink::default()))),
            d.mem.clone(),
        )
        .unwrap()
    };
    for n in 0..saved.len() {
        assert!(fresh().restore_state(&saved[..n]).is_err(), "prefix {n}");
    }
    let mut extended = saved.clone();
    extended.push(0);
    assert!(fresh().restore_state(&extended).is_err());
    // A 9p device has one queue, the console two: a console's state does not fit it.
    let p9 = MmioTransport::new(
        Box::new(Virtio9p::unbacked("slot", Arc::new(WorkerPool::new(1, "slot"))).unwrap()),
        d.mem.clone(),
    )
    .unwrap();
    let err = p9.restore_state(&saved).unwrap_err();
    assert!(err.to_string().contains("queue count"), "{err}");
    // Ring addresses outside guest memory are refused.
    let mut outside = saved.clone();
    let used_at = 4 * 6 + 8 + 4 + (4 + 1 + 8 + 8 + 8 + 4) + 4 + 1 + 8 + 8;
    outside[used_at..used_at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let err = fresh().restore_state(&outside).unwrap_err();
    assert!(err.to_string().contains("outside guest memory"), "{err}");
    // Restoring twice into the same transport is refused.
    let once = fresh();
    once.restore_state(&saved).unwrap();
    assert!(once.restore_state(&saved).is_err());
    once.shutdown();
    d.t.shutdown();
}
