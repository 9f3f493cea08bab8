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
};

// Covers [0, n) with consecutive segments (no gaps, no overlap), each at most max_s long. A file
// no longer than max_s is one segment (an empty file gives none). Each cut is placed at the
// quietest point (lowest short-time energy, DC removed, smoothed over ~100 ms) inside the search
// window, and leaves at least min_s after it (when max_s >= 2 min_s), so no segment but a whole
// short file is shorter than min_s.
std::vector<SegmentBounds> SplitAtQuietPoints(const int16_t* pcm, int64_t n, const SegmenterOptions& opt);

}  // namespace asrf
