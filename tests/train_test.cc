// Training on the fleet with the real binaries: a short run on tiny synthesised data lowers the
// loss; a worker killed mid-run (SIGKILL) or stopped (SIGTERM) is replaced by one on the same state
// dir that resumes from the newest checkpoint; bad manifests fail with clear errors.
#include <gtest/gtest.h>
#include <signal.h>
#include <sndfile.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "tests/harness.h"
#include "worker/checkpoint_store.h"

namespace asrf::testing {
namespace {

using json = nlohmann::json;

// A copy of `manifest` (16 kHz mono audio) under `dir`, each file re-encoded: `convert` gets its
// samples as floats in [-1, 1) and sets the copy's frames (interleaved), rate, channels and format.
using Reencode = std::function<void(const std::vector<float>& in, std::vector<float>* out, SF_INFO* info)>;
std::string CopyManifest(const std::string& manifest, const std::string& dir, const Reencode& convert) {
  std::filesystem::create_directories(dir);
  std::ifstream in(manifest);
  std::string out_path = dir + "/manifest.jsonl";
  std::ofstream out(out_path);
  std::string line;
  int n = 0;
  while (std::getline(in, line)) {
    json j = json::parse(line);
    SF_INFO info{};
    SNDFILE* f = sf_open(j["audio"].get<std::string>().c_str(), SFM_READ, &info);
    if (!f || info.samplerate != 16000 || info.channels != 1) return "";
    std::vector<float> x(static_cast<size_t>(info.frames)), y;
    sf_readf_float(f, x.data(), info.frames);
    sf_close(f);
    SF_INFO oi{};
    convert(x, &y, &oi);
    std::string path = dir + "/" + std::to_string(n++) + ".wav";
    SNDFILE* o = sf_open(path.c_str(), SFM_WRITE, &oi);
    if (!o) return "";
    sf_writef_float(o, y.data(), static_cast<sf_count_t>(y.size() / oi.channels));
    sf_close(o);
    j["audio"] = path;
    out << j.dump() << "\n";
  }
  return out_path;
}

// At 48 kHz in two channels, 16-bit (upsampled 3x by linear interpolation; the right channel at
// half the left's level).
std::string Manifest48kStereo(const std::string& manifest, const std::string& dir) {
  return CopyManifest(manifest, dir, [](const std::vector<float>& x, std::vector<float>* y, SF_INFO* info) {
    for (size_t i = 0; i < x.size(); ++i) {
      float next = i + 1 < x.size() ? x[i + 1] : x[i];
      for (int k = 0; k < 3; ++k) {
        float v = x[i] + (next - x[i]) * static_cast<float>(k) / 3.0f;
        y->push_back(v);
        y->push_back(v / 2);
      }
    }
    *info = SF_INFO{0, 48000, 2, SF_FORMAT_WAV | SF_FORMAT_PCM_16, 0, 0};
  });
}

// The same samples as 32-bit float WAV at 16 kHz.
std::string ManifestFloat(const std::string& manifest, const std::string& dir) {
  return CopyManifest(manifest, dir, [](const std::vector<float>& x, std::vector<float>* y, SF_INFO* info) {
    *y = x;
    *info = SF_INFO{0, 16000, 1, SF_FORMAT_WAV | SF_FORMAT_FLOAT, 0, 0};
  });
}

// Tiny data shared by the tests of this file (synthesised once).
class TrainTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    data_ = new TempDir();
    RunResult r = RunCommand({ASRF_SYNTH_BIN, "--out", data_->path(), "--utterances", "48", "--seed", "7",
                              "--valid-fraction", "0.2", "--heldout-fraction", "0", "--max-words", "6"},
                             120000);
    ASSERT_EQ(r.code, 0) << r.err;
  }
  static void TearDownTestSuite() {
    delete data_;
    data_ = nullptr;
  }
  static std::string Train() { return *data_ / "train.jsonl"; }
  static std::string Valid() { return *data_ / "valid.jsonl"; }

  std::vector<std::string> TrainArgs(const std::string& name, int steps, int checkpoint_every) {
    return {"train", "--manifest", Train(), "--valid", Valid(), "--name", name, "--steps", std::to_string(steps),
            "--batch-seconds", "12", "--checkpoint-every", std::to_string(checkpoint_every), "--valid-every", "1000",
            "--warmup", "5", "--lr", "2e-3", "--channels", "48", "--hidden", "48", "--layers", "1"};
  }

  static json JobStatus(const std::string& endpoint, int job) {
    RunResult r = Submit(endpoint, {"status", std::to_string(job), "--json"});
    auto j = json::parse(r.out, nullptr, false);
    return j.is_discarded() ? json::object() : j;
  }
  static int64_t Step(const json& status) {
    if (!status.contains("progress") || !status["progress"].is_object()) return -1;
    return status["progress"].value("step", -1);
  }

  TempDir tmp_;
  static TempDir* data_;
};
TempDir* TrainTest::data_ = nullptr;

