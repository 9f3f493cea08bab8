// CTC greedy decoding on the device (cuda/ctc_greedy.cuh) in two kernels:
//  1. FrameBestKernel: one warp per valid frame: argmax over the vocabulary (ties to the lowest
//     id) and the frame's normalised probability, into scratch [B, T] (best id, probability);
//  2. CollapseKernel: one warp per utterance walks its frames 32 at a time: which frames start a
//     token (ballot), each token's index (popcount), and the max probability and last frame of
//     each run (a segmented scan over the lanes), carrying the open token across chunks.
#include "cuda/ctc_greedy.cuh"

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "cuda/cuda_check.cuh"

namespace asrf {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kBestThreads = 256;     // 8 frames per block
constexpr int kCollapseThreads = 128;  // 4 utterances per block

__device__ __forceinline__ int64_t ValidFrames(int64_t length, int64_t frames) {
  return length < 0 ? 0 : (length > frames ? frames : length);
}

// (a, ia) is preferred over (b, ib): NaN first, then the larger value, then the lower id. A strict
// total order over distinct ids, so a reduction in any order finds the same element.
__device__ __forceinline__ bool Better(float a, int32_t ia, float b, int32_t ib) {
  const bool na = isnan(a), nb = isnan(b);
  if (na != nb) return na;
  if (!na && a != b) return a > b;
  return ia < ib;
}

// One warp per frame f = b * frames + t of the whole batch; frames t >= n are skipped (their
// scratch entries are never read).
static __global__ void FrameBestKernel(const float* __restrict__ log_probs, const int64_t* __restrict__ out_lengths,
                                       int64_t frames, int64_t vocab, int64_t total, int32_t* __restrict__ best,
                                       float* __restrict__ prob) {
  const int64_t f = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  if (f >= total) return;  // the whole warp
  const int64_t b = f / frames, t = f % frames;
  if (t >= ValidFrames(out_lengths[b], frames)) return;  // the whole warp
  const float* row = log_probs + f * vocab;

  // A lane without elements holds (-inf, INT32_MAX), which every element beats (vocab < INT32_MAX).
  float bv = -INFINITY;
  int32_t bi = INT32_MAX;
  for (int64_t v = lane; v < vocab; v += kWarp) {
    const float x = row[v];
    if (Better(x, static_cast<int32_t>(v), bv, bi)) {
      bv = x;
      bi = static_cast<int32_t>(v);
    }
  }
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    const float ov = __shfl_xor_sync(kFullMask, bv, off);
    const int32_t oi = __shfl_xor_sync(kFullMask, bi, off);
    if (Better(ov, oi, bv, bi)) {
      bv = ov;
      bi = oi;
    }
  }
  // exp(lp[best] - logsumexp) = 1 / sum_v exp(lp[v] - lp[best]), in double.
  const double m = bv;
  double sum = 0;
  for (int64_t v = lane; v < vocab; v += kWarp) sum += exp(static_cast<double>(row[v]) - m);
  for (int off = kWarp / 2; off > 0; off >>= 1) sum += __shfl_xor_sync(kFullMask, sum, off);
  if (lane == 0) {
    best[f] = bi;
    prob[f] = bv == -INFINITY ? 0.0f : static_cast<float>(1.0 / sum);
  }
}

