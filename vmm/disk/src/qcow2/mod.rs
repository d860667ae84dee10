//! Read-only qcow2 (versions 2 and 3): the validated [`header`], the L1 table held in memory,
//! L2 tables loaded on demand into a bounded cache, and the four kinds of guest cluster:
//! data (read from the file), zero (v3 flag), compressed (zlib, that is raw deflate, or zstd, by
//! the header's compression type; decoded in [`compressed`], the last one cached) and
//! unallocated (read from the backing image, or zeros past its end or without one).
//!
//! A backing file is found relative to the image's directory, may be raw or qcow2 (the
//! header's backing format when it names one, else detected from the content), and a chain
//! deeper than [`MAX_BACKING_DEPTH`] or one that comes back to an image already in it is
//! refused when the image is opened.

pub mod compressed;
pub mod header;

use crate::{check_range, io_error, DiskError, Format, Image, Raw, Result};
use header::Header;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// Longest backing chain accepted, counting the images below the top one.
pub const MAX_BACKING_DEPTH: usize = 16;
/// Memory the L2 cache of one image may use.
const L2_CACHE_BYTES: u64 = 8 << 20;
/// Fewest L2 tables cached, whatever the cluster size.
const L2_CACHE_MIN_TABLES: usize = 4;

/// Offset bits of L1 and standard L2 entries (bits 9..=55).
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1 entry bits that must be zero (1..=8 and 56..=62; 63 is "copied").
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Standard L2 entry bits that must be zero (1..=8 and 56..=61).
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
const L2_COMPRESSED: u64 = 1 << 62;
const L2_ZERO: u64 = 1;
const COPIED: u64 = 1 << 63;
const SECTOR: u64 = 512;

/// A read-only qcow2 image and its backing chain.
#[derive(Debug)]
pub struct Qcow2 {
    file: File,
    path: PathBuf,
    file_len: u64,
    header: Header,
    l1: Vec<u64>,
    backing: Option<Box<dyn Image>>,
    l2_cache: Mutex<L2Cache>,
    /// The last decompressed cluster, keyed by its compressed descriptor.
    compressed_cache: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
}

/// Identity of a file in a backing chain: (device, inode).
type FileId = (u64, u64);

