#include "broker/event_sink.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "broker/journal.h"
#include "broker/records.h"
#include "common/clock.h"
#include "common/log.h"
#include "common/pg.h"

namespace asrf {

namespace {

std::optional<std::string> Timestamp(int64_t ms) {
  if (ms <= 0) return std::nullopt;
  return std::to_string(ms / 1000) + "." + std::to_string(1000 + ms % 1000).substr(1);
}

}  // namespace

struct EventSink::Impl {
  EventSinkOptions opt;
  Journal* journal;
  std::unique_ptr<PgConn> pg;
  int64_t next_connect = 0;
  bool migrated = false;
  int wake_fd = -1;

  mutable std::mutex mu;
  std::condition_variable cv;
  bool notified = false;                 // GUARDED_BY(mu)
  bool stopping = false;                 // GUARDED_BY(mu)
  std::deque<ResultLookup> lookups;      // GUARDED_BY(mu)
  size_t outstanding = 0;                // lookups queued or in hand; GUARDED_BY(mu)
  size_t outstanding_bytes = 0;          // the model bytes they carry; GUARDED_BY(mu)
  std::vector<uint64_t> forgotten;       // cancelled jobs forgotten; GUARDED_BY(mu)
  std::vector<ResultLookup> answered;    // GUARDED_BY(mu)
  EventSinkStats stats;                  // GUARDED_BY(mu)
  std::thread thread;

  bool Connect() {
    if (pg && pg->healthy()) return true;
    int64_t now = MonoMs();
    if (now < next_connect) return false;
    next_connect = now + opt.retry_ms;
    pg.reset();
    std::unique_ptr<PgConn> c;
    int applied = 0;
    Status st = ConnectAndMigrate(opt.conninfo, &migrated, &c, &applied, opt.statement_timeout_ms);
    if (applied > 0) LogInfo("pg_migrated").Kv("applied", applied);
    bool was_up;
    {
      std::lock_guard<std::mutex> lock(mu);
      was_up = stats.pg_up;
      stats.pg_up = st.ok();
    }
    if (!st.ok()) {
      if (was_up || next_connect - opt.retry_ms == now) LogWarn("event_sink_unavailable").Kv("error", st.message());
      return false;
    }
    LogInfo("event_sink_connected");
    pg = std::move(c);
    return true;
  }

  void Down(const Status& st) {
    LogWarn("event_sink_lost").Kv("error", st.message());
    pg.reset();
    std::lock_guard<std::mutex> lock(mu);
    stats.pg_up = false;
  }

  static std::optional<std::string> Text(const std::string& s) {
    if (s.empty()) return std::nullopt;
    return ValidUtf8(s);
  }

  // One multi-row upsert of rows[i] for i in `which`. Times travel as epoch seconds.
  Status UpsertRows(const std::vector<records::JobRow>& rows, const std::vector<uint64_t>& seqs,
                    const std::vector<size_t>& which) {
    std::string values;
    std::vector<std::optional<std::string>> params;
    params.reserve(which.size() * 13);
    int n = 0;
    for (size_t i : which) {
      const auto& r = rows[i];
      if (n) values += ',';
      values += '(';
      for (int c = 1; c <= 13; ++c) {
        values += (c > 1 ? ",$" : "$") + std::to_string(n * 13 + c);
        if (c >= 8 && c <= 10) values += "::double precision";
      }
      values += ')';
      params.push_back(std::to_string(r.id));
      params.push_back(r.parent ? std::optional<std::string>(std::to_string(r.parent)) : std::nullopt);
      params.push_back(ValidUtf8(r.batch));
      params.push_back(ValidUtf8(r.kind));
      params.push_back(std::string(proto::StateName(static_cast<proto::JobState>(std::min<int>(r.state, 5)))));
      params.push_back(std::to_string(r.priority));
      params.push_back(std::to_string(r.attempts));
      params.push_back(Timestamp(r.submitted_ms).value_or("0"));
      params.push_back(Timestamp(r.started_ms));
      params.push_back(Timestamp(r.finished_ms));
      params.push_back(Text(r.worker));
      params.push_back(Text(r.error));
      params.push_back(std::to_string(seqs[i]));
      ++n;
    }
    std::string sql =
        "INSERT INTO jobs (id, parent, batch, kind, state, priority, attempts, submitted_at, started_at, finished_at, "
        "worker, error, seq) SELECT v.id::bigint, v.parent::bigint, v.batch, v.kind, v.state, v.priority::int, "
        "v.attempts::int, to_timestamp(v.sub), to_timestamp(v.sta), to_timestamp(v.fin), v.worker, v.error, "
        "v.seq::bigint FROM (VALUES " +
        values +
        ") AS v(id, parent, batch, kind, state, priority, attempts, sub, sta, fin, worker, error, seq) "
        "ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state, attempts = EXCLUDED.attempts, "
        "started_at = COALESCE(EXCLUDED.started_at, jobs.started_at), finished_at = EXCLUDED.finished_at, "
        "worker = COALESCE(EXCLUDED.worker, jobs.worker), error = EXCLUDED.error, seq = EXCLUDED.seq "
        "WHERE jobs.seq < EXCLUDED.seq";
    return pg->Query(sql, params);
  }