TEST_F(TrainTest, ShortRunLowersTheLossAndWritesTheModel) {
  BrokerProc b = StartBroker(tmp_ / "broker", tmp_ / "broker.log");
  Proc w = StartWorker(b.endpoint, tmp_ / "w", tmp_ / "w.log", {"--threads", "2"});
  std::vector<std::string> args = TrainArgs("tiny", 150, 50);
  args[args.size() - 7] = "3e-3";  // --lr
  args.insert(args.end(), {"--out", tmp_ / "out/tiny.pt", "--wait"});
  RunResult r = Submit(b.endpoint, args, 240000);
  ASSERT_EQ(r.code, 0) << r.err << ReadFile(tmp_ / "w.log");
  // --wait prints progress lines, then the result.
  double first_loss = -1;
  json result;
  std::istringstream in(r.out);
  std::string line;
  while (std::getline(in, line)) {
    auto j = json::parse(line, nullptr, false);
    if (j.is_discarded()) continue;
    if (j.contains("progress") && first_loss < 0) {
      ASSERT_TRUE(j["progress"]["loss"].is_number()) << "loss is not a number: " << line;
      first_loss = j["progress"]["loss"].get<double>();
    }
    if (j.value("state", "") == "done") result = j["result"];
  }
  ASSERT_GT(first_loss, 0) << r.out;
  ASSERT_TRUE(result.is_object()) << r.out;
  EXPECT_EQ(result["steps"].get<int>(), 150);
  // Making the batches is part of each step's time, and never none of it.
  ASSERT_TRUE(result["prepare_seconds"].is_number()) << r.out;
  EXPECT_GT(result["prepare_seconds"].get<double>(), 0.0);
  EXPECT_LT(result["prepare_seconds"].get<double>(), result["train_seconds"].get<double>());
  // final_loss is a moving average over the last steps; a single batch's loss is noisy.
  EXPECT_LT(result["final_loss"].get<double>(), 0.9 * first_loss) << "the loss did not go down";
  EXPECT_GE(result["valid_cer"].get<double>(), 0.0);
  EXPECT_EQ(result["valid_texts_in_training"].get<int>(), 0) << "asr-synth's splits share no text";
  EXPECT_FALSE(ReadFile(tmp_ / "out/tiny.pt").empty());
  EXPECT_FALSE(ReadFile(tmp_ / "w/models/tiny.pt").empty());
  // Evaluating the saved model alone gives the same CER the run reported (file round trip).
  RunResult ev = Submit(b.endpoint, {"train", "--manifest", Train(), "--valid", Valid(), "--name", "eval",
                                     "--init", tmp_ / "out/tiny.pt", "--evaluate-only", "--wait"},
                        120000);
  ASSERT_EQ(ev.code, 0) << ev.err;
  // The result of the job an evaluation's --wait output ends with.
  auto done_result = [](const RunResult& rr) {
    json found;
    std::istringstream rin(rr.out);
    std::string l;
    while (std::getline(rin, l)) {
      auto j = json::parse(l, nullptr, false);
      if (!j.is_discarded() && j.value("state", "") == "done") found = j["result"];
    }
    return found;
  };
  json evr = done_result(ev);
  ASSERT_TRUE(evr.is_object()) << ev.out;
  EXPECT_NEAR(evr["valid_cer"].get<double>(), result["valid_cer"].get<double>(), 1e-6);
  EXPECT_EQ(result["residual"].get<int>(), 0);

  // The same valid set recorded at 48 kHz in stereo: the worker mixes and resamples it on loading
  // (no "needs 16000 Hz" refusal), so the model hears nearly what it heard at 16 kHz.
  std::string m48 = Manifest48kStereo(Valid(), tmp_ / "48k");
  ASSERT_FALSE(m48.empty());
  RunResult ev48 = Submit(b.endpoint, {"train", "--manifest", m48, "--valid", m48, "--name", "eval48",
                                       "--init", tmp_ / "out/tiny.pt", "--evaluate-only", "--wait"},
                          120000);
  ASSERT_EQ(ev48.code, 0) << ev48.out << ev48.err << ReadFile(tmp_ / "w.log");
  json evr48 = done_result(ev48);
  ASSERT_TRUE(evr48.is_object()) << ev48.out;
  EXPECT_EQ(evr48["utterances"].get<int>(), evr["utterances"].get<int>());
  EXPECT_NEAR(evr48["hours"].get<double>(), evr["hours"].get<double>(), 1e-4);
  EXPECT_NEAR(evr48["valid_cer"].get<double>(), evr["valid_cer"].get<double>(), 0.05);
  // And as 32-bit float at 16 kHz, the same samples: the same CER, measured with the shipped
  // model, which hears this speech (a tiny model's CER may be 1 on speech and silence alike).
  // Training read 16 kHz files as 16-bit integers, which turned float audio, all below 1.0, into
  // silence.
  std::string mf = ManifestFloat(Valid(), tmp_ / "float");
  ASSERT_FALSE(mf.empty());
  const std::string shipped = std::string(ASRF_SOURCE_DIR) + "/models/en-small.pt";
  RunResult evs = Submit(b.endpoint, {"train", "--valid", Valid(), "--init", shipped, "--evaluate-only", "--wait"},
                         120000);
  RunResult evf = Submit(b.endpoint, {"train", "--valid", mf, "--init", shipped, "--evaluate-only", "--wait"}, 120000);
  ASSERT_EQ(evs.code, 0) << evs.out << evs.err << ReadFile(tmp_ / "w.log");
  ASSERT_EQ(evf.code, 0) << evf.out << evf.err << ReadFile(tmp_ / "w.log");
  json evrs = done_result(evs), evrf = done_result(evf);
  ASSERT_TRUE(evrs.is_object() && evrf.is_object()) << evs.out << evf.out;
  EXPECT_LT(evrs["valid_cer"].get<double>(), 0.5) << evs.out;
  EXPECT_NEAR(evrf["valid_cer"].get<double>(), evrs["valid_cer"].get<double>(), 1e-6);

  // Grown by residual blocks (--residual): the same CER before any step, then training goes on with
  // them, and the model cannot shrink again.
  auto result_of = [&](const RunResult& rr) {
    json found;
    std::istringstream rin(rr.out);
    std::string l;
    while (std::getline(rin, l)) {
      auto j = json::parse(l, nullptr, false);
      if (!j.is_discarded() && j.contains("result")) found = j;
    }
    return found;
  };
  RunResult same = Submit(b.endpoint, {"train", "--manifest", Train(), "--valid", Valid(), "--name", "eval", "--init",
                                       tmp_ / "out/tiny.pt", "--residual", "2", "--evaluate-only", "--wait"},
                          120000);
  ASSERT_EQ(same.code, 0) << same.err;
  json grown_eval = result_of(same)["result"];
  ASSERT_TRUE(grown_eval.is_object()) << same.out;
  EXPECT_EQ(grown_eval["residual"].get<int>(), 2);
  EXPECT_NEAR(grown_eval["valid_cer"].get<double>(), result["valid_cer"].get<double>(), 1e-6);
  std::vector<std::string> grow = TrainArgs("tiny-grown", 10, 5);
  grow.insert(grow.end(), {"--init", tmp_ / "out/tiny.pt", "--residual", "2", "--out", tmp_ / "out/grown.pt", "--wait"});
  RunResult grew = Submit(b.endpoint, grow, 120000);
  ASSERT_EQ(grew.code, 0) << grew.err << ReadFile(tmp_ / "w.log");
  json grown = result_of(grew)["result"];
  ASSERT_TRUE(grown.is_object()) << grew.out;
  EXPECT_EQ(grown["residual"].get<int>(), 2);
  EXPECT_EQ(grown["steps"].get<int>(), 10);
  EXPECT_NE(ReadFile(tmp_ / "w.log").find("model_grown"), std::string::npos);
  std::vector<std::string> shrink = TrainArgs("tiny-shrunk", 10, 5);
  shrink.insert(shrink.end(), {"--init", tmp_ / "out/grown.pt", "--residual", "1", "--wait"});
  RunResult refused = Submit(b.endpoint, shrink, 120000);
  EXPECT_NE(refused.code, 0) << refused.out;
  EXPECT_NE((refused.out + refused.err).find("cannot shrink"), std::string::npos) << refused.out << refused.err;
}

