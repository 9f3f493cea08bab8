// Inference behind worker/acoustic_model.h: the project's CTC model or a TorchScript CTC model,
// the front end of schema/features.md, and CTC greedy decoding with word timestamps.
#include "worker/acoustic_model.h"

#include <torch/script.h>
#include <torch/torch.h>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <type_traits>
#include <utility>

#include "common/log.h"
#include "worker/ctc_beam.h"
#include "worker/ctc_model.h"
#include "worker/device.h"
#include "worker/features.h"

#if ASRF_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "cuda/ctc_greedy.cuh"
#include "cuda/device_info.h"
#include "cuda/frontend_stager.h"
#endif

namespace asrf {
namespace {

namespace fs = std::filesystem;

constexpr double kFrameSeconds = static_cast<double>(kHop) / kSampleRate;  // one feature frame: 10 ms

// The one wrapper for libtorch's exceptions in this file: runs fn, turning what it throws into
// make(context + ": " + message).
template <typename Fn>
Status CatchTorch(Status (*make)(std::string), const std::string& context, Fn&& fn) {
  try {
    return fn();
  } catch (const c10::Error& e) {
    return make(context + ": " + e.what_without_backtrace());
  } catch (const std::exception& e) {
    return make(context + ": " + e.what());
  }
}

// What each output id of a model means. Id 0 is the blank; ids past the end emit nothing.
struct TokenTable {
  std::vector<std::string> text;
  std::vector<bool> separator;  // the word separator: decodes to a space
  size_t size() const { return text.size(); }
};

TokenTable TokensOf(const Vocabulary& vocab) {
  TokenTable t;
  t.text.push_back("");
  t.separator.push_back(false);
  for (char c : vocab.chars) {
    bool space = std::isspace(static_cast<unsigned char>(c)) != 0;
    t.text.push_back(space ? " " : std::string(1, c));
    t.separator.push_back(space);
  }
  return t;
}

// A vocabulary file: one token per line, line 1 the blank; " ", "|" or "<space>" is the separator.
Status ReadVocabulary(const std::string& path, TokenTable* out) {
  std::error_code ec;
  if (!fs::exists(path, ec)) return Status::NotFound("vocabulary " + path + " does not exist");
  std::ifstream in(path);
  if (!in) return Status::IOError("vocabulary " + path + " cannot be read");
  TokenTable t;
  std::string line;
  while (std::getline(in, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    bool sep = line == " " || line == "|" || line == "<space>";
    t.text.push_back(sep ? " " : line);
    t.separator.push_back(sep);
  }
  while (!t.text.empty() && t.text.back().empty()) {  // trailing empty lines are not tokens
    t.text.pop_back();
    t.separator.pop_back();
  }
  if (t.size() < 2) return Status::Invalid("vocabulary " + path + " needs a blank and at least one token");
  t.text[0].clear();  // the blank emits nothing, whatever its line says
  t.separator[0] = false;
  *out = std::move(t);
  return Status::Ok();
}

using Emission = AlignedToken;

// Greedy CTC over one utterance's n output frames (best id and its probability per frame):
// repeats collapsed, blanks dropped; the emissions as GreedyDecode makes them.
std::vector<Emission> GreedyEmissions(const int64_t* best, const float* prob, int64_t n) {
  std::vector<Emission> em;
  int64_t prev = -1;
  for (int64_t t = 0; t < n; ++t) {
    int64_t id = best[t];
    if (id == prev) {
      if (id != 0 && !em.empty()) {
        em.back().last = t;
        em.back().prob = std::max(em.back().prob, prob[t]);
      }
    } else if (id != 0) {
      em.push_back({id, t, t, prob[t]});
    }
    prev = id;
  }
  return em;
}

// The text and timed words of one utterance's emissions. `stride` is feature frames per output
// frame; `duration` bounds the times.
Hypothesis MakeHypothesis(const std::vector<Emission>& em, double stride, double duration, const TokenTable& tokens) {
  auto emits = [&](int64_t id) { return id > 0 && id < static_cast<int64_t>(tokens.size()); };
  Hypothesis h;
  std::string raw;
  for (const Emission& e : em)
    if (emits(e.id)) raw += tokens.text[e.id];
  h.text = NormalizeText(raw);

  auto time = [&](int64_t frame) { return std::min(frame * stride * kFrameSeconds, duration); };
  std::vector<const Emission*> word;
  auto flush = [&] {
    std::string w;
    double conf = 0;
    for (const Emission* e : word) {
      w += tokens.text[e->id];
      conf += e->prob;
    }
    w = NormalizeText(w);
    if (!w.empty()) {
      h.words.push_back({w, time(word.front()->first), time(word.back()->last + 1),
                         conf / static_cast<double>(word.size())});
    }
    word.clear();
  };
  for (const Emission& e : em) {
    if (!emits(e.id)) continue;
    if (tokens.separator[e.id]) {
      flush();
    } else {
      word.push_back(&e);
    }
  }
  flush();
  return h;
}

// One device micro-batch on its way through Transcribe's pipeline: staged (PCM -> features),
// launched (the network and, on a GPU without a language model, the greedy decoding enqueued),
// fetched (what the host decodes, copied back) and decoded.
struct MicroBatch {
  std::vector<size_t> index;     // into the call's utterances, longest first
  std::vector<int64_t> lengths;  // samples per utterance
  int slot = -1;                 // the GPU stager's slot holding the features; -1: `features`
  int64_t t_max = 0;             // feature rows per utterance
  torch::Tensor features;        // [B, t_max, 80] on the model's device (unless slot >= 0)
  torch::Tensor frames;          // [B] int64 feature frames, host
  // Launched: on the device. Fetched: on the host.
  torch::Tensor out_frames, best, prob, log_probs;
  torch::Tensor tokens, starts, ends, probs, counts;  // greedy decoding on the GPU
};

// The per-call work shared by both kinds of model; subclasses only run the network.
class CtcAcousticModel : public AcousticModel {
 public:
  CtcAcousticModel(std::string name, torch::Device device, const AcousticModelOptions& options, TokenTable tokens)
      : name_(std::move(name)),
        device_(device),
        options_(options),
        tokens_(std::move(tokens)),
        batch_frames_(options.max_batch_frames) {}

  Status Transcribe(const std::vector<std::span<const int16_t>>& utterances, std::vector<Hypothesis>* out) override;
  const std::string& name() const override { return name_; }
  std::string device() const override { return device_.str(); }

 protected:
  // features [B, T, 80] and frames [B] (int64), both on the model's device, -> log_probs
  // [B, T', V] and out_frames [B]. Called under NoGradGuard and InferenceMode.
  virtual std::pair<torch::Tensor, torch::Tensor> Forward(const torch::Tensor& features,
                                                          const torch::Tensor& frames) = 0;

  const std::string name_;
  const torch::Device device_;
  const AcousticModelOptions options_;
  const TokenTable tokens_;
  // The language model of the beam search (none: greedy) and each class's symbol in it.
  std::shared_ptr<const CharLm> lm_;
  std::vector<int> class_symbol_;
  // Padded feature frames per micro-batch: options_.max_batch_frames, capped by the device's free
  // memory (full_frames_), halved after the device runs out of memory and doubled again, up to
  // full_frames_, after kGrowAfter calls in a row that did not (a passing shortage, such as a
  // training's peak on the same GPU, must not shrink the batches for the rest of the process).
  int64_t batch_frames_;
  int64_t full_frames_ = 0;
  int calls_since_shrink_ = 0;
  static constexpr int kGrowAfter = 32;
#if ASRF_HAVE_CUDA
  std::unique_ptr<FrontEndStager> stager_;  // cuda:N: the front end on the GPU
#endif

 public:
  // Maps each single-character token (lowercased) to its symbol in `lm`. Invalid when no letter
  // of the vocabulary is in the language model's alphabet (then it is for another vocabulary).
  Status SetLanguageModel(std::shared_ptr<const CharLm> lm) {
    lm_ = std::move(lm);
    class_symbol_.assign(tokens_.size(), 0);
    size_t chars = 0, known = 0;
    for (size_t k = 1; k < tokens_.size(); ++k) {
      if (tokens_.text[k].size() != 1) continue;
      ++chars;
      class_symbol_[k] = lm_->Symbol(static_cast<char>(std::tolower(static_cast<unsigned char>(tokens_.text[k][0]))));
      known += class_symbol_[k] != 0;
    }
    if (chars > 0 && known * 2 < chars) {
      return Status::Invalid("the language model's alphabet \"" + lm_->alphabet() + "\" covers only " +
                             std::to_string(known) + " of the model's " + std::to_string(chars) + " characters");
    }
    return Status::Ok();
  }

  // On cuda:N: the front end and greedy decoding move to the GPU (when built with CUDA), and the
  // micro-batch is capped so that its activations fit in half the device's free memory.
  Status PrepareDevice() {
    if (!device_.is_cuda()) return Status::Ok();
#if ASRF_HAVE_CUDA
    const int index = device_.index();
    ASRF_RETURN_IF_ERROR(FrontEndStager::Create(index, &stager_).WithContext("GPU front end on " + device()));
    CudaDeviceInfo info;
    if (ProbeCudaDevice(index, &info).ok() && info.free_bytes > 0) {
      const int64_t fit = std::max<int64_t>(1, info.free_bytes / 2 / kDeviceBytesPerFrame);
      if (fit < batch_frames_) {
        LogInfo("transcribe_batch_capped").Kv("device", device()).Kv("free_bytes", info.free_bytes)
            .Kv("max_batch_frames", fit);
        batch_frames_ = fit;
      }
    }
    full_frames_ = batch_frames_;
#endif
    return Status::Ok();
  }

 private:
  // A generous bound on the device memory one padded feature frame costs in the network (input,
  // convolutions, the GRU's layers and workspace, the outputs): 16 KiB.
  static constexpr int64_t kDeviceBytesPerFrame = 16 << 10;

  // Micro-batches of `order` (indices sorted longest first) of at most batch_frames_ padded frames.
  std::vector<std::vector<size_t>> Plan(const std::vector<std::span<const int16_t>>& utterances,
                                        const std::vector<size_t>& order) const;
  // Runs the micro-batches, staging each next one while the device works on the current one, and
  // fills (*out)[i] for every utterance they hold.
  Status Pipeline(const std::vector<std::span<const int16_t>>& utterances,
                  const std::vector<std::vector<size_t>>& batches, std::vector<Hypothesis>* out);
  Status Stage(const std::vector<std::span<const int16_t>>& utterances, std::vector<size_t> index, int slot,
               MicroBatch* m);
  Status Launch(MicroBatch* m);
  void Fetch(MicroBatch* m);
  void Decode(const MicroBatch& m, std::vector<Hypothesis>* out) const;
  bool DecodesOnDevice() const {
#if ASRF_HAVE_CUDA
    return stager_ != nullptr && !lm_;
#else
    return false;
#endif
  }
};

std::vector<std::vector<size_t>> CtcAcousticModel::Plan(const std::vector<std::span<const int16_t>>& utterances,
                                                       const std::vector<size_t>& order) const {
  std::vector<std::vector<size_t>> batches;
  for (size_t i = 0; i < order.size();) {
    // Longest first, so the padded size of a micro-batch is its size times its first length.
    const int64_t longest = NumFrames(static_cast<int64_t>(utterances[order[i]].size()));
    size_t j = i + 1;
    while (j < order.size() && static_cast<int64_t>(j - i + 1) * longest <= batch_frames_) ++j;
    batches.emplace_back(order.begin() + static_cast<std::ptrdiff_t>(i), order.begin() + static_cast<std::ptrdiff_t>(j));
    i = j;
  }
  return batches;
}

Status CtcAcousticModel::Transcribe(const std::vector<std::span<const int16_t>>& utterances,
                                    std::vector<Hypothesis>* out) {
  std::vector<Hypothesis> result(utterances.size());
  // Utterances shorter than one frame, and segments without speech (NoSpeech), give empty
  // hypotheses without reaching the model.
  std::vector<size_t> order;
  for (size_t i = 0; i < utterances.size(); ++i)
    if (NumFrames(static_cast<int64_t>(utterances[i].size())) > 0 && !NoSpeech(utterances[i])) order.push_back(i);
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return utterances[a].size() > utterances[b].size(); });
  Status st = CatchTorch(&Status::IOError, "transcription on " + device(), [&] {
    torch::NoGradGuard no_grad;
    for (;;) {
      const std::vector<std::vector<size_t>> batches = Plan(utterances, order);
      std::string oom;  // set when the device ran out of memory
      try {
        Status ps = Pipeline(utterances, batches, &result);
        // The GPU stager's own buffers: Unavailable when device or pinned memory is short.
        if (ps.ok() || !device_.is_cuda() || ps.code() != Status::Code::kUnavailable) return ps;
        oom = ps.message();
      } catch (const c10::OutOfMemoryError& e) {
        oom = e.what_without_backtrace();
        oom = oom.substr(0, oom.find('\n'));
      }
      // Results do not depend on the batching: run everything again in smaller micro-batches.
      const bool single = std::all_of(batches.begin(), batches.end(), [](const auto& b) { return b.size() == 1; });
      if (single) return Status::Unavailable("out of memory on " + device() + " with one utterance per batch: " + oom);
      batch_frames_ = std::max<int64_t>(1, batch_frames_ / 2);
      calls_since_shrink_ = -1;  // this call does not count
      LogWarn("transcribe_batch_shrunk").Kv("device", device()).Kv("max_batch_frames", batch_frames_).Kv("error", oom);
    }
  });
  if (batch_frames_ < full_frames_ && ++calls_since_shrink_ >= kGrowAfter) {
    batch_frames_ = std::min(full_frames_, batch_frames_ * 2);
    calls_since_shrink_ = 0;
    LogInfo("transcribe_batch_grown").Kv("device", device()).Kv("max_batch_frames", batch_frames_);
  }
  if (!st.ok()) return st;
  *out = std::move(result);
  return Status::Ok();
}

Status CtcAcousticModel::Pipeline(const std::vector<std::span<const int16_t>>& utterances,
                                  const std::vector<std::vector<size_t>>& batches, std::vector<Hypothesis>* out) {
  if (batches.empty()) return Status::Ok();
  // Batch k uses slot k % 2. Staging batch k + 1 reuses the slot of batch k - 1, whose results
  // were fetched (so the device is done with its features) before batch k was launched.
  MicroBatch cur;
  ASRF_RETURN_IF_ERROR(Stage(utterances, batches[0], 0, &cur));
  ASRF_RETURN_IF_ERROR(Launch(&cur));
  for (size_t k = 0; k < batches.size(); ++k) {
    MicroBatch next;
    const bool more = k + 1 < batches.size();
    if (more) ASRF_RETURN_IF_ERROR(Stage(utterances, batches[k + 1], static_cast<int>((k + 1) % 2), &next));
    Fetch(&cur);
    if (more) ASRF_RETURN_IF_ERROR(Launch(&next));  // the device runs it while the host decodes
    Decode(cur, out);
    cur = std::move(next);
  }
  return Status::Ok();
}

Status CtcAcousticModel::Stage(const std::vector<std::span<const int16_t>>& utterances, std::vector<size_t> index,
                               int slot, MicroBatch* m) {
  const int64_t B = static_cast<int64_t>(index.size());
  const int64_t samples = static_cast<int64_t>(utterances[index.front()].size());
  m->index = std::move(index);
  m->lengths.resize(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) m->lengths[b] = static_cast<int64_t>(utterances[m->index[b]].size());
  m->t_max = NumFrames(samples);
#if ASRF_HAVE_CUDA
  if (stager_) {
    std::vector<std::span<const int16_t>> pcm;
    std::vector<int64_t> frames;
    for (size_t i : m->index) {
      pcm.push_back(utterances[i]);
      frames.push_back(NumFrames(static_cast<int64_t>(utterances[i].size())));
    }
    ASRF_RETURN_IF_ERROR(stager_->Stage(slot, pcm, samples, m->t_max).WithContext("GPU front end on " + device()));
    m->slot = slot;
    m->frames = torch::tensor(frames, torch::kInt64);
    return Status::Ok();
  }
#endif
  (void)slot;
  torch::Tensor pcm = torch::zeros({B, samples}, torch::kFloat32);
  float* p = pcm.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    std::span<const int16_t> u = utterances[m->index[b]];
    for (size_t k = 0; k < u.size(); ++k) p[b * samples + static_cast<int64_t>(k)] = u[k] / 32768.0f;
  }
  // The front end outside InferenceMode: LogMel keeps static tensors that training uses too.
  m->features = LogMel(pcm.to(device_), torch::tensor(m->lengths, torch::kInt64), &m->frames);
  m->frames = m->frames.to(torch::kCPU);
  return Status::Ok();
}

