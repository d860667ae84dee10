//! `--disk` and `--mount-disks` end to end, in one boot (after one that makes some of the
//! images): every filesystem image `scripts/make-test-images.sh` builds (ext4 raw, ext4 in a
//! GPT partition, qcow2 overlay on a qcow2 backing file, zlib- and zstd-compressed qcow2,
//! squashfs, iso9660, vfat, btrfs), plus xfs, exfat, NTFS (ntfs3) and ext4 on an LVM logical
//! volume, is attached at once, mounted by the init, listed and hashed in the guest, and
//! compared with the same listing of the source tree on the host. The same boot checks that a read-only disk
//! refuses writes (and its image is unchanged afterwards) and that an `:rw` raw disk keeps
//! what the guest wrote.
//!
//! The images come from `scripts/make-disk-fixture.sh`: made by `scripts/test.sh` on the host
//! and named by BOOTBOX_DISK_FIXTURE (the nested test host has no mkfs tools), else made here.
//! xfs, exfat, NTFS and an LVM volume group cannot be filled from a directory without root
//! (an xfs protofile cannot name files with white space; the others have no such tool), so a
//! first boot makes them: bootbox itself, with the source tree shared read-only and blank
//! images attached `:rw`, formats and fills them with the host's own mkfs and lvm tools.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{bootbox, host_sh, stdout, Scratch};

/// The fixture's root (`src/`, `images/`), and the scratch directory holding it when it was
/// made here.
fn fixture() -> (PathBuf, Option<Scratch>) {
    if let Some(dir) = std::env::var_os("BOOTBOX_DISK_FIXTURE") {
        let dir = PathBuf::from(dir);
        assert!(
            dir.join("images/ext4.img").is_file(),
            "BOOTBOX_DISK_FIXTURE={} has no images/ext4.img",
            dir.display()
        );
        return (dir, None);
    }
    let scratch = Scratch::new("disk-fixture");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/make-disk-fixture.sh");
    let out = std::process::Command::new(&script)
        .arg(scratch.path().join("fx"))
        .output()
        .expect("cannot run make-disk-fixture.sh");
    assert!(
        out.status.success(),
        "make-disk-fixture.sh failed (scripts/setup.sh installs the tools):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (scratch.path().join("fx"), Some(scratch))
}

/// Lists the tree in the current directory's argument: one line per entry (`path d` for a
/// directory, `path TYPE SIZE` otherwise), then the SHA-256 of every regular file. `$2` is
/// passed to find (`-L` to see symlinks as what they point to).
const LIST_FN: &str = r#"list() {
    cd "$1" || return
    find $2 . -mindepth 1 \( -type d -printf '%P d\n' \) -o -printf '%P %y %s\n' | LC_ALL=C sort
    echo '-- sha256'
    find $2 . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum
}"#;

/// What each filesystem keeps of the tree, for the comparison.
#[derive(Clone, Copy, Debug)]
enum Keeps {
    /// Everything: names, types, sizes, symlinks, contents.
    All,
    /// Everything, plus the `lost+found` directory mkfs.ext4 adds.
    AllWithLostFound,
    /// No symlinks: mtools stored the file a symlink points to (vfat).
    LinksAsFiles,
}

fn sha256_file(path: &Path) -> String {
    host_sh(
        path.parent().unwrap(),
        &format!(
            "sha256sum '{}' | cut -d' ' -f1",
            path.file_name().unwrap().to_str().unwrap()
        ),
    )
}