  // Copies one batch of "e/" records; returns true if there may be more.
  bool CopyOnce() {
    std::vector<records::JobRow> rows;
    std::vector<uint64_t> seqs;
    std::vector<std::string> keys;
    Status st = journal->ReadAfter("e/", "", 64, [&](std::string_view key, std::string_view value) {
      if (rows.size() >= opt.max_rows) return;
      records::EventRecord e;
      keys.emplace_back(key);
      if (!proto::DecodeBody(value, &e).ok()) {
        LogError("event_record_unreadable").Kv("key", std::string(key));
        return;
      }
      for (auto& r : e.rows) {
        rows.push_back(std::move(r));
        seqs.push_back(e.seq);
      }
    });
    if (!st.ok() || keys.empty()) return false;
    // The newest row per job wins within the batch too.
    std::unordered_map<uint64_t, size_t> newest;
    for (size_t i = 0; i < rows.size(); ++i) newest[rows[i].id] = i;
    std::vector<size_t> keep;
    for (size_t i = 0; i < rows.size(); ++i) {
      if (newest[rows[i].id] == i) keep.push_back(i);
    }
    // Statements of at most 2,000 rows (13 parameters each; PostgreSQL allows 65,535), in one
    // transaction so a batch lands whole or not at all.
    st = pg->Exec("BEGIN");
    for (size_t from = 0; st.ok() && from < keep.size(); from += 2000) {
      std::vector<size_t> chunk(keep.begin() + from, keep.begin() + std::min(keep.size(), from + 2000));
      st = UpsertRows(rows, seqs, chunk);
    }
    if (st.ok()) st = pg->Exec("COMMIT");
    if (st.ok()) ClearDoneCheckpoints(rows, keep);
    uint64_t written = keep.size();
    if (!st.ok()) {
      (void)pg->Exec("ROLLBACK");
      if (!pg->healthy()) {
        Down(st);
        return false;
      }
      // PostgreSQL is up but refuses these rows: log them and move on rather than hold the
      // history behind them forever.
      LogError("event_rows_refused")
          .Kv("error", st.message())
          .Kv("rows", written)
          .Kv("first_key", keys.front());
      written = 0;
    }
    JournalBatch erase;
    for (auto& k : keys) erase.Erase(std::move(k));
    journal->Write(std::move(erase), /*sync=*/false, 0);
    journal->Flush();  // the next read must not see these again
    std::lock_guard<std::mutex> lock(mu);
    stats.rows_written += written;
    return true;
  }

