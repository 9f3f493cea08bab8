// FaultFs: a RocksDB file system for tests that simulates what a power cut or a full disk does to
// the journal. Data appended to a file stays in memory until the file is synced; Crash() drops
// every unsynced byte and turns all later file-system changes into no-ops, so a database reopened
// afterwards with the plain file system sees exactly what had been synced. SetNoSpace(true) makes
// every append and sync fail with "no space left on device".
#pragma once

#include <memory>

namespace rocksdb {
class Env;
class FileSystem;
}  // namespace rocksdb

namespace asrf {

class FaultFs {
 public:
  FaultFs();
  ~FaultFs();

  // The Env to pass in JournalOptions::env. Owned by this object.
  rocksdb::Env* env();

  // Drops all unsynced data and freezes the file system as it is on disk. Irreversible.
  void Crash();
  // While set, writes fail as if the disk were full.
  void SetNoSpace(bool on);
  // The next n appends to any file fail as if the disk were full (a passing fault).
  void FailNextAppends(int n);
  // Every file sync takes this much longer (a slow disk): writes stay in flight that long.
  void SetSyncDelayMs(int ms);
  // Number of successful file syncs so far.
  long syncs() const;

  struct State;  // shared with the files it hands out

 private:
  std::shared_ptr<State> state_;
  std::shared_ptr<rocksdb::FileSystem> fs_;
  std::unique_ptr<rocksdb::Env> env_;
};

}  // namespace asrf
