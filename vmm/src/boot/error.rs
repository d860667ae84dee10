//! Why the boot structures (zero page, PVH start info, GDT/IDT, page tables, MP table, MSR and
//! CPUID lists) could not be built or written. The monitor wraps these in `VmError::Boot`.

use super::mptable::MptableError;
use vm_memory::GuestMemoryError;

/// A boot structure could not be built or written into guest memory.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("initrd address {0:#x} is above 4 GiB")]
    InitrdAbove4GiB(u64),
    #[error("initrd of {0} bytes is too large (4 GiB max)")]
    InitrdOver4GiB(u64),
    #[error("{0} e820 entries do not fit the zero page")]
    ZeroPageE820Full(usize),
    #[error("cannot write the zero page: {0}")]
    WriteZeroPage(#[source] GuestMemoryError),
    #[error("{0} memory map entries do not fit")]
    PvhMemmapFull(usize),
    #[error("cannot write the PVH start info: {0}")]
    WritePvh(#[source] GuestMemoryError),
    #[error("cannot write the GDT/IDT: {0}")]
    WriteGdtIdt(#[source] GuestMemoryError),
    #[error("cannot write page tables: {0}")]
    WritePageTables(#[source] GuestMemoryError),
    #[error(transparent)]
    Mptable(#[from] MptableError),
    #[error("cannot build the MSR list: {0}")]
    MsrList(String),
    #[error("vCPU {cpu}: KVM refused boot MSR {index:#x}; the host KVM is too old or restricted")]
    MsrRefused { cpu: u8, index: u32 },
    #[error("CPUID table too large: {0}")]
    CpuidTooLarge(String),
}
