#include "broker/batcher.h"

#include <algorithm>
#include <cmath>

namespace asrf {

int Batcher::BucketOf(int64_t audio_ms) const {
  if (audio_ms <= opt_.min_bucket_ms) return 0;
  double r = std::max(opt_.bucket_ratio, 1.01);
  return 1 + static_cast<int>(std::floor(std::log(static_cast<double>(audio_ms) / opt_.min_bucket_ms) / std::log(r)));
}

void Batcher::Add(uint64_t id, const std::string& model, int64_t audio_ms, int64_t now_ms, bool solo) {
  // Solo segments get a bucket of their own (negative, unique per id).
  int bucket = solo ? -1 - static_cast<int>(id % 0x3fffffff) : BucketOf(audio_ms);
  Item it{model, bucket, std::max<int64_t>(audio_ms, 0), now_ms};
  buckets_[{model, it.bucket}].insert(id);
  since_[{model, it.bucket}].insert(it.since_ms);
  items_.emplace(id, std::move(it));
}

bool Batcher::Remove(uint64_t id) {
  auto it = items_.find(id);
  if (it == items_.end()) return false;
  const BucketKey key{it->second.model, it->second.bucket};
  auto b = buckets_.find(key);
  if (b != buckets_.end()) {
    b->second.erase(id);
    if (b->second.empty()) buckets_.erase(b);
  }
  if (auto s = since_.find(key); s != since_.end()) {
    if (auto one = s->second.find(it->second.since_ms); one != s->second.end()) s->second.erase(one);
    if (s->second.empty()) since_.erase(s);
  }
  items_.erase(it);
  return true;
}

TakenBatch Batcher::Plan(const BucketKey& key, const std::set<uint64_t>& ids, bool* full) const {
  TakenBatch t;
  t.model = key.first;
  int64_t budget_ms = static_cast<int64_t>(opt_.budget_s * 1000);
  int64_t longest = 0;
  *full = false;
  for (uint64_t id : ids) {
    const Item& item = items_.at(id);
    int64_t l = std::max(longest, item.audio_ms);
    int64_t n = static_cast<int64_t>(t.ids.size()) + 1;
    if (!t.ids.empty() && l * n > budget_ms) {
      *full = true;
      break;
    }
    longest = l;
    t.ids.push_back(id);
    t.audio_ms += item.audio_ms;
    if (static_cast<int>(t.ids.size()) >= opt_.max_items || longest * n >= budget_ms) {
      *full = true;
      break;
    }
  }
  t.padded_ms = longest * static_cast<int64_t>(t.ids.size());
  t.full = *full;
  return t;
}

bool Batcher::Take(const std::function<bool(const std::string&)>& model_ok, int64_t now_ms, TakenBatch* out) {
  const BucketKey* best = nullptr;
  TakenBatch best_plan;
  uint64_t best_oldest = 0;
  int64_t best_since = 0;
  bool best_full = false;
  for (const auto& [key, ids] : buckets_) {
    if (ids.empty() || !model_ok(key.first)) continue;
    bool full = false;
    TakenBatch plan = Plan(key, ids, &full);
    // The bucket's oldest segment sets its age (§8.5), whatever its id.
    const int64_t since = OldestSince(key);
    bool due = full || now_ms - since >= opt_.max_delay_ms;
    if (!due) continue;
    // Full batches first; among equals, the one holding the oldest segment.
    // A partial batch that has waited 5x max_delay counts as full, so the tails of files in
    // sparse buckets are not starved by a backlog that keeps other buckets full.
    full = full || now_ms - since >= 5 * std::max<int64_t>(opt_.max_delay_ms, 1);
    bool better = !best || (full && !best_full) ||
                  (full == best_full && (since < best_since || (since == best_since && *ids.begin() < best_oldest)));
    if (better) {
      best = &key;
      best_full = full;
      best_plan = std::move(plan);
      best_oldest = *ids.begin();
      best_since = since;
    }
  }
  if (!best) return false;
  for (uint64_t id : best_plan.ids) Remove(id);
  *out = std::move(best_plan);
  return true;
}

int64_t Batcher::NextDue() const {
  int64_t next = 0;
  for (const auto& [key, ids] : buckets_) {
    if (ids.empty()) continue;
    int64_t due = OldestSince(key) + opt_.max_delay_ms;
    if (next == 0 || due < next) next = due;
  }
  return next;
}

std::map<std::string, size_t> Batcher::QueuedByModel() const {
  std::map<std::string, size_t> out;
  for (const auto& [key, ids] : buckets_) out[key.first] += ids.size();
  return out;
}

}  // namespace asrf
