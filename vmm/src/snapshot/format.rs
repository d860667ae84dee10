//! The snapshot file: writing one atomically ([`write_snapshot`]) and reading and validating
//! one ([`read_snapshot`]).
//!
//! Layout (all integers little-endian):
//!
//! | offset | what |
//! | --- | --- |
//! | 0 | header, [`HEADER_LEN`] bytes: magic `BOOTBOXS`, format version, region count, the caller's 32-byte key, guest memory size, state and memory section offsets and lengths, up to [`MAX_MEMORY_REGIONS`] memory regions (guest address, length, file offset) |
//! | [`HEADER_LEN`] | state section: VM state, vCPU states, device blobs |
//! | after the state | CRC-32 of every byte before it (header and state) |
//! | next page boundary | guest memory, region after region, page-aligned and sparse: all-zero pages are holes |
//!
//! The checksum does not cover guest memory: checking it would read all of memory on every
//! restore, which mapping it copy-on-write is meant to avoid. Memory is guarded by the file
//! size matching the header and by the atomic publish (temp file, fsync, rename).
//!
//! Everything in the header and state is validated (magic, version, key, lengths against the
//! file size, checksum, then decoding) before any of it is returned; bad bytes give a
//! [`SnapshotError`], never a panic.

use super::codec::{DecodeError, Decoder, Encoder};
use super::vcpu_state::VcpuState;
use super::vm_state::VmState;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// The first 8 bytes of every snapshot file.
pub const MAGIC: [u8; 8] = *b"BOOTBOXS";
/// The layout version this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Guest memory granularity in the file: sections and regions are aligned to it, and holes
/// are made per page.
pub const PAGE_SIZE: u64 = 4096;
/// Header slots for memory regions (guest RAM is one region, or two around the MMIO gap).
pub const MAX_MEMORY_REGIONS: usize = 8;
/// The fixed header's length: 88 bytes of fields, then the region table.
pub const HEADER_LEN: usize = 88 + MAX_MEMORY_REGIONS * 24;
/// Upper bound on the state section, so a corrupt header cannot make the reader allocate
/// an absurd buffer before the checksum is checked.
pub const MAX_STATE_LEN: u64 = 256 << 20;
const MAX_VCPUS: usize = 1024;
const MAX_DEVICES: usize = 4096;
const MAX_DEVICE_NAME_LEN: usize = 256;
const CHECKSUM_LEN: u64 = 4;
/// Bytes of guest memory read per step while writing (a multiple of the page size).
const WRITE_CHUNK: usize = 1 << 20;

/// What the caller derives from everything the snapshot depends on (kernel, appliance,
/// memory size, vCPU count, devices, bootbox's own snapshot version): a snapshot is only
/// read back under the same key.
pub type SnapshotKey = [u8; 32];

/// Why a snapshot could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{} is not a bootbox snapshot (bad magic)", .0.display())]
    NotASnapshot(PathBuf),
    #[error("snapshot format version {found} is not the supported {FORMAT_VERSION}")]
    UnsupportedVersion { found: u32 },
    #[error("the snapshot was made for another kernel, appliance or VM shape (key mismatch)")]
    KeyMismatch,
    #[error(
        "the snapshot file is {actual} bytes but its header says {expected}: truncated or extended"
    )]
    SizeMismatch { actual: u64, expected: u64 },
    #[error("the snapshot header is inconsistent: {0}")]
    BadLayout(String),
    #[error("the snapshot's header and state fail their checksum (stored {stored:#010x}, computed {computed:#010x})")]
    ChecksumMismatch { stored: u32, computed: u32 },
    #[error("the snapshot's state section is malformed: {0}")]
    State(#[from] DecodeError),
    #[error("guest memory cannot be snapshotted: {0}")]
    UnsupportedMemory(String),
    #[error("reading guest memory at {addr:#x}: {reason}")]
    MemoryRead { addr: u64, reason: String },
}

/// Everything in a snapshot apart from guest memory.
#[derive(Clone, Debug, PartialEq)]
pub struct SnapshotState {
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    /// Opaque per-device state, by device name, for the devices' own code to interpret.
    pub devices: Vec<(String, Vec<u8>)>,
}

