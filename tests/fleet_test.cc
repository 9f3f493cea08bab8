// The real binaries on loopback: workers and brokers SIGKILLed mid-run, poison jobs, timeouts,
// cancellation and the client's exit codes.
#include <gtest/gtest.h>
#include <signal.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <set>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "tests/harness.h"

namespace asrf::testing {
namespace {

using json = nlohmann::json;

std::string LastLine(const std::string& s) {
  std::string t = s;
  while (!t.empty() && t.back() == '\n') t.pop_back();
  auto p = t.rfind('\n');
  return p == std::string::npos ? t : t.substr(p + 1);
}

std::string FirstLine(const std::string& s) { return s.substr(0, s.find('\n')); }

// Follows a batch with `asr-submit watch` and returns job id -> how many times it finished.
std::map<uint64_t, int> FinishedJobs(const std::string& out, std::set<std::string>* states = nullptr) {
  std::map<uint64_t, int> seen;
  std::istringstream in(out);
  std::string line;
  while (std::getline(in, line)) {
    auto j = json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.contains("job")) continue;
    seen[j["job"].get<uint64_t>()]++;
    if (states) states->insert(j["state"].get<std::string>());
  }
  return seen;
}

TEST(Fleet, WorkerKilledMidwayLosesNothingAndNothingRunsTwiceIntoResults) {
  TempDir tmp;
  BrokerProc b = StartBroker(tmp / "broker", tmp / "broker.log", With(kFastHeartbeats, {"--backoff-ms", "0"}));
  ASSERT_FALSE(b.endpoint.empty()) << ReadFile(tmp / "broker.log");
  // 1,000 short jobs (2 ms each) so the kill lands midway.
  RunResult sub = Submit(b.endpoint, {"submit", "--kind", "sleep", "--payload", "{\"ms\":2}", "--count", "1000"});
  ASSERT_EQ(sub.code, 0) << sub.err;
  std::string batch = FirstLine(sub.out);
  // Follow the batch from the start so every finish event is seen.
  Proc watcher({ASRF_SUBMIT_BIN, "--broker", b.endpoint, "watch", batch}, tmp / "watch.out");
  Proc w1 = StartWorker(b.endpoint, tmp / "w1", tmp / "w1.log", With(kFastHeartbeats, {"--slots", "2"}));
  ASSERT_TRUE(WaitFor([&] { return StatusCounts(b.endpoint).done >= 200; }, 30000));
  w1.Signal(SIGKILL);
  ASSERT_EQ(w1.Wait(5000), 128 + SIGKILL);
  Counts mid = StatusCounts(b.endpoint);
  EXPECT_LT(mid.done, 1000) << "the kill did not land midway";
  Proc w2 = StartWorker(b.endpoint, tmp / "w2", tmp / "w2.log", With(kFastHeartbeats, {"--slots", "2"}));
  ASSERT_EQ(watcher.Wait(60000), 0) << ReadFile(tmp / "watch.out");
  Counts c = StatusCounts(b.endpoint);
  EXPECT_EQ(c.done, 1000);
  EXPECT_EQ(c.total(), 1000);
  std::set<std::string> states;
  auto seen = FinishedJobs(ReadFile(tmp / "watch.out"), &states);
  EXPECT_EQ(seen.size(), 1000u);
  for (const auto& [id, n] : seen) EXPECT_EQ(n, 1) << "job " << id << " finished " << n << " times";
  EXPECT_EQ(states, std::set<std::string>{"done"});
}

TEST(Fleet, BrokerKilledAndRestartedLosesNoJob) {
  TempDir tmp;
  BrokerProc b = StartBroker(tmp / "broker", tmp / "broker.log", kFastHeartbeats);
  ASSERT_FALSE(b.endpoint.empty());
  RunResult sub = Submit(b.endpoint, {"submit", "--kind", "sleep", "--payload", "{\"ms\":2}", "--count", "1000"});
  ASSERT_EQ(sub.code, 0) << sub.err;
  Proc w = StartWorker(b.endpoint, tmp / "w", tmp / "w.log", With(kFastHeartbeats, {"--slots", "2"}));
  ASSERT_TRUE(WaitFor([&] { return StatusCounts(b.endpoint).done >= 200; }, 30000));
  Counts before = StatusCounts(b.endpoint);
  b.proc.Signal(SIGKILL);
  ASSERT_EQ(b.proc.Wait(5000), 128 + SIGKILL);
  EXPECT_GT(before.queued + before.leased, 0) << "nothing was left queued or leased at the kill";
  // Same state dir, same port: the worker reconnects by itself.
  BrokerProc b2 = StartBroker(tmp / "broker", tmp / "broker.log", kFastHeartbeats, b.endpoint);
  ASSERT_EQ(b2.endpoint, b.endpoint) << ReadFile(tmp / "broker.log");
  ASSERT_TRUE(WaitFor([&] { return StatusCounts(b2.endpoint).done == 1000; }, 60000))
      << ReadFile(tmp / "w.log");
  Counts c = StatusCounts(b2.endpoint);
  EXPECT_EQ(c.total(), 1000);
  // A broker restart never counts an attempt.
  RunResult jobs = Submit(b2.endpoint, {"jobs", "--state", "done", "--limit", "1000", "--json"});
  ASSERT_EQ(jobs.code, 0);
  int lines = 0;
  std::istringstream in(jobs.out);
  std::string line;
  while (std::getline(in, line)) {
    auto j = json::parse(line);
    EXPECT_EQ(j["attempts"].get<int>(), 0) << line;
    lines++;
  }
  EXPECT_EQ(lines, 1000);
}

TEST(Fleet, JobThatAlwaysKillsItsWorkerEndsDeadWithTheReason) {
  TempDir tmp;
  BrokerProc b = StartBroker(tmp / "broker", tmp / "broker.log", With(kFastHeartbeats, {"--backoff-ms", "50"}));
  ASSERT_FALSE(b.endpoint.empty());
  RunResult sub = Submit(b.endpoint, {"submit", "--kind", "crash"});
  ASSERT_EQ(sub.code, 0) << sub.err;
  // A supervisor restarts the worker whenever it dies, as systemd would.
  int crashes = 0;
  for (int i = 0; i < 6 && StatusCounts(b.endpoint).dead != 1; ++i) {
    Proc w = StartWorker(b.endpoint, tmp / "w", tmp / "w.log", kFastHeartbeats);
    int rc = w.Wait(10000);
    if (rc == 128 + SIGABRT) crashes++;
    WaitFor([&] { return StatusCounts(b.endpoint).queued == 1 || StatusCounts(b.endpoint).dead == 1; }, 5000);
  }
  Counts c = StatusCounts(b.endpoint);
  EXPECT_EQ(c.dead, 1);
  EXPECT_EQ(crashes, 3) << "max_attempts is 3";
  RunResult dead = Submit(b.endpoint, {"jobs", "--state", "dead", "--json"});
  auto j = json::parse(FirstLine(dead.out));
  EXPECT_EQ(j["attempts"].get<int>(), 3);
  EXPECT_NE(j["error"].get<std::string>().find("lost"), std::string::npos) << dead.out;
  // The dead-letter list can be retried.
  RunResult retry = Submit(b.endpoint, {"retry", "--dead"});
  EXPECT_EQ(retry.code, 0);
  EXPECT_EQ(StatusCounts(b.endpoint).queued, 1);
}

TEST(Fleet, PerJobTimeoutCancelsAndRetriesThenDeadLetters) {
  TempDir tmp;
  BrokerProc b = StartBroker(tmp / "broker", tmp / "broker.log", With(kFastHeartbeats, {"--backoff-ms", "0"}));
  Proc w = StartWorker(b.endpoint, tmp / "w", tmp / "w.log", With(kFastHeartbeats, {"--slots", "2"}));
  RunResult r = Submit(b.endpoint, {"submit", "--kind", "sleep", "--payload", "{\"ms\":60000}", "--job-timeout",
                                    "0.3", "--wait"},
                       60000);
  EXPECT_EQ(r.code, 1) << r.err;
  auto j = json::parse(LastLine(r.out));
  EXPECT_EQ(j["dead"].get<int>(), 1);
  EXPECT_LT(r.seconds, 20) << "the worker did not stop the timed-out job";
  RunResult dead = Submit(b.endpoint, {"jobs", "--state", "dead", "--json"});
  EXPECT_NE(dead.out.find("timed out"), std::string::npos) << dead.out;
  // The worker stays healthy and serves other jobs.
  RunResult ok = Submit(b.endpoint, {"submit", "--kind", "echo", "--count", "10", "--wait"});
  EXPECT_EQ(ok.code, 0) << ok.err;
}

TEST(Fleet, SubmitWaitReportsEveryOutcomeAndExitCodes) {
  TempDir tmp;
  BrokerProc b = StartBroker(tmp / "broker", tmp / "broker.log");
  Proc w = StartWorker(b.endpoint, tmp / "w", tmp / "w.log", {"--slots", "4"});
  RunResult ok = Submit(b.endpoint, {"submit", "--kind", "echo", "--count", "50", "--payload", "{\"x\":[1,2]}",
                                     "--wait"});
  ASSERT_EQ(ok.code, 0) << ok.err;
  auto j = json::parse(LastLine(ok.out));
  EXPECT_EQ(j["done"].get<int>(), 50);
  EXPECT_EQ(j["failed"].get<int>(), 0);
  EXPECT_TRUE(j.contains("seconds"));
  // Echo returns the payload byte for byte.
  RunResult st = Submit(b.endpoint, {"status", "1", "--json"});
  ASSERT_EQ(st.code, 0);
  EXPECT_EQ(json::parse(st.out)["result"], json::parse("{\"x\":[1,2]}"));
  // A malformed payload fails that job with a clear error.
  RunResult bad = Submit(b.endpoint, {"submit", "--kind", "echo", "--payload", "{not json", "--wait"});
  EXPECT_EQ(bad.code, 1);
  EXPECT_EQ(json::parse(LastLine(bad.out))["failed"].get<int>(), 1);
  RunResult failed = Submit(b.endpoint, {"jobs", "--state", "failed", "--json"});
  EXPECT_NE(failed.out.find("malformed payload"), std::string::npos) << failed.out;
  // A failure with a huge message is recorded (cut to 4 KiB) and does not hold up its neighbours.
  std::string huge = "{\"message\":\"" + std::string(100000, 'e') + "\"}";
  RunResult loud = Submit(b.endpoint, {"submit", "--kind", "fail", "--payload", huge, "--count", "3", "--wait"}, 30000);
  EXPECT_EQ(loud.code, 1) << loud.err;
  EXPECT_EQ(json::parse(LastLine(loud.out))["failed"].get<int>(), 3);
  // status --json: exactly one line with every state.
  RunResult s = Submit(b.endpoint, {"status", "--json"});
  ASSERT_EQ(s.code, 0);
  EXPECT_EQ(std::count(s.out.begin(), s.out.end(), '\n'), 1);
  auto counts = json::parse(s.out);
  for (const char* k : {"queued", "leased", "done", "failed", "dead", "cancelled"}) {
    ASSERT_TRUE(counts.contains(k) && counts[k].is_number_integer()) << k;
  }
  EXPECT_EQ(counts["done"].get<int>(), 50);
  EXPECT_EQ(counts["failed"].get<int>(), 4);
  // Usage errors exit 2.
  EXPECT_EQ(Submit(b.endpoint, {"submit", "--count", "3"}).code, 2);
  EXPECT_EQ(Submit(b.endpoint, {"frobnicate"}).code, 2);
  // So are requests the broker refuses or cannot place: exit 1 is for jobs that did not end done.
  EXPECT_EQ(Submit(b.endpoint, {"jobs", "--state", "bogus"}).code, 2);
  EXPECT_EQ(Submit(b.endpoint, {"status", "999999"}).code, 2);
  EXPECT_EQ(Submit(b.endpoint, {"results", "999999"}).code, 2);
  // The worker list shows the worker.
  RunResult ws = Submit(b.endpoint, {"workers", "--json"});
  EXPECT_NE(ws.out.find("\"slots\":4"), std::string::npos) << ws.out;
}

// Two worker processes started with the same --worker-id: the second is refused while the first
// lives (it says why in its log and retries), and jobs run once each on the first with no attempt
// lost to the two taking each other's leases.
TEST(Fleet, TwoWorkersGivenOneIdDoNotTakeEachOthersJobs) {
  TempDir tmp;
  // Default heartbeats (3 s of silence): a slow test machine must not make the first look gone.
  BrokerProc b = StartBroker(tmp / "broker", tmp / "broker.log");
  Proc w1 = StartWorker(b.endpoint, tmp / "w1", tmp / "w1.log", {"--worker-id", "same", "--slots", "2"});
  ASSERT_TRUE(WaitFor([&] { return Submit(b.endpoint, {"workers"}).out.find("same") != std::string::npos; }, 10000));
  Proc w2 = StartWorker(b.endpoint, tmp / "w2", tmp / "w2.log", {"--worker-id", "same", "--slots", "2"});
  ASSERT_TRUE(WaitFor([&] { return ReadFile(tmp / "w2.log").find("worker_id_in_use") != std::string::npos; }, 10000))
      << ReadFile(tmp / "w2.log");
  RunResult r = Submit(b.endpoint, {"submit", "--kind", "sleep", "--payload", "{\"ms\":100}", "--count", "20", "--wait"});
  ASSERT_EQ(r.code, 0) << r.out << r.err;
  EXPECT_EQ(json::parse(LastLine(r.out))["done"].get<int>(), 20);
  RunResult jobs = Submit(b.endpoint, {"jobs", "--state", "done", "--json"});
  ASSERT_EQ(jobs.code, 0) << jobs.err;
  int lines = 0;
  for (size_t at = 0, nl; (nl = jobs.out.find('\n', at)) != std::string::npos; at = nl + 1) {
    auto j = json::parse(jobs.out.substr(at, nl - at));
    EXPECT_EQ(j["attempts"].get<int>(), 0) << "job " << j["id"] << " lost a lease: " << jobs.out;
    ++lines;
  }
  EXPECT_EQ(lines, 20) << jobs.out;
  EXPECT_EQ(ReadFile(tmp / "broker.log").find("reconnected without it"), std::string::npos) << ReadFile(tmp / "broker.log");
}

// An option outside its range is put at the nearest bound, and the log says so (it used to be
// changed silently: --max-attempts 0 ran with 1).
TEST(Fleet, OptionsOutOfRangeAreNamedInTheLog) {
  TempDir tmp;
  BrokerProc b = StartBroker(tmp / "broker", tmp / "broker.log", {"--max-attempts", "0", "--batch-max-items", "5000"});
  Proc w = StartWorker(b.endpoint, tmp / "w", tmp / "w.log", {"--slots", "0"});
  ASSERT_TRUE(WaitFor([&] { return Submit(b.endpoint, {"workers"}).out.find("slots") != std::string::npos ||
                                   ReadFile(tmp / "w.log").find("worker_connecting") != std::string::npos; }, 10000));
  const std::string broker_log = ReadFile(tmp / "broker.log"), worker_log = ReadFile(tmp / "w.log");
  for (const char* want : {"option_out_of_range", "--max-attempts", "--batch-max-items"}) {
    EXPECT_NE(broker_log.find(want), std::string::npos) << want << "\n" << broker_log;
  }
  EXPECT_NE(worker_log.find("\"option\":\"--slots\""), std::string::npos) << worker_log;
  // A worker id the broker would refuse stops the worker at start, saying why (it used to retry
  // READY for ever).
  RunResult longid = RunCommand({ASRF_WORKER_BIN, "--broker", b.endpoint,
                                 "--state-dir", tmp / "w2", "--worker-id", std::string(300, 'w')}, 20000);
  EXPECT_NE(longid.code, 0);
  EXPECT_NE((longid.out + longid.err).find("at most 256 bytes"), std::string::npos) << longid.out << longid.err;
}

// Options come from the command line, ASRF_* variables and a --config file, in that order.
TEST(Fleet, OptionsFromEnvironmentAndConfigFile) {
  TempDir tmp;
  {
    std::ofstream conf(tmp / "broker.conf");
    conf << "# a comment\nlisten = tcp://127.0.0.1:0\nstate-dir = " << (tmp / "from-file") << "\nmax-attempts = 1\n";
  }
  setenv("ASRF_STATE_DIR", (tmp / "from-env").c_str(), 1);
  Proc broker({ASRF_BROKER_BIN, "--config", tmp / "broker.conf"}, tmp / "broker.log");
  unsetenv("ASRF_STATE_DIR");
  ASSERT_TRUE(WaitFor([&] { return !ReadFile(tmp / "from-env/broker.endpoint").empty(); }, 10000))
      << "the environment should win over the config file\n" << ReadFile(tmp / "broker.log");
  EXPECT_TRUE(ReadFile(tmp / "from-file/broker.endpoint").empty());
  std::string endpoint = ReadFile(tmp / "from-env/broker.endpoint");
  endpoint.pop_back();
  // max-attempts = 1 from the file: one crash makes the job dead.
  ASSERT_EQ(Submit(endpoint, {"submit", "--kind", "crash"}).code, 0);
  Proc w = StartWorker(endpoint, tmp / "w", tmp / "w.log", kFastHeartbeats);
  EXPECT_EQ(w.Wait(10000), 128 + SIGABRT);
  EXPECT_TRUE(WaitFor([&] { return StatusCounts(endpoint).dead == 1; }, 10000));
  // Bad values are usage errors, with the option named.
  RunResult bad = RunCommand({ASRF_BROKER_BIN, "--max-attempts", "many"});
  EXPECT_EQ(bad.code, 2);
  EXPECT_NE(bad.err.find("max-attempts"), std::string::npos) << bad.err;
  for (const char* device : {"cuda:x", "cuda:", "gpu0"}) {
    RunResult r = RunCommand({ASRF_WORKER_BIN, "--device", device});
    EXPECT_EQ(r.code, 2) << device;
    EXPECT_NE(r.err.find("cuda:N"), std::string::npos) << device << ": " << r.err;
  }
  RunResult help = RunCommand({ASRF_WORKER_BIN, "--help"});
  EXPECT_EQ(help.code, 0);
  EXPECT_NE(help.out.find("--slots"), std::string::npos);
}

// Workers that stop say goodbye; the broker forgets them and logs each by its id. The broker runs
// with glibc's MALLOC_PERTURB_, which overwrites freed memory: reading a freed worker id (as the
// goodbye path once did, crashing the broker now and then) then fails every time.
TEST(Fleet, WorkersThatSayGoodbyeAreForgottenByTheirIds) {
  TempDir tmp;
  setenv("MALLOC_PERTURB_", "165", 1);
  BrokerProc b = StartBroker(tmp / "broker", tmp / "broker.log", kFastHeartbeats);
  unsetenv("MALLOC_PERTURB_");
  ASSERT_FALSE(b.endpoint.empty());
  const std::vector<std::string> ids = {"w1", "a-worker-with-an-id-too-long-for-short-strings"};
  std::vector<Proc> workers;
  for (const auto& id : ids)
    workers.push_back(StartWorker(b.endpoint, tmp / id, tmp / (id + ".log"), With(kFastHeartbeats, {"--worker-id", id})));
  ASSERT_TRUE(WaitFor([&] {
    RunResult r = Submit(b.endpoint, {"workers"}, 10000);
    return std::count(r.out.begin(), r.out.end(), '\n') == static_cast<long>(ids.size());
  }, 20000));
  for (auto& w : workers) {
    w.Signal(SIGTERM);
    EXPECT_EQ(w.Wait(20000), 0);
  }
  std::set<std::string> gone;
  WaitFor([&] {
    gone.clear();
    std::istringstream in(ReadFile(tmp / "broker.log"));
    std::string line;
    while (std::getline(in, line)) {
      auto j = json::parse(line, nullptr, false);
      if (!j.is_discarded() && j.value("event", "") == "worker_gone") gone.insert(j.value("worker", ""));
    }
    return gone.size() == ids.size() || !b.proc.Running();
  }, 10000);
  EXPECT_EQ(gone, std::set<std::string>(ids.begin(), ids.end()));
  EXPECT_TRUE(b.proc.Running()) << ReadFile(tmp / "broker.log");
  RunResult r = Submit(b.endpoint, {"workers"}, 10000);
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, "");
}

