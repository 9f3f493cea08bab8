#!/usr/bin/env bash
# The main job on one machine: installs and builds (scripts/setup.sh), starts the embedded default
# (a private PostgreSQL cluster under the state dir via scripts/pg-local.sh, a broker, and workers
# via scripts/launch-workers.sh: one per GPU, or 2 CPU workers), makes sample speech with
# espeak-ng/flite, transcribes it with `asr-submit transcribe --wait` using the shipped English
# model (models/en-small.pt, a small model trained on synthetic speech, decoded with its language
# model models/en-small.lm; see bench/RESULTS.md for its error rates),
# prints the transcripts beside the reference text and where the results live, then stops the
# fleet (workers first, so they drain; then the broker; then PostgreSQL).
#
#   scripts/demo.sh          run the demo and stop everything at the end
#   scripts/demo.sh --keep   leave the fleet running afterwards (PIDs in STATE/pids)
#   scripts/demo.sh --stop   stop a fleet left running by --keep
#
# Environment:
#   ASRF_STATE_DIR     state root (default: REPO/asrf-state): broker/, worker-cpuN/ or worker-gpuN/, pg/, logs/, pids
#   ASRF_PORT          broker TCP port on 127.0.0.1 (default 5555)
#   ASRF_DEMO_TIMEOUT  seconds the submission may take before giving up (default 300)
#   ASRF_CPU_WORKERS   CPU workers when no GPU is visible (default 2)
#   ASRF_MODEL_FILE    acoustic model the workers load (default REPO/models/en-small.pt)
#
# Exits with asr-submit's status: 0 all files transcribed, 1 a file failed, 3 broker unreachable or timeout.
set -euo pipefail

usage() {
    sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

keep=0
stop_only=0
for arg in "$@"; do
    case "$arg" in
        --keep) keep=1 ;;
        --stop) stop_only=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "demo: unknown option: $arg" >&2; usage >&2; exit 2 ;;
    esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${ASRF_STATE_DIR:-$REPO/asrf-state}"
