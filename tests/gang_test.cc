// Gangs: data-parallel jobs placed on K idle workers at once or not at all; one rank lost aborts
// and requeues the gang; two data-parallel ranks train exactly what one process trains on the
// combined batches.
#include <gtest/gtest.h>
#include <sndfile.h>
#include <torch/torch.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <csignal>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "tests/harness.h"
#include "worker/ctc_model.h"

namespace asrf::testing {
namespace {

// A --gang-port-base for this test process: below Linux's ephemeral ports (32768 and up), where
// Gloo's own connections in tests running beside this one could hold the port.
int GangPortBase(int k) { return 20000 + static_cast<int>((static_cast<long>(getpid()) * k) % 12000); }

using json = nlohmann::json;

TEST(Gang, NeverStartsPartiallyAndTwoGangsDoNotDeadlock) {
  TempDir t;
  BrokerProc b = StartBroker(t / "broker", t / "broker.log", kFastHeartbeats);
  // What the broker decided, for a failure's message: the end of its log.
  auto broker_log = [&] {
    std::string log = ReadFile(t / "broker.log");
    return "\nbroker log (end):\n" + log.substr(log.size() > 6000 ? log.size() - 6000 : 0);
  };
  Proc w1 = StartWorker(b.endpoint, t / "w1", t / "w1.log", kFastHeartbeats);
  RunResult r = Submit(b.endpoint, {"submit", "--kind", "sleep", "--payload", R"({"ms":2500})", "--world-size", "2",
                                    "--batch", "g1"});
  ASSERT_EQ(r.code, 0) << r.err;
  // One idle worker is not enough: nothing starts. (The broker says so once the worker is
  // connected, which a loaded machine can take more than a second to do.)
  RunResult why;
  EXPECT_TRUE(WaitFor([&] {
    why = Submit(b.endpoint, {"status", "1", "--json"});
    return why.out.find("waits for 2 idle workers") != std::string::npos;
  }, 15000)) << why.out << broker_log();
  usleep(500000);
  Counts c = StatusCounts(b.endpoint, "g1");
  EXPECT_EQ(c.queued, 2);
  EXPECT_EQ(c.leased, 0);
  // A second worker: both ranks start together and finish.
  Proc w2 = StartWorker(b.endpoint, t / "w2", t / "w2.log", kFastHeartbeats);
  bool both = WaitFor([&] { return StatusCounts(b.endpoint, "g1").leased == 2; }, 10000);
  EXPECT_TRUE(both) << broker_log();
  ASSERT_TRUE(WaitFor([&] { return StatusCounts(b.endpoint, "g1").done == 2; }, 20000)) << broker_log();

  // Two gangs of 2 over 3 workers: neither is ever partly placed, both finish, and no worker ever
  // holds more than its one slot. (The jobs' counts cannot show the last: a rank whose result is
  // being made durable still counts as leased while its worker already takes the next gang.)
  Proc w3 = StartWorker(b.endpoint, t / "w3", t / "w3.log", kFastHeartbeats);
  ASSERT_TRUE(WaitFor([&] {
    std::string out = Submit(b.endpoint, {"workers"}).out;
    return std::count(out.begin(), out.end(), '\n') >= 3;
  }, 10000));
  ASSERT_EQ(Submit(b.endpoint, {"submit", "--kind", "sleep", "--payload", R"({"ms":1500})", "--world-size", "2",
                                "--batch", "g2"}).code, 0);
  ASSERT_EQ(Submit(b.endpoint, {"submit", "--kind", "sleep", "--payload", R"({"ms":1500})", "--world-size", "2",
                                "--batch", "g3"}).code, 0);
  long most = 0, most_on_one = 0;
  bool finished = WaitFor([&] {
    long running = 0;  // one answer: the workers' leases at one instant
    std::istringstream in(Submit(b.endpoint, {"workers", "--json"}).out);
    for (std::string line; std::getline(in, line);) {
      auto w = json::parse(line, nullptr, false);
      if (w.is_discarded() || !w.contains("running")) continue;
      running += w["running"].get<long>();
      most_on_one = std::max(most_on_one, w["running"].get<long>());
    }
    most = std::max(most, running);
    Counts a = StatusCounts(b.endpoint, "g2"), d = StatusCounts(b.endpoint, "g3");
    // Partly placed: a rank runs while another still waits. (One rank done while the other still
    // reports is the gang finishing, not a partial start.)
    EXPECT_FALSE(a.leased > 0 && a.queued > 0) << "gang g2 partially placed: " << a.leased << " leased, " << a.queued
                                               << " queued" << broker_log();
    EXPECT_FALSE(d.leased > 0 && d.queued > 0) << "gang g3 partially placed: " << d.leased << " leased, " << d.queued
                                               << " queued" << broker_log();
    return a.done == 2 && d.done == 2;
  }, 30000);
  EXPECT_TRUE(finished) << broker_log();
  EXPECT_GE(most, 2);  // a gang ran whole
  EXPECT_EQ(most_on_one, 1) << broker_log();
  // A gang submitted in pieces is refused.
  RunResult bad = Submit(b.endpoint, {"submit", "--kind", "sleep", "--world-size", "2", "--count", "3"});
  EXPECT_EQ(bad.code, 2);
}

TEST(Gang, AStreamOfSingleJobsDoesNotStarveAGang) {
  TempDir t;
  BrokerProc b = StartBroker(t / "broker", t / "broker.log");
  Proc w1 = StartWorker(b.endpoint, t / "w1", t / "w1.log");
  Proc w2 = StartWorker(b.endpoint, t / "w2", t / "w2.log");
  ASSERT_TRUE(WaitFor([&] {
    std::string out = Submit(b.endpoint, {"workers"}).out;
    return std::count(out.begin(), out.end(), '\n') >= 2;
  }, 10000));
  ASSERT_EQ(Submit(b.endpoint, {"submit", "--kind", "sleep", "--payload", R"({"ms":2000})", "--batch", "first"}).code, 0);
  ASSERT_TRUE(WaitFor([&] { return StatusCounts(b.endpoint, "first").leased == 1; }, 10000));
  ASSERT_EQ(Submit(b.endpoint, {"submit", "--kind", "sleep", "--payload", R"({"ms":500})", "--world-size", "2",
                                "--batch", "gang"}).code, 0);
  ASSERT_EQ(Submit(b.endpoint, {"submit", "--kind", "sleep", "--payload", R"({"ms":600})", "--count", "6",
                                "--batch", "later"}).code, 0);
  // The idle worker waits for the busy one, then the gang runs before the later single jobs.
  long later_done = -1;
  ASSERT_TRUE(WaitFor([&] {
    if (StatusCounts(b.endpoint, "gang").done == 2) {
      later_done = StatusCounts(b.endpoint, "later").done;
      return true;
    }
    return false;
  }, 30000));
  EXPECT_EQ(later_done, 0);
  EXPECT_TRUE(WaitFor([&] { return StatusCounts(b.endpoint, "later").done == 6; }, 30000));
}

TEST(Gang, ALostRankAbortsAndRequeuesTheWholeGang) {
  TempDir t;
  BrokerProc b = StartBroker(t / "broker", t / "broker.log", kFastHeartbeats);
  Proc w1 = StartWorker(b.endpoint, t / "w1", t / "w1.log", kFastHeartbeats);
  Proc w2 = StartWorker(b.endpoint, t / "w2", t / "w2.log", kFastHeartbeats);
  ASSERT_EQ(Submit(b.endpoint, {"submit", "--kind", "sleep", "--payload", R"({"ms":3000})", "--world-size", "2",
                                "--batch", "g"}).code, 0);
  ASSERT_TRUE(WaitFor([&] { return StatusCounts(b.endpoint, "g").leased == 2; }, 10000));
  usleep(300000);  // both started
  w2.Signal(SIGKILL);
  w2.Wait(5000);
  // The survivor's rank is cancelled and both go back to the queue.
  ASSERT_TRUE(WaitFor([&] { return StatusCounts(b.endpoint, "g").queued == 2; }, 10000))
      << ReadFile(t / "broker.log");
  EXPECT_NE(ReadFile(t / "broker.log").find("gang_aborted"), std::string::npos);
  // Placed again once two workers are idle; the lost rank counts one attempt, the other none.
  Proc w3 = StartWorker(b.endpoint, t / "w3", t / "w3.log", kFastHeartbeats);
  ASSERT_TRUE(WaitFor([&] { return StatusCounts(b.endpoint, "g").done == 2; }, 30000)) << ReadFile(t / "broker.log");
  json j1 = json::parse(Submit(b.endpoint, {"status", "1", "--json"}).out, nullptr, false);
  json j2 = json::parse(Submit(b.endpoint, {"status", "2", "--json"}).out, nullptr, false);
  EXPECT_EQ(j1.value("attempts", -1) + j2.value("attempts", -1), 1);
}

// Writes `pcm` trimmed or zero-padded to exactly n samples.
void WriteFixed(const std::string& in, const std::string& out, size_t n) {
  SF_INFO info{};
  SNDFILE* f = sf_open(in.c_str(), SFM_READ, &info);
  ASSERT_NE(f, nullptr);
  std::vector<int16_t> pcm(info.frames);
  sf_readf_short(f, pcm.data(), info.frames);
  sf_close(f);
  pcm.resize(n, 0);
  SF_INFO o{};
  o.samplerate = 16000;
  o.channels = 1;
  o.format = SF_FORMAT_WAV | SF_FORMAT_PCM_16;
  SNDFILE* g = sf_open(out.c_str(), SFM_WRITE, &o);
  ASSERT_NE(g, nullptr);
  sf_writef_short(g, pcm.data(), static_cast<sf_count_t>(n));
  sf_close(g);
}

TEST(Gang, TwoRanksTrainWhatOneProcessTrainsOnTheCombinedBatches) {
  TempDir t;
  RunResult synth = RunCommand({ASRF_SYNTH_BIN, "--out", t / "raw", "--utterances", "24", "--seed", "9",
                                "--valid-fraction", "0", "--heldout-fraction", "0", "--max-words", "3"});
  ASSERT_EQ(synth.code, 0) << synth.err;
  // Every utterance exactly 1.5 s: no padding, so batch composition cannot change the numbers.
  std::ifstream in(t / "raw/train.jsonl");
  std::ofstream man(t / "train.jsonl");
  std::string line;
  int k = 0;
  std::filesystem::create_directories(t / "fixed");
  while (std::getline(in, line)) {
    json j = json::parse(line);
    std::string out = t / ("fixed/" + std::to_string(k++) + ".wav");
    WriteFixed(j["audio"], out, 24000);
    man << json{{"audio", out}, {"text", j["text"]}, {"duration", 1.5}}.dump() << "\n";
  }
  man.close();
  std::vector<std::string> common = {"--manifest", t / "train.jsonl", "--valid", t / "train.jsonl", "--name", "dp",
                                     "--steps", "3", "--batch-seconds", "6", "--warmup", "1", "--lr", "1e-3",
                                     "--channels", "32", "--hidden", "32", "--layers", "1", "--dropout", "0",
                                     "--no-spec-augment", "--speed-perturb", "0", "--vtlp", "0", "--adam-eps", "1e-3", "--valid-every", "1000", "--checkpoint-every", "1000",
                                     "--wait"};
  // Adam divides by sqrt(v) + eps: with the default 1e-8 a gradient that is float noise (a few
  // weights here) moves by a full learning rate in either direction, so a summation order
  // difference flips it. A larger eps keeps the update proportional to the gradient.
  // One process, two batches per step.
  {
    BrokerProc b = StartBroker(t / "b1", t / "b1.log");
    Proc w = StartWorker(b.endpoint, t / "single", t / "single.log", {"--threads", "1"});
    std::vector<std::string> args = {"train", "--combine", "2"};
    args.insert(args.end(), common.begin(), common.end());
    RunResult r = Submit(b.endpoint, args, 120000);
    ASSERT_EQ(r.code, 0) << r.err << ReadFile(t / "single.log");
  }
  // Two ranks, one batch each per step.
  {
    BrokerProc b = StartBroker(t / "b2", t / "b2.log", {"--gang-port-base", std::to_string(GangPortBase(1))});
    // Two addresses of this machine, as two machines would have: each rank's Gloo device binds its
    // own worker's address (a rank used to bind rank 0's, which on another machine is not local).
    Proc w1 = StartWorker(b.endpoint, t / "r1", t / "r1.log", {"--threads", "1", "--advertise-host", "127.0.0.1"});
    Proc w2 = StartWorker(b.endpoint, t / "r2", t / "r2.log", {"--threads", "1", "--advertise-host", "127.0.0.2"});
    ASSERT_TRUE(WaitFor([&] {
      std::string out = Submit(b.endpoint, {"workers"}).out;
      return std::count(out.begin(), out.end(), '\n') >= 2;
    }, 10000));
    std::vector<std::string> args = {"train", "--world-size", "2"};
    args.insert(args.end(), common.begin(), common.end());
    RunResult r = Submit(b.endpoint, args, 120000);
    ASSERT_EQ(r.code, 0) << r.err << ReadFile(t / "r1.log") << ReadFile(t / "r2.log");
  }
  CtcModel single(CtcModelConfig{}), r1(CtcModelConfig{}), r2(CtcModelConfig{});
  ASSERT_TRUE(LoadModel(t / "single/models/dp.pt", &single).ok());
  ASSERT_TRUE(LoadModel(t / "r1/models/dp.pt", &r1).ok());
  ASSERT_TRUE(LoadModel(t / "r2/models/dp.pt", &r2).ok());
  auto ps = single->parameters(), p1 = r1->parameters(), p2 = r2->parameters();
  ASSERT_EQ(ps.size(), p1.size());
  double d_ranks = 0, d_single = 0, moved = 0;
  for (size_t i = 0; i < ps.size(); ++i) {
    d_ranks = std::max(d_ranks, (p1[i] - p2[i]).abs().max().item<double>());
    double di = (p1[i] - ps[i]).abs().max().item<double>();
    d_single = std::max(d_single, di);
  }
  // Training really moved the weights away from a fresh model with the same seed.
  torch::manual_seed(1);
  CtcModelConfig c = single->config();
  CtcModel fresh(c);
  auto pf = fresh->parameters();
  for (size_t i = 0; i < ps.size(); ++i) moved = std::max(moved, (ps[i] - pf[i]).abs().max().item<double>());
  std::cout << "max |rank0 - rank1| " << d_ranks << ", max |rank0 - single| " << d_single << ", moved " << moved
            << "\n";
  EXPECT_LE(d_ranks, 1e-5);
  EXPECT_LE(d_single, 1e-5);
  EXPECT_GT(moved, 1e-4);
}

// The first rendezvous port the broker hands out is taken by another process: rank 0 cannot
// serve it, gives its job back without an attempt, and the gang is placed again on the next port
// and trains to the end (before, the run failed for good).
TEST(Gang, ARendezvousPortInUseMovesTheGangToAnotherPort) {
  TempDir t;
  RunResult synth = RunCommand({ASRF_SYNTH_BIN, "--out", t / "data", "--utterances", "20", "--seed", "4",
                                "--valid-fraction", "0.2", "--heldout-fraction", "0", "--max-words", "3"});
  ASSERT_EQ(synth.code, 0) << synth.err;
  // Hold a port: bound on every address and listening, as a running server would.
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_ANY);
  a.sin_port = 0;
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  ASSERT_EQ(listen(fd, 16), 0);
  socklen_t len = sizeof(a);
  ASSERT_EQ(getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len), 0);
  const int held = ntohs(a.sin_port);
  if (held > 64000) {
    close(fd);
    GTEST_SKIP() << "the kernel gave port " << held << ", above the broker's highest --gang-port-base";
  }
  BrokerProc b = StartBroker(t / "broker", t / "broker.log",
                             With(kFastHeartbeats, {"--gang-port-base", std::to_string(held)}));
  std::vector<std::string> wargs = With(kFastHeartbeats, {"--threads", "1", "--advertise-host", "127.0.0.1"});
  Proc w1 = StartWorker(b.endpoint, t / "w1", t / "w1.log", wargs);
  Proc w2 = StartWorker(b.endpoint, t / "w2", t / "w2.log", wargs);
  RunResult r = Submit(b.endpoint, {"train", "--manifest", t / "data/train.jsonl", "--valid", t / "data/valid.jsonl",
                                    "--name", "portmodel", "--world-size", "2", "--steps", "3", "--batch-seconds", "4",
                                    "--channels", "16", "--hidden", "16", "--layers", "1"});
  ASSERT_EQ(r.code, 0) << r.err;
  std::string gt = r.out.substr(r.out.find(" batch ") + 7);
  while (!gt.empty() && (gt.back() == '\n' || gt.back() == ' ')) gt.pop_back();
  bool done = WaitFor([&] {
    Counts c = StatusCounts(b.endpoint, gt);
    return c.done == 2 || c.failed > 0 || c.dead > 0;  // a failed rank: no need to wait longer
  }, 120000) && StatusCounts(b.endpoint, gt).done == 2;
  close(fd);
  std::string logs = ReadFile(t / "w1.log") + ReadFile(t / "w2.log");
  ASSERT_TRUE(done) << ReadFile(t / "broker.log") << logs;
  // The held port was tried and refused, then the next one served the gang.
  EXPECT_NE(logs.find("127.0.0.1:" + std::to_string(held) + " failed"), std::string::npos) << logs;
  EXPECT_NE(logs.find("127.0.0.1:" + std::to_string(held + 1)), std::string::npos) << logs;
  Counts c = StatusCounts(b.endpoint, gt);
  EXPECT_EQ(c.failed, 0);
  EXPECT_EQ(c.dead, 0);
}

