#!/usr/bin/env bash
# The demo: inspects a directory (default: this repository) inside a bootbox appliance —
# `bootbox run --share DIR -- sha256sum FILES...` — prints what the guest computed, and checks
# it equals what the host's own sha256sum prints. Sets up a fresh machine on the way
# (packages, the guest kernel, the release build).
#
#   scripts/demo.sh [DIR]
#
# On a host whose KVM has no hardware virtualisation the appliance cannot boot directly, so
# the demo runs inside the nested test host (scripts/testhost.sh) and says so.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
dir=$(cd "${1:-$repo}" && pwd)
cd "$repo"

scripts/setup.sh
cargo build --release --bins --quiet
kernel=$(scripts/build-kernel.sh)
bootbox="$repo/target/release/bootbox"

# The files to hash: a repository's tracked files, or every regular file under DIR.
list=$(mktemp "${TMPDIR:-/tmp}/bootbox-demo.XXXXXX")
trap 'rm -f "$list"' EXIT
if git -C "$dir" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$dir" && git ls-files | while IFS= read -r f; do [ -f "$f" ] && printf '%s\n' "$f"; done) >"$list"
else
    (cd "$dir" && find . -type f | sed 's|^\./||' | LC_ALL=C sort) >"$list"
fi
echo "demo: hashing $(wc -l <"$list") files of $dir inside the appliance" >&2

# The comparison itself; runs here or inside the test host.
compare=$(mktemp "${TMPDIR:-/tmp}/bootbox-demo-compare.XXXXXX")
trap 'rm -f "$list" "$compare"' EXIT
cat >"$compare" <<'SCRIPT'
#!/bin/sh
# $1 bootbox, $2 kernel, $3 dir, $4 file list
set -e
cd "$3"
guest=$(mktemp) ; host=$(mktemp)
tr '\n' '\0' <"$4" | xargs -0 "$1" run --kernel "$2" --phases --share "$3" -- sha256sum >"$guest"
tr '\n' '\0' <"$4" | xargs -0 sha256sum >"$host"
cat "$guest"
if cmp -s "$guest" "$host"; then
    echo "demo: the appliance's sha256sum output equals the host's ($(wc -l <"$host") files)"
else
    echo "demo: MISMATCH between guest and host:"; diff "$guest" "$host" | head -20
    exit 1
fi
SCRIPT
chmod +x "$compare"

if grep -qwE 'vmx|svm' /proc/cpuinfo; then
    exec "$compare" "$bootbox" "$kernel" "$dir" "$list"
fi
echo "demo: this machine's KVM has no hardware virtualisation; running inside the nested test host" >&2
mirrors=()
while IFS= read -r f; do mirrors+=(--mirror "$dir/$f"); done <"$list"
exec scripts/testhost.sh --timeout 1800 --appliance-tools \
    --mirror "$bootbox" --mirror "$repo/target/release/bootbox-init" --mirror "$kernel" \
    --mirror "$compare" --mirror "$list" "${mirrors[@]}" \
    -- "$compare" "$bootbox" "$kernel" "$dir" "$list"