/// Splits the guest's output into its `== NAME` sections.
fn sections(out: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    for line in out.lines() {
        if let Some(name) = line.strip_prefix("== ") {
            if let Some((n, body)) = current.take() {
                map.insert(n, body);
            }
            current = Some((name.to_string(), String::new()));
        } else if let Some((_, body)) = current.as_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    if let Some((n, body)) = current {
        map.insert(n, body);
    }
    map
}

/// LVM settings for a guest without udev (LVM makes its own device nodes) that keep no
/// metadata backups in the appliance.
const LVM_CONFIG: &str = "devices { obtain_device_list_from_udev = 0 } activation { udev_sync = 0 udev_rules = 0 } backup { backup = 0 archive = 0 }";

/// Makes xfs.img, exfat.img, ntfs.img and lvm.img (volume group `bbvg`, ext4 on its logical
/// volume `data`) in `dir`, each holding the tree `src`, with one boot of bootbox.
fn guest_made_images(src: &Path, dir: &Path) -> [PathBuf; 4] {
    // Sparse files; mkfs.xfs wants at least 300 MiB.
    let sizes = [
        ("xfs.img", 300u64),
        ("exfat.img", 32),
        ("ntfs.img", 32),
        ("lvm.img", 48),
    ];
    let images = sizes.map(|(name, mib)| {
        let path = dir.join(name);
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(mib << 20))
            .unwrap();
        path
    });
    // exfat has no symlinks: it gets the files they point to (cp -L), like vfat.
    let script = format!(
        r#"set -e
fill() {{ mount -t "$1" -o "$2" "$3" /mnt; cp $4 /share/. /mnt/; umount /mnt; }}
mkfs.xfs -q -f -L BOOTBOX /dev/vda
fill xfs rw /dev/vda -r
mkfs.exfat -L BOOTBOX /dev/vdb >/dev/null
fill exfat iocharset=utf8 /dev/vdb -rL
mkntfs -Q -F -L BOOTBOX /dev/vdc >/dev/null 2>&1
fill ntfs3 iocharset=utf8 /dev/vdc -r
lvm pvcreate -q --config '{LVM_CONFIG}' /dev/vdd >/dev/null
lvm vgcreate -q --config '{LVM_CONFIG}' bbvg /dev/vdd >/dev/null
lvm lvcreate -q --config '{LVM_CONFIG}' -n data -l 100%FREE bbvg >/dev/null
mkfs.ext4 -q -L BOOTBOX /dev/mapper/bbvg-data
fill ext4 rw /dev/mapper/bbvg-data -r
lvm vgchange -q --config '{LVM_CONFIG}' -an bbvg >/dev/null
echo images-made
"#
    );
    let mut args: Vec<String> = ["run", "--share"].map(String::from).to_vec();
    args.push(format!("{}:src:ro", src.display()));
    for image in &images {
        args.push("--disk".into());
        args.push(format!("{}:rw:raw", image.display()));
    }
    for tool in [
        "mkfs.xfs",
        "mkfs.exfat",
        "mkntfs",
        "lvm",
        "mkfs.ext4",
        "mount",
        "umount",
    ] {
        args.push("--with".into());
        args.push(tool.into());
    }
    args.extend(["--timeout", "900", "--", "sh", "-c", &script].map(String::from));
    let out = bootbox(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(
        (out.status.code(), stdout(&out).trim()),
        (Some(0), "images-made"),
        "making the xfs, exfat, NTFS and LVM images failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    images
}

#[test]
#[ignore = "boots the real kernel: run by scripts/test.sh with --ignored"]
fn disks_of_every_filesystem_mount_read_only_and_match_the_host() {
    let (fx, _keep) = fixture();
    let images = fx.join("images");
    let src = fx.join("src");
    let scratch = Scratch::new("disks");
    let rw = scratch.path().join("blank.img");
    std::fs::write(&rw, vec![0u8; 1 << 20]).unwrap();
    // A read-only disk with no filesystem: not mounted, so a write to the device meets only
    // the disk's read-only state (a mounted one would answer EBUSY first).
    let ro_blank = scratch.path().join("ro-blank.img");
    std::fs::write(&ro_blank, vec![0x5a; 1 << 20]).unwrap();

    // (image, the device the guest mounts, what the filesystem keeps)
    let mut attached: Vec<(PathBuf, &str, Keeps)> = vec![
        (images.join("ext4.img"), "vda", Keeps::AllWithLostFound),
        (images.join("gpt.img"), "vdb1", Keeps::AllWithLostFound),
        (
            images.join("ext4-overlay.qcow2"),
            "vdc",
            Keeps::AllWithLostFound,
        ),
        (
            images.join("ext4-compressed.qcow2"),
            "vdd",
            Keeps::AllWithLostFound,
        ),
        (images.join("squashfs.img"), "vde", Keeps::All),
        (images.join("iso9660.iso"), "vdf", Keeps::All),
        (images.join("vfat.img"), "vdg", Keeps::LinksAsFiles),
        (images.join("btrfs.img"), "vdh", Keeps::All),
    ];
    let [xfs, exfat, ntfs, lvm] = guest_made_images(&src, scratch.path());
    attached.extend([
        (xfs, "vdi", Keeps::All),
        (exfat, "vdj", Keeps::LinksAsFiles),
        (ntfs, "vdk", Keeps::All),
        // The disk (vdl) holds an LVM physical volume: its logical volume is mounted by name.
        (lvm, "bbvg-data", Keeps::AllWithLostFound),
        (
            images.join("ext4-zstd.qcow2"),
            "vdm",
            Keeps::AllWithLostFound,
        ),
    ]);
    let ro_blank_dev = guest_abi::jobspec::disk_device_name(attached.len());
    let rw_dev = guest_abi::jobspec::disk_device_name(attached.len() + 1);

    let ext4_before = sha256_file(&images.join("ext4.img"));
    let script = format!(
        r#"{LIST_FN}
for d in /disk/*; do echo "== ${{d#/disk/}}"; (list "$d" ""); done
echo "== mounts"
grep ' /disk/' /proc/mounts | while read -r dev dir fs opts rest; do echo "$dir ${{opts%%,*}}"; done
echo "== ro-checks"
touch /disk/vda/new-file 2>&1 && echo touch-succeeded
dd if=/dev/zero of=/dev/vda bs=512 count=1 conv=notrunc,fsync 2>/dev/null && echo dd-succeeded
echo "== ro-device"
dd if=/dev/zero of=/dev/{ro_blank_dev} bs=512 count=1 conv=notrunc,fsync 2>&1 && echo dd-succeeded
echo "== rw"
printf bootbox-wrote-this | dd of=/dev/{rw_dev} bs=1 seek=4096 conv=notrunc,fsync 2>/dev/null && echo written
echo "== lvm-read-only"
cat /sys/block/dm-*/ro
echo "== tools"
blkid -o value -s TYPE /dev/vdb1
lsblk -rno NAME /dev/vdb
"#
    );
    let mut args: Vec<String> = vec!["run".into()];
    for (image, _, _) in &attached {
        args.push("--disk".into());
        args.push(image.to_str().unwrap().to_string());
    }
    args.push("--disk".into());
    args.push(ro_blank.to_str().unwrap().to_string());
    args.push("--disk".into());
    args.push(format!("{}:rw:raw", rw.display()));
    args.extend(
        [
            "--mount-disks",
            "--timeout",
            "900",
            "--",
            "sh",
            "-c",
            &script,
        ]
        .map(String::from),
    );
    let out = bootbox(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.status.code(), Some(0), "the disk job failed");
    let got = sections(&stdout(&out));

    // Exactly the recognised filesystems are mounted (not the GPT disk itself, not the
    // blank disks), each read-only.
    let mut expected_mounts: Vec<String> = attached
        .iter()
        .map(|(_, dev, _)| format!("/disk/{dev} ro"))
        .collect();
    expected_mounts.sort();
    let mut mounts: Vec<String> = got["mounts"].lines().map(String::from).collect();
    mounts.sort();
    assert_eq!(mounts, expected_mounts);

    let host_all = host_sh(&src, &format!("{LIST_FN}\nlist . ''"));
    let host_links_as_files = host_sh(&src, &format!("{LIST_FN}\nlist . -L"));
    for (image, dev, keeps) in &attached {
        let guest = got
            .get(*dev)
            .unwrap_or_else(|| panic!("no listing of /disk/{dev} ({})", image.display()));
        let (guest, host) = match keeps {
            Keeps::All => (guest.clone(), &host_all),
            Keeps::AllWithLostFound => {
                let kept: String = guest
                    .lines()
                    .filter(|l| !l.starts_with("lost+found "))
                    .map(|l| format!("{l}\n"))
                    .collect();
                (kept, &host_all)
            }
            Keeps::LinksAsFiles => (guest.clone(), &host_links_as_files),
        };
        assert_eq!(
            &guest,
            host,
            "/disk/{dev} ({}) differs from the source tree",
            image.display()
        );
    }

    let ro = &got["ro-checks"];
    assert!(
        ro.contains("Read-only file system") && !ro.contains("succeeded"),
        "writes to a read-only disk: {ro}"
    );
    assert_eq!(
        sha256_file(&images.join("ext4.img")),
        ext4_before,
        "the read-only ext4 image changed"
    );

    let ro_device = &got["ro-device"];
    assert!(
        !ro_device.contains("succeeded")
            && [
                "Read-only file system",
                "Operation not permitted",
                "Permission denied"
            ]
            .iter()
            .any(|m| ro_device.contains(m)),
        "a write to the read-only device: {ro_device}"
    );
    assert_eq!(std::fs::read(&ro_blank).unwrap(), vec![0x5a; 1 << 20]);

    assert_eq!(got["rw"].trim(), "written");
    let bytes = std::fs::read(&rw).unwrap();
    assert_eq!(&bytes[4096..4096 + 18], b"bootbox-wrote-this");
    assert!(bytes[..4096].iter().all(|&b| b == 0) && bytes[4096 + 18..].iter().all(|&b| b == 0));

    assert_eq!(got["tools"], "ext4\nvdb\nvdb1\n");
    // The logical volume's device-mapper table is read-only, as every activated one must be.
    assert_eq!(got["lvm-read-only"], "1\n");
}
