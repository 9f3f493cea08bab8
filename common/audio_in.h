// Reading the user's audio: whatever libsndfile decodes (WAV, FLAC, OGG/Vorbis, Opus, MP3 where
// the library has it), any sample rate and channel count, to 16 kHz mono 16-bit PCM (libsoxr).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"

namespace asrf {

inline constexpr int kTargetRate = 16000;

struct DecodedAudio {
  std::vector<int16_t> pcm;  // 16 kHz mono
  int source_rate = 0;
  int source_channels = 0;
  double duration_s() const { return static_cast<double>(pcm.size()) / kTargetRate; }
};

// Decodes `path`. Errors (Invalid) name the file and say why: not readable, not audio, empty
// (no samples), truncated (less audio than its header declares), or a decode failure part-way. A
// WAV whose writer never filled in its data size (0, with audio after it) is read to its end.
// Channels are averaged, except where they cancel (one in opposite polarity): then the loudest
// is taken. The resampler is libsoxr's high quality setting. Thread-safe (no shared state).
Status DecodeAudio16k(const std::string& path, DecodedAudio* out);

struct AudioHeader {
  int sample_rate = 0;
  int channels = 0;
  int64_t frames = 0;  // -1: not known without decoding (e.g. a stream)
};
// What DecodeAudio16k would find from the header alone, with the same checks it makes before
// decoding (not readable, not audio, a WAV or AIFF cut short, a WAV whose size was never filled
// in read to its end). A compressed file cut short is only found by decoding it.
Status ProbeAudioHeader(const std::string& path, AudioHeader* out);

}  // namespace asrf