Status CtcAcousticModel::Launch(MicroBatch* m) {
  const int64_t B = static_cast<int64_t>(m->index.size());
  torch::Tensor features = m->features;
#if ASRF_HAVE_CUDA
  if (m->slot >= 0) {
    float* f = nullptr;
    ASRF_RETURN_IF_ERROR(stager_->Release(m->slot, &f).WithContext("GPU front end on " + device()));
    features = torch::from_blob(f, {B, m->t_max, kMels}, torch::TensorOptions().dtype(torch::kFloat32).device(device_));
  }
#endif
  c10::InferenceMode inference;
  auto [lp_raw, of] = Forward(features, m->frames.to(device_));
  torch::Tensor lp = lp_raw.to(torch::kFloat32);
  TORCH_CHECK(lp.dim() == 3 && lp.size(0) == B && of.numel() == B, "the model returned log_probs for ",
              lp.dim() == 3 ? lp.size(0) : -1, " utterances and ", of.numel(), " output lengths for a batch of ", B);
  m->out_frames = of;
  if (lm_) {
    // Normalised here in case a TorchScript model returns logits.
    m->log_probs = torch::log_softmax(lp, -1);
    m->best = m->log_probs.argmax(-1);
    return Status::Ok();
  }
#if ASRF_HAVE_CUDA
  if (DecodesOnDevice()) {
    // Only the tokens and their frames cross to the host. Enqueued on stream 0, after the network.
    lp = lp.contiguous();
    torch::Tensor lengths = of.to(device_, torch::kInt64).contiguous();
    const int64_t T = lp.size(1), V = lp.size(2);
    auto i32 = torch::TensorOptions().dtype(torch::kInt32).device(device_);
    m->tokens = torch::empty({B, T}, i32);
    m->starts = torch::empty({B, T}, i32);
    m->ends = torch::empty({B, T}, i32);
    m->counts = torch::empty({B}, i32);
    m->probs = torch::empty({B, T}, torch::TensorOptions().dtype(torch::kFloat32).device(device_));
    m->out_frames = lengths;
    const cudaError_t e = cudaSetDevice(device_.index());
    Status st = e == cudaSuccess ? Status::Ok() : Status::IOError(std::string("cudaSetDevice: ") + cudaGetErrorString(e));
    if (st.ok()) {
      st = LaunchCtcGreedy(lp.data_ptr<float>(), lengths.data_ptr<int64_t>(), static_cast<int>(B), T, V,
                           m->tokens.data_ptr<int32_t>(), m->starts.data_ptr<int32_t>(), m->ends.data_ptr<int32_t>(),
                           m->probs.data_ptr<float>(), m->counts.data_ptr<int32_t>(), /*stream=*/0);
    }
    return st.WithContext("greedy decoding on " + device());
  }
#endif
  m->best = lp.argmax(-1);  // as GreedyDecode picks it
  // The frame's probability, normalised here in case a TorchScript model returns logits.
  m->prob = (lp.gather(-1, m->best.unsqueeze(-1)).squeeze(-1) - lp.logsumexp(-1)).exp();
  return Status::Ok();
}

