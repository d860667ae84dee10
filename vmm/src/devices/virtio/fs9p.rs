//! virtio-9p (device 9): carries 9P2000.L messages between the guest's `9p` filesystem and a
//! [`p9::Server`]. The device owns only the transport side: one request queue, the mount tag
//! in config space, and the reply area over the chain's guest buffers. The protocol is the
//! server's business.
//!
//! Each notification pops every available chain and hands each to the worker pool, so requests
//! are served concurrently and complete out of order. A worker gathers the device-readable
//! bytes into a Vec, lets the server answer into a [`GuestReply`] spanning the device-writable
//! buffers (file reads land there with one `preadv`, no bounce buffer), then takes the queue
//! lock only to add the used element and decide on the interrupt.

use super::chain::{Buffer, Chain, ChainError};
use super::mmio::{ActivateContext, QueueHandler, VirtioDevice, VirtioError};
use super::request::RequestQueue;
use super::TYPE_9P;
use crate::sandbox::{self, ThreadRole};
use p9::flush::{flushed_tag, FlushTracker};
use p9::{ReplyBuf, Server, WorkerPool};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Longest accepted mount tag, in bytes.
pub const MAX_TAG_LEN: usize = 36;
/// Feature bit: the config space carries a mount tag.
pub const VIRTIO_9P_MOUNT_TAG: u32 = 0;
/// Largest request (device-readable part of a chain) accepted; far above any msize.
pub const MAX_REQUEST_BYTES: u64 = 64 << 20;

const QUEUE_SIZE: u16 = 256;

/// A virtio-9p device exporting one [`p9::Server`] under a mount tag.
pub struct Virtio9p {
    config: Vec<u8>,
    server: Arc<dyn RequestHandler>,
    pool: Arc<WorkerPool>,
}

/// What the device needs from a 9P server: one reply per request, callable from many threads.
/// [`p9::Server`] is the real one; tests substitute handlers that block or reorder.
pub(crate) trait RequestHandler: Send + Sync {
    /// Answers `request` into `reply`, returning the reply length.
    fn handle(&self, request: &[u8], reply: &mut dyn ReplyBuf) -> usize;
}

impl RequestHandler for Server {
    fn handle(&self, request: &[u8], reply: &mut dyn ReplyBuf) -> usize {
        Server::handle(self, request, reply)
    }
}

/// The server of an unused share slot: answers every request with `Rlerror(ENXIO)`.
struct NoShare;

impl RequestHandler for NoShare {
    fn handle(&self, request: &[u8], reply: &mut dyn ReplyBuf) -> usize {
        const RLERROR: u8 = 7;
        let tag = request.get(5..7).unwrap_or(&[0xff, 0xff]);
        let mut msg = Vec::with_capacity(11);
        msg.extend_from_slice(&11u32.to_le_bytes());
        msg.push(RLERROR);
        msg.extend_from_slice(tag);
        msg.extend_from_slice(&(libc::ENXIO as u32).to_le_bytes());
        if reply.capacity() < msg.len() || reply.write_at(0, &msg).is_err() {
            return 0;
        }
        msg.len()
    }
}

/// A worker pool for 9p devices: `threads` workers named `name-N`, each of which enters the
/// file-server role of the sandbox ([`crate::sandbox::ThreadRole::P9Worker`]) before serving,
/// with statistics if `stats` (as [`p9::Config::stats`] is for the servers).
pub fn worker_pool(threads: usize, name: &str, stats: bool) -> WorkerPool {
    WorkerPool::with_thread_start(
        threads,
        name,
        Arc::new(|| sandbox::enter_thread(ThreadRole::P9Worker)),
        stats,
    )
}

impl Virtio9p {
    /// A device the guest mounts with `mount -t 9p -o trans=virtio <tag> <dir>`. `tag` must be
    /// 1 to [`MAX_TAG_LEN`] bytes. With the sandbox installed, requests must run on the pool's
    /// workers (the device thread may not touch files), so the pool needs at least one thread.
    pub fn new(tag: &str, server: Arc<Server>, pool: Arc<WorkerPool>) -> Result<Self, VirtioError> {
        if sandbox::is_installed() && pool.threads() == 0 {
            return Err(VirtioError::Activate {
                device: "9p",
                reason: "no 9p worker thread could be started, and with the sandbox on \
                         requests cannot run on the device thread; check thread limits"
                    .into(),
            });
        }
        Self::with_handler(tag, server, pool)
    }

