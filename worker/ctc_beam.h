// CTC prefix beam search with a character language model, and the CTC alignment of a chosen
// token sequence (for timestamps). Plain arrays in, no libtorch: the caller hands one utterance's
// log-probabilities [frames, classes] (class 0 the blank).
#pragma once

#include <cstdint>
#include <vector>

#include "worker/char_lm.h"

namespace asrf {

struct BeamOptions {
  int beam = 16;              // prefixes kept per frame
  double lm_weight = 0.5;     // weight of the language model's log-probability
  double char_bonus = 1.0;    // added per emitted character (balances the LM's cost per character)
  double prune_log_prob = -8; // classes below this log-probability at a frame are not tried
  double oov_penalty = -2.0;  // added when a word ends that the LM's lexicon does not have (0 = off)
};

// `class_symbol[k]` is the LM symbol of class k (0: the blank, or a class the LM does not know,
// which is then scored as unknown). Returns the best class sequence (blanks and repeats removed).
// Without an LM (lm == nullptr) the search is a plain CTC prefix beam search.
std::vector<int64_t> CtcBeamSearch(const float* log_probs, int64_t frames, int64_t classes,
                                   const std::vector<int>& class_symbol, const CharLm* lm, const BeamOptions& options);

// One emitted class of an alignment: its id, its frames (first..last) and its best probability
// over them.
struct AlignedToken {
  int64_t id;
  int64_t first, last;
  float prob;
};

// The most likely CTC alignment (Viterbi) of `ids` over the frames; empty when the frames cannot
// hold the sequence.
std::vector<AlignedToken> CtcAlign(const float* log_probs, int64_t frames, int64_t classes,
                                   const std::vector<int64_t>& ids);

}  // namespace asrf
