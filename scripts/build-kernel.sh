#!/usr/bin/env bash
# Builds bootbox's guest kernel (uncompressed vmlinux with a PVH entry, plus bzImage) from
# kernel-config/bootbox.config on top of allnoconfig, and caches it outside the work tree.
#
#   scripts/build-kernel.sh [--source DIR|TARBALL] [--fragment FILE] [--print-path] [--quiet]
#                           [--install]
#
# --fragment FILE builds from another config fragment instead of kernel-config/bootbox.config:
# to measure what a set of options costs, or to give a peer VMM options bootbox does not use
# (scripts/bench-vm.sh virtiofs). The result is cached under its own key.
# --install also copies the kernel, world-readable, to /var/cache/bootbox/kernel/<key>/ (run as
# root), where bootbox looks after the user's own cache: one build serves every user of the
# machine, and using bootbox needs no root.
#
# The patches in kernel-config/patches/*.patch (applied with patch -p1, in name order) go on
# top of a tarball's unpacked copy. A tree given with --source is never modified: the build
# stops, naming the patch, unless the tree already carries it.
#
# The cache key is the hash of: the config fragment, the patches, this script, and the source's identity
# (a tarball's name, size, mtime and Debian package version, or a tree's kernel version, git
# revision and a hash of its uncommitted changes). A second run with the
# same inputs costs nothing and prints the same path. The last line printed is the path of
# the cached vmlinux; bzImage and .config sit beside it.
#
# While building it shows progress on stderr: on a terminal one updating line (percent of
# kbuild steps, elapsed and remaining time), otherwise a line every 10%. The step total is
# estimated from the count the previous cached build recorded; a first build shows the count
# and elapsed time only.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
fragment="$here/kernel-config/bootbox.config"
patches=("$here"/kernel-config/patches/*.patch)
[ -e "${patches[0]}" ] || patches=()
source="${BOOTBOX_KERNEL_SOURCE:-/usr/src/linux-source-6.12.tar.xz}"
cache_root="${BOOTBOX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/bootbox}/kernel"
print_path=0
quiet=0
install=0
system_root=/var/cache/bootbox/kernel

while [ $# -gt 0 ]; do
    case "$1" in
        --source) source="$2"; shift 2 ;;
        --fragment) fragment="$2"; shift 2 ;;
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
    [ ! -f "$1/steps" ] || cp "$1/steps" "$tmp/"
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
key=$( { cat "$fragment" "${patches[@]}"; cat "$0"; echo "$source_id"; } | sha256sum | cut -c1-20)
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

for p in "${patches[@]}"; do
    if [ -d "$source" ]; then
        patch -p1 -R --dry-run -s -f -d "$srcdir" <"$p" >/dev/null || {
            echo "build-kernel: $srcdir lacks kernel-config/patches/${p##*/}; apply it (patch -p1 < $p) and rerun" >&2
            exit 1
        }
    else
        say "patching: ${p##*/}"
        patch -p1 -s -f -d "$srcdir" <"$p" || { echo "build-kernel: ${p##*/} does not apply to $source" >&2; exit 1; }
    fi
done

say "configuring: allnoconfig + $(grep -c '^CONFIG_' "$fragment") options from ${fragment#"$here"/}"
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
[ "$missing" = 0 ] || { echo "build-kernel: fix ${fragment#"$here"/} (a dependency is missing)" >&2; exit 1; }

jobs=$(nproc)
# Progress is counted in kbuild's steps: the lines like "  CC      kernel/fork.o" it prints
# for each object compiled, assembled, linked or generated. How many there will be is not
# known before the build; the estimate is the step count recorded by the newest previous
# build in the cache (file "steps" beside its vmlinux), which is close when the config and
# source changed little. The first build has no estimate and shows steps and elapsed time only.
step_pattern='^  [A-Z0-9_]+ '
estimate=0
estimate_from=
for previous in $(ls -t "$cache_root"/*/steps "$system_root"/*/steps 2>/dev/null); do
    n=$(cat "$previous" 2>/dev/null || true)
    case "$n" in ''|*[!0-9]*) continue ;; esac
    [ "$n" -gt 0 ] && { estimate=$n; estimate_from=$(basename "$(dirname "$previous")"); break; }
done
if [ "$estimate" -gt 0 ]; then
    say "building vmlinux and bzImage with $jobs jobs: about $estimate steps (the count of the previous build, $estimate_from)"
else
    say "building vmlinux and bzImage with $jobs jobs (first build: no step count to estimate from; minutes on a few cores)"
fi
start=$(date +%s)
if [ "$quiet" = 1 ]; then
    make "${make_args[@]}" -j"$jobs" vmlinux bzImage >"$build/build.log" 2>&1 || { tail -50 "$build/build.log" >&2; exit 1; }
else
    # On a terminal one line is rewritten in place; otherwise a plain line every 10% (every
    # 1000 steps without an estimate).
    tty=0
    [ -t 2 ] && tty=1
    make "${make_args[@]}" -j"$jobs" vmlinux bzImage 2>&1 | tee "$build/build.log" |
        awk -v start="$start" -v total="$estimate" -v tty="$tty" -v pat="$step_pattern" '
            function clock(s) { return sprintf("%d:%02d", s / 60, s % 60) }
            $0 ~ pat {
                n++
                now = systime(); elapsed = now - start
                if (total > 0) {
                    pct = int(100 * n / total); if (pct > 99) pct = 99
                    left = (n < total && n >= total / 20) ? clock(elapsed * (total - n) / n) : "?"
                    line = sprintf("%d%% (%d of ~%d steps), %s elapsed, %s left", pct, n, total, clock(elapsed), left)
                    due = (n < total && int(10 * n / total) > int(10 * (n - 1) / total))
                } else {
                    line = sprintf("%d steps, %s elapsed", n, clock(elapsed))
                    due = (n % 1000 == 0)
                }
                if (tty) {
                    if (now != shown) { printf "\rbuild-kernel: %s\033[K", line > "/dev/stderr"; fflush("/dev/stderr"); shown = now }
                } else if (due) {
                    printf "build-kernel: %s\n", line > "/dev/stderr"; fflush("/dev/stderr")
                }
            }
            END {
                if (n == 0) exit
                if (tty) printf "\r\033[K" > "/dev/stderr"
                printf "build-kernel: %d steps in %s\n", n, clock(systime() - start) > "/dev/stderr"
            }'
    [ "${PIPESTATUS[0]}" = 0 ] || { tail -50 "$build/build.log" >&2; exit 1; }
fi

staging="$cache_root/.staging-$key-$$"
mkdir -p "$staging"
cp "$objdir/vmlinux" "$staging/vmlinux"
cp "$objdir/arch/x86/boot/bzImage" "$staging/bzImage"
cp "$objdir/.config" "$staging/config"
echo "$source_id" >"$staging/source"
# The next build's progress estimate.
grep -cE "$step_pattern" "$build/build.log" >"$staging/steps" || true
rm -rf "$out"
mv "$staging" "$out"
say "built in $(( $(date +%s) - start ))s: $out"
install_system "$out"
echo "$out/vmlinux"
