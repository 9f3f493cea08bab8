#include "client/transcript.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <system_error>

#include <nlohmann/json.hpp>

#include "common/durable_file.h"

namespace asrf {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// Field checks for ParseSegmentResult: each returns false (and says why) when `key` is missing
// or has the wrong type.
bool GetString(const json& j, const char* key, std::string* v, std::string* why) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_string()) {
    *why = std::string("\"") + key + "\" must be a string";
    return false;
  }
  *v = it->get<std::string>();
  return true;
}

bool GetNumber(const json& j, const char* key, double* v, std::string* why) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_number() || !std::isfinite(it->get<double>())) {
    *why = std::string("\"") + key + "\" must be a finite number";
    return false;
  }
  *v = it->get<double>();
  return true;
}

bool GetInt(const json& j, const char* key, int64_t* v, std::string* why) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_number_integer()) {
    *why = std::string("\"") + key + "\" must be an integer";
    return false;
  }
  *v = it->get<int64_t>();
  return true;
}

double RoundMs(double s) { return std::round(s * 1000.0) / 1000.0; }

int64_t ToMs(double s) {
  if (!std::isfinite(s) || s <= 0) return 0;
  return std::llround(s * 1000.0);
}

// HH:MM:SS<sep>mmm; hours grow past two digits when they must.
std::string Timestamp(double s, char sep) {
  int64_t ms = ToMs(s);
  char buf[48];
  std::snprintf(buf, sizeof buf, "%02lld:%02lld:%02lld%c%03lld", static_cast<long long>(ms / 3600000),
                static_cast<long long>(ms / 60000 % 60), static_cast<long long>(ms / 1000 % 60), sep,
                static_cast<long long>(ms % 1000));
  return buf;
}

std::string Trim(const std::string& s) {
  const char* ws = " \t\r\n";
  size_t b = s.find_first_not_of(ws);
  if (b == std::string::npos) return "";
  size_t e = s.find_last_not_of(ws);
  return s.substr(b, e - b + 1);
}

// One line: tabs, CR and LF become spaces (cue text and TSV fields cannot hold them safely).
std::string OneLine(const std::string& s) {
  std::string r = Trim(s);
  for (char& c : r) {
    if (c == '\t' || c == '\n' || c == '\r') c = ' ';
  }
  return r;
}

std::string Cues(const Transcript& t, char sep, bool numbered) {
  std::string out;
  int n = 0;
  for (const SegmentOut& seg : t.segments) {
    std::string text = OneLine(seg.text);
    if (text.empty()) continue;
    // "-->" marks a cue's timing line (WebVTT forbids it in cue text; SRT readers look for it too).
    for (size_t p = 0; (p = text.find("-->", p)) != std::string::npos;) text.replace(p, 3, "->");
    if (numbered) out += std::to_string(++n) + "\n";
    out += Timestamp(seg.start, sep) + " --> " + Timestamp(seg.end, sep) + "\n" + text + "\n\n";
  }
  return out;
}

}  // namespace

bool DropUnsure(SegmentOut* seg, double min_confidence) {
  if (seg->words.empty()) return false;
  double sum = 0;
  for (const WordOut& w : seg->words) sum += w.confidence;
  if (!(sum / static_cast<double>(seg->words.size()) < min_confidence)) return false;
  seg->text.clear();
  seg->words.clear();
  return true;
}

Status ParseSegmentResult(const std::string& text, SegmentOut* out, std::string* file, int* index, int* count,
                          double* offset_s, std::string* model, int64_t* infer_ms) {
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Status::Invalid("segment result is not JSON");
  if (!j.is_object()) return Status::Invalid("segment result is not a JSON object");

  std::string why, f, m, t;
  int64_t idx = 0, cnt = 0, inf = 0;
  double off = 0, dur = 0;
  if (!GetString(j, "file", &f, &why) || !GetInt(j, "index", &idx, &why) || !GetInt(j, "count", &cnt, &why) ||
      !GetNumber(j, "offset_s", &off, &why) || !GetNumber(j, "duration_s", &dur, &why) ||
      !GetString(j, "model", &m, &why) || !GetString(j, "text", &t, &why)) {
    return Status::Invalid("segment result: " + why);
  }
  if (cnt < 1 || cnt > INT32_MAX || idx < 0 || idx >= cnt) {
    return Status::Invalid("segment result: index " + std::to_string(idx) + " of count " + std::to_string(cnt));
  }
  if (off < 0 || dur < 0) return Status::Invalid("segment result: negative offset_s or duration_s");
  if (j.contains("infer_ms") && !GetInt(j, "infer_ms", &inf, &why)) return Status::Invalid("segment result: " + why);
  std::string sha;
  if (j.contains("model_sha256") && !GetString(j, "model_sha256", &sha, &why)) {
    return Status::Invalid("segment result: " + why);
  }

  SegmentOut seg;
  seg.model = m;
  seg.model_sha256 = std::move(sha);
  seg.start = off;
  seg.end = off + dur;
  seg.text = std::move(t);
  if (auto it = j.find("words"); it != j.end()) {
    if (!it->is_array()) return Status::Invalid("segment result: \"words\" must be an array");
    seg.words.reserve(it->size());
    for (const json& w : *it) {
      if (!w.is_object()) return Status::Invalid("segment result: a word is not an object");
      WordOut wo;
      double s = 0, e = 0, c = 0;
      if (!GetString(w, "w", &wo.text, &why) || !GetNumber(w, "s", &s, &why) || !GetNumber(w, "e", &e, &why) ||
          !GetNumber(w, "c", &c, &why)) {
        return Status::Invalid("segment result: word: " + why);
      }
      wo.start = std::clamp(off + s, seg.start, seg.end);
      wo.end = std::clamp(off + e, wo.start, seg.end);
      wo.confidence = std::clamp(c, 0.0, 1.0);
      seg.words.push_back(std::move(wo));
    }
  }

  *out = std::move(seg);
  if (file) *file = std::move(f);
  if (index) *index = static_cast<int>(idx);
  if (count) *count = static_cast<int>(cnt);
  if (offset_s) *offset_s = off;
  if (model) *model = std::move(m);
  if (infer_ms) *infer_ms = inf;
  return Status::Ok();
}

