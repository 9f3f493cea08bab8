// asr-synth, the training-data synthesiser, run as a real process: the same seed gives identical
// manifests and byte-identical wav files, another seed gives other output, no sentence is in both
// train and valid, the held-out voices appear only in valid_heldout.jsonl, every wav is 16 kHz mono
// with the duration its manifest states, shards partition the utterances, the optional Festival
// voices are deterministic and never held out, single words come from their split's sentences, and
// bad arguments fail.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "tests/harness.h"

namespace asrf::testing {
namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;

const std::set<std::string> kHeldoutVoices = {"en-gb-scotland+f3", "en-us-nyc+m5", "rms"};

std::vector<std::string> SynthArgs(const std::string& out, int utterances, int seed,
                                   std::vector<std::string> extra = {}) {
  std::vector<std::string> a = {ASRF_SYNTH_BIN,       "--out", out, "--utterances", std::to_string(utterances),
                                "--seed",             std::to_string(seed), "--valid-fraction", "0.2",
                                "--heldout-fraction", "0.15"};
  a.insert(a.end(), extra.begin(), extra.end());
  return a;
}

std::string Replace(std::string s, const std::string& from, const std::string& to) {
  for (size_t p = s.find(from); p != std::string::npos; p = s.find(from, p + to.size())) s.replace(p, from.size(), to);
  return s;
}

// The directory as asr-synth writes it into "audio": absolute and lexically normal.
std::string Prefix(const TempDir* d) { return fs::absolute(d->path()).lexically_normal().string(); }

std::vector<json> ReadJsonl(const std::string& path) {
  std::vector<json> out;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    out.push_back(json::parse(line, nullptr, false));
  }
  return out;
}

struct WavInfo {
  bool ok = false;
  int rate = 0, channels = 0, bits = 0, format = 0;
  int64_t frames = 0;
};

uint32_t Le32(const std::string& s, size_t p) {
  return static_cast<uint8_t>(s[p]) | static_cast<uint8_t>(s[p + 1]) << 8 | static_cast<uint8_t>(s[p + 2]) << 16 |
         static_cast<uint32_t>(static_cast<uint8_t>(s[p + 3])) << 24;
}
uint16_t Le16(const std::string& s, size_t p) {
  return static_cast<uint16_t>(static_cast<uint8_t>(s[p]) | static_cast<uint8_t>(s[p + 1]) << 8);
}

// A small RIFF/WAVE reader: the fmt and data chunks.
WavInfo ProbeWav(const std::string& path) {
  WavInfo w;
  std::string b = ReadFile(path);
  if (b.size() < 12 || b.compare(0, 4, "RIFF") != 0 || b.compare(8, 4, "WAVE") != 0) return w;
  size_t p = 12;
  bool fmt = false;
  while (p + 8 <= b.size()) {
    std::string id = b.substr(p, 4);
    uint32_t len = Le32(b, p + 4);
    if (id == "fmt " && p + 8 + 16 <= b.size()) {
      w.format = Le16(b, p + 8);
      w.channels = Le16(b, p + 10);
      w.rate = static_cast<int>(Le32(b, p + 12));
      w.bits = Le16(b, p + 22);
      fmt = true;
    } else if (id == "data") {
      if (!fmt || w.channels <= 0 || w.bits <= 0) return w;
      uint32_t avail = static_cast<uint32_t>(std::min<size_t>(len, b.size() - p - 8));
      w.frames = avail / (w.channels * (w.bits / 8));
      w.ok = true;
      return w;
    }
    p += 8 + len + (len & 1);
  }
  return w;
}

// Every regular file under dir, relative path -> contents.
std::map<std::string, std::string> Files(const std::string& dir) {
  std::map<std::string, std::string> out;
  for (const auto& e : fs::recursive_directory_iterator(dir))
    if (e.is_regular_file()) out[fs::relative(e.path(), dir).string()] = ReadFile(e.path().string());
  return out;
}

