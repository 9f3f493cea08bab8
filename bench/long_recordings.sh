#!/usr/bin/env bash
# Word and character error rates on long recordings, against the same utterances transcribed as
# separate files (what the model does at best). Four ways through the client: split by length
# only with every segment kept (--pause-s 0 --min-confidence 0), every pause cut at its middle
# (--pause-keep-s -1 --min-confidence 0), long pauses, lead-ins and tails left out beyond 0.5 s of
# the speech (--min-confidence 0), and the default: that, and segments under 0.4 mean word
# confidence emptied.
#
# The sets: utterances of sentences never trained on (asr-synth's valid split, training voices, and
# valid_heldout, voices never heard). "clean": joined per voice into files of 10 utterances with
# 0.25-1 s gaps of faint hiss (-67 dBFS); "noisy": the same with pink noise under everything at
# 15 dB SNR; "gapped": files of 8 utterances with 2-6 s pauses and background under everything
# (pink, brown, mains hum, white or amplitude-modulated noise) 20 dB under the file's mean power.
# One broker and one CPU worker with the model (and its language model beside it, if any).
#
#   bench/long_recordings.sh [--model FILE] [--seed S] [--threads N] [--keep DIR]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
model="models/en-small.pt" seed=777 threads=2 keep=""
while (($#)); do
    case "$1" in
        --model) model="$2"; shift 2 ;;
        --seed) seed="$2"; shift 2 ;;
        --threads) threads="$2"; shift 2 ;;
        --keep) keep="$2"; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
for b in build/broker/asr-broker build/worker/asr-worker build/client/asr-submit build/scripts/synth/asr-synth; do
    [[ -x "$b" ]] || { echo "build first: scripts/setup.sh ($b missing)" >&2; exit 1; }
done
if [[ -n "$keep" ]]; then
    work="$keep"
    mkdir -p "$work"
else
    work="$(mktemp -d "${TMPDIR:-/tmp}/asrf-long-bench.XXXXXX")"
fi
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; [[ -n "$keep" ]] || rm -rf "$work"' EXIT

build/scripts/synth/asr-synth --out "$work/data" --utterances 3000 --seed "$seed" --valid-fraction 0.1 \
    --heldout-fraction 0.05 >/dev/null 2>"$work/synth.log"
python3 - "$work" "$seed" <<'PY'
import array, json, math, os, random, sys, wave
work, seed = sys.argv[1], int(sys.argv[2])
random.seed(seed)
utts = []
for split in ("valid", "valid_heldout"):
    utts += [json.loads(l) for l in open(f"{work}/data/{split}.jsonl")]
own = ("kal16", "rms", "awb", "slt", "en-us-nyc+m5", "en-gb-scotland+f3")  # the rest: "espeak"
groups = {}
for u in utts:
    groups.setdefault(u["voice"] if u["voice"] in own else "espeak", []).append(u)

def read(path):
    with wave.open(path) as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1 and w.getsampwidth() == 2
        a = array.array("h")
        a.frombytes(w.readframes(w.getnframes()))
    return a

def write(path, xs):
    a = array.array("h", (max(-32768, min(32767, int(round(x)))) for x in xs))
    with wave.open(path, "wb") as w:
        w.setnchannels(1); w.setsampwidth(2); w.setframerate(16000); w.writeframes(a.tobytes())

def background(kind, n):
    out, b0, b1, b2, brown = [], 0.0, 0.0, 0.0, 0.0
    for i in range(n):
        t, g = i / 16000, random.gauss(0, 1)
        if kind == "pink":
            b0 = 0.99765 * b0 + g * 0.0990460
            b1 = 0.96300 * b1 + g * 0.2965164
            b2 = 0.57000 * b2 + g * 1.0526913
            out.append(b0 + b1 + b2 + g * 0.1848)
        elif kind == "brown":
            brown = 0.995 * brown + g
            out.append(brown)
        elif kind == "hum":
            out.append(sum(math.sin(2 * math.pi * 50 * h * t) / h for h in range(1, 6)) + 0.05 * g)
        elif kind == "am":
            out.append(g * (0.55 + 0.45 * math.sin(2 * math.pi * 1.5 * t)))
        else:
            out.append(g)
    return out

for d in ("clean", "noisy", "single", "gapped"):
    os.makedirs(f"{work}/{d}", exist_ok=True)
