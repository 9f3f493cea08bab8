// Transcription end to end: real broker and worker processes with the committed fixture model,
// audio made by the project's synthesiser (voices and number strings the fixture never heard as
// such: another seed), `asr-submit transcribe` over a folder with good, long, resampled and bad
// files. Checks content (CER), reassembly of a split file, the output formats, per-file errors,
// skipping on re-run, PostgreSQL rows, and `collect`.
#include <gtest/gtest.h>

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>
#include <sndfile.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>
#include <regex>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "client/broker_client.h"
#include "common/clock.h"
#include "common/sha256.h"
#include "tests/harness.h"

namespace asrf::testing {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

const std::string kModel = std::string(ASRF_SOURCE_DIR) + "/tests/fixtures/digits.pt";

struct Utt {
  std::string wav, text;
};

std::vector<Utt> ReadManifest(const std::string& path) {
  std::vector<Utt> out;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    auto j = json::parse(line, nullptr, false);
    if (j.is_discarded()) continue;
    out.push_back({j.value("audio", j.value("path", std::string())), j.value("text", std::string())});
  }
  return out;
}

std::vector<int16_t> ReadPcm(const std::string& path, int* rate) {
  SF_INFO info{};
  SNDFILE* f = sf_open(path.c_str(), SFM_READ, &info);
  std::vector<int16_t> pcm;
  if (!f) return pcm;
  pcm.resize(info.frames * info.channels);
  sf_readf_short(f, pcm.data(), info.frames);
  sf_close(f);
  *rate = info.samplerate;
  return pcm;
}

void WritePcm(const std::string& path, const std::vector<int16_t>& pcm, int rate, int channels, int format) {
  SF_INFO info{};
  info.samplerate = rate;
  info.channels = channels;
  info.format = format;
  SNDFILE* f = sf_open(path.c_str(), SFM_WRITE, &info);
  ASSERT_NE(f, nullptr) << sf_strerror(nullptr);
  sf_writef_short(f, pcm.data(), static_cast<sf_count_t>(pcm.size() / channels));
  sf_close(f);
}

size_t Edit(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1])});
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

std::string Trim(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

class TranscribeTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    data_ = new TempDir();
    // Number strings, a seed the fixture was not trained on.
    RunResult r = RunCommand({ASRF_SYNTH_BIN, "--out", data_->path(), "--utterances", "14", "--seed", "4242",
                              "--numbers-fraction", "1", "--valid-fraction", "0", "--heldout-fraction", "0",
                              "--noise-fraction", "0"},
                             120000);
    ASSERT_EQ(r.code, 0) << r.err;
    utts_ = new std::vector<Utt>(ReadManifest(*data_ / "train.jsonl"));
    ASSERT_GE(utts_->size(), 12u);
    for (auto& u : *utts_) {
      if (!u.wav.empty() && u.wav[0] != '/') u.wav = *data_ / u.wav;
    }
  }
  static void TearDownTestSuite() {
    delete utts_;
    delete data_;
  }
  // The first n utterances one after another, a second of silence after each (16 kHz).
  static std::vector<int16_t> Joined(int n) {
    std::vector<int16_t> all;
    for (int i = 0; i < n; ++i) {
      int rate = 0;
      std::vector<int16_t> pcm = ReadPcm((*utts_)[i].wav, &rate);
      all.insert(all.end(), pcm.begin(), pcm.end());
      all.insert(all.end(), 16000, 0);
    }
    return all;
  }
  static TempDir* data_;
  static std::vector<Utt>* utts_;
};
TempDir* TranscribeTest::data_ = nullptr;
std::vector<Utt>* TranscribeTest::utts_ = nullptr;

