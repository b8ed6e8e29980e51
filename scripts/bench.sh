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
run ./target/release/bench-backup
if [[ -f tests/src/bin/bench-restore.rs ]]; then
  run ./target/release/bench-restore
fi
