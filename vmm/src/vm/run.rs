//! Running a VM whose vCPUs have their initial state: [`ReadyVm::run`] starts the event loop,
//! hands each vCPU to its thread (started, and waiting, since the vCPUs were set up: see
//! `VcpuThreads`), waits for the first outcome, stops every thread and device, and reports
//! the [`RunOutcome`]. It does not care how the vCPUs got their state (booting a kernel with
//! [`Vm::load`], or restoring a snapshot with [`Vm::restore`]).

use super::events::{spawn_event_loop, TerminalGuard};
use super::host::kvm_is_hardware_accelerated;
use super::machine::Vm;
use crate::devices::virtio::VirtioStats;
use crate::error::VmError;
use crate::memory;
use crate::phases::PhaseLog;
use crate::run_control::GuestExit;
use crate::sandbox::{self, ThreadRole};
use crate::stats::{self, Stats};
use crate::vcpu::{self, VcpuContext};
use kvm_ioctls::VcpuFd;
use std::sync::atomic::AtomicUsize;
use std::sync::mpsc::{self, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

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
    /// One report per virtio device whose thread panicked during the run (the device was
    /// stopped and put into DEVICE_NEEDS_RESET; the run went on without it).
    pub device_panics: Vec<String>,
    /// Guest RAM resident on the host at the end of the run, in KiB.
    pub guest_resident_kib: Option<u64>,
    /// Whether KVM runs on hardware virtualisation (see [`kvm_is_hardware_accelerated`]).
    pub kvm_hardware: bool,
}

/// What a vCPU thread is handed when the run starts.
type VcpuWork = (VcpuFd, VcpuContext);
/// A started vCPU thread (where to hand it its work, and its handle), or why it did not start.
type WaitingThread = Result<(SyncSender<VcpuWork>, JoinHandle<Option<VcpuFd>>), String>;

/// vCPU threads started before their vCPUs are set up ([`VcpuThreads::start`], at the
/// beginning of [`Vm::load`] and [`Vm::restore`]): a thread's start-up and its seccomp filter
/// happen beside the rest of the set-up instead of between it and the first KVM_RUN. Each
/// thread waits for its vCPU and context; dropped unused, they end without running anything.
pub(super) struct VcpuThreads(Vec<WaitingThread>);

impl VcpuThreads {
    /// Starts one waiting thread per vCPU id below `count`.
    pub(super) fn start(count: u8) -> Self {
        VcpuThreads(
            (0..count)
                .map(|id| {
                    let (work, waiting) = mpsc::sync_channel::<VcpuWork>(1);
                    std::thread::Builder::new()
                        .name(format!("vcpu{id}"))
                        .spawn(move || {
                            sandbox::enter_thread(ThreadRole::Vcpu);
                            let (mut vcpu, ctx) = waiting.recv().ok()?;
                            vcpu::run_loop(&mut vcpu, id, &ctx);
                            Some(vcpu)
                        })
                        .map(|handle| (work, handle))
                        .map_err(|e| e.to_string())
                })
                .collect(),
        )
    }
}

/// A VM with its devices and vCPUs in their initial state, ready to run.
pub struct ReadyVm {
    vm: Vm,
    vcpus: Vec<VcpuFd>,
    threads: VcpuThreads,
}

impl ReadyVm {
    /// Pairs a VM with its vCPUs, one per configured vCPU, in id order, each already given
    /// the state it starts from, and the threads that will run them.
    pub(super) fn new(vm: Vm, vcpus: Vec<VcpuFd>, threads: VcpuThreads) -> Self {
        ReadyVm { vm, vcpus, threads }
    }

    /// The VM, for its handles ([`Vm::stop_handle`], [`Vm::console_handle`]).
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// Runs the vCPUs until the guest exits (exit port, reset), fails, times out or is
    /// stopped, and tears down.
    ///
    /// With the sandbox installed ([`crate::sandbox::install`]), every thread started here
    /// takes its role, and once the vCPUs run the calling thread takes the main role for good:
    /// after `run` it may still read `/proc`, write files the policy allows and write to its
    /// open descriptors, but not start threads or processes.
    pub fn run(self) -> Result<RunOutcome, VmError> {
        let ReadyVm { vm, vcpus, threads } = self;
        let (outcome, _vcpus, stats) = run_vcpus(&vm, vcpus, threads)?;
        // Stop the devices: in-flight requests finish and console output is flushed before
        // the caller reports the outcome.
        for t in &vm.virtio {
            t.shutdown();
        }
        vm.phases.record("vm exit");
        let exit = outcome?;
        Ok(RunOutcome {
            exit,
            phases: vm.phases.clone(),
            console_tail: vm.console.tail(),
            console_output: vm.console.captured(),
            stats: stats.report(),
            virtio_stats: if vm.config.stats {
                vm.virtio.iter().map(|t| t.stats()).collect()
            } else {
                Vec::new()
            },
            device_panics: vm.virtio.iter().filter_map(|t| t.panic_report()).collect(),
            guest_resident_kib: memory::resident_kib(&vm.mem),
            kvm_hardware: kvm_is_hardware_accelerated(),
        })
    }

