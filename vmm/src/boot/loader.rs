//! Putting the kernel, the initrd and the command line into guest memory. Kernels are either an
//! ELF `vmlinux` (entered through its PVH note when it has one, else at its 64-bit entry) or a
//! bzImage (64-bit entry at load address + 0x200). The initrd is a list of parts concatenated
//! page-aligned at the top of low RAM.

use super::layout;
use super::params::InitrdInfo;
use super::regs::EntryMode;
use crate::error::VmError;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Cmdline, Elf, KernelLoader, PvhBootCapability};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Offset of `startup_64` from the load address of a bzImage's protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const PAGE: u64 = 4096;

/// One piece of the initrd; the pieces are concatenated in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InitrdPart {
    File(PathBuf),
    Bytes(Vec<u8>),
}

/// What the loader learned about the kernel.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    pub entry: u64,
    pub mode: EntryMode,
    /// First byte past the kernel image (including its bss).
    pub end: u64,
    /// The bzImage setup header, to be copied into the zero page.
    pub setup_header: Option<setup_header>,
    /// The initrd must end at or below this address (the bzImage's `initrd_addr_max` + 1).
    pub initrd_ceiling: u64,
}

fn bad_kernel(path: &Path, reason: impl Into<String>) -> VmError {
    VmError::BadKernel {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Loads the kernel at `path` into `mem`.
/// Checks from its first bytes that `path` is an x86-64 ELF vmlinux or a bzImage (the full
/// check happens when it is loaded).
pub fn check_kernel_file(path: &Path) -> Result<(), VmError> {
    let mut file =
        File::open(path).map_err(|e| bad_kernel(path, format!("cannot open it: {e}")))?;
    let mut head = [0u8; 0x210];
    let mut n = 0;
    while n < head.len() {
        match file.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(bad_kernel(path, format!("cannot read it: {e}"))),
        }
    }
    let head = &head[..n];
    if head.starts_with(b"\x7fELF") {
        // ELFCLASS64 and EM_X86_64 (62).
        return if head.len() >= 20 && head[4] == 2 && head[18] == 62 && head[19] == 0 {
            Ok(())
        } else {
            Err(bad_kernel(
                path,
                "it is an ELF file but not an x86-64 one; pass an x86-64 vmlinux or bzImage",
            ))
        };
    }
    // A bzImage: the boot sector signature and the "HdrS" setup header magic.
    if head.len() >= 0x206 && head[0x1fe..0x200] == [0x55, 0xaa] && &head[0x202..0x206] == b"HdrS" {
        return Ok(());
    }
    Err(bad_kernel(
        path,
        "it is neither an ELF vmlinux nor a bzImage; pass an x86-64 Linux kernel \
         (arch/x86/boot/bzImage or vmlinux)",
    ))
}

pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, VmError> {
    let mut file =
        File::open(path).map_err(|e| bad_kernel(path, format!("cannot open it: {e}")))?;
    let mut magic = [0u8; 4];
    let is_elf = file.read_exact(&mut magic).is_ok() && magic == *b"\x7fELF";
    let mem_mib = mem_size(mem) >> 20;
    if is_elf {
        let r = Elf::load(mem, None, &mut file, Some(GuestAddress(layout::HIMEM_START))).map_err(|e| {
            bad_kernel(path, format!(
                "it looks like an ELF file but is not a loadable x86-64 vmlinux ({e}); \
                 expected an uncompressed vmlinux linked at 1 MiB or above that fits in {mem_mib} MiB"
            ))
        })?;
        let (entry, mode) = match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => (addr.0, EntryMode::Pvh),
            _ => (r.kernel_load.0, EntryMode::Long64),
        };
        return Ok(LoadedKernel {
            entry,
            mode,
            end: r.kernel_end,
            setup_header: None,
            initrd_ceiling: u64::MAX,
        });
    }
    let r = BzImage::load(
        mem,
        None,
        &mut file,
        Some(GuestAddress(layout::HIMEM_START)),
    )
    .map_err(|e| {
        bad_kernel(
            path,
            format!(
                "it is neither an ELF vmlinux nor a bzImage ({e}); pass an x86-64 Linux kernel \
             (arch/x86/boot/bzImage or vmlinux)"
            ),
        )
    })?;
    let hdr = r.setup_header.unwrap_or_default();
    // The decompressor works in place and needs `init_size` bytes from the load address.
    let end = r.kernel_end.max(r.kernel_load.0 + u64::from(hdr.init_size));
    let initrd_ceiling = match hdr.initrd_addr_max {
        0 => u64::MAX,
        max => u64::from(max) + 1,
    };
    Ok(LoadedKernel {
        entry: r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
        mode: EntryMode::Long64,
        end,
        setup_header: r.setup_header,
        initrd_ceiling,
    })
}

fn mem_size(mem: &GuestMemoryMmap) -> u64 {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    mem.iter().map(|r| r.len()).sum()
}

fn part_len(part: &InitrdPart) -> Result<u64, VmError> {
    match part {
        InitrdPart::Bytes(b) => Ok(b.len() as u64),
        InitrdPart::File(p) => std::fs::metadata(p)
            .map(|m| m.len())
            .map_err(|e| VmError::Initrd {
                path: p.clone(),
                reason: format!("cannot read it: {e}"),
            }),
    }
}

