// Decoding without libtorch (worker/char_lm.h, worker/ctc_beam.h): the character language model
// is a proper distribution, survives a save/load round trip and rejects damaged files; the beam
// search finds the most probable label sequence (checked against brute force over every
// alignment), the language model changes what an ambiguous frame becomes, and the CTC alignment
// puts tokens on the frames they were spoken in.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "tests/harness.h"
#include "worker/char_lm.h"
#include "worker/ctc_beam.h"

namespace asrf::testing {
namespace {

const std::string kAlphabet = " 'abcdefghijklmnopqrstuvwxyz";

std::vector<std::string> Corpus() {
  return {"the cat sat on the mat", "the cat ate", "a cat and a hat", "that cat is fat", "the car is red",
          "what a cat",           "the cat ran", "cats and dogs",   "the mat is flat"};
}

CharLm Build(int order) {
  CharLm lm;
  Status st = CharLm::Build(Corpus(), kAlphabet, order, &lm);
  EXPECT_TRUE(st.ok()) << st.ToString();
  return lm;
}

TEST(CharLmTest, IsADistributionOverTheAlphabetAndTheEnd) {
  CharLm lm = Build(4);
  std::vector<std::string> histories = {"", "the c", "zzq", "cat", "the mat is fla"};
  for (const auto& h : histories) {
    uint64_t ctx = lm.Start();
    for (char c : h) ctx = lm.Next(ctx, lm.Symbol(c));
    double sum = std::exp(lm.LogProb(ctx, lm.End()));
    for (char c : kAlphabet) sum += std::exp(lm.LogProb(ctx, lm.Symbol(c)));
    EXPECT_NEAR(sum, 1.0, 1e-9) << "history \"" << h << "\"";
  }
}

TEST(CharLmTest, PrefersWhatItSaw) {
  CharLm lm = Build(5);
  uint64_t ctx = lm.Start();
  for (char c : std::string("the ca")) ctx = lm.Next(ctx, lm.Symbol(c));
  EXPECT_GT(lm.LogProb(ctx, lm.Symbol('t')), lm.LogProb(ctx, lm.Symbol('r')));  // "the cat" 2x, "the car" 1x
  EXPECT_GT(lm.LogProb(ctx, lm.Symbol('r')), lm.LogProb(ctx, lm.Symbol('q')));  // never seen
  EXPECT_TRUE(std::isfinite(lm.LogProb(ctx, lm.Symbol('q'))));
  // A sentence does not start with a space: it was never seen there.
  EXPECT_LT(lm.LogProb(lm.Start(), lm.Symbol(' ')), lm.LogProb(lm.Start(), lm.Symbol('t')));
}

TEST(CharLmTest, SaveLoadRoundTripAndDamagedFiles) {
  TempDir dir;
  CharLm lm = Build(6);
  const std::string path = dir / "x.lm";
  ASSERT_TRUE(lm.Save(path).ok());
  CharLm back;
  Status st = CharLm::Load(path, &back);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(back.order(), 6);
  EXPECT_EQ(back.alphabet(), kAlphabet);
  EXPECT_EQ(back.ngrams(), lm.ngrams());
  uint64_t a = lm.Start(), b = back.Start();
  for (char c : std::string("the hat is red")) {
    EXPECT_EQ(lm.LogProb(a, lm.Symbol(c)), back.LogProb(b, back.Symbol(c)));
    a = lm.Next(a, lm.Symbol(c));
    b = back.Next(b, back.Symbol(c));
  }

  EXPECT_EQ(CharLm::Load(dir / "missing.lm", &back).code(), Status::Code::kNotFound);
  std::string bytes;
  {
    std::ifstream in(path, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
  }
  auto write = [&](const std::string& name, const std::string& b) {
    std::ofstream(dir / name, std::ios::binary) << b;
    return std::string(dir / name);
  };
  st = CharLm::Load(write("truncated.lm", bytes.substr(0, bytes.size() - 5)), &back);
  EXPECT_EQ(st.code(), Status::Code::kCorruption) << st.ToString();
  st = CharLm::Load(write("text.lm", "the cat sat on the mat\n"), &back);
  EXPECT_EQ(st.code(), Status::Code::kCorruption) << st.ToString();
  std::string bad_order = bytes;
  bad_order[8] = 99;
  st = CharLm::Load(write("order.lm", bad_order), &back);
  EXPECT_EQ(st.code(), Status::Code::kCorruption) << st.ToString();
  st = CharLm::Load(write("empty.lm", ""), &back);
  EXPECT_EQ(st.code(), Status::Code::kCorruption) << st.ToString();
  // The first n-gram record (after magic, order, alphabet size, alphabet, n) with symbol 0.
  const size_t first = 8 + 4 + 4 + kAlphabet.size() + 8;
  std::string zero_symbol = bytes;
  zero_symbol[first] = static_cast<char>(zero_symbol[first] & ~31);
  st = CharLm::Load(write("symbol.lm", zero_symbol), &back);
  EXPECT_EQ(st.code(), Status::Code::kCorruption) << st.ToString();
  std::string no_space = bytes;
  no_space[16] = 'x';  // the alphabet's space
  st = CharLm::Load(write("space.lm", no_space), &back);
  EXPECT_EQ(st.code(), Status::Code::kCorruption) << st.ToString();
}

TEST(CharLmTest, KnowsTheWordsOfItsSentences) {
  TempDir dir;
  CharLm lm = Build(4);
  for (const char* w : {"the", "cat", "mat", "flat", "dogs"}) EXPECT_TRUE(lm.HasWord(CharLm::WordHash(w))) << w;
  for (const char* w : {"ca", "cats and", "dog", "", "thecat"}) EXPECT_FALSE(lm.HasWord(CharLm::WordHash(w))) << w;
  ASSERT_TRUE(lm.Save(dir / "x.lm").ok());
  CharLm back;
  ASSERT_TRUE(CharLm::Load(dir / "x.lm", &back).ok());
  EXPECT_EQ(back.words(), lm.words());
  EXPECT_TRUE(back.HasWord(CharLm::WordHash("hat")));
  // A file of the first format (no lexicon) still loads, without words.
  std::string bytes;
  {
    std::ifstream in(dir / "x.lm", std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
  }
  std::string v1 = bytes.substr(0, bytes.size() - 8 - 8 * lm.words());
  v1[7] = '1';
  std::ofstream(dir / "v1.lm", std::ios::binary) << v1;
  Status st = CharLm::Load(dir / "v1.lm", &back);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(back.words(), 0u);
  EXPECT_EQ(back.ngrams(), lm.ngrams());
  // A lexicon cut short is damage.
  std::ofstream(dir / "cut.lm", std::ios::binary) << bytes.substr(0, bytes.size() - 4);
  EXPECT_EQ(CharLm::Load(dir / "cut.lm", &back).code(), Status::Code::kCorruption);
}

// Text from a word processor writes "don’t" with U+2019: the lexicon learns "don't", not "don"
// and "t".
TEST(CharLmTest, TypographicApostrophesAreApostrophes) {
  CharLm lm;
  ASSERT_TRUE(CharLm::Build({"don\xE2\x80\x99t stop", "\xE2\x80\x98tis the season"}, kAlphabet, 3, &lm).ok());
  EXPECT_TRUE(lm.HasWord(CharLm::WordHash("don't")));
  EXPECT_TRUE(lm.HasWord(CharLm::WordHash("'tis")));
  EXPECT_FALSE(lm.HasWord(CharLm::WordHash("don")));
  EXPECT_FALSE(lm.HasWord(CharLm::WordHash("t")));
}

TEST(CharLmTest, BadBuildArguments) {
  CharLm lm;
  EXPECT_EQ(CharLm::Build(Corpus(), kAlphabet, 0, &lm).code(), Status::Code::kInvalid);
  EXPECT_EQ(CharLm::Build(Corpus(), kAlphabet, 11, &lm).code(), Status::Code::kInvalid);
  EXPECT_EQ(CharLm::Build(Corpus(), "abc", 3, &lm).code(), Status::Code::kInvalid);  // no space
  EXPECT_EQ(CharLm::Build({"", "  ", "123"}, kAlphabet, 3, &lm).code(), Status::Code::kInvalid);
}

// Random posteriors [T, V] as log-probabilities.
std::vector<float> RandomLogProbs(int64_t T, int64_t V, std::mt19937_64& rng) {
  std::vector<float> lp(static_cast<size_t>(T * V));
  std::gamma_distribution<double> g(0.4, 1.0);  // peaky, like a trained CTC model
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> p(static_cast<size_t>(V));
    double s = 0;
    for (auto& x : p) s += (x = g(rng) + 1e-6);
    for (int64_t v = 0; v < V; ++v) lp[static_cast<size_t>(t * V + v)] = static_cast<float>(std::log(p[v] / s));
  }
  return lp;
}

// The most probable label sequence by summing over every one of the V^T alignments.
std::vector<int64_t> BruteForce(const std::vector<float>& lp, int64_t T, int64_t V) {
  std::map<std::vector<int64_t>, double> total;
  std::vector<int64_t> path(static_cast<size_t>(T), 0);
  while (true) {
    double p = 0;
    std::vector<int64_t> labels;
    int64_t prev = -1;
    for (int64_t t = 0; t < T; ++t) {
      p += lp[static_cast<size_t>(t * V + path[t])];
      if (path[t] != 0 && path[t] != prev) labels.push_back(path[t]);
      prev = path[t];
    }
    total[labels] += std::exp(p);
    int64_t k = 0;
    while (k < T && ++path[k] == V) path[k++] = 0;
    if (k == T) break;
  }
  auto best = total.begin();
  for (auto it = total.begin(); it != total.end(); ++it)
    if (it->second > best->second) best = it;
  return best->first;
}

TEST(CtcBeamTest, FindsTheMostProbableSequenceWithoutALanguageModel) {
  std::mt19937_64 rng(7);
  BeamOptions o;
  o.beam = 256;  // wide enough to be exact on these sizes
  o.char_bonus = 0;
  o.prune_log_prob = -1e9;
  int greedy_differs = 0;
  for (int trial = 0; trial < 40; ++trial) {
    const int64_t T = 3 + trial % 4, V = 3;
    auto lp = RandomLogProbs(T, V, rng);
    auto got = CtcBeamSearch(lp.data(), T, V, {0, 0, 0}, nullptr, o);
    auto want = BruteForce(lp, T, V);
    EXPECT_EQ(got, want) << "trial " << trial;
    std::vector<int64_t> greedy;
    int64_t prev = -1;
    for (int64_t t = 0; t < T; ++t) {
      int64_t b = 0;
      for (int64_t v = 1; v < V; ++v)
        if (lp[static_cast<size_t>(t * V + v)] > lp[static_cast<size_t>(t * V + b)]) b = v;
      if (b != 0 && b != prev) greedy.push_back(b);
      prev = b;
    }
    greedy_differs += greedy != want;
  }
  EXPECT_GT(greedy_differs, 0) << "the trials never separate beam search from greedy decoding";
}

// "the ca?" as a project model's posteriors (blank, then class k + 1 = kAlphabet[k]): each letter
// sure (0.97) with a blank between, the last letter heard as `first` (0.5) or `second` (0.4).
struct Ambiguous {
  int64_t V = static_cast<int64_t>(kAlphabet.size()) + 1, T = 0;
  std::vector<float> lp;
  std::vector<int> symbols;

  Ambiguous(const CharLm& lm, char first, char second) {
    symbols.assign(static_cast<size_t>(V), 0);
    for (size_t k = 0; k < kAlphabet.size(); ++k) symbols[k + 1] = lm.Symbol(kAlphabet[k]);
    for (char c : std::string("the ca")) {
      Frame({{Class(c), 0.97}});
      Frame({{0, 0.97}});
    }
    Frame({{Class(first), 0.5}, {Class(second), 0.4}});
    Frame({{0, 0.97}});
    T = static_cast<int64_t>(lp.size()) / V;
  }
  static int64_t Class(char c) { return static_cast<int64_t>(kAlphabet.find(c)) + 1; }
  void Frame(std::map<int64_t, double> p) {
    double rest = 1.0;
    for (auto& [k, v] : p) rest -= v;
    for (int64_t v = 0; v < V; ++v) {
      double x = p.count(v) ? p[v] : rest / static_cast<double>(V - static_cast<int64_t>(p.size()));
      lp.push_back(static_cast<float>(std::log(x)));
    }
  }
  std::string Decode(const CharLm* lm, const BeamOptions& o) const {
    std::string s;
    for (int64_t id : CtcBeamSearch(lp.data(), T, V, symbols, lm, o)) s += kAlphabet[static_cast<size_t>(id - 1)];
    return s;
  }
};

TEST(CtcBeamTest, TheLanguageModelDecidesAnAmbiguousFrame) {
  CharLm lm = Build(5);
  Ambiguous a(lm, 'r', 't');  // "the cat" twice in the corpus, "the car" once
  BeamOptions o;
  EXPECT_EQ(a.Decode(nullptr, o), "the car");
  EXPECT_EQ(a.Decode(&lm, o), "the cat");
  o.lm_weight = 0;
  o.oov_penalty = 0;
  EXPECT_EQ(a.Decode(&lm, o), "the car");
}

TEST(CtcBeamTest, AWordOutsideTheLexiconCostsTheOovPenalty) {
  CharLm lm = Build(5);
  Ambiguous a(lm, 'q', 't');  // "caq" is no word of the lexicon, "cat" is
  BeamOptions o;
  o.lm_weight = 0;  // the lexicon alone
  o.oov_penalty = 0;
  EXPECT_EQ(a.Decode(&lm, o), "the caq");
  o.oov_penalty = -2;
  EXPECT_EQ(a.Decode(&lm, o), "the cat");
}

// A segment of silence (long recordings are cut into segments at pauses, and some hold nothing):
// blank nearly certain on every frame, letters faint. Greedy decoding says nothing, and so must
// the beam search with the language model; it used to charge the empty result the LM's price of
// an empty sentence and say a letter instead.
TEST(CtcBeamTest, SilenceDecodesToNothingWithTheLanguageModelToo) {
  // The shipped LM: built from many sentences, none empty, it gives an empty one almost nothing.
  CharLm lm;
  Status loaded = CharLm::Load(std::string(ASRF_SOURCE_DIR) + "/models/en-small.lm", &lm);
  ASSERT_TRUE(loaded.ok()) << loaded.ToString();
  const int64_t V = static_cast<int64_t>(kAlphabet.size()) + 1, T = 60;
  std::vector<int> symbols(static_cast<size_t>(V), 0);
  for (size_t k = 0; k < kAlphabet.size(); ++k) symbols[k + 1] = lm.Symbol(kAlphabet[k]);
  std::mt19937_64 rng(17);
  std::uniform_real_distribution<double> faint(-16.0, -10.0);
  for (int trial = 0; trial < 5; ++trial) {
    std::vector<float> lp;
    for (int64_t t = 0; t < T; ++t) {
      std::vector<double> l(static_cast<size_t>(V));
      double rest = 0;
      for (int64_t v = 1; v < V; ++v) rest += std::exp(l[v] = faint(rng));
      l[0] = std::log(1.0 - rest);
      for (double x : l) lp.push_back(static_cast<float>(x));
    }
    BeamOptions o;
    EXPECT_TRUE(CtcBeamSearch(lp.data(), T, V, symbols, nullptr, o).empty()) << "trial " << trial;
    std::vector<int64_t> ids = CtcBeamSearch(lp.data(), T, V, symbols, &lm, o);
    std::string said;
    for (int64_t id : ids) said += kAlphabet[static_cast<size_t>(id - 1)];
    EXPECT_EQ(said, "") << "trial " << trial;
  }
}

TEST(CtcBeamTest, AlignmentPutsTokensOnTheirFrames) {
  // Frames: a a _ b b _ _ a (3 classes: blank, a, b); peaks at 0.9.
  const int64_t V = 3;
  const std::vector<int64_t> path = {1, 1, 0, 2, 2, 0, 0, 1};
  std::vector<float> lp;
  for (int64_t k : path)
    for (int64_t v = 0; v < V; ++v) lp.push_back(static_cast<float>(std::log(v == k ? 0.9 : 0.05)));
  const int64_t T = static_cast<int64_t>(path.size());
  auto al = CtcAlign(lp.data(), T, V, {1, 2, 1});
  ASSERT_EQ(al.size(), 3u);
  EXPECT_EQ(al[0].id, 1);
  EXPECT_EQ(al[0].first, 0);
  EXPECT_EQ(al[0].last, 1);
  EXPECT_EQ(al[1].id, 2);
  EXPECT_EQ(al[1].first, 3);
  EXPECT_EQ(al[1].last, 4);
  EXPECT_EQ(al[2].first, 7);
  EXPECT_NEAR(al[2].prob, 0.9, 1e-6);
  // A repeated label needs a blank between its runs: "aa" over 2 frames cannot be aligned.
  EXPECT_TRUE(CtcAlign(lp.data(), 2, V, {1, 1}).empty());
  EXPECT_EQ(CtcAlign(lp.data(), 3, V, {1, 1}).size(), 2u);
  EXPECT_TRUE(CtcAlign(lp.data(), T, V, {}).empty());
}

}  // namespace
}  // namespace asrf::testing
