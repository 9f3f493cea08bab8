#!/usr/bin/env bash
# Recorded speech of a person with its text: the telephone prompts of Debian's
# asterisk-core-sounds-en (one woman, Allison Smith; 8 kHz WAV, CC-BY-SA-3.0), fetched with
# `apt-get download` (no install, no root) and unpacked into OUT/root. Writes manifests in the
# trainer's format ({"audio","text","duration","voice","engine"} per line):
#   OUT/train.jsonl   prompts whose text hashes below --train-share (0.5): for `asr-submit train`
#   OUT/valid.jsonl   the others: people's sentences no model trained on (bench/real_speech.sh)
# The split depends on the normalised text only (SHA-1 of it), so a text is never in both halves.
# Texts are the package's own list (core-sounds-en.txt), lower-cased to a-z, apostrophe and
# spaces; a lone digit becomes its word. Left out: tones ("[beep]"), letters, silence, and
# prompts holding a number of more than one digit (one could say "1234" several ways), and from
# train.jsonl prompts longer than --max-seconds (20, the trainer's default limit).
#
#   scripts/telephone-prompts.sh OUT [--train-share F] [--max-seconds S]
set -euo pipefail
out="" share=0.5 max_seconds=20
while (($#)); do
    case "$1" in
        --train-share) share="$2"; shift 2 ;;
        --max-seconds) max_seconds="$2"; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "unknown option $1" >&2; exit 2 ;;
        *) [[ -z "$out" ]] || { echo "one OUT folder only" >&2; exit 2; }; out="$1"; shift ;;
    esac
done
[[ -n "$out" ]] || { echo "usage: scripts/telephone-prompts.sh OUT [--train-share F] [--max-seconds S]" >&2; exit 2; }
mkdir -p "$out/debs" "$out/root"
out="$(realpath "$out")"
for p in asterisk-core-sounds-en asterisk-core-sounds-en-wav; do
    if ! ls "$out/debs/${p}_"*.deb >/dev/null 2>&1; then
        (cd "$out/debs" && apt-get download "$p" >/dev/null 2>"$out/apt-$p.log") ||
            { echo "apt-get download $p failed (see $out/apt-$p.log)" >&2; exit 1; }
    fi
    dpkg -x "$out/debs/${p}_"*.deb "$out/root"
done
python3 - "$out" "$share" "$max_seconds" <<'PY'
import gzip, hashlib, json, os, re, sys, wave
out, share, max_seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
root = f"{out}/root/usr/share"
audio_dir = f"{root}/asterisk/sounds/en_US_f_Allison"
texts = f"{root}/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz"
digit = "zero one two three four five six seven eight nine".split()
rows = {"train": [], "valid": []}
left_out = 0
for line in gzip.open(texts, "rt", encoding="utf-8", errors="replace"):
    m = re.match(r"([A-Za-z0-9_/.-]+):\s*(.+)$", line.strip())
    if not m or line.startswith(";"):
        continue
    name, text = m.groups()
    audio = f"{audio_dir}/{name}.wav"
    if (name.split("/")[0] in ("letters", "silence") or "[" in text
            or re.search(r"\d\d|\d[.,]\d|\d[a-z]", text, re.I) or not os.path.exists(audio)):
        left_out += 1
        continue
    text = re.sub(r"\d", lambda d: f" {digit[int(d.group())]} ", text.lower())
    text = " ".join(re.sub(r"[^a-z' ]", " ", text).split()).strip("'")
    if not text:
        left_out += 1
        continue
    with wave.open(audio) as w:
        duration = w.getnframes() / w.getframerate()
    h = int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big") / 2**64
    if h < share and duration > max_seconds:
        left_out += 1
        continue
    rows["train" if h < share else "valid"].append(
        {"audio": audio, "text": text, "duration": round(duration, 3), "voice": "asterisk-allison",
         "engine": "person", "name": name})
for split, r in rows.items():
    with open(f"{out}/{split}.jsonl", "w") as f:
        for row in r:
            f.write(json.dumps(row) + "\n")
    print(f"{split}: {len(r)} prompts, {sum(x['duration'] for x in r) / 60:.1f} min -> {out}/{split}.jsonl")
print(f"left out: {left_out} (tones, letters, silence, numbers of several digits, too long to train on)")
PY
