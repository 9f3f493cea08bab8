#!/usr/bin/env bash
# Trains the small fixture model the transcription tests use: spoken number strings only
# ("four seven two nine"), a small CTC model (under 2 MB), a few minutes on 2 CPU cores.
# It goes through the fleet like any training job: a private broker and one worker, then
# `asr-submit train`. Output: tests/fixtures/digits.pt and tests/fixtures/digits.json (its
# training summary). CI never runs this; the fixture is committed.
#
#   scripts/train-fixture.sh [--steps N] [--utterances N] [--work DIR]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

steps=1500 utterances=1600 work=""
while (($#)); do
    case "$1" in
        --steps) steps="$2"; shift 2 ;;
        --utterances) utterances="$2"; shift 2 ;;
        --work) work="$2"; shift 2 ;;
        -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
for b in build/scripts/synth/asr-synth build/broker/asr-broker build/worker/asr-worker build/client/asr-submit; do
    [[ -x "$b" ]] || { echo "build first: scripts/setup.sh ($b missing)" >&2; exit 1; }
done
[[ -n "$work" ]] || work="$(mktemp -d "${TMPDIR:-/tmp}/asrf-fixture.XXXXXX")"
mkdir -p "$work"
echo "fixture: synthesising $utterances number utterances into $work/data"
build/scripts/synth/asr-synth --out "$work/data" --utterances "$utterances" --seed 11 --numbers-fraction 1 \
    --valid-fraction 0.1 --heldout-fraction 0.05

rm -f "$work/broker/broker.endpoint"  # a reused --work DIR holds the last run's (a port now closed)
build/broker/asr-broker --listen tcp://127.0.0.1:0 --state-dir "$work/broker" --http "" >"$work/broker.log" 2>&1 &
broker=$!
worker=""
trap 'kill ${worker:+"$worker"} "$broker" 2>/dev/null || true; wait 2>/dev/null || true' EXIT
for _ in $(seq 100); do [[ -s "$work/broker/broker.endpoint" ]] && break; sleep 0.1; done
[[ -s "$work/broker/broker.endpoint" ]] || { echo "fixture: the broker did not start; see $work/broker.log" >&2; exit 1; }
endpoint="$(<"$work/broker/broker.endpoint")"
build/worker/asr-worker --broker "$endpoint" --state-dir "$work/worker" --threads "$(nproc)" >"$work/worker.log" 2>&1 &
worker=$!

echo "fixture: training $steps steps (log: $work/worker.log)"
build/client/asr-submit --broker "$endpoint" train --manifest "$work/data/train.jsonl" \
    --valid "$work/data/valid.jsonl" --name digits --steps "$steps" --batch-seconds 48 --lr 3e-3 --warmup 100 \
    --checkpoint-every 250 --valid-every 250 --channels 64 --hidden 96 --layers 2 \
    --out "$PWD/tests/fixtures/digits.pt" --wait | tee "$work/train.out" | grep -v '"state":"leased"' || true
grep '"state":"done"' "$work/train.out" | tail -n 1 > tests/fixtures/digits.json
[[ -s tests/fixtures/digits.json ]] || { echo "training failed; see $work" >&2; exit 1; }
ls -la tests/fixtures/digits.pt
cat tests/fixtures/digits.json