    /// A device under `tag` with no share behind it: every request is answered with ENXIO.
    /// A warm appliance has a fixed number of 9p devices (share slots); the slots a job does
    /// not use get one of these, so the guest sees the same devices and nothing behind them.
    pub fn unbacked(tag: &str, pool: Arc<WorkerPool>) -> Result<Self, VirtioError> {
        Self::with_handler(tag, Arc::new(NoShare), pool)
    }

    pub(crate) fn with_handler(
        tag: &str,
        server: Arc<dyn RequestHandler>,
        pool: Arc<WorkerPool>,
    ) -> Result<Self, VirtioError> {
        if tag.is_empty() || tag.len() > MAX_TAG_LEN || tag.contains('\0') {
            return Err(VirtioError::BadTag {
                tag: tag.to_string(),
                max: MAX_TAG_LEN,
            });
        }
        let mut config = Vec::with_capacity(2 + tag.len());
        // The length fits: MAX_TAG_LEN < u16::MAX.
        config.extend_from_slice(&(tag.len() as u16).to_le_bytes());
        config.extend_from_slice(tag.as_bytes());
        Ok(Self {
            config,
            server,
            pool,
        })
    }
}

impl VirtioDevice for Virtio9p {
    fn device_type(&self) -> u32 {
        TYPE_9P
    }

    fn name(&self) -> &'static str {
        "9p"
    }

    fn device_features(&self) -> u64 {
        1 << VIRTIO_9P_MOUNT_TAG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<Box<dyn QueueHandler>, VirtioError> {
        Ok(Box::new(P9Handler {
            shared: Arc::new(Shared {
                rq: RequestQueue::activate(ctx, "9p")?,
                server: self.server.clone(),
                flushes: Mutex::new(FlushTracker::new()),
            }),
            pool: self.pool.clone(),
            heads: Vec::with_capacity(usize::from(QUEUE_SIZE)),
        }))
    }
}

struct Shared {
    rq: RequestQueue,
    server: Arc<dyn RequestHandler>,
    /// Tags of requests being served and the Tflush chains waiting for each: 9P requires
    /// Rflush after the flushed request's reply.
    flushes: Mutex<FlushTracker<Chain>>,
}

impl Shared {
    /// Serves one request on a worker thread, then any Tflush that waited for it.
    fn serve_tracked(&self, chain: &Chain, tag: Option<u16>) {
        self.serve(chain);
        let Some(tag) = tag else { return };
        let waiters = self
            .flushes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .finish(tag);
        // The flushed request's reply is in the used ring now, so its Rflush may follow.
        for flush in &waiters {
            self.serve(flush);
        }
    }

    /// Serves one request: gather, answer, add to the used ring, interrupt if needed.
    fn serve(&self, chain: &Chain) {
        let timer = self.rq.stats.start();
        let mut request = Vec::new();
        if let Err(e) = chain.gather(&self.rq.mem, &mut request) {
            self.rq.error(&e);
            return;
        }
        let mut reply = GuestReply::new(&self.rq.mem, &chain.writable);
        let written = self
            .server
            .handle(&request, &mut reply)
            .min(reply.capacity());
        // `written` <= the writable length, which the walker bounded by u32::MAX.
        let written = u32::try_from(written).unwrap_or(u32::MAX);
        let bytes = chain.readable_len + u64::from(written);
        self.rq.complete(chain.head, written, bytes, timer);
    }
}

struct P9Handler {
    shared: Arc<Shared>,
    pool: Arc<WorkerPool>,
    heads: Vec<u16>,
}

impl QueueHandler for P9Handler {
    fn notify(&mut self, queue: usize) {
        let shared = &self.shared;
        let mem = &*shared.rq.mem;
        shared.rq.notified(queue, &mut self.heads, |chain| {
            if chain.readable_len > MAX_REQUEST_BYTES {
                return Err(ChainError::TooLong {
                    limit: MAX_REQUEST_BYTES,
                });
            }
            let mut header = [0u8; 9];
            let n = chain.peek(mem, &mut header)?;
            let tag = (n >= 7).then(|| u16::from_le_bytes([header[5], header[6]]));
            let (chain, tracked) = {
                let mut flushes = shared.flushes.lock().unwrap_or_else(|e| e.into_inner());
                match flushed_tag(&header[..n]) {
                    // Answered by the worker that completes `oldtag`.
                    Some(oldtag) => match flushes.flush(oldtag, chain) {
                        None => return Ok(()),
                        Some(chain) => (chain, None),
                    },
                    None => {
                        if let Some(tag) = tag {
                            flushes.start(tag);
                        }
                        (chain, tag)
                    }
                }
            };
            shared.rq.started();
            let job_shared = shared.clone();
            self.pool.submit(Box::new(move || {
                let _serving = job_shared.rq.serving();
                let served = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    job_shared.serve_tracked(&chain, tracked)
                }));
                if let Err(payload) = served {
                    job_shared.rq.interrupt.device_panicked("9p", &*payload);
                }
            }));
            Ok(())
        });
    }
}

