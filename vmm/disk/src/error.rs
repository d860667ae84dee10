//! The one error type of the crate: every way opening or reading an image can fail, each with
//! a one-line message that names the file and says what is wrong.

use std::io;
use std::path::PathBuf;

/// Why an image could not be opened, read or written.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open disk image {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot {what} disk image {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a qcow2 image (no QFI\\xfb magic), but qcow2 was asked for")]
    NotQcow2 { path: PathBuf },
    #[error("{path}: qcow2 version {version} is not supported (only 2 and 3)")]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("{path}: invalid qcow2 header: {reason}")]
    BadHeader { path: PathBuf, reason: String },
    #[error("{path}: encrypted qcow2 images are not supported")]
    Encrypted { path: PathBuf },
    #[error("{path}: qcow2 images with an external data file are not supported")]
    ExternalDataFile { path: PathBuf },
    #[error("{path}: qcow2 images with extended L2 entries (subclusters) are not supported")]
    ExtendedL2 { path: PathBuf },
    #[error("{path}: qcow2 image uses unknown incompatible features {bits:#x}")]
    UnknownFeatures { path: PathBuf, bits: u64 },
    #[error("{path}: qcow2 compression type {kind} is not supported (only 0, zlib, and 1, zstd)")]
    UnknownCompression { path: PathBuf, kind: u8 },
    #[error("{path}: backing file {backing:?} cannot be used: {reason}")]
    Backing {
        path: PathBuf,
        backing: String,
        reason: String,
    },
    #[error("{path}: backing chain is deeper than {max} images")]
    BackingTooDeep { path: PathBuf, max: usize },
    #[error("{path}: backing chain loops back to an image already in the chain")]
    BackingLoop { path: PathBuf },
    #[error("{path}: corrupt qcow2 image: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("qcow2 images are opened read-only; {path} cannot be opened for writing")]
    Qcow2Writable { path: PathBuf },
    #[error("access of {len} bytes at offset {offset} is outside the {size}-byte image")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("the image is read-only")]
    ReadOnly,
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, DiskError>;
