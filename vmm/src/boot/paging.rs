//! Identity-mapped page tables for the 64-bit entry: the first GiB mapped with 2 MiB pages,
//! which is what Linux's `startup_64` expects to be running on.

use super::error::BootError;
use super::layout::{PDE_START, PDPTE_START, PML4_START};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const PRESENT_WRITABLE: u64 = 0x3;
const PAGE_SIZE_2M: u64 = 0x80;

/// The three table pages as 512-entry arrays: (PML4, PDPT, PD).
pub fn build() -> ([u64; 512], [u64; 512], [u64; 512]) {
    let mut pml4 = [0u64; 512];
    let mut pdpt = [0u64; 512];
    let mut pd = [0u64; 512];
    pml4[0] = PDPTE_START | PRESENT_WRITABLE;
    pdpt[0] = PDE_START | PRESENT_WRITABLE;
    for (i, e) in pd.iter_mut().enumerate() {
        *e = ((i as u64) << 21) | PAGE_SIZE_2M | PRESENT_WRITABLE;
    }
    (pml4, pdpt, pd)
}

/// Writes the tables into guest memory; returns the value for CR3.
pub fn setup(mem: &GuestMemoryMmap) -> Result<u64, BootError> {
    let (pml4, pdpt, pd) = build();
    for (table, at) in [(pml4, PML4_START), (pdpt, PDPTE_START), (pd, PDE_START)] {
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_le_bytes()).collect();
        mem.write_slice(&bytes, GuestAddress(at))
            .map_err(BootError::WritePageTables)?;
    }
    Ok(PML4_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_maps_the_first_gib() {
        let (pml4, pdpt, pd) = build();
        assert_eq!(pml4[0], 0xa003);
        assert_eq!(pdpt[0], 0xb003);
        assert_eq!(pd[0], 0x83);
        assert_eq!(pd[1], 0x20_0083);
        assert_eq!(pd[511], (511 << 21) | 0x83);
        assert!(pml4[1..].iter().chain(&pdpt[1..]).all(|e| *e == 0));
    }

    #[test]
    fn tables_land_in_guest_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert_eq!(setup(&mem).unwrap(), PML4_START);
        let e: u64 = mem.read_obj(GuestAddress(PDE_START + 8 * 3)).unwrap();
        assert_eq!(e, (3 << 21) | 0x83);
    }
}
