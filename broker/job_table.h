// JobTable: every job the broker knows, its state, and the queues that order the runnable ones.
// Pure in-memory bookkeeping with no I/O, driven by the broker's poll thread (not thread-safe).
//
// Order: higher priority first, then lower job id (submission order) within a priority.
// A job requeued with backoff waits in `delayed` until its not_before time.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "broker/batcher.h"
#include "schema/protocol.h"

namespace asrf {

using proto::JobState;

struct Job {
  uint64_t id = 0;
  std::string batch;
  std::string kind;
  std::string payload;
  int32_t priority = 0;
  int64_t timeout_ms = 0;
  int64_t submitted_ms = 0;  // wall
  JobState state = JobState::kQueued;
  uint32_t attempts = 0;     // attempts counted: started and then lost, or timed out
  std::string error;         // last error
  std::string result;
  bool result_dropped = false;  // retention ended
  int64_t finished_ms = 0;   // wall
  int64_t started_ms = 0;    // wall, of the current or last attempt
  int64_t run_ms = 0;
  std::string worker;        // current or last worker id
  std::string progress;      // last PROGRESS info (JSON)
  // Lease, valid while state == kLeased.
  uint64_t epoch = 0;
  bool started = false;
  bool finishing = false;    // a terminal record is being journaled
  int64_t deadline_mono = 0; // per-job timeout deadline once started; 0 = none
  int64_t leased_mono = 0;   // when the current lease was handed out
  int64_t not_before_mono = 0;
  // Batched kinds (transcription segments): the model asked for, the audio length, and the
  // batch (ASSIGN group) of the current lease.
  std::string model;
  int64_t audio_ms = 0;
  uint64_t group = 0;
  // Gang members (world_size > 1): queued in their gang, placed all at once.
  std::string gang;
  uint32_t rank = 0;
  uint32_t world_size = 1;
};

inline bool IsGangMember(const Job& j) { return j.world_size > 1 && !j.gang.empty(); }

// Jobs of this kind are queued in the Batcher (per model, by audio length), not in the ready
// queues, and leave in batches.
inline bool IsBatched(const Job& j) { return j.kind == proto::kTranscribeKind; }

class JobTable {
 public:
  explicit JobTable(BatcherOptions batching = {}) : batcher_(batching) {}
  // REQUIRES: nothing queued yet.
  void SetBatching(BatcherOptions batching) { batcher_ = Batcher(batching); }
  // The poll loop's current monotonic time: when batched jobs became runnable.
  void SetNow(int64_t now_mono) { now_mono_ = now_mono; }

  using Counts = std::array<int64_t, proto::kNumStates>;

  // Adds a job in its current state; queued jobs go to the ready (or delayed) queue.
  // REQUIRES: no job with this id exists.
  Job& Add(Job job);
  Job* Find(uint64_t id);
  const std::map<uint64_t, Job>& all() const { return jobs_; }

  // Moves a job to a new state, keeping counts and queues right. A job moved to kQueued is
  // runnable at not_before_mono (0 = now).
  void SetState(Job& job, JobState s, int64_t not_before_mono = 0);

  // Takes a queued job out of the ready/delayed queues without changing its state (a job whose
  // terminal record is being written must not be dispatched). SetState(kQueued) puts it back.
  void Unqueue(Job& job);

  // Moves delayed jobs whose time has come to the ready queues. Returns the next wake-up time
  // (0 when nothing is delayed).
  int64_t Promote(int64_t now_mono);

  // Takes the best runnable job among `kinds` (any kind when kinds is empty); 0 when none.
  uint64_t PopReady(const std::unordered_set<std::string>& kinds);
  bool HasReady() const { return ready_count_ > 0 || batcher_.size() > 0 || !gang_ready_.empty(); }
  // Takes a batch of batched jobs that may leave now (see Batcher::Take).
  bool TakeBatch(const std::function<bool(const std::string&)>& model_ok, TakenBatch* out) {
    return batcher_.Take(model_ok, now_mono_, out);
  }
  const Batcher& batcher() const { return batcher_; }
  // Gangs whose every member is queued and runnable, oldest first, with their members by rank.
  std::vector<std::vector<uint64_t>> ReadyGangs() const;
  // Gangs with queued members that can never run whole again, because another member ended
  // `done` (one rank reported its end before another was lost): name -> those queued members.
  std::vector<std::pair<std::string, std::vector<uint64_t>>> StrandedGangs() const;
  // Removes a finished job for good (counts, its gang; its batch's counts keep it until the whole
  // batch is forgotten). REQUIRES: terminal, not queued.
  void Forget(uint64_t id);
  // Every member of a gang (any state), by rank.
  std::vector<uint64_t> GangMembers(const std::string& gang) const;
  // Kinds with runnable jobs.
  std::vector<std::string> ReadyKinds() const;

  const Counts& counts() const { return counts_; }
  const std::unordered_map<std::string, Counts>& kind_counts() const { return kind_counts_; }
  // The oldest queued job (lowest id, ids grow with time); 0 when none is queued.
  uint64_t OldestQueued() const {
    const auto& q = ids_by_state_[static_cast<int>(JobState::kQueued)];
    return q.empty() ? 0 : *q.begin();
  }
  // The ids of the jobs in state `s`, ascending; null for kDone (not indexed: done jobs are the
  // bulk of the table, where a scan finds them at once).
  const std::set<uint64_t>* IdsInState(JobState s) const {
    return s == JobState::kDone ? nullptr : &ids_by_state_[static_cast<int>(s)];
  }
  Counts BatchCounts(const std::string& batch) const;
  const std::vector<uint64_t>* BatchJobs(const std::string& batch) const;

 private:
  using Key = std::pair<int64_t, uint64_t>;  // (-priority, id)
  std::map<uint64_t, Job> jobs_;
  // Puts a queued, runnable job in its ready queue (or the batcher).
  void MakeReady(Job& j);

  Batcher batcher_;
  int64_t now_mono_ = 0;
  struct GangInfo {
    uint32_t world_size = 0;
    std::map<uint32_t, uint64_t> members;  // rank -> job id
  };
  std::map<std::string, GangInfo> gangs_;
  std::map<std::string, std::set<uint64_t>> gang_ready_;  // runnable queued members per gang
  std::unordered_map<std::string, std::set<Key>> ready_;  // per kind
  std::set<std::pair<int64_t, uint64_t>> delayed_;       // (not_before, id)
  size_t ready_count_ = 0;
  Counts counts_{};
  std::unordered_map<std::string, Counts> kind_counts_;
  // Ids by state, every state but kDone (IdsInState): a JOBS request for the few dead jobs among
  // millions of done ones is answered without a scan of the poll thread's whole table.
  std::array<std::set<uint64_t>, proto::kNumStates> ids_by_state_;
  void Index(uint64_t id, JobState s) {
    if (s != JobState::kDone) ids_by_state_[static_cast<int>(s)].insert(id);
  }
  void Unindex(uint64_t id, JobState s) {
    if (s != JobState::kDone) ids_by_state_[static_cast<int>(s)].erase(id);
  }
  struct BatchInfo {
    std::vector<uint64_t> ids;  // may hold forgotten ids until compacted
    Counts counts{};
    size_t forgotten = 0;
  };
  std::unordered_map<std::string, BatchInfo> batches_;
};

}  // namespace asrf
