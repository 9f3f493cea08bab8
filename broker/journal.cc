#include "broker/journal.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

#include <rocksdb/db.h>
#include <rocksdb/options.h>
#include <rocksdb/utilities/checkpoint.h>
#include <rocksdb/write_batch.h>

#include "common/log.h"

namespace asrf {

namespace {
constexpr char kGenerationKey[] = "m/generation";

Status FromRocks(const rocksdb::Status& s, const std::string& what) {
  if (s.ok()) return Status::Ok();
  if (s.IsCorruption()) return Status::Corruption(what + ": " + s.ToString());
  return Status::IOError(what + ": " + s.ToString());
}
}  // namespace

struct Journal::Impl {
  struct Pending {
    JournalBatch batch;
    bool sync;
    uint64_t token;
  };

  std::unique_ptr<rocksdb::DB> db;  // null only while a reopen after an error failed
  std::mutex db_mu;                 // held by readers on other threads, and to swap `db`
  rocksdb::Options db_options;
  JournalOptions options;
  int wake_fd = -1;

  mutable std::mutex mu;
  std::condition_variable cv;        // journal thread waits for work
  std::condition_variable idle_cv;   // Flush waits for written_seq
  std::deque<Pending> queue;         // GUARDED_BY(mu)
  uint64_t queued_seq = 0;           // GUARDED_BY(mu)
  uint64_t written_seq = 0;          // GUARDED_BY(mu)
  bool stopping = false;             // GUARDED_BY(mu)
  std::vector<JournalCompletion> completions;  // GUARDED_BY(mu)
  JournalStats stats;                // GUARDED_BY(mu)
  std::thread thread;

  void Run() {
    std::vector<Pending> group;
    bool failed = false;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return stopping || !queue.empty(); });
        if (queue.empty() && stopping) return;
        size_t bytes = 0;
        while (!queue.empty() && (group.empty() || bytes < options.max_group_bytes)) {
          for (const auto& op : queue.front().batch.ops) bytes += op.key.size() + op.value.size();
          group.push_back(std::move(queue.front()));
          queue.pop_front();
        }
      }
      rocksdb::WriteBatch wb;
      bool sync = false;
      for (const auto& p : group) {
        sync = sync || p.sync;
        for (const auto& op : p.batch.ops) {
          if (op.erase) wb.Delete(op.key);
          else wb.Put(op.key, op.value);
        }
      }
      rocksdb::WriteOptions wo;
      wo.sync = sync;
      rocksdb::Status rs;
      if (failed) {
        // A failed write (disk full, I/O error) leaves RocksDB refusing writes; try to leave
        // that state first, so writes work again as soon as the disk does.
        rs = db ? db->Resume() : rocksdb::Status::IOError("closed");
        if (!rs.ok()) {
          // RocksDB refuses to resume after a failed WAL write; reopening replays the WAL up to
          // its last good record, which is exactly the state every acknowledgement promised.
          std::lock_guard<std::mutex> swap(db_mu);
          db.reset();
          rocksdb::DB* raw = nullptr;
          rs = rocksdb::DB::Open(db_options, options.dir, &raw);
          if (rs.ok()) db.reset(raw);
        }
        if (rs.ok()) {
          failed = false;
          LogInfo("journal_resumed");
        }
      }
      if (rs.ok() && !db) rs = rocksdb::Status::IOError("journal is closed after an earlier error");
      if (rs.ok()) rs = db->Write(wo, &wb);
      if (!rs.ok()) {
        failed = true;
        LogError("journal_write_failed").Kv("error", rs.ToString()).Kv("records", static_cast<uint64_t>(wb.Count()));
      }
      Status st = FromRocks(rs, "journal write");
      bool notify = false;
      {
        std::lock_guard<std::mutex> lock(mu);
        stats.writes++;
        if (sync) stats.syncs++;
        stats.batches += group.size();
        if (!st.ok()) stats.errors++;
        stats.last_ok = st.ok();
        bool was_empty = completions.empty();  // else the poll thread is already due to wake
        for (const auto& p : group) {
          if (p.token != 0) {
            completions.push_back({p.token, st});
            notify = was_empty;
          }
        }
        written_seq += group.size();
      }
      idle_cv.notify_all();
      if (notify) {
        uint64_t one = 1;
        ssize_t unused = ::write(wake_fd, &one, sizeof(one));
        (void)unused;
      }
      group.clear();
    }
  }
};

