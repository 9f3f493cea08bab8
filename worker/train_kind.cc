#include "worker/train_kind.h"

#include <memory>

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
    return RunTraining(spec, tc, result);
  });
  return Status::Ok();
}

}  // namespace asrf