TEST_F(TrainTest, KilledWorkerIsReplacedAndTrainingResumesFromTheCheckpoint) {
  BrokerProc b = StartBroker(tmp_ / "broker", tmp_ / "broker.log", kFastHeartbeats);
  Proc w1 = StartWorker(b.endpoint, tmp_ / "w", tmp_ / "w1.log", With(kFastHeartbeats, {"--threads", "2"}));
  std::vector<std::string> args = TrainArgs("resume", 400, 10);
  // A model with a residual block, trained on partly low-passed, reverberated and noisy audio, on
  // background without speech (empty transcripts) and on speech with background around it,
  // resumes like any other.
  args.insert(args.end(), {"--residual", "1", "--lowpass", "0.5", "--reverb", "0.5", "--noise", "0.5",
                           "--nonspeech", "0.5", "--pad-background", "0.5"});
  RunResult sub = Submit(b.endpoint, args);
  ASSERT_EQ(sub.code, 0) << sub.err;
  // Past the second checkpoint, then SIGKILL.
  double loss_before = -1;
  ASSERT_TRUE(WaitFor(
      [&] {
        json s = JobStatus(b.endpoint, 1);
        if (Step(s) >= 25) {
          loss_before = s["progress"]["loss_avg"].get<double>();
          return true;
        }
        return false;
      },
      120000))
      << ReadFile(tmp_ / "w1.log");
  w1.Signal(SIGKILL);
  w1.Wait(5000);
  int64_t killed_near = Step(JobStatus(b.endpoint, 1));
  // A new worker on the same state dir picks the job up again once the broker notices the loss.
  Proc w2 = StartWorker(b.endpoint, tmp_ / "w", tmp_ / "w2.log", With(kFastHeartbeats, {"--threads", "2"}));
  ASSERT_TRUE(WaitFor([&] { return ReadFile(tmp_ / "w2.log").find("train_resumed") != std::string::npos; }, 60000))
      << ReadFile(tmp_ / "w2.log");
  std::string log = ReadFile(tmp_ / "w2.log");
  size_t at = log.find("train_resumed");
  auto resumed = json::parse(log.substr(log.rfind('\n', at) + 1, log.find('\n', at) - log.rfind('\n', at) - 1));
  int64_t step = resumed["step"].get<int64_t>();
  EXPECT_GE(step, 20);
  EXPECT_LE(step, killed_near);
  EXPECT_LE(killed_near - step, 10 + 5) << "resumed further back than one checkpoint interval";
  // The loss continues where it was rather than starting over.
  double loss_after = -1;
  ASSERT_TRUE(WaitFor(
      [&] {
        json s = JobStatus(b.endpoint, 1);
        if (Step(s) >= step + 5 && s["progress"].value("resumed_at", -1) == step) {
          loss_after = s["progress"]["loss"].get<double>();
          return true;
        }
        return false;
      },
      60000));
  EXPECT_LT(loss_after, loss_before * 1.5 + 0.5) << "loss jumped back up after resuming";
  // Empty transcripts give a finite loss: no step was skipped.
  for (const char* log : {"w1.log", "w2.log"})
    EXPECT_EQ(ReadFile(tmp_ / log).find("train_step_skipped"), std::string::npos) << ReadFile(tmp_ / log);
  // Stop it: SIGTERM makes the worker checkpoint and give the job back without an attempt.
  w2.Signal(SIGTERM);
  EXPECT_EQ(w2.Wait(60000), 0);
  EXPECT_NE(ReadFile(tmp_ / "w2.log").find("worker stopping"), std::string::npos);
  json s = JobStatus(b.endpoint, 1);
  EXPECT_EQ(s["state"], "queued") << s.dump();
  EXPECT_EQ(s["attempts"].get<int>(), 1) << "only the SIGKILL counts an attempt";
  RunResult cancel = Submit(b.endpoint, {"cancel", "1"});
  EXPECT_EQ(cancel.code, 0);

  // The broker's state lost: a new journal numbers jobs from 1 again, and another training
  // arrives as job 1 at the worker holding the old job 1's checkpoints: the same name and data,
  // a network of another width. It starts from scratch rather than from weights of another shape.
  b.proc.Signal(SIGKILL);
  b.proc.Wait(5000);
  RemoveTree(tmp_ / "broker");
  BrokerProc b2 = StartBroker(tmp_ / "broker", tmp_ / "broker2.log", kFastHeartbeats);
  Proc w3 = StartWorker(b2.endpoint, tmp_ / "w", tmp_ / "w3.log", With(kFastHeartbeats, {"--threads", "2"}));
  std::vector<std::string> other = TrainArgs("resume", 12, 10);
  other[other.size() - 3] = "32";  // --hidden
  other.push_back("--wait");
  RunResult r = Submit(b2.endpoint, other, 240000);
  ASSERT_EQ(r.code, 0) << r.err << ReadFile(tmp_ / "w3.log");
  EXPECT_NE(ReadFile(tmp_ / "w3.log").find("checkpoint_ignored"), std::string::npos) << ReadFile(tmp_ / "w3.log");
  EXPECT_EQ(ReadFile(tmp_ / "w3.log").find("train_resumed"), std::string::npos) << ReadFile(tmp_ / "w3.log");
}

