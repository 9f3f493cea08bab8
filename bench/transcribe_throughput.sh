#!/usr/bin/env bash
# Transcription throughput of CPU workers with the project's model: audio seconds per wall second
# (RTFx) through the whole fleet (client decode + segmentation, broker batching, worker inference,
# outputs written), on a mixed set of short utterances and long files, with the broker's batching
# (defaults: up to 640 padded seconds, 256 segments), with smaller ones (--batch-budget-s 160
# --batch-max-items 64) and with batches of one segment (--batch-max-items 1). Prints each and the padding
# ratio the broker reports on /metrics. Workers decode with the model's language model (MODEL.lm,
# beam search) when it has one; a last run decodes greedily (--lm none) to show what that costs.
#
# With --gpus LIST (or --same-gpu N) the workers run on GPUs (scripts/launch-workers.sh); by
# default, and with --gpus none, on CPUs.
#
#   bench/transcribe_throughput.sh [--model FILE] [--short N] [--long N] [--workers N]
#                                  [--gpus LIST|none] [--same-gpu N]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
model="models/en-small.pt" short=200 long=6 workers=1 gpus=none same_gpu=0
while (($#)); do
    case "$1" in
        --model) model="$2"; shift 2 ;;
        --short) short="$2"; shift 2 ;;
        --long) long="$2"; shift 2 ;;
        --workers) workers="$2"; shift 2 ;;
        --gpus) gpus="$2"; shift 2 ;;
        --same-gpu) same_gpu="$2"; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
for b in build/broker/asr-broker build/worker/asr-worker build/client/asr-submit build/scripts/synth/asr-synth; do
    [[ -x "$b" ]] || { echo "build first: scripts/setup.sh ($b missing)" >&2; exit 1; }
done
work="$(mktemp -d "${TMPDIR:-/tmp}/asrf-tx-bench.XXXXXX")"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; [[ -n "${ASRF_KEEP_TMP:-}" ]] || rm -rf "$work"' EXIT

# The audio: N short utterances as they come, and `long` files of about a minute each made of 20
# utterances with pauses between them (split by the client at quiet points).
n=$((short + long * 20))
build/scripts/synth/asr-synth --out "$work/data" --utterances "$n" --seed 515 --valid-fraction 0 \
    --heldout-fraction 0 >/dev/null
mkdir -p "$work/set"
python3 - "$work/data/train.jsonl" "$work/set" "$short" "$long" <<'PY'
import json, shutil, sys, wave
manifest, out, short, long_n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rows = [json.loads(l) for l in open(manifest)]
for i, r in enumerate(rows[:short]):
    shutil.copy(r["audio"], f"{out}/short{i:03d}.wav")
rest = rows[short:]
for k in range(long_n):
    frames = b""
    for r in rest[k * 20:(k + 1) * 20]:
        with wave.open(r["audio"]) as w:
            frames += w.readframes(w.getnframes()) + b"\0\0" * 9600  # 0.6 s pause
    with wave.open(f"{out}/long{k}.wav", "wb") as w:
        w.setnchannels(1); w.setsampwidth(2); w.setframerate(16000); w.writeframes(frames)
PY
total=$(python3 -c 'import glob,wave,sys
print(round(sum(wave.open(f).getnframes()/16000 for f in glob.glob(sys.argv[1]+"/*.wav")),1))' "$work/set")
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(date -u +%F)"
placement=(--gpus "$gpus" --cpu-workers "$workers")
if ((same_gpu > 0)); then
    placement=(--same-gpu "$same_gpu")
    gpus=0
fi
if [[ "$gpus" == none ]]; then
    echo "set: $short short files + $long long files, $total audio seconds; model $model; $workers CPU worker(s)"
else
    echo "set: $short short files + $long long files, $total audio seconds; model $model; GPU workers (--gpus $gpus, --same-gpu $same_gpu)"
    nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /' || true
fi

run() {  # label, broker options...
    local label="$1"; shift
    local st="$work/$label"
    mkdir -p "$st"
    build/broker/asr-broker --listen tcp://127.0.0.1:0 --state-dir "$st/broker" --http 127.0.0.1:0 "$@" \
        >"$st/broker.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do [[ -s "$st/broker/broker.endpoint" && -s "$st/broker/http.endpoint" ]] && break; sleep 0.1; done
    local ep http
    ep="$(<"$st/broker/broker.endpoint")"
    http="$(<"$st/broker/http.endpoint")"
    mapfile -t wp < <(scripts/launch-workers.sh --broker "$ep" --state-dir "$st" --log-dir "$st" \
        "${placement[@]}" --model-file "$model" -- "${worker_args[@]}" 2>/dev/null)
    pids+=("${wp[@]}")
    for _ in $(seq 300); do
        (($(build/client/asr-submit --broker "$ep" workers 2>/dev/null | grep -c .) >= ${#wp[@]})) && break
        sleep 0.1
    done
    local t0 t1
    t0=$(date +%s.%N)
    build/client/asr-submit --broker "$ep" transcribe "$work/set" --out "$st/out" --format txt --wait \
        2>"$st/client.log" || { cat "$st/client.log" >&2; return 1; }
    t1=$(date +%s.%N)
    local pad
    pad=$(curl -s "http://$http/metrics" | awk '/^asrf_batch_padding_ratio /{print $2}')
    python3 -c 'import sys; t=float(sys.argv[2])-float(sys.argv[1]); a=float(sys.argv[3])
print(f"{sys.argv[4]:<28} wall {t:7.2f} s   RTFx {a/t:7.1f}   padding ratio {float(sys.argv[5]):.3f}")' \
        "$t0" "$t1" "$total" "$label" "${pad:-0}"
    kill "${wp[@]}" 2>/dev/null || true
    wait "${wp[@]}" 2>/dev/null || true
}
worker_args=()
run batched
run batched-160s --batch-budget-s 160 --batch-max-items 64
run batch-size-1 --batch-max-items 1
lm="${model%.*}.lm"
if [[ -s "$lm" ]]; then
    worker_args=(--lm none)
    run batched-greedy-decoding
fi
