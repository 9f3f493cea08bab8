#include "worker/audio.h"

#include <sndfile.h>

namespace asrf {

Status WriteWav(const std::string& path, const std::vector<int16_t>& mono, int sample_rate) {
  SF_INFO sfi{};
  sfi.samplerate = sample_rate;
  sfi.channels = 1;
  sfi.format = SF_FORMAT_WAV | SF_FORMAT_PCM_16;
  SNDFILE* f = sf_open(path.c_str(), SFM_WRITE, &sfi);
  if (!f) return Status::IOError("cannot write " + path + ": " + sf_strerror(nullptr));
  sf_count_t n = sf_writef_short(f, mono.data(), static_cast<sf_count_t>(mono.size()));
  sf_close(f);
  if (n != static_cast<sf_count_t>(mono.size())) return Status::IOError("short write to " + path);
  return Status::Ok();
}

}  // namespace asrf