class SynthTest : public ::testing::Test {
 protected:
  // Two runs with seed 5 and one with seed 6, shared by the tests of this file.
  static void SetUpTestSuite() {
    a_ = new TempDir();
    b_ = new TempDir();
    c_ = new TempDir();
    for (auto [dir, seed] : {std::pair{a_, 5}, std::pair{b_, 5}, std::pair{c_, 6}}) {
      RunResult r = RunCommand(SynthArgs(dir->path(), 30, seed), 60000);
      ASSERT_EQ(r.code, 0) << r.err;
    }
  }
  static void TearDownTestSuite() {
    delete a_;
    delete b_;
    delete c_;
  }
  static TempDir* a_;
  static TempDir* b_;
  static TempDir* c_;
};
TempDir* SynthTest::a_ = nullptr;
TempDir* SynthTest::b_ = nullptr;
TempDir* SynthTest::c_ = nullptr;

TEST_F(SynthTest, SameSeedGivesIdenticalOutput) {
  auto fa = Files(a_->path());
  auto fb = Files(b_->path());
  ASSERT_EQ(fa.size(), fb.size());
  int wavs = 0;
  for (const auto& [name, body] : fa) {
    ASSERT_TRUE(fb.count(name)) << name;
    if (name.rfind("wav/", 0) == 0) {
      ++wavs;
      EXPECT_TRUE(body == fb[name]) << name << " differs";
    } else {
      EXPECT_EQ(Replace(body, Prefix(a_), "DIR"), Replace(fb[name], Prefix(b_), "DIR")) << name;
    }
  }
  EXPECT_EQ(wavs, 30);
  for (const char* m : {"train.jsonl", "valid.jsonl", "valid_heldout.jsonl", "summary.json"})
    EXPECT_TRUE(fa.count(m)) << m;
}

TEST_F(SynthTest, OtherSeedGivesOtherOutput) {
  auto fa = Files(a_->path());
  auto fc = Files(c_->path());
  EXPECT_NE(Replace(fa["train.jsonl"], Prefix(a_), "DIR"), Replace(fc["train.jsonl"], Prefix(c_), "DIR"));
  int same = 0;
  for (const auto& [name, body] : fa)
    if (name.rfind("wav/", 0) == 0 && fc.count(name) && fc[name] == body) ++same;
  EXPECT_EQ(same, 0);
  auto summary = json::parse(fc["summary.json"], nullptr, false);
  ASSERT_TRUE(summary.is_object());
  EXPECT_EQ(summary["seed"], 6);
}

TEST_F(SynthTest, SplitsAndHeldOutVoices) {
  for (TempDir* d : {a_, c_}) {
    auto train = ReadJsonl(*d / "train.jsonl");
    auto valid = ReadJsonl(*d / "valid.jsonl");
    auto heldout = ReadJsonl(*d / "valid_heldout.jsonl");
    ASSERT_FALSE(train.empty());
    ASSERT_FALSE(valid.empty());
    EXPECT_EQ(train.size() + valid.size() + heldout.size(), 30u);
    std::set<std::string> train_text;
    for (const auto& j : train) {
      ASSERT_TRUE(j.is_object());
      train_text.insert(j["text"].get<std::string>());
      EXPECT_FALSE(kHeldoutVoices.count(j["voice"])) << j.dump();
    }
    for (const auto& j : valid) {
      EXPECT_FALSE(train_text.count(j["text"])) << "in train and valid: " << j["text"];
      EXPECT_FALSE(kHeldoutVoices.count(j["voice"])) << j.dump();
    }
    for (const auto& j : heldout) {
      EXPECT_FALSE(train_text.count(j["text"])) << "in train and valid_heldout: " << j["text"];
      EXPECT_TRUE(kHeldoutVoices.count(j["voice"])) << j.dump();
    }
    auto summary = json::parse(ReadFile(*d / "summary.json"), nullptr, false);
    ASSERT_TRUE(summary.is_object());
    EXPECT_EQ(summary["utterances"], 30);
    EXPECT_EQ(summary["splits"]["train"]["utterances"], train.size());
  }
}

