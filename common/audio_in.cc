#include "common/audio_in.h"

#include <sndfile.h>
#include <soxr.h>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <system_error>

namespace asrf {
namespace {

// Frames read from libsndfile per call: bounded memory whatever the file's length (or when the
// length is unknown, e.g. SF_COUNT_MAX from a stream).
constexpr sf_count_t kChunkFrames = 1 << 16;

struct SndfileCloser {
  void operator()(SNDFILE* f) const { sf_close(f); }
};
struct SoxrDeleter {
  void operator()(soxr_t s) const { soxr_delete(s); }
};
using SndfilePtr = std::unique_ptr<SNDFILE, SndfileCloser>;
using SoxrPtr = std::unique_ptr<std::remove_pointer_t<soxr_t>, SoxrDeleter>;

// [-1, 1] float to int16, clipping out-of-range values (float sources may exceed full scale) and
// mapping NaN to silence.
void AppendPcm16(const float* in, size_t n, std::vector<int16_t>* out) {
  out->reserve(out->size() + n);
  for (size_t i = 0; i < n; ++i) {
    float v = in[i];
    if (std::isnan(v)) v = 0.0f;
    float s = std::clamp(v * 32768.0f, -32768.0f, 32767.0f);
    out->push_back(static_cast<int16_t>(std::lrintf(s)));
  }
}

// Streams mono float audio through libsoxr (HQ) to kTargetRate, appending int16 to `out`.
class Resampler {
 public:
  // REQUIRES: in_rate > 0 and in_rate != kTargetRate.
  Status Open(int in_rate) {
    ratio_ = static_cast<double>(kTargetRate) / in_rate;
    soxr_error_t err = nullptr;
    soxr_io_spec_t io = soxr_io_spec(SOXR_FLOAT32_I, SOXR_FLOAT32_I);
    soxr_quality_spec_t q = soxr_quality_spec(SOXR_HQ, 0);
    soxr_ = SoxrPtr(soxr_create(in_rate, kTargetRate, 1, &err, &io, &q, nullptr));
    if (err || !soxr_) return Status::Invalid(std::string("resampler: ") + (err ? err : "soxr_create failed"));
    return Status::Ok();
  }

  // Feeds n input samples; all of them are consumed before this returns.
  Status Process(const float* in, size_t n, std::vector<int16_t>* out) {
    size_t consumed = 0;
    while (consumed < n) {
      size_t want = static_cast<size_t>(std::ceil((n - consumed) * ratio_)) + 64;
      if (buf_.size() < want) buf_.resize(want);
      size_t idone = 0, odone = 0;
      soxr_error_t err = soxr_process(soxr_.get(), in + consumed, n - consumed, &idone, buf_.data(), buf_.size(), &odone);
      if (err) return Status::Invalid(std::string("resampler: ") + err);
      AppendPcm16(buf_.data(), odone, out);
      consumed += idone;
      if (idone == 0 && odone == 0) return Status::Invalid("resampler: made no progress");
    }
    return Status::Ok();
  }

  // Drains the samples the filter still holds (end of input).
  Status Flush(std::vector<int16_t>* out) {
    if (buf_.size() < 4096) buf_.resize(4096);
    for (int guard = 0; guard < 1 << 20; ++guard) {
      size_t odone = 0;
      soxr_error_t err = soxr_process(soxr_.get(), nullptr, 0, nullptr, buf_.data(), buf_.size(), &odone);
      if (err) return Status::Invalid(std::string("resampler: ") + err);
      if (odone == 0) return Status::Ok();
      AppendPcm16(buf_.data(), odone, out);
    }
    return Status::Invalid("resampler: flush did not end");
  }

