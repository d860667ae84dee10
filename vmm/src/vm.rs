//! The public face of the monitor: [`VmConfig`] in, [`Vm::new`] to create the KVM VM with its
//! memory, irqchip and legacy devices, [`Vm::add_virtio_device`] for virtio-mmio devices, and
//! [`Vm::run`] to load the kernel, start the vCPUs and wait for the guest to finish.

use crate::boot::{self, layout, loader};
use crate::devices::bus::{Bus, BusDevice};
use crate::devices::exit_port::ExitPort;
use crate::devices::i8042::{I8042, I8042_LEN};
use crate::devices::phase_port::PhasePort;
use crate::devices::serial::{Console, SerialDevice};
use crate::devices::virtio::{MmioTransport, VirtioDevice, VirtioStats};
use crate::memory;
use crate::phases::PhaseLog;
use crate::run_control::RunControl;
use crate::sandbox::{self, ThreadRole};
use crate::stats::{self, Stats};
use crate::vcpu::{self, VcpuContext};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber};
use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

pub use crate::boot::loader::InitrdPart;
pub use crate::devices::serial::ConsoleSink;
pub use crate::error::VmError;
pub use crate::run_control::GuestExit;

/// What to boot and how.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// ELF vmlinux (PVH note preferred) or bzImage.
    pub kernel: PathBuf,
    pub initrd: Vec<InitrdPart>,
    /// Kernel command line; `virtio_mmio.device=` entries are appended for added devices.
    pub cmdline: String,
    pub mem_mib: u32,
    pub vcpus: u8,
    pub console: ConsoleSink,
    /// Forward host stdin to the serial port.
    pub stdin: bool,
    /// End the run with [`GuestExit::Timeout`] after this long.
    pub timeout: Option<Duration>,
    /// Count VM exits and device time (see [`stats::Report`]).
    pub stats: bool,
}

impl VmConfig {
    /// A config with 256 MiB, one vCPU, console on stdout, no initrd, no stdin, no timeout.
    pub fn new(kernel: impl Into<PathBuf>, cmdline: impl Into<String>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initrd: Vec::new(),
            cmdline: cmdline.into(),
            mem_mib: 256,
            vcpus: 1,
            console: ConsoleSink::Stdout,
            stdin: false,
            timeout: None,
            stats: false,
        }
    }

    /// Checks what needs neither KVM nor guest memory: the vCPU count, the memory size and
    /// that the kernel file is an x86-64 ELF vmlinux or a bzImage. It reads a few hundred
    /// bytes; call it before anything expensive so a typo fails at once.
    pub fn check(&self) -> Result<(), VmError> {
        if self.vcpus == 0 || self.vcpus > layout::MAX_VCPUS {
            return Err(VmError::Config(format!(
                "{} vCPUs requested; use 1 to {}",
                self.vcpus,
                layout::MAX_VCPUS
            )));
        }
        if self.mem_mib < layout::MIN_MEM_MIB {
            return Err(VmError::MemoryTooSmall {
                mib: self.mem_mib,
                needed_mib: u64::from(layout::MIN_MEM_MIB),
                what: "the minimum guest size",
            });
        }
        crate::boot::loader::check_kernel_file(&self.kernel)
    }
}

/// The result of a finished run.
#[derive(Debug)]
pub struct RunOutcome {
    pub exit: GuestExit,
    pub phases: PhaseLog,
    /// The last console lines (for reporting failures).
    pub console_tail: Vec<String>,
    /// Everything the guest printed, when the console sink is [`ConsoleSink::Capture`].
    pub console_output: Vec<u8>,
    pub stats: Option<stats::Report>,
    /// Per virtio device: notifications, chains, bytes and service time (with `stats`).
    pub virtio_stats: Vec<VirtioStats>,
    /// Guest RAM resident on the host at the end of the run, in KiB.
    pub guest_resident_kib: Option<u64>,
    /// Whether KVM runs on hardware virtualisation (see [`kvm_is_hardware_accelerated`]).
    pub kvm_hardware: bool,
}

/// Whether this host's KVM uses hardware virtualisation (VT-x / AMD-V), judged from the
/// `vmx`/`svm` CPU flags in /proc/cpuinfo.
pub fn kvm_is_hardware_accelerated() -> bool {
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|s| cpuinfo_has_virt(&s))
}

fn cpuinfo_has_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// Ends a run from another thread (for Ctrl-C handling). Cheap to clone.
#[derive(Clone)]
pub struct StopHandle(Arc<RunControl>);

