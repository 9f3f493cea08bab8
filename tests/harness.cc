#include "tests/harness.h"

#include <fcntl.h>
#include <ftw.h>
#include <cstdio>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "common/clock.h"

extern char** environ;

namespace asrf::testing {

TempDir::TempDir() {
  const char* base = std::getenv("TMPDIR");
  std::string tmpl = std::string(base && *base ? base : "/tmp") + "/asrf-test-XXXXXX";
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  char* p = mkdtemp(buf.data());
  path_ = p ? p : "/tmp";
}

void RemoveTree(const std::string& path) {
  // Depth first, without following links: files and links, then the emptied directories.
  nftw(path.c_str(), [](const char* p, const struct stat*, int, struct FTW*) { return ::remove(p); }, 32,
       FTW_DEPTH | FTW_PHYS);
}

TempDir::~TempDir() {
  if (std::getenv("ASRF_KEEP_TMP")) return;
  RemoveTree(path_);
}

static pid_t Spawn(const std::vector<std::string>& argv, int out_fd, int err_fd) {
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  int devnull = open("/dev/null", O_RDONLY);
  posix_spawn_file_actions_adddup2(&fa, devnull, 0);
  posix_spawn_file_actions_adddup2(&fa, out_fd, 1);
  posix_spawn_file_actions_adddup2(&fa, err_fd, 2);
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = -1;
  if (posix_spawn(&pid, args[0], &fa, nullptr, args.data(), environ) != 0) pid = -1;
  posix_spawn_file_actions_destroy(&fa);
  close(devnull);
  return pid;
}

Proc::Proc(std::vector<std::string> argv, const std::string& log_path) {
  int fd = open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  pid_ = Spawn(argv, fd, fd);
  close(fd);
}

Proc::~Proc() {
  if (pid_ > 0 && Running()) {
    kill(pid_, SIGKILL);
    Wait(5000);
  }
}

Proc::Proc(Proc&& o) noexcept : pid_(o.pid_), status_(o.status_) { o.pid_ = -1; }
Proc& Proc::operator=(Proc&& o) noexcept {
  if (this != &o) {
    if (pid_ > 0 && Running()) {
      kill(pid_, SIGKILL);
      Wait(5000);
    }
    pid_ = o.pid_;
    status_ = o.status_;
    o.pid_ = -1;
  }
  return *this;
}

bool Proc::Running() {
  if (pid_ <= 0 || status_ >= 0) return false;
  int st = 0;
  pid_t r = waitpid(pid_, &st, WNOHANG);
  if (r == pid_) {
    status_ = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    return false;
  }
  return true;
}

void Proc::Signal(int sig) {
  if (pid_ > 0 && status_ < 0) kill(pid_, sig);
}

int Proc::Wait(int timeout_ms) {
  if (pid_ <= 0) return -1;
  int64_t deadline = MonoMs() + timeout_ms;
  while (status_ < 0) {
    if (!Running()) break;
    if (MonoMs() > deadline) return -1;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return status_;
}

RunResult RunCommand(const std::vector<std::string>& argv, int timeout_ms) {
  RunResult r;
  int out[2], err[2];
  if (pipe2(out, O_CLOEXEC) != 0 || pipe2(err, O_CLOEXEC) != 0) return r;
  int64_t t0 = MonoMs();
  pid_t pid = Spawn(argv, out[1], err[1]);
  close(out[1]);
  close(err[1]);
  if (pid <= 0) {
    // Not started (e.g. the binary is missing): never waitpid(-1), which waits for any child.
    close(out[0]);
    close(err[0]);
    r.err = "cannot start " + argv[0];
    return r;
  }
  pollfd fds[2] = {{out[0], POLLIN, 0}, {err[0], POLLIN, 0}};
  int open_fds = 2;
  int64_t deadline = t0 + timeout_ms;
  bool killed = false;
  while (open_fds > 0) {
    int left = static_cast<int>(std::max<int64_t>(deadline - MonoMs(), 0));
    if (left == 0 && !killed) {
      kill(pid, SIGKILL);
      killed = true;
    }
    poll(fds, 2, killed ? 1000 : std::min(left, 200));
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || !(fds[i].revents & (POLLIN | POLLHUP))) continue;
      char buf[65536];
      ssize_t n = read(fds[i].fd, buf, sizeof(buf));
      if (n <= 0) {
        close(fds[i].fd);
        fds[i].fd = -1;
        open_fds--;
      } else {
        (i == 0 ? r.out : r.err).append(buf, n);
      }
    }
  }
  int st = 0;
  waitpid(pid, &st, 0);
  r.code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  r.seconds = (MonoMs() - t0) / 1000.0;
  return r;
}

