//! The guest side of `--disk` and `--mount-disks`: before the job runs, the init marks the
//! disks the job lists as read-only in the guest kernel, and with `mount_disks` mounts every
//! filesystem it recognises on every virtio disk (the whole disk and each partition)
//! read-only under `/disk/<device>` (`/disk/vda`, `/disk/vda1`, ...).
//!
//! The filesystem type comes from a small superblock sniffer ([`identify`]), not from trying
//! every type in turn: each type is mounted with options that never write to the image
//! (`noload` for ext2/3/4, `norecovery` for xfs, `rescue=nologreplay` for btrfs: no journal
//! or log replay; the others write nothing on a read-only mount). A disk with a filesystem that
//! does not mount is reported as one line on the job's stderr and the job runs anyway; a disk
//! with nothing recognisable (a blank disk, a partition table without filesystem) is skipped
//! quietly.
//!
//! LVM: when a disk or partition carries an LVM physical volume label and the appliance has
//! the `lvm` tool, the init activates every volume group read-only (no udev in the guest, so
//! LVM makes its own device nodes) and mounts each logical volume's filesystem under
//! `/disk/<vg>-<lv>`, the device-mapper name. Activation writes nothing to the disks.

use guest_abi::jobspec::{disk_device_name, Job};

use crate::{mount, say};

/// A filesystem the sniffer recognises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fs {
    /// ext2, ext3 and ext4 alike (the ext4 driver mounts all three).
    Ext,
    Xfs,
    Btrfs,
    Vfat,
    Exfat,
    Iso9660,
    Squashfs,
    Ntfs,
}

impl Fs {
    /// The kernel's filesystem type and the mount options that keep the image untouched.
    pub fn mount_type_and_options(self) -> (&'static str, &'static str) {
        match self {
            Fs::Ext => ("ext4", "noload"),
            Fs::Xfs => ("xfs", "norecovery"),
            Fs::Btrfs => ("btrfs", "rescue=nologreplay"),
            // Long names are UTF-16 on disk; show them as UTF-8.
            Fs::Vfat => ("vfat", "utf8"),
            Fs::Exfat => ("exfat", "iocharset=utf8"),
            Fs::Iso9660 => ("iso9660", ""),
            Fs::Squashfs => ("squashfs", ""),
            // ntfs3 shows names in CONFIG_NLS_DEFAULT (iso8859-1) unless told otherwise.
            Fs::Ntfs => ("ntfs3", "iocharset=utf8"),
        }
    }
}

/// Bytes at `offset`, `len` of them, or None when the device is shorter or unreadable.
pub type ReadAt<'a> = dyn Fn(u64, usize) -> Option<Vec<u8>> + 'a;

fn bytes_at(read: &ReadAt<'_>, offset: u64, expect: &[u8]) -> bool {
    read(offset, expect.len()).is_some_and(|b| b == expect)
}

/// Whether the sector at 0 is a FAT boot sector with a plausible BIOS parameter block (a
/// partition table's MBR carries the same 0x55AA signature, so the signature alone is not
/// enough).
fn is_fat(read: &ReadAt<'_>) -> bool {
    let Some(b) = read(0, 512) else {
        return false;
    };
    let bytes_per_sector = u16::from_le_bytes([b[11], b[12]]);
    let sectors_per_cluster = b[13];
    let reserved = u16::from_le_bytes([b[14], b[15]]);
    let fats = b[16];
    b[510..512] == [0x55, 0xAA]
        && matches!(bytes_per_sector, 512 | 1024 | 2048 | 4096)
        && sectors_per_cluster.is_power_of_two()
        && reserved > 0
        && (1..=2).contains(&fats)
        && (&b[54..57] == b"FAT" || &b[82..87] == b"FAT32")
}

