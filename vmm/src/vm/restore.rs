//! Snapshots of whole VMs, the other way to a [`ReadyVm`] than booting ([`Vm::load`]):
//!
//! * making one: [`Vm::add_job_port_for_snapshot`], boot as usual, then
//!   [`ReadyVm::run_to_snapshot`] runs the guest until its init says it waits for its job,
//!   captures every vCPU, the VM-wide KVM state, the serial port and each virtio transport,
//!   and writes the snapshot file (see [`crate::snapshot`]);
//! * resuming one: [`crate::snapshot::read_snapshot`] (validated before anything runs),
//!   [`Vm::with_memory`] on [`crate::snapshot::map_guest_memory`], the same devices added in
//!   the same order, [`Vm::add_job_port`] with the job, then [`Vm::restore`] puts the saved
//!   state into the devices, the VM and fresh vCPUs and yields a [`ReadyVm`] to run.

use super::machine::Vm;
use super::run::{run_vcpus, ReadyVm, VcpuThreads};
use crate::devices::job_port::JobPort;
use crate::error::VmError;
use crate::snapshot::{
    finish_pending_io, saveable_msrs, write_snapshot, SnapshotKey, SnapshotState, VcpuState,
    VmState,
};
use guest_abi::warm::JOB_PORT;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The name of the serial port's state in a snapshot.
const SERIAL_STATE: &str = "serial";

fn snapshot_err(what: impl std::fmt::Display) -> VmError {
    VmError::Snapshot(what.to_string())
}

/// The name of virtio transport `index`'s state in a snapshot.
fn virtio_state_name(index: usize, device: &str) -> String {
    format!("virtio-mmio {index} ({device})")
}

/// Whether the host's KVM is the AMD (SVM) one.
fn kvm_runs_on_svm() -> bool {
    Path::new("/sys/module/kvm_amd").exists()
}

/// TSS descriptor types: 64-bit TSS, available and busy.
const TSS_AVAILABLE: u8 = 0x9;
const TSS_BUSY: u8 = 0xb;

/// `saved` with its task register marked as an available rather than a busy TSS.
///
/// KVM on SVM reports TR as busy whatever the VMCB holds (so that a state moves to VMX, which
/// requires busy). Real AMD CPUs ignore the type of the loaded TR, but an emulated SVM (QEMU's
/// TCG, the nested test host) checks user-mode port I/O against the TSS only when TR is an
/// available TSS and raises #GP otherwise: a guest restored with the busy type there faults
/// on its first `in`/`out` from user mode (the init's job port). Giving SVM back the type it
/// had is right on both.
fn with_available_tss(saved: &VcpuState) -> VcpuState {
    let mut state = saved.clone();
    if state.sregs.tr.type_ == TSS_BUSY {
        state.sregs.tr.type_ = TSS_AVAILABLE;
    }
    state
}

/// A VM being made into a snapshot: its job port stops the run at the init's wait point.
pub struct SnapshotPoint(Arc<AtomicBool>);

impl Vm {
    /// Maps the job port so that the guest's "waiting for the job" write stops the run there
    /// (for [`ReadyVm::run_to_snapshot`]).
    pub fn add_job_port_for_snapshot(&mut self) -> Result<SnapshotPoint, VmError> {
        let (port, reached) = JobPort::snapshot_point(self.control.clone());
        self.insert_job_port(port)?;
        Ok(SnapshotPoint(reached))
    }

    /// Maps the job port with the length-prefixed job message for a restored guest to read.
    pub fn add_job_port(&mut self, channel_bytes: Vec<u8>) -> Result<(), VmError> {
        self.insert_job_port(JobPort::deliver(channel_bytes))
    }

    fn insert_job_port(&mut self, port: JobPort) -> Result<(), VmError> {
        self.pio
            .insert(u64::from(JOB_PORT), 1, "job-port", Arc::new(port))
            .map_err(|e| VmError::Config(format!("job port: {e}")))
    }