void CtcAcousticModel::Fetch(MicroBatch* m) {
  c10::InferenceMode inference;
  auto host = [](const torch::Tensor& t) { return t.defined() ? t.to(torch::kCPU).contiguous() : t; };
  m->out_frames = host(m->out_frames).to(torch::kInt64);
  m->best = host(m->best);
  if (m->best.defined()) m->best = m->best.to(torch::kInt64);
  m->prob = host(m->prob);
  m->log_probs = host(m->log_probs);
  m->tokens = host(m->tokens);
  m->starts = host(m->starts);
  m->ends = host(m->ends);
  m->probs = host(m->probs);
  m->counts = host(m->counts);
}

void CtcAcousticModel::Decode(const MicroBatch& m, std::vector<Hypothesis>* out) const {
  const int64_t B = static_cast<int64_t>(m.index.size());
  const int64_t T = m.tokens.defined() ? m.tokens.size(1) : m.best.size(1);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t in = m.frames[b].item<int64_t>();
    const int64_t n = std::min(m.out_frames[b].item<int64_t>(), T);
    if (n <= 0) continue;
    const double stride = static_cast<double>(in) / static_cast<double>(n);
    const double duration = static_cast<double>(m.lengths[b]) / kSampleRate;
    std::vector<Emission> em;
    if (m.tokens.defined()) {  // decoded on the device
      const int32_t count = m.counts[b].item<int32_t>();
      const int32_t* tok = m.tokens[b].data_ptr<int32_t>();
      const int32_t* first = m.starts[b].data_ptr<int32_t>();
      const int32_t* last = m.ends[b].data_ptr<int32_t>();
      const float* prob = m.probs[b].data_ptr<float>();
      for (int32_t i = 0; i < count; ++i) em.push_back({tok[i], first[i], last[i], prob[i]});
    } else if (lm_) {
      const int64_t V = m.log_probs.size(2);
      const float* lp = m.log_probs[b].data_ptr<float>();
      std::vector<int64_t> ids = CtcBeamSearch(lp, n, V, class_symbol_, lm_.get(), options_.beam);
      em = CtcAlign(lp, n, V, ids);
      if (em.empty() && !ids.empty()) {  // no alignment within float range: the greedy path
        std::vector<float> p(static_cast<size_t>(n));
        const int64_t* ids_best = m.best[b].data_ptr<int64_t>();
        for (int64_t t = 0; t < n; ++t) p[static_cast<size_t>(t)] = std::exp(lp[t * V + ids_best[t]]);
        em = GreedyEmissions(ids_best, p.data(), n);
      }
    } else {
      em = GreedyEmissions(m.best[b].data_ptr<int64_t>(), m.prob[b].data_ptr<float>(), n);
    }
    (*out)[m.index[b]] = MakeHypothesis(em, stride, duration, tokens_);
  }
}

