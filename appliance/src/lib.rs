//! bootbox appliance builder: turns host programs into a cached, supermin-style initramfs
//! (static init + tools + their ELF closures, as an uncompressed newc cpio) and encodes the
//! per-run job the guest init executes.
//!
//! - [`elf`]: ELF header parsing and the shared-library closure (no `ldd`).
//! - [`tree`]: the appliance file tree with host symlinks preserved.
//! - [`cpio`]: deterministic newc writer.
//! - [`cache`]: content-keyed cache of base appliances ([`prepare`], [`find_init`]).
//! - [`job`] / [`jobspec`]: the job description and its `/bootbox/job` archive.
//! - [`memo`]: the assembly memo that spares a warm run the walk of the tree.
//! - [`sha256`]: hashing for cache keys.

pub mod cache;
pub mod cpio;
pub mod elf;
pub mod job;
pub mod memo;
pub mod sha256;
pub mod tree;

/// The job format, shared with the guest init (it lives in the `guest-abi` crate).
pub use guest_abi::jobspec;

pub use cache::{
    default_cache_dir, find_init, initramfs, prepare, read_archive, ApplianceError, ApplianceSpec,
    Prepared, DEFAULT_TOOLS, DISK_ONLY_TOOLS, DISK_TOOLS,
};
pub use job::{
    default_mount_point, disk_device_name, job_cpio, DiskAttachment, Job, JobSpecError, ShareMount,
};
