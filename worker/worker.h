// Worker: connects to the broker, advertises its device and free slots, pulls work with credits,
// runs jobs on `slots` executor threads through a JobRegistry and reports results in batches.
//
// Threads: one poll thread owns the DEALER socket (heartbeats, ASSIGN, CANCEL_JOBS, RESULT);
// executor threads only run job functions and hand results back through a queue + eventfd.
// If the broker goes quiet for heartbeat_misses intervals the worker reconnects and re-sends
// READY with the leases it still runs.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "common/status.h"
#include "worker/job_kinds.h"

namespace asrf {

struct WorkerOptions {
  std::string broker = "tcp://127.0.0.1:5555";
  std::string device = "cpu";          // "cpu" or "cuda:N"
  std::string state_dir = "asrf-state/worker";
  std::string worker_id;               // default: <host>/<device>/<pid>
  int slots = 1;                       // jobs run at once
  int64_t heartbeat_ms = 1000;
  int heartbeat_misses = 3;
  int64_t drain_ack_wait_ms = 3000;    // on stop, how long to wait for the last RESULT_ACKs
  std::string pg;                      // libpq conninfo; empty: results go only to the broker
  int64_t pg_statement_timeout_ms = 60000;  // the longest one PostgreSQL statement of this worker may take
  std::string advertise_host;          // how other workers reach this one (gang rendezvous); default hostname
  std::string gpu;                     // on cuda:N: the GPU's UUID (gang ranks go to distinct GPUs)
  bool gangs = true;                   // built with the gang backend its device needs (NCCL / Gloo)
  // Bytes in use on the worker's GPU, sent in heartbeats; empty (CPU workers): 0.
  std::function<int64_t()> gpu_memory;

  Status Sanitize();
};

class Worker {
 public:
  Worker(WorkerOptions options, JobRegistry registry);
  ~Worker();

  // Runs until *stop is set, then drains: no new work, running jobs finish, results are sent,
  // DISCONNECT is said. Returns an error only for a setup failure.
  Status Run(const std::atomic<bool>* stop);

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace asrf