// The project's model (CtcModelImpl, conv-s2-relu-bigru-ctc-v1 or -res-ctc-v2), run so that no
// padded frame reaches a valid one. CtcModelImpl::forward zeroes the GRU's padded inputs, but that
// is not enough for inference: conv2 still reads conv1's outputs on the first padded frames (which
// see the utterance's last frames, so are not zero), and the backward GRU runs through the
// padding before it reaches the last valid frame. Both changed words of the fixture model between
// a batch and the same utterance alone. Here conv1's padded outputs are zeroed (what conv2's own
// zero padding gives an utterance alone) and the GRU runs on a packed sequence, so each utterance
// gets what CtcModelImpl::forward gives it alone (tests/infer_test.cc checks the text against it).
// Residual blocks, where the model has them, run packed too.
class NativeModel : public CtcAcousticModel {
 public:
  NativeModel(std::string name, torch::Device device, const AcousticModelOptions& options, CtcModel model)
      : CtcAcousticModel(std::move(name), device, options, TokensOf(model->config().vocab)),
        model_(std::move(model)) {}

  // Finds the layers by their registered names; Invalid if the model is not built as expected.
  Status Bind() {
    auto children = model_->named_children();
    auto get = [&](const char* key, auto* out) {
      using Impl = typename std::remove_pointer_t<decltype(out)>::element_type;
      const auto* m = children.find(key);
      *out = m ? std::dynamic_pointer_cast<Impl>(*m) : nullptr;
      return *out != nullptr;
    };
    if (!get("conv1", &conv1_) || !get("conv2", &conv2_) || !get("norm", &norm_) || !get("gru", &gru_) ||
        !get("drop", &drop_) || !get("out", &out_)) {
      return Status::Invalid("the model does not have the layers of conv-s2-relu-bigru-ctc-v1/-res-ctc-v2");
    }
    return Status::Ok();
  }

