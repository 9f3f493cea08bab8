// EventSink: copies job lifecycle rows from the journal ("e/" records) to PostgreSQL's jobs table,
// on its own thread, in batches (one multi-row upsert per batch), then erases what it copied.
// While PostgreSQL is down the rows simply stay in the journal and are caught up later; nothing
// on the broker's poll thread ever waits for PostgreSQL. The same thread answers result lookups
// for jobs whose result the broker has dropped after its retention period. It also clears the
// bytes of training checkpoints no job can resume from any more: those of done jobs, and of
// cancelled jobs the broker has forgotten (ForgetCheckpoints); the index rows stay.
//
// Thread-safety: Notify, Lookup, TakeLookups and GetStats may be called from any thread.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"
#include "schema/protocol.h"

namespace asrf {

class Journal;

struct EventSinkOptions {
  std::string conninfo;
  size_t max_rows = 2000;   // rows per upsert
  int64_t retry_ms = 1000;  // reconnect interval while PostgreSQL is down
  int64_t statement_timeout_ms = 60000;  // one statement held longer (a lock elsewhere) fails
};

struct EventSinkStats {
  bool pg_up = false;
  uint64_t rows_written = 0;  // rows upserted so far
  uint64_t records_behind = 0;  // "e/" records not yet in PostgreSQL (as of the last pass)
};

// A STATUS/RESULTS answer the poll thread owes a client, completed from PostgreSQL.
struct ResultLookup {
  std::string routing;
  uint64_t req = 0;
  proto::JobInfo info;  // filled in: result and error from the results table when found
  bool found = false;
  std::string error;    // why the lookup failed
  // A MODELS request (registry) instead of a result lookup when models.op is set; answered in
  // `reply` (or `error`, with error_code).
  proto::ModelsReq models;
  proto::Reply reply;
  std::string error_code;
};

class EventSink {
 public:
  // `journal` must outlive the sink. The connection is made (and migrations applied) on the
  // sink's thread, so an unreachable PostgreSQL never delays the broker's start.
  EventSink(const EventSinkOptions& options, Journal* journal);
  ~EventSink();

  // New "e/" records were queued to the journal.
  void Notify();
  // Cancelled jobs the broker has forgotten: no RETRY can bring them back (a gang is forgotten
  // only once every rank is done or cancelled), so their checkpoints' bytes go. Best effort.
  void ForgetCheckpoints(std::vector<uint64_t> job_ids);
  // Queues a lookup; false (nothing queued) while kMaxLookups, or kMaxLookupBytes of model bytes,
  // wait for PostgreSQL: a slow database must not make the broker hold whatever clients send.
  static constexpr size_t kMaxLookups = 1000;
  static constexpr size_t kMaxLookupBytes = 256u << 20;
  [[nodiscard]] bool Lookup(ResultLookup lookup);
  int wake_fd() const;
  std::vector<ResultLookup> TakeLookups();
  EventSinkStats GetStats() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace asrf
