// Training-time augmentation (worker/augment.h): a speed change moves a tone's frequency and the
// length by the factor; a mel-axis warp by alpha moves a tone's peak to where alpha times its
// frequency peaks; alpha 1 changes nothing; out-of-range settings are refused in a train payload.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include <torch/torch.h>
#include <torch/fft.h>

#include "worker/augment.h"
#include "worker/features.h"
#include "worker/trainer.h"

namespace asrf::testing {
namespace {

std::vector<int16_t> Tone(double hz, double seconds) {
  std::vector<int16_t> s(static_cast<size_t>(seconds * kSampleRate));
  for (size_t i = 0; i < s.size(); ++i) s[i] = static_cast<int16_t>(8000 * std::sin(2 * M_PI * hz * i / kSampleRate));
  return s;
}

// Frequency from upward zero crossings.
double Frequency(const std::vector<float>& x) {
  int crossings = 0;
  for (size_t i = 1; i < x.size(); ++i) crossings += x[i - 1] < 0 && x[i] >= 0;
  return crossings * static_cast<double>(kSampleRate) / static_cast<double>(x.size());
}

TEST(AugmentTest, SpeedChangeMovesFrequencyAndLength) {
  auto tone = Tone(440, 1.0);
  for (double f : {0.85, 1.0, 1.15}) {
    size_t n = SpeedChangedLength(tone.size(), f);
    EXPECT_NEAR(static_cast<double>(n), tone.size() / f, 1.0) << f;
    std::vector<float> out(n);
    SpeedChange(tone.data(), tone.size(), f, out.data());
    EXPECT_NEAR(Frequency(out), 440 * f, 440 * f * 0.01) << f;
    if (f == 1.0) {
      for (size_t i = 0; i < n; ++i) ASSERT_EQ(out[i], tone[i] / 32768.0f);
    }
  }
  EXPECT_EQ(SpeedChangedLength(0, 1.1), 0u);
  EXPECT_EQ(SpeedChangedLength(1, 1.1), 1u);
}

int64_t PeakBin(const torch::Tensor& feats) {  // [T, 80]: the bin highest on average
  return feats.mean(0).argmax().item<int64_t>();
}

// Log-mel energies of one 25 ms Hann-windowed frame of a tone, before the per-utterance
// normalisation (which would hide where a steady tone is): [1, 80].
torch::Tensor Features(double hz) {
  auto tone = Tone(hz, 0.025);
  torch::Tensor frame = torch::zeros({kFrameLength});
  for (int64_t i = 0; i < kFrameLength; ++i) frame[i] = tone[static_cast<size_t>(i)] / 32768.0f;
  frame = frame * torch::hann_window(kFrameLength, /*periodic=*/true);
  torch::Tensor power = torch::view_as_real(torch::fft::rfft(frame, kFft)).square().sum(-1);
  return torch::log(torch::matmul(power, MelFilterbank()) + 1e-6).unsqueeze(0);
}

TEST(AugmentTest, MelWarpMovesAFormantByAlpha) {
  for (double hz : {600.0, 1500.0, 3000.0}) {
    for (double alpha : {0.88, 1.12}) {
      torch::Tensor f = Features(hz).clone();
      WarpMelAxis(f, alpha);
      EXPECT_NEAR(PeakBin(f), PeakBin(Features(hz * alpha)), 1) << hz << " Hz, alpha " << alpha;
      EXPECT_NE(PeakBin(f), PeakBin(Features(hz))) << hz << " Hz, alpha " << alpha;
    }
  }
  torch::Tensor f = torch::randn({50, kMels});
  torch::Tensor same = f.clone();
  WarpMelAxis(same, 1.0);
  EXPECT_LT((same - f).abs().max().item<double>(), 1e-5);
}

// Low-pass: a 1 kHz tone passes, a 6 kHz tone is gone at a 3.4 kHz cutoff; both pass at 8 kHz
// and above; the length and the rest of the buffer are untouched.
TEST(AugmentTest, LowPassKeepsTheBandBelowTheCutoffAndRemovesTheRest) {
  const size_t n = 16000;
  auto tone = [&](double hz) {
    std::vector<float> v(n);
    for (size_t t = 0; t < n; ++t) v[t] = static_cast<float>(std::sin(2 * M_PI * hz * t / 16000.0));
    return v;
  };
  // The amplitude of a tone at `hz` in x: its projection on sine and cosine, away from the edges.
  auto amplitude = [&](const std::vector<float>& x, double hz) {
    double s = 0, c = 0;
    for (size_t t = 1000; t < n - 1000; ++t) {
      s += x[t] * std::sin(2 * M_PI * hz * t / 16000.0);
      c += x[t] * std::cos(2 * M_PI * hz * t / 16000.0);
    }
    return 2 * std::sqrt(s * s + c * c) / static_cast<double>(n - 2000);
  };
  std::vector<float> low = tone(1000), high = tone(6000);
  std::vector<float> mix(n + 3, 7.0f);  // 3 samples past the end must stay 7
  for (size_t t = 0; t < n; ++t) mix[t] = 0.5f * (low[t] + high[t]);
  std::vector<float> same = mix;
  LowPass(same.data(), n, 8000.0);
  EXPECT_EQ(same, mix);
  LowPass(mix.data(), n, 3400.0);
  EXPECT_NEAR(amplitude(mix, 1000), 0.5, 0.01);
  EXPECT_LT(amplitude(mix, 6000), 0.01);
  EXPECT_EQ(mix[n], 7.0f);
  EXPECT_EQ(mix[n + 2], 7.0f);
  std::vector<float> one = {0.25f};
  LowPass(one.data(), 1, 3400.0);
  EXPECT_EQ(one[0], 0.25f);
}

TEST(AugmentTest, TrainPayloadRefusesOutOfRangeAugmentation) {
  TrainSpec s;
  const std::string base = R"({"manifest": "t.jsonl", "valid": "v.jsonl", "name": "m")";
  EXPECT_TRUE(TrainSpec::FromJson(base + "}", &s).ok());
  EXPECT_DOUBLE_EQ(s.speed_perturb, 0.15);
  EXPECT_DOUBLE_EQ(s.vtlp, 0.12);
  EXPECT_TRUE(TrainSpec::FromJson(base + R"(, "speed_perturb": 0, "vtlp": 0})", &s).ok());
  EXPECT_EQ(TrainSpec::FromJson(base + R"(, "speed_perturb": 0.6})", &s).code(), Status::Code::kInvalid);
  EXPECT_EQ(TrainSpec::FromJson(base + R"(, "vtlp": -0.1})", &s).code(), Status::Code::kInvalid);
  EXPECT_EQ(TrainSpec::FromJson(base + R"(, "vtlp": "a lot"})", &s).code(), Status::Code::kInvalid);
  // Residual blocks: 0 by default, at most 16, and they round-trip through the payload.
  EXPECT_TRUE(TrainSpec::FromJson(base + R"(, "residual": 2})", &s).ok());
  TrainSpec back;
  ASSERT_TRUE(TrainSpec::FromJson(s.ToJson(), &back).ok());
  EXPECT_EQ(back.residual, 2);
  EXPECT_EQ(TrainSpec::FromJson(base + R"(, "residual": -1})", &s).code(), Status::Code::kInvalid);
  EXPECT_EQ(TrainSpec::FromJson(base + R"(, "residual": 17})", &s).code(), Status::Code::kInvalid);
  // Low-pass share: off by default, in [0, 1], round-trips.
  EXPECT_TRUE(TrainSpec::FromJson(base + R"(, "lowpass": 0.3})", &s).ok());
  ASSERT_TRUE(TrainSpec::FromJson(s.ToJson(), &back).ok());
  EXPECT_DOUBLE_EQ(back.lowpass, 0.3);
  EXPECT_EQ(TrainSpec::FromJson(base + R"(, "lowpass": 1.5})", &s).code(), Status::Code::kInvalid);
  EXPECT_EQ(TrainSpec::FromJson(base + R"(, "lowpass": -0.1})", &s).code(), Status::Code::kInvalid);
}

}  // namespace
}  // namespace asrf::testing
