// The deployment files against the real binaries: the metric names that the Grafana dashboard and
// the Prometheus rules use exist in a live broker's /metrics; the options and ASRF_* variables in
// the systemd units and the compose file exist in the binaries' --help; the YAML and JSON files
// parse, the units pass systemd-analyze verify, the third-party images are pinned; the idle stop
// script; and the backup scripts: a restore drill from a live fleet into a fresh cluster,
// retention, a stopped broker's journal and a running broker's refusal.
#include <gtest/gtest.h>
#include <signal.h>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "common/options.h"
#include "tests/harness.h"

namespace asrf::testing {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

const std::string kSrc = ASRF_SOURCE_DIR;
const std::string kDeploy = kSrc + "/deploy";
const char* const kPython = "/usr/bin/python3";
const char* const kCurl = "/usr/bin/curl";
const char* const kSh = "/bin/sh";

// Every regular file under `dir` (recursively) whose name ends with one of `suffixes`, sorted.
std::vector<std::string> FilesUnder(const std::string& dir, const std::vector<std::string>& suffixes) {
  std::vector<std::string> out;
  std::error_code ec;
  for (auto it = fs::recursive_directory_iterator(dir, ec); !ec && it != fs::recursive_directory_iterator();
       it.increment(ec)) {
    if (!it->is_regular_file()) continue;
    std::string p = it->path().string();
    for (const auto& s : suffixes) {
      if (p.size() >= s.size() && p.compare(p.size() - s.size(), s.size(), s) == 0) {
        out.push_back(p);
        break;
      }
    }
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::string Trim(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ' || s.back() == '\r')) s.pop_back();
  return s;
}

std::string HttpEndpoint(const std::string& state_dir) { return Trim(ReadFile(state_dir + "/http.endpoint")); }

std::string Metrics(const std::string& http) { return RunCommand({kCurl, "-fsS", "http://" + http + "/metrics"}).out; }

// Metric family names declared in a Prometheus text page ("# TYPE name type").
std::set<std::string> Families(const std::string& page) {
  std::set<std::string> out;
  std::istringstream in(page);
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream words(line);
    std::string hash, type, name;
    if (words >> hash >> type >> name && hash == "#" && type == "TYPE") out.insert(name);
  }
  return out;
}

// Names of the form asrf_[a-z_]+ in a text, taken literally.
std::set<std::string> MetricNamesIn(const std::string& text) {
  std::set<std::string> out;
  static const std::regex re("asrf_[a-z_]+");
  for (auto it = std::sregex_iterator(text.begin(), text.end(), re); it != std::sregex_iterator(); ++it) {
    out.insert(it->str());
  }
  return out;
}

// The long options a binary lists in --help ("  --name arg ..." and "  -h [ --help ]" lines).
std::set<std::string> HelpOptions(const std::string& bin) {
  RunResult r = RunCommand({bin, "--help"});
  std::set<std::string> out;
  std::istringstream in(r.out);
  std::string line;
  static const std::regex re("^  (?:-[A-Za-z] \\[ )?--([a-z0-9][a-z0-9-]*).*");
  std::smatch m;
  while (std::getline(in, line)) {
    if (std::regex_match(line, m, re)) out.insert(m[1].str());
  }
  return out;
}

// The ASRF_* variables a binary reads: one per option but --help and --config (common/options.cc).
std::set<std::string> EnvNames(const std::set<std::string>& options) {
  std::set<std::string> out;
  for (const auto& o : options) {
    if (o != "help" && o != "config") out.insert(EnvNameFor(o));
  }
  return out;
}

std::set<std::string> EnvVarsIn(const std::string& text) {
  std::set<std::string> out;
  static const std::regex re("ASRF_[A-Z0-9_]+");
  for (auto it = std::sregex_iterator(text.begin(), text.end(), re); it != std::sregex_iterator(); ++it) {
    out.insert(it->str());
  }
  return out;
}

bool HavePythonYaml() {
  return fs::exists(kPython) && RunCommand({kPython, "-c", "import yaml"}).code == 0;
}

// A YAML file as JSON, through python3-yaml (safe_load); discarded JSON on failure.
json LoadYaml(const std::string& path, std::string* error) {
  RunResult r = RunCommand({kPython, "-c",
                            "import json, sys, yaml\n"
                            "json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout, default=str)\n",
                            path});
  if (r.code != 0) {
    *error = r.err;
    return json(json::value_t::discarded);
  }
  return json::parse(r.out, nullptr, false);
}

std::vector<std::string> Words(const std::string& s) {
  std::istringstream in(s);
  std::vector<std::string> out;
  std::string w;
  while (in >> w) out.push_back(w);
  return out;
}

std::string Basename(const std::string& p) { return fs::path(p).filename().string(); }

// j[k1][k2]... without creating or asserting: null when a step is missing.
json At(const json& j, std::initializer_list<std::string> path) {
  const json* cur = &j;
  for (const auto& k : path) {
    if (!cur->is_object() || !cur->contains(k)) return json();
    cur = &(*cur)[k];
  }
  return *cur;
}

// ---- (a) metric names ----

TEST(Deploy, DashboardAndAlertMetricsExistInALiveBroker) {
  if (!fs::exists(kCurl)) GTEST_SKIP() << "curl is not installed";
  TempDir tmp;
  BrokerProc b = StartBroker(tmp / "broker", tmp / "broker.log");
  std::string http = HttpEndpoint(tmp / "broker");
  ASSERT_FALSE(http.empty()) << ReadFile(tmp / "broker.log");
  std::set<std::string> families = Families(Metrics(http));
  ASSERT_GT(families.size(), 10u) << "no metric families in /metrics";

  std::vector<std::string> files = FilesUnder(kDeploy + "/grafana/dashboards", {".json"});
  std::vector<std::string> prom = FilesUnder(kDeploy + "/prometheus", {".yml", ".yaml"});
  files.insert(files.end(), prom.begin(), prom.end());
  ASSERT_FALSE(files.empty());
  std::set<std::string> used;
  for (const auto& f : files) {
    std::set<std::string> names = MetricNamesIn(ReadFile(f));
    for (const auto& n : names) {
      EXPECT_TRUE(families.count(n)) << f << " uses " << n << ", which the broker's /metrics does not have";
      used.insert(n);
    }
  }
  // The dashboard shows every family the broker exports.
  std::set<std::string> on_dashboard;
  for (const auto& f : FilesUnder(kDeploy + "/grafana/dashboards", {".json"})) {
    for (const auto& n : MetricNamesIn(ReadFile(f))) on_dashboard.insert(n);
  }
  for (const auto& fam : families) EXPECT_TRUE(on_dashboard.count(fam)) << fam << " is on no dashboard panel";
}

TEST(Deploy, ReadmeDocumentsEveryMetric) {
  if (!fs::exists(kCurl)) GTEST_SKIP() << "curl is not installed";
  TempDir tmp;
  BrokerProc b = StartBroker(tmp / "broker", tmp / "broker.log");
  std::string http = HttpEndpoint(tmp / "broker");
  ASSERT_FALSE(http.empty()) << ReadFile(tmp / "broker.log");
  std::string readme = ReadFile(kSrc + "/README.md");
  std::set<std::string> families = Families(Metrics(http));
  ASSERT_GT(families.size(), 10u);
  for (const auto& fam : families) {
    EXPECT_NE(readme.find("| `" + fam + "`"), std::string::npos) << fam << " is missing from README.md's metric table";
  }
  for (const auto& n : MetricNamesIn(readme)) EXPECT_TRUE(families.count(n)) << "README.md names " << n;
}

// ---- (b) options and ASRF_* variables ----

struct Binaries {
  std::map<std::string, std::set<std::string>> options;  // "asr-broker" -> its long options
  std::map<std::string, std::set<std::string>> env;
};

Binaries ReadBinaries() {
  Binaries b;
  for (const auto& [name, bin] : std::map<std::string, std::string>{{"asr-broker", ASRF_BROKER_BIN},
                                                                    {"asr-worker", ASRF_WORKER_BIN}}) {
    b.options[name] = HelpOptions(bin);
    b.env[name] = EnvNames(b.options[name]);
  }
  return b;
}

TEST(Deploy, SystemdUnitOptionsAndVariablesExist) {
  Binaries bins = ReadBinaries();
  ASSERT_TRUE(bins.options["asr-broker"].count("state-dir") && bins.options["asr-broker"].count("http"));
  ASSERT_TRUE(bins.options["asr-worker"].count("device") && bins.options["asr-worker"].count("pg"));
  std::map<std::string, int> checked;
  for (const auto& unit : FilesUnder(kDeploy + "/systemd", {".service"})) {
    // Join continuation lines, then look at each ExecStart of asr-broker or asr-worker.
    std::string text = ReadFile(unit), joined;
    for (size_t i = 0; i < text.size(); ++i) {
      if (text[i] == '\\' && i + 1 < text.size() && text[i + 1] == '\n') {
        ++i;
        joined += ' ';
      } else {
        joined += text[i];
      }
    }
    std::istringstream in(joined);
    std::string line, binary;
    while (std::getline(in, line)) {
      if (line.rfind("ExecStart=", 0) != 0) continue;
      std::vector<std::string> w = Words(line.substr(10));
      if (w.empty()) continue;
      std::string name = Basename(w[0]);
      if (!bins.options.count(name)) continue;
      binary = name;
      checked[name]++;
      for (size_t i = 1; i < w.size(); ++i) {
        if (w[i].rfind("--", 0) != 0) continue;
        std::string opt = w[i].substr(2, w[i].find('=') == std::string::npos ? std::string::npos : w[i].find('=') - 2);
        EXPECT_TRUE(bins.options[name].count(opt)) << unit << ": " << name << " has no --" << opt;
      }
    }
    if (binary.empty()) continue;
    // Every ASRF_ variable the unit sets or its comments mention is one this binary reads.
    for (const auto& v : EnvVarsIn(text)) {
      EXPECT_TRUE(bins.env[binary].count(v)) << unit << ": " << v << " is no option of " << binary;
    }
  }
  EXPECT_GE(checked["asr-broker"], 1);
  EXPECT_GE(checked["asr-worker"], 1);
}

TEST(Deploy, ComposeOptionsVariablesGpusAndImages) {
  if (!HavePythonYaml()) GTEST_SKIP() << "python3-yaml is not installed (scripts/setup.sh installs it)";
  Binaries bins = ReadBinaries();
  std::string error;
  const std::string file = kDeploy + "/docker/docker-compose.yml";
  json compose = LoadYaml(file, &error);
  ASSERT_FALSE(compose.is_discarded()) << error;
  ASSERT_TRUE(compose.contains("services") && compose["services"].is_object());
  std::set<std::string> env_files;
  std::map<std::string, std::vector<std::string>> by_binary;  // binary -> services
  for (const auto& [service, s] : compose["services"].items()) {
    // Third-party images (no build) are pinned to an exact version.
    if (s.contains("image") && !s.contains("build")) {
      std::string image = s["image"];
      std::string name = image.substr(image.rfind('/') == std::string::npos ? 0 : image.rfind('/') + 1);
      size_t colon = name.find(':');
      ASSERT_NE(colon, std::string::npos) << service << ": image " << image << " has no tag (that is latest)";
      std::string tag = name.substr(colon + 1);
      EXPECT_NE(tag.find("latest"), 0u) << service << ": " << image;
      EXPECT_TRUE(std::regex_search(tag, std::regex("^v?[0-9]+\\.[0-9]+"))) << service << ": " << image
                                                                              << " is not pinned to a version";
    }
    if (s.contains("env_file")) {
      json ef = s["env_file"];
      if (!ef.is_array()) ef = json::array({ef});
      for (const auto& e : ef) env_files.insert(e.is_string() ? e.get<std::string>() : e.value("path", ""));
    }
    std::vector<std::string> cmd;
    if (s.contains("command")) {
      if (s["command"].is_array()) {
        for (const auto& c : s["command"]) cmd.push_back(c.get<std::string>());
      } else {
        cmd = Words(s["command"].get<std::string>());
      }
    }
    if (cmd.empty() || !bins.options.count(Basename(cmd[0]))) continue;
    std::string binary = Basename(cmd[0]);
    by_binary[binary].push_back(service);
    for (size_t i = 1; i < cmd.size(); ++i) {
      EXPECT_EQ(cmd[i].find("password"), std::string::npos) << service << ": a password in the command line";
      if (cmd[i].rfind("--", 0) != 0) continue;
      std::string opt = cmd[i].substr(2, cmd[i].find('=') == std::string::npos ? std::string::npos : cmd[i].find('=') - 2);
      EXPECT_TRUE(bins.options[binary].count(opt)) << service << ": " << binary << " has no --" << opt;
    }
    if (s.contains("environment")) {
      std::vector<std::string> keys;
      if (s["environment"].is_object()) {
        for (const auto& [k, v] : s["environment"].items()) keys.push_back(k);
      } else {
        for (const auto& e : s["environment"]) {
          std::string kv = e.get<std::string>();
          keys.push_back(kv.substr(0, kv.find('=')));
        }
      }
      for (const auto& k : keys) {
        if (k.rfind("ASRF_", 0) == 0) {
          EXPECT_TRUE(bins.env[binary].count(k)) << service << ": " << k;
        }
      }
    }
    if (binary == "asr-worker") {
      // One GPU each, opened as cuda:0.
      auto dev = std::find(cmd.begin(), cmd.end(), "--device");
      ASSERT_NE(dev, cmd.end()) << service;
      ASSERT_NE(dev + 1, cmd.end()) << service;
      EXPECT_EQ(*(dev + 1), "cuda:0") << service;
      json devices = At(s, {"deploy", "resources", "reservations", "devices"});
      ASSERT_TRUE(devices.is_array() && devices.size() == 1) << service << ": no GPU reservation";
      EXPECT_EQ(At(devices[0], {"driver"}), "nvidia") << service;
      json ids = At(devices[0], {"device_ids"});
      ASSERT_TRUE(ids.is_array() && ids.size() == 1 && ids[0].is_string()) << service;
    }
    if (binary == "asr-broker") {
      EXPECT_EQ(At(s, {"depends_on", "postgres", "condition"}), "service_healthy") << service;
      EXPECT_TRUE(s.contains("expose") && !s.contains("ports")) << "the broker is for the compose network only";
    }
  }
  EXPECT_EQ(by_binary["asr-broker"].size(), 1u);
  EXPECT_GE(by_binary["asr-worker"].size(), 2u);
  // Different GPUs for different workers.
  std::set<std::string> gpus;
  for (const auto& w : by_binary["asr-worker"]) {
    gpus.insert(At(compose["services"][w], {"deploy", "resources", "reservations", "devices"})[0]["device_ids"][0]
                    .get<std::string>());
  }
  EXPECT_EQ(gpus.size(), by_binary["asr-worker"].size());
  // PostgreSQL answers its health check with pg_isready.
  ASSERT_TRUE(compose["services"].contains("postgres"));
  EXPECT_NE(At(compose["services"]["postgres"], {"healthcheck", "test"}).dump().find("pg_isready"), std::string::npos);
  EXPECT_TRUE(compose.contains("volumes") && compose["volumes"].contains("pgdata"));
  // The env files (their committed .example) name only variables the binaries read, and no
  // password in ASRF_PG.
  std::set<std::string> all_env = bins.env["asr-broker"];
  all_env.insert(bins.env["asr-worker"].begin(), bins.env["asr-worker"].end());
  for (const auto& ef : env_files) {
    std::string path = kDeploy + "/docker/" + ef;
    if (!fs::exists(path)) path += ".example";
    ASSERT_TRUE(fs::exists(path)) << "env_file " << ef << " and its .example are missing";
    std::string text = ReadFile(path);
    for (const auto& v : EnvVarsIn(text)) EXPECT_TRUE(all_env.count(v)) << path << ": " << v;
    std::smatch m;
    if (std::regex_search(text, m, std::regex("\nASRF_PG=([^\n]*)"))) {
      EXPECT_FALSE(std::regex_search(m[1].str(), std::regex("password=|://[^/@]*:[^/@]*@"))) << m[1].str();
    }
  }
}

// ---- (c) the files parse ----

TEST(Deploy, JsonFilesParseAndTheDashboardUsesTheProvisionedDatasource) {
  std::vector<std::string> files = FilesUnder(kDeploy, {".json"});
  ASSERT_FALSE(files.empty());
  for (const auto& f : files) {
    json j = json::parse(ReadFile(f), nullptr, false);
    EXPECT_FALSE(j.is_discarded()) << f << " is not valid JSON";
  }
  json dash = json::parse(ReadFile(kDeploy + "/grafana/dashboards/asr-fleet.json"), nullptr, false);
  ASSERT_TRUE(dash.is_object());
  ASSERT_TRUE(dash["panels"].is_array() && !dash["panels"].empty());
  std::set<int> ids;
  for (const auto& p : dash["panels"]) {
    EXPECT_TRUE(ids.insert(p["id"].get<int>()).second) << "duplicate panel id " << p["id"];
    ASSERT_TRUE(p["targets"].is_array() && !p["targets"].empty()) << p["title"];
    for (const auto& t : p["targets"]) {
      EXPECT_FALSE(t.value("expr", "").empty()) << p["title"];
      EXPECT_EQ(t["datasource"]["uid"], "prometheus") << p["title"];
    }
  }
  if (HavePythonYaml()) {
    std::string error;
    json ds = LoadYaml(kDeploy + "/grafana/provisioning/datasources/prometheus.yml", &error);
    ASSERT_FALSE(ds.is_discarded()) << error;
    EXPECT_EQ(ds["datasources"][0]["uid"], "prometheus");
  }
}

TEST(Deploy, YamlFilesParse) {
  if (!HavePythonYaml()) GTEST_SKIP() << "python3-yaml is not installed (scripts/setup.sh installs it)";
  std::vector<std::string> files = FilesUnder(kDeploy, {".yml", ".yaml"});
  ASSERT_GE(files.size(), 5u);
  for (const auto& f : files) {
    std::string error;
    json j = LoadYaml(f, &error);
    EXPECT_FALSE(j.is_discarded()) << f << ": " << error;
    EXPECT_TRUE(j.is_object()) << f << " is not a YAML mapping";
  }
}

TEST(Deploy, SystemdUnitsVerify) {
  const char* analyze = "/usr/bin/systemd-analyze";
  if (!fs::exists(analyze)) GTEST_SKIP() << "systemd-analyze is not installed";
  TempDir tmp;
  // The units name the installed paths; point them at this build, and switch the optional,
  // commented-out settings on so that they are checked too.
  const std::vector<std::pair<std::string, std::string>> swaps = {
      {"/usr/local/bin/asr-broker", ASRF_BROKER_BIN},
      {"/usr/local/bin/asr-worker", ASRF_WORKER_BIN},
      {"/usr/local/bin/asr-fleet-idle-stop", kSrc + "/scripts/idle-stop.sh"},
      {"\n#RuntimeMaxSec=", "\nRuntimeMaxSec="},
      {"\n#RuntimeRandomizedExtraSec=", "\nRuntimeRandomizedExtraSec="}};
  std::vector<std::string> args = {analyze, "verify"};
  for (const auto& unit : FilesUnder(kDeploy + "/systemd", {".service", ".timer", ".target"})) {
    std::string text = ReadFile(unit);
    for (const auto& [from, to] : swaps) {
      for (size_t at = text.find(from); at != std::string::npos; at = text.find(from, at + to.size())) {
        text.replace(at, from.size(), to);
      }
    }
    std::string name = Basename(unit);
    std::ofstream(tmp / name) << text;
    // A template is verified through one instance.
    args.push_back(tmp / (name.find("@.") != std::string::npos ? name.replace(name.find("@."), 2, "@0.") : name));
  }
  ASSERT_GE(args.size(), 7u);
  RunResult r = RunCommand(args, 60000);
  EXPECT_EQ(r.code, 0) << r.err;
  // Warnings (unknown keys, unparsable values) do not change the exit status: none may name a unit.
  std::istringstream err(r.err);
  std::string line;
  while (std::getline(err, line)) EXPECT_EQ(line.find(tmp.path()), std::string::npos) << line;
}

// asr-submit --help lists its subcommands one per line, the name apart from its summary (a name as
// long as the column once ran into it), and each one it lists answers its own --help.
TEST(Deploy, SubmitHelpListsEachSubcommandApartFromItsSummary) {
  RunResult r = RunCommand({ASRF_SUBMIT_BIN, "--help"});
  ASSERT_EQ(r.code, 0) << r.err;
  std::istringstream in(r.out);
  std::string line;
  while (std::getline(in, line) && line != "subcommands:") {
  }
  static const std::regex row("^  ([a-z]+)  +\\S.*");
  std::vector<std::string> names;
  while (std::getline(in, line) && !line.empty()) {
    std::smatch m;
    ASSERT_TRUE(std::regex_match(line, m, row)) << "subcommand line without a gap: " << line;
    names.push_back(m[1].str());
  }
  ASSERT_GE(names.size(), 10u) << r.out;
  EXPECT_NE(std::find(names.begin(), names.end(), "transcribe"), names.end()) << r.out;
  for (const auto& n : names) {
    RunResult h = RunCommand({ASRF_SUBMIT_BIN, n, "--help"});
    EXPECT_EQ(h.code, 0) << n << ": " << h.err;
    std::string first = h.out.substr(0, h.out.find('\n'));
    EXPECT_EQ(first.rfind("usage: asr-submit ", 0), 0u) << n << ": " << first;
    EXPECT_NE(first.find(" " + n + " "), std::string::npos) << n << ": " << first;
  }
  // A mistyped endpoint is a usage error that names the option, not "Invalid argument" and exit 3.
  RunResult bad = RunCommand({ASRF_SUBMIT_BIN, "--broker", "bogus", "status"});
  EXPECT_EQ(bad.code, 2) << bad.err;
  EXPECT_NE(bad.err.find("--broker \"bogus\""), std::string::npos) << bad.err;
}

// ---- idle stop ----

// scripts/launch-workers.sh with a stand-in nvidia-smi (two GPUs) and a stand-in worker that
// records its CUDA_VISIBLE_DEVICES and arguments: one worker per GPU, each seeing only its GPU as
// cuda:0; --gpus picks GPUs; --same-gpu N puts N workers on GPU 0; --gpus none gives CPU workers,
// and so do CUDA_VISIBLE_DEVICES set empty, an nvidia-smi that lists no GPU ("No devices were
// found" on stdout), and a worker whose libtorch has no CUDA (a stand-in ldd shows Debian's).
TEST(Deploy, LaunchWorkersPlacesOneWorkerPerGpu) {
  TempDir d;
  fs::create_directories(d / "bin");
  auto script = [](const std::string& path, const std::string& body) {
    std::ofstream(path) << "#!/bin/sh\n" << body;
    fs::permissions(path, fs::perms::owner_all);
  };
  script(d / "bin/nvidia-smi", "printf '0\\n1\\n'\n");
  // Written aside, then renamed in: a call file is complete once it is there.
  // It stays up a little, as a worker does: the script reports workers that exit at once.
  script(d / "worker", "printf '%s|%s\\n' \"$CUDA_VISIBLE_DEVICES\" \"$*\" > \"$CALLS.$$\" && mv \"$CALLS.$$\" \"$CALLS/$$\"\n"
                       "sleep 2\n");
  script(d / "dies", "echo 'state dir locked by another worker' >&2; exit 3\n");
  std::ofstream(d / "model.pt") << "x";
  // Each case: the launch options, then the calls it must make (sorted), or an exit code.
  auto launch = [&](const std::string& name, std::vector<std::string> options, const char* cvd, int want_code,
                    const std::vector<std::string>& env = {}) -> std::vector<std::string> {
    const std::string calls = d / ("calls-" + name);
    fs::create_directories(calls);
    std::vector<std::string> argv = {"/usr/bin/env", "PATH=" + d / "bin" + ":/usr/bin:/bin", "CALLS=" + calls,
                                     "ASRF_WORKER_BIN=" + d / "worker"};
    if (cvd) argv.push_back(std::string("CUDA_VISIBLE_DEVICES=") + cvd);
    argv.insert(argv.end(), env.begin(), env.end());
    for (const std::string& a : {kSrc + "/scripts/launch-workers.sh", std::string("--broker"),
                                 std::string("tcp://127.0.0.1:1"), std::string("--state-dir"), d / ("st-" + name),
                                 std::string("--model-file"), d / "model.pt"})
      argv.push_back(a);
    argv.insert(argv.end(), options.begin(), options.end());
    RunResult r = RunCommand(argv, 30000);
    EXPECT_EQ(r.code, want_code) << name << ": " << r.err;
    std::vector<std::string> got;
    if (r.code != 0) return got;
    const size_t pids = static_cast<size_t>(std::count(r.out.begin(), r.out.end(), '\n'));
    for (int i = 0; i < 100 && static_cast<size_t>(std::distance(fs::directory_iterator(calls), {})) < pids; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    for (const auto& e : fs::directory_iterator(calls)) {
      std::ifstream in(e.path());
      std::string line;
      std::getline(in, line);
      // Keep the placement: CUDA_VISIBLE_DEVICES, --device, the state dir's last part, and the
      // options after the model.
      std::smatch m;
      EXPECT_TRUE(std::regex_search(line, m, std::regex("^([^|]*)\\|.*--device (\\S+) (?:--threads [0-9]+ )?--state-dir \\S*/(\\S+)"
                                                         "(?: --model-file \\S+)?(.*)$")))
          << name << ": " << line;
      got.push_back(m.size() == 5 ? m[1].str() + " " + m[2].str() + " " + m[3].str() + m[4].str() : line);
    }
    std::sort(got.begin(), got.end());
    return got;
  };
  using V = std::vector<std::string>;
  // GPU workers get two jobs in flight unless told otherwise; CPU workers keep the worker's default.
  EXPECT_EQ(launch("all", {}, nullptr, 0), (V{"0 cuda:0 worker-gpu0 --slots 2", "1 cuda:0 worker-gpu1 --slots 2"}));
  EXPECT_EQ(launch("visible", {}, "1", 0), (V{"1 cuda:0 worker-gpu1 --slots 2"}));
  EXPECT_EQ(launch("listed", {"--gpus", "1"}, nullptr, 0), (V{"1 cuda:0 worker-gpu1 --slots 2"}));
  EXPECT_EQ(launch("same", {"--same-gpu", "2"}, nullptr, 0),
            (V{"0 cuda:0 worker-gpu0-0 --slots 2", "0 cuda:0 worker-gpu0-1 --slots 2"}));
  EXPECT_EQ(launch("own-slots", {"--gpus", "0", "--", "--slots", "4", "--lm", "none"}, nullptr, 0),
            (V{"0 cuda:0 worker-gpu0 --slots 4 --lm none"}));
  EXPECT_EQ(launch("env-slots", {"--gpus", "0"}, nullptr, 0, {"ASRF_SLOTS=3"}), (V{"0 cuda:0 worker-gpu0"}))
      << "ASRF_SLOTS in the environment is left to the worker";
  EXPECT_EQ(launch("cpu", {"--gpus", "none", "--cpu-workers", "3", "--", "--lm", "none"}, nullptr, 0),
            (V{" cpu worker-cpu1 --lm none", " cpu worker-cpu2 --lm none", " cpu worker-cpu3 --lm none"}));
  const V two_cpu{" cpu worker-cpu1", " cpu worker-cpu2"};
  EXPECT_EQ(launch("hidden", {}, "", 0), two_cpu);
  fs::create_directories(d / "bin-none");
  script(d / "bin-none/nvidia-smi", "echo 'No devices were found'\n");
  EXPECT_EQ(launch("no-devices", {}, nullptr, 0, {"PATH=" + d / "bin-none" + ":/usr/bin:/bin"}), two_cpu);
  fs::create_directories(d / "bin-cpu-torch");
  script(d / "bin-cpu-torch/ldd", "echo '\tlibtorch_cpu.so.2.1 => /usr/lib/x86_64-linux-gnu/libtorch_cpu.so.2.1'\n");
  EXPECT_EQ(launch("cpu-torch", {}, nullptr, 0, {"PATH=" + d / "bin-cpu-torch" + ":" + d / "bin" + ":/usr/bin:/bin"}),
            two_cpu);
  fs::create_directories(d / "bin-cuda-torch");
  script(d / "bin-cuda-torch/ldd", "echo '\tlibtorch_cpu.so => /x/libtorch_cpu.so'; echo '\tlibtorch_cuda.so => /x/libtorch_cuda.so'\n");
  EXPECT_EQ(launch("cuda-torch", {}, nullptr, 0, {"PATH=" + d / "bin-cuda-torch" + ":" + d / "bin" + ":/usr/bin:/bin"}),
            (V{"0 cuda:0 worker-gpu0 --slots 2", "1 cuda:0 worker-gpu1 --slots 2"}));
  launch("contradiction", {"--gpus", "none", "--same-gpu", "2"}, nullptr, 2);
  // Worker options after -- are given once: --threads replaces the CPU workers' share, --model NAME
  // the --model-file default (the worker refuses an option twice, and both models at once); the
  // options the script sets per worker are refused there.
  EXPECT_EQ(launch("threads", {"--gpus", "none", "--cpu-workers", "1", "--", "--threads", "4"}, nullptr, 0),
            (V{" cpu worker-cpu1 --threads 4"}));
  EXPECT_EQ(launch("registry", {"--gpus", "0", "--", "--model", "en"}, nullptr, 0), (V{"0 cuda:0 worker-gpu0 --slots 2 --model en"}));
  for (const char* name : {"threads", "registry"}) {
    for (const auto& e : fs::directory_iterator(d / (std::string("calls-") + name))) {
      const std::string line = ReadFile(e.path());
      EXPECT_EQ(std::regex_search(line, std::regex("--threads .*--threads |--model-file .*--model |--model .*--model-file ")), false)
          << name << ": " << line;
    }
  }
  launch("per-worker", {"--", "--state-dir", "/tmp/x"}, nullptr, 2);
  // --same-gpu where no GPU can be used: an error, not workers that all exit at start.
  launch("same-cpu-torch", {"--same-gpu", "2"}, nullptr, 2, {"PATH=" + d / "bin-cpu-torch" + ":" + d / "bin" + ":/usr/bin:/bin"});
  launch("same-hidden", {"--same-gpu", "2"}, "", 2);
  launch("no-value", {"--gpus"}, nullptr, 2);
  // A worker that dies at start is reported, with the end of its log, and fails the launch.
  launch("dies", {"--gpus", "none", "--cpu-workers", "1"}, nullptr, 1, {"ASRF_WORKER_BIN=" + d / "dies"});
  EXPECT_NE(ReadFile(d / "st-dies/logs/worker-cpu1.log").find("state dir locked"), std::string::npos);
}

TEST(Deploy, IdleStopStopsOnlyAfterTheIdleTime) {
  if (!fs::exists(kCurl)) GTEST_SKIP() << "curl is not installed";
  TempDir tmp;
  BrokerProc b = StartBroker(tmp / "broker", tmp / "broker.log");
  std::string http = HttpEndpoint(tmp / "broker");
  ASSERT_FALSE(http.empty()) << ReadFile(tmp / "broker.log");
  const std::string state = tmp / "idle/idle-since", stopped = tmp / "stopped";
  auto idle_stop = [&](const std::string& address) {
    return RunCommand({"/usr/bin/env", "ASRF_IDLE_MINUTES=1", "ASRF_IDLE_HTTP=" + address,
                       "ASRF_IDLE_STATE_FILE=" + state, "ASRF_IDLE_STOP_COMMAND=touch " + stopped,
                       kSrc + "/scripts/idle-stop.sh"});
  };
  RunResult r = idle_stop(http);
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_TRUE(fs::exists(state)) << r.out;
  EXPECT_FALSE(fs::exists(stopped));
  // Idle for two minutes already: the next check stops the fleet and forgets the time.
  std::ofstream(state) << (std::time(nullptr) - 120) << "\n";
  r = idle_stop(http);
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_TRUE(fs::exists(stopped)) << r.out;
  EXPECT_FALSE(fs::exists(state));
  // A queued job (no worker here) is not idle; the count starts again.
  fs::remove(stopped);
  std::ofstream(state) << (std::time(nullptr) - 120) << "\n";
  ASSERT_EQ(Submit(b.endpoint, {"submit", "--kind", "echo"}).code, 0);
  ASSERT_TRUE(WaitFor([&] { return Metrics(http).find("asrf_jobs{state=\"queued\"} 1\n") != std::string::npos; },
                      5000));
  r = idle_stop(http);
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("busy"), std::string::npos) << r.out;
  EXPECT_FALSE(fs::exists(state));
  EXPECT_FALSE(fs::exists(stopped));
  // An unreachable broker is never a reason to stop.
  std::ofstream(state) << (std::time(nullptr) - 120) << "\n";
  r = idle_stop("127.0.0.1:1");
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_FALSE(fs::exists(stopped));
  EXPECT_FALSE(fs::exists(state));
}

// ---- backups ----

std::string Script(const std::string& name) { return kSrc + "/scripts/" + name; }

// Entries of a backup directory whose names start with `prefix`, sorted.
std::vector<std::string> Entries(const std::string& dir, const std::string& prefix) {
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    std::string n = e.path().filename().string();
    if (n.rfind(prefix, 0) == 0) out.push_back(e.path().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

// Row counts and checksums of what the fleet wrote, for comparing two databases.
std::string Fingerprint(PgCluster& pg) {
  return pg.Query(
      "SELECT (SELECT count(*) || ' ' || md5(coalesce(string_agg(job_id::text || ':' || lease_epoch::text || ':' || "
      "ok::text || ':' || coalesce(encode(payload, 'hex'), '') || ':' || coalesce(error, ''), ',' ORDER BY job_id), "
      "'')) FROM results)"
      " || ' | ' || (SELECT count(*) || ' ' || md5(coalesce(string_agg(concat_ws(':', id, batch, kind, state, "
      "priority, attempts, submitted_at, started_at, finished_at, worker, error, seq), ',' ORDER BY id), '')) FROM jobs)"
      " || ' | ' || (SELECT count(*) || ' ' || md5(coalesce(string_agg(id || ':' || device, ',' ORDER BY id), '')) "
      "FROM workers)"
      " || ' | ' || (SELECT string_agg(version::text, ',' ORDER BY version) FROM schema_migrations)");
}

double Since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// The test directories' cleanup (and the backup drill's) removes whole trees, and never follows a
// link out of them.
TEST(Harness, RemoveTreeRemovesNestedTreesWithoutFollowingLinks) {
  TempDir outside;
  { std::ofstream(outside / "keep.txt") << "kept\n"; }
  std::string root;
  {
    TempDir dir;
    root = dir.path();
    fs::create_directories(dir / "a/b/c");
    { std::ofstream(dir / "a/b/c/file.txt") << "x"; }
    { std::ofstream(dir / "a/top.txt") << "y"; }
    fs::create_directory_symlink(outside.path(), dir / "a/b/link");
    RemoveTree(dir / "a");
    EXPECT_FALSE(fs::exists(dir / "a"));
    EXPECT_TRUE(fs::exists(dir.path()));
    RemoveTree(dir / "missing");  // nothing to do
  }
  EXPECT_FALSE(fs::exists(root)) << "TempDir left " << root;
  EXPECT_EQ(ReadFile(outside / "keep.txt"), "kept\n");
}

TEST(Backup, RestoreDrillIntoAFreshCluster) {
  if (!fs::exists(kCurl)) GTEST_SKIP() << "curl is not installed";
  if (!fs::exists("/usr/bin/pg_dump")) GTEST_SKIP() << "pg_dump is not installed";
  TempDir fleet, pg1_dir, pg2_dir;
  auto pg1 = std::make_unique<PgCluster>(pg1_dir.path());
  ASSERT_TRUE(pg1->Start());
  BrokerProc b = StartBroker(fleet / "broker", fleet / "broker.log", {"--pg", pg1->url()});
  ASSERT_FALSE(b.endpoint.empty()) << ReadFile(fleet / "broker.log");
  Proc w = StartWorker(b.endpoint, fleet / "w", fleet / "w.log", {"--pg", pg1->url(), "--slots", "8"});
  RunResult r = Submit(b.endpoint, {"submit", "--kind", "echo", "--count", "500", "--payload", "{\"drill\":1}", "--wait"});
  ASSERT_EQ(r.code, 0) << r.err;
  ASSERT_EQ(Submit(b.endpoint, {"submit", "--kind", "fail", "--count", "3", "--wait"}).code, 1);
  ASSERT_TRUE(WaitFor(
      [&] {
        return pg1->Query("SELECT count(*) FILTER (WHERE state = 'done') || '|' || count(*) FILTER (WHERE state = "
                          "'failed') || '|' || (SELECT count(*) FROM results) FROM jobs") == "500|3|503";
      },
      20000))
      << pg1->Query("SELECT state, count(*) FROM jobs GROUP BY state");
  const std::string before = Fingerprint(*pg1);
  ASSERT_EQ(before.rfind("503 ", 0), 0u) << before;

  // Back up the running fleet: a checkpoint from the broker, then the dump.
  auto t0 = std::chrono::steady_clock::now();
  const std::string out = fleet / "backups";
  r = RunCommand({Script("backup.sh"), "--out", out, "--state-dir", fleet.path(), "--pg", pg1->url(), "--keep", "3"},
                 60000);
  ASSERT_EQ(r.code, 0) << r.out << r.err;
  double backup_s = Since(t0);
  EXPECT_NE(r.out.find("holds the journal: asking it for a checkpoint"), std::string::npos) << r.out;
  std::vector<std::string> dumps = Entries(out, "asrf-"), journals = Entries(out, "journal-");
  ASSERT_EQ(dumps.size(), 2u) << "one dump and one manifest";
  ASSERT_EQ(journals.size(), 1u);
  const std::string dump = dumps[0], manifest = dumps[1], journal = journals[0];
  ASSERT_EQ(dump.substr(dump.size() - 5), ".dump");
  ASSERT_EQ(manifest.substr(manifest.size() - 9), ".manifest");
  EXPECT_TRUE(fs::exists(journal + "/CURRENT"));
  EXPECT_TRUE(Entries(fleet / "broker", "backup-checkpoint-").empty()) << "the staging checkpoint was left behind";
  RunResult sums = RunCommand({kSh, "-c", "cd \"$1\" && sha256sum -c --strict --quiet \"$2\"", "sh", out,
                               Basename(manifest)});
  EXPECT_EQ(sums.code, 0) << sums.out << sums.err;
  EXPECT_EQ(Fingerprint(*pg1), before) << "the database changed during the backup";

  // Lose everything: the fleet, then the cluster and its files.
  w.Signal(SIGTERM);
  EXPECT_EQ(w.Wait(20000), 0);
  b.proc.Signal(SIGTERM);
  EXPECT_EQ(b.proc.Wait(20000), 0);
  ASSERT_TRUE(pg1->Stop());
  RemoveTree(pg1_dir / "pg");
  ASSERT_FALSE(fs::exists(pg1_dir / "pg/data"));
  pg1.reset();

  // A fresh cluster in a new place; restore the database and the journal.
  auto t1 = std::chrono::steady_clock::now();
  PgCluster pg2(pg2_dir.path());
  ASSERT_TRUE(pg2.Start());
  double cluster_s = Since(t1);
  auto t2 = std::chrono::steady_clock::now();
  const std::string restored = fleet / "restored";
  r = RunCommand({Script("restore.sh"), dump, "--pg", pg2.url(), "--journal", journal, "--state-dir", restored}, 60000);
  ASSERT_EQ(r.code, 0) << r.out << r.err;
  double restore_s = Since(t2);
  EXPECT_NE(r.out.find("matches"), std::string::npos) << "the manifest was not checked\n" << r.out;
  EXPECT_EQ(Fingerprint(pg2), before);
  std::cout << "restore drill: " << Since(t0) << " s (backup " << backup_s << " s, fresh cluster " << cluster_s
            << " s, restore " << restore_s << " s)" << std::endl;

  // A second restore into the now non-empty database is refused, and changes nothing.
  r = RunCommand({Script("restore.sh"), dump, "--pg", pg2.url()}, 60000);
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_NE(r.err.find("not empty"), std::string::npos) << r.err;
  EXPECT_EQ(Fingerprint(pg2), before);

  // A job the database holds and the journal copy does not (submitted between the journal's copy
  // and the dump on a busy fleet).
  pg2.Query("INSERT INTO jobs (id, batch, kind, state, submitted_at, seq) VALUES (900, 'late', 'echo', 'done', now(), 1)");

  // The restored journal: a broker on it knows every job, and numbers new ones after the
  // database's highest id, not over the late job.
  BrokerProc b2 = StartBroker(restored + "/broker", fleet / "broker2.log", {"--pg", pg2.url()});
  ASSERT_FALSE(b2.endpoint.empty()) << ReadFile(fleet / "broker2.log");
  Counts c = StatusCounts(b2.endpoint);
  EXPECT_EQ(c.done, 500);
  EXPECT_EQ(c.failed, 3);
  EXPECT_EQ(c.total(), 503);
  RunResult next = Submit(b2.endpoint, {"submit", "--kind", "echo"});
  ASSERT_EQ(next.code, 0) << next.err;
  EXPECT_EQ(Submit(b2.endpoint, {"status", "901"}).code, 0) << ReadFile(fleet / "broker2.log");
  EXPECT_NE(Submit(b2.endpoint, {"status", "504"}).code, 0) << "a new job took the id after the journal's last";
  EXPECT_FALSE(fs::exists(restored + "/broker/continue-ids-after-postgres")) << "the restore's marker stayed";
}

TEST(Backup, StoppedBrokerRetentionAndRefusals) {
  if (!fs::exists("/usr/bin/pg_dump")) GTEST_SKIP() << "pg_dump is not installed";
  TempDir fleet, pg_dir;
  PgCluster pg(pg_dir.path());
  ASSERT_TRUE(pg.Start());
  ASSERT_EQ(RunCommand({ASRF_BROKER_BIN, "--migrate", "--pg", pg.url()}).code, 0);
  {
    BrokerProc b = StartBroker(fleet / "broker", fleet / "broker.log");
    ASSERT_FALSE(b.endpoint.empty());
    ASSERT_EQ(Submit(b.endpoint, {"submit", "--kind", "echo", "--count", "7"}).code, 0);
    b.proc.Signal(SIGTERM);
    ASSERT_EQ(b.proc.Wait(20000), 0);
  }
  const std::string out = fleet / "backups";
  auto backup = [&] {
    return RunCommand({Script("backup.sh"), "--out", out, "--state-dir", fleet.path(), "--pg", pg.url(), "--keep", "2"},
                      60000);
  };
  RunResult r = backup();
  ASSERT_EQ(r.code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("not running): copying it with cp -a"), std::string::npos) << r.out;
  std::vector<std::string> first = Entries(out, "asrf-");
  ASSERT_EQ(first.size(), 2u);
  EXPECT_NE(ReadFile(first[1]).find("# journal: cp -a"), std::string::npos) << ReadFile(first[1]);
  // What a failed run would leave: removed by the next run, being older than a complete backup.
  fs::create_directories(out + "/journal-20000101T000000Z");
  ASSERT_EQ(backup().code, 0);
  r = backup();
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("retention (--keep 2): deleting backup"), std::string::npos) << r.out;
  EXPECT_EQ(Entries(out, "asrf-").size(), 4u) << "two dumps and two manifests";
  EXPECT_EQ(Entries(out, "journal-").size(), 2u);
  EXPECT_FALSE(fs::exists(first[0])) << "the oldest backup was kept";
  EXPECT_FALSE(fs::exists(out + "/journal-20000101T000000Z"));

  // A journal is never put under a running broker, and a database name must be clean of passwords.
  BrokerProc b = StartBroker(fleet / "broker", fleet / "broker.log");
  ASSERT_FALSE(b.endpoint.empty());
  std::string journal = Entries(out, "journal-").back();
  r = RunCommand({Script("restore.sh"), "--journal", journal, "--state-dir", fleet.path(), "--force"});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("is running"), std::string::npos) << r.err;
  EXPECT_EQ(StatusCounts(b.endpoint).queued, 7);
  // Another broker's HTTP address given by mistake: its journal is never saved as this one's.
  TempDir other;
  BrokerProc b2 = StartBroker(other / "broker", other / "broker.log");
  ASSERT_FALSE(b2.endpoint.empty());
  r = RunCommand({Script("backup.sh"), "--out", out, "--state-dir", fleet.path(), "--no-pg", "--http",
                  HttpEndpoint(other / "broker")}, 60000);
  EXPECT_EQ(r.code, 1) << r.out << r.err;
  // That broker refuses to write outside its own state dir (and, were it asked for a folder of
  // its own, backup.sh would see a PID that is not the lock holder's).
  EXPECT_TRUE(r.err.find("inside the state dir") != std::string::npos || r.err.find("not PID") != std::string::npos)
      << r.err;
  EXPECT_EQ(Entries(out, "journal-").size(), 2u) << "a journal was kept from the wrong broker";
  r = RunCommand({Script("backup.sh"), "--out", out, "--state-dir", fleet.path(), "--pg",
                  "postgresql://asrf:secret@localhost/asrf"});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("password"), std::string::npos) << r.err;
  EXPECT_EQ(RunCommand({Script("backup.sh"), "--no-pg", "--no-journal"}).code, 2);
  EXPECT_EQ(RunCommand({Script("backup.sh"), "--keep", "x"}).code, 2);
  EXPECT_EQ(RunCommand({Script("restore.sh")}).code, 2);
  EXPECT_EQ(RunCommand({Script("backup.sh"), "--help"}).code, 0);
  EXPECT_EQ(RunCommand({Script("restore.sh"), "--help"}).code, 0);
}

}  // namespace
}  // namespace asrf::testing
