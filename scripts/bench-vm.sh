#!/usr/bin/env bash
# Side-by-side VM benchmarks: bootbox against QEMU (-M microvm, same guest kernel, same
# appliance initramfs), interleaved A B A B by `bootbox bench --compare`, printing per-phase
# figures (min/median/p95/mean/stddev) and the ratios of medians.
#
#   scripts/bench-vm.sh boot [RUNS]   # launch to job result for `true`, booted (--cold)
#   scripts/bench-vm.sh warm [RUNS]   # launch to job result, resumed from the warm-start
#                                     # snapshot (the default) vs booted (--cold) vs QEMU
#                                     # microvm booting, and a 9p hash resumed vs booted vs
#                                     # QEMU; each with memory: VMM RSS, guest memory
#                                     # touched, page faults
#   scripts/bench-vm.sh 9p   [RUNS]   # the share jobs over bootbox's virtio-9p vs QEMU's
#                                     # virtio-9p (-fsdev local)
#   scripts/bench-vm.sh virtiofs [RUNS] # the share jobs over bootbox's virtio-9p vs QEMU's
#                                     # virtio-fs (virtiofsd, vhost-user-fs-device); both
#                                     # boot a kernel built with FUSE_FS and VIRTIO_FS added
#
# The share jobs, each over the same shared tree, each checking its own result: a
# `find -printf` listing of BENCH_MANY_FILES (default 100000) empty files, `sha256sum` of a
# 2000-file tree, a sequential read of one 128 MiB file, and the listing twice in one job
# (what the guest's cache saves). End to end by default, so each side's boot is included;
# with BENCH_GUEST_TIME=1 each job times itself inside the guest instead (from the share
# mounted to the result checked, /proc/uptime, 10 ms steps), both sides interleaved, and the
# script prints min / median / p95 per side and the ratio of medians: the share alone.
#   scripts/bench-vm.sh disk [RUNS]   # virtio-blk against QEMU's virtio-blk-device on the same
#                                     # images: sequential read of a 64 MiB raw disk (dd),
#                                     # list-and-hash of a tree on a mounted ext4 image, and
#                                     # launch to `cat /disk/vda1/etc/os-release` (GPT disk)
#   scripts/bench-vm.sh analyze       # the slowest initcalls of the guest kernel
#   scripts/bench-vm.sh stats [RUNS]  # what --stats costs (bootbox with it vs without), and
#                                     # one run's report: VM exits per boot, device time
#   scripts/bench-vm.sh sandbox [RUNS] # what the sandbox costs: bootbox confined vs
#                                     # --no-sandbox, for `true` and a 9p hash of 2000 files
#
# Without hardware virtualisation the whole benchmark runs inside the nested test host
# (scripts/testhost.sh): absolute times there are emulated, the ratios are what count.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
mode="${1:-boot}"
runs="${2:-10}"
case "$mode" in
    boot|warm|9p|virtiofs|disk|analyze|stats|sandbox) ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "bench-vm: unknown mode '$mode': expected boot, warm, 9p, virtiofs, disk, analyze, stats or sandbox (try --help)" >&2; exit 2 ;;
esac
case "$runs" in
    ''|*[!0-9]*|0) echo "bench-vm: RUNS must be a positive number, not '$runs'" >&2; exit 2 ;;
esac

# A tree of 2000 files (20 directories of 100, 0 to 16 KiB of random bytes) at $1.
make_tree() {
    local d f
    mkdir -p "$1"
    for d in $(seq 1 20); do
        mkdir -p "$1/d$d"
        for f in $(seq 1 100); do head -c $(( (d * 131 + f * 977) % 16384 )) /dev/urandom >"$1/d$d/f$f"; done
    done
}

