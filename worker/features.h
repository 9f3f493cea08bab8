// The CPU front end defined in schema/features.md (logmel80-v1), on batches.
#pragma once

#include <torch/types.h>

namespace asrf {

inline constexpr int kSampleRate = 16000;
inline constexpr int kFrameLength = 400;
inline constexpr int kHop = 160;
inline constexpr int kFft = 512;
inline constexpr int kMels = 80;
inline constexpr const char* kFeatureName = "logmel80-v1";

// Frames in an utterance of n samples.
inline int64_t NumFrames(int64_t n) { return n < kFrameLength ? 0 : 1 + (n - kFrameLength) / kHop; }

// pcm: [B, N] float32 (padded), lengths: [B] int64 samples. Returns features [B, T_max, 80] with
// zeros past each utterance's frames, and sets *frames to [B] int64 frame counts.
torch::Tensor LogMel(const torch::Tensor& pcm, const torch::Tensor& lengths, torch::Tensor* frames);

// The [257, 80] HTK mel filterbank of step 5.
torch::Tensor MelFilterbank();

}  // namespace asrf
