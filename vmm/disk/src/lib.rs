//! Disk images for bootbox's virtio-blk device: raw files and read-only qcow2 (v2 and v3, with
//! backing chains, zero clusters and compressed clusters, zlib or zstd), behind one [`Image`]
//! interface that reads (and, for raw images opened writable, writes) at byte offsets from any
//! thread.
//!
//! The format is found from the content ([`detect`]: the qcow2 magic, else raw), never from the
//! file name; a format the caller names wins, except that naming qcow2 for a file without the
//! qcow2 magic is an error. Every size and offset an image declares is checked against the
//! file before use, so a hostile image yields a [`DiskError`], never a panic or an unbounded
//! allocation.
//!
//! Modules: [`raw`] (plain files, `pread`/`preadv`), [`qcow2`] (header validation, L1/L2
//! lookup with a bounded L2 cache, backing files, deflate and zstd decompression) and
//! [`error`].

pub mod error;
pub mod qcow2;
pub mod raw;

pub use error::{DiskError, Result};
pub use qcow2::Qcow2;
pub use raw::Raw;

use std::fmt;
use std::fs::File;
use std::io::IoSliceMut;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::str::FromStr;

/// The first four bytes of every qcow2 image.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// An image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The file's bytes are the disk's bytes.
    Raw,
    /// QEMU copy-on-write v2/v3, read-only here.
    Qcow2,
}

impl Format {
    /// The format's usual name ("raw", "qcow2").
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A format name that is neither "raw" nor "qcow2".
#[derive(Debug, thiserror::Error)]
#[error("unknown disk image format {0:?} (known: raw, qcow2)")]
pub struct UnknownFormat(pub String);

impl FromStr for Format {
    type Err = UnknownFormat;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            other => Err(UnknownFormat(other.to_string())),
        }
    }
}

/// A disk image: a fixed number of bytes readable at any offset, from many threads at once.
///
/// Every access must lie inside `[0, len())`; one that does not is a
/// [`DiskError::OutOfRange`], never a short read.
pub trait Image: Send + Sync + fmt::Debug {
    /// The image's format.
    fn format(&self) -> Format;

    /// The virtual disk size in bytes.
    fn len(&self) -> u64;

    /// Whether the disk has no bytes at all.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fills `buf` with the disk's bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Fills `bufs`, in order, with the disk's bytes starting at `offset`.
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        check_range(offset, total, self.len())?;
        let mut pos = offset;
        for buf in bufs.iter_mut() {
            self.read_at(buf, pos)?;
            pos += buf.len() as u64;
        }
        Ok(())
    }

    /// The host file whose bytes at every offset are the disk's bytes at the same offset (raw
    /// images), so a caller may `preadv` from it straight into its own buffers.
    fn direct_file(&self) -> Option<&File> {
        None
    }

    /// Whether [`Image::write_at`] may succeed (a raw image opened writable).
    fn is_writable(&self) -> bool {
        false
    }

    /// Writes `buf` at `offset` (never past the end: images do not grow).
    fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(DiskError::ReadOnly)
    }

    /// Makes completed writes durable.
    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

/// How to open an image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenOptions {
    /// The format the user named; `None` detects it from the content.
    pub format: Option<Format>,
    /// Open for writing (raw only; qcow2 is read-only here).
    pub writable: bool,
}

/// Opens the image at `path`.
pub fn open(path: &Path, options: OpenOptions) -> Result<Box<dyn Image>> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(options.writable)
        .open(path)
        .map_err(|source| DiskError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    open_file(file, path, options)
}

/// Opens an already-open `file`, known to the user as `path` (for messages and for finding a
/// qcow2 backing file relative to its directory).
pub fn open_file(file: File, path: &Path, options: OpenOptions) -> Result<Box<dyn Image>> {
    let detected = detect_file(&file, path)?;
    match (options.format, detected) {
        (Some(Format::Qcow2), Format::Raw) => Err(DiskError::NotQcow2 {
            path: path.to_path_buf(),
        }),
        (Some(Format::Raw), _) | (None, Format::Raw) => {
            Ok(Box::new(Raw::new(file, path, options.writable)?))
        }
        (_, Format::Qcow2) => {
            if options.writable {
                return Err(DiskError::Qcow2Writable {
                    path: path.to_path_buf(),
                });
            }
            Ok(Box::new(Qcow2::open_file(file, path)?))
        }
    }
}

/// The format of the image at `path`, from its content: qcow2 if it starts with the qcow2
/// magic, raw otherwise.
pub fn detect(path: &Path) -> Result<Format> {
    let file = File::open(path).map_err(|source| DiskError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    detect_file(&file, path)
}

pub(crate) fn detect_file(file: &File, path: &Path) -> Result<Format> {
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < magic.len() {
        match file.read_at(&mut magic[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => return Err(io_error("read", path, source)),
        }
    }
    Ok(if got == magic.len() && magic == QCOW2_MAGIC {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

/// Checks that `len` bytes at `offset` lie inside an image of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DiskError::OutOfRange { offset, len, size }),
    }
}

pub(crate) fn io_error(what: &'static str, path: &Path, source: std::io::Error) -> DiskError {
    DiskError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}
