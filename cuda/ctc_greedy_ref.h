// CTC greedy decoding with token timestamps on the host, in plain C++: the reference that
// cuda/ctc_greedy.cuh is tested against, with the same arguments and outputs. It follows the
// decoding rules of worker/acoustic_model.cc (DecodeOne) and worker/ctc_model.cc (GreedyDecode):
//  - frame t's best id is the argmax of log_probs[b, t, :], ties to the lowest id (as torch's
//    argmax); a NaN counts as larger than any number (as torch's argmax);
//  - its probability is exp(lp[best] - logsumexp(lp[frame])) (normalised, in case the model returns
//    logits), computed here as 1 / sum_v exp(lp[v] - lp[best]) in double; 0 when every value of
//    the frame is -inf;
//  - only frames t < n with n = clamp(out_lengths[b], 0, frames) count;
//  - repeats are collapsed and blanks (id 0) dropped: a frame whose best id is not 0 and differs
//    from the previous frame's (the frame before t = 0 counts as -1) starts a token; a frame with
//    the same non-blank id extends it.
// Ids are not checked against a vocabulary: every non-blank id in [1, vocab) is emitted.
#pragma once

#include <cstdint>

#include "common/status.h"

namespace asrf {

// log_probs: [batch, frames, vocab] row-major; out_lengths: [batch] valid frames per utterance.
// Outputs, [batch, frames] row-major (row b holds utterance b's tokens in order), and counts [batch]:
//   tokens[b, i]  id of the i-th emitted token
//   starts[b, i]  the first frame of its run, ends[b, i] the last (inclusive)
//   probs[b, i]   the highest frame probability over its run (fmax: a NaN frame never wins
//                 against a number; DecodeOne's std::max keeps a NaN only when it comes first)
//   counts[b]     tokens emitted; entries i >= counts[b] are -1 (tokens, starts, ends) and 0 (probs).
// Errors: Invalid for a negative size, vocab < 1, frames or vocab of 2^31 - 1 or more, or a null
// pointer that a non-empty shape needs.
Status CtcGreedyReference(const float* log_probs, const int64_t* out_lengths, int batch, int64_t frames, int64_t vocab,
                          int32_t* tokens, int32_t* starts, int32_t* ends, float* probs, int32_t* counts);

}  // namespace asrf
