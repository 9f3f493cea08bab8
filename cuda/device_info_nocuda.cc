// Stand-ins used when the project is built without CUDA.
#include "cuda/device_info.h"

namespace asrf {

bool BuiltWithCuda() { return false; }
int CudaDeviceCount() { return 0; }
Status ProbeCudaDevice(int index, CudaDeviceInfo*) {
  return Status::Unavailable("this build has no CUDA support (configure with ASRF_WITH_CUDA=ON where nvcc exists)");
}
Status CudaMemoryUsed(int, int64_t*) { return Status::Unavailable("this build has no CUDA support"); }

}  // namespace asrf