/// Identifies the filesystem that starts at offset 0 of a device, by its superblock magic.
pub fn identify(read: &ReadAt<'_>) -> Option<Fs> {
    if bytes_at(read, 0, b"hsqs") {
        return Some(Fs::Squashfs);
    }
    if bytes_at(read, 0, b"XFSB") {
        return Some(Fs::Xfs);
    }
    if bytes_at(read, 0x1_0040, b"_BHRfS_M") {
        return Some(Fs::Btrfs);
    }
    if bytes_at(read, 1024 + 0x38, &[0x53, 0xEF]) {
        return Some(Fs::Ext);
    }
    if bytes_at(read, 3, b"NTFS    ") {
        return Some(Fs::Ntfs);
    }
    if bytes_at(read, 3, b"EXFAT   ") {
        return Some(Fs::Exfat);
    }
    if bytes_at(read, 16 * 2048 + 1, b"CD001") {
        return Some(Fs::Iso9660);
    }
    if is_fat(read) {
        return Some(Fs::Vfat);
    }
    None
}

/// Whether a device carries an LVM2 physical volume label (`LABELONE` in one of its first
/// four sectors, with the `LVM2 001` type at byte 24 of that sector).
pub fn is_lvm_pv(read: &ReadAt<'_>) -> bool {
    (0..4u64).any(|sector| {
        bytes_at(read, sector * 512, b"LABELONE") && bytes_at(read, sector * 512 + 24, b"LVM2 001")
    })
}

/// Reads `len` bytes at `offset` of an open device.
fn pread_exact(fd: i32, offset: u64, len: usize) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let off = libc::off_t::try_from(offset + done as u64).ok()?;
        // SAFETY: buf[done..] is writable for len - done bytes; fd is an open descriptor.
        let n = unsafe { libc::pread(fd, buf[done..].as_mut_ptr().cast(), len - done, off) };
        if n <= 0 {
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return None;
        }
        done += n as usize;
    }
    Some(buf)
}

/// What `look` finds on `/dev/<name>` (None when it cannot be opened).
fn sniff_device<T>(name: &str, look: impl FnOnce(&ReadAt<'_>) -> T) -> Option<T> {
    let path = std::ffi::CString::new(format!("/dev/{name}")).ok()?;
    // SAFETY: path is a valid NUL-terminated string.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    let found = look(&|offset, len| pread_exact(fd, offset, len));
    // SAFETY: closing the descriptor opened above.
    unsafe { libc::close(fd) };
    Some(found)
}

/// The filesystem on `/dev/<name>`, if one is recognised.
fn identify_device(name: &str) -> Option<Fs> {
    sniff_device(name, identify).flatten()
}

/// The partitions of disk `disk` (`vda1`, `vda2`, ...), as the kernel lists them in sysfs.
fn partitions(disk: &str) -> Vec<String> {
    let mut parts: Vec<String> = std::fs::read_dir(format!("/sys/block/{disk}"))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| {
                    n.starts_with(disk)
                        && std::path::Path::new(&format!("/sys/block/{disk}/{n}/partition"))
                            .exists()
                })
                .collect()
        })
        .unwrap_or_default();
    parts.sort_by_key(|p| (p.len(), p.clone()));
    parts
}

/// The virtio disks the kernel found (`vda`, `vdb`, ...), in order.
fn virtio_disks() -> Vec<String> {
    let mut disks: Vec<String> = std::fs::read_dir("/sys/block")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with("vd"))
                .collect()
        })
        .unwrap_or_default();
    disks.sort_by_key(|d| (d.len(), d.clone()));
    disks
}

/// Marks `/dev/<name>` read-only in the guest kernel (BLKROSET): writes to it fail and
/// filesystems on it mount read-only only.
fn set_read_only(name: &str) -> Result<(), String> {
    const BLKROSET: libc::c_ulong = 0x125d;
    let path = std::ffi::CString::new(format!("/dev/{name}")).map_err(|e| e.to_string())?;
    // SAFETY: path is a valid NUL-terminated string.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(format!("/dev/{name}: {}", std::io::Error::last_os_error()));
    }
    let one: libc::c_int = 1;
    // SAFETY: BLKROSET reads one int through the pointer, which points at `one`.
    let r = unsafe { libc::ioctl(fd, BLKROSET, &one as *const libc::c_int) };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing the descriptor opened above.
    unsafe { libc::close(fd) };
    if r != 0 {
        return Err(format!("/dev/{name}: {err}"));
    }
    Ok(())
}

