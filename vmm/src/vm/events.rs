//! The monitor's event loop thread while a VM runs: it turns stop requests and the run timeout
//! into the run's outcome and forwards host stdin to the serial port; and the terminal guard that
//! puts an interactive stdin into character mode for the run.

use crate::devices::serial::SerialDevice;
use crate::error::VmError;
use crate::run_control::{GuestExit, RunControl};
use crate::sandbox::{self, ThreadRole};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

/// Puts a terminal on stdin into character mode (no line buffering, no local echo: the guest
/// echoes) for the run, and restores it when dropped. Signals (Ctrl-C) keep working so the
/// caller can still stop the VM.
pub struct TerminalGuard(libc::termios);

impl TerminalGuard {
    /// `None` when stdin is not a terminal or its settings cannot be changed.
    pub fn new() -> Option<Self> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it and we check the result.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd and out-pointer.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        raw.c_lflag &= !(libc::ICANON | libc::ECHO);
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        // SAFETY: valid fd and a termios derived from the current settings.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(TerminalGuard(saved))
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in new() on the same descriptor.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.0) };
    }
}

/// Wakes on stop requests and the run timeout.
struct ControlSubscriber {
    control: Arc<RunControl>,
    timer: Option<TimerFd>,
}

impl MutEventSubscriber for ControlSubscriber {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.control.wake, EventSet::IN));
        if let Some(t) = &self.timer {
            let _ = ops.add(Events::new(t, EventSet::IN));
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.control.wake.as_raw_fd() {
            let _ = self.control.wake.read();
            if self.control.stop_requested() {
                self.control.finish(Ok(GuestExit::Stopped));
            }
        }
        if let Some(t) = &mut self.timer {
            if events.fd() == t.as_raw_fd() {
                let _ = t.wait();
                self.control.finish(Ok(GuestExit::Timeout));
            }
        }
    }
}

/// Forwards a host input descriptor (stdin) to the serial port without losing bytes: input
/// is read only while the UART's receive FIFO has room; what does not fit waits in `pending`
/// and stdin is not polled until the guest drains the FIFO (the device's input-room eventfd).
struct StdinSubscriber {
    fd: std::os::fd::RawFd,
    serial: Arc<SerialDevice>,
    pending: Vec<u8>,
    eof: bool,
}

impl StdinSubscriber {
    fn new(fd: std::os::fd::RawFd, serial: Arc<SerialDevice>) -> Self {
        StdinSubscriber {
            fd,
            serial,
            pending: Vec::new(),
            eof: false,
        }
    }

    fn room_fd(&self) -> std::os::fd::RawFd {
        self.serial.input_room().as_raw_fd()
    }

    /// Pushes pending input into the FIFO and picks what to wait for next.
    fn feed(&mut self, ops: &mut EventOps) {
        let n = self.serial.enqueue_input(&self.pending);
        self.pending.drain(..n);
        let stdin = Events::new_raw(self.fd, EventSet::IN);
        let room = Events::new_raw(self.room_fd(), EventSet::IN);
        if self.pending.is_empty() {
            let _ = ops.remove(room);
            if !self.eof {
                // Fails harmlessly when already registered or not pollable.
                let _ = ops.add(stdin);
            }
        } else {
            let _ = ops.remove(stdin);
            let _ = ops.add(room);
        }
    }
}

impl MutEventSubscriber for StdinSubscriber {
    fn init(&mut self, ops: &mut EventOps) {
        // Fails for stdin that cannot be polled (a regular file): then there is no input.
        let _ = ops.add(Events::new_raw(self.fd, EventSet::IN));
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.room_fd() {
            let _ = self.serial.input_room().read();
            self.feed(ops);
            return;
        }
        let mut buf = [0u8; 256];
        // SAFETY: reading into a stack buffer of the given length from our input descriptor.
        let n = unsafe { libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let errno = std::io::Error::last_os_error().raw_os_error();
            if matches!(errno, Some(libc::EINTR) | Some(libc::EAGAIN)) {
                return;
            }
        }
        if n <= 0 {
            // EOF or a hard error: stop watching stdin so the loop does not spin.
            self.eof = true;
            let _ = ops.remove(Events::new_raw(self.fd, EventSet::IN));
            return;
        }
        self.pending.extend_from_slice(&buf[..n as usize]);
        self.feed(ops);
    }
}

