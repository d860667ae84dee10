//! COM1: a 16550A UART (vm-superio) whose interrupt is an eventfd wired to GSI 4, and the
//! console behind it. The console sends output to a sink (host stdout, an in-memory capture, or
//! nowhere), always keeps the last lines for error reports, and notes when the first byte came.

use crate::devices::bus::BusDevice;
use crate::phases::PhaseLog;
use crate::snapshot::codec::{Decoder, Encoder};
use crate::snapshot::DecodeError;
use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use vm_superio::serial::SerialState;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// Lines of console output kept for error reports.
pub const TAIL_LINES: usize = 50;
/// The 16550A receive FIFO holds at most this many bytes (vm-superio's limit).
const SERIAL_FIFO_MAX: usize = 64;
/// Longest line kept in the tail (longer lines are cut).
const MAX_LINE: usize = 512;

/// Where guest console output goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ConsoleSink {
    /// Host stdout (the interactive shell).
    #[default]
    Stdout,
    /// Host stderr (kernel messages beside a job whose stdout is its own).
    Stderr,
    /// An in-memory buffer, returned in the run outcome.
    Capture,
    /// Discarded (the tail is still kept).
    Off,
}

#[derive(Default)]
struct Tail {
    lines: VecDeque<String>,
    partial: Vec<u8>,
}

impl Tail {
    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            match b {
                b'\n' => {
                    let line = String::from_utf8_lossy(&self.partial).into_owned();
                    self.partial.clear();
                    if self.lines.len() == TAIL_LINES {
                        self.lines.pop_front();
                    }
                    self.lines.push_back(line);
                }
                b'\r' => {}
                _ if self.partial.len() < MAX_LINE => self.partial.push(b),
                _ => {}
            }
        }
    }

    fn snapshot(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lines.iter().cloned().collect();
        if !self.partial.is_empty() {
            v.push(String::from_utf8_lossy(&self.partial).into_owned());
        }
        if v.len() > TAIL_LINES {
            v.remove(0);
        }
        v
    }
}

/// The guest console: sink, capture buffer, tail of recent lines. Cheap to share.
pub struct Console {
    sink: ConsoleSink,
    capture: Mutex<Vec<u8>>,
    tail: Mutex<Tail>,
    seen_first_byte: AtomicBool,
    phases: PhaseLog,
}

impl Console {
    pub fn new(sink: ConsoleSink, phases: PhaseLog) -> Arc<Self> {
        Arc::new(Console {
            sink,
            capture: Mutex::new(Vec::new()),
            tail: Mutex::new(Tail::default()),
            seen_first_byte: AtomicBool::new(false),
            phases,
        })
    }

    /// Takes guest output bytes.
    pub fn output(&self, bytes: &[u8]) -> io::Result<()> {
        if !self.seen_first_byte.swap(true, Ordering::Relaxed) {
            self.phases.record("first console byte");
        }
        if let Ok(mut t) = self.tail.lock() {
            t.push(bytes);
        }
        match self.sink {
            ConsoleSink::Stdout => io::stdout().write_all(bytes),
            ConsoleSink::Stderr => io::stderr().write_all(bytes),
            ConsoleSink::Capture => {
                if let Ok(mut c) = self.capture.lock() {
                    c.extend_from_slice(bytes);
                }
                Ok(())
            }
            ConsoleSink::Off => Ok(()),
        }
    }

    fn flush(&self) -> io::Result<()> {
        match self.sink {
            ConsoleSink::Stdout => io::stdout().flush(),
            ConsoleSink::Stderr => io::stderr().flush(),
            _ => Ok(()),
        }
    }

    /// The last [`TAIL_LINES`] lines (an unfinished last line included).
    pub fn tail(&self) -> Vec<String> {
        self.tail.lock().map(|t| t.snapshot()).unwrap_or_default()
    }

