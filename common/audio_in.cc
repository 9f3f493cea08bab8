#include "common/audio_in.h"

#include <sndfile.h>
#include <soxr.h>

#include <algorithm>
#include <cmath>
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

}  // namespace

Status DecodeAudio16k(const std::string& path, DecodedAudio* out) {
  *out = DecodedAudio{};
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) return Status::Invalid(path + ": not readable (no such file)");
  if (std::filesystem::is_directory(path, ec)) return Status::Invalid(path + ": not readable (a directory)");
  if (std::filesystem::is_regular_file(path, ec) && std::filesystem::file_size(path, ec) == 0)  // -1 on error
    return Status::Invalid(path + ": empty file (0 bytes), not audio");

  SF_INFO info{};
  SndfilePtr f(sf_open(path.c_str(), SFM_READ, &info));
  if (!f) return Status::Invalid(path + ": not audio (" + sf_strerror(nullptr) + ")");
  if (info.channels <= 0 || info.samplerate <= 0) {
    return Status::Invalid(path + ": not audio (" + std::to_string(info.channels) + " channels at " +
                           std::to_string(info.samplerate) + " Hz)");
  }
  out->source_rate = info.samplerate;
  out->source_channels = info.channels;
  // libsndfile normalises integer PCM to [-1, 1) for float reads (the default); say so anyway.
  sf_command(f.get(), SFC_SET_NORM_FLOAT, nullptr, SF_TRUE);

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
    sf_count_t got = sf_readf_float(f.get(), interleaved.data(), kChunkFrames);
    if (got <= 0) break;
    for (sf_count_t i = 0; i < got; ++i) {
      const float* frame = &interleaved[static_cast<size_t>(i) * ch];
      float sum = 0.0f;
      for (int c = 0; c < ch; ++c) sum += frame[c];
      mono[i] = sum / static_cast<float>(ch);
      // Before the resampler: one NaN or infinity in there spreads over the whole filter length.
      if (!std::isfinite(mono[i])) mono[i] = 0.0f;
    }
    if (resample) {
      ASRF_RETURN_IF_ERROR(resampler.Process(mono.data(), static_cast<size_t>(got), &out->pcm).WithContext(path));
    } else {
      AppendPcm16(mono.data(), static_cast<size_t>(got), &out->pcm);
    }
    total += got;
  }
  if (int err = sf_error(f.get()); err != SF_ERR_NO_ERROR) {
    return Status::Invalid(path + ": decode failed after " + std::to_string(total) + " frames (" +
                           sf_error_number(err) + ")");
  }
  if (total == 0) return Status::Invalid(path + ": empty (no samples)");
  if (resample) ASRF_RETURN_IF_ERROR(resampler.Flush(&out->pcm).WithContext(path));
  if (out->pcm.empty()) return Status::Invalid(path + ": empty (no samples after resampling)");
  return Status::Ok();
}

}  // namespace asrf
