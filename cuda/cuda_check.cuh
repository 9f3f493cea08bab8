// Checks for CUDA runtime and cuFFT calls inside the CUDA parts: a failed call returns (from the
// enclosing function, which must return asrf::Status) a Status naming the call, the error and the
// file and line. Internal to cuda/*.cu; launchers' public headers do not include it.
//
//   ASRF_CUDA_CHECK(cudaMemsetAsync(p, 0, n, stream));
//   ASRF_CUFFT_CHECK(cufftExecR2C(plan, in, out));
//   kernel<<<grid, block, 0, stream>>>(...);
//   ASRF_CUDA_CHECK(cudaGetLastError());  // a launch error (bad configuration, no device)
//   Status st = ASRF_CUDA_STATUS(cudaFree(p));  // the same Status, without returning
#pragma once

#include <cuda_runtime_api.h>
#include <cufft.h>

#include <string>

#include "common/status.h"

namespace asrf::cuda_internal {

// No device, no driver or out of device memory: Unavailable (another host or a smaller batch may
// work). A bad argument: Invalid. Anything else (a fault in a kernel, a sticky error): IOError.
inline Status CudaStatus(cudaError_t e, const char* call, const char* file, int line) {
  std::string m = std::string(call) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ") at " + file +
                  ":" + std::to_string(line);
  switch (e) {
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorMemoryAllocation:
      return Status::Unavailable(std::move(m));
    case cudaErrorInvalidValue:
    case cudaErrorInvalidConfiguration:
      return Status::Invalid(std::move(m));
    default:
      return Status::IOError(std::move(m));
  }
}

inline const char* CufftResultName(cufftResult r) {
  switch (r) {
    case CUFFT_SUCCESS: return "CUFFT_SUCCESS";
    case CUFFT_INVALID_PLAN: return "CUFFT_INVALID_PLAN";
    case CUFFT_ALLOC_FAILED: return "CUFFT_ALLOC_FAILED";
    case CUFFT_INVALID_TYPE: return "CUFFT_INVALID_TYPE";
    case CUFFT_INVALID_VALUE: return "CUFFT_INVALID_VALUE";
    case CUFFT_INTERNAL_ERROR: return "CUFFT_INTERNAL_ERROR";
    case CUFFT_EXEC_FAILED: return "CUFFT_EXEC_FAILED";
    case CUFFT_SETUP_FAILED: return "CUFFT_SETUP_FAILED";
    case CUFFT_INVALID_SIZE: return "CUFFT_INVALID_SIZE";
    case CUFFT_UNALIGNED_DATA: return "CUFFT_UNALIGNED_DATA";
    case CUFFT_INVALID_DEVICE: return "CUFFT_INVALID_DEVICE";
    case CUFFT_NO_WORKSPACE: return "CUFFT_NO_WORKSPACE";
    case CUFFT_NOT_IMPLEMENTED: return "CUFFT_NOT_IMPLEMENTED";
    case CUFFT_NOT_SUPPORTED: return "CUFFT_NOT_SUPPORTED";
    default: return "cufftResult (unknown)";
  }
}

inline Status CufftStatus(cufftResult r, const char* call, const char* file, int line) {
  std::string m = std::string(call) + ": " + CufftResultName(r) + " (" + std::to_string(static_cast<int>(r)) +
                  ") at " + file + ":" + std::to_string(line);
  switch (r) {
    case CUFFT_ALLOC_FAILED:
    case CUFFT_INVALID_DEVICE:
      return Status::Unavailable(std::move(m));
    case CUFFT_INVALID_VALUE:
    case CUFFT_INVALID_SIZE:
    case CUFFT_INVALID_TYPE:
      return Status::Invalid(std::move(m));
    default:
      return Status::IOError(std::move(m));
  }
}

// Ok for cudaSuccess; otherwise CudaStatus.
inline Status CudaCall(cudaError_t e, const char* call, const char* file, int line) {
  return e == cudaSuccess ? Status::Ok() : CudaStatus(e, call, file, line);
}

}  // namespace asrf::cuda_internal

// The Status of a CUDA runtime call, for paths that go on after an error (cleanup).
#define ASRF_CUDA_STATUS(expr) ::asrf::cuda_internal::CudaCall((expr), #expr, __FILE__, __LINE__)

#define ASRF_CUDA_CHECK(expr)                                                                \
  do {                                                                                       \
    const cudaError_t _asrf_cuda_err = (expr);                                               \
    if (_asrf_cuda_err != cudaSuccess)                                                       \
      return ::asrf::cuda_internal::CudaStatus(_asrf_cuda_err, #expr, __FILE__, __LINE__);   \
  } while (0)

#define ASRF_CUFFT_CHECK(expr)                                                               \
  do {                                                                                       \
    const cufftResult _asrf_cufft_res = (expr);                                              \
    if (_asrf_cufft_res != CUFFT_SUCCESS)                                                    \
      return ::asrf::cuda_internal::CufftStatus(_asrf_cufft_res, #expr, __FILE__, __LINE__); \
  } while (0)
