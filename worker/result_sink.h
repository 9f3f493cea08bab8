// ResultSink: makes each finished job's result durable before the broker hears of it.
//
// A worker with --pg hands its results here instead of sending them straight to the broker. The
// sink's thread upserts them into PostgreSQL in batches, fenced by lease epoch (a row is only
// replaced by a result from a newer lease). While PostgreSQL is unreachable, or while older
// results still wait in the outbox, results go to a RocksDB outbox in the worker's state dir
// (synced), which is delivered in order once PostgreSQL is back and survives a worker restart.
// Either way a result is "durable" once it is in PostgreSQL or the outbox, and only then is it
// handed back through TakeDurable() for the RESULT message.
//
// Thread-safety: Put, TakeDurable, Pending and GetStats may be called from any thread.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"
#include "schema/protocol.h"

namespace asrf {

struct ResultSinkOptions {
  std::string conninfo;          // libpq conninfo (no password in it)
  std::string outbox_dir;        // RocksDB directory, created if missing
  std::string worker_id, host, device;
  size_t max_batch = 2000;       // results per INSERT
  int64_t retry_ms = 1000;       // reconnect interval while PostgreSQL is down
  int64_t statement_timeout_ms = 60000;  // a write that takes longer goes to the outbox
};

struct ResultSinkStats {
  uint64_t written = 0;          // rows upserted straight away
  uint64_t outboxed = 0;         // results that went through the outbox
  uint64_t delivered = 0;        // outbox entries delivered later
  uint64_t outbox_size = 0;      // entries waiting now
  uint64_t set_aside = 0;        // rows PostgreSQL refuses for their content, kept apart in the outbox
  bool pg_up = false;
};

class ResultSink {
 public:
  static Status Open(const ResultSinkOptions& options, std::unique_ptr<ResultSink>* out);
  // Makes everything already Put durable (PostgreSQL or outbox), then stops.
  ~ResultSink();

  void Put(std::vector<proto::JobResult> results);
  // Readable while durable results wait to be taken.
  int wake_fd() const;
  std::vector<proto::JobResult> TakeDurable();
  // Results Put but not yet durable.
  size_t Pending() const;
  ResultSinkStats GetStats() const;

  struct Impl;

 private:
  explicit ResultSink(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace asrf
