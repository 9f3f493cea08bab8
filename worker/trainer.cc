#include "worker/trainer.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <exception>
#include <cstring>
#include <unistd.h>
#include <filesystem>
#include <functional>
#include <fstream>
#include <cstdlib>
#include <random>
#include <sstream>
#include <thread>
#include <unordered_set>

#include <ATen/Parallel.h>
#include <nlohmann/json.hpp>
#if ASRF_TORCH_GLOO  // worker/CMakeLists.txt: ASRF_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#if ASRF_TORCH_NCCL  // a CUDA libtorch with NCCL (worker/CMakeLists.txt)
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#if ASRF_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

#include "common/audio_in.h"
#include "common/clock.h"
#include "common/log.h"
#include "schema/protocol.h"
#include "worker/audio.h"
#include "worker/augment.h"
#include "worker/char_lm.h"
#include "worker/checkpoint_store.h"
#include "worker/ctc_beam.h"
#include "worker/ctc_model.h"
#include "worker/device.h"
#include "worker/features.h"

namespace asrf {

using json = nlohmann::json;

// ---- spec -------------------------------------------------------------------------------------

// A training's `out` replaces only a model file (a zip archive) or nothing: a job naming another
// file (a configuration, a key) must not have the worker overwrite it.
Status CheckModelOut(const std::string& out) {
  std::error_code ec;
  const auto st = std::filesystem::status(out, ec);
  if (ec || !std::filesystem::exists(st)) return Status::Ok();
  if (!std::filesystem::is_regular_file(st)) return Status::Invalid("out " + out + " exists and is not a file");
  char magic[4] = {0, 0, 0, 0};
  std::ifstream in(out, std::ios::binary);
  in.read(magic, 4);
  if (in.gcount() != 4 || std::memcmp(magic, "PK\x03\x04", 4) != 0) {
    return Status::Invalid("out " + out + " exists and is not a model file: not replaced (remove it, or name another path)");
  }
  return Status::Ok();
}

Status TrainSpec::FromJson(const std::string& text, TrainSpec* out) {
  auto j = json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return Status::Invalid("malformed payload: a train job takes a JSON object");
  TrainSpec s;
  try {
    s.manifest = j.value("manifest", "");
    s.valid = j.value("valid", "");
    s.name = j.value("name", "");
    s.out = j.value("out", "");
    s.steps = j.value("steps", s.steps);
    s.batch_seconds = j.value("batch_seconds", s.batch_seconds);
    s.lr = j.value("lr", s.lr);
    s.warmup = j.value("warmup", s.warmup);
    s.clip = j.value("clip", s.clip);
    s.checkpoint_every = j.value("checkpoint_every", s.checkpoint_every);
    s.keep = j.value("keep", s.keep);
    s.valid_every = j.value("valid_every", s.valid_every);
    s.valid_max = j.value("valid_max", s.valid_max);
    s.seed = j.value("seed", s.seed);
    s.channels = j.value("channels", s.channels);
    s.hidden = j.value("hidden", s.hidden);
    s.layers = j.value("layers", s.layers);
    s.residual = j.value("residual", s.residual);
    s.dropout = j.value("dropout", s.dropout);
    s.max_seconds = j.value("max_seconds", s.max_seconds);
    s.spec_augment = j.value("spec_augment", s.spec_augment);
    s.speed_perturb = j.value("speed_perturb", s.speed_perturb);
    s.vtlp = j.value("vtlp", s.vtlp);
    s.lowpass = j.value("lowpass", s.lowpass);
    s.reverb = j.value("reverb", s.reverb);
    s.noise = j.value("noise", s.noise);
    s.nonspeech = j.value("nonspeech", s.nonspeech);
    s.pad_background = j.value("pad_background", s.pad_background);
    s.init = j.value("init", "");
    s.evaluate_only = j.value("evaluate_only", false);
    s.lm = j.value("lm", "");
    s.beam = j.value("beam", s.beam);
    s.lm_weight = j.value("lm_weight", s.lm_weight);
    s.char_bonus = j.value("char_bonus", s.char_bonus);
    s.oov_penalty = j.value("oov_penalty", s.oov_penalty);
    s.combine = j.value("combine", s.combine);
    s.adam_eps = j.value("adam_eps", s.adam_eps);
    s.publish_every = j.value("publish_every", s.publish_every);
  } catch (const std::exception& e) {
    return Status::Invalid(std::string("malformed payload: ") + e.what());
  }
  if (!s.lm.empty() && !s.evaluate_only) {
    return Status::Invalid("malformed payload: lm (beam-search decoding) applies to evaluate_only jobs only");
  }
  if (s.evaluate_only && (s.init.empty() || s.valid.empty())) {
    return Status::Invalid("malformed payload: evaluate_only needs init (a model file) and valid");
  }
  if (!s.evaluate_only && (s.manifest.empty() || s.valid.empty() || s.name.empty())) {
    return Status::Invalid("malformed payload: a train job needs manifest, valid and name");
  }
  if (!s.name.empty()) ASRF_RETURN_IF_ERROR(proto::ValidModelName(s.name));
  // A job may come from any client of the broker: the worker writes a model file where it says,
  // and nothing else (see CheckModelOut).
  if (!s.out.empty() && (s.out[0] != '/' || s.out.size() < 4 || s.out.compare(s.out.size() - 3, 3, ".pt") != 0)) {
    return Status::Invalid("malformed payload: out must be an absolute path ending in .pt (a model file), not \"" +
                           s.out + "\"");
  }
  if (!(s.dropout >= 0 && s.dropout < 1)) return Status::Invalid("malformed payload: dropout must be in [0, 1)");
  if (s.valid_max < 1) return Status::Invalid("malformed payload: valid_max must be at least 1");
  if (!(s.max_seconds > 0 && s.max_seconds <= 3600)) {
    return Status::Invalid("malformed payload: max_seconds must be above 0 and at most 3600");
  }
  if (s.steps < 1 || s.batch_seconds <= 0 || s.lr <= 0 || s.checkpoint_every < 1 || s.valid_every < 1 ||
      s.channels < 1 || s.hidden < 1 || s.layers < 1 || s.residual < 0 || s.residual > kMaxResidualBlocks || s.keep < 1 || s.combine < 1 || s.combine > 64 ||
      s.publish_every < 0 || !(s.adam_eps > 0) || s.beam < 1 || !std::isfinite(s.lm_weight) ||
      !std::isfinite(s.char_bonus) || !std::isfinite(s.oov_penalty) || !(s.speed_perturb >= 0 && s.speed_perturb < 0.5) ||
      !(s.vtlp >= 0 && s.vtlp < 0.5) || !(s.lowpass >= 0 && s.lowpass <= 1) ||
      !(s.reverb >= 0 && s.reverb <= 1) || !(s.noise >= 0 && s.noise <= 1) || !(s.nonspeech >= 0 && s.nonspeech <= 0.5) ||
      !(s.pad_background >= 0 && s.pad_background <= 1)) {
    return Status::Invalid(
        "malformed payload: steps, batch_seconds, lr, sizes and intervals must be positive; residual in [0, " +
        std::to_string(kMaxResidualBlocks) +
        "]; speed_perturb and vtlp in [0, 0.5); lowpass, reverb, noise and pad_background in [0, 1]; nonspeech in [0, "
        "0.5]");
  }
  *out = s;
  return Status::Ok();
}

std::string TrainSpec::ToJson() const {
  json j = {{"manifest", manifest}, {"valid", valid}, {"name", name}, {"out", out}, {"steps", steps},
            {"batch_seconds", batch_seconds}, {"lr", lr}, {"warmup", warmup}, {"clip", clip},
            {"checkpoint_every", checkpoint_every}, {"keep", keep}, {"valid_every", valid_every},
            {"valid_max", valid_max}, {"seed", seed}, {"channels", channels}, {"hidden", hidden},
            {"layers", layers}, {"residual", residual}, {"dropout", dropout}, {"max_seconds", max_seconds},
            {"spec_augment", spec_augment}, {"speed_perturb", speed_perturb}, {"vtlp", vtlp}, {"lowpass", lowpass}, {"reverb", reverb}, {"noise", noise}, {"nonspeech", nonspeech}, {"pad_background", pad_background}, {"init", init}, {"evaluate_only", evaluate_only},
            {"lm", lm}, {"beam", beam}, {"lm_weight", lm_weight}, {"char_bonus", char_bonus},
            {"oov_penalty", oov_penalty},
            {"combine", combine}, {"publish_every", publish_every}, {"adam_eps", adam_eps}};
  return j.dump();
}

// ---- data -------------------------------------------------------------------------------------

namespace {
// CTC needs an output frame per character, and one more between two equal ones; the model gives
// one per 20 ms (10 ms frames, halved).
int64_t CtcFramesNeeded(const std::vector<int64_t>& ids) {
  int64_t need = static_cast<int64_t>(ids.size());
  for (size_t i = 1; i < ids.size(); ++i) need += ids[i] == ids[i - 1];
  return need;
}
int64_t CtcOutputFrames(int64_t samples) { return (NumFrames(samples) + 1) / 2; }
}  // namespace

Status ReadManifest(const std::string& path, const std::string& vocabulary, double max_seconds,
                    std::vector<ManifestItem>* items, bool for_training) {
  std::ifstream in(path);
  if (!in) return Status::Invalid("manifest " + path + " cannot be read (it must be on storage the worker sees)");
  Vocabulary vocab;
  vocab.chars = vocabulary;
  std::vector<std::string> problems;
  size_t bad = 0;
  std::string line;
  int lineno = 0;
  auto problem = [&](const std::string& p) {
    ++bad;
    if (problems.size() < 8) problems.push_back("line " + std::to_string(lineno) + ": " + p);
  };
  while (std::getline(in, line)) {
    ++lineno;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    auto j = json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object() || !j.contains("audio") || !j["audio"].is_string() ||
        !j.contains("text") || !j["text"].is_string()) {
      problem("not a JSON object with string fields \"audio\" and \"text\"");
      continue;
    }
    ManifestItem it;
    it.line = lineno;
    it.audio = j["audio"].get<std::string>();
    if (!it.audio.empty() && it.audio[0] != '/') {
      it.audio = (std::filesystem::path(path).parent_path() / it.audio).string();
    }
    it.text = NormalizeText(j["text"].get<std::string>());
    if (it.text.empty()) {
      problem("empty text");
      continue;
    }
    std::vector<int64_t> ids;
    Status st = vocab.Encode(it.text, &ids);
    if (!st.ok()) {
      problem(st.message());
      continue;
    }
    // The checks transcription makes of a file before decoding it (common/audio_in.h), so that a
    // file it would refuse fails here, with its line, not minutes into loading.
    AudioHeader info;
    st = ProbeAudioHeader(it.audio, &info);
    if (!st.ok()) {
      problem(st.message());
      continue;
    }
    if (info.frames < 0) {
      problem(it.audio + ": its length cannot be read from its header (a file cut short?)");
      continue;
    }
    if (info.sample_rate <= 0) {
      problem(it.audio + ": no sample rate in the file");
      continue;
    }
    if (info.frames <= 0) {
      problem(it.audio + ": no audio");
      continue;
    }
    it.sample_rate = info.sample_rate;
    it.duration = static_cast<double>(info.frames) / info.sample_rate;
    if (it.duration > max_seconds) {
      problem(it.audio + ": " + std::to_string(it.duration) + " s is longer than max_seconds (asr-submit train --max-seconds)");
      continue;
    }
    // A text too long for its audio could never be learnt: its loss would be silently zeroed.
    // (Validation computes no loss: not checked. Speed perturbation keeps within it.)
    int64_t frames = CtcOutputFrames(static_cast<int64_t>(it.duration * kSampleRate));
    int64_t need = CtcFramesNeeded(ids);
    if (for_training && frames < need) {
      problem(it.audio + ": " + std::to_string(ids.size()) + " characters of text in " + std::to_string(it.duration) +
              " s of audio; the model can emit at most " + std::to_string(frames) + " here (50 per second)");
      continue;
    }
    items->push_back(std::move(it));
  }
  if (bad > 0) {
    std::string m = "manifest " + path + " has " + std::to_string(bad) + " bad line(s); nothing was trained:";
    for (const auto& p : problems) m += "\n  " + p;
    if (bad > problems.size()) m += "\n  ...";
    return Status::Invalid(m);
  }
  if (items->empty()) return Status::Invalid("manifest " + path + " has no utterances");
  return Status::Ok();
}

