// Registers the `train` job kind (see worker/trainer.h) with a worker's job registry.
#pragma once

#include <string>

#include "common/status.h"
#include "worker/job_kinds.h"

namespace asrf {

struct TrainKindOptions {
  std::string state_dir;  // checkpoints go to STATE_DIR/checkpoints, models to STATE_DIR/models
  int threads = 0;        // torch threads for training; 0 = torch's default
  std::string pg;         // with a conninfo, each checkpoint is indexed in the checkpoints table
  std::string worker_id;
  std::string advertise_host;  // --advertise-host: this worker's address for a gang's Gloo device
  std::string device = "cpu";  // where training runs: cpu or cuda:N (gangs then use NCCL)
  // Bounds each PostgreSQL statement (checkpoint index and bytes, the registry): one that a lock
  // or a stalled server holds longer fails, and training, or a stopping worker, goes on.
  int64_t pg_statement_timeout_ms = 60000;
};

Status RegisterTrainKind(JobRegistry* registry, const TrainKindOptions& options);

}  // namespace asrf
