#!/usr/bin/env bash
# Recorded human speech: how the model does on people rather than synthesisers. Debian ships a few
# English recordings of people: words and short phrases in children's programs, test sentences of
# a recogniser, telephone prompts. This fetches their packages with `apt-get download` (no
# install, no root; unpacked with dpkg -x into the work dir) and transcribes each set through the
# fleet:
#   ktuberling-data   words of the "potato guy" game (hat, nose, camel, pepperoni, ...), one voice
#   klettres-data     short words of the en and en_GB courses (car, dog, sky, ...), two voices
#   tuxpaint-stamps-default   spoken stamp descriptions ("a wombat", "two wild boars", ...)
#   alsa-utils        the eight spoken channel names of /usr/share/sounds/alsa, if installed
#   pocketsphinx-testdata   people's sentences: five read from a LibriVox book ("librivox") and
#                     seven short commands and digit strings ("commands": playing cards, "go
#                     forward ten meters", a TIDIGITS string); the package's own record of what
#                     pocketsphinx decoded from the book sentences is scored beside ours as a peer
#   asterisk-core-sounds-en(-wav)   telephone prompts of one woman, 8 kHz ("please enter your
#                     password followed by the pound key"): the half scripts/telephone-prompts.sh
#                     keeps out of training (valid.jsonl)
# References come from the packages' own metadata (sound names, the stamps' English text,
# transcription files), so a
# recording that says a little more or less than its name counts as errors; letters and lone
# sounds ("th", "aw", "ufo") are left out. Scored by word (WER), character (CER) and whole file
# (exactly right), with the default decoding and with every segment kept (--min-confidence 0).
# One broker and one CPU worker with the model (and its language model beside it, if any).
#
#   bench/real_speech.sh [--model FILE] [--threads N] [--keep DIR]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
model="models/en-small.pt" threads=2 keep=""
while (($#)); do
    case "$1" in
        --model) model="$2"; shift 2 ;;
        --threads) threads="$2"; shift 2 ;;
        --keep) keep="$2"; shift 2 ;;
        -h|--help) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
for b in build/broker/asr-broker build/worker/asr-worker build/client/asr-submit; do
    [[ -x "$b" ]] || { echo "build first: scripts/setup.sh ($b missing)" >&2; exit 1; }
done
[[ -f "$model" ]] || { echo "no model file $model" >&2; exit 1; }
if [[ -n "$keep" ]]; then
    work="$(realpath -m "$keep")"
    mkdir -p "$work"
else
    work="$(mktemp -d "${TMPDIR:-/tmp}/asrf-real-speech.XXXXXX")"
fi
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; [[ -n "$keep" ]] || rm -rf "$work"' EXIT

mkdir -p "$work/debs" "$work/root"
scripts/telephone-prompts.sh "$work/prompts" >/dev/null ||
    echo "skipping the telephone prompts: scripts/telephone-prompts.sh failed" >&2
for p in ktuberling-data klettres-data tuxpaint-stamps-default pocketsphinx-testdata; do
    if ! ls "$work/debs/${p}_"*.deb >/dev/null 2>&1; then
        (cd "$work/debs" && apt-get download "$p" >/dev/null 2>"$work/apt-$p.log") ||
            { echo "skipping $p: apt-get download failed (see $work/apt-$p.log)" >&2; continue; }
    fi
    dpkg -x "$work/debs/${p}_"*.deb "$work/root"
done

# One folder per set, files named so that transcripts do not collide, and refs.json beside them.
python3 - "$work" <<'PY'
import glob, json, os, re, sys
work = sys.argv[1]
root = f"{work}/root/usr/share"
sets = {}
def add(set_name, key, audio, text):
    d = f"{work}/sets/{set_name}"
    os.makedirs(d, exist_ok=True)
    ext = os.path.splitext(audio)[1]
    link = f"{d}/{key}{ext}"
    if not os.path.lexists(link):
        os.symlink(os.path.abspath(audio), link)
    sets.setdefault(set_name, {})[key] = text

# ktuberling: <sound name="egypt_camel" file="en/egypt_camel.ogg" />; scene prefixes are not said.
theme = f"{root}/ktuberling/sounds/en.soundtheme"
spoken = {"palmtree": "palm tree", "fallingstar": "falling star", "broccolli": "broccoli", "sphynx": "sphinx"}
if os.path.exists(theme):
    for name, f in re.findall(r'<sound name="([^"]+)" file="([^"]+)"', open(theme).read()):
        word = re.sub(r"^(egypt|moon|pizzeria|tv)_", "", name)
        if word == "ufo":
            continue
        add("ktuberling", name, f"{root}/ktuberling/sounds/{f}", spoken.get(word, word))

# klettres: the syllables of en and en_GB that are words (not "th", "ch", "aw").
for lang in ("en", "en_GB"):
    xml = f"{root}/klettres/{lang}/sounds.xml"
    if not os.path.exists(xml):
        continue
    for name, f in re.findall(r'<sound name="([^"]+)"\s+file="([^"]+/syllab/[^"]+)"', open(xml).read()):
        if name.lower() in ("th", "ch", "aw"):
            continue
        add("klettres", f"{lang}_{name.lower()}", f"{root}/klettres/{f}", name.lower())

