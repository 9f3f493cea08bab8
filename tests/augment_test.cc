// Training-time augmentation (worker/augment.h): a speed change moves a tone's frequency and the
// length by the factor; a mel-axis warp by alpha moves a tone's peak to where alpha times its
// frequency peaks; alpha 1 changes nothing; low-pass, noise and reverberation do what their
// parameters say; background without speech is of many kinds at a plausible level; out-of-range
// settings are refused in a train payload.
#include <gtest/gtest.h>

#include <algorithm>
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

// Noise: the added part holds exactly the asked share of the signal's power; white noise spreads
// over the band, coloured noise sits low; the same generator state gives the same noise; silence
// stays silent.
TEST(AugmentTest, AddNoiseMeetsTheSnrAndItsColour) {
  const size_t n = 32000;
  std::vector<float> clean(n);
  for (size_t t = 0; t < n; ++t) clean[t] = static_cast<float>(0.3 * std::sin(2 * M_PI * 440.0 * t / 16000.0));
  auto power = [](const std::vector<float>& x) {
    double e = 0;
    for (float v : x) e += static_cast<double>(v) * v;
    return e / static_cast<double>(x.size());
  };
  // The share of x's energy below 1 kHz.
  auto low_share = [&](const std::vector<float>& x) {
    torch::Tensor spec = torch::fft::rfft(torch::tensor(x)).abs().pow(2);
    int64_t cut = static_cast<int64_t>(1000.0 * n / 16000.0);
    return (spec.narrow(0, 0, cut).sum() / spec.sum()).item<double>();
  };
  for (double colour : {0.0, 0.9}) {
    std::mt19937_64 rng(7), again(7);
    std::vector<float> x = clean, y = clean;
    AddNoise(x.data(), n, 10.0, colour, rng);
    AddNoise(y.data(), n, 10.0, colour, again);
    EXPECT_EQ(x, y);
    std::vector<float> noise(n);
    for (size_t t = 0; t < n; ++t) noise[t] = x[t] - clean[t];
    EXPECT_NEAR(10 * std::log10(power(clean) / power(noise)), 10.0, 0.01) << "colour " << colour;
    if (colour == 0.0) {
      EXPECT_NEAR(low_share(noise), 1000.0 / 8000.0, 0.02);
    } else {
      // A one-pole low-pass at 0.9: (2/pi) atan(19 tan(pi/16)) of the power lies below 1 kHz.
      EXPECT_NEAR(low_share(noise), 0.836, 0.03);
    }
  }
  std::mt19937_64 rng(7);
  std::vector<float> silence(100, 0.0f);
  AddNoise(silence.data(), silence.size(), 10.0, 0.0, rng);
  EXPECT_EQ(silence, std::vector<float>(100, 0.0f));
}

// Background without speech: every draw sits at -50 to -10 dBFS and is finite; the same generator
// state gives the same samples; over many draws there is hiss (much power above 4 kHz), rumble
// and hum (nearly all of it below 500 Hz), and hum alone (most power in 50 or 60 Hz harmonics).
TEST(AugmentTest, NonSpeechIsBackgroundOfManyKindsAtAPlausibleLevel) {
  const size_t n = 32000;  // 2 s: frequency bin k is k / 2 Hz
  int hiss = 0, low = 0, hum = 0;
  for (uint64_t seed = 1; seed <= 80; ++seed) {
    std::mt19937_64 rng(seed), again(seed);
    std::vector<float> x(n), y(n);
    NonSpeech(x.data(), n, rng);
    NonSpeech(y.data(), n, again);
    ASSERT_EQ(x, y);
    double e = 0;
    for (float v : x) {
      ASSERT_TRUE(std::isfinite(v));
      e += static_cast<double>(v) * v;
    }
    const double dbfs = 10 * std::log10(e / n);
    EXPECT_GE(dbfs, -50.01) << "seed " << seed;
    EXPECT_LE(dbfs, -9.99) << "seed " << seed;
    for (float v : x) ASSERT_LE(std::fabs(v), 1.0f);
    torch::Tensor spec = torch::fft::rfft(torch::tensor(x)).abs().pow(2);
    const double total = spec.sum().item<double>();
    hiss += spec.narrow(0, 8000, spec.size(0) - 8000).sum().item<double>() / total > 0.3;
    low += spec.narrow(0, 0, 1000).sum().item<double>() / total > 0.9;
    double mains = 0;  // the larger of the two grids' harmonics (300 Hz is on both)
    for (int f : {50, 60}) {
      double grid = 0;
      for (int h = 1; h <= 8; ++h) grid += spec.narrow(0, 2 * f * h - 2, 5).sum().item<double>();
      mains = std::max(mains, grid);
    }
    hum += mains / total > 0.5;
  }
  EXPECT_GT(hiss, 5);
  EXPECT_GT(low, 5);
  EXPECT_GT(hum, 3);
  std::mt19937_64 rng(1);
  NonSpeech(nullptr, 0, rng);  // nothing to write
}

