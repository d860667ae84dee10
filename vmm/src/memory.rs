//! Guest RAM: allocating it on the host (anonymous mmap, split around the MMIO gap), handing
//! it to KVM as memory slots, and measuring how much of it is resident.

use crate::boot::layout;
use crate::error::VmError;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
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
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_regions(bytes)
        .into_iter()
        .map(|(base, size)| (GuestAddress(base), size as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| {
        VmError::Memory(format!(
            "could not allocate {mem_mib} MiB of guest RAM ({e}); free host memory or ask for less"
        ))
    })?;
    for region in mem.iter() {
        if let Ok(host) = region.get_host_address(MemoryRegionAddress(0)) {
            // Transparent huge pages where the host allows them: loading the kernel and the
            // appliance then faults once per 2 MiB instead of once per 4 KiB, and KVM can map
            // the guest with large pages. Best effort: a host without THP keeps 4 KiB pages.
            // SAFETY: advice on a live anonymous mapping that `mem` owns; it changes no data.
            unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_HUGEPAGE) };
        }
    }
    Ok(mem)
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

/// How much of guest RAM is resident on the host, in KiB, from the `Rss:` lines of the
/// guest mappings in /proc/self/smaps. Guest pages are not given back while the VM lives, so
/// at the end of a run this is also the guest's share of the process's peak RSS.
pub fn resident_kib(mem: &GuestMemoryMmap) -> Option<u64> {
    let starts: Vec<u64> = mem
        .iter()
        .filter_map(|r| r.get_host_address(MemoryRegionAddress(0)).ok())
        .map(|p| p as u64)
        .collect();
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut total = 0;
    let mut in_guest = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((start, _)) = first.split_once('-') {
            if let Ok(start) = u64::from_str_radix(start, 16) {
                in_guest = starts.contains(&start);
                continue;
            }
        }
        if in_guest {
            if let Some(kib) = line.strip_prefix("Rss:") {
                total += kib
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()?;
            }
        }
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn resident_guest_memory_grows_as_pages_are_touched() {
        let mem = create_guest_memory(64).unwrap();
        let before = resident_kib(&mem).unwrap();
        assert!(
            before < 1024,
            "untouched guest RAM is not resident: {before} KiB"
        );
        let page = [1u8; 4096];
        for i in 0..1024u64 {
            mem.write_slice(&page, GuestAddress(i * 4096)).unwrap();
        }
        let after = resident_kib(&mem).unwrap();
        assert!(after >= before + 4096, "{before} -> {after} KiB");
    }

    #[test]
    fn refuses_tiny_memory() {
        let err = create_guest_memory(8).unwrap_err();
        assert!(err.to_string().contains("32 MiB"), "{err}");
    }

    #[test]
    fn allocates_one_region_for_small_guests() {
        let mem = create_guest_memory(64).unwrap();
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(mem.last_addr(), GuestAddress((64 << 20) - 1));
    }
}
