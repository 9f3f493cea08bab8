// The transcription batcher with a fake clock: batch sizes by segment length, padding on a mixed
// set, the max_delay rule, and removal.
#include <gtest/gtest.h>

#include <algorithm>
#include <random>

#include "broker/batcher.h"

namespace asrf {
namespace {

bool Any(const std::string&) { return true; }

// Queues `n` segments of `ms` each at t=0 and takes batches at t=0 (only full ones may leave).
std::vector<TakenBatch> FullBatches(Batcher& b, int n, int64_t ms, uint64_t first_id) {
  for (int i = 0; i < n; ++i) b.Add(first_id + i, "m", ms, 0);
  std::vector<TakenBatch> out;
  TakenBatch t;
  while (b.Take(Any, 0, &t)) out.push_back(t);
  return out;
}

TEST(Batcher, ShortSegmentsFormBatchesFiveTimesLargerThanLongOnes) {
  BatcherOptions o;  // the defaults
  Batcher b(o);
  auto shorts = FullBatches(b, 1000, 2000, 1);
  auto longs = FullBatches(b, 200, 20000, 10000);
  ASSERT_FALSE(shorts.empty());
  ASSERT_FALSE(longs.empty());
  size_t short_size = shorts.front().ids.size(), long_size = longs.front().ids.size();
  EXPECT_GE(short_size, 5 * long_size) << short_size << " vs " << long_size;
  for (const auto& t : shorts) EXPECT_LE(t.padded_ms, static_cast<int64_t>(o.budget_s * 1000));
  for (const auto& t : longs) EXPECT_LE(t.padded_ms, static_cast<int64_t>(o.budget_s * 1000));
  // Whatever is left is partial and waits.
  EXPECT_EQ(b.size(), 1000 % short_size + 200 % long_size);
}

TEST(Batcher, PaddingOnAMixedSetIsAtMostFifteenPercent) {
  Batcher b;
  std::mt19937 rng(7);
  std::uniform_int_distribution<int64_t> len(300, 30000);
  int64_t audio = 0;
  for (uint64_t id = 1; id <= 3000; ++id) {
    int64_t ms = len(rng);
    audio += ms;
    b.Add(id, id % 3 ? "a" : "b", ms, 0);
  }
  int64_t padded = 0, taken = 0;
  TakenBatch t;
  // Everything leaves once max_delay has passed.
  while (b.Take(Any, 1000000, &t)) {
    padded += t.padded_ms;
    taken += t.audio_ms;
    for (uint64_t id : t.ids) EXPECT_EQ((id % 3 ? "a" : "b"), t.model) << "segments of two models mixed";
  }
  EXPECT_EQ(taken, audio);
  EXPECT_EQ(b.size(), 0u);
  double padding = 1.0 - static_cast<double>(audio) / padded;
  EXPECT_LE(padding, 0.15) << padding;
  EXPECT_GT(padding, 0.0);
}

TEST(Batcher, ALoneSegmentLeavesAtMaxDelay) {
  BatcherOptions o;
  o.max_delay_ms = 200;
  Batcher b(o);
  b.Add(1, "m", 3000, 1000);
  TakenBatch t;
  EXPECT_FALSE(b.Take(Any, 1000, &t));
  EXPECT_FALSE(b.Take(Any, 1199, &t));
  EXPECT_EQ(b.NextDue(), 1200);
  ASSERT_TRUE(b.Take(Any, 1200, &t));
  EXPECT_EQ(t.ids, std::vector<uint64_t>{1});
  EXPECT_FALSE(t.full);
  EXPECT_EQ(b.NextDue(), 0);
}

// A segment given back without an attempt comes back with its low id and a new time: the bucket
// is as old as its oldest segment, not as its lowest id (which held the others back for another
// max_delay, and ranked the bucket behind newer ones).
TEST(Batcher, ABucketIsAsOldAsItsOldestSegmentWhateverItsId) {
  BatcherOptions o;
  o.max_delay_ms = 1000;
  Batcher b(o);
  for (uint64_t id = 10; id < 20; ++id) b.Add(id, "m", 2000, 0);
  b.Add(5, "m", 2000, 1000);  // given back at t=1000
  EXPECT_EQ(b.NextDue(), 1000);
  TakenBatch t;
  ASSERT_TRUE(b.Take(Any, 1000, &t)) << "the segments waiting since t=0 are due at t=1000";
  EXPECT_EQ(t.ids.size(), 11u);
  // Ranking: of two due buckets, the one holding the segment that waited longest goes first.
  Batcher c(o);
  c.Add(1, "m", 60000, 500);   // a long segment's bucket: lowest id, waiting since t=500
  c.Add(30, "m", 2000, 0);     // a short one's bucket: waiting since t=0 ...
  c.Add(2, "m", 2000, 2000);   // ... with a lower id given back at t=2000
  ASSERT_TRUE(c.Take(Any, 3000, &t));
  EXPECT_EQ(t.ids, (std::vector<uint64_t>{2, 30}));
  c.Remove(1);
  EXPECT_EQ(c.size(), 0u);
  EXPECT_EQ(c.NextDue(), 0);
}

TEST(Batcher, OnlyModelsTheWorkerHolds) {
  Batcher b;
  b.Add(1, "en", 1000, 0);
  b.Add(2, "de", 1000, 0);
  TakenBatch t;
  ASSERT_TRUE(b.Take([](const std::string& m) { return m == "de"; }, 10000, &t));
  EXPECT_EQ(t.model, "de");
  EXPECT_EQ(t.ids, std::vector<uint64_t>{2});
  EXPECT_FALSE(b.Take([](const std::string& m) { return m == "de"; }, 10000, &t));
  EXPECT_EQ(b.QueuedByModel().at("en"), 1u);
}

TEST(Batcher, SegmentsOfSimilarLengthShareABatchAcrossArrivalOrder) {
  Batcher b;
  // Interleaved short and long segments: batches come out homogeneous.
  for (uint64_t id = 1; id <= 200; ++id) b.Add(id, "m", id % 2 ? 2000 : 25000, 0);
  TakenBatch t;
  while (b.Take(Any, 1000000, &t)) {
    int64_t lo = INT64_MAX, hi = 0;
    for (uint64_t id : t.ids) {
      int64_t ms = id % 2 ? 2000 : 25000;
      lo = std::min(lo, ms);
      hi = std::max(hi, ms);
    }
    EXPECT_EQ(lo, hi);
  }
}

TEST(Batcher, ASegmentThatLostAnAttemptLeavesAlone) {
  Batcher b;
  for (uint64_t id = 1; id <= 10; ++id) b.Add(id, "m", 2000, 0, /*solo=*/id == 4);
  TakenBatch t;
  std::vector<size_t> sizes;
  bool four_alone = false;
  while (b.Take(Any, 1000000, &t)) {
    sizes.push_back(t.ids.size());
    if (std::find(t.ids.begin(), t.ids.end(), 4u) != t.ids.end()) four_alone = t.ids.size() == 1;
  }
  EXPECT_TRUE(four_alone);
  EXPECT_EQ(sizes.size(), 2u);
}

TEST(Batcher, RemovedSegmentsNeverLeave) {
  Batcher b;
  for (uint64_t id = 1; id <= 10; ++id) b.Add(id, "m", 1000, 0);
  EXPECT_TRUE(b.Remove(3));
  EXPECT_FALSE(b.Remove(3));
  TakenBatch t;
  ASSERT_TRUE(b.Take(Any, 1000000, &t));
  EXPECT_EQ(t.ids.size(), 9u);
  for (uint64_t id : t.ids) EXPECT_NE(id, 3u);
}

}  // namespace
}  // namespace asrf
