#!/usr/bin/env bash
# `make fuzz`: run every cargo-fuzz target in fuzz/ (nightly toolchain) for a bounded time
# each (FUZZ_SECONDS, default 60). Installs cargo-fuzz from crates.io when missing. Not part
# of `make test`: it needs nightly. A crash fails the run and leaves its input under
# fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
SECONDS_PER_TARGET="${FUZZ_SECONDS:-60}"
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  cargo +nightly install cargo-fuzz --locked
fi
for target in $(cargo +nightly fuzz list); do
  echo "=== fuzz $target for ${SECONDS_PER_TARGET}s ==="
  mkdir -p "corpus/$target"
  log="$(mktemp)"
  status=0
  cargo +nightly fuzz run "$target" "corpus/$target" -- \
    -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
    >"$log" 2>&1 || status=$?
  grep -E "^(Done|stat::number_of_executed_units|stat::peak_rss_mb)" "$log" || true
  if [ "$status" -ne 0 ]; then
    tail -60 "$log"
    rm -f "$log"
    exit "$status"
  fi
  rm -f "$log"
done
