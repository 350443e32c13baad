#!/usr/bin/env bash
# Compares carebus builds by alternating them, one round each, so every build sees the
# same moments of a noisy host (run-to-run variation on the benchmark VMs is larger than
# most changes: see BENCHMARKS.md). Prints one line per run with the figures that the
# issue-6 goals are about.
#
#   bench/scripts/ab-pairs.sh PAIRS ONLY OUT_DIR BUILD...
#
#   PAIRS    rounds of each build (alternating: A B A B ...)
#   ONLY     the harness's workload groups (`compare --only`), e.g. `stream` or
#            `w1,stream,core`
#   OUT_DIR  one directory per run is made inside (BUILD's number and name, the pair)
#   BUILD    a carebus binary, or CAREBUS_BIN:BENCH_BIN to also vary the harness (the
#            in-process `core` workloads run inside the harness binary)
#
# Environment: CAREBUS_BENCH_DIR, the directory on the measured disk (default: the
# current directory); SECONDS_PER_PHASE, W1's measured seconds (default 5); the default
# harness is $CARGO_TARGET_DIR/release/carebus-bench (else target/release/carebus-bench).
# Run it with nothing else busy (no builds, no CI).
set -euo pipefail

pairs=${1:?usage: ab-pairs.sh PAIRS ONLY OUT_DIR BUILD...}
only=${2:?usage: ab-pairs.sh PAIRS ONLY OUT_DIR BUILD...}
out=${3:?usage: ab-pairs.sh PAIRS ONLY OUT_DIR BUILD...}
shift 3
[ "$#" -ge 1 ] || { echo "give at least one BUILD" >&2; exit 2; }
root=$(cd "$(dirname "$0")/../.." && pwd)
default_bench=${CARGO_TARGET_DIR:-$root/target}/release/carebus-bench
dir=${CAREBUS_BENCH_DIR:-.}
seconds=${SECONDS_PER_PHASE:-5}
[ "$pairs" -ge 1 ] && [ "$pairs" -le 50 ] || { echo "PAIRS must be 1..50" >&2; exit 2; }

# The figure in column COL of the report's row starting with PREFIX (or "-").
cell() {
    local report=$1 prefix=$2 col=$3
    grep -F -- "$prefix" "$report" | head -1 | awk -F'|' -v c="$col" '{gsub(/^ +| +$/, "", $c); print $c}' | grep . || echo "-"
}

mkdir -p "$out"
for ((i = 0; i < pairs; i++)); do
    k=0
    for build in "$@"; do
        k=$((k + 1))
        carebus_bin=${build%%:*}
        bench_bin=$default_bench
        [ "$build" != "$carebus_bin" ] && bench_bin=${build#*:}
        # Build number first: two builds may have the same file name.
        run="$out/$k-$(basename "$carebus_bin")-$i"
        mkdir -p "$run"
        "$bench_bin" compare --dir "$dir" --systems carebus --only "$only" --rounds 1 \
            --seconds "$seconds" --carebus-bin "$carebus_bin" --out "$run" >"$run/log" 2>&1 \
            || { echo "$run: the harness failed (see $run/log)" >&2; continue; }
        report=$(ls "$run"/*.md | head -1)
        raw=$(grep -E '^\| (start|end) of the run' "$report" | awk -F'|' '{split($3, a, "/"); printf "%s ", a[2]}')
        printf '%s: raw p99 %s| HTTP W1/1 p50/p99 %s / %s | stream W1/1 %s / %s | stream W1/256 %s | core W1/1 %s / %s | core W1/256 %s msgs/s\n' \
            "$(basename "$run")" "$raw" \
            "$(cell "$report" '| carebus (HTTP, carebus-client) | fsync before ack | 1 |' 7 | cut -d/ -f1)" \
            "$(cell "$report" '| carebus (HTTP, carebus-client) | fsync before ack | 1 |' 7 | cut -d/ -f2)" \
            "$(cell "$report" 'one socket | 1 |' 5 | cut -d/ -f1)" \
            "$(cell "$report" 'one socket | 1 |' 5 | cut -d/ -f2)" \
            "$(cell "$report" 'one socket | 256 messages |' 4)" \
            "$(cell "$report" 'CPU = whole process) | 1 |' 5 | cut -d/ -f1)" \
            "$(cell "$report" 'CPU = whole process) | 1 |' 5 | cut -d/ -f2)" \
            "$(cell "$report" 'CPU = whole process) | 256 publishers |' 4)"
    done
done
