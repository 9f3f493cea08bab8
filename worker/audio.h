// Audio files in and out (libsndfile).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"

namespace asrf {

// Writes 16-bit mono PCM WAV.
Status WriteWav(const std::string& path, const std::vector<int16_t>& mono, int sample_rate);

}  // namespace asrf