/// One guest memory region and where its bytes are in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRegionEntry {
    pub guest_addr: u64,
    pub len: u64,
    pub file_offset: u64,
}

/// A snapshot read and validated by [`read_snapshot`]: its state, and the open file with
/// the layout of the guest memory in it (for [`super::memory_map::map_guest_memory`]).
#[derive(Debug)]
pub struct SnapshotFile {
    pub state: SnapshotState,
    pub memory_regions: Vec<MemoryRegionEntry>,
    pub file: Arc<File>,
}

/// The header's fields (magic and checksum are checked, not kept).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Header {
    version: u32,
    key: SnapshotKey,
    memory_size: u64,
    state_offset: u64,
    state_len: u64,
    memory_offset: u64,
    memory_len: u64,
    regions: Vec<MemoryRegionEntry>,
}

impl Header {
    fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::default();
        for b in MAGIC {
            e.u8(b);
        }
        e.u32(self.version);
        e.u32(self.regions.len() as u32);
        for b in self.key {
            e.u8(b);
        }
        for v in [
            self.memory_size,
            self.state_offset,
            self.state_len,
            self.memory_offset,
            self.memory_len,
        ] {
            e.u64(v);
        }
        for slot in 0..MAX_MEMORY_REGIONS {
            let r = self
                .regions
                .get(slot)
                .copied()
                .unwrap_or(MemoryRegionEntry {
                    guest_addr: 0,
                    len: 0,
                    file_offset: 0,
                });
            e.u64(r.guest_addr);
            e.u64(r.len);
            e.u64(r.file_offset);
        }
        let bytes = e.into_bytes();
        debug_assert_eq!(bytes.len(), HEADER_LEN);
        bytes
    }

    /// Parses the header and checks magic, version and key, in that order.
    fn decode(bytes: &[u8], path: &Path, key: &SnapshotKey) -> Result<Header, SnapshotError> {
        let mut d = Decoder::new(bytes);
        if d.take(MAGIC.len(), "magic")? != MAGIC {
            return Err(SnapshotError::NotASnapshot(path.to_path_buf()));
        }
        let version = d.u32("format version")?;
        if version != FORMAT_VERSION {
            return Err(SnapshotError::UnsupportedVersion { found: version });
        }
        let region_count = d.u32("region count")? as usize;
        let mut stored_key = [0u8; 32];
        stored_key.copy_from_slice(d.take(32, "key")?);
        if &stored_key != key {
            return Err(SnapshotError::KeyMismatch);
        }
        let memory_size = d.u64("memory size")?;
        let state_offset = d.u64("state offset")?;
        let state_len = d.u64("state length")?;
        let memory_offset = d.u64("memory offset")?;
        let memory_len = d.u64("memory length")?;
        if region_count == 0 || region_count > MAX_MEMORY_REGIONS {
            return Err(SnapshotError::BadLayout(format!(
                "{region_count} memory regions, not 1 to {MAX_MEMORY_REGIONS}"
            )));
        }
        let mut regions = Vec::with_capacity(region_count);
        for _ in 0..region_count {
            regions.push(MemoryRegionEntry {
                guest_addr: d.u64("region guest address")?,
                len: d.u64("region length")?,
                file_offset: d.u64("region file offset")?,
            });
        }
        Ok(Header {
            version,
            key: stored_key,
            memory_size,
            state_offset,
            state_len,
            memory_offset,
            memory_len,
            regions,
        })
    }

    /// The file size this header implies, after checking that its sections and regions are
    /// where this version of the format puts them.
    fn check_layout(&self) -> Result<u64, SnapshotError> {
        let bad = |msg: String| Err(SnapshotError::BadLayout(msg));
        if self.state_offset != HEADER_LEN as u64 {
            return bad(format!(
                "state section at {}, not right after the {HEADER_LEN}-byte header",
                self.state_offset
            ));
        }
        if self.state_len > MAX_STATE_LEN {
            return bad(format!(
                "state section of {} bytes exceeds {MAX_STATE_LEN}",
                self.state_len
            ));
        }
        let expected_memory_offset = memory_offset_after_state(self.state_len)
            .ok_or_else(|| SnapshotError::BadLayout("state section length overflows".into()))?;
        if self.memory_offset != expected_memory_offset {
            return bad(format!(
                "memory section at {}, expected {expected_memory_offset}",
                self.memory_offset
            ));
        }
        let mut next_file_offset = self.memory_offset;
        let mut previous_end = 0u64;
        for (i, r) in self.regions.iter().enumerate() {
            let end = r.guest_addr.checked_add(r.len);
            if r.len == 0
                || r.len % PAGE_SIZE != 0
                || r.guest_addr % PAGE_SIZE != 0
                || end.is_none()
                || (i > 0 && r.guest_addr < previous_end)
            {
                return bad(format!(
                    "memory region {i} ({:#x}+{:#x}) is empty, unaligned, overflowing or out of order",
                    r.guest_addr, r.len
                ));
            }
            if r.file_offset != next_file_offset {
                return bad(format!(
                    "memory region {i} at file offset {:#x}, expected {next_file_offset:#x}",
                    r.file_offset
                ));
            }
            previous_end = end.unwrap_or_default();
            next_file_offset = next_file_offset.checked_add(r.len).ok_or_else(|| {
                SnapshotError::BadLayout("memory regions overflow the file size".into())
            })?;
        }
        let regions_len = next_file_offset - self.memory_offset;
        if regions_len != self.memory_len || self.memory_len != self.memory_size {
            return bad(format!(
                "memory section is {} bytes, regions add up to {regions_len}, memory size is {}",
                self.memory_len, self.memory_size
            ));
        }
        Ok(next_file_offset)
    }
}