refs, single, members, own_noise = {}, {}, {}, {}
for g, us in sorted(groups.items()):
    random.shuffle(us)
    for i in range(0, min(len(us), 30) - 9, 10):
        chunk, sig, names = us[i:i + 10], [], []
        for u in chunk:
            sig.extend(random.gauss(0, 15) for _ in range(int(16000 * random.uniform(0.25, 1.0))))
            pcm = read(u["audio"])
            sig.extend(pcm)
            name = os.path.basename(u["audio"])[:-4]
            os.symlink(u["audio"], f"{work}/single/{name}.wav")
            single[name] = u["text"]
            names.append(name)
            # asr-synth adds noise under a share of utterances: their quietest 10 ms is far above
            # the silence of a clean one.
            e = sorted(sum(x * x for x in pcm[k:k + 160]) / 160 for k in range(0, len(pcm) - 159, 160))
            own_noise[name] = 10 * math.log10(max(e[len(e) // 10], 1e-9) / 32768 ** 2) > -60
        sig.extend(random.gauss(0, 15) for _ in range(8000))
        name = f"{g}-{i // 10}"
        refs[name] = " ".join(u["text"] for u in chunk)
        members[name] = names
        write(f"{work}/clean/{name}.wav", sig)
        rms = math.sqrt(sum(x * x for x in sig) / len(sig))
        b0 = b1 = b2 = 0.0
        pink = []
        for _ in sig:  # pink noise: three one-pole filters of white noise
            w0 = random.gauss(0, 1)
            b0 = 0.99765 * b0 + w0 * 0.0990460
            b1 = 0.96300 * b1 + w0 * 0.2965164
            b2 = 0.57000 * b2 + w0 * 1.0526913
            pink.append(b0 + b1 + b2 + w0 * 0.1848)
        k = rms / math.sqrt(sum(x * x for x in pink) / len(pink)) * 10 ** (-15 / 20)
        write(f"{work}/noisy/{name}.wav", [x + k * y for x, y in zip(sig, pink)])
gapped_refs, pool = {}, list(utts)
random.shuffle(pool)
for k in range(10):
    chunk, sig = pool[k * 8:(k + 1) * 8], []
    for u in chunk:
        sig.extend([0.0] * int(16000 * random.uniform(2, 6)))
        sig.extend(read(u["audio"]))
    sig.extend([0.0] * 32000)
    kind = ["pink", "brown", "hum", "white", "am"][k % 5]
    bg = background(kind, len(sig))
    gain = math.sqrt(sum(x * x for x in sig) / sum(x * x for x in bg) * 10 ** (-20 / 10))
    write(f"{work}/gapped/g{k}-{kind}.wav", [x + gain * y for x, y in zip(sig, bg)])
    gapped_refs[f"g{k}-{kind}"] = " ".join(u["text"] for u in chunk)
json.dump(gapped_refs, open(f"{work}/gapped-refs.json", "w"))
json.dump(refs, open(f"{work}/long-refs.json", "w"))
json.dump(single, open(f"{work}/single-refs.json", "w"))
json.dump({"members": members, "own_noise": own_noise}, open(f"{work}/members.json", "w"))
print(f"sets: clean and noisy: {len(refs)} long files, {sum(len(r.split()) for r in refs.values())} reference "
      f"words, {len(single)} utterances; gapped: {len(gapped_refs)} files, "
      f"{sum(len(r.split()) for r in gapped_refs.values())} reference words")
PY

score() {  # refs.json, transcripts dir, label
    PYTHONPATH=bench python3 - "$@" <<'PY'
import json, os, sys
from wer import edits, norm
refs, out, label = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
we = wn = ce = cn = 0
for name, ref in refs.items():
    path = os.path.join(out, name + ".txt")
    hyp = norm(open(path).read()) if os.path.exists(path) else []
    r = norm(ref)
    we += edits(r, hyp); wn += len(r)
    ce += edits(" ".join(r), " ".join(hyp)); cn += len(" ".join(r))
print(f"{label:<52} WER {we / wn:.4f}   CER {ce / cn:.4f}   ({wn} words)")
PY
}

source bench/fleet.sh
fleet_start "$work" "$model" "$threads"
tx() {  # input dir, output dir, options...
    local in="$1" out="$2"; shift 2
    build/client/asr-submit --broker "$ep" transcribe "$in" --out "$out" --format txt,json --wait "$@" \
        2>>"$work/client.log"
}
tx "$work/single" "$work/out-single"
score "$work/single-refs.json" "$work/out-single" "the utterances as separate files"
for set in clean noisy gapped; do
    refs="$work/long-refs.json"
    [[ "$set" == gapped ]] && refs="$work/gapped-refs.json"
    tx "$work/$set" "$work/out-$set-length" --pause-s 0 --min-confidence 0
    score "$refs" "$work/out-$set-length" "$set: split by length, all kept"
    tx "$work/$set" "$work/out-$set-middle" --pause-keep-s -1 --min-confidence 0
    score "$refs" "$work/out-$set-middle" "$set: pauses cut at the middle, all kept"
    tx "$work/$set" "$work/out-$set-nogate" --min-confidence 0
    score "$refs" "$work/out-$set-nogate" "$set: long pauses left out, all segments kept"
    tx "$work/$set" "$work/out-$set-pauses"
    score "$refs" "$work/out-$set-pauses" "$set: default (and unsure segments emptied)"
done
# Per utterance, in the clean long files cut into exactly one segment per utterance: the same
# words as the separate files, or not, for utterances with and without noise of their own.
PYTHONPATH=bench python3 - "$work" <<'PY'
import json, sys
from wer import edits, norm
work = sys.argv[1]
m, single = json.load(open(f"{work}/members.json")), json.load(open(f"{work}/single-refs.json"))
acc = {False: [0, 0, 0, 0], True: [0, 0, 0, 0]}  # words, errors alone, errors in the long file, utterances
files = 0
for name, names in m["members"].items():
    segs = json.load(open(f"{work}/out-clean-pauses/{name}.json"))["segments"]
    if len(segs) != len(names):
        continue
    files += 1
    for u, seg in zip(names, segs):
        r, a = norm(single[u]), acc[m["own_noise"][u]]
        a[0] += len(r)
        a[1] += edits(r, norm(open(f"{work}/out-single/{u}.txt").read()))
        a[2] += edits(r, norm(seg["text"]))
        a[3] += 1
print(f"clean long files with one segment per utterance: {files} of {len(m['members'])}")
for own, (n, alone, inside, k) in acc.items():
    kind = "with noise of their own" if own else "without noise"
    print(f"  {k:3d} utterances {kind:<24} WER alone {alone / max(n, 1):.4f}   in the long file {inside / max(n, 1):.4f}   ({n} words)")
PY