TEST_F(TranscribeTest, FolderToTranscriptsWithBadFilesLongFilesAndPostgres) {
  TempDir t;
  PgCluster pg(t.path());
  ASSERT_TRUE(pg.Start());
  std::string in = t / "in";
  fs::create_directories(in + "/calls/a");
  // 8 short files as they are (16 kHz WAV) in a nested folder.
  std::map<std::string, std::string> expected;  // relative stem -> text
  for (int i = 0; i < 8; ++i) {
    std::string rel = "calls/a/u" + std::to_string(i);
    fs::copy_file((*utts_)[i].wav, in + "/" + rel + ".wav");
    expected[rel] = (*utts_)[i].text;
  }
  // One utterance as 44.1 kHz stereo FLAC (resampled and mixed down by the client).
  {
    int rate = 0;
    std::vector<int16_t> pcm = ReadPcm((*utts_)[8].wav, &rate);
    std::vector<int16_t> up;
    size_t n = pcm.size() * 44100 / rate;
    for (size_t k = 0; k < n; ++k) {
      int16_t v = pcm[std::min(pcm.size() - 1, k * rate / 44100)];
      up.push_back(v);
      up.push_back(v);
    }
    WritePcm(in + "/calls/stereo.flac", up, 44100, 2, SF_FORMAT_FLAC | SF_FORMAT_PCM_16);
    expected["calls/stereo"] = (*utts_)[8].text;
  }
  // Two more as AIFF and as Ogg Vorbis named .oga: picked by the default --ext too.
  {
    int rate = 0;
    std::vector<int16_t> pcm = ReadPcm((*utts_)[2].wav, &rate);
    WritePcm(in + "/calls/u2-copy.aif", pcm, rate, 1, SF_FORMAT_AIFF | SF_FORMAT_PCM_16);
    expected["calls/u2-copy"] = (*utts_)[2].text;
    pcm = ReadPcm((*utts_)[3].wav, &rate);
    WritePcm(in + "/calls/u3-copy.oga", pcm, rate, 1, SF_FORMAT_OGG | SF_FORMAT_VORBIS);
    expected["calls/u3-copy"] = (*utts_)[3].text;
  }
  // A long file: utterances 9..13 with 2 s of quiet between, split with --max-segment-s 6.
  std::string long_text;
  std::vector<double> gap_mid_s;  // the middle of each 2 s gap between utterances
  {
    std::vector<int16_t> all;
    for (int i = 9; i < static_cast<int>(utts_->size()); ++i) {
      int rate = 0;
      std::vector<int16_t> pcm = ReadPcm((*utts_)[i].wav, &rate);
      all.insert(all.end(), pcm.begin(), pcm.end());
      if (i + 1 < static_cast<int>(utts_->size())) gap_mid_s.push_back((static_cast<double>(all.size()) + 16000) / 16000);
      all.insert(all.end(), 32000, 0);
      long_text += (long_text.empty() ? "" : " ") + (*utts_)[i].text;
    }
    WritePcm(in + "/long.wav", all, 16000, 1, SF_FORMAT_WAV | SF_FORMAT_PCM_16);
  }
  // Bad inputs: an empty WAV, text named .wav, a file of 0 bytes, and a file of another extension (skipped).
  WritePcm(in + "/calls/empty.wav", {}, 16000, 1, SF_FORMAT_WAV | SF_FORMAT_PCM_16);
  { std::ofstream(in + "/calls/notes.wav") << "this is not audio\n"; }
  { std::ofstream(in + "/calls/zero.wav"); }  // 0 bytes
  { std::ofstream(in + "/calls/README.txt") << "ignored\n"; }
  // A broken link is named, never skipped in silence.
  fs::create_symlink(in + "/calls/gone.wav", in + "/calls/dangling.wav");

  BrokerProc b = StartBroker(t / "broker", t / "broker.log", {"--pg", pg.url()});
  ASSERT_FALSE(b.endpoint.empty());
  Proc w = StartWorker(b.endpoint, t / "worker", t / "worker.log",
                       {"--model-file", kModel, "--pg", pg.url(), "--threads", "2"});
  std::string out = t / "out";
  RunResult r = Submit(b.endpoint, {"transcribe", in, "--out", out, "--format", "txt,json,srt,vtt,tsv",
                                    "--max-segment-s", "6", "--wait"},
                       180000);
  // Three bad files and a broken link: exit 1, each named in the summary, everything else written.
  EXPECT_EQ(r.code, 1) << r.err << ReadFile(t / "worker.log");
  EXPECT_NE(r.err.find("empty.wav"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("  error: " + in + "/calls/notes.wav: not audio"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("  error: " + in + "/calls/zero.wav: empty file (0 bytes)"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("dangling.wav: a broken symbolic link"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("1 skipped (extension"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(out + "/calls/empty.txt"));

  // Content: character error rate over the short files.
  size_t errors = 0, chars = 0;
  for (const auto& [rel, text] : expected) {
    std::string hyp = Trim(ReadFile(out + "/" + rel + ".txt"));
    errors += Edit(text, hyp);
    chars += text.size();
    EXPECT_FALSE(hyp.empty()) << rel;
  }
  double cer = static_cast<double>(errors) / chars;
  std::cout << "short files CER " << cer << "\n";
  EXPECT_LE(cer, 0.15);

  // The long file: several segments, reassembled in order on the file's timeline.
  json j = json::parse(ReadFile(out + "/long.json"), nullptr, false);
  ASSERT_FALSE(j.is_discarded());
  ASSERT_GE(j["segments"].size(), 3u);
  // It names the model file that made it, by checksum: one model for all of its segments.
  EXPECT_EQ(j.value("model_sha256", ""), Sha256Hex(ReadFile(kModel)));
  EXPECT_FALSE(j.contains("models")) << j.dump();
  double prev_end = 0, prev_word = 0;
  std::string joined;
  for (const auto& seg : j["segments"]) {
    EXPECT_GE(seg["start"].get<double>(), prev_end - 1e-6);
    EXPECT_LE(seg["end"].get<double>() - seg["start"].get<double>(), 6.0 + 1e-6);
    prev_end = seg["end"].get<double>();
    for (const auto& wd : seg["words"]) {
      EXPECT_GE(wd["start"].get<double>(), prev_word - 1e-6);
      EXPECT_GE(wd["start"].get<double>(), seg["start"].get<double>() - 1e-6);
      EXPECT_LE(wd["end"].get<double>(), seg["end"].get<double>() + 1e-6);
      EXPECT_GT(wd["confidence"].get<double>(), 0.0);
      prev_word = wd["start"].get<double>();
    }
    std::string text = seg["text"].get<std::string>();
    if (!text.empty()) joined += (joined.empty() ? "" : " ") + text;
  }
  // The 2 s of quiet at the end is the tail: beyond 0.5 s of it, left out.
  EXPECT_LE(prev_end, j["duration_s"].get<double>() + 1e-6);
  EXPECT_GE(prev_end, j["duration_s"].get<double>() - 2.5);
  double long_cer = static_cast<double>(Edit(long_text, joined)) / long_text.size();
  std::cout << "long file CER " << long_cer << " over " << j["segments"].size() << " segments\n";
  EXPECT_LE(long_cer, 0.2) << joined << " vs " << long_text;

  // With the default --max-segment-s the file is short enough for one segment, yet each pause
  // ends one: no segment spans a gap (2 s, longer than twice the 0.5 s --pause-keep-s keeps
  // beside speech: its middle is left out), and the text is as good as the short files'.
  {
    RunResult rp = Submit(b.endpoint, {"transcribe", in + "/long.wav", "--out", t / "out-pauses", "--format", "json",
                                       "--wait"}, 120000);
    ASSERT_EQ(rp.code, 0) << rp.err;
    json jp = json::parse(ReadFile(t / "out-pauses/long.json"), nullptr, false);
    ASSERT_FALSE(jp.is_discarded());
    ASSERT_LE(jp["duration_s"].get<double>(), 30.0);
    ASSERT_GE(jp["segments"].size(), gap_mid_s.size() + 1);
    std::string text;
    for (const auto& seg : jp["segments"]) {
      if (!seg["text"].get<std::string>().empty()) text += (text.empty() ? "" : " ") + seg["text"].get<std::string>();
    }
    double kept = 0;
    for (const auto& seg : jp["segments"]) kept += seg["end"].get<double>() - seg["start"].get<double>();
    for (double mid : gap_mid_s) {
      bool spans = std::any_of(jp["segments"].begin(), jp["segments"].end(), [&](const json& seg) {
        return seg["start"].get<double>() < mid - 0.5 && seg["end"].get<double>() > mid + 0.5;
      });
      EXPECT_FALSE(spans) << "a segment spans the gap around " << mid << " s: " << jp.dump();
    }
    EXPECT_LT(kept, jp["duration_s"].get<double>() - static_cast<double>(gap_mid_s.size()));
    EXPECT_NE(rp.err.find("pauses left out"), std::string::npos) << rp.err;
    double cer = static_cast<double>(Edit(long_text, text)) / long_text.size();
    std::cout << "long file at pauses: CER " << cer << " over " << jp["segments"].size() << " segments\n";
    EXPECT_LE(cer, 0.2) << text << " vs " << long_text;
    // --pause-keep-s -1 keeps all of it: the segments cover the file.
    rp = Submit(b.endpoint, {"transcribe", in + "/long.wav", "--out", t / "out-keep", "--format", "json",
                             "--pause-keep-s", "-1", "--wait"}, 120000);
    ASSERT_EQ(rp.code, 0) << rp.err;
    jp = json::parse(ReadFile(t / "out-keep/long.json"), nullptr, false);
    ASSERT_FALSE(jp.is_discarded());
    ASSERT_GE(jp["segments"].size(), gap_mid_s.size() + 1);
    EXPECT_NEAR(jp["segments"].front()["start"].get<double>(), 0.0, 1e-6);
    EXPECT_NEAR(jp["segments"].back()["end"].get<double>(), jp["duration_s"].get<double>(), 0.01);
    for (size_t k = 1; k < jp["segments"].size(); ++k) {
      EXPECT_NEAR(jp["segments"][k]["start"].get<double>(), jp["segments"][k - 1]["end"].get<double>(), 1e-3);
    }
    // --pause-s 0 splits by length only: one segment.
    rp = Submit(b.endpoint, {"transcribe", in + "/long.wav", "--out", t / "out-nopause", "--format", "json",
                             "--pause-s", "0", "--wait"}, 120000);
    ASSERT_EQ(rp.code, 0) << rp.err;
    jp = json::parse(ReadFile(t / "out-nopause/long.json"), nullptr, false);
    ASSERT_FALSE(jp.is_discarded());
    EXPECT_EQ(jp["segments"].size(), 1u) << jp.dump();
  }

  // Formats.
  std::regex srt_time(R"(^\d\d:\d\d:\d\d,\d\d\d --> \d\d:\d\d:\d\d,\d\d\d$)");
  std::regex vtt_time(R"(^\d\d:\d\d:\d\d\.\d\d\d --> \d\d:\d\d:\d\d\.\d\d\d$)");
  std::istringstream srt(ReadFile(out + "/long.srt")), vtt(ReadFile(out + "/long.vtt"));
  std::string line;
  int srt_cues = 0, vtt_cues = 0;
  while (std::getline(srt, line)) if (line.find("-->") != std::string::npos) srt_cues += std::regex_match(line, srt_time) ? 1 : -100;
  std::getline(vtt, line);
  EXPECT_EQ(line, "WEBVTT");
  while (std::getline(vtt, line)) if (line.find("-->") != std::string::npos) vtt_cues += std::regex_match(line, vtt_time) ? 1 : -100;
  EXPECT_GE(srt_cues, 3);
  EXPECT_EQ(srt_cues, vtt_cues);
  std::string tsv = ReadFile(out + "/calls/a/u0.tsv");
  EXPECT_EQ(tsv.rfind("start\tend\ttext\n", 0), 0u) << tsv;

  // PostgreSQL holds every segment's result with its transcript.
  std::string rows = pg.Query("SELECT count(*) FROM results WHERE ok AND transcript IS NOT NULL");
  EXPECT_GE(std::stol(rows), 9 + 3) << rows;

  // Re-running skips what is done; --overwrite redoes it.
  auto rerun = [&](const std::string& formats) {
    return Submit(b.endpoint, {"transcribe", in + "/calls/a", "--out", out + "/calls/a", "--format", formats, "--wait"},
                  60000);
  };
  RunResult again = rerun("txt,json,srt,vtt,tsv");
  EXPECT_EQ(again.code, 0) << again.err;
  EXPECT_NE(again.err.find("8 skipped (outputs exist)"), std::string::npos) << again.err;
  // The .json records what the outputs were made from.
  {
    json made = json::parse(ReadFile(out + "/calls/a/u7.json"));
    EXPECT_EQ(made.value("source_size", uint64_t{0}), fs::file_size(in + "/calls/a/u7.wav")) << made.dump();
    EXPECT_GT(made.value("source_mtime_ns", int64_t{0}), 0) << made.dump();
  }
  // A file changed at its path since (a recorder's new take written over the old one) is
  // transcribed again: its outputs used to count as done. The others are still skipped.
  const std::string u7_before = ReadFile(out + "/calls/a/u7.txt");
  fs::copy_file(in + "/calls/a/u6.wav", in + "/calls/a/u7.wav", fs::copy_options::overwrite_existing);
  RunResult changed = rerun("txt,json,srt,vtt,tsv");
  EXPECT_EQ(changed.code, 0) << changed.err;
  EXPECT_NE(changed.err.find("u7.wav: changed"), std::string::npos) << changed.err;
  EXPECT_NE(changed.err.find("7 skipped (outputs exist)"), std::string::npos) << changed.err;
  EXPECT_EQ(ReadFile(out + "/calls/a/u7.txt"), ReadFile(out + "/calls/a/u6.txt"));
  EXPECT_NE(ReadFile(out + "/calls/a/u7.txt"), u7_before);
  // Without json among the formats a change is not looked for: the .json would keep its old
  // record, and every later run would transcribe the file again.
  fs::copy_file(in + "/calls/a/u4.wav", in + "/calls/a/u5.wav", fs::copy_options::overwrite_existing);
  RunResult txt_only = rerun("txt");
  EXPECT_EQ(txt_only.code, 0) << txt_only.err;
  EXPECT_EQ(txt_only.err.find("changed"), std::string::npos) << txt_only.err;
  EXPECT_NE(txt_only.err.find("8 skipped (outputs exist)"), std::string::npos) << txt_only.err;
  // A relative path is recorded as given, relative to where that run started. Run again from
  // another folder where that relative name is another file, the outputs are still this file's:
  // its size and time match what they were made from (an error, "hold the transcript of", before).
  {
    fs::create_directories(t / "cwd1/in");
    fs::create_directories(t / "cwd2/in");
    fs::copy_file(in + "/calls/a/u0.wav", t / "cwd1/in/r.wav");
    fs::copy_file(in + "/calls/a/u1.wav", t / "cwd2/in/r.wav");
    auto from = [&](const std::string& dir, const std::string& path) {
      return RunCommand({"/bin/sh", "-c", "cd \"$1\" && exec \"$2\" --broker \"$3\" transcribe \"$4\" --out \"$5\" --wait",
                         "sh", dir, ASRF_SUBMIT_BIN, b.endpoint, path, t / "rel"}, 60000);
    };
    RunResult first = from(t / "cwd1", "in/r.wav");
    ASSERT_EQ(first.code, 0) << first.err;
    EXPECT_EQ(json::parse(ReadFile(t / "rel/r.json")).value("source", ""), "in/r.wav");
    RunResult second = from(t / "cwd2", "../cwd1/in/r.wav");
    EXPECT_EQ(second.code, 0) << second.err;
    EXPECT_NE(second.err.find("1 skipped (outputs exist)"), std::string::npos) << second.err;
  }
  // Another folder's file of the same name into the same --out (a second card's recordings): its
  // outputs there are another file's, so it is an error, not "skipped", and they stay as they are.
  const std::string u0_before = ReadFile(out + "/calls/a/u0.txt");
  fs::create_directories(t / "card2");
  // The same size and modification time as the first card's (a copy, its time set back): still
  // another file's, as the transcript's source names it absolutely.
  fs::copy_file(in + "/calls/a/u0.wav", t / "card2/u0.wav");
  fs::last_write_time(t / "card2/u0.wav", fs::last_write_time(in + "/calls/a/u0.wav"));
  RunResult card2 = Submit(b.endpoint, {"transcribe", t / "card2", "--out", out + "/calls/a", "--wait"}, 60000);
  EXPECT_EQ(card2.code, 1) << card2.err;
  EXPECT_NE(card2.err.find("u0.wav: its outputs " + out + "/calls/a/u0.* hold the transcript of"), std::string::npos)
      << card2.err;
  EXPECT_EQ(ReadFile(out + "/calls/a/u0.txt"), u0_before);

  // Submitted without --wait, written later by `collect`.
  RunResult nowait = Submit(b.endpoint, {"transcribe", in + "/calls/a/u1.wav", "--out", t / "later",
                                         "--batch", "later-1"}, 60000);
  ASSERT_EQ(nowait.code, 0) << nowait.err;
  ASSERT_TRUE(WaitFor([&] { return StatusCounts(b.endpoint, "later-1").done == 1; }, 60000));
  RunResult col = Submit(b.endpoint, {"collect", "later-1", "--out", t / "later"}, 60000);
  EXPECT_EQ(col.code, 0) << col.err;
  EXPECT_EQ(Trim(ReadFile(t / "later/u1.txt")), Trim(ReadFile(out + "/calls/a/u1.txt")));
  // The same header as --wait writes: the path as found, the whole file's length, compute time.
  {
    json later = json::parse(ReadFile(t / "later/u1.json"));
    json waited = json::parse(ReadFile(out + "/calls/a/u1.json"));
    EXPECT_EQ(later["source"], waited["source"]);
    EXPECT_EQ(later["duration_s"], waited["duration_s"]);
    EXPECT_EQ(later["source_size"], waited["source_size"]);
    EXPECT_EQ(later["source_mtime_ns"], waited["source_mtime_ns"]);
    EXPECT_GT(later["compute_s"].get<double>(), 0);
  }

  // A batch holds one run: another run naming it would get the first run's segments back as its
  // own (the same request ids), so it is refused and nothing is written.
  RunResult reuse = Submit(b.endpoint, {"transcribe", in + "/calls/a/u2.wav", "--out", t / "reuse",
                                        "--batch", "later-1", "--wait"}, 60000);
  EXPECT_EQ(reuse.code, 2) << reuse.err;
  EXPECT_NE(reuse.err.find("batch later-1 exists already"), std::string::npos) << reuse.err;
  EXPECT_FALSE(fs::exists(t / "reuse/u2.txt"));
}

// A recording's silent stretch (faint hiss): the shipped model, which never heard noise alone,
// wrote words for it ("one one one ..."); it now comes back empty without reaching the model.
TEST_F(TranscribeTest, FaintHissGivesAnEmptyTranscript) {
  TempDir t;
  BrokerProc b = StartBroker(t / "broker", t / "broker.log");
  Proc w = StartWorker(b.endpoint, t / "worker", t / "worker.log",
                       {"--model-file", std::string(ASRF_SOURCE_DIR) + "/models/en-small.pt", "--threads", "2"});
  fs::create_directories(t / "in");
  std::mt19937 rng(4);
  std::normal_distribution<double> hiss(0, 180);  // -45 dBFS
  std::vector<int16_t> pcm(10 * 16000);
  for (auto& v : pcm) v = static_cast<int16_t>(hiss(rng));
  WritePcm(t / "in/hiss.wav", pcm, 16000, 1, SF_FORMAT_WAV | SF_FORMAT_PCM_16);
  RunResult r = Submit(b.endpoint, {"transcribe", t / "in", "--out", t / "out", "--wait"}, 120000);
  ASSERT_EQ(r.code, 0) << r.err << ReadFile(t / "worker.log");
  ASSERT_TRUE(fs::exists(t / "out/hiss.txt")) << r.out << r.err;
  EXPECT_EQ(Trim(ReadFile(t / "out/hiss.txt")), "");
}

// What the user names is tried or is an error, never passed over: a file named on the command
// line with an extension --ext does not list; a folder holding a Latin-1 file name (bytes that are
// not UTF-8, which come back replaced inside the worker's JSON result); an --out that cannot be a
// folder, refused before anything is submitted; paths holding no audio at all; a folder the user
// cannot read (checked when not running as root, whom nothing stops).
TEST_F(TranscribeTest, NamedFilesOddNamesBadOutAndNoAudioAtAll) {
  TempDir t;
  BrokerProc b = StartBroker(t / "broker", t / "broker.log");
  Proc w = StartWorker(b.endpoint, t / "worker", t / "worker.log", {"--model-file", kModel, "--threads", "2"});
  fs::create_directories(t / "in/latin");
  fs::copy_file((*utts_)[0].wav, t / "in/take one.audio");
  const std::string latin = "caf\xe9";
  fs::copy_file((*utts_)[1].wav, t / ("in/latin/" + latin + ".wav"));
  RunResult r = Submit(b.endpoint, {"transcribe", t / "in/take one.audio", t / "in/latin", "--out", t / "out", "--wait"},
                       120000);
  EXPECT_EQ(r.code, 0) << r.err << ReadFile(t / "worker.log");
  EXPECT_FALSE(Trim(ReadFile(t / "out/take one.txt")).empty()) << r.err;
  EXPECT_FALSE(Trim(ReadFile(t / ("out/" + latin + ".txt"))).empty()) << r.err;

  // --out names a file: exit 2 at once, nothing submitted.
  { std::ofstream(t / "afile") << "x\n"; }
  r = Submit(b.endpoint, {"transcribe", t / "in/latin", "--out", t / "afile", "--wait"}, 60000);
  EXPECT_EQ(r.code, 2) << r.err;
  EXPECT_NE(r.err.find("asr-submit: --out " + std::string(t / "afile") + ": "), std::string::npos) << r.err;
  EXPECT_EQ(r.err.find("file(s) to transcribe"), std::string::npos) << r.err;

  // Nothing to transcribe: exit 1 and a message, not a quiet success.
  fs::create_directories(t / "empty");
  { std::ofstream(t / "empty/notes.txt") << "x\n"; }
  r = Submit(b.endpoint, {"transcribe", t / "empty", "--out", t / "out2", "--wait"}, 60000);
  EXPECT_EQ(r.code, 1) << r.err;
  EXPECT_NE(r.err.find("no audio file to transcribe"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("1 file(s) of other extensions skipped"), std::string::npos) << r.err;

  // Names near the file system's 255 bytes: the outputs of a 252-byte name are written (their
  // temporary files were 23 bytes longer, and failed once the transcription was done); a name
  // whose outputs could not exist is an error before anything is submitted.
  fs::create_directories(t / "long");
  const std::string fits(248, 'x'), over(251, 'y');
  fs::copy_file((*utts_)[3].wav, t / ("long/" + fits + ".wav"));
  fs::copy_file((*utts_)[4].wav, t / ("long/" + over + ".wav"));
  r = Submit(b.endpoint, {"transcribe", t / "long", "--out", t / "out4", "--wait"}, 120000);
  EXPECT_EQ(r.code, 1) << r.err;
  EXPECT_FALSE(Trim(ReadFile(t / ("out4/" + fits + ".txt"))).empty()) << r.err;
  EXPECT_TRUE(fs::exists(t / ("out4/" + fits + ".json"))) << r.err;
  EXPECT_NE(r.err.find(over + ".wav: its output name would be 256 bytes long"), std::string::npos) << r.err;

  if (geteuid() != 0) {
    fs::create_directories(t / "in/locked");
    fs::copy_file((*utts_)[2].wav, t / "in/locked/u.wav");
    fs::permissions(t / "in/locked", fs::perms::none);
    r = Submit(b.endpoint, {"transcribe", t / "in", "--out", t / "out3", "--wait"}, 120000);
    fs::permissions(t / "in/locked", fs::perms::owner_all);
    EXPECT_EQ(r.code, 1) << r.err;
    EXPECT_NE(r.err.find(std::string(t / "in/locked") + ": a folder that cannot be read"), std::string::npos) << r.err;
  }
}

// Loud noise passes the silence rule and reaches the model. Whatever it writes, a segment whose
// words' mean confidence is under --min-confidence comes back empty, one at or above it as it
// was; `collect` applies the same rule to the same results.
TEST_F(TranscribeTest, UnsureSegmentsComeBackEmpty) {
  TempDir t;
  BrokerProc b = StartBroker(t / "broker", t / "broker.log");
  Proc w = StartWorker(b.endpoint, t / "worker", t / "worker.log",
                       {"--model-file", std::string(ASRF_SOURCE_DIR) + "/models/en-small.pt", "--threads", "2"});
  fs::create_directories(t / "in");
  std::mt19937 rng(9);
  std::normal_distribution<double> unit(0, 1);
  std::vector<int16_t> pcm(6 * 16000);
  double slow = 0;
  for (size_t i = 0; i < pcm.size(); ++i) {  // brown-ish noise with a 2 Hz swell, about -20 dBFS
    slow = 0.98 * slow + unit(rng);
    const double swell = 0.6 + 0.4 * std::sin(4 * M_PI * static_cast<double>(i) / 16000);
    pcm[i] = static_cast<int16_t>(std::clamp(slow * 600 * swell, -32768.0, 32767.0));
  }
  WritePcm(t / "in/noise.wav", pcm, 16000, 1, SF_FORMAT_WAV | SF_FORMAT_PCM_16);
  fs::copy_file((*utts_)[0].wav, t / "in/speech.wav");
  RunResult all = Submit(b.endpoint, {"transcribe", t / "in", "--out", t / "all", "--format", "json",
                                      "--min-confidence", "0", "--batch", "keep-all", "--wait"}, 120000);
  ASSERT_EQ(all.code, 0) << all.err << ReadFile(t / "worker.log");
  EXPECT_NE(all.err.find(" 0 segment(s) emptied"), std::string::npos) << all.err;
  // The second threshold sits just above the least sure segment with words, whatever this model
  // makes of the noise, so the gate has something to empty. The .json rounds confidences to 0.001
  // and the gate does not, so it sits in a gap of more than 0.002 between segment means (or above
  // them all), where rounding cannot change a segment's side.
  std::vector<double> means;
  for (std::string name : {"noise", "speech"}) {
    const json raw = json::parse(ReadFile(t / ("all/" + name + ".json")));
    for (const json& seg : raw["segments"]) {
      if (seg["words"].empty()) continue;
      double sum = 0;
      for (const json& wd : seg["words"]) sum += wd["confidence"].get<double>();
      means.push_back(sum / static_cast<double>(seg["words"].size()));
    }
  }
  ASSERT_FALSE(means.empty()) << "no segment has words: " << ReadFile(t / "all/speech.json");
  std::sort(means.begin(), means.end());
  double gap_mid = means.back() + 1e-3;
  for (size_t k = 0; k + 1 < means.size(); ++k) {
    if (means[k + 1] - means[k] > 2e-3) {
      gap_mid = (means[k] + means[k + 1]) / 2;
      break;
    }
  }
  const double above_least = std::round(gap_mid * 1e6) / 1e6;  // as std::to_string passes it
  for (double threshold : {0.4, above_least}) {
    const std::string out = t / ("gate-" + std::to_string(threshold));
    RunResult r = Submit(b.endpoint, {"transcribe", t / "in", "--out", out, "--format", "json", "--min-confidence",
                                      std::to_string(threshold), "--wait"}, 120000);
    ASSERT_EQ(r.code, 0) << r.err;
    RunResult col = Submit(b.endpoint, {"collect", "keep-all", "--out", out + "-collected", "--format", "json",
                                        "--min-confidence", std::to_string(threshold)}, 60000);
    ASSERT_EQ(col.code, 0) << col.err;
    size_t emptied = 0;
    for (std::string name : {"noise", "speech"}) {
      json raw = json::parse(ReadFile(t / ("all/" + name + ".json")));
      for (const json& gated : {json::parse(ReadFile(out + "/" + name + ".json")),
                                json::parse(ReadFile(out + "-collected/" + name + ".json"))}) {
        ASSERT_EQ(gated["segments"].size(), raw["segments"].size()) << name;
        for (size_t k = 0; k < raw["segments"].size(); ++k) {
          const json& words = raw["segments"][k]["words"];
          double sum = 0;
          for (const json& wd : words) sum += wd["confidence"].get<double>();
          const bool unsure = !words.empty() && sum / static_cast<double>(words.size()) < threshold;
          EXPECT_EQ(gated["segments"][k]["text"].get<std::string>(),
                    unsure ? std::string() : raw["segments"][k]["text"].get<std::string>())
              << name << " segment " << k << " at " << threshold;
        }
      }
      for (const json& seg : raw["segments"]) {
        double sum = 0;
        for (const json& wd : seg["words"]) sum += wd["confidence"].get<double>();
        emptied += !seg["words"].empty() && sum / static_cast<double>(seg["words"].size()) < threshold;
      }
    }
    EXPECT_NE(r.err.find(" " + std::to_string(emptied) + " segment(s) emptied"), std::string::npos) << r.err;
    if (threshold == above_least) {
      EXPECT_GT(emptied, 0u) << "the least sure segment was kept at " << threshold;
    }
  }
  // The speech is kept at the default threshold.
  json speech = json::parse(ReadFile(t / "gate-0.400000/speech.json"));
  std::string text;
  for (const json& seg : speech["segments"]) text += seg["text"].get<std::string>();
  EXPECT_FALSE(text.empty());
}

TEST_F(TranscribeTest, AJobForAModelNoWorkerHasWaitsAndSaysWhy) {
  TempDir t;
  BrokerProc b = StartBroker(t / "broker", t / "broker.log");
  Proc w = StartWorker(b.endpoint, t / "worker", t / "worker.log", {"--model-file", kModel});
  // The worker loads its model before it connects.
  ASSERT_TRUE(WaitFor([&] { return Submit(b.endpoint, {"workers"}).out.find("cpu") != std::string::npos; }, 60000))
      << ReadFile(t / "worker.log");
  std::string in = t / "in";
  fs::create_directories(in);
  fs::copy_file((*utts_)[0].wav, in + "/a.wav");
  RunResult r = Submit(b.endpoint, {"transcribe", in, "--out", t / "out", "--model", "klingon", "--batch", "k1"});
  ASSERT_EQ(r.code, 0) << r.err;
  // The job is still queued after the worker had every chance to take it, and says why.
  usleep(500000);
  RunResult one = Submit(b.endpoint, {"status", "--job", "1", "--json"});
  EXPECT_NE(one.out.find("no worker has model klingon"), std::string::npos) << one.out << one.err;
  EXPECT_EQ(StatusCounts(b.endpoint, "k1").queued, 1);

  // The only worker holding a model drains (it finishes its running job, takes nothing new): a
  // job for that model says so, not "waiting for a free worker slot".
  RunResult sleep = Submit(b.endpoint, {"submit", "--kind", "sleep", "--payload", "{\"ms\":20000}"});
  ASSERT_EQ(sleep.code, 0) << sleep.err;
  ASSERT_TRUE(WaitFor([&] { return Submit(b.endpoint, {"status", "--job", "2", "--json"}).out.find("leased") !=
                                   std::string::npos; }, 30000));
  w.Signal(SIGTERM);
  ASSERT_TRUE(WaitFor([&] { return Submit(b.endpoint, {"workers"}).out.find("draining") != std::string::npos; },
                      10000)) << Submit(b.endpoint, {"workers"}).out;
  RunResult own = Submit(b.endpoint, {"transcribe", in, "--out", t / "out2", "--batch", "k2"});
  ASSERT_EQ(own.code, 0) << own.err;
  usleep(500000);
  RunResult why = Submit(b.endpoint, {"status", "--job", "3", "--json"});
  EXPECT_NE(why.out.find("only draining workers have model"), std::string::npos) << why.out << why.err;
}

// A worker finds MODEL.lm beside its --model-file and decodes by beam search with it (here a
// language model of number strings from another synthesiser seed); the transcripts are as good
// as greedy decoding's bound. A damaged language model stops the worker at start with the reason.
TEST_F(TranscribeTest, WorkerDecodesWithTheLanguageModelBesideItsModel) {
  TempDir t;
  RunResult synth = RunCommand({ASRF_SYNTH_BIN, "--out", t / "lmtext", "--utterances", "60", "--seed", "77",
                                "--numbers-fraction", "1", "--valid-fraction", "0", "--heldout-fraction", "0"},
                               120000);
  ASSERT_EQ(synth.code, 0) << synth.err;
  fs::create_directories(t / "m");
  fs::copy_file(kModel, t / "m/digits.pt");
  RunResult lm = RunCommand({ASRF_LM_BIN, "--input", t / "lmtext/train.jsonl", "--order", "5", "--out", t / "m/digits.lm"});
  ASSERT_EQ(lm.code, 0) << lm.err;
  // Nothing to measure or build from is an error, never a perplexity of 1 with exit 0.
  { std::ofstream(t / "empty.txt") << "\n"; }
  RunResult none = RunCommand({ASRF_LM_BIN, "--perplexity", t / "m/digits.lm", "--input", t / "empty.txt"});
  EXPECT_EQ(none.code, 1) << none.out;
  EXPECT_NE(none.err.find("no sentence"), std::string::npos) << none.err;
  EXPECT_EQ(RunCommand({ASRF_LM_BIN, "--perplexity", t / "m/digits.lm", "--input", t / "m"}).code, 1) << "a folder";

  BrokerProc b = StartBroker(t / "broker", t / "broker.log");
  Proc w = StartWorker(b.endpoint, t / "worker", t / "worker.log", {"--model-file", t / "m/digits.pt"});
  ASSERT_TRUE(WaitFor([&] { return Submit(b.endpoint, {"workers"}).out.find("cpu") != std::string::npos; }, 60000))
      << ReadFile(t / "worker.log");
  EXPECT_NE(ReadFile(t / "worker.log").find("beam search with " + std::string(t / "m/digits.lm")), std::string::npos)
      << ReadFile(t / "worker.log");
  std::string in = t / "in";
  fs::create_directories(in);
  for (int i = 0; i < 6; ++i) fs::copy_file((*utts_)[i].wav, in + "/u" + std::to_string(i) + ".wav");
  RunResult r = Submit(b.endpoint, {"transcribe", in, "--out", t / "out", "--format", "txt,json", "--wait"}, 120000);
  ASSERT_EQ(r.code, 0) << r.out << r.err;
  size_t errors = 0, chars = 0;
  for (int i = 0; i < 6; ++i) {
    std::string ref = (*utts_)[i].text, hyp = Trim(ReadFile(t / ("out/u" + std::to_string(i) + ".txt")));
    errors += Edit(ref, hyp);
    chars += ref.size();
    json j = json::parse(ReadFile(t / ("out/u" + std::to_string(i) + ".json")), nullptr, false);
    ASSERT_FALSE(j.is_discarded());
    ASSERT_FALSE(j["segments"].empty());
    EXPECT_FALSE(j["segments"][0]["words"].empty()) << j.dump();
    double prev_end = 0;
    for (const auto& word : j["segments"][0]["words"]) {  // times from the alignment: ordered, inside the audio
      EXPECT_LE(word["start"].get<double>(), word["end"].get<double>()) << word.dump();
      EXPECT_GE(word["start"].get<double>(), prev_end - 1e-9) << word.dump();
      EXPECT_LE(word["end"].get<double>(), j["duration_s"].get<double>() + 1e-3) << word.dump();
      EXPECT_GT(word["confidence"].get<double>(), 0.0) << word.dump();
      prev_end = word["end"].get<double>();
    }
  }
  EXPECT_LE(static_cast<double>(errors) / static_cast<double>(chars), 0.15);

  std::ofstream(t / "bad.lm") << "ASRFCLM1 but not really";
  RunResult bad = RunCommand({ASRF_WORKER_BIN, "--broker", b.endpoint, "--state-dir", t / "w2", "--model-file", kModel,
                              "--lm", t / "bad.lm"},
                             60000);
  EXPECT_EQ(bad.code, 2);
  EXPECT_NE(bad.err.find("language model"), std::string::npos) << bad.err;
}

// A file slow to read (here a named pipe whose writer starts 5 s late, as a slow share or a huge
// file would be) is not the broker falling silent: the client used to give up with exit 3, "the
// broker stopped answering", once reading a file outlasted --request-timeout + 2 s while earlier
// segments were in flight, leaving the rest of the pile unsubmitted.
TEST_F(TranscribeTest, AFileSlowToReadIsNotTheBrokerFallingSilent) {
  signal(SIGPIPE, SIG_IGN);
  TempDir t;
  BrokerProc b = StartBroker(t / "broker", t / "broker.log");
  Proc w = StartWorker(b.endpoint, t / "worker", t / "worker.log", {"--model-file", kModel, "--threads", "2"});
  std::vector<int16_t> all = Joined(4);
  fs::create_directories(t / "in");
  WritePcm(t / "in/a.wav", all, 16000, 1, SF_FORMAT_WAV | SF_FORMAT_PCM_16);
  const std::string bytes = ReadFile(t / "in/a.wav");
  ASSERT_EQ(mkfifo((t / "in/slow.wav").c_str(), 0600), 0);
  std::thread writer([&] {
    std::this_thread::sleep_for(std::chrono::seconds(5));
    int fd = -1;
    for (int64_t end = MonoMs() + 60000; fd < 0 && MonoMs() < end;) {
      fd = open((t / "in/slow.wav").c_str(), O_WRONLY | O_NONBLOCK);
      if (fd < 0) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    if (fd < 0) return;
    fcntl(fd, F_SETFL, 0);
    for (size_t done = 0; done < bytes.size();) {
      ssize_t n = write(fd, bytes.data() + done, bytes.size() - done);
      if (n <= 0) break;
      done += static_cast<size_t>(n);
    }
    close(fd);
  });
  RunResult r = Submit(b.endpoint, {"--request-timeout", "1", "transcribe", t / "in/a.wav", t / "in/slow.wav", "--out",
                                    t / "out", "--max-segment-s", "5", "--max-inflight-s", "5", "--wait"},
                       120000);
  writer.join();
  EXPECT_EQ(r.err.find("stopped answering"), std::string::npos) << r.err;
  EXPECT_TRUE(r.code == 0 || r.code == 1) << r.code << r.err;
  EXPECT_FALSE(Trim(ReadFile(t / "out/a.txt")).empty()) << r.err;
}

// A segment over the protocol's 240 s is refused with a clear error (the decoder's memory grows
// faster than a segment's length; it used to be transcribed whatever its length); one of 240 s is
// transcribed (digital silence here: an empty transcript).
TEST_F(TranscribeTest, ASegmentOverTheProtocolsLengthIsRefused) {
  TempDir t;
  BrokerProc b = StartBroker(t / "broker", t / "broker.log");
  Proc w = StartWorker(b.endpoint, t / "worker", t / "worker.log", {"--model-file", kModel});
  BrokerClient client(b.endpoint);
  proto::Submit s;
  s.batch = "lengths";
  s.request_id = "lengths-1";
  for (int secs : {240, 241}) {
    proto::TranscribeSegment seg;
    seg.file = std::to_string(secs) + ".wav";
    seg.count = 1;
    seg.pcm.data.assign(static_cast<size_t>(secs) * 16000 * 2, '\0');
    proto::SubmitJob job;
    job.kind = proto::kTranscribeKind;
    job.payload.data = proto::EncodeBody(seg);
    job.model = proto::kDefaultModel;
    job.audio_ms = secs * 1000;
    s.jobs.push_back(std::move(job));
  }
  proto::Reply r;
  ASSERT_TRUE(client.Call(proto::Cmd::kSubmit, s, &r, 20000).ok());
  ASSERT_EQ(r.job_ids.size(), 2u);
  auto state = [&](uint64_t id) {
    RunResult st = Submit(b.endpoint, {"status", "--job", std::to_string(id), "--json"});
    auto j = json::parse(st.out, nullptr, false);
    return j.is_object() ? j.value("state", "") + ": " + j.value("error", "") : st.out + st.err;
  };
  ASSERT_TRUE(WaitFor([&] { return StatusCounts(b.endpoint, "lengths").queued + StatusCounts(b.endpoint, "lengths").leased == 0; },
                      60000)) << ReadFile(t / "worker.log");
  EXPECT_EQ(state(r.job_ids[0]), "done: ") << ReadFile(t / "worker.log");
  EXPECT_NE(state(r.job_ids[1]).find("over the 240 s a segment may have"), std::string::npos) << state(r.job_ids[1]);
}

// `collect` writes the names `transcribe` chose (carried in each segment): a.wav beside an a.mp3
// that does not decode keeps its extension, as --wait writes it (collect worked the names out
// again from the batch alone, and wrote a.txt); two Latin-1 names that look alike in JSON stay two
// files under their own names (collect merged them into one); and a file named both on its own
// and inside its folder is one input (its outputs were named b.wav.*, as if two files shared b).
TEST_F(TranscribeTest, CollectWritesTheNamesTranscribeChose) {
  TempDir t;
  BrokerProc b = StartBroker(t / "broker", t / "broker.log");
  Proc w = StartWorker(b.endpoint, t / "worker", t / "worker.log", {"--model-file", kModel, "--threads", "2"});
  const std::string in = t / "in", mueller = "M\xfcller", moeller = "M\xf6ller";
  fs::create_directories(in);
  fs::copy_file((*utts_)[0].wav, in + "/a.wav");
  { std::ofstream(in + "/a.mp3") << "not audio at all\n"; }
  fs::copy_file((*utts_)[1].wav, in + "/" + mueller + ".wav");
  fs::copy_file((*utts_)[2].wav, in + "/" + moeller + ".wav");
  fs::copy_file((*utts_)[3].wav, in + "/b.wav");
  // One name in two folders, and --out not in normal form ("./DIR", relative): each keeps its folder.
  fs::create_directories(in + "/d1");
  fs::create_directories(in + "/d2");
  fs::copy_file((*utts_)[4].wav, in + "/d1/x.wav");
  fs::copy_file((*utts_)[5].wav, in + "/d2/x.wav");
  const std::string dot_out = "./" + fs::relative(t / "o", fs::current_path()).string();
  RunResult r = Submit(b.endpoint, {"transcribe", in, in + "/b.wav", "--out", dot_out, "--batch", "names"}, 60000);
  EXPECT_EQ(r.code, 1) << r.err;  // a.mp3
  ASSERT_TRUE(WaitFor([&] { return StatusCounts(b.endpoint, "names").done >= 6; }, 60000)) << ReadFile(t / "worker.log");
  RunResult col = Submit(b.endpoint, {"collect", "names", "--out", t / "o"}, 60000);
  EXPECT_EQ(col.code, 0) << col.err;
  EXPECT_FALSE(Trim(ReadFile(t / "o/a.wav.txt")).empty()) << col.err;
  EXPECT_FALSE(fs::exists(t / "o/a.txt"));
  EXPECT_FALSE(Trim(ReadFile(t / ("o/" + mueller + ".txt"))).empty()) << col.err;
  EXPECT_FALSE(Trim(ReadFile(t / ("o/" + moeller + ".txt"))).empty()) << col.err;
  EXPECT_FALSE(Trim(ReadFile(t / "o/b.txt")).empty()) << col.err;
  EXPECT_FALSE(fs::exists(t / "o/b.wav.txt"));
  EXPECT_FALSE(Trim(ReadFile(t / "o/d1/x.txt")).empty()) << col.err;
  EXPECT_FALSE(Trim(ReadFile(t / "o/d2/x.txt")).empty()) << col.err;
  EXPECT_NE(ReadFile(t / "o/d1/x.json"), ReadFile(t / "o/d2/x.json"));
}

TEST_F(TranscribeTest, AudioInFlightStaysBoundedWithoutWait) {
  TempDir t;
  BrokerProc b = StartBroker(t / "broker", t / "broker.log");
  Proc w = StartWorker(b.endpoint, t / "worker", t / "worker.log", {"--model-file", kModel});
  std::string in = t / "in";
  fs::create_directories(in);
  double total = 0;
  for (int i = 0; i < 8; ++i) {
    fs::copy_file((*utts_)[i].wav, in + "/u" + std::to_string(i) + ".wav");
    total += fs::file_size((*utts_)[i].wav) / 32000.0;
  }
  ASSERT_GT(total, 10.0);
  // At most 5 audio seconds outstanding: the client has to wait for results between files even
  // without --wait, and every file still gets through.
  RunResult r = Submit(b.endpoint, {"transcribe", in, "--out", t / "out", "--max-segment-s", "5",
                                    "--max-inflight-s", "5", "--batch", "bp"}, 120000);
  ASSERT_EQ(r.code, 0) << r.err << ReadFile(t / "worker.log");
  // The client could only submit the last files after earlier ones were transcribed, so when it
  // returns most segments are done already (unbounded, it returns as soon as all are submitted).
  Counts at_exit = StatusCounts(b.endpoint, "bp");
  EXPECT_GE(at_exit.done, at_exit.total() / 2) << "done " << at_exit.done << " of " << at_exit.total();
  ASSERT_TRUE(WaitFor([&] { return StatusCounts(b.endpoint, "bp").done >= 8; }, 60000));
  RunResult col = Submit(b.endpoint, {"collect", "bp", "--out", t / "out", "--format", "txt"}, 60000);
  EXPECT_EQ(col.code, 0) << col.err;
  for (int i = 0; i < 8; ++i) EXPECT_FALSE(Trim(ReadFile(t / ("out/u" + std::to_string(i) + ".txt"))).empty()) << i;

  // One long file is bounded too, segment by segment (it used to go out whole).
  std::vector<int16_t> all = Joined(8);
  fs::create_directories(t / "long");
  WritePcm(t / "long/all.wav", all, 16000, 1, SF_FORMAT_WAV | SF_FORMAT_PCM_16);
  r = Submit(b.endpoint, {"transcribe", t / "long", "--out", t / "out-long", "--max-segment-s", "5",
                          "--max-inflight-s", "5", "--batch", "bp-long"}, 120000);
  ASSERT_EQ(r.code, 0) << r.err;
  at_exit = StatusCounts(b.endpoint, "bp-long");
  EXPECT_GE(at_exit.total(), 3) << "the long file was not split";
  EXPECT_GE(at_exit.done, at_exit.total() / 2) << "done " << at_exit.done << " of " << at_exit.total();
}

}  // namespace
}  // namespace asrf::testing
