//! Copying an ELF kernel and the initrd into guest memory on two threads, started before the VM
//! exists: [`Preload::start`] reads the kernel's ELF headers, places the initrd, opens the
//! files and starts a loader thread on the copies (which waits for [`Preload::release`]);
//! [`Preload::planned`] says where everything goes before it is there, so the boot structures
//! and vCPUs can be set up meanwhile; [`Preload::finish`] lends the calling thread to what is
//! left and waits for the loader.
//!
//! Guest RAM asks for transparent huge pages, so much of a copy's cost is the host kernel
//! zeroing each 2 MiB page on its first touch, then the copy itself (13 MB of kernel segments
//! and a 20-30 MB appliance). The work is cut into 2 MiB pieces that both threads take in
//! turn. The loader thread is started and confined while the VM is created, and released once
//! the VM's KVM objects exist (KVM's memory-slot and irqchip calls wait while the process
//! faults memory in). The first 2 MiB of RAM (boot structures, command line) is faulted in as
//! well, so writing them costs nothing.
//!
//! Only what the parallel copy needs is checked here. Anything it does not take (a bzImage, an
//! ELF file this reader refuses, an initrd part that cannot be opened or does not fit) makes
//! [`Preload::start`] return `None`, and the caller loads serially with [`super::loader`],
//! whose errors are the canonical ones.

use super::layout;
use super::loader::{InitrdPart, LoadedKernel};
use super::params::InitrdInfo;
use super::regs::EntryMode;
use crate::error::VmError;
use crate::sandbox::{self, ThreadRole};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// The size of one piece of work: one transparent huge page of guest RAM.
const PIECE: u64 = 2 << 20;
/// ELF: program header type of a loadable segment and of a note segment.
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
/// The Xen note that holds a PVH kernel's 32-bit entry point.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// A note segment larger than this is not a kernel's (the loader falls back to the serial path).
const MAX_NOTES: u64 = 1 << 20;

/// One piece of work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Work {
    /// Copy `len` bytes at `offset` of file `file` to guest address `addr`.
    Copy {
        file: usize,
        offset: u64,
        addr: u64,
        len: u64,
    },
    /// Fault in `len` bytes of guest RAM at `addr` (best effort).
    Touch { addr: u64, len: u64 },
}

/// Whose bytes a file holds, for error messages.
enum Origin {
    Kernel(PathBuf),
    Initrd { path: PathBuf, len: u64 },
}

impl Origin {
    fn read_error(&self, e: std::io::Error) -> VmError {
        match self {
            Origin::Kernel(path) => VmError::BadKernel {
                path: path.clone(),
                reason: if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    "it ends before the segments its program headers list (a cut-short copy?)"
                        .to_string()
                } else {
                    format!("cannot read it: {e}")
                },
            },
            Origin::Initrd { path, len } => VmError::Initrd {
                path: path.clone(),
                reason: format!("cannot read {len} bytes (did it change?): {e}"),
            },
        }
    }
}

/// What both threads share: the memory, the open files, the work list and the first error.
struct Shared {
    mem: GuestMemoryMmap,
    files: Vec<(File, Origin)>,
    work: Vec<Work>,
    next: AtomicUsize,
    stop: AtomicBool,
    /// Set by [`Preload::release`]: the loader waits for it before its first piece.
    go: AtomicBool,
    failed: Mutex<Option<VmError>>,
}

impl Shared {
    /// Takes pieces until none is left (or one failed, or the preload was dropped).
    fn run(&self) {
        while !self.stop.load(Ordering::Relaxed) {
            let Some(&piece) = self.work.get(self.next.fetch_add(1, Ordering::Relaxed)) else {
                return;
            };
            if let Err(e) = self.execute(piece) {
                self.stop.store(true, Ordering::Relaxed);
                let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
                failed.get_or_insert(e);
            }
        }
    }

