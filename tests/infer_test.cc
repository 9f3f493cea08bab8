// Inference (worker/acoustic_model.h) with the committed fixture model tests/fixtures/digits.pt on
// spoken numbers from asr-synth: it recognises them, its text is GreedyDecode's, results do not
// depend on micro-batching, word times and confidences are sane, short utterances give empty
// hypotheses, and bad files and devices fail with the documented codes. A TorchScript model built
// here (a fixed log-probability pattern) checks the TorchScript path and the timestamps exactly.
#include <gtest/gtest.h>
#include <algorithm>
#include <random>
#include <torch/script.h>
#include <torch/torch.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iostream>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "tests/harness.h"
#include "worker/acoustic_model.h"
#include "common/audio_in.h"
#include "worker/audio.h"
#include "worker/char_lm.h"
#include "worker/ctc_model.h"
#include "worker/features.h"

namespace asrf::testing {
namespace {

// Audio for models that ignore what they hear (pattern models): loud enough not to be taken for
// silence, which the transcription path skips without running the model (NoSpeech).
std::vector<int16_t> Audible(size_t n) {
  std::vector<int16_t> x(n);
  for (size_t i = 0; i < n; ++i) x[i] = static_cast<int16_t>(i % 2 ? 8000 : -8000);
  return x;
}

using json = nlohmann::json;

const std::string kModel = ASRF_SOURCE_DIR "/tests/fixtures/digits.pt";
constexpr double kOutputFrame = 0.02;  // the project model's output frame: 2 feature frames of 10 ms

struct Utterance {
  std::string text;
  std::vector<int16_t> pcm;
  double duration() const { return static_cast<double>(pcm.size()) / kSampleRate; }
};

std::unique_ptr<AcousticModel> Load(int64_t max_batch_frames, const std::string& name = "") {
  AcousticModelOptions o;
  o.max_batch_frames = max_batch_frames;
  std::unique_ptr<AcousticModel> m;
  Status st = LoadAcousticModel(kModel, name, o, &m);
  EXPECT_TRUE(st.ok()) << st.ToString();
  return m;
}

std::vector<Hypothesis> TranscribeAll(AcousticModel& m, const std::vector<std::span<const int16_t>>& u) {
  std::vector<Hypothesis> out;
  Status st = m.Transcribe(u, &out);
  EXPECT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(out.size(), u.size());
  return out;
}

// Same texts and words; times within one output frame, confidences close.
void ExpectSame(const std::vector<Hypothesis>& a, const std::vector<Hypothesis>& b, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].text, b[i].text) << what << ", utterance " << i;
    ASSERT_EQ(a[i].words.size(), b[i].words.size()) << what << ", utterance " << i;
    for (size_t w = 0; w < a[i].words.size(); ++w) {
      const DecodedWord &x = a[i].words[w], &y = b[i].words[w];
      EXPECT_EQ(x.text, y.text) << what << ", utterance " << i << " word " << w;
      EXPECT_NEAR(x.start, y.start, kOutputFrame + 1e-9) << what << ", utterance " << i << " word " << w;
      EXPECT_NEAR(x.end, y.end, kOutputFrame + 1e-9) << what << ", utterance " << i << " word " << w;
      EXPECT_NEAR(x.confidence, y.confidence, 1e-3) << what << ", utterance " << i << " word " << w;
    }
  }
}

class InferTest : public ::testing::Test {
 protected:
  // A dozen spoken number strings (the fixture model's domain), synthesised once; on a host built
  // without asr-synth, read from $ASRF_TEST_SPEECH (a directory that asr-synth wrote with these
  // options elsewhere), or the suite is skipped.
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    data_ = new std::vector<Utterance>();
    std::string speech = dir_->path();
    if (const char* given = std::getenv("ASRF_TEST_SPEECH"); given && *given) {
      speech = given;
    } else if (std::string(ASRF_SYNTH_BIN).empty()) {
      return;  // no speech: SetUp skips
    } else {
      RunResult r = RunCommand({ASRF_SYNTH_BIN, "--out", speech, "--utterances", "12", "--seed", "29",
                                "--numbers-fraction", "1", "--valid-fraction", "0", "--heldout-fraction", "0"},
                               120000);
      ASSERT_EQ(r.code, 0) << r.err;
    }
    std::ifstream in(speech + "/train.jsonl");
    std::string line;
    while (std::getline(in, line)) {
      if (line.empty()) continue;
      json j = json::parse(line);
      std::string audio = j["audio"].get<std::string>();
      if (!audio.empty() && audio[0] != '/') audio = speech + "/" + audio;
      Utterance u;
      u.text = j["text"].get<std::string>();
      DecodedAudio d;
      Status st = DecodeAudio16k(audio, &d);
      ASSERT_TRUE(st.ok()) << st.ToString();
      ASSERT_EQ(d.source_rate, kSampleRate);
      u.pcm = std::move(d.pcm);
      data_->push_back(std::move(u));
    }
    ASSERT_EQ(data_->size(), 12u);
  }
  void SetUp() override {
    if (data_->empty()) GTEST_SKIP() << "built without asr-synth and ASRF_TEST_SPEECH is not set";
  }
  static void TearDownTestSuite() {
    delete data_;
    delete dir_;
    data_ = nullptr;
    dir_ = nullptr;
  }

  static std::vector<std::span<const int16_t>> Spans() {
    std::vector<std::span<const int16_t>> s;
    for (const auto& u : *data_) s.emplace_back(u.pcm);
    return s;
  }
  static std::vector<std::string> Refs() {
    std::vector<std::string> r;
    for (const auto& u : *data_) r.push_back(u.text);
    return r;
  }

  static TempDir* dir_;
  static std::vector<Utterance>* data_;
};