std::vector<std::pair<std::string, std::string>> ModelsUsed(const Transcript& t) {
  // A segment without a checksum (an older worker) is taken for any model file of its name.
  std::vector<std::pair<std::string, std::string>> used;
  auto named = [&used](const std::string& name) {
    return std::find_if(used.begin(), used.end(), [&](const auto& u) { return u.first == name; });
  };
  for (const SegmentOut& seg : t.segments) {
    const std::string& name = seg.model.empty() ? t.model : seg.model;
    const std::string& sha = seg.model_sha256;
    if (sha.empty()) {
      if (named(name) == used.end()) used.push_back({name, ""});
    } else if (std::find(used.begin(), used.end(), std::make_pair(name, sha)) == used.end()) {
      auto unknown = std::find(used.begin(), used.end(), std::make_pair(name, std::string()));
      if (unknown != used.end()) unknown->second = sha;
      else used.push_back({name, sha});
    }
  }
  return used;
}

std::string FormatTxt(const Transcript& t) {
  std::string out;
  for (const SegmentOut& seg : t.segments) {
    std::string text = OneLine(seg.text);
    if (!text.empty()) out += text + "\n";
  }
  return out;
}

std::string FormatJson(const Transcript& t) {
  json segs = json::array();
  std::string all;
  for (const SegmentOut& seg : t.segments) {
    std::string text = Trim(seg.text);
    if (!text.empty()) all += (all.empty() ? "" : " ") + text;
    json words = json::array();
    for (const WordOut& w : seg.words) {
      words.push_back({{"word", w.text},
                       {"start", RoundMs(w.start)},
                       {"end", RoundMs(w.end)},
                       {"confidence", RoundMs(w.confidence)}});
    }
    segs.push_back({{"start", RoundMs(seg.start)}, {"end", RoundMs(seg.end)}, {"text", text}, {"words", std::move(words)}});
  }
  auto used = ModelsUsed(t);
  json j = {{"source", t.source},          {"model", used.empty() ? t.model : used.front().first},
            {"duration_s", RoundMs(t.duration_s)}, {"wall_s", RoundMs(t.wall_s)},
            {"compute_s", RoundMs(t.compute_s)},   {"text", all},
            {"segments", std::move(segs)}};
  if (t.source_size > 0) j["source_size"] = t.source_size;
  if (t.source_mtime_ns != 0) j["source_mtime_ns"] = t.source_mtime_ns;
  if (!used.empty() && !used.front().second.empty()) j["model_sha256"] = used.front().second;
  if (used.size() > 1) {
    // Segments of this file were transcribed by different models: each one, in order of first use.
    json models = json::array();
    for (const auto& [name, sha] : used) models.push_back({{"model", name}, {"model_sha256", sha}});
    j["models"] = std::move(models);
  }
  // Invalid UTF-8 from a model or a file name becomes U+FFFD instead of throwing.
  return j.dump(2, ' ', false, json::error_handler_t::replace) + "\n";
}

std::string FormatSrt(const Transcript& t) { return Cues(t, ',', /*numbered=*/true); }

std::string FormatVtt(const Transcript& t) { return "WEBVTT\n\n" + Cues(t, '.', /*numbered=*/false); }

std::string FormatTsv(const Transcript& t) {
  std::string out = "start\tend\ttext\n";
  for (const SegmentOut& seg : t.segments) {
    std::string text = OneLine(seg.text);
    if (text.empty()) continue;
    out += std::to_string(ToMs(seg.start)) + "\t" + std::to_string(ToMs(seg.end)) + "\t" + text + "\n";
  }
  return out;
}

Status FormatByName(const std::string& format, const Transcript& t, std::string* out) {
  if (format == "txt") *out = FormatTxt(t);
  else if (format == "json") *out = FormatJson(t);
  else if (format == "srt") *out = FormatSrt(t);
  else if (format == "vtt") *out = FormatVtt(t);
  else if (format == "tsv") *out = FormatTsv(t);
  else return Status::Invalid("unknown output format \"" + format + "\" (txt, json, srt, vtt, tsv)");
  return Status::Ok();
}