impl StopHandle {
    /// Ends the run with [`GuestExit::Stopped`] (no effect once the run has an outcome). Only
    /// sets a flag and writes an eventfd, so it is safe to call from a signal handler; the
    /// VM's event loop turns the request into the outcome.
    pub fn stop(&self) {
        self.0.request_stop();
    }
}

/// Read access to the console while or after the VM runs (also when `run` fails).
#[derive(Clone)]
pub struct ConsoleHandle(Arc<Console>);

impl ConsoleHandle {
    /// The last console lines.
    pub fn tail(&self) -> Vec<String> {
        self.0.tail()
    }
    /// Captured output (with [`ConsoleSink::Capture`]).
    pub fn captured(&self) -> Vec<u8> {
        self.0.captured()
    }
}

/// A created, not yet running VM.
pub struct Vm {
    config: VmConfig,
    phases: PhaseLog,
    kvm: Kvm,
    fd: VmFd,
    mem: GuestMemoryMmap,
    pio: Bus,
    mmio: Bus,
    control: Arc<RunControl>,
    console: Arc<Console>,
    serial: Arc<SerialDevice>,
    virtio_cmdline: Vec<String>,
    virtio_count: u32,
    /// The virtio transports, kept to stop their devices and read their stats after the run.
    virtio: Vec<Arc<MmioTransport>>,
}

fn join_cmdline(base: &str, extras: &[String]) -> String {
    let mut c = base.trim().to_string();
    for extra in extras {
        if !c.is_empty() {
            c.push(' ');
        }
        c.push_str(extra);
    }
    c
}

fn kvm_open_error(e: kvm_ioctls::Error) -> VmError {
    match e.errno() {
        libc::ENOENT | libc::ENXIO | libc::ENODEV => VmError::KvmMissing,
        libc::EACCES | libc::EPERM => VmError::KvmPermission,
        _ => VmError::Kvm {
            what: "opening /dev/kvm",
            source: e,
        },
    }
}

fn open_kvm() -> Result<Kvm, VmError> {
    Kvm::new().map_err(kvm_open_error)
}

impl Vm {
    /// Opens /dev/kvm, creates the VM with its memory, irqchip, PIT and legacy devices.
    pub fn new(config: VmConfig, phases: PhaseLog) -> Result<Vm, VmError> {
        if config.vcpus == 0 || config.vcpus > layout::MAX_VCPUS {
            return Err(VmError::Config(format!(
                "{} vCPUs requested; use 1 to {}",
                config.vcpus,
                layout::MAX_VCPUS
            )));
        }
        let kvm = open_kvm()?;
        let kvm_err = |what| move |source| VmError::Kvm { what, source };
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        phases.record("kvm vm created");
        fd.set_tss_address(layout::KVM_TSS_ADDRESS as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        fd.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS)
            .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        fd.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

        let mem = memory::create_guest_memory(config.mem_mib)?;
        memory::register_with_kvm(&fd, &mem)?;
        phases.record("memory ready");

        let control = RunControl::new()?;
        let console = Console::new(config.console, phases.clone());
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| VmError::Thread(format!("cannot create an eventfd: {e}")))?;
        fd.register_irqfd(&serial_irq, layout::COM1_GSI)
            .map_err(kvm_err("KVM_IRQFD (serial)"))?;
        let serial = Arc::new(
            SerialDevice::new(serial_irq, console.clone())
                .map_err(|e| VmError::Thread(format!("cannot create an eventfd: {e}")))?,
        );

        let mut pio = Bus::new();
        let devices: [(u64, u64, &'static str, Arc<dyn BusDevice>); 4] = [
            (
                layout::COM1_PORT,
                layout::COM1_LEN,
                "serial",
                serial.clone(),
            ),
            (
                layout::I8042_DATA_PORT,
                I8042_LEN,
                "i8042",
                Arc::new(I8042::new(control.clone())),
            ),
            (
                layout::EXIT_PORT,
                1,
                "exit-port",
                Arc::new(ExitPort::new(control.clone())),
            ),
            (
                layout::PHASE_PORT,
                1,
                "phase-port",
                Arc::new(PhasePort::new(phases.clone())),
            ),
        ];
        for (base, len, name, dev) in devices {
            pio.insert(base, len, name, dev)
                .map_err(|e| VmError::Config(format!("{name}: {e}")))?;
        }
        Ok(Vm {
            config,
            phases,
            kvm,
            fd,
            mem,
            pio,
            mmio: Bus::new(),
            control,
            console,
            serial,
            virtio_cmdline: Vec::new(),
            virtio_count: 0,
            virtio: Vec::new(),
        })
    }