    fn execute(&self, piece: Work) -> Result<(), VmError> {
        match piece {
            Work::Touch { addr, len } => {
                if let Ok(slice) = self.mem.get_slice(GuestAddress(addr), len as usize) {
                    let ptr = slice.ptr_guard_mut();
                    // SAFETY: advice on guest RAM that `self.mem` keeps mapped; faulting pages
                    // in changes no data. Kernels without MADV_POPULATE_WRITE refuse it, which
                    // only costs the fault later.
                    unsafe {
                        libc::madvise(ptr.as_ptr().cast(), len as usize, libc::MADV_POPULATE_WRITE)
                    };
                }
                Ok(())
            }
            Work::Copy {
                file,
                offset,
                addr,
                len,
            } => {
                let (file, origin) = &self.files[file];
                let slice = self
                    .mem
                    .get_slice(GuestAddress(addr), len as usize)
                    .map_err(|e| VmError::Memory(format!("cannot reach {addr:#x}: {e}")))?;
                let ptr = slice.ptr_guard_mut();
                let mut done = 0u64;
                while done < len {
                    let at = libc::off_t::try_from(offset + done).map_err(|_| {
                        origin.read_error(std::io::Error::from(std::io::ErrorKind::InvalidInput))
                    })?;
                    // SAFETY: `ptr` points at `len` bytes of guest RAM that `self.mem` keeps
                    // mapped (checked by get_slice); pread writes at most `len - done` bytes
                    // from `done` on. Guest RAM is plain memory no Rust reference covers.
                    let n = unsafe {
                        libc::pread(
                            file.as_raw_fd(),
                            ptr.as_ptr().add(done as usize).cast(),
                            (len - done) as usize,
                            at,
                        )
                    };
                    match n {
                        0 => {
                            return Err(origin.read_error(std::io::Error::from(
                                std::io::ErrorKind::UnexpectedEof,
                            )))
                        }
                        n if n > 0 => done += n as u64,
                        _ => {
                            let e = std::io::Error::last_os_error();
                            if e.kind() != std::io::ErrorKind::Interrupted {
                                return Err(origin.read_error(e));
                            }
                        }
                    }
                }
                Ok(())
            }
        }
    }
}

/// The loads in flight (see the module docs).
pub struct Preload {
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
    kernel: LoadedKernel,
    initrd: Option<InitrdInfo>,
    /// The in-memory initrd parts' places: (index in the part list, guest address).
    bytes_at: Vec<(usize, u64)>,
}

impl Preload {
    /// Plans the copies of `kernel` and `initrd` into `mem` and starts the loader thread on
    /// them. `None` when the serial loader must do it (see the module docs).
    pub fn start(mem: &GuestMemoryMmap, kernel: &Path, initrd: &[InitrdPart]) -> Option<Preload> {
        let kernel_file = File::open(kernel).ok()?;
        let elf = read_elf(&kernel_file, mem)?;
        let mut files = vec![(kernel_file, Origin::Kernel(kernel.to_path_buf()))];
        let mut work = vec![Work::Touch {
            addr: 0,
            len: PIECE,
        }];
        for s in &elf.segments {
            pieces(&mut work, 0, s.offset, s.addr, s.len);
        }

        // The initrd: sizes first (from the open files), then its place, then the pieces.
        let mut sized = Vec::with_capacity(initrd.len());
        for part in initrd {
            match part {
                InitrdPart::Bytes(b) => sized.push((None, b.len() as u64)),
                InitrdPart::File(path) => {
                    let f = File::open(path).ok()?;
                    let len = f.metadata().ok()?.len();
                    sized.push((Some((f, path.clone())), len));
                }
            }
        }
        let size: u64 = sized.iter().map(|(_, len)| len).sum();
        let mut bytes_at = Vec::new();
        let initrd_info = if size == 0 {
            None
        } else {
            let addr = super::loader::initrd_placement(
                mem_bytes(mem),
                elf.kernel.end,
                size,
                elf.kernel.initrd_ceiling,
            )
            .ok()?;
            let mut at = addr;
            for (index, (file, len)) in sized.into_iter().enumerate() {
                match file {
                    Some((f, path)) => {
                        files.push((f, Origin::Initrd { path, len }));
                        pieces(&mut work, files.len() - 1, 0, at, len);
                    }
                    None => bytes_at.push((index, at)),
                }
                at += len;
            }
            Some(InitrdInfo { addr, size })
        };

        let shared = Arc::new(Shared {
            mem: mem.clone(),
            files,
            work,
            next: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            go: AtomicBool::new(false),
            failed: Mutex::new(None),
        });
        let for_worker = shared.clone();
        // Without a loader thread the calling thread does all the work in `finish`.
        let worker = std::thread::Builder::new()
            .name("loader".into())
            .spawn(move || {
                sandbox::enter_thread(ThreadRole::Loader);
                while !for_worker.go.load(Ordering::Acquire) {
                    std::thread::park();
                }
                for_worker.run();
            })
            .ok();
        Some(Preload {
            shared,
            worker,
            kernel: elf.kernel,
            initrd: initrd_info,
            bytes_at,
        })
    }

