#!/usr/bin/env bash
# Result sink throughput: one worker's batched, epoch-fenced upserts vs one INSERT per row, on a
# private PostgreSQL cluster started for the run (scripts/pg-local.sh) and stopped afterwards.
#   bench/run_result_sink_bench.sh [--count N] [--single N]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[[ -x build/bench/result_sink_bench ]] || { echo "build first: scripts/setup.sh" >&2; exit 1; }
state="$(mktemp -d "${TMPDIR:-/tmp}/asrf-sink-bench.XXXXXX")"
trap 'scripts/pg-local.sh stop "$state" >/dev/null 2>&1 || true; rm -rf "$state"' EXIT
scripts/pg-local.sh start "$state" 2>/dev/null
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(date -u +%F)"
build/bench/result_sink_bench --pg "$(scripts/pg-local.sh url "$state")" --outbox "$state/outbox" "$@"
