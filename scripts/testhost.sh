#!/usr/bin/env bash
# Runs a command inside the nested test host: a software-emulated x86 machine (qemu TCG,
# `-cpu max`, which emulates AMD SVM) booting the distribution's kernel with kvm-amd loaded,
# so a VMM inside it gets a /dev/kvm that can boot a real Linux guest. Used when this
# machine's own KVM has no hardware virtualisation (see README: "How the tests pick KVM").
#
#   scripts/testhost.sh [--timeout SECS] [--mem MiB] [--appliance-tools] [--ext4-scratch DIR]
#                       [--mirror PATH]... -- COMMAND [ARGS...]
#
# Every --mirror PATH (file or directory) is copied into the test host at the same absolute
# path, and every ELF executable among them brings its shared libraries, so absolute paths
# baked into test binaries keep working inside. COMMAND runs as root with the output on the
# serial console, which is streamed here (--appliance-tools mirrors the programs the
# appliance builder packs); this script exits with COMMAND's exit status
# (or 124 when the test host times out, 125 when it failed to start).
# --ext4-scratch DIR mounts a fresh 768 MiB ext4 filesystem (made in the test host's memory,
# on a loop device) at DIR, for tests that need what the test host's tmpfs lacks, such as
# user extended attributes. TESTHOST_APPEND adds words to the test host kernel's command line.
#
# The emulated test host has been seen to halt for good, idle with interrupts on (HLT, IF=1), as
# if its one-shot timer interrupt had been lost. Its kernel therefore runs a periodic tick
# (nohz=off highres=off), so one lost wake-up is healed by the next tick.
# Inside, a watchdog prints "testhost: alive" every minute and, for any bootbox process older
# than TESTHOST_WATCH_SECS (default 300), dumps its threads' states, system calls and kernel
# stacks once. So a silent console means the emulated test host itself froze (its clock
# stopped): after TESTHOST_STALL_SECS (default 300) of silence the test host is stopped and
# this script exits with 123, so callers can tell a frozen test host from a failed command.
set -euo pipefail

