// Batcher: queued jobs of batched kinds (transcription segments) grouped per model by audio
// length. Pure bookkeeping with an explicit clock, driven by the broker's poll thread (not
// thread-safe).
//
// Segments of similar duration share a length bucket (bucket edges grow geometrically by
// `bucket_ratio`, so padding inside a batch stays small). A batch is taken from one bucket, oldest
// segments first, up to `budget_s` padded audio seconds (items x longest item) and `max_items`;
// it leaves at once when full, or when its oldest segment has waited `max_delay_ms`. Segments of
// different files share batches; priorities do not reorder segments within a model.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

namespace asrf {

struct BatcherOptions {
  double budget_s = 640;        // padded audio seconds per batch
  int max_items = 256;          // segments per batch
  int64_t max_delay_ms = 200;   // a partial batch leaves once its oldest segment waited this long
  double bucket_ratio = 1.15;   // longest / shortest segment a bucket admits
  int64_t min_bucket_ms = 500;  // segments shorter than this share the first bucket
};

struct TakenBatch {
  std::string model;
  std::vector<uint64_t> ids;
  int64_t audio_ms = 0;   // sum of the segments' lengths
  int64_t padded_ms = 0;  // items x longest
  bool full = false;      // left because it was full (not because of max_delay)
};

class Batcher {
 public:
  explicit Batcher(BatcherOptions options = {}) : opt_(options) {}

  // REQUIRES: id not present. `now_ms` is when the segment became runnable. A `solo` segment
  // (one that already lost an attempt) leaves alone, so a segment that kills its worker or its
  // batch cannot take other segments down with it again.
  void Add(uint64_t id, const std::string& model, int64_t audio_ms, int64_t now_ms, bool solo = false);
  // Returns false when the id is not queued here.
  bool Remove(uint64_t id);

  // Takes the best batch that may leave at `now_ms` among models accepted by `model_ok`: a full
  // batch first, else the one whose oldest segment is the oldest past max_delay. Returns false
  // when none may leave yet.
  bool Take(const std::function<bool(const std::string&)>& model_ok, int64_t now_ms, TakenBatch* out);

  // The earliest time a partial batch becomes due (0 when nothing is queued).
  int64_t NextDue() const;
  size_t size() const { return items_.size(); }
  // Models with queued segments and how many.
  std::map<std::string, size_t> QueuedByModel() const;
  const BatcherOptions& options() const { return opt_; }

 private:
  struct Item {
    std::string model;
    int bucket = 0;
    int64_t audio_ms = 0;
    int64_t since_ms = 0;
  };
  using BucketKey = std::pair<std::string, int>;  // (model, bucket)
  int BucketOf(int64_t audio_ms) const;
  // The batch the bucket would give now (ids in FIFO order); sets *full.
  TakenBatch Plan(const BucketKey& key, const std::set<uint64_t>& ids, bool* full) const;

  BatcherOptions opt_;
  std::unordered_map<uint64_t, Item> items_;
  std::map<BucketKey, std::set<uint64_t>> buckets_;  // ids grow with submission: set order = FIFO
  // When each bucket's segments became runnable: its oldest is not always its lowest id (a
  // segment given back without an attempt comes back with a low id and a new time).
  std::map<BucketKey, std::multiset<int64_t>> since_;
  int64_t OldestSince(const BucketKey& key) const { return *since_.at(key).begin(); }
};

}  // namespace asrf
