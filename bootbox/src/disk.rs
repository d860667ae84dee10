//! `--disk IMAGE[:ro|rw][:raw|qcow2]`: disk images attached as virtio-blk devices, which the
//! guest names `/dev/vda`, `/dev/vdb`, ... in the order given. One grammar for `run`, `initrd`
//! and `bench`.
//!
//! Clap calls [`parse_disk`] once per argument: the image is opened there, once (read-only
//! unless `:rw`; a qcow2 image with its whole backing chain), its format found from its content
//! unless named, and every size and offset it declares checked (the `disk` crate), so a
//! missing, corrupt, encrypted or lying image is a one-line error before anything boots.
//!
//! Because every image file is open before the monitor confines itself, the Landlock policy
//! names no image path at all: the confined monitor keeps the descriptors it has and cannot
//! open any image (or any file next to one) again. Reads and writes on those descriptors run on
//! the block worker pool, whose seccomp role allows just that ([`vmm::sandbox::ThreadRole::BlockWorker`]);
//! a read-only image's descriptor is `O_RDONLY`, so even a fooled worker cannot write it.
//!
//! Grammar: fields are separated by `:`; after IMAGE come at most one mode (`ro`, the default,
//! or `rw`) and at most one format (`raw` or `qcow2`), in either order. A `:` inside IMAGE is
//! written `\:` (and a `\` right before a `:` as `\\`), as for `--share`.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;

use disk::{DiskError, Format, OpenOptions};
use p9::WorkerPool;
use vmm::devices::virtio::block::{self, Block, BlockError, ID_LEN};
use vmm::vm::Vm;

use crate::share::split_fields;

/// The value name clap shows for `--disk`.
pub const DISK_GRAMMAR: &str = "IMAGE[:ro|rw][:raw|qcow2]";

/// What `--help` says about `--disk`, the same for every subcommand.
pub const DISK_HELP: &str = "Attach a disk image as /dev/vda, /dev/vdb, ... in the order given: \
    IMAGE[:ro|rw][:raw|qcow2]. Read-only unless :rw (the image is opened read-only and the \
    guest sees a read-only disk); the format is found from the content unless named. qcow2 \
    images (with backing files, compressed clusters) are read-only. Write a ':' in IMAGE as '\\:'";

/// Block worker threads shared by all disks of a run.
const BLOCK_WORKERS: usize = 2;

/// One disk image, opened and checked.
#[derive(Debug, Clone)]
pub struct Disk {
    /// The argument as given (passed on unchanged by `bench`).
    pub spec: String,
    /// The image file as given.
    pub path: PathBuf,
    /// The opened image (and its backing chain).
    pub image: Arc<dyn disk::Image>,
    /// The guest sees a read-only disk (the default).
    pub read_only: bool,
    /// The image file's device and inode, to refuse attaching one file twice writable.
    pub identity: (u64, u64),
}

/// Why a `--disk` argument is refused.
#[derive(Debug, thiserror::Error)]
pub enum DiskSpecError {
    #[error("expected {DISK_GRAMMAR} (write a ':' in IMAGE as '\\:')")]
    Grammar,
    #[error("the image path is empty")]
    EmptyPath,
    #[error(
        "unknown option ':{0}': expected ro, rw, raw or qcow2 (write a ':' in IMAGE as '\\:')"
    )]
    UnknownOption(String),
    #[error("the {0} is given twice")]
    Repeated(&'static str),
    #[error("{0} is not a regular file")]
    NotAFile(String),
    #[error("{0} is empty: a disk needs at least one byte")]
    EmptyImage(String),
    #[error("{0}")]
    Image(#[from] DiskError),
}

/// Why a set of disks cannot be used together or attached.
#[derive(Debug, thiserror::Error)]
pub enum DiskSetError {
    #[error(
        "{0} is attached twice and at least once writable: the guest would see two disks \
         changing under each other"
    )]
    WritableTwice(String),
    #[error(
        "too many devices: {disks} disk(s) and {shares} share(s) need {needed} virtio slots, \
         the VM has {max}"
    )]
    TooMany {
        disks: usize,
        shares: usize,
        needed: usize,
        max: usize,
    },
    #[error("disk {path}: {source}")]
    Block {
        path: String,
        #[source]
        source: BlockError,
    },
    #[error("disk {path}: {source}")]
    Attach {
        path: String,
        #[source]
        source: vmm::VmError,
    },
}

