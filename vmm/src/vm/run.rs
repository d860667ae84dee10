//! Running a VM whose vCPUs have their initial state: [`ReadyVm::run`] starts the event loop and
//! one thread per vCPU, waits for the first outcome, stops every thread and device, and
//! reports the [`RunOutcome`]. It does not care how the vCPUs got their state (booting a
//! kernel with [`Vm::load`] today).

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

/// A VM with its devices and vCPUs in their initial state, ready to run.
pub struct ReadyVm {
    vm: Vm,
    vcpus: Vec<VcpuFd>,
}

impl ReadyVm {
    /// Pairs a VM with its vCPUs, one per configured vCPU, in id order, each already given
    /// the state it starts from.
    pub(super) fn new(vm: Vm, vcpus: Vec<VcpuFd>) -> Self {
        ReadyVm { vm, vcpus }
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
        let ReadyVm { vm, vcpus } = self;
        let (outcome, _vcpus, stats) = run_vcpus(&vm, vcpus)?;
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

    /// Splits into the VM and its vCPUs (for a run that ends somewhere else than `run`).
    pub(super) fn into_parts(self) -> (Vm, Vec<VcpuFd>) {
        (self.vm, self.vcpus)
    }
}

/// The outcome of running vCPUs, the vCPUs (stopped, out of KVM_RUN) and the exit counters.
pub(super) type VcpuRun = (Result<GuestExit, VmError>, Vec<VcpuFd>, Arc<Stats>);

/// Runs `vcpus` on `vm`'s buses with the event loop until the first outcome, then kicks every
/// vCPU out of KVM_RUN and joins the threads, handing the vCPUs back. The devices keep running.
///
/// With the sandbox installed ([`crate::sandbox::install`]), every thread started here takes
/// its role, and once the vCPUs run the calling thread takes the main role for good.
pub(super) fn run_vcpus(vm: &Vm, vcpus: Vec<VcpuFd>) -> Result<VcpuRun, VmError> {
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
    let event_loop = spawn_event_loop(
        vm.control.clone(),
        vm.config.stdin.then(|| vm.serial.clone()),
        vm.config.timeout,
    )?;
    let mut handles: Vec<JoinHandle<VcpuFd>> = Vec::with_capacity(vcpu_count);
    for (id, mut vcpu) in vcpus.into_iter().enumerate() {
        let ctx = ctx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                sandbox::enter_thread(ThreadRole::Vcpu);
                vcpu::run_loop(&mut vcpu, id as u8, &ctx);
                vcpu
            });
        match spawned {
            Ok(h) => handles.push(h),
            Err(e) => {
                vm.control
                    .finish(Err(VmError::Thread(format!("cannot start vCPU {id}: {e}"))));
                break;
            }
        }
    }

    // Set up: from here on this thread waits, stops the others and reports.
    sandbox::enter_thread(ThreadRole::Main);
    let outcome = vm.control.wait();
    let vcpus = vcpu::kick_and_join(handles);
    let _ = event_loop.join();
    Ok((outcome, vcpus, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::{ConsoleHandle, StopHandle};

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
