#!/usr/bin/env bash
# Runs the pjdfstest POSIX filesystem conformance suite inside the appliance on an rw share, and
# the same suite on the host directory itself for comparison, and prints pass counts per group.
#
#   scripts/posix-suite.sh PJDFSTEST_SOURCE [GROUP...]     # e.g. chmod chown rename
#
# PJDFSTEST_SOURCE is a checkout of the pjdfstest sources (not part of this repository). The test
# program is built statically here with a Linux config.h; the suite's shell scripts run in the
# guest under busybox (from busybox-static), with `openssl md5` (used only to make random
# names) provided by a small shim over md5sum. Run it where `bootbox run` can boot a guest: on
# a host with hardware virtualisation, or inside the nested test host:
#
#   scripts/testhost.sh --mirror target/release/bootbox --mirror target/release/bootbox-init \
#       --mirror "$(scripts/build-kernel.sh)" --mirror /tmp/posix-suite --appliance-tools \
#       -- scripts/posix-suite.sh --prepared /tmp/posix-suite
#
# The rw share and the host's comparison directory are made under $POSIX_SUITE_SCRATCH (default:
# the prepared directory). Point it at a filesystem with user extended attributes (ext4; the
# test host's --ext4-scratch DIR gives one), or the guest's ownership cannot be kept.
set -euo pipefail
cd "$(dirname "$0")/.."
usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; }
[ $# -ge 1 ] || { usage >&2; exit 2; }
case "$1" in -h|--help) usage; exit 0 ;; esac

work=${POSIX_SUITE_DIR:-/tmp/posix-suite}
if [ "$1" = --prepared ]; then
    work=$2
    shift 2
else
    src=$1
    shift
    [ -f "$src/pjdfstest.c" ] || { echo "posix-suite: $src has no pjdfstest.c" >&2; exit 2; }
    rm -rf "$work"
    mkdir -p "$work/tools/shim"
    cat >"$work/config.h" <<'EOF'
#define _GNU_SOURCE 1
#define HAVE_FACCESSAT 1
#define HAVE_FCHMODAT 1
#define HAVE_FCHOWNAT 1
#define HAVE_FSTATAT 1
#define HAVE_LINKAT 1
#define HAVE_MKDIRAT 1
#define HAVE_MKFIFOAT 1
#define HAVE_MKNODAT 1
#define HAVE_OPENAT 1
#define HAVE_POSIX_FALLOCATE 1
#define HAVE_READLINKAT 1
#define HAVE_RENAMEAT 1
#define HAVE_SYMLINKAT 1
#define HAVE_UNLINKAT 1
#define HAVE_UTIMENSAT 1
#define HAVE_SYS_SYSMACROS_H 1
#define HAVE_STRUCT_STAT_ST_ATIM 1
#define HAVE_STRUCT_STAT_ST_CTIM 1
#define HAVE_STRUCT_STAT_ST_MTIM 1
EOF
    gcc -O2 -static -I"$work" -o "$work/tools/pjdfstest" "$src/pjdfstest.c"
    cp -r "$src/tests" "$work/tools/tests"
    printf '#!/bin/sh\nmd5sum | { read -r h _; echo "(stdin)= $h"; }\n' >"$work/tools/shim/openssl"
    chmod +x "$work/tools/shim/openssl"
    cp "$(command -v busybox)" "$work/tools/busybox"
fi

scratch=${POSIX_SUITE_SCRATCH:-$work}
mkdir -p "$scratch/rw" "$scratch/host"
groups=("$@")
if [ ${#groups[@]} -eq 0 ]; then
    groups=(chmod chown ftruncate link mkdir mkfifo mknod open rename rmdir symlink truncate unlink utimensat posix_fallocate)
fi
runner='set -u
bb=$1; tests=$2; shift 2
mkdir -p /tmp/bb && "$bb" --install -s /tmp/bb
export PATH="$(dirname "$bb")/shim:/tmp/bb:$PATH"
for g in "$@"; do
    for t in "$tests/$g"/*.t; do
        out=$(sh "$t" 2>&1)
        echo "$out" | sed -n "s|^\(not ok\|ok\)\(.*\)|$g $(basename "$t") \1\2|p"
    done
done'
summarise() {
    # "not ok ... # TODO" marks a check the suite itself expects Linux to fail.
    awk '{ g = $1; seen[g] = 1
           if ($3 != "not") pass[g]++
           else if ($0 ~ /# TODO/) todo[g]++
           else { fail[g]++; if (shown[g] < 3) { shown[g]++; print "  FAIL " $0 } } }
         END { for (g in seen) printf "%-16s %5d passed %5d failed %5d expected to fail on Linux\n", g, pass[g], fail[g], todo[g] }' "$1"
}

echo "== the suite in the appliance, on an rw share (${groups[*]})"
bin=${BOOTBOX_BIN:-target/release/bootbox}
"$bin" run --timeout 3600 --share "$work/tools:tools:ro" --share "$scratch/rw:rw:rw" --workdir /share/rw \
    -- sh -c "$runner" runner /share/tools/busybox /share/tools/tests "${groups[@]}" | tee "$work/guest.txt" | awk '{ print; fflush() }' >&2 || true
summarise "$work/guest.txt"
echo "== the same suite on the host, in $scratch/host"
(cd "$scratch/host" && env -i PATH="$work/tools/shim:$PATH" sh -c "$runner" runner "$work/tools/busybox" "$work/tools/tests" "${groups[@]}") >"$work/host.txt" 2>&1 || true
summarise "$work/host.txt"
