//! Model-specific registers every vCPU starts with: syscall MSRs cleared, fast strings on, and
//! MTRRs enabled with write-back as the default memory type (otherwise Linux maps RAM uncached).

use super::error::BootError;
use kvm_bindings::{kvm_msr_entry, Msrs};

pub const MSR_IA32_TSC: u32 = 0x10;
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;
pub const MSR_CSTAR: u32 = 0xc000_0083;
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_MEM_TYPE_WB: u64 = 6;

/// The (index, value) pairs set on every vCPU before it runs.
pub fn boot_msr_values() -> Vec<(u32, u64)> {
    vec![
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
}

/// [`boot_msr_values`] as the FAM structure `KVM_SET_MSRS` takes.
pub fn boot_msrs() -> Result<Msrs, BootError> {
    let entries: Vec<kvm_msr_entry> = boot_msr_values()
        .into_iter()
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).map_err(|e| BootError::MsrList(format!("{e:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mtrr_default_is_write_back_and_enabled() {
        let v = boot_msr_values();
        assert!(v.contains(&(MSR_MTRR_DEF_TYPE, 0x806)));
        assert!(v.contains(&(MSR_IA32_MISC_ENABLE, 1)));
        let msrs = boot_msrs().unwrap();
        assert_eq!(msrs.as_slice().len(), v.len());
    }
}