// Background around speech: the speech is left as it was, the two sides together hold the asked
// power under it, both sides come from one stretch of the same background, and silent speech gets
// silent background.
TEST(AugmentTest, PadWithBackgroundSurroundsSpeechAtTheAskedLevel) {
  const size_t before = 8000, speech = 24000, after = 12000;
  std::mt19937_64 tone_rng(5);
  std::normal_distribution<double> gauss(0.0, 0.1);
  std::vector<float> speech_samples(speech);
  for (auto& v : speech_samples) v = static_cast<float>(gauss(tone_rng));
  double sp = 0;
  for (float v : speech_samples) sp += static_cast<double>(v) * v;
  sp /= speech;
  for (double below : {10.0, 25.0, 40.0}) {
    for (uint64_t seed = 1; seed <= 10; ++seed) {
      std::vector<float> x(before + speech + after, 7.0f);
      std::copy(speech_samples.begin(), speech_samples.end(), x.begin() + before);
      std::mt19937_64 rng(seed), again(seed);
      PadWithBackground(x.data(), before, speech, after, below, rng);
      ASSERT_TRUE(std::equal(speech_samples.begin(), speech_samples.end(), x.begin() + before));
      double bp = 0;
      for (size_t i = 0; i < before; ++i) bp += static_cast<double>(x[i]) * x[i];
      for (size_t i = 0; i < after; ++i) bp += static_cast<double>(x[before + speech + i]) * x[before + speech + i];
      bp /= before + after;
      EXPECT_NEAR(10 * std::log10(sp / bp), below, 1e-3) << "seed " << seed;
      // The same draw as NonSpeech over before + after samples, scaled: one background.
      std::vector<float> whole(before + after);
      NonSpeech(whole.data(), whole.size(), again);
      const double k = x[0] / whole[0];
      EXPECT_GT(k, 0);
      EXPECT_NEAR(x[before - 1], k * whole[before - 1], 1e-6);
      EXPECT_NEAR(x[before + speech], k * whole[before], 1e-6);
      EXPECT_NEAR(x.back(), k * whole.back(), 1e-6);
    }
  }
  std::vector<float> quiet(100, 0.0f), none(100, 3.0f);
  std::mt19937_64 rng(1);
  std::fill(quiet.begin(), quiet.begin() + 20, 1.0f);
  std::fill(quiet.begin() + 80, quiet.end(), 1.0f);
  PadWithBackground(quiet.data(), 20, 60, 20, 20.0, rng);
  for (float v : quiet) EXPECT_EQ(v, 0.0f);
  PadWithBackground(none.data(), 0, 100, 0, 20.0, rng);  // nothing around it: unchanged
  for (float v : none) EXPECT_EQ(v, 3.0f);
}

