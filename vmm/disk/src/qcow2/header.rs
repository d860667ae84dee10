//! The qcow2 header (v2 and v3) and its extensions, parsed from the first cluster and checked
//! field by field against the file size, so that nothing the reader later does with these
//! numbers can overflow, allocate without bound or point outside the file.

use crate::{DiskError, Format, Result, QCOW2_MAGIC};
use std::path::Path;

/// Smallest and largest cluster sizes (as bit shifts) QEMU creates and accepts.
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Largest L1 table accepted (QEMU's limit too): bounds the memory an image can make us use.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest virtual size accepted (QEMU's limit: 2^61 bytes, so offsets never overflow).
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 61;
/// Longest backing file name (QEMU's limit).
pub const MAX_BACKING_NAME: u32 = 1023;

const V2_HEADER_LEN: u32 = 72;
const V3_MIN_HEADER_LEN: u32 = 104;

/// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

/// Header extension types.
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_CRYPTO: u32 = 0x0537_be77;
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// What the reader needs from a valid header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    pub l1_entries: u32,
    pub l1_offset: u64,
    /// The backing file name as stored (relative to the image's directory unless absolute).
    pub backing_name: Option<String>,
    /// The backing format from the header extension, when given.
    pub backing_format: Option<Format>,
    pub incompatible: u64,
    /// How its compressed clusters are compressed.
    pub compression: Compression,
}

/// The compression of an image's compressed clusters: the v3 header's compression type byte
/// (offset 104), zlib when the header is too short to hold it and in every v2 image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Type 0, QEMU's "zlib": a raw deflate stream (no zlib header or checksum).
    Zlib,
    /// Type 1: zstd frames.
    Zstd,
}

impl Compression {
    /// The name `qemu-img` uses for it (`-o compression_type=NAME`).
    pub fn name(self) -> &'static str {
        match self {
            Compression::Zlib => "zlib",
            Compression::Zstd => "zstd",
        }
    }
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Entries in one L2 table (one cluster of 8-byte entries).
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_be_bytes)
}

fn be64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

/// Parses and validates the header in `first` (the file's first bytes: at least the first
/// cluster, or the whole file if shorter) of a file of `file_len` bytes.
pub fn parse(first: &[u8], file_len: u64, path: &Path) -> Result<Header> {
    let bad = |reason: String| DiskError::BadHeader {
        path: path.to_path_buf(),
        reason,
    };
    if first.len() < V2_HEADER_LEN as usize {
        return Err(bad(format!(
            "the file is {file_len} bytes, shorter than a qcow2 header"
        )));
    }
    if first[..4] != QCOW2_MAGIC {
        return Err(DiskError::NotQcow2 {
            path: path.to_path_buf(),
        });
    }
    let version = be32(first, 4);
    if version != 2 && version != 3 {
        return Err(DiskError::UnsupportedVersion {
            path: path.to_path_buf(),
            version,
        });
    }
    let backing_offset = be64(first, 8);
    let backing_len = be32(first, 16);
    let cluster_bits = be32(first, 20);
    let size = be64(first, 24);
    let crypt_method = be32(first, 32);
    let l1_entries = be32(first, 36);
    let l1_offset = be64(first, 40);
    let refcount_offset = be64(first, 48);
    let refcount_clusters = be32(first, 56);
    let snapshots = be32(first, 60);
    let snapshots_offset = be64(first, 64);

    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(bad(format!(
            "cluster_bits {cluster_bits} is outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}"
        )));
    }
    let cluster_size = 1u64 << cluster_bits;
    if crypt_method != 0 {
        return Err(DiskError::Encrypted {
            path: path.to_path_buf(),
        });
    }

    let (incompatible, header_len, compression) = if version == 3 {
        if first.len() < V3_MIN_HEADER_LEN as usize {
            return Err(bad("the file is shorter than a version 3 header".into()));
        }
        let header_len = be32(first, 100);
        let refcount_order = be32(first, 96);
        if header_len < V3_MIN_HEADER_LEN
            || !header_len.is_multiple_of(8)
            || u64::from(header_len) > cluster_size
        {
            return Err(bad(format!(
                "header_length {header_len} is not a multiple of 8 between {V3_MIN_HEADER_LEN} and the cluster size"
            )));
        }
        if refcount_order > 6 {
            return Err(bad(format!("refcount_order {refcount_order} is above 6")));
        }
        let compression = if header_len > V3_MIN_HEADER_LEN {
            first.get(104).copied().unwrap_or(0)
        } else {
            0
        };
        (be64(first, 72), header_len, compression)
    } else {
        (0, V2_HEADER_LEN, 0)
    };

    if incompatible & INCOMPAT_DATA_FILE != 0 {
        return Err(DiskError::ExternalDataFile {
            path: path.to_path_buf(),
        });
    }
    if incompatible & INCOMPAT_EXTL2 != 0 {
        return Err(DiskError::ExtendedL2 {
            path: path.to_path_buf(),
        });
    }
    if incompatible & !INCOMPAT_KNOWN != 0 {
        return Err(DiskError::UnknownFeatures {
            path: path.to_path_buf(),
            bits: incompatible & !INCOMPAT_KNOWN,
        });
    }
    // QEMU's rule: a compression type other than zlib is announced by the incompatible
    // feature bit (so that readers without it refuse the image), and only then.
    let compression = match compression {
        0 => Compression::Zlib,
        1 => Compression::Zstd,
        kind => {
            return Err(DiskError::UnknownCompression {
                path: path.to_path_buf(),
                kind,
            })
        }
    };
    let flagged = incompatible & INCOMPAT_COMPRESSION != 0;
    if flagged != (compression != Compression::Zlib) {
        return Err(bad(format!(
            "the compression type is {} but the compression type feature bit is {}",
            compression.name(),
            if flagged { "set" } else { "clear" }
        )));
    }

    // Sizes: the virtual size, and an L1 table big enough for it and inside the file.
    if size > MAX_VIRTUAL_SIZE {
        return Err(bad(format!(
            "virtual size {size} is above the {MAX_VIRTUAL_SIZE}-byte limit"
        )));
    }
    let bytes_per_l2 = cluster_size * (cluster_size / 8);
    let l1_needed = size.div_ceil(bytes_per_l2);
    if u64::from(l1_entries) < l1_needed {
        return Err(bad(format!(
            "L1 table of {l1_entries} entries is too small for a {size}-byte disk ({l1_needed} needed)"
        )));
    }
    let l1_bytes = u64::from(l1_entries) * 8;
    if l1_bytes > MAX_L1_BYTES {
        return Err(bad(format!(
            "L1 table of {l1_bytes} bytes is above the {MAX_L1_BYTES}-byte limit"
        )));
    }
    if l1_entries > 0 {
        check_table(
            "L1 table",
            l1_offset,
            l1_bytes,
            cluster_size,
            file_len,
            &bad,
        )?;
    }
    check_table(
        "refcount table",
        refcount_offset,
        u64::from(refcount_clusters) * cluster_size,
        cluster_size,
        file_len,
        &bad,
    )?;
    if snapshots > 0 {
        check_table(
            "snapshot table",
            snapshots_offset,
            // Each entry is at least 40 bytes.
            u64::from(snapshots) * 40,
            cluster_size,
            file_len,
            &bad,
        )?;
    }

    // The backing file name lies in the first cluster.
    let backing_name = if backing_offset != 0 {
        if backing_len == 0 || backing_len > MAX_BACKING_NAME {
            return Err(bad(format!(
                "backing file name length {backing_len} is not 1..={MAX_BACKING_NAME}"
            )));
        }
        let end = backing_offset
            .checked_add(u64::from(backing_len))
            .filter(|&end| end <= cluster_size && end <= first.len() as u64)
            .ok_or_else(|| {
                bad(format!(
                    "backing file name at {backing_offset}+{backing_len} is outside the first cluster or the file"
                ))
            })?;
        let raw = &first[backing_offset as usize..end as usize];
        let name =
            std::str::from_utf8(raw).map_err(|_| bad("backing file name is not UTF-8".into()))?;
        // NUL cannot be in a path, and a newline or other control character would break the
        // one-line messages that name the file.
        if name.contains(char::is_control) {
            return Err(bad(format!(
                "backing file name {name:?} contains a control character"
            )));
        }
        Some(name.to_string())
    } else {
        None
    };

    let mut header = Header {
        version,
        cluster_bits,
        size,
        l1_entries,
        l1_offset,
        backing_name,
        backing_format: None,
        incompatible,
        compression,
    };
    parse_extensions(first, header_len, cluster_size, &mut header, path)?;
    Ok(header)
}

