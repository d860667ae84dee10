//! vCPU threads: the KVM_RUN loop that dispatches port and MMIO exits to the buses, turns fatal
//! exits (triple fault, internal error, failed entry, terminal HLT) into errors that say where
//! the guest was and report them through [`RunControl`], and [`kick_and_join`], which forces
//! every vCPU out of KVM_RUN (signal + `immediate_exit`) and joins it.

use crate::devices::bus::Bus;
use crate::error::VmError;
use crate::phases::PhaseLog;
use crate::run_control::{GuestExit, RunControl};
use crate::stats::{ExitKind, Stats, UNMAPPED_MMIO, UNMAPPED_PIO};
use kvm_bindings::{kvm_run, KVM_SYSTEM_EVENT_CRASH};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::cell::Cell;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vmm_sys_util::signal::{register_signal_handler, unblock_signal, Killable, SIGRTMIN};

thread_local! {
    /// This thread's `kvm_run` page, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// Signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(|c| c.get());
    if !run.is_null() {
        // SAFETY: the pointer is this thread's mapped kvm_run page, set by the vCPU loop and
        // cleared before the VcpuFd (and its mapping) is dropped. A volatile byte store is
        // async-signal-safe. KVM checks immediate_exit on the next KVM_RUN entry.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick signal handler (once per process).
pub fn install_kick_handler() -> Result<(), VmError> {
    static ONCE: Once = Once::new();
    static RESULT: AtomicI32 = AtomicI32::new(0);
    ONCE.call_once(|| {
        let r = register_signal_handler(kick_signal(), kick_handler);
        RESULT.store(r.err().map_or(0, |e| e.errno()), Ordering::SeqCst);
    });
    let errno = RESULT.load(Ordering::SeqCst);
    if errno != 0 {
        return Err(VmError::Thread(format!(
            "cannot install the vCPU kick signal handler: errno {errno}"
        )));
    }
    Ok(())
}

/// Sets the stop flag's consequences in motion: signals every unfinished vCPU thread until all
/// have left KVM_RUN, then joins them and returns what each returned (for threads that did
/// not panic).
pub fn kick_and_join<T>(handles: Vec<JoinHandle<T>>) -> Vec<T> {
    loop {
        let mut pending = 0;
        for h in handles.iter().filter(|h| !h.is_finished()) {
            pending += 1;
            let _ = h.kill(kick_signal());
        }
        if pending == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    handles.into_iter().filter_map(|h| h.join().ok()).collect()
}

/// Everything a vCPU thread shares with the rest of the VM.
#[derive(Clone)]
pub struct VcpuContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub control: Arc<RunControl>,
    pub stats: Arc<Stats>,
    pub phases: PhaseLog,
    /// vCPUs not yet halted for good.
    pub running: Arc<AtomicUsize>,
}

/// "vCPU n at RIP .., CS .., CR0 .." for error messages.
pub fn location(vcpu: &VcpuFd, id: u8) -> String {
    let regs = vcpu.get_regs();
    let sregs = vcpu.get_sregs();
    match (regs, sregs) {
        (Ok(r), Ok(s)) => format!(
            "vCPU {id} at RIP {:#x} (CS selector {:#x} base {:#x}, CR0 {:#x}, CR3 {:#x}, CR4 {:#x}, EFER {:#x}, RFLAGS {:#x})",
            r.rip, s.cs.selector, s.cs.base, s.cr0, s.cr3, s.cr4, s.efer, r.rflags
        ),
        _ => format!("vCPU {id} (registers unreadable)"),
    }
}

fn internal_error_meaning(suberror: u32) -> &'static str {
    match suberror {
        1 => "instruction emulation failed",
        2 => "simultaneous exceptions",
        3 => "delivery event failure",
        4 => "unexpected exit reason",
        _ => "unknown",
    }
}

/// For an emulation failure that carries the instruction bytes (flags bit 0 in data[0], then
/// a length byte and up to 15 bytes), those bytes as hex; otherwise "unknown".
fn emulation_failure_bytes(suberror: u32, data: &[u64]) -> String {
    const EMULATION: u32 = 1;
    if suberror != EMULATION || data.len() < 2 || data[0] & 1 == 0 {
        return "unknown".into();
    }
    let bytes: Vec<u8> = data[1..].iter().flat_map(|w| w.to_le_bytes()).collect();
    let len = usize::from(bytes[0]).min(15).min(bytes.len() - 1);
    bytes[1..=len]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[inline]
fn dispatch_read(bus: &Bus, addr: u64, data: &mut [u8], stats: &Stats, mmio: bool) {
    match bus.resolve(addr) {
        Some(r) => {
            if stats.enabled() {
                let t = Instant::now();
                r.device.read(r.offset, data);
                stats.device(r.name, mmio, t.elapsed());
            } else {
                r.device.read(r.offset, data);
            }
        }
        None => {
            data.fill(0xff);
            stats.device(
                if mmio { UNMAPPED_MMIO } else { UNMAPPED_PIO },
                mmio,
                Duration::ZERO,
            );
        }
    }
}

#[inline]
fn dispatch_write(bus: &Bus, addr: u64, data: &[u8], stats: &Stats, mmio: bool) {
    match bus.resolve(addr) {
        Some(r) => {
            if stats.enabled() {
                let t = Instant::now();
                r.device.write(r.offset, data);
                stats.device(r.name, mmio, t.elapsed());
            } else {
                r.device.write(r.offset, data);
            }
        }
        None => stats.device(
            if mmio { UNMAPPED_MMIO } else { UNMAPPED_PIO },
            mmio,
            Duration::ZERO,
        ),
    }
}

/// Ends the run with an error if a vCPU thread unwinds (a bug in a device model, say), so the
/// VM stops instead of waiting forever for an outcome.
struct PanicGuard<'a> {
    id: u8,
    control: &'a RunControl,
}

impl Drop for PanicGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.control.finish(Err(VmError::Thread(format!(
                "vCPU {} thread panicked while handling a VM exit; this is a bootbox bug",
                self.id
            ))));
        }
    }
}