// The tests below train a tiny network as a gang of two CPU workers, most with --pg: a synthetic
// corpus under t/data, both workers on the broker, the training submitted; each step ASSERTs.
void SynthTinyCorpus(const TempDir& t, const std::string& seed) {
  RunResult synth = RunCommand({ASRF_SYNTH_BIN, "--out", t / "data", "--utterances", "40", "--seed", seed,
                                "--valid-fraction", "0.1", "--heldout-fraction", "0", "--max-words", "4"});
  ASSERT_EQ(synth.code, 0) << synth.err;
}

// Until the broker lists `n` workers.
void WaitForWorkers(const BrokerProc& b, size_t n) {
  ASSERT_TRUE(WaitFor([&] {
    std::string out = Submit(b.endpoint, {"workers"}).out;
    return static_cast<size_t>(std::count(out.begin(), out.end(), '\n')) >= n;
  }, 10000));
}

void StartTwoPgWorkers(const BrokerProc& b, const TempDir& t, const std::string& pg_url, Proc* w1, Proc* w2) {
  std::vector<std::string> wargs = With(kFastHeartbeats, {"--threads", "1", "--advertise-host", "127.0.0.1",
                                                          "--pg", pg_url});
  *w1 = StartWorker(b.endpoint, t / "w1", t / "w1.log", wargs);
  *w2 = StartWorker(b.endpoint, t / "w2", t / "w2.log", wargs);
  WaitForWorkers(b, 2);
}

