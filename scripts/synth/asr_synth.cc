// asr-synth: synthesises a speech-recognition training corpus in-process with libespeak-ng and
// flite. See `asr-synth --help`.
//
// Text. Sentences and clauses come from the fortune files in --text-dir (entries separated by lines
// holding only "%"; *.dat, *.u8, ascii-art and sub-folders such as off/ are skipped). Each is
// normalised to lowercase a-z, apostrophe and single spaces: digits become number words ("42" ->
// "forty two", "1984" -> "nineteen eighty four", "3.5" -> "three point five", "10:30" -> "ten
// thirty", "2nd" -> "second", "50%" -> "fifty percent"), a few abbreviations are expanded, and a
// sentence that still holds anything else (URLs, mail addresses, paths, code, other characters) is
// dropped, as is one with fewer than 2 or more than --max-words words (a long sentence is first cut
// at commas, colons and dashes into clause groups of at most --max-words words). Sentences are
// deduplicated. About --numbers-fraction of the utterances are spoken number strings instead
// (digit runs, phone-like numbers, cardinals with and without "and", years, ordinals).
//
// Split. A text is in the validation split iff a seed-independent 64-bit hash of its normalised
// form, mapped to [0,1), is below --valid-sentences (0.05). The split therefore changes neither
// with --seed nor with --valid-fraction (the share of utterances that go to valid.jsonl): corpora
// made with other seeds or shares never train on a sentence another one validates on, and no text
// is in both splits; generated number strings obey the same rule.
//
// Voices. espeak-ng: en-us, en-gb, en-gb-scotland, en-gb-x-rp, en-gb-x-gbclan, en-gb-x-gbcwmd,
// en-029, en-us-nyc, each plain and with the variants m1..m8, f1..f5, klatt, klatt2, klatt3 and
// klatt4 (klatt5 and klatt6 clip), rate 130-200 wpm, pitch 20-80, pitch range 30-70, resampled
// from 22,050 Hz to 16 kHz with libsoxr (high quality). flite: kal16, awb, slt (weights 0.45,
// 0.30, 0.25) with duration stretch 0.8-1.25 and the mean F0 scaled by 0.8-1.25 (kal16:
// int_f0_target_mean, awb/slt: f0_shift). About half of the utterances use each engine
// (--espeak-share).
//
// Held-out voices, never used for train or valid; they speak only validation sentences and form
// valid_heldout.jsonl (about --heldout-fraction of the utterances):
//   espeak-ng en-gb-scotland+f3, espeak-ng en-us-nyc+m5, flite rms.
// rms ignores flite's F0 settings, so its pitch is varied by a speed change of 0.9-1.1 instead.
//
// Festival (optional, --festival-share > 0): that share of the train and valid utterances is made
// instead by one `festival --pipe` child with kal_diphone, ked_diphone and cmu_us_slt_arctic_hts
// (weights 0.25, 0.45, 0.30), duration stretch 0.8-1.25 and a speed change of 0.9-1.1 for pitch.
// Held-out utterances never use it. With the share at 0 (default) festival is not started and the
// output is byte-identical to what this program made before Festival was added.
//
// Augmentation. Engine silence is trimmed, the speech is levelled to -23 dBFS RMS and then gets a
// random gain of -6..+6 dB (scaled down when the peak would exceed 0.97 of full scale); on
// --noise-fraction of the utterances white, pink or brown noise is added at an SNR (against the
// speech RMS) drawn in [--min-snr-db, --max-snr-db]; 50-300 ms of silence go before and after.
// Samples are converted to 16-bit with TPDF dither.
//
// Determinism. Utterance i draws everything (split, text, voice, parameters, noise) from a
// std::mt19937_64 seeded with seed ^ (i+1) * 0x9E3779B97F4A7C15, and both engines' internal rand()
// is reseeded from it before each synthesis, so the same arguments give byte-identical wav files,
// manifests and summary. --shard I --shards K makes utterances i with i % K == I only; the text,
// voice and every parameter of an utterance are the same in any sharding, and its flite audio is
// identical too. libespeak-ng keeps internal state across utterances that no API resets (pitch
// flutter phase and similar function statics), so an espeak utterance's samples differ slightly
// between a sharded and an unsharded run (engine output by a few samples; after silence trimming
// the file length by up to a few tens of milliseconds). Same arguments, same bytes, always.
//
// Output: DIR/wav/<8-digit index>.wav (16 kHz mono PCM 16-bit), DIR/train.jsonl, DIR/valid.jsonl,
// DIR/valid_heldout.jsonl (one {"audio","text","duration","voice","engine"} object per line) and
// DIR/summary.json; with --shards K > 1 the manifests are train.I.jsonl, ... and summary.I.json.
#include <espeak-ng/speak_lib.h>
#include <sndfile.h>
#include <soxr.h>

extern "C" {
#include <flite/flite.h>
cst_voice* register_cmu_us_kal16(const char* voxdir);
cst_voice* register_cmu_us_awb(const char* voxdir);
cst_voice* register_cmu_us_rms(const char* voxdir);
cst_voice* register_cmu_us_slt(const char* voxdir);
}

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <numeric>
#include <optional>
#include <random>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <string_view>
#include <unordered_set>
#include <vector>

#include "common/log.h"
#include "common/options.h"
#include "common/status.h"

namespace fs = std::filesystem;