// The broker here has no --pg, so nothing clears the bytes of the done job's checkpoints: what
// is left is what the worker wrote.
TEST_F(TrainTest, CheckpointsAreIndexedInPostgres) {
  PgCluster pg(tmp_.path());
  ASSERT_TRUE(pg.Start());
  BrokerProc b = StartBroker(tmp_ / "broker", tmp_ / "broker.log");
  Proc w = StartWorker(b.endpoint, tmp_ / "w", tmp_ / "w.log", {"--threads", "2", "--pg", pg.url()});
  std::vector<std::string> args = TrainArgs("indexed", 30, 10);
  args.insert(args.end(), {"--publish-every", "1", "--wait"});
  RunResult r = Submit(b.endpoint, args, 240000);
  ASSERT_EQ(r.code, 0) << r.err << ReadFile(tmp_ / "w.log");
  // Every 10 steps, and the end state (so a run again only validates and registers).
  EXPECT_EQ(pg.Query("SELECT string_agg(step::text, ',' ORDER BY step) FROM checkpoints WHERE job_id = 1"), "10,20,30");
  EXPECT_EQ(pg.Query("SELECT count(*) FROM checkpoints WHERE loss > 0 AND worker <> '' AND published"), "3");
  // All three were published; only the newest keeps its bytes, the only one a resume would take.
  EXPECT_EQ(pg.Query("SELECT string_agg(step::text, ',') FROM checkpoints WHERE bytes IS NOT NULL"), "30");
  EXPECT_EQ(pg.Query("SELECT version, data_summary->>'job' FROM models WHERE name = 'indexed'"), "1|1");
}

// PostgreSQL holding the checkpoints table (a lock taken elsewhere, for ten minutes): each of the
// worker's statements on it fails after --pg-statement-timeout-ms, training goes on with its
// checkpoints kept locally, and a stop still ends with the job given back. The index and publish
// statements used to wait as long as the lock was held, and the training and the stop with them.
TEST_F(TrainTest, ALockedCheckpointsTableHoldsUpNeitherTrainingNorAStop) {
  PgCluster pg(tmp_.path());
  ASSERT_TRUE(pg.Start());
  ASSERT_EQ(RunCommand({ASRF_BROKER_BIN, "--migrate", "--pg", pg.url()}).code, 0);
  Proc locker({"/usr/bin/psql", pg.url(), "-c",
               "BEGIN; LOCK TABLE checkpoints IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(600); COMMIT;"},
              tmp_ / "locker.log");
  ASSERT_TRUE(WaitFor([&] {
    return pg.Query("SELECT count(*) FROM pg_locks WHERE relation = 'checkpoints'::regclass AND granted") == "1";
  }, 10000)) << ReadFile(tmp_ / "locker.log");
  BrokerProc b = StartBroker(tmp_ / "broker", tmp_ / "broker.log", kFastHeartbeats);
  Proc w = StartWorker(b.endpoint, tmp_ / "w", tmp_ / "w.log",
                       With(kFastHeartbeats, {"--threads", "2", "--pg", pg.url(), "--pg-statement-timeout-ms", "1000"}));
  std::vector<std::string> args = TrainArgs("locked", 400, 5);
  args.insert(args.end(), {"--publish-every", "1"});
  ASSERT_EQ(Submit(b.endpoint, args).code, 0);
  // Past two checkpoints (steps 5 and 10), each of which met the lock.
  ASSERT_TRUE(WaitFor([&] { return Step(JobStatus(b.endpoint, 1)) >= 12; }, 120000)) << ReadFile(tmp_ / "w.log");
  w.Signal(SIGTERM);  // checkpoints once more, publishing it: that statement meets the lock too
  EXPECT_EQ(w.Wait(30000), 0) << ReadFile(tmp_ / "w.log");
  const std::string log = ReadFile(tmp_ / "w.log");
  EXPECT_NE(log.find("checkpoint_index_failed"), std::string::npos) << log;
  EXPECT_NE(log.find("statement timeout"), std::string::npos) << log;
  EXPECT_TRUE(WaitFor([&] { return JobStatus(b.endpoint, 1).value("state", "") == "queued"; }, 10000))
      << JobStatus(b.endpoint, 1).dump();
  std::unique_ptr<CheckpointStore> store;
  ASSERT_TRUE(CheckpointStore::Open(tmp_ / "w/checkpoints", &store).ok());
  EXPECT_GE(store->Steps(1).size(), 2u) << "the checkpoints are not kept locally";
  locker.Signal(SIGKILL);
}

