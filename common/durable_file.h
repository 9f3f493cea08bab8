// Writing a file so that a crash or power cut leaves either the old file or the whole new one.
#pragma once

#include <string>

#include "common/status.h"

namespace asrf {

// Writes `bytes` to `path` through a temporary file of this process's own (two processes writing
// the same path never share one), synced, renamed over `path`; then syncs the folder.
Status WriteFileDurably(const std::string& path, const std::string& bytes);

}  // namespace asrf
