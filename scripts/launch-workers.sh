#!/usr/bin/env bash
# Starts the workers of one machine: one asr-worker per visible GPU (CUDA_VISIBLE_DEVICES set to
# that GPU, --device cuda:0), or N CPU workers when there is no GPU or the worker's libtorch has
# no CUDA (Debian's; a CUDA build comes from scripts/gpu-host.sh). Each runs in the background
# with its own state dir and log; their PIDs are printed on stdout, one per line.
#
#   scripts/launch-workers.sh --broker ENDPOINT [--state-dir DIR] [--log-dir DIR] [--cpu-workers N]
#                             [--model-file FILE] [--gpus LIST | --same-gpu N] [-- EXTRA WORKER OPTIONS]
#
#   --state-dir    root of the workers' state (worker-gpuN/ or worker-cpuN/ under it; default
#                  $ASRF_STATE_DIR, else the repository's asrf-state, as the other scripts)
#   --log-dir      where worker logs go (default STATE/logs)
#   --cpu-workers  CPU workers when no GPU is visible (default 2); each gets nproc/N threads
#   --model-file   acoustic model every worker loads (default models/en-small.pt; not passed
#                  when EXTRA WORKER OPTIONS name --model NAME, a registry model)
#   --gpus         GPU indices to use (default: CUDA_VISIBLE_DEVICES when set, empty meaning
#                  none, else every GPU nvidia-smi lists);
#                  "none": CPU workers even where GPUs are
#   --same-gpu N   start N workers on GPU 0 instead (tests several processes on a one-GPU host)
#
# GPU workers get --slots 2 unless EXTRA WORKER OPTIONS set --slots or ASRF_SLOTS is set: two jobs
# in flight, so the GPU runs one batch while the worker unpacks and answers the other. EXTRA WORKER
# OPTIONS (after --) go to every worker; one naming --threads replaces the CPU workers' share.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
broker="" state="${ASRF_STATE_DIR:-$REPO/asrf-state}" logs="" cpu_workers=2 model="$REPO/models/en-small.pt" gpus="" same_gpu=0
extra=()
while (($#)); do
    case "$1" in
        --broker|--state-dir|--log-dir|--cpu-workers|--model-file|--gpus|--same-gpu)
            (($# >= 2)) || { echo "launch-workers: $1 needs a value (see --help)" >&2; exit 2; } ;;&
        --broker) broker="$2"; shift 2 ;;
        --state-dir) state="$2"; shift 2 ;;
        --log-dir) logs="$2"; shift 2 ;;
        --cpu-workers) cpu_workers="$2"; shift 2 ;;
        --model-file) model="$2"; shift 2 ;;
        --gpus) gpus="$2"; shift 2 ;;
        --same-gpu) same_gpu="$2"; shift 2 ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "launch-workers: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ -n "$broker" ]] || { echo "launch-workers: --broker ENDPOINT is required" >&2; exit 2; }
[[ "$cpu_workers" =~ ^[1-9][0-9]*$ ]] || { echo "launch-workers: --cpu-workers must be a positive number" >&2; exit 2; }
[[ -r "$model" ]] || { echo "launch-workers: cannot read model file $model" >&2; exit 2; }
worker_bin="${ASRF_WORKER_BIN:-$REPO/build/worker/asr-worker}"
[[ -x "$worker_bin" ]] || { echo "launch-workers: $worker_bin is not built (scripts/setup.sh)" >&2; exit 1; }
[[ -n "$logs" ]] || logs="$state/logs"
mkdir -p "$state" "$logs"

if [[ "$gpus" == none ]]; then
    gpus=""
    ((same_gpu == 0)) || { echo "launch-workers: --same-gpu and --gpus none contradict each other" >&2; exit 2; }
