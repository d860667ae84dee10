//! virtio-blk (device 2): one disk image ([`disk::Image`]) served to the guest's `virtio_blk`
//! driver, read-only unless asked otherwise.
//!
//! The device owns the request side: the config space (capacity, segment limits, block size),
//! the request header and status byte, and the checks a hostile guest can trip. Each request
//! is checked on the event thread (a malformed descriptor chain puts the device into its error
//! state, like every other device here) and then served on a worker pool, so several requests
//! are in flight at once and complete out of order. Reads of images whose bytes are a host
//! file's bytes (raw) go straight into the guest's buffers with one `preadv`; other formats
//! (qcow2) read into a bounded bounce buffer and copy. A request that is well formed as a chain
//! but wrong as a block request (short header, out-of-range sectors, wrong directions, too many
//! or too large segments, a write to a read-only disk) gets an error status, never a crash.

use super::chain::{Buffer, Chain};
use super::fs9p::GuestReply;
use super::mmio::{ActivateContext, QueueHandler, VirtioDevice, VirtioError};
use super::request::RequestQueue;
use p9::{ReplyBuf, WorkerPool};
use std::os::fd::AsFd;
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress};

/// virtio device ID of a block device.
pub const TYPE_BLOCK: u32 = 2;

/// Feature bit: `size_max` in config space is the largest segment.
pub const VIRTIO_BLK_F_SIZE_MAX: u32 = 1;
/// Feature bit: `seg_max` in config space is the most data segments per request.
pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
/// Feature bit: the disk is read-only.
pub const VIRTIO_BLK_F_RO: u32 = 5;
/// Feature bit: `blk_size` in config space is the logical block size.
pub const VIRTIO_BLK_F_BLK_SIZE: u32 = 6;
/// Feature bit: the device accepts FLUSH requests.
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;

/// Request types.
pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

/// Request status values (the last byte of every request).
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Bytes per sector: capacity and request positions count in these.
pub const SECTOR_SIZE: u64 = 512;
/// Most data segments per request (`seg_max`): the queue size minus header and status, as QEMU.
pub const SEG_MAX: u32 = 126;
/// Largest data segment (`size_max`).
pub const SIZE_MAX: u32 = 256 * 1024;
/// Length of the GET_ID answer (the serial, zero-padded).
pub const ID_LEN: usize = 20;

const QUEUE_SIZE: u16 = 128;
/// type (u32), reserved (u32), sector (u64).
const HEADER_LEN: usize = 16;
/// capacity u64, size_max u32, seg_max u32, geometry u32, blk_size u32.
const CONFIG_LEN: usize = 24;
/// Bounce buffer of a read from a format that is not a plain file.
const BOUNCE_CHUNK: usize = 1 << 20;

/// Why a block device cannot be created.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("the disk image was opened read-only, so it cannot be offered writable")]
    ImageNotWritable,
    #[error("disk serial {0:?} is longer than {ID_LEN} bytes")]
    SerialTooLong(String),
}

/// A worker pool for block devices: `threads` workers named `name-N`, each of which enters the
/// block-worker role of the sandbox ([`crate::sandbox::ThreadRole::BlockWorker`]: image reads,
/// writes and flushes on descriptors it holds, no opening of files) before serving, with
/// statistics if `stats`.
pub fn worker_pool(threads: usize, name: &str, stats: bool) -> WorkerPool {
    WorkerPool::with_thread_start(
        threads,
        name,
        Arc::new(|| crate::sandbox::enter_thread(crate::sandbox::ThreadRole::BlockWorker)),
        stats,
    )
}

/// A virtio-blk device backed by one disk image.
pub struct Block {
    image: Arc<dyn disk::Image>,
    read_only: bool,
    serial: [u8; ID_LEN],
    config: [u8; CONFIG_LEN],
    pool: Arc<WorkerPool>,
}

impl Block {
    /// A disk the guest sees as `/dev/vdX`, of `image`'s size rounded up to whole sectors (the
    /// tail reads as zeros). `read_only` offers VIRTIO_BLK_F_RO and fails every write; a
    /// writable disk needs an image opened writable. `serial` (at most [`ID_LEN`] bytes) is
    /// the GET_ID answer, `/sys/block/vdX/serial` in the guest. Requests run on `pool`, whose
    /// threads must be allowed `pread`/`preadv` (and `pwrite`/`fdatasync` when writable), as
    /// those of [`worker_pool`] are.
    pub fn new(
        image: Arc<dyn disk::Image>,
        read_only: bool,
        serial: &str,
        pool: Arc<WorkerPool>,
    ) -> Result<Self, BlockError> {
        if !read_only && !image.is_writable() {
            return Err(BlockError::ImageNotWritable);
        }
        if serial.len() > ID_LEN {
            return Err(BlockError::SerialTooLong(serial.to_string()));
        }
        let mut id = [0u8; ID_LEN];
        id[..serial.len()].copy_from_slice(serial.as_bytes());
        let sectors = image.len().div_ceil(SECTOR_SIZE);
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&sectors.to_le_bytes());
        config[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        // 16..20: geometry, not offered.
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        Ok(Self {
            image,
            read_only,
            serial: id,
            config,
            pool,
        })
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn name(&self) -> &'static str {
        "block"
    }