 protected:
  std::pair<torch::Tensor, torch::Tensor> Forward(const torch::Tensor& features,
                                                  const torch::Tensor& frames) override {
    torch::Tensor x = torch::relu(conv1_->forward(features.transpose(1, 2).contiguous()));  // [B, C, T']
    torch::Tensor out_frames =
        CtcModelImpl::OutputFrames(frames.to(torch::kCPU)).clamp_max(x.size(2)).clamp_min(1);
    torch::Tensor valid = (torch::arange(x.size(2), out_frames.options()).unsqueeze(0) < out_frames.unsqueeze(1))
                              .to(x.device())
                              .to(x.dtype())
                              .unsqueeze(1);  // [B, 1, T']
    x = torch::relu(conv2_->forward(x * valid));
    x = norm_->forward(x.transpose(1, 2).contiguous());  // [B, T', C]
    auto packed = torch::nn::utils::rnn::pack_padded_sequence(x, out_frames, /*batch_first=*/true,
                                                              /*enforce_sorted=*/false);
    auto y = torch::nn::utils::rnn::pad_packed_sequence(std::get<0>(gru_->forward_with_packed_input(packed)),
                                                        /*batch_first=*/true, 0.0, x.size(1));
    torch::Tensor top = model_->Residual(std::get<0>(y), out_frames, /*packed=*/true);
    torch::Tensor logits = out_->forward(drop_->forward(top));
    return {torch::log_softmax(logits, -1), out_frames};
  }