/// Runs vCPU `id` until the run is stopping or the vCPU hits a fatal exit (which it reports
/// through `ctx.control`).
pub fn run_loop(vcpu: &mut VcpuFd, id: u8, ctx: &VcpuContext) {
    let _guard = PanicGuard {
        id,
        control: &ctx.control,
    };
    // The caller may have blocked signals before spawning us; the kick must get through.
    let _ = unblock_signal(kick_signal());
    KVM_RUN.with(|c| c.set(vcpu.get_kvm_run() as *mut kvm_run));
    let mut first = true;
    while !ctx.control.is_stopping() {
        if first && id == 0 {
            ctx.phases.record("first KVM_RUN");
        }
        first = false;
        let fatal: Option<Result<GuestExit, VmError>> = match vcpu.run() {
            Ok(exit) => match exit {
                VcpuExit::IoOut(port, data) => {
                    ctx.stats.exit(ExitKind::IoOut);
                    dispatch_write(&ctx.pio, u64::from(port), data, &ctx.stats, false);
                    None
                }
                VcpuExit::IoIn(port, data) => {
                    ctx.stats.exit(ExitKind::IoIn);
                    dispatch_read(&ctx.pio, u64::from(port), data, &ctx.stats, false);
                    None
                }
                VcpuExit::MmioRead(addr, data) => {
                    ctx.stats.exit(ExitKind::MmioRead);
                    dispatch_read(&ctx.mmio, addr, data, &ctx.stats, true);
                    None
                }
                VcpuExit::MmioWrite(addr, data) => {
                    ctx.stats.exit(ExitKind::MmioWrite);
                    dispatch_write(&ctx.mmio, addr, data, &ctx.stats, true);
                    None
                }
                VcpuExit::Intr | VcpuExit::IrqWindowOpen => {
                    ctx.stats.exit(ExitKind::Interrupted);
                    None
                }
                VcpuExit::Hlt => {
                    ctx.stats.exit(ExitKind::Hlt);
                    // Only seen without an in-kernel LAPIC: nothing can wake this vCPU again.
                    if ctx.running.fetch_sub(1, Ordering::SeqCst) == 1 {
                        Some(Err(VmError::GuestHalted {
                            location: location(vcpu, id),
                        }))
                    } else {
                        break;
                    }
                }
                VcpuExit::Shutdown => Some(Err(VmError::TripleFault {
                    location: location(vcpu, id),
                })),
                // KVM_SYSTEM_EVENT_CRASH: the guest told us it crashed; shutdown/reset otherwise.
                VcpuExit::SystemEvent(kind, _) if kind == KVM_SYSTEM_EVENT_CRASH => {
                    Some(Err(VmError::UnexpectedExit {
                        exit: "system event: guest crash".into(),
                        location: location(vcpu, id),
                    }))
                }
                VcpuExit::SystemEvent(..) => Some(Ok(GuestExit::Reset)),
                VcpuExit::FailEntry(reason, _cpu) => Some(Err(VmError::FailEntry {
                    location: location(vcpu, id),
                    reason,
                })),
                VcpuExit::InternalError => {
                    // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the
                    // union member the kernel filled in.
                    let internal = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal };
                    let n = (internal.ndata as usize).min(internal.data.len());
                    let data = internal.data[..n].to_vec();
                    Some(Err(VmError::InternalError {
                        location: location(vcpu, id),
                        suberror: internal.suberror,
                        meaning: internal_error_meaning(internal.suberror),
                        instruction: emulation_failure_bytes(internal.suberror, &data),
                        data,
                    }))
                }
                other => {
                    ctx.stats.exit(ExitKind::Other);
                    let exit = format!("{other:?}");
                    Some(Err(VmError::UnexpectedExit {
                        exit,
                        location: location(vcpu, id),
                    }))
                }
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                ctx.stats.exit(ExitKind::Interrupted);
                vcpu.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => Some(Err(VmError::VcpuRun { cpu: id, source: e })),
        };
        if let Some(outcome) = fatal {
            ctx.control.finish(outcome);
            break;
        }
    }
    KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::BusDevice;
    use kvm_bindings::kvm_userspace_memory_region;
    use kvm_ioctls::Kvm;
    use std::sync::Mutex;
    use vm_memory::{
        Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
        MemoryRegionAddress,
    };

    struct Recorder(Mutex<Vec<(u64, Vec<u8>)>>);
    impl BusDevice for Recorder {
        fn read(&self, _offset: u64, data: &mut [u8]) {
            data.fill(0x5a);
        }
        fn write(&self, offset: u64, data: &[u8]) {
            self.0.lock().unwrap().push((offset, data.to_vec()));
        }
    }

    type RealModeResult = (
        Result<GuestExit, VmError>,
        Vec<(u64, Vec<u8>)>,
        Option<crate::stats::Report>,
    );

    /// A VM (no in-kernel irqchip) with 64 KiB of RAM holding `code` at 0x1000 and one vCPU in
    /// real mode about to run it. The VM and memory must outlive the vCPU's runs.
    fn real_mode_vcpu(kvm: &Kvm, code: &[u8]) -> (kvm_ioctls::VmFd, GuestMemoryMmap, VcpuFd) {
        let vm = kvm.create_vm().unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        mem.write_slice(code, GuestAddress(0x1000)).unwrap();
        let region = mem.iter().next().unwrap();
        let host = region.get_host_address(MemoryRegionAddress(0)).unwrap();
        // SAFETY: the caller keeps `mem` alive as long as the VM; one slot.
        unsafe {
            vm.set_user_memory_region(kvm_userspace_memory_region {
                slot: 0,
                flags: 0,
                guest_phys_addr: 0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            })
            .unwrap()
        };
        let vcpu = vm.create_vcpu(0).unwrap();
        let mut sregs = vcpu.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs).unwrap();
        vcpu.set_regs(&kvm_bindings::kvm_regs {
            rip: 0x1000,
            rflags: 2,
            ..Default::default()
        })
        .unwrap();
        (vm, mem, vcpu)
    }

    /// A vCPU context with `pio` as the port bus, an empty MMIO bus and one running vCPU.
    fn context(pio: Bus, control: &Arc<RunControl>, stats: Arc<Stats>) -> VcpuContext {
        VcpuContext {
            pio: Arc::new(pio),
            mmio: Arc::new(Bus::new()),
            control: control.clone(),
            stats,
            phases: PhaseLog::new(Instant::now()),
            running: Arc::new(AtomicUsize::new(1)),
        }
    }

    /// Runs real-mode `code` at 0x1000 on a VM without in-kernel irqchip.
    fn run_real_mode(code: &[u8]) -> Option<RealModeResult> {
        let kvm = match Kvm::new() {
            Ok(k) => k,
            Err(e) => {
                eprintln!("skipping: cannot open /dev/kvm: {e}");
                return None;
            }
        };
        let (_vm, _mem, mut vcpu) = real_mode_vcpu(&kvm, code);
        let rec = Arc::new(Recorder(Mutex::new(Vec::new())));
        let mut pio = Bus::new();
        pio.insert(0x3f8, 8, "serial", rec.clone()).unwrap();
        let control = RunControl::new().unwrap();
        let stats = Arc::new(Stats::new(true, [("serial", false)]));
        let ctx = context(pio, &control, stats.clone());
        run_loop(&mut vcpu, 0, &ctx);
        let outcome = control.wait();
        let writes = rec.0.lock().unwrap().clone();
        Some((outcome, writes, stats.report()))
    }

    #[test]
    fn emulation_failure_shows_the_instruction() {
        // What KVM reported for `lock cmpxchg16b [rsi+0x20]`.
        let data = [1, 0x0f20_4ec7_0f48_f00f, 0x44ff_fffe_25e9_c094, 0x1000];
        assert_eq!(
            emulation_failure_bytes(1, &data),
            "f0 48 0f c7 4e 20 0f 94 c0 e9 25 fe ff ff 44"
        );
        assert_eq!(emulation_failure_bytes(1, &[0, 5]), "unknown");
        assert_eq!(emulation_failure_bytes(3, &data), "unknown");
    }

    #[test]
    fn real_mode_port_io_then_halt_is_an_error() {
        let code = [
            0xba, 0xf8, 0x03, // mov dx, 0x3f8
            0xb0, b'h', 0xee, // mov al, 'h'; out dx, al
            0xb0, b'i', 0xee, // mov al, 'i'; out dx, al
            0xec, // in al, dx (mapped: 0x5a)
            0xba, 0x00, 0x05, // mov dx, 0x500 (unmapped)
            0xee, // out dx, al (ignored)
            0xec, // in al, dx (all ones)
            0xba, 0xf8, 0x03, // mov dx, 0x3f8
            0xee, // out dx, al -> 0xff shows the unmapped read
            0xfa, 0xf4, // cli; hlt
        ];
        let Some((outcome, writes, report)) = run_real_mode(&code) else {
            return;
        };
        let err = outcome.unwrap_err();
        assert!(matches!(err, VmError::GuestHalted { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("vCPU 0 at RIP"), "{msg}");
        assert_eq!(
            writes,
            vec![(0, vec![b'h']), (0, vec![b'i']), (0, vec![0xff])]
        );
        let report = report.unwrap();
        assert_eq!(report.device_count("serial"), 4);
        assert_eq!(report.device_count(UNMAPPED_PIO), 2);
        assert_eq!(report.exit_count("hlt"), 1);
    }

    #[test]
    fn a_panicking_device_ends_the_run_with_an_error() {
        struct Boom;
        impl BusDevice for Boom {
            fn read(&self, _offset: u64, _data: &mut [u8]) {}
            fn write(&self, _offset: u64, _data: &[u8]) {
                panic!("device bug");
            }
        }
        let Ok(kvm) = Kvm::new() else {
            return eprintln!("skipping: cannot open /dev/kvm");
        };
        // mov dx, 0x3f8; out dx, al; hlt
        let (_vm, _mem, mut vcpu) = real_mode_vcpu(&kvm, &[0xba, 0xf8, 0x03, 0xee, 0xf4]);
        let mut pio = Bus::new();
        pio.insert(0x3f8, 8, "boom", Arc::new(Boom)).unwrap();
        let control = RunControl::new().unwrap();
        let ctx = context(pio, &control, Arc::new(Stats::new(false, [])));
        let handle = std::thread::spawn(move || run_loop(&mut vcpu, 0, &ctx));
        let err = control.wait().unwrap_err();
        assert!(err.to_string().contains("vCPU 0 thread panicked"), "{err}");
        assert!(handle.join().is_err());
    }

    #[test]
    fn stop_request_kicks_a_spinning_vcpu() {
        let kvm = match Kvm::new() {
            Ok(k) => k,
            Err(e) => return eprintln!("skipping: cannot open /dev/kvm: {e}"),
        };
        install_kick_handler().unwrap();
        let (_vm, _mem, mut vcpu) = real_mode_vcpu(&kvm, &[0xeb, 0xfe]); // jmp $
        let control = RunControl::new().unwrap();
        let ctx = context(Bus::new(), &control, Arc::new(Stats::new(false, [])));
        let handle = std::thread::spawn(move || run_loop(&mut vcpu, 0, &ctx));
        std::thread::sleep(Duration::from_millis(50));
        control.finish(Ok(GuestExit::Stopped));
        kick_and_join(vec![handle]);
        assert!(matches!(control.wait(), Ok(GuestExit::Stopped)));
    }
}