/// Checks that a table of `len` bytes at `offset` is cluster-aligned and inside the file.
fn check_table(
    what: &str,
    offset: u64,
    len: u64,
    cluster_size: u64,
    file_len: u64,
    bad: &dyn Fn(String) -> DiskError,
) -> Result<()> {
    if !offset.is_multiple_of(cluster_size) {
        return Err(bad(format!(
            "{what} offset {offset:#x} is not aligned to the {cluster_size}-byte cluster size"
        )));
    }
    match offset.checked_add(len) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(bad(format!(
            "{what} at {offset:#x}+{len:#x} lies past the end of the {file_len}-byte file"
        ))),
    }
}

/// Reads the header extensions between the header and the end of the first cluster.
fn parse_extensions(
    first: &[u8],
    header_len: u32,
    cluster_size: u64,
    header: &mut Header,
    path: &Path,
) -> Result<()> {
    let bad = |reason: String| DiskError::BadHeader {
        path: path.to_path_buf(),
        reason,
    };
    let limit = (cluster_size as usize).min(first.len());
    let mut at = header_len as usize;
    // Each extension takes at least 8 bytes, so this loop ends.
    while at + 8 <= limit {
        let kind = be32(first, at);
        let len = be32(first, at + 4) as usize;
        let data_start = at + 8;
        let data_end = data_start
            .checked_add(len)
            .filter(|&end| end <= limit)
            .ok_or_else(|| {
                bad(format!(
                    "header extension {kind:#x} of {len} bytes runs past the first cluster"
                ))
            })?;
        let data = &first[data_start..data_end];
        match kind {
            EXT_END => return Ok(()),
            EXT_BACKING_FORMAT => {
                let name = std::str::from_utf8(data)
                    .map_err(|_| bad("backing format name is not UTF-8".into()))?;
                header.backing_format = Some(match name {
                    "raw" => Format::Raw,
                    "qcow2" => Format::Qcow2,
                    other => {
                        return Err(DiskError::Backing {
                            path: path.to_path_buf(),
                            backing: header.backing_name.clone().unwrap_or_default(),
                            reason: format!(
                                "its format {other:?} is not supported (only raw and qcow2)"
                            ),
                        })
                    }
                });
            }
            EXT_CRYPTO => {
                return Err(DiskError::Encrypted {
                    path: path.to_path_buf(),
                })
            }
            EXT_DATA_FILE => {
                return Err(DiskError::ExternalDataFile {
                    path: path.to_path_buf(),
                })
            }
            _ => {}
        }
        at = data_start + len.div_ceil(8) * 8;
    }
    Ok(())
}
