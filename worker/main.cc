// asr-worker: runs jobs for the broker on one device. See `asr-worker --help`.
#include <cmath>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <iostream>

#include "common/log.h"
#include "common/options.h"
#include "common/pg.h"
#include "common/sha256.h"
#include "cuda/device_info.h"
#include "schema/protocol.h"
#include "worker/device.h"
#include "worker/model_cache.h"
#include "worker/train_kind.h"
#include "worker/trainer.h"
#include "worker/transcribe_kind.h"
#include "worker/worker.h"

namespace {
std::atomic<bool> g_stop{false};
void OnSignal(int) { g_stop.store(true); }
}  // namespace

int main(int argc, char** argv) {
  using namespace asrf;
  SetLogProcessName("asr-worker");
  WorkerOptions o;
  po::options_description desc("asr-worker options");
  desc.add_options()
      ("broker", po::value(&o.broker)->default_value(o.broker), "broker endpoint to connect to")
      ("device", po::value(&o.device)->default_value(o.device), "cpu or cuda:N (one worker per GPU)")
      ("state-dir", po::value(&o.state_dir)->default_value(o.state_dir),
       "directory for this worker's local state (checkpoints, result outbox)")
      ("slots", po::value(&o.slots)->default_value(o.slots), "jobs run at once (credits offered to the broker)")
      ("worker-id", po::value(&o.worker_id)->default_value(""), "name shown in listings (default host/device/pid)")
      ("pg", po::value(&o.pg)->default_value(""),
       "PostgreSQL conninfo (key=value or postgresql:// URI; PGHOST, PGPASSFILE... honoured; never a password "
       "here) for the result sink; empty: results go only to the broker")
      ("pg-statement-timeout-ms", po::value(&o.pg_statement_timeout_ms)->default_value(o.pg_statement_timeout_ms),
       "the longest one PostgreSQL statement may take (results, checkpoints, the registry); one held longer by a "
       "lock or a stalled server fails: results wait in the outbox, a checkpoint stays local, training goes on")
      ("threads", po::value<int>()->default_value(0), "threads for model work (training, inference); 0 = libtorch's own choice (normally one per core)")
      ("model-file", po::value<std::string>()->default_value(""),
       "acoustic model to load at start and keep resident for transcription: a project model file (config + "
       "weights) or a TorchScript CTC model (then --vocabulary); empty: this worker does not transcribe")
      ("model", po::value<std::string>()->default_value(""),
       "model NAME from the registry (needs --pg): the newest version, cached in STATE_DIR/models and verified "
       "by its sha256; used instead of --model-file")
      ("model-name", po::value<std::string>()->default_value(""),
       "name the model is advertised and asked for by (default: the file name without its extension)")
      ("vocabulary", po::value<std::string>()->default_value(""),
       "vocabulary file of a TorchScript model: one token per line, line 1 the CTC blank")
      ("lm", po::value<std::string>()->default_value("auto"),
       "character language model for beam-search decoding (made by asr-lm): a file, \"auto\" (the model file's "
       "name with .lm instead of its extension, when that file exists) or \"none\" (greedy decoding)")
      ("beam", po::value<int>()->default_value(BeamOptions().beam), "prefixes kept per frame by the beam search")
      ("lm-weight", po::value<double>()->default_value(BeamOptions().lm_weight),
       "weight of the language model's log-probability in the beam search")
      ("char-bonus", po::value<double>()->default_value(BeamOptions().char_bonus),
       "score added per emitted character in the beam search (offsets the language model's cost per character)")
      ("oov-penalty", po::value<double>()->default_value(BeamOptions().oov_penalty),
       "score added in the beam search when a word ends that the language model's lexicon does not have "
       "(negative: prefer real words; 0 = off)")
      ("max-batch-frames", po::value<int64_t>()->default_value(48000),
       "feature frames (10 ms each, padding included) per device micro-batch; lower it when memory is short")
      ("advertise-host", po::value(&o.advertise_host)->default_value(""),
       "host name or address other workers use to reach this one when it is rank 0 of a training gang "
       "(default: the host name)")
      ("heartbeat-ms", po::value(&o.heartbeat_ms)->default_value(o.heartbeat_ms), "heartbeat interval")
      ("heartbeat-misses", po::value(&o.heartbeat_misses)->default_value(o.heartbeat_misses),
       "missed broker heartbeats after which the worker reconnects");
  po::variables_map vm;
  ParseResult pr = ParseOptions(
      argc, argv, desc,
      "usage: asr-worker [--broker tcp://127.0.0.1:5555] [--device cpu|cuda:N] [--state-dir DIR] [--slots N]", &vm);
  if (!pr.proceed) return pr.exit_code;

  c10::Device device(c10::kCPU);
  if (Status st = ParseDevice(o.device, &device); !st.ok()) {
    std::cerr << "asr-worker: --device: " << st.message() << "\n";
    return 2;
  }
  if (device.is_cuda()) {
    const int index = device.index();
    CudaDeviceInfo info;
    if (Status st = ProbeCudaDevice(index, &info); !st.ok()) {
      std::cerr << "asr-worker: cannot use --device " << o.device << ": " << st.message() << "\n";
      return 2;
    }
    LogInfo("cuda_device").Kv("index", info.index).Kv("name", info.name).Kv("uuid", info.uuid)
        .Kv("total_bytes", info.total_bytes);
    o.gpu = info.uuid;
    o.gpu_memory = [index] {
      int64_t used = 0;
      return CudaMemoryUsed(index, &used).ok() ? used : int64_t{0};
    };
  }

  o.gangs = GangBackendBuilt(device.is_cuda());

  std::signal(SIGTERM, OnSignal);
  std::signal(SIGINT, OnSignal);
  std::signal(SIGPIPE, SIG_IGN);
  JobRegistry registry;
  RegisterDiagnosticKinds(&registry);
  if (Status st = o.Sanitize(); !st.ok()) {
    std::cerr << "asr-worker: " << st.message() << "\n";
    return 2;
  }
  // A conninfo that can never work is an error now, not a PostgreSQL outage to wait out (the
  // registry fetch fell back to a cached model and the worker failed only later).
  if (Status st = o.pg.empty() ? Status::Ok() : CheckConninfo(o.pg); !st.ok()) {
    std::cerr << "asr-worker: --pg: " << st.message() << "\n";
    return 2;
  }
  TrainKindOptions tk;
  tk.state_dir = o.state_dir;
  tk.threads = vm["threads"].as<int>();
  tk.pg = o.pg;
  tk.pg_statement_timeout_ms = o.pg_statement_timeout_ms;
  tk.worker_id = o.worker_id;
  tk.advertise_host = o.advertise_host;
  tk.device = o.device;
  if (Status st = RegisterTrainKind(&registry, tk); !st.ok()) {
    std::cerr << "asr-worker: " << st.message() << "\n";
    return 1;
  }
  std::string path = vm["model-file"].as<std::string>();
  std::string registry_name = vm["model"].as<std::string>();
  std::string sha;  // the model file's SHA-256, named in every transcription result
  if (!registry_name.empty()) {
    if (!path.empty()) {
      std::cerr << "asr-worker: give --model NAME or --model-file PATH, not both\n";
      return 2;
    }
    if (Status st = proto::ValidModelName(registry_name); !st.ok()) {
      std::cerr << "asr-worker: --model: " << st.message() << "\n";
      return 2;
    }
    if (Status st = FetchRegistryModel(o.pg, registry_name, o.state_dir + "/models", &path, &sha,
                                       o.pg_statement_timeout_ms);
        !st.ok()) {
      std::cerr << "asr-worker: --model " << registry_name << ": " << st.message() << "\n";
      return st.code() == Status::Code::kNotFound ? 2 : 1;
    }
  }
  if (!path.empty()) {
    AcousticModelOptions mo;
    mo.device = o.device;
    mo.vocabulary = vm["vocabulary"].as<std::string>();
    mo.max_batch_frames = vm["max-batch-frames"].as<int64_t>();
    mo.threads = vm["threads"].as<int>();
    std::string lm = vm["lm"].as<std::string>();
    if (lm == "auto") {
      std::filesystem::path guess = std::filesystem::path(path).replace_extension(".lm");
      std::error_code ec;
      lm = std::filesystem::exists(guess, ec) ? guess.string() : "";
    } else if (lm == "none") {
      lm.clear();
    }
    mo.lm = lm;
    mo.beam.beam = vm["beam"].as<int>();
    mo.beam.lm_weight = vm["lm-weight"].as<double>();
    mo.beam.char_bonus = vm["char-bonus"].as<double>();
    mo.beam.oov_penalty = vm["oov-penalty"].as<double>();
    if (mo.beam.beam < 1 || !std::isfinite(mo.beam.lm_weight) || !std::isfinite(mo.beam.char_bonus) ||
        !std::isfinite(mo.beam.oov_penalty)) {
      std::cerr << "asr-worker: --beam must be at least 1; --lm-weight, --char-bonus and --oov-penalty finite numbers\n";
      return 2;
    }
    std::string name = vm["model-name"].as<std::string>();
    if (name.empty()) name = registry_name.empty() ? std::filesystem::path(path).stem().string() : registry_name;
    std::unique_ptr<AcousticModel> model;
    if (Status st = LoadAcousticModel(path, name, mo, &model); !st.ok()) {
      // A registry version that does not load (a bad import): the newest older cached version
      // that does, so the worker keeps serving; the log says which.
      bool fell_back = false;
      if (!registry_name.empty()) {
        const std::string failed = path;
        for (const CachedModel& c : CachedModels(o.state_dir + "/models", registry_name)) {
          if (c.path == failed) continue;
          if (LoadAcousticModel(c.path, name, mo, &model).ok()) {
            LogWarn("model_fallback").Kv("model", registry_name).Kv("failed", failed).Kv("error", st.message())
                .Kv("loaded", c.path).Kv("version", c.version);
            path = c.path;
            sha = c.sha256;
            fell_back = true;
            break;
          }
        }
      }
      if (!fell_back) {
        std::cerr << "asr-worker: cannot load "
                  << (registry_name.empty() ? "--model-file " : "--model " + registry_name + " (") << path
                  << (registry_name.empty() ? "" : ")") << ": " << st.message()
                  << (registry_name.empty() ? "" : "; no older cached version loads either") << "\n";
        return 2;
      }
    } else if (!registry_name.empty()) {
      // Only now that this version loads: a new version that does not would otherwise have taken
      // the last good one with it.
      EvictOlderCachedModels(o.state_dir + "/models", registry_name, path);
    }
    if (sha.empty()) {  // --model-file; a registry copy's was verified on fetching
      std::ifstream in(path, std::ios::binary);
      std::string bytes((std::istreambuf_iterator<char>(in)), {});
      if (!in.bad() && !bytes.empty()) sha = Sha256Hex(bytes);
    }
    LogInfo("model_loaded").Kv("model", name).Kv("file", path).Kv("sha256", sha).Kv("device", model->device())
        .Kv("decoding", lm.empty() ? "greedy" : "beam search with " + lm);
    RegisterTranscribeKind(std::shared_ptr<AcousticModel>(std::move(model)), &registry, sha);
  } else {
    LogInfo("no_model").Kv("detail", "no --model-file: this worker does not take transcription jobs");
  }
  Worker worker(o, std::move(registry));
  Status st = worker.Run(&g_stop);
  if (!st.ok()) {
    std::cerr << "asr-worker: " << st.ToString() << "\n";
    return 1;
  }
  return 0;
}