bool WaitFor(const std::function<bool()>& pred, int timeout_ms) {
  int64_t deadline = MonoMs() + timeout_ms;
  while (MonoMs() < deadline) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return pred();
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

BrokerProc StartBroker(const std::string& state_dir, const std::string& log, std::vector<std::string> extra,
                       const std::string& listen) {
  std::filesystem::create_directories(state_dir);
  std::filesystem::remove(state_dir + "/broker.endpoint");
  std::vector<std::string> argv = {ASRF_BROKER_BIN, "--listen", listen, "--state-dir", state_dir, "--http",
                                   "127.0.0.1:0"};
  argv.insert(argv.end(), extra.begin(), extra.end());
  BrokerProc b;
  b.proc = Proc(argv, log);
  WaitFor([&] { return !ReadFile(state_dir + "/broker.endpoint").empty() || !b.proc.Running(); }, 20000);
  b.endpoint = ReadFile(state_dir + "/broker.endpoint");
  while (!b.endpoint.empty() && (b.endpoint.back() == '\n' || b.endpoint.back() == ' ')) b.endpoint.pop_back();
  return b;
}

Proc StartWorker(const std::string& endpoint, const std::string& state_dir, const std::string& log,
                 std::vector<std::string> extra) {
  std::vector<std::string> argv = {ASRF_WORKER_BIN, "--broker", endpoint, "--state-dir", state_dir};
  argv.insert(argv.end(), extra.begin(), extra.end());
  return Proc(argv, log);
}

RunResult Submit(const std::string& endpoint, std::vector<std::string> words, int timeout_ms) {
  std::vector<std::string> argv = {ASRF_SUBMIT_BIN, "--broker", endpoint};
  argv.insert(argv.end(), words.begin(), words.end());
  return RunCommand(argv, timeout_ms);
}

Counts StatusCounts(const std::string& endpoint, const std::string& batch) {
  std::vector<std::string> words = {"status", "--json"};
  if (!batch.empty()) words = {"status", "--batch", batch, "--json"};
  RunResult r = Submit(endpoint, words, 20000);
  Counts c;
  auto j = nlohmann::json::parse(r.out, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return c;
  auto get = [&](const char* k) { return j.contains(k) && j[k].is_number_integer() ? j[k].get<long>() : -1; };
  c.queued = get("queued");
  c.leased = get("leased");
  c.done = get("done");
  c.failed = get("failed");
  c.dead = get("dead");
  c.cancelled = get("cancelled");
  return c;
}

PgCluster::PgCluster(std::string state_dir) : state_dir_(std::move(state_dir)) {}

PgCluster::~PgCluster() { Stop(); }

bool PgCluster::Start() {
  RunResult r = RunCommand({ASRF_SOURCE_DIR "/scripts/pg-local.sh", "start", state_dir_}, 120000);
  if (r.code != 0) {
    std::fprintf(stderr, "pg-local.sh start failed: %s\n", r.err.c_str());
    return false;
  }
  url_ = RunCommand({ASRF_SOURCE_DIR "/scripts/pg-local.sh", "url", state_dir_}).out;
  while (!url_.empty() && url_.back() == '\n') url_.pop_back();
  return !url_.empty();
}

bool PgCluster::Stop() {
  return RunCommand({ASRF_SOURCE_DIR "/scripts/pg-local.sh", "stop", state_dir_}, 120000).code == 0;
}

std::string PgCluster::Query(const std::string& sql) {
  RunResult r = RunCommand({"/usr/bin/psql", url_, "-Atqc", sql}, 30000);
  while (!r.out.empty() && r.out.back() == '\n') r.out.pop_back();
  return r.code == 0 ? r.out : "ERROR: " + r.err;
}

InProcBroker::InProcBroker(BrokerOptions options) {
  open_status_ = Broker::Open(options, &broker_);
  if (!open_status_.ok()) return;
  endpoint_ = broker_->endpoint();
  thread_ = std::thread([this] { (void)broker_->Run(&stop_); });
}

InProcBroker::~InProcBroker() { Stop(); }

void InProcBroker::Stop() {
  stop_ = true;
  if (thread_.joinable()) thread_.join();
  broker_.reset();
}

}  // namespace asrf::testing