  void AnswerLookups() {
    std::deque<ResultLookup> batch;
    {
      std::lock_guard<std::mutex> lock(mu);
      batch.swap(lookups);
    }
    if (batch.empty()) return;
    for (auto& l : batch) {
      if (!l.models.op.empty()) {
        if (!Connect()) {
          l.error_code = "pg_unavailable";
          l.error = "PostgreSQL is unreachable; the model registry lives there";
        } else {
          Registry(l);
        }
        continue;
      }
      if (!Connect()) {
        l.error = "PostgreSQL is unreachable";
      } else {
        PgResult r;
        Status st = pg->Query("SELECT payload, error, ok FROM results WHERE job_id = $1", {std::to_string(l.info.id)},
                              &r);
        if (!st.ok()) {
          l.error = st.message();
          Down(st);
        } else if (r.rows() > 0) {
          l.found = true;
          l.info.result.data = DecodeByteaHex(r.get(0, 0));
          if (!r.is_null(0, 1)) l.info.error = r.get(0, 1);
        }
      }
    }
    bool wake;
    {
      std::lock_guard<std::mutex> lock(mu);
      wake = answered.empty();
      for (auto& l : batch) {
        --outstanding;  // each came through Lookup, which counted it
        outstanding_bytes -= l.models.bytes.data.size();
        answered.push_back(std::move(l));
      }
    }
    if (wake) {
      uint64_t one = 1;
      ssize_t unused = ::write(wake_fd, &one, sizeof(one));
      (void)unused;
    }
  }

  static proto::ModelInfo InfoFromRow(const PgResult& r, int row) {
    proto::ModelInfo m;
    m.name = r.get(row, 0);
    m.version = std::atoi(r.get(row, 1).c_str());
    m.sha256 = r.get(row, 2);
    m.size = std::atoll(r.get(row, 3).c_str());
    m.valid_cer = r.is_null(row, 4) ? -1 : std::atof(r.get(row, 4).c_str());
    m.train_seconds = r.is_null(row, 5) ? 0 : std::atof(r.get(row, 5).c_str());
    m.created = r.get(row, 6);
    m.config = r.get(row, 7);
    return m;
  }

