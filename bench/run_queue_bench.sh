#!/usr/bin/env bash
# Queue throughput and latency: ASR Fleet beside Celery 5 + Redis, on this machine, in one run.
#
#   bench/run_queue_bench.sh [--count N] [--celery-count N] [--rate R] [--latency-count N]
#
# Both sides run durable echo jobs with 2 workers (ours: 2 asr-worker processes; Celery: one
# worker with 2 prefork processes, acks_late) and wait for every result. Installs the peer's
# Debian packages (python3-celery, python3-redis, redis-server) when missing; needs the project
# built (scripts/setup.sh). Prints both JSON lines and the ratio; logs go to bench/out/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

count=100000 celery_count=5000 rate=200 latency_count=1000
while (($#)); do
    case "$1" in
        --count) count="$2"; shift 2 ;;
        --celery-count) celery_count="$2"; shift 2 ;;
        --rate) rate="$2"; shift 2 ;;
        --latency-count) latency_count="$2"; shift 2 ;;
        -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done

missing=()
for p in python3-celery python3-redis redis-server; do
    dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -q '^installed$' || missing+=("$p")
done
if ((${#missing[@]})); then
    sudo=(); [[ "$(id -u)" -eq 0 ]] || sudo=(sudo -n)
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q update
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q install -y --no-install-recommends "${missing[@]}"
fi
[[ -x build/bench/queue_throughput ]] || { echo "build first: scripts/setup.sh" >&2; exit 1; }

mkdir -p bench/out
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(date -u +%F)"
ours=$(build/bench/queue_throughput --count "$count" --rate "$rate" --latency-count "$latency_count" \
       2> bench/out/asr-fleet.log | tail -n 1)
echo "$ours"
theirs=$(bench/celery/run.sh --count "$celery_count" --rate "$rate" --latency-count "$latency_count" \
         2> bench/out/celery.log | tail -n 1)
echo "$theirs"
python3 - "$ours" "$theirs" <<'PY'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"jobs/s: asr-fleet {a['jobs_per_s']:.0f}, celery {b['jobs_per_s']:.0f}, ratio {a['jobs_per_s'] / b['jobs_per_s']:.1f}x")
print(f"latency at {a['latency_rate']:.0f}/s p50/p99 ms: asr-fleet {a['p50_ms']:.2f}/{a['p99_ms']:.2f}, "
      f"celery {b['p50_ms']:.2f}/{b['p99_ms']:.2f}")
PY
