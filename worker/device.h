// The worker's --device as a libtorch device, for inference and training alike.
#pragma once

#include <c10/core/Device.h>

#include <string>

#include "common/status.h"

namespace asrf {

// "cpu" or "cuda:N". Invalid for any other spelling; Unavailable when this libtorch has no CUDA
// or sees no device N.
Status ParseDevice(const std::string& spec, c10::Device* out);

}  // namespace asrf
