//! Initial vCPU register state for the two entry protocols: PVH (32-bit protected mode, paging
//! off, `ebx` = start info) and the Linux 64-bit protocol (long mode on identity page tables,
//! `rsi` = zero page). Also the FPU and the local APIC's LINT pins.

use super::error::BootError;
use super::gdt::{segment_from_gdt, GDT_32, GDT_64};
use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PVH_INFO_START, ZERO_PAGE_START,
};
use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// How the kernel is entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// PVH: 32-bit protected mode at the ELF note's entry.
    Pvh,
    /// Linux 64-bit boot protocol.
    Long64,
}

/// General purpose registers at entry.
pub fn boot_regs(mode: EntryMode, entry: u64) -> kvm_regs {
    match mode {
        EntryMode::Pvh => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rbx: PVH_INFO_START,
            ..Default::default()
        },
        EntryMode::Long64 => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        },
    }
}

/// The GDT to write at [`BOOT_GDT_START`] for `mode`.
pub fn gdt_for(mode: EntryMode) -> &'static [u64; 4] {
    match mode {
        EntryMode::Pvh => &GDT_32,
        EntryMode::Long64 => &GDT_64,
    }
}

/// Writes the GDT and an empty IDT into guest memory.
pub fn write_gdt_idt(mem: &GuestMemoryMmap, mode: EntryMode) -> Result<(), BootError> {
    let bytes: Vec<u8> = gdt_for(mode).iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(BOOT_GDT_START))
        .and_then(|_| mem.write_obj(0u64, GuestAddress(BOOT_IDT_START)))
        .map_err(BootError::WriteGdtIdt)
}

/// Applies segment, descriptor-table and control registers for `mode` on top of `sregs` (the
/// vCPU's current special registers). `cr3` is the page table root for [`EntryMode::Long64`].
pub fn boot_sregs(mut sregs: kvm_sregs, mode: EntryMode, cr3: u64) -> kvm_sregs {
    let gdt = gdt_for(mode);
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match mode {
        EntryMode::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            sregs.cr3 = 0;
        }
        EntryMode::Long64 => {
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
            sregs.cr3 = cr3;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
    }
    sregs
}

/// x87 control word and SSE control/status at reset values Linux expects.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(state: &kvm_lapic_state, offset: usize) -> u32 {
    let b = &state.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        state.regs[offset + i] = *byte as i8;
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Routes LINT0 to ExtINT (the PIC) and LINT1 to NMI, as the MP table announces.
pub fn configure_lint(state: &mut kvm_lapic_state) {
    let lvt0 = lapic_reg(state, APIC_LVT0);
    set_lapic_reg(state, APIC_LVT0, with_delivery_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(state, APIC_LVT1);
    set_lapic_reg(state, APIC_LVT1, with_delivery_mode(lvt1, APIC_MODE_NMI));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvh_entry_is_flat_protected_mode() {
        let regs = boot_regs(EntryMode::Pvh, 0x100_0000);
        assert_eq!(
            (regs.rip, regs.rbx, regs.rflags),
            (0x100_0000, PVH_INFO_START, 2)
        );
        let s = boot_sregs(kvm_sregs::default(), EntryMode::Pvh, 0);
        assert_eq!(s.cr0, 0x11);
        assert_eq!((s.efer, s.cr4), (0, 0));
        assert_eq!(
            (s.cs.selector, s.cs.db, s.cs.l, s.cs.limit),
            (8, 1, 0, 0xffff_ffff)
        );
        assert_eq!((s.ds.selector, s.ss.selector, s.tr.selector), (16, 16, 24));
        assert_eq!((s.gdt.base, s.gdt.limit), (BOOT_GDT_START, 31));
    }

    #[test]
    fn long_mode_entry() {
        let regs = boot_regs(EntryMode::Long64, 0x100_0200);
        assert_eq!(
            (regs.rip, regs.rsi, regs.rsp),
            (0x100_0200, ZERO_PAGE_START, BOOT_STACK_POINTER)
        );
        let s = boot_sregs(kvm_sregs::default(), EntryMode::Long64, 0x9000);
        assert_eq!(s.cr0 & 0x8000_0001, 0x8000_0001);
        assert_eq!(s.cr3, 0x9000);
        assert_eq!(s.cr4 & 0x20, 0x20);
        assert_eq!(s.efer & 0x500, 0x500);
        assert_eq!((s.cs.l, s.cs.db), (1, 0));
    }

    #[test]
    fn fpu_and_lint() {
        let fpu = boot_fpu();
        assert_eq!((fpu.fcw, fpu.mxcsr), (0x37f, 0x1f80));
        let mut lapic = kvm_lapic_state::default();
        set_lapic_reg(&mut lapic, APIC_LVT0, 0x0001_0700);
        configure_lint(&mut lapic);
        assert_eq!(lapic_reg(&lapic, APIC_LVT0), 0x0001_0700);
        assert_eq!(lapic_reg(&lapic, APIC_LVT1), 0x400);
    }

    #[test]
    fn gdt_and_idt_written() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_gdt_idt(&mem, EntryMode::Long64).unwrap();
        let cs: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(cs, GDT_64[1]);
    }
}