/// Everything the job asks of the disks; problems are reported and never stop the job.
pub fn prepare(job: &Job) {
    for (index, disk) in job.disks.iter().enumerate() {
        let name = disk_device_name(index);
        if !std::path::Path::new(&format!("/sys/block/{name}")).exists() {
            say(&format!(
                "disk {name} is missing (the VMM did not attach it)"
            ));
            continue;
        }
        if disk.read_only {
            for dev in std::iter::once(name.clone()).chain(partitions(&name)) {
                if let Err(e) = set_read_only(&dev) {
                    say(&format!("cannot make {dev} read-only: {e}"));
                }
            }
        }
    }
    if job.mount_disks {
        mount_all();
    }
}

/// Mounts every recognised filesystem of every virtio disk under `/disk/<device>`, and of
/// every LVM logical volume on them under `/disk/<vg>-<lv>`.
fn mount_all() {
    let mut physical_volumes = false;
    for disk in virtio_disks() {
        for dev in std::iter::once(disk.clone()).chain(partitions(&disk)) {
            match identify_device(&dev) {
                Some(fs) => mount_read_only(&dev, &dev, fs),
                None => physical_volumes |= sniff_device(&dev, is_lvm_pv).unwrap_or(false),
            }
        }
    }
    if physical_volumes {
        for (dm, name) in activate_volume_groups() {
            if let Some(fs) = identify_device(&dm) {
                mount_read_only(&dm, &name, fs);
            }
        }
    }
}

/// Mounts `/dev/<dev>` (filesystem `fs`) read-only at `/disk/<at>`; a failure is reported.
fn mount_read_only(dev: &str, at: &str, fs: Fs) {
    let (fstype, options) = fs.mount_type_and_options();
    let flags = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
    if let Err(e) = mount(
        &format!("/dev/{dev}"),
        &format!("/disk/{at}"),
        fstype,
        flags,
        options,
    ) {
        say(&format!("disk {at}: {e}"));
        // An empty mount point left behind would look like an empty filesystem.
        if let Ok(dir) = std::ffi::CString::new(format!("/disk/{at}")) {
            // SAFETY: dir is a valid NUL-terminated string.
            unsafe { libc::rmdir(dir.as_ptr()) };
        }
    }
}

/// LVM settings for a guest without udev (LVM scans /dev itself and makes its own nodes),
/// with `activation` settings added to that section (one section, so no setting depends on
/// how LVM combines a section given twice).
fn lvm_config(activation: &str) -> String {
    format!(
        "devices {{ obtain_device_list_from_udev = 0 }} \
         activation {{ udev_sync = 0 udev_rules = 0 {activation} }}"
    )
}

/// The `lvm` tool, if the appliance has it.
fn lvm_tool() -> Option<std::path::PathBuf> {
    [
        "/usr/sbin/lvm",
        "/sbin/lvm",
        "/usr/bin/lvm",
        "/usr/local/sbin/lvm",
    ]
    .iter()
    .map(std::path::PathBuf::from)
    .find(|p| p.is_file())
}