namespace {

struct Utterance {
  std::vector<int16_t> pcm;
  std::vector<int64_t> ids;
  std::string text;
};

// fn(lo, hi) over [0, n) in contiguous ranges, on as many threads as torch's intra-op setting (the
// worker's --threads; a range per thread, the caller's included); an exception in any is rethrown
// here. Not at::parallel_for: with torch's OpenMP backend that is a header template, parallel only
// in code compiled with OpenMP, and it ran everything on the calling thread here.
void ParallelFor(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
  const int64_t k = std::min<int64_t>(n, std::max(1, at::get_num_threads()));
  if (k <= 1) {
    if (n > 0) fn(0, n);
    return;
  }
  std::vector<std::exception_ptr> errors(static_cast<size_t>(k));
  auto run = [&](int64_t t) {
    try {
      fn(n * t / k, n * (t + 1) / k);
    } catch (...) {
      errors[static_cast<size_t>(t)] = std::current_exception();
    }
  };
  std::vector<std::thread> threads;
  for (int64_t t = 1; t < k; ++t) threads.emplace_back(run, t);
  run(0);
  for (auto& th : threads) th.join();
  for (auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

// Loading a large corpus takes minutes: files are decoded on several threads (a GPU host's cores
// would otherwise wait on one), and a cancel or a drain is heard between files. Files that fail to
// decode (a compressed file cut short, which its header does not show) fail the job after the
// whole corpus is read, counted and the first eight named with their manifest lines, as bad lines
// of a manifest are: one submission shows them all.
Status LoadAll(const std::vector<ManifestItem>& items, const Vocabulary& vocab, const TrainContext& ctx,
               const std::string& manifest, std::vector<Utterance>* out) {
  out->assign(items.size(), Utterance{});
  std::vector<Status> st(items.size(), Status::Ok());
  std::atomic<bool> interrupted{false};
  ParallelFor(static_cast<int64_t>(items.size()), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      if (interrupted.load()) return;
      if ((ctx.cancelled && ctx.cancelled->load()) || (ctx.stopping && ctx.stopping->load())) {
        interrupted = true;
        return;
      }
      Utterance& u = (*out)[static_cast<size_t>(i)];
      // Read as transcription reads it (common/audio_in.h): any encoding, float included, channels
      // averaged, other rates resampled to 16 kHz.
      DecodedAudio d;
      Status s = DecodeAudio16k(items[static_cast<size_t>(i)].audio, &d);
      if (s.ok()) s = vocab.Encode(items[static_cast<size_t>(i)].text, &u.ids);
      if (!s.ok()) {
        st[static_cast<size_t>(i)] = std::move(s);
        continue;
      }
      u.pcm = std::move(d.pcm);
      u.text = items[static_cast<size_t>(i)].text;
    }
  });
  if (ctx.cancelled && ctx.cancelled->load()) return Status::Unavailable("cancelled");
  if (interrupted.load()) {
    return Status::Busy("interrupted while loading the audio, before any step; runs again from its checkpoint or the start");
  }
  size_t bad = 0;
  std::string m;
  for (size_t i = 0; i < st.size(); ++i) {
    if (st[i].ok()) continue;
    if (++bad <= 8) m += "\n  line " + std::to_string(items[i].line) + ": " + st[i].message();
  }
  if (bad == 0) return Status::Ok();
  if (bad > 8) m += "\n  ...";
  return Status::Invalid("manifest " + manifest + ": " + std::to_string(bad) +
                         " audio file(s) could not be decoded; nothing was trained:" + m);
}

// Batches by padded audio seconds over duration-sorted utterances (length buckets: neighbours in
// the sorted order have similar lengths, so padding stays small). The order of batches is
// shuffled per epoch from the seed, so (epoch, index) is a reproducible data position.
std::vector<std::vector<size_t>> MakeBatches(const std::vector<Utterance>& data, double batch_seconds) {
  std::vector<size_t> order(data.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return data[a].pcm.size() < data[b].pcm.size(); });
  std::vector<std::vector<size_t>> batches;
  std::vector<size_t> cur;
  size_t longest = 0;
  const double budget = batch_seconds * kSampleRate;
  for (size_t i : order) {
    size_t len = data[i].pcm.size();
    if (!cur.empty() && static_cast<double>(std::max(longest, len)) * (cur.size() + 1) > budget) {
      batches.push_back(std::move(cur));
      cur.clear();
      longest = 0;
    }
    cur.push_back(i);
    longest = std::max(longest, len);
  }
  if (!cur.empty()) batches.push_back(std::move(cur));
  return batches;
}

std::vector<size_t> EpochOrder(size_t n, uint64_t seed, int64_t epoch) {
  std::vector<size_t> order(n);
  for (size_t i = 0; i < n; ++i) order[i] = i;
  std::mt19937_64 rng(seed * 1000003ull + static_cast<uint64_t>(epoch));
  std::shuffle(order.begin(), order.end(), rng);
  return order;
}

// How one batch's training audio is perturbed (TrainSpec's speed_perturb, lowpass, reverb, noise,
// nonspeech, pad_background).
struct AudioAugment {
  double speed = 0, lowpass = 0, reverb = 0, noise = 0, nonspeech = 0, pad = 0;
};

