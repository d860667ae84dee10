//! The validating descriptor-chain walker shared by every virtio device here.
//!
//! `virtio_queue::DescriptorChain` ends iteration silently on most errors, so a device cannot
//! tell a short chain from a malformed one. This walker reads split-ring descriptors itself and
//! returns a [`ChainError`] for every malformation a guest can produce: indexes outside the
//! table, loops, buffers outside guest memory, device-readable after device-writable buffers,
//! too many descriptors, too many bytes, and every kind of bad indirect table. Every loop is
//! bounded by the table size and by [`MAX_CHAIN_DESCRIPTORS`], so a hostile chain costs at most
//! that many 16-byte reads. It owns no queue state: the ring indexes stay in
//! `virtio_queue::Queue`.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// The most descriptors one chain may have, direct and indirect together. Linux keeps 9p chains
/// far below this (about 2 + msize / 4 KiB) even with indirect tables.
pub const MAX_CHAIN_DESCRIPTORS: u32 = 1024;

/// Split-ring descriptor flag: the chain continues at `next`.
pub const VRING_DESC_F_NEXT: u16 = 1;
/// Split-ring descriptor flag: the buffer is device-writable.
pub const VRING_DESC_F_WRITE: u16 = 2;
/// Split-ring descriptor flag: the buffer is an indirect descriptor table.
pub const VRING_DESC_F_INDIRECT: u16 = 4;

const DESC_SIZE: u64 = 16;

/// One guest buffer of a chain, already checked to lie inside guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A validated descriptor chain: its head index and its buffers split by direction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chain {
    /// The head descriptor index, to be returned in the used ring.
    pub head: u16,
    /// Device-readable buffers, in chain order (zero-length buffers dropped).
    pub readable: Vec<Buffer>,
    /// Device-writable buffers, in chain order (zero-length buffers dropped).
    pub writable: Vec<Buffer>,
    /// Total bytes of the readable buffers.
    pub readable_len: u64,
    /// Total bytes of the writable buffers.
    pub writable_len: u64,
}

/// Why a chain was refused. Any of these puts the device into its error state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("descriptor index {index} is outside its table of {size} entries")]
    IndexOutOfRange { index: u32, size: u32 },
    #[error("descriptor table entry at {addr:#x} is outside guest memory")]
    TableUnreadable { addr: u64 },
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    BufferOutOfMemory { addr: u64, len: u32 },
    #[error("descriptor chain loops (longer than its table of {size} entries)")]
    Loop { size: u32 },
    #[error("descriptor chain has more than {MAX_CHAIN_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    #[error("descriptor chain carries more than {limit} bytes")]
    TooLong { limit: u64 },
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    #[error("device-writable buffer in a queue the device only reads")]
    UnexpectedWritable,
    #[error("indirect descriptor used without negotiating VIRTIO_F_INDIRECT_DESC")]
    IndirectNotNegotiated,
    #[error("indirect descriptor inside an indirect table")]
    NestedIndirect,
    #[error("indirect descriptor with the NEXT flag set")]
    IndirectWithNext,
    #[error("indirect table of {len} bytes (must be a non-zero multiple of 16, at most {MAX_CHAIN_DESCRIPTORS} entries)")]
    BadIndirectLength { len: u32 },
    #[error("indirect table {addr:#x}+{len:#x} is outside guest memory")]
    IndirectOutOfMemory { addr: u64, len: u32 },
    #[error("available ring index {avail} is more than the queue size ahead of {next}")]
    AvailIndex { avail: u16, next: u16 },
    #[error("cannot access the rings in guest memory: {0}")]
    Ring(String),
}

struct RawDesc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn read_desc(
    mem: &GuestMemoryMmap,
    table: GuestAddress,
    index: u32,
) -> Result<RawDesc, ChainError> {
    let addr = table
        .checked_add(u64::from(index) * DESC_SIZE)
        .ok_or(ChainError::TableUnreadable { addr: u64::MAX })?;
    let mut raw = [0u8; 16];
    mem.read_slice(&mut raw, addr)
        .map_err(|_| ChainError::TableUnreadable {
            addr: addr.raw_value(),
        })?;
    let field = |range: std::ops::Range<usize>| &raw[range];
    Ok(RawDesc {
        addr: u64::from_le_bytes(field(0..8).try_into().unwrap_or_default()),
        len: u32::from_le_bytes(field(8..12).try_into().unwrap_or_default()),
        flags: u16::from_le_bytes(field(12..14).try_into().unwrap_or_default()),
        next: u16::from_le_bytes(field(14..16).try_into().unwrap_or_default()),
    })
}

