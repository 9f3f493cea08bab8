// The worker's --device (worker/device.h).
#include "worker/device.h"

#include <torch/cuda.h>

#include <algorithm>

namespace asrf {

Status ParseDevice(const std::string& spec, c10::Device* out) {
  if (spec == "cpu") {
    *out = c10::Device(c10::kCPU);
    return Status::Ok();
  }
  const std::string prefix = "cuda:";
  if (spec.rfind(prefix, 0) != 0 || spec.size() == prefix.size() || spec.size() > prefix.size() + 4 ||
      !std::all_of(spec.begin() + prefix.size(), spec.end(), [](char c) { return c >= '0' && c <= '9'; })) {
    return Status::Invalid("device \"" + spec + "\" is neither cpu nor cuda:N");
  }
  int index = std::stoi(spec.substr(prefix.size()));
  if (!torch::cuda::is_available()) {
    return Status::Unavailable("device " + spec +
                               ": this libtorch has no CUDA (Debian's is CPU-only: build against a CUDA libtorch, or "
                               "use cpu) or sees no CUDA device");
  }
  int64_t count = static_cast<int64_t>(torch::cuda::device_count());
  if (index >= count) {
    return Status::Unavailable("device " + spec + ": libtorch sees " + std::to_string(count) + " CUDA device(s)");
  }
  *out = c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(index));
  return Status::Ok();
}

}  // namespace asrf
