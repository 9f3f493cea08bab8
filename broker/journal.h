// Journal: the broker's durable queue, a RocksDB database written by one dedicated thread.
//
// The poll thread never touches the disk: it hands a JournalBatch to Write() and carries on. The
// journal thread takes every batch queued since its last write, writes them as one RocksDB
// WriteBatch, and syncs the WAL once if any of them asked for it (group commit: many SUBMITs share
// one fsync). Then it posts a Completion per token and makes wake_fd() readable; the poll thread
// collects them with TakeCompletions() and only then acknowledges anything.
//
// Thread-safety: Write, TakeCompletions, Flush and Stats may be called from any thread.
// Scan and generation() only before the first Write.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace rocksdb {
class DB;
class Env;
}  // namespace rocksdb

namespace asrf {

struct JournalOptions {
  std::string dir;                    // created if missing
  rocksdb::Env* env = nullptr;        // nullptr: the default Env (tests inject faults here)
  size_t max_group_bytes = 32u << 20; // a group write stops growing past this many bytes
};

// An ordered list of puts and deletes applied atomically.
struct JournalBatch {
  struct Op {
    std::string key;
    std::string value;
    bool erase = false;
  };
  std::vector<Op> ops;
  void Put(std::string key, std::string value) { ops.push_back({std::move(key), std::move(value), false}); }
  void Erase(std::string key) { ops.push_back({std::move(key), {}, true}); }
  bool empty() const { return ops.empty(); }
};

struct JournalCompletion {
  uint64_t token = 0;
  Status status;  // ok: written (and synced, if asked) before this completion was posted
};

struct JournalStats {
  uint64_t writes = 0;   // RocksDB write calls
  uint64_t syncs = 0;    // of which synced
  uint64_t batches = 0;  // JournalBatches written
  uint64_t errors = 0;
  bool last_ok = true;   // the most recent write succeeded
};

class Journal {
 public:
  // Opens (creating) the database and bumps the generation counter with a synced write.
  static Status Open(const JournalOptions& options, std::unique_ptr<Journal>* out);

  // Writes everything still queued, then closes the database.
  ~Journal();

  Journal(const Journal&) = delete;
  Journal& operator=(const Journal&) = delete;

  // Increases by one at every Open: lease epochs start at generation << 32 so that an epoch
  // handed out before a restart never equals one handed out after it.
  uint64_t generation() const { return generation_; }

  // Calls fn for every record whose key starts with prefix, in key order.
  // REQUIRES: no Write has been issued yet.
  Status Scan(std::string_view prefix, const std::function<Status(std::string_view, std::string_view)>& fn);

  // Calls fn for up to `limit` records whose key starts with prefix and sorts after `after`
  // (everything when empty), in key order. Safe from any thread (the event sink reads here).
  Status ReadAfter(std::string_view prefix, const std::string& after, size_t limit,
                   const std::function<void(std::string_view, std::string_view)>& fn);

  // Queues batch. If sync, the WAL is synced before its completion is posted. A token of 0 asks
  // for no completion (errors are then only logged and counted).
  void Write(JournalBatch batch, bool sync, uint64_t token);

  // A file descriptor that is readable while completions are waiting (for zmq_poll).
  int wake_fd() const { return wake_fd_; }

  // Returns and clears the completions posted so far, in write order.
  std::vector<JournalCompletion> TakeCompletions();

  // Blocks until every batch queued before the call has been written.
  void Flush();

  JournalStats Stats() const;

  // Writes a consistent copy of the database to `dir` (which must not exist), using hard links
  // where it can. Safe from any thread while the broker runs.
  Status Checkpoint(const std::string& dir);

 private:
  struct Impl;
  explicit Journal(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
  uint64_t generation_ = 0;
  int wake_fd_ = -1;
};

}  // namespace asrf
