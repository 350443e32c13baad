#!/usr/bin/env bash
# Profiles the real `carebus serve` process during one W1 phase of the comparison
# harness and draws a flame graph of where its CPU time goes (user and kernel).
#
#   bench/scripts/profile.sh PHASE [SECONDS] [OUT_DIR]
#
#   PHASE     http-1 | http-256 | stream-1 | stream-256
#             (W1 over HTTP, one request per message, or over the messages:stream
#             WebSocket; 1 or 256 messages in flight)
#   SECONDS   seconds of sampling (default 5); the phase runs SECONDS + 3
#   OUT_DIR   where PHASE.svg (flame graph), PHASE.txt (summary) and PHASE.folded (the
#             collapsed stacks, for inferno-diff-folded; not committed) go (default
#             bench/profiles)
#
# Needs: perf (linux-perf), a release build (`cargo build --release -p carebus -p
# carebus-bench`; line tables are on in the release profile) and inferno's
# `inferno-collapse-perf` and `inferno-flamegraph` on the PATH (`cargo install inferno`).
# The data directory is made under $CAREBUS_BENCH_DIR (default: the current directory),
# on the filesystem whose disk is measured. Run it with nothing else busy.
set -euo pipefail

phase=${1:?usage: profile.sh http-1|http-256|stream-1|stream-256 [SECONDS] [OUT_DIR]}
seconds=${2:-5}
root=$(cd "$(dirname "$0")/../.." && pwd)
out=${3:-$root/bench/profiles}
dir=${CAREBUS_BENCH_DIR:-.}
target=${CARGO_TARGET_DIR:-$root/target}

case "$phase" in
    http-1) group=w1; line='W1 durable publish, in-flight 1$' ;;
    http-256) group=w1; line='W1 durable publish, in-flight 256$' ;;
    stream-1) group=stream; line='messages:stream WebSocket, in-flight 1$' ;;
    stream-256) group=stream; line='messages:stream WebSocket, in-flight 256$' ;;
    *) echo "unknown phase $phase (http-1, http-256, stream-1, stream-256)" >&2; exit 2 ;;
esac
for tool in perf inferno-collapse-perf inferno-flamegraph; do
    command -v "$tool" >/dev/null || { echo "$tool is not on the PATH" >&2; exit 2; }
done

mkdir -p "$out"
work=$(mktemp -d)
bench_pid=""
cleanup() {
    [ -n "$bench_pid" ] && kill "$bench_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

warmup=1
"$target/release/carebus-bench" compare --dir "$dir" --systems carebus --only "$group" \
    --rounds 1 --seconds $((seconds + 3)) --warmup $warmup --out "$work/report" \
    > "$work/bench.log" 2>&1 &
bench_pid=$!

# Wait (bounded) for the harness to announce the phase, then for its warm-up.
found=""
for _ in $(seq 1 600); do
    if grep -q "$line" "$work/bench.log"; then found=1; break; fi
    kill -0 "$bench_pid" 2>/dev/null || break
    sleep 0.1
done
[ -n "$found" ] || { echo "the harness never reached phase $phase:" >&2; cat "$work/bench.log" >&2; exit 1; }
server=$(pgrep -P "$bench_pid" -f "carebus serve" | head -1)
[ -n "$server" ] || { echo "no carebus serve process under the harness" >&2; exit 1; }
sleep $((warmup + 1))

perf record -F 999 --call-graph dwarf,16384 -p "$server" -o "$work/perf.data" \
    -- sleep "$seconds" 2> "$work/perf.log"
wait "$bench_pid" || true
bench_pid=""

when=$(date -u +%Y-%m-%dT%H:%MZ)
perf script -i "$work/perf.data" 2>/dev/null | inferno-collapse-perf --kernel > "$out/$phase.folded"
inferno-flamegraph --minwidth 0.5 --title "carebus serve, W1 $phase ($when)" \
    < "$out/$phase.folded" > "$out/$phase.svg"
perf report -i "$work/perf.data" --no-children --sort comm --stdio -g none 2>/dev/null \
    | grep -v '^#' | grep -v '^$' > "$work/threads" || true
perf report -i "$work/perf.data" --no-children --sort sym --stdio -g none 2>/dev/null \
    | grep -v '^#' | grep -v '^$' > "$work/symbols" || true
{
    echo "carebus serve during W1 $phase: $seconds s sampled at 999 Hz ($when)"
    echo
    echo "## Where the samples are (each counted once, first match from the top)"
    # Kernel frames end in _[k]. A sample's class is that of the first pattern any of its
    # frames matches; "user" is a sample whose innermost frame is not the kernel's.
    awk '
        { n = $NF; total += n; line = $0 }
        line ~ /fdatasync/ { c["fdatasync (the disk)"] += n; next }
        line ~ /;__schedule_\[k\]/ { c["context switches (sleep, wake-up, preemption)"] += n; next }
        line ~ /sock_(read|write)_iter|sock_(send|recv)msg|tcp_(send|recv)msg|epoll_wait/ { c["sockets and epoll"] += n; next }
        line ~ /futex/ { c["futex (waking another thread)"] += n; next }
        { split(line, f, ";"); leaf = f[length(f)]; sub(/ [0-9]+$/, "", leaf) }
        leaf ~ /_\[k\]$/ { c["other kernel"] += n; next }
        { c["user space (carebus, tokio, hyper, allocator)"] += n }
        END { for (k in c) printf "%5.1f %%  %s\n", 100 * c[k] / total, k }
    ' "$out/$phase.folded" | sort -rn
    echo
    echo "## CPU by thread"
    head -10 "$work/threads"
    echo
    echo "## Top functions (self time)"
    head -25 "$work/symbols"
    echo
    echo "## The harness's report of this run (the profiled phase is the row above)"
    grep -hE '^\| (HTTP|WebSocket)' "$work"/report/*.md | grep -v '– / –' || true
} > "$out/$phase.txt"
echo "wrote $out/$phase.svg, $out/$phase.txt and $out/$phase.folded"
