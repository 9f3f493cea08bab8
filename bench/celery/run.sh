#!/usr/bin/env bash
# Celery + Redis peer benchmark.
#
# Starts a private, non-persistent redis-server and a Celery worker
# (prefork pool, 2 processes), waits for the worker to answer a probe job,
# runs celery_bench.py with the arguments given to this script, then stops
# the worker and redis.  The last line of output is the JSON summary.
#
# Environment:
#   REDIS_PORT  port for the private redis-server (default 6390)
#   PYTHON      interpreter that can import celery and redis
#               (default: first of python3, /usr/bin/python3 that can)
#   CELERY_PREFETCH_MULTIPLIER  worker prefetch multiplier (default 4, see tasks.py)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
port="${REDIS_PORT:-6390}"
export CELERY_REDIS_URL="redis://127.0.0.1:${port}/0"
export PYTHONPATH="${here}${PYTHONPATH:+:${PYTHONPATH}}"

# A pyenv or virtualenv python3 may not see the Debian python3-celery package.
if [[ -z "${PYTHON:-}" ]]; then
    for candidate in python3 /usr/bin/python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
           "$candidate" -c 'import celery, redis' >/dev/null 2>&1; then
            PYTHON="$candidate"
            break
        fi
    done
fi
if [[ -z "${PYTHON:-}" ]]; then
    echo "no python3 with celery and redis found (apt-get install python3-celery python3-redis)" >&2
    exit 1
fi
command -v redis-server >/dev/null || { echo "redis-server not found" >&2; exit 1; }

workdir="$(mktemp -d "${TMPDIR:-/tmp}/celery-bench.XXXXXX")"
redis_pid=""
worker_pid=""
child_pid=""

# Run a command in the background and wait for it, so that a signal to this
# script is handled at once instead of after the command finishes.
run_child() {
    "$@" &
    child_pid=$!
    wait "$child_pid"
}

# Stop a background process: SIGTERM, wait up to $2 seconds, then SIGKILL.
stop_pid() {
    local pid="$1" grace="$2" i
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < grace * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    stop_pid "$child_pid" 5
    # Warm shutdown of the worker first (it still needs redis), then redis.
    stop_pid "$worker_pid" 20
    stop_pid "$redis_pid" 10
    if [[ $rc -ne 0 ]]; then
        for log in worker.log redis.log; do
            if [[ -s "$workdir/$log" ]]; then
                echo "--- last lines of $log ---" >&2
                tail -n 30 "$workdir/$log" >&2
            fi
        done
    fi
    rm -rf "$workdir"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if redis-cli -p "$port" ping >/dev/null 2>&1; then
    echo "port $port is already in use; set REDIS_PORT to a free port" >&2
    exit 1
fi

redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$workdir" --daemonize no --logfile "$workdir/redis.log" &
redis_pid=$!

for _ in $(seq 100); do
    redis-cli -p "$port" ping >/dev/null 2>&1 && break
    kill -0 "$redis_pid" 2>/dev/null || { echo "redis-server exited" >&2; exit 1; }
    sleep 0.1
done
redis-cli -p "$port" ping >/dev/null

(cd "$workdir" && exec "$PYTHON" -m celery -A tasks worker \
    --concurrency 2 --pool prefork --loglevel warning \
    --hostname "bench@%h" >"$workdir/worker.log" 2>&1) &
worker_pid=$!

# Ready once a probe job makes the round trip.
probe='
import sys, time
from tasks import echo
deadline = time.monotonic() + 60
while True:
    try:
        if echo.apply_async(args=("probe",)).get(timeout=2) == "probe":
            break
    except Exception:
        pass
    if time.monotonic() > deadline:
        sys.exit("celery worker did not become ready within 60 s")
'
run_child "$PYTHON" -c "$probe"

run_child "$PYTHON" "$here/celery_bench.py" "$@"