/// Runs `lvm ARGS` with the no-udev settings plus `activation` settings; its stdout, or why
/// not.
fn lvm(tool: &std::path::Path, activation: &str, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new(tool)
        .args(args)
        .arg("--config")
        .arg(lvm_config(activation))
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!("{}: {}", out.status, err.trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Activates every volume group read-only; returns each active device-mapper device with its
/// name (`dm-0`, `vg-lv`). Problems are reported; none stops the job.
fn activate_volume_groups() -> Vec<(String, String)> {
    let Some(tool) = lvm_tool() else {
        say("a disk holds LVM volumes, but the appliance has no lvm tool (install lvm2 on the host)");
        return Vec::new();
    };
    let groups = match lvm(&tool, "", &["vgs", "--noheadings", "-o", "vg_name"]) {
        Ok(out) => out
            .split_whitespace()
            .map(|g| format!("\"{g}\""))
            .collect::<Vec<_>>(),
        Err(e) => {
            say(&format!("cannot list LVM volume groups: {e}"));
            return Vec::new();
        }
    };
    if groups.is_empty() {
        return Vec::new();
    }
    // Every group read-only: device-mapper tables that never write to the disks.
    let read_only = format!("read_only_volume_list = [ {} ]", groups.join(", "));
    if let Err(e) = lvm(&tool, &read_only, &["vgchange", "-ay", "--sysinit"]) {
        say(&format!("cannot activate LVM volume groups: {e}"));
    }
    device_mapper_devices()
}

/// The device-mapper devices the kernel has (`dm-0`) with their names (`vg-lv`).
fn device_mapper_devices() -> Vec<(String, String)> {
    let mut found: Vec<(String, String)> = std::fs::read_dir("/sys/block")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with("dm-"))
                .filter_map(|dm| {
                    let name = std::fs::read_to_string(format!("/sys/block/{dm}/dm/name")).ok()?;
                    let name = name.trim().to_string();
                    (!name.is_empty() && !name.contains('/')).then_some((dm, name))
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(size: usize, patches: Patches) -> Vec<u8> {
        let mut d = vec![0u8; size];
        for (off, bytes) in patches {
            d[*off..*off + bytes.len()].copy_from_slice(bytes);
        }
        d
    }

    fn sniff(d: &[u8]) -> Option<Fs> {
        identify(&|offset, len| {
            let start = usize::try_from(offset).ok()?;
            d.get(start..start.checked_add(len)?).map(<[u8]>::to_vec)
        })
    }

    /// A FAT boot sector as mkfs.vfat writes it (FAT16 flavour unless `fat32`).
    fn fat_boot_sector(fat32: bool) -> Vec<u8> {
        let mut b = device(512, &[(510, &[0x55, 0xAA])]);
        b[11..13].copy_from_slice(&512u16.to_le_bytes());
        b[13] = 4;
        b[14..16].copy_from_slice(&4u16.to_le_bytes());
        b[16] = 2;
        if fat32 {
            b[82..90].copy_from_slice(b"FAT32   ");
        } else {
            b[54..62].copy_from_slice(b"FAT16   ");
        }
        b
    }

    /// Bytes to place at offsets of a blank device.
    type Patches<'a> = &'a [(usize, &'a [u8])];

    #[test]
    fn each_superblock_magic_is_recognised() {
        let cases: [(Patches, Fs); 7] = [
            (&[(0, b"hsqs")], Fs::Squashfs),
            (&[(0, b"XFSB")], Fs::Xfs),
            (&[(0x1_0040, b"_BHRfS_M")], Fs::Btrfs),
            (&[(0x438, &[0x53, 0xEF])], Fs::Ext),
            (&[(3, b"NTFS    ")], Fs::Ntfs),
            (&[(3, b"EXFAT   ")], Fs::Exfat),
            (&[(0x8001, b"CD001")], Fs::Iso9660),
        ];
        for (patches, fs) in cases {
            assert_eq!(sniff(&device(0x2_0000, patches)), Some(fs), "{fs:?}");
        }
        for fat32 in [false, true] {
            let mut d = device(0x2_0000, &[]);
            d[..512].copy_from_slice(&fat_boot_sector(fat32));
            assert_eq!(sniff(&d), Some(Fs::Vfat));
        }
    }

    #[test]
    fn partition_tables_blank_and_short_devices_are_nothing() {
        assert_eq!(sniff(&device(0x2_0000, &[])), None);
        // A (protective) MBR: the 0x55AA signature without a FAT parameter block.
        let mbr = device(
            0x2_0000,
            &[(510, &[0x55, 0xAA]), (446, &[0, 0, 2, 0, 0xEE])],
        );
        assert_eq!(sniff(&mbr), None);
        // A device too short for some superblocks is not an error.
        assert_eq!(sniff(&device(1024, &[])), None);
        assert_eq!(sniff(&[]), None);
        // A FAT-looking sector with an impossible sector size is not FAT.
        let mut d = device(4096, &[]);
        d[..512].copy_from_slice(&fat_boot_sector(false));
        d[11..13].copy_from_slice(&100u16.to_le_bytes());
        assert_eq!(sniff(&d), None);
    }

    #[test]
    fn an_lvm_label_in_any_of_the_first_four_sectors_is_a_physical_volume() {
        let pv = |d: &[u8]| {
            is_lvm_pv(&|off, len| {
                let (off, end) = (off as usize, off as usize + len);
                (end <= d.len()).then(|| d[off..end].to_vec())
            })
        };
        // pvcreate writes its label to the second sector.
        let label = device(4096, &[(512, b"LABELONE"), (512 + 24, b"LVM2 001")]);
        assert!(pv(&label));
        assert_eq!(sniff(&label), None, "a PV is not a filesystem");
        let last = device(4096, &[(1536, b"LABELONE"), (1536 + 24, b"LVM2 001")]);
        assert!(pv(&last));
        // The label's type must be LVM2's; the fifth sector is too far; short devices are not.
        assert!(!pv(&device(
            4096,
            &[(512, b"LABELONE"), (512 + 24, b"LVM1 001")]
        )));
        assert!(!pv(&device(
            4096,
            &[(2048, b"LABELONE"), (2048 + 24, b"LVM2 001")]
        )));
        assert!(!pv(&device(520, &[(512, b"LABELONE")])));
    }

    #[test]
    fn mount_options_never_replay_a_journal() {
        assert_eq!(Fs::Ext.mount_type_and_options(), ("ext4", "noload"));
        assert_eq!(Fs::Xfs.mount_type_and_options(), ("xfs", "norecovery"));
        assert_eq!(
            Fs::Btrfs.mount_type_and_options(),
            ("btrfs", "rescue=nologreplay")
        );
    }

    /// The sniffer against what the real mkfs tools write (scripts/make-test-images.sh), when
    /// the host has them.
    #[test]
    fn real_images_are_recognised() {
        use std::os::unix::fs::FileExt;
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let work = std::env::temp_dir().join(format!("bootbox-sniff-{}", std::process::id()));
        let src = work.join("src");
        std::fs::create_dir_all(src.join("d")).unwrap();
        std::fs::write(src.join("d/file"), b"contents").unwrap();
        let made = std::process::Command::new(root.join("scripts/make-test-images.sh"))
            .arg(work.join("img"))
            .arg(&src)
            .output()
            .unwrap();
        if !made.status.success() {
            eprintln!(
                "SKIP: make-test-images.sh failed (scripts/setup.sh installs the tools): {}",
                String::from_utf8_lossy(&made.stderr).trim()
            );
            std::fs::remove_dir_all(&work).unwrap();
            return;
        }
        let sniff_file = |name: &str, base: u64| {
            let f = std::fs::File::open(work.join("img").join(name)).unwrap();
            identify(&|offset, len| {
                let mut buf = vec![0u8; len];
                f.read_exact_at(&mut buf, base + offset).ok().map(|()| buf)
            })
        };
        let expected = [
            ("ext4.img", Some(Fs::Ext)),
            ("vfat.img", Some(Fs::Vfat)),
            ("squashfs.img", Some(Fs::Squashfs)),
            ("iso9660.iso", Some(Fs::Iso9660)),
            ("btrfs.img", Some(Fs::Btrfs)),
            ("xfs.img", Some(Fs::Xfs)),
            // The GPT disk itself holds no filesystem; its partition 1 (at 1 MiB) is ext4.
            ("gpt.img", None),
        ];
        for (name, fs) in expected {
            assert_eq!(sniff_file(name, 0), fs, "{name}");
        }
        assert_eq!(sniff_file("gpt.img", 1 << 20), Some(Fs::Ext));
        std::fs::remove_dir_all(&work).unwrap();
    }
}