// `asr-submit train --world-size 2` of the tiny network with `args` added; *batch gets its batch.
void SubmitTinyGang(const BrokerProc& b, const TempDir& t, const std::vector<std::string>& args, std::string* batch) {
  std::vector<std::string> words = With({"train", "--manifest", t / "data/train.jsonl", "--valid",
                                         t / "data/valid.jsonl", "--world-size", "2", "--batch-seconds", "8",
                                         "--valid-every", "1000", "--channels", "32", "--hidden", "32", "--layers", "1"},
                                        args);
  RunResult r = Submit(b.endpoint, words);
  ASSERT_EQ(r.code, 0) << r.err;
  *batch = r.out.substr(r.out.find(" batch ") + 7);
  while (!batch->empty() && (batch->back() == '\n' || batch->back() == ' ')) batch->pop_back();
}

TEST(Gang, AKilledRankRequeuesTheGangWhichResumesFromAPublishedCheckpoint) {
  TempDir t;
  PgCluster pg(t.path());
  ASSERT_TRUE(pg.Start());
  ASSERT_NO_FATAL_FAILURE(SynthTinyCorpus(t, "3"));
  BrokerProc b = StartBroker(t / "broker", t / "broker.log",
                             With(kFastHeartbeats, {"--pg", pg.url(), "--gang-port-base",
                                                    std::to_string(GangPortBase(7))}));
  Proc w1, w2;
  ASSERT_NO_FATAL_FAILURE(StartTwoPgWorkers(b, t, pg.url(), &w1, &w2));
  std::string gt;
  ASSERT_NO_FATAL_FAILURE(SubmitTinyGang(b, t, {"--name", "gangmodel", "--steps", "200", "--checkpoint-every", "5",
                                                "--publish-every", "1"}, &gt));
  std::vector<std::string> wargs = With(kFastHeartbeats, {"--threads", "1", "--advertise-host", "127.0.0.1",
                                                          "--pg", pg.url()});
  // Rank 0 is job 1. Wait until it has published a checkpoint, then kill the worker running it:
  // its local checkpoints go with it.
  auto published = [&] {
    std::string n = pg.Query("SELECT count(*) FROM checkpoints WHERE job_id = 1 AND published");
    return !n.empty() && std::stol(n) >= 2;
  };
  ASSERT_TRUE(WaitFor(published, 120000)) << ReadFile(t / "w1.log");
  json st = json::parse(Submit(b.endpoint, {"status", "1", "--json"}).out, nullptr, false);
  std::string rank0_worker = st.value("worker", "");
  bool w1_is_rank0 = ReadFile(t / "w1.log").find("\"rank\":0") != std::string::npos &&
                     ReadFile(t / "w1.log").find("gang_joined") != std::string::npos &&
                     ReadFile(t / "w1.log").find("\"job\":1,\"rank\":0") != std::string::npos;
  Proc& victim = w1_is_rank0 ? w1 : w2;
  victim.Signal(SIGKILL);
  victim.Wait(5000);
  // The other rank gives its job back; both are queued until two workers are idle again.
  Proc w3 = StartWorker(b.endpoint, t / "w3", t / "w3.log", wargs);
  ASSERT_TRUE(WaitFor([&] { return StatusCounts(b.endpoint, gt).done == 2; }, 240000))
      << ReadFile(t / "broker.log") << ReadFile(t / "w3.log");
  json res = json::parse(Submit(b.endpoint, {"results", "1", "--json"}).out, nullptr, false);
  ASSERT_TRUE(res.contains("result")) << res.dump();
  EXPECT_GE(res["result"].value("resumed_at", 0), 10) << res.dump();
  EXPECT_EQ(res["result"].value("steps", 0), 200);
  EXPECT_NE(ReadFile(t / "broker.log").find("gang_aborted"), std::string::npos);
  // The finished model is in the registry.
  EXPECT_EQ(pg.Query("SELECT count(*) FROM models WHERE name = 'gangmodel'"), "1");
  (void)rank0_worker;
}

