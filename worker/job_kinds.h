// Job kinds: what a worker knows how to run. Each kind is a function from a job's payload to a
// result or an error. Kinds run on executor threads, several at once; they must be thread-safe.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace asrf {

struct JobContext {
  uint64_t id = 0;
  uint32_t attempt = 0;
  // Set when the broker cancels the job (client cancel, timeout). Long kinds poll it and return.
  const std::atomic<bool>* cancelled = nullptr;
  bool Cancelled() const { return cancelled && cancelled->load(std::memory_order_relaxed); }
  // Set when the worker drains: long kinds save their state and return Busy, which gives the job
  // back to the broker without counting an attempt.
  const std::atomic<bool>* stopping = nullptr;
  // Reports progress (JSON text) to the broker; the latest report wins. May be empty.
  std::function<void(const std::string&)> progress;
};

// Returns ok with *result filled, or an error whose message becomes the job's error.
using JobFn = std::function<Status(std::string_view payload, const JobContext& ctx, std::string* result)>;

class JobRegistry {
 public:
  void Register(std::string kind, JobFn fn) { kinds_[std::move(kind)] = std::move(fn); }
  const JobFn* Find(const std::string& kind) const {
    auto it = kinds_.find(kind);
    return it == kinds_.end() ? nullptr : &it->second;
  }
  std::vector<std::string> Kinds() const {
    std::vector<std::string> out;
    for (const auto& [k, fn] : kinds_) out.push_back(k);
    return out;
  }

 private:
  std::map<std::string, JobFn> kinds_;
};

// The diagnostic kinds used by tests and benchmarks; every payload must be JSON text:
//   echo  returns its payload byte for byte;
//   sleep {"ms":N} sleeps N ms (0..3600000), stopping early when cancelled;
//   fail  {"message":"..."} (optional) fails with that message;
//   crash aborts the worker process (for fault tests).
void RegisterDiagnosticKinds(JobRegistry* registry);

}  // namespace asrf
