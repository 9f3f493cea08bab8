// The worker's result outbox on its own (no fleet): what it keeps across a restart.
#include <gtest/gtest.h>
#include <rocksdb/db.h>

#include <chrono>
#include <memory>
#include <string>
#include <thread>

#include "tests/harness.h"
#include "worker/result_sink.h"

namespace asrf::testing {
namespace {

std::unique_ptr<rocksdb::DB> OpenDb(const std::string& dir) {
  rocksdb::Options o;
  o.create_if_missing = true;
  rocksdb::DB* raw = nullptr;
  EXPECT_TRUE(rocksdb::DB::Open(o, dir, &raw).ok());
  return std::unique_ptr<rocksdb::DB>(raw);
}

// A row PostgreSQL refused for its content is kept apart under "x/" with its number. A worker
// started again with no other row waiting numbered new rows from 1 again, and the next refused
// one overwrote it: the refused result, which is never to be dropped, was gone.
TEST(ResultOutbox, ANewRowNeverTakesTheNumberOfOneSetAside) {
  TempDir t;
  const std::string dir = t / "outbox";
  {
    auto db = OpenDb(dir);
    ASSERT_TRUE(db->Put(rocksdb::WriteOptions(), "x/0000000000000001", "refused before").ok());
  }
  {
    ResultSinkOptions o;
    o.conninfo = "host=127.0.0.1 port=1 dbname=none connect_timeout=1";  // nothing listens: into the outbox
    o.outbox_dir = dir;
    o.retry_ms = 60000;
    std::unique_ptr<ResultSink> sink;
    ASSERT_TRUE(ResultSink::Open(o, &sink).ok());
    proto::JobResult r;
    r.id = 7;
    r.epoch = 1;
    r.ok = true;
    r.result.data = "{}";
    sink->Put({r});
    std::vector<proto::JobResult> durable;
    for (int i = 0; i < 200 && durable.empty(); ++i) {
      durable = sink->TakeDurable();
      if (durable.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    ASSERT_EQ(durable.size(), 1u);
  }
  auto db = OpenDb(dir);
  std::string kept;
  ASSERT_TRUE(db->Get(rocksdb::ReadOptions(), "x/0000000000000001", &kept).ok());
  EXPECT_EQ(kept, "refused before");
  std::string next;
  EXPECT_TRUE(db->Get(rocksdb::ReadOptions(), "o/0000000000000002", &next).ok()) << "the new row is not numbered after it";
}

// Takes what became durable until `want` is among it (or 20 s pass); returns whether it was.
bool DurableUntil(ResultSink& sink, uint64_t want, size_t* seen) {
  for (int i = 0; i < 2000; ++i) {
    bool found = false;
    for (const auto& r : sink.TakeDurable()) {
      ++*seen;
      found = found || r.id == want;
    }
    if (found) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return false;
}

// PostgreSQL slow to take the outbox (here every statement on `results` sleeps 0.2 s and counts
// itself): a result put while the outbox drains is made durable (in the outbox) after the
// statement in hand, and so reaches the broker. The sink used to run up to eight drain
// statements before it looked at new results again, holding them back for all of them.
TEST(ResultOutbox, ANewResultWaitsForOneDrainStatementNotEight) {
  TempDir t;
  PgCluster pg(t / "pg");
  ASSERT_TRUE(pg.Start());
  ASSERT_EQ(RunCommand({ASRF_BROKER_BIN, "--migrate", "--pg", pg.url()}).code, 0);
  ASSERT_EQ(pg.Query("CREATE TABLE statements (n bigserial); "
                     "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS "
                     "$$ BEGIN INSERT INTO statements DEFAULT VALUES; PERFORM pg_sleep(0.2); RETURN NULL; END $$; "
                     "CREATE TRIGGER slow AFTER INSERT ON results FOR EACH STATEMENT EXECUTE FUNCTION slow()"),
            "");
  ASSERT_TRUE(pg.Stop());
  ResultSinkOptions o;
  o.conninfo = pg.url();
  o.outbox_dir = t / "outbox";
  o.retry_ms = 100;
  o.max_batch = 5;  // 100 waiting results: 20 drain statements
  std::unique_ptr<ResultSink> sink;
  ASSERT_TRUE(ResultSink::Open(o, &sink).ok());
  std::vector<proto::JobResult> rows;
  for (uint64_t id = 1; id <= 100; ++id) {
    proto::JobResult r;
    r.id = id;
    r.epoch = 1;
    r.ok = true;
    r.result.data = "{}";
    rows.push_back(r);
  }
  sink->Put(rows);
  size_t seen = 0;
  ASSERT_TRUE(DurableUntil(*sink, 100, &seen));
  ASSERT_EQ(sink->GetStats().outbox_size, 100u) << "PostgreSQL was down: all of them in the outbox";
  ASSERT_TRUE(pg.Start());
  ASSERT_TRUE(WaitFor([&] { return pg.Query("SELECT count(*) FROM statements") != "0"; }, 20000));
  const long before = std::stol(pg.Query("SELECT count(*) FROM statements"));
  proto::JobResult late = rows.front();
  late.id = 1000;
  sink->Put({late});
  ASSERT_TRUE(DurableUntil(*sink, 1000, &seen));
  const long after = std::stol(pg.Query("SELECT count(*) FROM statements"));
  // The statement in hand, and those the sink starts while this test's psql starts (0.2 s each);
  // before the fix it was the rest of the eight, 7 here.
  EXPECT_LE(after - before, 4) << "a new result waited for " << after - before << " drain statements";
  EXPECT_TRUE(WaitFor([&] { return pg.Query("SELECT count(*) FROM results") == "101"; }, 30000))
      << pg.Query("SELECT count(*) FROM results");
}

}  // namespace
}  // namespace asrf::testing
