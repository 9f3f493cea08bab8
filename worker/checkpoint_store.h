// CheckpointStore: training checkpoints in the worker's RocksDB (STATE_DIR/checkpoints), keyed by
// job id and step; the newest K per job are kept. Thread-safe (RocksDB is).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"

namespace rocksdb {
class DB;
}

namespace asrf {

class CheckpointStore {
 public:
  static Status Open(const std::string& dir, std::unique_ptr<CheckpointStore>* out);
  ~CheckpointStore();

  // Stores a checkpoint (synced) and drops all but the newest `keep` of this job.
  Status Put(uint64_t job, int64_t step, const std::string& bytes, int keep);
  // The newest checkpoint of a job; NotFound when there is none.
  Status Latest(uint64_t job, int64_t* step, std::string* bytes);
  // Deletes every checkpoint of a job (synced) and compacts their key range, so the disk space
  // is given back now rather than at some later compaction.
  Status Drop(uint64_t job);
  // Jobs with at least one checkpoint here, ascending.
  std::vector<uint64_t> Jobs();
  // Steps stored for a job, oldest first.
  std::vector<int64_t> Steps(uint64_t job);

 private:
  explicit CheckpointStore(rocksdb::DB* db);
  std::unique_ptr<rocksdb::DB> db_;
};

}  // namespace asrf