TempDir* InferTest::dir_ = nullptr;
std::vector<Utterance>* InferTest::data_ = nullptr;

TEST_F(InferTest, RecognisesSpokenNumbers) {
  auto m = Load(48000);
  ASSERT_TRUE(m);
  EXPECT_EQ(m->name(), "digits");
  EXPECT_EQ(m->device(), "cpu");
  auto t0 = std::chrono::steady_clock::now();
  auto hyps = TranscribeAll(*m, Spans());
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  double audio = 0;
  for (const auto& u : *data_) audio += u.duration();
  std::vector<std::string> texts;
  for (size_t i = 0; i < hyps.size(); ++i) {
    texts.push_back(hyps[i].text);
    std::cout << "  ref: " << (*data_)[i].text << "\n  hyp: " << hyps[i].text << "\n";
  }
  double cer = CharErrorRate(Refs(), texts);
  std::cout << "CER " << cer << ", WER " << WordErrorRate(Refs(), texts) << "; " << secs / hyps.size()
            << " s per utterance, real-time factor " << secs / audio << "\n";
  RecordProperty("cer", std::to_string(cer));
  EXPECT_LE(cer, 0.15);
}

// The text is what GreedyDecode gives for the model's own forward pass on each utterance alone.
TEST_F(InferTest, TextIsGreedyDecodeOfTheModel) {
  CtcModel model(nullptr);
  Status st = LoadModel(kModel, &model);
  ASSERT_TRUE(st.ok()) << st.ToString();
  model->eval();
  torch::NoGradGuard no_grad;
  std::vector<std::string> expected;
  for (const auto& u : *data_) {
    torch::Tensor pcm = torch::empty({1, static_cast<int64_t>(u.pcm.size())}, torch::kFloat32);
    for (size_t k = 0; k < u.pcm.size(); ++k) pcm[0][k] = u.pcm[k] / 32768.0f;
    torch::Tensor frames;
    torch::Tensor feats = LogMel(pcm, torch::tensor({static_cast<int64_t>(u.pcm.size())}), &frames);
    auto [lp, out_frames] = model->forward(feats, frames);
    expected.push_back(GreedyDecode(lp, out_frames, model->config().vocab)[0]);
  }
  auto m = Load(1 << 30);  // all twelve in one micro-batch: padding does not change the text
  ASSERT_TRUE(m);
  auto hyps = TranscribeAll(*m, Spans());
  for (size_t i = 0; i < hyps.size(); ++i) EXPECT_EQ(hyps[i].text, expected[i]) << "utterance " << i;
}

TEST_F(InferTest, ResultsDoNotDependOnBatching) {
  auto all = Load(1 << 30);
  auto tiny = Load(1);  // one utterance per micro-batch
  int64_t median = NumFrames(static_cast<int64_t>((*data_)[data_->size() / 2].pcm.size()));
  auto some = Load(3 * median);  // micro-batches of two or three
  ASSERT_TRUE(all && tiny && some);
  auto together = TranscribeAll(*all, Spans());
  std::vector<Hypothesis> alone;
  for (const auto& s : Spans()) alone.push_back(TranscribeAll(*all, {s})[0]);
  ExpectSame(together, alone, "one call vs one call per utterance");
  ExpectSame(together, TranscribeAll(*tiny, Spans()), "one micro-batch vs max_batch_frames 1");
  ExpectSame(together, TranscribeAll(*some, Spans()), "one micro-batch vs small micro-batches");
  // Input order holds whatever order the lengths sort into.
  auto spans = Spans();
  std::vector<std::span<const int16_t>> reversed(spans.rbegin(), spans.rend());
  auto back = TranscribeAll(*some, reversed);
  std::vector<Hypothesis> unreversed(back.rbegin(), back.rend());
  ExpectSame(together, unreversed, "reversed input");
}