// Two CPU workers named so that the broker's placement (by worker id) is known: `first` runs
// rank 0, `second` rank 1. No PostgreSQL: checkpoints are only in the workers' own stores.
// A CPU worker without PostgreSQL in t/NAME (log t/NAME.log), listed as `id`.
Proc StartNamedWorker(const BrokerProc& b, const TempDir& t, const std::string& name, const std::string& id) {
  return StartWorker(b.endpoint, t / name, t / (name + ".log"),
                     With(kFastHeartbeats, {"--threads", "1", "--advertise-host", "127.0.0.1", "--worker-id", id}));
}

void StartNamedPair(const BrokerProc& b, const TempDir& t, Proc* first, Proc* second) {
  *first = StartNamedWorker(b, t, "w1", "b-w1");
  *second = StartNamedWorker(b, t, "w2", "c-w2");
  WaitForWorkers(b, 2);
}

// A tiny gang on two named CPU workers without PostgreSQL (w1 runs rank 0, w2 rank 1): corpus
// (seed k), broker (gang ports from GangPortBase(k)), workers, and the training with `args`.
void StartNamedGang(const TempDir& t, int k, const std::vector<std::string>& args, BrokerProc* b, Proc* w1, Proc* w2,
                    std::string* gt) {
  ASSERT_NO_FATAL_FAILURE(SynthTinyCorpus(t, std::to_string(k)));
  *b = StartBroker(t / "broker", t / "broker.log",
                   With(kFastHeartbeats, {"--gang-port-base", std::to_string(GangPortBase(k))}));
  ASSERT_NO_FATAL_FAILURE(StartNamedPair(*b, t, w1, w2));
  ASSERT_NO_FATAL_FAILURE(SubmitTinyGang(*b, t, args, gt));
}

