// Front-end benchmark: the fused CUDA logmel80-v1 (cuda/logmel.cuh) against the torch ops it
// replaces (worker/features.cc's LogMel) on the same GPU, when this libtorch has CUDA, and on the
// CPU; milliseconds per batch for a few batch shapes, and the fused result's normalised error
// against the CPU one. Input PCM is already on the device for both GPU paths (no host copies
// timed). Built only with CUDA; without a CUDA device it says so and exits 0.
//
//   frontend_bench [--iters N] [--cpu-iters N]
#include <cuda_runtime_api.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda/device_info.h"
#include "cuda/logmel.cuh"
#include "worker/features.h"

namespace {

using Clock = std::chrono::steady_clock;

double MsSince(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

struct Shape {
  const char* name;
  int batch;
  double seconds;
};

int Fail(const std::string& what) {
  std::fprintf(stderr, "frontend_bench: %s\n", what.c_str());
  return 1;
}

#define BENCH_CUDA(expr)                                                                    \
  do {                                                                                      \
    cudaError_t _e = (expr);                                                                \
    if (_e != cudaSuccess) return Fail(std::string(#expr) + ": " + cudaGetErrorString(_e)); \
  } while (0)

#define BENCH_STATUS(expr)                         \
  do {                                             \
    asrf::Status _s = (expr);                      \
    if (!_s.ok()) return Fail(_s.ToString());      \
  } while (0)

int Run(int iters, int cpu_iters) {
  asrf::CudaDeviceInfo info;
  BENCH_STATUS(asrf::ProbeCudaDevice(0, &info));
  const bool torch_cuda = torch::cuda::is_available();
  std::printf("device: %s (sm_%d%d); torch CUDA: %s; %d GPU iterations, %d CPU iterations\n", info.name.c_str(),
              info.major, info.minor, torch_cuda ? "yes" : "no (torch GPU column skipped)", iters, cpu_iters);
  std::printf("%-12s %14s %14s %14s %12s\n", "batch", "fused GPU ms", "torch GPU ms", "torch CPU ms", "rel err");

  asrf::LogMelWorkspace* ws = nullptr;
  BENCH_STATUS(asrf::CreateLogMelWorkspace(0, &ws));
  cudaStream_t stream = nullptr;
  BENCH_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const Shape shapes[] = {{"1 x 1 s", 1, 1}, {"16 x 4 s", 16, 4}, {"8 x 20 s", 8, 20}, {"64 x 10 s", 64, 10}};
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> noise(-0.3f, 0.3f);
  for (const Shape& s : shapes) {
    const int64_t samples = static_cast<int64_t>(s.seconds * asrf::kSampleRate);
    std::vector<int64_t> lengths(s.batch);
    for (int b = 0; b < s.batch; ++b) lengths[b] = samples - b * samples / (4 * s.batch);  // ragged, down to 75 %
    torch::Tensor pcm = torch::empty({s.batch, samples}, torch::kFloat32);
    float* p = pcm.data_ptr<float>();
    for (int64_t i = 0; i < pcm.numel(); ++i) p[i] = noise(rng);
    const torch::Tensor len_t = torch::tensor(lengths, torch::kInt64);
    const int64_t t_max = asrf::NumFrames(samples);

    float* d_pcm = nullptr;
    float* d_out = nullptr;
    const size_t out_elems = static_cast<size_t>(s.batch) * t_max * asrf::kMels;
    BENCH_CUDA(cudaMalloc(reinterpret_cast<void**>(&d_pcm), pcm.numel() * sizeof(float)));
    BENCH_CUDA(cudaMalloc(reinterpret_cast<void**>(&d_out), out_elems * sizeof(float)));
    BENCH_CUDA(cudaMemcpy(d_pcm, p, pcm.numel() * sizeof(float), cudaMemcpyHostToDevice));

    // Fused.
    for (int i = 0; i < 3; ++i)
      BENCH_STATUS(asrf::LaunchLogMel(d_pcm, lengths.data(), s.batch, samples, d_out, t_max, ws, stream));
    BENCH_CUDA(cudaStreamSynchronize(stream));
    Clock::time_point t0 = Clock::now();
    for (int i = 0; i < iters; ++i)
      BENCH_STATUS(asrf::LaunchLogMel(d_pcm, lengths.data(), s.batch, samples, d_out, t_max, ws, stream));
    BENCH_CUDA(cudaStreamSynchronize(stream));
    const double fused_ms = MsSince(t0) / iters;

    // Torch on the GPU.
    double torch_gpu_ms = -1;
    if (torch_cuda) {
      torch::Tensor pcm_gpu = pcm.to(torch::kCUDA);
      torch::Tensor frames;
      for (int i = 0; i < 3; ++i) asrf::LogMel(pcm_gpu, len_t, &frames);
      torch::cuda::synchronize();
      t0 = Clock::now();
      for (int i = 0; i < iters; ++i) asrf::LogMel(pcm_gpu, len_t, &frames);
      torch::cuda::synchronize();
      torch_gpu_ms = MsSince(t0) / iters;
    }

    // Torch on the CPU, and the fused result against it.
    torch::Tensor frames, cpu;
    cpu = asrf::LogMel(pcm, len_t, &frames);
    t0 = Clock::now();
    for (int i = 0; i < cpu_iters; ++i) cpu = asrf::LogMel(pcm, len_t, &frames);
    const double cpu_ms = MsSince(t0) / cpu_iters;
    cpu = cpu.contiguous();
    std::vector<float> gpu(out_elems);
    BENCH_CUDA(cudaMemcpy(gpu.data(), d_out, out_elems * sizeof(float), cudaMemcpyDeviceToHost));
    if (cpu.numel() != static_cast<int64_t>(out_elems)) return Fail("CPU and GPU outputs differ in size");
    double diff = 0, ref = 0;
    const float* c = cpu.data_ptr<float>();
    for (size_t i = 0; i < out_elems; ++i) {
      diff += (static_cast<double>(gpu[i]) - c[i]) * (static_cast<double>(gpu[i]) - c[i]);
      ref += static_cast<double>(c[i]) * c[i];
    }
    char torch_gpu[32] = "-";
    if (torch_gpu_ms >= 0) std::snprintf(torch_gpu, sizeof(torch_gpu), "%.3f", torch_gpu_ms);
    std::printf("%-12s %14.3f %14s %14.2f %12.2e\n", s.name, fused_ms, torch_gpu, cpu_ms,
                ref > 0 ? std::sqrt(diff / ref) : std::sqrt(diff));
    BENCH_CUDA(cudaFree(d_pcm));
    BENCH_CUDA(cudaFree(d_out));
  }
  BENCH_CUDA(cudaStreamDestroy(stream));
  BENCH_STATUS(asrf::DestroyLogMelWorkspace(ws));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  int iters = 50, cpu_iters = 3;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--iters") == 0 && i + 1 < argc) {
      iters = std::max(1, std::atoi(argv[++i]));
    } else if (std::strcmp(argv[i], "--cpu-iters") == 0 && i + 1 < argc) {
      cpu_iters = std::max(1, std::atoi(argv[++i]));
    } else {
      std::fprintf(stderr, "usage: frontend_bench [--iters N] [--cpu-iters N]\n");
      return 2;
    }
  }
  if (asrf::CudaDeviceCount() == 0) {
    std::printf("frontend_bench: no CUDA device on this host (or no driver); nothing measured\n");
    return 0;
  }
  return Run(iters, cpu_iters);
}
