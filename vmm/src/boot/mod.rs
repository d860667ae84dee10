//! Direct Linux boot on x86-64: the memory layout, kernel/initrd/command-line loading (serial in
//! [`loader`], or for an ELF kernel on two threads in [`preload`]), the
//! boot-information blocks (zero page, PVH start info, e820, MP table) and the initial vCPU
//! state (registers, GDT, page tables, FPU, MSRs, CPUID, LAPIC).

pub mod cpuid;
pub mod error;
pub mod gdt;
pub mod layout;
pub mod loader;
pub mod mptable;
pub mod msr;
pub mod paging;
pub mod params;
pub mod preload;
pub mod regs;

use crate::error::VmError;
use error::BootError;
use kvm_bindings::CpuId;
use kvm_ioctls::VcpuFd;
use loader::LoadedKernel;
use params::InitrdInfo;
use regs::EntryMode;
use vm_memory::GuestMemoryMmap;

/// What the vCPUs need to know to start the kernel.
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    pub mode: EntryMode,
    pub entry: u64,
    /// Page table root (64-bit entry only).
    pub cr3: u64,
}

/// Writes the memory map, MP table, GDT/IDT, page tables and the zero page or PVH start info.
pub fn write_boot_structures(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline_len_with_nul: usize,
    initrd: Option<InitrdInfo>,
    mem_bytes: u64,
    vcpus: u8,
) -> Result<BootInfo, BootError> {
    let e820 = params::e820_map(mem_bytes);
    mptable::setup(mem, vcpus)?;
    regs::write_gdt_idt(mem, kernel.mode)?;
    let cr3 = match kernel.mode {
        EntryMode::Pvh => {
            params::write_pvh(mem, initrd, &e820)?;
            0
        }
        EntryMode::Long64 => {
            let cr3 = paging::setup(mem)?;
            let zp =
                params::build_zero_page(kernel.setup_header, cmdline_len_with_nul, initrd, &e820)?;
            params::write_zero_page(mem, &zp)?;
            cr3
        }
    };
    Ok(BootInfo {
        mode: kernel.mode,
        entry: kernel.entry,
        cr3,
    })
}

/// Sets CPUID, MSRs, registers, FPU and LAPIC of vCPU `id` of `num`.
pub fn configure_vcpu(
    vcpu: &VcpuFd,
    id: u8,
    num: u8,
    boot: &BootInfo,
    supported_cpuid: &CpuId,
) -> Result<(), VmError> {
    let fail = |what: &'static str| {
        move |source| VmError::VcpuSetup {
            cpu: id,
            what,
            source,
        }
    };
    let mut entries = supported_cpuid.as_slice().to_vec();
    cpuid::normalise(&mut entries, id, num);
    let cpuid =
        CpuId::from_entries(&entries).map_err(|e| BootError::CpuidTooLarge(format!("{e:?}")))?;
    vcpu.set_cpuid2(&cpuid).map_err(fail("KVM_SET_CPUID2"))?;
    let msrs = msr::boot_msrs()?;
    let written = vcpu.set_msrs(&msrs).map_err(fail("KVM_SET_MSRS"))?;
    if written != msrs.as_slice().len() {
        let index = msrs.as_slice()[written].index;
        return Err(BootError::MsrRefused { cpu: id, index }.into());
    }
    vcpu.set_regs(&regs::boot_regs(boot.mode, boot.entry))
        .map_err(fail("KVM_SET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(fail("KVM_GET_SREGS"))?;
    vcpu.set_sregs(&regs::boot_sregs(sregs, boot.mode, boot.cr3))
        .map_err(fail("KVM_SET_SREGS"))?;
    vcpu.set_fpu(&regs::boot_fpu())
        .map_err(fail("KVM_SET_FPU"))?;
    let mut lapic = vcpu.get_lapic().map_err(fail("KVM_GET_LAPIC"))?;
    regs::configure_lint(&mut lapic);
    vcpu.set_lapic(&lapic).map_err(fail("KVM_SET_LAPIC"))?;
    Ok(())
}