// Where job 1 (rank 0) started each time it ran in this worker log: its step, 0 when from scratch.
std::vector<int64_t> Rank0Starts(const std::string& log_path) {
  std::vector<int64_t> starts;
  std::istringstream in(ReadFile(log_path));
  std::string line;
  while (std::getline(in, line)) {
    if (line.find("\"train_resumed\"") == std::string::npos && line.find("\"train_started\"") == std::string::npos) continue;
    json j = json::parse(line, nullptr, false);
    if (!j.is_object() || j.value("job", 0) != 1) continue;
    starts.push_back(j.value("step", int64_t{0}));
  }
  return starts;
}

// The gang placed again on other workers, the one holding the newest checkpoint now running rank
// 1: the gang resumes from that checkpoint (it started again from step 0, since only rank 0
// looked for checkpoints, and only in its own store).
TEST(Gang, AGangResumesFromTheNewestCheckpointWhicheverRankItsWorkerRuns) {
  TempDir t;
  BrokerProc b;
  Proc w1, w2;
  std::string gt;
  ASSERT_NO_FATAL_FAILURE(
      StartNamedGang(t, 13, {"--name", "moved", "--steps", "100000", "--checkpoint-every", "5"}, &b, &w1, &w2, &gt));
  auto saved = [&] {
    std::string log = ReadFile(t / "w1.log");
    size_t n = 0;
    for (size_t at = log.find("checkpoint_saved"); at != std::string::npos; at = log.find("checkpoint_saved", at + 1)) n++;
    return n >= 2;
  };
  ASSERT_TRUE(WaitFor(saved, 120000)) << ReadFile(t / "w1.log");
  ASSERT_NE(ReadFile(t / "w1.log").find("\"job\":1,\"rank\":0"), std::string::npos) << ReadFile(t / "w1.log");
  w2.Signal(SIGKILL);
  w2.Wait(5000);
  ASSERT_TRUE(WaitFor([&] { return StatusCounts(b.endpoint, gt).queued == 2; }, 30000)) << ReadFile(t / "broker.log");
  // "a-w3" sorts first: rank 0 runs there now, and w1, with the checkpoints, runs rank 1.
  Proc w3 = StartNamedWorker(b, t, "w3", "a-w3");
  std::vector<int64_t> starts;
  ASSERT_TRUE(WaitFor([&] { return !(starts = Rank0Starts(t / "w3.log")).empty(); }, 120000))
      << ReadFile(t / "broker.log") << ReadFile(t / "w3.log");
  EXPECT_GE(starts[0], 10) << ReadFile(t / "w3.log") << ReadFile(t / "w1.log");
  EXPECT_EQ(starts[0] % 5, 0);
  EXPECT_NE(ReadFile(t / "w3.log").find("train_resuming_from_rank"), std::string::npos) << ReadFile(t / "w3.log");
  ASSERT_EQ(Submit(b.endpoint, {"cancel", gt}).code, 0);
}