// Pads the utterances `idx` into [B, N] float PCM. With a generator (training) each utterance is
// played at a speed drawn from [1 - speed, 1 + speed] and, each with its own probability, played
// in a synthetic room, low-passed at a random cutoff of 3-7 kHz and given background noise
// (worker/augment.h), in the order a recording meets them. A share `nonspeech` of them is
// replaced by background without speech of the same length, and a share `pad` of the others gets
// 0.1-1.5 s of background on each side, 10-40 dB under the speech (both before the room, low-pass
// and noise); `silent` (when given) marks the background-only ones with 1: their transcript is
// empty.
void MakeBatchTensors(const std::vector<Utterance>& data, const std::vector<size_t>& idx, torch::Tensor* pcm,
                      torch::Tensor* lengths, std::mt19937_64* rng = nullptr, const AudioAugment& aug = {},
                      std::vector<char>* silent = nullptr) {
  std::vector<double> factor(idx.size(), 1.0), cutoff(idx.size(), 0.0), rt60(idx.size(), 0.0),
      drr(idx.size(), 0.0), snr(idx.size(), 0.0), colour(idx.size(), 0.0);  // 0 cutoff, rt60, snr: not applied
  std::vector<char> background(idx.size(), 0);
  std::vector<size_t> len(idx.size()), speech(idx.size()), before(idx.size(), 0), after(idx.size(), 0);
  std::vector<double> below(idx.size(), 0.0);
  std::vector<uint64_t> seed(idx.size(), 0);  // each utterance's own generator for what it plays
  size_t longest = 0;
  auto chance = [&](double p) { return std::uniform_real_distribution<double>(0.0, 1.0)(*rng) < p; };
  auto uniform = [&](double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(*rng); };
  for (size_t b = 0; b < idx.size(); ++b) {
    if (rng && aug.speed > 0) {
      factor[b] = uniform(1.0 - aug.speed, 1.0 + aug.speed);
      // Played faster, a text that just fits its audio would no longer (its loss silently zero):
      // no faster than it still fits.
      const auto& u = data[idx[b]];
      const int64_t need = CtcFramesNeeded(u.ids);
      while (factor[b] > 1.0 && CtcOutputFrames(static_cast<int64_t>(SpeedChangedLength(u.pcm.size(), factor[b]))) < need) {
        factor[b] = std::max(1.0, factor[b] - 0.01);
      }
    }
    // Each is drawn only when asked for, so runs without it see the same random stream as before.
    if (rng && aug.lowpass > 0 && chance(aug.lowpass)) cutoff[b] = uniform(3000.0, 7000.0);
    if (rng && aug.reverb > 0 && chance(aug.reverb)) {
      rt60[b] = uniform(0.2, 1.0);
      drr[b] = uniform(-15.0, 10.0);
    }
    if (rng && aug.noise > 0 && chance(aug.noise)) {
      snr[b] = uniform(5.0, 30.0);
      colour[b] = uniform(0.0, 0.95);
    }
    if (rng && aug.nonspeech > 0 && chance(aug.nonspeech)) background[b] = 1;
    if (rng && aug.pad > 0 && !background[b] && chance(aug.pad)) {
      before[b] = static_cast<size_t>(uniform(0.1, 1.5) * kSampleRate);
      after[b] = static_cast<size_t>(uniform(0.1, 1.5) * kSampleRate);
      below[b] = uniform(10.0, 40.0);
    }
    if (rng) seed[b] = (*rng)();
    speech[b] = SpeedChangedLength(data[idx[b]].pcm.size(), factor[b]);
    len[b] = before[b] + speech[b] + after[b];
    longest = std::max(longest, len[b]);
  }
  *pcm = torch::zeros({static_cast<int64_t>(idx.size()), static_cast<int64_t>(longest)}, torch::kFloat32);
  *lengths = torch::zeros({static_cast<int64_t>(idx.size())}, torch::kInt64);
  float* p = pcm->data_ptr<float>();
  // Utterances are played on several threads, each from its own seed: the batch is the same
  // whatever the number of threads.
  ParallelFor(static_cast<int64_t>(idx.size()), [&](int64_t lo, int64_t hi) {
    for (int64_t bi = lo; bi < hi; ++bi) {
      const size_t b = static_cast<size_t>(bi);
      const auto& s = data[idx[b]].pcm;
      float* u = p + b * longest;
      std::mt19937_64 r(seed[b]);
      if (background[b]) {
        NonSpeech(u, len[b], r);
      } else {
        SpeedChange(s.data(), s.size(), factor[b], u + before[b]);
        if (before[b] + after[b] > 0) PadWithBackground(u, before[b], speech[b], after[b], below[b], r);
      }
      if (rt60[b] > 0) Reverberate(u, len[b], rt60[b], drr[b], r);
      if (cutoff[b] > 0) LowPass(u, len[b], cutoff[b]);
      if (snr[b] > 0) AddNoise(u, len[b], snr[b], colour[b], r);
    }
  });
  int64_t* lp = lengths->data_ptr<int64_t>();
  for (size_t b = 0; b < idx.size(); ++b) lp[b] = static_cast<int64_t>(len[b]);
  if (silent) *silent = std::move(background);
}

// Vocal tract length perturbation: each utterance's mel axis stretched by a factor from
// [1 - range, 1 + range] (worker/augment.h).
void Vtlp(torch::Tensor& feats, std::mt19937_64& rng, double range) {
  for (int64_t b = 0; b < feats.size(0); ++b)
    WarpMelAxis(feats[b], std::uniform_real_distribution<double>(1.0 - range, 1.0 + range)(rng));
}

// SpecAugment: two frequency masks (up to 15 bins) and two time masks (up to 40 frames, at most
// 10% of the utterance) per utterance, from the job's own RNG so a resumed run is reproducible.
void SpecAugment(torch::Tensor& feats, const torch::Tensor& frames, std::mt19937_64& rng) {
  auto fa = frames.accessor<int64_t, 1>();
  for (int64_t b = 0; b < feats.size(0); ++b) {
    for (int k = 0; k < 2; ++k) {
      int64_t w = std::uniform_int_distribution<int64_t>(0, 15)(rng);
      int64_t f0 = std::uniform_int_distribution<int64_t>(0, kMels - w)(rng);
      if (w > 0) feats[b].narrow(1, f0, w).zero_();
    }
    int64_t t = fa[b];
    int64_t maxw = std::min<int64_t>(40, t / 10);
    for (int k = 0; k < 2 && maxw > 0; ++k) {
      int64_t w = std::uniform_int_distribution<int64_t>(0, maxw)(rng);
      int64_t t0 = std::uniform_int_distribution<int64_t>(0, std::max<int64_t>(t - w, 0))(rng);
      if (w > 0) feats[b].narrow(0, t0, w).zero_();
    }
  }
}

double LearningRate(const TrainSpec& s, int64_t step) {
  if (step < s.warmup) return s.lr * (step + 1) / static_cast<double>(s.warmup);
  double p = static_cast<double>(step - s.warmup) / std::max<int64_t>(1, s.steps - s.warmup);
  p = std::clamp(p, 0.0, 1.0);
  return s.lr * (0.05 + 0.95 * 0.5 * (1 + std::cos(M_PI * p)));
}

struct Evaluation {
  double cer = 1, wer = 1;
  double greedy_cer = 1, greedy_wer = 1;  // with an LM: the same model decoded greedily
};

// CER/WER of the model on (the first `max` of) `valid`: greedy, or with `lm` the beam search.
Evaluation Evaluate(CtcModel& model, const std::vector<Utterance>& valid, size_t max, double batch_seconds,
                    const CharLm* lm = nullptr, const BeamOptions& beam = {}) {
  torch::NoGradGuard no_grad;
  model->eval();
  const torch::Device device = model->parameters().front().device();
  std::vector<Utterance> subset(valid.begin(), valid.begin() + std::min(max, valid.size()));
  const Vocabulary& vocab = model->config().vocab;
  std::vector<int> class_symbol(static_cast<size_t>(vocab.size()), 0);
  if (lm)
    for (size_t k = 0; k < vocab.chars.size(); ++k) class_symbol[k + 1] = lm->Symbol(vocab.chars[k]);
  std::vector<std::string> refs, hyps, greedy;
  for (const auto& idx : MakeBatches(subset, batch_seconds)) {
    torch::Tensor pcm, lengths, frames;
    MakeBatchTensors(subset, idx, &pcm, &lengths);
    torch::Tensor feats = LogMel(pcm.to(device), lengths, &frames);
    auto [lp, out_frames] = model->forward(feats, frames);
    auto text = GreedyDecode(lp, out_frames, vocab);
    torch::Tensor lpc = lm ? lp.to(torch::kFloat32).to(torch::kCPU).contiguous() : torch::Tensor();
    for (size_t b = 0; b < idx.size(); ++b) {
      refs.push_back(subset[idx[b]].text);
      greedy.push_back(text[b]);
      if (lm) {
        const int64_t n = std::min(out_frames[static_cast<int64_t>(b)].item<int64_t>(), lpc.size(1));
        auto ids = CtcBeamSearch(lpc[static_cast<int64_t>(b)].data_ptr<float>(), n, lpc.size(2), class_symbol, lm, beam);
        hyps.push_back(NormalizeText(vocab.Decode(ids)));
      }
    }
  }
  model->train();
  Evaluation e;
  e.greedy_cer = CharErrorRate(refs, greedy);
  e.greedy_wer = WordErrorRate(refs, greedy);
  e.cer = lm ? CharErrorRate(refs, hyps) : e.greedy_cer;
  e.wer = lm ? WordErrorRate(refs, hyps) : e.greedy_wer;
  return e;
}

