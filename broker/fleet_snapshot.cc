#include "broker/fleet_snapshot.h"

#include <charconv>
#include <cmath>
#include <cstdio>
#include <sstream>

#include <nlohmann/json.hpp>

#include "common/pg.h"

namespace asrf {

namespace {

const char* const kStates[6] = {"queued", "leased", "done", "failed", "dead", "cancelled"};

// A label value in the exposition format: valid UTF-8 (peers name kinds, devices and models, and
// one invalid byte would make Prometheus refuse the whole scrape), \, " and newline escaped.
std::string Label(const std::string& raw) {
  const std::string v = ValidUtf8(raw);
  std::string out;
  for (char c : v) {
    if (c == '\\' || c == '"') out.push_back('\\');
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    out.push_back(c);
  }
  return out;
}

// Whole numbers exactly (a counter of audio seconds passes a million within minutes on a GPU, and
// six significant digits turned its rate into a staircase); others in the fewest digits that read
// back as the same number.
std::string Num(double v) {
  char buf[64];
  if (std::isfinite(v) && v == std::trunc(v) && std::fabs(v) < 9.007199254740992e15) {
    std::snprintf(buf, sizeof(buf), "%.0f", v);
    return buf;
  }
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  auto r = std::to_chars(buf, buf + sizeof(buf), v);
  return std::string(buf, r.ptr);
}

class Writer {
 public:
  void Family(const char* name, const char* type, const char* help) {
    os_ << "# HELP " << name << " " << help << "\n# TYPE " << name << " " << type << "\n";
  }
  void Sample(const std::string& name, const std::string& labels, double v) {
    os_ << name;
    if (!labels.empty()) os_ << "{" << labels << "}";
    os_ << " " << Num(v) << "\n";
  }
  std::string str() const { return os_.str(); }

