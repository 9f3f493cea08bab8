// The project's own CTC acoustic model: log-mel features -> two 1-D convolutions (the first with
// stride 2: 50 output frames per second) -> bidirectional GRU -> optional residual BiGRU blocks ->
// per-frame log-probabilities over blank + characters. (A 4x time reduction leaves fast synthetic speech with barely enough
// frames for its characters.)
// A model file holds its config (JSON, including the vocabulary and the front end's name) and its
// weights; the same definition is loaded for training and for inference.
#pragma once

#include <torch/torch.h>

#include <string>
#include <vector>

#include "common/status.h"

namespace asrf {

// Characters a model emits. Id 0 is the CTC blank; character i of `chars` is id i + 1.
struct Vocabulary {
  std::string chars = " 'abcdefghijklmnopqrstuvwxyz";
  int64_t size() const { return static_cast<int64_t>(chars.size()) + 1; }
  // Lowercases and maps text to ids; characters outside the vocabulary make it fail.
  Status Encode(const std::string& text, std::vector<int64_t>* ids) const;
  std::string Decode(const std::vector<int64_t>& ids) const;
};

// Normalises free text toward a vocabulary: lowercase, whitespace collapsed and trimmed.
std::string NormalizeText(const std::string& text);

// The most residual blocks a model may have (configs, payloads and GrowResidual check it).
constexpr int64_t kMaxResidualBlocks = 16;

struct CtcModelConfig {
  std::string features = "logmel80-v1";
  int64_t mels = 80;
  int64_t channels = 256;
  int64_t hidden = 256;
  int64_t layers = 3;
  // Residual blocks on top of the GRU stack: y + proj(BiGRU(y)). Their projection starts at zero,
  // so blocks added to a trained model leave its output unchanged (see GrowResidual). 0 writes
  // the config of architecture conv-s2-relu-bigru-ctc-v1, readable by older builds.
  int64_t residual = 0;
  double dropout = 0.1;
  Vocabulary vocab;
  std::string ToJson() const;
  static Status FromJson(const std::string& json, CtcModelConfig* out);
};

class CtcModelImpl : public torch::nn::Module {
 public:
  explicit CtcModelImpl(CtcModelConfig config);
  // features [B, T, mels], frames [B] -> log_probs [B, T', V] and out_frames [B].
  std::pair<torch::Tensor, torch::Tensor> forward(torch::Tensor features, torch::Tensor frames);
  const CtcModelConfig& config() const { return config_; }
  // The residual blocks applied to the GRU stack's output y [B, T', 2 * hidden]. `packed` runs
  // each block's GRU on a packed sequence (inference: padding never reaches a valid frame);
  // otherwise padded frames are zeroed, as forward() does for the first GRU.
  torch::Tensor Residual(torch::Tensor y, const torch::Tensor& out_frames, bool packed);
  static torch::Tensor OutputFrames(const torch::Tensor& frames);
  // log_probs as ctc_loss wants them: [T, B, V], contiguous, padded frames (t >= out_frames) set
  // to 0 so nothing non-finite can come back from them.
  static torch::Tensor ForCtc(const torch::Tensor& log_probs, const torch::Tensor& out_frames);

 private:
  CtcModelConfig config_;
  torch::nn::Conv1d conv1_{nullptr}, conv2_{nullptr};
  torch::nn::LayerNorm norm_{nullptr};
  torch::nn::GRU gru_{nullptr};
  std::vector<torch::nn::GRU> res_gru_;
  std::vector<torch::nn::Linear> res_proj_;
  torch::nn::Dropout drop_{nullptr};
  torch::nn::Linear out_{nullptr};
};
TORCH_MODULE(CtcModel);

// Model files: config + weights in one torch archive.
Status SaveModel(CtcModel& model, const std::string& path);
Status SaveModelToBytes(CtcModel& model, std::string* bytes);
Status LoadModel(const std::string& path, CtcModel* out);
Status LoadModelFromBytes(const std::string& bytes, CtcModel* out);

// A copy of `from` with `residual` residual blocks (at least as many as it has): its weights are
// copied, the new blocks' projections are zero, so the grown model computes what `from` does.
Status GrowResidual(CtcModel& from, int64_t residual, CtcModel* out);

// The weighted mean of the weights of models of one network (the same config, e.g. two runs
// where one started from the other): out = sum_i weights[i] * models[i]. Weights are >= 0 and
// are normalised to sum to 1. Models of different configs or vocabularies are refused.
Status AverageModels(const std::vector<CtcModel>& models, const std::vector<double>& weights, CtcModel* out);

// Greedy CTC decoding: best id per frame, repeats collapsed, blanks dropped.
std::vector<std::string> GreedyDecode(const torch::Tensor& log_probs, const torch::Tensor& out_frames,
                                      const Vocabulary& vocab);

// Levenshtein distance between two sequences of characters or words.
size_t EditDistance(const std::vector<std::string>& a, const std::vector<std::string>& b);
double CharErrorRate(const std::vector<std::string>& refs, const std::vector<std::string>& hyps);
double WordErrorRate(const std::vector<std::string>& refs, const std::vector<std::string>& hyps);

}  // namespace asrf
