#include "worker/train_kind.h"

#include <memory>

#include "common/log.h"
#include "common/pg.h"
#include "worker/checkpoint_store.h"
#include "worker/trainer.h"

namespace asrf {

Status RegisterTrainKind(JobRegistry* registry, const TrainKindOptions& options) {
  std::unique_ptr<CheckpointStore> store;
  ASRF_RETURN_IF_ERROR(CheckpointStore::Open(options.state_dir + "/checkpoints", &store));
  std::shared_ptr<CheckpointStore> shared(std::move(store));
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
    std::unique_ptr<PgConn> pg;
    if (!options.pg.empty()) {
      // Best effort: the checkpoint itself is in RocksDB already; PostgreSQL only indexes it.
      tc.checkpoint_saved = [&pg, &options, id = ctx.id](int64_t step, double loss, double cer) {
        if (!pg || !pg->healthy()) {
          pg.reset();
          if (!PgConn::Connect(options.pg, &pg, 2).ok()) {
            pg.reset();
            LogWarn("checkpoint_index_unavailable").Kv("job", id).Kv("step", step);
            return;
          }
        }
        Status st = pg->Query(
            "INSERT INTO checkpoints (job_id, step, worker, loss, valid_cer) VALUES ($1, $2, $3, $4, $5) "
            "ON CONFLICT (job_id, step) DO UPDATE SET worker = EXCLUDED.worker, loss = EXCLUDED.loss, "
            "valid_cer = EXCLUDED.valid_cer, created_at = now()",
            {std::to_string(id), std::to_string(step), ValidUtf8(options.worker_id), std::to_string(loss),
             cer >= 0 ? std::optional<std::string>(std::to_string(cer)) : std::nullopt});
        if (!st.ok()) LogWarn("checkpoint_index_failed").Kv("job", id).Kv("error", st.message());
      };
    }
    return RunTraining(spec, tc, result);
  });
  return Status::Ok();
}

}  // namespace asrf