// Residual blocks (CtcModelConfig::residual) with weights of their own, on real speech: the
// worker's packed path gives each utterance what CtcModelImpl::forward gives it alone, in one
// micro-batch, one utterance per micro-batch and small ones, in reversed order too.
TEST_F(InferTest, ResidualBlocksRunPackedAsEachUtteranceAlone) {
  CtcModel base(nullptr);
  Status st = LoadModel(kModel, &base);
  ASSERT_TRUE(st.ok()) << st.ToString();
  CtcModel grown(nullptr);
  st = GrowResidual(base, 2, &grown);
  ASSERT_TRUE(st.ok()) << st.ToString();
  base->eval();
  torch::NoGradGuard no_grad;
  auto features = [](const Utterance& u, torch::Tensor* frames) {
    torch::Tensor pcm = torch::empty({1, static_cast<int64_t>(u.pcm.size())}, torch::kFloat32);
    for (size_t k = 0; k < u.pcm.size(); ++k) pcm[0][k] = u.pcm[k] / 32768.0f;
    return LogMel(pcm, torch::tensor({static_cast<int64_t>(u.pcm.size())}), frames);
  };
  // Small weights of their own: enough to change some text, not so much that it is all blanks.
  torch::manual_seed(7);
  for (auto& p : grown->named_parameters()) {
    if (p.key().rfind("res_proj", 0) == 0) p.value().normal_(0.0, 0.05);
  }
  TempDir dir;
  st = SaveModel(grown, dir / "grown.pt");
  ASSERT_TRUE(st.ok()) << st.ToString();
  CtcModel reread(nullptr);
  st = LoadModel(dir / "grown.pt", &reread);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(reread->config().residual, 2);
  reread->eval();
  std::vector<std::string> expected, before;
  std::vector<torch::Tensor> alone;
  for (const auto& u : *data_) {
    torch::Tensor frames;
    torch::Tensor f = features(u, &frames);
    auto [lp, out_frames] = reread->forward(f, frames);
    alone.push_back(lp[0]);
    expected.push_back(GreedyDecode(lp, out_frames, reread->config().vocab)[0]);
    auto [blp, bout] = base->forward(f, frames);
    before.push_back(GreedyDecode(blp, bout, base->config().vocab)[0]);
  }
  int empty = 0;
  for (const auto& t : expected) empty += t.empty();
  EXPECT_LE(empty, 1) << "the blocks' weights silence the model: the comparison below would prove little";
  EXPECT_NE(expected, before) << "the blocks' weights should change some text";
  // Equal texts below are not for free: run unpacked on a zero-padded batch (as in training), the
  // model lets padding reach the shorter utterances' valid frames.
  {
    std::vector<torch::Tensor> feats;
    std::vector<int64_t> lens;
    for (const auto& u : *data_) {
      torch::Tensor frames;
      feats.push_back(features(u, &frames)[0]);
      lens.push_back(static_cast<int64_t>(u.pcm.size()));
    }
    torch::Tensor padded = torch::nn::utils::rnn::pad_sequence(feats, /*batch_first=*/true);
    torch::Tensor frames = torch::empty({static_cast<int64_t>(feats.size())}, torch::kInt64);
    for (size_t i = 0; i < feats.size(); ++i) frames[i] = feats[i].size(0);
    auto [lp, out_frames] = reread->forward(padded, frames);
    double worst = 0;
    for (size_t i = 0; i < alone.size(); ++i) {
      worst = std::max(worst, (lp[i].slice(0, 0, alone[i].size(0)) - alone[i]).abs().max().item<double>());
    }
    EXPECT_GT(worst, 1e-4) << "padding should reach valid frames on the unpacked path";
  }
  int64_t median = NumFrames(static_cast<int64_t>((*data_)[data_->size() / 2].pcm.size()));
  for (int64_t max_frames : {int64_t{1} << 30, 3 * median, int64_t{1}}) {
    AcousticModelOptions o;
    o.max_batch_frames = max_frames;
    std::unique_ptr<AcousticModel> m;
    st = LoadAcousticModel(dir / "grown.pt", "", o, &m);
    ASSERT_TRUE(st.ok()) << st.ToString();
    auto hyps = TranscribeAll(*m, Spans());
    for (size_t i = 0; i < hyps.size(); ++i)
      EXPECT_EQ(hyps[i].text, expected[i]) << "utterance " << i << ", max_batch_frames " << max_frames;
    auto spans = Spans();
    std::vector<std::span<const int16_t>> reversed(spans.rbegin(), spans.rend());
    auto back = TranscribeAll(*m, reversed);
    for (size_t i = 0; i < back.size(); ++i)
      EXPECT_EQ(back[i].text, expected[back.size() - 1 - i]) << "reversed, max_batch_frames " << max_frames;
  }
}

