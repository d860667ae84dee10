#!/usr/bin/env bash
# Builds disk images holding the files of SRCDIR, without root, for testing `bootbox --disk`:
#
#   scripts/make-test-images.sh OUTDIR SRCDIR
#
# OUTDIR receives: ext4.img (mkfs.ext4 -d), vfat.img (mkfs.vfat + mcopy), squashfs.img
# (mksquashfs, xz), iso9660.iso (xorriso, Joliet + Rock Ridge), btrfs.img (mkfs.btrfs
# --rootdir), xfs.img (mkfs.xfs -p with a generated protofile; skipped, with the reason, when
# SRCDIR has names with white space, which protofiles cannot express), gpt.img (a GPT disk
# whose partition 1 is ext4.img), and qcow2 versions of the ext4 image: ext4.qcow2,
# ext4-compressed.qcow2 (zlib), ext4-zstd.qcow2 and ext4-overlay.qcow2 (an empty overlay backed
# by ext4.qcow2).
# Every filesystem is labelled BOOTBOX. scripts/setup.sh installs the tools.
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 OUTDIR SRCDIR" >&2
    exit 2
fi
out=$1
src=$2
[ -d "$src" ] || { echo "make-test-images: source directory '$src' not found" >&2; exit 1; }
for tool in mkfs.ext4 mkfs.vfat mcopy mksquashfs xorriso mkfs.btrfs mkfs.xfs sfdisk qemu-img; do
    command -v "$tool" >/dev/null || {
        echo "make-test-images: '$tool' is missing; run scripts/setup.sh" >&2
        exit 1
    }
done
mkdir -p "$out"
out=$(cd "$out" && pwd)
src=$(cd "$src" && pwd)

say() { echo "make-test-images: $*" >&2; }

# Image size in MiB: the source's size plus half again plus 16 MiB of metadata room.
used_kib=$(du -sk "$src" | cut -f1)
size_mib=$(( used_kib * 3 / 2 / 1024 + 16 ))

fresh() { rm -f "$1"; truncate -s "$2" "$1"; }

say "ext4 ($size_mib MiB)"
fresh "$out/ext4.img" "${size_mib}M"
mkfs.ext4 -q -F -L BOOTBOX -d "$src" "$out/ext4.img"

say "vfat"
fresh "$out/vfat.img" "${size_mib}M"
mkfs.vfat -n BOOTBOX "$out/vfat.img" >/dev/null
# mtools copies each top-level entry; -s recurses, -Q stops at the first error.
export MTOOLS_SKIP_CHECK=1
find "$src" -mindepth 1 -maxdepth 1 -print0 | while IFS= read -r -d '' entry; do
    mcopy -Q -s -i "$out/vfat.img" "$entry" ::/
done

say "squashfs (xz)"
rm -f "$out/squashfs.img"
mksquashfs "$src" "$out/squashfs.img" -comp xz -noappend -quiet -no-progress >/dev/null

say "iso9660 (Joliet, Rock Ridge)"
rm -f "$out/iso9660.iso"
xorriso -as mkisofs -quiet -J -R -V BOOTBOX -o "$out/iso9660.iso" "$src" 2>/dev/null

say "btrfs"
# btrfs wants at least about 114 MiB; the file is sparse, --shrink trims it to what is used.
btrfs_mib=$(( size_mib < 128 ? 128 : size_mib ))
fresh "$out/btrfs.img" "${btrfs_mib}M"
mkfs.btrfs -q -f -L BOOTBOX --rootdir "$src" --shrink "$out/btrfs.img" >/dev/null

# A protofile (see mkfs.xfs(8), "-p") describing $1, written to stdout: one line per entry,
# "name mode uid gid [source]", directories closed with "$".
protofile_dir() {
    local dir=$1 entry name mode uid gid
    for entry in "$dir"/* "$dir"/.[!.]* "$dir"/..?*; do
        [ -e "$entry" ] || [ -L "$entry" ] || continue
        name=${entry##*/}
        read -r mode uid gid < <(stat -c '%a %u %g' "$entry")
        mode=$(printf '%03o' "$(( 8#$mode & 8#777 ))")
        if [ -L "$entry" ]; then
            echo "$name l--$mode $uid $gid $(readlink "$entry")"
        elif [ -d "$entry" ]; then
            echo "$name d--$mode $uid $gid"
            protofile_dir "$entry"
            echo '$'
        elif [ -f "$entry" ]; then
            echo "$name ---$mode $uid $gid $entry"
        fi
    done
}

if find "$src" -name '*[[:space:]]*' -print -quit | grep -q .; then
    say "xfs skipped: $src has names with white space, which an xfs protofile cannot express"
    rm -f "$out/xfs.img"
else
    say "xfs"
    proto="$out/.xfs-protofile"
    {
        echo "/dev/null"
        echo "0 0"
        read -r mode uid gid < <(stat -c '%a %u %g' "$src")
        echo "d--$(printf '%03o' "$(( 8#$mode & 8#777 ))") $uid $gid"
        protofile_dir "$src"
        echo '$'
    } >"$proto"
    # mkfs.xfs refuses filesystems under 300 MiB; the file is sparse.
    xfs_mib=$(( size_mib < 300 ? 300 : size_mib ))
    fresh "$out/xfs.img" "${xfs_mib}M"
    mkfs.xfs -q -f -L BOOTBOX -p "$proto" "$out/xfs.img"
    rm -f "$proto"
fi

say "gpt disk (partition 1: ext4)"
# 1 MiB before the partition, 1 MiB after it for the backup GPT.
fresh "$out/gpt.img" "$(( size_mib + 2 ))M"
printf 'label: gpt\nstart=2048, size=%d, type=linux, name=bootbox\n' $(( size_mib * 2048 )) |
    sfdisk -q "$out/gpt.img"
dd if="$out/ext4.img" of="$out/gpt.img" bs=1M seek=1 conv=notrunc,sparse status=none

say "qcow2 (plain, zlib- and zstd-compressed, overlay)"
rm -f "$out/ext4.qcow2" "$out/ext4-compressed.qcow2" "$out/ext4-zstd.qcow2" "$out/ext4-overlay.qcow2"
qemu-img convert -O qcow2 "$out/ext4.img" "$out/ext4.qcow2"
qemu-img convert -c -O qcow2 "$out/ext4.img" "$out/ext4-compressed.qcow2"
qemu-img convert -c -O qcow2 -o compression_type=zstd "$out/ext4.img" "$out/ext4-zstd.qcow2"
qemu-img create -q -f qcow2 -b ext4.qcow2 -F qcow2 "$out/ext4-overlay.qcow2"

ls -ls "$out" >&2