// A done job's checkpoints, tens of MB each in real trainings, used to stay for ever: in the
// RocksDB of every worker that ran part of it and, for the published ones, in PostgreSQL. Now the
// worker that finished it drops its own once the broker has the result, a worker that gave the
// job back drops its own at its next start, and the broker clears the published bytes.
TEST_F(TrainTest, ADoneJobsCheckpointsAreDroppedByEveryWorkerAndInPostgres) {
  PgCluster pg(tmp_.path());
  ASSERT_TRUE(pg.Start());
  BrokerProc b = StartBroker(tmp_ / "broker", tmp_ / "broker.log", With(kFastHeartbeats, {"--pg", pg.url()}));
  std::vector<std::string> wargs = With(kFastHeartbeats, {"--threads", "2", "--pg", pg.url()});
  Proc a = StartWorker(b.endpoint, tmp_ / "wa", tmp_ / "a1.log", wargs);
  std::vector<std::string> args = TrainArgs("tidy", 60, 10);
  args.insert(args.end(), {"--publish-every", "1"});
  ASSERT_EQ(Submit(b.endpoint, args).code, 0);
  ASSERT_TRUE(WaitFor([&] { return Step(JobStatus(b.endpoint, 1)) >= 15; }, 120000)) << ReadFile(tmp_ / "a1.log");
  a.Signal(SIGTERM);  // checkpoints and gives the job back
  ASSERT_EQ(a.Wait(60000), 0) << ReadFile(tmp_ / "a1.log");
  {
    std::unique_ptr<CheckpointStore> store;
    ASSERT_TRUE(CheckpointStore::Open(tmp_ / "wa/checkpoints", &store).ok());
    EXPECT_FALSE(store->Steps(1).empty()) << "the drained worker kept no checkpoint";
  }
  Proc w = StartWorker(b.endpoint, tmp_ / "wb", tmp_ / "b.log", wargs);
  ASSERT_TRUE(WaitFor([&] { return JobStatus(b.endpoint, 1).value("state", "") == "done"; }, 180000))
      << ReadFile(tmp_ / "b.log");
  EXPECT_NE(ReadFile(tmp_ / "b.log").find("train_resumed"), std::string::npos) << ReadFile(tmp_ / "b.log");
  ASSERT_TRUE(WaitFor([&] { return ReadFile(tmp_ / "b.log").find("checkpoints_dropped") != std::string::npos; }, 30000))
      << ReadFile(tmp_ / "b.log");
  ASSERT_TRUE(WaitFor([&] { return pg.Query("SELECT count(*) FROM checkpoints WHERE bytes IS NOT NULL") == "0"; },
                      30000))
      << pg.Query("SELECT string_agg(step::text, ',') FROM checkpoints WHERE bytes IS NOT NULL");
  EXPECT_EQ(pg.Query("SELECT max(step) FROM checkpoints WHERE job_id = 1"), "60") << "the index rows stay";
  EXPECT_EQ(pg.Query("SELECT count(*) FROM models WHERE name = 'tidy'"), "1");
  // The worker that gave the job back, started again, finds it done in the job history.
  Proc a2 = StartWorker(b.endpoint, tmp_ / "wa", tmp_ / "a2.log", wargs);
  ASSERT_TRUE(WaitFor([&] { return ReadFile(tmp_ / "a2.log").find("checkpoints_dropped") != std::string::npos; },
                      30000))
      << ReadFile(tmp_ / "a2.log");
  a2.Signal(SIGTERM);
  w.Signal(SIGTERM);
  ASSERT_EQ(a2.Wait(30000), 0);
  ASSERT_EQ(w.Wait(30000), 0);
  for (const char* dir : {"wa", "wb"}) {
    std::unique_ptr<CheckpointStore> store;
    ASSERT_TRUE(CheckpointStore::Open(tmp_ / (std::string(dir) + "/checkpoints"), &store).ok()) << dir;
    EXPECT_TRUE(store->Jobs().empty()) << dir;
  }
}

// A cancelled job's published checkpoint stays while the broker holds the job (RETRY of a gang
// can bring a cancelled rank back), and goes when the broker forgets it.
TEST_F(TrainTest, ACancelledJobsPublishedCheckpointGoesWhenTheBrokerForgetsIt) {
  PgCluster pg(tmp_.path());
  ASSERT_TRUE(pg.Start());
  BrokerProc b = StartBroker(tmp_ / "broker", tmp_ / "broker.log",
                             {"--pg", pg.url(), "--result-retention-s", "4", "--forget-after-s", "4"});
  Proc w = StartWorker(b.endpoint, tmp_ / "w", tmp_ / "w.log", {"--threads", "2", "--pg", pg.url()});
  std::vector<std::string> args = TrainArgs("dropped", 400, 5);
  args.insert(args.end(), {"--publish-every", "1"});
  ASSERT_EQ(Submit(b.endpoint, args).code, 0);
  auto published = [&] { return pg.Query("SELECT count(*) FROM checkpoints WHERE job_id = 1 AND bytes IS NOT NULL"); };
  ASSERT_TRUE(WaitFor([&] { return published() == "1"; }, 120000)) << ReadFile(tmp_ / "w.log");
  ASSERT_EQ(Submit(b.endpoint, {"cancel", "1"}).code, 0);
  ASSERT_TRUE(WaitFor([&] { return JobStatus(b.endpoint, 1).value("state", "") == "cancelled"; }, 30000));
  EXPECT_EQ(published(), "1") << "cleared while the broker still holds the job";
  ASSERT_TRUE(WaitFor([&] { return ReadFile(tmp_ / "broker.log").find("jobs_forgotten") != std::string::npos; },
                      30000));
  EXPECT_TRUE(WaitFor([&] { return published() == "0"; }, 10000)) << published();
  EXPECT_NE(pg.Query("SELECT count(*) FROM checkpoints WHERE job_id = 1"), "0") << "the index rows stay";
}