TEST_F(InferTest, WordTimesAndConfidences) {
  auto m = Load(48000);
  ASSERT_TRUE(m);
  auto hyps = TranscribeAll(*m, Spans());
  for (size_t i = 0; i < hyps.size(); ++i) {
    const Hypothesis& h = hyps[i];
    const double duration = (*data_)[i].duration();
    std::string joined;
    double prev_end = 0;
    for (const DecodedWord& w : h.words) {
      joined += (joined.empty() ? "" : " ") + w.text;
      EXPECT_FALSE(w.text.empty());
      EXPECT_GE(w.start, 0.0) << "utterance " << i << " word " << w.text;
      EXPECT_LT(w.start, w.end) << "utterance " << i << " word " << w.text;
      EXPECT_LE(w.end, duration) << "utterance " << i << " word " << w.text;
      EXPECT_GE(w.start, prev_end) << "utterance " << i << " word " << w.text;
      EXPECT_GT(w.confidence, 0.0);
      EXPECT_LE(w.confidence, 1.0);
      prev_end = w.end;
    }
    EXPECT_EQ(joined, h.text) << "utterance " << i;
    // Speech spans most of the utterance (the synthesiser pads 50-300 ms of silence each side;
    // CTC emits a token in a frame or two, so a word's end is early): times are on its scale.
    if (!h.words.empty()) {
      EXPECT_LT(h.words.front().start, 0.8) << "utterance " << i;
      EXPECT_GT(h.words.back().end, duration - 0.8) << "utterance " << i;
    }
  }
}

TEST_F(InferTest, EmptyAndShortUtterancesGiveEmptyHypotheses) {
  auto m = Load(48000);
  ASSERT_TRUE(m);
  std::vector<int16_t> short_pcm((*data_)[0].pcm.begin(), (*data_)[0].pcm.begin() + 100);
  std::vector<int16_t> empty;
  auto s = Spans();
  auto hyps = TranscribeAll(*m, {s[0], empty, s[1], short_pcm, s[2]});
  ASSERT_EQ(hyps.size(), 5u);
  EXPECT_EQ(hyps[1].text, "");
  EXPECT_TRUE(hyps[1].words.empty());
  EXPECT_EQ(hyps[3].text, "");
  EXPECT_TRUE(hyps[3].words.empty());
  ExpectSame({hyps[0], hyps[2], hyps[4]}, TranscribeAll(*m, {s[0], s[1], s[2]}), "with and without empty utterances");
  EXPECT_FALSE(hyps[0].text.empty());

  auto none = TranscribeAll(*m, {empty});
  ASSERT_EQ(none.size(), 1u);
  EXPECT_EQ(none[0].text, "");
  EXPECT_TRUE(TranscribeAll(*m, {}).empty());
}

// On cuda:0 (the front end, the network and greedy decoding on the GPU, micro-batches staged on a
// stream of their own while the previous one runs): the CPU worker's words, in one micro-batch and
// in many, with empty and short utterances among them. Skipped where libtorch sees no GPU.
TEST_F(InferTest, GpuMatchesCpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "libtorch sees no CUDA device";
  auto cpu = Load(1 << 30);
  ASSERT_TRUE(cpu);
  std::vector<int16_t> short_pcm((*data_)[0].pcm.begin(), (*data_)[0].pcm.begin() + 500);
  std::vector<int16_t> empty;
  auto spans = Spans();
  spans.insert(spans.begin() + 3, empty);
  spans.insert(spans.begin() + 7, short_pcm);
  const auto want = TranscribeAll(*cpu, spans);
  int64_t median = NumFrames(static_cast<int64_t>((*data_)[data_->size() / 2].pcm.size()));
  for (int64_t frames : {int64_t{1} << 30, 3 * median, int64_t{1}}) {
    AcousticModelOptions o;
    o.device = "cuda:0";
    o.max_batch_frames = frames;
    std::unique_ptr<AcousticModel> gpu;
    Status st = LoadAcousticModel(kModel, "", o, &gpu);
    ASSERT_TRUE(st.ok()) << st.ToString();
    EXPECT_EQ(gpu->device(), "cuda:0");
    const auto got = TranscribeAll(*gpu, spans);
    ExpectSame(want, got, "cpu vs cuda:0, max_batch_frames " + std::to_string(frames));
    EXPECT_EQ(got[3].text, "");
    EXPECT_FALSE(got[0].text.empty());
  }
}

