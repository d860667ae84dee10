//! Fuzzing the virtio layer with hostile guests: the generator and the oracles shared by the
//! stable fuzz loop (`virtio-fuzz` binary) and the cargo-fuzz target under `vmm/fuzz/`.
//!
//! Every input builds a small guest memory (one region, two with a hole between them, two
//! adjacent ones, or one not starting at 0) and runs one of three scenarios:
//!
//! - **walk**: descriptor tables full of near-valid and broken chains (loops, out-of-range
//!   `next`, huge and zero lengths, buffers straddling the end of memory or a hole, indirect
//!   tables nested, with NEXT, mis-sized or outside memory, device-writable before readable)
//!   for any queue size, walked by [`chain::walk`] and by an independent reference walker
//!   written from the virtio spec; the two must agree, and an accepted chain's bytes must read
//!   back exactly.
//! - **device**: a queue layout (sizes including 0, non-powers of two and above the maximum;
//!   ring addresses unaligned, overlapping, outside or straddling memory) programmed through
//!   the MMIO transport, which must accept exactly the layouts the spec allows; an accepted
//!   layout then drives the console or the 9p device with a populated available ring
//!   (including an index far ahead of the ring). The device must consume exactly the chains
//!   the reference accepts, in order, stop with DEVICE_NEEDS_RESET at the first malformed one,
//!   move the used index by exactly the chains it completed, write nothing but its used ring
//!   and the chains' device-writable buffers, and (9p) put every reply byte where it belongs.
//! - **mmio**: random register sequences against a live transport (status bits in any order,
//!   QueueSel out of range, QueueReady toggles, accesses of every width at every offset,
//!   config space reads and writes, notifications, resets while the device runs). Registers
//!   must keep their invariants and guest memory may change only inside a used ring the driver
//!   could have programmed.
//!
//! Panics anywhere (including device threads) are failures: the loop's panic hook aborts. Work
//! per input is bounded by construction and checked by the loop's watchdog.

use super::chain::{
    self, Buffer, Chain, MAX_CHAIN_DESCRIPTORS, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
};
use super::fs9p::{RequestHandler, MAX_REQUEST_BYTES};
use super::mmio::{
    ActivateContext, MmioTransport, VirtioDevice, CONFIG_SPACE, REG_QUEUE_NOTIFY,
    STATUS_ACKNOWLEDGE, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FAILED,
    STATUS_FEATURES_OK,
};
use super::{
    DeviceStats, Interrupt, Virtio9p, VirtioConsole, INT_CONFIG, INT_USED_RING, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::devices::bus::BusDevice;
use p9::fuzz::Rng;
use p9::{ReplyBuf, WorkerPool};
use std::io::Write;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// A violated invariant.
#[derive(Debug, thiserror::Error)]
pub enum FuzzFailure {
    #[error("the chain walker disagrees with the reference walker: {0}")]
    Walk(String),
    #[error("queue setup: {0}")]
    QueueSetup(String),
    #[error("device: {0}")]
    Device(String),
    #[error("register file: {0}")]
    Registers(String),
    #[error("guest memory changed outside what the device may write: {0}")]
    StrayWrite(String),
    #[error("cannot set up the input: {0}")]
    Setup(String),
}

// ------------------------------------------------------------------------------ randomness

/// Where an input's choices come from: a seeded PRNG (the stable loop) or the fuzzer's bytes
/// (cargo-fuzz; once they run out every choice is 0, which always ends generation).
pub enum Source<'a> {
    Rng(Rng),
    Bytes(&'a [u8]),
}

impl Source<'_> {
    fn take(&mut self, n: usize) -> u64 {
        match self {
            Source::Rng(r) => r.next_u64(),
            Source::Bytes(b) => {
                let k = n.min(b.len());
                let mut v = 0u64;
                for (i, byte) in b[..k].iter().enumerate() {
                    v |= u64::from(*byte) << (8 * i);
                }
                *b = &b[k..];
                v
            }
        }
    }

    fn u64(&mut self) -> u64 {
        self.take(8)
    }

    /// A number below `n` (0 when `n` is 0).
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        let bytes = (64 - (n - 1).leading_zeros()).div_ceil(8).max(1) as usize;
        self.take(bytes) % n
    }

    /// True with probability `num / den` (false once bytes run out).
    fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) >= den - num
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len() as u64) as usize]
    }
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

// ------------------------------------------------------------------------------ guest memory

/// Guest RAM regions as `(start, length)`, sorted, non-overlapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    regions: Vec<(u64, u64)>,
}

impl Layout {
    fn generate(src: &mut Source) -> Layout {
        let size = |src: &mut Source| 0x1_0000 << src.below(3); // 64, 128 or 256 KiB
        let regions = match src.below(4) {
            0 => vec![(0, size(src))],
            1 => {
                let a = size(src);
                let gap = src.pick(&[0x1000, 0x1_0000]);
                vec![(0, a), (a + gap, size(src))]
            }
            2 => {
                let a = size(src);
                vec![(0, a), (a, size(src))]
            }
            _ => vec![(0x1000 * (1 + src.below(16)), size(src))],
        };
        Layout { regions }
    }

    fn end(&self) -> u64 {
        self.regions.last().map_or(0, |&(s, l)| s + l)
    }

    /// Whether `[addr, addr + len)` is all guest RAM, computed from the region list alone
    /// (adjacent regions count as contiguous). An empty range is covered.
    pub fn covered(&self, addr: u64, len: u64) -> bool {
        if len == 0 {
            return true;
        }
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        let mut cur = addr;
        loop {
            let Some(&(s, l)) = self.regions.iter().find(|&&(s, l)| s <= cur && cur < s + l) else {
                return false;
            };
            if end <= s + l {
                return true;
            }
            cur = s + l;
        }
    }

    /// A random address with `[addr, addr + len)` inside one region, aligned to `align`
    /// (falls back to the region start when `len` does not fit).
    fn inside(&self, src: &mut Source, len: u64, align: u64) -> u64 {
        let (s, l) = self.regions[src.below(self.regions.len() as u64) as usize];
        let room = l.saturating_sub(len);
        let off = src.below(room + 1) & !(align.max(1) - 1);
        s + off
    }

    /// An address for an object of `len` bytes: valid and aligned unless `wild`, then
    /// anything from valid to hostile.
    fn addr(&self, src: &mut Source, len: u64, align: u64, wild: bool) -> u64 {
        if !wild {
            return self.inside(src, len, align);
        }
        let (s, l) = self.regions[src.below(self.regions.len() as u64) as usize];
        match src.below(24) {
            0 => 0,
            // straddling the end of a region (into a hole, the next region, or nothing)
            1 => (s + l).saturating_sub(src.below(len.max(2))) & !(align.max(1) - 1),
            2 => self.end() + src.below(0x1_0000),
            3 => u64::MAX - src.below(64),
            4 => src.u64(),
            5 => 1 << (32 + src.below(31)),
            6 => self.inside(src, len, 1) | 1,
            7 => self.inside(src, len, 1),
            _ => self.inside(src, len, align),
        }
    }

    fn memory(&self) -> Result<GuestMemoryMmap, FuzzFailure> {
        let ranges: Vec<(GuestAddress, usize)> = self
            .regions
            .iter()
            .map(|&(s, l)| (GuestAddress(s), l as usize))
            .collect();
        GuestMemoryMmap::from_ranges(&ranges).map_err(|e| FuzzFailure::Setup(e.to_string()))
    }
}

/// Guest memory plus a copy of what it should hold: every write the fuzzer (the "driver")
/// makes goes to both, so any difference afterwards was made by the device.
struct Guest {
    layout: Layout,
    mem: GuestMemoryMmap,
    shadow: Vec<Vec<u8>>,
}

impl Guest {
    fn new(layout: Layout) -> Result<Guest, FuzzFailure> {
        let mem = layout.memory()?;
        let shadow = layout
            .regions
            .iter()
            .map(|&(_, l)| vec![0u8; l as usize])
            .collect();
        Ok(Guest {
            layout,
            mem,
            shadow,
        })
    }

    /// The shadow's bytes at `[addr, addr + len)`, if all of it is guest RAM.
    fn read(&self, addr: u64, len: u64) -> Option<Vec<u8>> {
        if !self.layout.covered(addr, len) {
            return None;
        }
        let mut out = Vec::with_capacity(len as usize);
        let mut cur = addr;
        let end = addr + len;
        for (i, &(s, l)) in self.layout.regions.iter().enumerate() {
            if cur >= end {
                break;
            }
            if s <= cur && cur < s + l {
                let stop = end.min(s + l);
                out.extend_from_slice(&self.shadow[i][(cur - s) as usize..(stop - s) as usize]);
                cur = stop;
            }
        }
        Some(out)
    }