 private:
  CtcModel model_;  // owns the layers below
  std::shared_ptr<torch::nn::Conv1dImpl> conv1_, conv2_;
  std::shared_ptr<torch::nn::LayerNormImpl> norm_;
  std::shared_ptr<torch::nn::GRUImpl> gru_;
  std::shared_ptr<torch::nn::DropoutImpl> drop_;
  std::shared_ptr<torch::nn::LinearImpl> out_;
};

class ScriptModel : public CtcAcousticModel {
 public:
  ScriptModel(std::string name, torch::Device device, const AcousticModelOptions& options, TokenTable tokens,
              torch::jit::Module module)
      : CtcAcousticModel(std::move(name), device, options, std::move(tokens)), module_(std::move(module)) {}

  // Runs the module once on silence: its output must be (log_probs [1, T', V], out_lengths [1])
  // with V the vocabulary's size.
  Status Probe() {
    return CatchTorch(&Status::Invalid, "TorchScript model " + name_ + " on " + device(), [&] {
      torch::NoGradGuard no_grad;
      c10::InferenceMode inference;
      const int64_t frames = 200;
      auto [lp, lens] = Forward(torch::zeros({1, frames, kMels}, torch::TensorOptions().device(device_)),
                                torch::full({1}, frames, torch::TensorOptions().dtype(torch::kInt64).device(device_)));
      if (lp.dim() != 3 || lp.size(0) != 1 || lens.numel() != 1) {
        return Status::Invalid("forward(features [1, 200, 80], lengths [1]) returned log_probs of shape " +
                               c10::str(lp.sizes()) + " and " + std::to_string(lens.numel()) +
                               " output lengths; expected [1, T', V] and 1");
      }
      if (lp.size(2) != static_cast<int64_t>(tokens_.size())) {
        return Status::Invalid("the model emits " + std::to_string(lp.size(2)) + " classes but the vocabulary " +
                               options_.vocabulary + " has " + std::to_string(tokens_.size()) + " tokens");
      }
      return Status::Ok();
    });
  }