// Growing by residual blocks changes nothing at first (their projection is zero), a model cannot
// shrink, and the config says which architecture a file holds; neither needs speech.
// Faint steady noise and digital silence hold no speech; quiet speech-like bursts with pauses,
// or a level above -40 dBFS, do.
TEST(NoSpeechTest, FaintSteadyNoiseIsNoSpeechQuietBurstsAre) {
  std::mt19937 rng(21);
  auto noise = [&](double rms, size_t n) {
    std::normal_distribution<double> g(0, rms);
    std::vector<int16_t> x(n);
    for (auto& v : x) v = static_cast<int16_t>(std::clamp(g(rng), -32768.0, 32767.0));
    return x;
  };
  const size_t ten_s = 160000;
  EXPECT_TRUE(NoSpeech(std::vector<int16_t>(ten_s, 0)));
  EXPECT_TRUE(NoSpeech(noise(33, ten_s)));    // -60 dBFS hiss
  EXPECT_TRUE(NoSpeech(noise(180, ten_s)));   // -45 dBFS hiss
  std::vector<int16_t> dc = noise(180, ten_s);
  for (auto& v : dc) v = static_cast<int16_t>(v + 3000);  // a DC offset is no sound
  EXPECT_TRUE(NoSpeech(dc));
  EXPECT_FALSE(NoSpeech(noise(1000, ten_s)));  // -30 dBFS: loud enough to be anything
  // Quiet bursts (-46 dBFS) over a -66 dBFS floor: pauses between words, so not steady.
  std::vector<int16_t> bursts = noise(16, ten_s);
  std::vector<int16_t> word = noise(160, 4000);
  for (size_t at = 0; at + word.size() < ten_s; at += 8000) std::copy(word.begin(), word.end(), bursts.begin() + at);
  EXPECT_FALSE(NoSpeech(bursts));
  EXPECT_FALSE(NoSpeech(std::vector<int16_t>(1000, 0)));  // under 100 ms: the model decides
  // Digital silence beside faint hiss (a recorder that pads with zeros): no speech; it was, as the
  // hiss is more than 6 dB above zeros. The quiet bursts beside zeros are still speech.
  std::vector<int16_t> padded(ten_s / 2, 0), hiss = noise(33, ten_s / 2);
  padded.insert(padded.end(), hiss.begin(), hiss.end());
  EXPECT_TRUE(NoSpeech(padded));
  std::vector<int16_t> dithered = noise(0.7, ten_s / 4);  // +-1 LSB dither, then -45 dBFS hiss
  std::vector<int16_t> hiss45 = noise(180, ten_s / 2);
  dithered.insert(dithered.end(), hiss45.begin(), hiss45.end());
  EXPECT_TRUE(NoSpeech(dithered));
  std::vector<int16_t> gated(ten_s / 2, 0);
  gated.insert(gated.end(), bursts.begin(), bursts.end());
  EXPECT_FALSE(NoSpeech(gated));
  // Words that rise and fall (a syllable's envelope) with digital silence between them (a noise
  // gate): speech, though quiet.
  std::vector<int16_t> syllable = noise(300, 4000);
  for (size_t i = 0; i < syllable.size(); ++i) {
    const double env = std::sin(3.14159265 * static_cast<double>(i) / static_cast<double>(syllable.size()));
    syllable[i] = static_cast<int16_t>(syllable[i] * env * env);
  }
  std::vector<int16_t> gate_only(ten_s, 0);
  for (size_t at = 0; at + syllable.size() < ten_s; at += 8000) {
    std::copy(syllable.begin(), syllable.end(), gate_only.begin() + at);
  }
  EXPECT_FALSE(NoSpeech(gate_only));
}

TEST(ResidualTest, GrowingIsTheIdentityAndConfigsSayWhatTheyHold) {
  torch::manual_seed(3);
  CtcModelConfig c;
  c.channels = 16;
  c.hidden = 12;
  c.layers = 1;
  CtcModel base(c);
  base->eval();
  CtcModel grown(nullptr);
  Status st = GrowResidual(base, 2, &grown);
  ASSERT_TRUE(st.ok()) << st.ToString();
  grown->eval();
  EXPECT_EQ(grown->config().residual, 2);
  EXPECT_GT(grown->parameters().size(), base->parameters().size());
  torch::NoGradGuard no_grad;
  torch::Tensor feats = torch::randn({3, 57, 80});
  torch::Tensor frames = torch::tensor({57, 40, 9}, torch::kInt64);
  EXPECT_TRUE(torch::equal(base->forward(feats, frames).first, grown->forward(feats, frames).first));
  // The blocks train: with weights of their own the output moves.
  for (auto& p : grown->named_parameters()) {
    if (p.key().rfind("res_proj", 0) == 0) p.value().normal_(0.0, 0.3);
  }
  EXPECT_FALSE(torch::allclose(base->forward(feats, frames).first, grown->forward(feats, frames).first));
  CtcModel shrunk(nullptr);
  st = GrowResidual(grown, 1, &shrunk);
  EXPECT_EQ(st.code(), Status::Code::kInvalid) << st.ToString();
  EXPECT_NE(st.message().find("shrink"), std::string::npos) << st.ToString();

  // Configs: v1 stays v1 (and ignores a stray "residual"); v2 needs 0 < residual <= 16.
  CtcModelConfig out;
  EXPECT_NE(base->config().ToJson().find("conv-s2-relu-bigru-ctc-v1"), std::string::npos);
  std::string v2 = grown->config().ToJson();
  EXPECT_NE(v2.find("conv-s2-relu-bigru-res-ctc-v2"), std::string::npos);
  ASSERT_TRUE(CtcModelConfig::FromJson(v2, &out).ok());
  EXPECT_EQ(out.residual, 2);
  auto edited = [&](const std::function<void(nlohmann::json&)>& edit) {
    auto j = nlohmann::json::parse(v2);
    edit(j);
    return CtcModelConfig::FromJson(j.dump(), &out);
  };
  EXPECT_TRUE(edited([](auto& j) { j["architecture"] = "conv-s2-relu-bigru-ctc-v1"; }).ok());
  EXPECT_EQ(out.residual, 0);
  EXPECT_EQ(edited([](auto& j) { j.erase("residual"); }).code(), Status::Code::kCorruption);
  EXPECT_EQ(edited([](auto& j) { j["residual"] = 0; }).code(), Status::Code::kCorruption);
  EXPECT_EQ(edited([](auto& j) { j["residual"] = 17; }).code(), Status::Code::kCorruption);
  st = edited([](auto& j) { j["architecture"] = "transformer-ctc-v9"; });
  EXPECT_EQ(st.code(), Status::Code::kInvalid) << st.ToString();
  EXPECT_NE(st.message().find("transformer-ctc-v9"), std::string::npos) << st.ToString();
}