    /// Guest memory (for device models that need it before the run).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Puts `device` in the next virtio-mmio slot, wires its ioeventfd/irqfd, maps it and
    /// announces it on the kernel command line. Returns the slot's (base, GSI).
    pub fn add_virtio_device(
        &mut self,
        name: &'static str,
        device: Box<dyn VirtioDevice>,
    ) -> Result<(u64, u32), VmError> {
        let dev_err = |reason: String| VmError::Device { name, reason };
        let (base, gsi) = layout::virtio_mmio_slot(self.virtio_count).ok_or_else(|| {
            dev_err(format!(
                "no free virtio-mmio slot (at most {})",
                layout::VIRTIO_MMIO_MAX_DEVICES
            ))
        })?;
        let transport =
            MmioTransport::new(device, self.mem.clone()).map_err(|e| dev_err(e.to_string()))?;
        transport
            .register(&self.fd, base, gsi)
            .map_err(|e| dev_err(e.to_string()))?;
        let transport = Arc::new(transport);
        self.mmio
            .insert(base, layout::VIRTIO_MMIO_SIZE, name, transport.clone())
            .map_err(|e| dev_err(e.to_string()))?;
        self.virtio.push(transport);
        self.virtio_count += 1;
        self.virtio_cmdline
            .push(format!("virtio_mmio.device=4K@{base:#x}:{gsi}"));
        Ok((base, gsi))
    }

    /// A handle that ends the run from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.control.clone())
    }

    /// A handle to the console's tail and capture, usable after `run` returned an error.
    pub fn console_handle(&self) -> ConsoleHandle {
        ConsoleHandle(self.console.clone())
    }

    /// The command line the kernel will get (config + virtio device entries).
    pub fn kernel_cmdline(&self) -> String {
        join_cmdline(&self.config.cmdline, &self.virtio_cmdline)
    }

    /// Loads kernel, initrd and command line, builds the boot structures, runs the vCPUs until
    /// the guest exits (exit port, reset), fails, times out or is stopped, and tears down.
    ///
    /// With the sandbox installed ([`crate::sandbox::install`]), every thread started here
    /// takes its role, and once the vCPUs run the calling thread takes the main role for good:
    /// after `run` it may still read `/proc`, write files the policy allows and write to its
    /// open descriptors, but not start threads or processes.
    pub fn run(self) -> Result<RunOutcome, VmError> {
        let kernel = loader::load_kernel(&self.mem, &self.config.kernel)?;
        self.phases.record("kernel loaded");
        let initrd = loader::load_initrd(
            &self.mem,
            &self.config.initrd,
            kernel.end,
            kernel.initrd_ceiling,
        )?;
        if initrd.is_some() {
            self.phases.record("initrd loaded");
        }
        let cmdline_len = loader::load_cmdline(&self.mem, &self.kernel_cmdline())?;
        let mem_bytes = u64::from(self.config.mem_mib) << 20;
        let vcpus = self.config.vcpus;
        let boot_info =
            boot::write_boot_structures(&self.mem, &kernel, cmdline_len, initrd, mem_bytes, vcpus)?;

        let supported = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| VmError::Kvm {
                what: "KVM_GET_SUPPORTED_CPUID",
                source,
            })?;
        let mut vcpu_fds = Vec::with_capacity(usize::from(vcpus));
        for id in 0..vcpus {
            let vcpu = self
                .fd
                .create_vcpu(u64::from(id))
                .map_err(|source| VmError::VcpuSetup {
                    cpu: id,
                    what: "KVM_CREATE_VCPU",
                    source,
                })?;
            boot::configure_vcpu(&vcpu, id, vcpus, &boot_info, &supported)?;
            vcpu_fds.push(vcpu);
        }
        vcpu::install_kick_handler()?;

        let stat_names: Vec<(&'static str, bool)> = self
            .pio
            .names()
            .map(|(n, _, _)| (n, false))
            .chain(self.mmio.names().map(|(n, _, _)| (n, true)))
            .collect();
        let stats = Arc::new(Stats::new(self.config.stats, stat_names));
        let ctx = VcpuContext {
            pio: Arc::new(self.pio),
            mmio: Arc::new(self.mmio),
            control: self.control.clone(),
            stats: stats.clone(),
            phases: self.phases.clone(),
            running: Arc::new(AtomicUsize::new(usize::from(vcpus))),
        };

        let _terminal = self.config.stdin.then(TerminalGuard::new).flatten();
        let event_loop = spawn_event_loop(
            self.control.clone(),
            self.config.stdin.then(|| self.serial.clone()),
            self.config.timeout,
        )?;
        let mut handles: Vec<JoinHandle<()>> = Vec::with_capacity(vcpu_fds.len());
        for (id, mut vcpu) in vcpu_fds.into_iter().enumerate() {
            let ctx = ctx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    sandbox::enter_thread(ThreadRole::Vcpu);
                    vcpu::run_loop(&mut vcpu, id as u8, &ctx)
                });
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    self.control
                        .finish(Err(VmError::Thread(format!("cannot start vCPU {id}: {e}"))));
                    break;
                }
            }
        }

        // Set up: from here on this thread waits, stops the others and reports.
        sandbox::enter_thread(ThreadRole::Main);
        let outcome = self.control.wait();
        vcpu::kick_and_join(handles);
        let _ = event_loop.join();
        // Stop the devices: in-flight requests finish and console output is flushed before
        // the caller reports the outcome.
        for t in &self.virtio {
            t.shutdown();
        }
        self.phases.record("vm exit");
        let exit = outcome?;
        Ok(RunOutcome {
            exit,
            phases: self.phases.clone(),
            console_tail: self.console.tail(),
            console_output: self.console.captured(),
            stats: stats.report(),
            virtio_stats: if self.config.stats {
                self.virtio.iter().map(|t| t.stats()).collect()
            } else {
                Vec::new()
            },
            guest_resident_kib: memory::resident_kib(&self.mem),
            kvm_hardware: kvm_is_hardware_accelerated(),
        })
    }
}