    /// Writes `data` at `addr` to memory and the shadow; silently skipped unless all of it is
    /// guest RAM (a driver cannot write outside its RAM either).
    fn write(&mut self, addr: u64, data: &[u8]) {
        if !self.layout.covered(addr, data.len() as u64) {
            return;
        }
        if self.mem.write_slice(data, GuestAddress(addr)).is_err() {
            return;
        }
        let mut cur = addr;
        let end = addr + data.len() as u64;
        for (i, &(s, l)) in self.layout.regions.iter().enumerate() {
            if s <= cur && cur < s + l && cur < end {
                let stop = end.min(s + l);
                let from = (cur - addr) as usize;
                self.shadow[i][(cur - s) as usize..(stop - s) as usize]
                    .copy_from_slice(&data[from..from + (stop - cur) as usize]);
                cur = stop;
            }
        }
    }

    fn u16_at(&self, addr: u64) -> Option<u16> {
        self.read(addr, 2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }

    fn mem_u16(&self, addr: u64) -> Option<u16> {
        self.mem.read_obj::<u16>(GuestAddress(addr)).ok()
    }

    fn write_desc(&mut self, table: u64, index: u32, d: RawDesc) {
        let Some(at) = table.checked_add(16 * u64::from(index)) else {
            return;
        };
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&d.addr.to_le_bytes());
        b[8..12].copy_from_slice(&d.len.to_le_bytes());
        b[12..14].copy_from_slice(&d.flags.to_le_bytes());
        b[14..].copy_from_slice(&d.next.to_le_bytes());
        self.write(at, &b);
    }

    /// Address ranges where memory differs from the shadow, merged.
    fn changes(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (i, &(s, l)) in self.layout.regions.iter().enumerate() {
            let mut now = vec![0u8; l as usize];
            if self.mem.read_slice(&mut now, GuestAddress(s)).is_err() {
                out.push((s, s + l));
                continue;
            }
            for (off, (a, b)) in now.iter().zip(&self.shadow[i]).enumerate() {
                if a != b {
                    let at = s + off as u64;
                    match out.last_mut() {
                        Some(last) if last.1 == at => last.1 = at + 1,
                        _ => out.push((at, at + 1)),
                    }
                }
            }
        }
        out
    }
}

/// Fails unless every changed byte lies inside one of `allowed`.
fn check_changes(
    changes: &[(u64, u64)],
    allowed: &[(u64, u64)],
    what: &str,
) -> Result<(), FuzzFailure> {
    for &(s, e) in changes {
        for at in s..e {
            if !allowed.iter().any(|&(a, b)| a <= at && at < b) {
                return Err(FuzzFailure::StrayWrite(format!(
                    "{what}: byte {at:#x} changed (changed ranges {changes:x?}, allowed {allowed:x?})"
                )));
            }
        }
    }
    Ok(())
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

fn range(addr: u64, len: u64) -> (u64, u64) {
    (addr, addr.saturating_add(len))
}

// ------------------------------------------------------------------------------ descriptors

#[derive(Debug, Clone, Copy)]
struct RawDesc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

impl RawDesc {
    fn parse(b: &[u8]) -> RawDesc {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[..8]);
        RawDesc {
            addr: u64::from_le_bytes(a),
            len: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            flags: u16::from_le_bytes([b[12], b[13]]),
            next: u16::from_le_bytes([b[14], b[15]]),
        }
    }
}

/// How hostile one input's driver is.
#[derive(Debug, Clone, Copy)]
struct Style {
    /// One choice in this many may be hostile (0: none is).
    hostile: u64,
    /// Whether chains may carry device-writable buffers.
    writable: bool,
}

impl Style {
    fn generate(src: &mut Source, writable: bool) -> Style {
        Style {
            hostile: src.pick(&[0, 0, 200, 50, 12, 3, 1]),
            writable,
        }
    }

    /// Whether this choice may be hostile.
    fn wild(&self, src: &mut Source) -> bool {
        self.hostile != 0 && src.chance(1, self.hostile)
    }
}

fn gen_len(src: &mut Source, layout: &Layout, wild: bool) -> u32 {
    if !wild {
        return match src.below(16) {
            0 => 0,
            1 => 0x1000 + src.below(0x8000) as u32,
            _ => 1 + src.below(300) as u32,
        };
    }
    match src.below(20) {
        0 => 0,
        1 => u32::MAX - src.below(17) as u32,
        2 => layout.regions[0].1 as u32,
        3 => layout.end() as u32,
        4 => src.u64() as u32,
        5 => 1,
        6 => 0x1000 + src.below(0x8000) as u32,
        _ => 1 + src.below(300) as u32,
    }
}

/// Fills `entries` descriptors (at most 64) of the table at `table` with chains: mostly
/// valid, each with a few of the mistakes a hostile driver can make. Returns the chain heads.
fn gen_table(
    src: &mut Source,
    g: &mut Guest,
    table: u64,
    entries: u32,
    indirect_depth: u32,
    style: Style,
) -> Vec<u16> {
    let fill = entries.min(64);
    let mut heads = Vec::new();
    let mut i = 0u32;
    while i < fill {
        let len = if src.chance(1, 8) {
            1 + src.below(24) as u32
        } else {
            1 + src.below(4) as u32
        };
        heads.push(i as u16);
        // Device-readable first, then device-writable (sometimes all one kind).
        let split = if style.writable {
            src.below(u64::from(len) + 1) as u32
        } else {
            len
        };
        for k in 0..len {
            let idx = i + k;
            if idx >= fill {
                break;
            }
            let last = k + 1 == len || idx + 1 == fill;
            let wild = style.wild(src);
            let blen = gen_len(src, &g.layout, wild);
            let mut d = RawDesc {
                addr: g.layout.addr(src, u64::from(blen), 1, wild),
                len: blen,
                flags: if k >= split { VRING_DESC_F_WRITE } else { 0 },
                next: (idx + 1) as u16,
            };
            if !last {
                d.flags |= VRING_DESC_F_NEXT;
            }
            match if style.wild(src) { src.below(8) } else { 8 } {
                0 => d.flags ^= VRING_DESC_F_WRITE, // writable before readable, or the reverse
                1 => d.next = src.below(u64::from(entries) + 1) as u16, // maybe a loop
                2 => d.next = idx as u16,           // self loop
                3 => d.next = src.u64() as u16,     // out of range
                4 => d.flags |= VRING_DESC_F_NEXT,  // the chain runs on
                5 => d.flags = src.u64() as u16,
                6 => d.next = i as u16, // back to the head
                _ => {}
            }
            if last && src.chance(1, 4) {
                // An indirect table ends the chain.
                let wild = style.wild(src);
                let n = if wild && src.chance(1, 4) {
                    MAX_CHAIN_DESCRIPTORS + src.below(3) as u32
                } else {
                    1 + src.below(8) as u32
                };
                let ilen = match if wild { src.below(6) } else { 6 } {
                    0 => 0,
                    1 => 8,
                    2 => 16 * n + 8,
                    3 => !15u32, // the largest multiple of 16
                    _ => 16 * n,
                };
                let at = g.layout.addr(src, u64::from(ilen), 16, wild);
                d.addr = at;
                d.len = ilen;
                d.flags = VRING_DESC_F_INDIRECT;
                match src.below(if wild { 3 } else { 12 }) {
                    0 => d.flags |= VRING_DESC_F_NEXT,
                    1 => d.flags |= VRING_DESC_F_WRITE, // ignored by the device (2.7.5.3.2)
                    _ => {}
                }
                g.write_desc(table, idx, d);
                if indirect_depth < 2 {
                    gen_table(src, g, at, ilen / 16, indirect_depth + 1, style);
                }
                continue;
            }
            if indirect_depth > 0 && style.wild(src) && src.chance(1, 4) {
                d.flags |= VRING_DESC_F_INDIRECT; // nested indirect
            }
            g.write_desc(table, idx, d);
        }
        i += len;
    }
    heads
}

/// What the reference walker accepted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct RefChain {
    readable: Vec<(u64, u32)>,
    writable: Vec<(u64, u32)>,
    readable_len: u64,
    writable_len: u64,
}