TEST(AverageTest, WeightsAreTheWeightedMeanOfOneNetwork) {
  CtcModelConfig c;
  c.channels = 16;
  c.hidden = 12;
  c.layers = 1;
  torch::manual_seed(5);
  CtcModel a(c);
  torch::manual_seed(6);
  CtcModel b(c);
  CtcModel mean(nullptr);
  Status st = AverageModels({a, b}, {1.0, 3.0}, &mean);  // normalised: 0.25, 0.75
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(mean->config().ToJson(), c.ToJson());
  auto pa = a->named_parameters(), pb = b->named_parameters();
  size_t n = 0;
  for (const auto& p : mean->named_parameters()) {
    torch::Tensor want = 0.25 * pa[p.key()] + 0.75 * pb[p.key()];
    EXPECT_TRUE(torch::allclose(p.value(), want, 1e-6, 1e-7)) << p.key();
    if (!torch::equal(pa[p.key()], pb[p.key()])) {
      EXPECT_FALSE(torch::equal(p.value(), pb[p.key()])) << p.key();
    }
    ++n;
  }
  EXPECT_EQ(n, a->parameters().size());
  // A model averaged with itself is itself, and the mean survives a save and a load.
  CtcModel same(nullptr);
  ASSERT_TRUE(AverageModels({a, a, a}, {1, 1, 1}, &same).ok());
  for (const auto& p : same->named_parameters()) EXPECT_TRUE(torch::allclose(p.value(), pa[p.key()], 1e-6, 1e-7));
  TempDir t;
  ASSERT_TRUE(SaveModel(mean, t / "mean.pt").ok());
  CtcModel back(nullptr);
  ASSERT_TRUE(LoadModel(t / "mean.pt", &back).ok());
  torch::NoGradGuard no_grad;
  mean->eval();
  back->eval();
  torch::Tensor feats = torch::randn({2, 31, 80});
  torch::Tensor frames = torch::tensor({31, 20}, torch::kInt64);
  EXPECT_TRUE(torch::equal(mean->forward(feats, frames).first, back->forward(feats, frames).first));

  // Refused: another network, another vocabulary, bad weights, nothing to average.
  CtcModelConfig wider = c;
  wider.hidden = 16;
  st = AverageModels({a, CtcModel(wider)}, {1, 1}, &same);
  EXPECT_EQ(st.code(), Status::Code::kInvalid) << st.ToString();
  EXPECT_NE(st.message().find("different network"), std::string::npos) << st.ToString();
  CtcModelConfig other_vocab = c;
  other_vocab.vocab.chars = " abc";
  EXPECT_EQ(AverageModels({a, CtcModel(other_vocab)}, {1, 1}, &same).code(), Status::Code::kInvalid);
  EXPECT_EQ(AverageModels({a, b}, {1, -1}, &same).code(), Status::Code::kInvalid);
  EXPECT_EQ(AverageModels({a, b}, {0, 0}, &same).code(), Status::Code::kInvalid);
  EXPECT_EQ(AverageModels({a, b}, {1}, &same).code(), Status::Code::kInvalid);
  EXPECT_EQ(AverageModels({}, {}, &same).code(), Status::Code::kInvalid);
}

TEST(InferLoadTest, NameDefaultsToTheFileStem) {
  auto named = Load(48000, "en-digits");
  ASSERT_TRUE(named);
  EXPECT_EQ(named->name(), "en-digits");
  EXPECT_EQ(Load(48000)->name(), "digits");
}

