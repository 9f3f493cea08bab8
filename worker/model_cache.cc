#include "worker/model_cache.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <memory>
#include <regex>
#include <vector>

#include "common/durable_file.h"
#include "common/log.h"
#include "common/pg.h"
#include "common/sha256.h"

namespace asrf {

namespace fs = std::filesystem;

namespace {

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

bool Verified(const std::string& file, const std::string& sha) {
  std::error_code ec;
  return fs::exists(file, ec) && !sha.empty() && Sha256Hex(ReadAll(file)) == sha;
}

// Cache file names of `name`: NAME.vN.EXT, N captured.
std::regex VersionPattern(const std::string& name, const std::string& ext) {
  return std::regex(std::regex_replace(name, std::regex(R"([.^$|()\[\]{}*+?\\])"), R"(\$&)") + R"(\.v(\d+)\.)" +
                    ext);
}

}  // namespace

void EvictOlderCachedModels(const std::string& cache_dir, const std::string& name, const std::string& path) {
  std::smatch pm;
  const std::string fname = fs::path(path).filename().string();
  std::regex own = VersionPattern(name, "pt");
  if (!std::regex_match(fname, pm, own) || pm[1].length() > 9) return;
  const int64_t version = std::stoll(pm[1].str());
  std::regex re = VersionPattern(name, "sha256");
  std::error_code ec;
  std::vector<fs::path> old;
  for (const auto& e : fs::directory_iterator(cache_dir, ec)) {
    std::smatch m;
    std::string fname = e.path().filename().string();
    if (std::regex_match(fname, m, re) && m[1].length() <= 9 && std::stoll(m[1].str()) < version) {
      old.push_back(e.path());
    }
  }
  for (const auto& sha : old) {
    fs::path pt = sha;
    pt.replace_extension(".pt");
    fs::remove(pt, ec);
    fs::remove(sha, ec);
    LogInfo("model_cache_evicted").Kv("model", name).Kv("file", pt.string());
  }
}

Status FetchRegistryModel(const std::string& conninfo, const std::string& name, const std::string& cache_dir,
                          std::string* path, std::string* sha256, int64_t statement_timeout_ms) {
  std::error_code ec;
  fs::create_directories(cache_dir, ec);
  if (ec) return Status::IOError("cannot create " + cache_dir + ": " + ec.message());
  std::unique_ptr<PgConn> pg;
  bool migrated = false;
  Status st = conninfo.empty() ? Status::Unavailable("no --pg")
                                : ConnectAndMigrate(conninfo, &migrated, &pg, nullptr, statement_timeout_ms);
  if (st.code() == Status::Code::kInvalid) return st.WithContext("--pg");
  if (st.ok()) {
    PgResult r;
    st = pg->Query("SELECT version, sha256 FROM models WHERE name = $1 ORDER BY version DESC LIMIT 1", {name}, &r);
    if (st.ok() && r.rows() == 0) return Status::NotFound("no model " + name + " in the registry");
    if (st.ok()) {
      std::string version = r.get(0, 0), sha = r.get(0, 1);
      std::string base = cache_dir + "/" + name + ".v" + version;
      if (Verified(base + ".pt", sha)) {
        *path = base + ".pt";
        if (sha256) *sha256 = sha;
        LogInfo("model_cached").Kv("model", name).Kv("version", version).Kv("file", *path);
        return Status::Ok();
      }
      PgResult b;
      st = pg->Query("SELECT bytes FROM models WHERE name = $1 AND version = $2", {name, version}, &b);
      if (st.ok() && b.rows() == 1) {
        std::string bytes = DecodeByteaHex(b.get(0, 0));
        if (Sha256Hex(bytes) != sha) {
          st = Status::Corruption("model " + name + " version " + version + " does not match its sha256 " + sha);
        } else {
          st = WriteFileDurably(base + ".pt", bytes);
          if (st.ok()) st = WriteFileDurably(base + ".sha256", sha + "\n");
        }
        if (st.ok()) {
          *path = base + ".pt";
          if (sha256) *sha256 = sha;
          LogInfo("model_fetched").Kv("model", name).Kv("version", version).Kv("bytes", static_cast<uint64_t>(bytes.size()));
          return Status::Ok();
        }
      } else if (st.ok()) {
        st = Status::NotFound("model " + name + " version " + version + " went from the registry while it was fetched");
      }
    }
  }
  // PostgreSQL unreachable, or the newest version damaged or not writable here (a full disk): the
  // newest verified cached copy.
  std::vector<CachedModel> cached = CachedModels(cache_dir, name);
  if (!cached.empty()) {
    *path = cached.front().path;
    if (sha256) *sha256 = cached.front().sha256;
    LogWarn("model_from_cache").Kv("model", name).Kv("version", cached.front().version).Kv("why", st.message());
    return Status::Ok();
  }
  return Status::Unavailable("cannot fetch model " + name + " from the registry (" + st.message() +
                             ") and no verified copy is cached in " + cache_dir);
}

std::vector<CachedModel> CachedModels(const std::string& cache_dir, const std::string& name) {
  std::vector<CachedModel> out;
  std::regex re = VersionPattern(name, "pt");
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(cache_dir, ec)) {
    std::smatch m;
    std::string fname = e.path().filename().string();
    if (!std::regex_match(fname, m, re)) continue;
    if (m[1].length() > 9) continue;  // no version of ours; std::stoll would be meaningless
    std::string base = cache_dir + "/" + name + ".v" + m[1].str();
    std::string sha = ReadAll(base + ".sha256");
    while (!sha.empty() && (sha.back() == '\n' || sha.back() == ' ')) sha.pop_back();
    if (Verified(base + ".pt", sha)) out.push_back({std::stoll(m[1].str()), base + ".pt", sha});
  }
  std::sort(out.begin(), out.end(), [](const CachedModel& a, const CachedModel& b) { return a.version > b.version; });
  return out;
}

}  // namespace asrf
