#!/usr/bin/env bash
# Runs every bootbox test: formatting and lints, the unit and device tests (tiny guests on this
# machine's /dev/kvm), a bounded fuzz run of the 9p server, and the end-to-end tests that boot
# the real guest kernel with the real VMM.
#
# End-to-end tests run directly when this machine's KVM is hardware-accelerated (vmx/svm in
# /proc/cpuinfo) and otherwise inside the nested test host (scripts/testhost.sh). Force one
# with BOOTBOX_E2E=direct|nested, or skip them with BOOTBOX_E2E=skip (the summary says so).
#
#   scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }
scripts/setup.sh
fuzz_secs="${BOOTBOX_FUZZ_SECS:-60}"

step "format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --release -- -D warnings

step "build (release)"
cargo build --workspace --release --bins

step "unit, device and 9p tests (tiny guests run on this machine's /dev/kvm)"
cargo test --workspace --release

step "the monitor's tests again with its extra internal assertions (feature internal-checks)"
cargo test --release -p vmm --features internal-checks

step "fuzzing the 9p decoder and server (${fuzz_secs}s writable, $(( fuzz_secs / 2 ))s read-only), virtio queues and the qcow2 reader"
target/release/p9-fuzz --secs "$fuzz_secs"
target/release/p9-fuzz --secs "$(( fuzz_secs / 2 ))" --read-only
target/release/virtio-fuzz --secs "$(( fuzz_secs / 2 ))"
target/release/disk-fuzz --secs "$(( fuzz_secs / 2 ))"

step "guest kernel (cached outside the work tree)"
kernel=$(scripts/build-kernel.sh)
echo "kernel: $kernel"

mode="${BOOTBOX_E2E:-auto}"
if [ "$mode" = auto ]; then
    if grep -qwE 'vmx|svm' /proc/cpuinfo; then mode=direct; else mode=nested; fi
fi

e2e_bin=$(cargo test --release -p bootbox --test e2e --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "e2e":
        print(m["executable"])')
[ -n "$e2e_bin" ] || { echo "could not build the end-to-end test binary" >&2; exit 1; }
e2e_env=(BOOTBOX_KERNEL="$kernel" BOOTBOX_BIN="$PWD/target/release/bootbox" BOOTBOX_INIT="$PWD/target/release/bootbox-init" BOOTBOX_CACHE=/tmp/bootbox-e2e-cache)

# Runs the end-to-end suite in the nested test host with extra environment "$@". A frozen test
# host (exit 123, see testhost.sh) says nothing about bootbox: the tests that had not passed
# run again, up to two more times.
e2e_nested() {
    local skips=() passed_before=() passed attempt status log
    for attempt in 1 2 3; do
        status=0
        log="$fixture.attempt$attempt"
        scripts/testhost.sh --timeout 2400 \
            --mirror "$e2e_bin" --mirror "$PWD/target/release/bootbox" --mirror "$PWD/target/release/bootbox-init" \
            --mirror "$kernel" --mirror "$fixture" --appliance-tools \
            -- env "${e2e_env[@]}" BOOTBOX_DISK_FIXTURE="$fixture" "$@" "$e2e_bin" --ignored --test-threads=1 \
            "${skips[@]}" | tee "$log" || status=${PIPESTATUS[0]}
        if [ "$status" = 123 ] && [ "$attempt" != 3 ]; then
            # The names of the tests that passed; the watchdog's heartbeat may sit between a
            # test's name and its verdict.
            mapfile -t passed < <(tr -d '\r' <"$log" | python3 -c 'import re, sys
for m in re.finditer(r"^test (\S+) \.\.\. (?:\s*testhost: alive at \d+s\s*)*ok$", sys.stdin.read(), re.M):
    print(m.group(1))')
            passed_before+=("${passed[@]}")
            skips=(--exact)
            for t in "${passed_before[@]}"; do skips+=(--skip "$t"); done
            echo "the test host froze; running the end-to-end tests that had not passed again (${#passed_before[@]} passed)" >&2
            continue
        fi
        [ "$status" = 0 ] || exit "$status"
        break
    done
}

# The suite runs twice: with warm start (the default) and with every run booting cold.
case "$mode" in
    direct)
        step "end-to-end tests (direct KVM, warm start)"
        env "${e2e_env[@]}" "$e2e_bin" --ignored --test-threads=1
        step "end-to-end tests (direct KVM, cold boots: BOOTBOX_COLD=1)"
        env "${e2e_env[@]}" BOOTBOX_COLD=1 "$e2e_bin" --ignored --test-threads=1
        ;;
    nested)
        # The disk test's images are made here: the test host has no mkfs tools.
        fixture=$(mktemp -d "${TMPDIR:-/tmp}/bootbox-disk-fixture.XXXXXX")
        trap 'rm -rf "$fixture" "$fixture".*' EXIT
        scripts/make-disk-fixture.sh "$fixture" 2>"$fixture.log" || {
            cat "$fixture.log" >&2
            exit 1
        }
        step "end-to-end tests (nested KVM, warm start)"
        e2e_nested
        step "end-to-end tests (nested KVM, cold boots: BOOTBOX_COLD=1)"
        e2e_nested BOOTBOX_COLD=1
        ;;
    skip)
        step "end-to-end tests"
        echo "end-to-end tests skipped (BOOTBOX_E2E=skip)"
        ;;
    *) echo "BOOTBOX_E2E must be auto, direct, nested or skip" >&2; exit 2 ;;
esac
step "all tests passed"