if [ "${BOOTBOX_BENCH_INNER:-}" != 1 ]; then
    cd "$repo"
    scripts/setup.sh
    cargo build --release --bins --quiet
    kernel=$(scripts/build-kernel.sh)
    export BOOTBOX_KERNEL="$kernel" BOOTBOX_BENCH_INNER=1
    disk_mirror=()
    if [ "$mode" = disk ]; then
        # The images are made here: the nested test host has no mkfs tools.
        disks=$(mktemp -d "${TMPDIR:-/tmp}/bootbox-bench-disks.XXXXXX")
        trap 'rm -rf "$disks"' EXIT
        make_tree "$disks/tree"
        mkdir -p "$disks/tree/etc"
        cp /etc/os-release "$disks/tree/etc/os-release"
        scripts/make-test-images.sh "$disks/all" "$disks/tree" 2>/dev/null
        mkdir -p "$disks/use"
        mv "$disks/all/ext4.img" "$disks/all/gpt.img" "$disks/use/"
        rm -rf "$disks/all"
        head -c 64M /dev/urandom >"$disks/use/seq.img"
        (cd "$disks/tree/d1/.." && find . -path ./etc -prune -o -type f -print0 | LC_ALL=C sort -z |
            xargs -0 sha256sum | sha256sum) >"$disks/use/tree.digest"
        export BOOTBOX_BENCH_DISKS="$disks/use"
        disk_mirror=(--mirror "$disks/use")
    fi
    vfs_kernel=
    if [ "$mode" = virtiofs ]; then
        # bootbox's kernel has no virtio-fs; both sides boot one that has it. The fragment's
        # content is its cache key, so the build happens once.
        fragment=$(mktemp "${TMPDIR:-/tmp}/bootbox-virtiofs.XXXXXX.config")
        { cat kernel-config/bootbox.config
          printf '\n# virtio-fs, for scripts/bench-vm.sh virtiofs only (QEMU + virtiofsd as the peer)\n'
          printf 'CONFIG_FUSE_FS=y\nCONFIG_VIRTIO_FS=y\n'; } >"$fragment"
        vfs_kernel=$(scripts/build-kernel.sh --fragment "$fragment")
        rm -f "$fragment"
        [ -x /usr/lib/qemu/virtiofsd ] || { echo "bench-vm: /usr/lib/qemu/virtiofsd is missing (Debian's qemu-system-common has it)" >&2; exit 1; }
        disk_mirror+=(--mirror "$vfs_kernel" --mirror /usr/lib/qemu/virtiofsd)
    fi
    case "$mode" in
        9p|warm|sandbox|virtiofs)
            # The shared tree is made here: thousands of small processes are slow in the
            # emulated test host.
            bench_tree=$(mktemp -d "${TMPDIR:-/tmp}/bootbox-bench-tree.XXXXXX")
            trap 'rm -rf "$bench_tree" "${disks:-}"' EXIT
            if [ "$mode" = 9p ] || [ "$mode" = virtiofs ]; then
                make_tree "$bench_tree/small"
                mkdir -p "$bench_tree/many"
                (cd "$bench_tree/many" && for d in $(seq 1 $(( ${BENCH_MANY_FILES:-100000} / 1000 ))); do
                    mkdir "d$d" && (cd "d$d" && touch $(seq -f 'f%g' 1 1000)); done)
                head -c 128M /dev/urandom >"$bench_tree/big.bin"
            else
                make_tree "$bench_tree"
            fi
            export BOOTBOX_BENCH_TREE="$bench_tree"
            disk_mirror+=(--mirror "$bench_tree")
            ;;
    esac
    export BOOTBOX_BENCH_VIRTIOFS_KERNEL="$vfs_kernel"
    if grep -qwE 'vmx|svm' /proc/cpuinfo; then
        "$0" "$mode" "$runs"
        exit
    fi
    echo "bench-vm: no hardware virtualisation here; running inside the nested test host" >&2
    scripts/testhost.sh --timeout 3600 --appliance-tools "${disk_mirror[@]}" \
        --mirror "$repo/target/release/bootbox" --mirror "$repo/target/release/bootbox-init" \
        --mirror "$kernel" --mirror "$repo/scripts/bench-vm.sh" \
        --mirror /usr/bin/qemu-system-x86_64 --mirror /usr/share/qemu --mirror /usr/share/seabios \
        -- env BOOTBOX_KERNEL="$kernel" BOOTBOX_BENCH_INNER=1 BOOTBOX_BENCH_DISKS="${BOOTBOX_BENCH_DISKS:-}" \
        BENCH_GUEST_TIME="${BENCH_GUEST_TIME:-}" \
        BOOTBOX_BENCH_TREE="${BOOTBOX_BENCH_TREE:-}" BOOTBOX_BENCH_VIRTIOFS_KERNEL="$vfs_kernel" \
        "$repo/scripts/bench-vm.sh" "$mode" "$runs"
    exit
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
# Prints "min median p95 count" of the numbers on stdin (one per line; "0 0 0 0" for none).
quantiles() {
    sort -n | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "0 0 0 0"; exit }
        p = int(NR * 0.95 + 0.999); if (p > NR) p = NR
        m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        print v[1], m, v[p], NR }'
}
# Runs `bootbox_cmd` and `peer_cmd` (whose guest writes its console to $work/out) RUNS times
# each, interleaved after one warm-up each, collecting the job_ms=N line each job prints.
guest_times() {
    local label=$1 n a b
    : >"$work/a.ms"; : >"$work/b.ms"
    for n in $(seq 0 "$runs"); do
        a=$(eval "$bootbox_cmd" 2>/dev/null | sed -n 's/^job_ms=//p') || true
        rm -f "$work/out"
        eval "$peer_cmd" >/dev/null 2>&1 || true
        b=$(tr -d '\r' <"$work/out" 2>/dev/null | sed -n 's/^job_ms=//p') || true
        if [ -z "$a" ] || [ -z "$b" ]; then
            echo "bench-vm: $label: run $n gave no time (bootbox '${a}', peer '${b}')" >&2
            continue
        fi
        [ "$n" = 0 ] && continue
        echo "$a" >>"$work/a.ms"; echo "$b" >>"$work/b.ms"
    done
    local qa qb
    qa=$(quantiles <"$work/a.ms"); qb=$(quantiles <"$work/b.ms")
    echo "$qa" | awk '{ printf "  bootbox: %d / %d / %d ms (%d runs)\n", $1, $2, $3, $4 }'
    echo "$qb" | awk '{ printf "  peer:    %d / %d / %d ms (%d runs)\n", $1, $2, $3, $4 }'
    echo "$qa $qb" | awk '{ if ($6 > 0) printf "  ratio of medians: %.3f\n", $2 / $6; else print "  ratio of medians: n/a" }'
}
# A job script that times itself: $1 ends in `&& exit 5`.
timed_job() {
    echo "t() { read u _ </proc/uptime; echo \$(( \${u%.*}\${u#*.} * 10 )); }; s=\$(t); ($1); r=\$?; e=\$(t); echo job_ms=\$((e-s)); exit \$r"
}
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
        # The first warm run of each shape makes its snapshot; the warmup runs cover it.
        job=(sh -c 'exit 5')
        echo "bench-vm: warm: launch to job result, resumed (A) against booted (B)" >&2
        "$bootbox" bench --runs "$runs" --warmup 2 --expect-status 5 \
            --compare "$bootbox run --cold --json {json} -- sh -c 'exit 5'; test \$? = 5" \
            -- run -- "${job[@]}"
        echo "bench-vm: warm: launch to job result, resumed (A) against QEMU -M microvm booting the same kernel and appliance (B)" >&2
        "$bootbox" initrd -o "$work/app.cpio" -- "${job[@]}" >/dev/null
        "$bootbox" bench --runs "$runs" --warmup 2 --expect-status 5 \
            --compare "$(qemu_check "-initrd $work/app.cpio -append '$cmdline'")" \
            -- run -- "${job[@]}"
        echo "bench-vm: warm: a 9p hash of 2000 files, resumed (A) against booted (B)" >&2
        tree="$BOOTBOX_BENCH_TREE"
        hash="find . -type f -print0 | xargs -0 sha256sum >/dev/null; exit 5"
        "$bootbox" bench --runs "$runs" --warmup 1 --expect-status 5 \
            --compare "$bootbox run --cold --json {json} --share $tree:data -- sh -c '$hash'; test \$? = 5" \
            -- run --share "$tree:data" -- sh -c "$hash"
        echo "bench-vm: warm: the same 9p hash, resumed (A) against QEMU -M microvm booting with -fsdev local (B)" >&2
        "$bootbox" initrd -o "$work/app9p.cpio" --share "$tree:data" -- sh -c "$hash" >/dev/null
        "$bootbox" bench --runs "$runs" --warmup 1 --expect-status 5 \
            --compare "$(qemu_check "-fsdev local,id=fs0,path=$tree,security_model=none,readonly=on \
 -device virtio-9p-device,fsdev=fs0,mount_tag=data -initrd $work/app9p.cpio -append '$cmdline'")" \
            -- run --share "$tree:data" -- sh -c "$hash"
        ;;
    9p|virtiofs)
        share="$BOOTBOX_BENCH_TREE"
        list_cmd="find . -printf '%P %s\\n' | LC_ALL=C sort | sha256sum"
        hash_cmd="find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum"
        list=$(cd "$share/many" && sh -c "$list_cmd")
        hash=$(cd "$share/small" && sh -c "$hash_cmd")
        size=$(stat -c %s "$share/big.bin")
        names=("find -printf listing of $(find "$share/many" -type f | wc -l) files"
            "sha256sum of $(find "$share/small" -type f | wc -l) files"
            "sequential read of one $(( size >> 20 )) MiB file"
            "the listing twice in one job")
        scripts=("test \"\$(cd many && $list_cmd)\" = '$list' && exit 5"
            "test \"\$(cd small && $hash_cmd)\" = '$hash' && exit 5"
            "test \"\$(cat big.bin | wc -c)\" = $size && exit 5"
            "a=\$(cd many && $list_cmd); b=\$(cd many && $list_cmd); test \"\$a\" = '$list' && test \"\$b\" = '$list' && exit 5")
        if [ "$mode" = 9p ]; then
            vkernel="$kernel"
            peer="QEMU virtio-9p, -fsdev local"
        else
            vkernel="$BOOTBOX_BENCH_VIRTIOFS_KERNEL"
            peer="QEMU virtio-fs, virtiofsd cache=auto"
            sock="$work/virtiofs.sock"
            # virtiofsd serves one VM and exits when it disconnects: one per run. Its namespace
            # sandbox needs pivot_root, which an initramfs root (the nested test host's) refuses.
            start_virtiofsd="rm -f $sock; /usr/lib/qemu/virtiofsd --socket-path=$sock -o source=$share \
 -o cache=auto -o sandbox=chroot >$work/virtiofsd.log 2>&1 & i=0; while [ ! -S $sock ] && [ \$i -lt 500 ]; do sleep 0.01; i=\$((i+1)); done;"
        fi
        if [ -n "${BENCH_GUEST_TIME:-}" ]; then
            for i in "${!scripts[@]}"; do scripts[i]=$(timed_job "${scripts[$i]}"); done
            qemu_base=${qemu_base/-chardev null,id=o/-chardev file,id=o,path=$work/out}
        fi
        for i in "${!names[@]}"; do
            echo "bench-vm: $mode: ${names[$i]}: bootbox virtio-9p (A) against $peer (B), same kernel" >&2
            if [ "$mode" = 9p ]; then
                "$bootbox" initrd -o "$work/app.cpio" --share "$share:data" -- sh -c "${scripts[$i]}" >/dev/null
                peer_cmd=$(qemu_check "-fsdev local,id=fs0,path=$share,security_model=none,readonly=on \
 -device virtio-9p-device,fsdev=fs0,mount_tag=data -initrd $work/app.cpio -append '$cmdline'")
            else
                # QEMU's guest mounts the virtio-fs export itself; bootbox's init mounts the share.
                "$bootbox" initrd -o "$work/app.cpio" --with mount -- \
                    sh -c "mount -t virtiofs data /mnt && cd /mnt && ${scripts[$i]}" >/dev/null
                # vhost-user devices need modern virtio-mmio (microvm defaults to legacy); the
                # run's status is QEMU's check, not virtiofsd's.
                peer_cmd="$start_virtiofsd $(qemu_check "-global virtio-mmio.force-legacy=false \
 -object memory-backend-memfd,id=mem,size=256M,share=on -machine memory-backend=mem \
 -chardev socket,id=vfs,path=$sock -device vhost-user-fs-device,chardev=vfs,tag=data \
 -initrd $work/app.cpio -append '$cmdline'"); r=\$?; wait; test \$r = 0 || { cat $work/virtiofsd.log >&2; false; }"
                peer_cmd=${peer_cmd//-kernel $kernel/-kernel $vkernel}
            fi
            if [ -n "${BENCH_GUEST_TIME:-}" ]; then
                bootbox_cmd="$(printf '%q ' "$bootbox" run --cold --kernel "$vkernel" --share "$share:data" -- sh -c "${scripts[$i]}")"
                echo "${names[$i]}, timed in the guest: bootbox virtio-9p against $peer"
                guest_times "${names[$i]}"
                continue
            fi
            "$bootbox" bench --runs "$runs" --warmup 1 --expect-status 5 --compare "$peer_cmd" \
                -- run --cold --kernel "$vkernel" --share "$share:data" -- sh -c "${scripts[$i]}"
        done
        ;;
    disk)
        disks="$BOOTBOX_BENCH_DISKS"
        # One comparison per job: bootbox's --disk against QEMU's virtio-blk-device on the
        # same image (read-only on both), same kernel, same initramfs (`bootbox initrd --disk`
        # records --mount-disks in the job, so the init mounts the disk under QEMU too).
        disk_bench() {
            local what=$1 image=$2 mount=$3
            shift 3
            echo "bench-vm: disk: $what" >&2
            "$bootbox" initrd -o "$work/app.cpio" --disk "$image" $mount -- "$@" >&2
            "$bootbox" bench --runs "$runs" --warmup 1 --expect-status 5 \
                --compare "$(qemu_check "-drive file=$image,if=none,id=d0,format=raw,readonly=on \
 -device virtio-blk-device,drive=d0 -initrd $work/app.cpio -append '$cmdline'")" \
                -- run --disk "$image" $mount -- "$@"
        }
        disk_bench "sequential read of a 64 MiB raw disk (dd bs=1M)" "$disks/seq.img" "" \
            sh -c 'dd if=/dev/vda of=/dev/null bs=1M 2>/dev/null && exit 5'
        digest='find . -path ./etc -prune -o -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum'
        disk_bench "list and hash 2000 files on a mounted ext4 image" "$disks/ext4.img" --mount-disks \
            sh -c "cd /disk/vda && test \"\$($digest)\" = '$(cat "$disks/tree.digest")' && exit 5"
        disk_bench "launch to cat /disk/vda1/etc/os-release (GPT disk, ext4 partition)" \
            "$disks/gpt.img" --mount-disks sh -c 'grep -q ^ID= /disk/vda1/etc/os-release && exit 5'
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
    sandbox)
        "$bootbox" bench --runs "$runs" --warmup 2 --expect-status 5 \
            --compare "$bootbox run --no-sandbox -- sh -c 'exit 5'; test \$? = 5" \
            -- run -- sh -c 'exit 5'
        tree="$BOOTBOX_BENCH_TREE"
        job="find . -type f -print0 | xargs -0 sha256sum >/dev/null; exit 5"
        "$bootbox" bench --runs "$runs" --warmup 1 --expect-status 5 \
            --compare "$bootbox run --no-sandbox --share $tree:data -- sh -c '$job'; test \$? = 5" \
            -- run --share "$tree:data" -- sh -c "$job"
        ;;
    *) echo "bench-vm: mode must be boot, warm, 9p, virtiofs, disk, analyze, stats or sandbox" >&2; exit 2 ;;
esac
