// The `train` job kind: trains the project's CTC model on a manifest, with periodic validation,
// progress reports and checkpoints in the worker's RocksDB; a job that comes back after its worker
// died (or was stopped) resumes from its newest checkpoint.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>

#include "common/status.h"

namespace asrf {

class CheckpointStore;

// What a train job asks for; the job payload is this as JSON (see TrainSpec::FromJson).
struct TrainSpec {
  std::string manifest;            // JSONL: {"audio": path, "text": ...}; other fields ignored
  std::string valid;               // same format; validated every valid_every steps
  std::string name;                // model name
  std::string out;                 // where the final model file goes (optional)
  int64_t steps = 2000;
  double batch_seconds = 64;       // audio seconds per batch (padded)
  double lr = 1.5e-3;              // peak learning rate
  int64_t warmup = 300;            // linear warm-up steps, then cosine decay to 5%
  double clip = 5.0;               // gradient-norm clip
  int64_t checkpoint_every = 100;
  int keep = 3;                    // checkpoints kept
  int64_t valid_every = 250;
  int64_t valid_max = 500;         // utterances used for validation CER
  uint64_t seed = 1;
  int64_t channels = 256, hidden = 256, layers = 3;
  // Residual BiGRU blocks on top (CtcModelConfig::residual). With init: 0 keeps the init model's;
  // more than it has grows it (the new blocks start as the identity); fewer is an error.
  int64_t residual = 0;
  double dropout = 0.1;
  double max_seconds = 20;         // longer utterances are an error in the manifest
  bool spec_augment = true;
  double speed_perturb = 0.15;     // each training utterance is resampled by 1 ± up to this (tempo, pitch, formants)
  double vtlp = 0.12;              // mel axis warped by 1 ± up to this (vocal tract length); 0 = off
  double lowpass = 0;              // share of training utterances low-passed at 3-7 kHz (band-limited audio)
  double reverb = 0;               // share played in a synthetic room (RT60 0.2-1.0 s, DRR -15..+10 dB)
  double noise = 0;                // share with Gaussian noise added (SNR 5-30 dB, white to rumble)
  double nonspeech = 0;            // share replaced by background without speech, transcript empty
  double pad_background = 0;       // share with 0.1-1.5 s of background before and after the speech
  std::string init;                // optional model file to start from (fine-tuning)
  bool evaluate_only = false;      // with init: only measure CER/WER of that model on `valid`
  std::string lm;                  // evaluate_only: also decode with this character LM (beam search)
  int beam = 16;
  double lm_weight = 0.5, char_bonus = 1.0, oov_penalty = -2.0;
  int combine = 1;                 // batches per rank per step
  double adam_eps = 1e-8;          // Adam's epsilon
  int publish_every = 5;           // every Nth checkpoint goes to PostgreSQL too; 0 = never

  static Status FromJson(const std::string& json, TrainSpec* out);
  std::string ToJson() const;
};

struct TrainContext {
  uint64_t job_id = 0;
  std::string state_dir;
  CheckpointStore* store = nullptr;
  const std::atomic<bool>* cancelled = nullptr;  // the job was cancelled: stop, no checkpoint
  const std::atomic<bool>* stopping = nullptr;   // the worker drains: checkpoint, then give the job back
  std::function<void(const std::string& json)> progress;
  // Called after each checkpoint is stored (e.g. to index it in PostgreSQL); `publish` asks for
  // the bytes to be published too. May be empty.
  std::function<void(int64_t step, double loss, double valid_cer, const std::string& bytes, bool publish)>
      checkpoint_saved;
  // The newest published checkpoint of this job if its step is above `after` (-1: any), with its
  // step; false when there is none. May be empty.
  std::function<bool(int64_t after, int64_t* step, std::string* bytes)> fetch_published;
  // Called by rank 0 with the finished model file and its summary (JSON), e.g. for the registry.
  // An error fails the job (the model is kept on disk and a final checkpoint lets a RETRY finish
  // the registration without training again).
  std::function<Status(const std::string& model_path, const std::string& summary_json)> model_finished;
  int threads = 0;                               // torch threads; 0 = leave as is
  // "cpu" or "cuda:N": the model, the front end and the loss run there; a gang's all-reduce is
  // Gloo on the CPU and NCCL on CUDA. Checkpoints and models are written so a CPU host reads them.
  std::string device = "cpu";
  // Data-parallel gang: this rank, the gang's size and rank 0's "host:port" (rank 0 serves it).
  int rank = 0;
  int world_size = 1;
  std::string rendezvous;
  // This worker's own address (its --advertise-host; empty: the host name): a Gloo rank's device
  // binds there, not at rank 0's rendezvous host, which on another machine is not local.
  std::string local_host;
};

// Runs (or resumes) training. Returns ok with a JSON summary in *result; Busy (the job should be
// requeued, no attempt counted) when stopped by the worker after a checkpoint, when a gang member
// is lost, or when the gang's rendezvous fails; Invalid for bad manifests.
Status RunTraining(const TrainSpec& spec, const TrainContext& ctx, std::string* result);

// Whether this build can be a rank of a gang on a GPU (NCCL) or on the CPU (Gloo); workers tell
// the broker in READY, which places gangs only on workers that can.
bool GangBackendBuilt(bool on_gpu);

// Reads and checks a manifest: every audio file readable and non-empty (at any sample rate: other
// rates than 16 kHz are resampled on loading, as for transcription); every text non-empty and
// inside the vocabulary. Errors list the first problems with their line numbers.
struct ManifestItem {
  int line = 0;  // in its manifest
  std::string audio;
  std::string text;
  double duration = 0;
  int sample_rate = 0;  // of the file; LoadAll resamples what is not 16 kHz
};
// `for_training`: also refuse a text too long for its audio (CTC could never align it).
Status ReadManifest(const std::string& path, const std::string& vocabulary, double max_seconds,
                    std::vector<ManifestItem>* items, bool for_training = false);

}  // namespace asrf
