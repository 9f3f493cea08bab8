#include "cuda/ctc_greedy_ref.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

namespace asrf {
namespace {

// (a, ia) is preferred over (b, ib): NaN first, then the larger value, then the lower id.
bool Better(float a, int64_t ia, float b, int64_t ib) {
  const bool na = std::isnan(a), nb = std::isnan(b);
  if (na != nb) return na;
  if (!na && a != b) return a > b;
  return ia < ib;
}

}  // namespace

Status CtcGreedyReference(const float* log_probs, const int64_t* out_lengths, int batch, int64_t frames, int64_t vocab,
                          int32_t* tokens, int32_t* starts, int32_t* ends, float* probs, int32_t* counts) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  if (batch < 0 || frames < 0 || vocab < 1 || frames >= kMax || vocab >= kMax) {
    return Status::Invalid("CTC greedy: bad shape batch " + std::to_string(batch) + ", frames " +
                           std::to_string(frames) + ", vocab " + std::to_string(vocab));
  }
  if (batch == 0) return Status::Ok();
  if (!out_lengths || !counts || (frames > 0 && (!log_probs || !tokens || !starts || !ends || !probs))) {
    return Status::Invalid("CTC greedy: a null pointer for a non-empty shape");
  }
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = std::min(std::max<int64_t>(out_lengths[b], 0), frames);
    int32_t* tok = tokens + b * frames;
    int32_t* st = starts + b * frames;
    int32_t* en = ends + b * frames;
    float* pr = probs + b * frames;
    int32_t count = 0;
    int64_t prev = -1;
    for (int64_t t = 0; t < n; ++t) {
      const float* row = log_probs + (b * frames + t) * vocab;
      int64_t best = 0;
      for (int64_t v = 1; v < vocab; ++v)
        if (Better(row[v], v, row[best], best)) best = v;
      if (best != 0) {
        const double m = row[best];
        float p = 0.0f;
        if (m != -std::numeric_limits<double>::infinity()) {
          double sum = 0;
          for (int64_t v = 0; v < vocab; ++v) sum += std::exp(static_cast<double>(row[v]) - m);
          p = static_cast<float>(1.0 / sum);
        }
        if (best != prev) {
          tok[count] = static_cast<int32_t>(best);
          st[count] = static_cast<int32_t>(t);
          en[count] = static_cast<int32_t>(t);
          pr[count] = p;
          ++count;
        } else {
          en[count - 1] = static_cast<int32_t>(t);
          pr[count - 1] = std::fmax(pr[count - 1], p);
        }
      }
      prev = best;
    }
    counts[b] = count;
    for (int64_t i = count; i < frames; ++i) {
      tok[i] = -1;
      st[i] = -1;
      en[i] = -1;
      pr[i] = 0.0f;
    }
  }
  return Status::Ok();
}

}  // namespace asrf
