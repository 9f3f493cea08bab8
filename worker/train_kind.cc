#include "worker/train_kind.h"

#include <condition_variable>
#include <deque>
#include <fstream>
#include <memory>
#include <mutex>
#include <thread>

#include <nlohmann/json.hpp>

#include "common/log.h"
#include "common/pg.h"
#include "worker/checkpoint_store.h"
#include "worker/trainer.h"

namespace asrf {

namespace {

// Drops local checkpoints on a thread of its own (a drop compacts, which may take a while): those
// of each job the broker has recorded as done here, and, with --pg, once at start, those of jobs
// PostgreSQL's job history has as done (a job this worker gave back or lost that finished
// elsewhere). Checkpoints of failed jobs stay for RETRY, cancelled ones for RETRY of their gang.
class CheckpointCleaner {
 public:
  CheckpointCleaner(std::shared_ptr<CheckpointStore> store, std::string pg, int64_t statement_timeout_ms)
      : store_(std::move(store)), pg_(std::move(pg)), timeout_ms_(statement_timeout_ms), thread_([this] { Loop(); }) {}
  ~CheckpointCleaner() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  void Drop(uint64_t job) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push_back(job);
    }
    cv_.notify_all();
  }

 private:
  void DropNow(uint64_t job, const char* why) {
    if (store_->Steps(job).empty()) return;
    Status st = store_->Drop(job);
    if (st.ok()) LogInfo("checkpoints_dropped").Kv("job", job).Kv("why", why);
    else LogWarn("checkpoint_drop_failed").Kv("job", job).Kv("error", st.message());
  }
  void DropDoneElsewhere() {
    if (pg_.empty()) return;
    std::vector<uint64_t> jobs = store_->Jobs();
    if (jobs.empty()) return;
    std::string ids = "{";
    for (uint64_t j : jobs) ids += (ids.size() > 1 ? "," : "") + std::to_string(j);
    ids += '}';
    std::unique_ptr<PgConn> pg;
    bool migrated = false;
    PgResult r;
    Status st = ConnectAndMigrate(pg_, &migrated, &pg, nullptr, timeout_ms_);
    if (st.ok()) st = pg->Query("SELECT id FROM jobs WHERE id = ANY($1::bigint[]) AND state = 'done'", {ids}, &r);
    if (!st.ok()) {
      LogWarn("checkpoint_cleanup_skipped").Kv("error", st.message());
      return;
    }
    for (int i = 0; i < r.rows() && !Stopping(); ++i) DropNow(r.get_int(i, 0), "the job is done");
  }
  bool Stopping() {
    std::lock_guard<std::mutex> lock(mu_);
    return stopping_;
  }
  void Loop() {
    DropDoneElsewhere();
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;
      uint64_t job = queue_.front();
      queue_.pop_front();
      lock.unlock();
      DropNow(job, "the job is done");
      lock.lock();
    }
  }

  std::shared_ptr<CheckpointStore> store_;
  std::string pg_;
  int64_t timeout_ms_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<uint64_t> queue_;  // GUARDED_BY(mu_)
  bool stopping_ = false;       // GUARDED_BY(mu_)
  std::thread thread_;
};

}  // namespace

