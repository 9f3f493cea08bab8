#include "client/commands.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <random>

#include <boost/program_options.hpp>
#include <nlohmann/json.hpp>

#include "common/durable_file.h"
#include "common/log.h"
#include "common/sha256.h"

namespace asrf {

namespace po = boost::program_options;
using proto::Cmd;
using json = nlohmann::json;

namespace cli {

int ExitFor(const Status& st) {
  if (st.ok()) return kExitOk;
  std::cerr << "asr-submit: " << st.message() << "\n";
  if (st.code() == Status::Code::kTimeout || st.code() == Status::Code::kUnavailable) return kExitUnreachable;
  // The broker refused the request (bad_request) or knows no such job, batch or model: the
  // command was wrong, not a job (exit 1 is for jobs that did not end done).
  if (st.code() == Status::Code::kInvalid || st.code() == Status::Code::kNotFound) return kExitUsage;
  return kExitJobsFailed;
}

int64_t RequestTimeoutMs(const GlobalOptions& g) { return static_cast<int64_t>(g.request_timeout_s * 1000); }

// Parses a subcommand's words; prints help or a usage error. Returns -1 to proceed.
int ParseSub(const std::vector<std::string>& args, po::options_description& desc,
             po::positional_options_description* pos, const std::string& usage, po::variables_map* vm) {
  desc.add_options()("help,h", "print this help");
  try {
    auto parser = po::command_line_parser(args).options(desc);
    if (pos) parser.positional(*pos);
    po::store(parser.run(), *vm);
    if (vm->count("help")) {
      std::cout << usage << "\n\n" << desc;
      return kExitOk;
    }
    po::notify(*vm);
  } catch (const po::error& e) {
    std::cerr << "asr-submit: " << e.what() << "\n" << usage << "\n";
    return kExitUsage;
  }
  return -1;
}

std::string RandomHex(int bytes) {
  std::random_device rd;
  std::string s;
  static const char* hex = "0123456789abcdef";
  for (int i = 0; i < bytes; ++i) {
    unsigned v = rd() & 0xff;
    s.push_back(hex[v >> 4]);
    s.push_back(hex[v & 15]);
  }
  return s;
}

}  // namespace cli

namespace {

using cli::ExitFor;
using cli::ParseSub;
using cli::RandomHex;
using cli::RequestTimeoutMs;

std::string SafeText(const std::string& bytes) {
  return json(bytes).dump(-1, ' ', false, json::error_handler_t::replace);
}

json CountsJson(const std::map<std::string, int64_t>& counts) {
  json j = json::object();
  for (const char* k : {"queued", "leased", "done", "failed", "dead", "cancelled"}) {
    auto it = counts.find(k);
    j[k] = it == counts.end() ? 0 : it->second;
  }
  return j;
}

int64_t Terminal(const std::map<std::string, int64_t>& c) {
  int64_t n = 0;
  for (const char* k : {"done", "failed", "dead", "cancelled"}) {
    auto it = c.find(k);
    if (it != c.end()) n += it->second;
  }
  return n;
}

// Follows a batch until every job is finished. Prints progress on stderr (a live line on a
// terminal, a line every 5 s otherwise) and, with print_events, one line per finished job.
int WaitBatch(const GlobalOptions& g, BrokerClient& client, const std::string& batch, int64_t total,
              int64_t start_ms, bool print_events, std::map<std::string, int64_t>* final_counts) {
  bool tty = isatty(STDERR_FILENO) == 1;
  int64_t deadline = g.timeout_s > 0 ? start_ms + static_cast<int64_t>(g.timeout_s * 1000) : INT64_MAX;
  int64_t last_answer = MonoMs();
  int64_t next_watch = 0, next_print = 0;
  std::map<std::string, int64_t> counts;
  uint64_t watch_req = 0;
  for (;;) {
    int64_t now = MonoMs();
    if (now >= deadline) {
      std::cerr << "asr-submit: --timeout passed with " << (total - Terminal(counts)) << " of " << total
                << " jobs unfinished (batch " << batch << ")\n";
      return kExitUnreachable;
    }
    if (now - last_answer > RequestTimeoutMs(g)) {
      std::cerr << "asr-submit: the broker at " << client.endpoint() << " stopped answering (batch " << batch
                << " is safe in its journal; run `asr-submit watch " << batch << "` later)\n";
      return kExitUnreachable;
    }
    if (now >= next_watch) {
      proto::WatchReq w;
      w.req = watch_req = client.NextReq();
      w.batch = batch;
      w.watch_ms = 10000;
      w.results = print_events;
      client.Send(Cmd::kWatch, w);
      next_watch = now + 1000;
    }
    Incoming in;
    Status st = client.Receive(std::min<int64_t>(200, std::max<int64_t>(deadline - now, 0)), &in);
    if (st.ok()) {
      if (in.cmd == Cmd::kReply && in.reply.req == watch_req) {
        last_answer = MonoMs();
        counts = in.reply.counts;
        // The broker may hold fewer jobs of the batch than there were (finished ones forgotten,
        // after a restart): wait for those it holds, not for ever.
        int64_t held = 0;
        for (const auto& [state, n] : counts) held += n;
        if (held > 0 && held < total) total = held;
      } else if (in.cmd == Cmd::kReply) {
        last_answer = MonoMs();
      } else if (in.cmd == Cmd::kError) {
        last_answer = MonoMs();
        if (in.error.req == watch_req) {
          std::cerr << "asr-submit: " << in.error.code << ": " << in.error.message << "\n";
          return in.error.code == "not_found" || in.error.code == "bad_request" ? kExitUsage : kExitJobsFailed;
        }
      } else if (in.cmd == Cmd::kEvent) {
        last_answer = MonoMs();
        for (const auto& e : in.event.jobs) {
          if (print_events) {
            json j = {{"job", e.id}, {"state", e.state}, {"attempts", e.attempts}};
            if (!e.error.empty()) j["error"] = e.error;
            if (!e.progress.empty()) {
              j["progress"] = json::parse(e.progress, nullptr, false);
              if (j["progress"].is_discarded()) j["progress"] = e.progress;
            }
            if (!e.result.data.empty()) {
              j["result"] = json::parse(e.result.data, nullptr, false);
              if (j["result"].is_discarded()) j["result"] = e.result.data;
            }
            std::cout << j.dump(-1, ' ', false, json::error_handler_t::replace) << "\n";
          }
          // Counted from the next WATCH reply; an event makes the next one come sooner.
          next_watch = std::min(next_watch, MonoMs() + 50);
        }
      }
    }
    int64_t finished = Terminal(counts);
    now = MonoMs();
    if (now >= next_print || finished >= total) {
      double secs = (now - start_ms) / 1000.0;
      char line[256];
      std::snprintf(line, sizeof(line), "batch %s: %lld/%lld finished (%lld done, %lld failed, %lld dead) %.1f s",
                    batch.c_str(), static_cast<long long>(finished), static_cast<long long>(total),
                    static_cast<long long>(counts["done"]), static_cast<long long>(counts["failed"]),
                    static_cast<long long>(counts["dead"]), secs);
      if (tty) std::cerr << "\r" << line << std::flush;
      else std::cerr << line << "\n";
      next_print = now + (tty ? 200 : 5000);
    }
    if (total > 0 && finished >= total) {
      if (tty) std::cerr << "\n";
      *final_counts = counts;
      return counts["done"] == total ? kExitOk : kExitJobsFailed;
    }
  }
}

// ---- submit -------------------------------------------------------------------------------------

int RunSubmit(const GlobalOptions& g, const std::vector<std::string>& args) {
  std::string kind, payload, batch;
  int64_t count = 1;
  int priority = 0;
  double job_timeout = 0;
  po::options_description desc("submit options");
  desc.add_options()
      ("kind", po::value(&kind)->required(), "job kind (echo, sleep, fail, crash, ...)")
      ("count", po::value(&count)->default_value(1), "number of identical jobs")
      ("payload", po::value(&payload)->default_value("{}"), "JSON text given to each job")
      ("priority", po::value(&priority)->default_value(0), "higher runs first")
      ("job-timeout", po::value(&job_timeout)->default_value(0), "seconds one attempt may run; 0 = no limit")
      ("batch", po::value(&batch)->default_value(""), "batch name (default: a new random one)")
      ("world-size", po::value<uint32_t>()->default_value(1),
       "K > 1: one gang of K jobs (ranks 0..K-1) placed on K idle workers at once, or not at all")
      ("wait", po::bool_switch(), "wait for every job and print a JSON summary line");
  po::variables_map vm;
  int rc = ParseSub(args, desc, nullptr,
                    "usage: asr-submit [--broker URL] submit --kind K [--count N] [--payload JSON] [--priority P] "
                    "[--job-timeout S] [--world-size K] [--wait]",
                    &vm);
  if (rc >= 0) return rc;
  const uint32_t world = vm["world-size"].as<uint32_t>();
  if (world > 1) {
    if (count != 1 || world > 1000) {
      std::cerr << "asr-submit: --world-size K (2..1000) submits one gang of K jobs; leave --count at 1\n";
      return kExitUsage;
    }
    count = world;
  }
  if (count < 1 || count > 100000000) {
    std::cerr << "asr-submit: --count must be between 1 and 100000000\n";
    return kExitUsage;
  }
  if (payload.size() > proto::kMaxPayloadBytes) {
    std::cerr << "asr-submit: --payload is over the " << proto::kMaxPayloadBytes << "-byte limit\n";
    return kExitUsage;
  }
  if (job_timeout < 0) {
    std::cerr << "asr-submit: --job-timeout must be >= 0\n";
    return kExitUsage;
  }
  bool wait = vm["wait"].as<bool>();
  if (batch.empty()) batch = "b-" + RandomHex(8);
  int64_t start = MonoMs();
  BrokerClient client(g.broker);

  // Chunks of at most 1,000 jobs or ~4 MiB, up to 8 in flight; each chunk's request id makes a
  // resend after a timeout or a broker restart return the original ids instead of duplicates.
  const int64_t per_chunk = world > 1 ? world  // a gang goes in one SUBMIT
                                      : std::max<int64_t>(1, std::min<int64_t>(1000, (4 << 20) / (payload.size() + 64)));
  const int64_t chunks = (count + per_chunk - 1) / per_chunk;
  struct Chunk {
    std::string body;
    uint64_t req = 0;
    int64_t sent_ms = 0;
    bool done = false;
  };
  std::vector<Chunk> out(chunks);
  std::string request_base = batch + "/" + RandomHex(4) + "/";
  int64_t next = 0, acked = 0, in_flight = 0;
  int64_t last_progress = MonoMs();
  std::unordered_map<uint64_t, int64_t> by_req;
  while (acked < chunks) {
    int64_t now = MonoMs();
    while (next < chunks && in_flight < 8) {
      proto::Submit s;
      s.req = client.NextReq();
      s.request_id = request_base + std::to_string(next);
      s.batch = batch;
      int64_t n = std::min(per_chunk, count - next * per_chunk);
      s.jobs.resize(n);
      for (size_t r = 0; r < s.jobs.size(); ++r) {
        auto& j = s.jobs[r];
        j.kind = kind;
        j.payload.data = payload;
        j.priority = priority;
        j.timeout_ms = static_cast<int64_t>(job_timeout * 1000);
        if (world > 1) {
          j.gang = batch + "/gang";
          j.rank = static_cast<uint32_t>(r);
          j.world_size = world;
        }
      }
      out[next] = {proto::EncodeBody(s), s.req, now, false};
      by_req[s.req] = next;
      client.SendRaw(Cmd::kSubmit, out[next].body);
      next++;
      in_flight++;
    }
    if (now - last_progress > RequestTimeoutMs(g)) {
      std::cerr << "asr-submit: the broker at " << g.broker << " did not acknowledge the jobs within "
                << g.request_timeout_s << " s (is asr-broker running?); " << acked << " of " << chunks
                << " chunks are durable in batch " << batch << "\n";
      return kExitUnreachable;
    }
    // Resend chunks unanswered for 2 s (same request id: no duplicates).
    for (int64_t i = 0; i < next; ++i) {
      if (!out[i].done && now - out[i].sent_ms > 2000) {
        client.SendRaw(Cmd::kSubmit, out[i].body);
        out[i].sent_ms = now;
      }
    }
    Incoming in;
    Status st = client.Receive(100, &in);
    if (!st.ok()) continue;
    auto it = by_req.find(in.req());
    if (it == by_req.end() || out[it->second].done) continue;
    if (in.cmd == Cmd::kError) {
      std::cerr << "asr-submit: the broker refused the jobs: " << in.error.code << ": " << in.error.message << "\n";
      return in.error.code == "journal_unavailable" ? kExitUnreachable : kExitUsage;
    }
    out[it->second].done = true;
    std::string().swap(out[it->second].body);  // durable: never sent again, its bytes can go
    acked++;
    in_flight--;
    last_progress = MonoMs();
  }
  std::cout << batch << std::endl;
  if (!wait) return kExitOk;
  std::map<std::string, int64_t> counts;
  rc = WaitBatch(g, client, batch, count, start, false, &counts);
  if (rc == kExitUnreachable || counts.empty()) return rc;
  json summary = {{"done", counts["done"]},
                  {"failed", counts["failed"]},
                  {"dead", counts["dead"]},
                  {"cancelled", counts["cancelled"]},
                  {"seconds", (MonoMs() - start) / 1000.0}};
  std::cout << summary.dump() << std::endl;
  return rc;
}

// ---- status -------------------------------------------------------------------------------------

int RunStatus(const GlobalOptions& g, const std::vector<std::string>& args) {
  uint64_t job = 0;
  std::string batch;
  po::options_description desc("status options");
  desc.add_options()
      ("job", po::value(&job)->default_value(0), "job id (also the first word)")
      ("batch", po::value(&batch)->default_value(""), "counts for one batch")
      ("json", po::bool_switch(), "print one JSON object");
  po::positional_options_description pos;
  pos.add("job", 1);
  po::variables_map vm;
  int rc = ParseSub(args, desc, &pos, "usage: asr-submit status [JOB_ID | --batch B] [--json]", &vm);
  if (rc >= 0) return rc;
  bool as_json = vm["json"].as<bool>();
  BrokerClient client(g.broker);
  proto::StatusReq req;
  req.job = job;
  req.batch = batch;
  proto::Reply r;
  Status st = client.Call(Cmd::kStatus, req, &r, RequestTimeoutMs(g));
  if (!st.ok()) return ExitFor(st);
  if (job != 0 && !r.jobs.empty()) {
    const auto& i = r.jobs.front();
    json j = {{"id", i.id},           {"batch", i.batch},       {"kind", i.kind},
              {"state", i.state},     {"priority", i.priority}, {"attempts", i.attempts},
              {"error", i.error},     {"worker", i.worker},     {"submitted_ms", i.submitted_ms},
              {"finished_ms", i.finished_ms}};
    if (!i.why.empty()) j["why"] = i.why;
    json res = json::parse(i.result.data, nullptr, false);
    j["result"] = res.is_discarded() ? json(i.result.data) : res;
    if (!i.progress.empty()) {
      j["progress"] = json::parse(i.progress, nullptr, false);
      if (j["progress"].is_discarded()) j["progress"] = i.progress;
    }
    if (as_json) {
      std::cout << j.dump(-1, ' ', false, json::error_handler_t::replace) << std::endl;
    } else {
      std::cout << "job " << i.id << " (" << i.kind << ", batch " << i.batch << "): " << i.state;
      if (i.attempts) std::cout << ", " << i.attempts << " attempt(s) lost";
      if (!i.worker.empty()) std::cout << ", worker " << i.worker;
      std::cout << "\n";
      if (!i.why.empty()) std::cout << "  why: " << i.why << "\n";
      if (!i.error.empty()) std::cout << "  error: " << i.error << "\n";
      if (!i.progress.empty()) std::cout << "  progress: " << i.progress << "\n";
      if (!i.result.data.empty()) std::cout << "  result: " << SafeText(i.result.data) << "\n";
    }
    return kExitOk;
  }
  json c = CountsJson(r.counts);
  if (as_json) {
    std::cout << c.dump() << std::endl;
  } else {
    for (auto& [k, v] : c.items()) std::cout << k << " " << v << "\n";
  }
  return kExitOk;
}

// ---- train --------------------------------------------------------------------------------------

int RunTrain(const GlobalOptions& g, const std::vector<std::string>& args) {
  std::string manifest, valid, name, out, init;
  int64_t steps = 2000, checkpoint_every = 100, valid_every = 250, warmup = 300, channels = 256, hidden = 256,
          layers = 3;
  double batch_seconds = 64, lr = 1.5e-3;
  uint64_t seed = 1;
  int priority = 0;
  po::options_description desc("train options");
  desc.add_options()
      ("manifest", po::value(&manifest)->default_value(""), "training manifest (JSONL lines with \"audio\" (a path) and \"text\"; other fields are ignored) on storage the worker can read; required unless --evaluate-only")
      ("valid", po::value(&valid)->required(), "validation manifest, same format")
      ("name", po::value(&name)->default_value(""), "model name; required unless --evaluate-only (then \"eval\")")
      ("out", po::value(&out)->default_value(""), "where the worker writes the final model file, ending in .pt (also kept in its state dir); an existing file "
       "there is replaced only if it is a model file")
      ("steps", po::value(&steps)->default_value(steps), "optimizer steps")
      ("batch-seconds", po::value(&batch_seconds)->default_value(batch_seconds), "padded audio seconds per batch")
      ("lr", po::value(&lr)->default_value(lr), "peak learning rate (Adam; linear warm-up, cosine decay)")
      ("warmup", po::value(&warmup)->default_value(warmup), "warm-up steps")
      ("checkpoint-every", po::value(&checkpoint_every)->default_value(checkpoint_every), "steps between checkpoints")
      ("valid-every", po::value(&valid_every)->default_value(valid_every), "steps between validation CER measurements")
      ("seed", po::value(&seed)->default_value(seed), "data order and augmentation seed")
      ("channels", po::value(&channels)->default_value(channels), "convolution channels")
      ("hidden", po::value(&hidden)->default_value(hidden), "GRU hidden size (per direction)")
      ("layers", po::value(&layers)->default_value(layers), "GRU layers")
      ("residual", po::value<int64_t>()->default_value(0),
       "residual BiGRU blocks on top of the GRU layers; with --init, more than the model has adds blocks that start "
       "as the identity (training goes on from what the model already does), 0 keeps its own")
      ("init", po::value(&init)->default_value(""), "start from this model file (fine-tuning)")
      ("priority", po::value(&priority)->default_value(0), "job priority")
      ("evaluate-only", po::bool_switch(), "no training: measure the --init model's CER/WER on --valid")
      ("lm", po::value<std::string>()->default_value(""),
       "with --evaluate-only: also decode with this character language model (beam search; file made by asr-lm, "
       "readable by the worker)")
      ("beam", po::value<int>()->default_value(16), "with --lm: prefixes kept per frame")
      ("lm-weight", po::value<double>()->default_value(0.5), "with --lm: weight of the language model")
      ("char-bonus", po::value<double>()->default_value(1.0), "with --lm: score added per emitted character")
      ("oov-penalty", po::value<double>()->default_value(-2.0),
       "with --lm: score added when a word ends that the language model's lexicon does not have")
      ("world-size", po::value<uint32_t>()->default_value(1),
       "data-parallel ranks: K > 1 gang-schedules K ranks on K idle workers at once (Gloo on CPU); each step "
       "takes K batches, one per rank")
      ("combine", po::value<int>()->default_value(1),
       "batches per rank per step (a single process with --combine K takes the steps K ranks would)")
      ("publish-every", po::value<int>()->default_value(5),
       "every Nth checkpoint is also published to PostgreSQL (workers with --pg), so a gang placed on other "
       "machines can resume from it; 0 = never")
      ("dropout", po::value<double>()->default_value(0.1), "dropout inside the model while training")
      ("max-seconds", po::value<double>()->default_value(20),
       "longest utterance allowed in --manifest and --valid (seconds, at most 3600); a longer one fails the job "
       "before training, naming its line")
      ("valid-max", po::value<int64_t>()->default_value(500),
       "utterances of --valid measured at each --valid-every (the end measures all of them)")
      ("adam-eps", po::value<double>()->default_value(1e-8), "Adam's epsilon")
      ("no-spec-augment", po::bool_switch(), "train without SpecAugment masking")
      ("speed-perturb", po::value<double>()->default_value(0.15),
       "resample each training utterance by a random factor in 1 ± this (tempo, pitch and formants move; helps "
       "on voices not in the data); 0 = off")
      ("vtlp", po::value<double>()->default_value(0.12),
       "warp each training utterance's mel axis by a random factor in 1 ± this (vocal tract length); 0 = off")
      ("lowpass", po::value<double>()->default_value(0),
       "share of training utterances low-passed at a random cutoff of 3-7 kHz, as telephone lines and band-limited "
       "recordings leave speech (in [0, 1]); 0 = off")
      ("reverb", po::value<double>()->default_value(0),
       "share of training utterances played in a synthetic room (reverberation time 0.2-1.0 s, the direct sound "
       "-15 to +10 dB against the echo), as far-field recordings leave speech (in [0, 1]); 0 = off")
      ("noise", po::value<double>()->default_value(0),
       "share of training utterances given Gaussian background noise (5-30 dB below the speech, from white hiss "
       "to low rumble) (in [0, 1]); 0 = off")
      ("nonspeech", po::value<double>()->default_value(0),
       "share of training utterances replaced by background without speech (hiss, rumble, mains hum) with an "
       "empty transcript, so the model writes nothing for noise alone (in [0, 0.5]); 0 = off")
      ("pad-background", po::value<double>()->default_value(0),
       "share of training utterances given 0.1-1.5 s of background without speech before and after them, 10-40 dB "
       "below the speech, as segments cut at the pauses of a long recording hold (in [0, 1]); 0 = off")
      ("wait", po::bool_switch(), "follow the job (progress lines) until it ends");
  po::variables_map vm;
  int rc = ParseSub(args, desc, nullptr,
                    "usage: asr-submit train --manifest train.jsonl --valid valid.jsonl --name NAME [--steps N] "
                    "[--batch-seconds S] [--out FILE] [--wait]",
                    &vm);
  if (rc >= 0) return rc;
  if (vm["evaluate-only"].as<bool>()) {
    if (manifest.empty()) manifest = valid;  // read for its summary only
    if (name.empty()) name = "eval";
  } else if (manifest.empty() || name.empty()) {
    std::cerr << "asr-submit: train needs --manifest and --name (only --evaluate-only does without them)\n";
    return kExitUsage;
  }
  if (!name.empty()) {
    if (Status st = proto::ValidModelName(name); !st.ok()) {
      std::cerr << "asr-submit: --name: " << st.message() << "\n";
      return kExitUsage;
    }
  }
  if (!out.empty() && (out.size() < 4 || out.compare(out.size() - 3, 3, ".pt") != 0)) {
    std::cerr << "asr-submit: --out must name a model file ending in .pt, not " << out
              << " (the worker replaces only a model file there)\n";
    return kExitUsage;
  }
  auto absolute = [](const std::string& p) {
    if (p.empty() || p[0] == '/') return p;
    char cwd[4096];
    return std::string(getcwd(cwd, sizeof(cwd)) ? cwd : ".") + "/" + p;
  };
  for (const std::string* p : {&manifest, &valid}) {
    if (access(p->c_str(), R_OK) != 0) {
      std::cerr << "asr-submit: cannot read " << *p << " (the worker must be able to read it too)\n";
      return kExitUsage;
    }
  }
  json payload = {{"manifest", absolute(manifest)}, {"valid", absolute(valid)}, {"name", name},
                  {"out", absolute(out)}, {"steps", steps}, {"batch_seconds", batch_seconds}, {"lr", lr},
                  {"warmup", warmup}, {"checkpoint_every", checkpoint_every}, {"valid_every", valid_every},
                  {"seed", seed}, {"channels", channels}, {"hidden", hidden}, {"layers", layers},
                  {"residual", vm["residual"].as<int64_t>()}, {"init", absolute(init)}, {"evaluate_only", vm["evaluate-only"].as<bool>()},
                  {"combine", vm["combine"].as<int>()}, {"publish_every", vm["publish-every"].as<int>()},
                  {"dropout", vm["dropout"].as<double>()}, {"adam_eps", vm["adam-eps"].as<double>()}, {"spec_augment", !vm["no-spec-augment"].as<bool>()},
                  {"speed_perturb", vm["speed-perturb"].as<double>()}, {"vtlp", vm["vtlp"].as<double>()},
                  {"lowpass", vm["lowpass"].as<double>()}, {"reverb", vm["reverb"].as<double>()},
                  {"noise", vm["noise"].as<double>()}, {"nonspeech", vm["nonspeech"].as<double>()},
                  {"pad_background", vm["pad-background"].as<double>()}, {"max_seconds", vm["max-seconds"].as<double>()},
                  {"valid_max", vm["valid-max"].as<int64_t>()},
                  {"lm", absolute(vm["lm"].as<std::string>())}, {"beam", vm["beam"].as<int>()},
                  {"lm_weight", vm["lm-weight"].as<double>()}, {"char_bonus", vm["char-bonus"].as<double>()},
                  {"oov_penalty", vm["oov-penalty"].as<double>()}};
  if (vm["evaluate-only"].as<bool>() && init.empty()) {
    std::cerr << "asr-submit: --evaluate-only needs --init MODEL\n";
    return kExitUsage;
  }
  BrokerClient client(g.broker);
  proto::Submit s;
  s.batch = "train-" + name + "-" + RandomHex(4);
  s.request_id = s.batch;
  const uint32_t world = vm["world-size"].as<uint32_t>();
  for (uint32_t r = 0; r < std::max<uint32_t>(world, 1); ++r) {
    proto::SubmitJob j;
    j.kind = "train";
    j.payload.data = payload.dump();
    j.priority = priority;
    if (world > 1) {
      j.gang = s.batch;
      j.rank = r;
      j.world_size = world;
    }
    s.jobs.push_back(std::move(j));
  }
  proto::Reply r;
  Status st = client.Call(Cmd::kSubmit, s, &r, RequestTimeoutMs(g));
  if (!st.ok()) return ExitFor(st);
  std::cout << "job " << r.job_ids.at(0) << " batch " << r.batch << std::endl;
  if (!vm["wait"].as<bool>()) return kExitOk;
  std::map<std::string, int64_t> counts;
  return WaitBatch(g, client, r.batch, static_cast<int64_t>(r.job_ids.size()), MonoMs(), true, &counts);
}

// ---- results ------------------------------------------------------------------------------------

int RunResults(const GlobalOptions& g, const std::vector<std::string>& args) {
  uint64_t job = 0;
  po::options_description desc("results options");
  desc.add_options()
      ("job", po::value(&job)->required(), "job id")
      ("json", po::bool_switch(), "print {\"id\",\"state\",\"result\",\"error\"} as one JSON line");
  po::positional_options_description pos;
  pos.add("job", 1);
  po::variables_map vm;
  int rc = ParseSub(args, desc, &pos,
                    "usage: asr-submit results JOB_ID [--json]  (the result bytes on stdout; from the broker, or from "
                    "PostgreSQL after the broker's retention period)",
                    &vm);
  if (rc >= 0) return rc;
  BrokerClient client(g.broker);
  proto::StatusReq req;
  req.job = job;
  proto::Reply r;
  Status st = client.Call(Cmd::kStatus, req, &r, RequestTimeoutMs(g));
  if (!st.ok()) return ExitFor(st);
  if (r.jobs.empty()) return ExitFor(Status::Corruption("empty answer from the broker"));
  const auto& i = r.jobs.front();
  if (vm["json"].as<bool>()) {
    json j = {{"id", i.id}, {"state", i.state}, {"error", i.error}};
    json res = json::parse(i.result.data, nullptr, false);
    j["result"] = res.is_discarded() ? json(i.result.data) : res;
    if (!i.why.empty()) j["why"] = i.why;
    std::cout << j.dump(-1, ' ', false, json::error_handler_t::replace) << std::endl;
  } else {
    std::cout << i.result.data;
    if (!i.result.data.empty() && i.result.data.back() != '\n') std::cout << "\n";
  }
  if (i.state == "done" && i.why.empty()) return kExitOk;
  if (!i.why.empty()) std::cerr << "asr-submit: job " << i.id << ": " << i.why << "\n";
  else if (!i.error.empty()) std::cerr << "asr-submit: job " << i.id << " is " << i.state << ": " << i.error << "\n";
  else std::cerr << "asr-submit: job " << i.id << " is " << i.state << "\n";
  return kExitJobsFailed;
}

// ---- cancel / retry -----------------------------------------------------------------------------

bool ParseJobId(const std::string& s, uint64_t* id) {
  if (s.empty() || s.find_first_not_of("0123456789") != std::string::npos || s.size() > 19) return false;
  *id = std::stoull(s);
  return *id != 0;
}

int RunCancel(const GlobalOptions& g, const std::vector<std::string>& args) {
  std::string target;
  po::options_description desc("cancel options");
  desc.add_options()("target", po::value(&target)->required(), "a job id or a batch name");
  po::positional_options_description pos;
  pos.add("target", 1);
  po::variables_map vm;
  int rc = ParseSub(args, desc, &pos, "usage: asr-submit cancel JOB_ID|BATCH", &vm);
  if (rc >= 0) return rc;
  proto::CancelReq req;
  if (!ParseJobId(target, &req.job)) req.batch = target;
  BrokerClient client(g.broker);
  proto::Reply r;
  // Not resent: a second CANCEL would report 0 jobs cancelled.
  Status st = client.Call(Cmd::kCancel, req, &r, RequestTimeoutMs(g), RequestTimeoutMs(g));
  if (!st.ok()) return ExitFor(st);
  std::cout << "cancelled " << r.affected << " job(s)\n";
  return kExitOk;
}

int RunRetry(const GlobalOptions& g, const std::vector<std::string>& args) {
  std::string target;
  po::options_description desc("retry options");
  desc.add_options()
      ("job", po::value(&target)->default_value(""), "a dead or failed job id")
      ("dead", po::bool_switch(), "every dead job");
  po::positional_options_description pos;
  pos.add("job", 1);
  po::variables_map vm;
  int rc = ParseSub(args, desc, &pos, "usage: asr-submit retry JOB_ID | --dead", &vm);
  if (rc >= 0) return rc;
  proto::RetryReq req;
  req.all_dead = vm["dead"].as<bool>();
  if (!req.all_dead && !ParseJobId(target, &req.job)) {
    std::cerr << "asr-submit: retry needs a job id or --dead\n";
    return kExitUsage;
  }
  BrokerClient client(g.broker);
  proto::Reply r;
  // Not resent: a second RETRY would find the job queued and refuse.
  Status st = client.Call(Cmd::kRetry, req, &r, RequestTimeoutMs(g), RequestTimeoutMs(g));
  if (!st.ok()) return ExitFor(st);
  std::cout << "requeued " << r.affected << " job(s)\n";
  return kExitOk;
}

// ---- watch --------------------------------------------------------------------------------------

int RunWatch(const GlobalOptions& g, const std::vector<std::string>& args) {
  std::string batch;
  po::options_description desc("watch options");
  desc.add_options()("batch", po::value(&batch)->required(), "batch name");
  po::positional_options_description pos;
  pos.add("batch", 1);
  po::variables_map vm;
  int rc = ParseSub(args, desc, &pos, "usage: asr-submit watch BATCH  (one JSON line per finished job)", &vm);
  if (rc >= 0) return rc;
  BrokerClient client(g.broker);
  proto::StatusReq req;
  req.batch = batch;
  proto::Reply r;
  Status st = client.Call(Cmd::kStatus, req, &r, RequestTimeoutMs(g));
  if (!st.ok()) return ExitFor(st);
  int64_t total = 0;
  for (auto& [k, v] : r.counts) total += v;
  std::map<std::string, int64_t> counts;
  return WaitBatch(g, client, batch, total, MonoMs(), true, &counts);
}

// ---- jobs / workers -----------------------------------------------------------------------------

int RunJobs(const GlobalOptions& g, const std::vector<std::string>& args) {
  std::string state, batch;
  uint32_t limit = 100;
  po::options_description desc("jobs options");
  desc.add_options()
      ("state", po::value(&state)->default_value(""), "queued, leased, done, failed, dead or cancelled")
      ("batch", po::value(&batch)->default_value(""), "only this batch")
      ("limit", po::value(&limit)->default_value(100), "at most this many, oldest first")
      ("json", po::bool_switch(), "one JSON object per line");
  po::variables_map vm;
  int rc = ParseSub(args, desc, nullptr, "usage: asr-submit jobs [--state S] [--batch B] [--limit N] [--json]", &vm);
  if (rc >= 0) return rc;
  BrokerClient client(g.broker);
  proto::JobsReq req;
  req.state = state;
  req.batch = batch;
  req.limit = limit;
  proto::Reply r;
  Status st = client.Call(Cmd::kJobs, req, &r, RequestTimeoutMs(g));
  if (!st.ok()) return ExitFor(st);
  for (const auto& i : r.jobs) {
    if (vm["json"].as<bool>()) {
      json j = {{"id", i.id},       {"batch", i.batch},       {"kind", i.kind},
                {"state", i.state}, {"attempts", i.attempts}, {"error", i.error},
                {"worker", i.worker}};
      if (!i.why.empty()) j["why"] = i.why;
      std::cout << j.dump(-1, ' ', false, json::error_handler_t::replace) << "\n";
    } else {
      std::cout << i.id << "\t" << i.state << "\t" << i.kind << "\t" << i.batch << "\tattempts=" << i.attempts;
      if (!i.error.empty()) std::cout << "\t" << i.error;
      else if (!i.why.empty()) std::cout << "\t" << i.why;
      std::cout << "\n";
    }
  }
  if (r.jobs.empty() && !vm["json"].as<bool>()) std::cerr << "no jobs\n";
  return kExitOk;
}

int RunWorkers(const GlobalOptions& g, const std::vector<std::string>& args) {
  po::options_description desc("workers options");
  desc.add_options()("json", po::bool_switch(), "one JSON object per line");
  po::variables_map vm;
  int rc = ParseSub(args, desc, nullptr, "usage: asr-submit workers [--json]", &vm);
  if (rc >= 0) return rc;
  BrokerClient client(g.broker);
  proto::Reply r;
  Status st = client.Call(Cmd::kWorkers, proto::WorkersReq{}, &r, RequestTimeoutMs(g));
  if (!st.ok()) return ExitFor(st);
  for (const auto& w : r.workers) {
    if (vm["json"].as<bool>()) {
      json j = {{"id", w.id},           {"host", w.host},         {"device", w.device},
                {"slots", w.slots},     {"running", w.running},   {"draining", w.draining},
                {"idle_ms", w.idle_ms}, {"kinds", w.kinds},   {"gpu", w.gpu}};
      std::cout << j.dump() << "\n";
    } else {
      std::cout << w.id << "\t" << w.device << (w.gpu.empty() ? "" : " " + w.gpu) << "\tslots=" << w.slots
                << "\trunning=" << w.running << (w.draining ? "\tdraining" : "") << "\n";
    }
  }
  if (r.workers.empty() && !vm["json"].as<bool>()) std::cerr << "no workers connected\n";
  return kExitOk;
}

// ---- models -------------------------------------------------------------------------------------

int RunModels(const GlobalOptions& g, const std::vector<std::string>& args) {
  std::string op, target, out, name, config;
  int version = 0;
  double valid_cer = -1;
  po::options_description desc("models options");
  desc.add_options()
      ("op", po::value(&op)->required(), "list, export or import")
      ("target", po::value(&target)->default_value(""), "export: the model name; import: the model file")
      ("out", po::value(&out)->default_value(""), "export: the file to write")
      ("version", po::value(&version)->default_value(0), "export: the version (0 = the newest)")
      ("name", po::value(&name)->default_value(""), "import: the name to store it under (a new version)")
      ("valid-cer", po::value(&valid_cer)->default_value(-1), "import: the model's validation CER, if known")
      ("json", po::bool_switch(), "list: one JSON object per line");
  po::positional_options_description pos;
  pos.add("op", 1).add("target", 1);
  po::variables_map vm;
  const char* usage =
      "usage: asr-submit models list [--json]\n"
      "       asr-submit models export NAME --out FILE [--version N]\n"
      "       asr-submit models import FILE --name NAME [--valid-cer X]\n"
      "The registry lives in PostgreSQL; the broker must run with --pg. Workers load a registry model with "
      "`asr-worker --model NAME`.";
  int rc = ParseSub(args, desc, &pos, usage, &vm);
  if (rc >= 0) return rc;
  proto::ModelsReq m;
  m.op = op;
  if (op == "export") {
    if (target.empty() || out.empty()) {
      std::cerr << "asr-submit: models export needs NAME and --out FILE\n" << usage << "\n";
      return kExitUsage;
    }
    m.name = target;
    m.version = version;
  } else if (op == "import") {
    if (target.empty() || name.empty()) {
      std::cerr << "asr-submit: models import needs FILE and --name NAME\n" << usage << "\n";
      return kExitUsage;
    }
    if (Status st = proto::ValidModelName(name); !st.ok()) {
      std::cerr << "asr-submit: --name: " << st.message() << "\n";
      return kExitUsage;
    }
    // The size first: a file of gigabytes named by mistake is not read into memory.
    std::error_code size_ec;
    const auto size = std::filesystem::file_size(target, size_ec);
    if (size_ec || size == 0 || size > static_cast<uintmax_t>(proto::kMaxModelBytes)) {
      std::cerr << "asr-submit: " << target << (size_ec ? ": " + size_ec.message() : std::string(" is empty or over ") +
                                                std::to_string(proto::kMaxModelBytes >> 20) + " MiB") << "\n";
      return kExitUsage;
    }
    std::ifstream in(target, std::ios::binary);
    if (!in) {
      std::cerr << "asr-submit: cannot read " << target << "\n";
      return kExitUsage;
    }
    m.bytes.data.assign(std::istreambuf_iterator<char>(in), {});
    // Every model a worker loads (the project's own, TorchScript) is a PyTorch zip archive: refuse
    // anything else here, before it becomes the newest version every `--model NAME` worker takes.
    // A zip's directory is at its end: a copy cut short has its first bytes and lacks that.
    const std::string& b = m.bytes.data;
    const size_t tail = std::min<size_t>(b.size(), 65535 + 22);
    if (b.compare(0, 4, "PK\x03\x04") != 0 ||
        std::string_view(b).substr(b.size() - tail).rfind("PK\x05\x06") == std::string_view::npos) {
      std::cerr << "asr-submit: " << target << " is not a whole model file (a PyTorch archive, as training and "
                << "`models export` write, or a TorchScript module"
                << (b.compare(0, 4, "PK\x03\x04") == 0 ? "; this one is cut short: its zip directory is missing" : "")
                << ")\n";
      return kExitUsage;
    }
    m.name = name;
    m.valid_cer = valid_cer;
  } else if (op != "list") {
    std::cerr << "asr-submit: unknown models operation " << op << "\n" << usage << "\n";
    return kExitUsage;
  }
  BrokerClient client(g.broker);
  proto::Reply r;
  Status st = client.Call(Cmd::kModels, m, &r, std::max<int64_t>(RequestTimeoutMs(g), 30000));
  if (!st.ok()) return ExitFor(st);
  auto line = [](const proto::ModelInfo& i) {
    json j = {{"name", i.name}, {"version", i.version}, {"sha256", i.sha256}, {"bytes", i.size},
              {"created", i.created}};
    if (i.valid_cer >= 0) j["valid_cer"] = i.valid_cer;
    return j;
  };
  if (op == "list") {
    for (const auto& i : r.models) {
      if (vm["json"].as<bool>()) {
        std::cout << line(i).dump() << "\n";
      } else {
        std::printf("%-24s v%-4d %10lld bytes  %s  %s%s\n", i.name.c_str(), i.version, static_cast<long long>(i.size),
                    i.sha256.substr(0, 16).c_str(), i.created.c_str(),
                    i.valid_cer >= 0 ? ("  CER " + std::to_string(i.valid_cer)).c_str() : "");
      }
    }
    if (r.models.empty()) std::cerr << "the registry is empty\n";
    return kExitOk;
  }
  if (r.models.empty()) return ExitFor(Status::Corruption("empty answer from the broker"));
  if (op == "import") {
    std::cout << "stored " << r.models[0].name << " version " << r.models[0].version << " (" << r.models[0].size
              << " bytes, sha256 " << r.models[0].sha256 << ")\n";
    return kExitOk;
  }
  if (static_cast<int64_t>(r.blob.data.size()) != r.models[0].size) {
    return ExitFor(Status::Corruption("the registry sent " + std::to_string(r.blob.data.size()) + " bytes, expected " +
                                      std::to_string(r.models[0].size)));
  }
  if (Sha256Hex(r.blob.data) != r.models[0].sha256) {
    return ExitFor(Status::Corruption("the bytes the registry sent do not match their sha256 " + r.models[0].sha256));
  }
  if (Status wst = WriteFileDurably(out, r.blob.data); !wst.ok()) return ExitFor(wst);
  std::cout << "wrote " << r.models[0].name << " version " << r.models[0].version << " to " << out << " ("
            << r.blob.data.size() << " bytes, sha256 " << r.models[0].sha256 << ")\n";
  return kExitOk;
}

}  // namespace

const std::vector<Command>& Commands() {
  static const std::vector<Command> kCommands = {
      {"submit", "submit jobs of one kind; --wait to wait for them", RunSubmit},
      {"status", "counts per state, or one job with its result", RunStatus},
      {"results", "print one job's result", RunResults},
      {"train", "train a CTC model on the fleet", RunTrain},
      {"watch", "follow a batch until it finishes", RunWatch},
      {"cancel", "cancel a job or every unfinished job of a batch", RunCancel},
      {"jobs", "list jobs, e.g. the dead-letter list with --state dead", RunJobs},
      {"retry", "requeue a dead or failed job, or every dead job", RunRetry},
      {"workers", "list connected workers", RunWorkers},
      {"transcribe", "transcribe audio files or folders on the fleet and write transcripts", RunTranscribe},
      {"models", "the model registry: list, export NAME --out FILE, import FILE --name NAME", RunModels},
      {"collect", "write the transcripts of a transcription batch submitted without --wait", RunCollect},
  };
  return kCommands;
}

}  // namespace asrf
