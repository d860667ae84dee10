//! The memory map (e820) and the two boot-information blocks a kernel can be handed: the Linux
//! zero page (`boot_params`, 64-bit and bzImage boot) and the PVH `hvm_start_info`.

use super::error::BootError;
use super::layout;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// Boot loader type "undefined" (we are not one of the registered loaders).
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// One entry of the guest's physical memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The memory map for `mem_bytes` of RAM: conventional memory up to the EBDA, the reserved
/// EBDA/BIOS area up to 1 MiB, RAM from 1 MiB to the MMIO gap, and RAM above 4 GiB if any.
pub fn e820_map(mem_bytes: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: layout::EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: layout::EBDA_START,
            size: layout::HIMEM_START - layout::EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    for (base, size) in layout::ram_regions(mem_bytes) {
        let (start, len) = if base == 0 {
            (
                layout::HIMEM_START,
                size.saturating_sub(layout::HIMEM_START),
            )
        } else {
            (base, size)
        };
        if len > 0 {
            map.push(E820Entry {
                addr: start,
                size: len,
                kind: E820_RAM,
            });
        }
    }
    map
}

/// Where the initrd ended up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdInfo {
    pub addr: u64,
    pub size: u64,
}

/// Builds the Linux zero page. `header` is the bzImage setup header when booting a bzImage.
pub fn build_zero_page(
    header: Option<setup_header>,
    cmdline_len_with_nul: usize,
    initrd: Option<InitrdInfo>,
    e820: &[E820Entry],
) -> Result<boot_params, BootError> {
    let mut params = boot_params {
        hdr: header.unwrap_or_default(),
        ..Default::default()
    };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len_with_nul.saturating_sub(1) as u32;
    if let Some(rd) = initrd {
        params.hdr.ramdisk_image =
            u32::try_from(rd.addr).map_err(|_| BootError::InitrdAbove4GiB(rd.addr))?;
        params.hdr.ramdisk_size =
            u32::try_from(rd.size).map_err(|_| BootError::InitrdOver4GiB(rd.size))?;
    }
    if e820.len() > params.e820_table.len() {
        return Err(BootError::ZeroPageE820Full(e820.len()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = e820.len() as u8;
    Ok(params)
}

/// Writes the zero page at [`layout::ZERO_PAGE_START`].
pub fn write_zero_page(mem: &GuestMemoryMmap, params: &boot_params) -> Result<(), BootError> {
    mem.write_obj(*params, GuestAddress(layout::ZERO_PAGE_START))
        .map_err(BootError::WriteZeroPage)
}

#[repr(transparent)]
#[derive(Clone, Copy, Default)]
struct StartInfo(hvm_start_info);
// SAFETY: hvm_start_info is a repr(C) struct of integers with no implicit padding holes that
// could expose uninitialised bytes (u32/u64 fields laid out naturally); any bit pattern is valid.
unsafe impl ByteValued for StartInfo {}

#[repr(transparent)]
#[derive(Clone, Copy, Default)]
struct ModlistEntry(hvm_modlist_entry);
// SAFETY: repr(C), four u64 fields, any bit pattern valid.
unsafe impl ByteValued for ModlistEntry {}

#[repr(transparent)]
#[derive(Clone, Copy, Default)]
struct MemmapEntry(hvm_memmap_table_entry);
// SAFETY: repr(C), two u64 and two u32 fields (24 bytes, no padding), any bit pattern valid.
unsafe impl ByteValued for MemmapEntry {}

/// Builds the PVH start info (version 1, with memory map) without writing it.
pub fn build_pvh_start_info(initrd: Option<InitrdInfo>, e820_len: usize) -> hvm_start_info {
    hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: layout::CMDLINE_START,
        nr_modules: u32::from(initrd.is_some()),
        modlist_paddr: if initrd.is_some() {
            layout::PVH_MODLIST_START
        } else {
            0
        },
        memmap_paddr: layout::PVH_MEMMAP_START,
        memmap_entries: e820_len as u32,
        ..Default::default()
    }
}

/// Writes the PVH start info, its module list (the initrd) and its memory map.
pub fn write_pvh(
    mem: &GuestMemoryMmap,
    initrd: Option<InitrdInfo>,
    e820: &[E820Entry],
) -> Result<(), BootError> {
    if e820.len() > layout::PVH_MEMMAP_MAX_ENTRIES {
        return Err(BootError::PvhMemmapFull(e820.len()));
    }
    let info = build_pvh_start_info(initrd, e820.len());
    let err = BootError::WritePvh;
    mem.write_obj(StartInfo(info), GuestAddress(layout::PVH_INFO_START))
        .map_err(err)?;
    if let Some(rd) = initrd {
        let module = hvm_modlist_entry {
            paddr: rd.addr,
            size: rd.size,
            ..Default::default()
        };
        mem.write_obj(
            ModlistEntry(module),
            GuestAddress(layout::PVH_MODLIST_START),
        )
        .map_err(err)?;
    }
    for (i, e) in e820.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        };
        let at = layout::PVH_MEMMAP_START + (i * std::mem::size_of::<MemmapEntry>()) as u64;
        mem.write_obj(MemmapEntry(entry), GuestAddress(at))
            .map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_for_small_guest() {
        let map = e820_map(128 << 20);
        assert_eq!(
            map,
            vec![
                E820Entry {
                    addr: 0,
                    size: 0x9fc00,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: 0x9fc00,
                    size: 0x100000 - 0x9fc00,
                    kind: E820_RESERVED
                },
                E820Entry {
                    addr: 0x100000,
                    size: (128 << 20) - 0x100000,
                    kind: E820_RAM
                },
            ]
        );
    }

    #[test]
    fn e820_respects_the_mmio_gap() {
        let map = e820_map(4 << 30);
        assert_eq!(map.len(), 4);
        assert_eq!(map[2].addr + map[2].size, layout::MMIO_GAP_START);
        assert_eq!(map[3].addr, 1 << 32);
        assert_eq!(map[3].size, (4 << 30) - layout::MMIO_GAP_START);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (4 << 30) - (layout::HIMEM_START - layout::EBDA_START));
    }

    #[test]
    fn zero_page_fields() {
        let e820 = e820_map(64 << 20);
        let rd = InitrdInfo {
            addr: 0x3f0_0000,
            size: 0x1234,
        };
        let p = build_zero_page(None, 11, Some(rd), &e820).unwrap();
        let hdr = p.hdr;
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!({ hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ hdr.cmdline_size }, 10);
        assert_eq!({ hdr.ramdisk_image }, 0x3f0_0000);
        assert_eq!({ hdr.ramdisk_size }, 0x1234);
        assert_eq!(p.e820_entries, 3);
        let last = p.e820_table[2];
        assert_eq!(
            (last.addr, last.size, last.r#type),
            (0x100000, (64 << 20) - 0x100000, 1)
        );
    }

    #[test]
    fn zero_page_keeps_the_bzimage_header() {
        let header = setup_header {
            setup_sects: 27,
            version: 0x20f,
            ..Default::default()
        };
        let p = build_zero_page(Some(header), 1, None, &e820_map(64 << 20)).unwrap();
        let hdr = p.hdr;
        assert_eq!(({ hdr.setup_sects }, { hdr.version }), (27, 0x20f));
        assert_eq!(({ hdr.ramdisk_image }, { hdr.ramdisk_size }), (0, 0));
    }

    #[test]
    fn pvh_start_info_and_memmap_in_guest_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let e820 = e820_map(64 << 20);
        let rd = InitrdInfo {
            addr: 0x300_0000,
            size: 4096,
        };
        write_pvh(&mem, Some(rd), &e820).unwrap();
        let info: StartInfo = mem.read_obj(GuestAddress(layout::PVH_INFO_START)).unwrap();
        let info = info.0;
        assert_eq!(info.magic, 0x336e_c578);
        assert_eq!(info.version, 1);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.memmap_entries, 3);
        assert_eq!(info.cmdline_paddr, layout::CMDLINE_START);
        let m: ModlistEntry = mem
            .read_obj(GuestAddress(layout::PVH_MODLIST_START))
            .unwrap();
        assert_eq!((m.0.paddr, m.0.size), (0x300_0000, 4096));
        let e: MemmapEntry = mem
            .read_obj(GuestAddress(layout::PVH_MEMMAP_START + 48))
            .unwrap();
        assert_eq!((e.0.addr, e.0.type_), (0x100000, E820_RAM));
    }
}
