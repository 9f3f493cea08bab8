// A character n-gram language model (interpolated Witten-Bell), used by the CTC beam search to
// prefer letter sequences that look like the language. It is built from plain sentences
// (`asr-lm build`), saved as one small binary file and loaded read-only by workers.
//
// It also holds the lexicon of the sentences (every word seen), so the beam search can tell a word
// it made up from one of the language.
//
// File (little-endian): "ASRFCLM2", u32 order, u32 alphabet size, the alphabet's bytes, u64 n,
// then n records {u64 key, u32 count} sorted by key, then u64 w and w sorted u64 word hashes
// (WordHash). A key packs an n-gram (context then the predicted symbol) as 5-bit symbol numbers,
// the oldest highest; symbols are 1..alphabet size for the alphabet's characters, then
// begin-of-sentence and end-of-sentence. "ASRFCLM1" files (no lexicon) load too.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "common/status.h"

namespace asrf {

class CharLm {
 public:
  static constexpr int kMaxOrder = 10;
  static constexpr int kMaxAlphabet = 29;  // 5-bit symbols: alphabet, begin, end; 0 is unused

  // Counts every n-gram (orders 1..order) of the sentences. Characters outside `alphabet` end the
  // current word (they become a space); whitespace collapses; empty sentences are skipped.
  static Status Build(const std::vector<std::string>& sentences, const std::string& alphabet, int order,
                      CharLm* out);
  Status Save(const std::string& path) const;
  static Status Load(const std::string& path, CharLm* out);

  // The context of a sentence's first character.
  uint64_t Start() const;
  // The context after `symbol` follows `context` (only the last order-1 symbols are kept).
  uint64_t Next(uint64_t context, int symbol) const;
  // log P(symbol | context), natural log; never -inf (unseen symbols back off to uniform).
  double LogProb(uint64_t context, int symbol) const;
  // The symbol of character c, or 0 when c is not in the alphabet.
  int Symbol(char c) const;
  int End() const { return static_cast<int>(alphabet_.size()) + 2; }

  // The lexicon: words are hashed (FNV-1a 64 over their characters, extended a character at a
  // time with ExtendWordHash from kEmptyWord).
  static constexpr uint64_t kEmptyWord = 14695981039346656037ull;
  static uint64_t ExtendWordHash(uint64_t h, char c) { return (h ^ static_cast<unsigned char>(c)) * 1099511628211ull; }
  static uint64_t WordHash(std::string_view w) {
    uint64_t h = kEmptyWord;
    for (char c : w) h = ExtendWordHash(h, c);
    return h;
  }
  bool HasWord(uint64_t hash) const { return words_.count(hash) > 0; }
  size_t words() const { return words_.size(); }

  int order() const { return order_; }
  const std::string& alphabet() const { return alphabet_; }
  size_t ngrams() const { return counts_.size(); }

 private:
  struct Context {
    uint64_t total = 0;  // occurrences of the context followed by anything
    uint64_t types = 0;  // distinct symbols that followed it
  };
  void Index();  // fills contexts_ from counts_

  int order_ = 0;
  std::string alphabet_;
  std::unordered_map<uint64_t, uint32_t> counts_;   // context+symbol -> count
  std::unordered_map<uint64_t, Context> contexts_;  // context -> totals
  std::unordered_set<uint64_t> words_;               // WordHash of every word of the sentences
};

}  // namespace asrf
