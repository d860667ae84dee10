//! Guest RAM: allocating it on the host (a shared mapping of one memfd, split around the MMIO
//! gap) and handing it to KVM as memory slots.
//!
//! A memfd rather than anonymous memory: the guest's pages then show up as shared memory
//! (`RssShmem`) in the VMM's accounting, so the monitor's own footprint can be told apart from
//! guest RAM, and the file could later back snapshots.

use crate::boot::layout;
use crate::vm::VmError;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use std::fs::File;
use std::os::fd::FromRawFd;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

/// Allocates `mem_mib` MiB of guest RAM laid out by [`layout::ram_regions`].
pub fn create_guest_memory(mem_mib: u32) -> Result<GuestMemoryMmap, VmError> {
    if mem_mib < layout::MIN_MEM_MIB {
        return Err(VmError::MemoryTooSmall {
            mib: mem_mib,
            needed_mib: u64::from(layout::MIN_MEM_MIB),
            what: "the minimum guest size",
        });
    }
    let bytes = u64::from(mem_mib) << 20;
    let alloc_err = |e: String| {
        VmError::Memory(format!(
            "could not allocate {mem_mib} MiB of guest RAM ({e}); free host memory or ask for less"
        ))
    };
    let file = guest_ram_file(bytes).map_err(|e| alloc_err(e.to_string()))?;
    let mut offset = 0u64;
    let mut ranges = Vec::new();
    for (base, size) in layout::ram_regions(bytes) {
        let clone = file.try_clone().map_err(|e| alloc_err(e.to_string()))?;
        ranges.push((
            GuestAddress(base),
            size as usize,
            Some(FileOffset::new(clone, offset)),
        ));
        offset += size;
    }
    GuestMemoryMmap::from_ranges_with_files(&ranges).map_err(|e| alloc_err(e.to_string()))
}

/// An anonymous memory file of `bytes` bytes backing guest RAM.
fn guest_ram_file(bytes: u64) -> std::io::Result<File> {
    // SAFETY: memfd_create takes a NUL-terminated name and flags and returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"bootbox-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(bytes)?;
    Ok(file)
}

/// Registers every RAM region of `mem` as a KVM memory slot.
pub fn register_with_kvm(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| VmError::Memory(format!("guest RAM region has no host mapping: {e}")))?;
        let kvm_region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mmap owned by `mem`, which the VM keeps alive (the Vm
        // struct owns a clone) for as long as the VM fd exists; the slots do not overlap.
        unsafe { vm.set_user_memory_region(kvm_region) }
            .map_err(|e| VmError::Memory(format!("KVM refused guest RAM slot {slot}: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_tiny_memory() {
        let err = create_guest_memory(8).unwrap_err();
        assert!(err.to_string().contains("32 MiB"), "{err}");
    }

    #[test]
    fn guest_ram_is_a_shared_memfd_mapping() {
        let mem = create_guest_memory(64).unwrap();
        let host = mem
            .iter()
            .next()
            .unwrap()
            .get_host_address(MemoryRegionAddress(0))
            .unwrap() as usize;
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let line = maps
            .lines()
            .find(|l| {
                let (range, _) = l.split_once(' ').unwrap();
                let (a, b) = range.split_once('-').unwrap();
                let (a, b) = (
                    usize::from_str_radix(a, 16).unwrap(),
                    usize::from_str_radix(b, 16).unwrap(),
                );
                (a..b).contains(&host)
            })
            .expect("guest RAM is mapped");
        assert!(line.contains("memfd:bootbox-guest-ram"), "{line}");
        assert!(
            line.split_whitespace().nth(1).unwrap().ends_with('s'),
            "not shared: {line}"
        );
    }

    #[test]
    fn allocates_one_region_for_small_guests() {
        let mem = create_guest_memory(64).unwrap();
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(mem.last_addr(), GuestAddress((64 << 20) - 1));
    }
}