// A drained worker (SIGTERM) running rank 1: the gang stops at the next step together, rank 0
// checkpoints there, and the gang placed again resumes from that step. Only rank 0 checkpointed
// when its own worker stopped: rank 1 gave its job back and the gang went back to its last
// interval checkpoint (here: none, so to step 0).
TEST(Gang, ARankWhoseWorkerStopsHasTheGangCheckpointWhereItStopped) {
  TempDir t;
  BrokerProc b;
  Proc w1, w2;
  std::string gt;
  ASSERT_NO_FATAL_FAILURE(StartNamedGang(t, 17, {"--name", "drained", "--steps", "100000", "--checkpoint-every", "100000"},
                                         &b, &w1, &w2, &gt));
  ASSERT_TRUE(WaitFor([&] {
    json st = json::parse(Submit(b.endpoint, {"status", "1", "--json"}).out, nullptr, false);
    return st.is_object() && st.contains("progress") && st["progress"].value("step", 0) >= 6;
  }, 120000)) << ReadFile(t / "w1.log");
  ASSERT_NE(ReadFile(t / "w1.log").find("\"job\":1,\"rank\":0"), std::string::npos) << ReadFile(t / "w1.log");
  w2.Signal(SIGTERM);
  EXPECT_EQ(w2.Wait(60000), 0) << ReadFile(t / "w2.log");
  std::string log1 = ReadFile(t / "w1.log");
  size_t at = log1.find("\"why\":\"a rank's worker stopping\"");
  ASSERT_NE(at, std::string::npos) << log1;
  // The step it saved at, from that checkpoint_saved line.
  size_t line = log1.rfind('\n', at);
  json saved_line = json::parse(log1.substr(line + 1, log1.find('\n', at) - line - 1), nullptr, false);
  ASSERT_TRUE(saved_line.is_object()) << log1;
  const int64_t stopped_at = saved_line.value("step", int64_t{-1});
  EXPECT_GE(stopped_at, 6);
  // Rank 1 heard rank 0 had saved it before rank 0's store closed.
  EXPECT_EQ((log1 + ReadFile(t / "w2.log")).find("gang_stop_unconfirmed"), std::string::npos) << ReadFile(t / "w2.log");
  EXPECT_NE(ReadFile(t / "w2.log").find("resumes from this checkpoint"), std::string::npos) << ReadFile(t / "w2.log");
  ASSERT_TRUE(WaitFor([&] { return StatusCounts(b.endpoint, gt).queued == 2; }, 30000)) << ReadFile(t / "broker.log");
  Proc w3 = StartNamedWorker(b, t, "w3", "d-w3");
  std::vector<int64_t> starts;
  ASSERT_TRUE(WaitFor([&] { return (starts = Rank0Starts(t / "w1.log")).size() >= 2; }, 120000))
      << ReadFile(t / "broker.log") << ReadFile(t / "w1.log");
  EXPECT_EQ(starts[1], stopped_at) << ReadFile(t / "w1.log");
  ASSERT_EQ(Submit(b.endpoint, {"cancel", gt}).code, 0);
}