std::string EscapeName(const std::string& name) {
  // Well-formed UTF-8 as Unicode defines it (Table 3-7): no overlong forms, no surrogates,
  // nothing past U+10FFFF; a JSON writer replaces anything else. Control characters are escaped too.
  auto at = [&](size_t k) { return k < name.size() ? static_cast<unsigned char>(name[k]) : 0u; };
  auto in = [](unsigned v, unsigned lo, unsigned hi) { return v >= lo && v <= hi; };
  std::string out;
  size_t i = 0;
  while (i < name.size()) {
    const unsigned c = at(i);
    size_t n = 0;
    if (c >= 0x20 && c < 0x7f && c != '%') n = 1;
    else if (in(c, 0xC2, 0xDF) && in(at(i + 1), 0x80, 0xBF)) n = 2;
    else if (c == 0xE0 && in(at(i + 1), 0xA0, 0xBF) && in(at(i + 2), 0x80, 0xBF)) n = 3;
    else if ((in(c, 0xE1, 0xEC) || in(c, 0xEE, 0xEF)) && in(at(i + 1), 0x80, 0xBF) && in(at(i + 2), 0x80, 0xBF)) n = 3;
    else if (c == 0xED && in(at(i + 1), 0x80, 0x9F) && in(at(i + 2), 0x80, 0xBF)) n = 3;
    else if (c == 0xF0 && in(at(i + 1), 0x90, 0xBF) && in(at(i + 2), 0x80, 0xBF) && in(at(i + 3), 0x80, 0xBF)) n = 4;
    else if (in(c, 0xF1, 0xF3) && in(at(i + 1), 0x80, 0xBF) && in(at(i + 2), 0x80, 0xBF) && in(at(i + 3), 0x80, 0xBF)) n = 4;
    else if (c == 0xF4 && in(at(i + 1), 0x80, 0x8F) && in(at(i + 2), 0x80, 0xBF) && in(at(i + 3), 0x80, 0xBF)) n = 4;
    if (n > 0 && i + n <= name.size()) {
      out.append(name, i, n);
      i += n;
    } else {
      char buf[4];
      std::snprintf(buf, sizeof(buf), "%%%02X", c);
      out += buf;
      i += 1;
    }
  }
  return out;
}

std::string UnescapeName(const std::string& text) {
  auto hex = [](char h) { return std::isxdigit(static_cast<unsigned char>(h)) != 0; };
  std::string out;
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] == '%' && i + 2 < text.size() && hex(text[i + 1]) && hex(text[i + 2])) {
      out.push_back(static_cast<char>(std::stoi(text.substr(i + 1, 2), nullptr, 16)));
      i += 2;
    } else {
      out.push_back(text[i]);
    }
  }
  return out;
}

std::string OutputBase(const std::string& input, const std::string& root, const std::string& out_dir, bool keep_ext) {
  std::error_code ec;
  fs::path in = fs::absolute(fs::path(input), ec).lexically_normal();
  if (ec) in = fs::path(input).lexically_normal();
  fs::path rel_dir;
  if (!root.empty() && fs::path(root).lexically_normal() != fs::path(input).lexically_normal()) {
    fs::path r = fs::absolute(fs::path(root), ec).lexically_normal();
    if (ec) r = fs::path(root).lexically_normal();
    if (!r.has_filename() && r.has_relative_path()) r = r.parent_path();  // "dir/" is "dir"
    fs::path rel = in.lexically_relative(r);
    // Only a path that stays under root keeps its directories; anything else lands in out_dir.
    if (!rel.empty() && *rel.begin() != ".." && rel.has_filename()) rel_dir = rel.parent_path();
  }
  fs::path name = keep_ext ? in.filename() : in.stem();
  return (fs::path(out_dir) / rel_dir / name).lexically_normal().string();
}

Status WriteOutputs(const Transcript& t, const std::string& base, const std::vector<std::string>& formats) {
  // Format everything first: an unknown format writes nothing.
  std::vector<std::string> bodies(formats.size());
  for (size_t i = 0; i < formats.size(); ++i) ASRF_RETURN_IF_ERROR(FormatByName(formats[i], t, &bodies[i]));
  fs::path parent = fs::path(base).parent_path();
  if (!parent.empty()) {
    std::error_code ec;
    fs::create_directories(parent, ec);
    if (ec) return Status::IOError("cannot create " + parent.string() + ": " + ec.message());
  }
  // The .json last: it records what the outputs were made from, and a rerun trusts the others
  // by it (a write that failed after it would leave another recording's text beside it).
  std::vector<size_t> order;
  for (size_t i = 0; i < formats.size(); ++i) if (formats[i] != "json") order.push_back(i);
  for (size_t i = 0; i < formats.size(); ++i) if (formats[i] == "json") order.push_back(i);
  for (size_t i : order) ASRF_RETURN_IF_ERROR(WriteFileDurably(base + "." + formats[i], bodies[i]));
  return Status::Ok();
}

}  // namespace asrf
