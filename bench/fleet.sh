# Sourced by the bench scripts (from the repository root): one broker and one CPU worker with a
# model on loopback. The caller declares `pids=()` and kills "${pids[@]}" on exit.
#
#   fleet_start WORK MODEL THREADS   # sets $ep, the broker endpoint; logs go to WORK/*.log
fleet_start() {
    local work="$1" model="$2" threads="$3"
    rm -f "$work/broker/broker.endpoint"  # a kept work dir holds the last run's endpoint
    echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(date -u +%F); model $model"
    build/broker/asr-broker --listen tcp://127.0.0.1:0 --state-dir "$work/broker" >"$work/broker.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do [[ -s "$work/broker/broker.endpoint" ]] && break; sleep 0.1; done
    [[ -s "$work/broker/broker.endpoint" ]] || { echo "the broker did not start: see $work/broker.log" >&2; return 1; }
    ep="$(<"$work/broker/broker.endpoint")"
    build/worker/asr-worker --broker "$ep" --state-dir "$work/worker" --model-file "$model" --threads "$threads" \
        >"$work/worker.log" 2>&1 &
    pids+=($!)
    local deadline=$((SECONDS + 60))
    until (($(build/client/asr-submit --broker "$ep" --request-timeout 5 workers 2>/dev/null | grep -c .) >= 1)); do
        ((SECONDS < deadline)) || { echo "no worker connected within 60 s: see $work/worker.log" >&2; return 1; }
        sleep 0.1
    done
}
