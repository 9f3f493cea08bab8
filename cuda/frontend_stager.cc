// FrontEndStager (cuda/frontend_stager.h): per slot a pinned host buffer, a device PCM buffer, a
// device features buffer and an event recorded after the slot's front end; one non-blocking stream
// and one front-end workspace for all slots (the workspace orders its calls itself).
#include "cuda/frontend_stager.h"

#include <algorithm>
#include <cstddef>
#include <string>

#include "cuda/cuda_check.cuh"
#include "cuda/logmel.cuh"
#include "cuda/logmel_tables.h"

namespace asrf {

struct FrontEndStager::Slot {
  float* host = nullptr;   // pinned [capacity] samples
  float* pcm = nullptr;    // device [capacity] samples
  size_t samples = 0;      // capacity of host and pcm
  float* features = nullptr;  // device [feature_floats]
  size_t feature_floats = 0;
  cudaEvent_t done = nullptr;  // after the slot's copy and front end
  bool used = false;
  std::vector<int64_t> lengths;
};

struct FrontEndStager::State {
  cudaStream_t stream = nullptr;
  LogMelWorkspace* ws = nullptr;
  Slot slots[kSlots];
};

namespace {

// Grows a buffer to at least `want` elements (never shrinks); the old contents are dropped.
template <typename T>
Status GrowDevice(T** p, size_t* have, size_t want) {
  if (*have >= want) return Status::Ok();
  want = std::max(want, *have * 2);  // geometric growth: few reallocations over a run
  if (*p) ASRF_CUDA_CHECK(cudaFree(*p));
  *p = nullptr;
  *have = 0;
  ASRF_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(p), want * sizeof(T)));
  *have = want;
  return Status::Ok();
}

}  // namespace

FrontEndStager::FrontEndStager(int device) : device_(device), state_(std::make_unique<State>()) {}

Status FrontEndStager::Create(int device, std::unique_ptr<FrontEndStager>* out) {
  std::unique_ptr<FrontEndStager> s(new FrontEndStager(device));
  ASRF_RETURN_IF_ERROR(s->Init());
  *out = std::move(s);
  return Status::Ok();
}

Status FrontEndStager::Init() {
  ASRF_CUDA_CHECK(cudaSetDevice(device_));
  ASRF_CUDA_CHECK(cudaStreamCreateWithFlags(&state_->stream, cudaStreamNonBlocking));
  for (Slot& s : state_->slots) ASRF_CUDA_CHECK(cudaEventCreateWithFlags(&s.done, cudaEventDisableTiming));
  return CreateLogMelWorkspace(0, &state_->ws);
}

FrontEndStager::~FrontEndStager() {
  if (!state_) return;
  cudaSetDevice(device_);
  if (state_->stream) cudaStreamSynchronize(state_->stream);
  (void)DestroyLogMelWorkspace(state_->ws);
  for (Slot& s : state_->slots) {
    if (s.host) cudaFreeHost(s.host);
    if (s.pcm) cudaFree(s.pcm);
    if (s.features) cudaFree(s.features);
    if (s.done) cudaEventDestroy(s.done);
  }
  if (state_->stream) cudaStreamDestroy(state_->stream);
}

Status FrontEndStager::Stage(int slot, const std::vector<std::span<const int16_t>>& pcm, int64_t max_samples,
                             int64_t t_max) {
  if (slot < 0 || slot >= kSlots) return Status::Invalid("FrontEndStager: slot " + std::to_string(slot));
  if (max_samples < 0 || t_max < 0) return Status::Invalid("FrontEndStager: negative size");
  const size_t batch = pcm.size();
  for (const auto& u : pcm) {
    if (static_cast<int64_t>(u.size()) > max_samples) {
      return Status::Invalid("FrontEndStager: an utterance of " + std::to_string(u.size()) + " samples exceeds " +
                             std::to_string(max_samples));
    }
  }
  Slot& s = state_->slots[slot];
  ASRF_CUDA_CHECK(cudaSetDevice(device_));
  if (s.used) ASRF_CUDA_CHECK(cudaEventSynchronize(s.done));  // the pinned buffer's last copy is over

  const size_t samples = batch * static_cast<size_t>(max_samples);
  if (s.samples < samples) {
    if (s.host) ASRF_CUDA_CHECK(cudaFreeHost(s.host));
    s.host = nullptr;
    ASRF_RETURN_IF_ERROR(GrowDevice(&s.pcm, &s.samples, samples));
    cudaError_t e = cudaHostAlloc(reinterpret_cast<void**>(&s.host), s.samples * sizeof(float), cudaHostAllocDefault);
    if (e != cudaSuccess) {
      s.host = nullptr;
      s.samples = 0;  // the next call allocates both again
      return cuda_internal::CudaStatus(e, "cudaHostAlloc", __FILE__, __LINE__);
    }
  }
  const size_t feature_floats = batch * static_cast<size_t>(t_max) * logmel80::kMels;
  ASRF_RETURN_IF_ERROR(GrowDevice(&s.features, &s.feature_floats, std::max<size_t>(1, feature_floats)));

  s.lengths.assign(batch, 0);
  for (size_t b = 0; b < batch; ++b) {
    float* row = s.host + b * static_cast<size_t>(max_samples);
    const auto& u = pcm[b];
    for (size_t k = 0; k < u.size(); ++k) row[k] = static_cast<float>(u[k]) / 32768.0f;
    std::fill(row + u.size(), row + max_samples, 0.0f);
    s.lengths[b] = static_cast<int64_t>(u.size());
  }
  s.used = true;
  cudaStream_t stream = state_->stream;
  if (samples > 0) {
    ASRF_CUDA_CHECK(cudaMemcpyAsync(s.pcm, s.host, samples * sizeof(float), cudaMemcpyHostToDevice, stream));
  }
  Status st = LaunchLogMel(s.pcm, s.lengths.data(), static_cast<int>(batch), max_samples, s.features, t_max,
                           state_->ws, stream);
  Status recorded = ASRF_CUDA_STATUS(cudaEventRecord(s.done, stream));
  return st.ok() ? recorded : st;
}

Status FrontEndStager::Release(int slot, float** features) {
  if (slot < 0 || slot >= kSlots) return Status::Invalid("FrontEndStager: slot " + std::to_string(slot));
  Slot& s = state_->slots[slot];
  if (!s.used) return Status::Invalid("FrontEndStager: slot " + std::to_string(slot) + " was never staged");
  ASRF_CUDA_CHECK(cudaSetDevice(device_));
  ASRF_CUDA_CHECK(cudaStreamWaitEvent(0, s.done, 0));
  *features = s.features;
  return Status::Ok();
}

}  // namespace asrf