namespace asrf::synth {
namespace {

constexpr int kRate = 16000;
constexpr int kEspeakIdealRate = 22050;
constexpr double kMinSpeechSeconds = 0.3;
constexpr double kMaxSeconds = 20.0;
constexpr int kMaxAttempts = 8;
constexpr double kTargetRmsDbfs = -23.0;
constexpr double kPeakLimit = 0.97;

// ---------------------------------------------------------------------------------------------
// Random numbers and hashing (own helpers, so the output does not depend on how a standard
// library implements its distributions).

using Rng = std::mt19937_64;

uint64_t SplitMix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

double Uniform01(Rng& rng) { return static_cast<double>(rng() >> 11) * 0x1.0p-53; }
double Uniform(Rng& rng, double lo, double hi) { return lo + (hi - lo) * Uniform01(rng); }
// An integer in [lo, hi].
int64_t UniformInt(Rng& rng, int64_t lo, int64_t hi) {
  uint64_t span = static_cast<uint64_t>(hi - lo) + 1;
  return lo + static_cast<int64_t>(static_cast<unsigned __int128>(rng()) * span >> 64);
}

struct Gauss {
  bool have = false;
  double spare = 0;
  double operator()(Rng& rng) {
    if (have) {
      have = false;
      return spare;
    }
    double u1 = Uniform01(rng), u2 = Uniform01(rng);
    if (u1 < 1e-300) u1 = 1e-300;
    double r = std::sqrt(-2.0 * std::log(u1));
    spare = r * std::sin(2 * M_PI * u2);
    have = true;
    return r * std::cos(2 * M_PI * u2);
  }
};

// Seed-independent: FNV-1a over the bytes, then a 64-bit finaliser; mapped to [0,1).
double TextHash01(std::string_view s) {
  uint64_t h = 0xCBF29CE484222325ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 0x100000001B3ull;
  }
  return static_cast<double>(SplitMix64(h) >> 11) * 0x1.0p-53;
}

// ---------------------------------------------------------------------------------------------
// Number words.

const char* const kOnes[] = {"zero",    "one",     "two",       "three",    "four",    "five",    "six",
                             "seven",   "eight",   "nine",      "ten",      "eleven",  "twelve",  "thirteen",
                             "fourteen", "fifteen", "sixteen",  "seventeen", "eighteen", "nineteen"};
const char* const kTens[] = {"", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"};

std::string Below1000(int n, bool with_and) {
  std::string out;
  if (n >= 100) {
    out = std::string(kOnes[n / 100]) + " hundred";
    n %= 100;
    if (n == 0) return out;
    out += with_and ? " and " : " ";
  }
  if (n < 20) return out + kOnes[n];
  out += kTens[n / 10];
  if (n % 10) out += std::string(" ") + kOnes[n % 10];
  return out;
}

// Cardinal for 0 <= n < 10^15; "one hundred and twelve" with with_and, else "one hundred twelve".
std::string Cardinal(uint64_t n, bool with_and = false) {
  if (n == 0) return "zero";
  static const char* const kScales[] = {"", " thousand", " million", " billion", " trillion"};
  std::vector<std::string> parts;
  int scale = 0;
  uint64_t rest = n;
  while (rest > 0) {
    int group = static_cast<int>(rest % 1000);
    if (group) {
      // British style puts "and" before a final group below 100 too: "two thousand and five".
      bool final_small = scale == 0 && group < 100 && n >= 1000;
      std::string g = Below1000(group, with_and) + kScales[scale];
      if (final_small && with_and) g = "and " + g;
      parts.push_back(g);
    }
    rest /= 1000;
    ++scale;
  }
  std::string out;
  for (auto it = parts.rbegin(); it != parts.rend(); ++it) {
    if (!out.empty()) out += ' ';
    out += *it;
  }
  return out;
}

std::string Year(int n) {  // 1100..1999 and similar: "nineteen eighty four", "nineteen oh five"
  int hi = n / 100, lo = n % 100;
  std::string out = Below1000(hi, false);
  if (lo == 0) return out + " hundred";
  if (lo < 10) return out + " oh " + kOnes[lo];
  return out + " " + Below1000(lo, false);
}

std::string OrdinalOfLastWord(std::string words) {
  size_t sp = words.rfind(' ');
  std::string head = sp == std::string::npos ? "" : words.substr(0, sp + 1);
  std::string w = sp == std::string::npos ? words : words.substr(sp + 1);
  static const std::map<std::string, std::string> kIrregular = {
      {"one", "first"}, {"two", "second"}, {"three", "third"}, {"five", "fifth"},
      {"eight", "eighth"}, {"nine", "ninth"}, {"twelve", "twelfth"}};
  auto it = kIrregular.find(w);
  if (it != kIrregular.end()) return head + it->second;
  if (!w.empty() && w.back() == 'y') return head + w.substr(0, w.size() - 1) + "ieth";
  return head + w + "th";
}

std::string PluralOfLastWord(const std::string& words) {  // "nineteen sixty" -> "nineteen sixties"
  if (!words.empty() && words.back() == 'y') return words.substr(0, words.size() - 1) + "ies";
  if (!words.empty() && words.back() == 'x') return words + "es";
  return words + "s";
}

std::string Digits(std::string_view d, bool oh_for_zero = false) {
  std::string out;
  for (char c : d) {
    if (!out.empty()) out += ' ';
    out += (c == '0' && oh_for_zero) ? "oh" : kOnes[c - '0'];
  }
  return out;
}

// Words for a plain digit string as it would be read in running text.
std::string IntegerWords(const std::string& d) {
  if (d.size() > 1 && d[0] == '0') return Digits(d);
  if (d.size() > 12) return Digits(d);
  uint64_t n = std::stoull(d);
  if (d.size() == 4 && n >= 1100 && n <= 1999) return Year(static_cast<int>(n));
  return Cardinal(n);
}

// Expands a token core holding digits ("$5", "10:30", "1,000", "3.14", "2nd", "50%", "1960s").
// Returns nullopt when the token is not a number form we can read reliably (e.g. "x86", "3D").
std::optional<std::string> ExpandNumberCore(const std::string& core) {
  static const std::regex kMoney(R"(^\$(\d{1,3}(?:,\d{3})+|\d{1,9})$)");
  static const std::regex kTime(R"(^(\d{1,2}):(\d{2})$)");
  static const std::regex kNumber(R"(^(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?(%|st|nd|rd|th|s|'s)?$)",
                                  std::regex::icase);
  std::smatch m;
  auto strip_commas = [](std::string s) {
    s.erase(std::remove(s.begin(), s.end(), ','), s.end());
    return s;
  };
  if (std::regex_match(core, m, kMoney)) {
    std::string d = strip_commas(m[1]);
    if (d.size() > 12) return std::nullopt;
    return IntegerWords(d) + (d == "1" ? " dollar" : " dollars");
  }
  if (std::regex_match(core, m, kTime)) {
    int h = std::stoi(m[1]), mi = std::stoi(m[2]);
    if (h > 24 || mi > 59) return std::nullopt;
    std::string out = Cardinal(h);
    if (mi == 0) return out + " o'clock";
    if (mi < 10) return out + " oh " + kOnes[mi];
    return out + " " + Cardinal(mi);
  }
  if (std::regex_match(core, m, kNumber)) {
    std::string whole = m[1];
    bool grouped = whole.find(',') != std::string::npos;
    whole = strip_commas(whole);
    if (whole.size() > 15) return std::nullopt;
    std::string frac = m[2];
    std::string suffix = m[3];
    for (auto& c : suffix) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    std::string out = grouped ? Cardinal(std::stoull(whole)) : IntegerWords(whole);
    if (!frac.empty()) {
      if (!suffix.empty() && suffix != "%") return std::nullopt;
      out = (whole.size() > 1 && whole[0] == '0' ? Digits(whole) : Cardinal(std::stoull(whole))) + " point " +
            Digits(frac);
    }
    if (suffix == "%") return out + " percent";
    if (suffix == "st" || suffix == "nd" || suffix == "rd" || suffix == "th") {
      if (whole.size() > 1 && whole[0] == '0') return std::nullopt;
      return OrdinalOfLastWord(Cardinal(std::stoull(whole)));
    }
    if (suffix == "s" || suffix == "'s") {  // decades: 1960s, 80s
      uint64_t n = std::stoull(whole);
      if (n % 10 != 0) return std::nullopt;
      return PluralOfLastWord(out);
    }
    return out;
  }
  return std::nullopt;
}

// ---------------------------------------------------------------------------------------------
// Text: fortune entries -> normalised sentences.

constexpr char kReject = '\x01';  // marks text that makes its sentence unusable

bool IsUrlLike(const std::string& t) {
  std::string l;
  for (char c : t) l += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (l.find("://") != std::string::npos || l.find("www.") != std::string::npos ||
      l.find('@') != std::string::npos || l.find('\\') != std::string::npos)
    return true;
  if (!l.empty() && (l[0] == '/' || l[0] == '~')) return true;
  static const std::regex kHost(
      R"(\w\.(com|org|net|edu|gov|mil|int|io|de|uk|fr|au|ca|jp|html?|txt|exe|c|h|pl|sh|py)\b)");
  return std::regex_search(l, kHost);
}

const std::vector<std::pair<std::string, std::string>>& Abbreviations() {
  static const std::vector<std::pair<std::string, std::string>> k = {
      {"Mr.", "Mister"},     {"Mrs.", "Missus"},    {"Ms.", "Miz"},          {"Dr.", "Doctor"},
      {"St.", "Saint"},      {"Jr.", "Junior"},     {"Sr.", "Senior"},       {"Prof.", "Professor"},
      {"Mt.", "Mount"},      {"Capt.", "Captain"},  {"Gen.", "General"},     {"Sgt.", "Sergeant"},
      {"Rev.", "Reverend"},  {"Wm.", "William"},    {"vs.", "versus"},       {"etc.", "et cetera"},
      {"e.g.", "for example"}, {"i.e.", "that is"}, {"a.m.", "a m"},          {"p.m.", "p m"},
      {"A.M.", "a m"},       {"P.M.", "p m"},       {"Inc.", "Incorporated"}, {"Co.", "Company"},
      {"Ltd.", "Limited"},   {"approx.", "approximately"}};
  return k;
}

bool IsLeadPunct(char c) { return c == '"' || c == '\'' || c == '(' || c == '[' || c == '{' || c == '`'; }
bool IsTrailPunct(char c) {
  return c == '"' || c == '\'' || c == ')' || c == ']' || c == '}' || c == '.' || c == ',' || c == ';' ||
         c == ':' || c == '!' || c == '?';
}

// Rewrites one whitespace-free token: URLs, abbreviations, initials and numbers.
std::string RewriteToken(const std::string& tok) {
  if (IsUrlLike(tok)) return std::string(1, kReject);
  size_t b = 0, e = tok.size();
  while (b < e && IsLeadPunct(tok[b])) ++b;
  std::string lead = tok.substr(0, b);
  std::string body = tok.substr(b);
  for (const auto& [abbr, full] : Abbreviations()) {
    if (body.compare(0, abbr.size(), abbr) == 0) {
      std::string rest = body.substr(abbr.size());
      if (std::all_of(rest.begin(), rest.end(), IsTrailPunct)) return lead + full + rest;
    }
  }
  while (e > b && IsTrailPunct(tok[e - 1])) --e;
  std::string core = tok.substr(b, e - b);
  std::string trail = tok.substr(e);
  // Initials and dotted acronyms: "U.S.A." -> "U S A", "J." -> "J".
  static const std::regex kInitials(R"(^([A-Za-z]\.)+[A-Za-z]?$)");
  std::string core_dot = core + (trail.size() && trail[0] == '.' ? "." : "");
  if (std::regex_match(core_dot, kInitials) && core_dot.size() >= 2) {
    std::string out;
    for (char c : core_dot)
      if (c != '.') {
        if (!out.empty()) out += ' ';
        out += c;
      }
    std::string t = trail.size() && trail[0] == '.' ? trail.substr(1) : trail;
    return lead + out + t;
  }
  if (std::any_of(core.begin(), core.end(), [](char c) { return std::isdigit(static_cast<unsigned char>(c)); })) {
    auto words = ExpandNumberCore(core);
    if (!words) return std::string(1, kReject);
    return lead + *words + trail;
  }
  // A dot between two letters (file names, hosts, "Ph.D") is not speakable text.
  for (size_t i = 1; i + 1 < core.size(); ++i)
    if (core[i] == '.' && std::isalnum(static_cast<unsigned char>(core[i - 1])) &&
        std::isalnum(static_cast<unsigned char>(core[i + 1])))
      return std::string(1, kReject);
  return tok;
}

// Normalises a clause into words of [a-z'], or nullopt if it holds anything else.
std::optional<std::vector<std::string>> NormalizeClause(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    if (c >= 'A' && c <= 'Z') {
      out += static_cast<char>(c - 'A' + 'a');
    } else if ((c >= 'a' && c <= 'z') || c == '\'') {
      out += static_cast<char>(c);
    } else if (c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == ',' || c == ':' || c == '"' || c == '(' ||
               c == ')' || c == '[' || c == ']' || c == '-' || c == '/' || c == '`' || c == '.' || c == '!' ||
               c == '?' || c == ';') {
      out += ' ';
    } else if (c == '&') {
      out += " and ";
    } else if (c == 0xE2 && i + 2 < s.size() && static_cast<unsigned char>(s[i + 1]) == 0x80) {
      unsigned char c3 = static_cast<unsigned char>(s[i + 2]);
      if (c3 == 0x98 || c3 == 0x99) out += '\'';                                     // ‘ ’
      else if (c3 == 0x9C || c3 == 0x9D || c3 == 0x93 || c3 == 0x94 || c3 == 0xA6) out += ' ';  // “ ” – — …
      else return std::nullopt;
      i += 2;
    } else {
      return std::nullopt;
    }
  }
  std::vector<std::string> words;
  std::istringstream in(out);
  std::string w;
  while (in >> w) {
    size_t b = w.find_first_not_of('\''), e = w.find_last_not_of('\'');
    if (b == std::string::npos) continue;
    w = w.substr(b, e - b + 1);
    words.push_back(w);
  }
  return words;
}

std::string Join(const std::vector<std::string>& words) {
  std::string out;
  for (const auto& w : words) {
    if (!out.empty()) out += ' ';
    out += w;
  }
  return out;
}

class SentenceCollector {
 public:
  explicit SentenceCollector(int max_words) : max_words_(max_words) {}

