#!/usr/bin/env bash
# `make bench`: every benchmark, in release, each printing its figures and ratios against a
# peer (or the machine's own ceiling) measured in the same run. Benchmarks never fail on a
# slow machine; they fail only when they cannot run. Record results in docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p integration-tests --bins
cargo build --release -q -p catalog --examples

run() {
  echo
  echo "=== $* ==="
  "$@"
}

run ./target/release/bench-nbd
run ./target/release/examples/bench_ingest
run ./target/release/examples/bench_efficiency
# Restore reads, pread against io_uring: 512 MiB, 3 rounds (the documented run is 1024 5).
run ./target/release/examples/bench_read 512 3
# Peak RSS as the repository grows, at 0.1 M and 0.4 M chunks (about 2 minutes; the
# documented run is `1 4`, several minutes more).
run ./target/release/examples/bench_memory 0.1 0.4
run ./target/release/bench-backup
if [[ -f tests/src/bin/bench-restore.rs ]]; then
  run ./target/release/bench-restore
fi
