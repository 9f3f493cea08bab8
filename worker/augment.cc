#include "worker/augment.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include <ATen/ATen.h>

#include "worker/features.h"

namespace asrf {

size_t SpeedChangedLength(size_t n, double factor) {
  if (n <= 1 || !(factor > 0)) return n;
  return static_cast<size_t>(static_cast<double>(n - 1) / factor) + 1;
}

void SpeedChange(const int16_t* in, size_t n, double factor, float* out) {
  const size_t m = SpeedChangedLength(n, factor);
  if (n == 0) return;
  for (size_t t = 0; t < m; ++t) {
    double x = static_cast<double>(t) * factor;
    size_t i = std::min(static_cast<size_t>(x), n - 1);
    size_t j = std::min(i + 1, n - 1);
    double w = x - static_cast<double>(i);
    out[t] = static_cast<float>(((1.0 - w) * in[i] + w * in[j]) / 32768.0);
  }
}

void LowPass(float* samples, size_t n, double cutoff_hz) {
  if (n < 2 || !(cutoff_hz > 0) || cutoff_hz >= kSampleRate / 2.0) return;
  const int64_t len = static_cast<int64_t>(n);
  at::Tensor spectrum = at::fft_rfft(at::from_blob(samples, {len}, at::kFloat));
  const int64_t bins = spectrum.size(0);
  constexpr double kRollOffHz = 400.0;
  at::Tensor gain = at::empty({bins}, at::kFloat);
  float* g = gain.data_ptr<float>();
  for (int64_t k = 0; k < bins; ++k) {
    const double f = static_cast<double>(k) * kSampleRate / static_cast<double>(len);
    g[k] = f <= cutoff_hz             ? 1.0f
           : f >= cutoff_hz + kRollOffHz ? 0.0f
                                         : static_cast<float>(0.5 * (1.0 + std::cos(M_PI * (f - cutoff_hz) / kRollOffHz)));
  }
  at::Tensor out = at::fft_irfft(spectrum * gain, len).contiguous();
  std::memcpy(samples, out.data_ptr<float>(), n * sizeof(float));
}

namespace {

// The smallest 2^a 3^b 5^c at or above n: an FFT of that size is fast.
int64_t FastFftSize(int64_t n) {
  for (int64_t m = std::max<int64_t>(n, 1);; ++m) {
    int64_t r = m;
    for (int64_t p : {2, 3, 5})
      while (r % p == 0) r /= p;
    if (r == 1) return m;
  }
}

template <typename T>
double MeanPower(const T* samples, size_t n) {
  double e = 0;
  for (size_t i = 0; i < n; ++i) e += static_cast<double>(samples[i]) * samples[i];
  return n > 0 ? e / static_cast<double>(n) : 0.0;
}

// `n` samples of Gaussian noise through a one-pole low-pass with coefficient `colour`.
std::vector<double> ColouredNoise(size_t n, double colour, std::mt19937_64& rng) {
  std::normal_distribution<double> gauss(0.0, 1.0);
  std::vector<double> noise(n);
  double state = 0;
  for (size_t i = 0; i < n; ++i) {
    state = colour * state + gauss(rng);
    noise[i] = state;
  }
  return noise;
}

}  // namespace

void AddNoise(float* samples, size_t n, double snr_db, double colour, std::mt19937_64& rng) {
  const double signal = MeanPower(samples, n);
  if (!(signal > 0) || !std::isfinite(snr_db)) return;
  const std::vector<double> noise = ColouredNoise(n, std::clamp(colour, 0.0, 0.999), rng);
  const double power = MeanPower(noise.data(), n);
  if (!(power > 0)) return;
  const double k = std::sqrt(signal / std::pow(10.0, snr_db / 10.0) / power);
  for (size_t i = 0; i < n; ++i) samples[i] = static_cast<float>(samples[i] + k * noise[i]);
}

void Reverberate(float* samples, size_t n, double rt60, double drr_db, std::mt19937_64& rng) {
  constexpr double kLongestRt60 = 10.0;  // seconds; longer is no room
  if (!(rt60 > 0) || !(rt60 <= kLongestRt60) || !std::isfinite(drr_db)) return;
  const double before = MeanPower(samples, n);
  const int64_t taps = static_cast<int64_t>(rt60 * kSampleRate);
  if (!(before > 0) || taps < 2) return;
  // The tail: Gaussian noise under an exponential decay of 60 dB over rt60, scaled to hold
  // 10^(-drr/10) of the direct sound's (unit) energy.
  std::normal_distribution<double> gauss(0.0, 1.0);
  at::Tensor response = at::zeros({taps}, at::kFloat);
  float* h = response.data_ptr<float>();
  const double decay = std::pow(10.0, -3.0 / static_cast<double>(taps));  // per sample
  double tail = 0, envelope = 1;
  for (int64_t i = 1; i < taps; ++i) {
    envelope *= decay;
    h[i] = static_cast<float>(gauss(rng) * envelope);
    tail += static_cast<double>(h[i]) * h[i];
  }
  if (!(tail > 0)) return;
  const double scale = std::sqrt(std::pow(10.0, -drr_db / 10.0) / tail);
  for (int64_t i = 1; i < taps; ++i) h[i] = static_cast<float>(h[i] * scale);
  h[0] = 1.0f;
  // Linear (not circular) convolution: the FFT spans the input and the whole response.
  const int64_t len = static_cast<int64_t>(n), size = FastFftSize(len + taps - 1);
  at::Tensor wet = at::fft_irfft(at::fft_rfft(at::from_blob(samples, {len}, at::kFloat), size) *
                                     at::fft_rfft(response, size),
                                 size)
                       .narrow(0, 0, len)
                       .contiguous();
  const float* w = wet.data_ptr<float>();
  const double after = MeanPower(w, n);
  const double k = after > 0 ? std::sqrt(before / after) : 0.0;
  for (size_t i = 0; i < n; ++i) samples[i] = static_cast<float>(w[i] * k);
}

void NonSpeech(float* out, size_t n, std::mt19937_64& rng) {
  if (n == 0) return;
  std::uniform_real_distribution<double> u(0.0, 1.0);
  const double colour = 0.99 * u(rng);
  // 0: noise alone, 1: noise and hum, 2: hum alone (a little hiss under it).
  const double kind_draw = u(rng);
  const int kind = kind_draw < 0.67 ? 0 : kind_draw < 0.87 ? 1 : 2;
  const bool swell = u(rng) < 0.33;
  const double mains = u(rng) < 0.5 ? 50.0 : 60.0;
  constexpr int kHarmonics = 8;
  double amp[kHarmonics], phase[kHarmonics];
  for (int h = 0; h < kHarmonics; ++h) {
    amp[h] = u(rng) / (h + 1);
    phase[h] = 2 * M_PI * u(rng);
  }
  const double hum_to_noise = kind == 2 ? 30.0 : -10.0 + 20.0 * u(rng);  // dB, hum's power over the noise's
  const double swell_hz = 0.3 + 3.7 * u(rng), swell_phase = 2 * M_PI * u(rng), swell_depth = 0.3 + 0.6 * u(rng);
  const double level_db = -50.0 + 40.0 * u(rng);
  std::vector<double> mix = ColouredNoise(n, colour, rng), hum(n, 0.0);
  if (kind > 0) {
    for (size_t i = 0; i < n; ++i) {
      const double t = static_cast<double>(i) / kSampleRate;
      for (int h = 0; h < kHarmonics; ++h) hum[i] += amp[h] * std::sin(2 * M_PI * mains * (h + 1) * t + phase[h]);
    }
  }
  const double pn = MeanPower(mix.data(), n), ph = MeanPower(hum.data(), n);
  const double hum_gain = kind > 0 && ph > 0 && pn > 0 ? std::sqrt(pn / ph * std::pow(10.0, hum_to_noise / 10.0)) : 0.0;
  for (size_t i = 0; i < n; ++i) {
    mix[i] += hum_gain * hum[i];
    if (swell) {
      const double t = static_cast<double>(i) / kSampleRate;
      mix[i] *= 1.0 - swell_depth * 0.5 * (1.0 + std::sin(2 * M_PI * swell_hz * t + swell_phase));
    }
  }
  const double pm = MeanPower(mix.data(), n);
  const double k = pm > 0 ? std::pow(10.0, level_db / 20.0) / std::sqrt(pm) : 0.0;
  for (size_t i = 0; i < n; ++i) out[i] = static_cast<float>(std::clamp(mix[i] * k, -1.0, 1.0));  // as recorded
}

void PadWithBackground(float* out, size_t before, size_t speech, size_t after, double below_db, std::mt19937_64& rng) {
  const size_t n = before + after;
  if (n == 0) return;
  std::vector<float> background(n);
  NonSpeech(background.data(), n, rng);
  const double target = MeanPower(out + before, speech) * std::pow(10.0, -below_db / 10.0);
  const double power = MeanPower(background.data(), n);
  const double k = power > 0 && std::isfinite(target) ? std::sqrt(target / power) : 0.0;
  for (size_t i = 0; i < before; ++i) out[i] = static_cast<float>(k * background[i]);
  for (size_t i = 0; i < after; ++i) out[before + speech + i] = static_cast<float>(k * background[before + i]);
}

void WarpMelAxis(torch::Tensor features, double alpha) {
  auto mel = [](double f) { return 2595.0 * std::log10(1.0 + f / 700.0); };
  auto hz = [](double m) { return 700.0 * (std::pow(10.0, m / 2595.0) - 1.0); };
  const double lo = mel(0.0), hi = mel(kSampleRate / 2.0), step = (hi - lo) / (kMels + 1);
  std::vector<int64_t> i0(kMels), i1(kMels);
  std::vector<float> w(kMels);
  for (int m = 0; m < kMels; ++m) {
    const double centre = hz(lo + step * (m + 1));  // the centre of mel filter m (MelFilterbank)
    double src = (mel(centre / alpha) - lo) / step - 1.0;
    src = std::clamp(src, 0.0, static_cast<double>(kMels - 1));
    i0[m] = static_cast<int64_t>(src);
    i1[m] = std::min<int64_t>(i0[m] + 1, kMels - 1);
    w[m] = static_cast<float>(src - static_cast<double>(i0[m]));
  }
  torch::Tensor wt = torch::tensor(w).to(features.device());
  torch::Tensor a = features.index_select(1, torch::tensor(i0).to(features.device()));
  torch::Tensor b = features.index_select(1, torch::tensor(i1).to(features.device()));
  features.copy_(a * (1 - wt) + b * wt);
}

}  // namespace asrf