Status RegisterTrainKind(JobRegistry* registry, const TrainKindOptions& options) {
  std::unique_ptr<CheckpointStore> store;
  ASRF_RETURN_IF_ERROR(CheckpointStore::Open(options.state_dir + "/checkpoints", &store));
  std::shared_ptr<CheckpointStore> shared(std::move(store));
  auto cleaner = std::make_shared<CheckpointCleaner>(shared, options.pg, options.pg_statement_timeout_ms);
  registry->OnDone("train", [cleaner](uint64_t id) { cleaner->Drop(id); });
  registry->Register("train", [shared, options](std::string_view payload, const JobContext& ctx, std::string* result) {
    TrainSpec spec;
    ASRF_RETURN_IF_ERROR(TrainSpec::FromJson(std::string(payload), &spec));
    TrainContext tc;
    tc.job_id = ctx.id;
    tc.state_dir = options.state_dir;
    tc.store = shared.get();
    tc.cancelled = ctx.cancelled;
    tc.stopping = ctx.stopping;
    tc.progress = ctx.progress;
    tc.threads = options.threads;
    tc.device = options.device;
    tc.rank = static_cast<int>(ctx.rank);
    tc.world_size = static_cast<int>(ctx.world_size);
    tc.rendezvous = ctx.rendezvous;
    tc.local_host = options.advertise_host;
    std::unique_ptr<PgConn> pg;
    // Best effort: a connection for the checkpoint index, published checkpoints and the registry.
    auto connect = [&pg, &options]() -> bool {
      if (pg && pg->healthy()) return true;
      pg.reset();
      bool migrated = false;
      if (!ConnectAndMigrate(options.pg, &migrated, &pg, nullptr, options.pg_statement_timeout_ms).ok()) {
        pg.reset();
        return false;
      }
      return true;
    };
    if (!options.pg.empty()) {
      // The checkpoint itself is in RocksDB already; PostgreSQL indexes it, and keeps the bytes of
      // published ones so a gang placed on other machines can resume.
      tc.checkpoint_saved = [&, id = ctx.id](int64_t step, double loss, double cer, const std::string& bytes,
                                             bool publish) {
        if (!connect()) {
          LogWarn("checkpoint_index_unavailable").Kv("job", id).Kv("step", step);
          return;
        }
        Status st = pg->Query(
            "INSERT INTO checkpoints (job_id, step, worker, loss, valid_cer, published, bytes) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7) "
            "ON CONFLICT (job_id, step) DO UPDATE SET worker = EXCLUDED.worker, loss = EXCLUDED.loss, "
            "valid_cer = EXCLUDED.valid_cer, published = EXCLUDED.published, bytes = EXCLUDED.bytes, "
            "created_at = now()",
            {std::to_string(id), std::to_string(step), ValidUtf8(options.worker_id), std::to_string(loss),
             cer >= 0 ? std::optional<std::string>(std::to_string(cer)) : std::nullopt, publish ? "t" : "f",
             publish ? std::optional<std::string>(bytes) : std::nullopt},
            nullptr, {false, false, false, false, false, false, true});
        if (st.ok() && publish) {
          // Only the newest published checkpoint is ever resumed from: the bytes of older ones go
          // (their index rows stay).
          st = pg->Query("UPDATE checkpoints SET bytes = NULL WHERE job_id = $1 AND step < $2 AND bytes IS NOT NULL",
                         {std::to_string(id), std::to_string(step)});
        }
        if (!st.ok()) LogWarn("checkpoint_index_failed").Kv("job", id).Kv("error", st.message());
        else if (publish) LogInfo("checkpoint_published").Kv("job", id).Kv("step", step);
      };
      tc.fetch_published = [&, id = ctx.id](int64_t after, int64_t* step, std::string* bytes) -> bool {
        if (!connect()) return false;
        PgResult r;
        Status st = pg->Query(
            "SELECT step, bytes FROM checkpoints WHERE job_id = $1 AND step > $2 AND published AND bytes IS NOT NULL "
            "ORDER BY step DESC LIMIT 1",
            {std::to_string(id), std::to_string(after)}, &r);
        if (!st.ok() || r.rows() == 0) return false;
        *step = r.get_int(0, 0);
        *bytes = DecodeByteaHex(r.get(0, 1));
        return true;
      };
      tc.model_finished = [&, id = ctx.id](const std::string& path, const std::string& summary) -> Status {
        // The finished model goes into the registry as the next version of its name, once per
        // job: a job run again finds its version there (same job id, same training spec) and
        // adds none.
        std::ifstream in(path, std::ios::binary);
        std::string bytes((std::istreambuf_iterator<char>(in)), {});
        auto j = nlohmann::json::parse(summary, nullptr, false);
        if (bytes.empty() || j.is_discarded()) return Status::IOError("cannot read the finished model " + path);
        if (!connect()) {
          LogWarn("model_not_registered").Kv("job", id).Kv("model", path);
          return Status::Unavailable("PostgreSQL is unreachable, so the model is not in the registry; it is kept at " +
                                     path + ", and `asr-submit retry " + std::to_string(id) +
                                     "` registers it without training again");
        }
        nlohmann::json data = {{"utterances", j.value("utterances", 0)}, {"hours", j.value("hours", 0.0)},
                               {"steps", j.value("steps", 0)}, {"manifest", spec.manifest}, {"job", id}};
        PgResult r;
        Status st;
        // Two registrations of one name at once (another job, an import) can both take the next
        // version: the loser tries again with the one after.
        for (int attempt = 0; attempt < 5; ++attempt) {
          st = pg->Query(
              "INSERT INTO models (name, version, bytes, sha256, config, valid_cer, data_summary, train_seconds) "
              "SELECT $1, coalesce(max(version), 0) + 1, $2::bytea, encode(sha256($2::bytea), 'hex'), $3::jsonb, $4, "
              "$5::jsonb, $6 FROM models WHERE name = $1 "
              "HAVING NOT coalesce(bool_or(data_summary->>'job' = $7 AND config = $3::jsonb), false) RETURNING version",
              {spec.name, bytes, spec.ToJson(), std::to_string(j.value("valid_cer", 1.0)), data.dump(),
               std::to_string(j.value("train_seconds", 0.0)), std::to_string(id)},
              &r, {false, true, false, false, false, false, false});
          if (st.ok() || pg->sqlstate() != "23505") break;
        }
        if (!st.ok()) {
          LogWarn("model_not_registered").Kv("job", id).Kv("error", st.message());
          return Status::Unavailable("the model is not in the registry (" + st.message() + "); it is kept at " + path +
                                     ", and `asr-submit retry " + std::to_string(id) + "` registers it without training again");
        }
        if (r.rows() == 0) LogInfo("model_registered_already").Kv("job", id).Kv("name", spec.name);
        else LogInfo("model_registered").Kv("job", id).Kv("name", spec.name).Kv("version", r.get(0, 0));
        return Status::Ok();
      };
    }
    return RunTraining(spec, tc, result);
  });
  return Status::Ok();
}

}  // namespace asrf
