#include "worker/result_sink.h"

#include <nlohmann/json.hpp>

#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <filesystem>
#include <mutex>
#include <thread>
#include <unordered_map>

#include <rocksdb/db.h>
#include <rocksdb/write_batch.h>

#include "common/clock.h"
#include "common/log.h"
#include "common/pg.h"

namespace asrf {

namespace {

// Rows per statement are bounded by bytes too: results may be up to 1 MiB each, and 2,000 of
// them in one statement passed PostgreSQL's 1 GiB message limit, failing for ever.
constexpr size_t kMaxBatchBytes = 64u << 20;

std::string OutboxKey(uint64_t seq) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "o/%016llx", static_cast<unsigned long long>(seq));
  return buf;
}

// SQLSTATE classes 22 (data exception) and 23 (integrity constraint): the row itself is refused,
// and writing it again will not help. Anything else (a lock or statement timeout, a conflict,
// a full disk, a schema the worker does not expect) may pass later.
bool RowRefused(const std::string& sqlstate) {
  return sqlstate.rfind("22", 0) == 0 || sqlstate.rfind("23", 0) == 0;
}

}  // namespace

struct ResultSink::Impl {
  ResultSinkOptions opt;
  std::unique_ptr<rocksdb::DB> outbox;
  std::unique_ptr<PgConn> pg;
  int wake_fd = -1;
  uint64_t next_seq = 1;
  int64_t next_connect = 0;
  bool migrated = false;

  mutable std::mutex mu;
  std::condition_variable cv;
  std::deque<proto::JobResult> pending;   // GUARDED_BY(mu)
  size_t in_hand = 0;                     // taken by the thread, not yet durable; GUARDED_BY(mu)
  std::vector<proto::JobResult> durable;  // GUARDED_BY(mu)
  ResultSinkStats stats;                  // GUARDED_BY(mu)
  bool stopping = false;                  // GUARDED_BY(mu)
  std::thread thread;

  void Connect(int64_t now) {
    if (pg && pg->healthy()) return;
    if (now < next_connect) return;
    next_connect = now + opt.retry_ms;
    pg.reset();
    std::unique_ptr<PgConn> c;
    Status st = ConnectAndMigrate(opt.conninfo, &migrated, &c, nullptr, opt.statement_timeout_ms);
    if (st.ok()) {
      st = c->Query(
          "INSERT INTO workers (id, host, device) VALUES ($1, $2, $3) "
          "ON CONFLICT (id) DO UPDATE SET host = EXCLUDED.host, device = EXCLUDED.device, last_seen = now()",
          {opt.worker_id, opt.host, opt.device});
    }
    bool was_up;
    {
      std::lock_guard<std::mutex> lock(mu);
      was_up = stats.pg_up;
      stats.pg_up = st.ok();
    }
    if (st.ok()) {
      pg = std::move(c);
      LogInfo("result_sink_connected");
    } else if (was_up || next_seq == 1) {
      LogWarn("result_sink_unavailable").Kv("error", st.message()).Kv("retry_ms", opt.retry_ms);
    }
  }

  void MarkDown(const Status& st) {
    LogWarn("result_sink_lost").Kv("error", st.message());
    pg.reset();
    std::lock_guard<std::mutex> lock(mu);
    stats.pg_up = false;
  }

  // The text of a transcription result (JSON with a "text" string), for the transcript column.
  static std::optional<std::string> TranscriptOf(const proto::JobResult& r) {
    if (!r.ok || r.result.data.find("\"text\":") == std::string::npos) return std::nullopt;
    auto j = nlohmann::json::parse(r.result.data, nullptr, false);
    if (j.is_discarded() || !j.is_object() || !j.contains("text") || !j["text"].is_string()) return std::nullopt;
    return ValidUtf8(j["text"].get<std::string>());
  }