/// Puts a terminal on stdin into character mode (no line buffering, no local echo: the guest
/// echoes) for the run, and restores it when dropped. Signals (Ctrl-C) keep working so the
/// caller can still stop the VM.
struct TerminalGuard(libc::termios);

impl TerminalGuard {
    fn new() -> Option<Self> {
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

fn spawn_event_loop(
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

    #[test]
    fn hardware_detection_reads_cpu_flags() {
        assert!(cpuinfo_has_virt(
            "processor: 0\nflags\t\t: fpu vme vmx sse\n"
        ));
        assert!(cpuinfo_has_virt("flags : fpu svm\n"));
        assert!(!cpuinfo_has_virt("flags : fpu vme sse4_2 vmxnot\n"));
        assert!(!cpuinfo_has_virt(""));
    }

    type EventLoop = EventManager<Box<dyn MutEventSubscriber + Send>>;

    /// A pipe standing in for stdin (`[read, write]`), a serial port, and an event loop
    /// forwarding the pipe to it.
    fn stdin_fixture() -> ([i32; 2], Arc<SerialDevice>, EventLoop) {
        use crate::devices::serial::Console;
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

    #[test]
    fn api_types_cross_threads() {
        fn send<T: Send>() {}
        fn send_sync<T: Send + Sync + 'static>() {}
        send::<Vm>();
        send::<RunOutcome>();
        send_sync::<VmError>();
        send_sync::<StopHandle>();
        send_sync::<ConsoleHandle>();
        send_sync::<PhaseLog>();
    }

    #[test]
    fn kvm_open_errors_say_what_to_do() {
        let e = |errno| kvm_open_error(kvm_ioctls::Error::new(errno)).to_string();
        assert!(e(libc::ENOENT).contains("load the kvm module"));
        assert!(e(libc::EACCES).contains("group kvm"));
        assert!(e(libc::EBUSY).contains("opening /dev/kvm"));
    }

    #[test]
    fn config_defaults_and_cmdline_assembly() {
        let c = VmConfig::new("/boot/vmlinux", "console=ttyS0");
        assert_eq!(
            (c.mem_mib, c.vcpus, c.console),
            (256, 1, ConsoleSink::Stdout)
        );
        assert!(!c.stdin && !c.stats && c.timeout.is_none());
        let extras = vec!["virtio_mmio.device=4K@0xd0000000:5".to_string()];
        assert_eq!(
            join_cmdline(" console=ttyS0 ", &extras),
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5"
        );
        assert_eq!(join_cmdline("", &extras), extras[0]);
        assert_eq!(join_cmdline("quiet", &[]), "quiet");
    }

    #[test]
    fn bad_vcpu_counts_are_refused() {
        let mut c = VmConfig::new("/nonexistent", "");
        c.vcpus = 0;
        let err = Vm::new(c, PhaseLog::new(std::time::Instant::now()))
            .err()
            .unwrap();
        assert!(err.to_string().contains("vCPUs"), "{err}");
    }
}
