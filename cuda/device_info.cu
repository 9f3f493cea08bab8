// CUDA device queries (runtime API only; no kernels, no torch).
#include <cuda_runtime.h>

#include <cstdio>

#include "cuda/device_info.h"

namespace asrf {

bool BuiltWithCuda() { return true; }

int CudaDeviceCount() {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

Status ProbeCudaDevice(int index, CudaDeviceInfo* out) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return Status::Unavailable(std::string("no usable CUDA device: ") + cudaGetErrorString(e) + " (" __FILE__ ":" +
                               std::to_string(__LINE__) + ")");
  }
  if (index < 0 || index >= n) {
    return Status::NotFound("CUDA device " + std::to_string(index) + " does not exist; this host has " +
                            std::to_string(n));
  }
  cudaDeviceProp prop{};
  e = cudaGetDeviceProperties(&prop, index);
  if (e != cudaSuccess) return Status::IOError(std::string("cudaGetDeviceProperties: ") + cudaGetErrorString(e));
  out->index = index;
  out->name = prop.name;
  out->major = prop.major;
  out->minor = prop.minor;
  const auto* u = reinterpret_cast<const unsigned char*>(prop.uuid.bytes);
  char uuid[64];
  std::snprintf(uuid, sizeof(uuid), "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", u[0],
                u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13], u[14], u[15]);
  out->uuid = uuid;
  size_t free_b = 0, total_b = 0;
  if (cudaSetDevice(index) == cudaSuccess && cudaMemGetInfo(&free_b, &total_b) == cudaSuccess) {
    out->free_bytes = static_cast<int64_t>(free_b);
    out->total_bytes = static_cast<int64_t>(total_b);
  }
  return Status::Ok();
}

Status CudaMemoryUsed(int index, int64_t* used_bytes) {
  size_t free_b = 0, total_b = 0;
  cudaError_t e = cudaSetDevice(index);
  if (e == cudaSuccess) e = cudaMemGetInfo(&free_b, &total_b);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return Status::Unavailable(std::string("cudaMemGetInfo on device ") + std::to_string(index) + ": " +
                               cudaGetErrorString(e));
  }
  *used_bytes = static_cast<int64_t>(total_b - free_b);
  return Status::Ok();
}

}  // namespace asrf
