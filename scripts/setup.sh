#!/usr/bin/env bash
# Installs what bootbox needs on a fresh Debian machine (as root), and nothing when it is
# already there: qemu (the nested test host and the comparisons), the distribution kernel with
# kvm-amd (the test host's kernel), the 6.12 kernel source and its build tools (the guest
# kernel), busybox-static (the test host's userland), diod (the 9p comparison), the
# appliance's default tools, qemu-utils (qemu-img/qemu-io: the disk crate's tests compare its
# qcow2 reader with QEMU's) and the filesystem tools scripts/make-test-images.sh builds disk
# images with, without root.
set -euo pipefail

packages=(qemu-system-x86 linux-image-amd64 linux-source-6.12 build-essential bc flex bison
    libelf-dev libssl-dev cpio xz-utils zstd kmod file busybox-static diod python3 findutils
    coreutils grep tar util-linux
    qemu-utils e2fsprogs dosfstools mtools squashfs-tools xorriso btrfs-progs xfsprogs fdisk
    exfatprogs ntfs-3g lvm2 patch)

find_missing() {
    missing=()
    for p in "${packages[@]}"; do
        dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
}
find_missing
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
echo "setup: installing ${missing[*]}" >&2
if [ "$(id -u)" != 0 ]; then
    echo "setup: run as root, or install them yourself: apt-get install ${missing[*]}" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
# apt may remove an installed package to satisfy another: a backported qemu-utils goes when
# the distribution's qemu-system-x86 comes in. A second pass installs the matching version.
find_missing
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing what the first pass removed: ${missing[*]}" >&2
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
find_missing
[ ${#missing[@]} -eq 0 ] || { echo "setup: could not install ${missing[*]}" >&2; exit 1; }