struct Position {
  int64_t step = 0;  // steps done
  int64_t epoch = 0;
  int64_t batch = 0;  // next batch index within the epoch's order
  double best_cer = 1;
  double last_cer = -1;
  double train_seconds = 0;
  // Of train_seconds, the time spent making batches on the host (reading, perturbing and padding
  // the audio): on a GPU, the time the device waits for them.
  double prepare_seconds = 0;
};

std::string SaveCheckpoint(CtcModel& model, torch::optim::Adam& opt, const Position& pos, const std::mt19937_64& rng,
                           const TrainSpec& spec) {
  torch::serialize::OutputArchive ar;
  ar.write("config", c10::IValue(model->config().ToJson()));
  torch::serialize::OutputArchive weights, optim;
  model->save(weights);
  opt.save(optim);
  ar.write("model", weights);
  ar.write("optimizer", optim);
  std::ostringstream r;
  r << rng;
  json meta = {{"step", pos.step}, {"epoch", pos.epoch}, {"batch", pos.batch}, {"best_cer", pos.best_cer},
               {"last_cer", pos.last_cer}, {"train_seconds", pos.train_seconds},
               {"prepare_seconds", pos.prepare_seconds}, {"rng", r.str()},
               {"spec", spec.ToJson()}};
  ar.write("meta", c10::IValue(meta.dump()));
  std::ostringstream os;
  ar.save_to(os);
  return os.str();
}

// `spec_json`, when given, must name the training the checkpoint was saved by: a worker's checkpoints
// are keyed by job id, and a broker that lost its journal numbers jobs from 1 again. A checkpoint
// of another training is refused with NotFound before anything is loaded.
Status LoadCheckpoint(const std::string& bytes, CtcModel& model, torch::optim::Adam& opt, Position* pos,
                      std::mt19937_64* rng, const std::string* spec_json = nullptr) {
  try {
    torch::serialize::InputArchive ar;
    ar.load_from(bytes.data(), bytes.size(), torch::Device(torch::kCPU));  // saved on a GPU, read anywhere
    c10::IValue m;
    ar.read("meta", m);
    json meta = json::parse(m.toStringRef());
    if (spec_json) {
      // What names a training, not every setting: a newer worker may write more settings.
      json saved = json::parse(meta.value("spec", std::string("{}")), nullptr, false);
      json want = json::parse(*spec_json, nullptr, false);
      for (const char* k : {"name", "manifest", "valid", "init"}) {
        if (saved.is_discarded() || !saved.is_object() || saved.value(k, json()) != want.value(k, json())) {
          return Status::NotFound(std::string("the checkpoint is of another training under the same job id (its ") + k +
                                  " differs)");
        }
      }
      // Nor weights of another shape (they would be swapped in unchecked and fail in the first
      // forward pass). Only settings the checkpoint records: an older one may lack some.
      for (const char* k : {"channels", "hidden", "layers", "residual"}) {
        if (saved.contains(k) && saved[k] != want.value(k, json())) {
          return Status::NotFound(std::string("the checkpoint is of a network of another shape under the same job id "
                                              "(its ") + k + " differs)");
        }
      }
    }
    torch::serialize::InputArchive weights, optim;
    ar.read("model", weights);
    model->load(weights);
    ar.read("optimizer", optim);
    opt.load(optim);
    pos->step = meta["step"];
    pos->epoch = meta["epoch"];
    pos->batch = meta["batch"];
    pos->best_cer = meta["best_cer"];
    pos->last_cer = meta["last_cer"];
    pos->train_seconds = meta["train_seconds"];
    pos->prepare_seconds = meta.value("prepare_seconds", 0.0);  // absent from older checkpoints
    std::istringstream r(meta["rng"].get<std::string>());
    r >> *rng;
  } catch (const std::exception& e) {
    return Status::Corruption(std::string("checkpoint unreadable: ") + e.what());
  }
  return Status::Ok();
}

