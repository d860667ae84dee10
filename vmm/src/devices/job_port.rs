//! The job port (see `guest_abi::warm`): where a warm appliance's init says it waits for its
//! job, and where it reads the job once resumed. In a VM that makes a snapshot, the "ready"
//! write ends the run so the VM can be captured right there; in a restored VM, reads stream
//! the job message (length first) to the guest. Holds nothing a snapshot would need: the
//! guest reads it only after the snapshot point.

use crate::devices::bus::BusDevice;
use crate::run_control::{GuestExit, RunControl};
use guest_abi::warm::JOB_READY;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

enum Mode {
    /// The "ready" write sets the flag and stops the run.
    SnapshotPoint {
        control: Arc<RunControl>,
        reached: Arc<AtomicBool>,
    },
    /// Reads return these bytes in order, then zeros.
    Deliver { bytes: Vec<u8>, next: usize },
}

/// The job port device.
pub struct JobPort {
    mode: Mutex<Mode>,
}

impl JobPort {
    /// A port that stops the run when the guest says it waits for its job; `reached` tells
    /// the caller that this, and not something else, ended the run.
    pub fn snapshot_point(control: Arc<RunControl>) -> (Self, Arc<AtomicBool>) {
        let reached = Arc::new(AtomicBool::new(false));
        let port = JobPort {
            mode: Mutex::new(Mode::SnapshotPoint {
                control,
                reached: reached.clone(),
            }),
        };
        (port, reached)
    }

    /// A port that hands `bytes` (the length-prefixed job message) to the guest.
    pub fn deliver(bytes: Vec<u8>) -> Self {
        JobPort {
            mode: Mutex::new(Mode::Deliver { bytes, next: 0 }),
        }
    }
}

impl BusDevice for JobPort {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        let mut mode = self.mode.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *mode {
            Mode::Deliver { bytes, next } => {
                let available = bytes.get(*next..).unwrap_or(&[]);
                let n = available.len().min(data.len());
                data[..n].copy_from_slice(&available[..n]);
                data[n..].fill(0);
                *next += n;
            }
            Mode::SnapshotPoint { .. } => data.fill(0),
        }
    }

    fn write(&self, _offset: u64, data: &[u8]) {
        let mode = self.mode.lock().unwrap_or_else(|e| e.into_inner());
        if let Mode::SnapshotPoint { control, reached } = &*mode {
            if data.first() == Some(&JOB_READY) {
                reached.store(true, Ordering::SeqCst);
                control.finish(Ok(GuestExit::Stopped));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivers_the_bytes_in_order_across_reads_of_any_width() {
        let port = JobPort::deliver(vec![5, 0, 0, 0, b'h', b'e', b'l', b'l', b'o']);
        let mut len = [0u8; 4];
        port.read(0, &mut len);
        assert_eq!(u32::from_le_bytes(len), 5);
        let mut body = [0u8; 3];
        port.read(0, &mut body);
        assert_eq!(&body, b"hel");
        let mut rest = [0xaau8; 4];
        port.read(0, &mut rest);
        assert_eq!(&rest, b"lo\0\0");
        port.write(0, &[JOB_READY]); // ignored when delivering
    }

    #[test]
    fn the_ready_write_stops_the_run_and_says_so() {
        let control = RunControl::new().unwrap();
        let (port, reached) = JobPort::snapshot_point(control.clone());
        port.write(0, &[2]);
        assert!(!reached.load(Ordering::SeqCst) && !control.is_stopping());
        port.write(0, &[JOB_READY]);
        assert!(reached.load(Ordering::SeqCst));
        assert!(matches!(control.wait(), Ok(GuestExit::Stopped)));
    }
}
