// The fused logmel80-v1 front end (schema/features.md) on the device: framing and Hann window,
// 512-point real FFT (cuFFT), power, 80 HTK mel filters, log(x + 1e-6), and per-utterance per-bin
// normalisation over each utterance's own frames. The same definition as worker/features.cc's
// LogMel, which is its reference (tests/cuda_kernels_test.cc compares the two).
// No torch here: raw device pointers, sizes and a stream.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/status.h"

namespace asrf {

// What LaunchLogMel needs between calls: the cuFFT plan, the window and filterbank (built on the
// host once, kept in device memory) and scratch buffers that grow to the largest batch seen.
// Bound to the device that was current when it was created. One call at a time (not thread-safe);
// calls may use different streams: each call's work waits for the previous call's.
struct LogMelWorkspace;

// Creates a workspace on the current device with scratch for `frames_hint` frames (0: allocate on
// first use; a batch of utterances with T_b frames each needs sum_b T_b). *out is owned by the
// caller: DestroyLogMelWorkspace. Errors: Unavailable without a device or device memory, IOError
// for other CUDA or cuFFT failures; *out is untouched on error.
Status CreateLogMelWorkspace(int64_t frames_hint, LogMelWorkspace** out);

// Waits for the work of the workspace's last call, then frees it. nullptr is fine. Returns the
// first error met; the workspace is freed whatever it returns.
Status DestroyLogMelWorkspace(LogMelWorkspace* ws);

// Enqueues the front end for a batch on `stream` and returns without waiting for it.
//   pcm         [batch, max_samples] float, device, row-major: utterance b is pcm[b, 0:lengths[b]]
//               (16 kHz mono, in [-1, 1)); samples past lengths[b] are never read
//   lengths     [batch] int64, HOST memory: samples per utterance, clamped to max_samples (as
//               LogMel clamps to pcm.size(1)); utterance b has T_b = NumFrames(min(lengths[b],
//               max_samples)) frames (0 below 400 samples)
//   out         [batch, t_max, 80] float, device, row-major: out[b, t, :] the normalised log-mel of
//               frame t for t < T_b, and exactly 0 for T_b <= t < t_max
//   t_max       rows per utterance in out; at least max_b T_b (larger is fine: more zero rows)
// When the scratch buffers must grow, it first waits (host side) for the previous call's work.
// REQUIRES: ws was created on the current device; stream belongs to it (or is 0); pcm and out stay
// valid until the stream gets there.
// Errors: Invalid for a negative size or length, batch > 65535, t_max < max_b T_b, a null pointer
// a non-empty shape needs, or ws used on another device; Unavailable without device memory;
// IOError for other CUDA or cuFFT errors (each with the call, file and line).
Status LaunchLogMel(const float* pcm, const int64_t* lengths, int batch, int64_t max_samples, float* out, int64_t t_max,
                    LogMelWorkspace* ws, cudaStream_t stream);

}  // namespace asrf
