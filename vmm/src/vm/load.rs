//! The boot step between building a VM and running it: [`Vm::load`] puts the kernel, the
//! initrd and the command line into guest memory, writes the boot structures and gives each
//! vCPU its boot state, which yields a [`ReadyVm`]. Another way to a `ReadyVm` (restoring a
//! snapshot) would replace this step and share the rest.

use super::machine::Vm;
use super::run::{ReadyVm, RunOutcome, VcpuThreads};
use crate::boot::{self, loader};
use crate::error::VmError;
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;

impl Vm {
    /// Loads kernel, initrd and command line, builds the boot structures and creates the
    /// vCPUs in their boot state. Nothing runs yet. When [`Vm::new`] started the copies, where
    /// everything goes is known already: this thread writes the boot structures and sets the
    /// vCPUs up while the loader copies, then helps with what is left; otherwise the kernel
    /// and initrd are loaded first.
    pub fn load(mut self) -> Result<ReadyVm, VmError> {
        let threads = VcpuThreads::start(self.config.vcpus);
        let preload = self.preload.take();
        let (kernel, initrd) = match &preload {
            Some(preload) => preload.planned(),
            None => {
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
                (kernel, initrd)
            }
        };
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
        let vcpu_fds = self.create_vcpus()?;
        for (id, vcpu) in (0..vcpus).zip(&vcpu_fds) {
            boot::configure_vcpu(vcpu, id, vcpus, &boot_info, &supported)?;
        }
        // The copies started with the VM (below 1 MiB, where the boot structures are, they
        // write nothing): both are loaded together, so both phases end here.
        if let Some(preload) = preload {
            preload.finish(&self.config.initrd)?;
            self.phases.record("kernel loaded");
            if initrd.is_some() {
                self.phases.record("initrd loaded");
            }
        }
        Ok(ReadyVm::new(self, vcpu_fds, threads))
    }

    /// [`Vm::load`] then [`ReadyVm::run`]: boots the kernel and runs the vCPUs until the guest
    /// exits (exit port, reset), fails, times out or is stopped, and tears down.
    pub fn run(self) -> Result<RunOutcome, VmError> {
        self.load()?.run()
    }
}