impl Qcow2 {
    /// Opens the qcow2 image at `path` read-only, with its backing chain.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|source| DiskError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Self::open_file(file, path)
    }

    /// Opens an already-open qcow2 `file` known as `path`.
    pub fn open_file(file: File, path: &Path) -> Result<Self> {
        Self::open_in_chain(file, path, &mut Vec::new())
    }

    /// The validated header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The backing image, if any.
    pub fn backing(&self) -> Option<&dyn Image> {
        self.backing.as_deref()
    }

    fn open_in_chain(file: File, path: &Path, chain: &mut Vec<FileId>) -> Result<Self> {
        let meta = file.metadata().map_err(|e| io_error("stat", path, e))?;
        let id = (meta.dev(), meta.ino());
        if chain.contains(&id) {
            return Err(DiskError::BackingLoop {
                path: path.to_path_buf(),
            });
        }
        if chain.len() > MAX_BACKING_DEPTH {
            return Err(DiskError::BackingTooDeep {
                path: path.to_path_buf(),
                max: MAX_BACKING_DEPTH,
            });
        }
        chain.push(id);
        let file_len = meta.len();
        let first_len = file_len.min(1 << header::MAX_CLUSTER_BITS) as usize;
        let mut first = vec![0u8; first_len];
        file.read_exact_at(&mut first, 0)
            .map_err(|e| io_error("read", path, e))?;
        let header = header::parse(&first, file_len, path)?;
        drop(first);

        let mut l1_bytes = vec![0u8; header.l1_entries as usize * 8];
        file.read_exact_at(&mut l1_bytes, header.l1_offset)
            .map_err(|e| io_error("read the L1 table of", path, e))?;
        let l1: Vec<u64> = l1_bytes
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or_default()))
            .collect();
        drop(l1_bytes);

        let backing = match &header.backing_name {
            Some(name) => Some(open_backing(path, name, header.backing_format, chain)?),
            None => None,
        };
        let tables = (L2_CACHE_BYTES / header.cluster_size()) as usize;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            file_len,
            l2_cache: Mutex::new(L2Cache::new(tables.max(L2_CACHE_MIN_TABLES))),
            compressed_cache: Mutex::new(None),
            header,
            l1,
            backing,
        })
    }

    fn corrupt(&self, reason: String) -> DiskError {
        DiskError::Corrupt {
            path: self.path.clone(),
            reason,
        }
    }

    /// The L2 table at `offset`, from the cache or the file.
    fn l2_table(&self, offset: u64) -> Result<Arc<Vec<u64>>> {
        if let Some(table) = lock(&self.l2_cache).get(offset) {
            return Ok(table);
        }
        let cluster_size = self.header.cluster_size();
        if !offset.is_multiple_of(cluster_size)
            || offset.saturating_add(cluster_size) > self.file_len
        {
            return Err(self.corrupt(format!(
                "L2 table at {offset:#x} is misaligned or past the end of the {}-byte file",
                self.file_len
            )));
        }
        let mut bytes = vec![0u8; cluster_size as usize];
        self.file
            .read_exact_at(&mut bytes, offset)
            .map_err(|e| io_error("read an L2 table of", &self.path, e))?;
        let table: Arc<Vec<u64>> = Arc::new(
            bytes
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().unwrap_or_default()))
                .collect(),
        );
        lock(&self.l2_cache).insert(offset, table.clone());
        Ok(table)
    }

    /// Where the guest cluster `index` lives.
    fn map(&self, index: u64) -> Result<Cluster> {
        let l2_entries = self.header.l2_entries();
        let l1_entry = match self.l1.get((index / l2_entries) as usize) {
            Some(&e) => e,
            None => return Ok(Cluster::Unallocated),
        };
        if l1_entry & L1_RESERVED != 0 {
            return Err(self.corrupt(format!("L1 entry {l1_entry:#x} has reserved bits set")));
        }
        let l2_offset = l1_entry & OFFSET_MASK;
        if l2_offset == 0 {
            return Ok(Cluster::Unallocated);
        }
        let table = self.l2_table(l2_offset)?;
        let entry = table
            .get((index % l2_entries) as usize)
            .copied()
            .unwrap_or(0);
        if entry & L2_COMPRESSED != 0 {
            return self.compressed(entry & !(L2_COMPRESSED | COPIED));
        }
        if entry & L2_RESERVED != 0 {
            return Err(self.corrupt(format!("L2 entry {entry:#x} has reserved bits set")));
        }
        if entry & L2_ZERO != 0 {
            return Ok(Cluster::Zero);
        }
        let offset = entry & OFFSET_MASK;
        if offset == 0 {
            return Ok(Cluster::Unallocated);
        }
        if !offset.is_multiple_of(self.header.cluster_size()) || offset >= self.file_len {
            return Err(self.corrupt(format!(
                "data cluster at {offset:#x} is misaligned or past the end of the {}-byte file",
                self.file_len
            )));
        }
        Ok(Cluster::Data(offset))
    }

    /// Decodes a compressed cluster descriptor (without its flag bits).
    fn compressed(&self, descriptor: u64) -> Result<Cluster> {
        let offset_bits = 62 - (self.header.cluster_bits - 8);
        let offset = descriptor & ((1 << offset_bits) - 1);
        let sectors = (descriptor >> offset_bits) + 1;
        let len = sectors * SECTOR - (offset % SECTOR);
        if offset >= self.file_len {
            return Err(self.corrupt(format!(
                "compressed cluster at {offset:#x} is past the end of the {}-byte file",
                self.file_len
            )));
        }
        // The last sector of the file may be partial.
        let len = len.min(self.file_len - offset);
        Ok(Cluster::Compressed {
            key: descriptor,
            offset,
            len,
        })
    }

    fn decompress(&self, key: u64, offset: u64, len: u64) -> Result<Arc<Vec<u8>>> {
        if let Some((cached, data)) = lock(&self.compressed_cache).as_ref() {
            if *cached == key {
                return Ok(data.clone());
            }
        }
        let cluster_size = self.header.cluster_size() as usize;
        // QEMU stores a cluster compressed only when that makes it smaller, so its compressed
        // data is never much larger than the cluster: bound the buffer whatever the
        // descriptor claims.
        let len = len.min(2 * cluster_size as u64 + 4096) as usize;
        let mut input = vec![0u8; len];
        self.file
            .read_exact_at(&mut input, offset)
            .map_err(|e| io_error("read a compressed cluster of", &self.path, e))?;
        let mut output = vec![0u8; cluster_size];
        compressed::decompress_cluster(self.header.compression, &input, &mut output).map_err(
            |reason| self.corrupt(format!("compressed cluster at {offset:#x}: {reason}")),
        )?;
        let output = Arc::new(output);
        *lock(&self.compressed_cache) = Some((key, output.clone()));
        Ok(output)
    }

    /// Fills `buf` with guest bytes at `offset` of an unallocated range: the backing image's
    /// bytes where it has them, zeros elsewhere.
    fn read_backing(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let Some(backing) = &self.backing else {
            buf.fill(0);
            return Ok(());
        };
        let available = backing.len().saturating_sub(offset);
        let from_backing = (buf.len() as u64).min(available) as usize;
        if from_backing > 0 {
            backing.read_at(&mut buf[..from_backing], offset)?;
        }
        buf[from_backing..].fill(0);
        Ok(())
    }

    /// Reads `buf.len()` bytes of one data cluster run at host `offset`; bytes past the end
    /// of the file read as zeros (a last cluster the file does not fully hold).
    fn read_data(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let in_file = (buf.len() as u64).min(self.file_len.saturating_sub(offset)) as usize;
        self.file
            .read_exact_at(&mut buf[..in_file], offset)
            .map_err(|e| io_error("read", &self.path, e))?;
        buf[in_file..].fill(0);
        Ok(())
    }
}