  void AddEntry(const std::string& entry) {
    // Drop overstriking ("_\bX"), attribution lines ("-- Author") and split into paragraphs.
    std::string clean;
    for (char c : entry) {
      if (c == '\b') {
        if (!clean.empty()) clean.pop_back();
      } else {
        clean += c;
      }
    }
    std::vector<std::string> lines;
    std::istringstream in(clean);
    std::string line;
    while (std::getline(in, line)) {
      if (!line.empty() && line.back() == '\r') line.pop_back();
      size_t first = line.find_first_not_of(" \t");
      if (first != std::string::npos && line.compare(first, 2, "--") == 0) continue;
      lines.push_back(line);
    }
    std::string para;
    size_t prev_len = 0;
    for (const auto& l : lines) {
      size_t first = l.find_first_not_of(" \t");
      bool blank = first == std::string::npos;
      // A new paragraph at a blank line, an indented line, or after a short line (verse, lists,
      // dialogue): wrapped prose lines are long.
      if (blank || first > 0 || prev_len < 40) {
        AddParagraph(para);
        para.clear();
      }
      if (!blank) {
        if (!para.empty()) para += ' ';
        para += l.substr(first);
      }
      prev_len = blank ? 0 : l.size();
    }
    AddParagraph(para);
  }

  // Deduplicated sentences in a seed-independent pseudo-random order (by text hash).
  std::vector<std::string> Take() {
    std::vector<std::string> v(seen_.begin(), seen_.end());
    std::vector<std::pair<uint64_t, std::string>> keyed;
    keyed.reserve(v.size());
    for (auto& s : v) keyed.emplace_back(static_cast<uint64_t>(TextHash01(s + "#order") * 0x1.0p53), std::move(s));
    std::sort(keyed.begin(), keyed.end());
    std::vector<std::string> out;
    out.reserve(keyed.size());
    for (auto& [h, s] : keyed) out.push_back(std::move(s));
    return out;
  }

 private:
  void AddParagraph(const std::string& para) {
    if (para.empty()) return;
    // Token rewrites; "--" becomes a clause break, other dashes and slashes spaces.
    std::string text;
    std::istringstream in(para);
    std::string tok;
    while (in >> tok) {
      std::string r;
      if (IsUrlLike(tok)) {
        r = std::string(1, kReject);
      } else {
        std::string t2;
        for (size_t i = 0; i < tok.size(); ++i) {
          if (tok[i] == '-' && i + 1 < tok.size() && tok[i + 1] == '-') {
            t2 += " , ";
            while (i + 1 < tok.size() && tok[i + 1] == '-') ++i;
          } else if (tok[i] == '-' || tok[i] == '/') {
            t2 += ' ';
          } else {
            t2 += tok[i];
          }
        }
        std::istringstream in2(t2);
        std::string sub;
        while (in2 >> sub) {
          if (!r.empty()) r += ' ';
          r += RewriteToken(sub);
        }
      }
      if (!text.empty()) text += ' ';
      text += r;
    }
    // Sentences end at . ! ? ; (runs of them).
    std::string cur;
    for (size_t i = 0; i < text.size(); ++i) {
      char c = text[i];
      if (c == '.' || c == '!' || c == '?' || c == ';') {
        while (i + 1 < text.size() && (text[i + 1] == '.' || text[i + 1] == '!' || text[i + 1] == '?' ||
                                       text[i + 1] == ';' || text[i + 1] == '"' || text[i + 1] == '\'' ||
                                       text[i + 1] == ')'))
          ++i;
        AddSentence(cur);
        cur.clear();
      } else {
        cur += c;
      }
    }
    AddSentence(cur);
  }

  void AddSentence(const std::string& s) {
    if (s.find_first_not_of(" \t") == std::string::npos) return;
    // Clauses at , : (and "--", already a comma); merged greedily up to max_words.
    std::vector<std::string> current;
    auto flush = [&] {
      if (static_cast<int>(current.size()) >= 2) seen_.insert(Join(current));
      current.clear();
    };
    size_t start = 0;
    while (start <= s.size()) {
      size_t end = s.find_first_of(",:", start);
      if (end == std::string::npos) end = s.size();
      std::string_view clause(s.data() + start, end - start);
      start = end + 1;
      if (clause.find(kReject) != std::string_view::npos) {
        flush();
        continue;
      }
      auto words = NormalizeClause(clause);
      if (!words) {
        flush();
        continue;
      }
      if (words->empty()) continue;
      if (static_cast<int>(words->size()) > max_words_) {
        flush();
        continue;
      }
      if (static_cast<int>(current.size() + words->size()) > max_words_) flush();
      current.insert(current.end(), words->begin(), words->end());
    }
    flush();
  }

  int max_words_;
  std::unordered_set<std::string> seen_;
};

// Reads every fortune file under dir (not recursing; *.dat, *.u8, ascii-art skipped).
Status LoadSentences(const std::string& dir, int max_words, std::vector<std::string>* out, int* files_read) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return Status::NotFound("text directory " + dir + " does not exist");
  std::vector<fs::path> files;
  for (const auto& de : fs::directory_iterator(dir, ec)) {
    if (!de.is_regular_file()) continue;
    std::string name = de.path().filename().string();
    auto ends = [&](const std::string& suf) {
      return name.size() >= suf.size() && name.compare(name.size() - suf.size(), suf.size(), suf) == 0;
    };
    if (ends(".dat") || ends(".u8") || name == "ascii-art" || name[0] == '.') continue;
    files.push_back(de.path());
  }
  if (ec) return Status::IOError("cannot list " + dir + ": " + ec.message());
  std::sort(files.begin(), files.end());
  SentenceCollector collector(max_words);
  *files_read = 0;
  for (const auto& f : files) {
    std::ifstream in(f, std::ios::binary);
    if (!in) continue;
    ++*files_read;
    std::string entry, line;
    while (std::getline(in, line)) {
      if (line == "%" || line == "%\r") {
        collector.AddEntry(entry);
        entry.clear();
      } else {
        entry += line;
        entry += '\n';
      }
    }
    collector.AddEntry(entry);
  }
  *out = collector.Take();
  return Status::Ok();
}

// Spoken number strings: digit runs, phone-like numbers, cardinals, years, ordinals.
std::string NumberString(Rng& rng) {
  auto digits = [&](int n) {
    std::string d;
    for (int i = 0; i < n; ++i) d += static_cast<char>('0' + UniformInt(rng, 0, 9));
    return d;
  };
  int kind = static_cast<int>(UniformInt(rng, 0, 9));
  switch (kind) {
    case 0:
    case 1:
    case 2: {  // digit run
      return Digits(digits(static_cast<int>(UniformInt(rng, 2, 8))), Uniform01(rng) < 0.3);
    }
    case 3:
    case 4: {  // phone-like: 3 3 4 or 4 3 4 digits
      std::string d = digits(UniformInt(rng, 0, 1) ? 10 : 11);
      return Digits(d, Uniform01(rng) < 0.4);
    }
    case 5:
    case 6: {  // cardinal, with or without "and"
      int mag = static_cast<int>(UniformInt(rng, 2, 7));
      uint64_t hi = 1;
      for (int i = 0; i < mag; ++i) hi *= 10;
      uint64_t n = static_cast<uint64_t>(UniformInt(rng, 10, static_cast<int64_t>(hi) - 1));
      return Cardinal(n, Uniform01(rng) < 0.5);
    }
    case 7: {  // year
      int y = static_cast<int>(UniformInt(rng, 1100, 2099));
      if (y >= 2000 && y < 2010) return Cardinal(y, Uniform01(rng) < 0.5);
      if (y >= 2000 && Uniform01(rng) < 0.5) return Cardinal(y);
      return Year(y);
    }
    case 8: {  // ordinal with a word around it
      static const char* const kLead[] = {"the", "on the", "page", "chapter", "room", "the"};
      int n = static_cast<int>(UniformInt(rng, 1, 120));
      int w = static_cast<int>(UniformInt(rng, 0, 5));
      if (w < 2 || w == 5) return std::string(kLead[w]) + " " + OrdinalOfLastWord(Cardinal(n));
      return std::string(kLead[w]) + " " + Cardinal(n);
    }
    default: {  // several short numbers
      int k = static_cast<int>(UniformInt(rng, 2, 4));
      std::string out;
      for (int i = 0; i < k; ++i) {
        if (!out.empty()) out += ' ';
        out += Cardinal(static_cast<uint64_t>(UniformInt(rng, 0, 99)));
      }
      return out;
    }
  }
}

int WordCount(const std::string& s) {
  int n = 0;
  bool in = false;
  for (char c : s) {
    if (c == ' ') in = false;
    else if (!in) in = true, ++n;
  }
  return n;
}

// ---------------------------------------------------------------------------------------------
// Voices and engines.