// PostgreSQL gone when the training ends: the job fails saying the model is not in the registry
// (it used to end done with the model registered nowhere), and RETRY registers it from the final
// checkpoint without training again, once.
TEST_F(TrainTest, AModelTheRegistryMissedIsRegisteredByRetryWithoutTrainingAgain) {
  PgCluster pg(tmp_.path());
  ASSERT_TRUE(pg.Start());
  BrokerProc b = StartBroker(tmp_ / "broker", tmp_ / "broker.log");
  Proc w = StartWorker(b.endpoint, tmp_ / "w", tmp_ / "w.log", {"--threads", "2", "--pg", pg.url()});
  ASSERT_EQ(Submit(b.endpoint, TrainArgs("late", 60, 20)).code, 0);
  ASSERT_TRUE(WaitFor([&] { return Step(JobStatus(b.endpoint, 1)) >= 5; }, 120000)) << ReadFile(tmp_ / "w.log");
  ASSERT_TRUE(pg.Stop());
  json s;
  ASSERT_TRUE(WaitFor([&] {
    s = JobStatus(b.endpoint, 1);
    return s.value("state", "") == "failed";
  }, 120000)) << s.dump() << ReadFile(tmp_ / "w.log");
  EXPECT_NE(s.value("error", "").find("registers it without training again"), std::string::npos) << s.dump();
  ASSERT_TRUE(pg.Start());
  RunResult retry = Submit(b.endpoint, {"retry", "1"});
  ASSERT_EQ(retry.code, 0) << retry.err;
  ASSERT_TRUE(WaitFor([&] { return JobStatus(b.endpoint, 1).value("state", "") == "done"; }, 120000))
      << ReadFile(tmp_ / "w.log");
  EXPECT_EQ(pg.Query("SELECT count(*) FROM models WHERE name = 'late'"), "1");
  std::string log = ReadFile(tmp_ / "w.log");
  size_t at = log.rfind("train_resumed");
  ASSERT_NE(at, std::string::npos) << log;
  EXPECT_NE(log.substr(at, 80).find("\"step\":60"), std::string::npos) << log.substr(at, 200);
}

// A validation set that repeats training texts still trains, but the result and the worker's log
// say how many of its utterances the model has heard the words of.
// A batch's utterances are played on several threads, each from its own seed: the first step's
// loss (one batch, before any update) is the same with one thread as with two, and differs
// without the augmentation. From the shipped model, whose loss hears the audio's details (an
// untrained one's hardly depends on more than the lengths).
TEST_F(TrainTest, AugmentedBatchesDoNotDependOnTheThreadCount) {
  BrokerProc b = StartBroker(tmp_ / "broker", tmp_ / "broker.log");
  const std::vector<std::string> augment = {"--speed-perturb", "0.25", "--lowpass", "0.5", "--reverb", "1",
                                            "--noise", "1", "--pad-background", "0.5", "--nonspeech", "0.3"};
  auto first_loss = [&](const std::string& threads, const std::string& name, bool augmented) {
    Proc w = StartWorker(b.endpoint, tmp_ / ("w" + name), tmp_ / ("w" + name + ".log"), {"--threads", threads});
    std::vector<std::string> args =
        With(TrainArgs(name, 1, 1000), {"--init", std::string(ASRF_SOURCE_DIR) + "/models/en-small.pt", "--dropout", "0",
                                        "--wait"});
    if (augmented) args = With(args, augment);
    RunResult r = Submit(b.endpoint, args, 120000);
    EXPECT_EQ(r.code, 0) << r.err << ReadFile(tmp_ / ("w" + name + ".log"));
    double loss = -1;
    std::istringstream in(r.out);
    std::string line;
    while (std::getline(in, line)) {
      auto j = json::parse(line, nullptr, false);
      if (!j.is_discarded() && j.value("state", "") == "done") loss = j["result"].value("final_loss", -1.0);
    }
    return loss;
  };
  const double one = first_loss("1", "one", true);
  const double two = first_loss("2", "two", true);
  const double plain = first_loss("2", "plain", false);
  ASSERT_GT(one, 0);
  ASSERT_GT(plain, 0);
  EXPECT_NEAR(two, one, 1e-4 * one) << "the augmented batch depends on the thread count";
  EXPECT_GT(std::fabs(plain - one), 1e-3 * one) << "the augmentation did not change the batch";
}

