// Transcripts of whole files, reassembled from segment results, and the output formats
// (txt, json, srt, vtt, tsv). Pure functions; no I/O except WriteOutputs.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "common/status.h"

namespace asrf {

struct WordOut {
  std::string text;
  double start = 0, end = 0;  // seconds on the file's timeline
  double confidence = 0;      // 0..1
};

struct SegmentOut {
  double start = 0, end = 0;  // seconds on the file's timeline
  std::string text;
  std::vector<WordOut> words;
  std::string model, model_sha256;  // what transcribed it (the sha256 of the worker's model file)
};

struct Transcript {
  std::string source;         // input path as the user gave it
  uint64_t source_size = 0;   // the input's size and modification time when it was picked (0: unknown)
  int64_t source_mtime_ns = 0;
  std::string model;
  double duration_s = 0;
  double wall_s = 0;          // submit to last result
  double compute_s = 0;       // sum of worker run times
  std::vector<SegmentOut> segments;
};

// A segment result as the worker returns it (JSON, schema/protocol.md "transcribe"):
//   {"file": str, "index": int, "count": int, "offset_s": num, "duration_s": num, "model": str,
//    "model_sha256": str, "text": str, "words": [{"w": str, "s": num, "e": num, "c": num}],
//    "infer_ms": int}
// Word times are relative to the segment. On success *out spans [offset_s, offset_s + duration_s]
// on the file's timeline, its words shifted by offset_s and clamped into that span (confidence
// into [0, 1]). "words", "model_sha256" and "infer_ms" may be absent (none; ""; 0). Returns Invalid for JSON that does
// not follow the schema (missing or mistyped field, index outside [0, count), negative times),
// leaving the outputs untouched. Any of the pointers after `out` may be null.
Status ParseSegmentResult(const std::string& json, SegmentOut* out, std::string* file, int* index, int* count,
                          double* offset_s, std::string* model, int64_t* infer_ms = nullptr);

// Empties a segment (its text and words) when the mean confidence of its words is below
// `min_confidence`: what the model writes for background it took for speech (noise alone came
// back at a mean of 0.07-0.36, speech at 0.52 and above; bench/RESULTS.md). Returns true when it
// did; a segment without words is left as it is.
bool DropUnsure(SegmentOut* seg, double min_confidence);

// The distinct models (name, sha256) that transcribed a transcript's segments, in order of first
// use. More than one means workers with different model files served one file (e.g. during a
// rolling upgrade after `asr-submit models import`).
std::vector<std::pair<std::string, std::string>> ModelsUsed(const Transcript& t);

// Segments whose text is empty (after trimming whitespace) are left out of txt, srt, vtt and tsv;
// json keeps every segment. Times in json are rounded to milliseconds.
std::string FormatTxt(const Transcript& t);   // one line per segment, text only
std::string FormatJson(const Transcript& t);  // segments, words (start/end/confidence), model, timings
std::string FormatSrt(const Transcript& t);   // one numbered cue per segment, HH:MM:SS,mmm
std::string FormatVtt(const Transcript& t);   // WEBVTT, HH:MM:SS.mmm
std::string FormatTsv(const Transcript& t);   // start_ms<TAB>end_ms<TAB>text, with a header line

// Formats by name: txt, json, srt, vtt, tsv. Invalid for an unknown name.
Status FormatByName(const std::string& format, const Transcript& t, std::string* out);

// A file name as text that survives a JSON round trip: '%' and every byte that is not part of a
// valid UTF-8 sequence become %XX; UnescapeName gives the bytes back (a name from a Latin-1 file
// system stays itself through a worker's JSON result).
std::string EscapeName(const std::string& name);
std::string UnescapeName(const std::string& text);

// The output path (without extension) for `input` found under `root`: OUT/<relative dir>/<stem>;
// with keep_ext the source extension stays in the name (a.wav -> a.wav.txt) for inputs that
// share a stem with another input. A file given directly (root empty or equal to input), or one
// not under root, has no relative dir. Pure path arithmetic: nothing on disk is read.
std::string OutputBase(const std::string& input, const std::string& root, const std::string& out_dir, bool keep_ext);

// Writes base + "." + format for each format, creating directories, through a temporary file and
// rename (a crash never leaves a half-written output).
Status WriteOutputs(const Transcript& t, const std::string& base, const std::vector<std::string>& formats);

}  // namespace asrf