elif [[ -z "$gpus" ]]; then
    if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
        gpus="$CUDA_VISIBLE_DEVICES"  # set and empty: GPUs hidden, CPU workers
    elif command -v nvidia-smi >/dev/null 2>&1; then
        gpus="$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | paste -sd, - || true)"
        # "No devices were found" and the like come on stdout too: only a list of indices is GPUs.
        [[ "$gpus" =~ ^[0-9]+(,[0-9]+)*$ ]] || gpus=""
    fi
    # A worker built against a libtorch without CUDA (Debian's, which scripts/setup.sh installs)
    # cannot use them: CPU workers then, rather than GPU workers that exit at start.
    # (Only when ldd shows the libtorch it links: otherwise nothing is known, and GPUs are used.)
    if [[ -n "$gpus" ]] && libs="$(ldd "$worker_bin" 2>/dev/null)" && grep -q 'libtorch' <<<"$libs" &&
        ! grep -q 'libtorch_cuda\|libc10_cuda' <<<"$libs"; then
        echo "launch-workers: GPUs $gpus found, but $worker_bin is built against a libtorch without CUDA;" \
             "starting CPU workers (scripts/gpu-host.sh builds against a CUDA libtorch: README, Build options)" >&2
        gpus=""
    fi
fi

# --same-gpu needs a GPU the worker can use: without one its workers all exited at start.
if ((same_gpu > 0)) && [[ -z "$gpus" ]]; then
    echo "launch-workers: --same-gpu needs a GPU this worker can use (none found, or its libtorch has no CUDA)" >&2
    exit 2
fi

started=()
start() {  # name, then the environment assignments and command
    local name="$1"; shift
    # Appended: a second run must not truncate the log of a worker that is still running.
    setsid env "$@" </dev/null >>"$logs/$name.log" 2>&1 &
    echo "$!"
    started+=("$!:$name")
    echo "launch-workers: $name PID $! (log $logs/$name.log)" >&2
}

# A worker that dies at once (its state dir locked by another worker, a bad option) is reported
# with the end of its log, and the exit status says so.
check_started() {
    sleep 1
    local failed=0 entry pid name
    for entry in "${started[@]}"; do
        pid="${entry%%:*}" name="${entry#*:}"
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "launch-workers: $name (PID $pid) exited at start; the end of $logs/$name.log:" >&2
            tail -n 5 "$logs/$name.log" >&2
            failed=1
        fi
    done
    return "$failed"
}

# Options after -- the worker gets once: the script's own default for them gives way (the worker
# refuses an option given twice, and --model NAME excludes --model-file); --broker, --device and
# --state-dir are the script's to set, one per worker.
has_extra() {
    local o
    for o in "${extra[@]}"; do [[ "$o" == "$1" || "$o" == "$1="* ]] && return 0; done
    return 1
}
for o in --broker --device --state-dir; do
    if has_extra "$o"; then
        echo "launch-workers: $o after -- is set by this script for each worker; use its own option (see --help)" >&2
        exit 2
    fi
done
model_args=(--model-file "$model")
if has_extra --model || has_extra --model-file; then model_args=(); fi

gpu_extra=("${extra[@]}")
[[ " ${extra[*]} " == *" --slots"* || -n "${ASRF_SLOTS:-}" ]] || gpu_extra=(--slots 2 "${extra[@]}")

if ((same_gpu > 0)); then
    for ((i = 0; i < same_gpu; i++)); do
        start "worker-gpu0-$i" CUDA_VISIBLE_DEVICES="${gpus%%,*}" "$worker_bin" --broker "$broker" --device cuda:0 \
            --state-dir "$state/worker-gpu0-$i" "${model_args[@]}" "${gpu_extra[@]}"
    done
elif [[ -n "$gpus" ]]; then
    IFS=, read -ra list <<<"$gpus"
    for g in "${list[@]}"; do
        start "worker-gpu$g" CUDA_VISIBLE_DEVICES="$g" "$worker_bin" --broker "$broker" --device cuda:0 \
            --state-dir "$state/worker-gpu$g" "${model_args[@]}" "${gpu_extra[@]}"
    done
else
    threads=$(( $(nproc) / cpu_workers ))
    ((threads >= 1)) || threads=1
    threads_args=(--threads "$threads")
    if has_extra --threads; then threads_args=(); fi
    for ((i = 1; i <= cpu_workers; i++)); do
        start "worker-cpu$i" CUDA_VISIBLE_DEVICES= "$worker_bin" --broker "$broker" --device cpu \
            "${threads_args[@]}" --state-dir "$state/worker-cpu$i" "${model_args[@]}" "${extra[@]}"
    done
fi
check_started