// Reverberation: a click comes out as the direct sound followed by a tail that holds the asked
// direct-to-reverberant ratio and decays by 60 dB over rt60, then silence; the level is kept;
// rt60 0 changes nothing.
TEST(AugmentTest, ReverberateGivesTheRoomItsDecayAndRatio) {
  const size_t n = 16000;
  const double rt60 = 0.5;
  const size_t taps = static_cast<size_t>(rt60 * 16000);
  for (double drr : {10.0, -5.0}) {
    std::mt19937_64 rng(3);
    std::vector<float> click(n, 0.0f);
    click[0] = 1.0f;
    Reverberate(click.data(), n, rt60, drr, rng);
    double tail = 0, early = 0, late = 0, after = 0;
    for (size_t t = 1; t < n; ++t) {
      const double e = static_cast<double>(click[t]) * click[t];
      if (t < taps) tail += e;
      if (t < taps / 4) early += e;
      if (t >= 3 * taps / 4 && t < taps) late += e;
      if (t >= taps) after += e;
    }
    EXPECT_NEAR(10 * std::log10(static_cast<double>(click[0]) * click[0] / tail), drr, 0.01);
    // 60 dB over rt60: the last quarter of the tail sits 45 dB below the first.
    EXPECT_NEAR(10 * std::log10(late / early), -45.0, 2.0);
    EXPECT_LT(after, tail * 1e-9);
    // The level is that of the input: the click's energy, 1, over n samples.
    double mean = 0;
    for (float v : click) mean += static_cast<double>(v) * v;
    EXPECT_NEAR(mean, 1.0, 1e-3);
  }
  // The convolution is linear: a click near the end rings on past the buffer's end, never
  // wrapping round to its start.
  {
    std::mt19937_64 rng(3);
    std::vector<float> late_click(n, 0.0f);
    late_click[n - taps / 2] = 1.0f;
    Reverberate(late_click.data(), n, rt60, -5.0, rng);
    double before = 0, ringing = 0;
    for (size_t t = 0; t < n - taps / 2; ++t) before += static_cast<double>(late_click[t]) * late_click[t];
    for (size_t t = n - taps / 2 + 1; t < n; ++t) ringing += static_cast<double>(late_click[t]) * late_click[t];
    EXPECT_LT(before, 1e-9);
    EXPECT_GT(ringing, 0.1);
  }
  std::mt19937_64 rng(3);
  std::vector<float> tone(n);
  for (size_t t = 0; t < n; ++t) tone[t] = static_cast<float>(std::sin(2 * M_PI * 300.0 * t / 16000.0));
  std::vector<float> same = tone;
  Reverberate(same.data(), n, 0.0, 0.0, rng);
  EXPECT_EQ(same, tone);
  Reverberate(same.data(), n, std::nan(""), 0.0, rng);
  Reverberate(same.data(), n, 1e12, 0.0, rng);
  EXPECT_EQ(same, tone);
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
  // Room and noise shares: off by default, in [0, 1], round-trip.
  EXPECT_TRUE(TrainSpec::FromJson(base + "}", &s).ok());
  EXPECT_DOUBLE_EQ(s.reverb, 0.0);
  EXPECT_DOUBLE_EQ(s.noise, 0.0);
  EXPECT_TRUE(TrainSpec::FromJson(base + R"(, "reverb": 0.4, "noise": 0.6})", &s).ok());
  ASSERT_TRUE(TrainSpec::FromJson(s.ToJson(), &back).ok());
  EXPECT_DOUBLE_EQ(back.reverb, 0.4);
  EXPECT_DOUBLE_EQ(back.noise, 0.6);
  EXPECT_EQ(TrainSpec::FromJson(base + R"(, "reverb": 1.01})", &s).code(), Status::Code::kInvalid);
  EXPECT_EQ(TrainSpec::FromJson(base + R"(, "noise": -0.5})", &s).code(), Status::Code::kInvalid);
  // Background-only share: off by default, at most half, round-trips.
  EXPECT_TRUE(TrainSpec::FromJson(base + "}", &s).ok());
  EXPECT_DOUBLE_EQ(s.nonspeech, 0.0);
  EXPECT_TRUE(TrainSpec::FromJson(base + R"(, "nonspeech": 0.05})", &s).ok());
  ASSERT_TRUE(TrainSpec::FromJson(s.ToJson(), &back).ok());
  EXPECT_DOUBLE_EQ(back.nonspeech, 0.05);
  EXPECT_EQ(TrainSpec::FromJson(base + R"(, "nonspeech": 0.6})", &s).code(), Status::Code::kInvalid);
  EXPECT_EQ(TrainSpec::FromJson(base + R"(, "nonspeech": -0.1})", &s).code(), Status::Code::kInvalid);
  // Background around speech: off by default, in [0, 1], round-trips.
  EXPECT_TRUE(TrainSpec::FromJson(base + "}", &s).ok());
  EXPECT_DOUBLE_EQ(s.pad_background, 0.0);
  EXPECT_TRUE(TrainSpec::FromJson(base + R"(, "pad_background": 0.3})", &s).ok());
  ASSERT_TRUE(TrainSpec::FromJson(s.ToJson(), &back).ok());
  EXPECT_DOUBLE_EQ(back.pad_background, 0.3);
  EXPECT_EQ(TrainSpec::FromJson(base + R"(, "pad_background": 1.5})", &s).code(), Status::Code::kInvalid);
  EXPECT_EQ(TrainSpec::FromJson(base + R"(, "pad_background": -0.1})", &s).code(), Status::Code::kInvalid);
}

}  // namespace
}  // namespace asrf::testing