 private:
  SoxrPtr soxr_;
  double ratio_ = 1.0;
  std::vector<float> buf_;
};

// A WAV file read through libsndfile's virtual I/O with its 'data' chunk's size read as
// 0xFFFFFFFF, "to the end of the file" (as streaming writers leave it): a recording whose writer
// stopped before it went back to fill in the size (it says 0) is then read like sox or ffmpeg read it.
struct UnsizedWav {
  int fd = -1;
  sf_count_t length = 0, pos = 0, size_at = 0;  // size_at: offset of the 4-byte data size
  ~UnsizedWav() {
    if (fd >= 0) close(fd);
  }
  static sf_count_t Length(void* u) { return static_cast<UnsizedWav*>(u)->length; }
  static sf_count_t Tell(void* u) { return static_cast<UnsizedWav*>(u)->pos; }
  static sf_count_t Seek(sf_count_t off, int whence, void* u) {
    auto* w = static_cast<UnsizedWav*>(u);
    sf_count_t base = whence == SEEK_CUR ? w->pos : whence == SEEK_END ? w->length : 0;
    if (base + off < 0) return -1;
    return w->pos = base + off;
  }
  static sf_count_t Read(void* ptr, sf_count_t n, void* u) {
    auto* w = static_cast<UnsizedWav*>(u);
    ssize_t got = pread(w->fd, ptr, static_cast<size_t>(n), w->pos);
    if (got <= 0) return 0;
    auto* bytes = static_cast<unsigned char*>(ptr);
    for (sf_count_t i = std::max(w->pos, w->size_at); i < std::min(w->pos + got, w->size_at + 4); ++i)
      bytes[i - w->pos] = 0xFF;
    w->pos += got;
    return got;
  }
  static sf_count_t Write(const void*, sf_count_t, void*) { return 0; }
};

// For a RIFF/WAVE file whose 'data' chunk says 0 bytes and is followed by more: the offset of that
// size field; 0 otherwise.
sf_count_t UnfinishedWavDataSize(const std::string& path, sf_count_t file_size) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) return 0;
  unsigned char h[12];
  sf_count_t at = 0;
  if (std::fread(h, 1, 12, f) == 12 && !std::memcmp(h, "RIFF", 4) && !std::memcmp(h + 8, "WAVE", 4)) {
    sf_count_t pos = 12;
    unsigned char c[8];
    while (pos + 8 <= file_size && std::fseek(f, static_cast<long>(pos), SEEK_SET) == 0 && std::fread(c, 1, 8, f) == 8) {
      uint32_t size = c[4] | c[5] << 8 | c[6] << 16 | static_cast<uint32_t>(c[7]) << 24;
      if (!std::memcmp(c, "data", 4)) {
        if (size == 0 && file_size > pos + 8) at = pos + 4;
        break;
      }
      pos += 8 + size + (size & 1);
    }
  }
  std::fclose(f);
  return at;
}

// libsndfile's log for a WAV/AIFF file whose chunk is shorter than its header says holds
// "data : DECLARED (should be PRESENT)"; the declared byte count, or -1.
int64_t DeclaredDataBytes(SNDFILE* f, int64_t* present) {
  char log[8192] = {};
  sf_command(f, SFC_GET_LOG_INFO, log, sizeof log);
  for (const char* key : {"data : ", "SSND : "}) {
    const char* p = std::strstr(log, key);
    long long declared = 0, should = 0;
    if (p && std::sscanf(p + std::strlen(key), "%lld (should be %lld)", &declared, &should) == 2) {
      *present = should;
      return declared;
    }
  }
  return -1;
}

std::string Seconds(double s) {
  char b[32];
  std::snprintf(b, sizeof b, "%.2f s", s);
  return b;
}

// An opened file: libsndfile's handle and what its header says, after the checks both decoding
// and probing make. `unsized` outlives the handle that reads through it.
struct OpenedAudio {
  std::unique_ptr<UnsizedWav> unsized;
  SndfilePtr f;
  SF_INFO info{};
};

Status OpenAudio(const std::string& path, OpenedAudio* o) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) return Status::Invalid(path + ": not readable (no such file)");
  if (std::filesystem::is_directory(path, ec)) return Status::Invalid(path + ": not readable (a directory)");
  const bool regular = std::filesystem::is_regular_file(path, ec);
  const auto file_size = regular ? static_cast<sf_count_t>(std::filesystem::file_size(path, ec)) : -1;
  if (regular && file_size == 0) return Status::Invalid(path + ": empty file (0 bytes), not audio");

  SF_INFO& info = o->info;
  o->f.reset(sf_open(path.c_str(), SFM_READ, &info));
  if (!o->f) return Status::Invalid(path + ": not audio (" + sf_strerror(nullptr) + ")");
  if (info.frames == 0 && regular && (info.format & SF_FORMAT_TYPEMASK) == SF_FORMAT_WAV) {
    if (sf_count_t at = UnfinishedWavDataSize(path, file_size); at > 0) {
      auto unsized = std::make_unique<UnsizedWav>();
      unsized->fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
      unsized->length = file_size;
      unsized->size_at = at;
      SF_VIRTUAL_IO io{&UnsizedWav::Length, &UnsizedWav::Seek, &UnsizedWav::Read, &UnsizedWav::Write, &UnsizedWav::Tell};
      SF_INFO again{};
      SNDFILE* g = unsized->fd >= 0 ? sf_open_virtual(&io, SFM_READ, &again, unsized.get()) : nullptr;
      if (g) {
        o->f.reset(g);
        o->unsized = std::move(unsized);
        info = again;
      }
    }
  }
  if (info.channels <= 0 || info.samplerate <= 0) {
    return Status::Invalid(path + ": not audio (" + std::to_string(info.channels) + " channels at " +
                           std::to_string(info.samplerate) + " Hz)");
  }
  // A chunk cut short (an interrupted copy or download): libsndfile reads what is there and says
  // nothing, so compare with what the header declares. A size of 0xFFFFFFFF means "unknown".
  int64_t present = 0;
  if (int64_t declared = DeclaredDataBytes(o->f.get(), &present);
      declared > present && declared != 0xFFFFFFFFLL && present >= 0 && info.frames > 0) {
    const double bytes_per_s = static_cast<double>(present) / static_cast<double>(info.frames) * info.samplerate;
    if ((declared - present) / bytes_per_s > 0.01) {
      return Status::Invalid(path + ": truncated: its header declares " + Seconds(declared / bytes_per_s) +
                             " of audio, the file holds " + Seconds(present / bytes_per_s) +
                             " (an interrupted copy or download?)");
    }
  }
  return Status::Ok();
}

}  // namespace