TEST_F(SynthTest, ManifestFieldsAndWavFormat) {
  int n = 0;
  for (const char* m : {"train.jsonl", "valid.jsonl", "valid_heldout.jsonl"}) {
    for (const auto& j : ReadJsonl(*a_ / m)) {
      ++n;
      ASSERT_TRUE(j.is_object());
      std::string audio = j["audio"], text = j["text"], engine = j["engine"];
      EXPECT_EQ(audio.rfind(Prefix(a_) + "/wav/", 0), 0u) << audio;  // absolute, in DIR/wav
      EXPECT_TRUE(engine == "espeak" || engine == "flite") << engine;
      EXPECT_TRUE(j["voice"].is_string());
      ASSERT_FALSE(text.empty());
      EXPECT_EQ(text.find_first_not_of("abcdefghijklmnopqrstuvwxyz' "), std::string::npos) << text;
      EXPECT_EQ(text.find("  "), std::string::npos) << text;
      EXPECT_NE(text.front(), ' ');
      EXPECT_NE(text.back(), ' ');
      WavInfo w = ProbeWav(audio);
      ASSERT_TRUE(w.ok) << audio;
      EXPECT_EQ(w.format, 1) << audio;  // PCM
      EXPECT_EQ(w.rate, 16000) << audio;
      EXPECT_EQ(w.channels, 1) << audio;
      EXPECT_EQ(w.bits, 16) << audio;
      double duration = j["duration"];
      EXPECT_NEAR(w.frames / 16000.0, duration, 0.001) << audio;
      EXPECT_GE(duration, 0.3);
      EXPECT_LE(duration, 20.0);
    }
  }
  EXPECT_EQ(n, 30);
}

TEST(SynthShards, ShardsPartitionTheUtterances) {
  TempDir whole, parts;
  RunResult r = RunCommand(SynthArgs(whole.path(), 16, 9), 60000);
  ASSERT_EQ(r.code, 0) << r.err;
  for (int s = 0; s < 2; ++s) {
    r = RunCommand(SynthArgs(parts.path(), 16, 9, {"--shards", "2", "--shard", std::to_string(s)}), 60000);
    ASSERT_EQ(r.code, 0) << r.err;
  }
  // Text, voice and split of each index agree; each shard holds only its own indices.
  auto key = [](const json& j, const std::string& split) {
    std::string audio = j["audio"];
    return audio.substr(audio.size() - 12) + " " + split + " " + j["voice"].get<std::string>() + " " +
           j["text"].get<std::string>();
  };
  std::set<std::string> expect, got;
  for (std::string split : {"train", "valid", "valid_heldout"}) {
    for (const auto& j : ReadJsonl(whole / (split + ".jsonl"))) expect.insert(key(j, split));
    for (int s = 0; s < 2; ++s) {
      for (const auto& j : ReadJsonl(parts / (split + "." + std::to_string(s) + ".jsonl"))) {
        std::string audio = j["audio"];
        int index = std::stoi(audio.substr(audio.size() - 12, 8));
        EXPECT_EQ(index % 2, s) << audio;
        got.insert(key(j, split));
      }
    }
  }
  EXPECT_EQ(expect.size(), 16u);
  EXPECT_EQ(expect, got);
  EXPECT_FALSE(fs::exists(parts / "train.jsonl"));
  EXPECT_TRUE(fs::exists(parts / "summary.1.json"));
}

bool HaveFestival() {
  for (const char* dir : {"/usr/bin", "/usr/local/bin"})
    if (fs::exists(fs::path(dir) / "festival")) return true;
  return false;
}