  // The model registry: list, export, import (schema/protocol.md, MODELS).
  void Registry(ResultLookup& l) {
    static const std::string kCols =
        "name, version, sha256, octet_length(bytes), valid_cer, train_seconds, "
        "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), config::text";
    const proto::ModelsReq& m = l.models;
    PgResult r;
    Status st;
    if (m.op == "list") {
      st = pg->Query("SELECT " + kCols + " FROM models ORDER BY name, version", {}, &r);
      if (st.ok()) for (int i = 0; i < r.rows(); ++i) l.reply.models.push_back(InfoFromRow(r, i));
    } else if (m.op == "export") {
      // The bytes only when they fit in a message: the size is checked first.
      st = pg->Query("SELECT " + kCols + ", CASE WHEN octet_length(bytes) <= $3 THEN bytes END FROM models "
                     "WHERE name = $1 AND ($2 = 0 OR version = $2) ORDER BY version DESC LIMIT 1",
                     {m.name, std::to_string(m.version), std::to_string(proto::kMaxModelBytes)}, &r);
      if (st.ok() && r.rows() == 0) {
        l.error_code = "not_found";
        l.error = "no model " + m.name + (m.version ? " version " + std::to_string(m.version) : "") + " in the registry";
        return;
      }
      if (st.ok() && static_cast<uint64_t>(r.get_int(0, 3)) > proto::kMaxModelBytes) {
        // It would not fit in a message; workers read it from PostgreSQL directly (--model NAME).
        l.error_code = "bad_request";
        l.error = "model " + m.name + " version " + r.get(0, 1) + " is " + r.get(0, 3) + " bytes, over the " +
                  std::to_string(proto::kMaxModelBytes >> 20) + " MiB a message carries; workers still load it " +
                  "with --model " + m.name + ", and psql can export it";
        return;
      }
      if (st.ok()) {
        l.reply.models.push_back(InfoFromRow(r, 0));
        l.reply.blob.data = DecodeByteaHex(r.get(0, 8));
      }
    } else if (m.op == "import") {
      // An import identical to the newest version (bytes and what is said of them) adds none: a
      // client resends a request it has no answer to yet (a large upload, a busy sink), and
      // every copy arrives here.
      const std::string same =
          "sha256 = encode(sha256($2::bytea), 'hex') AND config = $3::jsonb AND vocabulary = $4 AND "
          "valid_cer IS NOT DISTINCT FROM $5::double precision AND data_summary = $6::jsonb";
      for (int attempt = 0; attempt < 5; ++attempt) {  // a version a training took meanwhile: the next one
        st = pg->Query(
            "WITH newest AS (SELECT * FROM models WHERE name = $1 ORDER BY version DESC LIMIT 1), "
            "ins AS (INSERT INTO models (name, version, bytes, sha256, config, vocabulary, valid_cer, data_summary, "
            "train_seconds) SELECT $1, coalesce((SELECT version FROM newest), 0) + 1, $2::bytea, "
            "encode(sha256($2::bytea), 'hex'), $3::jsonb, $4, $5, $6::jsonb, $7 WHERE NOT EXISTS (SELECT 1 FROM newest "
            "WHERE " + same + ") RETURNING " + kCols + ") "
            "SELECT * FROM ins UNION ALL SELECT " + kCols + " FROM newest WHERE " + same,
            {m.name, m.bytes.data, m.config.empty() ? "{}" : m.config, m.vocabulary,
             m.valid_cer < 0 ? std::nullopt : std::optional<std::string>(std::to_string(m.valid_cer)),
             m.data_summary.empty() ? "{}" : m.data_summary, std::to_string(m.train_seconds)},
            &r, {false, true, false, false, false, false, false});
        if (st.ok() || pg->sqlstate() != "23505") break;
      }
      if (st.ok() && r.rows() > 0) l.reply.models.push_back(InfoFromRow(r, 0));
    }
    if (!st.ok()) {
      // A timeout, a lock, a conflict, a full disk: PostgreSQL's state, not the request's fault.
      const std::string code = pg->sqlstate();
      const bool passing = !pg->healthy() || code.empty() || code.rfind("57", 0) == 0 || code.rfind("55", 0) == 0 ||
                           code.rfind("40", 0) == 0 || code.rfind("53", 0) == 0 || code.rfind("08", 0) == 0;
      l.error_code = passing ? "pg_unavailable" : "bad_request";
      l.error = "model registry: " + st.message();
      if (!pg->healthy()) Down(st);
    }
  }

  void CountBehind() {
    uint64_t behind = 0;
    (void)journal->ReadAfter("e/", "", 1000000, [&](std::string_view, std::string_view) { behind++; });
    std::lock_guard<std::mutex> lock(mu);
    stats.records_behind = behind;
  }

  // A done job never runs again (RETRY takes only failed and dead ones): the bytes of its
  // published checkpoints, tens of MB each, are dead weight. Best effort, after the rows are
  // committed (a failure here must not hold the job history back); the sweep catches what it misses.
  void ClearDoneCheckpoints(const std::vector<records::JobRow>& rows, const std::vector<size_t>& which) {
    std::string done = "{";
    for (size_t i : which) {
      if (rows[i].state != static_cast<uint8_t>(proto::JobState::kDone)) continue;
      if (done.size() > 1) done += ',';
      done += std::to_string(rows[i].id);
    }
    done += '}';
    if (done.size() == 2) return;
    Status st =
        pg->Query("UPDATE checkpoints SET bytes = NULL WHERE job_id = ANY($1::bigint[]) AND bytes IS NOT NULL", {done});
    if (!st.ok()) LogWarn("checkpoint_clear_failed").Kv("error", st.message());
  }

  // Every 10 minutes: checkpoint bytes of done jobs the clearing above missed.
  void SweepCheckpoints() {
    PgResult r;
    Status st = pg->Query(
        "WITH c AS (UPDATE checkpoints SET bytes = NULL FROM jobs WHERE checkpoints.job_id = jobs.id "
        "AND checkpoints.bytes IS NOT NULL AND jobs.state = 'done' RETURNING 1) SELECT count(*) FROM c",
        {}, &r);
    if (!st.ok()) LogWarn("checkpoint_sweep_failed").Kv("error", st.message());
    else if (r.rows() && r.get(0, 0) != "0") LogInfo("checkpoints_cleared").Kv("checkpoints", r.get(0, 0));
  }