/// Where one guest cluster's bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cluster {
    Unallocated,
    Zero,
    Data(u64),
    Compressed { key: u64, offset: u64, len: u64 },
}

impl Image for Qcow2 {
    fn format(&self) -> Format {
        Format::Qcow2
    }

    fn len(&self) -> u64 {
        self.header.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.header.size)?;
        let cluster_size = self.header.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let index = pos >> self.header.cluster_bits;
            let within = pos & (cluster_size - 1);
            let mut n = ((cluster_size - within) as usize).min(buf.len() - done);
            let cluster = self.map(index)?;
            match cluster {
                Cluster::Unallocated => self.read_backing(&mut buf[done..done + n], pos)?,
                Cluster::Zero => buf[done..done + n].fill(0),
                Cluster::Data(host) => {
                    // Merge the following clusters while they are contiguous in the file,
                    // so a sequential read is one pread.
                    let mut next = index + 1;
                    let mut host_end = host + cluster_size;
                    while done + n < buf.len() && self.map(next)? == Cluster::Data(host_end) {
                        n = (n + cluster_size as usize).min(buf.len() - done);
                        next += 1;
                        host_end += cluster_size;
                    }
                    self.read_data(&mut buf[done..done + n], host + within)?;
                }
                Cluster::Compressed { key, offset, len } => {
                    let data = self.decompress(key, offset, len)?;
                    let start = within as usize;
                    buf[done..done + n].copy_from_slice(&data[start..start + n]);
                }
            }
            done += n;
        }
        Ok(())
    }
}

/// Opens the backing image `name` of the image at `path`.
fn open_backing(
    path: &Path,
    name: &str,
    format: Option<Format>,
    chain: &mut Vec<FileId>,
) -> Result<Box<dyn Image>> {
    let fail = |reason: String| DiskError::Backing {
        path: path.to_path_buf(),
        backing: name.to_string(),
        reason,
    };
    if name.starts_with("json:") || name.contains("://") {
        return Err(fail(
            "only plain file names are supported, not protocol or json: specifications".into(),
        ));
    }
    let backing_path = match Path::new(name) {
        p if p.is_absolute() => p.to_path_buf(),
        p => path.parent().unwrap_or(Path::new(".")).join(p),
    };
    let file = File::open(&backing_path)
        .map_err(|e| fail(format!("cannot open {}: {e}", backing_path.display())))?;
    let detected = crate::detect_file(&file, &backing_path)?;
    match format.unwrap_or(detected) {
        Format::Raw => Ok(Box::new(Raw::new(file, &backing_path, false)?)),
        Format::Qcow2 if detected == Format::Qcow2 => {
            Ok(Box::new(Qcow2::open_in_chain(file, &backing_path, chain)?))
        }
        Format::Qcow2 => Err(fail(
            "the header says qcow2 but it is not a qcow2 image".into(),
        )),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A bounded cache of L2 tables by file offset, evicting the least recently used.
#[derive(Debug)]
struct L2Cache {
    capacity: usize,
    tick: u64,
    tables: HashMap<u64, (Arc<Vec<u64>>, u64)>,
}

impl L2Cache {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            tick: 0,
            tables: HashMap::with_capacity(capacity),
        }
    }

    fn get(&mut self, offset: u64) -> Option<Arc<Vec<u64>>> {
        self.tick += 1;
        let tick = self.tick;
        self.tables.get_mut(&offset).map(|(table, used)| {
            *used = tick;
            table.clone()
        })
    }

    fn insert(&mut self, offset: u64, table: Arc<Vec<u64>>) {
        if self.tables.len() >= self.capacity && !self.tables.contains_key(&offset) {
            let oldest = self
                .tables
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(&k, _)| k);
            if let Some(k) = oldest {
                self.tables.remove(&k);
            }
        }
        self.tick += 1;
        self.tables.insert(offset, (table, self.tick));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.tables.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l2_cache_stays_bounded_and_keeps_recent_tables() {
        let mut cache = L2Cache::new(3);
        for k in 0..10u64 {
            cache.insert(k, Arc::new(vec![k]));
            assert!(cache.len() <= 3);
        }
        assert!(cache.get(9).is_some());
        assert!(cache.get(0).is_none());
        // Touching 7 makes 8 the oldest.
        assert!(cache.get(7).is_some());
        cache.insert(100, Arc::new(vec![]));
        assert!(cache.get(8).is_none());
        assert!(cache.get(7).is_some());
    }
}
