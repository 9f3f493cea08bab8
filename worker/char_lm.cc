#include "worker/char_lm.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstring>
#include <fstream>

namespace asrf {

namespace {

constexpr char kMagic[8] = {'A', 'S', 'R', 'F', 'C', 'L', 'M', '2'};
constexpr char kMagicNoLexicon[8] = {'A', 'S', 'R', 'F', 'C', 'L', 'M', '1'};

uint64_t Mask(int symbols) { return symbols >= 12 ? ~0ull : ((1ull << (5 * symbols)) - 1); }

template <typename T>
void Put(std::string* out, T v) {
  char b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));
  out->append(b, sizeof(T));
}

template <typename T>
bool Get(const std::string& in, size_t* pos, T* v) {
  if (in.size() - *pos < sizeof(T)) return false;
  std::memcpy(v, in.data() + *pos, sizeof(T));
  *pos += sizeof(T);
  return true;
}

// The alphabet of a model: 1..kMaxAlphabet distinct characters, the space among them.
Status CheckAlphabet(const std::string& alphabet) {
  if (alphabet.empty() || alphabet.size() > static_cast<size_t>(CharLm::kMaxAlphabet)) {
    return Status::Invalid("language model alphabet must have 1.." + std::to_string(CharLm::kMaxAlphabet) +
                           " characters");
  }
  if (alphabet.find(' ') == std::string::npos) return Status::Invalid("language model alphabet needs the space");
  for (size_t i = 0; i < alphabet.size(); ++i)
    if (alphabet.find(alphabet[i], i + 1) != std::string::npos)
      return Status::Invalid(std::string("language model alphabet repeats '") + alphabet[i] + "'");
  return Status::Ok();
}

}  // namespace

int CharLm::Symbol(char c) const {
  size_t i = alphabet_.find(c);
  return i == std::string::npos ? 0 : static_cast<int>(i) + 1;
}

uint64_t CharLm::Start() const {
  uint64_t ctx = 0;
  const uint64_t bos = alphabet_.size() + 1;
  for (int i = 0; i < order_ - 1; ++i) ctx = (ctx << 5) | bos;
  return ctx;
}

uint64_t CharLm::Next(uint64_t context, int symbol) const {
  return ((context << 5) | static_cast<uint64_t>(symbol)) & Mask(order_ - 1);
}

double CharLm::LogProb(uint64_t context, int symbol) const {
  // Outcomes: the alphabet and the end of the sentence.
  double p = 1.0 / static_cast<double>(alphabet_.size() + 1);
  if (symbol <= 0 || symbol > End() || symbol == End() - 1) return std::log(p) - 10.0;  // not a predicted symbol
  for (int j = 0; j < order_; ++j) {
    const uint64_t h = context & Mask(j);
    auto c = contexts_.find(h);
    if (c == contexts_.end()) break;  // a longer context is not seen either
    auto n = counts_.find((h << 5) | static_cast<uint64_t>(symbol));
    const double count = n == counts_.end() ? 0.0 : n->second;
    const double types = static_cast<double>(c->second.types), total = static_cast<double>(c->second.total);
    p = (count + types * p) / (total + types);
  }
  return std::log(p);
}

void CharLm::Index() {
  contexts_.clear();
  contexts_.reserve(counts_.size() / 2);
  for (const auto& [key, count] : counts_) {
    Context& c = contexts_[key >> 5];
    c.total += count;
    c.types += 1;
  }
}

Status CharLm::Build(const std::vector<std::string>& sentences, const std::string& alphabet, int order,
                     CharLm* out) {
  if (order < 1 || order > kMaxOrder) {
    return Status::Invalid("language model order must be 1.." + std::to_string(kMaxOrder));
  }
  ASRF_RETURN_IF_ERROR(CheckAlphabet(alphabet));
  CharLm lm;
  lm.order_ = order;
  lm.alphabet_ = alphabet;
  const int bos = static_cast<int>(alphabet.size()) + 1, eos = bos + 1;
  std::vector<int> seq;
  size_t used = 0;
  for (const std::string& sentence : sentences) {
    // Typographic apostrophes (U+2018, U+2019: "don’t" as word processors write it) are the
    // apostrophe; left as they are, their bytes split the word ("don t") and the lexicon learnt
    // "don" and "t".
    std::string s = sentence;
    for (const char* curly : {"\xE2\x80\x98", "\xE2\x80\x99"}) {
      for (size_t at = s.find(curly); at != std::string::npos; at = s.find(curly, at + 1)) s.replace(at, 3, "'");
    }
    seq.assign(static_cast<size_t>(order - 1), bos);
    for (char raw : s) {
      char c = static_cast<char>(std::tolower(static_cast<unsigned char>(raw)));
      int sym = lm.Symbol(c);
      if (sym == 0 || c == ' ') {
        c = ' ';
        sym = lm.Symbol(' ');
        if (seq.size() == static_cast<size_t>(order - 1) || seq.back() == sym) continue;  // no leading/double space
      }
      seq.push_back(sym);
    }
    while (seq.size() > static_cast<size_t>(order - 1) && seq.back() == lm.Symbol(' ')) seq.pop_back();
    if (seq.size() == static_cast<size_t>(order - 1)) continue;
    uint64_t word = kEmptyWord;
    for (size_t i = static_cast<size_t>(order - 1); i <= seq.size(); ++i) {
      if (i == seq.size() || seq[i] == lm.Symbol(' ')) {
        if (word != kEmptyWord) lm.words_.insert(word);
        word = kEmptyWord;
      } else {
        word = ExtendWordHash(word, alphabet[static_cast<size_t>(seq[i] - 1)]);
      }
    }
    seq.push_back(eos);
    ++used;
    for (size_t i = static_cast<size_t>(order - 1); i < seq.size(); ++i) {
      uint64_t h = 0;
      lm.counts_[static_cast<uint64_t>(seq[i])]++;  // order 1: empty context
      for (int j = 1; j < order; ++j) {
        h |= static_cast<uint64_t>(seq[i - static_cast<size_t>(j)]) << (5 * (j - 1));
        lm.counts_[(h << 5) | static_cast<uint64_t>(seq[i])]++;
      }
    }
  }
  if (used == 0) return Status::Invalid("no sentence with characters of the alphabet to build a language model from");
  lm.Index();
  *out = std::move(lm);
  return Status::Ok();
}

