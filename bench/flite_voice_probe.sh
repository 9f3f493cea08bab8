#!/usr/bin/env bash
# What about the held-out flite voice `rms` makes the model err: the same sentences (those `rms`
# speaks in a held-out manifest) are spoken again by flite's voices with one setting changed at a
# time, and each set is scored by `asr-submit train --evaluate-only` with the language model:
#   rms as it is; rms with its duration stretched (speaking rate without pitch or formants)
#   awb and slt (the flite voices of the same kind, CLUSTERGEN, that the model trained on) at their
#     own mean F0 and at rms's (98 Hz): is a low voice the difficulty?
#   rms resynthesised with another MLSA frequency-warping constant (alpha; its own is 0.42, a
#     non-linear warp of the spectral envelope) or postfilter (beta; its own 0.4): is it a warp or
#     a sharpness of its spectrum that training voices lack?
# A tiny C program renders the audio through libflite (flite1-dev); flite's voices take F0 as
# f0_shift (rms ignores it: its F0 model is SPAM) and duration as duration_stretch.
#
#   bench/flite_voice_probe.sh [--model FILE] [--manifest valid_heldout.jsonl] [--keep DIR]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
model="models/en-small.pt" manifest="asrf-state/english/data/valid_heldout.jsonl" keep=""
while (($#)); do
    case "$1" in
        --model) model="$2"; shift 2 ;;
        --manifest) manifest="$2"; shift 2 ;;
        --keep) keep="$2"; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
for b in build/broker/asr-broker build/worker/asr-worker build/client/asr-submit; do
    [[ -x "$b" ]] || { echo "build first: scripts/setup.sh ($b missing)" >&2; exit 1; }
done
[[ -f "$model" ]] || { echo "no model file $model" >&2; exit 1; }
[[ -f "$manifest" ]] || { echo "no manifest $manifest (scripts/demo.sh or asr-synth makes valid_heldout.jsonl)" >&2; exit 1; }
[[ -f /usr/include/flite/cst_cg.h ]] || { echo "needs flite1-dev (apt-get install flite1-dev)" >&2; exit 1; }
if [[ -n "$keep" ]]; then work="$(realpath -m "$keep")"; mkdir -p "$work"
else work="$(mktemp -d "${TMPDIR:-/tmp}/asrf-flite-probe.XXXXXX")"; fi
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; [[ -n "$keep" ]] || rm -rf "$work"' EXIT

cat > "$work/render.c" <<'C'
/* render VOICE F0_SHIFT DURATION_STRETCH ALPHA BETA OUTDIR < texts: a wav per line, manifest on stdout */
#include <flite/flite.h>
#include <flite/cst_cg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
cst_voice *register_cmu_us_awb(const char *), *register_cmu_us_rms(const char *), *register_cmu_us_slt(const char *);
static void json_str(const char *s) {
  putchar('"');
  for (; *s; s++) { if (*s == '"' || *s == '\\') putchar('\\'); putchar(*s); }
  putchar('"');
}
int main(int argc, char **argv) {
  if (argc != 7) return 2;
  flite_init();
  cst_voice *v = !strcmp(argv[1], "awb") ? register_cmu_us_awb(0)
               : !strcmp(argv[1], "slt") ? register_cmu_us_slt(0) : register_cmu_us_rms(0);
  feat_set_float(v->features, "f0_shift", atof(argv[2]));
  feat_set_float(v->features, "duration_stretch", atof(argv[3]));
  /* the voice's model is read-only: change a copy of it */
  cst_cg_db *db = malloc(sizeof *db);
  memcpy(db, val_cg_db(feat_val(v->features, "cg_db")), sizeof *db);
  db->mlsa_alpha = atof(argv[4]);
  db->mlsa_beta = atof(argv[5]);
  feat_set(v->features, "cg_db", cg_db_val(db));
  char line[8192], path[4096];
  for (int i = 0; fgets(line, sizeof line, stdin); i++) {
    line[strcspn(line, "\n")] = 0;
    snprintf(path, sizeof path, "%s/%05d.wav", argv[6], i);
    cst_wave *w = flite_text_to_wave(line, v);
    if (!w || cst_wave_save_riff(w, path) != CST_OK_FORMAT) return 1;
    printf("{\"audio\": "); json_str(path); printf(", \"text\": "); json_str(line);
    printf(", \"duration\": %.3f}\n", (double)cst_wave_num_samples(w) / cst_wave_sample_rate(w));
    delete_wave(w);
  }
  return 0;
}
C
cc -O2 -o "$work/render" "$work/render.c" -lflite_cmu_us_awb -lflite_cmu_us_rms -lflite_cmu_us_slt \
    -lflite_usenglish -lflite_cmulex -lflite -lm