enum class Engine { kEspeak, kFlite, kFestival };
const char* const kEngineNames[] = {"espeak", "flite", "festival"};

struct Voice {
  Engine engine;
  std::string label;  // written to the manifest: "en-gb+m3", "kal16"
  std::string load;   // espeak name to load ("en+m3": the en-gb voice loads as "en")
  int flite_index = -1;
  double weight = 1.0;
};

const char* const kEspeakVoices[][2] = {  // {label, name espeak loads it by}
    {"en-us", "en-us"},       {"en-gb", "en"},          {"en-gb-scotland", "en-gb-scotland"},
    {"en-gb-x-rp", "en-gb-x-rp"}, {"en-gb-x-gbclan", "en-gb-x-gbclan"}, {"en-gb-x-gbcwmd", "en-gb-x-gbcwmd"},
    {"en-029", "en-029"},     {"en-us-nyc", "en-us-nyc"}};
const char* const kEspeakVariants[] = {"",   "m1", "m2", "m3", "m4", "m5", "m6", "m7",     "m8",     "f1",
                                       "f2", "f3", "f4", "f5", "klatt", "klatt2", "klatt3", "klatt4"};
const char* const kHeldoutEspeak[] = {"en-gb-scotland+f3", "en-us-nyc+m5"};
const char* const kFliteNames[] = {"kal16", "awb", "rms", "slt"};
const double kFliteWeights[] = {0.45, 0.30, 0.0, 0.25};  // rms is held out
const char* const kHeldoutFlite = "rms";
// Festival voices (Debian: festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts), used
// only with --festival-share > 0. kal and slt are the speakers of flite's kal16 and slt through
// other synthesisers (residual-excited LPC diphones, HTS); ked is a speaker no other engine has.
const char* const kFestivalNames[] = {"kal_diphone", "ked_diphone", "cmu_us_slt_arctic_hts"};
const double kFestivalWeights[] = {0.25, 0.45, 0.30};

struct SynthParams {
  // espeak
  int rate = 175, pitch = 50, range = 50;
  // flite
  double stretch = 1.0, f0_factor = 1.0;
  unsigned int engine_seed = 0;
};

class EspeakEngine {
 public:
  Status Init() {
    int rate = espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, nullptr, espeakINITIALIZE_DONT_EXIT);
    if (rate <= 0) return Status::Unavailable("libespeak-ng failed to initialise (is espeak-ng-data installed?)");
    rate_ = rate;
    espeak_SetSynthCallback(&EspeakEngine::Callback);
    const char* path = nullptr;
    espeak_Info(&path);
    data_path_ = path ? path : "";
    return Status::Ok();
  }
  int rate() const { return rate_; }

  // Checks that every voice loads as itself (espeak keeps the old voice when a name is unknown).
  Status Check(const std::vector<Voice>& voices) {
    for (const auto& v : voices) {
      if (v.engine != Engine::kEspeak) continue;
      size_t plus = v.load.find('+');
      if (plus != std::string::npos) {
        std::string variant = v.load.substr(plus + 1);
        fs::path f = fs::path(data_path_) / "voices" / "!v" / variant;
        if (!fs::exists(f)) return Status::NotFound("espeak-ng variant " + variant + " not found at " + f.string());
      }
      if (espeak_SetVoiceByName(v.load.c_str()) != EE_OK)
        return Status::NotFound("espeak-ng voice " + v.load + " (" + v.label + ") does not load");
    }
    return Status::Ok();
  }

  // Synthesises at the engine rate into *out (float, full scale 1.0).
  Status Synth(const Voice& v, const std::string& text, const SynthParams& p, std::vector<float>* out) {
    if (espeak_SetVoiceByName(v.load.c_str()) != EE_OK) return Status::Unavailable("voice " + v.load);
    espeak_SetParameter(espeakRATE, p.rate, 0);
    espeak_SetParameter(espeakPITCH, p.pitch, 0);
    espeak_SetParameter(espeakRANGE, p.range, 0);
    espeak_SetParameter(espeakVOLUME, 100, 0);
    std::vector<short> pcm;
    srand(p.engine_seed);
    std::string t = text + ".";
    espeak_ERROR e = espeak_Synth(t.c_str(), t.size() + 1, 0, POS_CHARACTER, 0, espeakCHARS_UTF8, nullptr, &pcm);
    if (e != EE_OK) return Status::Unavailable("espeak_Synth returned " + std::to_string(e));
    out->resize(pcm.size());
    for (size_t i = 0; i < pcm.size(); ++i) (*out)[i] = pcm[i] / 32768.0f;
    return Status::Ok();
  }

 private:
  static int Callback(short* wav, int n, espeak_EVENT* events) {
    auto* pcm = static_cast<std::vector<short>*>(events ? events->user_data : nullptr);
    if (pcm && wav && n > 0) pcm->insert(pcm->end(), wav, wav + n);
    return 0;
  }
  int rate_ = 0;
  std::string data_path_;
};

class FliteEngine {
 public:
  Status Init() {
    flite_init();
    voices_[0] = register_cmu_us_kal16(nullptr);
    voices_[1] = register_cmu_us_awb(nullptr);
    voices_[2] = register_cmu_us_rms(nullptr);
    voices_[3] = register_cmu_us_slt(nullptr);
    for (int i = 0; i < 4; ++i) {
      if (!voices_[i]) return Status::Unavailable(std::string("flite voice ") + kFliteNames[i] + " did not register");
      f0_mean_[i] = get_param_float(voices_[i]->features, "int_f0_target_mean", 100.0f);
    }
    return Status::Ok();
  }

  Status Synth(const Voice& v, const std::string& text, const SynthParams& p, std::vector<float>* out, int* rate) {
    cst_voice* cv = voices_[v.flite_index];
    feat_set_float(cv->features, "duration_stretch", static_cast<float>(p.stretch));
    if (v.label == "kal16") {
      feat_set_float(cv->features, "int_f0_target_mean", static_cast<float>(f0_mean_[v.flite_index] * p.f0_factor));
    } else if (v.label != "rms") {
      feat_set_float(cv->features, "f0_shift", static_cast<float>(p.f0_factor));
    }
    srand(p.engine_seed);
    std::string t = text + ".";
    cst_wave* w = flite_text_to_wave(t.c_str(), cv);
    if (!w) return Status::Unavailable("flite_text_to_wave failed");
    if (w->num_channels != 1) {
      delete_wave(w);
      return Status::Unavailable("flite returned " + std::to_string(w->num_channels) + " channels");
    }
    *rate = w->sample_rate;
    out->resize(w->num_samples);
    for (int i = 0; i < w->num_samples; ++i) (*out)[i] = w->samples[i] / 32768.0f;
    delete_wave(w);
    return Status::Ok();
  }

 private:
  cst_voice* voices_[4] = {};
  float f0_mean_[4] = {};
};

// One `festival --pipe` child for the run. A request is a few Scheme forms on its stdin; the
// child writes a marker line to its stderr (unbuffered) when they are done, so every error line it
// printed for the request comes before the marker. The wave goes through a file in the output
// directory. Festival's synthesis has no random element: the same text and settings give the same
// samples.
class FestivalEngine {
 public:
  FestivalEngine() = default;
  FestivalEngine(const FestivalEngine&) = delete;
  FestivalEngine& operator=(const FestivalEngine&) = delete;
  ~FestivalEngine() { Stop(); }

  Status Init(const std::string& wav_path) {
    wav_path_ = wav_path;
    signal(SIGPIPE, SIG_IGN);  // a festival that died shows up as a failed write, not a dead run
    int in[2], err[2];
    if (pipe2(in, O_CLOEXEC) != 0) return Status::IOError(std::string("pipe: ") + std::strerror(errno));
    if (pipe2(err, O_CLOEXEC) != 0) {
      close(in[0]), close(in[1]);
      return Status::IOError(std::string("pipe: ") + std::strerror(errno));
    }
    pid_ = fork();
    if (pid_ < 0) {
      for (int fd : {in[0], in[1], err[0], err[1]}) close(fd);
      return Status::IOError(std::string("fork: ") + std::strerror(errno));
    }
    if (pid_ == 0) {
      dup2(in[0], 0);
      dup2(err[1], 2);
      int devnull = open("/dev/null", O_WRONLY);
      if (devnull >= 0) dup2(devnull, 1);
      execlp("festival", "festival", "--pipe", static_cast<char*>(nullptr));
      dprintf(2, "asr-synth-exec-failed %s\n", std::strerror(errno));
      _exit(127);
    }
    close(in[0]);
    close(err[1]);
    to_ = fdopen(in[1], "w");
    from_ = fdopen(err[0], "r");
    if (!to_ || !from_) return Status::IOError("fdopen failed");
    std::vector<std::string> lines;
    Status st = Request("(define (asrf-say txt out) (utt.save.wave (utt.synth (eval (list 'Utterance 'Text txt))) out 'riff))",
                        &lines);
    for (const auto& l : lines)
      if (l.rfind("asr-synth-exec-failed", 0) == 0)
        return Status::NotFound("cannot run festival (" + l.substr(22) +
                                "); Debian: apt-get install festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts");
    if (!st.ok()) return st;
    for (const char* v : kFestivalNames) {
      ASRF_RETURN_IF_ERROR(Request(std::string("(voice_") + v + ")", &lines));
      if (!lines.empty())
        return Status::NotFound(std::string("festival voice ") + v + " does not load (" + lines.front() +
                                "); Debian: festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts");
    }
    current_.clear();
    return Status::Ok();
  }