// The ranks of a data-parallel gang: a TCPStore served by rank 0 at the rendezvous address and a
// process group over it: Gloo for ranks on CPUs, NCCL for ranks on GPUs (each rank on its own
// GPU). libtorch errors (a rank that died, a timeout) become Unavailable.
class Gang {
 public:
  // How long a rank waits in a step's all-reduce for the others. Rank 0 validates (valid_max
  // utterances) and publishes checkpoints (tens of MB to PostgreSQL) between steps while the
  // others wait: 30 s was less than that takes for a large model on a CPU, and every such
  // step requeued the gang. With Gloo a rank that dies closes its connections, which ends the
  // wait at once; NCCL waits the timeout out.
  static constexpr std::chrono::seconds kCollectiveTimeout{600};
  static Status Join(const std::string& rendezvous, const std::string& local_host, int rank, int world,
                     const torch::Device& device, const std::atomic<bool>* cancelled,
                     const std::atomic<bool>* stopping, std::unique_ptr<Gang>* out) {
#if !ASRF_TORCH_NCCL
    if (device.is_cuda()) {
      return Status::Unavailable("a gang on " + device.str() +
                                 " needs NCCL, and this worker was built without it (a CPU-only libtorch, no nccl.h, "
                                 "or -DASRF_NCCL=OFF): train on cpu, or build against a CUDA libtorch");
    }
#endif
#if !ASRF_TORCH_GLOO
    if (!device.is_cuda()) {
      return Status::Unavailable("a gang on " + device.str() +
                                 " needs Gloo, and this worker was built without it (-DASRF_GLOO=OFF): train "
                                 "with --world-size 1, or use workers built with Gloo");
    }
#endif
    size_t colon = rendezvous.rfind(':');
    if (colon == std::string::npos) return Status::Invalid("bad rendezvous \"" + rendezvous + "\"");
    auto g = std::make_unique<Gang>();
    g->rank_ = rank;
    g->world_ = world;
    const std::string host = rendezvous.substr(0, colon);
    try {
      c10d::TCPStoreOptions o;
      o.port = static_cast<uint16_t>(std::stoi(rendezvous.substr(colon + 1)));
      o.isServer = rank == 0;
      o.numWorkers = world;
      o.waitWorkers = false;
      o.timeout = std::chrono::seconds(10);  // ranks are placed together; a missing rank 0 is gone
      g->store_ = c10::make_intrusive<c10d::TCPStore>(host, o);
      // Rank 0's store answers within the store's timeout, or what listens there is not it (a
      // reply-less socket would hold a rank's add() for ever).
      if (rank == 0) g->store_->set("asrf/rank0", std::vector<uint8_t>{1});
      else g->store_->wait({"asrf/rank0"});
    } catch (const std::exception& e) {
      return Status::Busy(std::string("gang rendezvous at ") + rendezvous + " failed: " + e.what());
    }
    // Every rank at the store before the process group forms: forming it waits for all ranks
    // without hearing a cancel, for the whole collective timeout, and a gang can be placed on a
    // worker that died a moment before the broker noticed (its other ranks then sat here for ten
    // minutes, holding their workers, after the broker had cancelled them).
    ASRF_RETURN_IF_ERROR(g->WaitForAll("asrf/joined", cancelled, stopping));
    try {
#if ASRF_TORCH_NCCL
      if (device.is_cuda()) {
        auto po = c10d::ProcessGroupNCCL::Options::create();
        po->timeout = kCollectiveTimeout;
        g->nccl_ = c10::make_intrusive<c10d::ProcessGroupNCCL>(g->store_, rank, world, po);
      }
#endif
#if ASRF_TORCH_GLOO
      if (!device.is_cuda()) {
        auto po = c10d::ProcessGroupGloo::Options::create();
        po->timeout = kCollectiveTimeout;
        // The device binds an address of this machine: its own, never rank 0's (which another
        // machine cannot bind, so gangs across machines never formed and were placed again for ever).
        std::string local = local_host;
        if (local.empty()) {
          char name[256] = {0};
          gethostname(name, sizeof(name) - 1);
          local = name;
        }
        po->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(rank == 0 ? host : local));
        g->pg_ = c10::make_intrusive<c10d::ProcessGroupGloo>(g->store_, rank, world, po);
      }
#endif
    } catch (const std::exception& e) {
      // Busy: the job goes back to the broker without an attempt, and the gang is placed again on
      // another rendezvous port (a port another process holds must not fail a training run).
      return Status::Busy(std::string("gang rendezvous at ") + rendezvous + " failed: " + e.what());
    }
    *out = std::move(g);
    return Status::Ok();
  }
  // Sums `t` over the ranks, in place (on the CPU for Gloo, on the rank's GPU for NCCL).
  Status AllReduceSum(torch::Tensor& t) {
    try {
      std::vector<at::Tensor> v = {t};
#if ASRF_TORCH_NCCL
      if (nccl_) {
        nccl_->allreduce(v)->wait();
        return Status::Ok();
      }
#endif
#if ASRF_TORCH_GLOO
      if (pg_) {
        pg_->allreduce(v)->wait();
        return Status::Ok();
      }
#endif
    } catch (const std::exception& e) {
      return Status::Unavailable(std::string("gang member lost: ") + e.what());
    }
    return Status::Unavailable("the gang has no process group");
  }
  // The gang's last word, so that ranks report their ends together: rank 0, once it has
  // validated, saved and registered the model (`ok`) or failed at it, says which and waits (up
  // to a minute) for every other rank to have heard it. The others wait for it for as long as
  // rank 0 lives. Rank 0 lost here: Unavailable, and that rank gives its job back (the gang runs
  // again). Rank 0 failed: *rank0_failed, and that rank waits for the broker to cancel it, since rank
  // 0's failure ends the gang (a rank given back instead would requeue the gang, rank 0 too,
  // for as long as the cause lasts).
  Status Finish(bool ok, const std::atomic<bool>* cancelled, bool* rank0_failed) {
    *rank0_failed = false;
    const std::string finished = "asrf/finished";
    try {
      if (rank_ == 0) {
        store_->set(finished, std::vector<uint8_t>{static_cast<uint8_t>(ok ? 1 : 0)});
        Heard(finished, 60000);
        return Status::Ok();
      }
      while (!store_->check({finished})) {
        if (cancelled && cancelled->load()) return Status::Unavailable("cancelled");
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
      }
      std::vector<uint8_t> v = store_->get(finished);
      Heard(finished, 0);
      *rank0_failed = v.empty() || v[0] != 1;
    } catch (const std::exception& e) {
      if (rank_ == 0) return Status::Ok();  // its own part is done; a lost rank ends as the broker decides
      return Status::Unavailable(std::string("rank 0 lost before the end of the training: ") + e.what());
    }
    return Status::Ok();
  }
  // Waits, for as long as it takes, until every rank has arrived here (each rank's own pace, e.g.
  // loading its audio). Cancelled: Unavailable; the worker draining: Busy (the job goes back);
  // rank 0's store lost: Busy (the gang runs again).
  Status WaitForAll(const std::string& key, const std::atomic<bool>* cancelled, const std::atomic<bool>* stopping) {
    try {
      store_->add(key, 1);
      while (store_->add(key, 0) < world_) {
        const bool gone = cancelled && cancelled->load(), leaving = stopping && stopping->load();
        if (gone || leaving) {
          // Counted out again: a rank arriving later must not take this one for present.
          try {
            store_->add(key, -1);
          } catch (const std::exception&) {
          }
          if (gone) return Status::Unavailable("cancelled");
          return Status::Busy("interrupted while the gang's ranks got ready");
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
      }
    } catch (const std::exception& e) {
      return StoreLost(std::string("gang lost while its ranks got ready: ") + e.what(), cancelled);
    }
    return Status::Ok();
  }
  // A gang member is gone (rank 0's store, or a peer in the all-reduce: its worker died, or it
  // failed: a file it cannot read, a damaged checkpoint). The broker cancels this rank once it
  // hears: wait a little for that rather than give the job back at once, which could reach the
  // broker first and requeue the gang, the other's failure with it, for ever. Nor a failure of
  // this rank's own, which would end the gang for good.
  static Status StoreLost(const std::string& what, const std::atomic<bool>* cancelled, int64_t wait_ms = 10000) {
    for (int64_t until = MonoMs() + wait_ms; MonoMs() < until;) {
      if (cancelled && cancelled->load()) return Status::Unavailable("cancelled");
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return Status::Busy(what);
  }
  // Rank `from` hands `bytes` to every rank (e.g. the training state all ranks start from). The
  // others wait for it as long as rank 0's store lives: `from` may first fetch a published
  // checkpoint of tens of MB.
  Status Share(const std::string& key, std::string* bytes, const std::atomic<bool>* cancelled, int from = 0) {
    try {
      if (rank_ == from) {
        store_->set(key, std::vector<uint8_t>(bytes->begin(), bytes->end()));
      } else {
        while (!store_->check({key})) {
          if (cancelled && cancelled->load()) return Status::Unavailable("cancelled");
          std::this_thread::sleep_for(std::chrono::milliseconds(100));
        }
        std::vector<uint8_t> v = store_->get(key);
        bytes->assign(v.begin(), v.end());
      }
    } catch (const std::exception& e) {
      return StoreLost(std::string("gang state exchange failed: ") + e.what(), cancelled);
    }
    return Status::Ok();
  }
  // Every rank's `mine`, by rank, in *all (each rank gives its own first, then reads the others').
  Status Gather(const std::string& key, int64_t mine, std::vector<int64_t>* all, const std::atomic<bool>* cancelled) {
    all->assign(static_cast<size_t>(world_), 0);
    std::string own = std::to_string(mine);
    ASRF_RETURN_IF_ERROR(Share(key + "/" + std::to_string(rank_), &own, cancelled, rank_));
    for (int r = 0; r < world_; ++r) {
      std::string v = own;
      if (r != rank_) ASRF_RETURN_IF_ERROR(Share(key + "/" + std::to_string(r), &v, cancelled, r));
      try {
        (*all)[static_cast<size_t>(r)] = std::stoll(v);
      } catch (const std::exception&) {
        return Status::Busy("gang exchange: rank " + std::to_string(r) + " sent \"" + v + "\"");
      }
    }
    return Status::Ok();
  }
  // After Share(key) from rank 0: the other ranks say they have it, and rank 0 waits (up to
  // `wait_ms`) until all have, so that its store, closed when it returns, outlives their reads.
  void Heard(const std::string& key, int64_t wait_ms) {
    try {
      if (rank_ != 0) {
        store_->add(key + "/heard", 1);
        return;
      }
      for (int64_t until = MonoMs() + wait_ms; MonoMs() < until;) {
        if (store_->add(key + "/heard", 0) >= world_ - 1) return;
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
      }
    } catch (const std::exception&) {
    }
  }

 private:
  int rank_ = 0, world_ = 1;
  c10::intrusive_ptr<c10d::TCPStore> store_;
#if ASRF_TORCH_GLOO
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg_;
#endif
#if ASRF_TORCH_NCCL
  c10::intrusive_ptr<c10d::ProcessGroupNCCL> nccl_;
#endif
};

// The training device (worker/device.h), made current for the CUDA runtime (NCCL uses it).
Status TrainingDevice(const std::string& spec, torch::Device* out) {
  ASRF_RETURN_IF_ERROR(ParseDevice(spec.empty() ? "cpu" : spec, out).WithContext("training"));
#if ASRF_HAVE_CUDA
  if (out->is_cuda()) cudaSetDevice(out->index());
#endif
  return Status::Ok();
}

// After a checkpoint is read (onto the CPU): the weights and Adam's moments back on `device`.
void PlaceOnDevice(CtcModel& model, torch::optim::Adam& opt, const torch::Device& device) {
  model->to(device);
  for (auto& [key, state] : opt.state()) {
    auto& s = static_cast<torch::optim::AdamParamState&>(*state);
    if (s.exp_avg().defined()) s.exp_avg(s.exp_avg().to(device));
    if (s.exp_avg_sq().defined()) s.exp_avg_sq(s.exp_avg_sq().to(device));
    if (s.max_exp_avg_sq().defined()) s.max_exp_avg_sq(s.max_exp_avg_sq().to(device));
  }
}

}  // namespace

bool GangBackendBuilt(bool on_gpu) {
#if ASRF_TORCH_NCCL
  if (on_gpu) return true;
#endif
#if ASRF_TORCH_GLOO
  if (!on_gpu) return true;
#endif
  return false;
}

