// The constants of the logmel80-v1 front end (schema/features.md) restated without torch, for the
// CUDA front end (cuda/logmel.cuh), which builds them here on the host once per workspace. They are
// the same definition as worker/features.cc (tests/cuda_kernels_test.cc checks the filterbank
// against MelFilterbank() bit for bit and the window against torch::hann_window).
#pragma once

#include <cstdint>
#include <vector>

namespace asrf::logmel80 {

inline constexpr int kSampleRate = 16000;
inline constexpr int kFrameLength = 400;  // samples per frame (25 ms)
inline constexpr int kHop = 160;          // samples between frame starts (10 ms)
inline constexpr int kFft = 512;          // FFT length; frames are zero-padded from 400
inline constexpr int kBins = kFft / 2 + 1;  // 257 power-spectrum bins
inline constexpr int kMels = 80;

// Frames of an utterance of n samples: 0 below one frame, no padding, no centring.
inline int64_t NumFrames(int64_t n) { return n < kFrameLength ? 0 : 1 + (n - kFrameLength) / kHop; }

// The periodic Hann window of length 400, w[n] = 0.5 - 0.5 cos(2 pi n / 400), computed in double
// and rounded to float. [kFrameLength].
std::vector<float> Window();

// The HTK mel filterbank exactly as MelFilterbank() in worker/features.cc builds it (same double
// arithmetic, same comparisons), row-major [kBins][kMels]: element k * kMels + m is filter m's
// weight at bin k. No area normalisation.
std::vector<float> Filterbank();

}  // namespace asrf::logmel80