  Status Synth(const Voice& v, const std::string& text, const SynthParams& p, std::vector<float>* out, int* rate) {
    if (text.find_first_of("\"\\") != std::string::npos) return Status::Invalid("text holds a quote or backslash");
    std::string req;
    if (current_ != v.label) req += "(voice_" + v.label + ")\n";
    char buf[64];
    std::snprintf(buf, sizeof buf, "(Parameter.set 'Duration_Stretch %.4f)\n", p.stretch);
    req += buf;
    req += "(asrf-say \"" + text + ".\" \"" + wav_path_ + "\")";
    std::error_code ec;
    fs::remove(wav_path_, ec);
    std::vector<std::string> lines;
    ASRF_RETURN_IF_ERROR(Request(req, &lines));
    current_ = v.label;
    // Anything festival printed is a failure: e.g. a diphone voice lacking a diphone says "UniSyn:
    // using default diphone pau-pau for ae-ax" and puts silence there, so the audio would no longer
    // say the text (about 0.3% of sentences for ked_diphone). The caller retries another sentence.
    if (!lines.empty()) return Status::Unavailable("festival: " + lines.front());
    SF_INFO info{};
    SNDFILE* f = sf_open(wav_path_.c_str(), SFM_READ, &info);
    if (!f) return Status::Unavailable("festival wrote no readable wave: " + std::string(sf_strerror(nullptr)));
    if (info.channels != 1) {
      sf_close(f);
      return Status::Unavailable("festival returned " + std::to_string(info.channels) + " channels");
    }
    out->resize(static_cast<size_t>(info.frames));
    sf_count_t n = sf_read_float(f, out->data(), info.frames);
    sf_close(f);
    out->resize(static_cast<size_t>(std::max<sf_count_t>(n, 0)));
    *rate = info.samplerate;
    return Status::Ok();
  }

  // True once the child has gone: every later request would fail too.
  bool exited() const { return exited_; }

  void Stop() {
    if (to_) fclose(to_), to_ = nullptr;
    if (from_) fclose(from_), from_ = nullptr;
    if (pid_ > 0) {
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == 0) {
        kill(pid_, SIGTERM);
        waitpid(pid_, &status, 0);
      }
      pid_ = -1;
    }
    if (!wav_path_.empty()) {
      std::error_code ec;
      fs::remove(wav_path_, ec);
    }
  }

 private:
  // Sends the forms and a marker, and collects what festival printed before the marker (or, when
  // it has exited, everything it printed).
  Status Request(const std::string& forms, std::vector<std::string>* lines) {
    lines->clear();
    std::string marker = "asr-synth-done " + std::to_string(++serial_);
    std::string msg = forms + "\n(format stderr \"" + marker + "\\n\")\n";
    // A failed write means the child is gone: its stderr then runs to EOF below.
    bool wrote = std::fwrite(msg.data(), 1, msg.size(), to_) == msg.size() && std::fflush(to_) == 0;
    char* line = nullptr;
    size_t cap = 0;
    bool done = false;
    for (ssize_t len; (len = getline(&line, &cap, from_)) >= 0;) {
      std::string l(line, static_cast<size_t>(len));
      while (!l.empty() && (l.back() == '\n' || l.back() == '\r')) l.pop_back();
      if (wrote && l == marker) {
        done = true;
        break;
      }
      if (!l.empty()) lines->push_back(l);
    }
    free(line);
    if (done) return Status::Ok();
    exited_ = true;
    return Status::Unavailable("festival exited" + (lines->empty() ? std::string() : ": " + lines->front()));
  }

  bool exited_ = false;
  pid_t pid_ = -1;
  FILE* to_ = nullptr;
  FILE* from_ = nullptr;
  std::string wav_path_, current_;
  uint64_t serial_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Audio.

Status Resample(const std::vector<float>& in, double in_rate, double out_rate, std::vector<float>* out) {
  if (in.empty()) {
    out->clear();
    return Status::Ok();
  }
  size_t olen = static_cast<size_t>(std::ceil(in.size() * out_rate / in_rate)) + 64;
  out->assign(olen, 0.0f);
  size_t odone = 0;
  soxr_io_spec_t io = soxr_io_spec(SOXR_FLOAT32_I, SOXR_FLOAT32_I);
  soxr_quality_spec_t q = soxr_quality_spec(SOXR_HQ, 0);
  soxr_runtime_spec_t rt = soxr_runtime_spec(1);
  soxr_error_t err =
      soxr_oneshot(in_rate, out_rate, 1, in.data(), in.size(), nullptr, out->data(), olen, &odone, &io, &q, &rt);
  if (err) return Status::Unavailable(std::string("soxr: ") + err);
  out->resize(odone);
  return Status::Ok();
}

// Trims leading and trailing engine silence (below -40 dB of the peak), keeping 20 ms.
void Trim(std::vector<float>* x) {
  float peak = 0;
  for (float v : *x) peak = std::max(peak, std::fabs(v));
  if (peak <= 0) {
    x->clear();
    return;
  }
  float thr = peak * 0.01f;
  size_t b = 0, e = x->size();
  while (b < e && std::fabs((*x)[b]) < thr) ++b;
  while (e > b && std::fabs((*x)[e - 1]) < thr) --e;
  size_t margin = kRate / 50;
  b = b > margin ? b - margin : 0;
  e = std::min(x->size(), e + margin);
  *x = std::vector<float>(x->begin() + b, x->begin() + e);
}

double Rms(const std::vector<float>& x, size_t b, size_t e) {
  double s = 0;
  for (size_t i = b; i < e; ++i) s += static_cast<double>(x[i]) * x[i];
  return e > b ? std::sqrt(s / (e - b)) : 0.0;
}

enum class Noise { kNone, kWhite, kPink, kBrown };
const char* NoiseName(Noise n) {
  switch (n) {
    case Noise::kWhite: return "white";
    case Noise::kPink: return "pink";
    case Noise::kBrown: return "brown";
    default: return "none";
  }
}

// Unit-RMS coloured noise.
std::vector<float> MakeNoise(Noise kind, size_t n, Rng& rng) {
  std::vector<float> out(n);
  Gauss g;
  double b0 = 0, b1 = 0, b2 = 0, b3 = 0, b4 = 0, b5 = 0, b6 = 0, brown = 0;
  for (size_t i = 0; i < n; ++i) {
    double w = g(rng);
    double v = w;
    if (kind == Noise::kPink) {  // Paul Kellet's pink filter
      b0 = 0.99886 * b0 + w * 0.0555179;
      b1 = 0.99332 * b1 + w * 0.0750759;
      b2 = 0.96900 * b2 + w * 0.1538520;
      b3 = 0.86650 * b3 + w * 0.3104856;
      b4 = 0.55000 * b4 + w * 0.5329522;
      b5 = -0.7616 * b5 - w * 0.0168980;
      v = b0 + b1 + b2 + b3 + b4 + b5 + b6 + w * 0.5362;
      b6 = w * 0.115926;
    } else if (kind == Noise::kBrown) {  // leaky integrator
      brown = 0.995 * brown + 0.1 * w;
      v = brown;
    }
    out[i] = static_cast<float>(v);
  }
  double mean = 0;
  for (float v : out) mean += v;
  mean /= std::max<size_t>(n, 1);
  double s = 0;
  for (auto& v : out) {
    v = static_cast<float>(v - mean);
    s += static_cast<double>(v) * v;
  }
  double rms = std::sqrt(s / std::max<size_t>(n, 1));
  if (rms > 0)
    for (auto& v : out) v = static_cast<float>(v / rms);
  return out;
}

Status WriteWav(const std::string& path, const std::vector<int16_t>& pcm) {
  SF_INFO info{};
  info.samplerate = kRate;
  info.channels = 1;
  info.format = SF_FORMAT_WAV | SF_FORMAT_PCM_16;
  std::string tmp = path + ".part";
  SNDFILE* f = sf_open(tmp.c_str(), SFM_WRITE, &info);
  if (!f) return Status::IOError("cannot write " + tmp + ": " + sf_strerror(nullptr));
  sf_count_t n = sf_write_short(f, pcm.data(), static_cast<sf_count_t>(pcm.size()));
  int cerr = sf_close(f);
  if (n != static_cast<sf_count_t>(pcm.size()) || cerr != 0) return Status::IOError("short write to " + tmp);
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) return Status::IOError("cannot rename " + tmp + ": " + ec.message());
  return Status::Ok();
}

Status WriteFileAtomic(const std::string& path, const std::string& body) {
  std::string tmp = path + ".part";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) return Status::IOError("cannot write " + tmp);
    out << body;
    out.flush();
    if (!out) return Status::IOError("write to " + tmp + " failed");
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) return Status::IOError("cannot rename " + tmp + ": " + ec.message());
  return Status::Ok();
}

std::string Fixed(double v, int decimals) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", decimals, v);
  return buf;
}

std::string JsonString(std::string_view s) {
  std::string out = "\"";
  AppendJsonEscaped(&out, s);
  out += '"';
  return out;
}

// ---------------------------------------------------------------------------------------------
// The run.

struct Options {
  std::string out = "synth-out";
  int64_t utterances = 1000;
  uint64_t seed = 1;
  double valid_fraction = 0.05;
  double valid_sentences = 0.05;
  double heldout_fraction = 0.03;
  double noise_fraction = 0.4;
  double min_snr_db = 12;
  double max_snr_db = 35;
  double numbers_fraction = 0.15;
  int max_words = 20;
  std::string text_dir = "/usr/share/games/fortunes";
  int shard = 0;
  int shards = 1;
  double espeak_share = 0.5;
  double festival_share = 0.0;
  double single_word_fraction = 0.0;
  bool list_sentences = false;
};