    /// Splits into the VM, its vCPUs and their threads (for a run that ends somewhere else
    /// than `run`).
    pub(super) fn into_parts(self) -> (Vm, Vec<VcpuFd>, VcpuThreads) {
        (self.vm, self.vcpus, self.threads)
    }
}

/// The outcome of running vCPUs, the vCPUs (stopped, out of KVM_RUN) and the exit counters.
pub(super) type VcpuRun = (Result<GuestExit, VmError>, Vec<VcpuFd>, Arc<Stats>);

/// Runs `vcpus` on `vm`'s buses with the event loop until the first outcome, then kicks every
/// vCPU out of KVM_RUN and joins the threads, handing the vCPUs back. The devices keep running.
///
/// With the sandbox installed ([`crate::sandbox::install`]), every thread started here takes
/// its role, and once the vCPUs run the calling thread takes the main role for good.
pub(super) fn run_vcpus(
    vm: &Vm,
    vcpus: Vec<VcpuFd>,
    threads: VcpuThreads,
) -> Result<VcpuRun, VmError> {
    let vcpu_count = vcpus.len();
    vcpu::install_kick_handler()?;

    let stat_names: Vec<(&'static str, bool)> = vm
        .pio
        .names()
        .map(|(n, _, _)| (n, false))
        .chain(vm.mmio.names().map(|(n, _, _)| (n, true)))
        .collect();
    let stats = Arc::new(Stats::new(vm.config.stats, stat_names));
    let ctx = VcpuContext {
        pio: Arc::new(vm.pio.clone()),
        mmio: Arc::new(vm.mmio.clone()),
        control: vm.control.clone(),
        stats: stats.clone(),
        phases: vm.phases.clone(),
        running: Arc::new(AtomicUsize::new(vcpu_count)),
    };

    let _terminal = vm.config.stdin.then(TerminalGuard::new).flatten();
    let mut handles: Vec<JoinHandle<Option<VcpuFd>>> = Vec::with_capacity(vcpu_count);
    for (id, (vcpu, thread)) in vcpus.into_iter().zip(threads.0).enumerate() {
        let started = thread.and_then(|(work, handle)| {
            // A thread that ended early (it could not take its role) dropped its receiver.
            match work.send((vcpu, ctx.clone())) {
                Ok(()) => Ok(handle),
                Err(_) => Err("its thread ended before it was given its vCPU".to_string()),
            }
        });
        match started {
            Ok(h) => handles.push(h),
            Err(e) => {
                vm.control
                    .finish(Err(VmError::Thread(format!("cannot start vCPU {id}: {e}"))));
                break;
            }
        }
    }

    // The event loop (stop requests, the timeout, stdin) after the vCPUs are on their way: it
    // is not needed for the guest to start, and a guest that finishes before it exists only
    // makes it end at once. Without it the run cannot be stopped, so failing to start it ends
    // the run with that error.
    let event_loop = spawn_event_loop(
        vm.control.clone(),
        vm.config.stdin.then(|| vm.serial.clone()),
        vm.config.timeout,
    )
    .map_err(|e| vm.control.finish(Err(e)))
    .ok();

    // Set up: from here on this thread waits, stops the others and reports.
    sandbox::enter_thread(ThreadRole::Main);
    let outcome = vm.control.wait();
    let vcpus = vcpu::kick_and_join(handles).into_iter().flatten().collect();
    if let Some(event_loop) = event_loop {
        let _ = event_loop.join();
    }
    Ok((outcome, vcpus, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::{ConsoleHandle, StopHandle};

    #[test]
    fn waiting_vcpu_threads_end_unused_when_their_work_never_comes() {
        let VcpuThreads(threads) = VcpuThreads::start(2);
        assert_eq!(threads.len(), 2);
        for thread in threads {
            let (work, handle) = thread.unwrap();
            drop(work);
            assert!(handle.join().unwrap().is_none(), "no vCPU came back");
        }
    }

    #[test]
    fn api_types_cross_threads() {
        fn send<T: Send>() {}
        fn send_sync<T: Send + Sync + 'static>() {}
        send::<Vm>();
        send::<ReadyVm>();
        send::<RunOutcome>();
        send_sync::<VmError>();
        send_sync::<StopHandle>();
        send_sync::<ConsoleHandle>();
        send_sync::<PhaseLog>();
    }
}