/// Where the memory section starts: the first page boundary after state and checksum.
fn memory_offset_after_state(state_len: u64) -> Option<u64> {
    (HEADER_LEN as u64)
        .checked_add(state_len)?
        .checked_add(CHECKSUM_LEN)?
        .checked_next_multiple_of(PAGE_SIZE)
}

impl SnapshotState {
    fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::default();
        self.vm.encode(&mut e);
        e.u32(self.vcpus.len() as u32);
        for vcpu in &self.vcpus {
            vcpu.encode(&mut e);
        }
        e.u32(self.devices.len() as u32);
        for (name, blob) in &self.devices {
            e.blob(name.as_bytes());
            e.blob(blob);
        }
        e.into_bytes()
    }

    fn decode(bytes: &[u8]) -> Result<SnapshotState, DecodeError> {
        let mut d = Decoder::new(bytes);
        let vm = VmState::decode(&mut d)?;
        let vcpu_count = bounded_count(&mut d, MAX_VCPUS, "vCPU count")?;
        let vcpus = (0..vcpu_count)
            .map(|_| VcpuState::decode(&mut d))
            .collect::<Result<_, _>>()?;
        let device_count = bounded_count(&mut d, MAX_DEVICES, "device count")?;
        let mut devices = Vec::with_capacity(device_count);
        for _ in 0..device_count {
            let name = d.blob("device name")?;
            if name.len() > MAX_DEVICE_NAME_LEN {
                return Err(DecodeError::new(
                    "device name",
                    format!("{} bytes, more than {MAX_DEVICE_NAME_LEN}", name.len()),
                ));
            }
            let name = std::str::from_utf8(name)
                .map_err(|_| DecodeError::new("device name", "is not UTF-8"))?;
            let blob = d.blob("device state")?;
            devices.push((name.to_owned(), blob.to_vec()));
        }
        d.finish("state section")?;
        Ok(SnapshotState { vm, vcpus, devices })
    }
}

fn bounded_count(d: &mut Decoder<'_>, max: usize, what: &str) -> Result<usize, DecodeError> {
    let count = d.u32(what)? as usize;
    if count > max {
        return Err(DecodeError::new(
            what,
            format!("{count} is more than {max}"),
        ));
    }
    Ok(count)
}

fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The memory layout of `memory` in a snapshot whose state section is `state_len` bytes.
fn layout_memory(
    memory: &GuestMemoryMmap,
    state_len: u64,
) -> Result<(u64, Vec<MemoryRegionEntry>), SnapshotError> {
    let memory_offset = memory_offset_after_state(state_len)
        .ok_or_else(|| SnapshotError::UnsupportedMemory("state section too large".into()))?;
    let mut regions: Vec<MemoryRegionEntry> = Vec::new();
    let mut file_offset = memory_offset;
    let mut sorted: Vec<_> = memory.iter().map(|r| (r.start_addr().0, r.len())).collect();
    sorted.sort_unstable();
    if sorted.is_empty() || sorted.len() > MAX_MEMORY_REGIONS {
        return Err(SnapshotError::UnsupportedMemory(format!(
            "{} regions, not 1 to {MAX_MEMORY_REGIONS}",
            sorted.len()
        )));
    }
    for (guest_addr, len) in sorted {
        if guest_addr % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
            return Err(SnapshotError::UnsupportedMemory(format!(
                "region {guest_addr:#x}+{len:#x} is not page-aligned"
            )));
        }
        regions.push(MemoryRegionEntry {
            guest_addr,
            len,
            file_offset,
        });
        file_offset += len;
    }
    Ok((memory_offset, regions))
}

/// Removes the temp file unless the write got as far as publishing it.
struct TempFileGuard<'a> {
    path: &'a Path,
    published: bool,
}

impl Drop for TempFileGuard<'_> {
    fn drop(&mut self) {
        if !self.published {
            let _ = std::fs::remove_file(self.path);
        }
    }
}

fn temp_path_for(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "snapshot".into());
    path.with_file_name(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Writes a snapshot of `state` and `memory` to `path`, replacing any file there only once
/// the new one is complete and on disk (a temp file in the same directory, fsync, rename,
/// fsync of the directory). Guest memory is written sparse: all-zero pages stay holes.
/// The VM's vCPUs must be stopped; the caller serialises writers of the same path.
pub fn write_snapshot(
    path: &Path,
    key: &SnapshotKey,
    state: &SnapshotState,
    memory: &GuestMemoryMmap,
) -> Result<(), SnapshotError> {
    let state_bytes = state.encode();
    let state_len = state_bytes.len() as u64;
    if state_len > MAX_STATE_LEN {
        return Err(SnapshotError::UnsupportedMemory(format!(
            "state section of {state_len} bytes exceeds {MAX_STATE_LEN}"
        )));
    }
    let (memory_offset, regions) = layout_memory(memory, state_len)?;
    let memory_len: u64 = regions.iter().map(|r| r.len).sum();
    let header = Header {
        version: FORMAT_VERSION,
        key: *key,
        memory_size: memory_len,
        state_offset: HEADER_LEN as u64,
        state_len,
        memory_offset,
        memory_len,
        regions,
    };
    let mut prefix = header.encode();
    prefix.extend_from_slice(&state_bytes);
    let checksum = crc32fast::hash(&prefix);
    prefix.extend_from_slice(&checksum.to_le_bytes());

    let temp = temp_path_for(path);
    let mut guard = TempFileGuard {
        path: &temp,
        published: false,
    };
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temp)
        .map_err(io_err("creating", &temp))?;
    file.write_all_at(&prefix, 0)
        .map_err(io_err("writing", &temp))?;
    file.set_len(memory_offset + memory_len)
        .map_err(io_err("sizing", &temp))?;
    for region in &header.regions {
        write_region_sparse(&file, &temp, memory, region)?;
    }
    file.sync_all().map_err(io_err("syncing", &temp))?;
    drop(file);
    std::fs::rename(&temp, path).map_err(io_err("publishing", path))?;
    guard.published = true;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing the directory of", path))
}