Status RunTraining(const TrainSpec& spec, const TrainContext& ctx, std::string* result) {
  if (!spec.out.empty() && !spec.evaluate_only) ASRF_RETURN_IF_ERROR(CheckModelOut(spec.out));  // before hours of training
  if (ctx.threads > 0) torch::set_num_threads(ctx.threads);
  torch::manual_seed(spec.seed);  // the initial weights, reproducibly
  CtcModelConfig config;
  config.channels = spec.channels;
  config.hidden = spec.hidden;
  config.layers = spec.layers;
  config.residual = spec.residual;
  config.dropout = spec.dropout;
  CtcModel model(config);
  if (!spec.init.empty()) {
    ASRF_RETURN_IF_ERROR(LoadModel(spec.init, &model));
    // 0 keeps the init model's blocks; GrowResidual refuses fewer than it has.
    const int64_t had = model->config().residual;
    if (spec.residual > 0 && spec.residual != had) {
      ASRF_RETURN_IF_ERROR(GrowResidual(model, spec.residual, &model));
      LogInfo("model_grown").Kv("job", ctx.job_id).Kv("residual_from", had).Kv("residual", spec.residual);
    }
  }
  torch::Device device(torch::kCPU);
  ASRF_RETURN_IF_ERROR(TrainingDevice(ctx.device, &device));
  model->to(device);
  const Vocabulary& vocab = model->config().vocab;

  if (spec.evaluate_only) {
    CharLm lm;  // first: a bad path fails before any audio is read
    if (!spec.lm.empty()) ASRF_RETURN_IF_ERROR(CharLm::Load(spec.lm, &lm));
    std::vector<ManifestItem> items;
    ASRF_RETURN_IF_ERROR(ReadManifest(spec.valid, vocab.chars, spec.max_seconds, &items));
    std::vector<Utterance> data;
    ASRF_RETURN_IF_ERROR(LoadAll(items, vocab, ctx, spec.valid, &data));
    double hours = 0;
    for (const auto& u : data) hours += u.pcm.size() / static_cast<double>(kSampleRate) / 3600.0;
    BeamOptions beam;
    beam.beam = spec.beam;
    beam.lm_weight = spec.lm_weight;
    beam.char_bonus = spec.char_bonus;
    beam.oov_penalty = spec.oov_penalty;
    Evaluation e = Evaluate(model, data, data.size(), spec.batch_seconds, spec.lm.empty() ? nullptr : &lm, beam);
    json r = {{"model", spec.init}, {"valid", spec.valid}, {"utterances", data.size()}, {"hours", hours},
              {"valid_cer", e.cer}, {"valid_wer", e.wer}, {"residual", model->config().residual}};
    if (!spec.lm.empty()) {
      r["lm"] = spec.lm;
      r["greedy_cer"] = e.greedy_cer;
      r["greedy_wer"] = e.greedy_wer;
    }
    *result = r.dump();
    return Status::Ok();
  }

  // A gang's ranks meet first, while they start together: loading the audio takes minutes on a
  // large corpus, and not the same on every machine (they met after it, with a 10 s connect
  // timeout, so a gang whose ranks loaded at different speeds was requeued, and loaded again,
  // for ever).
  const int world = std::max(1, ctx.world_size), rank = ctx.rank;
  std::unique_ptr<Gang> gang;
  if (world > 1) {
    ASRF_RETURN_IF_ERROR(Gang::Join(ctx.rendezvous, ctx.local_host, rank, world, device, ctx.cancelled, ctx.stopping,
                                    &gang));
    LogInfo("gang_joined").Kv("job", ctx.job_id).Kv("rank", rank).Kv("world", world).Kv("rendezvous", ctx.rendezvous);
  }
  // Check both manifests completely before any training.
  std::vector<ManifestItem> train_items, valid_items;
  ASRF_RETURN_IF_ERROR(ReadManifest(spec.manifest, vocab.chars, spec.max_seconds, &train_items, /*for_training=*/true));
  ASRF_RETURN_IF_ERROR(ReadManifest(spec.valid, vocab.chars, spec.max_seconds, &valid_items));
  // A validation text the model also trains on makes the validation figure a memory test: counted,
  // warned about and reported, not refused (a user may mean it).
  uint64_t valid_seen = 0;
  {
    std::unordered_set<std::string> train_texts;
    for (const auto& it : train_items) train_texts.insert(it.text);
    std::string example;
    for (const auto& it : valid_items) {
      if (!train_texts.count(it.text)) continue;
      if (valid_seen++ == 0) example = it.text;
    }
    if (valid_seen > 0 && rank == 0) {
      LogWarn("valid_texts_in_training").Kv("job", ctx.job_id).Kv("utterances", valid_seen)
          .Kv("of", static_cast<uint64_t>(valid_items.size())).Kv("example", example);
    }
  }
  std::vector<Utterance> train, valid;
  ASRF_RETURN_IF_ERROR(LoadAll(train_items, vocab, ctx, spec.manifest, &train));
  ASRF_RETURN_IF_ERROR(LoadAll(valid_items, vocab, ctx, spec.valid, &valid));
  if (gang) ASRF_RETURN_IF_ERROR(gang->WaitForAll("asrf/loaded", ctx.cancelled, ctx.stopping));
  double hours = 0;
  for (const auto& u : train) hours += u.pcm.size() / static_cast<double>(kSampleRate) / 3600.0;
  std::vector<std::vector<size_t>> batches = MakeBatches(train, spec.batch_seconds);

  torch::optim::Adam opt(model->parameters(), torch::optim::AdamOptions(spec.lr).eps(spec.adam_eps));
  Position pos;
  std::mt19937_64 rng(spec.seed);
  int64_t ckpt_step = 0;
  std::string ckpt;
  bool resumed = false;
  const std::string spec_json = spec.ToJson();
  // Rank 0 could not read its checkpoints and has nothing to fall back on: the job fails, unless
  // another rank of its gang holds a newer checkpoint.
  Status rank0_error = Status::Ok();
  if (rank == 0) {
    // The newest of this worker's own checkpoint and the published one (the job may have run
    // further on another worker since this one last held it); the other one if that fails. A
    // checkpoint of another training under the same job id is skipped, and a local one dropped,
    // or it would outrank (and, kept as the newest, delete) every checkpoint this job writes.
    bool local = ctx.store && ctx.store->Latest(ctx.job_id, &ckpt_step, &ckpt).ok();
    std::string published;
    int64_t published_step = 0;
    bool newer = ctx.fetch_published && ctx.fetch_published(local ? ckpt_step : -1, &published_step, &published);
    bool published_tried = false;
    auto try_published = [&]() -> Status {
      published_tried = true;
      Status ls = LoadCheckpoint(published, model, opt, &pos, &rng, &spec_json);
      if (ls.ok()) {
        LogInfo("train_resuming_from_published").Kv("job", ctx.job_id).Kv("step", published_step)
            .Kv("local_step", local ? ckpt_step : -1).Kv("bytes", static_cast<uint64_t>(published.size()));
      } else {
        LogWarn(ls.code() == Status::Code::kNotFound ? "checkpoint_ignored" : "checkpoint_unreadable")
            .Kv("job", ctx.job_id).Kv("published_step", published_step).Kv("error", ls.message());
      }
      return ls;
    };
    Status ls = Status::NotFound("no checkpoint");
    if (newer) ls = try_published();
    if (!ls.ok() && local) {
      ls = LoadCheckpoint(ckpt, model, opt, &pos, &rng, &spec_json);
      if (!ls.ok()) {
        LogWarn(ls.code() == Status::Code::kNotFound ? "checkpoint_ignored" : "checkpoint_unreadable")
            .Kv("job", ctx.job_id).Kv("step", ckpt_step).Kv("error", ls.message());
      }
      if (ls.code() == Status::Code::kNotFound) ASRF_RETURN_IF_ERROR(ctx.store->Drop(ctx.job_id));
      if (!ls.ok() && ls.code() != Status::Code::kNotFound && !published_tried && ctx.fetch_published &&
          ctx.fetch_published(-1, &published_step, &published)) {
        ls = try_published();  // this worker's own copy is damaged: an older published one beats losing the job
      }
    }
    // Nothing usable of this training: start afresh. A damaged checkpoint with nothing to fall
    // back on fails the job rather than silently starting over.
    if (ls.code() == Status::Code::kNotFound) ls = Status::Ok();
    else if (ls.ok()) resumed = true;
    if (!gang) ASRF_RETURN_IF_ERROR(ls);
    rank0_error = ls;
    if (resumed) PlaceOnDevice(model, opt, device);
  }
  uint64_t rank0_job = ctx.job_id;
  if (gang) {
    // Checkpoints are rank 0's, keyed by its job id, and the worker holding the newest may run
    // another rank this time (the gang placed again on workers in another order): every rank
    // offers what its own store has of rank 0's job, and the gang starts from the newest.
    std::string job0 = std::to_string(ctx.job_id);
    ASRF_RETURN_IF_ERROR(gang->Share("job0/" + ctx.rendezvous, &job0, ctx.cancelled));
    rank0_job = std::stoull(job0);
    int64_t mine = rank == 0 ? (rank0_error.ok() ? pos.step : -1) : -1;
    if (rank != 0 && ctx.store && ctx.store->Latest(rank0_job, &ckpt_step, &ckpt).ok()) {
      Status ls = LoadCheckpoint(ckpt, model, opt, &pos, &rng, &spec_json);
      if (ls.ok()) {
        mine = pos.step;
      } else {
        LogWarn(ls.code() == Status::Code::kNotFound ? "checkpoint_ignored" : "checkpoint_unreadable")
            .Kv("job", ctx.job_id).Kv("rank0_job", rank0_job).Kv("step", ckpt_step).Kv("error", ls.message());
        if (ls.code() == Status::Code::kNotFound) {
          Status ds = ctx.store->Drop(rank0_job);  // another training's: of no use to anyone
          if (!ds.ok()) LogWarn("checkpoint_drop_failed").Kv("job", rank0_job).Kv("error", ds.message());
        }
      }
    }
    std::vector<int64_t> steps;
    ASRF_RETURN_IF_ERROR(gang->Gather("resume/" + ctx.rendezvous, mine, &steps, ctx.cancelled));
    int from = 0;
    for (int r = 1; r < world; ++r) {
      if (steps[static_cast<size_t>(r)] > steps[static_cast<size_t>(from)]) from = r;
    }
    if (steps[static_cast<size_t>(from)] <= 0) from = 0;
    if (from == 0 && steps[0] < 0) {
      // Rank 0 failed (its error fails the job, and the broker then cancels the gang): the
      // others wait for that cancel rather than give their jobs back and requeue the gang.
      if (rank == 0) return rank0_error;
      return Gang::StoreLost("rank 0 could not read its checkpoints, and no cancel came", ctx.cancelled, 120000);
    }
    if (from != 0 && rank == 0) {
      LogInfo("train_resuming_from_rank").Kv("job", ctx.job_id).Kv("from_rank", from)
          .Kv("step", steps[static_cast<size_t>(from)]).Kv("own_step", steps[0]);
    }
    // Every rank starts from one state: weights, optimizer, position, random generator.
    if (rank == from && from != 0) PlaceOnDevice(model, opt, device);
    std::string state = rank == from ? SaveCheckpoint(model, opt, pos, rng, spec) : std::string();
    ASRF_RETURN_IF_ERROR(gang->Share("state/" + ctx.rendezvous, &state, ctx.cancelled, from));
    if (rank != from) ASRF_RETURN_IF_ERROR(LoadCheckpoint(state, model, opt, &pos, &rng));
    if (rank != from) PlaceOnDevice(model, opt, device);
    resumed = pos.step > 0;
    // Each rank its own random draws (augmentation): the shared generator, told apart by rank
    // (the ranks drew the same perturbations for their different batches). Deterministic from
    // the checkpoint, which holds rank 0's generator.
    const uint64_t base = rng();
    std::seed_seq per_rank{static_cast<uint32_t>(base), static_cast<uint32_t>(base >> 32), static_cast<uint32_t>(rank)};
    rng.seed(per_rank);
  }
  // Dropout draws from torch's generator: seeded from ours, so that a resumed run (or another
  // rank) does not repeat the masks a fresh process starts with.
  torch::manual_seed(rng());
  if (resumed) {
    LogInfo("train_resumed").Kv("job", ctx.job_id).Kv("step", pos.step).Kv("epoch", pos.epoch).Kv("rank", rank);
  } else {
    LogInfo("train_started")
        .Kv("job", ctx.job_id)
        .Kv("utterances", static_cast<uint64_t>(train.size()))
        .Kv("hours", hours)
        .Kv("batches_per_epoch", static_cast<uint64_t>(batches.size()));
  }
  const int64_t resumed_at = pos.step;
  // Per-utterance losses; each step's loss is their mean over every rank's utterances (summed
  // here, divided by the gang's count after the all-reduce).
  torch::nn::CTCLoss ctc(torch::nn::CTCLossOptions().blank(0).zero_infinity(true).reduction(torch::kNone));
  int ckpt_count = 0;
  model->train();
  std::vector<size_t> order = EpochOrder(batches.size(), spec.seed, pos.epoch);
  int64_t t_start = MonoMs();
  double loss_avg = -1;
  // The mean transcript length of the training data, in characters (for background-only batches).
  double corpus_chars = 1;
  if (!train.empty()) {
    double chars = 0;
    for (const Utterance& u : train) chars += static_cast<double>(u.ids.size());
    corpus_chars = chars / static_cast<double>(train.size());
  }
  int64_t skipped = 0;
  // `always_publish`: the worker is stopping and gives the job back; whichever worker takes it
  // next resumes from here, not from an older published checkpoint.
  // `at_rng`: the random generator to save, when it is not the current one.
  auto checkpoint = [&](const char* why, bool always_publish = false,
                        const std::mt19937_64* at_rng = nullptr) -> Status {
    if (!ctx.store || rank != 0) return Status::Ok();
    std::string bytes = SaveCheckpoint(model, opt, pos, at_rng ? *at_rng : rng, spec);
    ASRF_RETURN_IF_ERROR(ctx.store->Put(ctx.job_id, pos.step, bytes, spec.keep));
    ++ckpt_count;
    bool publish = spec.publish_every > 0 && (always_publish || ckpt_count % spec.publish_every == 0);
    if (ctx.checkpoint_saved) ctx.checkpoint_saved(pos.step, loss_avg, pos.last_cer, bytes, publish);
    LogInfo("checkpoint_saved").Kv("job", ctx.job_id).Kv("step", pos.step).Kv("why", why)
        .Kv("bytes", static_cast<uint64_t>(bytes.size()));
    return Status::Ok();
  };
  while (pos.step < spec.steps) {
    if (ctx.cancelled && ctx.cancelled->load()) return Status::Unavailable("cancelled");
    // A worker that drains stops its job at a step's start. In a gang the other ranks hear it
    // through that step's all-reduce (the step is then not taken) and rank 0 checkpoints there,
    // whichever rank's worker stops: the gang, placed again, does not do those steps again.
    const bool stopping_here = ctx.stopping && ctx.stopping->load();
    if (stopping_here && !gang) {
      ASRF_RETURN_IF_ERROR(checkpoint("worker stopping", /*always_publish=*/true));
      return Status::Busy("interrupted at step " + std::to_string(pos.step) + "; resumes from this checkpoint");
    }
    // A step not taken (a gang's worker stopping) leaves the generator as it found it.
    const std::mt19937_64 rng_at_step = rng;
    if (pos.batch >= static_cast<int64_t>(order.size())) {
      pos.epoch++;
      pos.batch = 0;
      order = EpochOrder(batches.size(), spec.seed, pos.epoch);
    }
    int64_t t0 = MonoMs();
    // This rank's share of the step: `combine` batches, disjoint from the other ranks'. Each goes
    // through the model on its own, padded to its own longest utterance as a rank's would be
    // (padded together, a bucket of short clips took the length of a bucket of long ones), and
    // their gradients add up.
    opt.zero_grad();
    double local_sum = 0;
    bool local_finite = true;
    size_t utterances = 0;
    for (int c = 0; c < spec.combine && !stopping_here; ++c) {
      size_t k = static_cast<size_t>(pos.batch + rank * spec.combine + c) % order.size();
      const std::vector<size_t>& idx = batches[order[k]];
      utterances += idx.size();
      torch::Tensor pcm, lengths, frames;
      std::vector<char> silent;
      const int64_t prep_us = MonoUs();
      MakeBatchTensors(train, idx, &pcm, &lengths, &rng,
                       {spec.speed_perturb, spec.lowpass, spec.reverb, spec.noise, spec.nonspeech, spec.pad_background},
                       &silent);
      pos.prepare_seconds += static_cast<double>(MonoUs() - prep_us) / 1e6;
      torch::Tensor feats = LogMel(pcm.to(device), lengths, &frames);
      if (spec.vtlp > 0) Vtlp(feats, rng, spec.vtlp);
      if (spec.spec_augment) SpecAugment(feats, frames, rng);
      std::vector<int64_t> targets, target_lengths;
      std::vector<double> per_char;  // what each utterance's loss is divided by
      int64_t spoken = 0, spoken_chars = 0;
      for (size_t b = 0; b < idx.size(); ++b) {
        const std::vector<int64_t>& ids = train[idx[b]].ids;
        if (!silent[b]) {
          targets.insert(targets.end(), ids.begin(), ids.end());
          ++spoken;
          spoken_chars += static_cast<int64_t>(ids.size());
        }
        target_lengths.push_back(silent[b] ? 0 : static_cast<int64_t>(ids.size()));
      }
      // Losses are per character. An empty transcript (background alone) weighs what an average
      // transcript of its batch weighs (of the corpus, when the batch has none): its whole loss
      // divided by that many characters.
      const double typical =
          spoken > 0 ? static_cast<double>(spoken_chars) / static_cast<double>(spoken) : corpus_chars;
      for (int64_t n : target_lengths) per_char.push_back(n > 0 ? static_cast<double>(n) : std::max(typical, 1.0));
      auto [lp, out_frames] = model->forward(feats, frames);
      torch::Tensor tl = torch::tensor(target_lengths, torch::kInt64);
      torch::Tensor per = ctc(CtcModelImpl::ForCtc(lp, out_frames), torch::tensor(targets, torch::kInt64).to(device),
                              out_frames, tl);
      torch::Tensor loss_sum = (per / torch::tensor(per_char, torch::kFloat64).to(per.device(), per.dtype())).sum();
      double v = loss_sum.item<double>();
      if (!std::isfinite(v)) {
        local_finite = false;  // the step is skipped on every rank; no need to go on
        break;
      }
      local_sum += v;
      loss_sum.backward();
    }
    // One all-reduce per step: every gradient, then [stopping ranks, non-finite ranks, loss sum,
    // utterances].
    std::vector<torch::Tensor> params = model->parameters();
    std::vector<torch::Tensor> parts;
    for (auto& p : params) {
      if (!p.grad().defined()) p.mutable_grad() = torch::zeros_like(p);
      parts.push_back(p.grad().reshape({-1}));
    }
    parts.push_back(torch::tensor({stopping_here ? 1.0f : 0.0f, local_finite ? 0.0f : 1.0f,
                                   local_finite ? static_cast<float>(local_sum) : 0.0f, static_cast<float>(utterances)})
                        .to(device));
    torch::Tensor flat = torch::cat(parts);
    if (gang) {
      Status gst = gang->AllReduceSum(flat);
      if (!gst.ok()) {
        LogWarn("gang_step_failed").Kv("job", ctx.job_id).Kv("rank", rank).Kv("step", pos.step).Kv("error", gst.message());
        // The broker's cancel comes first when the other rank failed (its failure ends or
        // retries the gang, counted) or its worker died: a job given back at once could reach the
        // broker before that failure, which it then refused, and the gang ran again uncounted,
        // for as long as the failure repeats.
        return Gang::StoreLost("gang member lost at step " + std::to_string(pos.step) + ": " + gst.message(),
                               ctx.cancelled);
      }
    }
    int64_t n_flat = flat.size(0);
    if (gang && flat[n_flat - 4].item<double>() > 0) {
      // A rank's worker stops: the step is not taken; rank 0 checkpoints the state before it, and
      // every rank waits for that before it gives its job back (the gang, placed again at once
      // elsewhere, would otherwise resume from an older checkpoint).
      std::string saved = "?";  // "0": rank 0 saved it, "1": it could not
      if (rank == 0) {
        saved = "0";
        Status cs = checkpoint(stopping_here ? "worker stopping" : "a rank's worker stopping", /*always_publish=*/true,
                               &rng_at_step);
        if (!cs.ok()) {
          LogWarn("checkpoint_failed").Kv("job", ctx.job_id).Kv("step", pos.step).Kv("error", cs.message());
          saved = "1";
        }
      }
      const std::string key = "stopped/" + std::to_string(pos.step);
      Status ss = gang->Share(key, &saved, ctx.cancelled);
      if (ss.ok()) gang->Heard(key, 30000);
      else LogWarn("gang_stop_unconfirmed").Kv("job", ctx.job_id).Kv("rank", rank).Kv("error", ss.message());
      if (ctx.cancelled && ctx.cancelled->load() && !stopping_here) return Status::Unavailable("cancelled");
      return Status::Busy("a worker of the gang stopped at step " + std::to_string(pos.step) +
                          (saved == "0" ? "; resumes from this checkpoint" : ""));
    }
    double bad_ranks = flat[n_flat - 3].item<double>(), total = flat[n_flat - 1].item<double>();
    double l = bad_ranks > 0 ? std::nan("") : flat[n_flat - 2].item<double>() / std::max(total, 1.0);
    {
      torch::NoGradGuard ng;
      int64_t off = 0;
      for (auto& p : params) {
        int64_t n = p.numel();
        p.mutable_grad().copy_(flat.narrow(0, off, n).view_as(p) / std::max(total, 1.0));
        off += n;
      }
    }
    double lr = LearningRate(spec, pos.step);
    bool applied = false;
    if (std::isfinite(l)) {
      double norm = torch::nn::utils::clip_grad_norm_(model->parameters(), spec.clip);
      if (std::isfinite(norm)) {
        for (auto& g : opt.param_groups()) static_cast<torch::optim::AdamOptions&>(g.options()).lr(lr);
        opt.step();
        applied = true;
      }
    }
    if (!applied) {
      // One bad batch must not poison the weights: skip it, keep count.
      opt.zero_grad();
      skipped++;
      LogWarn("train_step_skipped").Kv("job", ctx.job_id).Kv("step", pos.step).Kv("loss", l);
    }
    pos.step++;
    pos.batch += static_cast<int64_t>(world) * spec.combine;
    pos.train_seconds += (MonoMs() - t0) / 1000.0;
    if (std::isfinite(l)) loss_avg = loss_avg < 0 ? l : 0.9 * loss_avg + 0.1 * l;

    bool validate = rank == 0 && (pos.step % spec.valid_every == 0 || pos.step == spec.steps);
    if (validate) {
      Evaluation e = Evaluate(model, valid, static_cast<size_t>(spec.valid_max), spec.batch_seconds);
      pos.last_cer = e.cer;
      pos.best_cer = std::min(pos.best_cer, e.cer);
      LogInfo("validation").Kv("job", ctx.job_id).Kv("step", pos.step).Kv("cer", e.cer).Kv("wer", e.wer);
    }
    if (ctx.progress && (pos.step % 5 == 0 || validate || pos.step == resumed_at + 1)) {
      double per_step = (MonoMs() - t_start) / 1000.0 / std::max<int64_t>(1, pos.step - resumed_at);
      json p = {{"step", pos.step},        {"steps", spec.steps},  {"loss", std::isfinite(l) ? l : -1.0},
                {"skipped_steps", skipped},
                {"loss_avg", loss_avg},    {"lr", lr},             {"epoch", pos.epoch},
                {"eta_s", per_step * (spec.steps - pos.step)},     {"resumed_at", resumed_at}};
      if (pos.last_cer >= 0) p["valid_cer"] = pos.last_cer;
      ctx.progress(p.dump());
    }
    if (pos.step % spec.checkpoint_every == 0 && pos.step < spec.steps) ASRF_RETURN_IF_ERROR(checkpoint("interval"));
  }

  Evaluation final;
  std::string kept = ctx.state_dir + "/models/" + spec.name + ".pt";
  // Every exit from here reaches the gang's last word (Gang::Finish), failures included.
  auto end = [&]() -> Status {
    // The end state too, published: a job run again (its registration failed, its worker was
    // lost before the broker heard of its end) validates and registers without training again.
    if (pos.step > resumed_at) ASRF_RETURN_IF_ERROR(checkpoint("final", /*always_publish=*/true));
    if (rank == 0) final = Evaluate(model, valid, valid.size(), spec.batch_seconds);
    std::error_code ec;
    std::filesystem::create_directories(ctx.state_dir + "/models", ec);
    ASRF_RETURN_IF_ERROR(SaveModel(model, kept));
    if (!spec.out.empty() && rank == 0) {
      std::filesystem::path out(spec.out);
      if (out.has_parent_path()) std::filesystem::create_directories(out.parent_path(), ec);
      Status checked = CheckModelOut(spec.out);  // again: the path may have changed during the run
      if (!checked.ok()) return Status::Invalid(checked.message() + "; the model is kept at " + kept);
      ASRF_RETURN_IF_ERROR(SaveModel(model, spec.out));
    }
    json r = {{"name", spec.name},          {"steps", pos.step},
              {"valid_cer", final.cer},     {"valid_wer", final.wer},
              {"train_seconds", pos.train_seconds}, {"prepare_seconds", pos.prepare_seconds},
              {"utterances", train.size()},
              {"hours", hours},             {"final_loss", loss_avg},
              {"model", kept},              {"out", spec.out},
              {"resumed_at", resumed_at}, {"skipped_steps", skipped},
              {"rank", rank}, {"world_size", world}, {"residual", model->config().residual},
              {"valid_texts_in_training", valid_seen}};
    if (rank != 0) {
      r.erase("valid_cer");
      r.erase("valid_wer");
    }
    *result = r.dump();
    if (rank == 0 && ctx.model_finished) ASRF_RETURN_IF_ERROR(ctx.model_finished(kept, *result));
    return Status::Ok();
  };
  Status ended = end();
  if (gang) {
    bool rank0_failed = false;
    Status fs = gang->Finish(ended.ok(), ctx.cancelled, &rank0_failed);
    if (!fs.ok()) LogWarn("gang_finish_failed").Kv("job", ctx.job_id).Kv("rank", rank).Kv("error", fs.message());
    if (ended.ok() && rank0_failed) {
      LogWarn("gang_rank0_failed").Kv("job", ctx.job_id).Kv("rank", rank);
      // Rank 0's failure ends the gang: wait for the broker's cancel rather than give the job back.
      while (ctx.cancelled && !ctx.cancelled->load()) std::this_thread::sleep_for(std::chrono::milliseconds(200));
      return Status::Unavailable("cancelled");
    }
    if (ended.ok() && !fs.ok()) {
      if (ctx.cancelled && ctx.cancelled->load()) return Status::Unavailable("cancelled");
      return Status::Busy(fs.message());
    }
    // The model is registered: what this worker kept of rank 0's job from an earlier placement
    // (when it ran rank 0) is of no more use.
    if (ended.ok() && rank != 0 && ctx.store && !ctx.store->Steps(rank0_job).empty()) {
      Status ds = ctx.store->Drop(rank0_job);
      if (ds.ok()) LogInfo("checkpoints_dropped").Kv("job", rank0_job).Kv("why", "the gang's model is registered");
      else LogWarn("checkpoint_drop_failed").Kv("job", rank0_job).Kv("error", ds.message());
    }
  }
  ASRF_RETURN_IF_ERROR(ended);
  LogInfo("train_finished").Kv("job", ctx.job_id).Kv("cer", final.cer).Kv("wer", final.wer).Kv("steps", pos.step)
      .Kv("train_seconds", pos.train_seconds).Kv("prepare_seconds", pos.prepare_seconds);
  return Status::Ok();
}

}  // namespace asrf