/// The clap value parser of `--disk`: parses, opens and checks the image.
pub fn parse_disk(spec: &str) -> Result<Disk, DiskSpecError> {
    let mut fields = split_fields(spec.as_bytes());
    let mut read_only = None;
    let mut format = None;
    while fields.len() > 1 {
        let last = fields.pop().unwrap_or_default();
        match last.as_slice() {
            b"ro" | b"rw" if read_only.is_some() => return Err(DiskSpecError::Repeated("mode")),
            b"ro" => read_only = Some(true),
            b"rw" => read_only = Some(false),
            b"raw" | b"qcow2" if format.is_some() => return Err(DiskSpecError::Repeated("format")),
            b"raw" => format = Some(Format::Raw),
            b"qcow2" => format = Some(Format::Qcow2),
            other => {
                return Err(DiskSpecError::UnknownOption(
                    String::from_utf8_lossy(other).into_owned(),
                ))
            }
        }
    }
    let Some(path) = fields.pop() else {
        return Err(DiskSpecError::Grammar);
    };
    if path.is_empty() {
        return Err(DiskSpecError::EmptyPath);
    }
    let path = PathBuf::from(OsString::from_vec(path));
    let read_only = read_only.unwrap_or(true);
    let shown = path.display().to_string();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(&path)
        .map_err(|source| DiskError::Open {
            path: path.clone(),
            source,
        })?;
    // The opened file, not the path looked up again.
    let meta = file.metadata().map_err(|source| DiskError::Open {
        path: path.clone(),
        source,
    })?;
    if !meta.is_file() {
        return Err(DiskSpecError::NotAFile(shown));
    }
    if meta.len() == 0 {
        return Err(DiskSpecError::EmptyImage(shown));
    }
    let options = OpenOptions {
        format,
        writable: !read_only,
    };
    let image = disk::open_file(file, &path, options)?;
    if image.is_empty() {
        return Err(DiskSpecError::EmptyImage(shown));
    }
    Ok(Disk {
        spec: spec.to_string(),
        path,
        image: Arc::from(image),
        read_only,
        identity: (meta.dev(), meta.ino()),
    })
}

/// Checks the disks as a set, next to `shares` shares: one file is never attached twice when
/// either is writable, and everything fits the VM's virtio slots (two go to the consoles).
pub fn check_disks(disks: &[Disk], shares: usize) -> Result<(), DiskSetError> {
    for (i, d) in disks.iter().enumerate() {
        let twice = disks[..i]
            .iter()
            .any(|e| e.identity == d.identity && !(e.read_only && d.read_only));
        if twice {
            return Err(DiskSetError::WritableTwice(d.path.display().to_string()));
        }
    }
    let max = vmm::boot::layout::VIRTIO_MMIO_MAX_DEVICES as usize;
    let needed = disks.len() + shares + 2;
    if needed > max {
        return Err(DiskSetError::TooMany {
            disks: disks.len(),
            shares,
            needed,
            max,
        });
    }
    for d in disks {
        log::info!(
            "disk {} ({}, {} bytes), {}",
            d.path.display(),
            d.image.format(),
            d.image.len(),
            if d.read_only {
                "read-only"
            } else {
                "read-write"
            }
        );
    }
    Ok(())
}

/// The disk's serial (`/sys/block/vdX/serial` in the guest): its file name, cut to fit.
fn serial(disk: &Disk) -> String {
    let name = disk
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut end = name.len().min(ID_LEN);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_string()
}

/// Adds a virtio-blk device per disk, in order (so the guest names them vda, vdb, ...), all
/// served by one block worker pool, which is returned (None without disks).
pub fn attach(vm: &mut Vm, disks: &[Disk]) -> Result<Option<Arc<WorkerPool>>, DiskSetError> {
    if disks.is_empty() {
        return Ok(None);
    }
    let pool = Arc::new(block::worker_pool(
        BLOCK_WORKERS,
        "block-worker",
        vm.stats_enabled(),
    ));
    for d in disks {
        let path = d.path.display().to_string();
        let dev = Block::new(d.image.clone(), d.read_only, &serial(d), pool.clone()).map_err(
            |source| DiskSetError::Block {
                path: path.clone(),
                source,
            },
        )?;
        vm.add_virtio_device("virtio-blk", Box::new(dev))
            .map_err(|source| DiskSetError::Attach { path, source })?;
    }
    Ok(Some(pool))
}

/// What the job tells the init about the disks.
pub fn attachments(disks: &[Disk]) -> Vec<guest_abi::jobspec::DiskAttachment> {
    disks
        .iter()
        .map(|d| guest_abi::jobspec::DiskAttachment {
            read_only: d.read_only,
        })
        .collect()
}