 protected:
  std::pair<torch::Tensor, torch::Tensor> Forward(const torch::Tensor& features,
                                                  const torch::Tensor& frames) override {
    c10::IValue r = module_.forward({features, frames});
    TORCH_CHECK(r.isTuple() && r.toTupleRef().elements().size() >= 2,
                "forward must return a tuple (log_probs, out_lengths)");
    const auto& e = r.toTupleRef().elements();
    TORCH_CHECK(e[0].isTensor() && e[1].isTensor(), "forward must return two tensors (log_probs, out_lengths)");
    return {e[0].toTensor(), e[1].toTensor()};
  }

 private:
  torch::jit::Module module_;
};

}  // namespace

// The front end normalises every utterance to unit variance, so a segment of faint hiss reached
// the model as loud as speech, and the model, which never heard noise alone, wrote words for it.
bool NoSpeech(std::span<const int16_t> pcm) {
  constexpr int64_t kFrame = 160, kWindow = 10;  // 10 ms frames, 100 ms windows
  constexpr double kQuietLevel = 327.68 * 327.68;  // -40 dBFS as a mean square, full scale 32768
  constexpr double kSteady = 3.98;                  // 6 dB as a ratio of mean squares
  const int64_t frames = static_cast<int64_t>(pcm.size()) / kFrame;
  if (frames < kWindow) return false;  // too short to tell: the model decides
  std::vector<double> energy(static_cast<size_t>(frames));
  for (int64_t f = 0; f < frames; ++f) {
    double sum = 0, sq = 0;
    for (int64_t i = f * kFrame; i < (f + 1) * kFrame; ++i) {
      sum += pcm[static_cast<size_t>(i)];
      sq += static_cast<double>(pcm[static_cast<size_t>(i)]) * pcm[static_cast<size_t>(i)];
    }
    const double mean = sum / kFrame;
    energy[static_cast<size_t>(f)] = std::max(0.0, sq / kFrame - mean * mean);
  }
  // The quietest stretch is measured over its frames of sound only: frames of digital silence
  // (under 2 LSB RMS, -84 dBFS: zeros, dither) are left out, and a stretch needs 4 frames of
  // sound to count. Faint hiss beside digital silence (a recorder that pads with zeros) was "more
  // than 6 dB above the quietest" and went to the model, which wrote words for it; a word's rise
  // and fall beside the silence of a noise gate still is. All digital silence holds no speech.
  constexpr double kDigitalSilence = 4.0;
  constexpr int64_t kMinSound = 4;
  double window = 0, sound = 0, loudest = 0, quietest = 0;  // sums over the window: all frames, frames of sound
  int64_t sound_frames = 0;  // in the window
  bool any_quietest = false;
  for (int64_t f = 0; f < frames; ++f) {
    const double e = energy[static_cast<size_t>(f)];
    window += e;
    if (e >= kDigitalSilence) {
      sound += e;
      ++sound_frames;
    }
    if (f >= kWindow) {
      const double gone = energy[static_cast<size_t>(f - kWindow)];
      window -= gone;
      if (gone >= kDigitalSilence) {
        sound -= gone;
        --sound_frames;
      }
    }
    if (f + 1 < kWindow) continue;
    loudest = f + 1 == kWindow ? window / kWindow : std::max(loudest, window / kWindow);
    if (sound_frames < kMinSound) continue;
    const double w = sound / static_cast<double>(sound_frames);
    quietest = any_quietest ? std::min(quietest, w) : w;
    any_quietest = true;
  }
  if (!any_quietest) return loudest < kQuietLevel;  // digital silence, or sound under 40 ms at a time
  return loudest < kQuietLevel && loudest <= kSteady * quietest;
}

