#!/usr/bin/env bash
# Side-by-side VM benchmarks: bootbox against QEMU (-M microvm, same guest kernel, same
# appliance initramfs), interleaved A B A B by `bootbox bench --compare`, printing per-phase
# figures (min/median/p95/mean/stddev) and the ratios of medians.
#
#   scripts/bench-vm.sh boot [RUNS]   # launch to job result for `true`, booted (--cold)
#   scripts/bench-vm.sh warm [RUNS]   # launch to job result for `true`: resumed from the
#                                     # warm-start snapshot vs booted (--cold), same bootbox
#   scripts/bench-vm.sh 9p   [RUNS]   # `find | xargs sha256sum` over a generated tree, over
#                                     # bootbox's virtio-9p vs QEMU's virtio-9p (-fsdev local)
#   scripts/bench-vm.sh analyze       # the slowest initcalls of the guest kernel
#   scripts/bench-vm.sh stats [RUNS]  # what --stats costs (bootbox with it vs without), and
#                                     # one run's report: VM exits per boot, device time
#
# Without hardware virtualisation the whole benchmark runs inside the nested test host
# (scripts/testhost.sh): absolute times there are emulated, the ratios are what count.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
mode="${1:-boot}"
runs="${2:-10}"
case "$mode" in
    boot|warm|9p|analyze|stats) ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "bench-vm: unknown mode '$mode': expected boot, warm, 9p, analyze or stats (try --help)" >&2; exit 2 ;;
esac
case "$runs" in
    ''|*[!0-9]*|0) echo "bench-vm: RUNS must be a positive number, not '$runs'" >&2; exit 2 ;;
esac

if [ "${BOOTBOX_BENCH_INNER:-}" != 1 ]; then
    cd "$repo"
    scripts/setup.sh
    cargo build --release --bins --quiet
    kernel=$(scripts/build-kernel.sh)
    export BOOTBOX_KERNEL="$kernel" BOOTBOX_BENCH_INNER=1
    if grep -qwE 'vmx|svm' /proc/cpuinfo; then
        exec "$0" "$mode" "$runs"
    fi
    echo "bench-vm: no hardware virtualisation here; running inside the nested test host" >&2
    exec scripts/testhost.sh --timeout 3600 --appliance-tools \
        --mirror "$repo/target/release/bootbox" --mirror "$repo/target/release/bootbox-init" \
        --mirror "$kernel" --mirror "$repo/scripts/bench-vm.sh" \
        --mirror /usr/bin/qemu-system-x86_64 --mirror /usr/share/qemu --mirror /usr/share/seabios \
        -- env BOOTBOX_KERNEL="$kernel" BOOTBOX_BENCH_INNER=1 "$repo/scripts/bench-vm.sh" "$mode" "$runs"
fi

bootbox="$repo/target/release/bootbox"
kernel="$BOOTBOX_KERNEL"
work=$(mktemp -d "${TMPDIR:-/tmp}/bootbox-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT
cmdline="console=ttyS0 reboot=k panic=-1 quiet rdinit=/init tsc=reliable no_timer_check"
# QEMU gets the same guest-visible devices bootbox gives: two consoles (the job's stdout and
# stderr) and, for 9p, the share; the init's exit-port write ends QEMU through isa-debug-exit,
# which exits with (status << 1) | 1. QEMU's own failures also exit 1 and its virtio-serial
# output is not reliably complete at exit, so the jobs check their own result and exit 5 on
# success: a QEMU run counts only when it exits 11, a bootbox run only when it exits 5.
qemu_base="qemu-system-x86_64 -M microvm,acpi=off,rtc=off -enable-kvm -cpu host -m 256 -smp 1 \
 -nodefaults -no-reboot -nographic -serial null \
 -device isa-debug-exit,iobase=0x600,iosize=1 \
 -chardev null,id=o -device virtio-serial-device -device virtconsole,chardev=o \
 -chardev null,id=e -device virtio-serial-device -device virtconsole,chardev=e \
 -kernel $kernel"
qemu_check() {
    echo "$qemu_base $1 >/dev/null 2>$work/qemu.log; st=\$?;" \
        "test \$st = 11 || { echo \"qemu exit \$st\"; cat $work/qemu.log; false; } >&2"
}

case "$mode" in
    boot)
        job=(sh -c 'exit 5')
        "$bootbox" initrd -o "$work/app.cpio" -- "${job[@]}" >/dev/null
        "$bootbox" bench --runs "$runs" --warmup 2 --expect-status 5 \
            --compare "$(qemu_check "-initrd $work/app.cpio -append '$cmdline'")" \
            -- run --cold -- "${job[@]}"
        ;;
    warm)
        # The first warm run of this shape makes the snapshot; the warmup runs cover it.
        "$bootbox" bench --runs "$runs" --warmup 2 --expect-status 0 \
            --compare "$bootbox run --cold -- true" \
            -- run -- true
        ;;
    9p)
        tree="$work/tree"
        mkdir -p "$tree"
        for d in $(seq 1 20); do
            mkdir -p "$tree/d$d"
            for f in $(seq 1 100); do head -c $(( (d * 131 + f * 977) % 16384 )) /dev/urandom >"$tree/d$d/f$f"; done
        done
        digest='find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum'
        expected=$(cd "$tree" && sh -c "$digest")
        job=(sh -c "test \"\$($digest)\" = '$expected' && exit 5")
        share_line=$("$bootbox" initrd -o "$work/app.cpio" --share "$tree:data" -- "${job[@]}")
        echo "bench-vm: $(find "$tree" -type f | wc -l) files; $share_line" >&2
        "$bootbox" bench --runs "$runs" --warmup 1 --expect-status 5 \
            --compare "$(qemu_check "-fsdev local,id=fs0,path=$tree,security_model=none,readonly=on \
 -device virtio-9p-device,fsdev=fs0,mount_tag=data -initrd $work/app.cpio -append '$cmdline'")" \
            -- run --cold --share "$tree:data" -- "${job[@]}"
        ;;
    analyze)
        "$bootbox" bench --analyze
        ;;
    stats)
        "$bootbox" run --stats -- sh -c 'exit 5' || true
        "$bootbox" bench --runs "$runs" --warmup 2 --expect-status 5 \
            --compare "$bootbox run --stats -- sh -c 'exit 5' 2>/dev/null; test \$? = 5" \
            -- run -- sh -c 'exit 5'
        ;;
    *) echo "bench-vm: mode must be boot, warm, 9p, analyze or stats" >&2; exit 2 ;;
esac