/// Where an initrd of `size` bytes goes: page-aligned at the top of low RAM (and below
/// `ceiling`), above `kernel_end`.
pub fn initrd_placement(
    mem_bytes: u64,
    kernel_end: u64,
    size: u64,
    ceiling: u64,
) -> Result<u64, VmError> {
    let low_end = layout::low_ram_end(mem_bytes).min(ceiling);
    let floor = kernel_end.div_ceil(PAGE) * PAGE;
    match low_end.checked_sub(size).map(|a| a & !(PAGE - 1)) {
        Some(addr) if addr >= floor => Ok(addr),
        _ => {
            let needed = floor + size.div_ceil(PAGE) * PAGE;
            Err(VmError::InitrdTooLarge {
                size,
                mem_mib: mem_bytes >> 20,
                needed_mib: needed.div_ceil(1 << 20) + 1,
            })
        }
    }
}

/// Concatenates `parts` into guest memory; `None` when there are no parts or they are all empty.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    parts: &[InitrdPart],
    kernel_end: u64,
    ceiling: u64,
) -> Result<Option<InitrdInfo>, VmError> {
    let mut lens = Vec::with_capacity(parts.len());
    for p in parts {
        lens.push(part_len(p)?);
    }
    let size: u64 = lens.iter().sum();
    if size == 0 {
        return Ok(None);
    }
    let addr = initrd_placement(mem_size(mem), kernel_end, size, ceiling)?;
    let mut at = addr;
    for (part, len) in parts.iter().zip(lens) {
        match part {
            InitrdPart::Bytes(b) => mem.write_slice(b, GuestAddress(at)).map_err(|e| {
                VmError::Memory(format!("cannot copy an in-memory initrd part: {e}"))
            })?,
            InitrdPart::File(p) => {
                let err = |reason: String| VmError::Initrd {
                    path: p.clone(),
                    reason,
                };
                let mut f = File::open(p).map_err(|e| err(format!("cannot open it: {e}")))?;
                mem.read_exact_volatile_from(GuestAddress(at), &mut f, len as usize)
                    .map_err(|e| err(format!("cannot read {len} bytes (did it change?): {e}")))?;
            }
        }
        at += len;
    }
    Ok(Some(InitrdInfo { addr, size }))
}

/// Writes the command line at [`layout::CMDLINE_START`]; returns its length including the NUL.
pub fn load_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<usize, VmError> {
    let mut c =
        Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(|e| VmError::Cmdline(format!("{e}")))?;
    c.insert_str(cmdline).map_err(|e| {
        VmError::Cmdline(format!(
            "{e} (the kernel command line is limited to {} bytes and must be printable ASCII)",
            layout::CMDLINE_MAX_SIZE - 1
        ))
    })?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(layout::CMDLINE_START), &c)
        .map_err(|e| VmError::Cmdline(format!("{e}")))?;
    Ok(c.as_cstring()
        .map(|s| s.as_bytes_with_nul().len())
        .unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(mib: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), (mib << 20) as usize)]).unwrap()
    }

    #[test]
    fn initrd_goes_page_aligned_to_the_top() {
        let addr = initrd_placement(64 << 20, 0x20_0000, 5000, u64::MAX).unwrap();
        assert_eq!(addr, (64 << 20) - 8192);
        let big = initrd_placement(8 << 30, 0x20_0000, 4096, u64::MAX).unwrap();
        assert_eq!(big, layout::MMIO_GAP_START - 4096);
        let capped = initrd_placement(8 << 30, 0x20_0000, 4096, 0x8000_0000).unwrap();
        assert_eq!(capped, 0x8000_0000 - 4096);
    }

    #[test]
    fn initrd_too_large_says_how_much_memory() {
        let err = initrd_placement(64 << 20, 0x40_0000, 70 << 20, u64::MAX).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, VmError::InitrdTooLarge { needed_mib: 75, .. }),
            "{msg}"
        );
        assert!(msg.contains("75 MiB"), "{msg}");
    }

    #[test]
    fn initrd_parts_are_concatenated() {
        let m = mem(32);
        let dir = std::env::temp_dir().join(format!("vmm-initrd-{}", std::process::id()));
        std::fs::write(&dir, b"hello ").unwrap();
        let parts = [
            InitrdPart::File(dir.clone()),
            InitrdPart::Bytes(b"world".to_vec()),
        ];
        let info = load_initrd(&m, &parts, 0x20_0000, u64::MAX)
            .unwrap()
            .unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(info.size, 11);
        assert_eq!(info.addr % 4096, 0);
        let mut back = [0u8; 11];
        m.read_slice(&mut back, GuestAddress(info.addr)).unwrap();
        assert_eq!(&back, b"hello world");
        assert_eq!(load_initrd(&m, &[], 0x20_0000, u64::MAX).unwrap(), None);
    }

    #[test]
    fn not_a_kernel_is_a_clear_error() {
        let m = mem(32);
        let p = std::env::temp_dir().join(format!("vmm-notakernel-{}", std::process::id()));
        std::fs::write(&p, vec![0x55u8; 4096]).unwrap();
        let err = load_kernel(&m, &p).unwrap_err();
        std::fs::remove_file(&p).unwrap();
        let msg = err.to_string();
        assert!(
            msg.contains("vmm-notakernel") && msg.contains("bzImage"),
            "{msg}"
        );
        let missing = load_kernel(&m, Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(missing.to_string().contains("/nonexistent/vmlinux"));
    }

    #[test]
    fn cmdline_is_nul_terminated_and_bounded() {
        let m = mem(32);
        assert_eq!(load_cmdline(&m, "console=ttyS0 quiet").unwrap(), 20);
        let mut back = [0u8; 20];
        m.read_slice(&mut back, GuestAddress(layout::CMDLINE_START))
            .unwrap();
        assert_eq!(&back, b"console=ttyS0 quiet\0");
        assert!(load_cmdline(&m, &"x".repeat(3000)).is_err());
    }
}