TEST(InferLoadTest, BadFilesAndDevices) {
  TempDir dir;
  AcousticModelOptions o;
  std::unique_ptr<AcousticModel> m;

  Status st = LoadAcousticModel(dir / "missing.pt", "", o, &m);
  EXPECT_EQ(st.code(), Status::Code::kNotFound) << st.ToString();

  { std::ofstream(dir / "garbage.pt") << "this is not a model\n"; }
  st = LoadAcousticModel(dir / "garbage.pt", "", o, &m);
  EXPECT_EQ(st.code(), Status::Code::kInvalid) << st.ToString();
  EXPECT_NE(st.message().find("neither"), std::string::npos) << st.ToString();

  // A torch archive that is neither: no config, and as TorchScript no forward method.
  {
    torch::serialize::OutputArchive ar;
    ar.write("weights", torch::ones({3}));
    ar.save_to(dir / "archive.pt");
  }
  st = LoadAcousticModel(dir / "archive.pt", "", o, &m);
  EXPECT_EQ(st.code(), Status::Code::kInvalid) << st.ToString();
  EXPECT_NE(st.message().find("forward"), std::string::npos) << st.ToString();

  o.device = "gpu";
  st = LoadAcousticModel(kModel, "", o, &m);
  EXPECT_EQ(st.code(), Status::Code::kInvalid) << st.ToString();
  o.device = "cuda:";
  st = LoadAcousticModel(kModel, "", o, &m);
  EXPECT_EQ(st.code(), Status::Code::kInvalid) << st.ToString();
  EXPECT_FALSE(m);
}

TEST(InferLoadTest, CudaWithoutCudaIsUnavailable) {
  if (torch::cuda::is_available()) GTEST_SKIP() << "this machine has CUDA";
  AcousticModelOptions o;
  o.device = "cuda:0";
  std::unique_ptr<AcousticModel> m;
  Status st = LoadAcousticModel(kModel, "", o, &m);
  EXPECT_EQ(st.code(), Status::Code::kUnavailable) << st.ToString();
  EXPECT_NE(st.message().find("cuda:0"), std::string::npos) << st.ToString();
  EXPECT_FALSE(m);
}

// A real TorchScript module, compiled here from TorchScript source: whatever the features, it
// returns a fixed sequence of log-probabilities at 2 feature frames per output frame.
class ScriptTest : public ::testing::Test {
 protected:
  // Best id per output frame over vocabulary {blank, |, a, b, c}: "ab cca", then blanks.
  static constexpr int64_t kIds[] = {0, 2, 2, 0, 3, 1, 1, 4, 0, 4, 2, 0};
  static constexpr int64_t kV = 5;