python3 -c '
import json, sys
for l in open(sys.argv[1]):
    d = json.loads(l)
    if d.get("voice") == "rms": print(d["text"])' "$manifest" > "$work/texts.txt"
n=$(wc -l < "$work/texts.txt")
((n > 0)) || { echo "no utterance of voice rms in $manifest" >&2; exit 1; }

# name voice f0_shift stretch alpha beta (awb's mean F0 is 132 Hz, slt's 172, rms's 98)
configs=(
    "rms rms 1 1 0.42 0.4"
    "rms,stretch-0.85 rms 1 0.85 0.42 0.4"
    "rms,stretch-1.2 rms 1 1.2 0.42 0.4"
    "awb awb 1 1 0.42 0.4"
    "awb,F0-98Hz awb 0.742 1 0.42 0.4"
    "slt slt 1 1 0.42 0.4"
    "slt,F0-98Hz slt 0.570 1 0.42 0.4"
    "rms,alpha-0.36 rms 1 1 0.36 0.4"
    "rms,alpha-0.39 rms 1 1 0.39 0.4"
    "rms,alpha-0.45 rms 1 1 0.45 0.4"
    "rms,alpha-0.48 rms 1 1 0.48 0.4"
    "rms,beta-0 rms 1 1 0.42 0"
    "rms,beta-0.8 rms 1 1 0.42 0.8"
)
for c in "${configs[@]}"; do
    read -r name voice f0 stretch alpha beta <<< "$c"
    mkdir -p "$work/$name"
    "$work/render" "$voice" "$f0" "$stretch" "$alpha" "$beta" "$work/$name" < "$work/texts.txt" > "$work/$name.jsonl"
done

build/broker/asr-broker --listen tcp://127.0.0.1:0 --state-dir "$work/broker" --http "" > "$work/broker.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [[ -s "$work/broker/broker.endpoint" ]] && break; sleep 0.1; done
ep="$(<"$work/broker/broker.endpoint")"
build/worker/asr-worker --broker "$ep" --device cpu --threads 2 --state-dir "$work/worker" > "$work/worker.log" 2>&1 &
pids+=($!)
lm=()
[[ -f "${model%.pt}.lm" ]] && lm=(--lm "$(realpath "${model%.pt}.lm")")
echo "model $model, $n sentences that rms speaks in $manifest; CER / WER ${lm:+with the language model}"
printf '| %-16s | %-7s | %-7s |\n|---|---|---|\n' set CER WER
for c in "${configs[@]}"; do
    read -r name _ <<< "$c"
    r="$(build/client/asr-submit --broker "$ep" train --evaluate-only --init "$(realpath "$model")" \
        --valid "$work/$name.jsonl" "${lm[@]}" --wait 2>&1)" || { echo "$name: evaluation failed: $r" >&2; exit 1; }
    cer="$(grep -o '"valid_cer":[0-9.]*' <<< "$r" | tail -1 | cut -d: -f2)"
    wer="$(grep -o '"valid_wer":[0-9.]*' <<< "$r" | tail -1 | cut -d: -f2)"
    printf '| %-16s | %.4f | %.4f |\n' "$name" "$cer" "$wer"
done
