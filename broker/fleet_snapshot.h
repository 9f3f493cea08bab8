// FleetSnapshot: what the broker's HTTP endpoints show, copied from the poll thread's state every
// half second so the HTTP thread never touches that state (nor waits for the poll thread).
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace asrf {

struct FleetSnapshot {
  int64_t taken_ms = 0;  // wall clock
  std::array<int64_t, 6> counts{};                         // by state, as proto::JobState
  std::map<std::string, std::array<int64_t, 6>> by_kind;   // by kind, then state
  std::array<uint64_t, 6> finished_total{};                // terminal transitions since start, by state
  uint64_t submitted_total = 0;                            // jobs accepted since start
  double oldest_queued_s = 0;
  int64_t leases = 0;
  double jobs_per_s = 0;                                   // finished jobs per second, last 10 s
  struct Worker {
    std::string id, host, device;
    uint32_t slots = 0, running = 0;
    bool draining = false;
    int64_t gpu_mem_bytes = 0;
    int64_t outbox_results = 0;
    int64_t idle_ms = 0;
    std::vector<uint64_t> jobs;  // current leases (up to 8)
  };
  std::vector<Worker> workers;
  struct Failure {
    uint64_t id = 0;
    std::string kind, state, error;
    int64_t finished_ms = 0;
  };
  std::vector<Failure> recent_failures;  // newest first, up to 20
  struct Point {
    int64_t t_ms = 0;
    int64_t queued = 0, leased = 0;
    double jobs_per_s = 0;
  };
  std::vector<Point> history;  // one point per 2 s, last 10 minutes
  // Batching and speech figures (fed by transcription; registered at 0 until then).
  double batch_fill_ratio = 0, padding_ratio = 0, audio_seconds_total = 0, audio_seconds_per_s = 0;
  std::map<std::string, double> rtfx_by_model;
  // Journal and PostgreSQL.
  bool journal_ok = true;
  uint64_t journal_syncs = 0, journal_errors = 0;
  bool pg_configured = false, pg_up = false;
  uint64_t event_backlog = 0;
};

// Holds the newest snapshot. Thread-safe.
class SnapshotHolder {
 public:
  void Set(std::shared_ptr<const FleetSnapshot> s) {
    std::lock_guard<std::mutex> lock(mu_);
    snap_ = std::move(s);
  }
  std::shared_ptr<const FleetSnapshot> Get() const {
    std::lock_guard<std::mutex> lock(mu_);
    return snap_;
  }

 private:
  mutable std::mutex mu_;
  std::shared_ptr<const FleetSnapshot> snap_ = std::make_shared<FleetSnapshot>();
};

// Renders the Prometheus text exposition of a snapshot. Every metric family is always present.
std::string RenderMetrics(const FleetSnapshot& s);
// The snapshot as JSON for the status page.
std::string RenderStatusJson(const FleetSnapshot& s);
// Ready: the journal writes, and PostgreSQL (when configured) is reachable or its backlog is
// bounded. Sets *why when not ready.
bool IsReady(const FleetSnapshot& s, std::string* why);

}  // namespace asrf