timeout_secs=1800
stall_secs=${TESTHOST_STALL_SECS:-300}
watch_secs=${TESTHOST_WATCH_SECS:-300}
mem_mib=4096
mirrors=()
scratch=""
while [ $# -gt 0 ]; do
    case "$1" in
        --timeout) timeout_secs="$2"; shift 2 ;;
        --mem) mem_mib="$2"; shift 2 ;;
        --mirror) mirrors+=("$2"); shift 2 ;;
        --ext4-scratch) scratch="$2"; shift 2 ;;
        --appliance-tools)
            # The host programs the appliance builder looks for, so `bootbox run` works inside.
            for t in sh bash dash find ls stat cat sha256sum md5sum du grep file tar head tail wc sort \
                     xargs env sleep dd mkdir touch rm cp mv ln readlink true false echo printf yes \
                     cmp diff dmesg uniq cut tr tee sync id uname df awk sed chmod chown basename \
                     dirname blkid lsblk lvm mount umount mkfs.ext4 mkfs.xfs mkfs.exfat mkntfs; do
                p=$(command -v "$t" || true)
                case "$p" in /*) mirrors+=("$p") ;; esac
            done
            for f in /usr/share/misc/magic.mgc /usr/lib/file/magic.mgc /etc/ld.so.conf /etc/ld.so.conf.d; do
                [ -e "$f" ] && mirrors+=("$f")
            done
            shift ;;
        --) shift; break ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "testhost: unknown argument '$1' (try --help)" >&2; exit 125 ;;
    esac
done
[ $# -gt 0 ] || { echo "testhost: no command given (try --help)" >&2; exit 125; }

die() { echo "testhost: $*" >&2; exit 125; }
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing: apt-get install qemu-system-x86"
command -v busybox >/dev/null || die "busybox missing: apt-get install busybox-static"
busybox_bin=$(command -v busybox)
file -L "$busybox_bin" 2>/dev/null | grep -q 'statically linked' || [ -x /bin/busybox ] || die "need a static busybox: apt-get install busybox-static"

# The test host kernel: the newest Debian kernel image that has kvm-amd beside it.
host_kernel=""
for k in $(ls -1 /boot/vmlinuz-* 2>/dev/null | sort -V -r); do
    ver=${k#/boot/vmlinuz-}
    if [ -n "$(find "/lib/modules/$ver" -name 'kvm-amd.ko*' 2>/dev/null | head -n1)" ]; then
        host_kernel=$k
        break
    fi
done
[ -n "$host_kernel" ] || die "no /boot/vmlinuz-* with a kvm-amd module: apt-get install linux-image-amd64"

stage=$(mktemp -d "${TMPDIR:-/tmp}/bootbox-testhost.XXXXXX")
trap 'rm -rf "$stage"' EXIT
root="$stage/root"
mkdir -p "$root"/{proc,sys,dev,tmp,run,root,etc,modules,usr}
# Mirror the host's merged-/usr layout so absolute library paths resolve as they do here.
for d in bin sbin lib lib64; do
    if [ -L "/$d" ]; then
        ln -s "$(readlink "/$d")" "$root/$d"
        mkdir -p "$root/$(readlink -f "/$d")"
    else
        mkdir -p "$root/$d"
    fi
done

cp "$busybox_bin" "$root/bin/busybox"

# Modules in load order; Debian may ship them compressed.
modules=(irqbypass ccp kvm kvm-amd)
if [ -n "$scratch" ]; then
    command -v modprobe >/dev/null || die "--ext4-scratch needs modprobe (kmod) to order the modules"
    mke2fs_bin=$(command -v mke2fs) || die "--ext4-scratch needs mke2fs: apt-get install e2fsprogs"
    mirrors+=("$mke2fs_bin")
    # ext4 and loop with what they depend on, in the order modprobe would load them; what is
    # built into this kernel has no line.
    for f in $( (modprobe --show-depends -S "$ver" ext4; modprobe --show-depends -S "$ver" loop) |
                awk '$1 == "insmod" { print $2 }'); do
        m=$(basename "$f"); m=${m%%.ko*}
        case " ${modules[*]} " in *" $m "*) ;; *) modules+=("$m") ;; esac
    done
fi
for m in "${modules[@]}"; do
    f=$(find "/lib/modules/$ver" -name "$m.ko*" | head -n1)
    [ -n "$f" ] || die "module $m not found under /lib/modules/$ver"
    case "$f" in
        *.xz) xz -dc "$f" >"$root/modules/$m.ko" ;;
        *.zst) zstd -qdc "$f" >"$root/modules/$m.ko" ;;
        *.gz) gzip -dc "$f" >"$root/modules/$m.ko" ;;
        *) cp "$f" "$root/modules/$m.ko" ;;
    esac
done
scratch_setup=""
if [ -n "$scratch" ]; then
    scratch_q=$(printf '%q' "$scratch")
    scratch_setup="mkdir -p $scratch_q /run/scratch && mount -t tmpfs -o size=800m scratch /run/scratch &&
    dd if=/dev/zero of=/run/scratch/ext4.img bs=1M count=0 seek=768 2>/dev/null &&
    $mke2fs_bin -q -F -t ext4 -O ^metadata_csum /run/scratch/ext4.img &&
    mount -o loop /run/scratch/ext4.img $scratch_q && echo \"testhost: ext4 scratch at $scratch_q\" ||
    echo \"testhost: could not set up the ext4 scratch at $scratch_q\""
fi

# Copies one path (and, for ELF files, its shared libraries) to the same place in the root.
copy_path() {
    local p="$1"
    [ -e "$p" ] || die "--mirror $p: no such file or directory"
    mkdir -p "$root$(dirname "$p")"
    cp -a --parents "$p" "$root/" 2>/dev/null || cp -a "$p" "$root$p"
    # Follow a symlink one hop at a time, so chains such as /usr/bin/awk ->
    # /etc/alternatives/awk -> /usr/bin/mawk arrive whole.
    if [ -L "$p" ]; then
        local t
        t=$(readlink "$p")
        case "$t" in /*) ;; *) t="$(dirname "$p")/$t" ;; esac
        [ -e "$root$t" ] && [ ! -L "$t" ] || copy_path "$t"
    fi
}
copy_libs() {
    local f="$1"
    # ldd is fine here: this is test infrastructure, not the appliance builder.
    local libs
    libs=$(ldd "$f" 2>/dev/null | awk '/=> \// { print $3 } /^\t\/[^ ]+ \(/ { print $1 }') || true
    for lib in $libs; do
        [ -e "$root$lib" ] || copy_path "$lib"
    done
}
for m in "${mirrors[@]}"; do
    copy_path "$m"
done
while IFS= read -r -d '' f; do
    if head -c 4 "$f" 2>/dev/null | grep -q 'ELF'; then copy_libs "$f"; fi
done < <(find "$root" -path "$root/modules" -prune -o -type f -perm -u+x -print0)

# The command, quoted for the init script.
cmd=$(printf '%q ' "$@")
cat >"$root/init" <<INIT
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/local/bin:/usr/bin:/usr/sbin:/bin:/sbin HOME=/root TMPDIR=/tmp
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
for m in ${modules[*]}; do
    insmod /modules/\$m.ko || echo "testhost: insmod \$m failed"
done
[ -c /dev/kvm ] || echo "testhost: /dev/kvm did not appear"
$scratch_setup
echo "testhost: up after \$(cut -d' ' -f1 /proc/uptime)s, running: $cmd"
/watchdog $watch_secs &
cd /root
$cmd
echo "BOOTBOX-TESTHOST-EXIT=\$?"
poweroff -f
INIT
chmod +x "$root/init"

# The watchdog inside the test host. Every minute it proves the test host is alive (a line on
# the console, so the stall watcher below only fires when the emulator itself froze), and it
# dumps every thread of a bootbox process that has run for more than watch_secs: its state,
# the system call it sits in and its kernel stack. A hung run then says where it hung.
cat >"$root/watchdog" <<'WATCHDOG'
#!/bin/busybox sh
limit=$1
dumped=" "
hz=100
while sleep 60; do
    now=$(cut -d' ' -f1 /proc/uptime); now=${now%.*}
    echo "testhost: alive at ${now}s"
    for d in /proc/[0-9]*; do
        [ "$(cat "$d/comm" 2>/dev/null)" = bootbox ] || continue
        pid=${d#/proc/}
        case "$dumped" in *" $pid "*) continue ;; esac
        start=$(awk '{ print int($22 / '$hz') }' "$d/stat" 2>/dev/null) || continue
        [ $((now - start)) -gt "$limit" ] || continue
        dumped="$dumped$pid "
        echo "testhost: bootbox $pid has run for $((now - start))s: its threads"
        for t in "$d"/task/*; do
            echo "  thread $(cat "$t/comm") state $(awk '{ print $3 }' "$t/stat") wchan $(cat "$t/wchan") syscall $(cat "$t/syscall")"
            sed 's/^/      /' "$t/stack" 2>/dev/null
        done
    done
done
WATCHDOG
chmod +x "$root/watchdog"

(cd "$root" && find . -print0 | cpio --null -o -H newc --quiet) >"$stage/testhost.cpio"
echo "testhost: $(du -m "$stage/testhost.cpio" | cut -f1) MiB initramfs, kernel $host_kernel" >&2

log="$stage/console.log"
: >"$log"
# The stall watcher: stops this run's qemu (found by its unique initramfs path) when the
# console has said nothing for stall_secs.
(
    last_size=-1
    quiet=0
    while sleep 30; do
        size=$(stat -c %s "$log" 2>/dev/null) || exit 0
        if [ "$size" = "$last_size" ]; then quiet=$((quiet + 30)); else quiet=0; last_size=$size; fi
        if [ "$quiet" -ge "$stall_secs" ]; then
            touch "$stage/stalled"
            # Where the emulated CPU is, sampled a few times, for the report.
            python3 - "$stage/monitor" >"$stage/stall-registers" 2>&1 <<'PY' || true
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.settimeout(2)
def ask(cmd):
    s.sendall(cmd.encode() + b"\n")
    time.sleep(0.5)
    out = b""
    try:
        while True:
            out += s.recv(65536)
    except socket.timeout:
        pass
    return out.decode(errors="replace")
ask("")
for i in range(5):
    print(ask("info registers"))
    time.sleep(1)
PY
            pkill -f -- "-initrd $stage/testhost.cpio" || true
            exit 0
        fi
    done
) &
watcher=$!
set +e
timeout --foreground "$timeout_secs" qemu-system-x86_64 \
    -M q35 -cpu max -smp 1 -m "$mem_mib" -nographic -no-reboot -nic none -vga none \
    -monitor "unix:$stage/monitor,server=on,wait=off" \
    -kernel "$host_kernel" -initrd "$stage/testhost.cpio" \
    -append "console=ttyS0 panic=-1 quiet loglevel=3 nohz=off highres=off ${TESTHOST_APPEND:-}" </dev/null | tee "$log"
qemu_status=${PIPESTATUS[0]}
kill "$watcher" 2>/dev/null
set -e
if [ -e "$stage/stalled" ]; then
    echo "testhost: no console output for ${stall_secs}s: the test host froze (an emulator problem, not the command's); stopped it" >&2
    grep -E '^(RIP|CR0)=' "$stage/stall-registers" 2>/dev/null | sed 's/^/testhost: at the stall: /' >&2 || true
    exit 123
fi
status=$(tr -d '\r' <"$log" | sed -n 's/^BOOTBOX-TESTHOST-EXIT=\([0-9]*\)$/\1/p' | tail -n1)
if [ -n "$status" ]; then
    exit "$status"
fi
if [ "$qemu_status" = 124 ]; then
    echo "testhost: timed out after ${timeout_secs}s" >&2
    exit 124
fi
echo "testhost: the command did not report an exit status (qemu exit $qemu_status)" >&2
exit 125
