#!/usr/bin/env bash
# The disk images the end-to-end disk test attaches, and the tree they hold:
#
#   scripts/make-disk-fixture.sh OUTDIR
#
# OUTDIR/src gets a small tree (nested directories, an empty one, files of 0 bytes to 1.5 MiB,
# a symlink, names with a space and with UTF-8), OUTDIR/images what scripts/make-test-images.sh
# builds from it. scripts/test.sh runs this on the host before starting the nested test host
# (which lacks the mkfs tools) and passes OUTDIR as BOOTBOX_DISK_FIXTURE.
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
out=$1
rm -rf "$out"
mkdir -p "$out/src"
src="$out/src"
mkdir -p "$src/a/b/c" "$src/dir with space" "$src/empty"
printf '' >"$src/zero.bin"
printf 'x' >"$src/one.txt"
head -c 511 /dev/urandom >"$src/a/odd-511.bin"
head -c 4096 /dev/urandom >"$src/a/b/page.bin"
head -c 70000 /dev/urandom >"$src/a/b/c/seventy-k.bin"
head -c 1572864 /dev/urandom >"$src/dir with space/one and a half MiB.bin"
echo 'UTF-8 name' >"$src/dir with space/ünïcødé-файл.txt"
echo 'hello from the disk' >"$src/a/small.txt"
ln -s a/small.txt "$src/link-to-small"
# mtools takes the names' encoding from the locale.
export LC_ALL=C.UTF-8
exec "$(dirname "$0")/make-test-images.sh" "$out/images" "$src"