// --festival-share 1: every train and valid utterance comes from one of the three Festival voices,
// held-out utterances still from the held-out voices; same seed, same bytes; 16 kHz mono PCM.
TEST(SynthFestival, FestivalVoicesAreDeterministicAndNeverHeldOut) {
  if (!HaveFestival()) GTEST_SKIP() << "festival is not installed (Debian: festival festvox-kdlpc16k ...)";
  const std::set<std::string> festival_voices = {"kal_diphone", "ked_diphone", "cmu_us_slt_arctic_hts"};
  TempDir a, b;
  for (TempDir* d : {&a, &b}) {
    RunResult r = RunCommand(SynthArgs(d->path(), 24, 11, {"--festival-share", "1"}), 60000);
    ASSERT_EQ(r.code, 0) << r.err;
  }
  auto fa = Files(a.path()), fb = Files(b.path());
  ASSERT_EQ(fa.size(), fb.size());
  for (const auto& [name, body] : fa) {
    ASSERT_TRUE(fb.count(name)) << name;
    EXPECT_EQ(Replace(body, Prefix(&a), "DIR"), Replace(fb[name], Prefix(&b), "DIR")) << name << " differs";
    EXPECT_EQ(name.find(".festival"), std::string::npos) << "scratch file left: " << name;
  }
  std::set<std::string> seen;
  int n = 0;
  for (std::string split : {"train", "valid", "valid_heldout"}) {
    for (const auto& j : ReadJsonl(a / (split + ".jsonl"))) {
      ++n;
      std::string voice = j["voice"], engine = j["engine"], audio = j["audio"];
      if (split == "valid_heldout") {
        EXPECT_TRUE(kHeldoutVoices.count(voice)) << j.dump();
        EXPECT_NE(engine, "festival");
      } else {
        EXPECT_EQ(engine, "festival") << j.dump();
        EXPECT_TRUE(festival_voices.count(voice)) << j.dump();
        seen.insert(voice);
      }
      WavInfo w = ProbeWav(audio);
      ASSERT_TRUE(w.ok) << audio;
      EXPECT_EQ(w.rate, 16000);
      EXPECT_EQ(w.channels, 1);
      EXPECT_NEAR(w.frames / 16000.0, j["duration"].get<double>(), 0.001) << audio;
      EXPECT_GE(j["duration"].get<double>(), 0.3);
    }
  }
  EXPECT_EQ(n, 24);
  EXPECT_GE(seen.size(), 2u);  // 24 draws over weights 0.25/0.45/0.30
  auto summary = json::parse(fa["summary.json"], nullptr, false);
  ASSERT_TRUE(summary.is_object());
  EXPECT_GT(summary["engines"]["festival"]["utterances"].get<int>(), 0);
}

// Without festival on PATH a run that asks for it stops at start and says what to install; a run
// without --festival-share does not need it.
TEST(SynthFestival, MissingFestivalIsAClearError) {
  TempDir t;
  RunResult r = RunCommand({"/usr/bin/env", "PATH=/nonexistent", ASRF_SYNTH_BIN, "--out", t / "a", "--utterances", "2",
                            "--festival-share", "0.5"},
                           30000);
  EXPECT_EQ(r.code, 1) << r.err;
  EXPECT_NE(r.err.find("cannot run festival"), std::string::npos) << r.err;
  r = RunCommand({"/usr/bin/env", "PATH=/nonexistent", ASRF_SYNTH_BIN, "--out", t / "b", "--utterances", "2"}, 30000);
  EXPECT_EQ(r.code, 0) << r.err;
}

// A festival that dies in the middle of a run stops it with the reason (exit 1) instead of losing
// every later Festival utterance. The stand-in answers the start-up handshake (4 requests), then exits.
TEST(SynthFestival, AFestivalThatDiesStopsTheRun) {
  TempDir t;
  fs::create_directories(t / "bin");
  {
    std::ofstream f(t / "bin/festival");
    f << "#!/bin/sh\nn=0\nwhile read -r line; do\n  case \"$line\" in\n    '(format stderr'*)\n"
         "      n=$((n+1)); [ $n -ge 5 ] && exit 3\n"
         "      printf '%s\\n' \"$line\" | sed 's/.*\"\\(asr-synth-done [0-9]*\\).*/\\1/' >&2 ;;\n  esac\ndone\n";
  }
  fs::permissions(t / "bin/festival", fs::perms::owner_all);
  RunResult r = RunCommand({"/usr/bin/env", "PATH=" + (t / "bin") + ":/usr/bin:/bin", ASRF_SYNTH_BIN, "--out",
                            t / "out", "--utterances", "6", "--festival-share", "1", "--heldout-fraction", "0"},
                           30000);
  EXPECT_EQ(r.code, 1) << r.err;
  EXPECT_NE(r.err.find("festival exited"), std::string::npos) << r.err;
}

