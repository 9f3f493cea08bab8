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

}  // namespace
}  // namespace asrf::testing