    /// Where the kernel and initrd go (known before they are copied).
    pub fn planned(&self) -> (LoadedKernel, Option<InitrdInfo>) {
        (self.kernel, self.initrd)
    }

    /// Lets the loader start copying. Until then it only waits: the caller releases it once
    /// the VM's KVM objects exist, because KVM's memory-slot and irqchip calls wait several
    /// milliseconds while another thread of the process faults in guest memory.
    pub fn release(&self) {
        self.shared.go.store(true, Ordering::Release);
        if let Some(worker) = &self.worker {
            worker.thread().unpark();
        }
    }

    /// Does the work that is left on the calling thread, waits for the loader, and writes the
    /// in-memory initrd parts (`parts` is the list given to [`Preload::start`]).
    pub fn finish(mut self, parts: &[InitrdPart]) -> Result<(), VmError> {
        self.release();
        self.shared.run();
        if let Some(worker) = self.worker.take() {
            worker
                .join()
                .map_err(|_| VmError::Thread("the kernel loader thread panicked".into()))?;
        }
        let failed = self
            .shared
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(e) = failed {
            return Err(e);
        }
        for &(index, addr) in &self.bytes_at {
            if let Some(InitrdPart::Bytes(b)) = parts.get(index) {
                self.shared
                    .mem
                    .write_slice(b, GuestAddress(addr))
                    .map_err(|e| {
                        VmError::Memory(format!("cannot copy an in-memory initrd part: {e}"))
                    })?;
            }
        }
        Ok(())
    }
}

impl Drop for Preload {
    /// A VM dropped before it was loaded: the loader stops after its current piece.
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.release();
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

/// Appends the pieces of copying `len` bytes at `offset` of file `file` to guest `addr`, cut at
/// 2 MiB guest boundaries.
fn pieces(work: &mut Vec<Work>, file: usize, offset: u64, addr: u64, len: u64) {
    let mut done = 0;
    while done < len {
        let at = addr + done;
        let n = (PIECE - at % PIECE).min(len - done);
        work.push(Work::Copy {
            file,
            offset: offset + done,
            addr: at,
            len: n,
        });
        done += n;
    }
}

fn mem_bytes(mem: &GuestMemoryMmap) -> u64 {
    use vm_memory::GuestMemoryRegion;
    mem.iter().map(|r| r.len()).sum()
}

/// The file bytes of one loadable segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    offset: u64,
    addr: u64,
    len: u64,
}