    fn device_features(&self) -> u64 {
        let mut features = 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH;
        if self.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<Box<dyn QueueHandler>, VirtioError> {
        Ok(Box::new(BlockHandler {
            shared: Arc::new(Shared {
                rq: RequestQueue::activate(ctx, "block")?,
                image: self.image.clone(),
                read_only: self.read_only,
                serial: self.serial,
            }),
            pool: self.pool.clone(),
            heads: Vec::with_capacity(usize::from(QUEUE_SIZE)),
        }))
    }
}

struct Shared {
    rq: RequestQueue,
    image: Arc<dyn disk::Image>,
    read_only: bool,
    serial: [u8; ID_LEN],
}

/// A request refused or failed: the status it completes with.
struct Refused(u8);

fn ioerr<T>(why: &str) -> Result<T, Refused> {
    log::debug!("virtio-block: request refused: {why}");
    Err(Refused(VIRTIO_BLK_S_IOERR))
}

impl Shared {
    /// Serves one request: execute it, write its status byte, add it to the used ring.
    fn serve(&self, chain: &Chain) {
        let timer = self.rq.stats.start();
        // The status is the last device-writable byte; without one nothing can be reported.
        let status_at = chain
            .writable
            .last()
            .map(|b| GuestAddress(b.addr.0 + u64::from(b.len) - 1));
        let (status, data_written) = match status_at {
            None => {
                log::debug!("virtio-block: request without a status byte; completed unanswered");
                (None, 0)
            }
            Some(_) => match self.execute(chain) {
                Ok(n) => (Some(VIRTIO_BLK_S_OK), n),
                Err(Refused(status)) => (Some(status), 0),
            },
        };
        let mut used_len = 0u32;
        if let (Some(addr), Some(status)) = (status_at, status) {
            if self.rq.mem.write_obj(status, addr).is_err() {
                self.rq.error(&"status byte is outside guest memory");
                return;
            }
            // data_written < the writable length, which the walker bounded by u32::MAX.
            used_len = u32::try_from(data_written + 1).unwrap_or(u32::MAX);
        }
        self.rq.complete(chain.head, used_len, data_written, timer);
    }

    /// Executes a request whose chain has a status byte; returns the data bytes written to
    /// the guest (not counting the status byte).
    fn execute(&self, chain: &Chain) -> Result<u64, Refused> {
        let mut header = [0u8; HEADER_LEN];
        match chain.peek(&self.rq.mem, &mut header) {
            Ok(HEADER_LEN) => {}
            _ => return ioerr("header shorter than 16 bytes"),
        }
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
        // The device-readable data after the header, and the device-writable data before the
        // status byte.
        let readable_data = chain.readable_len - HEADER_LEN as u64;
        let writable_data = chain.writable_len - 1;
        match kind {
            VIRTIO_BLK_T_IN => {
                if readable_data != 0 {
                    return ioerr("read request with device-readable data");
                }
                let bufs = data_buffers(&chain.writable, 0, writable_data)?;
                let offset = self.check_range(sector, writable_data)?;
                self.read(&bufs, offset, writable_data)?;
                Ok(writable_data)
            }
            VIRTIO_BLK_T_OUT => {
                if writable_data != 0 {
                    return ioerr("write request with device-writable data");
                }
                if self.read_only {
                    return ioerr("write to a read-only disk");
                }
                let bufs = data_buffers(&chain.readable, HEADER_LEN as u64, readable_data)?;
                let offset = self.check_range(sector, readable_data)?;
                self.write(chain, &bufs, offset, readable_data)?;
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => match self.image.flush() {
                Ok(()) => Ok(0),
                Err(e) => {
                    log::warn!("virtio-block: flush failed: {e}");
                    Err(Refused(VIRTIO_BLK_S_IOERR))
                }
            },
            VIRTIO_BLK_T_GET_ID => {
                if writable_data == 0 {
                    return ioerr("GET_ID without a buffer for the serial");
                }
                let bufs = data_buffers(&chain.writable, 0, writable_data)?;
                let n = writable_data.min(ID_LEN as u64) as usize;
                GuestReply::new(&self.rq.mem, &bufs)
                    .write_at(0, &self.serial[..n])
                    .or_else(|_| ioerr("serial buffer outside guest memory"))?;
                Ok(n as u64)
            }
            other => {
                log::debug!("virtio-block: unsupported request type {other}");
                Err(Refused(VIRTIO_BLK_S_UNSUPP))
            }
        }
    }

    /// The byte offset of `len` bytes at `sector`, if they are whole sectors inside the disk.
    fn check_range(&self, sector: u64, len: u64) -> Result<u64, Refused> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return ioerr("data length is not a multiple of 512");
        }
        let capacity = self.image.len().div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
        match sector.checked_mul(SECTOR_SIZE) {
            Some(offset) if offset <= capacity && len <= capacity - offset => Ok(offset),
            _ => ioerr("sectors outside the disk"),
        }
    }