impl Drop for P9Handler {
    /// Waits for in-flight requests so none touches guest memory after a reset completes.
    fn drop(&mut self) {
        self.shared.rq.wait_idle();
    }
}

/// The reply area of one request: the device-writable buffers of its chain, in order, seen as
/// one contiguous range of `capacity()` bytes.
pub struct GuestReply<'a> {
    mem: &'a GuestMemoryMmap,
    bufs: &'a [Buffer],
    capacity: usize,
}

impl<'a> GuestReply<'a> {
    /// A reply area over `bufs` (validated by the chain walker to lie in guest memory).
    pub fn new(mem: &'a GuestMemoryMmap, bufs: &'a [Buffer]) -> Self {
        let capacity = bufs.iter().map(|b| b.len as usize).sum();
        Self {
            mem,
            bufs,
            capacity,
        }
    }

    fn check(&self, offset: usize, len: usize) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.capacity => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "reply of {len} bytes at {offset} exceeds the guest's {}-byte reply buffers",
                    self.capacity
                ),
            )),
        }
    }

    /// Calls `f(addr, len)` for each piece of guest memory making up `[offset, offset + len)`.
    fn for_each_piece(
        &self,
        mut offset: usize,
        mut len: usize,
        mut f: impl FnMut(GuestAddress, usize) -> io::Result<bool>,
    ) -> io::Result<()> {
        for b in self.bufs {
            if len == 0 {
                break;
            }
            let blen = b.len as usize;
            if offset >= blen {
                offset -= blen;
                continue;
            }
            let n = (blen - offset).min(len);
            if !f(GuestAddress(b.addr.0 + offset as u64), n)? {
                break;
            }
            len -= n;
            offset = 0;
        }
        Ok(())
    }
}

fn guest_fault(addr: GuestAddress) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("guest buffer at {:#x} is not in guest memory", addr.0),
    )
}

impl ReplyBuf for GuestReply<'_> {
    fn capacity(&self) -> usize {
        self.capacity
    }

    fn write_at(&mut self, offset: usize, data: &[u8]) -> io::Result<()> {
        self.check(offset, data.len())?;
        let mut pos = 0usize;
        self.for_each_piece(offset, data.len(), |addr, n| {
            self.mem
                .write_slice(&data[pos..pos + n], addr)
                .map_err(|_| guest_fault(addr))?;
            pos += n;
            Ok(true)
        })
    }

    fn read_from(
        &mut self,
        offset: usize,
        len: usize,
        fd: BorrowedFd<'_>,
        file_offset: u64,
    ) -> io::Result<usize> {
        self.check(offset, len)?;
        let file_offset = libc::off64_t::try_from(file_offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file offset too large"))?;
        // Host pointers into guest memory for every piece. The guards keep the (dirty-tracking)
        // bookkeeping of vm-memory correct while the kernel writes through the pointers.
        let mut guards = Vec::new();
        let mut iovecs: Vec<libc::iovec> = Vec::new();
        self.for_each_piece(offset, len, |addr, n| {
            for slice in self.mem.get_slices(addr, n) {
                let slice = slice.map_err(|_| guest_fault(addr))?;
                if iovecs.len() == IOV_MAX {
                    return Ok(false); // the rest is a short read; the caller sees the count
                }
                let guard = slice.ptr_guard_mut();
                iovecs.push(libc::iovec {
                    iov_base: guard.as_ptr().cast(),
                    iov_len: guard.len(),
                });
                guards.push(guard);
            }
            Ok(true)
        })?;
        loop {
            // SAFETY: every iovec points into a live guest memory mapping (the GuestMemoryMmap
            // borrowed by `self` outlives this call) and covers exactly the bytes of a slice
            // that vm-memory bounds-checked; `guards` keeps the pointers valid for the call.
            // The kernel writes at most `iov_len` bytes per entry. Guest memory is shared with
            // the guest, which only observes the bytes once the chain is in the used ring.
            let n = unsafe {
                libc::preadv64(
                    fd.as_raw_fd(),
                    iovecs.as_ptr(),
                    iovecs.len() as libc::c_int,
                    file_offset,
                )
            };
            if n >= 0 {
                drop(guards);
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// The kernel's limit on iovecs per call (UIO_MAXIOV).
const IOV_MAX: usize = 1024;