  // One multi-row upsert in one statement. Within a batch a job keeps only its newest epoch.
  Status Upsert(const std::vector<proto::JobResult>& rows) {
    std::unordered_map<uint64_t, size_t> newest;
    for (size_t i = 0; i < rows.size(); ++i) {
      auto [it, fresh] = newest.emplace(rows[i].id, i);
      if (!fresh && rows[it->second].epoch < rows[i].epoch) it->second = i;
    }
    std::string sql =
        "INSERT INTO results (job_id, lease_epoch, worker, ok, payload, error, run_ms, transcript) VALUES ";
    std::vector<std::optional<std::string>> params;
    std::vector<bool> binary;
    params.reserve(newest.size() * 8);
    int n = 0;
    for (size_t i = 0; i < rows.size(); ++i) {
      if (newest[rows[i].id] != i) continue;
      const auto& r = rows[i];
      if (n) sql += ',';
      int b = n * 8;
      sql += "($" + std::to_string(b + 1) + ",$" + std::to_string(b + 2) + ",$" + std::to_string(b + 3) + ",$" +
             std::to_string(b + 4) + ",$" + std::to_string(b + 5) + ",$" + std::to_string(b + 6) + ",$" +
             std::to_string(b + 7) + ",$" + std::to_string(b + 8) + ")";
      params.push_back(std::to_string(r.id));
      params.push_back(std::to_string(r.epoch));
      params.push_back(ValidUtf8(opt.worker_id));
      params.push_back(r.ok ? "t" : "f");
      params.push_back(r.result.data);
      params.push_back(r.error.empty() ? std::nullopt : std::optional<std::string>(ValidUtf8(r.error)));
      params.push_back(std::to_string(std::min<int64_t>(r.run_ms, INT32_MAX)));
      params.push_back(TranscriptOf(r));
      binary.insert(binary.end(), {false, false, false, false, true, false, false, false});
      ++n;
    }
    sql +=
        " ON CONFLICT (job_id) DO UPDATE SET lease_epoch = EXCLUDED.lease_epoch, worker = EXCLUDED.worker, "
        "ok = EXCLUDED.ok, payload = EXCLUDED.payload, error = EXCLUDED.error, run_ms = EXCLUDED.run_ms, "
        "transcript = EXCLUDED.transcript, created_at = now() WHERE results.lease_epoch < EXCLUDED.lease_epoch";
    return pg->Query(sql, params, nullptr, binary);
  }

  Status ToOutbox(const std::vector<proto::JobResult>& rows) {
    rocksdb::WriteBatch wb;
    for (const auto& r : rows) wb.Put(OutboxKey(next_seq++), proto::EncodeBody(r));
    rocksdb::WriteOptions wo;
    wo.sync = true;
    rocksdb::Status s = outbox->Write(wo, &wb);
    if (!s.ok()) return Status::IOError("result outbox write: " + s.ToString());
    std::lock_guard<std::mutex> lock(mu);
    stats.outboxed += rows.size();
    stats.outbox_size += rows.size();
    return Status::Ok();
  }