// --single-word-fraction 1: every utterance is one word of a sentence of its own split (so no
// training word comes from a validation-only sentence), spoken alone; 0 changes nothing at all.
TEST_F(SynthTest, SingleWordsComeFromTheirSplitsSentences) {
  TempDir d;
  RunResult r = RunCommand(SynthArgs(d / "one", 30, 5, {"--single-word-fraction", "1", "--numbers-fraction", "0"}),
                           60000);
  ASSERT_EQ(r.code, 0) << r.err;
  r = RunCommand({ASRF_SYNTH_BIN, "--list-sentences"}, 60000);
  ASSERT_EQ(r.code, 0) << r.err;
  std::map<std::string, std::set<std::string>> words;  // split -> words of its sentences
  std::istringstream pool(r.out);
  for (std::string line; std::getline(pool, line);) {
    size_t tab = line.find('\t');
    ASSERT_NE(tab, std::string::npos) << line;
    std::istringstream ws(line.substr(tab + 1));
    for (std::string w; ws >> w;) words[line.substr(0, tab)].insert(w);
  }
  ASSERT_FALSE(words["train"].empty());
  ASSERT_FALSE(words["valid"].empty());
  int n = 0;
  for (auto [m, split] : {std::pair{"train.jsonl", "train"}, std::pair{"valid.jsonl", "valid"},
                          std::pair{"valid_heldout.jsonl", "valid"}}) {
    for (const auto& j : ReadJsonl(d / (std::string("one/") + m))) {
      ++n;
      std::string text = j["text"];
      EXPECT_FALSE(text.empty());
      EXPECT_EQ(text.find(' '), std::string::npos) << "more than one word: " << text;
      EXPECT_TRUE(words[split].count(text)) << text << " is no word of a " << split << " sentence";
    }
  }
  EXPECT_EQ(n, 30);
  auto summary = json::parse(ReadFile(d / "one/summary.json"), nullptr, false);
  ASSERT_TRUE(summary.is_object());
  EXPECT_EQ(summary["options"]["single_word_fraction"], 1.0);

  r = RunCommand(SynthArgs(d / "zero", 30, 5, {"--single-word-fraction", "0"}), 60000);
  ASSERT_EQ(r.code, 0) << r.err;
  auto fa = Files(a_->path());
  auto fz = Files(d / "zero");
  ASSERT_EQ(fa.size(), fz.size());
  for (const auto& [name, body] : fa) {
    ASSERT_TRUE(fz.count(name)) << name;
    const std::string zero = fs::absolute(d / "zero").lexically_normal().string();
    EXPECT_EQ(Replace(body, Prefix(a_), "DIR"), Replace(fz[name], zero, "DIR"))
        << name << " differs from the run without --single-word-fraction";
  }
}

TEST(SynthErrors, BadArgumentsFail) {
  RunResult r = RunCommand({ASRF_SYNTH_BIN, "--out", "/proc/forbidden", "--utterances", "3"}, 30000);
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("/proc/forbidden"), std::string::npos) << r.err;

  r = RunCommand({ASRF_SYNTH_BIN, "--utterances", "0"}, 30000);
  EXPECT_EQ(r.code, 2) << r.err;
  r = RunCommand({ASRF_SYNTH_BIN, "--no-such-option"}, 30000);
  EXPECT_EQ(r.code, 2) << r.err;
  r = RunCommand({ASRF_SYNTH_BIN, "--shards", "2", "--shard", "2"}, 30000);
  EXPECT_EQ(r.code, 2) << r.err;
  r = RunCommand({ASRF_SYNTH_BIN, "--festival-share", "1.5"}, 30000);
  EXPECT_EQ(r.code, 2) << r.err;
  r = RunCommand({ASRF_SYNTH_BIN, "--single-word-fraction", "-0.1"}, 30000);
  EXPECT_EQ(r.code, 2) << r.err;

  TempDir t;
  fs::create_directories(t / "empty");
  r = RunCommand({ASRF_SYNTH_BIN, "--out", t / "out", "--text-dir", t / "empty"}, 30000);
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("no usable sentences"), std::string::npos) << r.err;

  r = RunCommand({ASRF_SYNTH_BIN, "--help"}, 30000);
  EXPECT_EQ(r.code, 0);
  EXPECT_NE(r.out.find("--heldout-fraction"), std::string::npos);
}

}  // namespace
}  // namespace asrf::testing
