//! Guest memory of a restored VM: the snapshot file's memory section mapped copy-on-write
//! (`MAP_PRIVATE`), region by region at the guest addresses recorded in the header. Nothing
//! is read up front; VMs restored from the same file share its page cache, and a page is
//! copied only when a VM writes to it, so no restored VM changes the file or another VM.

use super::format::SnapshotFile;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Why a snapshot's memory could not be mapped.
#[derive(Debug, thiserror::Error)]
pub enum MemoryMapError {
    #[error("mapping snapshot memory region {guest_addr:#x}+{len:#x}: {reason}")]
    Map {
        guest_addr: u64,
        len: u64,
        reason: String,
    },
    #[error("snapshot memory regions do not form a valid guest memory: {0}")]
    Layout(String),
}

/// Maps the memory section of `snapshot` as the guest memory of a new VM: one private
/// file mapping per region, readable and writable, at the region's guest address.
pub fn map_guest_memory(snapshot: &SnapshotFile) -> Result<GuestMemoryMmap, MemoryMapError> {
    let mut regions = Vec::with_capacity(snapshot.memory_regions.len());
    for entry in &snapshot.memory_regions {
        let map_err = |reason: String| MemoryMapError::Map {
            guest_addr: entry.guest_addr,
            len: entry.len,
            reason,
        };
        let len = usize::try_from(entry.len).map_err(|_| map_err("too large".into()))?;
        let mapping = MmapRegion::build(
            Some(FileOffset::from_arc(
                snapshot.file.clone(),
                entry.file_offset,
            )),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| map_err(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(entry.guest_addr))
            .ok_or_else(|| map_err("guest address range overflows".into()))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryMapError::Layout(e.to_string()))
}