fn is_zero(bytes: &[u8]) -> bool {
    // Folding 64-byte blocks lets the compiler vectorise the check.
    bytes
        .chunks(64)
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Writes the non-zero pages of one region at their file offsets, runs of adjacent
/// non-zero pages in one write.
fn write_region_sparse(
    file: &File,
    path: &Path,
    memory: &GuestMemoryMmap,
    region: &MemoryRegionEntry,
) -> Result<(), SnapshotError> {
    let mut buf = vec![0u8; WRITE_CHUNK];
    let mut done = 0u64;
    while done < region.len {
        let len = (region.len - done).min(WRITE_CHUNK as u64) as usize;
        let chunk = &mut buf[..len];
        let addr = region.guest_addr + done;
        memory
            .read_slice(chunk, GuestAddress(addr))
            .map_err(|e| SnapshotError::MemoryRead {
                addr,
                reason: e.to_string(),
            })?;
        let page = PAGE_SIZE as usize;
        let mut page_start = 0;
        while page_start < len {
            if is_zero(&chunk[page_start..page_start + page]) {
                page_start += page;
                continue;
            }
            let mut run_end = page_start + page;
            while run_end < len && !is_zero(&chunk[run_end..run_end + page]) {
                run_end += page;
            }
            file.write_all_at(
                &chunk[page_start..run_end],
                region.file_offset + done + page_start as u64,
            )
            .map_err(io_err("writing guest memory to", path))?;
            page_start = run_end;
        }
        done += len as u64;
    }
    Ok(())
}

/// Parses and validates header and state from a file of `file_len` bytes, reading through
/// `read_at(offset, len)`. Used by [`read_snapshot`] and directly by tests on in-memory
/// images.
fn parse(
    path: &Path,
    key: &SnapshotKey,
    file_len: u64,
    mut read_at: impl FnMut(u64, usize) -> Result<Vec<u8>, SnapshotError>,
) -> Result<(Header, SnapshotState), SnapshotError> {
    if file_len < HEADER_LEN as u64 {
        // Too short for a header; still say "not a snapshot" when even the magic is wrong.
        let head = read_at(0, file_len.min(MAGIC.len() as u64) as usize)?;
        if head.len() < MAGIC.len() || head != MAGIC {
            return Err(SnapshotError::NotASnapshot(path.to_path_buf()));
        }
        return Err(SnapshotError::SizeMismatch {
            actual: file_len,
            expected: HEADER_LEN as u64,
        });
    }
    let header_bytes = read_at(0, HEADER_LEN)?;
    let header = Header::decode(&header_bytes, path, key)?;
    let expected_len = header.check_layout()?;
    if file_len != expected_len {
        return Err(SnapshotError::SizeMismatch {
            actual: file_len,
            expected: expected_len,
        });
    }
    // check_layout bounded state_len by MAX_STATE_LEN and the file holds it.
    let tail = read_at(
        header.state_offset,
        (header.state_len + CHECKSUM_LEN) as usize,
    )?;
    let (state_bytes, stored) = tail.split_at(header.state_len as usize);
    let mut stored_le = [0u8; 4];
    stored_le.copy_from_slice(stored);
    let stored = u32::from_le_bytes(stored_le);
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header_bytes);
    hasher.update(state_bytes);
    let computed = hasher.finalize();
    if stored != computed {
        return Err(SnapshotError::ChecksumMismatch { stored, computed });
    }
    let state = SnapshotState::decode(state_bytes)?;
    Ok((header, state))
}

