// The fused logmel80-v1 front end (cuda/logmel.cuh). Frames of all utterances are packed: utterance
// b's frame t is row offsets[b] + t of the scratch buffers (offsets: prefix sums of T_b, computed on
// the host from the host lengths and copied to the device each call through pinned memory). Four
// steps on the stream:
//  1. FrameKernel: one block per (t, b): frame t of utterance b times the window, zero-padded to 512;
//  2. cuFFT R2C, 512 points, in executions of kFftChunk frames (the plan's batch);
//  3. MelKernel: one block per packed frame: power spectrum into shared memory, then each mel bin
//     sums its filter's non-zero bins (in double), log(x + 1e-6);
//  4. NormalizeKernel: one block per (16 mel bins, utterance): mean, then population variance over
//     the utterance's frames (two passes, double), then writes every row t < t_max of out (zeros
//     past T_b).
#include "cuda/logmel.cuh"

#include <cufft.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "cuda/cuda_check.cuh"
#include "cuda/logmel_tables.h"

namespace asrf {
namespace {

using logmel80::kBins;
using logmel80::kFft;
using logmel80::kFrameLength;
using logmel80::kHop;
using logmel80::kMels;

constexpr int64_t kFftChunk = 4096;  // frames per cuFFT execution: 41 s of audio, 8 MiB in
constexpr int kFrameThreads = 128;
constexpr int kMelThreads = 128;
constexpr int kNormMels = 16;  // mel bins per normalisation block (threadIdx.x)
constexpr int kNormRows = 16;  // frames a normalisation block walks at once (threadIdx.y)
constexpr int kMaxBatch = 65535;  // gridDim.y
constexpr int kOffsetSlots = 2;   // pinned host buffers for the offsets, used in turn
static_assert(kMels % kNormMels == 0, "normalisation blocks must tile the mel bins");
static_assert(kOffsetSlots == 2, "DestroyLogMelWorkspace waits for and destroys two copy events");

}  // namespace

struct LogMelWorkspace {
  int device = -1;
  cudaEvent_t last_use = nullptr;  // recorded at the end of every call's work
  cufftHandle plan = 0;
  bool has_plan = false;
  float* window = nullptr;   // [kFrameLength]
  float* filters = nullptr;  // [kMels][kBins]: filter m's weight at bin k
  int2* ranges = nullptr;    // [kMels]: bins [x, y) where filter m may be non-zero
  int64_t frame_capacity = 0;         // packed frames the three buffers below hold (multiple of kFftChunk)
  float* frames = nullptr;            // [frame_capacity][kFft] windowed frames, zero-padded
  cufftComplex* spectrum = nullptr;   // [frame_capacity][kBins]
  float* logmel = nullptr;            // [frame_capacity][kMels] log-mel before normalisation
  int batch_capacity = 0;
  int64_t* offsets = nullptr;  // [batch_capacity + 1] on the device
  // Pinned [batch_capacity + 1] staging for the offsets; slot i is rewritten only after its
  // previous copy is done (copied[i]), so the host can run up to kOffsetSlots calls ahead.
  int64_t* pinned[kOffsetSlots] = {};
  cudaEvent_t copied[kOffsetSlots] = {};
  int next_slot = 0;
  std::vector<int64_t> host_offsets;  // the offsets of the current call
};

namespace {

// Frame t of utterance b (grid (t, b)); blocks past the utterance's frames do nothing.
static __global__ void FrameKernel(const float* __restrict__ pcm, int64_t max_samples,
                                   const int64_t* __restrict__ offsets, const float* __restrict__ window,
                                   float* __restrict__ frames) {
  const int64_t b = blockIdx.y;
  const int64_t t = blockIdx.x;
  const int64_t first = offsets[b];
  if (t >= offsets[b + 1] - first) return;
  const float* src = pcm + b * max_samples + t * kHop;  // t * 160 + 400 <= the clamped length
  float* dst = frames + (first + t) * kFft;
  for (int n = threadIdx.x; n < kFft; n += blockDim.x) dst[n] = n < kFrameLength ? src[n] * window[n] : 0.0f;
}

// One packed frame per block.
static __global__ void MelKernel(const cufftComplex* __restrict__ spectrum, const float* __restrict__ filters,
                                 const int2* __restrict__ ranges, float* __restrict__ logmel) {
  __shared__ float power[kBins];
  const int64_t f = blockIdx.x;
  const cufftComplex* s = spectrum + f * kBins;
  for (int k = threadIdx.x; k < kBins; k += blockDim.x) {
    const cufftComplex c = s[k];
    power[k] = __fadd_rn(__fmul_rn(c.x, c.x), __fmul_rn(c.y, c.y));  // re^2 + im^2 as the CPU rounds it
  }
  __syncthreads();
  for (int m = threadIdx.x; m < kMels; m += blockDim.x) {
    const int2 r = ranges[m];
    const float* w = filters + m * kBins;
    double acc = 0;
    for (int k = r.x; k < r.y; ++k) acc += static_cast<double>(power[k]) * static_cast<double>(w[k]);
    logmel[f * kMels + m] = logf(static_cast<float>(acc) + 1e-6f);
  }
}

// Block (mel group, b), threads (kNormMels, kNormRows): thread (x, y) has mel bin
// blockIdx.x * kNormMels + x and frames y, y + kNormRows, ...
static __global__ void NormalizeKernel(const float* __restrict__ logmel, const int64_t* __restrict__ offsets,
                                       int64_t t_max, float* __restrict__ out) {
  __shared__ double partial[kNormRows][kNormMels];
  __shared__ double mean_of[kNormMels];
  __shared__ double denom_of[kNormMels];
  const int x = threadIdx.x, y = threadIdx.y;
  const int m = blockIdx.x * kNormMels + x;
  const int64_t b = blockIdx.y;
  const int64_t first = offsets[b];
  const int64_t count = offsets[b + 1] - first;
  const double n = static_cast<double>(count > 0 ? count : 1);
  const float* in = logmel + first * kMels + m;  // frame t at in[t * kMels]; only read for t < count

  double sum = 0;
  for (int64_t t = y; t < count; t += kNormRows) sum += in[t * kMels];
  partial[y][x] = sum;
  __syncthreads();
  if (y == 0) {
    double s = 0;
    for (int r = 0; r < kNormRows; ++r) s += partial[r][x];
    mean_of[x] = s / n;
  }
  __syncthreads();  // also: every read of partial above is done before it is rewritten below
  const double mean = mean_of[x];
  double sq = 0;
  for (int64_t t = y; t < count; t += kNormRows) {
    const double d = static_cast<double>(in[t * kMels]) - mean;
    sq += d * d;
  }
  partial[y][x] = sq;
  __syncthreads();
  if (y == 0) {
    double s = 0;
    for (int r = 0; r < kNormRows; ++r) s += partial[r][x];
    denom_of[x] = sqrt(s / n) + 1e-5;
  }
  __syncthreads();
  const double denom = denom_of[x];
  float* o = out + b * t_max * kMels + m;
  for (int64_t t = y; t < t_max; t += kNormRows) {
    o[t * kMels] = t < count ? static_cast<float>((static_cast<double>(in[t * kMels]) - mean) / denom) : 0.0f;
  }
}

Status DestroyPlan(LogMelWorkspace* ws) {
  if (!ws->has_plan) return Status::Ok();
  ws->has_plan = false;
  ASRF_CUFFT_CHECK(cufftDestroy(ws->plan));
  return Status::Ok();
}

Status FreeFrameBuffers(LogMelWorkspace* ws) {
  Status st = ASRF_CUDA_STATUS(cudaFree(ws->frames));
  Status st2 = ASRF_CUDA_STATUS(cudaFree(ws->spectrum));
  Status st3 = ASRF_CUDA_STATUS(cudaFree(ws->logmel));
  ws->frames = nullptr;
  ws->spectrum = nullptr;
  ws->logmel = nullptr;
  ws->frame_capacity = 0;
  return !st.ok() ? st : !st2.ok() ? st2 : st3;
}

// Grows the packed-frame buffers to hold `frames` (rounded up to whole cuFFT executions), after the
// previous call's work is done. The new frame buffer is zeroed on `stream`, so that the tail of a
// last, partial cuFFT execution reads defined (if unused) values.
Status EnsureFrames(LogMelWorkspace* ws, int64_t frames, cudaStream_t stream) {
  if (frames <= ws->frame_capacity) return Status::Ok();
  const int64_t cap = (frames + kFftChunk - 1) / kFftChunk * kFftChunk;
  ASRF_CUDA_CHECK(cudaEventSynchronize(ws->last_use));
  ASRF_RETURN_IF_ERROR(FreeFrameBuffers(ws));
  const size_t rows = static_cast<size_t>(cap);
  ASRF_CUDA_CHECK(cudaMalloc(&ws->frames, rows * kFft * sizeof(float)));
  ASRF_CUDA_CHECK(cudaMalloc(&ws->spectrum, rows * kBins * sizeof(cufftComplex)));
  ASRF_CUDA_CHECK(cudaMalloc(&ws->logmel, rows * kMels * sizeof(float)));
  ASRF_CUDA_CHECK(cudaMemsetAsync(ws->frames, 0, rows * kFft * sizeof(float), stream));
  ws->frame_capacity = cap;
  return Status::Ok();
}

Status FreeOffsetBuffers(LogMelWorkspace* ws) {
  Status st = ASRF_CUDA_STATUS(cudaFree(ws->offsets));
  ws->offsets = nullptr;
  for (int i = 0; i < kOffsetSlots; ++i) {
    Status st2 = ASRF_CUDA_STATUS(cudaFreeHost(ws->pinned[i]));
    ws->pinned[i] = nullptr;
    if (st.ok()) st = st2;
  }
  ws->batch_capacity = 0;
  return st;
}

// Grows the offset buffers (device and pinned) to `batch` utterances, after the work that uses
// them is done.
Status EnsureBatch(LogMelWorkspace* ws, int batch) {
  if (batch <= ws->batch_capacity) return Status::Ok();
  ASRF_CUDA_CHECK(cudaEventSynchronize(ws->last_use));
  for (int i = 0; i < kOffsetSlots; ++i) ASRF_CUDA_CHECK(cudaEventSynchronize(ws->copied[i]));
  ASRF_RETURN_IF_ERROR(FreeOffsetBuffers(ws));
  const int cap = std::max(batch, 64);
  const size_t bytes = (static_cast<size_t>(cap) + 1) * sizeof(int64_t);
  ASRF_CUDA_CHECK(cudaMalloc(&ws->offsets, bytes));
  for (int i = 0; i < kOffsetSlots; ++i) ASRF_CUDA_CHECK(cudaMallocHost(&ws->pinned[i], bytes));
  ws->batch_capacity = cap;
  return Status::Ok();
}

// The constant tables, the plan and the event; `stream` is a private stream for the uploads.
Status InitWorkspace(LogMelWorkspace* ws, int64_t frames_hint, cudaStream_t stream) {
  ASRF_CUDA_CHECK(cudaGetDevice(&ws->device));
  ASRF_CUDA_CHECK(cudaEventCreateWithFlags(&ws->last_use, cudaEventDisableTiming));
  for (int i = 0; i < kOffsetSlots; ++i) {
    ASRF_CUDA_CHECK(cudaEventCreateWithFlags(&ws->copied[i], cudaEventDisableTiming));
  }

  const std::vector<float> window = logmel80::Window();
  const std::vector<float> fb = logmel80::Filterbank();  // [kBins][kMels]
  std::vector<float> filters(static_cast<size_t>(kMels) * kBins);
  std::vector<int2> ranges(kMels);
  for (int m = 0; m < kMels; ++m) {
    int lo = kBins, hi = 0;
    for (int k = 0; k < kBins; ++k) {
      const float w = fb[static_cast<size_t>(k) * kMels + m];
      filters[static_cast<size_t>(m) * kBins + k] = w;
      if (w != 0.0f) {
        lo = std::min(lo, k);
        hi = k + 1;
      }
    }
    ranges[m] = make_int2(lo < hi ? lo : 0, lo < hi ? hi : 0);
  }
  ASRF_CUDA_CHECK(cudaMalloc(&ws->window, window.size() * sizeof(float)));
  ASRF_CUDA_CHECK(cudaMalloc(&ws->filters, filters.size() * sizeof(float)));
  ASRF_CUDA_CHECK(cudaMalloc(&ws->ranges, ranges.size() * sizeof(int2)));
  ASRF_CUDA_CHECK(cudaMemcpyAsync(ws->window, window.data(), window.size() * sizeof(float), cudaMemcpyHostToDevice,
                                  stream));
  ASRF_CUDA_CHECK(cudaMemcpyAsync(ws->filters, filters.data(), filters.size() * sizeof(float),
                                  cudaMemcpyHostToDevice, stream));
  ASRF_CUDA_CHECK(cudaMemcpyAsync(ws->ranges, ranges.data(), ranges.size() * sizeof(int2), cudaMemcpyHostToDevice,
                                  stream));

  // Frame i of an execution: 512 reals at i * 512 in, 257 complex at i * 257 out.
  int n[1] = {kFft};
  int inembed[1] = {kFft};
  int onembed[1] = {kBins};
  ASRF_CUFFT_CHECK(cufftCreate(&ws->plan));
  ws->has_plan = true;
  size_t work_bytes = 0;
  ASRF_CUFFT_CHECK(cufftMakePlanMany(ws->plan, 1, n, inembed, 1, kFft, onembed, 1, kBins, CUFFT_R2C,
                                     static_cast<int>(kFftChunk), &work_bytes));

  ASRF_RETURN_IF_ERROR(EnsureFrames(ws, frames_hint, stream));
  ASRF_RETURN_IF_ERROR(EnsureBatch(ws, 1));
  ASRF_CUDA_CHECK(cudaStreamSynchronize(stream));  // the host vectors above go out of scope
  return Status::Ok();
}

// Steps 1-4 on the stream, for host_offsets already filled (total packed frames, longest T_b).
Status Enqueue(const float* pcm, int batch, int64_t max_samples, float* out, int64_t t_max, int64_t total,
               int64_t longest, LogMelWorkspace* ws, cudaStream_t stream) {
  ASRF_RETURN_IF_ERROR(EnsureFrames(ws, total, stream));
  ASRF_RETURN_IF_ERROR(EnsureBatch(ws, batch));
  // Through a pinned slot whose previous copy is done (a copy from pageable memory may block on
  // the stream, or read the buffer after returning).
  const int slot = ws->next_slot;
  ws->next_slot = (slot + 1) % kOffsetSlots;
  ASRF_CUDA_CHECK(cudaEventSynchronize(ws->copied[slot]));
  const size_t bytes = (static_cast<size_t>(batch) + 1) * sizeof(int64_t);
  std::memcpy(ws->pinned[slot], ws->host_offsets.data(), bytes);
  ASRF_CUDA_CHECK(cudaMemcpyAsync(ws->offsets, ws->pinned[slot], bytes, cudaMemcpyHostToDevice, stream));
  ASRF_CUDA_CHECK(cudaEventRecord(ws->copied[slot], stream));
  if (total > 0) {
    FrameKernel<<<dim3(static_cast<unsigned>(longest), static_cast<unsigned>(batch)), kFrameThreads, 0, stream>>>(
        pcm, max_samples, ws->offsets, ws->window, ws->frames);
    ASRF_CUDA_CHECK(cudaGetLastError());
    ASRF_CUFFT_CHECK(cufftSetStream(ws->plan, stream));
    for (int64_t first = 0; first < total; first += kFftChunk) {
      ASRF_CUFFT_CHECK(cufftExecR2C(ws->plan, ws->frames + first * kFft, ws->spectrum + first * kBins));
    }
    MelKernel<<<static_cast<unsigned>(total), kMelThreads, 0, stream>>>(ws->spectrum, ws->filters, ws->ranges,
                                                                        ws->logmel);
    ASRF_CUDA_CHECK(cudaGetLastError());
  }
  NormalizeKernel<<<dim3(kMels / kNormMels, static_cast<unsigned>(batch)), dim3(kNormMels, kNormRows), 0, stream>>>(
      ws->logmel, ws->offsets, t_max, out);
  ASRF_CUDA_CHECK(cudaGetLastError());
  return Status::Ok();
}

}  // namespace

Status CreateLogMelWorkspace(int64_t frames_hint, LogMelWorkspace** out) {
  if (!out) return Status::Invalid("LogMel workspace: null output");
  if (frames_hint < 0) return Status::Invalid("LogMel workspace: negative frames hint");
  auto ws = std::make_unique<LogMelWorkspace>();
  cudaStream_t stream = nullptr;
  ASRF_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  Status st = InitWorkspace(ws.get(), frames_hint, stream);
  if (!st.ok()) (void)cudaStreamSynchronize(stream);
  Status st2 = ASRF_CUDA_STATUS(cudaStreamDestroy(stream));
  if (st.ok()) st = st2;
  if (!st.ok()) {
    (void)DestroyLogMelWorkspace(ws.release());
    return st;
  }
  *out = ws.release();
  return Status::Ok();
}

Status DestroyLogMelWorkspace(LogMelWorkspace* ws) {
  if (!ws) return Status::Ok();
  std::unique_ptr<LogMelWorkspace> owned(ws);
  // In this order (a braced list is evaluated left to right): wait, then free everything.
  const Status results[] = {
      ws->last_use ? ASRF_CUDA_STATUS(cudaEventSynchronize(ws->last_use)) : Status::Ok(),
      DestroyPlan(ws),
      ws->copied[0] ? ASRF_CUDA_STATUS(cudaEventSynchronize(ws->copied[0])) : Status::Ok(),
      ws->copied[1] ? ASRF_CUDA_STATUS(cudaEventSynchronize(ws->copied[1])) : Status::Ok(),
      FreeFrameBuffers(ws),
      FreeOffsetBuffers(ws),
      ASRF_CUDA_STATUS(cudaFree(ws->window)),
      ASRF_CUDA_STATUS(cudaFree(ws->filters)),
      ASRF_CUDA_STATUS(cudaFree(ws->ranges)),
      ws->last_use ? ASRF_CUDA_STATUS(cudaEventDestroy(ws->last_use)) : Status::Ok(),
      ws->copied[0] ? ASRF_CUDA_STATUS(cudaEventDestroy(ws->copied[0])) : Status::Ok(),
      ws->copied[1] ? ASRF_CUDA_STATUS(cudaEventDestroy(ws->copied[1])) : Status::Ok(),
  };
  for (const Status& st : results)
    if (!st.ok()) return st;
  return Status::Ok();
}

Status LaunchLogMel(const float* pcm, const int64_t* lengths, int batch, int64_t max_samples, float* out, int64_t t_max,
                    LogMelWorkspace* ws, cudaStream_t stream) {
  if (!ws) return Status::Invalid("LogMel: no workspace");
  if (batch < 0 || max_samples < 0 || t_max < 0) {
    return Status::Invalid("LogMel: bad shape batch " + std::to_string(batch) + ", max_samples " +
                           std::to_string(max_samples) + ", t_max " + std::to_string(t_max));
  }
  if (batch > kMaxBatch) {
    return Status::Invalid("LogMel: batch " + std::to_string(batch) + " exceeds " + std::to_string(kMaxBatch));
  }
  if (batch == 0) return Status::Ok();
  if (!lengths) return Status::Invalid("LogMel: null lengths");
  int device = -1;
  ASRF_CUDA_CHECK(cudaGetDevice(&device));
  if (device != ws->device) {
    return Status::Invalid("LogMel: the workspace belongs to device " + std::to_string(ws->device) +
                           " but device " + std::to_string(device) + " is current");
  }

  std::vector<int64_t>& offsets = ws->host_offsets;
  offsets.assign(static_cast<size_t>(batch) + 1, 0);
  int64_t longest = 0;
  for (int b = 0; b < batch; ++b) {
    if (lengths[b] < 0) {
      return Status::Invalid("LogMel: utterance " + std::to_string(b) + " has length " + std::to_string(lengths[b]));
    }
    const int64_t frames = logmel80::NumFrames(std::min(lengths[b], max_samples));
    offsets[b + 1] = offsets[b] + frames;
    longest = std::max(longest, frames);
  }
  const int64_t total = offsets[batch];
  if (longest > t_max) {
    return Status::Invalid("LogMel: out has " + std::to_string(t_max) + " frames per utterance but an utterance has " +
                           std::to_string(longest));
  }
  if (t_max == 0) return Status::Ok();  // no frames anywhere: nothing to write
  if (!out || (total > 0 && !pcm)) return Status::Invalid("LogMel: a null pointer for a non-empty shape");
  if (total > std::numeric_limits<int32_t>::max() ||
      t_max > std::numeric_limits<int64_t>::max() / kMels / batch) {
    return Status::Invalid("LogMel: " + std::to_string(total) + " frames, " + std::to_string(t_max) +
                           " per utterance: too large for one call");
  }

  ASRF_CUDA_CHECK(cudaStreamWaitEvent(stream, ws->last_use, 0));
  Status st = Enqueue(pcm, batch, max_samples, out, t_max, total, longest, ws, stream);
  // Recorded after a failure too: growth and Destroy wait for whatever was enqueued.
  Status recorded = ASRF_CUDA_STATUS(cudaEventRecord(ws->last_use, stream));
  return st.ok() ? recorded : st;
}

}  // namespace asrf
