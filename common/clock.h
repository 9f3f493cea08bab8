// Time helpers. Broker logic takes "now" as an argument so tests can drive a fake clock.
#pragma once

#include <chrono>
#include <cstdint>

namespace asrf {

// Milliseconds on a monotonic clock: for deadlines, leases and latencies.
inline int64_t MonoMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Microseconds on a monotonic clock.
inline int64_t MonoUs() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Milliseconds since the Unix epoch: for timestamps that are stored or shown.
inline int64_t WallMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

}  // namespace asrf