    /// Reads `len` disk bytes at `offset` into the guest buffers `bufs`.
    fn read(&self, bufs: &[Buffer], offset: u64, len: u64) -> Result<(), Refused> {
        let mut reply = GuestReply::new(&self.rq.mem, bufs);
        // Bytes past the image's end (the last partial sector) read as zeros.
        let in_image = len.min(self.image.len().saturating_sub(offset)) as usize;
        let failed = |e: &dyn std::fmt::Display| {
            log::warn!("virtio-block: read of {len} bytes at {offset} failed: {e}");
            Refused(VIRTIO_BLK_S_IOERR)
        };
        let mut done = 0usize;
        if let Some(file) = self.image.direct_file() {
            while done < in_image {
                let n = reply
                    .read_from(done, in_image - done, file.as_fd(), offset + done as u64)
                    .map_err(|e| failed(&e))?;
                if n == 0 {
                    return Err(failed(&"the image file became shorter"));
                }
                done += n;
            }
        } else {
            let mut bounce = vec![0u8; in_image.min(BOUNCE_CHUNK)];
            while done < in_image {
                let n = (in_image - done).min(BOUNCE_CHUNK);
                self.image
                    .read_at(&mut bounce[..n], offset + done as u64)
                    .map_err(|e| failed(&e))?;
                reply.write_at(done, &bounce[..n]).map_err(|e| failed(&e))?;
                done += n;
            }
        }
        let tail = len as usize - in_image;
        if tail > 0 {
            reply
                .write_at(in_image, &vec![0u8; tail])
                .map_err(|e| failed(&e))?;
        }
        Ok(())
    }

    /// Writes the request's `len` data bytes (in `bufs`) to the disk at `offset`.
    fn write(&self, chain: &Chain, bufs: &[Buffer], offset: u64, len: u64) -> Result<(), Refused> {
        let mut data = vec![0u8; len as usize];
        let mut pos = 0usize;
        for b in bufs {
            let end = pos + b.len as usize;
            self.rq
                .mem
                .read_slice(&mut data[pos..end], b.addr)
                .or_else(|_| ioerr("data buffer outside guest memory"))?;
            pos = end;
        }
        // Bytes for the padding past the image's end (the last partial sector) are dropped.
        let in_image = len.min(self.image.len().saturating_sub(offset)) as usize;
        self.image.write_at(&data[..in_image], offset).map_err(|e| {
            log::warn!(
                "virtio-block: write of {len} bytes at {offset} (chain {}) failed: {e}",
                chain.head
            );
            Refused(VIRTIO_BLK_S_IOERR)
        })
    }
}

/// The `len` data bytes of one direction that start `skip` bytes into `bufs` (after the
/// header on the device-readable side, at 0 on the device-writable side, where the status byte
/// follows them), as segments each checked against `size_max`, their count against `seg_max`.
fn data_buffers(bufs: &[Buffer], mut skip: u64, len: u64) -> Result<Vec<Buffer>, Refused> {
    let mut out = Vec::new();
    let mut keep = len;
    for b in bufs {
        if keep == 0 {
            break;
        }
        let blen = u64::from(b.len);
        if skip >= blen {
            skip -= blen;
            continue;
        }
        let n = (blen - skip).min(keep);
        if n > u64::from(SIZE_MAX) {
            return ioerr("data segment larger than size_max");
        }
        if out.len() == SEG_MAX as usize {
            return ioerr("more data segments than seg_max");
        }
        out.push(Buffer {
            addr: GuestAddress(b.addr.0 + skip),
            len: n as u32,
        });
        keep -= n;
        skip = 0;
    }
    if keep != 0 {
        return ioerr("data longer than its buffers");
    }
    Ok(out)
}

struct BlockHandler {
    shared: Arc<Shared>,
    pool: Arc<WorkerPool>,
    heads: Vec<u16>,
}

impl QueueHandler for BlockHandler {
    fn notify(&mut self, queue: usize) {
        let shared = &self.shared;
        shared.rq.notified(queue, &mut self.heads, |chain| {
            shared.rq.started();
            let shared = shared.clone();
            self.pool.submit(Box::new(move || {
                let _serving = shared.rq.serving();
                shared.serve(&chain);
            }));
            Ok(())
        });
    }
}

impl Drop for BlockHandler {
    /// Waits for in-flight requests so none touches guest memory after a reset completes.
    fn drop(&mut self) {
        self.shared.rq.wait_idle();
    }
}
