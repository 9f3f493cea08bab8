// JobTable: ordering (priority, then FIFO), backoff, kinds and per-state counts.
#include <gtest/gtest.h>

#include "broker/job_table.h"

namespace asrf {
namespace {

Job MakeJob(uint64_t id, int prio, const std::string& kind = "echo", const std::string& batch = "b") {
  Job j;
  j.id = id;
  j.priority = prio;
  j.kind = kind;
  j.batch = batch;
  return j;
}

TEST(JobTable, HigherPriorityFirstThenFifo) {
  JobTable t;
  t.Add(MakeJob(1, 0));
  t.Add(MakeJob(2, 5));
  t.Add(MakeJob(3, 0));
  t.Add(MakeJob(4, 5));
  t.Add(MakeJob(5, -1));
  std::vector<uint64_t> order;
  while (uint64_t id = t.PopReady({})) {
    order.push_back(id);
    t.SetState(*t.Find(id), JobState::kLeased);
  }
  EXPECT_EQ(order, (std::vector<uint64_t>{2, 4, 1, 3, 5}));
  EXPECT_EQ(t.counts()[static_cast<int>(JobState::kLeased)], 5);
  EXPECT_EQ(t.counts()[static_cast<int>(JobState::kQueued)], 0);
}

TEST(JobTable, BackedOffJobWaitsForItsTime) {
  JobTable t;
  Job& j = t.Add(MakeJob(1, 0));
  t.SetState(j, JobState::kLeased);
  t.SetState(j, JobState::kQueued, /*not_before=*/1000);
  EXPECT_EQ(t.PopReady({}), 0u);
  EXPECT_EQ(t.Promote(999), 1000);
  EXPECT_EQ(t.PopReady({}), 0u);
  EXPECT_EQ(t.Promote(1000), 0);
  EXPECT_EQ(t.PopReady({}), 1u);
}

TEST(JobTable, OnlyKindsTheWorkerRuns) {
  JobTable t;
  t.Add(MakeJob(1, 9, "train"));
  t.Add(MakeJob(2, 0, "echo"));
  EXPECT_EQ(t.PopReady({"echo"}), 2u);
  EXPECT_EQ(t.PopReady({"echo"}), 0u);
  EXPECT_EQ(t.PopReady({"echo", "train"}), 1u);
}

TEST(JobTable, TranscriptionSegmentsLeaveInBatchesNotOneByOne) {
  JobTable t;
  t.SetNow(1000);
  for (uint64_t id = 1; id <= 3; ++id) {
    Job j = MakeJob(id, 0, "transcribe");
    j.model = "en";
    j.audio_ms = 2000;
    t.Add(std::move(j));
  }
  EXPECT_TRUE(t.HasReady());
  EXPECT_EQ(t.PopReady({}), 0u);
  TakenBatch b;
  auto any = [](const std::string&) { return true; };
  EXPECT_FALSE(t.TakeBatch(any, &b));  // partial, not yet due
  t.SetState(*t.Find(2), JobState::kCancelled);  // leaves the batcher
  t.SetNow(1000 + BatcherOptions{}.max_delay_ms);
  ASSERT_TRUE(t.TakeBatch(any, &b));
  EXPECT_EQ(b.ids, (std::vector<uint64_t>{1, 3}));
  EXPECT_EQ(b.model, "en");
  EXPECT_FALSE(t.HasReady());
  // A requeued segment goes back to the batcher.
  t.SetState(*t.Find(1), JobState::kLeased);
  t.SetState(*t.Find(1), JobState::kQueued);
  EXPECT_TRUE(t.HasReady());
}

TEST(JobTable, CancelledQueuedJobLeavesTheQueueAndCountsMove) {
  JobTable t;
  t.Add(MakeJob(1, 0, "echo", "x"));
  t.Add(MakeJob(2, 0, "echo", "x"));
  t.SetState(*t.Find(1), JobState::kCancelled);
  EXPECT_EQ(t.PopReady({}), 2u);
  EXPECT_EQ(t.PopReady({}), 0u);
  auto c = t.BatchCounts("x");
  EXPECT_EQ(c[static_cast<int>(JobState::kCancelled)], 1);
  EXPECT_EQ(c[static_cast<int>(JobState::kQueued)], 1);  // popped but not yet moved
  EXPECT_EQ(t.BatchJobs("x")->size(), 2u);
  EXPECT_EQ(t.BatchJobs("nope"), nullptr);
}

// The per-state index JOBS --state reads: every state but done, through add, moves and forget.
TEST(JobTable, IdsByStateFollowEveryMove) {
  JobTable t;
  for (uint64_t id = 1; id <= 6; ++id) t.Add(MakeJob(id, 0));
  Job dead = MakeJob(7, 0);
  dead.state = JobState::kDead;
  t.Add(dead);
  auto ids = [&](JobState s) { return std::vector<uint64_t>(t.IdsInState(s)->begin(), t.IdsInState(s)->end()); };
  EXPECT_EQ(ids(JobState::kQueued), (std::vector<uint64_t>{1, 2, 3, 4, 5, 6}));
  EXPECT_EQ(ids(JobState::kDead), (std::vector<uint64_t>{7}));
  t.SetState(*t.Find(2), JobState::kLeased);
  t.SetState(*t.Find(3), JobState::kLeased);
  t.SetState(*t.Find(3), JobState::kDead);
  t.SetState(*t.Find(4), JobState::kLeased);
  t.SetState(*t.Find(4), JobState::kDone);
  t.SetState(*t.Find(5), JobState::kFailed);
  t.SetState(*t.Find(6), JobState::kCancelled);
  EXPECT_EQ(ids(JobState::kQueued), (std::vector<uint64_t>{1}));
  EXPECT_EQ(ids(JobState::kLeased), (std::vector<uint64_t>{2}));
  EXPECT_EQ(ids(JobState::kDead), (std::vector<uint64_t>{3, 7}));
  EXPECT_EQ(ids(JobState::kFailed), (std::vector<uint64_t>{5}));
  EXPECT_EQ(ids(JobState::kCancelled), (std::vector<uint64_t>{6}));
  EXPECT_EQ(t.IdsInState(JobState::kDone), nullptr);
  EXPECT_EQ(t.OldestQueued(), 1u);
  t.Forget(3);
  t.Forget(4);
  EXPECT_EQ(ids(JobState::kDead), (std::vector<uint64_t>{7}));
  t.SetState(*t.Find(7), JobState::kQueued);  // RETRY
  EXPECT_TRUE(ids(JobState::kDead).empty());
  EXPECT_EQ(ids(JobState::kQueued), (std::vector<uint64_t>{1, 7}));
}

}  // namespace
}  // namespace asrf
