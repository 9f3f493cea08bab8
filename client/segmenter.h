// Splitting long audio at quiet points into segments of at most `max_s` seconds. Pure functions.
#pragma once

#include <cstdint>
#include <vector>

namespace asrf {

struct SegmentBounds {
  int64_t begin = 0;  // first sample
  int64_t end = 0;    // one past the last sample
};

struct SegmenterOptions {
  double max_s = 30.0;   // no segment is longer
  double min_s = 5.0;    // a cut is searched in [min_s, max_s] from the segment start
  int sample_rate = 16000;
  // SplitAtPauses: a quiet stretch at least this long ends a segment (0: split only by length).
  double pause_s = 0.3;
  // SplitAtPauses: no pause cut leaves a segment shorter than this.
  double min_pause_segment_s = 1.0;
  // SplitAtPauses: of a pause longer than 2 pause_keep_s + pause_s, this much stays on each side
  // of the speech and the rest is left out; negative: every pause is cut at its middle instead.
  double pause_keep_s = 0.5;
};

// Covers [0, n) with consecutive segments (no gaps, no overlap), each at most max_s long. A file
// no longer than max_s is one segment (an empty file gives none). Each cut is placed at the
// quietest point (lowest short-time energy, DC removed, smoothed over ~100 ms) inside the search
// window, and leaves at least min_s after it (when max_s >= 2 min_s), so no segment but a whole
// short file is shorter than min_s.
std::vector<SegmentBounds> SplitAtQuietPoints(const int16_t* pcm, int64_t n, const SegmenterOptions& opt);

// Cuts at pauses first, then by length: every stretch of at least pause_s that is quiet relative
// to the file's own levels ends a segment, cut at its middle (never leaving a segment shorter
// than min_pause_segment_s); a longer pause keeps pause_keep_s on each side and its middle is
// left out, being no speech and, alone or beside speech, where the model writes words that were
// never said. Any piece still longer than max_s is split by SplitAtQuietPoints. Quiet is judged
// against the file: with its 10th and 95th percentiles of 10 ms frame energy (DC removed,
// smoothed over 30 ms) as floor and speech level, a frame is quiet below floor + max(6 dB, 30% of
// the range); a file whose range is under 10 dB (steady noise, or speech without a pause) has no
// pauses, and of a lead-in or tail only what lies beyond pause_keep_s of the speech is left out
// (negative pause_keep_s: never cut). The segments are in order,
// at most max_s long, without overlap; with the left-out middles they cover [0, n) exactly, and a
// non-empty input gives at least one.
std::vector<SegmentBounds> SplitAtPauses(const int16_t* pcm, int64_t n, const SegmenterOptions& opt);

}  // namespace asrf
