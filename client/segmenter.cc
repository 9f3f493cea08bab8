#include "client/segmenter.h"

#include <algorithm>
#include <cmath>

namespace asrf {
namespace {

constexpr int kSmoothFrames = 10;  // 10 frames of 10 ms: the ~100 ms smoothing window

// Prefix sums of per-frame energy, frames of `frame` samples; a trailing partial frame is
// averaged over the samples it has. The energy is the frame's variance, its mean removed: a DC
// offset (a cheap recorder's) adds the same to every frame and made soft speech look as quiet
// as a pause.
std::vector<double> FrameEnergyPrefix(const int16_t* pcm, int64_t n, int64_t frame) {
  int64_t frames = (n + frame - 1) / frame;
  std::vector<double> prefix(static_cast<size_t>(frames) + 1, 0.0);
  for (int64_t f = 0; f < frames; ++f) {
    int64_t b = f * frame, e = std::min(n, b + frame);
    double sum = 0, sq = 0;
    for (int64_t i = b; i < e; ++i) {
      sum += pcm[i];
      sq += static_cast<double>(pcm[i]) * pcm[i];
    }
    const double k = static_cast<double>(e - b), mean = sum / k;
    prefix[f + 1] = prefix[f] + std::max(0.0, sq / k - mean * mean);
  }
  return prefix;
}

// Mean frame energy over the ~100 ms centred on frame f (clipped at the file's ends).
double Smoothed(const std::vector<double>& prefix, int64_t f) {
  int64_t frames = static_cast<int64_t>(prefix.size()) - 1;
  int64_t b = std::max<int64_t>(0, f - kSmoothFrames / 2);
  int64_t e = std::min<int64_t>(frames, f + kSmoothFrames - kSmoothFrames / 2);
  return (prefix[e] - prefix[b]) / static_cast<double>(e - b);
}

}  // namespace

std::vector<SegmentBounds> SplitAtQuietPoints(const int16_t* pcm, int64_t n, const SegmenterOptions& opt) {
  std::vector<SegmentBounds> out;
  if (n <= 0 || pcm == nullptr) return out;
  // Sanitised options: positive rate, max of at least one sample, 0 <= min <= max.
  const int rate = opt.sample_rate > 0 ? opt.sample_rate : 16000;
  const double max_s_raw = std::isfinite(opt.max_s) ? opt.max_s : 30.0;
  const int64_t max_len = std::max<int64_t>(1, static_cast<int64_t>(std::floor(max_s_raw * rate)));
  const double min_s_raw = std::isfinite(opt.min_s) ? opt.min_s : 0.0;
  const int64_t min_len = std::clamp<int64_t>(static_cast<int64_t>(std::ceil(min_s_raw * rate)), 0, max_len);
  if (n <= max_len) {
    out.push_back({0, n});
    return out;
  }

  const int64_t frame = std::max(1, rate / 100);
  const std::vector<double> prefix = FrameEnergyPrefix(pcm, n, frame);

  int64_t start = 0;
  while (n - start > max_len) {
    // The cut also leaves at least min_len after it: the last segment of a file just over a
    // multiple of max_s was otherwise a fragment (under one frame at worst, transcribed as
    // nothing), its words cut off from the rest.
    const int64_t lo = start + min_len, hi = std::min(start + max_len, std::max(lo, n - min_len));
    // Candidate frames lie wholly inside [lo, hi]; a cut goes at a frame's middle.
    const int64_t f_lo = (lo + frame - 1) / frame, f_hi = hi / frame - 1;
    int64_t cut = hi;
    if (f_lo <= f_hi) {
      int64_t best = f_lo;
      double best_e = Smoothed(prefix, f_lo);
      for (int64_t f = f_lo + 1; f <= f_hi; ++f) {
        double e = Smoothed(prefix, f);
        if (e < best_e) best_e = e, best = f;
      }
      // In a pause longer than the smoothing window many frames are about as quiet as the
      // quietest: cut in the middle of that quiet run rather than at its first frame.
      const double tol = best_e * 1.1 + 1.0;
      int64_t run_b = best, run_e = best;
      while (run_b > f_lo && Smoothed(prefix, run_b - 1) <= tol) --run_b;
      while (run_e < f_hi && Smoothed(prefix, run_e + 1) <= tol) ++run_e;
      const int64_t mid = (run_b + run_e) / 2;
      cut = std::clamp(mid * frame + frame / 2, std::max<int64_t>(lo, start + 1), hi);
    }
    out.push_back({start, cut});
    start = cut;
  }
  out.push_back({start, n});
  return out;
}

std::vector<SegmentBounds> SplitAtPauses(const int16_t* pcm, int64_t n, const SegmenterOptions& opt) {
  if (n <= 0 || pcm == nullptr) return {};
  const int rate = opt.sample_rate > 0 ? opt.sample_rate : 16000;
  const int64_t frame = std::max(1, rate / 100);
  const int64_t frames = (n + frame - 1) / frame;
  const double pause_s = std::isfinite(opt.pause_s) ? opt.pause_s : 0.0;
  const int64_t pause_frames = static_cast<int64_t>(std::ceil(pause_s * 100));
  const double min_seg_s = std::isfinite(opt.min_pause_segment_s) ? std::max(0.0, opt.min_pause_segment_s) : 1.0;
  const int64_t min_seg = static_cast<int64_t>(std::ceil(min_seg_s * rate));

  // Frames of a long pause kept on each side of the speech; -1: long pauses are cut at the middle.
  const int64_t keep = std::isfinite(opt.pause_keep_s) && opt.pause_keep_s >= 0
                           ? static_cast<int64_t>(std::round(opt.pause_keep_s * 100))
                           : -1;
  std::vector<int64_t> cuts;      // pause cuts, increasing
  std::vector<int64_t> left_out;  // cuts that begin a left-out pause middle (it ends at the next cut)
  if (pause_frames > 0 && frames >= 2 * pause_frames) {
    const std::vector<double> prefix = FrameEnergyPrefix(pcm, n, frame);
    // Energy in dB over 30 ms (one frame each side); 1 LSB^2 is the floor of digital silence.
    std::vector<double> db(static_cast<size_t>(frames));
    for (int64_t f = 0; f < frames; ++f) {
      const int64_t b = std::max<int64_t>(0, f - 1), e = std::min(frames, f + 2);
      db[f] = 10 * std::log10(std::max(1.0, (prefix[e] - prefix[b]) / static_cast<double>(e - b)));
    }
    std::vector<double> sorted = db;
    auto pct = [&](double q) {
      auto it = sorted.begin() + static_cast<int64_t>(q * static_cast<double>(frames - 1));
      std::nth_element(sorted.begin(), it, sorted.end());
      return *it;
    };
    const double floor_db = pct(0.10), speech_db = pct(0.95);
    if (speech_db - floor_db >= 10) {
      const double thr = floor_db + std::max(6.0, 0.3 * (speech_db - floor_db));
      int64_t last = 0;  // the previous cut
      for (int64_t f = 0; f < frames;) {
        if (db[f] >= thr) {
          ++f;
          continue;
        }
        int64_t e = f;
        while (e < frames && db[e] < thr) ++e;
        // The smoothing spreads each loud stretch one frame into the quiet on both sides: a run
        // of e - f quiet frames is a pause of about e - f + 2. A pause touching either end of
        // the file is lead-in or tail, not a boundary: only what lies beyond `keep` of the
        // speech is left out. (Some frame is loud, so no pause touches both ends.)
        if (keep >= 0 && f == 0 && e < frames && e > keep + pause_frames) {
          left_out.push_back(0);
          cuts.push_back((e - keep) * frame);
          last = cuts.back();
        } else if (keep >= 0 && e == frames && f > 0 && e - f > keep + pause_frames) {
          cuts.push_back((f + keep) * frame);
          left_out.push_back(cuts.back());
        } else if (e - f + 2 >= pause_frames && f > 0 && e < frames) {
          if (keep >= 0 && e - f > 2 * keep + pause_frames) {
            // A long pause: `keep` of it stays on each side of the speech, the middle is left out
            // (the piece before it may be under min_seg: a short word alone).
            const int64_t c1 = (f + keep) * frame, c2 = (e - keep) * frame;
            cuts.push_back(c1);
            left_out.push_back(c1);
            cuts.push_back(c2);
            last = c2;
          } else {
            const int64_t cut = ((f + e) / 2) * frame;
            if (cut - last >= min_seg && n - cut >= min_seg) {
              cuts.push_back(cut);
              last = cut;
            }
          }
        }
        f = e;
      }
    }
  }
  cuts.push_back(n);

  std::vector<SegmentBounds> out;
  int64_t begin = 0;
  for (int64_t end : cuts) {
    if (!std::binary_search(left_out.begin(), left_out.end(), begin)) {
      for (const SegmentBounds& piece : SplitAtQuietPoints(pcm + begin, end - begin, opt)) {
        out.push_back({begin + piece.begin, begin + piece.end});
      }
    }
    begin = end;
  }
  return out;
}

}  // namespace asrf