TEST(Fleet, UnreachableBrokerExitsThreeWithinABoundedWait) {
  RunResult r = RunCommand({ASRF_SUBMIT_BIN, "--broker", "tcp://127.0.0.1:1", "--request-timeout", "1", "submit", "--kind",
                     "echo", "--count", "5", "--wait"},
                    30000);
  EXPECT_EQ(r.code, 3) << r.err;
  EXPECT_LT(r.seconds, 10);
  EXPECT_NE(r.err.find("is asr-broker running"), std::string::npos) << r.err;
  RunResult s = RunCommand({ASRF_SUBMIT_BIN, "--broker", "tcp://127.0.0.1:1", "--request-timeout", "1", "status", "--json"});
  EXPECT_EQ(s.code, 3);
}

TEST(Fleet, PrioritiesCancellationAndDrainOnSigterm) {
  TempDir tmp;
  BrokerProc b = StartBroker(tmp / "broker", tmp / "broker.log");
  // Queued before any worker exists: low first, then high priority.
  RunResult low = Submit(b.endpoint, {"submit", "--kind", "sleep", "--payload", "{\"ms\":1}", "--count", "5"});
  RunResult high = Submit(b.endpoint, {"submit", "--kind", "sleep", "--payload", "{\"ms\":1}", "--count", "5",
                                       "--priority", "10"});
  RunResult doomed = Submit(b.endpoint, {"submit", "--kind", "sleep", "--payload", "{\"ms\":1}", "--count", "7"});
  ASSERT_EQ(doomed.code, 0);
  RunResult cancel = Submit(b.endpoint, {"cancel", FirstLine(doomed.out)});
  EXPECT_EQ(cancel.code, 0);
  EXPECT_NE(cancel.out.find("cancelled 7"), std::string::npos) << cancel.out;
  RunResult q = Submit(b.endpoint, {"status", "6"});
  EXPECT_NE(q.out.find("no worker is connected"), std::string::npos) << q.out;
  Proc w = StartWorker(b.endpoint, tmp / "w", tmp / "w.log", {"--slots", "1"});
  ASSERT_TRUE(WaitFor([&] { return StatusCounts(b.endpoint).done == 10; }, 20000));
  // With one slot, every high-priority job finished before any low one.
  RunResult done = Submit(b.endpoint, {"jobs", "--state", "done", "--limit", "100", "--json"});
  std::vector<uint64_t> high_ids, low_ids;
  std::istringstream in(done.out);
  std::string line;
  std::map<uint64_t, int64_t> finished;
  while (std::getline(in, line)) {
    auto j = json::parse(line);
    RunResult one = Submit(b.endpoint, {"status", std::to_string(j["id"].get<uint64_t>()), "--json"});
    auto info = json::parse(one.out);
    finished[info["id"].get<uint64_t>()] = info["finished_ms"].get<int64_t>();
  }
  ASSERT_EQ(finished.size(), 10u);
  int64_t last_high = 0, first_low = INT64_MAX;
  for (auto [id, t] : finished) {
    if (id <= 5) first_low = std::min(first_low, t);
    else last_high = std::max(last_high, t);
  }
  EXPECT_LE(last_high, first_low);
  EXPECT_EQ(StatusCounts(b.endpoint).cancelled, 7);
  // A long job running when the worker gets SIGTERM is finished, not dropped.
  RunResult slow = Submit(b.endpoint, {"submit", "--kind", "sleep", "--payload", "{\"ms\":800}"});
  ASSERT_TRUE(WaitFor([&] { return StatusCounts(b.endpoint).leased == 1; }, 5000));
  w.Signal(SIGTERM);
  EXPECT_EQ(w.Wait(10000), 0);
  Counts c = StatusCounts(b.endpoint);
  EXPECT_EQ(c.done, 11);
  EXPECT_EQ(c.leased, 0);
  // And the broker itself stops cleanly on SIGTERM.
  b.proc.Signal(SIGTERM);
  EXPECT_EQ(b.proc.Wait(10000), 0);
}

}  // namespace
}  // namespace asrf::testing