/// Walks the chain starting at `head` in the descriptor table at `desc_table` (of `queue_size`
/// entries), following at most one indirect table when `indirect_ok`.
pub fn walk(
    mem: &GuestMemoryMmap,
    desc_table: GuestAddress,
    queue_size: u16,
    head: u16,
    indirect_ok: bool,
) -> Result<Chain, ChainError> {
    let mut chain = Chain {
        head,
        ..Chain::default()
    };
    let mut table = desc_table;
    let mut table_len = u32::from(queue_size);
    let mut index = u32::from(head);
    let mut in_indirect = false;
    let mut seen_in_table = 0u32;
    let mut seen_total = 0u32;
    let mut seen_writable = false;
    loop {
        if index >= table_len {
            return Err(ChainError::IndexOutOfRange {
                index,
                size: table_len,
            });
        }
        // A chain that visits more entries than its table holds must revisit one: a loop.
        if seen_in_table >= table_len {
            return Err(ChainError::Loop { size: table_len });
        }
        seen_in_table += 1;
        seen_total += 1;
        if seen_total > MAX_CHAIN_DESCRIPTORS {
            return Err(ChainError::TooManyDescriptors);
        }
        let desc = read_desc(mem, table, index)?;
        if desc.flags & VRING_DESC_F_INDIRECT != 0 {
            if !indirect_ok {
                return Err(ChainError::IndirectNotNegotiated);
            }
            if in_indirect {
                return Err(ChainError::NestedIndirect);
            }
            if desc.flags & VRING_DESC_F_NEXT != 0 {
                return Err(ChainError::IndirectWithNext);
            }
            let entries = desc.len / DESC_SIZE as u32;
            if desc.len == 0
                || u64::from(desc.len) & (DESC_SIZE - 1) != 0
                || entries > MAX_CHAIN_DESCRIPTORS
            {
                return Err(ChainError::BadIndirectLength { len: desc.len });
            }
            if !mem.check_range(GuestAddress(desc.addr), desc.len as usize) {
                return Err(ChainError::IndirectOutOfMemory {
                    addr: desc.addr,
                    len: desc.len,
                });
            }
            table = GuestAddress(desc.addr);
            table_len = entries;
            index = 0;
            in_indirect = true;
            seen_in_table = 0;
            continue;
        }
        if desc.len > 0 && !mem.check_range(GuestAddress(desc.addr), desc.len as usize) {
            return Err(ChainError::BufferOutOfMemory {
                addr: desc.addr,
                len: desc.len,
            });
        }
        let buffer = Buffer {
            addr: GuestAddress(desc.addr),
            len: desc.len,
        };
        if desc.flags & VRING_DESC_F_WRITE != 0 {
            seen_writable = true;
            chain.writable_len += u64::from(desc.len);
            if desc.len > 0 {
                chain.writable.push(buffer);
            }
        } else {
            if seen_writable {
                return Err(ChainError::ReadableAfterWritable);
            }
            chain.readable_len += u64::from(desc.len);
            if desc.len > 0 {
                chain.readable.push(buffer);
            }
        }
        // virtio 1.2, 2.7.5.2: a chain carries at most 2^32 bytes.
        if chain.readable_len + chain.writable_len > u64::from(u32::MAX) {
            return Err(ChainError::TooLong {
                limit: u64::from(u32::MAX),
            });
        }
        if desc.flags & VRING_DESC_F_NEXT == 0 {
            crate::internal_check!(
                chain.readable.iter().map(|b| u64::from(b.len)).sum::<u64>() == chain.readable_len
                    && chain.writable.iter().map(|b| u64::from(b.len)).sum::<u64>()
                        == chain.writable_len,
                "chain {head}: buffer lengths disagree with the totals"
            );
            return Ok(chain);
        }
        index = u32::from(desc.next);
    }
}