/// `bootbox initrd`'s lines for another VMM: image, guest device, mode, format.
pub fn print_attachments(disks: &[Disk]) {
    for (i, d) in disks.iter().enumerate() {
        println!(
            "disk {} device {} {} {}",
            d.path.display(),
            guest_abi::jobspec::disk_device_name(i),
            if d.read_only { "ro" } else { "rw" },
            d.image.format()
        );
    }
}

/// `bench --disk`: the benchmarked `run` arguments with a `--disk` per disk, as given, right
/// after `run` (disks keep their order).
pub fn with_disk_args(target: Vec<String>, disks: &[Disk]) -> Result<Vec<String>, String> {
    if disks.is_empty() {
        return Ok(target);
    }
    let Some((sub, rest)) = target.split_first() else {
        return Err("--disk needs a `run` command to benchmark".into());
    };
    if sub != "run" {
        return Err(format!(
            "--disk is passed to `bootbox run`, but the benchmarked command is `{sub}`"
        ));
    }
    let mut out = vec![sub.clone()];
    for d in disks {
        out.push("--disk".into());
        out.push(d.spec.clone());
    }
    out.extend(rest.iter().cloned());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn image(dir: &std::path::Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    #[test]
    fn options_in_either_order_and_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), "a.img", &[7u8; 4096]);
        let s = p.to_str().unwrap();
        let d = parse_disk(s).unwrap();
        assert!(d.read_only);
        assert_eq!(d.image.format(), Format::Raw);
        assert!(!d.image.is_writable());
        let d = parse_disk(&format!("{s}:rw:raw")).unwrap();
        assert!(!d.read_only && d.image.is_writable());
        let d = parse_disk(&format!("{s}:raw:ro")).unwrap();
        assert!(d.read_only && !d.image.is_writable());
        assert_eq!(serial(&d), "a.img");
    }

    #[test]
    fn bad_arguments_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), "a.img", &[0u8; 512]);
        let s = p.to_str().unwrap();
        let err = |spec: &str| parse_disk(spec).unwrap_err().to_string();
        assert!(err(&format!("{s}:ro:rw")).contains("mode is given twice"));
        assert!(err(&format!("{s}:raw:qcow2")).contains("format is given twice"));
        assert!(err(&format!("{s}:fast")).contains("unknown option ':fast'"));
        assert!(err(":ro").contains("empty"));
        assert!(err(&format!("{s}:qcow2")).contains("not a qcow2 image"));
        assert!(err(dir.path().to_str().unwrap()).contains("not a regular file"));
        let empty = image(dir.path(), "empty.img", b"");
        assert!(err(empty.to_str().unwrap()).contains("is empty"));
        assert!(err("/nonexistent/x.img").contains("No such file"));
    }

    #[test]
    fn escaped_colons_belong_to_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), "a:b.img", &[1u8; 1024]);
        let escaped = p.to_str().unwrap().replace(':', "\\:");
        let d = parse_disk(&format!("{escaped}:ro")).unwrap();
        assert_eq!(d.path, p);
        assert_eq!(d.image.len(), 1024);
    }

    #[test]
    fn bench_puts_disks_right_after_run() {
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), "a.img", &[0u8; 512]);
        let spec = format!("{}:ro", p.display());
        let d = parse_disk(&spec).unwrap();
        let target: Vec<String> = ["run", "--mount-disks", "--", "true"]
            .map(String::from)
            .to_vec();
        let out = with_disk_args(target.clone(), std::slice::from_ref(&d)).unwrap();
        assert_eq!(out, ["run", "--disk", &spec, "--mount-disks", "--", "true"]);
        assert_eq!(with_disk_args(target, &[]).unwrap().len(), 4);
        assert!(with_disk_args(vec!["boot".into()], &[d]).is_err());
    }

    #[test]
    fn one_file_twice_only_when_both_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), "a.img", &[0u8; 512]);
        let s = p.to_str().unwrap();
        let ro = parse_disk(s).unwrap();
        let rw = parse_disk(&format!("{s}:rw")).unwrap();
        assert!(check_disks(&[ro.clone(), ro.clone()], 0).is_ok());
        assert!(matches!(
            check_disks(&[ro.clone(), rw], 0),
            Err(DiskSetError::WritableTwice(_))
        ));
        let many = vec![ro; 18];
        assert!(matches!(
            check_disks(&many, 0),
            Err(DiskSetError::TooMany { .. })
        ));
    }
}
