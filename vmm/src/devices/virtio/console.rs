//! virtio-console (device 3), output only: one port whose transmit queue streams the guest's
//! bytes to a host sink (the job's stdout or stderr). The guest sees it as /dev/hvcN.
//!
//! Every notification drains all available chains in ring order on the transport's single
//! event thread, so output order is exactly the guest's order. Bytes are copied from guest
//! memory in 64 KiB pieces (no per-byte work) and the sink is flushed once the ring is empty,
//! not per chain. There is no input: the receive queue is accepted but never filled, and
//! MULTIPORT, SIZE and EMERG_WRITE are not offered.

use super::chain::{self, ChainError};
use super::mmio::{ActivateContext, QueueHandler, VirtioDevice, VirtioError};
use super::{DeviceStats, Interrupt, TYPE_CONSOLE, VIRTIO_RING_F_INDIRECT_DESC};
use std::io::Write;
use std::sync::{Arc, Mutex};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

const QUEUE_SIZE: u16 = 256;
/// The console has no input, but Linux fills the receive queue with one page-sized buffer per
/// entry at probe time: a small queue keeps that allocation (and boot time) down.
const RX_QUEUE_SIZE: u16 = 4;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const COPY_CHUNK: usize = 64 * 1024;
/// cols (u16), rows (u16), max_nr_ports (u32), emerg_wr (u32): all zero, nothing offered.
const CONFIG_LEN: usize = 12;

type Sink = Arc<Mutex<Box<dyn Write + Send>>>;

/// A single-port, output-only virtio console.
pub struct VirtioConsole {
    sink: Sink,
}

impl VirtioConsole {
    /// A console whose output goes to `sink`, in order. The sink is flushed whenever the guest
    /// has nothing more queued, and when the device stops.
    pub fn new(sink: Box<dyn Write + Send>) -> Self {
        Self {
            sink: Arc::new(Mutex::new(sink)),
        }
    }
}

impl VirtioDevice for VirtioConsole {
    fn device_type(&self) -> u32 {
        TYPE_CONSOLE
    }

    fn name(&self) -> &'static str {
        "console"
    }

    fn device_features(&self) -> u64 {
        0
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[RX_QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&[0u8; CONFIG_LEN], offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<Box<dyn QueueHandler>, VirtioError> {
        let indirect_ok = ctx.has_feature(VIRTIO_RING_F_INDIRECT_DESC);
        let tx = ctx
            .queues
            .into_iter()
            .nth(TX_QUEUE)
            .ok_or(VirtioError::Activate {
                device: "console",
                reason: "the transmit queue is missing".into(),
            })?;
        if !tx.ready() {
            return Err(VirtioError::Activate {
                device: "console",
                reason: "the driver did not set up the transmit queue".into(),
            });
        }
        Ok(Box::new(ConsoleHandler {
            mem: ctx.mem,
            tx,
            interrupt: ctx.interrupt,
            stats: ctx.stats,
            sink: self.sink.clone(),
            indirect_ok,
            heads: Vec::with_capacity(usize::from(QUEUE_SIZE)),
            buf: vec![0; COPY_CHUNK],
            write_failed: false,
        }))
    }
}

struct ConsoleHandler {
    mem: Arc<GuestMemoryMmap>,
    tx: Queue,
    interrupt: Arc<Interrupt>,
    stats: Arc<DeviceStats>,
    sink: Sink,
    indirect_ok: bool,
    heads: Vec<u16>,
    buf: Vec<u8>,
    write_failed: bool,
}

impl ConsoleHandler {
    fn drain(&mut self, sink: &mut dyn Write) -> Result<(), ChainError> {
        let mem = &*self.mem;
        let ring = |e: virtio_queue::Error| ChainError::Ring(e.to_string());
        while chain::next_batch(&mut self.tx, mem, &mut self.heads)? {
            for i in 0..self.heads.len() {
                let head = self.heads[i];
                let c = chain::walk(
                    mem,
                    vm_memory::GuestAddress(self.tx.desc_table()),
                    self.tx.size(),
                    head,
                    self.indirect_ok,
                )?;
                if !c.writable.is_empty() {
                    return Err(ChainError::UnexpectedWritable);
                }
                for b in &c.readable {
                    let mut done = 0usize;
                    let len = b.len as usize;
                    while done < len {
                        let n = (len - done).min(self.buf.len());
                        // The walker checked that the whole buffer lies in guest memory: no overflow.
                        let addr = vm_memory::GuestAddress(b.addr.0.wrapping_add(done as u64));
                        mem.read_slice(&mut self.buf[..n], addr).map_err(|_| {
                            ChainError::BufferOutOfMemory {
                                addr: b.addr.0,
                                len: b.len,
                            }
                        })?;
                        if !self.write_failed {
                            if let Err(e) = sink.write_all(&self.buf[..n]) {
                                // Keep consuming so the guest never blocks on a dead reader.
                                log::warn!("virtio-console: output sink failed: {e}; dropping further output");
                                self.write_failed = true;
                            }
                        }
                        done += n;
                    }
                }
                self.tx.add_used(mem, head, 0).map_err(ring)?;
                self.stats.chain(c.readable_len);
            }
            if self.tx.needs_notification(mem).map_err(ring)? {
                self.interrupt.signal_used();
            }
        }
        Ok(())
    }
}

impl QueueHandler for ConsoleHandler {
    fn notify(&mut self, queue: usize) {
        if queue == RX_QUEUE || self.interrupt.is_broken() {
            return; // no input; receive buffers stay with the device unused
        }
        let timer = self.stats.start();
        let sink = self.sink.clone();
        let mut sink = sink.lock().unwrap_or_else(|e| e.into_inner());
        let result = self.drain(&mut **sink);
        if !self.write_failed {
            if let Err(e) = sink.flush() {
                log::warn!("virtio-console: flushing the output sink failed: {e}");
                self.write_failed = true;
            }
        }
        drop(sink);
        if let Err(e) = result {
            // Chains completed before the bad one are in the used ring: tell the driver, then
            // report the error (a spurious used interrupt is harmless; a missing one is not).
            self.interrupt.signal_used();
            self.interrupt.device_error("console", &e);
        }
        self.stats.finish(timer);
    }
}

impl Drop for ConsoleHandler {
    fn drop(&mut self) {
        let mut sink = self.sink.lock().unwrap_or_else(|e| e.into_inner());
        let _ = sink.flush();
    }
}