enum Split { kTrain = 0, kValid = 1, kHeldout = 2 };
const char* const kSplitNames[] = {"train", "valid", "valid_heldout"};

struct Tally {
  int64_t n = 0;
  double seconds = 0;
  void Add(double s) {
    ++n;
    seconds += s;
  }
};

struct Stats {
  Tally splits[3];
  Tally engines[3];
  std::map<std::string, Tally> voices;
  int64_t numbers = 0;
  std::map<std::string, int64_t> noise;
  int64_t failed_synthesis = 0, too_short = 0, too_long = 0, lost = 0;
  // Timing (stderr only: not part of the deterministic outputs).
  double engine_seconds[3] = {0, 0, 0};
  int64_t engine_calls[3] = {0, 0, 0};
  std::map<std::string, std::pair<int64_t, double>> voice_calls;  // flite/festival voice -> calls, seconds
};

struct Pool {
  std::vector<const std::string*> items;
  uint64_t mul = 1, add = 0;
  void SetPermutation(uint64_t seed, uint64_t salt) {
    uint64_t n = items.size();
    if (n <= 1) return;
    mul = 1 + SplitMix64(seed ^ salt) % (n - 1);
    while (std::gcd(mul, n) != 1) mul = mul % (n - 1) + 1;
    add = SplitMix64(seed ^ salt ^ 0x5555) % n;
  }
  // A bijection of the index onto the pool (per cycle), stepping on k for retries.
  const std::string& Pick(uint64_t index, int k) const {
    uint64_t n = items.size();
    uint64_t pos = static_cast<uint64_t>((static_cast<unsigned __int128>(mul) * (index % n) + add + k) % n);
    return *items[pos];
  }
};

class Synthesizer {
 public:
  explicit Synthesizer(const Options& o) : o_(o) {}

  int Run() {
    using Clock = std::chrono::steady_clock;
    auto t_start = Clock::now();
    if (o_.list_sentences) {  // "train<TAB>text" / "valid<TAB>text", in pool order; writes no files
      int files = 0;
      std::vector<std::string> sentences;
      Status st = LoadSentences(o_.text_dir, o_.max_words, &sentences, &files);
      if (!st.ok()) return Fail(st.message());
      std::string listing;
      for (const auto& s : sentences)
        listing += std::string(TextHash01(s) < o_.valid_sentences ? "valid\t" : "train\t") + s + "\n";
      std::cout << listing << std::flush;
      return sentences.empty() ? Fail("no usable sentences found in " + o_.text_dir) : 0;
    }
    // Output directory first: a bad --out fails before any slow work.
    std::error_code ec;
    fs::path out = fs::absolute(o_.out, ec).lexically_normal();
    if (ec) return Fail("cannot resolve --out " + o_.out + ": " + ec.message());
    std::string out_s = out.string();
    while (out_s.size() > 1 && out_s.back() == '/') out_s.pop_back();
    out_dir_ = out_s;
    fs::create_directories(out_dir_ + "/wav", ec);
    if (ec || !fs::is_directory(out_dir_ + "/wav"))
      return Fail("cannot create output directory " + out_dir_ + "/wav: " + (ec ? ec.message() : "not a directory"));
    {
      std::string probe = out_dir_ + "/.asr-synth-write-test." + std::to_string(o_.shard);
      std::ofstream p(probe);
      if (!p) return Fail("cannot write to output directory " + out_dir_);
      p.close();
      fs::remove(probe, ec);
    }

    int files = 0;
    std::vector<std::string> sentences;
    Status st = LoadSentences(o_.text_dir, o_.max_words, &sentences, &files);
    if (!st.ok()) return Fail(st.message());
    if (sentences.empty()) return Fail("no usable sentences found in " + o_.text_dir + " (" + std::to_string(files) +
                                       " text files read)");
    for (const auto& s : sentences) {
      (TextHash01(s) < o_.valid_sentences ? valid_pool_ : train_pool_).items.push_back(&s);
    }
    train_pool_.SetPermutation(o_.seed, 0x7261696eull);
    valid_pool_.SetPermutation(o_.seed, 0x76616c69ull);
    LogInfo("synth_sentences")
        .Kv("files", files)
        .Kv("sentences", static_cast<int64_t>(sentences.size()))
        .Kv("train", static_cast<int64_t>(train_pool_.items.size()))
        .Kv("valid", static_cast<int64_t>(valid_pool_.items.size()));
    if (train_pool_.items.empty() && o_.valid_fraction + o_.heldout_fraction < 1.0)
      return Fail("no training sentences: every sentence fell into the validation split (lower --valid-sentences)");
    if (valid_pool_.items.empty() && (o_.valid_fraction > 0 || o_.heldout_fraction > 0))
      return Fail("no validation sentences: raise --valid-sentences or use a larger --text-dir");

    BuildVoices();
    if (Status s = espeak_.Init(); !s.ok()) return Fail(s.message());
    if (Status s = espeak_.Check(train_espeak_); !s.ok()) return Fail(s.message());
    if (Status s = espeak_.Check(heldout_espeak_); !s.ok()) return Fail(s.message());
    if (Status s = flite_.Init(); !s.ok()) return Fail(s.message());
    if (o_.festival_share > 0) {
      if (Status s = festival_.Init(out_dir_ + "/wav/.festival." + std::to_string(o_.shard) + ".wav"); !s.ok())
        return Fail(s.message());
    }

    std::string manifests[3];
    int64_t mine = 0;
    for (int64_t i = o_.shard; i < o_.utterances; i += o_.shards) ++mine;
    int64_t done = 0;
    auto t_loop = Clock::now();
    for (int64_t i = o_.shard; i < o_.utterances; i += o_.shards) {
      Status s = One(static_cast<uint64_t>(i), manifests);
      if (!s.ok()) return Fail(s.message());
      ++done;
      if (done % 500 == 0 || done == mine) {
        double el = std::chrono::duration<double>(Clock::now() - t_loop).count();
        LogInfo("synth_progress")
            .Kv("done", done)
            .Kv("of", mine)
            .Kv("utt_per_s", el > 0 ? done / el : 0.0)
            .Kv("hours", (stats_.splits[0].seconds + stats_.splits[1].seconds + stats_.splits[2].seconds) / 3600);
      }
    }

    std::string suffix = o_.shards > 1 ? "." + std::to_string(o_.shard) : "";
    for (int sp = 0; sp < 3; ++sp) {
      Status s = WriteFileAtomic(out_dir_ + "/" + kSplitNames[sp] + suffix + ".jsonl", manifests[sp]);
      if (!s.ok()) return Fail(s.message());
    }
    Status s = WriteFileAtomic(out_dir_ + "/summary" + suffix + ".json",
                               SummaryJson(mine, files, sentences.size()));
    if (!s.ok()) return Fail(s.message());

    double total = std::chrono::duration<double>(Clock::now() - t_start).count();
    auto rate = [&](int e) {
      return stats_.engine_seconds[e] > 0 ? stats_.engine_calls[e] / stats_.engine_seconds[e] : 0.0;
    };
    LogInfo("synth_done")
        .Kv("utterances", stats_.splits[0].n + stats_.splits[1].n + stats_.splits[2].n)
        .Kv("train", stats_.splits[0].n)
        .Kv("valid", stats_.splits[1].n)
        .Kv("valid_heldout", stats_.splits[2].n)
        .Kv("hours", (stats_.splits[0].seconds + stats_.splits[1].seconds + stats_.splits[2].seconds) / 3600)
        .Kv("skipped", stats_.failed_synthesis + stats_.too_short + stats_.too_long)
        .Kv("lost", stats_.lost)
        .Kv("espeak_utt_per_s", rate(0))
        .Kv("flite_utt_per_s", rate(1))
        .Kv("espeak_calls", stats_.engine_calls[0])
        .Kv("flite_calls", stats_.engine_calls[1])
        .Kv("festival_utt_per_s", rate(2))
        .Kv("festival_calls", stats_.engine_calls[2])
        .Kv("seconds", total)
        .Kv("out", out_dir_);
    for (const auto& [label, vc] : stats_.voice_calls)
      LogInfo("synth_engine_voice")
          .Kv("voice", label)
          .Kv("calls", vc.first)
          .Kv("utt_per_s", vc.second > 0 ? vc.first / vc.second : 0.0);
    return 0;
  }

 private:
  int Fail(const std::string& msg) {
    std::cerr << "asr-synth: error: " << msg << "\n";
    return 1;
  }

  void BuildVoices() {
    std::set<std::string> held(std::begin(kHeldoutEspeak), std::end(kHeldoutEspeak));
    for (const auto& vv : kEspeakVoices) {
      for (const char* var : kEspeakVariants) {
        Voice v{Engine::kEspeak, vv[0], vv[1]};
        if (*var) {
          v.label += std::string("+") + var;
          v.load += std::string("+") + var;
        }
        (held.count(v.label) ? heldout_espeak_ : train_espeak_).push_back(v);
      }
    }
    for (int i = 0; i < 4; ++i) {
      Voice v{Engine::kFlite, kFliteNames[i], "", i, kFliteWeights[i]};
      if (v.label == kHeldoutFlite) {
        v.weight = 1.0;
        heldout_flite_.push_back(v);
      } else {
        train_flite_.push_back(v);
      }
    }
    for (int i = 0; i < 3; ++i) train_festival_.push_back(Voice{Engine::kFestival, kFestivalNames[i], "", -1, kFestivalWeights[i]});
  }