    /// Puts `state` (read and validated by [`crate::snapshot::read_snapshot`], memory already
    /// mapped by [`Vm::with_memory`]) into this VM: the serial port, every virtio transport
    /// (which must be the snapshot's devices, added in the same order), the VM-wide KVM state
    /// and one fresh vCPU per saved vCPU. Nothing has run when this returns.
    pub fn restore(self, state: &SnapshotState) -> Result<ReadyVm, VmError> {
        let expected: Vec<String> = std::iter::once(SERIAL_STATE.to_string())
            .chain(
                self.virtio
                    .iter()
                    .enumerate()
                    .map(|(i, t)| virtio_state_name(i, t.name())),
            )
            .collect();
        let saved: Vec<&str> = state.devices.iter().map(|(n, _)| n.as_str()).collect();
        if saved != expected {
            return Err(snapshot_err(format!(
                "the snapshot's devices {saved:?} are not this VM's {expected:?}"
            )));
        }
        if state.vcpus.len() != usize::from(self.config.vcpus) {
            return Err(snapshot_err(format!(
                "the snapshot has {} vCPUs, this VM {}",
                state.vcpus.len(),
                self.config.vcpus
            )));
        }
        let threads = VcpuThreads::start(self.config.vcpus);
        let mut blobs = state.devices.iter().map(|(_, b)| b);
        if let Some(serial) = blobs.next() {
            self.serial
                .restore_state(serial)
                .map_err(|e| snapshot_err(format!("serial port: {e}")))?;
        }
        for (transport, blob) in self.virtio.iter().zip(blobs) {
            transport
                .restore_state(blob)
                .map_err(|e| snapshot_err(format!("virtio-{}: {e}", transport.name())))?;
        }
        state.vm.restore(&self.fd).map_err(snapshot_err)?;
        let vcpus = self.create_vcpus()?;
        let svm = kvm_runs_on_svm();
        for (id, (vcpu, saved)) in vcpus.iter().zip(&state.vcpus).enumerate() {
            let saved = if svm {
                &with_available_tss(saved)
            } else {
                saved
            };
            saved
                .restore(&self.fd, vcpu)
                .map_err(|e| snapshot_err(format!("vCPU {id}: {e}")))?;
        }
        self.phases.record("state restored");
        Ok(ReadyVm::new(self, vcpus, threads))
    }
}

impl ReadyVm {
    /// Runs the guest until its init waits for its job (the job port's "ready" write), stops
    /// it there and writes a snapshot of it to `path` under `key`. Any other end of the run
    /// (the init failed, a timeout, a crash) is an error that says what happened.
    pub fn run_to_snapshot(
        self,
        point: SnapshotPoint,
        path: &Path,
        key: &SnapshotKey,
    ) -> Result<(), VmError> {
        let (vm, vcpus, threads) = self.into_parts();
        let (outcome, mut vcpus, _stats) = run_vcpus(&vm, vcpus, threads)?;
        let result = (|| {
            if !point.0.load(Ordering::SeqCst) {
                let ended = match outcome {
                    Ok(exit) => format!("{exit:?}"),
                    Err(e) => e.to_string(),
                };
                let tail = vm.console.tail();
                return Err(snapshot_err(format!(
                    "the appliance ended ({ended}) before it waited for its job; last console \
                     lines: {}",
                    tail.iter()
                        .rev()
                        .take(5)
                        .rev()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(" | ")
                )));
            }
            if vcpus.len() != usize::from(vm.config.vcpus) {
                return Err(snapshot_err("a vCPU thread did not come back"));
            }
            for vcpu in vcpus.iter_mut() {
                finish_pending_io(vcpu).map_err(snapshot_err)?;
            }
            let msrs = saveable_msrs(&vm.kvm, &vcpus[0]).map_err(snapshot_err)?;
            let vcpu_states = vcpus
                .iter()
                .enumerate()
                .map(|(id, vcpu)| {
                    VcpuState::capture(&vm.fd, vcpu, &msrs)
                        .map_err(|e| snapshot_err(format!("vCPU {id}: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let vm_state = VmState::capture(&vm.fd).map_err(snapshot_err)?;
            let devices = std::iter::once((SERIAL_STATE.to_string(), vm.serial.save_state()))
                .chain(
                    vm.virtio
                        .iter()
                        .enumerate()
                        .map(|(i, t)| (virtio_state_name(i, t.name()), t.save_state())),
                )
                .collect();
            let state = SnapshotState {
                vm: vm_state,
                vcpus: vcpu_states,
                devices,
            };
            write_snapshot(path, key, &state, &vm.mem).map_err(snapshot_err)
        })();
        for t in &vm.virtio {
            t.shutdown();
        }
        result
    }
}
