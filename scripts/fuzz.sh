#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time (default 60 s each).
# Usage: scripts/fuzz.sh [seconds-per-target]
# Needs cargo-fuzz (installed here from crates.io if missing). On stable Rust,
# cargo-fuzz runs with RUSTC_BOOTSTRAP=1 and without a sanitizer.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${1:-60}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz
for target in $(cargo fuzz list); do
  echo "== $target ($secs s)"
  mkdir -p "corpus/$target"
  if [ "$target" = hl7_parse ] || [ "$target" = mllp_codec ]; then
    cp -n ../fixtures/hl7/*/* "corpus/$target/" 2>/dev/null || true
  fi
  RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer=none "$target" "corpus/$target" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 2>&1 | grep -E "^#[0-9]+.*(DONE|pulse)|Done [0-9]+ runs|SUMMARY|panicked|ERROR" | tail -3
done
