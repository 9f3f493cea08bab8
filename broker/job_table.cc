#include "broker/job_table.h"

#include <algorithm>

namespace asrf {

Job& JobTable::Add(Job job) {
  uint64_t id = job.id;
  JobState s = job.state;
  int64_t nb = job.not_before_mono;
  auto [it, inserted] = jobs_.emplace(id, std::move(job));
  Job& j = it->second;
  if (IsGangMember(j)) {
    GangInfo& g = gangs_[j.gang];
    g.world_size = j.world_size;
    g.members[j.rank] = id;
  }
  BatchInfo& b = batches_[j.batch];
  b.ids.push_back(id);
  // Counted in its state; enter the queues through SetState's path.
  counts_[static_cast<int>(s)]++;
  b.counts[static_cast<int>(s)]++;
  kind_counts_[j.kind][static_cast<int>(s)]++;
  Index(id, s);
  if (s == JobState::kQueued) {
    if (nb > 0) {
      delayed_.insert({nb, id});
    } else {
      MakeReady(j);
    }
  }
  return j;
}

void JobTable::MakeReady(Job& j) {
  if (IsGangMember(j)) {
    gang_ready_[j.gang].insert(j.id);
    return;
  }
  if (IsBatched(j)) {
    batcher_.Add(j.id, j.model.empty() ? proto::kDefaultModel : j.model, j.audio_ms, now_mono_, j.attempts > 0);
    return;
  }
  ready_[j.kind].insert({-static_cast<int64_t>(j.priority), j.id});
  ready_count_++;
}

Job* JobTable::Find(uint64_t id) {
  auto it = jobs_.find(id);
  return it == jobs_.end() ? nullptr : &it->second;
}

void JobTable::Unqueue(Job& job) {
  if (job.state != JobState::kQueued) return;
  if (IsBatched(job) && batcher_.Remove(job.id)) return;
  if (IsGangMember(job)) {
    auto g = gang_ready_.find(job.gang);
    if (g != gang_ready_.end() && g->second.erase(job.id)) {
      if (g->second.empty()) gang_ready_.erase(g);
      return;
    }
  }
  auto r = ready_.find(job.kind);
  if (r != ready_.end() && r->second.erase({-static_cast<int64_t>(job.priority), job.id}) > 0) {
    if (r->second.empty()) ready_.erase(r);
    ready_count_--;
    return;
  }
  delayed_.erase({job.not_before_mono, job.id});
}

void JobTable::SetState(Job& job, JobState s, int64_t not_before_mono) {
  Unqueue(job);
  counts_[static_cast<int>(job.state)]--;
  counts_[static_cast<int>(s)]++;
  auto& kc = kind_counts_[job.kind];
  kc[static_cast<int>(job.state)]--;
  kc[static_cast<int>(s)]++;
  Unindex(job.id, job.state);
  Index(job.id, s);
  auto b = batches_.find(job.batch);
  if (b != batches_.end()) {
    b->second.counts[static_cast<int>(job.state)]--;
    b->second.counts[static_cast<int>(s)]++;
  }
  job.state = s;
  job.not_before_mono = 0;
  if (s == JobState::kQueued) {
    if (not_before_mono > 0) {
      job.not_before_mono = not_before_mono;
      delayed_.insert({not_before_mono, job.id});
    } else {
      MakeReady(job);
    }
  }
}

int64_t JobTable::Promote(int64_t now_mono) {
  while (!delayed_.empty() && delayed_.begin()->first <= now_mono) {
    uint64_t id = delayed_.begin()->second;
    delayed_.erase(delayed_.begin());
    Job* j = Find(id);
    if (!j) continue;
    j->not_before_mono = 0;
    MakeReady(*j);
  }
  return delayed_.empty() ? 0 : delayed_.begin()->first;
}

uint64_t JobTable::PopReady(const std::unordered_set<std::string>& kinds) {
  // Kinds without runnable jobs are not kept (see Unqueue), so this scans only kinds with work.
  auto best = ready_.end();
  for (auto it = ready_.begin(); it != ready_.end(); ++it) {
    if (!kinds.empty() && !kinds.count(it->first)) continue;
    if (best == ready_.end() || *it->second.begin() < *best->second.begin()) best = it;
  }
  if (best == ready_.end()) return 0;
  uint64_t id = best->second.begin()->second;
  best->second.erase(best->second.begin());
  if (best->second.empty()) ready_.erase(best);
  ready_count_--;
  return id;
}

std::vector<std::string> JobTable::ReadyKinds() const {
  std::vector<std::string> out;
  for (const auto& [kind, set] : ready_) if (!set.empty()) out.push_back(kind);
  return out;
}

std::vector<std::vector<uint64_t>> JobTable::ReadyGangs() const {
  std::vector<std::vector<uint64_t>> out;
  for (const auto& [name, ready] : gang_ready_) {
    auto g = gangs_.find(name);
    if (g == gangs_.end() || ready.size() < g->second.world_size || g->second.members.size() < g->second.world_size) {
      continue;
    }
    std::vector<uint64_t> ids;
    for (const auto& [rank, id] : g->second.members) ids.push_back(id);
    out.push_back(std::move(ids));
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) {
    return *std::min_element(a.begin(), a.end()) < *std::min_element(b.begin(), b.end());
  });
  return out;
}

