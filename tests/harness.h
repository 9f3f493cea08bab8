// Test harness: temporary directories, real processes (started, signalled, waited for) and
// in-process brokers on loopback with free ports.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "broker/broker.h"

namespace asrf::testing {

// Removes `path` and everything under it (nothing happens if it is missing). Through nftw(3), not
// std::filesystem::remove_all: a CUDA PyTorch wheel's libtorch_cpu.so exports a remove_all of its
// own, test binaries that link libtorch bind to it, and it crashes there (seen with torch 2.11).
void RemoveTree(const std::string& path);

// A fresh directory under $TMPDIR, removed when the object dies (kept if ASRF_KEEP_TMP is set).
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// A child process; SIGKILLed when the object dies if still running.
class Proc {
 public:
  Proc() = default;
  Proc(std::vector<std::string> argv, const std::string& log_path);
  ~Proc();
  Proc(Proc&& o) noexcept;
  Proc& operator=(Proc&& o) noexcept;

  pid_t pid() const { return pid_; }
  bool Running();
  void Signal(int sig);
  // Waits for exit; returns the exit status (128+signal when killed) or -1 on timeout.
  int Wait(int timeout_ms);

 private:
  pid_t pid_ = -1;
  int status_ = -1;
};

struct RunResult {
  int code = -1;
  std::string out;  // stdout
  std::string err;  // stderr
  double seconds = 0;
};

// Runs argv to completion (killing it after timeout_ms) and captures its output.
RunResult RunCommand(const std::vector<std::string>& argv, int timeout_ms = 60000);

// Heartbeats every 200 ms, 3 missed: lost workers are noticed in 0.6 s instead of 3 s.
inline const std::vector<std::string> kFastHeartbeats = {"--heartbeat-ms", "200", "--heartbeat-misses", "3"};

// a followed by b.
inline std::vector<std::string> With(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// Calls pred every 20 ms until it returns true or timeout_ms passes.
bool WaitFor(const std::function<bool()>& pred, int timeout_ms);

// Reads a whole file; empty if missing.
std::string ReadFile(const std::string& path);

// Starts asr-broker on a free loopback port and waits for its endpoint file.
struct BrokerProc {
  Proc proc;
  std::string endpoint;
};
BrokerProc StartBroker(const std::string& state_dir, const std::string& log, std::vector<std::string> extra = {},
                       const std::string& listen = "tcp://127.0.0.1:0");

Proc StartWorker(const std::string& endpoint, const std::string& state_dir, const std::string& log,
                 std::vector<std::string> extra = {});

// asr-submit with --broker endpoint and the given words.
RunResult Submit(const std::string& endpoint, std::vector<std::string> words, int timeout_ms = 60000);

// Parses `asr-submit status --json` output into counts (throws nothing; missing keys are -1).
struct Counts {
  long queued = -1, leased = -1, done = -1, failed = -1, dead = -1, cancelled = -1;
  long total() const { return queued + leased + done + failed + dead + cancelled; }
};
Counts StatusCounts(const std::string& endpoint, const std::string& batch = "");

// A private PostgreSQL cluster under `state_dir` (scripts/pg-local.sh), stopped on destruction.
class PgCluster {
 public:
  explicit PgCluster(std::string state_dir);
  ~PgCluster();
  bool Start();
  bool Stop();
  const std::string& url() const { return url_; }
  // Runs SQL through psql; returns its trimmed output (fields separated by '|', rows by '\n').
  std::string Query(const std::string& sql);

 private:
  std::string state_dir_;
  std::string url_;
};

// A broker running on a thread of this process.
class InProcBroker {
 public:
  explicit InProcBroker(BrokerOptions options);
  ~InProcBroker();
  const std::string& endpoint() const { return endpoint_; }
  const Status& open_status() const { return open_status_; }
  void Stop();

 private:
  std::unique_ptr<Broker> broker_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
  std::string endpoint_;
  Status open_status_;
};

}  // namespace asrf::testing