Journal::Journal(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Status Journal::Open(const JournalOptions& options, std::unique_ptr<Journal>* out) {
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  rocksdb::Options ro;
  ro.create_if_missing = true;
  ro.env = options.env ? options.env : rocksdb::Env::Default();
  ro.max_background_jobs = 2;
  ro.keep_log_file_num = 3;
  ro.info_log_level = rocksdb::InfoLogLevel::WARN_LEVEL;
  ro.write_buffer_size = 32u << 20;
  impl->db_options = ro;
  rocksdb::DB* raw = nullptr;
  rocksdb::Status rs = rocksdb::DB::Open(ro, options.dir, &raw);
  if (!rs.ok()) return FromRocks(rs, "cannot open journal in " + options.dir);
  impl->db.reset(raw);

  uint64_t generation = 0;
  std::string value;
  rs = impl->db->Get(rocksdb::ReadOptions(), kGenerationKey, &value);
  if (rs.ok()) {
    generation = std::stoull(value);
  } else if (!rs.IsNotFound()) {
    return FromRocks(rs, "journal read");
  }
  generation++;
  rocksdb::WriteOptions wo;
  wo.sync = true;
  rs = impl->db->Put(wo, kGenerationKey, std::to_string(generation));
  if (!rs.ok()) return FromRocks(rs, "journal write of the generation record");

  impl->wake_fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (impl->wake_fd < 0) return Status::IOError("eventfd failed");
  Impl* p = impl.get();
  impl->thread = std::thread([p] { p->Run(); });
  out->reset(new Journal(std::move(impl)));
  (*out)->generation_ = generation;
  (*out)->wake_fd_ = p->wake_fd;
  return Status::Ok();
}

Journal::~Journal() {
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    impl_->stopping = true;
  }
  impl_->cv.notify_all();
  if (impl_->thread.joinable()) impl_->thread.join();
  impl_->db.reset();
  if (impl_->wake_fd >= 0) ::close(impl_->wake_fd);
}

Status Journal::Scan(std::string_view prefix,
                     const std::function<Status(std::string_view, std::string_view)>& fn) {
  std::unique_ptr<rocksdb::Iterator> it(impl_->db->NewIterator(rocksdb::ReadOptions()));
  rocksdb::Slice p(prefix.data(), prefix.size());
  for (it->Seek(p); it->Valid() && it->key().starts_with(p); it->Next()) {
    ASRF_RETURN_IF_ERROR(fn(std::string_view(it->key().data(), it->key().size()),
                            std::string_view(it->value().data(), it->value().size())));
  }
  return FromRocks(it->status(), "journal scan");
}

Status Journal::ReadAfter(std::string_view prefix, const std::string& after, size_t limit,
                          const std::function<void(std::string_view, std::string_view)>& fn) {
  std::lock_guard<std::mutex> lock(impl_->db_mu);
  if (!impl_->db) return Status::IOError("journal is closed after an error");
  std::unique_ptr<rocksdb::Iterator> it(impl_->db->NewIterator(rocksdb::ReadOptions()));
  rocksdb::Slice p(prefix.data(), prefix.size());
  if (after.empty()) it->Seek(p);
  else {
    it->Seek(after);
    if (it->Valid() && it->key() == rocksdb::Slice(after)) it->Next();
  }
  for (size_t n = 0; n < limit && it->Valid() && it->key().starts_with(p); it->Next(), ++n) {
    fn(std::string_view(it->key().data(), it->key().size()), std::string_view(it->value().data(), it->value().size()));
  }
  return FromRocks(it->status(), "journal read");
}

void Journal::Write(JournalBatch batch, bool sync, uint64_t token) {
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    impl_->queue.push_back({std::move(batch), sync, token});
    impl_->queued_seq++;
  }
  impl_->cv.notify_one();
}

std::vector<JournalCompletion> Journal::TakeCompletions() {
  uint64_t drained;
  ssize_t unused = ::read(impl_->wake_fd, &drained, sizeof(drained));
  (void)unused;
  std::lock_guard<std::mutex> lock(impl_->mu);
  std::vector<JournalCompletion> out;
  out.swap(impl_->completions);
  return out;
}

void Journal::Flush() {
  std::unique_lock<std::mutex> lock(impl_->mu);
  uint64_t target = impl_->queued_seq;
  impl_->idle_cv.wait(lock, [&] { return impl_->written_seq >= target; });
}

Status Journal::Checkpoint(const std::string& dir) {
  std::lock_guard<std::mutex> lock(impl_->db_mu);
  if (!impl_->db) return Status::IOError("journal is closed after an error");
  rocksdb::Checkpoint* raw = nullptr;
  rocksdb::Status s = rocksdb::Checkpoint::Create(impl_->db.get(), &raw);
  std::unique_ptr<rocksdb::Checkpoint> cp(raw);
  if (s.ok()) s = cp->CreateCheckpoint(dir);
  return FromRocks(s, "journal checkpoint to " + dir);
}

JournalStats Journal::Stats() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->stats;
}

}  // namespace asrf