Status CharLm::Save(const std::string& path) const {
  std::vector<std::pair<uint64_t, uint32_t>> rows(counts_.begin(), counts_.end());
  std::sort(rows.begin(), rows.end());
  std::string b(kMagic, sizeof(kMagic));
  Put<uint32_t>(&b, static_cast<uint32_t>(order_));
  Put<uint32_t>(&b, static_cast<uint32_t>(alphabet_.size()));
  b += alphabet_;
  Put<uint64_t>(&b, rows.size());
  for (const auto& [k, c] : rows) {
    Put<uint64_t>(&b, k);
    Put<uint32_t>(&b, c);
  }
  std::vector<uint64_t> words(words_.begin(), words_.end());
  std::sort(words.begin(), words.end());
  Put<uint64_t>(&b, words.size());
  for (uint64_t w : words) Put<uint64_t>(&b, w);
  std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    f.write(b.data(), static_cast<std::streamsize>(b.size()));
    if (!f.flush()) return Status::IOError("cannot write " + tmp);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) return Status::IOError("cannot rename " + tmp + " to " + path);
  return Status::Ok();
}

Status CharLm::Load(const std::string& path, CharLm* out) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return Status::NotFound("language model " + path + " cannot be read");
  std::string b((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  auto bad = [&](const std::string& why) { return Status::Corruption("language model " + path + ": " + why); };
  const bool lexicon = b.size() >= sizeof(kMagic) && std::memcmp(b.data(), kMagic, sizeof(kMagic)) == 0;
  if (!lexicon && (b.size() < sizeof(kMagic) || std::memcmp(b.data(), kMagicNoLexicon, sizeof(kMagic)) != 0)) {
    return bad("not a language model file (no ASRFCLM2 or ASRFCLM1 header)");
  }
  size_t pos = sizeof(kMagic);
  uint32_t order = 0, asize = 0;
  uint64_t n = 0;
  if (!Get(b, &pos, &order) || !Get(b, &pos, &asize)) return bad("truncated header");
  if (order < 1 || order > static_cast<uint32_t>(kMaxOrder)) return bad("order " + std::to_string(order));
  if (asize < 1 || asize > static_cast<uint32_t>(kMaxAlphabet) || b.size() - pos < asize) return bad("bad alphabet");
  CharLm lm;
  lm.order_ = static_cast<int>(order);
  lm.alphabet_ = b.substr(pos, asize);
  pos += asize;
  if (Status st = CheckAlphabet(lm.alphabet_); !st.ok()) return bad(st.message());
  if (!Get(b, &pos, &n) || (b.size() - pos) / 12 < n || (!lexicon && b.size() - pos != n * 12)) {
    return bad("the n-gram table does not match the file's size");
  }
  lm.counts_.reserve(n);
  const uint64_t max_key = Mask(lm.order_);
  for (uint64_t i = 0; i < n; ++i) {
    uint64_t k = 0;
    uint32_t c = 0;
    (void)Get(b, &pos, &k);
    (void)Get(b, &pos, &c);
    // The predicted symbol is a character or the end (never 0 or the begin symbol).
    const uint64_t sym = k & 31;
    if (k > max_key || c == 0 || sym == 0 || sym > asize + 2 || sym == asize + 1) {
      return bad("n-gram " + std::to_string(i) + " is out of range");
    }
    lm.counts_.emplace(k, c);
  }
  if (lexicon) {
    uint64_t w = 0;
    if (!Get(b, &pos, &w) || (b.size() - pos) / 8 != w || (b.size() - pos) % 8 != 0) {
      return bad("the lexicon does not match the file's size");
    }
    lm.words_.reserve(w);
    for (uint64_t i = 0; i < w; ++i) {
      uint64_t h = 0;
      (void)Get(b, &pos, &h);
      lm.words_.insert(h);
    }
  }
  lm.Index();
  *out = std::move(lm);
  return Status::Ok();
}

}  // namespace asrf
