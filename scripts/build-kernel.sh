#!/usr/bin/env bash
# Builds bootbox's guest kernel (uncompressed vmlinux with a PVH entry, plus bzImage) from
# kernel-config/bootbox.config on top of allnoconfig, and caches it outside the work tree.
#
#   scripts/build-kernel.sh [--source DIR|TARBALL] [--print-path] [--quiet] [--install]
#
# --install also copies the kernel, world-readable, to /var/cache/bootbox/kernel/<key>/ (run as
# root), where bootbox looks after the user's own cache: one build serves every user of the
# machine, and using bootbox needs no root.
#
# The cache key is the hash of: the config fragment, this script, and the source's identity
# (a tarball's name, size, mtime and Debian package version, or a tree's kernel version, git
# revision and a hash of its uncommitted changes). A second run with the
# same inputs costs nothing and prints the same path. The last line printed is the path of
# the cached vmlinux; bzImage and .config sit beside it.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
fragment="$here/kernel-config/bootbox.config"
source="${BOOTBOX_KERNEL_SOURCE:-/usr/src/linux-source-6.12.tar.xz}"
cache_root="${BOOTBOX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/bootbox}/kernel"
print_path=0
quiet=0
install=0
system_root=/var/cache/bootbox/kernel

while [ $# -gt 0 ]; do
    case "$1" in
        --source) source="$2"; shift 2 ;;
        --print-path) print_path=1; shift ;;
        --quiet) quiet=1; shift ;;
        --install) install=1; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "build-kernel: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
done

say() { [ "$quiet" = 1 ] || echo "build-kernel: $*" >&2; }

# Copies the cached kernel $1 to the system-wide location, world-readable (--install).
install_system() {
    [ "$install" = 1 ] || return 0
    local dest="$system_root/$key" tmp="$system_root/.staging-$key-$$"
    mkdir -p "$tmp"
    cp "$1/vmlinux" "$1/bzImage" "$1/config" "$tmp/"
    chmod 0755 "$system_root" "$tmp"
    chmod 0644 "$tmp"/*
    rm -rf "$dest"
    mv "$tmp" "$dest"
    say "installed for every user: $dest"
}

if [ ! -e "$source" ]; then
    echo "build-kernel: kernel source '$source' not found." >&2
    echo "  Install Debian's source package: apt-get install linux-source-6.12" >&2
    echo "  or name a kernel tree: scripts/build-kernel.sh --source /path/to/linux" >&2
    exit 1
fi

if [ -d "$source" ]; then
    source_id="tree:$(make -s -C "$source" kernelversion 2>/dev/null || echo unknown):$(git -C "$source" rev-parse HEAD 2>/dev/null || echo nogit):$(git -C "$source" status --porcelain 2>/dev/null | sha256sum | cut -c1-16)"
else
    # Identity of a tarball: size + mtime are cheap; the package version pins it further.
    source_id="tarball:$(basename "$source"):$(stat -c '%s:%Y' "$source"):$(dpkg-query -W -f '${Version}' linux-source-6.12 2>/dev/null || true)"
fi
key=$( { cat "$fragment"; cat "$0"; echo "$source_id"; } | sha256sum | cut -c1-20)
out="$cache_root/$key"

if [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ]; then
    say "cached: $out (key $key)"
    install_system "$out"
    echo "$out/vmlinux"
    exit 0
fi
if [ "$print_path" = 1 ]; then
    echo "build-kernel: no cached kernel for key $key; run scripts/build-kernel.sh" >&2
    exit 1
fi

for tool in make gcc flex bison bc; do
    command -v "$tool" >/dev/null || {
        echo "build-kernel: '$tool' is missing: apt-get install build-essential flex bison bc libelf-dev libssl-dev" >&2
        exit 1
    }
done

mkdir -p "$cache_root"
build="$cache_root/build-$key"
rm -rf "$build"
mkdir -p "$build"
trap 'rm -rf "$build"' EXIT

if [ -d "$source" ]; then
    srcdir="$source"
    objdir="$build/obj"
    mkdir -p "$objdir"
    make_args=(-C "$srcdir" O="$objdir")
else
    say "unpacking $source"
    tar -xf "$source" -C "$build"
    srcdir=$(find "$build" -mindepth 1 -maxdepth 1 -type d | head -n1)
    objdir="$srcdir"
    make_args=(-C "$srcdir")
fi

say "configuring: allnoconfig + $(grep -c '^CONFIG_' "$fragment") options from kernel-config/bootbox.config"
KCONFIG_ALLCONFIG="$fragment" make "${make_args[@]}" allnoconfig >"$build/config.log" 2>&1 || {
    cat "$build/config.log" >&2
    exit 1
}
# Every option we asked for must have survived Kconfig's dependency resolution.
missing=0
while IFS= read -r line; do
    case "$line" in CONFIG_*) ;; *) continue ;; esac
    grep -qx "$line" "$objdir/.config" || { echo "build-kernel: option not applied: $line" >&2; missing=1; }
done <"$fragment"
[ "$missing" = 0 ] || { echo "build-kernel: fix kernel-config/bootbox.config (a dependency is missing)" >&2; exit 1; }

jobs=$(nproc)
say "building vmlinux and bzImage with $jobs jobs (about 10 minutes on 2 cores)"
start=$(date +%s)
if [ "$quiet" = 1 ]; then
    make "${make_args[@]}" -j"$jobs" vmlinux bzImage >"$build/build.log" 2>&1 || { tail -50 "$build/build.log" >&2; exit 1; }
else
    # Progress: one line per 200 objects compiled, plus the elapsed time.
    make "${make_args[@]}" -j"$jobs" vmlinux bzImage 2>&1 | tee "$build/build.log" |
        awk -v start="$start" '/^  (CC|AS|LD|AR)/ { n++; if (n % 200 == 0) { printf "build-kernel: %d objects, %ds\n", n, systime() - start > "/dev/stderr"; fflush("/dev/stderr") } }'
    [ "${PIPESTATUS[0]}" = 0 ] || { tail -50 "$build/build.log" >&2; exit 1; }
fi

staging="$cache_root/.staging-$key-$$"
mkdir -p "$staging"
cp "$objdir/vmlinux" "$staging/vmlinux"
cp "$objdir/arch/x86/boot/bzImage" "$staging/bzImage"
cp "$objdir/.config" "$staging/config"
echo "$source_id" >"$staging/source"
rm -rf "$out"
mv "$staging" "$out"
say "built in $(( $(date +%s) - start ))s: $out"
install_system "$out"
echo "$out/vmlinux"