/// What the ELF headers say: where to enter, where the image ends, what to copy where.
struct ElfKernel {
    kernel: LoadedKernel,
    segments: Vec<Segment>,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

/// Reads an x86-64 ELF kernel's headers: what linux-loader's ELF loader would load, with the
/// same entry (the PVH note's when there is one) and end. `None` for anything else.
fn read_elf(file: &File, mem: &GuestMemoryMmap) -> Option<ElfKernel> {
    let mut ehdr = [0u8; 64];
    file.read_exact_at(&mut ehdr, 0).ok()?;
    // Magic, 64-bit, little-endian, x86-64, 56-byte program headers after the ELF header.
    let ok = ehdr.starts_with(b"\x7fELF")
        && ehdr[4] == 2
        && ehdr[5] == 1
        && u16_at(&ehdr, 18) == 62
        && u16_at(&ehdr, 54) == 56;
    let entry = u64_at(&ehdr, 24);
    let phoff = u64_at(&ehdr, 32);
    if !ok || phoff < 64 || entry < layout::HIMEM_START {
        return None;
    }
    let phnum = usize::from(u16_at(&ehdr, 56));
    let mut phdrs = vec![0u8; phnum * 56];
    file.read_exact_at(&mut phdrs, phoff).ok()?;
    let mut segments = Vec::new();
    let mut end = 0u64;
    let mut pvh = None;
    for ph in phdrs.chunks_exact(56) {
        let (kind, offset) = (u32_at(ph, 0), u64_at(ph, 8));
        let (addr, filesz, memsz) = (u64_at(ph, 24), u64_at(ph, 32), u64_at(ph, 40));
        if kind == PT_NOTE {
            // As linux-loader: the last note segment decides.
            pvh = pvh_entry(file, offset, filesz)?;
        }
        if kind != PT_LOAD || filesz == 0 {
            continue;
        }
        // The segment's file bytes must lie in one region of guest RAM, at or above 1 MiB:
        // the boot structures below are written while the copies run.
        if addr < layout::HIMEM_START {
            return None;
        }
        let len = usize::try_from(filesz).ok()?;
        mem.get_slice(GuestAddress(addr), len).ok()?;
        end = end.max(addr.checked_add(memsz)?);
        let overlaps = segments
            .iter()
            .any(|s: &Segment| addr < s.addr + s.len && s.addr < addr + filesz);
        if overlaps {
            return None;
        }
        segments.push(Segment {
            offset,
            addr,
            len: filesz,
        });
    }
    let (entry, mode) = match pvh {
        Some(addr) => (addr, EntryMode::Pvh),
        None => (entry, EntryMode::Long64),
    };
    Some(ElfKernel {
        kernel: LoadedKernel {
            entry,
            mode,
            end,
            setup_header: None,
            initrd_ceiling: u64::MAX,
        },
        segments,
    })
}

/// The PVH entry point in the note segment at `offset`: `Some(None)` when there is none,
/// `None` when the notes cannot be read.
fn pvh_entry(file: &File, offset: u64, len: u64) -> Option<Option<u64>> {
    if len > MAX_NOTES {
        return None;
    }
    let mut notes = vec![0u8; len as usize];
    file.read_exact_at(&mut notes, offset).ok()?;
    let mut at = 0usize;
    while at + 12 <= notes.len() {
        let namesz = u32_at(&notes, at) as usize;
        let descsz = u32_at(&notes, at + 4) as usize;
        let kind = u32_at(&notes, at + 8);
        let name = at + 12;
        let desc = name.checked_add(namesz.next_multiple_of(4))?;
        if kind == XEN_ELFNOTE_PHYS32_ENTRY && notes.get(name..name + namesz) == Some(b"Xen\0") {
            if descsz < 4 {
                return None;
            }
            return Some(Some(u64::from(u32_at(notes.get(desc..desc + 4)?, 0))));
        }
        at = desc.checked_add(descsz.next_multiple_of(4))?;
    }
    Some(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// An x86-64 ELF image: `segments` are (guest address, bytes, bss bytes) loaded from file
    /// offsets 0x1000 on; `pvh` adds a Xen PHYS32_ENTRY note (after an unrelated note).
    fn elf_image(entry: u64, segments: &[(u64, Vec<u8>, u64)], pvh: Option<u32>) -> Vec<u8> {
        let mut notes = Vec::new();
        for (kind, name, desc) in [
            (1u32, &b"GNU\0"[..], vec![7u8; 5]),
            (
                XEN_ELFNOTE_PHYS32_ENTRY,
                b"Xen\0",
                pvh.unwrap_or(0).to_le_bytes().to_vec(),
            ),
        ] {
            if kind == XEN_ELFNOTE_PHYS32_ENTRY && pvh.is_none() {
                continue;
            }
            for v in [name.len() as u32, desc.len() as u32, kind] {
                notes.extend_from_slice(&v.to_le_bytes());
            }
            notes.extend_from_slice(name);
            notes.resize(notes.len().next_multiple_of(4), 0);
            notes.extend_from_slice(&desc);
            notes.resize(notes.len().next_multiple_of(4), 0);
        }
        let mut headers = Vec::new();
        let mut body = Vec::new();
        let mut offset = 0x1000u64;
        for (addr, bytes, bss) in segments {
            let len = bytes.len() as u64;
            for v in [
                u64::from(PT_LOAD) | (5 << 32),
                offset,
                *addr,
                *addr,
                len,
                len + bss,
                0x1000,
            ] {
                headers.extend_from_slice(&v.to_le_bytes());
            }
            body.push((offset, bytes));
            offset = (offset + len).next_multiple_of(0x1000);
        }
        let note_offset = 0x800u64;
        let note_len = notes.len() as u64;
        for v in [
            u64::from(PT_NOTE) | (4 << 32),
            note_offset,
            0,
            0,
            note_len,
            note_len,
            4,
        ] {
            headers.extend_from_slice(&v.to_le_bytes());
        }
        let phnum = (headers.len() / 56) as u16;
        let mut f = b"\x7fELF\x02\x01\x01".to_vec();
        f.resize(16, 0);
        f.extend_from_slice(&2u16.to_le_bytes());
        f.extend_from_slice(&62u16.to_le_bytes());
        f.extend_from_slice(&1u32.to_le_bytes());
        for v in [entry, 64, 0] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        f.extend_from_slice(&0u32.to_le_bytes());
        for v in [64u16, 56, phnum, 64, 0, 0] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        f.extend_from_slice(&headers);
        f.resize(note_offset as usize, 0);
        f.extend_from_slice(&notes);
        for (offset, bytes) in body {
            f.resize(offset as usize, 0);
            f.extend_from_slice(bytes);
        }
        f
    }

    /// Bytes that differ from page to page and from a zeroed page.
    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed)
            .collect()
    }