/// Opens the snapshot at `path` and validates it against `key` (magic, version, key,
/// layout against the file size, checksum, state decoding) before returning anything.
pub fn read_snapshot(path: &Path, key: &SnapshotKey) -> Result<SnapshotFile, SnapshotError> {
    let file = File::open(path).map_err(io_err("opening", path))?;
    let file_len = file
        .metadata()
        .map_err(io_err("reading the size of", path))?
        .len();
    let (header, state) = parse(path, key, file_len, |offset, len| {
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset)
            .map_err(io_err("reading", path))?;
        Ok(buf)
    })?;
    Ok(SnapshotFile {
        state,
        memory_regions: header.regions,
        file: Arc::new(file),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::vcpu_state::tests::sample_state as sample_vcpu;
    use crate::snapshot::vm_state::tests::sample_state as sample_vm;

    const KEY: SnapshotKey = [7; 32];

    fn sample_state() -> SnapshotState {
        SnapshotState {
            vm: sample_vm(),
            vcpus: vec![sample_vcpu(1), sample_vcpu(2)],
            devices: vec![
                ("serial".into(), vec![1, 2, 3]),
                ("virtio-fs".into(), vec![]),
            ],
        }
    }

    /// Two regions with a few non-zero pages, the rest zero.
    fn sample_memory() -> GuestMemoryMmap {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x8000),
            (GuestAddress(0x10000), 0x3000),
        ])
        .unwrap();
        mem.write_slice(b"first page", GuestAddress(0)).unwrap();
        mem.write_slice(&[0xaa; 8192], GuestAddress(0x3000))
            .unwrap();
        mem.write_slice(b"last", GuestAddress(0x12ffc)).unwrap();
        mem
    }

    fn temp_dir(tag: &str) -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix(&format!("vmm-snapshot-{tag}-"))
            .tempdir()
            .unwrap()
    }

    fn written_image(dir: &tempfile::TempDir) -> (PathBuf, Vec<u8>) {
        let path = dir.path().join("snap");
        write_snapshot(&path, &KEY, &sample_state(), &sample_memory()).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        (path, bytes)
    }

    fn parse_image(image: &[u8]) -> Result<(Header, SnapshotState), SnapshotError> {
        parse(
            Path::new("image"),
            &KEY,
            image.len() as u64,
            |offset, len| {
                let start = offset as usize;
                Ok(image[start..start + len].to_vec())
            },
        )
    }

    #[test]
    fn snapshot_round_trips_with_sparse_memory() {
        let dir = temp_dir("roundtrip");
        let (path, bytes) = written_image(&dir);
        let snap = read_snapshot(&path, &KEY).unwrap();
        assert_eq!(snap.state, sample_state());
        let memory_offset =
            memory_offset_after_state(sample_state().encode().len() as u64).unwrap();
        assert_eq!(
            snap.memory_regions,
            vec![
                MemoryRegionEntry {
                    guest_addr: 0,
                    len: 0x8000,
                    file_offset: memory_offset
                },
                MemoryRegionEntry {
                    guest_addr: 0x10000,
                    len: 0x3000,
                    file_offset: memory_offset + 0x8000
                },
            ]
        );
        assert_eq!(bytes.len() as u64, memory_offset + 0xb000);
        let mem = |guest: u64, len: usize| {
            let off = (memory_offset
                + if guest >= 0x10000 {
                    guest - 0x8000
                } else {
                    guest
                }) as usize;
            bytes[off..off + len].to_vec()
        };
        assert_eq!(mem(0, 10), b"first page");
        assert_eq!(mem(0x3000, 8192), vec![0xaa; 8192]);
        assert_eq!(mem(0x12ffc, 4), b"last");
        assert!(mem(0x1000, 0x2000).iter().all(|&b| b == 0));
        // Only the 4 non-zero pages took disk blocks (st_blocks counts 512-byte units).
        use std::os::unix::fs::MetadataExt;
        let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(
            allocated < memory_offset + 6 * PAGE_SIZE,
            "{allocated} bytes allocated: zero pages were written"
        );
        // No temp file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_new_snapshot_replaces_the_old_one_whole() {
        let dir = temp_dir("replace");
        let (path, _) = written_image(&dir);
        let mut state = sample_state();
        state.devices.clear();
        write_snapshot(&path, &KEY, &state, &sample_memory()).unwrap();
        assert_eq!(read_snapshot(&path, &KEY).unwrap().state, state);
    }

    #[test]
    fn each_header_field_is_checked() {
        let dir = temp_dir("fields");
        let (_, image) = written_image(&dir);
        let corrupt = |offset: usize, value: &[u8]| {
            let mut bad = image.clone();
            bad[offset..offset + value.len()].copy_from_slice(value);
            parse_image(&bad).unwrap_err()
        };
        assert!(matches!(corrupt(0, b"X"), SnapshotError::NotASnapshot(_)));
        assert!(matches!(
            corrupt(8, &2u32.to_le_bytes()),
            SnapshotError::UnsupportedVersion { found: 2 }
        ));
        assert!(matches!(
            corrupt(12, &0u32.to_le_bytes()),
            SnapshotError::BadLayout(_)
        ));
        assert!(matches!(
            corrupt(12, &9u32.to_le_bytes()),
            SnapshotError::BadLayout(_)
        ));
        assert!(matches!(corrupt(16, &[8]), SnapshotError::KeyMismatch));
        // memory size, state offset, state length, memory offset, memory length
        for field in [48, 56, 64, 72, 80] {
            let err = corrupt(field, &[0x01, 0x10]);
            assert!(
                matches!(
                    err,
                    SnapshotError::BadLayout(_) | SnapshotError::SizeMismatch { .. }
                ),
                "field at {field}: {err}"
            );
        }
        // region 0: guest address, length, file offset; region 1 likewise
        for field in [88, 96, 104, 112, 120, 128] {
            let err = corrupt(field, &[0x01, 0x10]);
            assert!(
                matches!(err, SnapshotError::BadLayout(_)),
                "field at {field}: {err}"
            );
        }
        // An unused region slot is covered by the checksum only.
        assert!(matches!(
            corrupt(136, &[1]),
            SnapshotError::ChecksumMismatch { .. }
        ));
        // A byte of state, and the checksum itself.
        assert!(matches!(
            corrupt(HEADER_LEN + 40, &[0x77]),
            SnapshotError::ChecksumMismatch { .. }
        ));
        let state_len = sample_state().encode().len();
        assert!(matches!(
            corrupt(HEADER_LEN + state_len, &[0, 0, 0, 0]),
            SnapshotError::ChecksumMismatch { .. }
        ));
    }

    #[test]
    fn every_truncation_and_extension_is_refused() {
        let dir = temp_dir("trunc");
        let (_, image) = written_image(&dir);
        for len in (0..image.len()).step_by(97).chain([image.len() - 1]) {
            let err = parse_image(&image[..len]).unwrap_err();
            assert!(
                matches!(
                    err,
                    SnapshotError::NotASnapshot(_) | SnapshotError::SizeMismatch { .. }
                ),
                "truncated to {len}: {err}"
            );
        }
        let mut longer = image.clone();
        longer.push(0);
        assert!(matches!(
            parse_image(&longer).unwrap_err(),
            SnapshotError::SizeMismatch { .. }
        ));
    }

    #[test]
    fn a_state_section_that_passes_its_checksum_is_still_decoded_strictly() {
        // A writer bug (or a forged file) with a valid checksum must still fail cleanly.
        let dir = temp_dir("strict");
        let (_, mut image) = written_image(&dir);
        // The vCPU count lives right after the VM state.
        let mut e = Encoder::default();
        sample_vm().encode(&mut e);
        let count_at = HEADER_LEN + e.into_bytes().len();
        image[count_at..count_at + 4].copy_from_slice(&3u32.to_le_bytes());
        let state_len = sample_state().encode().len();
        let crc = crc32fast::hash(&image[..HEADER_LEN + state_len]);
        image[HEADER_LEN + state_len..HEADER_LEN + state_len + 4]
            .copy_from_slice(&crc.to_le_bytes());
        let err = parse_image(&image).unwrap_err();
        assert!(matches!(err, SnapshotError::State(_)), "{err}");
        assert!(err
            .to_string()
            .starts_with("the snapshot's state section is malformed"));
    }

    #[test]
    fn wrong_key_and_missing_file_have_clear_errors() {
        let dir = temp_dir("key");
        let (path, _) = written_image(&dir);
        let err = read_snapshot(&path, &[0; 32]).unwrap_err();
        assert!(err.to_string().contains("key mismatch"), "{err}");
        let err = read_snapshot(&dir.path().join("absent"), &KEY).unwrap_err();
        assert!(err.to_string().starts_with("opening "), "{err}");
    }

    /// A small self-contained fuzz loop: random byte flips anywhere in the header and state
    /// of a valid image, and random truncations, must give `Ok` or `Err`, never a panic.
    #[test]
    fn random_corruption_never_panics() {
        let dir = temp_dir("fuzz");
        let (_, image) = written_image(&dir);
        let state_end = HEADER_LEN + sample_state().encode().len() + CHECKSUM_LEN as usize;
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let (mut ok, mut errs) = (0, 0);
        for round in 0..3000 {
            let mut bad = image.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() % state_end as u64) as usize;
                bad[at] ^= 1 << (next() % 8);
            }
            if round % 10 == 0 {
                bad.truncate((next() % image.len() as u64) as usize);
            }
            match std::panic::catch_unwind(|| parse_image(&bad)) {
                Ok(Ok(_)) => ok += 1,
                Ok(Err(_)) => errs += 1,
                Err(_) => panic!("round {round}: parsing a corrupted image panicked"),
            }
        }
        assert_eq!(ok + errs, 3000);
        assert!(errs > 2900, "only {errs} corruptions were caught");
    }
}