  // Those of cancelled jobs the broker forgot (EventSink::ForgetCheckpoints).
  void ClearForgottenCheckpoints() {
    std::vector<uint64_t> ids;
    {
      std::lock_guard<std::mutex> lock(mu);
      ids.swap(forgotten);
    }
    for (size_t from = 0; from < ids.size(); from += 10000) {
      std::string list = "{";
      for (size_t i = from; i < std::min(ids.size(), from + 10000); ++i) {
        list += (list.size() > 1 ? "," : "") + std::to_string(ids[i]);
      }
      list += '}';
      Status st = pg->Query("UPDATE checkpoints SET bytes = NULL WHERE job_id = ANY($1::bigint[]) AND bytes IS NOT NULL",
                            {list});
      if (!st.ok()) {
        LogWarn("checkpoint_clear_failed").Kv("error", st.message());
        return;
      }
    }
  }

  bool HasForgotten() {
    std::lock_guard<std::mutex> lock(mu);
    return !forgotten.empty();
  }

  void Run() {
    int64_t next_count = 0;
    int64_t next_sweep = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait_for(lock, std::chrono::milliseconds(200), [&] { return stopping || notified || !lookups.empty(); });
        if (stopping) return;
        notified = false;
      }
      AnswerLookups();
      if (Connect()) {
        for (int i = 0; i < 50 && CopyOnce(); ++i) {
        }
      }
      if (MonoMs() >= next_count) {
        CountBehind();
        next_count = MonoMs() + 2000;
      }
      if (HasForgotten() && Connect()) ClearForgottenCheckpoints();
      if (MonoMs() >= next_sweep && Connect()) {
        SweepCheckpoints();
        next_sweep = MonoMs() + 600000;
      }
    }
  }
};

EventSink::EventSink(const EventSinkOptions& options, Journal* journal) : impl_(std::make_unique<Impl>()) {
  impl_->opt = options;
  impl_->journal = journal;
  impl_->wake_fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  Impl* p = impl_.get();
  impl_->thread = std::thread([p] { p->Run(); });
}

EventSink::~EventSink() {
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    impl_->stopping = true;
  }
  impl_->cv.notify_all();
  if (impl_->thread.joinable()) impl_->thread.join();
  if (impl_->wake_fd >= 0) ::close(impl_->wake_fd);
}

void EventSink::Notify() {
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    impl_->notified = true;
  }
  impl_->cv.notify_one();
}

void EventSink::ForgetCheckpoints(std::vector<uint64_t> job_ids) {
  if (job_ids.empty()) return;
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    impl_->forgotten.insert(impl_->forgotten.end(), job_ids.begin(), job_ids.end());
  }
  impl_->cv.notify_one();
}

bool EventSink::Lookup(ResultLookup lookup) {
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    const size_t bytes = lookup.models.bytes.data.size();
    if (impl_->outstanding >= kMaxLookups ||
        (impl_->outstanding > 0 && impl_->outstanding_bytes + bytes > kMaxLookupBytes)) {
      return false;
    }
    impl_->outstanding++;
    impl_->outstanding_bytes += bytes;
    impl_->lookups.push_back(std::move(lookup));
  }
  impl_->cv.notify_one();
  return true;
}

int EventSink::wake_fd() const { return impl_->wake_fd; }

std::vector<ResultLookup> EventSink::TakeLookups() {
  uint64_t drained;
  ssize_t unused = ::read(impl_->wake_fd, &drained, sizeof(drained));
  (void)unused;
  std::lock_guard<std::mutex> lock(impl_->mu);
  std::vector<ResultLookup> out;
  out.swap(impl_->answered);
  return out;
}

EventSinkStats EventSink::GetStats() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->stats;
}

}  // namespace asrf
