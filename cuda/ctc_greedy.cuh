// Batched CTC greedy decoding with token timestamps on the device. Only the small per-token arrays
// (and the counts) need to cross to the host; the [B, T, V] log-probabilities stay on the device.
// Same rules and outputs as the host reference in cuda/ctc_greedy_ref.h (read it for the exact
// definition: argmax ties to the lowest id, normalised frame probabilities, repeats collapsed,
// blank 0 dropped, frames past clamp(out_lengths[b], 0, frames) ignored).
// No torch here: raw device pointers, sizes and a stream.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/status.h"

namespace asrf {

// Enqueues the decoding of a batch on `stream` and returns without waiting for it.
//   log_probs   [batch, frames, vocab] float, device, row-major (contiguous)
//   out_lengths [batch] int64, device: valid frames per utterance
// Outputs, all device memory, [batch, frames] row-major, and counts [batch]:
//   tokens (int32), starts and ends (int32, first and last frame of the token's run, inclusive),
//   probs (float, the highest frame probability over the run), counts (int32, tokens emitted);
//   entries i >= counts[b] are -1 (tokens, starts, ends) and 0 (probs).
// It allocates batch * frames * 8 bytes of stream-ordered scratch (cudaMallocAsync) and frees it on
// the stream. The inputs must stay valid, and the outputs unread, until the stream gets there.
// REQUIRES: the pointers belong to the current device; stream is a stream of that device (or 0).
// Errors: Invalid for a bad shape (negative size, vocab < 1, frames or vocab of 2^31 - 1 or more)
// or a null pointer that a non-empty shape needs; Unavailable without device memory or device;
// IOError for other CUDA errors (each with the call, file and line).
Status LaunchCtcGreedy(const float* log_probs, const int64_t* out_lengths, int batch, int64_t frames, int64_t vocab,
                       int32_t* tokens, int32_t* starts, int32_t* ends, float* probs, int32_t* counts,
                       cudaStream_t stream);

}  // namespace asrf