  // Delivers up to one batch from the outbox; returns false when it is empty or PostgreSQL failed.
  // Nothing leaves the outbox unless PostgreSQL holds it: a batch PostgreSQL refuses is tried
  // again later (backing off to a minute), and when it refuses rows for their content it is
  // written row by row and the refused rows are kept apart under "x/" with an error logged.
  bool DrainOutboxOnce() {
    int64_t now = MonoMs();
    if (now < drain_after) return false;
    std::vector<proto::JobResult> rows;
    std::vector<std::string> keys, unreadable;
    std::unique_ptr<rocksdb::Iterator> it(outbox->NewIterator(rocksdb::ReadOptions()));
    size_t bytes = 0;
    for (it->Seek("o/"); it->Valid() && it->key().starts_with("o/") && rows.size() < opt.max_batch &&
                         (rows.empty() || bytes < kMaxBatchBytes);
         it->Next()) {
      bytes += it->value().size();
      proto::JobResult r;
      if (proto::DecodeBody(std::string_view(it->value().data(), it->value().size()), &r).ok()) {
        rows.push_back(r);
        keys.push_back(it->key().ToString());
      } else {
        LogError("result_outbox_unreadable").Kv("key", it->key().ToString());
        unreadable.push_back(it->key().ToString());
      }
    }
    it.reset();
    if (rows.empty() && unreadable.empty()) return false;
    rocksdb::WriteBatch wb;
    for (const auto& k : unreadable) wb.Delete(k);
    size_t delivered = 0, set_aside = 0;
    Status st = rows.empty() ? Status::Ok() : Upsert(rows);
    if (st.ok()) {
      for (const auto& k : keys) wb.Delete(k);
      delivered = keys.size();
    } else if (!pg->healthy()) {
      MarkDown(st);
      return false;
    } else if (!RowRefused(pg->sqlstate())) {
      return Refused(st, rows.size());
    } else {
      for (size_t i = 0; i < rows.size(); ++i) {
        Status one = Upsert({rows[i]});
        if (one.ok()) {
          wb.Delete(keys[i]);
          delivered++;
        } else if (pg->healthy() && RowRefused(pg->sqlstate())) {
          LogError("result_row_refused").Kv("job", rows[i].id).Kv("epoch", rows[i].epoch).Kv("error", one.message());
          wb.Put("x/" + keys[i].substr(2), proto::EncodeBody(rows[i]));
          wb.Delete(keys[i]);
          set_aside++;
        } else {
          st = one;
          break;
        }
      }
    }
    rocksdb::WriteOptions wo;
    wo.sync = set_aside > 0;
    rocksdb::Status s = outbox->Write(wo, &wb);
    if (!s.ok()) LogError("result_outbox_delete_failed").Kv("error", s.ToString());
    {
      std::lock_guard<std::mutex> lock(mu);
      stats.delivered += delivered;
      stats.set_aside += set_aside;
      stats.outbox_size -= std::min<uint64_t>(stats.outbox_size, delivered + set_aside + unreadable.size());
    }
    if (delivered + set_aside < rows.size()) {
      if (!pg || !pg->healthy()) {
        MarkDown(st);
        return false;
      }
      return Refused(st, rows.size() - delivered - set_aside);
    }
    drain_backoff_ms = 0;
    return true;
  }
  int64_t drain_after = 0, drain_backoff_ms = 0;

  // PostgreSQL is up but did not take the rows (a lock or statement timeout, a full disk...):
  // they stay in the outbox and are tried again after a backoff.
  bool Refused(const Status& st, size_t rows) {
    drain_backoff_ms = std::clamp<int64_t>(drain_backoff_ms * 2, opt.retry_ms, 60000);
    drain_after = MonoMs() + drain_backoff_ms;
    LogWarn("result_write_refused")
        .Kv("error", st.message())
        .Kv("sqlstate", pg ? pg->sqlstate() : std::string())
        .Kv("rows", static_cast<uint64_t>(rows))
        .Kv("retry_ms", drain_backoff_ms);
    return false;
  }

  void Run() {
    for (;;) {
      std::vector<proto::JobResult> batch;
      bool outbox_waiting;
      {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait_for(lock, std::chrono::milliseconds(200), [&] { return stopping || !pending.empty(); });
        size_t bytes = 0;
        while (!pending.empty() && batch.size() < opt.max_batch && (batch.empty() || bytes < kMaxBatchBytes)) {
          bytes += pending.front().result.data.size() + pending.front().error.size();
          batch.push_back(std::move(pending.front()));
          pending.pop_front();
        }
        in_hand = batch.size();
        outbox_waiting = stats.outbox_size > 0;
        if (batch.empty() && stopping) return;
      }
      int64_t now = MonoMs();
      Connect(now);
      if (!batch.empty()) {
        Status st = Status::Unavailable("PostgreSQL is down");
        // Order: while older results wait in the outbox, new ones queue behind them.
        if (pg && !outbox_waiting) {
          st = Upsert(batch);
          // Refused on a live connection (a timeout, a lock): the outbox keeps them, and its
          // drain tells refusals apart.
          if (!st.ok() && !pg->healthy()) MarkDown(st);
        }
        if (st.ok()) {
          std::lock_guard<std::mutex> lock(mu);
          stats.written += batch.size();
        } else {
          st = ToOutbox(batch);
          if (!st.ok()) {
            // Neither PostgreSQL nor the local disk: keep them and try again; never report them.
            LogError("result_sink_stuck").Kv("error", st.message()).Kv("results", static_cast<uint64_t>(batch.size()));
            {
              std::lock_guard<std::mutex> lock(mu);
              for (auto it = batch.rbegin(); it != batch.rend(); ++it) pending.push_front(std::move(*it));
              in_hand = 0;
            }
            // Not a busy loop with an error line per pass: wait, then try both again.
            std::this_thread::sleep_for(std::chrono::milliseconds(opt.retry_ms));
            continue;
          }
        }
        bool wake;
        {
          std::lock_guard<std::mutex> lock(mu);
          wake = durable.empty();
          for (auto& r : batch) durable.push_back(std::move(r));
          in_hand = 0;
        }
        if (wake) {
          uint64_t one = 1;
          ssize_t unused = ::write(wake_fd, &one, sizeof(one));
          (void)unused;
        }
      }
      // Up to eight statements of the outbox, but new results first as soon as one came: while
      // the outbox waits they only go into it, which is quick, and then to the broker.
      for (int i = 0; pg && i < 8; ++i) {
        if (i > 0) {
          std::lock_guard<std::mutex> lock(mu);
          if (!pending.empty()) break;
        }
        if (!DrainOutboxOnce()) break;
      }
    }
  }
};

