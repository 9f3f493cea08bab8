#include "worker/features.h"

#include <ATen/ATen.h>
#include <torch/fft.h>

#include <cmath>

namespace asrf {

torch::Tensor MelFilterbank() {
  auto mel = [](double f) { return 2595.0 * std::log10(1.0 + f / 700.0); };
  auto hz = [](double m) { return 700.0 * (std::pow(10.0, m / 2595.0) - 1.0); };
  const int bins = kFft / 2 + 1;
  double lo = mel(0.0), hi = mel(kSampleRate / 2.0);
  std::vector<double> pts(kMels + 2);
  for (int i = 0; i < kMels + 2; ++i) pts[i] = hz(lo + (hi - lo) * i / (kMels + 1));
  torch::Tensor fb = torch::zeros({bins, kMels}, torch::kFloat32);
  auto a = fb.accessor<float, 2>();
  for (int k = 0; k < bins; ++k) {
    double f = (kSampleRate / 2.0) * k / (bins - 1);
    for (int m = 0; m < kMels; ++m) {
      double l = pts[m], c = pts[m + 1], r = pts[m + 2];
      double v = 0;
      if (f > l && f < c) v = (f - l) / (c - l);
      else if (f >= c && f < r) v = (r - f) / (r - c);
      a[k][m] = static_cast<float>(v);
    }
  }
  return fb;
}

torch::Tensor LogMel(const torch::Tensor& pcm_in, const torch::Tensor& lengths_in, torch::Tensor* frames_out) {
  torch::NoGradGuard no_grad;
  torch::Tensor pcm = pcm_in.to(torch::kFloat32);
  torch::Tensor lengths = lengths_in.to(torch::kCPU).to(torch::kInt64);
  const int64_t B = pcm.size(0);
  std::vector<int64_t> nframes(B);
  int64_t tmax = 0;
  auto la = lengths.accessor<int64_t, 1>();
  for (int64_t b = 0; b < B; ++b) {
    nframes[b] = NumFrames(std::min<int64_t>(la[b], pcm.size(1)));
    tmax = std::max(tmax, nframes[b]);
  }
  torch::Tensor frames = torch::tensor(nframes, torch::kInt64);
  if (frames_out) *frames_out = frames;
  if (tmax == 0) return torch::zeros({B, 0, kMels}, pcm.options());
  // [B, T, 400] frames (views), windowed, zero-padded FFT, power, mel, log.
  int64_t need = (tmax - 1) * kHop + kFrameLength;
  if (pcm.size(1) < need) pcm = torch::constant_pad_nd(pcm, {0, need - pcm.size(1)});
  torch::Tensor fr = pcm.narrow(1, 0, need).unfold(1, kFrameLength, kHop);
  static const torch::Tensor window = torch::hann_window(kFrameLength, /*periodic=*/true, torch::kFloat32);
  static const torch::Tensor fbank = MelFilterbank();
  torch::Tensor spec = torch::fft::rfft(fr * window.to(pcm.device()), kFft, -1);
  torch::Tensor power = torch::view_as_real(spec).square().sum(-1);
  torch::Tensor logmel = torch::log(torch::matmul(power, fbank.to(pcm.device())) + 1e-6);
  // Per-utterance, per-bin normalisation over valid frames only.
  torch::Tensor mask = (torch::arange(tmax, frames.options()).unsqueeze(0) < frames.unsqueeze(1))
                           .to(logmel.device())
                           .to(torch::kFloat32)
                           .unsqueeze(2);  // [B, T, 1]
  torch::Tensor count = mask.sum(1, /*keepdim=*/true).clamp_min(1.0);
  torch::Tensor mean = (logmel * mask).sum(1, true) / count;
  torch::Tensor var = ((logmel - mean).square() * mask).sum(1, true) / count;
  return (logmel - mean) / (var.sqrt() + 1e-5) * mask;
}

}  // namespace asrf