TEST_F(TrainTest, ValidationTextsAlsoInTrainingAreReported) {
  BrokerProc b = StartBroker(tmp_ / "broker", tmp_ / "broker.log");
  Proc w = StartWorker(b.endpoint, tmp_ / "w", tmp_ / "w.log");
  std::ifstream tin(Train()), vin(Valid());
  std::ofstream mixed(tmp_ / "mixed.jsonl");
  std::string line;
  for (int i = 0; i < 3 && std::getline(tin, line); ++i) mixed << line << "\n";  // three training utterances...
  int valid_lines = 0;
  while (std::getline(vin, line)) {  // ...and the real validation set
    mixed << line << "\n";
    ++valid_lines;
  }
  mixed.close();
  ASSERT_GT(valid_lines, 0);
  std::vector<std::string> args = TrainArgs("mixed", 2, 10);
  auto valid = std::find(args.begin(), args.end(), "--valid");
  ASSERT_NE(valid, args.end());
  *(valid + 1) = tmp_ / "mixed.jsonl";
  args.push_back("--wait");
  RunResult r = Submit(b.endpoint, args, 120000);
  ASSERT_EQ(r.code, 0) << r.err << ReadFile(tmp_ / "w.log");
  json result;
  std::istringstream in(r.out);
  while (std::getline(in, line)) {
    auto j = json::parse(line, nullptr, false);
    if (!j.is_discarded() && j.value("state", "") == "done") result = j["result"];
  }
  ASSERT_TRUE(result.is_object()) << r.out;
  // The three copied lines; asr-synth's own validation texts are never training texts.
  EXPECT_EQ(result["valid_texts_in_training"].get<int>(), 3) << r.out;
  std::string log = ReadFile(tmp_ / "w.log");
  EXPECT_NE(log.find("valid_texts_in_training"), std::string::npos) << log;
}

TEST_F(TrainTest, BadManifestsFailWithClearErrorsBeforeTraining) {
  BrokerProc b = StartBroker(tmp_ / "broker", tmp_ / "broker.log");
  Proc w = StartWorker(b.endpoint, tmp_ / "w", tmp_ / "w.log");
  // Missing file, empty text, text outside the vocabulary, not audio, not JSON.
  std::string first_wav;
  {
    std::ifstream in(Train());
    std::string line;
    std::getline(in, line);
    first_wav = json::parse(line)["audio"];
  }
  {
    std::ofstream f(tmp_ / "junk.wav");
    f << "this is not audio";
  }
  std::ofstream bad(tmp_ / "bad.jsonl");
  bad << json{{"audio", tmp_ / "missing.wav"}, {"text", "hello"}}.dump() << "\n";
  bad << json{{"audio", first_wav}, {"text", "   "}}.dump() << "\n";
  bad << json{{"audio", first_wav}, {"text", "caf\xc3\xa9 42"}}.dump() << "\n";
  bad << json{{"audio", tmp_ / "junk.wav"}, {"text", "hello"}}.dump() << "\n";
  bad << "{not json\n";
  std::string chatter;
  for (int i = 0; i < 200; ++i) chatter += "ab";
  bad << json{{"audio", first_wav}, {"text", chatter}}.dump() << "\n";  // 400 characters in a few seconds
  bad.close();
  std::vector<std::string> args = TrainArgs("bad", 10, 5);
  args[2] = tmp_ / "bad.jsonl";
  args.push_back("--wait");
  RunResult r = Submit(b.endpoint, args, 60000);
  EXPECT_EQ(r.code, 1);
  RunResult failed = Submit(b.endpoint, {"jobs", "--state", "failed", "--json"});
  auto j = json::parse(failed.out.substr(0, failed.out.find('\n')));
  std::string error = j["error"];
  EXPECT_NE(error.find("6 bad line(s)"), std::string::npos) << error;
  EXPECT_NE(error.find("the model can emit at most"), std::string::npos) << error;
  EXPECT_NE(error.find("line 1"), std::string::npos) << error;
  EXPECT_NE(error.find("empty text"), std::string::npos) << error;
  EXPECT_NE(error.find("not in the vocabulary"), std::string::npos) << error;
  EXPECT_NE(error.find("missing.wav: not readable (no such file)"), std::string::npos) << error;
  EXPECT_NE(error.find("junk.wav: not audio"), std::string::npos) << error;
  // A missing manifest is refused by the client before anything is submitted.
  std::vector<std::string> missing = TrainArgs("bad", 10, 5);
  missing[2] = tmp_ / "nope.jsonl";
  EXPECT_EQ(Submit(b.endpoint, missing).code, 2);
  // So is a model name that is not a plain file name (it becomes STATE_DIR/models/NAME.pt).
  std::vector<std::string> slash = TrainArgs("../bad", 10, 5);
  RunResult refused = Submit(b.endpoint, slash);
  EXPECT_EQ(refused.code, 2);
  EXPECT_NE(refused.err.find("it names files"), std::string::npos) << refused.err;
}

// Any client of the broker can send a train job, so its `out` is where the worker writes a model
// file and nothing else: an absolute path ending in .pt, and an existing file there is replaced
// only if it is a model (a zip archive). The worker used to write the model over whatever path it
// was given.
TEST_F(TrainTest, ATrainingWritesItsOutOnlyOverAModelFile) {
  BrokerProc b = StartBroker(tmp_ / "broker", tmp_ / "broker.log");
  Proc w = StartWorker(b.endpoint, tmp_ / "w", tmp_ / "w.log", {"--threads", "2"});
  auto failed_error = [&](uint64_t id) {
    auto j = JobStatus(b.endpoint, static_cast<int>(id));
    return j.value("state", "") + ": " + j.value("error", "");
  };
  // The client refuses another extension before submitting.
  std::vector<std::string> args = TrainArgs("out", 2, 1);
  args.insert(args.end(), {"--out", tmp_ / "notes.txt"});
  RunResult r = Submit(b.endpoint, args);
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("ending in .pt"), std::string::npos) << r.err;
  // The worker refuses a relative path sent by another client.
  json raw = {{"manifest", Train()}, {"valid", Valid()}, {"name", "raw"}, {"out", "relative.pt"}, {"steps", 2}};
  r = Submit(b.endpoint, {"submit", "--kind", "train", "--payload", raw.dump(), "--wait"});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(failed_error(1).find("out must be an absolute path ending in .pt"), std::string::npos) << failed_error(1);
  // A file that is not a model is left as it is, and the job fails before it trains.
  {
    std::ofstream f(tmp_ / "notes.pt");
    f << "not a model\n";
  }
  args = TrainArgs("out", 2, 1);
  args.insert(args.end(), {"--out", tmp_ / "notes.pt", "--wait"});
  r = Submit(b.endpoint, args, 120000);
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(failed_error(2).find("is not a model file"), std::string::npos) << failed_error(2);
  EXPECT_EQ(ReadFile(tmp_ / "notes.pt"), "not a model\n");
  // A new path, then the same path again: a model replaces a model.
  for (int id : {3, 4}) {
    args = TrainArgs("out", 2, 1);
    args.insert(args.end(), {"--out", tmp_ / "models/m.pt", "--wait"});
    r = Submit(b.endpoint, args, 120000);
    EXPECT_EQ(r.code, 0) << r.err << failed_error(id) << ReadFile(tmp_ / "w.log");
    EXPECT_EQ(ReadFile(tmp_ / "models/m.pt").substr(0, 2), "PK") << id;
  }
}

