// The CUDA kernels of cuda/ against their CPU references:
//  - the fused front end (cuda/logmel.cuh) against worker/features.cc's LogMel, by normalised
//    error per utterance, with rows past each utterance's frames exactly zero;
//  - CTC greedy decoding (cuda/ctc_greedy.cuh) against cuda/ctc_greedy_ref.h: identical tokens,
//    frames and counts, probabilities within 1e-5.
// Those skip (GTEST_SKIP, with the reason) when the build has no CUDA or the host no device; they
// never pass without running. The CPU tests always run: the reference decoder on hand-made inputs,
// its agreement with GreedyDecode and with AcousticModel's word timestamps and confidences, and
// the host-built tables of the CUDA front end against worker/features.cc.
#include <gtest/gtest.h>
#include <torch/script.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <limits>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "cuda/ctc_greedy_ref.h"
#include "cuda/logmel_tables.h"
#include "tests/harness.h"
#include "worker/acoustic_model.h"
#include "worker/ctc_model.h"
#include "worker/features.h"

#if ASRF_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "cuda/ctc_greedy.cuh"
#include "cuda/logmel.cuh"
#endif

namespace asrf::testing {
namespace {

// Audio for models that ignore what they hear (pattern models): loud enough not to be taken for
// silence, which the transcription path skips without running the model (NoSpeech).
std::vector<int16_t> Audible(size_t n) {
  std::vector<int16_t> x(n);
  for (size_t i = 0; i < n; ++i) x[i] = static_cast<int16_t>(i % 2 ? 8000 : -8000);
  return x;
}

// ---------------------------------------------------------------------------------------------
// The CTC greedy reference's outputs for one batch, as vectors.
struct Greedy {
  std::vector<int32_t> tokens, starts, ends, counts;
  std::vector<float> probs;
};

Greedy RunReference(const std::vector<float>& lp, const std::vector<int64_t>& out_lengths, int64_t frames,
                    int64_t vocab) {
  const int batch = static_cast<int>(out_lengths.size());
  const size_t n = static_cast<size_t>(batch) * static_cast<size_t>(frames);
  Greedy g{std::vector<int32_t>(n, 7), std::vector<int32_t>(n, 7), std::vector<int32_t>(n, 7),
           std::vector<int32_t>(batch, 7), std::vector<float>(n, 7.0f)};
  Status st = CtcGreedyReference(lp.data(), out_lengths.data(), batch, frames, vocab, g.tokens.data(),
                                 g.starts.data(), g.ends.data(), g.probs.data(), g.counts.data());
  EXPECT_TRUE(st.ok()) << st.ToString();
  return g;
}

// Log-softmax of logits [frames, vocab] given row by row.
std::vector<float> LogSoftmax(const std::vector<std::vector<float>>& logits) {
  std::vector<float> out;
  for (const auto& row : logits) {
    torch::Tensor t = torch::log_softmax(torch::tensor(row), 0).contiguous();
    out.insert(out.end(), t.data_ptr<float>(), t.data_ptr<float>() + t.numel());
  }
  return out;
}

double Softmax(const std::vector<float>& row, int64_t id) {
  double sum = 0;
  for (float x : row) sum += std::exp(static_cast<double>(x));
  return std::exp(static_cast<double>(row[id])) / sum;
}

// [blank, a, a, blank, a, b, b] over {blank, a, b}: a, a, b starting at frames 1, 4, 5.
TEST(CtcGreedyReference, HandMadeSequence) {
  const std::vector<std::vector<float>> logits = {
      {3, 1, 0}, {0, 2, 1}, {0, 4, 1}, {2, 0, 0}, {1, 3, 0}, {0, 1, 2}, {0, 0, 5},
  };
  const std::vector<float> lp = LogSoftmax(logits);
  Greedy g = RunReference(lp, {7}, 7, 3);
  ASSERT_EQ(g.counts[0], 3);
  EXPECT_EQ(std::vector<int32_t>(g.tokens.begin(), g.tokens.begin() + 3), (std::vector<int32_t>{1, 1, 2}));
  EXPECT_EQ(std::vector<int32_t>(g.starts.begin(), g.starts.begin() + 3), (std::vector<int32_t>{1, 4, 5}));
  EXPECT_EQ(std::vector<int32_t>(g.ends.begin(), g.ends.begin() + 3), (std::vector<int32_t>{2, 4, 6}));
  EXPECT_NEAR(g.probs[0], std::max(Softmax(logits[1], 1), Softmax(logits[2], 1)), 1e-6);
  EXPECT_NEAR(g.probs[1], Softmax(logits[4], 1), 1e-6);
  EXPECT_NEAR(g.probs[2], std::max(Softmax(logits[5], 2), Softmax(logits[6], 2)), 1e-6);
  for (int i = 3; i < 7; ++i) {  // the padding
    EXPECT_EQ(g.tokens[i], -1);
    EXPECT_EQ(g.starts[i], -1);
    EXPECT_EQ(g.ends[i], -1);
    EXPECT_EQ(g.probs[i], 0.0f);
  }
}

// out_lengths cut, clamp and zero utterances; each row is its own.
TEST(CtcGreedyReference, OutLengthsBoundEachUtterance) {
  const std::vector<std::vector<float>> logits = {
      {3, 1, 0}, {0, 2, 1}, {0, 4, 1}, {2, 0, 0}, {1, 3, 0}, {0, 1, 2}, {0, 0, 5},
  };
  const std::vector<float> one = LogSoftmax(logits);
  std::vector<float> lp;
  for (int b = 0; b < 5; ++b) lp.insert(lp.end(), one.begin(), one.end());
  Greedy g = RunReference(lp, {5, 100, 0, -3, 1}, 7, 3);
  EXPECT_EQ(g.counts, (std::vector<int32_t>{2, 3, 0, 0, 0}));
  EXPECT_EQ(g.tokens[0 * 7 + 1], 1);
  EXPECT_EQ(g.starts[0 * 7 + 1], 4);
  EXPECT_EQ(g.ends[0 * 7 + 1], 4);
  EXPECT_EQ(g.tokens[0 * 7 + 2], -1);
  EXPECT_EQ(g.tokens[1 * 7 + 2], 2);
  EXPECT_EQ(g.ends[1 * 7 + 2], 6);
  for (int b = 2; b < 5; ++b)
    for (int i = 0; i < 7; ++i) EXPECT_EQ(g.tokens[b * 7 + i], -1) << b << " " << i;
}

// Ties go to the lowest id (torch's argmax): blank over a, a over b; a blank between equal
// tokens separates them; all -inf is blank.
TEST(CtcGreedyReference, TiesGoToTheLowestId) {
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> lp = {
      -1, -1, -5,    // blank = a: blank
      -5, -1, -1,    // a = b: a
      -5, -1, -1,    // a again: extends
      -1, -5, -5,    // blank
      -5, -1, -1,    // a: a new token
      -inf, -inf, -inf,  // all -inf: blank
      -inf, -inf, 0,     // b
  };
  Greedy g = RunReference(lp, {7}, 7, 3);
  ASSERT_EQ(g.counts[0], 3);
  EXPECT_EQ(std::vector<int32_t>(g.tokens.begin(), g.tokens.begin() + 3), (std::vector<int32_t>{1, 1, 2}));
  EXPECT_EQ(std::vector<int32_t>(g.starts.begin(), g.starts.begin() + 3), (std::vector<int32_t>{1, 4, 6}));
  EXPECT_EQ(std::vector<int32_t>(g.ends.begin(), g.ends.begin() + 3), (std::vector<int32_t>{2, 4, 6}));
  EXPECT_NEAR(g.probs[0], std::exp(-1.0) / (2 * std::exp(-1.0) + std::exp(-5.0)), 1e-6);
  EXPECT_FLOAT_EQ(g.probs[2], 1.0f);
}

TEST(CtcGreedyReference, RejectsBadShapes) {
  float lp = 0;
  int64_t len = 1;
  int32_t i32 = 0;
  float f = 0;
  EXPECT_EQ(CtcGreedyReference(&lp, &len, 1, 1, 0, &i32, &i32, &i32, &f, &i32).code(), Status::Code::kInvalid);
  EXPECT_EQ(CtcGreedyReference(&lp, &len, -1, 1, 1, &i32, &i32, &i32, &f, &i32).code(), Status::Code::kInvalid);
  EXPECT_EQ(CtcGreedyReference(nullptr, &len, 1, 1, 1, &i32, &i32, &i32, &f, &i32).code(), Status::Code::kInvalid);
  EXPECT_TRUE(CtcGreedyReference(nullptr, &len, 1, 0, 1, nullptr, nullptr, nullptr, nullptr, &i32).ok());
  EXPECT_EQ(i32, 0);
}

// Random log-probabilities with many ties and runs: [B, T, V] with per-utterance lengths.
struct RandomCtc {
  int64_t frames = 0, vocab = 0;
  std::vector<int64_t> out_lengths;
  std::vector<float> lp;
};

// Logits drawn from {0, 1, 2} (exact ties after log-softmax), a frame repeating the one before
// with probability `repeat`, a fraction of entries -inf and some frames all -inf.
RandomCtc MakeRandomCtc(std::mt19937& rng, int batch, int64_t frames, int64_t vocab, double repeat) {
  RandomCtc r;
  r.frames = frames;
  r.vocab = vocab;
  std::uniform_int_distribution<int> level(0, 2);
  std::uniform_real_distribution<double> u(0, 1);
  std::normal_distribution<float> normal(0, 3);
  for (int b = 0; b < batch; ++b) {
    const double pick = u(rng);
    int64_t len = pick < 0.1 ? 0 : pick < 0.2 ? 1 : pick < 0.3 ? frames + 5 : pick < 0.35 ? -2
                                                                   : static_cast<int64_t>(u(rng) * (frames + 1));
    r.out_lengths.push_back(len);
    std::vector<float> row(vocab);
    const bool quantised = u(rng) < 0.7;
    for (int64_t t = 0; t < frames; ++t) {
      if (t == 0 || u(rng) >= repeat) {
        for (auto& x : row) x = quantised ? static_cast<float>(level(rng)) : normal(rng);
        if (u(rng) < 0.2) row[0] += 3;  // more blanks
      }
      torch::Tensor s = torch::log_softmax(torch::tensor(row), 0).contiguous();
      std::vector<float> out(s.data_ptr<float>(), s.data_ptr<float>() + vocab);
      if (u(rng) < 0.02) {
        std::fill(out.begin(), out.end(), -std::numeric_limits<float>::infinity());
      } else if (vocab > 2 && u(rng) < 0.05) {
        out[static_cast<size_t>(u(rng) * vocab) % vocab] = -std::numeric_limits<float>::infinity();
      }
      r.lp.insert(r.lp.end(), out.begin(), out.end());
    }
  }
  return r;
}

// Every emitted token is a maximal run of its id in the argmax sequence (torch's), the frames
// between runs are blanks, and each probability is the run's best frame probability as
// AcousticModel computes it (exp(lp[best] - logsumexp)).
TEST(CtcGreedyReference, RunsAreTorchArgmaxRuns) {
  std::mt19937 rng(7);
  for (int round = 0; round < 20; ++round) {
    const int batch = 1 + round % 4;
    const int64_t frames = round % 5 == 0 ? 1 : 1 + round * 7, vocab = 2 + round % 6;
    RandomCtc r = MakeRandomCtc(rng, batch, frames, vocab, 0.5);
    Greedy g = RunReference(r.lp, r.out_lengths, frames, vocab);
    torch::Tensor lp = torch::from_blob(r.lp.data(), {batch, frames, vocab}, torch::kFloat32);
    torch::Tensor best = lp.argmax(-1).contiguous();
    torch::Tensor prob = (lp.gather(-1, best.unsqueeze(-1)).squeeze(-1) - lp.logsumexp(-1)).exp().contiguous();
    for (int b = 0; b < batch; ++b) {
      const int64_t n = std::clamp<int64_t>(r.out_lengths[b], 0, frames);
      const int64_t* id = best[b].data_ptr<int64_t>();
      const float* p = prob[b].data_ptr<float>();
      int64_t next = 0;  // the first frame not yet explained
      for (int32_t i = 0; i < g.counts[b]; ++i) {
        const int64_t k = b * frames + i;
        for (int64_t t = next; t < g.starts[k]; ++t) EXPECT_EQ(id[t], 0) << "round " << round << " b " << b;
        ASSERT_GE(g.starts[k], next);
        ASSERT_LE(g.ends[k], n - 1);
        float run_max = 0;
        for (int64_t t = g.starts[k]; t <= g.ends[k]; ++t) {
          EXPECT_EQ(id[t], g.tokens[k]);
          run_max = std::max(run_max, p[t]);
        }
        EXPECT_NE(g.tokens[k], 0);
        if (g.starts[k] > 0) {
          EXPECT_NE(id[g.starts[k] - 1], g.tokens[k]);
        }
        if (g.ends[k] + 1 < n) {
          EXPECT_NE(id[g.ends[k] + 1], g.tokens[k]);
        }
        EXPECT_NEAR(g.probs[k], run_max, 1e-6);
        next = g.ends[k] + 1;
      }
      for (int64_t t = next; t < n; ++t) EXPECT_EQ(id[t], 0) << "round " << round << " b " << b;
      for (int64_t i = g.counts[b]; i < frames; ++i) EXPECT_EQ(g.tokens[b * frames + i], -1);
    }
  }
}

// The reference's tokens give GreedyDecode's text (worker/ctc_model.cc).
TEST(CtcGreedyReference, AgreesWithGreedyDecode) {
  std::mt19937 rng(11);
  Vocabulary vocab;
  for (int round = 0; round < 10; ++round) {
    const int batch = 1 + round % 8;
    const int64_t frames = 1 + 13 * round;
    RandomCtc r = MakeRandomCtc(rng, batch, frames, vocab.size(), 0.4);
    Greedy g = RunReference(r.lp, r.out_lengths, frames, vocab.size());
    torch::Tensor lp = torch::from_blob(r.lp.data(), {batch, frames, vocab.size()}, torch::kFloat32);
    // GreedyDecode reads lengths as they are: give it the clamped ones (negative counts as 0).
    std::vector<int64_t> clamped;
    for (int64_t n : r.out_lengths) clamped.push_back(std::max<int64_t>(n, 0));
    std::vector<std::string> texts = GreedyDecode(lp, torch::tensor(clamped, torch::kInt64), vocab);
    ASSERT_EQ(texts.size(), static_cast<size_t>(batch));
    for (int b = 0; b < batch; ++b) {
      std::vector<int64_t> ids(g.tokens.begin() + b * frames, g.tokens.begin() + b * frames + g.counts[b]);
      EXPECT_EQ(NormalizeText(vocab.Decode(ids)), texts[b]) << "round " << round << " b " << b;
    }
  }
}

// Through AcousticModel (worker/acoustic_model.cc): a TorchScript model that returns fixed random
// log-probabilities at 2 feature frames per output frame; its words, times and confidences are
// what the reference's tokens, frames and probabilities give.
TEST(CtcGreedyReference, AgreesWithTranscribeTimestamps) {
  TempDir dir;
  constexpr int64_t kV = 5;  // {blank, |, a, b, c}
  const int64_t P = 150;
  std::mt19937 rng(5);
  RandomCtc r = MakeRandomCtc(rng, 1, P, kV, 0.6);
  for (float& x : r.lp) x = std::max(x, -80.0f);  // torch's logsumexp of a row of -inf is not our concern here
  torch::Tensor pattern = torch::from_blob(r.lp.data(), {P, kV}, torch::kFloat32).clone();
  torch::jit::Module m("__torch__.PatternCtc");
  m.register_buffer("pattern", pattern);
  m.define(R"JIT(
def forward(self, features: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
    t_out = (features.size(1) + 1) // 2
    idx = torch.clamp(torch.arange(t_out, device=features.device), max=self.pattern.size(0) - 1)
    lp = self.pattern.index_select(0, idx)
    return lp.unsqueeze(0).expand(features.size(0), t_out, lp.size(1)), (lengths + 1) // 2
)JIT");
  m.save(dir / "pattern.pt");
  std::ofstream(dir / "vocab.txt") << "<blank>\n|\na\nb\nc\n";
  AcousticModelOptions o;
  o.vocabulary = dir / "vocab.txt";
  std::unique_ptr<AcousticModel> model;
  Status st = LoadAcousticModel(dir / "pattern.pt", "", o, &model);
  ASSERT_TRUE(st.ok()) << st.ToString();

  // Utterances of 2 * out feature frames: out output frames each, stride exactly 2.
  const std::vector<int64_t> outs = {P, 61, 1};
  std::vector<std::vector<int16_t>> pcm;
  std::vector<std::span<const int16_t>> spans;
  for (int64_t out : outs) pcm.push_back(Audible(static_cast<size_t>(kFrameLength + (2 * out - 1) * kHop)));
  for (const auto& p : pcm) spans.emplace_back(p);
  std::vector<Hypothesis> hyps;
  st = model->Transcribe(spans, &hyps);
  ASSERT_TRUE(st.ok()) << st.ToString();
  ASSERT_EQ(hyps.size(), outs.size());

  const std::string text_of[kV] = {"", " ", "a", "b", "c"};
  int words_seen = 0;
  for (size_t u = 0; u < outs.size(); ++u) {
    Greedy g = RunReference(std::vector<float>(r.lp.begin(), r.lp.begin() + outs[u] * kV), {outs[u]}, outs[u], kV);
    const double duration = static_cast<double>(pcm[u].size()) / kSampleRate;
    auto time = [&](int64_t frame) { return std::min(frame * 2 * 0.01, duration); };
    std::string raw;
    std::vector<DecodedWord> words;
    DecodedWord w;
    int tokens_in_word = 0;
    auto flush = [&] {
      if (tokens_in_word > 0) {
        w.confidence /= tokens_in_word;
        words.push_back(w);
      }
      w = DecodedWord();
      tokens_in_word = 0;
    };
    for (int32_t i = 0; i < g.counts[0]; ++i) {
      raw += text_of[g.tokens[i]];
      if (g.tokens[i] == 1) {
        flush();
        continue;
      }
      if (tokens_in_word == 0) w.start = time(g.starts[i]);
      w.text += text_of[g.tokens[i]];
      w.end = time(g.ends[i] + 1);
      w.confidence += g.probs[i];
      ++tokens_in_word;
    }
    flush();
    const Hypothesis& h = hyps[u];
    EXPECT_EQ(h.text, NormalizeText(raw)) << "utterance " << u;
    ASSERT_EQ(h.words.size(), words.size()) << "utterance " << u << ": " << h.text;
    for (size_t i = 0; i < words.size(); ++i) {
      EXPECT_EQ(h.words[i].text, words[i].text) << "utterance " << u << " word " << i;
      EXPECT_NEAR(h.words[i].start, words[i].start, 1e-9) << "utterance " << u << " word " << i;
      EXPECT_NEAR(h.words[i].end, words[i].end, 1e-9) << "utterance " << u << " word " << i;
      EXPECT_NEAR(h.words[i].confidence, words[i].confidence, 1e-5) << "utterance " << u << " word " << i;
      ++words_seen;
    }
  }
  EXPECT_GE(words_seen, 10);  // the pattern is not degenerate
}

// The CUDA front end's host-built tables are worker/features.cc's.
TEST(LogMelTables, MatchTheCpuFrontEnd) {
  torch::Tensor fb = MelFilterbank().contiguous();
  std::vector<float> ours = logmel80::Filterbank();
  ASSERT_EQ(fb.numel(), static_cast<int64_t>(ours.size()));
  ASSERT_EQ(fb.size(0), logmel80::kBins);
  ASSERT_EQ(fb.size(1), logmel80::kMels);
  const float* theirs = fb.data_ptr<float>();
  int nonzero = 0;
  for (size_t i = 0; i < ours.size(); ++i) {
    ASSERT_EQ(ours[i], theirs[i]) << "bin " << i / logmel80::kMels << " mel " << i % logmel80::kMels;
    nonzero += ours[i] != 0.0f;
  }
  EXPECT_GT(nonzero, 200);
  for (int m = 0; m < logmel80::kMels; ++m) {  // no empty filter (its bin would be constant)
    float sum = 0;
    for (int k = 0; k < logmel80::kBins; ++k) sum += ours[static_cast<size_t>(k) * logmel80::kMels + m];
    EXPECT_GT(sum, 0.0f) << "mel " << m;
  }
  torch::Tensor w = torch::hann_window(kFrameLength, /*periodic=*/true, torch::kFloat32).contiguous();
  std::vector<float> window = logmel80::Window();
  ASSERT_EQ(w.numel(), static_cast<int64_t>(window.size()));
  // torch computes the window in float (its angle rounded to float first) and is off by up to 4
  // ulp; ours is the formula in double, rounded once.
  for (size_t n = 0; n < window.size(); ++n) EXPECT_NEAR(window[n], w.data_ptr<float>()[n], 1e-6) << "n " << n;
  EXPECT_EQ(logmel80::kFrameLength, kFrameLength);
  EXPECT_EQ(logmel80::kHop, kHop);
  EXPECT_EQ(logmel80::kFft, kFft);
  EXPECT_EQ(logmel80::kMels, kMels);
  for (int64_t n : {-1, 0, 1, 399, 400, 401, 559, 560, 16000, 320123}) EXPECT_EQ(logmel80::NumFrames(n), NumFrames(n));
}

// ---------------------------------------------------------------------------------------------
// GPU tests.

#if ASRF_HAVE_CUDA
// Whether this host has a usable CUDA device; why not in *why.
bool HaveCudaDevice(std::string* why) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();
    *why = std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
    return false;
  }
  if (n == 0) {
    *why = "cudaGetDeviceCount found none";
    return false;
  }
  return true;
}
#define REQUIRE_CUDA_DEVICE()                                          \
  do {                                                                 \
    std::string _why;                                                  \
    if (!HaveCudaDevice(&_why)) GTEST_SKIP() << "no CUDA device (" << _why << ")"; \
  } while (0)

// Device memory for n elements of T, freed on destruction.
template <typename T>
class DeviceArray {
 public:
  explicit DeviceArray(size_t n) : n_(n) {
    if (n_ > 0) status_ = cudaMalloc(reinterpret_cast<void**>(&ptr_), n_ * sizeof(T));
  }
  ~DeviceArray() { cudaFree(ptr_); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  T* get() const { return ptr_; }
  cudaError_t status() const { return status_; }
  cudaError_t Upload(const std::vector<T>& v) {
    if (v.size() != n_) return cudaErrorInvalidValue;
    return n_ ? cudaMemcpy(ptr_, v.data(), n_ * sizeof(T), cudaMemcpyHostToDevice) : cudaSuccess;
  }
  cudaError_t Fill(unsigned char byte) { return n_ ? cudaMemset(ptr_, byte, n_ * sizeof(T)) : cudaSuccess; }
  cudaError_t Download(std::vector<T>* v) const {
    v->resize(n_);
    return n_ ? cudaMemcpy(v->data(), ptr_, n_ * sizeof(T), cudaMemcpyDeviceToHost) : cudaSuccess;
  }

 private:
  size_t n_;
  T* ptr_ = nullptr;
  cudaError_t status_ = cudaSuccess;
};

#define ASSERT_CUDA(expr)                                                  \
  do {                                                                     \
    cudaError_t _e = (expr);                                               \
    ASSERT_EQ(_e, cudaSuccess) << #expr << ": " << cudaGetErrorString(_e); \
  } while (0)

// Test audio: noise under a random envelope, plus a weak tone. Normalisation divides by each mel
// bin's std over the utterance, so a bin that barely varies (a loud steady tone; power far below
// the 1e-6 floor) turns float rounding into large differences between any two correct
// implementations. Noise-dominated audio keeps every bin's std near 0.1 or more.
std::vector<float> MakePcm(std::mt19937& rng, int batch, int64_t max_samples) {
  constexpr double kPi = 3.14159265358979323846;
  std::vector<float> pcm(static_cast<size_t>(batch) * max_samples);
  std::uniform_real_distribution<double> noise(-1, 1), u(0, 1);
  for (int b = 0; b < batch; ++b) {
    const double env_hz = 1 + 19 * u(rng), env_phase = 2 * kPi * u(rng), depth = 0.1 + 0.5 * u(rng);
    const double tone_hz = 50 + 7900 * u(rng), tone = 0.02 * u(rng);
    for (int64_t n = 0; n < max_samples; ++n) {
      const double s = static_cast<double>(n) / kSampleRate;
      const double env = 0.02 + depth * (0.5 + 0.5 * std::sin(2 * kPi * env_hz * s + env_phase));
      pcm[b * max_samples + n] = static_cast<float>(env * noise(rng) + tone * std::sin(2 * kPi * tone_hz * s));
    }
  }
  return pcm;
}

// Runs the GPU front end and the CPU one on the same batch and compares them: per utterance with
// at least 2 frames ||gpu - cpu|| / ||cpu|| <= 1e-4; with 1 frame all zeros; rows past T exactly 0.
void CompareLogMel(LogMelWorkspace* ws, const std::vector<int64_t>& lengths, int64_t max_samples, int64_t extra_rows,
                   std::mt19937& rng, cudaStream_t stream) {
  const int batch = static_cast<int>(lengths.size());
  SCOPED_TRACE("batch " + std::to_string(batch) + ", max_samples " + std::to_string(max_samples));
  std::vector<float> pcm = MakePcm(rng, batch, max_samples);
  torch::Tensor frames;
  torch::Tensor cpu = LogMel(torch::from_blob(pcm.data(), {batch, max_samples}, torch::kFloat32),
                             torch::tensor(lengths, torch::kInt64), &frames)
                          .contiguous();
  const int64_t t_cpu = cpu.size(1);
  const float* cpu_data = cpu.data_ptr<float>();
  const int64_t t_max = t_cpu + extra_rows;

  DeviceArray<float> d_pcm(pcm.size());
  DeviceArray<float> d_out(static_cast<size_t>(batch) * t_max * kMels);
  ASSERT_CUDA(d_pcm.status());
  ASSERT_CUDA(d_out.status());
  ASSERT_CUDA(d_pcm.Upload(pcm));
  ASSERT_CUDA(d_out.Fill(0xff));  // NaN everywhere: every element must be written
  Status st = LaunchLogMel(d_pcm.get(), lengths.data(), batch, max_samples, d_out.get(), t_max, ws, stream);
  ASSERT_TRUE(st.ok()) << st.ToString();
  ASSERT_CUDA(cudaStreamSynchronize(stream));
  std::vector<float> gpu;
  ASSERT_CUDA(d_out.Download(&gpu));

  for (int b = 0; b < batch; ++b) {
    const int64_t T = frames[b].item<int64_t>();
    ASSERT_EQ(T, logmel80::NumFrames(std::min(lengths[b], max_samples)));
    double diff = 0, ref = 0, gpu_norm = 0;
    for (int64_t t = 0; t < T; ++t) {
      for (int m = 0; m < kMels; ++m) {
        const double g = gpu[(b * t_max + t) * kMels + m];
        const double c = cpu_data[(b * t_cpu + t) * kMels + m];
        diff += (g - c) * (g - c);
        ref += c * c;
        gpu_norm += g * g;
      }
    }
    if (T >= 2) {
      ASSERT_GT(ref, 0) << "utterance " << b;
      EXPECT_LE(std::sqrt(diff / ref), 1e-4) << "utterance " << b << " (" << lengths[b] << " samples, " << T
                                             << " frames)";
    } else {
      EXPECT_EQ(gpu_norm, 0.0) << "utterance " << b << " with " << T << " frames";
    }
    int64_t nonzero_padding = 0;
    for (int64_t t = T; t < t_max; ++t)
      for (int m = 0; m < kMels; ++m) nonzero_padding += gpu[(b * t_max + t) * kMels + m] != 0.0f;
    EXPECT_EQ(nonzero_padding, 0) << "utterance " << b << ": rows past its " << T << " frames";
  }
}
#else
#define REQUIRE_CUDA_DEVICE() GTEST_SKIP() << "built without CUDA"
#endif

TEST(CudaLogMel, MatchesTheCpuFrontEnd) {
  REQUIRE_CUDA_DEVICE();
#if ASRF_HAVE_CUDA
  std::mt19937 rng(3);
  LogMelWorkspace* ws = nullptr;
  Status st = CreateLogMelWorkspace(0, &ws);
  ASSERT_TRUE(st.ok()) << st.ToString();
  cudaStream_t stream = nullptr;
  ASSERT_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

  // Ragged: empty, below one frame, exactly one frame, one frame and one sample, two frames.
  CompareLogMel(ws, {0, 1, 399, 400, 401, 559, 560, 16000}, 16000, 0, rng, stream);
  CompareLogMel(ws, {400}, 400, 0, rng, stream);
  CompareLogMel(ws, {401}, 401, 3, rng, stream);  // extra zero rows
  CompareLogMel(ws, {16000 * 20 + 123}, 16000 * 20 + 123, 0, rng, stream);
  // Lengths past the row are clamped to it, as LogMel clamps to pcm.size(1).
  CompareLogMel(ws, {8000, 100000, 0}, 8000, 0, rng, stream);
  // Random batches of 1..8, long ones included; the workspace grows and is reused.
  std::uniform_int_distribution<int64_t> len(0, 16000 * 20);
  for (int round = 0; round < 6; ++round) {
    const int batch = 1 + round + (round == 5 ? 2 : 0);
    std::vector<int64_t> lengths;
    for (int b = 0; b < batch; ++b) lengths.push_back(b % 4 == 3 ? len(rng) % 600 : len(rng));
    const int64_t max_samples = *std::max_element(lengths.begin(), lengths.end()) + round * 37;
    CompareLogMel(ws, lengths, max_samples, round % 2, rng, stream);
  }
  // The default stream works too.
  CompareLogMel(ws, {16000, 32000, 12345}, 32000, 0, rng, nullptr);

  ASSERT_CUDA(cudaStreamDestroy(stream));
  st = DestroyLogMelWorkspace(ws);
  EXPECT_TRUE(st.ok()) << st.ToString();
#endif
}

// No frames anywhere: nothing to write with t_max 0, zeros with t_max > 0; bad arguments fail.
TEST(CudaLogMel, EmptyBatchesAndBadArguments) {
  REQUIRE_CUDA_DEVICE();
#if ASRF_HAVE_CUDA
  LogMelWorkspace* ws = nullptr;
  Status st = CreateLogMelWorkspace(10000, &ws);
  ASSERT_TRUE(st.ok()) << st.ToString();
  const std::vector<int64_t> short_lengths = {0, 100, 399};
  DeviceArray<float> pcm(3 * 400);
  ASSERT_CUDA(pcm.Fill(0));
  st = LaunchLogMel(pcm.get(), short_lengths.data(), 3, 400, nullptr, 0, ws, nullptr);
  EXPECT_TRUE(st.ok()) << st.ToString();
  DeviceArray<float> out(3 * 2 * kMels);
  ASSERT_CUDA(out.Fill(0xff));
  st = LaunchLogMel(pcm.get(), short_lengths.data(), 3, 400, out.get(), 2, ws, nullptr);
  EXPECT_TRUE(st.ok()) << st.ToString();
  ASSERT_CUDA(cudaDeviceSynchronize());
  std::vector<float> host;
  ASSERT_CUDA(out.Download(&host));
  for (float x : host) ASSERT_EQ(x, 0.0f);
  EXPECT_TRUE(LaunchLogMel(nullptr, nullptr, 0, 0, nullptr, 0, ws, nullptr).ok());

  const std::vector<int64_t> one_frame = {400, 400, 400};
  EXPECT_EQ(LaunchLogMel(pcm.get(), one_frame.data(), 3, 400, out.get(), 0, ws, nullptr).code(),
            Status::Code::kInvalid);  // t_max below the frames
  const std::vector<int64_t> negative = {400, -1, 400};
  EXPECT_EQ(LaunchLogMel(pcm.get(), negative.data(), 3, 400, out.get(), 2, ws, nullptr).code(), Status::Code::kInvalid);
  EXPECT_EQ(LaunchLogMel(pcm.get(), one_frame.data(), 3, 400, out.get(), 2, nullptr, nullptr).code(),
            Status::Code::kInvalid);
  EXPECT_EQ(LaunchLogMel(pcm.get(), nullptr, 3, 400, out.get(), 2, ws, nullptr).code(), Status::Code::kInvalid);
  EXPECT_EQ(LaunchLogMel(pcm.get(), one_frame.data(), 3, 400, nullptr, 2, ws, nullptr).code(),
            Status::Code::kInvalid);
  st = DestroyLogMelWorkspace(ws);
  EXPECT_TRUE(st.ok()) << st.ToString();
  EXPECT_TRUE(DestroyLogMelWorkspace(nullptr).ok());
#endif
}

TEST(CudaCtcGreedy, MatchesTheReference) {
  REQUIRE_CUDA_DEVICE();
#if ASRF_HAVE_CUDA
  std::mt19937 rng(17);
  cudaStream_t stream = nullptr;
  ASSERT_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  struct Shape {
    int batch;
    int64_t frames, vocab;
    double repeat;
  };
  // Frame counts around the kernel's 32-frame chunks, runs that cross them, V around a warp.
  const std::vector<Shape> shapes = {
      {1, 0, 5, 0.5},    {3, 1, 5, 0.5},     {2, 1, 1, 0.5},    {4, 7, 1, 0.5},     {8, 31, 5, 0.5},
      {8, 32, 5, 0.9},   {8, 33, 5, 0.9},    {5, 64, 2, 0.95},  {5, 65, 3, 0.5},    {4, 100, 29, 0.6},
      {2, 97, 31, 0.5},  {2, 97, 32, 0.5},   {2, 97, 33, 0.5},  {3, 250, 300, 0.7}, {8, 1000, 29, 0.8},
      {1, 2000, 29, 0.99}, {6, 129, 1000, 0.3},
  };
  for (const Shape& s : shapes) {
    SCOPED_TRACE("batch " + std::to_string(s.batch) + ", frames " + std::to_string(s.frames) + ", vocab " +
                 std::to_string(s.vocab));
    RandomCtc r = MakeRandomCtc(rng, s.batch, s.frames, s.vocab, s.repeat);
    Greedy want = RunReference(r.lp, r.out_lengths, s.frames, s.vocab);
    const size_t n = static_cast<size_t>(s.batch) * s.frames;
    DeviceArray<float> lp(r.lp.size()), probs(n);
    DeviceArray<int64_t> lengths(s.batch);
    DeviceArray<int32_t> tokens(n), starts(n), ends(n), counts(s.batch);
    ASSERT_CUDA(lp.Upload(r.lp));
    ASSERT_CUDA(lengths.Upload(r.out_lengths));
    for (auto* a : {&tokens, &starts, &ends, &counts}) ASSERT_CUDA(a->Fill(0x55));
    ASSERT_CUDA(probs.Fill(0x55));
    Status st = LaunchCtcGreedy(lp.get(), lengths.get(), s.batch, s.frames, s.vocab, tokens.get(), starts.get(),
                                ends.get(), probs.get(), counts.get(), stream);
    ASSERT_TRUE(st.ok()) << st.ToString();
    ASSERT_CUDA(cudaStreamSynchronize(stream));
    Greedy got;
    ASSERT_CUDA(tokens.Download(&got.tokens));
    ASSERT_CUDA(starts.Download(&got.starts));
    ASSERT_CUDA(ends.Download(&got.ends));
    ASSERT_CUDA(counts.Download(&got.counts));
    ASSERT_CUDA(probs.Download(&got.probs));
    EXPECT_EQ(got.counts, want.counts);
    EXPECT_EQ(got.tokens, want.tokens);
    EXPECT_EQ(got.starts, want.starts);
    EXPECT_EQ(got.ends, want.ends);
    ASSERT_EQ(got.probs.size(), want.probs.size());
    for (size_t i = 0; i < n; ++i) ASSERT_NEAR(got.probs[i], want.probs[i], 1e-5) << "entry " << i;
  }
  int32_t count = 0;
  EXPECT_EQ(LaunchCtcGreedy(nullptr, nullptr, 1, 1, 0, nullptr, nullptr, nullptr, nullptr, &count, stream).code(),
            Status::Code::kInvalid);
  EXPECT_TRUE(LaunchCtcGreedy(nullptr, nullptr, 0, 5, 5, nullptr, nullptr, nullptr, nullptr, nullptr, stream).ok());
  ASSERT_CUDA(cudaStreamDestroy(stream));
#endif
}

}  // namespace
}  // namespace asrf::testing