impl Chain {
    /// Copies the first `out.len()` readable bytes (fewer if the chain is shorter) into `out`;
    /// returns how many were copied.
    pub fn peek(&self, mem: &GuestMemoryMmap, out: &mut [u8]) -> Result<usize, ChainError> {
        let mut pos = 0usize;
        for b in &self.readable {
            if pos == out.len() {
                break;
            }
            let n = (out.len() - pos).min(b.len as usize);
            mem.read_slice(&mut out[pos..pos + n], b.addr)
                .map_err(|_| ChainError::BufferOutOfMemory {
                    addr: b.addr.raw_value(),
                    len: b.len,
                })?;
            pos += n;
        }
        Ok(pos)
    }

    /// Copies every readable byte of the chain, in order, into `out` (replacing its contents).
    pub fn gather(&self, mem: &GuestMemoryMmap, out: &mut Vec<u8>) -> Result<(), ChainError> {
        let total = usize::try_from(self.readable_len).map_err(|_| ChainError::TooLong {
            limit: usize::MAX as u64,
        })?;
        out.clear();
        out.resize(total, 0);
        let mut pos = 0usize;
        for b in &self.readable {
            let end = pos + b.len as usize;
            mem.read_slice(&mut out[pos..end], b.addr).map_err(|_| {
                ChainError::BufferOutOfMemory {
                    addr: b.addr.raw_value(),
                    len: b.len,
                }
            })?;
            pos = end;
        }
        Ok(())
    }
}

/// One step of draining a queue: with notifications off, takes every available head into
/// `heads` and returns true; when there is none, turns notifications back on and returns false
/// (the drain is over), unless the ring says more arrived meanwhile, which is looked at once.
///
/// A driver's index only grows, so after notifications are back on and the ring says more
/// arrived, the next pop finds it. When that pop finds nothing (the available index moved
/// back: the driver laid the rings over each other, so that the device's own write of the
/// used ring's flags is the index it reads), the drain ends instead of spinning on the
/// device thread.
pub fn next_batch(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    heads: &mut Vec<u16>,
) -> Result<bool, ChainError> {
    let ring = |e: virtio_queue::Error| ChainError::Ring(e.to_string());
    let mut rechecked = false;
    loop {
        queue.disable_notification(mem).map_err(ring)?;
        pop_available(queue, mem, heads)?;
        if !heads.is_empty() {
            return Ok(true);
        }
        if queue.enable_notification(mem).map_err(ring)? && !rechecked {
            rechecked = true;
            continue; // more arrived while notifications were off
        }
        return Ok(false);
    }
}

/// Takes every head the driver has made available so far (at most the queue size: an
/// available index further ahead than that is an error).
///
/// The ring is read here rather than through `virtio_queue`'s iterator, which refuses an
/// available ring at guest address 0 (a valid placement) as "not ready" and silently stops at
/// an unreadable entry, leaving the index behind so that the caller would spin on it.
pub fn pop_available(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    heads: &mut Vec<u16>,
) -> Result<(), ChainError> {
    use std::sync::atomic::Ordering;
    heads.clear();
    if !queue.ready() {
        return Err(ChainError::Ring("the queue is not ready".into()));
    }
    let next = queue.next_avail();
    let size = queue.size();
    let avail = queue
        .avail_idx(mem, Ordering::Acquire)
        .map_err(|e| ChainError::Ring(e.to_string()))?
        .0;
    let pending = avail.wrapping_sub(next);
    if pending > size {
        return Err(ChainError::AvailIndex { avail, next });
    }
    let ring = GuestAddress(queue.avail_ring());
    for k in 0..pending {
        // `pending` <= `size`, so `size` is not zero here.
        let slot = u64::from(next.wrapping_add(k) % size);
        let entry = ring
            .checked_add(4 + 2 * slot)
            .ok_or_else(|| ChainError::Ring("available ring address overflows".into()))?;
        let head = mem.load::<u16>(entry, Ordering::Acquire).map_err(|_| {
            ChainError::Ring(format!(
                "available ring entry at {:#x} is outside guest memory",
                entry.raw_value()
            ))
        })?;
        heads.push(u16::from_le(head));
    }
    queue.set_next_avail(next.wrapping_add(pending));
    Ok(())
}