  static const Voice& PickVoice(const std::vector<Voice>& vs, Rng& rng) {
    double total = 0;
    for (const auto& v : vs) total += v.weight;
    double u = Uniform01(rng) * total;
    for (const auto& v : vs) {
      if (u < v.weight) return v;
      u -= v.weight;
    }
    return vs.back();
  }

  Status One(uint64_t index, std::string* manifests) {
    Rng rng(o_.seed ^ ((index + 1) * 0x9E3779B97F4A7C15ull));
    // Every draw happens up front, in a fixed order, whatever the outcome.
    double u = Uniform01(rng);
    Split split = u < o_.heldout_fraction ? kHeldout : (u < o_.heldout_fraction + o_.valid_fraction ? kValid : kTrain);
    bool numbers = Uniform01(rng) < o_.numbers_fraction;
    Engine engine = Uniform01(rng) < o_.espeak_share ? Engine::kEspeak : Engine::kFlite;
    // Festival has no held-out voice: a held-out utterance keeps its espeak/flite draw. (No draw at
    // all when the share is 0, so such runs are byte-identical to runs without Festival.)
    if (o_.festival_share > 0 && Uniform01(rng) < o_.festival_share && split != kHeldout) engine = Engine::kFestival;
    const std::vector<Voice>& voices =
        engine == Engine::kFestival ? train_festival_
        : split == kHeldout         ? (engine == Engine::kEspeak ? heldout_espeak_ : heldout_flite_)
                                    : (engine == Engine::kEspeak ? train_espeak_ : train_flite_);
    const Voice& voice = PickVoice(voices, rng);
    SynthParams p;
    p.rate = static_cast<int>(UniformInt(rng, 130, 200));
    p.pitch = static_cast<int>(UniformInt(rng, 20, 80));
    p.range = static_cast<int>(UniformInt(rng, 30, 70));
    p.stretch = Uniform(rng, 0.8, 1.25);
    p.f0_factor = std::exp(Uniform(rng, std::log(0.8), std::log(1.25)));
    double speed = Uniform(rng, 0.9, 1.1);  // rms and festival voices
    double lead_s = Uniform(rng, 0.05, 0.30), trail_s = Uniform(rng, 0.05, 0.30);
    double gain_db = Uniform(rng, -6, 6);
    Noise noise = Noise::kNone;
    if (Uniform01(rng) < o_.noise_fraction) noise = static_cast<Noise>(1 + UniformInt(rng, 0, 2));
    double snr_db = Uniform(rng, o_.min_snr_db, o_.max_snr_db);
    uint64_t audio_seed = rng();
    // One word said alone (a name, a command, a short answer): drawn last and only when asked for,
    // so runs without it stay byte-identical.
    bool single_word = o_.single_word_fraction > 0 && Uniform01(rng) < o_.single_word_fraction;
    uint64_t word_pick = single_word ? rng() : 0;

    const Pool& pool = split == kTrain ? train_pool_ : valid_pool_;
    bool want_valid = split != kTrain;
    for (int attempt = 0; attempt < kMaxAttempts; ++attempt) {
      std::string text;
      if (numbers) {
        for (int tries = 0; tries < 10000; ++tries) {
          std::string t = NumberString(rng);
          if (WordCount(t) < 2 || WordCount(t) > std::max(o_.max_words, 2)) continue;
          if ((TextHash01(t) < o_.valid_sentences) == want_valid) {
            text = t;
            break;
          }
        }
      }
      if (text.empty()) {
        if (pool.items.empty())
          return Status::Invalid(std::string("no sentences for the ") + kSplitNames[split] + " split");
        text = pool.Pick(index, attempt);
      }
      if (single_word) {
        std::vector<std::string> words;
        std::istringstream in(text);
        for (std::string w; in >> w;) words.push_back(w);
        if (!words.empty()) text = words[(word_pick + static_cast<uint64_t>(attempt)) % words.size()];
      }
      p.engine_seed = static_cast<unsigned int>(SplitMix64(audio_seed + attempt));

      std::vector<float> raw, speech;
      int raw_rate = 0;
      auto t0 = std::chrono::steady_clock::now();
      Status st;
      if (engine == Engine::kEspeak) {
        st = espeak_.Synth(voice, text, p, &raw);
        raw_rate = espeak_.rate();
      } else if (engine == Engine::kFlite) {
        st = flite_.Synth(voice, text, p, &raw, &raw_rate);
      } else {
        st = festival_.Synth(voice, text, p, &raw, &raw_rate);
      }
      // rms and the festival voices take no F0 setting: a speed change of 0.9-1.1 moves their pitch.
      double in_rate = raw_rate;
      if (st.ok() && (voice.label == kHeldoutFlite || engine == Engine::kFestival)) in_rate = raw_rate * speed;
      if (st.ok() && raw_rate > 0) {
        if (in_rate != kRate) st = Resample(raw, in_rate, kRate, &speech);
        else speech = std::move(raw);
      }
      int e = static_cast<int>(engine);
      stats_.engine_seconds[e] += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      ++stats_.engine_calls[e];
      if (engine != Engine::kEspeak) {
        auto& vc = stats_.voice_calls[voice.label];
        ++vc.first;
        vc.second += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      }
      // A dead festival is not one bad sentence: stop rather than lose every later Festival utterance.
      if (!st.ok() && engine == Engine::kFestival && festival_.exited()) return st;
      if (!st.ok() || raw_rate <= 0) {
        ++stats_.failed_synthesis;
        continue;
      }
      Trim(&speech);
      double speech_s = static_cast<double>(speech.size()) / kRate;
      size_t lead = static_cast<size_t>(std::lround(lead_s * kRate));
      size_t trail = static_cast<size_t>(std::lround(trail_s * kRate));
      double total_s = static_cast<double>(speech.size() + lead + trail) / kRate;
      if (speech_s < kMinSpeechSeconds) {
        ++stats_.too_short;
        continue;
      }
      if (total_s > kMaxSeconds) {
        ++stats_.too_long;
        continue;
      }

      std::vector<int16_t> pcm = Augment(speech, lead, trail, gain_db, noise, snr_db, audio_seed);
      char name[32];
      std::snprintf(name, sizeof name, "%08llu.wav", static_cast<unsigned long long>(index));
      std::string path = out_dir_ + "/wav/" + name;
      ASRF_RETURN_IF_ERROR(WriteWav(path, pcm));

      double dur = static_cast<double>(pcm.size()) / kRate;
      std::string line = "{\"audio\": " + JsonString(path) + ", \"text\": " + JsonString(text) +
                         ", \"duration\": " + Fixed(dur, 3) + ", \"voice\": " + JsonString(voice.label) +
                         ", \"engine\": " + JsonString(kEngineNames[e]) + "}\n";
      manifests[split] += line;
      stats_.splits[split].Add(dur);
      stats_.engines[e].Add(dur);
      stats_.voices[std::string(kEngineNames[e]) + ":" + voice.label].Add(dur);
      if (numbers) ++stats_.numbers;
      ++stats_.noise[NoiseName(noise)];
      return Status::Ok();
    }
    ++stats_.lost;
    LogWarn("synth_lost").Kv("index", index).Kv("voice", voice.label);
    return Status::Ok();
  }

  std::vector<int16_t> Augment(const std::vector<float>& speech, size_t lead, size_t trail, double gain_db,
                               Noise noise, double snr_db, uint64_t audio_seed) {
    Rng rng(SplitMix64(audio_seed ^ 0xA0D10ull));
    double rms = Rms(speech, 0, speech.size());
    double level = rms > 0 ? std::pow(10.0, kTargetRmsDbfs / 20) / rms : 1.0;
    std::vector<float> x(lead + speech.size() + trail, 0.0f);
    for (size_t i = 0; i < speech.size(); ++i) x[lead + i] = static_cast<float>(speech[i] * level);
    if (noise != Noise::kNone) {
      double speech_rms = std::pow(10.0, kTargetRmsDbfs / 20);
      double noise_rms = speech_rms / std::pow(10.0, snr_db / 20);
      std::vector<float> nz = MakeNoise(noise, x.size(), rng);
      for (size_t i = 0; i < x.size(); ++i) x[i] += static_cast<float>(nz[i] * noise_rms);
    }
    double g = std::pow(10.0, gain_db / 20);
    float peak = 0;
    for (float v : x) peak = std::max(peak, std::fabs(v));
    if (peak * g > kPeakLimit) g = kPeakLimit / peak;
    std::vector<int16_t> pcm(x.size());
    for (size_t i = 0; i < x.size(); ++i) {
      double dither = Uniform01(rng) - Uniform01(rng);  // TPDF, +-1 LSB
      double v = std::round(x[i] * g * 32767.0 + dither);
      pcm[i] = static_cast<int16_t>(std::clamp(v, -32767.0, 32767.0));
    }
    return pcm;
  }

