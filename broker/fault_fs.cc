#include "broker/fault_fs.h"

#include <atomic>
#include <chrono>
#include <mutex>
#include <thread>
#include <string>

#include <rocksdb/env.h>
#include <rocksdb/file_system.h>

namespace asrf {

struct FaultFs::State {
  std::atomic<bool> crashed{false};
  std::atomic<bool> no_space{false};
  std::atomic<int> fail_appends{0};
  // True while writes fail: always under no_space, or once for each of the next fail_appends.
  bool Fails() {
    if (no_space) return true;
    for (int n = fail_appends.load(); n > 0;) {
      if (fail_appends.compare_exchange_weak(n, n - 1)) return true;
    }
    return false;
  }
  std::atomic<long> syncs{0};
  std::atomic<int> sync_delay_ms{0};
};

namespace {

using rocksdb::FileOptions;
using rocksdb::FSWritableFile;
using rocksdb::IODebugContext;
using rocksdb::IOOptions;
using rocksdb::IOStatus;
using rocksdb::Slice;

class FaultFile : public rocksdb::FSWritableFileOwnerWrapper {
 public:
  FaultFile(std::unique_ptr<FSWritableFile>&& t, std::shared_ptr<FaultFs::State> st)
      : FSWritableFileOwnerWrapper(std::move(t)), st_(std::move(st)) {}

  IOStatus Append(const Slice& data, const IOOptions&, IODebugContext*) override {
    if (st_->crashed) return IOStatus::OK();
    if (st_->Fails()) return IOStatus::NoSpace("injected: no space left on device");
    std::lock_guard<std::mutex> lock(mu_);
    buffer_.append(data.data(), data.size());
    return IOStatus::OK();
  }
  IOStatus Append(const Slice& data, const IOOptions& o, const rocksdb::DataVerificationInfo&,
                  IODebugContext* dbg) override {
    return Append(data, o, dbg);
  }
  IOStatus PositionedAppend(const Slice&, uint64_t, const IOOptions&, IODebugContext*) override {
    return IOStatus::NotSupported("FaultFs: positioned append");
  }
  IOStatus PositionedAppend(const Slice&, uint64_t, const IOOptions&, const rocksdb::DataVerificationInfo&,
                            IODebugContext*) override {
    return IOStatus::NotSupported("FaultFs: positioned append");
  }
  IOStatus Flush(const IOOptions&, IODebugContext*) override { return IOStatus::OK(); }
  IOStatus Sync(const IOOptions& o, IODebugContext* dbg) override { return WriteThrough(o, dbg, true); }
  IOStatus Fsync(const IOOptions& o, IODebugContext* dbg) override { return WriteThrough(o, dbg, true); }
  IOStatus RangeSync(uint64_t, uint64_t, const IOOptions&, IODebugContext*) override { return IOStatus::OK(); }
  uint64_t GetFileSize(const IOOptions& o, IODebugContext* dbg) override {
    std::lock_guard<std::mutex> lock(mu_);
    return target()->GetFileSize(o, dbg) + buffer_.size();
  }
  IOStatus Close(const IOOptions& o, IODebugContext* dbg) override {
    if (st_->crashed) {
      std::lock_guard<std::mutex> lock(mu_);
      buffer_.clear();
      return IOStatus::OK();
    }
    // A clean close of a file nobody synced: the data reaches the page cache (not the platter),
    // which is what a later crash may still take away; keeping it simple, write it through.
    IOStatus s = WriteThrough(o, dbg, false);
    if (!s.ok()) return s;
    return target()->Close(o, dbg);
  }

 private:
  IOStatus WriteThrough(const IOOptions& o, IODebugContext* dbg, bool sync) {
    if (st_->crashed) return IOStatus::OK();
    if (st_->no_space) return IOStatus::NoSpace("injected: no space left on device");
    std::lock_guard<std::mutex> lock(mu_);
    if (!buffer_.empty()) {
      IOStatus s = target()->Append(buffer_, o, dbg);
      if (!s.ok()) return s;
      buffer_.clear();
      s = target()->Flush(o, dbg);
      if (!s.ok()) return s;
    }
    if (sync) {
      if (int ms = st_->sync_delay_ms.load(); ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(ms));
      IOStatus s = target()->Sync(o, dbg);
      if (!s.ok()) return s;
      st_->syncs++;
    }
    return IOStatus::OK();
  }

  std::shared_ptr<FaultFs::State> st_;
  std::mutex mu_;
  std::string buffer_;  // appended but not yet synced
};

class FaultFileSystem : public rocksdb::FileSystemWrapper {
 public:
  FaultFileSystem(std::shared_ptr<FaultFs::State> st)
      : FileSystemWrapper(rocksdb::FileSystem::Default()), st_(std::move(st)) {}
  const char* Name() const override { return "AsrfFaultFs"; }

  IOStatus NewWritableFile(const std::string& f, const FileOptions& fo, std::unique_ptr<FSWritableFile>* r,
                           IODebugContext* dbg) override {
    if (st_->crashed) return IOStatus::IOError("FaultFs: crashed");
    std::unique_ptr<FSWritableFile> t;
    IOStatus s = target()->NewWritableFile(f, fo, &t, dbg);
    if (s.ok()) r->reset(new FaultFile(std::move(t), st_));
    return s;
  }
  IOStatus ReopenWritableFile(const std::string& f, const FileOptions& fo, std::unique_ptr<FSWritableFile>* r,
                              IODebugContext* dbg) override {
    if (st_->crashed) return IOStatus::IOError("FaultFs: crashed");
    std::unique_ptr<FSWritableFile> t;
    IOStatus s = target()->ReopenWritableFile(f, fo, &t, dbg);
    if (s.ok()) r->reset(new FaultFile(std::move(t), st_));
    return s;
  }
  IOStatus DeleteFile(const std::string& f, const IOOptions& o, IODebugContext* dbg) override {
    if (st_->crashed) return IOStatus::OK();
    return target()->DeleteFile(f, o, dbg);
  }
  IOStatus RenameFile(const std::string& s, const std::string& t, const IOOptions& o, IODebugContext* dbg) override {
    if (st_->crashed) return IOStatus::OK();
    return target()->RenameFile(s, t, o, dbg);
  }

 private:
  std::shared_ptr<FaultFs::State> st_;
};

}  // namespace

FaultFs::FaultFs() : state_(std::make_shared<State>()) {
  fs_ = std::make_shared<FaultFileSystem>(state_);
  env_ = rocksdb::NewCompositeEnv(fs_);
}
FaultFs::~FaultFs() = default;
rocksdb::Env* FaultFs::env() { return env_.get(); }
void FaultFs::Crash() { state_->crashed = true; }
void FaultFs::SetNoSpace(bool on) { state_->no_space = on; }
void FaultFs::FailNextAppends(int n) { state_->fail_appends = n; }
void FaultFs::SetSyncDelayMs(int ms) { state_->sync_delay_ms = ms; }
long FaultFs::syncs() const { return state_->syncs.load(); }

}  // namespace asrf