std::vector<std::pair<std::string, std::vector<uint64_t>>> JobTable::StrandedGangs() const {
  std::vector<std::pair<std::string, std::vector<uint64_t>>> out;
  for (const auto& [name, ready] : gang_ready_) {
    auto g = gangs_.find(name);
    if (g == gangs_.end()) continue;
    bool ended = false;
    for (const auto& [rank, id] : g->second.members) {
      auto j = jobs_.find(id);
      if (j != jobs_.end() && j->second.state == JobState::kDone) ended = true;
    }
    if (ended) out.push_back({name, std::vector<uint64_t>(ready.begin(), ready.end())});
  }
  return out;
}

void JobTable::Forget(uint64_t id) {
  auto it = jobs_.find(id);
  if (it == jobs_.end()) return;
  const Job& j = it->second;
  const int s = static_cast<int>(j.state);
  counts_[s]--;
  if (auto k = kind_counts_.find(j.kind); k != kind_counts_.end()) {
    k->second[s]--;
    if (std::all_of(k->second.begin(), k->second.end(), [](int64_t n) { return n == 0; })) kind_counts_.erase(k);
  }
  if (IsGangMember(j)) {
    if (auto g = gangs_.find(j.gang); g != gangs_.end()) {
      g->second.members.erase(j.rank);
      if (g->second.members.empty()) gangs_.erase(g);
    }
  }
  Unindex(id, j.state);
  std::string batch = j.batch;
  jobs_.erase(it);
  // A batch's counts keep its forgotten jobs (in their final states) until every job of it is
  // forgotten and the batch with them: a client following it sees its total never shrink.
  if (auto b = batches_.find(batch); b != batches_.end()) {
    if (++b->second.forgotten >= b->second.ids.size()) {
      batches_.erase(b);
    } else if (b->second.forgotten * 2 > b->second.ids.size()) {
      auto& ids = b->second.ids;
      ids.erase(std::remove_if(ids.begin(), ids.end(), [this](uint64_t x) { return !jobs_.count(x); }), ids.end());
      b->second.forgotten = 0;
    }
  }
}

std::vector<uint64_t> JobTable::GangMembers(const std::string& gang) const {
  std::vector<uint64_t> ids;
  auto g = gangs_.find(gang);
  if (g != gangs_.end()) for (const auto& [rank, id] : g->second.members) ids.push_back(id);
  return ids;
}

JobTable::Counts JobTable::BatchCounts(const std::string& batch) const {
  auto it = batches_.find(batch);
  return it == batches_.end() ? Counts{} : it->second.counts;
}

const std::vector<uint64_t>* JobTable::BatchJobs(const std::string& batch) const {
  auto it = batches_.find(batch);
  return it == batches_.end() ? nullptr : &it->second.ids;
}

}  // namespace asrf