// One warp per utterance. Per chunk of 32 frames (lane i has frame base + i):
//   start   = id != 0 && id != id of the frame before (for lane 0: the previous chunk's last);
//   k       = the index of the token the frame belongs to (non-blank frames): tokens started
//             before the chunk + starts at lanes <= i, minus 1. A non-blank frame that does not
//             start a token repeats the previous frame's id, so it extends the latest token; the
//             frames of one token are therefore contiguous lanes with equal k;
//   p       = after an inclusive segmented max-scan over lanes with equal k, the highest
//             probability of the token's frames up to this lane (lane 0 of a continued token
//             also folds in the maximum carried from earlier chunks);
// the token's last lane in the chunk writes its end and max so far (a later chunk that extends it
// overwrites both; __syncwarp orders those writes), its first lane writes id and start.
static __global__ void CollapseKernel(const int32_t* __restrict__ best, const float* __restrict__ prob,
                                      const int64_t* __restrict__ out_lengths, int batch, int64_t frames,
                                      int32_t* __restrict__ tokens, int32_t* __restrict__ starts,
                                      int32_t* __restrict__ ends, float* __restrict__ probs,
                                      int32_t* __restrict__ counts) {
  const int64_t b = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  if (b >= batch) return;  // the whole warp
  const int64_t n = ValidFrames(out_lengths[b], frames);
  const int32_t* bb = best + b * frames;
  const float* pb = prob + b * frames;
  int32_t* tok = tokens + b * frames;
  int32_t* st = starts + b * frames;
  int32_t* en = ends + b * frames;
  float* pr = probs + b * frames;

  // Warp-uniform state carried between chunks.
  int32_t count = 0;        // tokens started so far
  int32_t prev_id = -1;     // best id of the frame before the chunk
  float open_prob = 0.0f;   // max probability so far of token count - 1 (used when prev_id != 0)
  const unsigned lanes_le = kFullMask >> (kWarp - 1 - lane);  // bits 0..lane

  for (int64_t base = 0; base < n; base += kWarp) {
    const int64_t t = base + lane;
    const bool valid = t < n;
    const int32_t id = valid ? bb[t] : 0;  // frames past n act as blanks
    float p = valid ? pb[t] : 0.0f;
    int32_t before = __shfl_up_sync(kFullMask, id, 1);
    if (lane == 0) before = prev_id;
    const bool start = id != 0 && id != before;
    const unsigned start_bits = __ballot_sync(kFullMask, start);
    const int32_t k = id != 0 ? count + __popc(start_bits & lanes_le) - 1 : -1;
    if (lane == 0 && id != 0 && !start) p = fmaxf(p, open_prob);  // extends token count - 1
    for (int d = 1; d < kWarp; d <<= 1) {
      const float op = __shfl_up_sync(kFullMask, p, d);
      const int32_t ok = __shfl_up_sync(kFullMask, k, d);
      if (lane >= d && ok == k) p = fmaxf(p, op);
    }
    const int32_t k_next = __shfl_down_sync(kFullMask, k, 1);
    if (start) {
      tok[k] = id;
      st[k] = static_cast<int32_t>(t);
    }
    if (k >= 0 && (lane == kWarp - 1 || k_next != k)) {
      en[k] = static_cast<int32_t>(t);
      pr[k] = p;
    }
    const int32_t last_id = __shfl_sync(kFullMask, id, kWarp - 1);
    const float last_p = __shfl_sync(kFullMask, p, kWarp - 1);
    count += __popc(start_bits);
    if (last_id != 0) open_prob = last_p;
    prev_id = last_id;
    __syncwarp();
  }
  if (lane == 0) counts[b] = count;
  for (int64_t i = count + lane; i < frames; i += kWarp) {
    tok[i] = -1;
    st[i] = -1;
    en[i] = -1;
    pr[i] = 0.0f;
  }
}

// Stream-ordered scratch, freed on the stream however the launcher returns.
class StreamScratch {
 public:
  explicit StreamScratch(cudaStream_t stream) : stream_(stream) {}
  ~StreamScratch() {
    if (ptr_) (void)cudaFreeAsync(ptr_, stream_);
  }
  StreamScratch(const StreamScratch&) = delete;
  StreamScratch& operator=(const StreamScratch&) = delete;
  void** slot() { return &ptr_; }
  void* get() const { return ptr_; }

 private:
  cudaStream_t stream_;
  void* ptr_ = nullptr;
};

}  // namespace

Status LaunchCtcGreedy(const float* log_probs, const int64_t* out_lengths, int batch, int64_t frames, int64_t vocab,
                       int32_t* tokens, int32_t* starts, int32_t* ends, float* probs, int32_t* counts,
                       cudaStream_t stream) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  if (batch < 0 || frames < 0 || vocab < 1 || frames >= kMax || vocab >= kMax) {
    return Status::Invalid("CTC greedy: bad shape batch " + std::to_string(batch) + ", frames " +
                           std::to_string(frames) + ", vocab " + std::to_string(vocab));
  }
  if (batch == 0) return Status::Ok();
  if (!out_lengths || !counts || (frames > 0 && (!log_probs || !tokens || !starts || !ends || !probs))) {
    return Status::Invalid("CTC greedy: a null pointer for a non-empty shape");
  }
  const int64_t total = static_cast<int64_t>(batch) * frames;  // < 2^31 * 2^31: no overflow
  const int64_t frames_per_block = kBestThreads / kWarp;
  if ((total + frames_per_block - 1) / frames_per_block > kMax ||
      total > std::numeric_limits<int64_t>::max() / static_cast<int64_t>(sizeof(float)) / vocab) {
    return Status::Invalid("CTC greedy: " + std::to_string(total) + " frames of " + std::to_string(vocab) +
                           " classes exceed one launch");
  }
  StreamScratch scratch(stream);
  int32_t* best = nullptr;
  float* prob = nullptr;
  if (total > 0) {
    ASRF_CUDA_CHECK(cudaMallocAsync(scratch.slot(), static_cast<size_t>(total) * (sizeof(int32_t) + sizeof(float)),
                                    stream));
    best = static_cast<int32_t*>(scratch.get());
    prob = reinterpret_cast<float*>(best + total);
    const unsigned blocks = static_cast<unsigned>((total + frames_per_block - 1) / frames_per_block);
    FrameBestKernel<<<blocks, kBestThreads, 0, stream>>>(log_probs, out_lengths, frames, vocab, total, best, prob);
    ASRF_CUDA_CHECK(cudaGetLastError());
  }
  const int per_block = kCollapseThreads / kWarp;
  const unsigned blocks = static_cast<unsigned>((batch + per_block - 1) / per_block);
  CollapseKernel<<<blocks, kCollapseThreads, 0, stream>>>(best, prob, out_lengths, batch, frames, tokens, starts, ends,
                                                          probs, counts);
  ASRF_CUDA_CHECK(cudaGetLastError());
  return Status::Ok();
}

}  // namespace asrf
