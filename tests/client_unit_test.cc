// The client's batch-transcription pieces without a fleet: decoding audio files written here with
// libsndfile (WAV at 44.1 kHz stereo and 8 kHz mono, FLAC, OGG/Vorbis, float WAV) to 16 kHz mono
// int16 with the tone intact; the errors for empty, non-audio and missing files; the quiet-point
// segmenter on synthetic speech-like signals; segment results reassembled into transcripts and
// every output format, output paths and atomic writes.
#include <gtest/gtest.h>
#include <sndfile.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <numbers>
#include <random>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/audio_in.h"
#include "client/segmenter.h"
#include "client/transcript.h"
#include "tests/harness.h"

namespace asrf::testing {
namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;
constexpr double kPi = std::numbers::pi;

// ---------------------------------------------------------------------------------------------
// Decoding

// Writes interleaved float samples (full scale 1.0) in `format`.
void WriteFloats(const std::string& path, int format, int rate, int channels, const std::vector<float>& buf) {
  SF_INFO info{};
  info.samplerate = rate;
  info.channels = channels;
  info.format = format;
  SNDFILE* f = sf_open(path.c_str(), SFM_WRITE, &info);
  ASSERT_NE(f, nullptr) << path << ": " << sf_strerror(nullptr);
  const sf_count_t frames = static_cast<sf_count_t>(buf.size()) / channels;
  EXPECT_EQ(sf_writef_float(f, buf.data(), frames), frames);
  sf_close(f);
}

// Writes `seconds` of a sine at `freq` Hz, channel c with amplitude amps[c] (full scale 1.0).
void WriteSine(const std::string& path, int format, int rate, double seconds, double freq,
               const std::vector<double>& amps) {
  const int64_t frames = static_cast<int64_t>(std::llround(seconds * rate));
  std::vector<float> buf(static_cast<size_t>(frames) * amps.size());
  for (int64_t i = 0; i < frames; ++i) {
    double s = std::sin(2 * kPi * freq * static_cast<double>(i) / rate);
    for (size_t c = 0; c < amps.size(); ++c) buf[i * amps.size() + c] = static_cast<float>(amps[c] * s);
  }
  WriteFloats(path, format, rate, static_cast<int>(amps.size()), buf);
}

// Least-squares fit of a*sin + b*cos at `freq` over pcm[b, e) at 16 kHz: the tone's amplitude and
// the RMS of what the tone does not explain.
struct ToneFit {
  double amplitude = 0;
  double residual_rms = 0;
};
ToneFit FitTone(const std::vector<int16_t>& pcm, size_t b, size_t e, double freq) {
  double ss = 0, cc = 0, sc = 0, xs = 0, xc = 0;
  for (size_t i = b; i < e; ++i) {
    double ph = 2 * kPi * freq * static_cast<double>(i) / kTargetRate;
    double s = std::sin(ph), c = std::cos(ph), x = pcm[i];
    ss += s * s, cc += c * c, sc += s * c, xs += x * s, xc += x * c;
  }
  double det = ss * cc - sc * sc;
  double a = (xs * cc - xc * sc) / det, bb = (xc * ss - xs * sc) / det;
  double res = 0;
  for (size_t i = b; i < e; ++i) {
    double ph = 2 * kPi * freq * static_cast<double>(i) / kTargetRate;
    double d = pcm[i] - (a * std::sin(ph) + bb * std::cos(ph));
    res += d * d;
  }
  return {std::hypot(a, bb), std::sqrt(res / static_cast<double>(e - b))};
}

// Checks length (±1%), the tone's amplitude (±5%) and that it is the dominant content: at least
// 20x the amplitude of nearby off-frequency probes, and (for lossless sources) little residual.
void ExpectTone(const DecodedAudio& a, double seconds, double freq, double amp, double max_residual_ratio) {
  const double want = seconds * kTargetRate;
  EXPECT_NEAR(static_cast<double>(a.pcm.size()), want, want * 0.01);
  ASSERT_GT(a.pcm.size(), static_cast<size_t>(kTargetRate / 2));
  // Skip 100 ms at each end: the resampler's filter edges.
  size_t b = kTargetRate / 10, e = a.pcm.size() - kTargetRate / 10;
  ToneFit on = FitTone(a.pcm, b, e, freq);
  EXPECT_NEAR(on.amplitude, amp * 32768, amp * 32768 * 0.05) << "at " << freq << " Hz";
  for (double probe : {freq * 0.7, freq * 1.37}) {
    ToneFit off = FitTone(a.pcm, b, e, probe);
    EXPECT_LT(off.amplitude * 20, on.amplitude) << "probe " << probe << " Hz";
  }
  EXPECT_LT(on.residual_rms, on.amplitude * max_residual_ratio) << "tone at " << freq << " Hz not clean";
}

// Names through JSON: valid UTF-8 stays readable, '%' and bytes of no UTF-8 sequence become %XX,
// and every name comes back byte for byte.
TEST(NameEscape, NamesRoundTripByteForByte) {
  EXPECT_EQ(EscapeName("calls/a b.wav"), "calls/a b.wav");
  EXPECT_EQ(EscapeName("caf\xc3\xa9"), "caf\xc3\xa9");
  EXPECT_EQ(EscapeName("M\xfcller"), "M%FCller");
  EXPECT_EQ(EscapeName("100%"), "100%25");
  // Not well-formed UTF-8, which a JSON writer would replace: an overlong form, a surrogate.
  EXPECT_EQ(EscapeName("\xc0\xa3"), "%C0%A3");
  EXPECT_EQ(EscapeName("\xed\xa0\x80"), "%ED%A0%80");
  for (const std::string& name : {std::string("M\xfcller.wav"), std::string("M\xf6ller.wav"), std::string("50%25 off"),
                                 std::string("\xc3"), std::string("a\0b", 3), std::string("%zz%4"), std::string(),
                                 std::string("\xc0\xa3\xf4\x90\x80\x80")}) {
    EXPECT_EQ(UnescapeName(EscapeName(name)), name) << name;
  }
  EXPECT_NE(EscapeName("M\xfcller.wav"), EscapeName("M\xf6ller.wav"));
}

TEST(DecodeAudio, Wav44k1StereoAveragesChannelsAndResamplesAcrossChunks) {
  TempDir dir;
  // 10 s at 44.1 kHz: several of the decoder's read chunks, so chunk joins are inside the check.
  WriteSine(dir / "a.wav", SF_FORMAT_WAV | SF_FORMAT_PCM_16, 44100, 10.0, 440.0, {0.6, 0.2});
  DecodedAudio a;
  Status st = DecodeAudio16k(dir / "a.wav", &a);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(a.source_rate, 44100);
  EXPECT_EQ(a.source_channels, 2);
  ExpectTone(a, 10.0, 440.0, 0.4, 0.01);  // the mean of 0.6 and 0.2
  EXPECT_NEAR(a.duration_s(), 10.0, 0.1);
}

TEST(DecodeAudio, Wav8kMonoUpsamples) {
  TempDir dir;
  WriteSine(dir / "b.wav", SF_FORMAT_WAV | SF_FORMAT_PCM_16, 8000, 2.5, 1000.0, {0.5});
  DecodedAudio a;
  Status st = DecodeAudio16k(dir / "b.wav", &a);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(a.source_rate, 8000);
  EXPECT_EQ(a.source_channels, 1);
  ExpectTone(a, 2.5, 1000.0, 0.5, 0.01);
}

TEST(DecodeAudio, Flac48k) {
  TempDir dir;
  WriteSine(dir / "c.flac", SF_FORMAT_FLAC | SF_FORMAT_PCM_16, 48000, 3.0, 3000.0, {0.3});
  DecodedAudio a;
  Status st = DecodeAudio16k(dir / "c.flac", &a);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(a.source_rate, 48000);
  ExpectTone(a, 3.0, 3000.0, 0.3, 0.01);
}

TEST(DecodeAudio, OggVorbis22k05Stereo) {
  TempDir dir;
  WriteSine(dir / "d.ogg", SF_FORMAT_OGG | SF_FORMAT_VORBIS, 22050, 3.0, 440.0, {0.5, 0.5});
  DecodedAudio a;
  Status st = DecodeAudio16k(dir / "d.ogg", &a);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(a.source_rate, 22050);
  EXPECT_EQ(a.source_channels, 2);
  ExpectTone(a, 3.0, 440.0, 0.5, 0.1);  // lossy: a looser residual
}

TEST(DecodeAudio, Source16kIsNotResampled) {
  TempDir dir;
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> dist(-30000, 30000);
  std::vector<int16_t> pcm(16000 * 2 + 123);
  for (auto& s : pcm) s = static_cast<int16_t>(dist(rng));
  SF_INFO info{};
  info.samplerate = 16000;
  info.channels = 1;
  info.format = SF_FORMAT_WAV | SF_FORMAT_PCM_16;
  SNDFILE* f = sf_open((dir / "e.wav").c_str(), SFM_WRITE, &info);
  ASSERT_NE(f, nullptr);
  ASSERT_EQ(sf_writef_short(f, pcm.data(), static_cast<sf_count_t>(pcm.size())), static_cast<sf_count_t>(pcm.size()));
  sf_close(f);
  DecodedAudio a;
  Status st = DecodeAudio16k(dir / "e.wav", &a);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(a.pcm, pcm);  // bit-exact: no resampler in the way
}

TEST(DecodeAudio, FloatSourceBeyondFullScaleIsClipped) {
  TempDir dir;
  ASSERT_NO_FATAL_FAILURE(WriteFloats(dir / "f.wav", SF_FORMAT_WAV | SF_FORMAT_FLOAT, 16000, 1,
                                      {1.5f, -1.5f, 0.25f, -0.25f, 0.0f, 1.0f, -1.0f}));
  DecodedAudio a;
  Status st = DecodeAudio16k(dir / "f.wav", &a);
  ASSERT_TRUE(st.ok()) << st.ToString();
  std::vector<int16_t> want = {32767, -32768, 8192, -8192, 0, 32767, -32768};
  EXPECT_EQ(a.pcm, want);
}

// One NaN in a float file at another rate used to reach the resampler, which spread it over its
// whole filter: everything around it came out as silence.
TEST(DecodeAudio, ANanInAFileToResampleSilencesOnlyItself) {
  TempDir dir;
  std::vector<float> in(44100);
  for (size_t i = 0; i < in.size(); ++i) in[i] = 0.5f * std::sin(2 * kPi * 440 * i / 44100.0);
  in[22050] = std::nanf("");
  ASSERT_NO_FATAL_FAILURE(WriteFloats(dir / "nan.wav", SF_FORMAT_WAV | SF_FORMAT_FLOAT, 44100, 1, in));
  DecodedAudio a;
  Status st = DecodeAudio16k(dir / "nan.wav", &a);
  ASSERT_TRUE(st.ok()) << st.ToString();
  ASSERT_GE(a.pcm.size(), 15000u);
  // Around the NaN (at 0.5 s: sample 8000 here) the tone is still there.
  int peak = 0;
  for (size_t i = 7900; i < 8100; ++i) peak = std::max(peak, std::abs(static_cast<int>(a.pcm[i])));
  EXPECT_GT(peak, 10000);
}

TEST(DecodeAudio, EmptyWavIsInvalid) {
  TempDir dir;
  SF_INFO info{};
  info.samplerate = 44100;
  info.channels = 2;
  info.format = SF_FORMAT_WAV | SF_FORMAT_PCM_16;
  SNDFILE* f = sf_open((dir / "empty.wav").c_str(), SFM_WRITE, &info);
  ASSERT_NE(f, nullptr);
  sf_close(f);
  DecodedAudio a;
  Status st = DecodeAudio16k(dir / "empty.wav", &a);
  EXPECT_EQ(st.code(), Status::Code::kInvalid) << st.ToString();
  EXPECT_NE(st.message().find("empty"), std::string::npos) << st.message();
  EXPECT_NE(st.message().find(dir / "empty.wav"), std::string::npos) << st.message();
}

TEST(DecodeAudio, ZeroByteFileSaysItIsEmpty) {
  TempDir dir;
  { std::ofstream(dir / "zero.flac"); }
  DecodedAudio a;
  Status st = DecodeAudio16k(dir / "zero.flac", &a);
  EXPECT_EQ(st.code(), Status::Code::kInvalid) << st.ToString();
  EXPECT_EQ(st.message(), std::string(dir / "zero.flac") + ": empty file (0 bytes), not audio");
}

TEST(DecodeAudio, TextFileNamedWavIsInvalid) {
  TempDir dir;
  std::ofstream(dir / "notes.wav") << "These are meeting notes, not audio.\nSecond line.\n";
  DecodedAudio a;
  Status st = DecodeAudio16k(dir / "notes.wav", &a);
  EXPECT_EQ(st.code(), Status::Code::kInvalid) << st.ToString();
  EXPECT_NE(st.message().find(dir / "notes.wav"), std::string::npos) << st.message();
  EXPECT_NE(st.message().find("not audio"), std::string::npos) << st.message();
  EXPECT_TRUE(a.pcm.empty());
}

// Keeps the first `keep` of a file's bytes (an interrupted copy or download).
void Truncate(const fs::path& p, double keep) {
  fs::resize_file(p, static_cast<uintmax_t>(static_cast<double>(fs::file_size(p)) * keep));
}

TEST(DecodeAudio, TruncatedFilesAreErrorsThatSayHowMuchIsMissing) {
  TempDir dir;
  struct Case {
    const char* name;
    int format;
    const char* says;
  };
  for (const Case& c : {Case{"t.wav", SF_FORMAT_WAV | SF_FORMAT_PCM_16, "truncated: its header declares 3.00 s"},
                        Case{"t.aiff", SF_FORMAT_AIFF | SF_FORMAT_PCM_16, "truncated: its header declares 3.00 s"},
                        Case{"t.flac", SF_FORMAT_FLAC | SF_FORMAT_PCM_16, "truncated or corrupt: its header declares 3.00 s"},
                        Case{"t.mp3", SF_FORMAT_MPEG | SF_FORMAT_MPEG_LAYER_III, "truncated or corrupt: its header declares"}}) {
    const fs::path p = dir / c.name;
    WriteSine(p, c.format, 16000, 3.0, 440.0, {0.5});
    DecodedAudio whole;
    Status ok = DecodeAudio16k(p, &whole);
    ASSERT_TRUE(ok.ok()) << c.name << ": " << ok.ToString();  // complete files, MP3 included, pass
    Truncate(p, 0.5);
    DecodedAudio a;
    Status st = DecodeAudio16k(p, &a);
    EXPECT_EQ(st.code(), Status::Code::kInvalid) << c.name << ": " << st.ToString();
    EXPECT_NE(st.message().find(std::string(p) + ": " + c.says), std::string::npos) << st.message();
  }
  // Cut by less than 10 ms (e.g. a writer whose header counts a frame too many): read as it is.
  const fs::path p = dir / "nearly.wav";
  WriteSine(p, SF_FORMAT_WAV | SF_FORMAT_PCM_16, 16000, 3.0, 440.0, {0.5});
  fs::resize_file(p, fs::file_size(p) - 2 * 80);
  DecodedAudio a;
  Status st = DecodeAudio16k(p, &a);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(a.pcm.size(), 3 * 16000 - 80u);
}

TEST(DecodeAudio, WavWhoseWriterNeverFilledInItsSizeIsReadToTheEnd) {
  TempDir dir;
  const fs::path p = dir / "unfinished.wav";
  WriteSine(p, SF_FORMAT_WAV | SF_FORMAT_PCM_16, 16000, 2.0, 440.0, {0.5});
  // A recorder that stopped before going back to its header: the data size says 0.
  std::string bytes;
  {
    std::ifstream in(p, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
  }
  const size_t at = bytes.find("data");
  ASSERT_NE(at, std::string::npos);
  bytes.replace(at + 4, 4, std::string(4, '\0'));
  std::ofstream(p, std::ios::binary | std::ios::trunc) << bytes;
  DecodedAudio a;
  Status st = DecodeAudio16k(p, &a);
  ASSERT_TRUE(st.ok()) << st.ToString();
  ExpectTone(a, 2.0, 440.0, 0.5, 0.02);
}

TEST(DecodeAudio, ChannelsInOppositePolarityDoNotCancel) {
  TempDir dir;
  WriteSine(dir / "inverted.wav", SF_FORMAT_WAV | SF_FORMAT_PCM_16, 44100, 3.0, 440.0, {0.5, -0.5});
  DecodedAudio a;
  Status st = DecodeAudio16k(dir / "inverted.wav", &a);
  ASSERT_TRUE(st.ok()) << st.ToString();
  ExpectTone(a, 3.0, 440.0, 0.5, 0.02);
}

TEST(DecodeAudio, MissingFileIsAnError) {
  TempDir dir;
  DecodedAudio a;
  Status st = DecodeAudio16k(dir / "nope.flac", &a);
  EXPECT_FALSE(st.ok());
  EXPECT_EQ(st.code(), Status::Code::kInvalid);
  EXPECT_NE(st.message().find(dir / "nope.flac"), std::string::npos) << st.message();
  Status st_dir = DecodeAudio16k(dir.path(), &a);
  EXPECT_FALSE(st_dir.ok());
}

// ---------------------------------------------------------------------------------------------
// Segmenting

struct Span {
  int64_t begin, end;
};

// Speech-like: bursts of loud noise (1-8 s) separated by near-silence (0.3-1 s), from a seed.
struct Synthetic {
  std::vector<int16_t> pcm;
  std::vector<Span> gaps;
};
Synthetic BurstsAndGaps(double seconds, uint32_t seed) {
  Synthetic s;
  const int64_t n = static_cast<int64_t>(seconds * kTargetRate);
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> burst_s(1.0, 8.0), gap_s(0.3, 1.0);
  std::normal_distribution<double> loud(0, 3000), quiet(0, 20);
  s.pcm.reserve(n);
  while (static_cast<int64_t>(s.pcm.size()) < n) {
    int64_t b = static_cast<int64_t>(burst_s(rng) * kTargetRate);
    for (int64_t i = 0; i < b; ++i) s.pcm.push_back(static_cast<int16_t>(std::clamp(loud(rng), -32768.0, 32767.0)));
    int64_t g = static_cast<int64_t>(gap_s(rng) * kTargetRate);
    int64_t g0 = static_cast<int64_t>(s.pcm.size());
    for (int64_t i = 0; i < g; ++i) s.pcm.push_back(static_cast<int16_t>(quiet(rng)));
    s.gaps.push_back({g0, g0 + g});
  }
  s.pcm.resize(n);
  return s;
}

void ExpectCover(const std::vector<SegmentBounds>& segs, int64_t n, double max_s) {
  ASSERT_FALSE(segs.empty());
  EXPECT_EQ(segs.front().begin, 0);
  EXPECT_EQ(segs.back().end, n);
  for (size_t i = 0; i < segs.size(); ++i) {
    EXPECT_LT(segs[i].begin, segs[i].end) << "segment " << i;
    EXPECT_LE(segs[i].end - segs[i].begin, static_cast<int64_t>(max_s * kTargetRate)) << "segment " << i;
    if (i > 0) {
      EXPECT_EQ(segs[i].begin, segs[i - 1].end) << "segment " << i;
    }
  }
}

double Rms(const std::vector<int16_t>& pcm, int64_t b, int64_t e) {
  b = std::max<int64_t>(0, b), e = std::min<int64_t>(static_cast<int64_t>(pcm.size()), e);
  double sum = 0;
  for (int64_t i = b; i < e; ++i) sum += static_cast<double>(pcm[i]) * pcm[i];
  return std::sqrt(sum / static_cast<double>(e - b));
}

TEST(Segmenter, TenMinutesOfBurstsCutsInTheGaps) {
  Synthetic s = BurstsAndGaps(600.0, 20240611);
  const int64_t n = static_cast<int64_t>(s.pcm.size());
  SegmenterOptions opt;  // 30 s max, 5 s min
  std::vector<SegmentBounds> segs = SplitAtQuietPoints(s.pcm.data(), n, opt);
  ExpectCover(segs, n, opt.max_s);
  EXPECT_GE(segs.size(), 20u);

  int checked = 0;
  for (size_t i = 0; i + 1 < segs.size(); ++i) {
    const int64_t cut = segs[i].end;
    const int64_t lo = segs[i].begin + static_cast<int64_t>(opt.min_s * kTargetRate);
    const int64_t hi = segs[i].begin + static_cast<int64_t>(opt.max_s * kTargetRate);
    EXPECT_GE(cut, lo) << "cut " << i << " before the search window";
    // A cut is forced when no gap lies wholly inside its search window; others must be in a gap.
    bool forced = std::none_of(s.gaps.begin(), s.gaps.end(), [&](const Span& g) { return g.begin >= lo && g.end <= hi; });
    if (forced) continue;
    ++checked;
    bool in_gap = std::any_of(s.gaps.begin(), s.gaps.end(), [&](const Span& g) { return cut > g.begin && cut < g.end; });
    EXPECT_TRUE(in_gap) << "cut " << i << " at " << cut / double(kTargetRate) << " s is not in a gap";
    EXPECT_LT(Rms(s.pcm, cut - 160, cut + 160), 100.0) << "cut " << i << " is not near-silent";
  }
  EXPECT_EQ(checked, static_cast<int>(segs.size()) - 1);  // bursts <= 8 s: every window has a gap
}

TEST(Segmenter, OtherLimitsHoldToo) {
  Synthetic s = BurstsAndGaps(240.0, 99);
  const int64_t n = static_cast<int64_t>(s.pcm.size());
  for (auto [max_s, min_s] : {std::pair{10.0, 2.0}, {20.0, 0.0}, {15.0, 15.0}, {30.0, 40.0}}) {
    SegmenterOptions opt;
    opt.max_s = max_s;
    opt.min_s = min_s;
    SCOPED_TRACE("max_s " + std::to_string(max_s) + " min_s " + std::to_string(min_s));
    std::vector<SegmentBounds> segs = SplitAtQuietPoints(s.pcm.data(), n, opt);
    ExpectCover(segs, n, max_s);
    EXPECT_GE(segs.size(), static_cast<size_t>(std::ceil(240.0 / max_s)));
  }
}

TEST(Segmenter, NoSilenceStillCutsWithinMax) {
  std::mt19937 rng(3);
  std::normal_distribution<double> loud(0, 4000);
  std::vector<int16_t> pcm(static_cast<size_t>(95.5 * kTargetRate));
  for (auto& x : pcm) x = static_cast<int16_t>(std::clamp(loud(rng), -32768.0, 32767.0));
  std::vector<SegmentBounds> segs = SplitAtQuietPoints(pcm.data(), static_cast<int64_t>(pcm.size()), SegmenterOptions{});
  ExpectCover(segs, static_cast<int64_t>(pcm.size()), 30.0);
  EXPECT_GE(segs.size(), 4u);
  // Constant tone, every frame as loud as the next.
  std::vector<int16_t> tone(static_cast<size_t>(61 * kTargetRate));
  for (size_t i = 0; i < tone.size(); ++i) tone[i] = static_cast<int16_t>(10000 * std::sin(2 * kPi * 300 * i / kTargetRate));
  segs = SplitAtQuietPoints(tone.data(), static_cast<int64_t>(tone.size()), SegmenterOptions{});
  ExpectCover(segs, static_cast<int64_t>(tone.size()), 30.0);
  EXPECT_GE(segs.size(), 3u);
}

// A file just over max_s whose quietest point is near its end: the cut leaves min_s after it, not
// a fragment of a fraction of a second (cut off from its words, or under one frame and lost).
TEST(Segmenter, TheLastSegmentIsNoFragment) {
  std::mt19937 rng(5);
  std::normal_distribution<double> loud(0, 4000);
  std::vector<int16_t> pcm(static_cast<size_t>(30.3 * kTargetRate));
  for (auto& x : pcm) x = static_cast<int16_t>(std::clamp(loud(rng), -32768.0, 32767.0));
  for (size_t i = static_cast<size_t>(29.9 * kTargetRate); i < static_cast<size_t>(30.0 * kTargetRate); ++i) pcm[i] = 0;
  SegmenterOptions opt;
  auto segs = SplitAtQuietPoints(pcm.data(), static_cast<int64_t>(pcm.size()), opt);
  ExpectCover(segs, static_cast<int64_t>(pcm.size()), opt.max_s);
  for (const auto& s : segs) EXPECT_GE(s.end - s.begin, static_cast<int64_t>(opt.min_s * kTargetRate));
}

// A DC offset adds the same energy to every frame; it must not make soft speech look like the
// pause before it. Loud speech, a 200 ms pause at 14 s, 2 s of soft speech, loud again.
TEST(Segmenter, ADcOffsetDoesNotMoveTheCutIntoSoftSpeech) {
  std::mt19937 rng(8);
  std::normal_distribution<double> loud(0, 4000), soft(0, 520), hush(0, 20);
  const int64_t n = static_cast<int64_t>(40 * kTargetRate);
  const int64_t pause_b = 14 * kTargetRate, pause_e = pause_b + kTargetRate / 5, soft_e = pause_e + 2 * kTargetRate;
  for (int dc : {0, 2000}) {
    SCOPED_TRACE("dc " + std::to_string(dc));
    std::vector<int16_t> pcm(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      double v = i >= pause_b && i < pause_e ? hush(rng) : i >= pause_e && i < soft_e ? soft(rng) : loud(rng);
      pcm[i] = static_cast<int16_t>(std::clamp(v + dc, -32768.0, 32767.0));
    }
    SegmenterOptions opt;
    opt.max_s = 16;
    opt.min_s = 5;
    auto segs = SplitAtQuietPoints(pcm.data(), n, opt);
    ASSERT_GE(segs.size(), 2u);
    EXPECT_GT(segs[0].end, pause_b);
    EXPECT_LT(segs[0].end, pause_e) << "cut at " << segs[0].end / double(kTargetRate) << " s";
  }
}

TEST(Segmenter, ShortAndEmptyInputs) {
  std::vector<int16_t> pcm(30 * kTargetRate, 1000);
  auto segs = SplitAtQuietPoints(pcm.data(), static_cast<int64_t>(pcm.size()), SegmenterOptions{});
  ASSERT_EQ(segs.size(), 1u);  // exactly max_s: one segment
  EXPECT_EQ(segs[0].begin, 0);
  EXPECT_EQ(segs[0].end, static_cast<int64_t>(pcm.size()));
  segs = SplitAtQuietPoints(pcm.data(), 12345, SegmenterOptions{});
  ASSERT_EQ(segs.size(), 1u);
  EXPECT_EQ(segs[0].end, 12345);
  pcm.push_back(0);  // one sample over: two segments
  segs = SplitAtQuietPoints(pcm.data(), static_cast<int64_t>(pcm.size()), SegmenterOptions{});
  ExpectCover(segs, static_cast<int64_t>(pcm.size()), 30.0);
  EXPECT_EQ(segs.size(), 2u);
  EXPECT_TRUE(SplitAtQuietPoints(pcm.data(), 0, SegmenterOptions{}).empty());
  EXPECT_TRUE(SplitAtQuietPoints(nullptr, 0, SegmenterOptions{}).empty());
}

TEST(Segmenter, EveryPauseEndsASegment) {
  // Ten minutes of 1-8 s bursts with 0.3-1 s gaps: every gap is a cut, at its middle, and a
  // 0.15 s dip inside a burst is not.
  Synthetic s = BurstsAndGaps(600.0, 7);
  const int64_t n = static_cast<int64_t>(s.pcm.size());
  std::vector<Span> dips;
  std::mt19937 rng(8);
  std::normal_distribution<double> quiet(0, 20);
  for (size_t i = 0; i + 1 < s.gaps.size(); ++i) {
    const int64_t mid = (s.gaps[i].end + s.gaps[i + 1].begin) / 2, len = kTargetRate * 15 / 100;
    if (s.gaps[i + 1].begin - s.gaps[i].end < 2 * kTargetRate) continue;  // bursts under 2 s keep no dip
    for (int64_t k = mid; k < mid + len; ++k) s.pcm[k] = static_cast<int16_t>(quiet(rng));
    dips.push_back({mid, mid + len});
  }
  ASSERT_GT(dips.size(), 20u);
  SegmenterOptions opt;  // pause_s 0.3, min_pause_segment_s 1
  opt.pause_keep_s = -1;  // nothing left out: the file's tail stays in its last segment
  std::vector<SegmentBounds> segs = SplitAtPauses(s.pcm.data(), n, opt);
  ExpectCover(segs, n, opt.max_s);
  // Every gap but the file's tail is cut (gaps of 0.3 s and a frame or two over, at 10 ms
  // frames, may read as just under 0.3 s).
  size_t inner_gaps = 0;
  for (const Span& g : s.gaps) {
    if (g.end >= n) continue;
    ++inner_gaps;
    const bool cut = std::any_of(segs.begin(), segs.end(), [&](const SegmentBounds& b) { return b.end > g.begin && b.end < g.end; });
    EXPECT_TRUE(cut || g.end - g.begin < kTargetRate * 32 / 100)
        << "no cut in the gap at " << g.begin / double(kTargetRate) << "-" << g.end / double(kTargetRate) << " s";
  }
  EXPECT_GE(segs.size(), inner_gaps * 95 / 100);
  for (size_t i = 0; i + 1 < segs.size(); ++i) {
    const int64_t cut = segs[i].end;
    auto g = std::find_if(s.gaps.begin(), s.gaps.end(), [&](const Span& x) { return cut > x.begin && cut < x.end; });
    ASSERT_NE(g, s.gaps.end()) << "cut " << i << " at " << cut / double(kTargetRate) << " s is not in a gap";
    // The middle of the gap, to within the 30 ms the energy is smoothed over.
    EXPECT_NEAR(cut, (g->begin + g->end) / 2, kTargetRate * 3 / 100) << "cut " << i;
  }
  // With pause_s 0 the file is split by length only, as SplitAtQuietPoints does.
  opt.pause_s = 0;
  std::vector<SegmentBounds> by_length = SplitAtPauses(s.pcm.data(), n, opt);
  std::vector<SegmentBounds> quiet_points = SplitAtQuietPoints(s.pcm.data(), n, opt);
  ASSERT_EQ(by_length.size(), quiet_points.size());
  for (size_t i = 0; i < by_length.size(); ++i) EXPECT_EQ(by_length[i].end, quiet_points[i].end);
}

TEST(Segmenter, PausesUnderNoiseAndShortWordsAndNoPauses) {
  std::mt19937 rng(11);
  std::normal_distribution<double> unit(0, 1);
  // Loud steady noise (speech 12 dB above it) with 0.5 s pauses every 2 s: cut under noise too.
  std::vector<int16_t> pcm;
  std::vector<Span> pauses;
  for (int k = 0; k < 10; ++k) {
    for (int i = 0; i < 2 * kTargetRate; ++i) pcm.push_back(static_cast<int16_t>(unit(rng) * 4000));
    const int64_t p0 = static_cast<int64_t>(pcm.size());
    for (int i = 0; i < kTargetRate / 2; ++i) pcm.push_back(static_cast<int16_t>(unit(rng) * 1000));
    pauses.push_back({p0, static_cast<int64_t>(pcm.size())});
  }
  const int64_t n = static_cast<int64_t>(pcm.size());
  std::vector<SegmentBounds> segs = SplitAtPauses(pcm.data(), n, SegmenterOptions{});
  ExpectCover(segs, n, 30.0);   // no pause is longer than 2 pause_keep_s + pause_s
  ASSERT_EQ(segs.size(), 10u);  // the last pause is the file's tail
  for (size_t i = 0; i + 1 < segs.size(); ++i) EXPECT_NEAR(segs[i].end, (pauses[i].begin + pauses[i].end) / 2, 480);

  // 0.4 s words between 0.5 s pauses: no cut leaves a segment under min_pause_segment_s.
  std::vector<int16_t> words;
  for (int k = 0; k < 20; ++k) {
    for (int i = 0; i < kTargetRate * 4 / 10; ++i) words.push_back(static_cast<int16_t>(unit(rng) * 4000));
    for (int i = 0; i < kTargetRate / 2; ++i) words.push_back(static_cast<int16_t>(unit(rng) * 10));
  }
  segs = SplitAtPauses(words.data(), static_cast<int64_t>(words.size()), SegmenterOptions{});
  ExpectCover(segs, static_cast<int64_t>(words.size()), 30.0);
  EXPECT_GE(segs.size(), 5u);
  for (size_t i = 0; i < segs.size(); ++i) EXPECT_GE(segs[i].end - segs[i].begin, kTargetRate) << "segment " << i;

  // Steady noise: no pause, one segment; 95 s of it: split by length only.
  std::vector<int16_t> steady(static_cast<size_t>(95 * kTargetRate));
  for (auto& x : steady) x = static_cast<int16_t>(unit(rng) * 3000);
  segs = SplitAtPauses(steady.data(), 20 * kTargetRate, SegmenterOptions{});
  EXPECT_EQ(segs.size(), 1u);
  segs = SplitAtPauses(steady.data(), static_cast<int64_t>(steady.size()), SegmenterOptions{});
  ExpectCover(segs, static_cast<int64_t>(steady.size()), 30.0);
  EXPECT_GE(segs.size(), 4u);
  EXPECT_TRUE(SplitAtPauses(steady.data(), 0, SegmenterOptions{}).empty());
  EXPECT_TRUE(SplitAtPauses(nullptr, 5, SegmenterOptions{}).empty());
}

TEST(Segmenter, LongPausesLeadInAndTailAreLeftOutBeyondWhatIsKept) {
  // 1.5 s lead-in, 2 s of speech, a 4 s pause, 1 s, a 0.6 s pause, 3 s, a 2 s tail.
  std::mt19937 rng(12);
  std::normal_distribution<double> unit(0, 1);
  std::vector<int16_t> pcm;
  auto add = [&](double seconds, double sigma) {
    for (int64_t i = 0; i < static_cast<int64_t>(seconds * kTargetRate); ++i) {
      pcm.push_back(static_cast<int16_t>(std::clamp(unit(rng) * sigma, -32768.0, 32767.0)));
    }
  };
  add(1.5, 20), add(2, 3000), add(4, 20), add(1, 3000), add(0.6, 20), add(3, 3000), add(2, 20);
  const int64_t n = static_cast<int64_t>(pcm.size());
  auto s = [](double seconds) { return static_cast<int64_t>(seconds * kTargetRate); };
  const int64_t tol = s(0.03);
  SegmenterOptions opt;  // pause_keep_s 0.5
  std::vector<SegmentBounds> segs = SplitAtPauses(pcm.data(), n, opt);
  ASSERT_EQ(segs.size(), 3u);
  EXPECT_NEAR(segs[0].begin, s(1.0), tol);  // 0.5 s of the lead-in kept
  EXPECT_NEAR(segs[0].end, s(4.0), tol);    // 0.5 s of the pause after the speech
  EXPECT_NEAR(segs[1].begin, s(7.0), tol);  // and before the next
  EXPECT_NEAR(segs[1].end, s(8.8), tol);    // a short pause: cut at its middle
  EXPECT_EQ(segs[2].begin, segs[1].end);
  EXPECT_NEAR(segs[2].end, s(12.6), tol);   // 0.5 s of the tail
  // Less kept, more left out.
  opt.pause_keep_s = 0.2;
  segs = SplitAtPauses(pcm.data(), n, opt);
  ASSERT_EQ(segs.size(), 3u);
  EXPECT_NEAR(segs[0].begin, s(1.3), tol);
  EXPECT_NEAR(segs[1].begin, s(7.3), tol);
  EXPECT_NEAR(segs[2].end, s(12.3), tol);
  // Negative: every pause is cut at its middle and all of the file is transcribed.
  opt.pause_keep_s = -1;
  segs = SplitAtPauses(pcm.data(), n, opt);
  ExpectCover(segs, n, 30.0);
  ASSERT_EQ(segs.size(), 3u);
  EXPECT_NEAR(segs[0].end, s(5.5), tol);
  EXPECT_NEAR(segs[1].end, s(8.8), tol);

  // Ten minutes of bursts and gaps with longer gaps among them: segments in order, never
  // overlapping, at most max_s, and all that is left out is quiet.
  Synthetic b = BurstsAndGaps(600.0, 31);
  for (size_t i = 0; i < b.gaps.size(); i += 3) {  // every third gap 2-4 s longer
    const int64_t extra = s(2.0 + static_cast<double>(i % 5) / 2);
    std::vector<int16_t> quiet(static_cast<size_t>(extra));
    for (auto& x : quiet) x = static_cast<int16_t>(unit(rng) * 20);
    b.pcm.insert(b.pcm.begin() + b.gaps[i].end, quiet.begin(), quiet.end());
    for (size_t k = i; k < b.gaps.size(); ++k) {
      b.gaps[k].end += extra;
      if (k > i) b.gaps[k].begin += extra;
    }
  }
  const int64_t nb = static_cast<int64_t>(b.pcm.size());
  segs = SplitAtPauses(b.pcm.data(), nb, SegmenterOptions{});
  ASSERT_FALSE(segs.empty());
  int64_t at = 0, left = 0;
  for (size_t i = 0; i < segs.size(); ++i) {
    ASSERT_LE(at, segs[i].begin) << "segment " << i;
    ASSERT_LT(segs[i].begin, segs[i].end) << "segment " << i;
    EXPECT_LE(segs[i].end - segs[i].begin, s(30.0)) << "segment " << i;
    if (segs[i].begin > at) {
      left += segs[i].begin - at;
      EXPECT_LT(Rms(b.pcm, at, segs[i].begin), 100.0) << "left out before segment " << i;
    }
    at = segs[i].end;
  }
  EXPECT_GT(left, s(60.0));  // 2-4 s of every third of ~120 gaps, less 1 s kept of each
}

// ---------------------------------------------------------------------------------------------
// Transcripts

std::string SegmentJson(const std::string& file, int index, int count, double offset_s, double duration_s,
                        const std::string& text, const json& words, int infer_ms = 12) {
  return json{{"file", file},   {"index", index},       {"count", count}, {"offset_s", offset_s},
              {"duration_s", duration_s}, {"model", "en-small"}, {"text", text}, {"words", words},
              {"infer_ms", infer_ms}}
      .dump();
}

TEST(Transcript, DropUnsureEmptiesSegmentsBelowTheMeanConfidence) {
  SegmentOut seg;
  seg.start = 1, seg.end = 3, seg.text = "one two";
  seg.words = {{"one", 1.1, 1.4, 0.2}, {"two", 1.5, 1.9, 0.5}};  // mean 0.35
  SegmentOut kept = seg;
  EXPECT_FALSE(DropUnsure(&kept, 0.35));
  EXPECT_EQ(kept.text, "one two");
  EXPECT_EQ(kept.words.size(), 2u);
  EXPECT_FALSE(DropUnsure(&kept, 0.0));
  EXPECT_TRUE(DropUnsure(&seg, 0.4));
  EXPECT_EQ(seg.text, "");
  EXPECT_TRUE(seg.words.empty());
  EXPECT_DOUBLE_EQ(seg.start, 1);  // the segment stays on the timeline
  EXPECT_DOUBLE_EQ(seg.end, 3);
  EXPECT_FALSE(DropUnsure(&seg, 0.4));  // no words: nothing to drop
}

TEST(Transcript, ParseSegmentResultShiftsWordsByOffset) {
  json words = json::array({{{"w", "hello"}, {"s", 0.5}, {"e", 0.9}, {"c", 0.93}},
                            {{"w", "world"}, {"s", 1.0}, {"e", 5.4}, {"c", 1.7}}});  // e beyond duration, c > 1
  std::string j = SegmentJson("talks/a.wav", 2, 5, 60.0, 5.0, "hello world", words, 345);
  SegmentOut seg;
  std::string file, model;
  int index = -1, count = -1;
  double offset = -1;
  int64_t infer_ms = -1;
  Status st = ParseSegmentResult(j, &seg, &file, &index, &count, &offset, &model, &infer_ms);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(file, "talks/a.wav");
  EXPECT_EQ(index, 2);
  EXPECT_EQ(count, 5);
  EXPECT_DOUBLE_EQ(offset, 60.0);
  EXPECT_EQ(model, "en-small");
  EXPECT_EQ(infer_ms, 345);
  EXPECT_DOUBLE_EQ(seg.start, 60.0);
  EXPECT_DOUBLE_EQ(seg.end, 65.0);
  EXPECT_EQ(seg.text, "hello world");
  ASSERT_EQ(seg.words.size(), 2u);
  EXPECT_EQ(seg.words[0].text, "hello");
  EXPECT_DOUBLE_EQ(seg.words[0].start, 60.5);
  EXPECT_DOUBLE_EQ(seg.words[0].end, 60.9);
  EXPECT_DOUBLE_EQ(seg.words[0].confidence, 0.93);
  EXPECT_DOUBLE_EQ(seg.words[1].start, 61.0);
  EXPECT_DOUBLE_EQ(seg.words[1].end, 65.0);  // clamped to the segment's end
  EXPECT_DOUBLE_EQ(seg.words[1].confidence, 1.0);

  // Null outputs are allowed; "words" and "infer_ms" may be absent.
  json bare = json::parse(j);
  bare.erase("words");
  bare.erase("infer_ms");
  SegmentOut seg2;
  ASSERT_TRUE(ParseSegmentResult(bare.dump(), &seg2, nullptr, nullptr, nullptr, nullptr, nullptr).ok());
  EXPECT_TRUE(seg2.words.empty());
  EXPECT_DOUBLE_EQ(seg2.end, 65.0);
}

// Each segment says which model file transcribed it; a file whose segments came from workers with
// different model files says so in its JSON instead of passing for one model's work.
TEST(Transcript, TheModelsThatTranscribedAFileAreNamedWithTheirChecksums) {
  const std::string a(64, 'a'), b(64, 'b');
  auto seg = [](int i, const std::string& sha) {
    json j = json::parse(SegmentJson("f.wav", i, 3, i * 10.0, 10.0, "x", json::array()));
    if (!sha.empty()) j["model_sha256"] = sha;
    return j.dump();
  };
  Transcript one, mixed;
  for (int i = 0; i < 3; ++i) {
    SegmentOut s1, s2;
    ASSERT_TRUE(ParseSegmentResult(seg(i, a), &s1, nullptr, nullptr, nullptr, nullptr, &one.model).ok());
    ASSERT_TRUE(ParseSegmentResult(seg(i, i == 2 ? b : a), &s2, nullptr, nullptr, nullptr, nullptr, &mixed.model).ok());
    one.segments.push_back(s1);
    mixed.segments.push_back(s2);
  }
  json j1 = json::parse(FormatJson(one));
  EXPECT_EQ(j1["model"], "en-small");
  EXPECT_EQ(j1["model_sha256"], a);
  EXPECT_FALSE(j1.contains("models"));
  ASSERT_EQ(ModelsUsed(mixed).size(), 2u);
  json j2 = json::parse(FormatJson(mixed));
  EXPECT_EQ(j2["model_sha256"], a);
  ASSERT_TRUE(j2.contains("models"));
  ASSERT_EQ(j2["models"].size(), 2u);
  EXPECT_EQ(j2["models"][1]["model_sha256"], b);
  // A segment from a worker that sends no checksum is no second model beside one that does.
  Transcript upgrade;
  for (int i = 0; i < 3; ++i) {
    SegmentOut s;
    ASSERT_TRUE(ParseSegmentResult(seg(i, i == 0 ? "" : a), &s, nullptr, nullptr, nullptr, nullptr, &upgrade.model).ok());
    upgrade.segments.push_back(s);
  }
  ASSERT_EQ(ModelsUsed(upgrade).size(), 1u);
  EXPECT_EQ(json::parse(FormatJson(upgrade))["model_sha256"], a);
  // A worker that does not send a checksum: no field, not an empty one.
  SegmentOut bare;
  Transcript old;
  ASSERT_TRUE(ParseSegmentResult(seg(0, ""), &bare, nullptr, nullptr, nullptr, nullptr, &old.model).ok());
  old.segments.push_back(bare);
  EXPECT_FALSE(json::parse(FormatJson(old)).contains("model_sha256"));
}

TEST(Transcript, BadSegmentResultsAreInvalid) {
  const json good = json::parse(SegmentJson("a.wav", 0, 1, 0.0, 3.0, "hi", json::array({{{"w", "hi"}, {"s", 0.1}, {"e", 0.4}, {"c", 0.9}}})));
  std::vector<std::pair<std::string, std::string>> cases = {
      {"not json", "{\"file\": "},
      {"array", "[1, 2]"},
      {"empty", ""},
  };
  auto mutate = [&](const std::string& name, auto&& f) {
    json j = good;
    f(j);
    cases.push_back({name, j.dump()});
  };
  mutate("no text", [](json& j) { j.erase("text"); });
  mutate("text not string", [](json& j) { j["text"] = 5; });
  mutate("no file", [](json& j) { j.erase("file"); });
  mutate("index float", [](json& j) { j["index"] = 0.5; });
  mutate("index >= count", [](json& j) { j["index"] = 1; });
  mutate("count 0", [](json& j) { j["count"] = 0; j["index"] = 0; });
  mutate("negative offset", [](json& j) { j["offset_s"] = -1.0; });
  mutate("offset string", [](json& j) { j["offset_s"] = "0"; });
  mutate("no duration", [](json& j) { j.erase("duration_s"); });
  mutate("no model", [](json& j) { j.erase("model"); });
  mutate("words object", [](json& j) { j["words"] = json::object(); });
  mutate("word not object", [](json& j) { j["words"] = json::array({"hi"}); });
  mutate("word start string", [](json& j) { j["words"][0]["s"] = "0.1"; });
  mutate("word without w", [](json& j) { j["words"][0].erase("w"); });
  mutate("infer_ms string", [](json& j) { j["infer_ms"] = "12"; });
  for (const auto& [name, text] : cases) {
    SegmentOut seg;
    seg.text = "untouched";
    int index = -7;
    Status st = ParseSegmentResult(text, &seg, nullptr, &index, nullptr, nullptr, nullptr);
    EXPECT_EQ(st.code(), Status::Code::kInvalid) << name << ": " << st.ToString();
    EXPECT_EQ(seg.text, "untouched") << name;
    EXPECT_EQ(index, -7) << name;
  }
}

// Times of the "HH:MM:SS,mmm --> HH:MM:SS,mmm" lines, in order.
std::vector<std::pair<double, double>> CueTimes(const std::string& text, char sep) {
  const std::regex line(std::string("^(\\d\\d):(\\d\\d):(\\d\\d)") + (sep == '.' ? "\\." : ",") +
                        "(\\d\\d\\d) --> (\\d\\d):(\\d\\d):(\\d\\d)" + (sep == '.' ? "\\." : ",") + "(\\d\\d\\d)$");
  std::vector<std::pair<double, double>> out;
  std::istringstream in(text);
  std::string l;
  while (std::getline(in, l)) {
    if (l.find("-->") == std::string::npos) continue;
    std::smatch m;
    EXPECT_TRUE(std::regex_match(l, m, line)) << "bad timing line: " << l;
    if (m.empty()) continue;
    auto t = [&](int k) {
      return std::stoi(m[k]) * 3600.0 + std::stoi(m[k + 1]) * 60.0 + std::stoi(m[k + 2]) + std::stoi(m[k + 3]) / 1000.0;
    };
    out.push_back({t(1), t(5)});
  }
  return out;
}

TEST(Transcript, TenMinutesReassembledFromSegmentsIsMonotonic) {
  Synthetic s = BurstsAndGaps(600.0, 5);
  std::vector<SegmentBounds> bounds = SplitAtQuietPoints(s.pcm.data(), static_cast<int64_t>(s.pcm.size()), SegmenterOptions{});
  const int count = static_cast<int>(bounds.size());
  ASSERT_GE(count, 20);
  // What workers would send back: a few words spread over each segment, the last running past
  // the segment's end (models overshoot); one segment heard nothing.
  std::vector<std::string> results;
  for (int i = 0; i < count; ++i) {
    double off = static_cast<double>(bounds[i].begin) / kTargetRate;
    double dur = static_cast<double>(bounds[i].end - bounds[i].begin) / kTargetRate;
    json words = json::array();
    std::string text;
    if (i != 3) {
      for (int w = 0; w < 4; ++w) {
        double ws = dur * w / 4.0, we = w == 3 ? dur + 0.2 : dur * (w + 0.8) / 4.0;
        words.push_back({{"w", "w" + std::to_string(i) + "_" + std::to_string(w)}, {"s", ws}, {"e", we}, {"c", 0.8}});
        text += (w ? " " : "") + words.back()["w"].get<std::string>();
      }
    }
    results.push_back(SegmentJson("long.flac", i, count, off, dur, text, words));
  }
  std::shuffle(results.begin(), results.end(), std::mt19937(11));  // results arrive in any order

  Transcript t;
  t.source = "long.flac";
  t.duration_s = 600.0;
  t.segments.resize(count);
  std::vector<bool> seen(count, false);
  for (const std::string& r : results) {
    SegmentOut seg;
    int index = -1, cnt = -1;
    Status st = ParseSegmentResult(r, &seg, nullptr, &index, &cnt, nullptr, &t.model);
    ASSERT_TRUE(st.ok()) << st.ToString();
    ASSERT_EQ(cnt, count);
    ASSERT_FALSE(seen[index]);
    seen[index] = true;
    t.segments[index] = std::move(seg);
  }

  double last = 0;
  for (int i = 0; i < count; ++i) {
    const SegmentOut& seg = t.segments[i];
    EXPECT_NEAR(seg.start, last, 1e-9) << "segment " << i << " does not follow the previous one";
    EXPECT_GT(seg.end, seg.start);
    double w_last = seg.start;
    for (const WordOut& w : seg.words) {
      EXPECT_GE(w.start, w_last) << "segment " << i;
      EXPECT_GE(w.end, w.start);
      EXPECT_LE(w.end, seg.end);
      w_last = w.start;
    }
    last = seg.end;
  }
  EXPECT_NEAR(last, 600.0, 1e-6);

  auto cues = CueTimes(FormatSrt(t), ',');
  EXPECT_EQ(cues.size(), static_cast<size_t>(count - 1));  // the silent segment has no cue
  for (size_t i = 0; i < cues.size(); ++i) {
    EXPECT_LT(cues[i].first, cues[i].second);
    if (i > 0) {
      EXPECT_GE(cues[i].first, cues[i - 1].second);
    }
  }
  auto vcues = CueTimes(FormatVtt(t), '.');
  EXPECT_EQ(vcues, cues);

  json j = json::parse(FormatJson(t));
  double prev = 0;
  size_t words = 0;
  for (const json& seg : j["segments"]) {
    for (const json& w : seg["words"]) {
      EXPECT_GE(w["start"].get<double>(), prev);
      prev = w["start"].get<double>();
      ++words;
    }
  }
  EXPECT_EQ(words, static_cast<size_t>(4 * (count - 1)));
}

Transcript Sample() {
  Transcript t;
  t.source = "in/talk.wav";
  t.model = "en-small";
  t.duration_s = 3727.25;
  t.wall_s = 12.3456;
  t.compute_s = 40.0004;
  SegmentOut a;
  a.start = 1.23456;
  a.end = 4.5;
  a.text = " hello\tthere\nfriend ";
  a.words = {{"hello", 1.23456, 1.9, 0.91}, {"there", 2.0, 2.5, 0.5}, {"friend", 3.0, 4.5, 1.0}};
  SegmentOut silent;
  silent.start = 4.5;
  silent.end = 3725.5;
  SegmentOut b;
  b.start = 3725.5;
  b.end = 3727.25;
  b.text = "late --> words";
  b.words = {{"late", 3725.5, 3726.0, 0.7}};
  t.segments = {a, silent, b};
  return t;
}

TEST(Transcript, JsonParsesBackWithWords) {
  Transcript t = Sample();
  json j = json::parse(FormatJson(t), nullptr, false);
  ASSERT_FALSE(j.is_discarded());
  EXPECT_EQ(j["source"], "in/talk.wav");
  EXPECT_EQ(j["model"], "en-small");
  EXPECT_DOUBLE_EQ(j["duration_s"].get<double>(), 3727.25);
  EXPECT_DOUBLE_EQ(j["wall_s"].get<double>(), 12.346);
  EXPECT_DOUBLE_EQ(j["compute_s"].get<double>(), 40.0);
  EXPECT_EQ(j["text"], "hello\tthere\nfriend late --> words");
  ASSERT_EQ(j["segments"].size(), 3u);
  const json& s0 = j["segments"][0];
  EXPECT_DOUBLE_EQ(s0["start"].get<double>(), 1.235);  // rounded to ms
  EXPECT_DOUBLE_EQ(s0["end"].get<double>(), 4.5);
  ASSERT_EQ(s0["words"].size(), 3u);
  EXPECT_EQ(s0["words"][1]["word"], "there");
  EXPECT_DOUBLE_EQ(s0["words"][0]["start"].get<double>(), 1.235);
  EXPECT_DOUBLE_EQ(s0["words"][1]["end"].get<double>(), 2.5);
  EXPECT_DOUBLE_EQ(s0["words"][1]["confidence"].get<double>(), 0.5);
  EXPECT_EQ(j["segments"][1]["text"], "");
  EXPECT_EQ(j["segments"][2]["words"][0]["word"], "late");

  // Invalid UTF-8 does not throw.
  t.segments[0].text = "bad \xff\xfe bytes";
  EXPECT_FALSE(json::parse(FormatJson(t), nullptr, false).is_discarded());
}

TEST(Transcript, SrtAndVttCues) {
  Transcript t = Sample();
  const std::string srt = FormatSrt(t);
  EXPECT_EQ(srt,
            "1\n00:00:01,235 --> 00:00:04,500\nhello there friend\n\n"
            "2\n01:02:05,500 --> 01:02:07,250\nlate -> words\n\n");
  EXPECT_EQ(CueTimes(srt, ',').size(), 2u);

  const std::string vtt = FormatVtt(t);
  EXPECT_EQ(vtt.rfind("WEBVTT\n\n", 0), 0u);
  EXPECT_NE(vtt.find("01:02:05.500 --> 01:02:07.250\nlate -> words\n\n"), std::string::npos) << vtt;
  auto cues = CueTimes(vtt, '.');
  ASSERT_EQ(cues.size(), 2u);
  EXPECT_DOUBLE_EQ(cues[1].first, 3725.5);

  // Past 99 hours the hours just grow.
  Transcript longer;
  SegmentOut far;
  far.start = 360000.001;
  far.end = 360001.0;
  far.text = "x";
  longer.segments = {far};
  EXPECT_NE(FormatSrt(longer).find("100:00:00,001 --> 100:00:01,000"), std::string::npos);
}

TEST(Transcript, TxtAndTsv) {
  Transcript t = Sample();
  EXPECT_EQ(FormatTxt(t), "hello there friend\nlate --> words\n");
  EXPECT_EQ(FormatTsv(t), "start\tend\ttext\n1235\t4500\thello there friend\n3725500\t3727250\tlate --> words\n");
  std::string out;
  for (const char* f : {"txt", "json", "srt", "vtt", "tsv"}) {
    ASSERT_TRUE(FormatByName(f, t, &out).ok()) << f;
    EXPECT_FALSE(out.empty()) << f;
  }
  EXPECT_EQ(FormatByName("docx", t, &out).code(), Status::Code::kInvalid);
}

TEST(Transcript, OutputBase) {
  EXPECT_EQ(OutputBase("/data/in/a/b/c.wav", "/data/in", "/out", false), "/out/a/b/c");
  EXPECT_EQ(OutputBase("/data/in/a/b/c.wav", "/data/in/", "/out", false), "/out/a/b/c");
  EXPECT_EQ(OutputBase("/data/in/a/b/c.wav", "/data/in", "/out", true), "/out/a/b/c.wav");
  EXPECT_EQ(OutputBase("/data/in/c.tar.flac", "/data/in", "out", false), "out/c.tar");
  // A file given directly: root is the file itself (or its directory, or nothing).
  EXPECT_EQ(OutputBase("/data/in/a/c.mp3", "/data/in/a/c.mp3", "/out", false), "/out/c");
  EXPECT_EQ(OutputBase("/data/in/a/c.mp3", "/data/in/a", "/out", false), "/out/c");
  EXPECT_EQ(OutputBase("/data/in/a/c.mp3", "", "/out", true), "/out/c.mp3");
  // Relative paths, and a file not under root.
  EXPECT_EQ(OutputBase("rec/day1/x.ogg", "rec", "res", false), "res/day1/x");
  EXPECT_EQ(OutputBase("./rec/day1/x.ogg", "rec", "res", false), "res/day1/x");
  EXPECT_EQ(OutputBase("/elsewhere/x.ogg", "/data/in", "/out", false), "/out/x");
}

TEST(Transcript, WriteOutputsCreatesDirectoriesAndLeavesNoTemporaries) {
  TempDir dir;
  Transcript t = Sample();
  const std::string base = dir / "deep/nested/talk";
  ASSERT_TRUE(WriteOutputs(t, base, {"txt", "json", "srt", "vtt", "tsv"}).ok());
  EXPECT_EQ(ReadFile(base + ".txt"), FormatTxt(t));
  EXPECT_EQ(ReadFile(base + ".json"), FormatJson(t));
  EXPECT_EQ(ReadFile(base + ".srt"), FormatSrt(t));
  EXPECT_EQ(ReadFile(base + ".vtt"), FormatVtt(t));
  EXPECT_EQ(ReadFile(base + ".tsv"), FormatTsv(t));
  int files = 0;
  for (const auto& e : fs::directory_iterator(dir / "deep/nested")) {
    EXPECT_NE(e.path().extension(), ".tmp") << e.path();
    ++files;
  }
  EXPECT_EQ(files, 5);

  // Overwrites an earlier output; an unknown format writes nothing at all.
  t.segments[0].text = "changed";
  ASSERT_TRUE(WriteOutputs(t, base, {"txt"}).ok());
  EXPECT_EQ(ReadFile(base + ".txt"), "changed\nlate --> words\n");
  EXPECT_EQ(WriteOutputs(t, dir / "other/x", {"txt", "pdf"}).code(), Status::Code::kInvalid);
  EXPECT_FALSE(fs::exists(dir / "other"));
  // A directory where the output file should go is an I/O error, not a crash.
  fs::create_directories(dir / "blocked/y.txt");
  EXPECT_EQ(WriteOutputs(t, dir / "blocked/y", {"txt"}).code(), Status::Code::kIOError);
}

}  // namespace
}  // namespace asrf::testing
