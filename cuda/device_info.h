// What the worker knows about CUDA devices. Safe to call on machines without a GPU or driver:
// CudaDeviceCount() then returns 0 and ProbeCudaDevice() a clear error. When the project is built
// without CUDA the same functions exist and report that.
#pragma once

#include <cstdint>
#include <string>

#include "common/status.h"

namespace asrf {

struct CudaDeviceInfo {
  int index = 0;
  std::string name;
  int64_t total_bytes = 0;
  int64_t free_bytes = 0;
  int major = 0;
  int minor = 0;
  std::string uuid;  // "GPU-" and the 16 bytes as 8-4-4-4-12 hex digits, as nvidia-smi -L shows it
};

bool BuiltWithCuda();
// Number of usable CUDA devices; 0 without a driver or device.
int CudaDeviceCount();
Status ProbeCudaDevice(int index, CudaDeviceInfo* out);
// Device memory in use on GPU `index` (total minus free: every process's, this one's included).
Status CudaMemoryUsed(int index, int64_t* used_bytes);

}  // namespace asrf