Status ProbeAudioHeader(const std::string& path, AudioHeader* out) {
  OpenedAudio o;
  ASRF_RETURN_IF_ERROR(OpenAudio(path, &o));
  out->sample_rate = o.info.samplerate;
  out->channels = o.info.channels;
  out->frames = o.info.frames == SF_COUNT_MAX ? -1 : o.info.frames;
  return Status::Ok();
}

Status DecodeAudio16k(const std::string& path, DecodedAudio* out) {
  *out = DecodedAudio{};
  OpenedAudio opened;
  ASRF_RETURN_IF_ERROR(OpenAudio(path, &opened));
  SNDFILE* const handle = opened.f.get();
  const SF_INFO& info = opened.info;
  out->source_rate = info.samplerate;
  out->source_channels = info.channels;
  // libsndfile normalises integer PCM to [-1, 1) for float reads (the default); say so anyway.
  sf_command(handle, SFC_SET_NORM_FLOAT, nullptr, SF_TRUE);

  const bool resample = info.samplerate != kTargetRate;
  Resampler resampler;
  if (resample) ASRF_RETURN_IF_ERROR(resampler.Open(info.samplerate).WithContext(path));
  // Reserve only for a plausible known length (at most ~24 h at the source rate).
  if (info.frames > 0 && info.frames < static_cast<sf_count_t>(info.samplerate) * 86400) {
    out->pcm.reserve(static_cast<size_t>(static_cast<double>(info.frames) * kTargetRate / info.samplerate) + 64);
  }

  const int ch = info.channels;
  std::vector<float> interleaved(static_cast<size_t>(kChunkFrames) * ch);
  std::vector<float> mono(kChunkFrames);
  sf_count_t total = 0;
  for (;;) {
    sf_count_t got = sf_readf_float(handle, interleaved.data(), kChunkFrames);
    if (got <= 0) break;
    // Before the resampler: one NaN or infinity in there spreads over the whole filter length.
    auto finite = [](float v) { return std::isfinite(v) ? v : 0.0f; };
    double mix_energy = 0, channel_energy = 0;
    std::vector<double> per_channel(static_cast<size_t>(ch));
    for (sf_count_t i = 0; i < got; ++i) {
      const float* frame = &interleaved[static_cast<size_t>(i) * ch];
      float sum = 0.0f;
      for (int c = 0; c < ch; ++c) {
        const float v = finite(frame[c]);
        sum += v;
        per_channel[static_cast<size_t>(c)] += static_cast<double>(v) * v;
      }
      mono[i] = sum / static_cast<float>(ch);
      mix_energy += static_cast<double>(mono[i]) * mono[i];
    }
    // Channels that cancel in the average (one wired in opposite polarity): take the loudest one
    // alone for this stretch rather than hand the recogniser near-silence.
    for (double e : per_channel) channel_energy += e / ch;
    if (ch > 1 && channel_energy > 1e-6 * static_cast<double>(got) && mix_energy < 0.01 * channel_energy) {
      const int loud = static_cast<int>(std::max_element(per_channel.begin(), per_channel.end()) - per_channel.begin());
      for (sf_count_t i = 0; i < got; ++i) mono[i] = finite(interleaved[static_cast<size_t>(i) * ch + loud]);
    }
    if (resample) {
      ASRF_RETURN_IF_ERROR(resampler.Process(mono.data(), static_cast<size_t>(got), &out->pcm).WithContext(path));
    } else {
      AppendPcm16(mono.data(), static_cast<size_t>(got), &out->pcm);
    }
    total += got;
  }
  if (int err = sf_error(handle); err != SF_ERR_NO_ERROR) {
    return Status::Invalid(path + ": decode failed after " + std::to_string(total) + " frames (" +
                           sf_error_number(err) + ")");
  }
  if (total == 0) return Status::Invalid(path + ": empty (no samples)");
  // Compressed streams cut short end early without an error. FLAC's header counts its samples
  // exactly; an MP3's count may be an estimate (no Xing header), so it gets a margin.
  if (info.frames > 0 && info.frames != SF_COUNT_MAX && total < info.frames) {
    const bool estimate = (info.format & SF_FORMAT_TYPEMASK) == SF_FORMAT_MPEG;
    const sf_count_t margin = estimate ? std::max<sf_count_t>(info.samplerate / 2, info.frames / 50) : info.samplerate / 100;
    if (info.frames - total > margin) {
      return Status::Invalid(path + ": truncated or corrupt: its header declares " +
                             Seconds(static_cast<double>(info.frames) / info.samplerate) + " of audio, " +
                             Seconds(static_cast<double>(total) / info.samplerate) + " of it decodes");
    }
  }
  if (resample) ASRF_RETURN_IF_ERROR(resampler.Flush(&out->pcm).WithContext(path));
  if (out->pcm.empty()) return Status::Invalid(path + ": empty (no samples after resampling)");
  return Status::Ok();
}

}  // namespace asrf