Status LoadAcousticModel(const std::string& path, const std::string& name, const AcousticModelOptions& options,
                         std::unique_ptr<AcousticModel>* out) {
  std::error_code ec;
  if (!fs::exists(path, ec)) return Status::NotFound("model " + path + " does not exist");
  if (fs::is_directory(path, ec)) return Status::Invalid("model " + path + " is a directory");
  torch::Device device(torch::kCPU);
  ASRF_RETURN_IF_ERROR(ParseDevice(options.device, &device));
  AcousticModelOptions opts = options;
  opts.device = device.str();
  opts.max_batch_frames = std::max<int64_t>(opts.max_batch_frames, 1);  // one utterance per batch at least
  if (opts.threads > 0) at::set_num_threads(opts.threads);
  const std::string model_name = name.empty() ? fs::path(path).stem().string() : name;
  std::shared_ptr<CharLm> lm;
  if (!opts.lm.empty()) {
    lm = std::make_shared<CharLm>();
    ASRF_RETURN_IF_ERROR(CharLm::Load(opts.lm, lm.get()));
  }

  // The project's format first: config + weights.
  CtcModel native(nullptr);
  Status native_st = LoadModel(path, &native);
  if (native_st.ok()) {
    return CatchTorch(&Status::IOError, "cannot place model " + path + " on " + opts.device, [&] {
      native->to(device);
      native->eval();
      auto model = std::make_unique<NativeModel>(model_name, device, opts, native);
      ASRF_RETURN_IF_ERROR(model->Bind().WithContext("model " + path));
      ASRF_RETURN_IF_ERROR(model->PrepareDevice());
      if (lm) ASRF_RETURN_IF_ERROR(model->SetLanguageModel(lm).WithContext("language model " + opts.lm));
      *out = std::move(model);
      return Status::Ok();
    });
  }

  // Then TorchScript.
  torch::jit::Module module;
  Status script_st = CatchTorch(&Status::Invalid, "not a TorchScript module", [&] {
    module = torch::jit::load(path, device);
    if (!module.find_method("forward")) return Status::Invalid("a TorchScript module without a forward method");
    return Status::Ok();
  });
  if (!script_st.ok()) {
    return Status::Invalid("model " + path + " is neither a project model (" + native_st.message() +
                           ") nor a TorchScript CTC model (" + script_st.message() + ")");
  }
  if (opts.vocabulary.empty()) {
    return Status::Invalid("model " + path + " is a TorchScript module; it needs a vocabulary file");
  }
  TokenTable tokens;
  ASRF_RETURN_IF_ERROR(ReadVocabulary(opts.vocabulary, &tokens));
  module.eval();
  auto model = std::make_unique<ScriptModel>(model_name, device, opts, std::move(tokens), std::move(module));
  ASRF_RETURN_IF_ERROR(model->Probe().WithContext("model " + path));
  ASRF_RETURN_IF_ERROR(model->PrepareDevice());
  if (lm) ASRF_RETURN_IF_ERROR(model->SetLanguageModel(lm).WithContext("language model " + opts.lm));
  *out = std::move(model);
  return Status::Ok();
}

}  // namespace asrf
