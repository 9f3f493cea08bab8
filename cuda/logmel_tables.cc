#include "cuda/logmel_tables.h"

#include <cmath>

namespace asrf::logmel80 {

std::vector<float> Window() {
  const double kPi = 3.14159265358979323846;
  std::vector<float> w(kFrameLength);
  for (int n = 0; n < kFrameLength; ++n) w[n] = static_cast<float>(0.5 - 0.5 * std::cos(2.0 * kPi * n / kFrameLength));
  return w;
}

// Keep in step with MelFilterbank() in worker/features.cc: the test compares the two bit for bit.
std::vector<float> Filterbank() {
  auto mel = [](double f) { return 2595.0 * std::log10(1.0 + f / 700.0); };
  auto hz = [](double m) { return 700.0 * (std::pow(10.0, m / 2595.0) - 1.0); };
  double lo = mel(0.0), hi = mel(kSampleRate / 2.0);
  std::vector<double> pts(kMels + 2);
  for (int i = 0; i < kMels + 2; ++i) pts[i] = hz(lo + (hi - lo) * i / (kMels + 1));
  std::vector<float> fb(static_cast<size_t>(kBins) * kMels, 0.0f);
  for (int k = 0; k < kBins; ++k) {
    double f = (kSampleRate / 2.0) * k / (kBins - 1);
    for (int m = 0; m < kMels; ++m) {
      double l = pts[m], c = pts[m + 1], r = pts[m + 2];
      double v = 0;
      if (f > l && f < c) v = (f - l) / (c - l);
      else if (f >= c && f < r) v = (r - f) / (r - c);
      fb[static_cast<size_t>(k) * kMels + m] = static_cast<float>(v);
    }
  }
  return fb;
}

}  // namespace asrf::logmel80
