// PostgreSQL as the system of record, against a real private cluster started by the harness:
// one result row per job, the job history, an outage in the middle of a run, the outbox across a
// worker restart, migrations and bad conninfo.
#include <gtest/gtest.h>
#include <signal.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "common/sha256.h"
#include "tests/harness.h"

namespace asrf::testing {
namespace {

using json = nlohmann::json;

class PgTest : public ::testing::Test {
 protected:
  void SetUp() override {
    pg_ = std::make_unique<PgCluster>(tmp_.path());
    ASSERT_TRUE(pg_->Start());
  }
  TempDir tmp_;
  std::unique_ptr<PgCluster> pg_;
};

TEST_F(PgTest, EveryJobHasExactlyOneResultRowAndTheHistoryAgrees) {
  BrokerProc b = StartBroker(tmp_ / "broker", tmp_ / "broker.log", {"--pg", pg_->url()});
  ASSERT_FALSE(b.endpoint.empty()) << ReadFile(tmp_ / "broker.log");
  Proc w1 = StartWorker(b.endpoint, tmp_ / "w1", tmp_ / "w1.log", {"--pg", pg_->url(), "--slots", "8"});
  Proc w2 = StartWorker(b.endpoint, tmp_ / "w2", tmp_ / "w2.log", {"--pg", pg_->url(), "--slots", "8"});
  RunResult r = Submit(b.endpoint, {"submit", "--kind", "echo", "--count", "5000", "--payload", "{\"k\":7}", "--wait"},
                       120000);
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(pg_->Query("SELECT count(*), count(DISTINCT job_id) FROM results"), "5000|5000");
  EXPECT_EQ(pg_->Query("SELECT count(*) FROM results WHERE ok AND convert_from(payload, 'UTF8') = '{\"k\":7}'"),
            "5000");
  // The history catches up asynchronously and then matches the broker's counts.
  ASSERT_TRUE(WaitFor([&] { return pg_->Query("SELECT count(*) FROM jobs WHERE state = 'done'") == "5000"; }, 20000))
      << pg_->Query("SELECT state, count(*) FROM jobs GROUP BY state");
  Counts c = StatusCounts(b.endpoint);
  EXPECT_EQ(c.done, 5000);
  EXPECT_EQ(pg_->Query("SELECT count(*) FROM jobs"), std::to_string(c.total()));
  EXPECT_EQ(pg_->Query("SELECT count(*) FROM jobs WHERE finished_at IS NULL OR started_at IS NULL OR worker IS NULL"),
            "0");
  EXPECT_EQ(pg_->Query("SELECT count(*) FROM workers"), "2");
}

TEST_F(PgTest, PostgresDownForTenSecondsLosesNothingAndJobsKeepCompleting) {
  BrokerProc b = StartBroker(tmp_ / "broker", tmp_ / "broker.log", With(kFastHeartbeats, {"--pg", pg_->url()}));
  ASSERT_FALSE(b.endpoint.empty());
  Proc w1 = StartWorker(b.endpoint, tmp_ / "w1", tmp_ / "w1.log", With(kFastHeartbeats, {"--pg", pg_->url(), "--slots", "4"}));
  Proc w2 = StartWorker(b.endpoint, tmp_ / "w2", tmp_ / "w2.log", With(kFastHeartbeats, {"--pg", pg_->url(), "--slots", "4"}));
  RunResult sub = Submit(b.endpoint, {"submit", "--kind", "sleep", "--payload", "{\"ms\":4}", "--count", "5000"});
  ASSERT_EQ(sub.code, 0) << sub.err;
  ASSERT_TRUE(WaitFor([&] { return StatusCounts(b.endpoint).done >= 500; }, 30000));
  ASSERT_TRUE(pg_->Stop());
  long at_stop = StatusCounts(b.endpoint).done;
  std::this_thread::sleep_for(std::chrono::seconds(10));
  long after_outage = StatusCounts(b.endpoint).done;
  EXPECT_GT(after_outage, at_stop + 1000) << "jobs stopped completing while PostgreSQL was down";
  ASSERT_TRUE(pg_->Start());
  ASSERT_TRUE(WaitFor([&] { return StatusCounts(b.endpoint).done == 5000; }, 60000));
  ASSERT_TRUE(WaitFor([&] { return pg_->Query("SELECT count(*) FROM results") == "5000"; }, 30000))
      << pg_->Query("SELECT count(*) FROM results");
  EXPECT_EQ(pg_->Query("SELECT count(DISTINCT job_id) FROM results"), "5000");
  ASSERT_TRUE(WaitFor([&] { return pg_->Query("SELECT count(*) FROM jobs WHERE state = 'done'") == "5000"; }, 30000))
      << pg_->Query("SELECT state, count(*) FROM jobs GROUP BY state");
  // The outage really went through the outbox.
  std::string logs = ReadFile(tmp_ / "w1.log") + ReadFile(tmp_ / "w2.log");
  EXPECT_NE(logs.find("result_sink_lost"), std::string::npos);
}

TEST_F(PgTest, OutboxSurvivesAWorkerRestart) {
  BrokerProc b = StartBroker(tmp_ / "broker", tmp_ / "broker.log", kFastHeartbeats);
  ASSERT_TRUE(pg_->Stop());
  {
    Proc w = StartWorker(b.endpoint, tmp_ / "w", tmp_ / "w.log", With(kFastHeartbeats, {"--pg", pg_->url(), "--slots", "4"}));
    RunResult r = Submit(b.endpoint, {"submit", "--kind", "echo", "--count", "50", "--wait"}, 60000);
    ASSERT_EQ(r.code, 0) << r.err << ReadFile(tmp_ / "w.log");
    w.Signal(SIGKILL);
    w.Wait(5000);
  }
  ASSERT_TRUE(pg_->Start());
  // Run the migrations (the broker here has no --pg), then restart the worker on the same state dir.
  ASSERT_EQ(RunCommand({ASRF_BROKER_BIN, "--migrate", "--pg", pg_->url()}).code, 0);
  Proc w = StartWorker(b.endpoint, tmp_ / "w", tmp_ / "w2.log", With(kFastHeartbeats, {"--pg", pg_->url()}));
  EXPECT_TRUE(WaitFor([&] { return pg_->Query("SELECT count(*) FROM results") == "50"; }, 20000))
      << pg_->Query("SELECT count(*) FROM results") << ReadFile(tmp_ / "w2.log");
  EXPECT_NE(ReadFile(tmp_ / "w2.log").find("result_outbox_found"), std::string::npos);
}

// PostgreSQL up but refusing the write (here a lock held on the results table and a 300 ms
// lock_timeout on the worker's connection): the results wait in the outbox and arrive once the
// lock is gone, instead of being dropped as "refused".
TEST_F(PgTest, ResultsPostgresRefusesWaitInTheOutboxUntilItTakesThem) {
  ASSERT_EQ(RunCommand({ASRF_BROKER_BIN, "--migrate", "--pg", pg_->url()}).code, 0);
  BrokerProc b = StartBroker(tmp_ / "broker", tmp_ / "broker.log", kFastHeartbeats);
  Proc locker({"/usr/bin/psql", pg_->url(), "-c",
               "BEGIN; LOCK TABLE results IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(6); COMMIT;"},
              tmp_ / "locker.log");
  ASSERT_TRUE(WaitFor([&] {
    return pg_->Query("SELECT count(*) FROM pg_locks WHERE relation = 'results'::regclass AND granted") == "1";
  }, 10000)) << ReadFile(tmp_ / "locker.log");
  setenv("PGOPTIONS", "-c lock_timeout=300", 1);
  Proc w = StartWorker(b.endpoint, tmp_ / "w", tmp_ / "w.log", With(kFastHeartbeats, {"--pg", pg_->url(), "--slots", "4"}));
  unsetenv("PGOPTIONS");
  RunResult r = Submit(b.endpoint, {"submit", "--kind", "echo", "--count", "20", "--wait"}, 60000);
  ASSERT_EQ(r.code, 0) << r.err;
  ASSERT_TRUE(WaitFor([&] { return ReadFile(tmp_ / "w.log").find("result_write_refused") != std::string::npos; },
                      10000)) << ReadFile(tmp_ / "w.log");
  EXPECT_EQ(locker.Wait(20000), 0) << ReadFile(tmp_ / "locker.log");
  EXPECT_TRUE(WaitFor([&] { return pg_->Query("SELECT count(*) FROM results") == "20"; }, 40000))
      << pg_->Query("SELECT count(*) FROM results") << ReadFile(tmp_ / "w.log");
  EXPECT_EQ(pg_->Query("SELECT count(DISTINCT job_id) FROM results WHERE ok"), "20");
  EXPECT_EQ(ReadFile(tmp_ / "w.log").find("result_row_refused"), std::string::npos);
}

// The broker's state dir lost (or wiped) while PostgreSQL kept everything: the new journal's job
// ids continue after PostgreSQL's, so the new results land beside the old ones. With ids from 1
// again, job 1's new result met the old row and, its lease epoch being lower, was silently kept out.
TEST_F(PgTest, ANewJournalContinuesJobIdsAfterThoseInPostgres) {
  {
    BrokerProc b = StartBroker(tmp_ / "broker", tmp_ / "broker.log", {"--pg", pg_->url()});
    Proc w = StartWorker(b.endpoint, tmp_ / "w", tmp_ / "w.log", {"--pg", pg_->url()});
    ASSERT_EQ(Submit(b.endpoint, {"submit", "--kind", "echo", "--count", "3", "--payload", "{\"run\":1}", "--wait"}).code, 0);
  }
  RemoveTree(tmp_ / "broker");
  BrokerProc b = StartBroker(tmp_ / "broker", tmp_ / "broker2.log", {"--pg", pg_->url()});
  ASSERT_FALSE(b.endpoint.empty()) << ReadFile(tmp_ / "broker2.log");
  Proc w = StartWorker(b.endpoint, tmp_ / "w2", tmp_ / "w2.log", {"--pg", pg_->url()});
  RunResult r = Submit(b.endpoint, {"submit", "--kind", "echo", "--payload", "{\"run\":2}", "--wait"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(pg_->Query("SELECT count(*) FROM results"), "4");
  EXPECT_EQ(pg_->Query("SELECT job_id FROM results WHERE convert_from(payload, 'UTF8') = '{\"run\":2}'"), "4");
  EXPECT_NE(ReadFile(tmp_ / "broker2.log").find("job_ids_continue"), std::string::npos) << ReadFile(tmp_ / "broker2.log");
}

TEST_F(PgTest, ResultsPastRetentionComeFromPostgres) {
  BrokerProc b = StartBroker(tmp_ / "broker", tmp_ / "broker.log", {"--pg", pg_->url(), "--result-retention-s", "0"});
  Proc w = StartWorker(b.endpoint, tmp_ / "w", tmp_ / "w.log", {"--pg", pg_->url()});
  ASSERT_EQ(Submit(b.endpoint, {"submit", "--kind", "echo", "--payload", "{\"old\":true}", "--wait"}).code, 0);
  // Retention 0: the broker drops the result at its next housekeeping pass (every second).
  ASSERT_TRUE(WaitFor([&] { return Submit(b.endpoint, {"jobs", "--json"}).out.find("retention") != std::string::npos; },
                      5000));
  RunResult r = Submit(b.endpoint, {"results", "1", "--json"});
  ASSERT_EQ(r.code, 0) << r.err << r.out;
  auto j = json::parse(r.out);
  EXPECT_EQ(j["result"], json::parse("{\"old\":true}"));
  RunResult raw = Submit(b.endpoint, {"results", "1"});
  EXPECT_EQ(raw.out, "{\"old\":true}\n");
}

TEST_F(PgTest, MigrationsRerunHarmlesslyAndBadConninfoIsAClearError) {
  RunResult first = RunCommand({ASRF_BROKER_BIN, "--migrate", "--pg", pg_->url()});
  ASSERT_EQ(first.code, 0) << first.err;
  EXPECT_NE(first.out.find("applied 1"), std::string::npos) << first.out;
  RunResult again = RunCommand({ASRF_BROKER_BIN, "--migrate", "--pg", pg_->url()});
  ASSERT_EQ(again.code, 0) << again.err;
  EXPECT_NE(again.out.find("applied 0"), std::string::npos) << again.out;
  EXPECT_EQ(pg_->Query("SELECT count(*) FROM schema_migrations"), "1");
  for (const char* table : {"jobs", "results", "workers", "models", "checkpoints"}) {
    EXPECT_EQ(pg_->Query(std::string("SELECT to_regclass('") + table + "') IS NOT NULL"), "t") << table;
  }
  // Unparsable, unreachable, and a password on the command line.
  RunResult bad = RunCommand({ASRF_BROKER_BIN, "--migrate", "--pg", "host=/tmp port=x =="});
  EXPECT_NE(bad.code, 0);
  EXPECT_NE(bad.err.find("conninfo"), std::string::npos) << bad.err;
  RunResult gone = RunCommand({ASRF_BROKER_BIN, "--migrate", "--pg", "host=/nonexistent-dir dbname=asrf"}, 30000);
  EXPECT_EQ(gone.code, 1);
  EXPECT_NE(gone.err.find("cannot connect to PostgreSQL"), std::string::npos) << gone.err;
  RunResult secret = RunCommand({ASRF_BROKER_BIN, "--state-dir", tmp_ / "b", "--pg", pg_->url() + "&password=hunter2"});
  EXPECT_NE(secret.code, 0);
  EXPECT_NE(secret.err.find("PGPASSWORD"), std::string::npos) << secret.err;
  RunResult wsecret = RunCommand({ASRF_WORKER_BIN, "--state-dir", tmp_ / "w", "--pg", "password=x host=/tmp"});
  EXPECT_NE(wsecret.code, 0);
  EXPECT_NE(wsecret.err.find("PGPASSWORD"), std::string::npos) << wsecret.err;
  // A registry model cached from before does not hide an unparsable conninfo: the worker used to
  // take it for PostgreSQL down, load the cached copy and fail only when its result sink opened.
  const std::string model = ReadFile(std::string(ASRF_SOURCE_DIR) + "/models/en-small.pt");
  ASSERT_FALSE(model.empty());
  std::filesystem::create_directories(tmp_ / "w/models");
  std::ofstream(tmp_ / "w/models/en.v1.pt", std::ios::binary) << model;
  std::ofstream(tmp_ / "w/models/en.v1.sha256") << Sha256Hex(model) << "\n";
  RunResult wbad = RunCommand({ASRF_WORKER_BIN, "--state-dir", tmp_ / "w", "--model", "en", "--pg", "host=/tmp port=x =="});
  EXPECT_EQ(wbad.code, 2);
  EXPECT_NE(wbad.err.find("--pg: bad PostgreSQL conninfo"), std::string::npos) << wbad.err;
  EXPECT_EQ((wbad.out + wbad.err).find("model_from_cache"), std::string::npos) << wbad.err;
}

}  // namespace
}  // namespace asrf::testing
