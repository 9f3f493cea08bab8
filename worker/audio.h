// Audio files in and out (libsndfile).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"

namespace asrf {

struct AudioInfo {
  int sample_rate = 0;
  int channels = 0;
  int64_t frames = 0;
};

// Only the header.
Status ProbeAudio(const std::string& path, AudioInfo* info);
// Writes 16-bit mono PCM WAV.
Status WriteWav(const std::string& path, const std::vector<int16_t>& mono, int sample_rate);

}  // namespace asrf