    fn temp(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    fn guest_memory() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
    }

    fn contents(mem: &GuestMemoryMmap) -> Vec<u8> {
        let mut all = vec![0u8; 64 << 20];
        mem.read_slice(&mut all, GuestAddress(0)).unwrap();
        all
    }

    /// The parallel load leaves memory, entry, end and initrd place exactly as the serial one.
    #[test]
    fn preloading_matches_the_serial_loader() {
        for pvh in [None, Some(0x10_0040)] {
            let segments = [
                (0x10_0000, pattern((5 << 20) + 123, 1), 0x3000),
                (0x80_0000, pattern(0x2345, 2), 0x20_0000),
            ];
            let kernel = temp(&elf_image(0x10_0000, &segments, pvh));
            let appliance = temp(&pattern((3 << 20) + 77, 3));
            let parts = [
                InitrdPart::File(appliance.path().to_path_buf()),
                InitrdPart::Bytes(pattern(999, 4)),
            ];

            let parallel = guest_memory();
            let preload = Preload::start(&parallel, kernel.path(), &parts).expect("an ELF kernel");
            let (k, initrd) = preload.planned();
            preload.finish(&parts).unwrap();

            let serial = guest_memory();
            let expected = super::super::loader::load_kernel(&serial, kernel.path()).unwrap();
            let expected_initrd = super::super::loader::load_initrd(
                &serial,
                &parts,
                expected.end,
                expected.initrd_ceiling,
            )
            .unwrap();
            assert_eq!(
                (k.entry, k.mode, k.end, k.initrd_ceiling),
                (
                    expected.entry,
                    expected.mode,
                    expected.end,
                    expected.initrd_ceiling
                ),
                "PVH entry {pvh:?}"
            );
            assert_eq!(k.mode == EntryMode::Pvh, pvh.is_some());
            assert_eq!(initrd, expected_initrd);
            assert!(
                contents(&parallel) == contents(&serial),
                "guest memory differs"
            );
        }
    }

    /// The loader copies nothing before it is released, and a preload dropped unreleased
    /// (a VM that failed before loading) ends without copying anything.
    #[test]
    fn nothing_is_copied_before_the_release() {
        let kernel = temp(&elf_image(
            0x10_0000,
            &[(0x10_0000, pattern(8192, 9), 0)],
            None,
        ));
        let appliance = temp(&pattern(4096, 10));
        let parts = [InitrdPart::File(appliance.path().to_path_buf())];
        let mem = guest_memory();
        let preload = Preload::start(&mem, kernel.path(), &parts).unwrap();
        assert!(preload.worker.is_some(), "a loader thread was started");
        drop(preload);
        assert!(
            contents(&mem).iter().all(|&b| b == 0),
            "something was copied"
        );
        let preload = Preload::start(&mem, kernel.path(), &parts).unwrap();
        preload.release();
        preload.finish(&parts).unwrap();
        assert!(contents(&mem).iter().any(|&b| b != 0));
    }