# tuxpaint: stamp_desc.ogg is the English description, the first line of stamp.txt.
for audio in sorted(glob.glob(f"{root}/tuxpaint/stamps/**/*_desc.ogg", recursive=True)):
    txt = audio[: -len("_desc.ogg")] + ".txt"
    if os.path.exists(txt):
        text = open(txt, encoding="utf-8", errors="replace").readline().strip()
        if text:
            add("tuxpaint", os.path.basename(txt)[:-4], audio, text)

alsa = "/usr/share/sounds/alsa"
for f in sorted(glob.glob(f"{alsa}/*.wav")):
    name = os.path.basename(f)[:-4]
    if name != "Noise":
        add("alsa", name, f, name.replace("_", " "))

# pocketsphinx-testdata: "<s> words </s> (id)" transcriptions; .raw is 16 kHz 16-bit mono, given a
# wav header here. librivox/test-lm.match is what pocketsphinx decoded from those five sentences
# with a language model (the output its regression test expects), scored beside ours; its output
# for the cards came from a grammar of card names only, so it is no peer for an open vocabulary.
ps = f"{root}/pocketsphinx/test/data"
def sphinx_lines(path):
    out = {}
    if os.path.exists(path):
        for line in open(path):
            m = re.match(r"\s*(?:<s>)?(.*?)(?:</s>)?\s*\((\S+?)(?:\s+-?\d+)?\)\s*$", line)
            if m:
                out[m.group(2)] = m.group(1).strip()
    return out
def raw_to_wav(raw, name):
    import wave
    os.makedirs(f"{work}/conv", exist_ok=True)
    dst = f"{work}/conv/{name}.wav"
    with wave.open(dst, "wb") as w:
        w.setnchannels(1); w.setsampwidth(2); w.setframerate(16000)
        w.writeframes(open(raw, "rb").read())
    return dst
for key, text in sphinx_lines(f"{ps}/librivox/transcription").items():
    add("librivox", key, f"{ps}/librivox/{key}.wav", text)
peer = sphinx_lines(f"{ps}/librivox/test-lm.match")
for key, text in sphinx_lines(f"{ps}/cards/cards.transcription").items():
    add("commands", f"cards_{key}", f"{ps}/cards/{key}.wav", text)
if os.path.exists(f"{ps}/goforward.raw"):
    add("commands", "goforward", raw_to_wav(f"{ps}/goforward.raw", "goforward"), "go forward ten meters")
if os.path.exists(f"{ps}/tidigits/dhd.2934z.raw"):
    add("commands", "tidigits_dhd_2934z", raw_to_wav(f"{ps}/tidigits/dhd.2934z.raw", "dhd_2934z"),
        "two nine three four zero")
# asterisk: the half of the telephone prompts that scripts/telephone-prompts.sh keeps out of training.
if os.path.exists(f"{work}/prompts/valid.jsonl"):
    for line in open(f"{work}/prompts/valid.jsonl"):
        row = json.loads(line)
        add("asterisk", row["name"].replace("/", "_"), row["audio"], row["text"])

if peer and "librivox" in sets:
    os.makedirs(f"{work}/peer-librivox", exist_ok=True)
    for key, text in peer.items():
        open(f"{work}/peer-librivox/{key}.txt", "w").write(text + "\n")
    # Only the files the peer decoded are scored for it.
    json.dump({k: sets["librivox"][k] for k in peer if k in sets["librivox"]},
              open(f"{work}/peer-librivox.json", "w"), indent=1)

for s, refs in sets.items():
    json.dump(refs, open(f"{work}/sets/{s}.json", "w"), indent=1)
print("sets: " + ", ".join(f"{s} {len(r)} files" for s, r in sets.items()))
PY

score() {  # refs.json, transcripts dir, label
    PYTHONPATH=bench python3 - "$@" <<'PY'
import json, os, sys
from wer import edits, norm
refs, out, label = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
we = wn = ce = cn = right = empty = 0
for name, ref in refs.items():
    path = os.path.join(out, name + ".txt")
    hyp = norm(open(path).read()) if os.path.exists(path) else []
    r = norm(ref)
    we += edits(r, hyp); wn += len(r)
    ce += edits(" ".join(r), " ".join(hyp)); cn += len(" ".join(r))
    right += hyp == r; empty += not hyp
print(f"{label:<40} WER {we / wn:.4f}   CER {ce / cn:.4f}   exactly right {right} of {len(refs)}   "
      f"empty {empty}   ({wn} words)")
PY
}

source bench/fleet.sh
fleet_start "$work" "$model" "$threads"
for refs in "$work"/sets/*.json; do
    set="$(basename "$refs" .json)"
    rm -rf "$work/out-$set" "$work/out-$set-all"
    build/client/asr-submit --broker "$ep" transcribe "$work/sets/$set" --out "$work/out-$set" --format txt --wait \
        >>"$work/client.log" 2>&1
    score "$refs" "$work/out-$set" "$set: default"
    build/client/asr-submit --broker "$ep" transcribe "$work/sets/$set" --out "$work/out-$set-all" --format txt \
        --min-confidence 0 --wait >>"$work/client.log" 2>&1
    score "$refs" "$work/out-$set-all" "$set: every segment kept"
    if [[ -f "$work/peer-$set.json" ]]; then
        score "$work/peer-$set.json" "$work/peer-$set" "$set: pocketsphinx (peer, its own output)"
    fi
done