/// Starts the event loop thread; it runs until `control` says the run is ending.
pub fn spawn_event_loop(
    control: Arc<RunControl>,
    stdin: Option<Arc<SerialDevice>>,
    timeout: Option<Duration>,
) -> Result<JoinHandle<()>, VmError> {
    let timer = match timeout {
        Some(d) => {
            let mut t = TimerFd::new()
                .map_err(|e| VmError::Thread(format!("cannot create the timeout timer: {e}")))?;
            t.reset(d.max(Duration::from_nanos(1)), None)
                .map_err(|e| VmError::Thread(format!("cannot arm the timeout timer: {e}")))?;
            Some(t)
        }
        None => None,
    };
    let mut em: EventManager<Box<dyn MutEventSubscriber + Send>> = EventManager::new()
        .map_err(|e| VmError::Thread(format!("cannot create the event loop: {e}")))?;
    use event_manager::SubscriberOps;
    em.add_subscriber(Box::new(ControlSubscriber {
        control: control.clone(),
        timer,
    }));
    if let Some(serial) = stdin {
        em.add_subscriber(Box::new(StdinSubscriber::new(libc::STDIN_FILENO, serial)));
    }
    std::thread::Builder::new()
        .name("vmm-events".into())
        .spawn(move || {
            sandbox::enter_thread(ThreadRole::EventLoop);
            while !control.is_stopping() {
                if let Err(e) = em.run_with_timeout(500) {
                    control.finish(Err(VmError::Thread(format!("event loop failed: {e}"))));
                }
            }
        })
        .map_err(|e| VmError::Thread(format!("cannot start the event loop: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::BusDevice;
    use crate::devices::serial::{Console, ConsoleSink};
    use crate::phases::PhaseLog;
    use vmm_sys_util::eventfd::EventFd;

    type EventLoop = EventManager<Box<dyn MutEventSubscriber + Send>>;

    /// A pipe standing in for stdin (`[read, write]`), a serial port, and an event loop
    /// forwarding the pipe to it.
    fn stdin_fixture() -> ([i32; 2], Arc<SerialDevice>, EventLoop) {
        use event_manager::SubscriberOps;
        let mut fds = [0; 2];
        // SAFETY: pipe fills the two-element array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let console = Console::new(ConsoleSink::Off, PhaseLog::new(std::time::Instant::now()));
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let serial = Arc::new(SerialDevice::new(irq, console).unwrap());
        let mut em: EventLoop = EventManager::new().unwrap();
        em.add_subscriber(Box::new(StdinSubscriber::new(fds[0], serial.clone())));
        (fds, serial, em)
    }

    #[test]
    fn input_reaches_the_serial_port_and_eof_stops_polling() {
        let (fds, serial, mut em) = stdin_fixture();
        // SAFETY: writing two bytes from a static buffer to the pipe's write end.
        assert_eq!(unsafe { libc::write(fds[1], b"ls".as_ptr().cast(), 2) }, 2);
        assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
        let mut b = [0u8; 1];
        serial.read(0, &mut b);
        assert_eq!(b[0], b'l');
        serial.read(0, &mut b);
        assert_eq!(b[0], b's');
        // SAFETY: closing the write end we own.
        unsafe { libc::close(fds[1]) };
        assert_eq!(em.run_with_timeout(1000).unwrap(), 1); // EOF seen, fd dropped
        assert_eq!(em.run_with_timeout(50).unwrap(), 0); // and no longer polled
                                                         // SAFETY: closing the read end we own.
        unsafe { libc::close(fds[0]) };
    }

    #[test]
    fn input_larger_than_the_fifo_waits_for_room_instead_of_being_dropped() {
        let (fds, serial, mut em) = stdin_fixture();
        let input: Vec<u8> = (0..1000u32).map(|i| b'a' + (i % 26) as u8).collect();
        // SAFETY: writing from a live buffer to the pipe's write end (fits the pipe buffer).
        let written = unsafe { libc::write(fds[1], input.as_ptr().cast(), input.len()) };
        assert_eq!(written, input.len() as isize);
        // SAFETY: closing the write end we own.
        unsafe { libc::close(fds[1]) };
        let mut received = Vec::new();
        for _ in 0..200 {
            if received.len() == input.len() {
                break;
            }
            em.run_with_timeout(100).unwrap();
            // The guest drains the FIFO: read while the line status says data is ready.
            loop {
                let mut lsr = [0u8];
                serial.read(5, &mut lsr);
                if lsr[0] & 1 == 0 {
                    break;
                }
                let mut b = [0u8];
                serial.read(0, &mut b);
                received.push(b[0]);
            }
        }
        assert_eq!(received, input, "every byte arrives once, in order");
        // SAFETY: closing the read end we own.
        unsafe { libc::close(fds[0]) };
    }
}
