#!/usr/bin/env bash
# The project's English model: synthesises the corpus (once) and trains on the fleet, resuming
# from the newest checkpoint after any interruption (run it again with the same --work).
#
#   scripts/train-english.sh [--work DIR] [--utterances N] [--steps N] [--shards K] [--festival-share F]
#
# Everything lives under --work (default asrf-state/english): data/, broker/, worker/, logs.
# The final model goes to models/en-small.pt, its language model (when missing) to
# models/en-small.lm. Prints the job's progress lines.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

work=asrf-state/english utterances=12000 steps=1500 shards=2 festival_share=0
while (($#)); do
    case "$1" in
        --work) work="$2"; shift 2 ;;
        --utterances) utterances="$2"; shift 2 ;;
        --steps) steps="$2"; shift 2 ;;
        --shards) shards="$2"; shift 2 ;;
        --festival-share) festival_share="$2"; shift 2 ;;
        -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
mkdir -p "$work"
work="$(cd "$work" && pwd)"
data="$work/data"

if [[ ! -s "$data/train.jsonl" ]]; then
    echo "english: synthesising $utterances utterances in $shards shards into $data"
    pids=()
    for ((i = 0; i < shards; i++)); do
        build/scripts/synth/asr-synth --out "$data" --utterances "$utterances" --seed 2026 --shard "$i" \
            --shards "$shards" --festival-share "$festival_share" >"$work/synth.$i.log" 2>&1 &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p"; done
    for split in train valid valid_heldout; do cat "$data/$split".*.jsonl >"$data/$split.jsonl"; done
fi
echo "english: $(wc -l <"$data/train.jsonl") train, $(wc -l <"$data/valid.jsonl") valid, $(wc -l <"$data/valid_heldout.jsonl") held-out-voice utterances"

# The language model of the beam search (never a validation sentence in it): see scripts/build-lm.sh.
if [[ ! -s models/en-small.lm ]]; then
    scripts/build-lm.sh --out models/en-small.lm
fi

# A rerun must not read the endpoint the last run left (that broker's port is gone).
rm -f "$work/broker/broker.endpoint"
worker=""
build/broker/asr-broker --listen tcp://127.0.0.1:0 --state-dir "$work/broker" --http "" >>"$work/broker.log" 2>&1 &
broker=$!
trap 'if [[ -n "${worker:-}" ]]; then kill "$worker" 2>/dev/null; wait "$worker" 2>/dev/null; fi
      kill "$broker" 2>/dev/null; wait 2>/dev/null || true' EXIT
for _ in $(seq 100); do [[ -s "$work/broker/broker.endpoint" ]] && break; sleep 0.1; done
endpoint="$(<"$work/broker/broker.endpoint")"
build/worker/asr-worker --broker "$endpoint" --state-dir "$work/worker" --threads "$(nproc)" >>"$work/worker.log" 2>&1 &
worker=$!

# One job: a rerun finds it in the broker's journal (same request id) and the worker resumes it.
if [[ ! -s "$work/job" ]]; then
    build/client/asr-submit --broker "$endpoint" train --manifest "$data/train.jsonl" --valid "$data/valid.jsonl" \
        --name en-small --steps "$steps" --batch-seconds 48 --lr 1.5e-3 --warmup 300 --checkpoint-every 100 \
        --valid-every 250 --out "$PWD/models/en-small.pt" | tee "$work/job"
fi
batch="$(awk '{print $4}' "$work/job")"
build/client/asr-submit --broker "$endpoint" watch "$batch"