    #[test]
    fn what_the_parallel_loader_does_not_take_goes_to_the_serial_loader() {
        let mem = guest_memory();
        let segment = [(0x10_0000, pattern(4096, 5), 0)];
        // Not an ELF file; missing files; a segment beyond guest memory; overlapping segments;
        // a segment below 1 MiB (among the boot structures); an initrd that does not fit.
        let not_elf = temp(&[0x55; 4096]);
        assert!(Preload::start(&mem, not_elf.path(), &[]).is_none());
        assert!(Preload::start(&mem, Path::new("/nonexistent/vmlinux"), &[]).is_none());
        let beyond = temp(&elf_image(
            0x10_0000,
            &[(63 << 20, pattern(2 << 20, 6), 0)],
            None,
        ));
        assert!(Preload::start(&mem, beyond.path(), &[]).is_none());
        let overlapping = temp(&elf_image(
            0x10_0000,
            &[
                (0x10_0000, pattern(8192, 7), 0),
                (0x10_1000, pattern(8192, 8), 0),
            ],
            None,
        ));
        assert!(Preload::start(&mem, overlapping.path(), &[]).is_none());
        let low = temp(&elf_image(
            0x10_0000,
            &[(0x8_0000, pattern(4096, 11), 0)],
            None,
        ));
        assert!(Preload::start(&mem, low.path(), &[]).is_none());
        let kernel = temp(&elf_image(0x10_0000, &segment, None));
        let missing = [InitrdPart::File("/nonexistent/initrd".into())];
        assert!(Preload::start(&mem, kernel.path(), &missing).is_none());
        let too_big = [InitrdPart::Bytes(vec![1; 70 << 20])];
        assert!(Preload::start(&mem, kernel.path(), &too_big).is_none());
        // The same kernel with nothing wrong is taken.
        assert!(Preload::start(&mem, kernel.path(), &[]).is_some());
    }

    #[test]
    fn a_file_shorter_than_planned_is_a_clear_error() {
        let short = temp(b"four");
        let shared = Shared {
            mem: guest_memory(),
            files: vec![
                (
                    File::open(short.path()).unwrap(),
                    Origin::Initrd {
                        path: short.path().to_path_buf(),
                        len: 8,
                    },
                ),
                (
                    File::open(short.path()).unwrap(),
                    Origin::Kernel(short.path().to_path_buf()),
                ),
            ],
            work: Vec::new(),
            next: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            go: AtomicBool::new(true),
            failed: Mutex::new(None),
        };
        let copy = |file, offset, addr, len| {
            shared.execute(Work::Copy {
                file,
                offset,
                addr,
                len,
            })
        };
        // Eight bytes asked of a four-byte initrd part; four from offset 2 of the kernel.
        let err = copy(0, 0, 0x20_0000, 8).unwrap_err();
        assert!(
            matches!(&err, VmError::Initrd { reason, .. } if reason.contains("did it change")),
            "{err}"
        );
        let err = copy(1, 2, 0x20_0000, 4).unwrap_err();
        assert!(
            matches!(&err, VmError::BadKernel { reason, .. } if reason.contains("cut-short")),
            "{err}"
        );
        assert!(matches!(copy(0, 0, 64 << 20, 4), Err(VmError::Memory(_))));
        copy(0, 0, 0x20_0000, 4).unwrap();
    }

    #[test]
    fn pieces_end_at_huge_page_boundaries() {
        let mut work = Vec::new();
        pieces(&mut work, 3, 0x1000, 0x1f_f000, 0x40_2000);
        let copies: Vec<(u64, u64, u64)> = work
            .iter()
            .map(|w| match *w {
                Work::Copy {
                    file: 3,
                    offset,
                    addr,
                    len,
                } => (offset, addr, len),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            copies,
            [
                (0x1000, 0x1f_f000, 0x1000),
                (0x2000, 0x20_0000, 0x20_0000),
                (0x20_2000, 0x40_0000, 0x20_0000),
                (0x40_2000, 0x60_0000, 0x1000),
            ]
        );
        let mut none = Vec::new();
        pieces(&mut none, 0, 0, 0x1000, 0);
        assert!(none.is_empty());
    }
}