// Rank 0 failing at the very end (here: PostgreSQL gone, so the model cannot be registered)
// fails the gang once. Rank 1, told so through the gang's store, waits for the broker's cancel;
// it used to give its job back when rank 0's store closed, which could requeue the whole gang
// again and again for as long as PostgreSQL stayed away.
TEST(Gang, Rank0FailingAtTheEndFailsTheGangOnce) {
  TempDir t;
  PgCluster pg(t.path());
  ASSERT_TRUE(pg.Start());
  ASSERT_NO_FATAL_FAILURE(SynthTinyCorpus(t, "5"));
  BrokerProc b = StartBroker(t / "broker", t / "broker.log",
                             With(kFastHeartbeats, {"--gang-port-base", std::to_string(GangPortBase(11))}));
  Proc w1, w2;
  ASSERT_NO_FATAL_FAILURE(StartTwoPgWorkers(b, t, pg.url(), &w1, &w2));
  std::string gt;
  ASSERT_NO_FATAL_FAILURE(SubmitTinyGang(b, t, {"--name", "endfail", "--steps", "80", "--checkpoint-every", "20"}, &gt));
  ASSERT_TRUE(WaitFor([&] {
    json st = json::parse(Submit(b.endpoint, {"status", "1", "--json"}).out, nullptr, false);
    return st.is_object() && st.contains("progress") && st["progress"].value("step", 0) >= 5;
  }, 120000)) << ReadFile(t / "w1.log");
  ASSERT_TRUE(pg.Stop());
  Counts c;
  ASSERT_TRUE(WaitFor([&] {
    c = StatusCounts(b.endpoint, gt);
    return c.failed == 1 && c.cancelled == 1;
  }, 180000)) << ReadFile(t / "broker.log") << ReadFile(t / "w1.log") << ReadFile(t / "w2.log");
  json st = json::parse(Submit(b.endpoint, {"status", "1", "--json"}).out, nullptr, false);
  EXPECT_NE(st.value("error", "").find("not in the registry"), std::string::npos) << st.dump();
  std::string log = ReadFile(t / "broker.log");
  // Placements, less those on a port another process held (rank 0 gives its job back at once and
  // the gang moves to the next port: a placement that never ran).
  size_t placed = 0, port_taken = 0;
  for (size_t at = log.find("gang_placed"); at != std::string::npos; at = log.find("gang_placed", at + 1)) placed++;
  const std::string taken = "\"reason\":\"gang rendezvous at";
  for (size_t at = log.find(taken); at != std::string::npos; at = log.find(taken, at + 1)) port_taken++;
  EXPECT_EQ(placed - std::min(placed, port_taken), 1u) << "the gang ran again after rank 0 failed" << log;
  std::string workers = ReadFile(t / "w1.log") + ReadFile(t / "w2.log");
  EXPECT_NE(workers.find("gang_rank0_failed"), std::string::npos) << "rank 1 did not hear of rank 0's failure";
}

}  // namespace
}  // namespace asrf::testing