[[ "$STATE" == /* ]] || STATE="$PWD/$STATE"
PORT="${ASRF_PORT:-5555}"
DEMO_TIMEOUT="${ASRF_DEMO_TIMEOUT:-300}"
CPU_WORKERS="${ASRF_CPU_WORKERS:-2}"
MODEL="${ASRF_MODEL_FILE:-$REPO/models/en-small.pt}"
PIDS_FILE="$STATE/pids"
LOGS="$STATE/logs"
BROKER_BIN="build/broker/asr-broker"
WORKER_BIN="build/worker/asr-worker"
CLIENT_BIN="build/client/asr-submit"
cd "$REPO"

say() { echo "demo: $*"; }
die() { echo "demo: error: $*" >&2; exit 1; }

# True while the process runs (a zombie child that has not been waited for counts as stopped).
alive() {
    local _pid _comm state
    read -r _pid _comm state _ 2>/dev/null <"/proc/$1/stat" || return 1
    [[ "$state" != Z ]]
}

# True when the PID is a running asr-broker or asr-worker (guards against reused PIDs).
fleet_process() {
    local comm
    alive "$1" || return 1
    read -r comm 2>/dev/null <"/proc/$1/comm" || return 1
    [[ "$comm" == asr-broker || "$comm" == asr-worker ]]
}

# Sends SIGTERM to every PID given, waits up to 30 s for all of them, then SIGKILLs the rest.
stop_pids() {
    local pid i left
    (($# > 0)) || return 0
    for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
    for ((i = 0; i < 300; i++)); do
        left=0
        for pid in "$@"; do alive "$pid" && left=1; done
        ((left)) || break
        sleep 0.1
    done
    for pid in "$@"; do
        if alive "$pid"; then
            say "PID $pid did not stop within 30 s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
}

# Stops the fleet recorded in the PID file: workers first, then the broker.
stop_recorded_fleet() {
    local pid comm workers=() brokers=()
    [[ -f "$PIDS_FILE" ]] || return 0
    while read -r pid; do
        if ! [[ "$pid" =~ ^[0-9]+$ ]] || ! fleet_process "$pid"; then continue; fi
        read -r comm <"/proc/$pid/comm"
        if [[ "$comm" == asr-worker ]]; then workers+=("$pid"); else brokers+=("$pid"); fi
    done <"$PIDS_FILE"
    if ((${#workers[@]} + ${#brokers[@]} == 0)); then
        say "no fleet process from $PIDS_FILE is running"
    else
        if ((${#workers[@]})); then say "stopping workers (PIDs ${workers[*]})"; fi
        stop_pids "${workers[@]}"
        if ((${#brokers[@]})); then say "stopping broker (PID ${brokers[*]})"; fi
        stop_pids "${brokers[@]}"
    fi
    rm -f "$PIDS_FILE"
}

if ((stop_only)); then
    stop_recorded_fleet
    scripts/pg-local.sh stop "$STATE"
    exit 0
fi

# A fleet left by --keep would hold the port and the state directories.
if [[ -f "$PIDS_FILE" ]]; then
    while read -r pid; do
        if [[ "$pid" =~ ^[0-9]+$ ]] && fleet_process "$pid"; then
            die "a fleet started with --keep is still running (PIDs in $PIDS_FILE); stop it with: scripts/demo.sh --stop"
        fi
    done <"$PIDS_FILE"
    rm -f "$PIDS_FILE"
fi

say "installing and building: scripts/setup.sh"
scripts/setup.sh

for bin in "$BROKER_BIN" "$WORKER_BIN" "$CLIENT_BIN"; do
    [[ -x "$bin" ]] || die "$bin was not built"
done

BROKER_PID=""
WORKER_PIDS=()
WORKER_PIDS_FILE="$STATE/.demo-worker-pids"
rm -f "$WORKER_PIDS_FILE"
SUBMIT_PID=""
leave_running=0

# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    if [[ -n "$SUBMIT_PID" ]]; then stop_pids "$SUBMIT_PID"; fi
    if ((leave_running)); then exit "$rc"; fi
    # Interrupted while the workers were being started: those that did are in the file.
    if ((${#WORKER_PIDS[@]} == 0)) && [[ -s "$WORKER_PIDS_FILE" ]]; then mapfile -t WORKER_PIDS <"$WORKER_PIDS_FILE"; fi
    rm -f "$WORKER_PIDS_FILE"
    if ((${#WORKER_PIDS[@]})); then
        say "stopping workers (SIGTERM, PIDs ${WORKER_PIDS[*]})"
        stop_pids "${WORKER_PIDS[@]}"
    fi
    if [[ -n "$BROKER_PID" ]]; then
        say "stopping broker (SIGTERM, PID $BROKER_PID)"
        stop_pids "$BROKER_PID"
    fi
    rm -f "$PIDS_FILE"
    scripts/pg-local.sh stop "$STATE" || true
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

say "starting the private PostgreSQL cluster: scripts/pg-local.sh start $STATE"
mkdir -p "$STATE"
scripts/pg-local.sh start "$STATE"
PG_URL="$(scripts/pg-local.sh url "$STATE")"

show_logs() {
    local f
    for f in "$LOGS"/*.log; do
        [[ -f "$f" ]] || continue
        echo "----- last lines of $f -----" >&2
        tail -n 40 "$f" >&2 || true
    done
}

# Starts a fleet process in its own session (so a Ctrl-C reaches only this script, which then
# stops the fleet in order) with no stdin and its output in LOGS/NAME.log; sets STARTED_PID.
start_process() {
    local name=$1
    shift
    # Appended, as launch-workers.sh does: logrotate's copytruncate then leaves no hole.
    setsid "$@" </dev/null >>"$LOGS/$name.log" 2>&1 &
    STARTED_PID=$!
}

mkdir -p "$STATE/broker" "$LOGS"
endpoint_file="$STATE/broker/broker.endpoint"
rm -f "$endpoint_file"

say "starting broker on tcp://127.0.0.1:$PORT (state $STATE/broker, log $LOGS/broker.log)"
# The status page on any free port (a fixed 9100 may be node-exporter's, or an installed fleet's).
rm -f "$STATE/broker/http.endpoint"
start_process broker "$BROKER_BIN" --listen "tcp://127.0.0.1:$PORT" --state-dir "$STATE/broker" --pg "$PG_URL" \
    --http 127.0.0.1:0
BROKER_PID=$STARTED_PID
echo "$BROKER_PID" >"$PIDS_FILE"

for ((i = 0; i < 600; i++)); do
    [[ -s "$endpoint_file" ]] && break
    if ! alive "$BROKER_PID"; then
        show_logs
        die "the broker exited during start-up (is port $PORT in use? see $LOGS/broker.log)"
    fi
    sleep 0.1
done
[[ -s "$endpoint_file" ]] || { show_logs; die "the broker did not write $endpoint_file within 60 s"; }
ENDPOINT="$(<"$endpoint_file")"
say "broker is listening on $ENDPOINT"
if [[ -s "$STATE/broker/http.endpoint" ]]; then
    say "status page: http://$(head -n 1 "$STATE/broker/http.endpoint")/"
fi

say "starting workers: scripts/launch-workers.sh (one per GPU, or $CPU_WORKERS CPU workers; model $MODEL)"
# Through a file, PID by PID as they start: a Ctrl-C meanwhile still finds them to stop.
launch_rc=0
scripts/launch-workers.sh --broker "$ENDPOINT" --state-dir "$STATE" --log-dir "$LOGS" \
    --cpu-workers "$CPU_WORKERS" --model-file "$MODEL" -- --pg "$PG_URL" >"$WORKER_PIDS_FILE" || launch_rc=$?
mapfile -t WORKER_PIDS <"$WORKER_PIDS_FILE"
((launch_rc == 0)) || { show_logs; die "scripts/launch-workers.sh failed (exit $launch_rc; see $LOGS)"; }
((${#WORKER_PIDS[@]})) || die "no worker started (see $LOGS)"
# Workers first, broker last: `kill $(cat pids)` then signals the workers before the broker.
printf '%s\n' "${WORKER_PIDS[@]}" "$BROKER_PID" >"$PIDS_FILE"
if ((keep)); then leave_running=1; fi

client() { "$CLIENT_BIN" --broker "$ENDPOINT" "$@"; }

say "waiting for the workers to connect"
connected=0
for ((i = 0; i < 300; i++)); do
    for pid in "${WORKER_PIDS[@]}"; do
        alive "$pid" || { show_logs; die "worker PID $pid exited during start-up (see $LOGS)"; }
    done
    connected=$(client workers 2>/dev/null | grep -c . || true)
    ((connected >= ${#WORKER_PIDS[@]})) && break
    sleep 0.1
done
if ((connected < ${#WORKER_PIDS[@]})); then say "warning: only $connected worker(s) connected after 30 s; submitting anyway"; fi

SAMPLES="$STATE/samples"
if [[ ! -s "$SAMPLES/train.jsonl" ]]; then
    say "making sample audio with espeak-ng and flite (build/scripts/synth/asr-synth, sentences it never trained on)"
    build/scripts/synth/asr-synth --out "$SAMPLES" --utterances 6 --seed 90210 --valid-fraction 0 \
        --heldout-fraction 0 --noise-fraction 0 --max-words 10 >/dev/null
fi
OUT="$STATE/transcripts"
say "transcribing $SAMPLES/wav into $OUT (asr-submit transcribe ... --format txt,json,srt --wait)"
# In the background so that a SIGTERM or Ctrl-C reaches the trap at once, not after asr-submit.
# (The binary itself, not the shell function: $! must be its PID for the trap to stop it.)
"$CLIENT_BIN" --broker "$ENDPOINT" --timeout "$DEMO_TIMEOUT" transcribe "$SAMPLES/wav" --out "$OUT" \
    --format txt,json,srt --overwrite --wait &
SUBMIT_PID=$!
rc=0
wait "$SUBMIT_PID" || rc=$?
SUBMIT_PID=""
say "asr-submit exited with $rc"

lm_note="greedy decoding"
[[ -s "${MODEL%.*}.lm" ]] && lm_note="beam search with $(basename "${MODEL%.*}.lm")"
say "transcripts (model $(basename "$MODEL"), $lm_note; reference text in brackets):"
while IFS=$'\t' read -r wav text; do
    txt="$OUT/$(basename "${wav%.*}").txt"
    printf '  %s: %s\n      [%s]\n' "$(basename "$wav")" "$(tr '\n' ' ' <"$txt" 2>/dev/null || echo '(missing)')" "$text"
done < <(python3 -c 'import json,sys
for l in open(sys.argv[1]):
    j=json.loads(l); print(j["audio"]+"\t"+j["text"])' "$SAMPLES/train.jsonl")
say "results live in: $OUT (txt, json with word timings, srt) and PostgreSQL ($PG_URL, table results)"
sleep 1
psql "$PG_URL" -Atc "SELECT 'result rows with a transcript', count(*) FROM results WHERE transcript IS NOT NULL" \
    -c "SELECT state, count(*) FROM jobs GROUP BY state" || true

if ((rc != 0)); then show_logs; fi

if ((keep)); then
    say "the fleet keeps running: broker PID $BROKER_PID, worker PIDs ${WORKER_PIDS[*]} (saved in $PIDS_FILE)"
    say "try: $REPO/$CLIENT_BIN --broker $ENDPOINT status   or: psql '$PG_URL'"
    say "stop it with: $REPO/scripts/demo.sh --stop   (or: kill ${WORKER_PIDS[*]}; then kill $BROKER_PID)"
fi
exit "$rc"