// Audio a transcription would refuse or read is refused or read by training too, and each file
// that fails is named with its manifest line: a WAV cut short fails the manifest check (its header
// shows it); a FLAC cut short is only found by decoding it, after the corpus is read, and the job
// says how many failed; a WAV whose writer never filled in its size trains.
TEST_F(TrainTest, AudioCutShortFailsWithItsLineAndAnUnfinishedWavTrains) {
  BrokerProc b = StartBroker(tmp_ / "broker", tmp_ / "broker.log");
  Proc w = StartWorker(b.endpoint, tmp_ / "w", tmp_ / "w.log");
  std::vector<json> lines;
  {
    std::ifstream in(Train());
    std::string line;
    while (lines.size() < 6 && std::getline(in, line)) lines.push_back(json::parse(line));
  }
  ASSERT_EQ(lines.size(), 6u);
  const std::string src = lines[2]["audio"];
  // Its samples as FLAC, then half of it.
  {
    SF_INFO info{};
    SNDFILE* f = sf_open(src.c_str(), SFM_READ, &info);
    ASSERT_NE(f, nullptr);
    std::vector<float> x(static_cast<size_t>(info.frames));
    sf_readf_float(f, x.data(), info.frames);
    sf_close(f);
    SF_INFO oi{0, info.samplerate, 1, SF_FORMAT_FLAC | SF_FORMAT_PCM_16, 0, 0};
    SNDFILE* o = sf_open((tmp_ / "cut.flac").c_str(), SFM_WRITE, &oi);
    ASSERT_NE(o, nullptr);
    sf_writef_float(o, x.data(), info.frames);
    sf_close(o);
    std::filesystem::resize_file(tmp_ / "cut.flac", std::filesystem::file_size(tmp_ / "cut.flac") / 2);
  }
  std::filesystem::copy_file(src, tmp_ / "cut.wav");
  std::filesystem::resize_file(tmp_ / "cut.wav", std::filesystem::file_size(tmp_ / "cut.wav") / 2);
  {
    std::ifstream in(src, std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), {});
    const size_t at = bytes.find("data");
    ASSERT_NE(at, std::string::npos);
    bytes.replace(at + 4, 4, std::string(4, '\0'));
    std::ofstream(tmp_ / "unfinished.wav", std::ios::binary) << bytes;
  }
  auto manifest = [&](const std::string& name, const std::vector<std::pair<size_t, std::string>>& swaps) {
    std::vector<json> m = lines;
    for (const auto& [i, audio] : swaps) m[i]["audio"] = audio;
    std::ofstream out(tmp_ / name);
    for (const json& j : m) out << j.dump() << "\n";
    return std::string(tmp_ / name);
  };
  auto run = [&](const std::string& name, const std::string& path) {
    std::vector<std::string> args = TrainArgs(name, 1, 1);
    args[2] = path;
    args.push_back("--wait");
    return Submit(b.endpoint, args, 120000);
  };
  auto last_error = [&] {
    RunResult failed = Submit(b.endpoint, {"jobs", "--state", "failed", "--json"});
    std::string out = failed.out, error;
    for (size_t p = 0; p < out.size();) {
      size_t e = out.find('\n', p);
      json j = json::parse(out.substr(p, e - p), nullptr, false);
      if (!j.is_discarded() && j.contains("error")) error = j["error"];
      p = e == std::string::npos ? out.size() : e + 1;
    }
    return error;
  };

  EXPECT_EQ(run("cutwav", manifest("cutwav.jsonl", {{2, tmp_ / "cut.wav"}})).code, 1);
  std::string error = last_error();
  EXPECT_NE(error.find("line 3: " + std::string(tmp_ / "cut.wav") + ": truncated: its header declares"),
            std::string::npos) << error;

  EXPECT_EQ(run("cutflac", manifest("cutflac.jsonl", {{2, tmp_ / "cut.flac"}, {3, tmp_ / "unfinished.wav"}})).code, 1);
  error = last_error();
  EXPECT_NE(error.find("1 audio file(s) could not be decoded"), std::string::npos) << error;
  EXPECT_NE(error.find("line 3: " + std::string(tmp_ / "cut.flac") + ": truncated or corrupt"), std::string::npos)
      << error;
  EXPECT_EQ(error.find("unfinished.wav"), std::string::npos) << error;

  RunResult ok = run("unfinished", manifest("unfinished.jsonl", {{3, tmp_ / "unfinished.wav"}}));
  EXPECT_EQ(ok.code, 0) << ok.err << last_error();
}

}  // namespace
}  // namespace asrf::testing
