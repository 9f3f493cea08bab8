#include "worker/ctc_model.h"

#include <cctype>
#include <cmath>
#include <functional>
#include <sstream>

#include <nlohmann/json.hpp>

#include "common/durable_file.h"

namespace asrf {

Status Vocabulary::Encode(const std::string& text, std::vector<int64_t>* ids) const {
  ids->clear();
  for (char ch : text) {
    char c = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    size_t p = chars.find(c);
    if (p == std::string::npos) {
      return Status::Invalid(std::string("character '") + ch + "' is not in the vocabulary \"" + chars + "\"");
    }
    ids->push_back(static_cast<int64_t>(p) + 1);
  }
  return Status::Ok();
}

std::string Vocabulary::Decode(const std::vector<int64_t>& ids) const {
  std::string s;
  for (int64_t id : ids) {
    if (id >= 1 && id <= static_cast<int64_t>(chars.size())) s.push_back(chars[id - 1]);
  }
  return s;
}

std::string NormalizeText(const std::string& text) {
  std::string out;
  bool space = false;
  for (char ch : text) {
    unsigned char c = static_cast<unsigned char>(ch);
    if (std::isspace(c)) {
      space = !out.empty();
      continue;
    }
    if (space) out.push_back(' ');
    space = false;
    out.push_back(static_cast<char>(std::tolower(c)));
  }
  return out;
}

static constexpr const char* kArchV1 = "conv-s2-relu-bigru-ctc-v1";
static constexpr const char* kArchResidual = "conv-s2-relu-bigru-res-ctc-v2";

std::string CtcModelConfig::ToJson() const {
  nlohmann::json j = {{"features", features}, {"mels", mels},       {"channels", channels},
                      {"hidden", hidden},     {"layers", layers},   {"dropout", dropout},
                      {"vocabulary", vocab.chars}, {"architecture", kArchV1}};
  if (residual > 0) {
    j["architecture"] = kArchResidual;
    j["residual"] = residual;
  }
  return j.dump();
}

Status CtcModelConfig::FromJson(const std::string& text, CtcModelConfig* out) {
  auto j = nlohmann::json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return Status::Corruption("model config is not a JSON object");
  try {
    CtcModelConfig c;
    c.features = j.value("features", c.features);
    c.mels = j.value("mels", c.mels);
    c.channels = j.value("channels", c.channels);
    c.hidden = j.value("hidden", c.hidden);
    c.layers = j.value("layers", c.layers);
    c.dropout = j.value("dropout", c.dropout);
    c.vocab.chars = j.value("vocabulary", c.vocab.chars);
    const std::string arch = j.value("architecture", std::string());
    if (arch == kArchResidual) {
      c.residual = j.value("residual", int64_t{0});
      if (c.residual <= 0) return Status::Corruption(std::string(kArchResidual) + " needs \"residual\" > 0");
    } else if (arch != kArchV1) {
      return Status::Invalid("model architecture " + arch + " is not supported (this build reads " + kArchV1 +
                             " and " + kArchResidual + ")");
    }
    if (c.residual > kMaxResidualBlocks) return Status::Corruption("model config: too many residual blocks");
    if (c.mels <= 0 || c.channels <= 0 || c.hidden <= 0 || c.layers <= 0 || c.vocab.chars.empty()) {
      return Status::Corruption("model config has a non-positive size or an empty vocabulary");
    }
    *out = c;
  } catch (const std::exception& e) {
    return Status::Corruption(std::string("model config: ") + e.what());
  }
  return Status::Ok();
}

CtcModelImpl::CtcModelImpl(CtcModelConfig config) : config_(std::move(config)) {
  using namespace torch::nn;
  conv1_ = register_module("conv1", Conv1d(Conv1dOptions(config_.mels, config_.channels, 5).stride(2).padding(2)));
  conv2_ =
      register_module("conv2", Conv1d(Conv1dOptions(config_.channels, config_.channels, 5).stride(1).padding(2)));
  norm_ = register_module("norm", LayerNorm(LayerNormOptions({config_.channels})));
  gru_ = register_module("gru", GRU(GRUOptions(config_.channels, config_.hidden)
                                        .num_layers(config_.layers)
                                        .bidirectional(true)
                                        .batch_first(true)
                                        .dropout(config_.layers > 1 ? config_.dropout : 0.0)));
  for (int64_t k = 0; k < config_.residual; ++k) {
    const int64_t width = 2 * config_.hidden;
    res_gru_.push_back(register_module("res_gru" + std::to_string(k),
                                       GRU(GRUOptions(width, config_.hidden).bidirectional(true).batch_first(true))));
    res_proj_.push_back(register_module("res_proj" + std::to_string(k), Linear(width, width)));
    torch::NoGradGuard no_grad;
    res_proj_.back()->weight.zero_();
    res_proj_.back()->bias.zero_();
  }
  drop_ = register_module("drop", Dropout(config_.dropout));
  out_ = register_module("out", Linear(2 * config_.hidden, config_.vocab.size()));
}

torch::Tensor CtcModelImpl::Residual(torch::Tensor y, const torch::Tensor& out_frames, bool packed) {
  if (res_gru_.empty()) return y;
  torch::Tensor mask;
  if (!packed) {
    mask = (torch::arange(y.size(1), out_frames.options()).unsqueeze(0) < out_frames.unsqueeze(1))
               .to(y.device())
               .to(y.dtype())
               .unsqueeze(2);
  }
  for (size_t k = 0; k < res_gru_.size(); ++k) {
    torch::Tensor r;
    if (packed) {
      auto in = torch::nn::utils::rnn::pack_padded_sequence(y, out_frames.to(torch::kCPU), /*batch_first=*/true,
                                                            /*enforce_sorted=*/false);
      r = std::get<0>(torch::nn::utils::rnn::pad_packed_sequence(
          std::get<0>(res_gru_[k]->forward_with_packed_input(in)), /*batch_first=*/true, 0.0, y.size(1)));
    } else {
      r = std::get<0>(res_gru_[k]->forward(y * mask));
    }
    y = y + res_proj_[k]->forward(drop_->forward(r));
  }
  return y;
}

torch::Tensor CtcModelImpl::OutputFrames(const torch::Tensor& frames) {
  // conv1: kernel 5, stride 2, padding 2 -> ceil(L / 2); conv2 keeps the length.
  return torch::floor_divide(frames.to(torch::kInt64) + 1, 2);
}

torch::Tensor CtcModelImpl::ForCtc(const torch::Tensor& log_probs, const torch::Tensor& out_frames) {
  torch::Tensor pad = (torch::arange(log_probs.size(1), out_frames.options()).unsqueeze(0) >= out_frames.unsqueeze(1))
                          .to(log_probs.device())
                          .unsqueeze(2);
  return log_probs.masked_fill(pad, 0.0).transpose(0, 1).contiguous();
}

std::pair<torch::Tensor, torch::Tensor> CtcModelImpl::forward(torch::Tensor features, torch::Tensor frames) {
  torch::Tensor x = features.transpose(1, 2).contiguous();  // [B, mels, T]
  // ReLU, not GELU: with Debian's libtorch 1.13 (oneDNN on), GELU's backward after these
  // convolutions returned garbage gradients (1e25-1e37, or inf) that made training stall.
  x = torch::relu(conv1_->forward(x));
  x = torch::relu(conv2_->forward(x));
  x = norm_->forward(x.transpose(1, 2).contiguous());  // [B, T', C]
  torch::Tensor out_frames = OutputFrames(frames).clamp_max(x.size(1)).clamp_min(1);
  // Padding is zeroed rather than packed (simpler, and batches are length-bucketed, so the padding
  // a backward pass starts from is short).
  torch::Tensor mask = (torch::arange(x.size(1), out_frames.options()).unsqueeze(0) < out_frames.unsqueeze(1))
                           .to(x.device())
                           .to(x.dtype())
                           .unsqueeze(2);
  torch::Tensor y = Residual(std::get<0>(gru_->forward(x * mask)), out_frames, /*packed=*/false);
  torch::Tensor logits = out_->forward(drop_->forward(y));
  return {torch::log_softmax(logits, -1), out_frames};
}

static Status Guard(const std::function<void()>& fn, const std::string& what) {
  try {
    fn();
  } catch (const c10::Error& e) {
    return Status::Corruption(what + ": " + e.what_without_backtrace());
  } catch (const std::exception& e) {
    return Status::IOError(what + ": " + e.what());
  }
  return Status::Ok();
}

static void WriteArchive(CtcModel& model, torch::serialize::OutputArchive& ar) {
  ar.write("config", c10::IValue(model->config().ToJson()));
  torch::serialize::OutputArchive weights;
  model->save(weights);
  ar.write("model", weights);
}

static Status ReadArchive(torch::serialize::InputArchive& ar, CtcModel* out) {
  c10::IValue cfg;
  ar.read("config", cfg);
  if (!cfg.isString()) return Status::Corruption("model file: config is not a string");
  CtcModelConfig config;
  ASRF_RETURN_IF_ERROR(CtcModelConfig::FromJson(cfg.toStringRef(), &config));
  CtcModel model(config);
  torch::serialize::InputArchive weights;
  ar.read("model", weights);
  model->load(weights);
  *out = model;
  return Status::Ok();
}

Status SaveModel(CtcModel& model, const std::string& path) {
  // Whole or not at all: a crash while writing must not leave the model that was there half
  // overwritten.
  std::string bytes;
  ASRF_RETURN_IF_ERROR(SaveModelToBytes(model, &bytes));
  return WriteFileDurably(path, bytes);
}

Status SaveModelToBytes(CtcModel& model, std::string* bytes) {
  return Guard(
      [&] {
        torch::serialize::OutputArchive ar;
        WriteArchive(model, ar);
        std::ostringstream os;
        ar.save_to(os);
        *bytes = os.str();
      },
      "cannot serialise model");
}

Status LoadModel(const std::string& path, CtcModel* out) {
  Status inner;
  Status st = Guard(
      [&] {
        torch::serialize::InputArchive ar;
        ar.load_from(path, torch::Device(torch::kCPU));  // saved on a GPU, read anywhere
        inner = ReadArchive(ar, out);
      },
      "cannot read model " + path);
  return st.ok() ? inner : st;
}

Status LoadModelFromBytes(const std::string& bytes, CtcModel* out) {
  Status inner;
  Status st = Guard(
      [&] {
        torch::serialize::InputArchive ar;
        ar.load_from(bytes.data(), bytes.size(), torch::Device(torch::kCPU));
        inner = ReadArchive(ar, out);
      },
      "cannot read model bytes");
  return st.ok() ? inner : st;
}

Status GrowResidual(CtcModel& from, int64_t residual, CtcModel* out) {
  const CtcModelConfig& have = from->config();
  if (residual < have.residual) {
    return Status::Invalid("the model has " + std::to_string(have.residual) + " residual blocks; it cannot shrink to " +
                           std::to_string(residual));
  }
  if (residual > kMaxResidualBlocks) {
    return Status::Invalid("at most " + std::to_string(kMaxResidualBlocks) + " residual blocks");
  }
  CtcModelConfig config = have;
  config.residual = residual;
  CtcModel grown(config);
  return Guard(
      [&] {
        torch::NoGradGuard no_grad;
        auto dst = grown->named_parameters();
        for (const auto& p : from->named_parameters()) {
          torch::Tensor* d = dst.find(p.key());
          if (!d || !d->sizes().equals(p.value().sizes())) throw std::runtime_error("parameter " + p.key() + " does not fit");
          d->copy_(p.value());
        }
        grown->to(from->parameters().front().device());
        grown->train(from->is_training());
        *out = grown;
      },
      "cannot grow the model");
}

Status AverageModels(const std::vector<CtcModel>& models, const std::vector<double>& weights, CtcModel* out) {
  if (models.empty()) return Status::Invalid("no models to average");
  if (weights.size() != models.size()) {
    return Status::Invalid(std::to_string(weights.size()) + " weights for " + std::to_string(models.size()) + " models");
  }
  double sum = 0;
  for (double w : weights) {
    if (!std::isfinite(w) || w < 0) return Status::Invalid("a weight must be a finite number >= 0");
    sum += w;
  }
  if (sum <= 0) return Status::Invalid("the weights sum to 0");
  const std::string config = models.front()->config().ToJson();
  for (size_t i = 1; i < models.size(); ++i) {
    if (models[i]->config().ToJson() != config) {
      return Status::Invalid("model " + std::to_string(i + 1) + " is a different network from model 1 (config " +
                             models[i]->config().ToJson() + " against " + config + ")");
    }
  }
  CtcModel mean(models.front()->config());
  return Guard(
      [&] {
        torch::NoGradGuard no_grad;
        auto average = [&](torch::OrderedDict<std::string, torch::Tensor> dst,
                           const std::function<torch::OrderedDict<std::string, torch::Tensor>(const CtcModel&)>& of) {
          std::vector<torch::OrderedDict<std::string, torch::Tensor>> srcs;
          for (const auto& m : models) srcs.push_back(of(m));
          for (auto& d : dst) {
            if (!d.value().is_floating_point()) {
              d.value().copy_(srcs.front()[d.key()]);
              continue;
            }
            torch::Tensor acc = torch::zeros_like(d.value(), torch::kFloat64);
            for (size_t i = 0; i < srcs.size(); ++i) {
              const torch::Tensor* s = srcs[i].find(d.key());
              if (!s || !s->sizes().equals(d.value().sizes())) throw std::runtime_error(d.key() + " does not fit");
              acc.add_(s->to(torch::kCPU, torch::kFloat64), weights[i] / sum);
            }
            d.value().copy_(acc);
          }
        };
        average(mean->named_parameters(), [](const CtcModel& m) { return m->named_parameters(); });
        average(mean->named_buffers(), [](const CtcModel& m) { return m->named_buffers(); });
        mean->eval();
        *out = mean;
      },
      "cannot average the models");
}

std::vector<std::string> GreedyDecode(const torch::Tensor& log_probs, const torch::Tensor& out_frames,
                                      const Vocabulary& vocab) {
  torch::Tensor best = log_probs.argmax(-1).to(torch::kCPU).to(torch::kInt64).contiguous();
  torch::Tensor lens = out_frames.to(torch::kCPU).to(torch::kInt64);
  std::vector<std::string> out;
  for (int64_t b = 0; b < best.size(0); ++b) {
    const int64_t* p = best[b].data_ptr<int64_t>();
    int64_t n = std::min<int64_t>(lens[b].item<int64_t>(), best.size(1));
    std::vector<int64_t> ids;
    int64_t prev = -1;
    for (int64_t t = 0; t < n; ++t) {
      if (p[t] != prev && p[t] != 0) ids.push_back(p[t]);
      prev = p[t];
    }
    out.push_back(NormalizeText(vocab.Decode(ids)));
  }
  return out;
}

size_t EditDistance(const std::vector<std::string>& a, const std::vector<std::string>& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
    }
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

static std::vector<std::string> Chars(const std::string& s) {
  std::vector<std::string> v;
  for (char c : s) v.emplace_back(1, c);
  return v;
}

static std::vector<std::string> Words(const std::string& s) {
  std::vector<std::string> v;
  std::istringstream in(s);
  std::string w;
  while (in >> w) v.push_back(w);
  return v;
}

double CharErrorRate(const std::vector<std::string>& refs, const std::vector<std::string>& hyps) {
  size_t err = 0, total = 0;
  for (size_t i = 0; i < refs.size() && i < hyps.size(); ++i) {
    err += EditDistance(Chars(refs[i]), Chars(hyps[i]));
    total += refs[i].size();
  }
  return total ? static_cast<double>(err) / total : 0.0;
}

double WordErrorRate(const std::vector<std::string>& refs, const std::vector<std::string>& hyps) {
  size_t err = 0, total = 0;
  for (size_t i = 0; i < refs.size() && i < hyps.size(); ++i) {
    auto r = Words(refs[i]);
    err += EditDistance(r, Words(hyps[i]));
    total += r.size();
  }
  return total ? static_cast<double>(err) / total : 0.0;
}

}  // namespace asrf