  std::string SummaryJson(int64_t mine, int files, size_t sentences) const {
    auto tally = [](const Tally& t) {
      return "{\"utterances\": " + std::to_string(t.n) + ", \"hours\": " + Fixed(t.seconds / 3600, 4) + "}";
    };
    int64_t n = stats_.splits[0].n + stats_.splits[1].n + stats_.splits[2].n;
    double secs = stats_.splits[0].seconds + stats_.splits[1].seconds + stats_.splits[2].seconds;
    std::string j = "{\n";
    j += "  \"seed\": " + std::to_string(o_.seed) + ",\n";
    j += "  \"shard\": " + std::to_string(o_.shard) + ",\n";
    j += "  \"shards\": " + std::to_string(o_.shards) + ",\n";
    j += "  \"utterances_requested\": " + std::to_string(mine) + ",\n";
    j += "  \"utterances\": " + std::to_string(n) + ",\n";
    j += "  \"hours\": " + Fixed(secs / 3600, 4) + ",\n";
    j += "  \"mean_duration\": " + Fixed(n ? secs / n : 0, 3) + ",\n";
    j += "  \"splits\": {";
    for (int s = 0; s < 3; ++s)
      j += std::string(s ? ", " : "") + JsonString(kSplitNames[s]) + ": " + tally(stats_.splits[s]);
    j += "},\n";
    j += "  \"engines\": {\"espeak\": " + tally(stats_.engines[0]) + ", \"flite\": " + tally(stats_.engines[1]) +
         (o_.festival_share > 0 ? ", \"festival\": " + tally(stats_.engines[2]) : std::string()) + "},\n";
    j += "  \"voices\": {";
    bool first = true;
    for (const auto& [name, t] : stats_.voices) {
      j += std::string(first ? "\n    " : ",\n    ") + JsonString(name) + ": " + std::to_string(t.n);
      first = false;
    }
    j += "\n  },\n";
    j += "  \"number_utterances\": " + std::to_string(stats_.numbers) + ",\n";
    j += "  \"noise\": {";
    first = true;
    for (const auto& [name, c] : stats_.noise) {
      j += std::string(first ? "" : ", ") + JsonString(name) + ": " + std::to_string(c);
      first = false;
    }
    j += "},\n";
    j += "  \"skipped\": {\"synthesis_failed\": " + std::to_string(stats_.failed_synthesis) +
         ", \"too_short\": " + std::to_string(stats_.too_short) + ", \"too_long\": " + std::to_string(stats_.too_long) +
         ", \"lost_utterances\": " + std::to_string(stats_.lost) + "},\n";
    j += "  \"text\": {\"dir\": " + JsonString(o_.text_dir) + ", \"files\": " + std::to_string(files) +
         ", \"sentences\": " + std::to_string(sentences) + ", \"train_sentences\": " +
         std::to_string(train_pool_.items.size()) + ", \"valid_sentences\": " +
         std::to_string(valid_pool_.items.size()) + "},\n";
    j += "  \"valid_split\": \"seed-independent hash of the normalized text below valid_sentences\",\n";
    j += "  \"heldout_voices\": [";
    first = true;
    for (const auto* list : {&heldout_espeak_, &heldout_flite_})
      for (const auto& v : *list) {
        j += std::string(first ? "" : ", ") +
             JsonString((v.engine == Engine::kEspeak ? "espeak:" : "flite:") + v.label);
        first = false;
      }
    j += "],\n";
    j += "  \"options\": {\"utterances\": " + std::to_string(o_.utterances) +
         ", \"valid_fraction\": " + Fixed(o_.valid_fraction, 6) +
         ", \"valid_sentences\": " + Fixed(o_.valid_sentences, 6) +
         ", \"heldout_fraction\": " + Fixed(o_.heldout_fraction, 6) +
         ", \"noise_fraction\": " + Fixed(o_.noise_fraction, 6) + ", \"min_snr_db\": " + Fixed(o_.min_snr_db, 3) +
         ", \"max_snr_db\": " + Fixed(o_.max_snr_db, 3) + ", \"numbers_fraction\": " + Fixed(o_.numbers_fraction, 6) +
         ", \"max_words\": " + std::to_string(o_.max_words) + ", \"espeak_share\": " + Fixed(o_.espeak_share, 6) +
         (o_.festival_share > 0 ? ", \"festival_share\": " + Fixed(o_.festival_share, 6) : std::string()) +
         (o_.single_word_fraction > 0 ? ", \"single_word_fraction\": " + Fixed(o_.single_word_fraction, 6)
                                      : std::string()) +
         "}\n";
    j += "}\n";
    return j;
  }

  const Options& o_;
  std::string out_dir_;
  Pool train_pool_, valid_pool_;
  std::vector<Voice> train_espeak_, heldout_espeak_, train_flite_, heldout_flite_, train_festival_;
  EspeakEngine espeak_;
  FliteEngine flite_;
  FestivalEngine festival_;
  Stats stats_;
};

}  // namespace
}  // namespace asrf::synth

int main(int argc, char** argv) {
  using namespace asrf;
  using asrf::synth::Options;
  SetLogProcessName("asr-synth");
  Options o;
  po::options_description desc("asr-synth options");
  desc.add_options()
      ("out", po::value(&o.out)->default_value(o.out), "output directory (created; wav/ and manifests go there)")
      ("utterances", po::value(&o.utterances)->default_value(o.utterances),
       "number of utterance indices (0..N-1) over all shards")
      ("seed", po::value(&o.seed)->default_value(o.seed), "random seed: same arguments give byte-identical output")
      ("valid-fraction", po::value(&o.valid_fraction)->default_value(o.valid_fraction, "0.05"),
       "share of utterances in valid.jsonl (validation sentences spoken by training voices)")
      ("valid-sentences", po::value(&o.valid_sentences)->default_value(o.valid_sentences, "0.05"),
       "share of sentence texts in the validation split, by a seed-independent text hash; keep it the same "
       "for every corpus a model trains or is measured on, or one corpus's validation sentences are "
       "another's training sentences (raise it only for a small --text-dir of your own)")
      ("heldout-fraction", po::value(&o.heldout_fraction)->default_value(o.heldout_fraction, "0.03"),
       "share of utterances spoken by the held-out voices (espeak en-gb-scotland+f3, en-us-nyc+m5, flite rms) "
       "on validation sentences: valid_heldout.jsonl")
      ("noise-fraction", po::value(&o.noise_fraction)->default_value(o.noise_fraction, "0.4"),
       "share of utterances with white, pink or brown noise added")
      ("min-snr-db", po::value(&o.min_snr_db)->default_value(o.min_snr_db, "12"), "lowest signal-to-noise ratio, dB")
      ("max-snr-db", po::value(&o.max_snr_db)->default_value(o.max_snr_db, "35"), "highest signal-to-noise ratio, dB")
      ("numbers-fraction", po::value(&o.numbers_fraction)->default_value(o.numbers_fraction, "0.15"),
       "share of utterances that are spoken number strings")
      ("max-words", po::value(&o.max_words)->default_value(o.max_words), "longest sentence or clause, in words")
      ("text-dir", po::value(&o.text_dir)->default_value(o.text_dir),
       "directory of fortune files (entries separated by '%' lines)")
      ("espeak-share", po::value(&o.espeak_share)->default_value(o.espeak_share, "0.5"),
       "share of utterances made with espeak-ng (the rest with flite)")
      ("festival-share", po::value(&o.festival_share)->default_value(o.festival_share, "0"),
       "share of training and validation utterances made instead with Festival (voices kal_diphone, ked_diphone, "
       "cmu_us_slt_arctic_hts; needs the festival program and those voices); 0 keeps output identical to runs "
       "without it")
      ("single-word-fraction", po::value(&o.single_word_fraction)->default_value(o.single_word_fraction, "0"),
       "share of utterances that are one word of their split's sentence said alone (names, commands, short "
       "answers; sentences never have fewer than 2 words); 0 keeps output identical to runs without it")
      ("list-sentences", po::bool_switch(&o.list_sentences),
       "print the normalised sentence pool (split TAB text) on stdout and exit; writes nothing")
      ("shard", po::value(&o.shard)->default_value(o.shard),
       "this process makes the indices i with i % shards == shard")
      ("shards", po::value(&o.shards)->default_value(o.shards),
       "number of processes sharing the run; manifests become train.SHARD.jsonl etc. when > 1");
  po::variables_map vm;
  ParseResult pr = ParseOptions(argc, argv, desc,
                                "usage: asr-synth --out DIR --utterances N [--seed S] [--valid-fraction F] "
                                "[--heldout-fraction F] [--noise-fraction F] [--shard I --shards K] ...",
                                &vm);
  if (!pr.proceed) return pr.exit_code;
  auto usage = [](const std::string& m) {
    std::cerr << "asr-synth: error: " << m << "\n(run with --help for every option)\n";
    return 2;
  };
  auto fraction = [](double f) { return f >= 0 && f <= 1; };
  if (o.out.empty()) return usage("--out must not be empty");
  if (o.utterances < 1) return usage("--utterances must be at least 1");
  if (!fraction(o.valid_fraction) || !fraction(o.heldout_fraction) || !fraction(o.valid_sentences) || !fraction(o.noise_fraction) ||
      !fraction(o.numbers_fraction) || !fraction(o.espeak_share) || !fraction(o.festival_share) ||
      !fraction(o.single_word_fraction))
    return usage("fractions must lie in [0, 1]");
  if (o.valid_fraction + o.heldout_fraction > 1)
    return usage("--valid-fraction + --heldout-fraction must not exceed 1");
  if (o.heldout_fraction > 0 && o.valid_sentences <= 0)
    return usage("the held-out voices speak validation sentences: --heldout-fraction needs --valid-sentences > 0");
  if (o.valid_fraction >= 1) return usage("--valid-fraction must be below 1 (no training utterances otherwise)");
  if (!(o.min_snr_db <= o.max_snr_db)) return usage("--min-snr-db must not exceed --max-snr-db");
  if (o.max_words < 2) return usage("--max-words must be at least 2");
  if (o.shards < 1 || o.shard < 0 || o.shard >= o.shards) return usage("need 0 <= --shard < --shards");
  asrf::synth::Synthesizer s(o);
  return s.Run();
}