/// The chain at `head`, straight from the virtio 1.2 rules (2.7.5, 2.7.5.3) and this
/// monitor's limits, reading the shadow: every descriptor visited at most once per table,
/// indexes inside their table, at most one level of indirection, no NEXT on an indirect
/// descriptor, indirect tables a non-zero multiple of 16 bytes inside RAM, non-empty buffers
/// inside RAM, no device-readable buffer after a device-writable one, at most
/// `MAX_CHAIN_DESCRIPTORS` descriptors and 2^32 - 1 bytes. Every range read is appended to
/// `reads`.
fn reference_walk(
    g: &Guest,
    table: u64,
    size: u32,
    head: u16,
    indirect_ok: bool,
    reads: &mut Vec<(u64, u64)>,
) -> Result<RefChain, &'static str> {
    let mut c = RefChain::default();
    let (mut table, mut size, mut index) = (table, size, u32::from(head));
    let mut visited = vec![false; size as usize];
    let (mut total, mut indirect, mut writable_seen) = (0u32, false, false);
    loop {
        if index >= size {
            return Err("index outside its table");
        }
        if std::mem::replace(&mut visited[index as usize], true) {
            return Err("loop");
        }
        total += 1;
        if total > MAX_CHAIN_DESCRIPTORS {
            return Err("too many descriptors");
        }
        let at = table
            .checked_add(16 * u64::from(index))
            .ok_or("table address overflows")?;
        let d = RawDesc::parse(&g.read(at, 16).ok_or("descriptor outside RAM")?);
        reads.push(range(at, 16));
        if d.flags & VRING_DESC_F_INDIRECT != 0 {
            if !indirect_ok {
                return Err("indirect not negotiated");
            }
            if indirect {
                return Err("nested indirect");
            }
            if d.flags & VRING_DESC_F_NEXT != 0 {
                return Err("indirect with NEXT");
            }
            if d.len == 0 || d.len & 15 != 0 || d.len / 16 > MAX_CHAIN_DESCRIPTORS {
                return Err("indirect table size");
            }
            if !g.layout.covered(d.addr, u64::from(d.len)) {
                return Err("indirect table outside RAM");
            }
            table = d.addr;
            size = d.len / 16;
            visited = vec![false; size as usize];
            index = 0;
            indirect = true;
            continue;
        }
        if !g.layout.covered(d.addr, u64::from(d.len)) {
            return Err("buffer outside RAM");
        }
        if d.flags & VRING_DESC_F_WRITE != 0 {
            writable_seen = true;
            c.writable_len += u64::from(d.len);
            if d.len > 0 {
                c.writable.push((d.addr, d.len));
            }
        } else {
            if writable_seen {
                return Err("readable after writable");
            }
            c.readable_len += u64::from(d.len);
            if d.len > 0 {
                c.readable.push((d.addr, d.len));
            }
        }
        if c.readable_len + c.writable_len > u64::from(u32::MAX) {
            return Err("more than 4 GiB");
        }
        if d.flags & VRING_DESC_F_NEXT == 0 {
            return Ok(c);
        }
        index = u32::from(d.next);
    }
}

fn as_pairs(bufs: &[Buffer]) -> Vec<(u64, u32)> {
    bufs.iter().map(|b| (b.addr.0, b.len)).collect()
}

/// Compares the walker's verdict with the reference's.
fn compare_walk(
    got: &Result<Chain, chain::ChainError>,
    want: &Result<RefChain, &'static str>,
    what: &str,
) -> Result<(), FuzzFailure> {
    match (got, want) {
        (Ok(c), Ok(r)) => {
            let same = as_pairs(&c.readable) == r.readable
                && as_pairs(&c.writable) == r.writable
                && c.readable_len == r.readable_len
                && c.writable_len == r.writable_len;
            if same {
                Ok(())
            } else {
                Err(FuzzFailure::Walk(format!(
                    "{what}: walker gave {c:x?}, reference {r:x?}"
                )))
            }
        }
        (Err(_), Err(_)) => Ok(()),
        (Ok(c), Err(why)) => Err(FuzzFailure::Walk(format!(
            "{what}: walker accepted {c:x?}, reference refuses ({why})"
        ))),
        (Err(e), Ok(r)) => Err(FuzzFailure::Walk(format!(
            "{what}: walker refused ({e}), reference accepts {r:x?}"
        ))),
    }
}

fn gather_ref(g: &Guest, bufs: &[(u64, u32)]) -> Vec<u8> {
    let mut out = Vec::new();
    for &(a, l) in bufs {
        out.extend(g.read(a, u64::from(l)).unwrap_or_default());
    }
    out
}

// ------------------------------------------------------------------------------ scenario: walk

