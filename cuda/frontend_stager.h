// Staging transcription batches onto a GPU: 16-bit PCM -> pinned host float buffer -> device copy
// -> the fused front end (cuda/logmel.cuh), all on a non-blocking stream of the stager's own, in
// two slots, so that one batch's copy and front end run while the model works on the other.
// Plain host C++ over the CUDA runtime (no torch, no CUDA headers here): built only with CUDA.
//
// Hand-over to the model: Release(slot) makes the default stream (stream 0, where the model's
// library enqueues its work) wait for the slot's front end on the device, without blocking the host.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "common/status.h"

namespace asrf {

class FrontEndStager {
 public:
  static constexpr int kSlots = 2;

  // A stager on device `device` (made current for the calling thread). Errors: Unavailable
  // without a device or device memory, IOError for other CUDA failures.
  static Status Create(int device, std::unique_ptr<FrontEndStager>* out);
  ~FrontEndStager();
  FrontEndStager(const FrontEndStager&) = delete;
  FrontEndStager& operator=(const FrontEndStager&) = delete;

  // Stages a batch in `slot`: writes the utterances as floats in [-1, 1) into the slot's pinned
  // buffer ([batch, max_samples], zero padded), then enqueues the copy to the device and the front
  // end into the slot's features [batch, t_max, 80] (rows past an utterance's frames are 0) and
  // returns. t_max must be at least the frames of the longest utterance. It first waits (host side)
  // for the slot's previous copy.
  // REQUIRES: no device work still reads the slot's previous features (the caller has fetched the
  // results of the batch that used them); every utterance has at most max_samples samples.
  // Errors: Invalid for a bad slot or shape, Unavailable without memory, IOError for CUDA errors.
  Status Stage(int slot, const std::vector<std::span<const int16_t>>& pcm, int64_t max_samples, int64_t t_max);

  // Makes stream 0 wait for the slot's front end and returns the features' device pointer
  // ([batch, t_max, 80] float, valid until the slot is staged again or the stager destroyed).
  Status Release(int slot, float** features);

  int device() const { return device_; }

 private:
  struct Slot;
  struct State;
  explicit FrontEndStager(int device);
  Status Init();

  const int device_;
  std::unique_ptr<State> state_;
};

}  // namespace asrf