 private:
  std::ostringstream os_;
};

}  // namespace

std::string RenderMetrics(const FleetSnapshot& s) {
  Writer w;
  w.Family("asrf_jobs", "gauge", "Jobs the broker holds, by state (finished ones until --forget-after-s).");
  for (int i = 0; i < 6; ++i) w.Sample("asrf_jobs", std::string("state=\"") + kStates[i] + "\"", s.counts[i]);
  w.Family("asrf_jobs_by_kind", "gauge", "Jobs by kind and state.");
  for (const auto& [kind, c] : s.by_kind) {
    for (int i = 0; i < 6; ++i) {
      w.Sample("asrf_jobs_by_kind", "kind=\"" + Label(kind) + "\",state=\"" + kStates[i] + "\"", c[i]);
    }
  }
  w.Family("asrf_jobs_submitted_total", "counter", "Jobs accepted (durable) since the broker started.");
  w.Sample("asrf_jobs_submitted_total", "", static_cast<double>(s.submitted_total));
  w.Family("asrf_jobs_finished_total", "counter", "Jobs that reached a final state since the broker started.");
  for (int i = 2; i < 6; ++i) {
    w.Sample("asrf_jobs_finished_total", std::string("state=\"") + kStates[i] + "\"",
             static_cast<double>(s.finished_total[i]));
  }
  w.Family("asrf_jobs_per_second", "gauge", "Jobs finished per second over the last 10 seconds.");
  w.Sample("asrf_jobs_per_second", "", s.jobs_per_s);
  w.Family("asrf_oldest_queued_job_age_seconds", "gauge", "Age of the oldest queued job (0 when none).");
  w.Sample("asrf_oldest_queued_job_age_seconds", "", s.oldest_queued_s);
  w.Family("asrf_leases", "gauge", "Jobs leased to workers now.");
  w.Sample("asrf_leases", "", static_cast<double>(s.leases));
  std::map<std::string, int> by_device = {{"cpu", 0}};
  for (const auto& x : s.workers) by_device[x.device]++;
  w.Family("asrf_workers", "gauge", "Connected workers by device.");
  for (const auto& [d, n] : by_device) w.Sample("asrf_workers", "device=\"" + Label(d) + "\"", n);
  w.Family("asrf_worker_slots", "gauge", "Slots (credits) each worker offers.");
  for (const auto& x : s.workers) w.Sample("asrf_worker_slots", "worker=\"" + Label(x.id) + "\"", x.slots);
  w.Family("asrf_worker_running", "gauge", "Jobs each worker runs now.");
  for (const auto& x : s.workers) w.Sample("asrf_worker_running", "worker=\"" + Label(x.id) + "\"", x.running);
  w.Family("asrf_worker_outbox_results", "gauge", "Results waiting in a worker's outbox for PostgreSQL.");
  for (const auto& x : s.workers) {
    w.Sample("asrf_worker_outbox_results", "worker=\"" + Label(x.id) + "\"", static_cast<double>(x.outbox_results));
  }
  w.Family("asrf_worker_gpu_memory_bytes", "gauge", "GPU memory a worker uses (0 on CPU).");
  for (const auto& x : s.workers) {
    w.Sample("asrf_worker_gpu_memory_bytes", "worker=\"" + Label(x.id) + "\"", static_cast<double>(x.gpu_mem_bytes));
  }
  w.Family("asrf_batch_fill_ratio", "gauge", "Audio seconds in recent batches over their budget.");
  w.Sample("asrf_batch_fill_ratio", "", s.batch_fill_ratio);
  w.Family("asrf_batch_padding_ratio", "gauge", "Padding over total audio in recent batches.");
  w.Sample("asrf_batch_padding_ratio", "", s.padding_ratio);
  w.Family("asrf_audio_seconds_total", "counter", "Audio seconds transcribed since the broker started.");
  w.Sample("asrf_audio_seconds_total", "", s.audio_seconds_total);
  w.Family("asrf_audio_seconds_per_second", "gauge", "Audio seconds transcribed per second, last 10 seconds.");
  w.Sample("asrf_audio_seconds_per_second", "", s.audio_seconds_per_s);
  w.Family("asrf_rtfx", "gauge", "Real-time factor (audio seconds per processing second) by model.");
  if (s.rtfx_by_model.empty()) w.Sample("asrf_rtfx", "model=\"default\"", 0);
  for (const auto& [m, v] : s.rtfx_by_model) w.Sample("asrf_rtfx", "model=\"" + Label(m) + "\"", v);
  w.Family("asrf_journal_ok", "gauge", "1 while the journal's last write succeeded.");
  w.Sample("asrf_journal_ok", "", s.journal_ok ? 1 : 0);
  w.Family("asrf_journal_syncs_total", "counter", "Synced journal writes (group commits).");
  w.Sample("asrf_journal_syncs_total", "", static_cast<double>(s.journal_syncs));
  w.Family("asrf_journal_errors_total", "counter", "Failed journal writes.");
  w.Sample("asrf_journal_errors_total", "", static_cast<double>(s.journal_errors));
  w.Family("asrf_postgres_up", "gauge", "1 when the broker's job-history sink is connected (0 also when not configured).");
  w.Sample("asrf_postgres_up", "", s.pg_up ? 1 : 0);
  w.Family("asrf_event_sink_lag_records", "gauge", "Job-history records waiting in the journal for PostgreSQL.");
  w.Sample("asrf_event_sink_lag_records", "", static_cast<double>(s.event_backlog));
  return w.str();
}

std::string RenderStatusJson(const FleetSnapshot& s) {
  using json = nlohmann::json;
  json counts = json::object();
  for (int i = 0; i < 6; ++i) counts[kStates[i]] = s.counts[i];
  json workers = json::array();
  for (const auto& x : s.workers) {
    workers.push_back({{"id", x.id}, {"host", x.host}, {"device", x.device}, {"slots", x.slots},
                       {"running", x.running}, {"draining", x.draining}, {"gpu_mem_bytes", x.gpu_mem_bytes},
                       {"outbox_results", x.outbox_results}, {"idle_ms", x.idle_ms}, {"jobs", x.jobs}});
  }
  json failures = json::array();
  for (const auto& f : s.recent_failures) {
    failures.push_back({{"id", f.id}, {"kind", f.kind}, {"state", f.state}, {"error", f.error},
                        {"finished_ms", f.finished_ms}});
  }
  json history = json::array();
  for (const auto& p : s.history) {
    history.push_back({{"t_ms", p.t_ms}, {"queued", p.queued}, {"leased", p.leased}, {"jobs_per_s", p.jobs_per_s}});
  }
  json j = {{"taken_ms", s.taken_ms},       {"counts", counts},
            {"jobs_per_s", s.jobs_per_s},   {"oldest_queued_s", s.oldest_queued_s},
            {"leases", s.leases},           {"workers", workers},
            {"recent_failures", failures},  {"history", history},
            {"pg_configured", s.pg_configured}, {"pg_up", s.pg_up},
            {"event_backlog", s.event_backlog}, {"journal_ok", s.journal_ok}};
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

bool IsReady(const FleetSnapshot& s, std::string* why) {
  if (!s.journal_ok) {
    *why = "the journal's last write failed";
    return false;
  }
  // The backlog is counted up to 1,000,000 (counting costs a journal scan every 2 s): reaching
  // that count is the limit.
  if (s.pg_configured && !s.pg_up && s.event_backlog >= 1000000) {
    *why = "PostgreSQL is unreachable and the job-history backlog has reached 1,000,000 records";
    return false;
  }
  return true;
}

}  // namespace asrf
