#!/usr/bin/env bash
# Benchmarks the p9 9P2000.L server against diod on generated trees (see
# vmm/p9/src/bin/p9-bench.rs). Everything runs on unix sockets on this machine.
#
#   scripts/bench-9p.sh --quick          # < 1 minute: 10k-file tree, 3000 ops per workload
#   scripts/bench-9p.sh                  # 10k and 100k files, 20000 ops per workload
#   scripts/bench-9p.sh --files 50000 --ops 5000 --fids 1000,15000 --no-diod
#   scripts/bench-9p.sh --quick --rounds 5 --only walk,open --stats   # interleaved, noisy hosts
#   scripts/bench-9p.sh --rounds 5 --baseline /tmp/old-p9-bench       # a build before a change, too
#
# Trees are cached in ${TMPDIR:-/tmp}/p9-bench (pass --dir to change). The fid-scaling run is
# capped below the open-file limit (every fid holds one descriptor); raise `ulimit -n` to hold
# more.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release --quiet -p p9 --bin p9-bench
if ! command -v diod >/dev/null 2>&1; then
    echo "note: diod is not installed (Debian package 'diod'); comparing nothing" >&2
fi
# Try for enough descriptors to hold 100k fids; keep going with what we get.
ulimit -n 250000 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec "$CARGO_TARGET_DIR/release/p9-bench" "$@"