    /// Everything captured so far (empty unless the sink is [`ConsoleSink::Capture`]).
    pub fn captured(&self) -> Vec<u8> {
        self.capture.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

/// `io::Write` adapter handed to the UART.
pub struct ConsoleWriter(pub Arc<Console>);

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.output(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// Interrupt line of the UART: an eventfd registered as an irqfd.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Signals an eventfd when the guest has drained the receive FIFO, so the host can feed more
/// input instead of dropping it.
pub struct InputRoom(pub EventFd);

impl vm_superio::serial::SerialEvents for InputRoom {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        let _ = self.0.write(1);
    }
}

/// COM1 on the port I/O bus.
pub struct SerialDevice {
    uart: Mutex<Serial<EventFdTrigger, InputRoom, ConsoleWriter>>,
    room: EventFd,
    /// Clones of the UART's parts, to rebuild it from a saved state.
    irq: EventFd,
    console: Arc<Console>,
}

impl SerialDevice {
    pub fn new(irq: EventFd, console: Arc<Console>) -> io::Result<Self> {
        let room = EventFd::new(libc::EFD_NONBLOCK)?;
        Ok(SerialDevice {
            uart: Mutex::new(Serial::with_events(
                EventFdTrigger(irq.try_clone()?),
                InputRoom(room.try_clone()?),
                ConsoleWriter(console.clone()),
            )),
            room,
            irq,
            console,
        })
    }

    /// The UART's registers and receive FIFO, for a snapshot (see [`SerialDevice::restore_state`]).
    pub fn save_state(&self) -> Vec<u8> {
        let s = match self.uart.lock() {
            Ok(u) => u.state(),
            Err(p) => p.into_inner().state(),
        };
        let mut e = Encoder::default();
        for b in [
            s.baud_divisor_low,
            s.baud_divisor_high,
            s.interrupt_enable,
            s.interrupt_identification,
            s.line_control,
            s.line_status,
            s.modem_control,
            s.modem_status,
            s.scratch,
        ] {
            e.u8(b);
        }
        e.blob(&s.in_buffer);
        e.into_bytes()
    }

    /// Puts the UART into a state saved by [`SerialDevice::save_state`]; bad bytes are an
    /// error and leave the device as it was.
    pub fn restore_state(&self, bytes: &[u8]) -> Result<(), DecodeError> {
        let mut d = Decoder::new(bytes);
        let mut regs = [0u8; 9];
        for (i, r) in regs.iter_mut().enumerate() {
            *r = d.u8(&format!("serial register {i}"))?;
        }
        let in_buffer = d.blob("serial receive FIFO")?.to_vec();
        d.finish("serial state")?;
        if in_buffer.len() > SERIAL_FIFO_MAX {
            return Err(DecodeError::new(
                "serial receive FIFO",
                format!("{} bytes, more than {SERIAL_FIFO_MAX}", in_buffer.len()),
            ));
        }
        let state = SerialState {
            baud_divisor_low: regs[0],
            baud_divisor_high: regs[1],
            interrupt_enable: regs[2],
            interrupt_identification: regs[3],
            line_control: regs[4],
            line_status: regs[5],
            modem_control: regs[6],
            modem_status: regs[7],
            scratch: regs[8],
            in_buffer,
        };
        let io = |e: std::io::Error| DecodeError::new("serial eventfd", e.to_string());
        let uart = Serial::from_state(
            &state,
            EventFdTrigger(self.irq.try_clone().map_err(io)?),
            InputRoom(self.room.try_clone().map_err(io)?),
            ConsoleWriter(self.console.clone()),
        )
        .map_err(|e| DecodeError::new("serial state", format!("{e:?}")))?;
        match self.uart.lock() {
            Ok(mut u) => *u = uart,
            Err(p) => *p.into_inner() = uart,
        }
        Ok(())
    }

    /// Becomes readable when the guest has emptied the receive FIFO (see
    /// [`SerialDevice::enqueue_input`]).
    pub fn input_room(&self) -> &EventFd {
        &self.room
    }

    /// Queues host input for the guest; returns how many bytes fit.
    pub fn enqueue_input(&self, bytes: &[u8]) -> usize {
        match self.uart.lock() {
            Ok(mut u) => u.enqueue_raw_bytes(bytes).unwrap_or(0),
            Err(_) => 0,
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let Ok(mut u) = self.uart.lock() else {
            return data.fill(0xff);
        };
        for b in data.iter_mut() {
            *b = u.read(offset as u8);
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let Ok(mut u) = self.uart.lock() else { return };
        for b in data {
            // Output errors (stdout closed) must not stop the guest.
            let _ = u.write(offset as u8, *b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn output_is_captured_tailed_and_timestamped() {
        let phases = PhaseLog::new(Instant::now());
        let console = Console::new(ConsoleSink::Capture, phases.clone());
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = SerialDevice::new(irq.try_clone().unwrap(), console.clone()).unwrap();
        for b in b"hi\r\nthere" {
            dev.write(0, &[*b]);
        }
        assert_eq!(console.captured(), b"hi\r\nthere");
        assert_eq!(console.tail(), vec!["hi".to_string(), "there".to_string()]);
        assert!(phases.get("first console byte").is_some());
        // Line status register: transmitter empty.
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }

    #[test]
    fn input_raises_the_interrupt_and_is_readable() {
        let console = Console::new(ConsoleSink::Off, PhaseLog::new(Instant::now()));
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = SerialDevice::new(irq.try_clone().unwrap(), console).unwrap();
        dev.write(1, &[1]); // IER: received-data interrupt on
        assert_eq!(dev.enqueue_input(b"ok"), 2);
        assert_eq!(irq.read().unwrap(), 1);
        let mut b = [0u8];
        dev.read(0, &mut b);
        assert_eq!(b[0], b'o');
    }

    #[test]
    fn serial_state_round_trips_into_a_fresh_device() {
        let console = Console::new(ConsoleSink::Capture, PhaseLog::new(Instant::now()));
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = SerialDevice::new(irq.try_clone().unwrap(), console.clone()).unwrap();
        dev.write(3, &[0x83]); // LCR: DLAB on, 8 bits
        dev.write(0, &[0x0c]); // divisor low
        dev.write(3, &[0x03]); // DLAB off
        dev.write(1, &[0x01]); // IER: received data
        dev.write(7, &[0x5a]); // scratch
        assert_eq!(dev.enqueue_input(b"xy"), 2);
        let saved = dev.save_state();

        let console2 = Console::new(ConsoleSink::Capture, PhaseLog::new(Instant::now()));
        let fresh =
            SerialDevice::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), console2.clone()).unwrap();
        fresh.restore_state(&saved).unwrap();
        assert_eq!(fresh.save_state(), saved);
        let read = |d: &SerialDevice, off: u64| {
            let mut b = [0u8];
            d.read(off, &mut b);
            b[0]
        };
        assert_eq!(
            (read(&fresh, 7), read(&fresh, 1), read(&fresh, 3)),
            (0x5a, 0x01, 0x03)
        );
        assert_eq!((read(&fresh, 0), read(&fresh, 0)), (b'x', b'y'));
        fresh.write(0, b"!");
        assert_eq!(console2.captured(), b"!");

        for n in 0..saved.len() {
            assert!(fresh.restore_state(&saved[..n]).is_err(), "prefix {n}");
        }
        let mut long = saved.clone();
        long.push(0);
        assert!(fresh.restore_state(&long).is_err());
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let console = Console::new(ConsoleSink::Off, PhaseLog::new(Instant::now()));
        for i in 0..120 {
            console.output(format!("line {i}\n").as_bytes()).unwrap();
        }
        let t = console.tail();
        assert_eq!(t.len(), TAIL_LINES);
        assert_eq!(t.first().unwrap(), "line 70");
        assert_eq!(t.last().unwrap(), "line 119");
        assert!(console.captured().is_empty());
    }
}