fn walk_input(src: &mut Source) -> Result<(), FuzzFailure> {
    let mut g = Guest::new(Layout::generate(src))?;
    let size = match src.below(8) {
        0 => src.pick(&[0u32, 1, 3, 7, 100, 1000, 32768, 65535]),
        1 => src.below(65536) as u32,
        _ => 1 << src.below(9),
    };
    let style = Style::generate(src, true);
    let wild = style.wild(src);
    let table = g.layout.addr(src, 16 * u64::from(size), 16, wild);
    let indirect_ok = src.chance(3, 4);
    let mut heads = gen_table(src, &mut g, table, size, 0, style);
    // A few random bytes over the tables make more near-misses.
    for _ in 0..if style.hostile > 0 { src.below(4) } else { 0 } {
        let at = g.layout.addr(src, 2, 1, false);
        let b = src.u64().to_le_bytes();
        g.write(at, &b[..1 + src.below(8) as usize]);
    }
    for _ in 0..1 + src.below(3) {
        heads.push(src.u64() as u16);
    }
    for &head in heads.iter().take(12) {
        let got = chain::walk(
            &g.mem,
            GuestAddress(table),
            u16::try_from(size).unwrap_or(u16::MAX),
            head,
            indirect_ok,
        );
        let want = reference_walk(
            &g,
            table,
            size.min(65535),
            head,
            indirect_ok,
            &mut Vec::new(),
        );
        let what = format!("table {table:#x} size {size} head {head} indirect_ok {indirect_ok}");
        compare_walk(&got, &want, &what)?;
        tally(if got.is_ok() {
            &WALKS_ACCEPTED
        } else {
            &WALKS_REFUSED
        });
        if let (Ok(c), Ok(r)) = (&got, &want) {
            if c.readable_len <= 1 << 20 {
                let want_bytes = gather_ref(&g, &r.readable);
                let mut bytes = Vec::new();
                c.gather(&g.mem, &mut bytes)
                    .map_err(|e| FuzzFailure::Walk(format!("{what}: gather failed: {e}")))?;
                let mut head9 = [0u8; 9];
                let n = c
                    .peek(&g.mem, &mut head9)
                    .map_err(|e| FuzzFailure::Walk(format!("{what}: peek failed: {e}")))?;
                if bytes != want_bytes || head9[..n] != want_bytes[..n.min(want_bytes.len())] {
                    return Err(FuzzFailure::Walk(format!(
                        "{what}: the chain's bytes read back wrong"
                    )));
                }
            }
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------ the devices

/// The used index the fuzzer leaves before the device runs: more than any queue holds.
const UNTOUCHED: u16 = 0xffff;
/// The maximum queue size the console and the 9p device offer for the queues fuzzed here.
const QUEUE_MAX: u16 = 256;
/// Size of the file the fuzz 9p handler reads replies from (zero-copy into guest memory).
const REPLY_FILE_LEN: u64 = 1 << 20;

fn reply_byte(offset: u64) -> u8 {
    (offset.wrapping_mul(31) % 251) as u8
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// What the fuzz 9p handler answers to `request` in a reply area of `capacity` bytes: the
/// length it reports, and the bytes at the start of the area (first up to 8 request bytes,
/// then [`reply_byte`] of the offset).
fn reply_plan(request: &[u8], capacity: usize) -> (usize, usize) {
    let h = fnv(request);
    let reported = match h % 8 {
        0 => 0,
        1 => capacity,
        2 => capacity + 1 + (h >> 8) as usize % 100, // more than fits: the device clamps
        _ => (h >> 8) as usize % 4096,
    };
    let written = reported.min(capacity).min(64 << 10);
    (reported, written)
}

fn expected_reply(request: &[u8], written: usize) -> Vec<u8> {
    (0..written)
        .map(|o| {
            if o < 8 && o < request.len() {
                request[o]
            } else {
                reply_byte(o as u64)
            }
        })
        .collect()
}

/// A deterministic 9P stand-in: writes its reply with `write_at` and, for the second half,
/// with the zero-copy `read_from` path; probes the reply area's bounds.
struct FuzzServer {
    file: Arc<std::fs::File>,
    violation: Mutex<Option<String>>,
}

impl FuzzServer {
    fn note(&self, what: String) {
        let mut v = self.violation.lock().unwrap_or_else(|e| e.into_inner());
        v.get_or_insert(what);
    }

    /// The first reply-area violation seen since the last call, if any.
    fn take_violation(&self) -> Option<String> {
        self.violation
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

impl RequestHandler for FuzzServer {
    fn handle(&self, request: &[u8], reply: &mut dyn ReplyBuf) -> usize {
        let cap = reply.capacity();
        let (reported, written) = reply_plan(request, cap);
        let want = expected_reply(request, written);
        let split = (written / 2).max(written.min(8));
        if let Err(e) = reply.write_at(0, &want[..split]) {
            self.note(format!("write_at(0, {split}) of {cap} failed: {e}"));
        }
        let mut done = split;
        if written > split {
            match reply.read_from(split, written - split, self.file.as_fd(), split as u64) {
                Ok(n) if n <= written - split => done += n,
                Ok(n) => self.note(format!("read_from returned {n} > {}", written - split)),
                Err(e) => self.note(format!(
                    "read_from({split}, {}) failed: {e}",
                    written - split
                )),
            }
        }
        if done < written {
            if let Err(e) = reply.write_at(done, &want[done..]) {
                self.note(format!("write_at({done}) failed: {e}"));
            }
        }
        if reply.write_at(cap, b"x").is_ok() || reply.write_at(usize::MAX, b"x").is_ok() {
            self.note(format!("write_at past the {cap}-byte reply area succeeded"));
        }
        if reply.read_from(cap, 1, self.file.as_fd(), 0).is_ok() {
            self.note(format!(
                "read_from past the {cap}-byte reply area succeeded"
            ));
        }
        reported
    }
}

/// Process-wide pieces reused by every input: the 9p worker pool and the reply file.
struct Shared {
    pool: Arc<WorkerPool>,
    file: Arc<std::fs::File>,
}

fn shared() -> Result<&'static Shared, FuzzFailure> {
    static SHARED: OnceLock<Result<Shared, String>> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            let path = std::env::temp_dir().join(format!("virtio-fuzz-{}", std::process::id()));
            let data: Vec<u8> = (0..REPLY_FILE_LEN).map(reply_byte).collect();
            std::fs::write(&path, data).map_err(|e| e.to_string())?;
            let file = std::fs::File::open(&path).map_err(|e| e.to_string());
            let _ = std::fs::remove_file(&path);
            Ok(Shared {
                pool: Arc::new(WorkerPool::new(2, "fuzz-9p")),
                file: Arc::new(file?),
            })
        })
        .as_ref()
        .map_err(|e| FuzzFailure::Setup(format!("reply file: {e}")))
}

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Console,
    NineP,
}

impl Kind {
    /// The features a driver accepts: version 1 and the device's own, with indirect
    /// descriptors and event indexes each half the time.
    fn driver_features(self, src: &mut Source) -> u64 {
        let mut features = F_VERSION_1 | self.device_features();
        if src.chance(1, 2) {
            features |= F_INDIRECT;
        }
        if src.chance(1, 2) {
            features |= F_EVENT_IDX;
        }
        features
    }

    /// The console with chance `num` in `den`, else 9p.
    fn generate(src: &mut Source, num: u64, den: u64) -> Kind {
        if src.chance(num, den) {
            Kind::Console
        } else {
            Kind::NineP
        }
    }

    /// The queue the driver feeds (console transmit, 9p requests).
    fn queue(self) -> u32 {
        match self {
            Kind::Console => 1,
            Kind::NineP => 0,
        }
    }
    fn max_sizes(self) -> &'static [u16] {
        match self {
            Kind::Console => &[4, QUEUE_MAX],
            Kind::NineP => &[QUEUE_MAX],
        }
    }
    fn config(self) -> Vec<u8> {
        match self {
            Kind::Console => vec![0; 12],
            Kind::NineP => {
                let mut c = 4u16.to_le_bytes().to_vec();
                c.extend_from_slice(b"fuzz");
                c
            }
        }
    }
    fn device_features(self) -> u64 {
        match self {
            Kind::Console => 0,
            Kind::NineP => 1,
        }
    }
}

fn device(
    kind: Kind,
    sink: &Sink,
    server: &Arc<FuzzServer>,
    pool: &Arc<WorkerPool>,
) -> Result<Box<dyn VirtioDevice>, FuzzFailure> {
    Ok(match kind {
        Kind::Console => Box::new(VirtioConsole::new(Box::new(sink.clone()))),
        Kind::NineP => {
            let handler: Arc<dyn RequestHandler> = server.clone();
            Box::new(
                Virtio9p::with_handler("fuzz", handler, pool.clone())
                    .map_err(|e| FuzzFailure::Setup(e.to_string()))?,
            )
        }
    })
}

/// What a fuzzed device writes to: the console's output sink and the 9p stand-in server.
fn stand_ins(sh: &Shared) -> (Sink, Arc<FuzzServer>) {
    let server = Arc::new(FuzzServer {
        file: sh.file.clone(),
        violation: Mutex::new(None),
    });
    (Sink::default(), server)
}

/// A transport over a fresh device of `kind` in `mem`, with the per-device counters on (they
/// are part of what is exercised).
fn transport(
    kind: Kind,
    sink: &Sink,
    server: &Arc<FuzzServer>,
    sh: &Shared,
    mem: &GuestMemoryMmap,
) -> Result<MmioTransport, FuzzFailure> {
    Ok(
        MmioTransport::new(device(kind, sink, server, &sh.pool)?, mem.clone())
            .map_err(|e| FuzzFailure::Setup(e.to_string()))?
            .with_stats(true),
    )
}

fn r32(t: &MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn w32(t: &MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

const F_VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
const F_INDIRECT: u64 = 1 << VIRTIO_RING_F_INDIRECT_DESC;
const F_EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;

/// One queue's layout as the driver programs it.
#[derive(Debug, Clone, Copy)]
struct Rings {
    size: u32,
    desc: u64,
    avail: u64,
    used: u64,
}

impl Rings {
    fn generate(src: &mut Source, layout: &Layout, style: Style) -> Rings {
        let size = match if style.wild(src) { 0 } else { 1 } {
            0 => src.pick(&[
                0u32,
                3,
                5,
                12,
                100,
                255,
                512,
                1024,
                32768,
                65535,
                65536 + 16,
            ]),
            _ => 1 << src.below(9),
        };
        let n = u64::from(size.min(65535));
        let mut addr = |len, align| {
            let wild = style.wild(src);
            layout.addr(src, len, align, wild)
        };
        Rings {
            size,
            desc: addr(16 * n, 16),
            avail: addr(6 + 2 * n, 2),
            used: addr(6 + 8 * n, 4),
        }
    }

    /// The size as the transport stores it (QueueNum is 16 bits; larger values read as 0).
    fn size16(&self) -> u16 {
        u16::try_from(self.size).unwrap_or(0)
    }

    /// Whether the spec lets a device accept this layout (virtio 1.2, 2.7 and 4.2.2).
    fn valid(&self, layout: &Layout, max: u16) -> bool {
        let n = self.size16();
        let n64 = u64::from(n);
        n != 0
            && n.is_power_of_two()
            && n <= max
            && self.desc & 15 == 0
            && self.avail & 1 == 0
            && self.used & 3 == 0
            && layout.covered(self.desc, 16 * n64)
            && layout.covered(self.avail, 6 + 2 * n64)
            && layout.covered(self.used, 6 + 8 * n64)
    }

    fn used_range(&self) -> (u64, u64) {
        range(self.used, 6 + 8 * u64::from(self.size16()))
    }

    fn program(&self, t: &MmioTransport, q: u32) {
        w32(t, 0x30, q);
        w32(t, 0x38, self.size);
        w32(t, 0x80, self.desc as u32);
        w32(t, 0x84, (self.desc >> 32) as u32);
        w32(t, 0x90, self.avail as u32);
        w32(t, 0x94, (self.avail >> 32) as u32);
        w32(t, 0xa0, self.used as u32);
        w32(t, 0xa4, (self.used >> 32) as u32);
    }
}

fn negotiate(t: &MmioTransport, features: u64) {
    w32(t, 0x70, 0);
    w32(t, 0x70, STATUS_ACKNOWLEDGE);
    w32(t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    w32(t, 0x24, 0);
    w32(t, 0x20, features as u32);
    w32(t, 0x24, 1);
    w32(t, 0x20, (features >> 32) as u32);
    w32(
        t,
        0x70,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
}

/// Writes `count` entries of the available ring (heads mostly from `heads`) and its index.
fn publish(src: &mut Source, g: &mut Guest, r: &Rings, heads: &[u16], start: u16, count: u16) {
    let n = r.size16().max(1);
    for k in 0..count.min(n) {
        let pos = start.wrapping_add(k) % n;
        let head = if !heads.is_empty() && src.chance(7, 8) {
            heads[src.below(heads.len() as u64) as usize]
        } else {
            src.below(u64::from(n) + 2) as u16
        };
        // A hostile ring address may wrap; such writes land outside RAM and are skipped.
        let at = r.avail.wrapping_add(4 + 2 * u64::from(pos));
        g.write(at, &head.to_le_bytes());
    }
    g.write(
        r.avail.wrapping_add(2),
        &start.wrapping_add(count).to_le_bytes(),
    );
}

// ------------------------------------------------------------------------------ scenario: device

fn device_input(src: &mut Source) -> Result<(), FuzzFailure> {
    let sh = shared()?;
    let mut g = Guest::new(Layout::generate(src))?;
    let kind = Kind::generate(src, 1, 2);
    let q = kind.queue();
    let features = kind.driver_features(src);
    let style = Style::generate(src, kind == Kind::NineP);
    let rings = Rings::generate(src, &g.layout, style);
    let (sink, server) = stand_ins(sh);

    // 1. The transport accepts exactly the layouts the spec allows.
    let t = transport(kind, &sink, &server, sh, &g.mem)?;
    negotiate(&t, features);
    if r32(&t, 0x70) & STATUS_FEATURES_OK == 0 {
        return Err(FuzzFailure::QueueSetup(format!(
            "features {features:#x} refused"
        )));
    }
    rings.program(&t, q);
    w32(&t, 0x44, 1);
    let accepted = r32(&t, 0x44) == 1;
    let broken = r32(&t, 0x70) & STATUS_DEVICE_NEEDS_RESET != 0;
    let valid = rings.valid(&g.layout, QUEUE_MAX);
    if accepted != valid || broken == valid {
        return Err(FuzzFailure::QueueSetup(format!(
            "{rings:x?} in {:x?}: accepted {accepted}, needs reset {broken}, spec says valid {valid}",
            g.layout.regions
        )));
    }
    drop(t);
    if !valid {
        tally(&LAYOUTS_REFUSED);
        return Ok(());
    }
    tally(&LAYOUTS_ACCEPTED);

    // 2. Fill the rings.
    let size = rings.size16();
    let indirect_ok = features & F_INDIRECT != 0;
    let event_idx = features & F_EVENT_IDX != 0;
    let heads = gen_table(src, &mut g, rings.desc, u32::from(size), 0, style);
    let junk: Vec<u8> = (0..6 + 8 * u64::from(size))
        .map(|_| src.below(256) as u8)
        .collect();
    g.write(rings.used, &junk);
    // The used index starts at a value no number of completed chains can produce.
    g.write(rings.used + 2, &UNTOUCHED.to_le_bytes());
    let count = match if style.wild(src) { src.below(3) } else { 2 } {
        0 => size.wrapping_add(1 + src.below(1000) as u16), // far ahead of the ring
        1 => src.u64() as u16,
        _ => src.below(u64::from(size) + 1) as u16,
    };
    publish(src, &mut g, &rings, &heads, 0, count);
    let used_event = src.below(u64::from(size) + 2) as u16;
    g.write(
        rings.avail + 4 + 2 * u64::from(size),
        &used_event.to_le_bytes(),
    );

    // 3. What the device must do: the reference's verdict on every available chain.
    let mut reads = vec![range(rings.avail, 6 + 2 * u64::from(size))];
    let avail_idx = g.u16_at(rings.avail + 2).unwrap_or(0);
    let mut expected: Vec<(u16, RefChain)> = Vec::new();
    let mut breaks = avail_idx > size;
    if !breaks {
        for pos in 0..avail_idx {
            let head = g.u16_at(rings.avail + 4 + 2 * u64::from(pos)).unwrap_or(0);
            let verdict = reference_walk(
                &g,
                rings.desc,
                u32::from(size),
                head,
                indirect_ok,
                &mut reads,
            );
            match verdict {
                Ok(c)
                    if match kind {
                        Kind::Console => c.writable.is_empty(),
                        Kind::NineP => c.readable_len <= MAX_REQUEST_BYTES,
                    } =>
                {
                    reads.extend(c.readable.iter().map(|&(a, l)| range(a, u64::from(l))));
                    expected.push((head, c));
                }
                _ => {
                    breaks = true;
                    break;
                }
            }
        }
    }
    // When the device's own writes can land on what it reads, or replies can overwrite each
    // other, the outcome depends on timing: only the safety oracles apply then.
    let used = rings.used_range();
    let writable: Vec<(u16, (u64, u64))> = expected
        .iter()
        .flat_map(|(h, c)| {
            c.writable
                .iter()
                .map(|&(a, l)| (*h, range(a, u64::from(l))))
        })
        .collect();
    let mut strict = !reads.iter().any(|&r| overlaps(r, used));
    if kind == Kind::NineP {
        for (i, &(hi, wi)) in writable.iter().enumerate() {
            let clash = overlaps(wi, used)
                || reads.iter().any(|&r| overlaps(r, wi))
                || writable[i + 1..]
                    .iter()
                    .any(|&(hj, wj)| overlaps(wi, wj) && (hi != hj || wi != wj));
            if clash {
                strict = false;
            }
        }
        // The same head twice with the same buffers: both replies write the same bytes,
        // unless buffers within the chain overlap each other.
        let mut seen = std::collections::HashSet::new();
        for (h, c) in &expected {
            if seen.insert(*h) {
                for (i, a) in c.writable.iter().enumerate() {
                    for b in &c.writable[i + 1..] {
                        if overlaps(range(a.0, u64::from(a.1)), range(b.0, u64::from(b.1))) {
                            strict = false;
                        }
                    }
                }
            }
        }
    }

    // 4. Run the device on its queue, on this thread.
    let mut queue = Queue::new(QUEUE_MAX).map_err(|e| FuzzFailure::Setup(e.to_string()))?;
    let setup = queue
        .try_set_size(size)
        .and_then(|()| queue.try_set_desc_table_address(GuestAddress(rings.desc)))
        .and_then(|()| queue.try_set_avail_ring_address(GuestAddress(rings.avail)))
        .and_then(|()| queue.try_set_used_ring_address(GuestAddress(rings.used)));
    setup.map_err(|e| FuzzFailure::Setup(format!("queue: {e}")))?;
    queue.set_event_idx(event_idx);
    queue.set_ready(true);
    let mut queues: Vec<Queue> = kind
        .max_sizes()
        .iter()
        .map(|&m| Queue::new(m))
        .collect::<Result<_, _>>()
        .map_err(|e| FuzzFailure::Setup(e.to_string()))?;
    queues[q as usize] = queue;
    let interrupt = Arc::new(Interrupt::new().map_err(|e| FuzzFailure::Setup(e.to_string()))?);
    let ctx = ActivateContext {
        mem: Arc::new(g.mem.clone()),
        queues,
        features,
        interrupt: interrupt.clone(),
        stats: Arc::new(DeviceStats::new(true)),
    };
    let mut dev = device(kind, &sink, &server, &sh.pool)?;
    let mut handler = dev
        .activate(ctx)
        .map_err(|e| FuzzFailure::Device(format!("activation refused: {e}")))?;
    handler.notify(q as usize);
    for _ in 0..src.below(3) {
        handler.notify(src.below(4) as usize); // other, absent and repeated queues
    }
    drop(handler); // 9p: waits for every request in flight
    dev.reset();

    // 5. Judge.
    let what = format!(
        "{kind:?} {rings:x?} in {:x?}, avail idx {avail_idx}, features {features:#x}",
        g.layout.regions
    );
    let dev_err = |msg: String| Err(FuzzFailure::Device(format!("{what}: {msg}")));
    if let Some(v) = server.take_violation() {
        return dev_err(format!("reply area: {v}"));
    }
    let mut allowed = vec![used];
    if kind == Kind::NineP {
        allowed.extend(writable.iter().map(|&(_, w)| w));
    }
    if strict || kind == Kind::Console {
        check_changes(&g.changes(), &allowed, &what)?;
    }
    if !strict {
        return Ok(());
    }
    tally(&STRICT_RUNS);
    let is_broken = interrupt.is_broken();
    if is_broken != breaks {
        return dev_err(format!(
            "needs reset {is_broken}, but the reference says a malformed chain: {breaks}"
        ));
    }
    if breaks && interrupt.status() & INT_CONFIG == 0 {
        return dev_err("broken without a configuration interrupt".into());
    }
    let used_idx = g.mem_u16(rings.used + 2).unwrap_or(0);
    let completed = if used_idx == UNTOUCHED { 0 } else { used_idx };
    CHAINS_COMPLETED.fetch_add(u64::from(completed), Ordering::Relaxed);
    if is_broken {
        tally(&DEVICES_BROKEN);
    }
    let elem = |pos: u16| -> (u32, u32) {
        let at = rings.used + 4 + 8 * u64::from(pos % size);
        let id = g.mem.read_obj::<u32>(GuestAddress(at)).unwrap_or(u32::MAX);
        let len = g
            .mem
            .read_obj::<u32>(GuestAddress(at + 4))
            .unwrap_or(u32::MAX);
        (id, len)
    };
    match kind {
        Kind::Console => {
            if usize::from(completed) != expected.len() {
                return dev_err(format!(
                    "used index {used_idx}, expected {} chains",
                    expected.len()
                ));
            }
            let mut out = Vec::new();
            for (pos, (head, c)) in expected.iter().enumerate() {
                if elem(pos as u16) != (u32::from(*head), 0) {
                    return dev_err(format!(
                        "used element {pos} is {:?}, expected ({head}, 0)",
                        elem(pos as u16)
                    ));
                }
                out.extend(gather_ref(&g, &c.readable));
            }
            if *sink.0.lock().unwrap_or_else(|e| e.into_inner()) != out {
                return dev_err("console output differs from the chains' bytes".into());
            }
        }
        Kind::NineP => {
            let mut want: Vec<(u32, u32)> = Vec::new();
            for (head, c) in &expected {
                let request = gather_ref(&g, &c.readable);
                let cap = c.writable_len as usize;
                let (reported, written) = reply_plan(&request, cap);
                want.push((u32::from(*head), reported.min(cap) as u32));
                let got = gather_ref_mem(&g.mem, &c.writable, written);
                if got != expected_reply(&request, written) {
                    return dev_err(format!("reply bytes of chain {head} differ"));
                }
            }
            let n = usize::from(completed);
            let mut got: Vec<(u32, u32)> = (0..completed).map(elem).collect();
            if breaks {
                // Requests before the bad chain may or may not have completed.
                if n > expected.len() || got.iter().any(|e| !want.contains(e)) {
                    return dev_err(format!(
                        "used {got:?} after the error, wanted a subset of {want:?}"
                    ));
                }
            } else {
                got.sort_unstable();
                want.sort_unstable();
                if got != want {
                    return dev_err(format!("used {got:?}, wanted {want:?}"));
                }
            }
        }
    }
    // Chains completed before a malformed one are not signalled by the console (it stops at
    // the error and raises only the configuration interrupt), so this holds for clean runs.
    if !breaks && !event_idx && completed > 0 && interrupt.status() & INT_USED_RING == 0 {
        return dev_err("chains used without an interrupt".into());
    }
    Ok(())
}

/// The first `len` bytes of `bufs`, read from guest memory (not the shadow).
fn gather_ref_mem(mem: &GuestMemoryMmap, bufs: &[(u64, u32)], len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    for &(a, l) in bufs {
        if out.len() >= len {
            break;
        }
        let n = (l as usize).min(len - out.len());
        let mut v = vec![0u8; n];
        if mem.read_slice(&mut v, GuestAddress(a)).is_err() {
            break;
        }
        out.extend(v);
    }
    out
}

// ------------------------------------------------------------------------------ scenario: mmio

const REGISTERS: [u64; 27] = [
    0x000, 0x004, 0x008, 0x00c, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034, 0x038, 0x044, 0x050,
    0x060, 0x064, 0x070, 0x080, 0x084, 0x090, 0x094, 0x0a0, 0x0a4, 0x0ac, 0x0b0, 0x0b8, 0x0fc,
    0x0c0,
];

/// A register offset: mostly a known register, else anything in and past the window.
fn any_offset(src: &mut Source) -> u64 {
    match src.below(20) {
        0..=15 => src.pick(&REGISTERS),
        16..=18 => src.below(0x1100),
        _ => u64::MAX - src.below(16),
    }
}

/// The width of a register access: 4 bytes mostly, sometimes one the transport must ignore.
fn access_width(src: &mut Source) -> usize {
    if src.chance(4, 5) {
        4
    } else {
        src.pick(&[0usize, 1, 2, 3, 8])
    }
}

/// What the fuzzer knows of the transport's state without modelling it: the selected queue
/// and every value a used-ring address register could have been given.
struct MmioModel {
    sel: u32,
    used_lows: Vec<u32>,
    used_highs: Vec<u32>,
}

fn mmio_input(src: &mut Source) -> Result<(), FuzzFailure> {
    let sh = shared()?;
    let mut g = Guest::new(Layout::generate(src))?;
    let kind = Kind::generate(src, 3, 4);
    let (sink, server) = stand_ins(sh);
    let t = transport(kind, &sink, &server, sh, &g.mem)?;
    let maxes = kind.max_sizes();
    let config = kind.config();
    // Ring layouts the driver will program, with chains already in place.
    let style = Style::generate(src, kind == Kind::NineP);
    let plans: Vec<Rings> = (0..maxes.len())
        .map(|_| Rings::generate(src, &g.layout, style))
        .collect();
    let mut plan_heads = Vec::new();
    for r in &plans {
        let heads = gen_table(src, &mut g, r.desc, u32::from(r.size16()), 0, style);
        let count = src.below(u64::from(r.size16()) + 1) as u16;
        publish(src, &mut g, r, &heads, 0, count);
        plan_heads.push((heads, count));
    }
    let mut m = MmioModel {
        sel: 0,
        used_lows: vec![0],
        used_highs: vec![0],
    };
    let label = format!("{kind:?} in {:x?}", g.layout.regions);
    let what = |m: &str| format!("{label}: {m}");
    let ops = 1 + src.below(48);
    for _ in 0..ops {
        match src.below(16) {
            // A register write: a known register or any offset, any width.
            0..=4 => {
                let off = any_offset(src);
                let width = access_width(src);
                let value = match src.below(6) {
                    0 => src.u64(),
                    1 => u64::from(src.pick(&[0u32, 1, 3, 7, 15, 0x4f, 0x80, 0xff, 0x8f])),
                    2 => src.below(4),
                    3 => plans[src.below(plans.len() as u64) as usize].used,
                    _ => src.below(0x1_0000),
                };
                let bytes = value.to_le_bytes();
                let data = &bytes[..width.min(8)];
                t.write(off, data);
                if width == 4 && off < CONFIG_SPACE {
                    let v = value as u32;
                    match off {
                        0x030 => m.sel = v,
                        0x070 if v & !STATUS_DEVICE_NEEDS_RESET == 0 => m.sel = 0,
                        0x0a0 => m.used_lows.push(v),
                        0x0a4 => m.used_highs.push(v),
                        _ => {}
                    }
                }
            }
            // A register read, checked against what the register must hold.
            5..=7 => {
                let off = any_offset(src);
                let width = access_width(src);
                let mut data = vec![0xa5u8; width];
                t.read(off, &mut data);
                check_read(kind, maxes, &config, &m, off, &data)
                    .map_err(|e| FuzzFailure::Registers(what(&e)))?;
            }
            // The proper bring-up, each step sometimes skipped.
            8..=9 => {
                let skip = |src: &mut Source| src.chance(1, 12);
                let features = kind.driver_features(src);
                if !skip(src) {
                    w32(&t, 0x70, 0);
                    m.sel = 0;
                }
                if !skip(src) {
                    negotiate(&t, features);
                    m.sel = 0;
                }
                for (qi, r) in plans.iter().enumerate() {
                    if skip(src) {
                        continue;
                    }
                    r.program(&t, qi as u32);
                    m.sel = qi as u32;
                    m.used_lows.push(r.used as u32);
                    m.used_highs.push((r.used >> 32) as u32);
                    if !skip(src) {
                        w32(&t, 0x44, 1);
                    }
                }
                if !skip(src) {
                    w32(&t, 0x70, r32(&t, 0x70) | STATUS_DRIVER_OK);
                    if r32(&t, 0x70) & (STATUS_DRIVER_OK | STATUS_DEVICE_NEEDS_RESET)
                        == STATUS_DRIVER_OK
                    {
                        tally(&MMIO_STARTED);
                    }
                }
            }
            // Notify a queue (through the register or straight through the eventfd).
            10..=11 => {
                let qn = src.below(maxes.len() as u64 + 1) as u32;
                if src.chance(1, 2) {
                    w32(&t, REG_QUEUE_NOTIFY, qn);
                } else if let Some(evt) = t.queue_evts().get(qn as usize) {
                    let _ = evt.write(1);
                }
            }
            // Make more chains available, maybe far more than fit.
            12 => {
                let qi = src.below(plans.len() as u64) as usize;
                let r = plans[qi];
                let (heads, count) = &mut plan_heads[qi];
                let more = if src.chance(1, 8) {
                    src.u64() as u16
                } else {
                    1 + src.below(4) as u16
                };
                publish(src, &mut g, &r, heads, *count, more);
                *count = count.wrapping_add(more);
            }
            // Reset, and check that it reset.
            13 => {
                w32(&t, 0x70, 0);
                m.sel = 0;
                let (status, isr) = (r32(&t, 0x70), r32(&t, 0x60));
                if status != 0 || isr != 0 {
                    return Err(FuzzFailure::Registers(what(&format!(
                        "after a reset status is {status:#x} and interrupt status {isr:#x}"
                    ))));
                }
                for qi in 0..maxes.len() as u32 + 1 {
                    w32(&t, 0x30, qi);
                    if r32(&t, 0x44) != 0 {
                        return Err(FuzzFailure::Registers(what(&format!(
                            "queue {qi} still ready after a reset"
                        ))));
                    }
                }
                w32(&t, 0x30, 0);
            }
            // Acknowledge interrupts or give the device thread a moment.
            14 => w32(&t, 0x64, src.below(4) as u32),
            _ => std::thread::yield_now(),
        }
    }
    t.shutdown();
    if let Some(v) = server.take_violation() {
        return Err(FuzzFailure::Device(what(&format!("reply area: {v}"))));
    }
    if kind == Kind::Console {
        // The console writes nothing but a used ring, and a used ring can only be where the
        // driver's address writes could have put it.
        let mut allowed = Vec::new();
        for &lo in &m.used_lows {
            for &hi in &m.used_highs {
                let at = u64::from(lo) | u64::from(hi) << 32;
                allowed.push(range(at, 6 + 8 * u64::from(QUEUE_MAX)));
            }
        }
        check_changes(&g.changes(), &allowed, &what("console"))?;
    }
    drop(t);
    Ok(())
}

/// The invariants of one register (or config space) read.
fn check_read(
    kind: Kind,
    maxes: &[u16],
    config: &[u8],
    m: &MmioModel,
    off: u64,
    data: &[u8],
) -> Result<(), String> {
    if off >= CONFIG_SPACE {
        let want: Vec<u8> = (0..data.len() as u64)
            .map(|i| {
                usize::try_from(off - CONFIG_SPACE + i)
                    .ok()
                    .and_then(|o| config.get(o))
                    .copied()
                    .unwrap_or(0)
            })
            .collect();
        return if data == want.as_slice() {
            Ok(())
        } else {
            Err(format!(
                "config read at {off:#x} gave {data:x?}, expected {want:x?}"
            ))
        };
    }
    if data.len() != 4 || off & 3 != 0 {
        return if data.iter().all(|&b| b == 0) {
            Ok(())
        } else {
            Err(format!(
                "{}-byte read at {off:#x} gave {data:x?}, expected zeros",
                data.len()
            ))
        };
    }
    let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
    let fail = |why: &str| Err(format!("register {off:#x} reads {v:#x}: {why}"));
    let max = maxes.get(m.sel as usize).copied().map_or(0, u32::from);
    match off {
        0x000 if v != 0x7472_6976 => fail("bad magic"),
        0x004 if v != 2 => fail("not version 2"),
        0x008 if v != (if kind == Kind::Console { 3 } else { 9 }) => fail("wrong device id"),
        0x034 if v != max => fail(&format!("QueueNumMax of queue {} must be {max}", m.sel)),
        0x044 if v > 1 || (max == 0 && v != 0) => fail("QueueReady out of range"),
        0x060 if v & !(INT_USED_RING | INT_CONFIG) != 0 => fail("unknown interrupt bits"),
        0x070 => {
            let known = STATUS_ACKNOWLEDGE
                | STATUS_DRIVER
                | STATUS_FEATURES_OK
                | STATUS_DRIVER_OK
                | STATUS_DEVICE_NEEDS_RESET
                | STATUS_FAILED;
            let prefix = (v & STATUS_DRIVER_OK == 0 || v & STATUS_FEATURES_OK != 0)
                && (v & STATUS_FEATURES_OK == 0 || v & STATUS_DRIVER != 0)
                && (v & STATUS_DRIVER == 0 || v & STATUS_ACKNOWLEDGE != 0);
            if v & !known != 0 || !prefix {
                fail("status bits out of order or unknown")
            } else {
                Ok(())
            }
        }
        _ => Ok(()),
    }
}

// ------------------------------------------------------------------------------ driving

/// Which scenario an input ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    Walk,
    Device,
    Mmio,
}

/// Runs one input drawn from `src`.
pub fn run_input(src: &mut Source) -> Result<Scenario, FuzzFailure> {
    match src.below(10) {
        0..=3 => walk_input(src).map(|()| Scenario::Walk),
        4..=7 => device_input(src).map(|()| Scenario::Device),
        _ => mmio_input(src).map(|()| Scenario::Mmio),
    }
}

/// Runs the input that `seed` generates (what `virtio-fuzz --seed S --iters 1` replays).
pub fn run_seed(seed: u64) -> Result<Scenario, FuzzFailure> {
    run_input(&mut Source::Rng(Rng::new(seed)))
}

/// Runs the input that the fuzzer's `data` describes (the cargo-fuzz entry point).
pub fn run_bytes(data: &[u8]) -> Result<Scenario, FuzzFailure> {
    run_input(&mut Source::Bytes(data))
}

static WALKS_ACCEPTED: AtomicU64 = AtomicU64::new(0);
static WALKS_REFUSED: AtomicU64 = AtomicU64::new(0);
static LAYOUTS_ACCEPTED: AtomicU64 = AtomicU64::new(0);
static LAYOUTS_REFUSED: AtomicU64 = AtomicU64::new(0);
static STRICT_RUNS: AtomicU64 = AtomicU64::new(0);
static CHAINS_COMPLETED: AtomicU64 = AtomicU64::new(0);
static DEVICES_BROKEN: AtomicU64 = AtomicU64::new(0);
static MMIO_STARTED: AtomicU64 = AtomicU64::new(0);

fn tally(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// What the inputs of this process led to, to show a run exercised both sides of each
/// decision (since the process started).
#[derive(Debug, Default, Clone)]
pub struct Outcomes {
    /// Chains the walker accepted / refused (each agreeing with the reference).
    pub walks_accepted: u64,
    pub walks_refused: u64,
    /// Queue layouts the transport accepted / refused (each as the spec says).
    pub layouts_accepted: u64,
    pub layouts_refused: u64,
    /// Device runs judged with every oracle (no self-overlapping rings or buffers).
    pub strict_runs: u64,
    /// Chains the devices completed, and device runs that ended in DEVICE_NEEDS_RESET.
    pub chains_completed: u64,
    pub devices_broken: u64,
    /// Register sequences that got a device running.
    pub mmio_started: u64,
}

impl Outcomes {
    pub fn now() -> Outcomes {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Outcomes {
            walks_accepted: get(&WALKS_ACCEPTED),
            walks_refused: get(&WALKS_REFUSED),
            layouts_accepted: get(&LAYOUTS_ACCEPTED),
            layouts_refused: get(&LAYOUTS_REFUSED),
            strict_runs: get(&STRICT_RUNS),
            chains_completed: get(&CHAINS_COMPLETED),
            devices_broken: get(&DEVICES_BROKEN),
            mmio_started: get(&MMIO_STARTED),
        }
    }
}

/// Counts of a fuzz run.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub inputs: u64,
    pub walk: u64,
    pub device: u64,
    pub mmio: u64,
}

/// A failure and the seed that replays it.
#[derive(Debug)]
pub struct Failed {
    pub input_seed: u64,
    pub input: u64,
    pub failure: FuzzFailure,
}

/// Runs inputs seeded `seed`, then successive mixes of it, until `iters` inputs or `secs`
/// seconds. `before` is called with each input's seed before it runs (for panic and hang
/// reports). Stops at the first failure.
pub fn run(
    seed: u64,
    iters: u64,
    secs: f64,
    mut before: impl FnMut(u64),
) -> Result<Summary, Box<Failed>> {
    let start = Instant::now();
    let mut s = Summary::default();
    let mut input_seed = seed;
    while s.inputs < iters && start.elapsed().as_secs_f64() < secs {
        before(input_seed);
        match run_seed(input_seed) {
            Ok(Scenario::Walk) => s.walk += 1,
            Ok(Scenario::Device) => s.device += 1,
            Ok(Scenario::Mmio) => s.mmio += 1,
            Err(failure) => {
                return Err(Box::new(Failed {
                    input_seed,
                    input: s.inputs,
                    failure,
                }))
            }
        }
        s.inputs += 1;
        input_seed = splitmix(input_seed);
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest() -> Guest {
        Guest::new(Layout {
            regions: vec![(0, 0x1_0000), (0x1_0000, 0x1_0000), (0x3_0000, 0x1_0000)],
        })
        .unwrap()
    }

    #[test]
    fn a_short_run_finds_nothing() {
        let s = run(0x5eed, 600, 120.0, |_| {})
            .map_err(|f| format!("seed {}: {}", f.input_seed, f.failure))
            .unwrap();
        assert_eq!(s.inputs, 600);
        assert!(s.walk > 0 && s.device > 0 && s.mmio > 0, "{s:?}");
    }

    #[test]
    fn fuzzer_bytes_always_end_and_replay_the_same() {
        assert!(run_bytes(&[]).is_ok());
        let mut rng = Rng::new(7);
        for len in [1usize, 7, 64, 512, 4096] {
            let data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            run_bytes(&data).unwrap();
        }
        // The same seed generates the same layout.
        let a = Layout::generate(&mut Source::Rng(Rng::new(99)));
        let b = Layout::generate(&mut Source::Rng(Rng::new(99)));
        assert_eq!(a, b);
    }

    #[test]
    fn coverage_of_ranges_follows_the_regions() {
        let g = guest();
        assert!(
            g.layout.covered(0xfff0, 0x20),
            "adjacent regions are contiguous"
        );
        assert!(!g.layout.covered(0x1_fff0, 0x20), "a hole is not memory");
        assert!(
            !g.layout.covered(u64::MAX - 4, 16),
            "wrapping is not memory"
        );
        assert!(g.layout.covered(u64::MAX, 0), "an empty range is");
        assert!(g.layout.covered(0x3_0000, 0x1_0000));
        assert!(!g.layout.covered(0x3_0000, 0x1_0001));
    }

    #[test]
    fn the_reference_walker_and_the_walker_agree_on_known_chains() {
        let mut g = guest();
        let d = |addr, len, flags, next| RawDesc {
            addr,
            len,
            flags,
            next,
        };
        // 0 -> 1 -> 2: readable, readable straddling two adjacent regions, writable.
        g.write_desc(0x100, 0, d(0x2000, 16, VRING_DESC_F_NEXT, 1));
        g.write_desc(0x100, 1, d(0xfff8, 16, VRING_DESC_F_NEXT, 2));
        g.write_desc(0x100, 2, d(0x3000, 8, VRING_DESC_F_WRITE, 0));
        // 3 -> 4 -> 3: a loop. 5: a buffer in the hole.
        g.write_desc(0x100, 3, d(0x2000, 1, VRING_DESC_F_NEXT, 4));
        g.write_desc(0x100, 4, d(0x2000, 1, VRING_DESC_F_NEXT, 3));
        g.write_desc(0x100, 5, d(0x2_0000, 1, 0, 0));
        for (head, ok) in [(0u16, true), (3, false), (5, false), (8, false)] {
            let got = chain::walk(&g.mem, GuestAddress(0x100), 8, head, false);
            let want = reference_walk(&g, 0x100, 8, head, false, &mut Vec::new());
            assert_eq!(got.is_ok(), ok, "head {head}: {got:?}");
            compare_walk(&got, &want, "known").unwrap();
        }
        let r = reference_walk(&g, 0x100, 8, 0, false, &mut Vec::new()).unwrap();
        assert_eq!(r.readable, vec![(0x2000, 16), (0xfff8, 16)]);
        assert_eq!(r.writable, vec![(0x3000, 8)]);
    }

    #[test]
    fn the_walk_oracle_catches_a_wrong_chain() {
        let mut g = guest();
        g.write_desc(
            0,
            0,
            RawDesc {
                addr: 0x2000,
                len: 16,
                flags: 0,
                next: 0,
            },
        );
        let mut got = chain::walk(&g.mem, GuestAddress(0), 4, 0, false);
        let want = reference_walk(&g, 0, 4, 0, false, &mut Vec::new());
        compare_walk(&got, &want, "same").unwrap();
        if let Ok(c) = &mut got {
            c.readable[0].len = 15; // a walker that lost a byte
        }
        assert!(compare_walk(&got, &want, "lost a byte").is_err());
        let refused = Err(chain::ChainError::TooManyDescriptors);
        assert!(compare_walk(&refused, &want, "refused a good chain").is_err());
    }

    #[test]
    fn stray_writes_are_caught_and_driver_writes_are_not() {
        let mut g = guest();
        g.write(0x100, &[1, 2, 3]);
        assert!(
            g.changes().is_empty(),
            "the driver's own writes are in the shadow"
        );
        g.mem.write_slice(&[9, 9], GuestAddress(0xffff)).unwrap();
        let changes = g.changes();
        assert_eq!(changes, vec![(0xffff, 0x1_0001)]);
        assert!(check_changes(&changes, &[(0xff00, 0x1_0100)], "ok").is_ok());
        assert!(check_changes(&changes, &[(0xff00, 0x1_0000)], "one byte out").is_err());
    }

    #[test]
    fn register_reads_are_checked() {
        let m = MmioModel {
            sel: 1,
            used_lows: vec![0],
            used_highs: vec![0],
        };
        let maxes = Kind::Console.max_sizes();
        let config = Kind::Console.config();
        let ok = |off, v: u32| check_read(Kind::Console, maxes, &config, &m, off, &v.to_le_bytes());
        assert!(ok(0x000, 0x7472_6976).is_ok());
        assert!(ok(0x034, 256).is_ok());
        assert!(ok(0x034, 4).is_err(), "queue 1's maximum is 256");
        assert!(ok(0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER).is_ok());
        assert!(ok(0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER_OK).is_err());
        assert!(ok(0x060, 4).is_err());
        assert!(check_read(Kind::Console, maxes, &config, &m, 0x001, &[0, 0]).is_ok());
        assert!(check_read(Kind::Console, maxes, &config, &m, 0x001, &[1, 0]).is_err());
        let nine = Kind::NineP.config();
        assert!(check_read(Kind::NineP, &[256], &nine, &m, 0x102, b"fu").is_ok());
        assert!(check_read(Kind::NineP, &[256], &nine, &m, 0x105, &[b'z', 0, 0]).is_ok());
        assert!(check_read(Kind::NineP, &[256], &nine, &m, 0x105, &[b'z', 1]).is_err());
    }

    fn ready_queue(size: u16, desc: u64, avail: u64, used: u64) -> Queue {
        let mut q = Queue::new(256).unwrap();
        q.try_set_size(size).unwrap();
        q.try_set_desc_table_address(GuestAddress(desc)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(avail)).unwrap();
        q.try_set_used_ring_address(GuestAddress(used)).unwrap();
        q.set_ready(true);
        q
    }

    /// Found by this fuzzer: an available ring at guest address 0 (aligned, in RAM, accepted by
    /// the transport) broke the device, because `virtio_queue`'s iterator calls such a queue
    /// "not ready".
    #[test]
    fn an_available_ring_at_address_zero_is_served() {
        let mut g = guest();
        g.write(2, &2u16.to_le_bytes());
        g.write(4, &[3, 0, 1, 0]);
        let mut q = ready_queue(4, 0x1000, 0, 0x2000);
        let mut heads = Vec::new();
        chain::pop_available(&mut q, &g.mem, &mut heads).unwrap();
        assert_eq!(heads, vec![3, 1]);
        assert_eq!(q.next_avail(), 2);
        chain::pop_available(&mut q, &g.mem, &mut heads).unwrap();
        assert!(heads.is_empty());
    }

    /// `virtio_queue`'s iterator ends silently at an unreadable ring entry and leaves the
    /// index behind it, so a device would find the ring never empty and spin. Reading the ring
    /// ourselves turns that into an error.
    #[test]
    fn an_unreadable_available_entry_is_an_error_not_a_short_pop() {
        let mut g = guest();
        // The ring header and entry 0 end exactly at the hole at 0x2_0000; entry 1 is in it.
        let avail = 0x2_0000 - 6;
        g.write(avail + 2, &2u16.to_le_bytes());
        let mut q = ready_queue(4, 0x1000, avail, 0x3000);
        let mut heads = Vec::new();
        let e = chain::pop_available(&mut q, &g.mem, &mut heads).unwrap_err();
        assert!(matches!(e, chain::ChainError::Ring(_)), "{e}");
        // Far ahead of the ring is still its own error.
        g.write(avail + 2, &9u16.to_le_bytes());
        let mut q = ready_queue(4, 0x1000, avail, 0x3000);
        assert!(matches!(
            chain::pop_available(&mut q, &g.mem, &mut heads),
            Err(chain::ChainError::AvailIndex { avail: 9, next: 0 })
        ));
    }

    #[test]
    fn the_transport_oracle_knows_valid_layouts() {
        let g = guest();
        let r = Rings {
            size: 16,
            desc: 0x1000,
            avail: 0x2000,
            used: 0x3000,
        };
        assert!(r.valid(&g.layout, 256));
        assert!(!Rings { size: 24, ..r }.valid(&g.layout, 256));
        assert!(!Rings { size: 512, ..r }.valid(&g.layout, 256));
        assert!(!Rings {
            size: 65536 + 16,
            ..r
        }
        .valid(&g.layout, 256));
        assert!(!Rings { desc: 0x1008, ..r }.valid(&g.layout, 256));
        assert!(!Rings {
            used: 0x2_0000 - 8,
            ..r
        }
        .valid(&g.layout, 256));
        assert!(
            Rings {
                used: 0x1_0000 - 8,
                ..r
            }
            .valid(&g.layout, 256),
            "across adjacent regions"
        );
    }
}