ResultSink::ResultSink(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Status ResultSink::Open(const ResultSinkOptions& options, std::unique_ptr<ResultSink>* out) {
  ASRF_RETURN_IF_ERROR(CheckConninfo(options.conninfo));
  auto impl = std::make_unique<Impl>();
  impl->opt = options;
  std::error_code ec;
  std::filesystem::create_directories(options.outbox_dir, ec);
  rocksdb::Options ro;
  ro.create_if_missing = true;
  ro.keep_log_file_num = 2;
  ro.info_log_level = rocksdb::InfoLogLevel::WARN_LEVEL;
  rocksdb::DB* raw = nullptr;
  rocksdb::Status s = rocksdb::DB::Open(ro, options.outbox_dir, &raw);
  if (!s.ok()) return Status::IOError("cannot open the result outbox in " + options.outbox_dir + ": " + s.ToString());
  impl->outbox.reset(raw);
  // Continue numbering after what a previous run left undelivered.
  uint64_t waiting = 0;
  std::unique_ptr<rocksdb::Iterator> it(impl->outbox->NewIterator(rocksdb::ReadOptions()));
  for (it->Seek("o/"); it->Valid() && it->key().starts_with("o/"); it->Next()) {
    impl->next_seq = std::strtoull(it->key().ToString().substr(2).c_str(), nullptr, 16) + 1;
    waiting++;
  }
  // Rows set aside keep their numbers under "x/": a new row must never take one of them (it
  // would overwrite a refused result, which is kept, never dropped).
  for (it->Seek("x/"); it->Valid() && it->key().starts_with("x/"); it->Next()) {
    impl->next_seq = std::max<uint64_t>(impl->next_seq, std::strtoull(it->key().ToString().substr(2).c_str(), nullptr, 16) + 1);
  }
  it.reset();
  impl->stats.outbox_size = waiting;
  if (waiting) LogInfo("result_outbox_found").Kv("results", waiting);
  impl->wake_fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  Impl* p = impl.get();
  impl->thread = std::thread([p] { p->Run(); });
  out->reset(new ResultSink(std::move(impl)));
  return Status::Ok();
}

ResultSink::~ResultSink() {
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    impl_->stopping = true;
  }
  impl_->cv.notify_all();
  if (impl_->thread.joinable()) impl_->thread.join();
  impl_->outbox.reset();
  if (impl_->wake_fd >= 0) ::close(impl_->wake_fd);
}

void ResultSink::Put(std::vector<proto::JobResult> results) {
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    for (auto& r : results) impl_->pending.push_back(std::move(r));
  }
  impl_->cv.notify_one();
}

int ResultSink::wake_fd() const { return impl_->wake_fd; }

std::vector<proto::JobResult> ResultSink::TakeDurable() {
  uint64_t drained;
  ssize_t unused = ::read(impl_->wake_fd, &drained, sizeof(drained));
  (void)unused;
  std::lock_guard<std::mutex> lock(impl_->mu);
  std::vector<proto::JobResult> out;
  out.swap(impl_->durable);
  return out;
}

size_t ResultSink::Pending() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->pending.size() + impl_->in_hand;
}

ResultSinkStats ResultSink::GetStats() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->stats;
}

}  // namespace asrf
