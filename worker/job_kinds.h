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
  // Gang members: this job's rank, the gang's size and rank 0's rendezvous "host:port".
  uint32_t rank = 0;
  uint32_t world_size = 1;
  std::string rendezvous;
};

// Returns ok with *result filled, or an error whose message becomes the job's error.
using JobFn = std::function<Status(std::string_view payload, const JobContext& ctx, std::string* result)>;

// A batched kind runs many jobs in one call (transcription: one device batch). `payloads[i]` is
// job i's payload; the function fills (*statuses)[i] and (*results)[i] for every job (both
// vectors are pre-sized). `model` is the model the broker chose for the batch.
struct BatchContext {
  std::string model;
  // True when every job of the batch was cancelled.
  std::function<bool()> all_cancelled;
};
using BatchFn = std::function<void(const std::vector<std::string_view>& payloads, const BatchContext& ctx,
                                   std::vector<Status>* statuses, std::vector<std::string>* results)>;

class JobRegistry {
 public:
  void Register(std::string kind, JobFn fn) { kinds_[std::move(kind)] = std::move(fn); }
  // A batched kind; jobs of it may still arrive one at a time (a group of one).
  void RegisterBatch(std::string kind, BatchFn fn) {
    kinds_[kind] = nullptr;
    batch_kinds_[std::move(kind)] = std::move(fn);
  }
  const BatchFn* FindBatch(const std::string& kind) const {
    auto it = batch_kinds_.find(kind);
    return it == batch_kinds_.end() ? nullptr : &it->second;
  }
  // Called on the worker's poll thread once the broker has recorded a job of `kind` as done (it
  // acknowledged this worker's successful result): what the kind kept to resume the job can go.
  // Must not block.
  void OnDone(const std::string& kind, std::function<void(uint64_t id)> fn) { on_done_[kind] = std::move(fn); }
  void Done(const std::string& kind, uint64_t id) const {
    auto it = on_done_.find(kind);
    if (it != on_done_.end()) it->second(id);
  }
  // Models this worker holds (advertised to the broker); the first is its default.
  void AddModel(std::string name) { models_.push_back(std::move(name)); }
  const std::vector<std::string>& models() const { return models_; }
  const JobFn* Find(const std::string& kind) const {
    auto it = kinds_.find(kind);
    return it == kinds_.end() || !it->second ? nullptr : &it->second;
  }
  std::vector<std::string> Kinds() const {
    std::vector<std::string> out;
    for (const auto& [k, fn] : kinds_) out.push_back(k);
    return out;
  }

 private:
  std::map<std::string, JobFn> kinds_;
  std::map<std::string, BatchFn> batch_kinds_;
  std::map<std::string, std::function<void(uint64_t)>> on_done_;
  std::vector<std::string> models_;
};

// The diagnostic kinds used by tests and benchmarks; every payload must be JSON text:
//   echo  returns its payload byte for byte;
//   sleep {"ms":N} sleeps N ms (0..3600000), stopping early when cancelled;
//   fail  {"message":"..."} (optional) fails with that message;
//   crash aborts the worker process (for fault tests).
void RegisterDiagnosticKinds(JobRegistry* registry);

}  // namespace asrf
