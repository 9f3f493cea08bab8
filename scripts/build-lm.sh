#!/usr/bin/env bash
# Builds the character language model that ships as models/en-small.lm, from text only (no
# validation sentence is in it):
#   - the training split of asr-synth's sentence pool (`asr-synth --list-sentences`; the valid
#     split is chosen by a hash of the text, so no valid or held-out sentence is in it),
#   - spoken number strings as asr-synth makes them (8,000, seed 6),
#   - the example sentences of WordNet (Debian's wordnet-base, fetched with `apt-get download`,
#     no install, no root): about 43,000 sentences of everyday English, from outside the pool.
#
#   scripts/build-lm.sh [--out FILE] [--order N] [--keep DIR]
#
# --out    where to write the model (default models/en-small.lm)
# --order  n-gram order in characters (default 6)
# --keep   keep the text it was built from in DIR (sentences.txt, numbers.txt, wordnet.txt)
#
# Needs the build (scripts/setup.sh): build/scripts/synth/asr-synth and build/scripts/lm/asr-lm.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
die() { echo "build-lm: $*" >&2; exit 1; }
out=models/en-small.lm order=6 keep=""
while (($#)); do
    case "$1" in
        --out) out="${2:?--out needs a file}"; shift 2 ;;
        --order) order="${2:?--order needs a number}"; shift 2 ;;
        --keep) keep="${2:?--keep needs a directory}"; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
synth=build/scripts/synth/asr-synth lm=build/scripts/lm/asr-lm
[[ -x "$synth" && -x "$lm" ]] || die "no $synth or $lm: build first (scripts/setup.sh)"
command -v python3 >/dev/null || die "python3 is needed to read WordNet's files"
work="$(mktemp -d "${TMPDIR:-/tmp}/asrf-build-lm.XXXXXX")"
trap 'rm -rf "$work"' EXIT

"$synth" --list-sentences | awk -F'\t' '$1 == "train" { print $2 }' >"$work/sentences.txt"
[[ -s "$work/sentences.txt" ]] || die "asr-synth listed no training sentences"
# Number strings: only their texts are kept (asr-synth writes audio too, into the work dir).
"$synth" --out "$work/numbers" --utterances 8000 --seed 6 --numbers-fraction 1 --valid-fraction 0 \
    --heldout-fraction 0 --noise-fraction 0 --espeak-share 1 >/dev/null 2>"$work/numbers.log" ||
    { tail -5 "$work/numbers.log" >&2; die "asr-synth failed making number strings"; }
python3 -c 'import json, sys
for line in open(sys.argv[1]): print(json.loads(line)["text"])' "$work/numbers/train.jsonl" >"$work/numbers.txt"
rm -rf "$work/numbers"

(cd "$work" && apt-get download wordnet-base >/dev/null 2>"$work/apt.log") ||
    { cat "$work/apt.log" >&2; die "apt-get download wordnet-base failed"; }
dpkg-deb -x "$work"/wordnet-base_*.deb "$work/wordnet"
# data.noun, data.verb, ...: each synset's gloss follows '|', its example sentences are quoted in it.
python3 - "$work/wordnet/usr/share/wordnet" >"$work/wordnet.txt" <<'PY'
import glob, os, re, sys
for path in sorted(glob.glob(os.path.join(sys.argv[1], "data.*"))):
    for line in open(path, encoding="latin-1"):
        if line.startswith("  ") or "|" not in line:  # the licence header
            continue
        for quote in re.findall(r'"([^"]+)"', line.split("|", 1)[1]):
            text = " ".join(re.sub(r"[^a-z' ]+", " ", quote.lower().replace("`", "'")).split())
            if len(text.split()) >= 3:
                print(text)
PY
echo "build-lm: $(wc -l <"$work/sentences.txt") pool sentences, $(wc -l <"$work/numbers.txt") number strings," \
    "$(wc -l <"$work/wordnet.txt") WordNet examples" >&2
"$lm" --input "$work/sentences.txt" --input "$work/numbers.txt" --input "$work/wordnet.txt" --order "$order" --out "$out"
if [[ -n "$keep" ]]; then
    mkdir -p "$keep"
    cp "$work"/{sentences,numbers,wordnet}.txt "$keep/"
fi
