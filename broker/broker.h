// Broker: the ZeroMQ ROUTER loop that owns the queue. One thread polls the socket and the
// journal's completion fd; it never waits on disk (the Journal writes on its own thread).
//
// Loop, as in schema/protocol.md: poll (10 ms while work is runnable, else 50 ms); handle at most
// `max_messages_per_wake` messages, one handler per command; collect journal completions; then
// timers (expire workers and timed-out jobs, promote backed-off jobs, heartbeats, retention,
// watchers) and dispatch to workers with free credits; finally flush batched events.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "common/status.h"

namespace rocksdb {
class Env;
}

namespace asrf {

struct BrokerOptions {
  std::string listen = "tcp://127.0.0.1:5555";
  std::string state_dir = "asrf-state/broker";
  std::string endpoint_file;            // default: <state_dir>/broker.endpoint
  int max_attempts = 3;                 // counted attempts before a job is dead
  int64_t heartbeat_ms = 1000;          // both ways
  int heartbeat_misses = 3;             // a worker silent this many intervals loses its leases
  int64_t backoff_ms = 500;             // first retry delay; doubles per attempt
  int64_t backoff_max_ms = 30000;
  int64_t result_retention_s = 86400;   // results are kept this long after a job ends
  // Done and cancelled jobs leave memory and journal this long after their end; 0 = never; < 0:
  // three days with --pg (their history is there), never without.
  int64_t forget_after_s = -1;
  int64_t watch_max_ms = 60000;         // longest WATCH subscription without renewal
  int max_messages_per_wake = 2000;     // fairness cap per poll wake-up
  std::string pg;                       // libpq conninfo for the job-history sink; empty: none
  int64_t pg_statement_timeout_ms = 60000;  // the longest one PostgreSQL statement may take
  std::string http;                     // HOST:PORT for /metrics, /healthz, /readyz, /; empty: none
  // Transcription batching (see broker/batcher.h): padded audio seconds and segments per batch,
  // and how long a partial batch waits for more.
  // A GPU worker needs batches this large to keep its GPU busy (bench/RESULTS.md: 1,731 -> 2,705
  // RTFx on one H200, with two jobs in flight); a CPU worker runs them as fast as 160-second ones.
  double batch_budget_s = 640;
  int batch_max_items = 256;
  int64_t batch_max_delay_ms = 200;
  // Gangs: rank 0 of a gang serves its rendezvous on gang_port_base + (a counter mod 1000).
  int gang_port_base = 29500;
  rocksdb::Env* journal_env = nullptr;  // tests only

  // Clamps values into their sane ranges; returns an error for values that cannot be used.
  Status Sanitize();
};

class Broker {
 public:
  // Opens the journal, replays it and binds the socket.
  static Status Open(const BrokerOptions& options, std::unique_ptr<Broker>* out);
  ~Broker();

  // The endpoint actually bound (a wildcard port resolved).
  std::string endpoint() const;
  // The HTTP port bound, 0 without --http.
  int http_port() const;

  // Serves until *stop becomes true; then writes what is pending and returns.
  Status Run(const std::atomic<bool>* stop);

  struct Impl;

 private:
  explicit Broker(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace asrf