  void SetUp() override {
    const int64_t P = std::size(kIds);
    torch::Tensor logits = torch::zeros({P, kV});
    for (int64_t t = 0; t < P; ++t) logits[t][kIds[t]] = 2.0 + 0.25 * t;  // a different probability per frame
    pattern_ = torch::log_softmax(logits, 1);
    torch::jit::Module m("__torch__.PatternCtc");
    m.register_buffer("pattern", pattern_);
    m.define(R"JIT(
def forward(self, features: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
    t_out = (features.size(1) + 1) // 2
    idx = torch.clamp(torch.arange(t_out, device=features.device), max=self.pattern.size(0) - 1)
    lp = self.pattern.index_select(0, idx)
    return lp.unsqueeze(0).expand(features.size(0), t_out, lp.size(1)), (lengths + 1) // 2
)JIT");
    m.save(model_path());
    std::ofstream(dir_ / "vocab.txt") << "<blank>\n|\na\nb\nc\n";
  }
  std::string model_path() const { return dir_ / "pattern.pt"; }
  double Prob(int64_t t) const { return std::exp(pattern_[t][kIds[t]].item<double>()); }

  TempDir dir_;
  torch::Tensor pattern_;
};

TEST_F(ScriptTest, NeedsAVocabulary) {
  AcousticModelOptions o;
  std::unique_ptr<AcousticModel> m;
  Status st = LoadAcousticModel(model_path(), "", o, &m);
  EXPECT_EQ(st.code(), Status::Code::kInvalid) << st.ToString();
  EXPECT_NE(st.message().find("vocabulary"), std::string::npos) << st.ToString();

  o.vocabulary = dir_ / "missing.txt";
  st = LoadAcousticModel(model_path(), "", o, &m);
  EXPECT_EQ(st.code(), Status::Code::kNotFound) << st.ToString();

  std::ofstream(dir_ / "short.txt") << "<blank>\n|\na\nb\n";  // 4 tokens for 5 classes
  o.vocabulary = dir_ / "short.txt";
  st = LoadAcousticModel(model_path(), "", o, &m);
  EXPECT_EQ(st.code(), Status::Code::kInvalid) << st.ToString();
  EXPECT_FALSE(m);
}

TEST_F(ScriptTest, DecodesWithTimestamps) {
  AcousticModelOptions o;
  o.vocabulary = dir_ / "vocab.txt";
  std::unique_ptr<AcousticModel> m;
  Status st = LoadAcousticModel(model_path(), "", o, &m);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(m->name(), "pattern");
  // 40 feature frames -> 20 output frames (stride 2, 20 ms); 10 -> 5 (only "ab" fits).
  std::vector<int16_t> long_pcm = Audible(400 + 39 * kHop), short_pcm = Audible(400 + 9 * kHop);
  std::vector<Hypothesis> out;
  st = m->Transcribe({short_pcm, long_pcm}, &out);
  ASSERT_TRUE(st.ok()) << st.ToString();
  ASSERT_EQ(out.size(), 2u);
  EXPECT_EQ(out[0].text, "ab");
  EXPECT_EQ(out[1].text, "ab cca");
  ASSERT_EQ(out[1].words.size(), 2u);
  const DecodedWord &ab = out[1].words[0], &cca = out[1].words[1];
  EXPECT_EQ(ab.text, "ab");
  EXPECT_NEAR(ab.start, 0.02, 1e-9);  // "a" starts at output frame 1
  EXPECT_NEAR(ab.end, 0.10, 1e-9);    // "b" is frame 4; the word ends where frame 5 starts
  EXPECT_NEAR(ab.confidence, (std::max(Prob(1), Prob(2)) + Prob(4)) / 2, 1e-5);
  EXPECT_EQ(cca.text, "cca");
  EXPECT_NEAR(cca.start, 0.14, 1e-9);
  EXPECT_NEAR(cca.end, 0.22, 1e-9);
  EXPECT_NEAR(cca.confidence, (Prob(7) + Prob(9) + Prob(10)) / 3, 1e-5);
  ASSERT_EQ(out[0].words.size(), 1u);
  EXPECT_NEAR(out[0].words[0].end, 0.10, 1e-9);
  EXPECT_LE(out[0].words[0].end, short_pcm.size() / static_cast<double>(kSampleRate));

  // The same one at a time.
  std::vector<Hypothesis> alone;
  st = m->Transcribe({short_pcm}, &alone);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(alone[0].text, "ab");
}

// With a language model the worker decodes by beam search; on this confident pattern it finds the
// same text, and the alignment gives the same word times and confidences as greedy decoding.
TEST_F(ScriptTest, BeamSearchWithALanguageModelKeepsTextAndTimes) {
  CharLm lm;
  ASSERT_TRUE(CharLm::Build({"ab cca", "ab", "cca ab"}, " abc", 3, &lm).ok());
  ASSERT_TRUE(lm.Save(dir_ / "abc.lm").ok());
  AcousticModelOptions o;
  o.vocabulary = dir_ / "vocab.txt";
  std::unique_ptr<AcousticModel> greedy, beam;
  ASSERT_TRUE(LoadAcousticModel(model_path(), "", o, &greedy).ok());
  o.lm = dir_ / "abc.lm";
  Status st = LoadAcousticModel(model_path(), "", o, &beam);
  ASSERT_TRUE(st.ok()) << st.ToString();
  std::vector<int16_t> pcm = Audible(400 + 39 * kHop);
  std::vector<Hypothesis> a, b;
  ASSERT_TRUE(greedy->Transcribe({pcm}, &a).ok());
  ASSERT_TRUE(beam->Transcribe({pcm}, &b).ok());
  EXPECT_EQ(b[0].text, "ab cca");
  ExpectSame(a, b, "beam vs greedy");

  // A language model for other characters is refused, not used to drop every letter.
  CharLm other;
  ASSERT_TRUE(CharLm::Build({"xyz zy"}, " xyz", 3, &other).ok());
  ASSERT_TRUE(other.Save(dir_ / "xyz.lm").ok());
  o.lm = dir_ / "xyz.lm";
  std::unique_ptr<AcousticModel> wrong;
  st = LoadAcousticModel(model_path(), "", o, &wrong);
  EXPECT_EQ(st.code(), Status::Code::kInvalid) << st.ToString();
  EXPECT_NE(st.message().find("covers only 1 of the model's 4 characters"), std::string::npos) << st.ToString();

  std::ofstream(dir_ / "bad.lm") << "not a language model";
  o.lm = dir_ / "bad.lm";
  std::unique_ptr<AcousticModel> m;
  st = LoadAcousticModel(model_path(), "", o, &m);
  EXPECT_EQ(st.code(), Status::Code::kCorruption) << st.ToString();
  EXPECT_FALSE(m);
}

}  // namespace
}  // namespace asrf::testing
