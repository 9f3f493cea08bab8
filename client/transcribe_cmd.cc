// asr-submit transcribe / collect: audio files in, transcripts out, through the fleet.
//
// transcribe: walks the inputs, decodes each picked file to 16 kHz mono, splits it at pauses (and
// long stretches at quiet points), submits the segments (kind "transcribe", PCM inside the SUBMIT)
// while keeping the audio outstanding below --max-inflight-s, follows the batch (WATCH events carry
// each segment's result), reassembles every file in segment order and writes one output per
// format. Files that cannot be read are reported in the summary and make the exit non-zero; every
// other file still goes through.
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <set>

#include <nlohmann/json.hpp>

#include "common/audio_in.h"
#include "client/commands.h"
#include "client/segmenter.h"
#include "client/transcript.h"
#include "common/clock.h"

namespace asrf {

namespace po = boost::program_options;
namespace fs = std::filesystem;
using proto::Cmd;
using json = nlohmann::json;

namespace {

struct FileJob {
  std::string path;      // as found
  std::string rel;       // relative to its input root: the name the segments carry
  std::string base;      // output path without extension
  std::string out_rel;   // base relative to --out (what the segments carry for `collect`)
  double duration_s = 0;
  double known_duration_s = 0;  // collect: the file's length as transcribe sent it (0: unknown)
  uint64_t size = 0;            // the file's size and modification time when picked (0: unknown)
  int64_t mtime_ns = 0;
  int segments = 0;
  int received = 0;
  bool submitted = false;
  bool written = false;
  std::string error;
  Transcript transcript;
  std::map<int, SegmentOut> parts;
  double compute_s = 0;
  int64_t submitted_ms = 0;
};

std::vector<std::string> SplitList(const std::string& s) {
  std::vector<std::string> out;
  std::string cur;
  for (char c : s + ",") {
    if (c == ',') {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
    } else if (c != ' ') {
      cur.push_back(static_cast<char>(std::tolower(static_cast<unsigned char>(c))));
    }
  }
  return out;
}

std::string Lower(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

std::string Clock(double s) {
  if (s < 0 || s > 1e7) return "--:--";
  int t = static_cast<int>(s + 0.5);
  char buf[32];
  if (t >= 3600) std::snprintf(buf, sizeof(buf), "%d:%02d:%02d", t / 3600, t / 60 % 60, t % 60);
  else std::snprintf(buf, sizeof(buf), "%d:%02d", t / 60, t % 60);
  return buf;
}

// Progress on stderr: a live bar on a terminal, a plain line every 5 s otherwise.
class ProgressLine {
 public:
  explicit ProgressLine(int64_t start_ms) : start_(start_ms), tty_(isatty(STDERR_FILENO) == 1) {}
  void Show(size_t files_done, size_t files_total, double audio_done, double audio_total, bool final) {
    int64_t now = MonoMs();
    if (!final && now < next_) return;
    next_ = now + (tty_ ? 250 : 5000);
    double secs = std::max(0.001, (now - start_) / 1000.0);
    double rate = audio_done / secs;
    double eta = rate > 0 ? (audio_total - audio_done) / rate : -1;
    char line[256];
    int width = 24;
    int fill = audio_total > 0 ? static_cast<int>(width * std::min(1.0, audio_done / audio_total)) : 0;
    std::string bar = "[" + std::string(fill, '#') + std::string(width - fill, '.') + "]";
    std::snprintf(line, sizeof(line), "%s %zu/%zu files, %.0f/%.0f audio s, %.1f audio s/s, ETA %s",
                  tty_ ? bar.c_str() : "progress:", files_done, files_total, audio_done, audio_total, rate,
                  Clock(eta).c_str());
    if (tty_) std::cerr << "\r" << line << "\033[K" << (final ? "\n" : "") << std::flush;
    else std::cerr << line << "\n";
  }

 private:
  int64_t start_;
  bool tty_;
  int64_t next_ = 0;
};

// A name as it comes back inside a JSON result: bytes that are not UTF-8 (a Latin-1 file name)
// are replaced there by U+FFFD, as the worker's JSON writer does.
std::string AsJsonText(const std::string& s) {
  return json::parse(json(s).dump(-1, ' ', false, json::error_handler_t::replace)).get<std::string>();
}

// Adds one segment result to its file; writes the outputs when the file is complete.
void AcceptResult(FileJob& f, const proto::JobEvent& e, const std::vector<std::string>& formats, double run_s,
                  double min_confidence, size_t* unsure) {
  if (f.written || !f.error.empty()) return;
  if (e.state != "done") {
    f.error = "segment failed (" + e.state + "): " + (e.error.empty() ? "no message" : e.error);
    return;
  }
  SegmentOut seg;
  std::string file, model;
  int index = 0, count = 0;
  double offset = 0;
  Status st = ParseSegmentResult(e.result.data, &seg, &file, &index, &count, &offset, &model);
  if (!st.ok()) {
    f.error = "unreadable segment result: " + st.message();
    return;
  }
  if (file != AsJsonText(f.rel) || count != f.segments || index < 0 || index >= count) {
    f.error = "segment result for " + file + " (" + std::to_string(index) + " of " + std::to_string(count) +
              "), not for this file";
    return;
  }
  if (DropUnsure(&seg, min_confidence)) ++*unsure;
  if (f.parts.emplace(index, std::move(seg)).second) f.received++;
  f.compute_s += run_s;
  if (f.transcript.model.empty()) f.transcript.model = model;
}

Status WriteFile(FileJob& f, const std::vector<std::string>& formats) {
  f.transcript.source = f.path;
  f.transcript.source_size = f.size;
  f.transcript.source_mtime_ns = f.mtime_ns;
  f.transcript.duration_s = f.duration_s;
  f.transcript.compute_s = f.compute_s;
  f.transcript.wall_s = f.submitted_ms ? (MonoMs() - f.submitted_ms) / 1000.0 : 0;
  f.transcript.segments.clear();
  for (auto& [i, s] : f.parts) f.transcript.segments.push_back(s);
  f.written = true;
  if (auto used = ModelsUsed(f.transcript); used.size() > 1) {
    std::cerr << "\nasr-submit: " << f.path << ": its segments were transcribed by " << used.size()
              << " different models (workers with different model files; \"models\" in its .json lists them)\n";
  }
  return WriteOutputs(f.transcript, f.base, formats);
}

struct Walk {
  std::vector<FileJob> files;
  size_t skipped_ext = 0;
  size_t skipped_existing = 0;
  std::vector<std::string> changed;  // inputs whose outputs exist but were made from other contents
  std::vector<std::string> errors;  // inputs that do not exist
};

// False, with a message, when a --format is not one this client writes.
bool FormatsKnown(const std::vector<std::string>& formats) {
  for (const auto& f : formats) {
    std::string unused;
    if (!FormatByName(f, Transcript{}, &unused).ok()) {
      std::cerr << "asr-submit: unknown --format " << f << " (txt, json, srt, vtt, tsv)\n";
      return false;
    }
  }
  return true;
}

// A whole file of at most 256 MiB (empty when it cannot be read or is larger).
std::string ReadSmallFile(const std::string& path) {
  std::error_code ec;
  const auto size = fs::file_size(path, ec);
  if (ec || size > (256u << 20)) return {};
  std::ifstream in(path, std::ios::binary);
  std::string s(static_cast<size_t>(size), '\0');
  in.read(s.data(), static_cast<std::streamsize>(s.size()));
  s.resize(static_cast<size_t>(std::max<std::streamsize>(in.gcount(), 0)));
  return s;
}

Walk FindFiles(const std::vector<std::string>& inputs, const std::set<std::string>& exts, const std::string& out_dir,
               const std::vector<std::string>& formats, bool overwrite) {
  Walk w;
  const bool writes_json = std::find(formats.begin(), formats.end(), "json") != formats.end();
  struct Found {
    std::string path, root;
  };
  std::vector<Found> found;
  auto picked = [&](const fs::path& p) {
    std::string e = Lower(p.extension().string());
    return !e.empty() && exts.count(e.substr(1));
  };
  // A folder this user may not list or enter is skipped by the walk: say so, never in silence.
  auto unreadable = [&](const fs::path& dir) {
    if (access(dir.c_str(), R_OK | X_OK) == 0) return false;
    w.errors.push_back(dir.string() + ": a folder that cannot be read (" + std::strerror(errno) +
                       "); the audio in it was not transcribed");
    return true;
  };
  for (const auto& in : inputs) {
    std::error_code ec;
    fs::path p(in);
    if (fs::is_directory(p, ec)) {
      if (unreadable(p)) continue;
      std::vector<std::string> here;
      auto it = fs::recursive_directory_iterator(p, fs::directory_options::skip_permission_denied, ec);
      for (; !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
        std::error_code lec;
        if (!it->is_symlink(lec) && it->is_directory(lec) && unreadable(it->path())) continue;
        if (it->is_symlink(lec)) {
          // Never silently: a broken link, or a linked folder (not followed: links may loop).
          if (!fs::exists(it->path(), lec)) {
            w.errors.push_back(it->path().string() + ": a broken symbolic link");
            continue;
          }
          if (fs::is_directory(it->path(), lec)) {
            w.errors.push_back(it->path().string() + ": a symbolic link to a folder, not followed; name it on the "
                               "command line to transcribe it");
            continue;
          }
        }
        if (!it->is_regular_file(lec)) continue;
        if (picked(it->path())) here.push_back(it->path().string());
        else w.skipped_ext++;
      }
      if (ec) {
        w.errors.push_back(p.string() + ": the walk through this folder stopped (" + ec.message() +
                           "); audio after that point was not transcribed");
      }
      std::sort(here.begin(), here.end());
      for (auto& h : here) found.push_back({h, p.string()});
    } else if (fs::exists(p, ec)) {
      // A file named on the command line is tried whatever its extension (--ext picks in folders):
      // it is transcribed or it is an error, never skipped.
      found.push_back({p.string(), p.has_parent_path() ? p.parent_path().string() : "."});
    } else {
      w.errors.push_back(in + ": no such file or directory");
    }
  }
  // The same file found twice (named and inside a named folder, or a folder named twice) is one
  // input, so it neither shares a stem with itself nor fails as its own duplicate below.
  {
    std::set<std::string> seen;
    std::vector<Found> unique;
    for (auto& f : found) {
      std::error_code cec;
      const std::string key = fs::weakly_canonical(f.path, cec).string();
      if (seen.insert(cec ? f.path : key).second) unique.push_back(std::move(f));
    }
    found = std::move(unique);
  }
  // Inputs that would share an output name keep their source extension.
  std::map<std::string, int> stems;
  for (const auto& f : found) stems[OutputBase(f.path, f.root, out_dir, false)]++;
  std::set<std::string> bases;
  for (const auto& f : found) {
    FileJob j;
    j.path = f.path;
    if (struct stat sb{}; stat(f.path.c_str(), &sb) == 0) {
      j.size = static_cast<uint64_t>(sb.st_size);
      j.mtime_ns = static_cast<int64_t>(sb.st_mtim.tv_sec) * 1000000000 + sb.st_mtim.tv_nsec;
    }
    j.rel = fs::path(f.path).lexically_relative(f.root).string();
    if (j.rel.empty() || j.rel.rfind("..", 0) == 0) j.rel = fs::path(f.path).filename().string();
    bool keep = stems[OutputBase(f.path, f.root, out_dir, false)] > 1;
    j.base = OutputBase(f.path, f.root, out_dir, keep);
    j.out_rel = fs::path(j.base).lexically_relative(fs::path(out_dir).lexically_normal()).string();
    if (j.out_rel.empty() || j.out_rel.rfind("..", 0) == 0) j.out_rel = fs::path(j.base).filename().string();
    if (!bases.insert(j.base).second) {
      // Two input folders holding the same relative name (one file found twice is one input).
      w.errors.push_back(f.path + ": its output " + j.base + ".* is already taken by another input; "
                         "transcribe the folders separately or with different --out");
      continue;
    }
    // An output name the file system cannot hold (255 bytes) is an error before any audio goes.
    const size_t name_bytes = fs::path(j.base).filename().string().size();
    size_t longest = 0;
    for (const auto& fmt : formats) longest = std::max(longest, name_bytes + 1 + fmt.size());
    if (longest > 255) {
      w.errors.push_back(f.path + ": its output name would be " + std::to_string(longest) +
                         " bytes long, over the 255 a file name may have; rename the file");
      continue;
    }
    if (!overwrite) {
      bool all = true;
      for (const auto& fmt : formats) all = all && fs::exists(j.base + "." + fmt);
      if (all) {
        // Outputs another file made (a second card's REC001.WAV into the same --out) are neither
        // this file's nor to be replaced: an error, where they used to count as done.
        std::string other;
        bool stale = false;
        if (json made = json::parse(ReadSmallFile(j.base + ".json"), nullptr, false);
            made.is_object() && made.contains("source") && made["source"].is_string()) {
          // What the outputs were made from: size and modification time (absent from outputs
          // written before they were recorded).
          const uint64_t size = made.contains("source_size") && made["source_size"].is_number_unsigned()
                                    ? made["source_size"].get<uint64_t>() : 0;
          const int64_t mtime = made.contains("source_mtime_ns") && made["source_mtime_ns"].is_number_integer()
                                    ? made["source_mtime_ns"].get<int64_t>() : 0;
          // A relative `source` is relative to where that run was started: from elsewhere it can
          // name another file, so there this file's own recorded size and time outrank it (not
          // for an absolute one: two cards' REC001.WAV can agree in both).
          const std::string src = made["source"].get<std::string>();
          const bool this_file = fs::path(src).is_relative() && size > 0 && mtime != 0 && size == j.size &&
                                 mtime == j.mtime_ns;
          std::error_code eec;
          if (!this_file && fs::exists(src, eec) && !fs::equivalent(src, f.path, eec) && !eec) other = src;
          // This file's own outputs, made from other contents (a recorder that wrote a new
          // REC001.WAV over the old one): transcribed again, where they used to count as done.
          // Only when this run writes the .json, which records what they are made from: without
          // it the redone outputs would still look stale to every later run.
          stale = other.empty() && writes_json && ((size > 0 && j.size > 0 && size != j.size) ||
                                                   (mtime != 0 && j.mtime_ns != 0 && mtime != j.mtime_ns));
        }
        if (!other.empty()) {
          w.errors.push_back(f.path + ": its outputs " + j.base + ".* hold the transcript of " + other +
                             "; not replaced (use another --out, or --overwrite to replace them)");
          continue;
        }
        if (!stale) {
          w.skipped_existing++;
          continue;
        }
        w.changed.push_back(f.path);
      }
    }
    w.files.push_back(std::move(j));
  }
  return w;
}

// Creates `dir` if need be and proves a file can be made in it.
Status CheckOutputFolder(const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return Status::Invalid(dir + ": cannot create it (" + ec.message() + ")");
  if (!fs::is_directory(dir, ec)) return Status::Invalid(dir + ": not a folder");
  const fs::path probe = fs::path(dir) / (".asr-submit-probe-" + cli::RandomHex(6));
  std::FILE* f = std::fopen(probe.c_str(), "wb");
  if (!f) return Status::Invalid(dir + ": cannot write in it (" + std::strerror(errno) + ")");
  std::fclose(f);
  fs::remove(probe, ec);
  return Status::Ok();
}

const char* kTranscribeUsage =
    "usage: asr-submit transcribe PATH... --out DIR [--format txt,json,srt,vtt,tsv] [--model NAME] [--wait]\n"
    "Transcribes every audio file under each PATH (files or folders, searched recursively). IN/x/a.wav becomes\n"
    "DIR/x/a.<format>; files whose outputs all exist are skipped unless --overwrite, or unless the file's size or\n"
    "modification time differs from what its .json recorded, when json is among the formats (it is\n"
    "transcribed again). Without --wait the batch name is printed and `asr-submit collect BATCH --out DIR`\n"
    "writes the outputs later.\n"
    "Files named on the command line are tried whatever their extension; --ext picks the files in folders.\n"
    "Exit: 0 all transcribed (or all done before), 1 some file failed (see the summary) or no audio file found,\n"
    "2 usage (or --out not a writable folder), 3 broker unreachable or --timeout.";

}  // namespace

int RunTranscribe(const GlobalOptions& g, const std::vector<std::string>& args) {
  std::vector<std::string> inputs;
  std::string out_dir, format_list, model, ext_list, batch;
  double max_segment_s = 30, max_inflight_s = 1800, pause_s = 0.3, pause_keep_s = 0.5, min_confidence = 0.4;
  int priority = 0;
  po::options_description desc("transcribe options");
  desc.add_options()
      ("input", po::value(&inputs)->multitoken(), "audio files or folders")
      ("out", po::value(&out_dir)->required(), "output folder (mirrors the input folders)")
      ("format", po::value(&format_list)->default_value("txt,json"), "comma list of txt, json, srt, vtt, tsv")
      ("model", po::value(&model)->default_value(proto::kDefaultModel),
       "model name as workers advertise it; `default` takes each worker's own")
      ("ext", po::value(&ext_list)->default_value("wav,flac,ogg,oga,opus,mp3,aiff,aif"),
       "file extensions picked in folders (others are skipped and counted; files named on the command line "
       "are tried whatever their extension)")
      ("max-segment-s", po::value(&max_segment_s)->default_value(max_segment_s),
       "longest segment: longer stretches are split at their quietest point (5..240)")
      ("pause-s", po::value(&pause_s)->default_value(pause_s, "0.3"),
       "a pause at least this long (quiet relative to the file's speech) ends a segment; 0: split only by length")
      ("pause-keep-s", po::value(&pause_keep_s)->default_value(pause_keep_s, "0.5"),
       "of a longer pause (and of a file's lead-in and tail) this much is kept beside the speech and the rest "
       "left out (the model writes words for background alone); negative: transcribe all of it")
      ("min-confidence", po::value(&min_confidence)->default_value(min_confidence, "0.4"),
       "a segment whose words' mean confidence is below this comes back empty (background taken for speech); "
       "0 keeps every word")
      ("max-inflight-s", po::value(&max_inflight_s)->default_value(max_inflight_s),
       "audio seconds submitted but not yet transcribed, at most (bounds the memory the batch holds)")
      ("priority", po::value(&priority)->default_value(0), "higher runs first")
      ("batch", po::value(&batch)->default_value(""), "batch name (default: a new one)")
      ("overwrite", po::bool_switch(), "transcribe files whose outputs already exist")
      ("wait", po::bool_switch(), "wait for the transcripts and write them (otherwise use `collect` later)");
  po::positional_options_description pos;
  pos.add("input", -1);
  po::variables_map vm;
  int rc = cli::ParseSub(args, desc, &pos, kTranscribeUsage, &vm);
  if (rc >= 0) return rc;
  if (inputs.empty()) {
    std::cerr << "asr-submit: transcribe needs at least one file or folder\n" << kTranscribeUsage << "\n";
    return kExitUsage;
  }
  std::vector<std::string> formats = SplitList(format_list);
  if (!FormatsKnown(formats)) return kExitUsage;
  if (formats.empty()) formats = {"txt"};
  std::set<std::string> exts;
  for (auto& e : SplitList(ext_list)) exts.insert(e[0] == '.' ? e.substr(1) : e);
  max_segment_s = std::clamp(max_segment_s, 5.0, 240.0);
  pause_s = std::isfinite(pause_s) ? std::clamp(pause_s, 0.0, 10.0) : 0.3;
  pause_keep_s = std::isfinite(pause_keep_s) ? std::min(pause_keep_s, 60.0) : 0.5;
  max_inflight_s = std::max(max_inflight_s, max_segment_s);
  bool wait = vm["wait"].as<bool>();
  // Before any audio goes out: an output folder that cannot be written would otherwise only be
  // found when the first transcript comes back.
  if (Status st = CheckOutputFolder(out_dir); !st.ok()) {
    std::cerr << "asr-submit: --out " << st.message() << "\n";
    return kExitUsage;
  }

  Walk walk = FindFiles(inputs, exts, out_dir, formats, vm["overwrite"].as<bool>());
  std::vector<FileJob>& files = walk.files;
  for (const auto& c : walk.changed) {
    std::cerr << "asr-submit: " << c << ": changed (size or modification time) since its outputs were written; "
                 "transcribing it again\n";
  }
  if (files.empty() && walk.skipped_existing == 0) {
    std::cerr << "asr-submit: no audio file to transcribe in " << inputs.size() << " path(s): "
              << walk.skipped_ext << " file(s) of other extensions skipped (--ext " << ext_list << ")\n";
    for (const auto& e : walk.errors) std::cerr << "  error: " << e << "\n";
    return kExitJobsFailed;
  }
  bool named = !batch.empty();
  if (batch.empty()) batch = "tx-" + cli::RandomHex(6);
  int64_t start = MonoMs();
  BrokerClient client(g.broker);
  if (named) {
    // A batch holds one run: segments are matched to files by the order they were submitted in,
    // and the outputs of another run's files must never be written as this run's.
    proto::StatusReq q;
    q.batch = batch;
    proto::Reply r;
    Status st = client.Call(Cmd::kStatus, q, &r, cli::RequestTimeoutMs(g));
    int64_t jobs = 0;
    for (const auto& [state, n] : r.counts) jobs += n;
    if (st.ok() && jobs > 0) {
      std::cerr << "asr-submit: batch " << batch << " exists already (" << jobs << " segment(s)); `asr-submit collect "
                << batch << " --out DIR` writes its transcripts. Give this run a new --batch name, or none.\n";
      return kExitUsage;
    }
    if (!st.ok() && st.code() != Status::Code::kNotFound) return cli::ExitFor(st);
  }
  // First, so that whatever happens next the batch can be found again (`collect`, `status`).
  std::cerr << "batch " << batch << ": " << files.size() << " file(s) to transcribe\n";
  ProgressLine progress(start);
  int64_t deadline = g.timeout_s > 0 ? start + static_cast<int64_t>(g.timeout_s * 1000) : INT64_MAX;

  std::map<uint64_t, std::pair<size_t, double>> job_file;  // job id -> (file index, audio seconds)
  std::set<uint64_t> finished_jobs;
  double inflight_s = 0, audio_total = 0, audio_done = 0, left_out_s = 0;
  size_t unsure = 0;  // segments emptied by --min-confidence
  size_t files_done = 0, files_failed = 0;
  uint64_t watch_req = 0;
  int64_t next_watch = 0, last_answer = MonoMs(), last_event = MonoMs();
  int64_t broker_terminal = 0;
  int submit_seq = 0;
  const std::string run_id = cli::RandomHex(6);  // request ids are this run's own, whatever the batch
  size_t seen_finished = 0;
  int64_t last_progress = MonoMs(), next_why = 0;

  auto finish_file = [&](FileJob& f) {
    if (!f.error.empty()) {
      files_failed++;
      return;
    }
    Status st = WriteFile(f, formats);
    // Written (or failed): its words are not kept, so the client's memory does not grow with the pile.
    f.parts.clear();
    f.transcript = Transcript{};
    if (!st.ok()) {
      f.error = st.message();
      files_failed++;
      return;
    }
    files_done++;
  };
  auto on_event = [&](const proto::JobEvent& e) {
    if (e.state != "done" && e.state != "failed" && e.state != "dead" && e.state != "cancelled") return;
    auto it = job_file.find(e.id);
    if (it == job_file.end() || !finished_jobs.insert(e.id).second) return;
    FileJob& f = files[it->second.first];
    inflight_s -= it->second.second;
    audio_done += it->second.second;
    bool had_error = !f.error.empty();
    AcceptResult(f, e, formats, e.run_ms / 1000.0, min_confidence, &unsure);
    bool complete = f.received == f.segments;
    if (!f.written && ((!had_error && !f.error.empty()) || complete)) {
      if (f.error.empty()) finish_file(f);
      else files_failed++;
      f.written = true;
    }
  };
  // One job's state (with its result) straight from the broker.
  auto status_of = [&](uint64_t id, proto::JobInfo* out) {
    proto::StatusReq q;
    q.job = id;
    proto::Reply r;
    if (!client.Call(Cmd::kStatus, q, &r, cli::RequestTimeoutMs(g)).ok() || r.jobs.empty()) return false;
    last_answer = MonoMs();
    *out = std::move(r.jobs.front());
    return true;
  };
  // Reads what the broker sent for up to `ms`: WATCH replies, events.
  auto pump = [&](int64_t ms) -> int {
    int64_t now = MonoMs();
    if (now >= deadline) return kExitUnreachable;
    if (now - last_answer > cli::RequestTimeoutMs(g) + 2000) {
      std::cerr << "\nasr-submit: the broker at " << client.endpoint() << " stopped answering (batch " << batch
                << " is safe in its journal; `asr-submit collect " << batch << " --out " << out_dir
                << "` writes the outputs later)\n";
      return kExitUnreachable;
    }
    if (now >= next_watch && !job_file.empty()) {
      proto::WatchReq w;
      w.req = watch_req = client.NextReq();
      w.batch = batch;
      w.watch_ms = 10000;
      w.results = true;
      client.Send(Cmd::kWatch, w);
      next_watch = now + 1000;
    }
    while (!client.pending_events().empty()) {
      for (const auto& e : client.pending_events().front().jobs) on_event(e);
      client.pending_events().pop_front();
    }
    Incoming in;
    if (client.Receive(ms, &in).ok()) {
      last_answer = MonoMs();
      if (in.cmd == Cmd::kReply && in.reply.req == watch_req) {
        broker_terminal = 0;
        for (const char* k : {"done", "failed", "dead", "cancelled"}) {
          auto c = in.reply.counts.find(k);
          if (c != in.reply.counts.end()) broker_terminal += c->second;
        }
      } else if (in.cmd == Cmd::kEvent) {
        last_event = MonoMs();
        for (const auto& e : in.event.jobs) on_event(e);
      }
    }
    // Jobs that finished before the WATCH started (or whose event was lost): ask for them.
    if (broker_terminal > static_cast<int64_t>(finished_jobs.size()) && MonoMs() - last_event > 1500) {
      for (const auto& [id, fi] : job_file) {
        if (finished_jobs.count(id)) continue;
        if (MonoMs() >= deadline) return kExitUnreachable;
        proto::JobInfo i;
        if (!status_of(id, &i)) break;  // the silence check above decides whether to give up
        {
          proto::JobEvent e;
          e.id = i.id;
          e.state = i.state;
          e.error = i.error;
          e.result = i.result;
          on_event(e);
        }
      }
      last_event = MonoMs();
    }
    // No progress for a while: say why the broker is holding the segments (e.g. no worker has
    // the model), once every 30 s.
    if (finished_jobs.size() != seen_finished) {
      seen_finished = finished_jobs.size();
      last_progress = MonoMs();
    } else if (MonoMs() - last_progress > 10000 && MonoMs() >= next_why) {
      next_why = MonoMs() + 30000;
      for (const auto& [id, fi] : job_file) {
        if (finished_jobs.count(id)) continue;
        proto::JobInfo i;
        if (status_of(id, &i) && !i.why.empty()) {
          std::cerr << "\nasr-submit: waiting: segment " << id << " is " << i.state << ": " << i.why << "\n";
        }
        break;
      }
    }
    progress.Show(files_done + files_failed, files.size(), audio_done, audio_total, false);
    return -1;
  };

  // Submit file by file, keeping the audio in flight bounded.
  for (size_t fi = 0; fi < files.size(); ++fi) {
    FileJob& f = files[fi];
    DecodedAudio audio;
    const int64_t decode_from = MonoMs();
    Status st = DecodeAudio16k(f.path, &audio);
    // The broker's silence is counted only while this client listens: decoding and splitting a
    // long file (or one on a slow share) is not the broker failing to answer (it exited with 3
    // mid-pile).
    last_answer += MonoMs() - decode_from;
    if (!st.ok()) {
      f.error = st.message();
      f.written = true;
      files_failed++;
      continue;
    }
    f.duration_s = audio.duration_s();
    SegmenterOptions so;
    so.max_s = max_segment_s;
    so.min_s = std::min(5.0, max_segment_s / 2);
    so.pause_s = pause_s;
    so.pause_keep_s = pause_keep_s;
    const int64_t split_from = MonoMs();
    std::vector<SegmentBounds> segs = SplitAtPauses(audio.pcm.data(), static_cast<int64_t>(audio.pcm.size()), so);
    last_answer += MonoMs() - split_from;
    f.segments = static_cast<int>(segs.size());
    // Audio in left-out pauses is done as soon as it is left out.
    double kept_s = 0;
    for (const SegmentBounds& sb : segs) kept_s += static_cast<double>(sb.end - sb.begin) / kTargetRate;
    const double left_s = std::max(0.0, f.duration_s - kept_s);
    audio_done += left_s;
    left_out_s += left_s;
    // One SUBMIT per ~8 MiB of audio; each with its own request id, so a resend is harmless.
    proto::Submit s;
    s.batch = batch;
    size_t bytes = 0;
    std::vector<double> lens;
    double pending_s = 0;  // audio in `s`, not yet submitted
    auto flush = [&]() -> Status {
      if (s.jobs.empty()) return Status::Ok();
      s.request_id = batch + "/" + run_id + "/" + std::to_string(submit_seq++);
      proto::Reply r;
      Status cst = client.Call(Cmd::kSubmit, s, &r, cli::RequestTimeoutMs(g));
      if (!cst.ok()) return cst;
      last_answer = MonoMs();
      // (A duplicate answer is a resend of this run's own request, e.g. across a broker restart.)
      if (r.job_ids.size() != lens.size()) {
        return Status::Corruption("the broker answered " + std::to_string(r.job_ids.size()) + " job id(s) for " +
                                  std::to_string(lens.size()) + " segment(s) of " + f.path);
      }
      for (size_t k = 0; k < r.job_ids.size(); ++k) job_file[r.job_ids[k]] = {fi, lens[k]};
      s.jobs.clear();
      lens.clear();
      bytes = 0;
      inflight_s += pending_s;
      pending_s = 0;
      return Status::Ok();
    };
    for (size_t k = 0; k < segs.size(); ++k) {
      proto::TranscribeSegment seg;
      seg.file = f.rel;
      seg.index = static_cast<uint32_t>(k);
      seg.count = static_cast<uint32_t>(segs.size());
      seg.offset_s = static_cast<double>(segs[k].begin) / kTargetRate;
      seg.source = f.path;
      seg.file_duration_s = f.duration_s;
      seg.out = EscapeName(f.out_rel);
      seg.source_size = f.size;
      seg.source_mtime_ns = f.mtime_ns;
      seg.pcm.data.assign(reinterpret_cast<const char*>(audio.pcm.data() + segs[k].begin),
                          static_cast<size_t>(segs[k].end - segs[k].begin) * 2);
      double len_s = static_cast<double>(segs[k].end - segs[k].begin) / kTargetRate;
      // With or without --wait, the broker holds at most --max-inflight-s of this client's audio,
      // counted by segment, so one long file cannot exceed it either. With nothing in flight a
      // segment always goes (--max-inflight-s is at least --max-segment-s).
      while (inflight_s + pending_s + len_s > max_inflight_s) {
        if (!s.jobs.empty()) {
          if (Status fst = flush(); !fst.ok()) return cli::ExitFor(fst);
          continue;
        }
        if (finished_jobs.size() >= job_file.size()) break;
        if (int r = pump(100); r >= 0) return r;
      }
      proto::SubmitJob job;
      job.kind = proto::kTranscribeKind;
      job.payload.data = proto::EncodeBody(seg);
      job.priority = priority;
      job.model = model;
      job.audio_ms = static_cast<int64_t>(len_s * 1000);
      job.parent = f.rel;
      bytes += job.payload.data.size();
      s.jobs.push_back(std::move(job));
      lens.push_back(len_s);
      pending_s += len_s;
      if (bytes > (8u << 20)) {
        if (Status fst = flush(); !fst.ok()) return cli::ExitFor(fst);
      }
    }
    if (Status fst = flush(); !fst.ok()) return cli::ExitFor(fst);
    f.submitted = true;
    f.submitted_ms = MonoMs();
    audio_total += f.duration_s;
    if (wait) {
      if (int r = pump(0); r >= 0) return r;
    }
  }

  auto summary = [&]() {
    // A submitted file that neither got its outputs nor failed is a failure too, never a silent gap.
    size_t unfinished = 0;
    if (wait) {
      for (auto& f : files) {
        if (f.submitted && !f.written && f.error.empty()) {
          f.error = "not finished: " + std::to_string(f.received) + " of " + std::to_string(f.segments) + " segment(s) came back";
          unfinished++;
        }
      }
    }
    size_t errors = files_failed + unfinished + walk.errors.size();
    std::cerr << "summary: " << files.size() << " file(s) picked, " << files_done << " transcribed, "
              << errors << " failed, " << walk.skipped_existing << " skipped (outputs exist), " << walk.skipped_ext
              << " skipped (extension not in --ext)\n";
    for (const auto& e : walk.errors) std::cerr << "  error: " << e << "\n";
    for (const auto& f : files) {
      if (f.error.empty()) continue;
      // Decoding errors already start with the path.
      const bool named = f.error.compare(0, f.path.size() + 2, f.path + ": ") == 0;
      std::cerr << "  error: " << (named ? std::string() : f.path + ": ") << f.error << "\n";
    }
    return errors;
  };

  if (!wait) {
    std::cout << "batch " << batch << ": " << job_file.size() << " segment(s) of "
              << std::count_if(files.begin(), files.end(), [](const FileJob& f) { return f.submitted; })
              << " file(s) submitted; `asr-submit collect " << batch << " --out " << out_dir
              << "` writes the transcripts\n";
    return summary() ? kExitJobsFailed : kExitOk;
  }
  while (finished_jobs.size() < job_file.size()) {
    if (int r = pump(200); r >= 0) {
      if (r == kExitUnreachable && MonoMs() >= deadline) {
        std::cerr << "\nasr-submit: --timeout passed with " << job_file.size() - finished_jobs.size()
                  << " segment(s) unfinished (batch " << batch << ")\n";
      }
      return r;
    }
  }
  progress.Show(files_done + files_failed, files.size(), audio_done, audio_total, true);
  double secs = (MonoMs() - start) / 1000.0;
  std::cerr << "transcribed " << audio_done << " audio s in " << secs << " s (" << (secs > 0 ? audio_done / secs : 0)
            << " audio s/s; " << left_out_s << " s of it pauses left out); " << unsure
            << " segment(s) emptied below --min-confidence; outputs in " << out_dir << "\n";
  return summary() ? kExitJobsFailed : kExitOk;
}

int RunCollect(const GlobalOptions& g, const std::vector<std::string>& args) {
  std::string batch, out_dir, format_list;
  double min_confidence = 0.4;
  po::options_description desc("collect options");
  desc.add_options()
      ("batch", po::value(&batch)->required(), "the batch name `transcribe` printed")
      ("out", po::value(&out_dir)->required(), "output folder")
      ("format", po::value(&format_list)->default_value("txt,json"), "comma list of txt, json, srt, vtt, tsv")
      ("min-confidence", po::value(&min_confidence)->default_value(min_confidence, "0.4"),
       "a segment whose words' mean confidence is below this comes back empty (as `transcribe`); 0 keeps every word");
  po::positional_options_description pos;
  pos.add("batch", 1);
  po::variables_map vm;
  int rc = cli::ParseSub(args, desc, &pos,
                         "usage: asr-submit collect BATCH --out DIR [--format ...]  (writes the transcripts of a "
                         "finished transcription batch; exit 1 while segments are unfinished or failed)",
                         &vm);
  if (rc >= 0) return rc;
  std::vector<std::string> formats = SplitList(format_list);
  if (!FormatsKnown(formats)) return kExitUsage;
  BrokerClient client(g.broker);
  proto::StatusReq sq;
  sq.batch = batch;
  proto::Reply counts;
  if (Status st = client.Call(Cmd::kStatus, sq, &counts, cli::RequestTimeoutMs(g)); !st.ok()) {
    // An unknown batch is a usage error, as for `watch`.
    return st.code() == Status::Code::kNotFound ? (cli::ExitFor(st), kExitUsage) : cli::ExitFor(st);
  }
  int64_t unfinished = counts.counts["queued"] + counts.counts["leased"];
  if (unfinished > 0) {
    std::cerr << "asr-submit: batch " << batch << " has " << unfinished
              << " unfinished segment(s); run `asr-submit watch " << batch << "` and collect when it is done\n";
    return kExitJobsFailed;
  }
  // Every job of the batch, then each one's result.
  std::map<std::string, FileJob> by_file;
  size_t failed_segments = 0;
  // Page by page: a batch may hold more segments than one JOBS reply lists.
  std::vector<proto::JobInfo> listed;
  for (proto::JobsReq jq;;) {
    jq.batch = batch;
    jq.limit = 10000;
    proto::Reply jr;
    if (Status st = client.Call(Cmd::kJobs, jq, &jr, cli::RequestTimeoutMs(g)); !st.ok()) return cli::ExitFor(st);
    if (jr.jobs.empty() || jr.jobs.back().id <= jq.after) break;
    jq.after = jr.jobs.back().id;
    for (auto& j : jr.jobs) listed.push_back(std::move(j));
  }
  int64_t total = 0;
  for (const auto& [state, n] : counts.counts) total += n;
  if (static_cast<int64_t>(listed.size()) < total) {
    std::cerr << "asr-submit: the broker listed " << listed.size() << " of the " << total << " jobs of batch " << batch
              << " (a broker older than this client lists at most 10,000)\n";
    return kExitJobsFailed;
  }
  {
    for (const auto& info : listed) {
      if (info.kind != proto::kTranscribeKind) continue;
      proto::StatusReq q;
      q.job = info.id;
      proto::Reply r;
      if (Status st = client.Call(Cmd::kStatus, q, &r, cli::RequestTimeoutMs(g)); !st.ok()) return cli::ExitFor(st);
      if (r.jobs.empty()) continue;
      const auto& i = r.jobs.front();
      SegmentOut seg;
      std::string file, model;
      int index = 0, count = 0;
      double offset = 0;
      if (i.state != "done") {
        failed_segments++;
        std::cerr << "  error: job " << i.id << " is " << i.state << ": " << i.error << "\n";
        continue;
      }
      if (Status st = ParseSegmentResult(i.result.data, &seg, &file, &index, &count, &offset, &model); !st.ok()) {
        failed_segments++;
        std::cerr << "  error: job " << i.id << ": " << (i.why.empty() ? st.message() : i.why) << "\n";
        continue;
      }
      DropUnsure(&seg, min_confidence);
      // Grouped by the output name `transcribe` chose (echoed as "out"): two names that are not
      // UTF-8 and look alike in JSON stay two files, and each keeps its name.
      json extra = json::parse(i.result.data, nullptr, /*allow_exceptions=*/false);
      std::string out_rel;
      if (extra.is_object()) {
        if (auto o = extra.find("out"); o != extra.end() && o->is_string()) out_rel = UnescapeName(o->get<std::string>());
      }
      // Only a name inside --out (a result is whatever a job of the batch said): anything else
      // is named from its file as before.
      if (!out_rel.empty()) {
        const fs::path rel(out_rel);
        bool inside = rel.is_relative() && !rel.empty();
        for (const auto& part : rel) inside = inside && part != ".." && part != ".";
        if (!inside) out_rel.clear();
      }
      FileJob& f = by_file[out_rel.empty() ? "f:" + file : "o:" + out_rel];
      f.out_rel = out_rel;
      if (f.path.empty()) f.path = file;
      f.segments = count;
      f.transcript.model = model;
      f.duration_s = std::max(f.duration_s, seg.end);
      f.compute_s += static_cast<double>(i.run_ms) / 1000.0;
      // What `transcribe` knew of the file, echoed by the worker (absent from older clients' jobs).
      if (extra.is_object()) {
        if (auto s = extra.find("source"); s != extra.end() && s->is_string()) f.path = s->get<std::string>();
        if (auto d = extra.find("file_duration_s"); d != extra.end() && d->is_number() && d->get<double>() > 0) {
          f.known_duration_s = d->get<double>();
        }
        if (auto z = extra.find("source_size"); z != extra.end() && z->is_number_unsigned()) f.size = z->get<uint64_t>();
        if (auto m = extra.find("source_mtime_ns"); m != extra.end() && m->is_number_integer()) {
          f.mtime_ns = m->get<int64_t>();
        }
      }
      if (f.parts.emplace(index, std::move(seg)).second) f.received++;
    }
  }
  size_t written = 0, incomplete = 0;
  // Output names as `transcribe` chose them: a file whose stem another file shares keeps its
  // extension (a.wav.txt beside a.mp3.txt), so neither overwrites the other.
  // (Jobs of older clients carry no "out": their names are worked out again from the batch.)
  std::map<std::string, int> stems;
  for (const auto& [key, f] : by_file) {
    if (f.out_rel.empty()) stems[OutputBase(key.substr(2), ".", out_dir, false)]++;
  }
  for (auto& [key, f] : by_file) {
    const std::string file = key.substr(2);
    f.base = !f.out_rel.empty() ? (fs::path(out_dir) / f.out_rel).string()
                                : OutputBase(file, ".", out_dir, stems[OutputBase(file, ".", out_dir, false)] > 1);
    if (f.known_duration_s > 0) f.duration_s = f.known_duration_s;
    if (f.received != f.segments) {
      incomplete++;
      std::cerr << "  error: " << f.path << ": " << f.received << " of " << f.segments << " segments\n";
      continue;
    }
    if (Status st = WriteFile(f, formats); !st.ok()) {
      std::cerr << "  error: " << st.message() << "\n";
      incomplete++;
      continue;
    }
    written++;
  }
  std::cerr << "collect: " << written << " file(s) written to " << out_dir << ", " << incomplete
            << " incomplete, " << failed_segments << " failed segment(s)\n";
  return incomplete || failed_segments ? kExitJobsFailed : kExitOk;
}

}  // namespace asrf
