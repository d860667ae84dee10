//! The guest-physical memory map bootbox gives every VM: where the boot structures, the kernel,
//! the initrd and the device windows live. Only constants and pure address arithmetic.

/// GDT used while entering the kernel.
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty IDT (the kernel installs its own before enabling interrupts).
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (one entry: the initrd).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map (e820-like entries).
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Maximum number of PVH memory map entries that fit below the zero page.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = 32;
/// Linux zero page (`struct boot_params`) for the 64-bit boot protocol.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables: PML4, PDPT and one page directory (2 MiB pages, first GiB).
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Linux/x86 `COMMAND_LINE_SIZE` including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the EBDA; the MP table lives here, everything up to 1 MiB is reserved.
pub const EBDA_START: u64 = 0x9fc00;
/// The MP floating pointer and configuration table.
pub const MPTABLE_START: u64 = EBDA_START;
/// End of the legacy area (VGA, BIOS) and start of the kernel's memory.
pub const HIMEM_START: u64 = 0x10_0000;
/// Where kernels are loaded (bzImage) and where vmlinux expects to be (its p_paddr).
pub const KERNEL_START: u64 = HIMEM_START;

/// Size of the hole below 4 GiB kept free of RAM for device MMIO, IOAPIC and LAPIC.
pub const MMIO_GAP_SIZE: u64 = 768 << 20;
/// First address past 32 bits.
pub const FIRST_ADDR_PAST_32BITS: u64 = 1 << 32;
/// Start of the MMIO gap (0xd000_0000); RAM above this continues at 4 GiB.
pub const MMIO_GAP_START: u64 = FIRST_ADDR_PAST_32BITS - MMIO_GAP_SIZE;
/// First virtio-mmio device window.
pub const VIRTIO_MMIO_BASE: u64 = MMIO_GAP_START;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// How many virtio-mmio slots we hand out (GSIs 5..=23 on the IOAPIC).
pub const VIRTIO_MMIO_MAX_DEVICES: u32 = 19;
/// GSI of virtio-mmio device 0; device n uses `VIRTIO_FIRST_GSI + n`.
pub const VIRTIO_FIRST_GSI: u32 = 5;
/// The IOAPIC and the local APIC (fixed by the architecture).
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's three-page TSS area and the identity-map page (needed on Intel without unrestricted
/// guest); both sit in the MMIO gap, below the BIOS ROM area.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Legacy port I/O devices.
pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_LEN: u64 = 8;
pub const COM1_GSI: u32 = 4;
pub const I8042_DATA_PORT: u64 = 0x60;
pub const I8042_COMMAND_PORT: u64 = 0x64;
/// bootbox's exit port: one byte, the guest's exit status (see `guest_abi`).
pub const EXIT_PORT: u64 = guest_abi::EXIT_PORT as u64;
/// bootbox's phase port: one byte, a phase id (see `guest_abi`).
pub const PHASE_PORT: u64 = guest_abi::PHASE_PORT as u64;

/// Smallest guest we agree to build.
pub const MIN_MEM_MIB: u32 = 32;
/// vCPUs the MP table has room for (it must fit between the EBDA start and 0xa0000).
pub const MAX_VCPUS: u8 = 32;

/// Base address and GSI of virtio-mmio slot `n`.
pub fn virtio_mmio_slot(n: u32) -> Option<(u64, u32)> {
    (n < VIRTIO_MMIO_MAX_DEVICES).then(|| {
        (
            VIRTIO_MMIO_BASE + u64::from(n) * VIRTIO_MMIO_SIZE,
            VIRTIO_FIRST_GSI + n,
        )
    })
}

/// The RAM regions `(guest address, size)` for `mem_bytes` of RAM: one region when it fits
/// below the MMIO gap, otherwise split around the gap with the rest starting at 4 GiB.
pub fn ram_regions(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(0, mem_bytes)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (FIRST_ADDR_PAST_32BITS, mem_bytes - MMIO_GAP_START),
        ]
    }
}

/// End (exclusive) of RAM below the MMIO gap.
pub fn low_ram_end(mem_bytes: u64) -> u64 {
    mem_bytes.min(MMIO_GAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_region() {
        assert_eq!(ram_regions(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(ram_regions(MMIO_GAP_START), vec![(0, MMIO_GAP_START)]);
        assert_eq!(low_ram_end(128 << 20), 128 << 20);
    }

    #[test]
    fn large_memory_is_split_around_the_gap() {
        let four_g = 4u64 << 30;
        let r = ram_regions(four_g);
        assert_eq!(r, vec![(0, 0xd000_0000), (1 << 32, four_g - 0xd000_0000)]);
        assert_eq!(r.iter().map(|x| x.1).sum::<u64>(), four_g);
        assert_eq!(low_ram_end(four_g), 0xd000_0000);
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let mut areas = [
            (BOOT_GDT_START, 0x20),
            (BOOT_IDT_START, 8),
            (PVH_INFO_START, 0x40),
            (PVH_MODLIST_START, 0x20),
            (PVH_MEMMAP_START, 24 * PVH_MEMMAP_MAX_ENTRIES as u64),
            (ZERO_PAGE_START, 0x1000),
            (BOOT_STACK_POINTER - 0x800, 0x800),
            (PML4_START, 0x1000),
            (PDPTE_START, 0x1000),
            (PDE_START, 0x1000),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
            (MPTABLE_START, 0x400),
        ];
        areas.sort();
        for w in areas.windows(2) {
            assert!(
                w[0].0 + w[0].1 <= w[1].0,
                "{:x?} overlaps {:x?}",
                w[0],
                w[1]
            );
        }
        const { assert!(MPTABLE_START + 0x400 <= 0xa0000) };
    }

    #[test]
    fn virtio_slots_sit_in_the_gap_below_the_ioapic() {
        assert_eq!(virtio_mmio_slot(0), Some((0xd000_0000, 5)));
        assert_eq!(virtio_mmio_slot(2), Some((0xd000_2000, 7)));
        let (last, gsi) = virtio_mmio_slot(VIRTIO_MMIO_MAX_DEVICES - 1).unwrap();
        assert_eq!(gsi, 23);
        assert!(last + VIRTIO_MMIO_SIZE <= IOAPIC_START);
        assert_eq!(virtio_mmio_slot(VIRTIO_MMIO_MAX_DEVICES), None);
    }
}
