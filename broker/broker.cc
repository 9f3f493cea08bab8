#include "broker/broker.h"

#include <unistd.h>

#include <algorithm>
#include <deque>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <unordered_map>
#include <unordered_set>

#include <zmq.hpp>

#include "broker/event_sink.h"
#include "broker/fleet_snapshot.h"
#include "broker/http_server.h"
#include "broker/job_table.h"
#include "broker/journal.h"
#include "broker/records.h"
#include "common/clock.h"
#include "common/log.h"
#include "common/pg.h"
#include "schema/protocol.h"

namespace asrf {

using proto::Cmd;
namespace rec = records;

Status BrokerOptions::Sanitize() {
  if (listen.empty()) return Status::Invalid("--listen must not be empty");
  if (state_dir.empty()) return Status::Invalid("--state-dir must not be empty");
  if (endpoint_file.empty()) endpoint_file = state_dir + "/broker.endpoint";
  ClampOption("--max-attempts", &max_attempts, 1, 1000);
  ClampOption<int64_t>("--heartbeat-ms", &heartbeat_ms, 50, 60000);
  ClampOption("--heartbeat-misses", &heartbeat_misses, 1, 100);
  ClampOption<int64_t>("--pg-statement-timeout-ms", &pg_statement_timeout_ms, 100, 3600000);
  ClampOption<int64_t>("--backoff-ms", &backoff_ms, 0, 3600000);
  backoff_max_ms = std::max(backoff_max_ms, backoff_ms);
  constexpr int64_t kCentury = 100ll * 365 * 24 * 3600;  // seconds; more would overflow as ms
  ClampOption<int64_t>("--result-retention-s", &result_retention_s, 0, kCentury);
  if (forget_after_s < 0) forget_after_s = pg.empty() ? 0 : 3 * 24 * 3600;
  forget_after_s = forget_after_s == 0 ? 0 : std::clamp<int64_t>(forget_after_s, result_retention_s, kCentury);
  ClampOption<int64_t>("watch_max_ms", &watch_max_ms, 1000, 3600000);
  ClampOption("--batch-budget-s", &batch_budget_s, 1.0, 1000.0);  // 1,000 s of PCM is 32 MB: one message
  ClampOption("--batch-max-items", &batch_max_items, 1, 1000);
  ClampOption<int64_t>("--batch-max-delay-ms", &batch_max_delay_ms, 0, 600000);
  ClampOption("--gang-port-base", &gang_port_base, 1024, 64000);
  ClampOption("--max-messages-per-wake", &max_messages_per_wake, 1, 100000);
  return Status::Ok();
}

namespace {

constexpr const char* kSinkBusy =
    "PostgreSQL is slow to answer and too many requests for it wait already; try again shortly";

struct WorkerConn {
  std::string id;
  std::string routing;
  std::string host;
  std::string device;
  std::string gpu;  // READY's GPU UUID (cuda workers)
  bool gangs = true;  // READY: it can be a gang rank on its device
  uint32_t slots = 1;
  bool draining = false;
  std::unordered_set<std::string> kinds;
  std::vector<std::string> models;      // models it holds; the first is its default
  std::unordered_set<uint64_t> leases;  // job ids
  // Batches (ASSIGN groups) it runs: group -> leases left. A batch takes one slot.
  std::unordered_map<uint64_t, uint32_t> groups;
  size_t grouped_leases = 0;
  size_t UsedSlots() const { return leases.size() - grouped_leases + groups.size(); }
  bool HasModel(const std::string& m) const {
    if (!kinds.empty() && !kinds.count(proto::kTranscribeKind)) return false;
    if (m == proto::kDefaultModel) return !models.empty();
    return std::find(models.begin(), models.end(), m) != models.end();
  }
  int64_t last_seen = 0;
  int64_t heartbeat_ms = 0;  // READY: the worker's interval (0: not said)
  std::string instance;      // READY: its process's random token (empty: not said)
  int64_t gpu_mem_bytes = 0;
  int64_t outbox_results = 0;
};

bool IsGpuWorker(const WorkerConn& w) { return w.device.rfind("cuda", 0) == 0; }

// The workers of `pool` that can be ranks of one gang together, sorted by id: on the CPU, or on
// GPUs with one worker per GPU (told apart by READY's gpu UUID, else by host and device).
std::vector<WorkerConn*> GangCandidates(const std::vector<WorkerConn*>& pool, bool on_gpu) {
  std::vector<WorkerConn*> out;
  for (WorkerConn* w : pool) if (IsGpuWorker(*w) == on_gpu) out.push_back(w);
  std::sort(out.begin(), out.end(), [](const WorkerConn* a, const WorkerConn* b) { return a->id < b->id; });
  if (on_gpu) {
    std::set<std::string> seen;
    std::erase_if(out, [&](const WorkerConn* w) {
      return !seen.insert(w->gpu.empty() ? w->host + "/" + w->device : w->gpu).second;
    });
  }
  return out;
}

struct Watcher {
  std::string routing;
  int64_t expires = 0;
  bool results = true;
};

// Work waiting for a journal completion.
struct PendingSubmit {
  std::vector<std::string> routings;  // the first requester and any retries that arrived meanwhile
  std::vector<uint64_t> reqs;
  std::string request_id;
  std::string batch;
  std::vector<Job> jobs;
};
struct PendingFinish {
  uint64_t job = 0;
  uint64_t epoch = 0;
  std::string worker_routing;  // empty: no RESULT_ACK owed (cancel, dead)
  JobState state = JobState::kDone;
  std::string error;
  std::string result;
  int64_t run_ms = 0;
  int64_t finished_ms = 0;
};
// Terminal records gathered from one message, written as one journal batch.
struct FinishGroup {
  JournalBatch batch;
  std::vector<PendingFinish> finishes;
  std::vector<records::JobRow> rows;  // for the PostgreSQL job history
};
struct PendingReply {
  std::string routing;
  proto::Reply reply;
};

}  // namespace

struct Broker::Impl {
  BrokerOptions opt;
  zmq::context_t ctx{1};
  zmq::socket_t sock{ctx, zmq::socket_type::router};
  std::string endpoint;
  std::unique_ptr<Journal> journal;
  std::unique_ptr<EventSink> sink;  // with --pg: job history to PostgreSQL
  uint64_t next_event_seq = 0;
  JobTable table;
  uint64_t next_job_id = 1;
  uint64_t next_epoch = 0;
  uint64_t next_token = 1;
  uint64_t next_group = 1;
  uint64_t next_gang_port = 0;
  std::set<std::string> pending_gangs;  // gangs whose SUBMIT is being journaled

  std::unordered_map<std::string, WorkerConn> workers;          // by worker id
  std::unordered_map<std::string, std::string> worker_by_routing;
  std::unordered_map<std::string, std::vector<Watcher>> watchers;  // by batch
  std::unordered_map<std::string, std::vector<proto::JobEvent>> pending_events;
  std::unordered_map<std::string, rec::RequestRecord> requests;  // by request id
  // Forgetting them with their jobs: request id by its first job id, and its jobs not yet forgotten.
  std::map<uint64_t, std::string> request_by_first;
  std::unordered_map<std::string, uint32_t> request_jobs_left;
  std::unordered_map<std::string, uint64_t> inflight_requests;   // request id -> token

  std::unordered_map<uint64_t, PendingSubmit> pending_submits;
  std::unordered_map<uint64_t, std::vector<PendingFinish>> pending_finishes;  // by journal token
  std::unordered_map<uint64_t, PendingReply> pending_replies;
  std::unordered_map<uint64_t, std::vector<uint64_t>> pending_retries;  // by journal token: jobs RETRY requeues
  std::deque<std::pair<int64_t, uint64_t>> retention;  // (finished wall ms, job id)
  std::deque<std::pair<int64_t, uint64_t>> forgetting;  // every finished job: (finished wall ms, job id)
  static constexpr const char* kNextIdKey = "m/next_job_id";
  std::set<std::pair<int64_t, uint64_t>> deadlines;     // (deadline mono, job id)

  int64_t next_heartbeat = 0;
  int64_t next_housekeeping = 0;

  // Observability: the poll thread publishes a snapshot every 500 ms; HTTP reads only that.
  SnapshotHolder snapshots;
  std::unique_ptr<HttpServer> http;
  int64_t next_snapshot = 0, next_history = 0;
  std::array<uint64_t, 6> finished_total{};
  uint64_t submitted_total = 0;
  std::deque<std::pair<int64_t, uint64_t>> rate_samples;  // (mono ms, finished so far)
  std::deque<FleetSnapshot::Failure> recent_failures;
  std::deque<FleetSnapshot::Point> history;
  // Batching figures: exponentially weighted over recent batches; audio seconds done.
  double batch_fill = 0, batch_padding = 0, audio_ms_done = 0;
  std::deque<std::pair<int64_t, double>> audio_samples;  // (mono ms, audio ms done so far)
  std::map<std::string, std::pair<double, double>> model_time;  // model -> (audio ms, run ms), recent

  // ---- sending --------------------------------------------------------------------------------

  template <typename T>
  void Send(const std::string& routing, Cmd cmd, const T& body) {
    std::string b = proto::EncodeBody(body);
    uint8_t c = static_cast<uint8_t>(cmd);
    try {
      sock.send(zmq::buffer(routing), zmq::send_flags::sndmore | zmq::send_flags::dontwait);
      sock.send(zmq::buffer(proto::kTag), zmq::send_flags::sndmore | zmq::send_flags::dontwait);
      sock.send(zmq::buffer(&c, 1), zmq::send_flags::sndmore | zmq::send_flags::dontwait);
      sock.send(zmq::buffer(b), zmq::send_flags::dontwait);
    } catch (const zmq::error_t& e) {
      LogWarn("send_failed").Kv("cmd", proto::CmdName(cmd)).Kv("error", e.what());
    }
  }

  // The "req" of a body that could not be decoded as a whole, so the error still reaches the
  // request that caused it; 0 when there is none.
  static uint64_t PeekReq(std::string_view body) {
    msgpack::object_handle oh;
    if (!proto::DecodeRaw(body, &oh).ok()) return 0;
    const msgpack::object& o = oh.get();
    for (uint32_t i = 0; i < o.via.map.size; ++i) {
      const auto& kv = o.via.map.ptr[i];
      if (kv.key.type == msgpack::type::STR && std::string_view(kv.key.via.str.ptr, kv.key.via.str.size) == "req" &&
          kv.val.type == msgpack::type::POSITIVE_INTEGER) {
        return kv.val.via.u64;
      }
    }
    return 0;
  }

  void SendError(const std::string& routing, uint64_t req, const std::string& code, const std::string& message) {
    proto::Error e;
    e.req = req;
    e.code = code;
    e.message = message;
    Send(routing, Cmd::kError, e);
  }

  // ---- replay ---------------------------------------------------------------------------------

  // A new journal beside a PostgreSQL that may hold an earlier journal's jobs (the broker's state
  // dir was lost or wiped, PostgreSQL kept): job ids continue after the highest one there, so new
  // results and history never meet old rows under the same id (the results upsert keeps the row
  // with the newer lease epoch, and a new journal's epochs start low again). Only then does the
  // start wait for PostgreSQL, at most its connect timeout.
  // Also after a restore (a marker restore.sh leaves): the journal copy may be older than the
  // database's dump. True once PostgreSQL has answered.
  bool ContinueIdsAfterPostgres() {
    std::unique_ptr<PgConn> c;
    bool migrated = false;
    PgResult r;
    Status st = ConnectAndMigrate(opt.pg, &migrated, &c);
    if (st.ok()) {
      st = c->Query("SELECT greatest((SELECT coalesce(max(id), 0) FROM jobs), (SELECT coalesce(max(job_id), 0) FROM "
                    "results), (SELECT coalesce(max(job_id), 0) FROM checkpoints))", {}, &r);
    }
    if (!st.ok() || r.rows() != 1) {
      LogWarn("job_ids_from_one").Kv("error", st.message())
          .Kv("detail", "a new or restored journal, and PostgreSQL did not say which job ids it holds: if it holds "
                        "jobs this journal lacks, their rows meet the new ones");
      return false;
    }
    uint64_t top = static_cast<uint64_t>(r.get_int(0, 0));
    if (top + 1 > next_job_id) {
      next_job_id = top + 1;
      LogInfo("job_ids_continue").Kv("after", top).Kv("detail", "PostgreSQL holds jobs up to this id");
    }
    return true;
  }

  Status Replay() {
    int64_t loaded = 0;
    ASRF_RETURN_IF_ERROR(journal->Scan("j/", [&](std::string_view key, std::string_view value) -> Status {
      uint64_t id = rec::IdFromKey(key);
      rec::JobRecord r;
      Status st = proto::DecodeBody(value, &r);
      if (id == 0 || !st.ok()) {
        LogError("journal_record_unreadable").Kv("key", std::string(key)).Kv("error", st.message());
        return Status::Ok();
      }
      Job j;
      j.id = id;
      j.batch = r.batch;
      j.kind = r.kind;
      j.payload = std::move(r.payload.data);
      j.priority = r.priority;
      j.timeout_ms = r.timeout_ms;
      j.submitted_ms = r.submitted_ms;
      j.model = std::move(r.model);
      j.audio_ms = r.audio_ms;
      j.gang = std::move(r.gang);
      j.rank = r.rank;
      j.world_size = std::max<uint32_t>(r.world_size, 1);
      pending_replay_.emplace(id, std::move(j));
      next_job_id = std::max(next_job_id, id + 1);
      return Status::Ok();
    }));
    ASRF_RETURN_IF_ERROR(journal->Scan("s/", [&](std::string_view key, std::string_view value) -> Status {
      uint64_t id = rec::IdFromKey(key);
      auto it = pending_replay_.find(id);
      rec::StateRecord r;
      if (it == pending_replay_.end() || !proto::DecodeBody(value, &r).ok() || r.state >= proto::kNumStates) {
        LogError("journal_record_unreadable").Kv("key", std::string(key));
        return Status::Ok();
      }
      Job& j = it->second;
      j.state = static_cast<JobState>(r.state);
      if (j.state == JobState::kLeased) j.state = JobState::kQueued;  // never written; be safe
      j.attempts = r.attempts;
      j.error = r.error;
      j.result = std::move(r.result.data);
      j.result_dropped = r.result_dropped;
      j.finished_ms = r.finished_ms;
      j.run_ms = r.run_ms;
      j.worker = r.worker;
      return Status::Ok();
    }));
    // Ids are never given twice, though the jobs holding the highest ones may have been forgotten.
    ASRF_RETURN_IF_ERROR(journal->Scan("m/", [&](std::string_view key, std::string_view value) -> Status {
      if (key == kNextIdKey) next_job_id = std::max<uint64_t>(next_job_id, std::strtoull(std::string(value).c_str(), nullptr, 10));
      return Status::Ok();
    }));
    ASRF_RETURN_IF_ERROR(journal->Scan("r/", [&](std::string_view key, std::string_view value) -> Status {
      rec::RequestRecord r;
      if (proto::DecodeBody(value, &r).ok()) requests[std::string(key.substr(2))] = r;
      return Status::Ok();
    }));
    int64_t now_wall = WallMs();
    for (auto& [id, j] : pending_replay_) {
      if (DropsPayload(j, j.state)) std::string().swap(j.payload);
      if (proto::IsTerminal(j.state) && j.finished_ms > 0 && !j.result_dropped && !j.result.empty()) {
        retention.push_back({j.finished_ms, id});
      }
      if (proto::IsTerminal(j.state) && j.finished_ms > 0) forgetting.push_back({j.finished_ms, id});
      (void)now_wall;
      table.Add(std::move(j));
      loaded++;
    }
    pending_replay_.clear();
    // Requests whose jobs are all forgotten (journals from before requests were forgotten with
    // their jobs hold them) go now; the others wait for their last job.
    JournalBatch gone_requests;
    for (auto it = requests.begin(); it != requests.end();) {
      uint32_t left = 0;
      for (uint64_t id = it->second.first; id < it->second.first + it->second.count; ++id) left += table.Find(id) != nullptr;
      if (left == 0) {
        gone_requests.Erase(rec::RequestKey(it->first));
        it = requests.erase(it);
        continue;
      }
      request_by_first[it->second.first] = it->first;
      request_jobs_left[it->first] = left;
      ++it;
    }
    if (!gone_requests.empty()) journal->Write(std::move(gone_requests), /*sync=*/false, 0);
    std::sort(retention.begin(), retention.end());
    std::sort(forgetting.begin(), forgetting.end());
    const auto& c = table.counts();
    LogInfo("journal_replayed")
        .Kv("jobs", loaded)
        .Kv("queued", c[0])
        .Kv("done", c[2])
        .Kv("failed", c[3])
        .Kv("dead", c[4])
        .Kv("cancelled", c[5])
        .Kv("generation", journal->generation());
    return Status::Ok();
  }
  std::map<uint64_t, Job> pending_replay_;

  // ---- state changes --------------------------------------------------------------------------

  rec::StateRecord StateOf(const Job& j) {
    rec::StateRecord r;
    r.state = static_cast<uint8_t>(j.state);
    r.attempts = j.attempts;
    r.error = j.error;
    r.result.data = j.result;
    r.result_dropped = j.result_dropped;
    r.finished_ms = j.finished_ms;
    r.run_ms = j.run_ms;
    r.worker = j.worker;
    return r;
  }

  // ---- job history for PostgreSQL (only with --pg) -------------------------------------------

  records::JobRow RowOf(const Job& j, JobState state) {
    records::JobRow r;
    r.id = j.id;
    r.batch = j.batch;
    r.kind = j.kind;
    r.state = static_cast<uint8_t>(state);
    r.priority = j.priority;
    r.attempts = j.attempts;
    r.submitted_ms = j.submitted_ms;
    r.started_ms = j.started_ms;
    r.finished_ms = j.finished_ms;
    r.worker = j.worker;
    r.error = j.error;
    return r;
  }

  // Adds an "e/" record to a journal batch that is written anyway: no extra sync.
  void AddEvent(JournalBatch* b, std::vector<records::JobRow> rows) {
    if (!sink || rows.empty()) return;
    records::EventRecord e;
    e.seq = next_event_seq++;
    e.rows = std::move(rows);
    b->Put(records::EventKey(e.seq), proto::EncodeBody(e));
  }

  // Removes a job's lease from its worker and the deadline index.
  void DropLease(Job& j) {
    if (j.state != JobState::kLeased) return;
    auto w = workers.find(j.worker);
    if (w != workers.end() && w->second.leases.erase(j.id) && j.group) {
      auto g = w->second.groups.find(j.group);
      if (g != w->second.groups.end()) {
        w->second.grouped_leases--;
        if (--g->second == 0) w->second.groups.erase(g);
      }
    }
    j.group = 0;
    if (j.deadline_mono) deadlines.erase({j.deadline_mono, j.id});
    j.deadline_mono = 0;
    j.started = false;
  }

  // Adds the job's terminal record to `g` (payload dropped for done jobs); the job finishes in
  // memory once CommitFinishes' synced write completes. Meanwhile it is held (finishing) so
  // nothing reassigns it.
  void Finish(Job& j, JobState state, std::string error, std::string result, int64_t run_ms,
              const std::string& ack_routing, FinishGroup* g) {
    // The other ranks end in the same write as this one: were they written apart, a failed write
    // of this rank would requeue it alone, beside ranks already cancelled, to wait for ever.
    if (state != JobState::kDone) AbortGang(j, std::string(proto::StateName(state)) + ": " + error, true, g);
    DropLease(j);
    if (j.state == JobState::kQueued) table.Unqueue(j);
    j.finishing = true;
    PendingFinish f{j.id, j.epoch, ack_routing, state, std::move(error), std::move(result), run_ms, WallMs()};
    // Small payloads stay in the job record; a large one (audio) is dropped once nothing can run
    // the job again: it is done, or cancelled (RETRY takes only dead and failed jobs).
    if (DropsPayload(j, state) && j.payload.size() > kKeepPayloadBytes) {
      rec::JobRecord jr;
      jr.batch = j.batch;
      jr.kind = j.kind;
      jr.priority = j.priority;
      jr.timeout_ms = j.timeout_ms;
      jr.submitted_ms = j.submitted_ms;
      jr.model = j.model;
      jr.audio_ms = j.audio_ms;
      jr.gang = j.gang;
      jr.rank = j.rank;
      jr.world_size = j.world_size;
      g->batch.Put(rec::JobKey(j.id), proto::EncodeBody(jr));
    }
    rec::StateRecord r;
    r.state = static_cast<uint8_t>(state);
    r.attempts = j.attempts;
    r.error = f.error;
    r.result.data = f.result;
    r.finished_ms = f.finished_ms;
    r.run_ms = run_ms;
    r.worker = j.worker;
    g->batch.Put(rec::StateKey(j.id), proto::EncodeBody(r));
    if (sink) {
      records::JobRow row = RowOf(j, state);
      row.error = f.error;
      row.finished_ms = f.finished_ms;
      g->rows.push_back(std::move(row));
    }
    g->finishes.push_back(std::move(f));
  }
  static constexpr size_t kKeepPayloadBytes = 1024;
  // A cancelled gang rank keeps its payload: RETRY of a failed rank requeues the whole gang.
  static bool DropsPayload(const Job& j, JobState state) {
    return state == JobState::kDone || (state == JobState::kCancelled && !IsGangMember(j));
  }

  // Writes the group in one synced write. A reply given goes out when that very write is durable
  // (or an ERROR if it failed), so what it reports is what the journal holds.
  void CommitFinishes(FinishGroup&& g, PendingReply* reply = nullptr) {
    if (g.finishes.empty() && !reply) return;
    uint64_t token = next_token++;
    if (reply) pending_replies.emplace(token, std::move(*reply));
    if (!g.finishes.empty()) {
      AddEvent(&g.batch, std::move(g.rows));
      pending_finishes.emplace(token, std::move(g.finishes));
    }
    journal->Write(std::move(g.batch), /*sync=*/true, token);
  }

  void FinishOne(Job& j, JobState state, std::string error) {
    FinishGroup g;
    Finish(j, state, std::move(error), "", 0, "", &g);
    CommitFinishes(std::move(g));
  }

  void OnFinishWritten(PendingFinish& f, const Status& st, proto::ResultAck* ack) {
    Job* j = table.Find(f.job);
    if (!j || !j->finishing) return;
    j->finishing = false;
    if (!st.ok()) {
      // Not durable: the job runs again rather than being reported done and then lost.
      LogError("finish_not_durable").Kv("job", j->id).Kv("error", st.message());
      if (j->state == JobState::kLeased || j->state == JobState::kQueued) table.SetState(*j, JobState::kQueued);
      if (!f.worker_routing.empty()) {
        ack->rejected.push_back({f.job, f.epoch, "journal write failed; the job will run again: " + st.message()});
      }
      return;
    }
    j->error = std::move(f.error);
    j->result = std::move(f.result);
    j->run_ms = f.run_ms;
    j->finished_ms = f.finished_ms;
    if (DropsPayload(*j, f.state)) std::string().swap(j->payload);  // dead and failed keep it for RETRY
    if (f.state == JobState::kDone && j->audio_ms > 0) {
      audio_ms_done += j->audio_ms;
      auto& mt = model_time[j->model.empty() ? proto::kDefaultModel : j->model];
      mt.first = 0.999 * mt.first + j->audio_ms;  // recent audio over recent compute
      mt.second = 0.999 * mt.second + std::max<int64_t>(f.run_ms, 1);
    }
    table.SetState(*j, f.state);
    finished_total[static_cast<int>(f.state)]++;
    if (f.state == JobState::kFailed || f.state == JobState::kDead) {
      recent_failures.push_front({j->id, j->kind, proto::StateName(f.state), j->error.substr(0, 300), j->finished_ms});
      if (recent_failures.size() > 20) recent_failures.pop_back();
    }
    if (!j->result.empty()) retention.push_back({j->finished_ms, j->id});
    forgetting.push_back({j->finished_ms, j->id});
    if (f.state != JobState::kDone) {
      LogInfo("job_finished")
          .Kv("job", j->id)
          .Kv("batch", j->batch)
          .Kv("state", proto::StateName(f.state))
          .Kv("attempts", j->attempts)
          .Kv("error", j->error);
    }
    QueueEvent(*j);
    if (!f.worker_routing.empty()) ack->accepted.push_back({f.job, f.epoch});
  }

  void QueueEvent(const Job& j) {
    if (!watchers.count(j.batch)) return;
    proto::JobEvent e;
    e.id = j.id;
    e.state = proto::StateName(j.state);
    e.attempts = j.attempts;
    e.error = j.error;
    e.result.data = j.result;
    e.run_ms = j.run_ms;
    pending_events[j.batch].push_back(std::move(e));
  }

  // A leased job that was lost (worker gone, timed out, worker reconnected without it).
  // Counts an attempt only if the worker had reported it started.
  // A gang runs whole or not at all: when one member's lease ends early, the others stop too.
  // `ended`: the member ended for good (failed, dead, cancelled), so the others are cancelled;
  // otherwise they go back to the queue without an attempt and the gang is placed again.
  // ended: the other ranks end too (cancelled), into `g` when given, else each in its own write.
  void AbortGang(const Job& j, const std::string& why, bool ended, FinishGroup* g = nullptr) {
    if (!IsGangMember(j) || aborting_gang) return;
    aborting_gang = true;
    for (uint64_t id : table.GangMembers(j.gang)) {
      Job* m = table.Find(id);
      if (!m || m->id == j.id || m->finishing || proto::IsTerminal(m->state)) continue;
      if (m->state == JobState::kLeased) {
        auto w = workers.find(m->worker);
        if (w != workers.end()) {
          proto::CancelJobs c;
          c.leases.push_back({m->id, m->epoch});
          c.reason = "gang aborted: " + why;
          Send(w->second.routing, Cmd::kCancelJobs, c);
        }
        DropLease(*m);
        table.SetState(*m, JobState::kQueued);
      }
      if (ended) {
        std::string error = "gang member " + std::to_string(j.id) + " ended: " + why;
        if (g) Finish(*m, JobState::kCancelled, std::move(error), "", 0, "", g);
        else FinishOne(*m, JobState::kCancelled, std::move(error));
      }
    }
    LogWarn("gang_aborted").Kv("gang", j.gang).Kv("job", j.id).Kv("why", why).Kv("ended", ended);
    aborting_gang = false;
  }
  bool aborting_gang = false;

  void LoseLease(Job& j, const std::string& why, int64_t now) {
    if (j.state != JobState::kLeased || j.finishing) return;
    bool counted = j.started;
    DropLease(j);
    if (!counted) {
      table.SetState(j, JobState::kQueued);
      AbortGang(j, why, false);
      return;
    }
    j.attempts++;
    j.error = why;
    LogWarn("job_attempt_lost").Kv("job", j.id).Kv("attempts", j.attempts).Kv("error", why);
    if (static_cast<int>(j.attempts) >= opt.max_attempts) {
      FinishOne(j, JobState::kDead,
                why + " (attempt " + std::to_string(j.attempts) + " of " + std::to_string(opt.max_attempts) + ")");
      return;
    }
    AbortGang(j, why, false);
    int64_t backoff = opt.backoff_ms;
    for (uint32_t i = 1; i < j.attempts && backoff < opt.backoff_max_ms; ++i) backoff *= 2;
    backoff = std::min(backoff, opt.backoff_max_ms);
    table.SetState(j, JobState::kQueued, backoff > 0 ? now + backoff : 0);
    JournalBatch b;
    b.Put(rec::StateKey(j.id), proto::EncodeBody(StateOf(j)));
    AddEvent(&b, {RowOf(j, JobState::kQueued)});
    journal->Write(std::move(b), /*sync=*/false, 0);
  }

  // `id` by value: callers pass strings the removal frees (OnDisconnect passes the routing
  // index's copy, erased below; logging it afterwards read freed memory and crashed the broker).
  void RemoveWorker(std::string id, const std::string& why, int64_t now) {
    auto it = workers.find(id);
    if (it == workers.end()) return;
    std::vector<uint64_t> leases(it->second.leases.begin(), it->second.leases.end());
    std::sort(leases.begin(), leases.end());
    for (uint64_t jid : leases) {
      if (Job* j = table.Find(jid)) LoseLease(*j, "worker " + id + " " + why, now);
    }
    worker_by_routing.erase(it->second.routing);
    LogInfo("worker_gone").Kv("worker", id).Kv("why", why).Kv("requeued", static_cast<uint64_t>(leases.size()));
    workers.erase(it);
  }

  // ---- client handlers ------------------------------------------------------------------------

  // A gang arrives whole in one SUBMIT: ranks 0..K-1 once each, one world size, a new name.
  Status CheckGangs(const proto::Submit& m) {
    std::map<std::string, std::vector<const proto::SubmitJob*>> gangs;
    for (const auto& j : m.jobs) {
      if (j.world_size > 1 || !j.gang.empty()) gangs[j.gang].push_back(&j);
    }
    for (const auto& [name, members] : gangs) {
      if (name.empty() || name.size() > 256) return Status::Invalid("a gang needs a name of 1 to 256 bytes");
      uint32_t k = members.front()->world_size;
      for (const auto* j : members) {
        if (j->kind != members.front()->kind) return Status::Invalid("gang " + name + ": every rank must be one job kind");
      }
      if (k < 2 || k > 1024) return Status::Invalid("gang " + name + ": world_size must be 2 to 1024");
      if (members.size() != k) {
        return Status::Invalid("gang " + name + ": " + std::to_string(members.size()) + " jobs for world_size " +
                               std::to_string(k) + " (a gang is submitted whole)");
      }
      std::set<uint32_t> ranks;
      for (const auto* j : members) {
        if (j->world_size != k || j->rank >= k || !ranks.insert(j->rank).second) {
          return Status::Invalid("gang " + name + ": ranks must be 0.." + std::to_string(k - 1) + " once each");
        }
      }
      if (!table.GangMembers(name).empty() || pending_gangs.count(name)) {
        return Status::Invalid("gang " + name + " exists already");
      }
    }
    return Status::Ok();
  }

  void OnSubmit(const std::string& routing, std::string_view body) {
    proto::Submit m;
    Status st = proto::DecodeBody(body, &m);
    // A repeat of an accepted request_id is answered with the original ids whatever its own jobs
    // say (protocol §4.1), so it is not validated.
    const bool repeat = st.ok() && !m.request_id.empty() &&
                        (requests.count(m.request_id) || inflight_requests.count(m.request_id));
    if (st.ok() && !repeat) st = proto::Validate(m);
    if (!st.ok()) {
      SendError(routing, PeekReq(body), "bad_request", st.message());
      return;
    }
    if (Status gs = CheckGangs(m); !gs.ok()) {
      // A resend of a SUBMIT already taken (written, or still being written) is answered below.
      if (m.request_id.empty() || (!requests.count(m.request_id) && !inflight_requests.count(m.request_id))) {
        SendError(routing, m.req, "bad_request", gs.message());
        return;
      }
    }
    if (!m.request_id.empty()) {
      auto done = requests.find(m.request_id);
      if (done != requests.end()) {
        proto::Reply r;
        r.req = m.req;
        r.batch = done->second.batch;
        r.duplicate = true;
        for (uint32_t i = 0; i < done->second.count; ++i) r.job_ids.push_back(done->second.first + i);
        Send(routing, Cmd::kReply, r);
        return;
      }
      auto inflight = inflight_requests.find(m.request_id);
      if (inflight != inflight_requests.end()) {
        PendingSubmit& p = pending_submits[inflight->second];
        p.routings.push_back(routing);
        p.reqs.push_back(m.req);
        return;
      }
    }
    uint64_t first = next_job_id;
    next_job_id += m.jobs.size();
    std::string batch = m.batch.empty() ? "b" + std::to_string(journal->generation()) + "-" + std::to_string(first)
                                        : m.batch;
    int64_t now_wall = WallMs();
    JournalBatch b;
    PendingSubmit p;
    p.routings.push_back(routing);
    p.reqs.push_back(m.req);
    p.request_id = m.request_id;
    p.batch = batch;
    p.jobs.reserve(m.jobs.size());
    for (size_t i = 0; i < m.jobs.size(); ++i) {
      rec::JobRecord r;
      r.batch = batch;
      r.kind = std::move(m.jobs[i].kind);
      r.payload = std::move(m.jobs[i].payload);
      r.priority = m.jobs[i].priority;
      r.timeout_ms = m.jobs[i].timeout_ms;
      r.submitted_ms = now_wall;
      r.gang = m.jobs[i].gang;
      r.rank = m.jobs[i].rank;
      r.world_size = std::max<uint32_t>(m.jobs[i].world_size, 1);
      r.model = std::move(m.jobs[i].model);
      // Batches are sized by audio length: never trust a length shorter than the payload holds
      // (16 kHz 16-bit PCM is 32 bytes per ms), or a batch could outgrow a message; nor one longer
      // (a huge one overflowed the batcher's arithmetic and skewed the audio-seconds figures). Only
      // batched kinds have one.
      if (r.kind == proto::kTranscribeKind) {
        const int64_t held = static_cast<int64_t>(r.payload.data.size() / 32);
        r.audio_ms = std::clamp<int64_t>(m.jobs[i].audio_ms, held, held + 1);
      } else {
        r.audio_ms = 0;
      }
      b.Put(rec::JobKey(first + i), proto::EncodeBody(r));
      Job j;
      j.id = first + i;
      j.batch = batch;
      j.kind = std::move(r.kind);
      j.payload = std::move(r.payload.data);
      j.priority = r.priority;
      j.timeout_ms = r.timeout_ms;
      j.submitted_ms = now_wall;
      j.model = r.model;
      j.audio_ms = r.audio_ms;
      j.gang = r.gang;
      j.rank = r.rank;
      j.world_size = r.world_size;
      p.jobs.push_back(std::move(j));
    }
    b.Put(kNextIdKey, std::to_string(next_job_id));  // the next id, should these jobs be forgotten
    if (sink) {
      std::vector<records::JobRow> rows;
      rows.reserve(p.jobs.size());
      for (const auto& j : p.jobs) rows.push_back(RowOf(j, JobState::kQueued));
      AddEvent(&b, std::move(rows));
    }
    if (!m.request_id.empty()) {
      rec::RequestRecord rr{batch, first, static_cast<uint32_t>(m.jobs.size())};
      b.Put(rec::RequestKey(m.request_id), proto::EncodeBody(rr));
    }
    uint64_t token = next_token++;
    if (!m.request_id.empty()) inflight_requests[m.request_id] = token;
    for (const auto& j : p.jobs) if (IsGangMember(j)) pending_gangs.insert(j.gang);
    pending_submits.emplace(token, std::move(p));
    journal->Write(std::move(b), /*sync=*/true, token);
  }

  void OnSubmitWritten(PendingSubmit& p, const Status& st) {
    for (const auto& j : p.jobs) if (IsGangMember(j)) pending_gangs.erase(j.gang);
    if (!p.request_id.empty()) inflight_requests.erase(p.request_id);
    if (!st.ok()) {
      for (size_t i = 0; i < p.routings.size(); ++i) {
        SendError(p.routings[i], p.reqs[i], "journal_unavailable",
                  "the broker could not make the jobs durable, nothing was accepted: " + st.message());
      }
      return;
    }
    proto::Reply r;
    r.batch = p.batch;
    r.job_ids.reserve(p.jobs.size());
    uint64_t first = p.jobs.empty() ? 0 : p.jobs.front().id;
    for (auto& j : p.jobs) {
      r.job_ids.push_back(j.id);
      table.Add(std::move(j));
    }
    submitted_total += r.job_ids.size();
    if (!p.request_id.empty()) {
      requests[p.request_id] = rec::RequestRecord{p.batch, first, static_cast<uint32_t>(r.job_ids.size())};
      request_by_first[first] = p.request_id;
      request_jobs_left[p.request_id] = static_cast<uint32_t>(r.job_ids.size());
    }
    for (size_t i = 0; i < p.routings.size(); ++i) {
      r.req = p.reqs[i];
      r.duplicate = i > 0;
      Send(p.routings[i], Cmd::kReply, r);
    }
  }

  std::map<std::string, int64_t> CountsMap(const JobTable::Counts& c) {
    std::map<std::string, int64_t> m;
    for (int i = 0; i < proto::kNumStates; ++i) m[proto::StateName(static_cast<JobState>(i))] = c[i];
    return m;
  }

  proto::JobInfo InfoOf(const Job& j, bool with_result) {
    proto::JobInfo i;
    i.id = j.id;
    i.batch = j.batch;
    i.kind = j.kind;
    i.state = proto::StateName(j.state);
    i.priority = j.priority;
    i.attempts = j.attempts;
    i.error = j.error;
    if (with_result) i.result.data = j.result;
    i.submitted_ms = j.submitted_ms;
    i.finished_ms = j.finished_ms;
    i.run_ms = j.run_ms;
    i.worker = j.worker;
    i.progress = j.progress;
    if (j.state == JobState::kQueued) {
      bool runnable = false, has_model = false, model_only_draining = false;
      std::string model = j.model.empty() ? proto::kDefaultModel : j.model;
      for (const auto& [id, w] : workers) {
        if (w.kinds.empty() || w.kinds.count(j.kind)) runnable = true;
        if (w.HasModel(model)) {
          model_only_draining = !has_model ? w.draining : model_only_draining && w.draining;
          has_model = true;
        }
      }
      if (workers.empty()) i.why = "no worker is connected";
      else if (!runnable) i.why = "no connected worker runs kind " + j.kind;
      else if (IsBatched(j) && !has_model) i.why = "no worker has model " + model;
      else if (IsBatched(j) && model_only_draining) {
        i.why = "only draining workers have model " + model + "; it waits for one that takes new work";
      }
      else if (IsGangMember(j)) {
        size_t able = 0;
        for (const auto& [id, w] : workers) if (w.kinds.empty() || w.kinds.count(j.kind)) able++;
        i.why = "gang " + j.gang + " waits for " + std::to_string(j.world_size) +
                " idle workers at once, on distinct GPUs or all on CPUs (" + std::to_string(able) + " connected run " +
                j.kind + ")";
      }
      else if (IsBatched(j) && j.not_before_mono == 0) i.why = "waiting for a batch to fill or a free worker slot";
      else if (j.not_before_mono > 0) i.why = "waiting to retry after a lost attempt";
      else i.why = "waiting for a free worker slot";
    } else if (j.result_dropped) {
      i.why = "result dropped after the retention period";
    }
    return i;
  }

  std::string NoJob(uint64_t id) const {
    if (id < next_job_id && opt.forget_after_s > 0) {
      return "no job " + std::to_string(id) + " here: it ended more than --forget-after-s (" +
             std::to_string(opt.forget_after_s) + " s) ago and was forgotten, or never existed" +
             (sink ? "; its history and result are in PostgreSQL (tables jobs, results)" : "");
    }
    return "no job " + std::to_string(id);
  }

  std::string NoBatch(const std::string& batch) const {
    if (opt.forget_after_s <= 0) return "no batch " + batch;
    return "no batch " + batch + " (a batch whose jobs all ended more than --forget-after-s, " +
           std::to_string(opt.forget_after_s) + " s, ago is forgotten" +
           (sink ? "; its history and results are in PostgreSQL)" : ")");
  }

  void OnStatus(const std::string& routing, std::string_view body) {
    proto::StatusReq m;
    Status st = proto::DecodeBody(body, &m);
    if (!st.ok()) return SendError(routing, PeekReq(body), "bad_request", st.message());
    proto::Reply r;
    r.req = m.req;
    if (m.job != 0) {
      Job* j = table.Find(m.job);
      if (!j) return SendError(routing, m.req, "not_found", NoJob(m.job));
      if (j->result_dropped && sink) {
        // Past the retention period: the result is only in PostgreSQL; answered from there.
        ResultLookup l;
        l.routing = routing;
        l.req = m.req;
        l.info = InfoOf(*j, false);
        if (!sink->Lookup(std::move(l))) return SendError(routing, m.req, "busy", kSinkBusy);
        return;
      }
      r.jobs.push_back(InfoOf(*j, true));
      r.batch = j->batch;
      r.counts = CountsMap(table.counts());
    } else if (!m.batch.empty()) {
      if (!table.BatchJobs(m.batch)) return SendError(routing, m.req, "not_found", NoBatch(m.batch));
      r.batch = m.batch;
      r.counts = CountsMap(table.BatchCounts(m.batch));
    } else {
      r.counts = CountsMap(table.counts());
    }
    Send(routing, Cmd::kReply, r);
  }

  // Cancels one job into `g`, unless it is finished or being finished (OnCancel counts what ended).
  void CancelJob(Job& j, FinishGroup* g) {
    if (proto::IsTerminal(j.state) || j.finishing) return;
    if (j.state == JobState::kLeased) {
      auto w = workers.find(j.worker);
      if (w != workers.end()) {
        proto::CancelJobs c;
        c.leases.push_back({j.id, j.epoch});
        c.reason = "cancelled by a client";
        Send(w->second.routing, Cmd::kCancelJobs, c);
      }
    }
    Finish(j, JobState::kCancelled, "cancelled by a client", "", 0, "", g);
  }

  void OnCancel(const std::string& routing, std::string_view body) {
    proto::CancelReq m;
    Status st = proto::DecodeBody(body, &m);
    if (!st.ok()) return SendError(routing, PeekReq(body), "bad_request", st.message());
    // The jobs this request may end. Cancelling a gang's rank ends the whole gang (its other ranks
    // through the gang's abort), so those count as cancelled by it too.
    std::vector<uint64_t> ids;
    if (m.job != 0) {
      Job* j = table.Find(m.job);
      if (!j) return SendError(routing, m.req, "not_found", NoJob(m.job));
      ids.push_back(m.job);
      if (!j->gang.empty()) {
        for (uint64_t id : table.GangMembers(j->gang)) if (id != m.job) ids.push_back(id);
      }
    } else {
      const auto* batch_ids = table.BatchJobs(m.batch);
      if (!batch_ids) return SendError(routing, m.req, "not_found", NoBatch(m.batch));
      ids.assign(batch_ids->begin(), batch_ids->end());
    }
    auto live = [&](uint64_t id) {
      const Job* j = table.Find(id);
      return j && !proto::IsTerminal(j->state) && !j->finishing;
    };
    std::vector<uint64_t> was_live;
    for (uint64_t id : ids) if (live(id)) was_live.push_back(id);
    // One write holds every cancelled record, and the REPLY reports that write's status.
    FinishGroup g;
    for (uint64_t id : (m.job != 0 ? std::vector<uint64_t>{m.job} : was_live)) {
      if (Job* j = table.Find(id)) CancelJob(*j, &g);
    }
    PendingReply p;
    p.routing = routing;
    p.reply.req = m.req;
    for (uint64_t id : was_live) p.reply.affected += live(id) ? 0 : 1;
    CommitFinishes(std::move(g), &p);
  }

  void OnWatch(const std::string& routing, std::string_view body, int64_t now) {
    proto::WatchReq m;
    Status st = proto::DecodeBody(body, &m);
    if (!st.ok()) return SendError(routing, PeekReq(body), "bad_request", st.message());
    if (!table.BatchJobs(m.batch)) return SendError(routing, m.req, "not_found", NoBatch(m.batch));
    auto& list = watchers[m.batch];
    int64_t expires = now + std::clamp<int64_t>(m.watch_ms, 1000, opt.watch_max_ms);
    bool found = false;
    for (auto& w : list) {
      if (w.routing == routing) {
        w.expires = expires;
        w.results = m.results;
        found = true;
      }
    }
    if (!found) list.push_back({routing, expires, m.results});
    proto::Reply r;
    r.req = m.req;
    r.batch = m.batch;
    r.counts = CountsMap(table.BatchCounts(m.batch));
    Send(routing, Cmd::kReply, r);
  }

  void OnWorkers(const std::string& routing, std::string_view body, int64_t now) {
    proto::WorkersReq m;
    Status st = proto::DecodeBody(body, &m);
    if (!st.ok()) return SendError(routing, PeekReq(body), "bad_request", st.message());
    proto::Reply r;
    r.req = m.req;
    for (const auto& [id, w] : workers) {
      proto::WorkerInfo i;
      i.id = id;
      i.host = w.host;
      i.device = w.device;
      i.gpu = w.gpu;
      i.slots = w.slots;
      i.running = static_cast<uint32_t>(w.leases.size());
      i.draining = w.draining;
      i.idle_ms = now - w.last_seen;
      i.kinds.assign(w.kinds.begin(), w.kinds.end());
      std::sort(i.kinds.begin(), i.kinds.end());
      r.workers.push_back(std::move(i));
    }
    std::sort(r.workers.begin(), r.workers.end(), [](const auto& a, const auto& b) { return a.id < b.id; });
    Send(routing, Cmd::kReply, r);
  }

  void OnJobs(const std::string& routing, std::string_view body) {
    proto::JobsReq m;
    Status st = proto::DecodeBody(body, &m);
    if (!st.ok()) return SendError(routing, PeekReq(body), "bad_request", st.message());
    JobState want{};
    bool any_state = m.state.empty();
    if (!any_state && !proto::ParseState(m.state, &want)) {
      return SendError(routing, m.req, "bad_request",
                       "unknown state \"" + m.state + "\"; use queued, leased, done, failed, dead or cancelled");
    }
    proto::Reply r;
    r.req = m.req;
    uint32_t limit = std::clamp<uint32_t>(m.limit, 1, 10000);
    auto consider = [&](const Job& j) {
      if (j.id <= m.after || (!any_state && j.state != want)) return true;
      r.jobs.push_back(InfoOf(j, false));
      return r.jobs.size() < limit;
    };
    if (!m.batch.empty()) {
      if (const auto* ids = table.BatchJobs(m.batch)) {
        for (uint64_t id : *ids) {
          if (Job* j = table.Find(id); j && !consider(*j)) break;
        }
      }
    } else if (const std::set<uint64_t>* ids = any_state ? nullptr : table.IdsInState(want)) {
      for (auto it = ids->upper_bound(m.after); it != ids->end(); ++it) {
        if (Job* j = table.Find(*it); j && !consider(*j)) break;
      }
    } else {
      for (auto it = table.all().upper_bound(m.after); it != table.all().end(); ++it) {
        const Job& j = it->second;
        if (!consider(j)) break;
      }
    }
    Send(routing, Cmd::kReply, r);
  }

  static bool Retryable(const Job& j) {
    return !j.finishing && (j.state == JobState::kDead || j.state == JobState::kFailed);
  }
  // RETRY of a gang rank requeues the whole gang (the ranks cancelled with it too): a gang runs
  // whole or not at all. Refused when a rank ended done, as the gang can no longer run whole.
  Status RetryGang(const Job& j, JournalBatch* b, std::vector<uint64_t>* held, uint64_t* n) {
    std::vector<Job*> members;
    for (uint64_t id : table.GangMembers(j.gang)) {
      Job* m = table.Find(id);
      if (!m) continue;
      if (m->state == JobState::kDone) {
        return Status::Invalid("gang " + j.gang + ": rank " + std::to_string(m->rank) + " (job " +
                               std::to_string(m->id) + ") is done, so the gang cannot run whole again; submit the training again");
      }
      if (!proto::IsTerminal(m->state) || m->finishing) {
        return Status::Invalid("gang " + j.gang + ": rank " + std::to_string(m->rank) + " (job " +
                               std::to_string(m->id) + ") is still " + proto::StateName(m->state));
      }
      members.push_back(m);
    }
    for (Job* m : members) *n += RetryJob(*m, b, held, /*cancelled_too=*/true) ? 1 : 0;
    return Status::Ok();
  }

  // Writes the job's queued record into `b` and holds the job (finishing) until that write is
  // durable: only then is it queued (RetryWritten). A RETRY whose write failed used to leave the
  // job queued and running while the journal, and the ERROR the client got, said it was not.
  bool RetryJob(Job& j, JournalBatch* b, std::vector<uint64_t>* held, bool cancelled_too = false) {
    if (!Retryable(j) && !(cancelled_too && !j.finishing && j.state == JobState::kCancelled)) return false;
    rec::StateRecord r = StateOf(j);
    r.state = static_cast<uint8_t>(JobState::kQueued);
    r.attempts = 0;
    r.error.clear();
    r.result.data.clear();
    r.result_dropped = false;
    r.finished_ms = 0;
    b->Put(rec::StateKey(j.id), proto::EncodeBody(r));
    records::JobRow row = RowOf(j, JobState::kQueued);
    row.attempts = 0;
    row.error.clear();
    row.finished_ms = 0;
    AddEvent(b, {std::move(row)});
    j.finishing = true;
    held->push_back(j.id);
    return true;
  }

  void RetryWritten(const std::vector<uint64_t>& ids, const Status& st) {
    for (uint64_t id : ids) {
      Job* j = table.Find(id);
      if (!j || !j->finishing) continue;
      j->finishing = false;
      if (!st.ok()) continue;  // as it was: the journal holds no retry
      j->attempts = 0;
      j->error.clear();
      j->result.clear();
      j->result_dropped = false;
      j->finished_ms = 0;
      table.SetState(*j, JobState::kQueued);
    }
  }

  void OnRetry(const std::string& routing, std::string_view body) {
    proto::RetryReq m;
    Status st = proto::DecodeBody(body, &m);
    if (!st.ok()) return SendError(routing, PeekReq(body), "bad_request", st.message());
    JournalBatch b;
    uint64_t n = 0;
    std::vector<uint64_t> held;
    if (m.job != 0) {
      Job* j = table.Find(m.job);
      if (!j) return SendError(routing, m.req, "not_found", NoJob(m.job));
      if (j->finishing) {
        return SendError(routing, m.req, "busy",
                         "job " + std::to_string(m.job) + " is being written (a RETRY or CANCEL of it); try again");
      }
      if (!Retryable(*j)) {
        return SendError(routing, m.req, "bad_request",
                         "job " + std::to_string(m.job) + " is " + proto::StateName(j->state) +
                             "; only dead or failed jobs can be retried");
      }
      if (IsGangMember(*j)) {
        if (Status gs = RetryGang(*j, &b, &held, &n); !gs.ok()) {
          return SendError(routing, m.req, "bad_request", gs.message());
        }
      } else {
        n = RetryJob(*j, &b, &held) ? 1 : 0;
      }
    } else if (m.all_dead) {
      std::vector<Job*> dead;
      for (const auto& [id, j] : table.all()) {
        if (j.state == JobState::kDead) dead.push_back(table.Find(id));
      }
      for (Job* j : dead) {
        if (!Retryable(*j)) continue;  // requeued already, with its gang
        if (IsGangMember(*j)) {
          (void)RetryGang(*j, &b, &held, &n);  // a gang that cannot run whole again stays dead
        } else {
          n += RetryJob(*j, &b, &held) ? 1 : 0;
        }
      }
    } else {
      return SendError(routing, m.req, "bad_request", "RETRY needs a job id or all_dead");
    }
    // The reply reports the status of the very write that holds the retried records.
    uint64_t token = next_token++;
    PendingReply p;
    p.routing = routing;
    p.reply.req = m.req;
    p.reply.affected = n;
    pending_replies.emplace(token, std::move(p));
    if (!held.empty()) pending_retries.emplace(token, std::move(held));
    journal->Write(std::move(b), /*sync=*/true, token);
  }

  // ---- worker handlers ------------------------------------------------------------------------

  WorkerConn* WorkerFor(const std::string& routing, int64_t now) {
    auto it = worker_by_routing.find(routing);
    if (it == worker_by_routing.end()) return nullptr;
    auto w = workers.find(it->second);
    if (w == workers.end()) return nullptr;
    w->second.last_seen = now;
    return &w->second;
  }

  void OnReady(const std::string& routing, std::string_view body, int64_t now) {
    proto::Ready m;
    Status st = proto::DecodeBody(body, &m);
    if (st.ok() && (m.worker_id.empty() || m.worker_id.size() > 256)) st = Status::Invalid("worker_id must be 1 to 256 bytes");
    if (st.ok() && m.instance.size() > 64) st = Status::Invalid("instance must be at most 64 bytes");
    if (!st.ok()) return SendError(routing, 0, "bad_request", st.message());
    auto existing = workers.find(m.worker_id);
    if (existing != workers.end() && !m.instance.empty() && !existing->second.instance.empty() &&
        m.instance != existing->second.instance && existing->second.routing != routing &&
        now - existing->second.last_seen <= SilenceLimit(existing->second)) {
      // Another process with the same id while the first is alive: taking it as a reconnect
      // would take the first one's leases away from it while it still runs them.
      LogWarn("worker_id_in_use").Kv("worker", m.worker_id).Kv("host", m.host.substr(0, 256))
          .Kv("live_host", existing->second.host);
      return SendError(routing, 0, "worker_id_in_use",
                       "worker id \"" + m.worker_id + "\" is in use by a live worker on " + existing->second.host +
                           "; give each worker process its own --worker-id (this one is refused until that one is gone)");
    }
    // This connection was another worker until now: that one has left (its leases are lost);
    // otherwise it would keep the connection's routing entry and take this one's with it later.
    if (auto prev = worker_by_routing.find(routing); prev != worker_by_routing.end() && prev->second != m.worker_id) {
      RemoveWorker(prev->second, "registered again on its connection as " + m.worker_id, now);
    }
    std::unordered_set<uint64_t> keep;
    if (existing != workers.end()) {
      // The same worker on a new connection (it reconnected): keep the leases it still runs.
      for (const auto& l : m.running) {
        Job* j = table.Find(l.id);
        // Not one being finished (a CANCEL's write in flight): it is cancelled below, on this
        // connection (the CANCEL_JOBS went to the old one), where it used to be kept running.
        if (j && j->state == JobState::kLeased && j->epoch == l.epoch && j->worker == m.worker_id && !j->finishing) {
          keep.insert(l.id);
        }
      }
      std::vector<uint64_t> lost;
      for (uint64_t id : existing->second.leases) if (!keep.count(id)) lost.push_back(id);
      for (uint64_t id : lost) {
        if (Job* j = table.Find(id)) LoseLease(*j, "worker " + m.worker_id + " reconnected without it", now);
      }
      worker_by_routing.erase(existing->second.routing);
    }
    WorkerConn& w = workers[m.worker_id];
    w.id = m.worker_id;
    w.routing = routing;
    w.host = m.host;
    w.device = m.device;
    w.gpu = m.gpu.size() <= 128 ? m.gpu : m.gpu.substr(0, 128);
    w.gangs = m.gangs;
    w.slots = std::clamp<uint32_t>(m.slots, 0, 4096);
    w.draining = m.draining;
    w.heartbeat_ms = std::min<int64_t>(m.heartbeat_ms, 600000);
    w.instance = m.instance;
    w.kinds = std::unordered_set<std::string>(m.kinds.begin(), m.kinds.end());
    w.models.clear();
    for (auto& name : m.models) {
      if (!name.empty() && name.size() <= 256 && w.models.size() < 64) w.models.push_back(std::move(name));
    }
    w.last_seen = now;
    worker_by_routing[routing] = m.worker_id;
    // Leases the worker reports that this broker does not know (e.g. from before a restart) are
    // cancelled so the worker stops spending time on them.
    proto::CancelJobs cancel;
    cancel.reason = "lease no longer valid";
    for (const auto& l : m.running) {
      if (!keep.count(l.id)) cancel.leases.push_back(l);
    }
    if (!cancel.leases.empty()) Send(routing, Cmd::kCancelJobs, cancel);
    LogInfo("worker_ready")
        .Kv("worker", w.id)
        .Kv("host", w.host)
        .Kv("device", w.device)
        .Kv("gpu", w.gpu)
        .Kv("gangs", w.gangs)
        .Kv("slots", static_cast<uint64_t>(w.slots))
        .Kv("kept_leases", static_cast<uint64_t>(keep.size()))
        .Kv("heartbeat_ms", w.heartbeat_ms);
    if (w.heartbeat_ms > opt.heartbeat_ms) {
      LogWarn("worker_heartbeat_slower")
          .Kv("worker", w.id)
          .Kv("worker_heartbeat_ms", w.heartbeat_ms)
          .Kv("broker_heartbeat_ms", opt.heartbeat_ms)
          .Kv("detail", "this worker is dropped after heartbeat_misses of its own interval; give both the same --heartbeat-ms");
    }
    Send(routing, Cmd::kHeartbeat, BrokerHeartbeat());
  }

  // A worker answers an ASSIGN with STARTED at once. A lease whose STARTED has not come after ten
  // heartbeat intervals was lost on the way (a send queue full, an ASSIGN the worker could not
  // read) while the worker stays connected; it would hold the job and a slot for as long as the
  // worker lives. It goes back to the queue without an attempt (it never started), and the worker
  // is told to drop it should the ASSIGN still turn up.
  void ExpireUnstartedLeases(int64_t now) {
    for (auto& [id, w] : workers) {
      const int64_t limit = 10 * std::max<int64_t>(opt.heartbeat_ms, w.heartbeat_ms);
      proto::CancelJobs cancel;
      for (uint64_t job : w.leases) {
        const Job* j = table.Find(job);
        if (j && j->state == JobState::kLeased && !j->started && !j->finishing && now - j->leased_mono > limit) {
          cancel.leases.push_back({job, j->epoch});
        }
      }
      if (cancel.leases.empty()) continue;
      cancel.reason = "never started: no STARTED within " + std::to_string(limit) + " ms of the ASSIGN";
      const std::string routing = w.routing, why = cancel.reason + " (worker " + w.id + ")";
      for (const auto& l : cancel.leases) {
        LogWarn("lease_never_started").Kv("job", l.id).Kv("worker", w.id).Kv("after_ms", limit);
        if (Job* j = table.Find(l.id)) LoseLease(*j, why, now);
      }
      Send(routing, Cmd::kCancelJobs, cancel);
    }
  }

  // How long a worker may be silent before it is taken for gone.
  int64_t SilenceLimit(const WorkerConn& w) const {
    return std::max<int64_t>(opt.heartbeat_ms, w.heartbeat_ms) * opt.heartbeat_misses;
  }

  proto::Heartbeat BrokerHeartbeat() const {
    proto::Heartbeat h;
    h.heartbeat_ms = static_cast<uint32_t>(opt.heartbeat_ms);
    return h;
  }

  void OnHeartbeat(const std::string& routing, std::string_view body, int64_t now) {
    WorkerConn* w = WorkerFor(routing, now);
    if (!w) {
      // A worker we do not know (e.g. after a broker restart): ask it to introduce itself.
      proto::Disconnect d;
      d.reason = "unknown worker; send READY";
      Send(routing, Cmd::kDisconnect, d);
      return;
    }
    proto::Heartbeat m;
    if (proto::DecodeBody(body, &m).ok()) {
      w->draining = m.draining;
      w->gpu_mem_bytes = m.gpu_mem_bytes;
      w->outbox_results = m.outbox_results;
    }
  }

  void OnStarted(const std::string& routing, std::string_view body, int64_t now) {
    WorkerConn* w = WorkerFor(routing, now);
    proto::Started m;
    if (!w || !proto::DecodeBody(body, &m).ok()) return;
    // Confirm what is current, so the worker runs a job only once the broker knows it started
    // (a job that kills its worker then always counts an attempt); cancel the rest.
    proto::Started confirmed;
    std::vector<records::JobRow> started_rows;
    proto::CancelJobs stale;
    stale.reason = "lease no longer valid";
    for (const auto& l : m.leases) {
      Job* j = table.Find(l.id);
      if (!j || j->state != JobState::kLeased || j->epoch != l.epoch || j->finishing || j->worker != w->id) {
        stale.leases.push_back(l);
        continue;
      }
      confirmed.leases.push_back(l);
      if (j->started) continue;  // a resend after a reconnect
      j->started = true;
      j->started_ms = WallMs();
      if (sink) started_rows.push_back(RowOf(*j, JobState::kLeased));
      if (j->timeout_ms > 0) {
        j->deadline_mono = now + j->timeout_ms;
        deadlines.insert({j->deadline_mono, j->id});
      }
    }
    if (!confirmed.leases.empty()) Send(routing, Cmd::kStarted, confirmed);
    if (!started_rows.empty()) {
      JournalBatch b;
      AddEvent(&b, std::move(started_rows));
      journal->Write(std::move(b), /*sync=*/false, 0);
    }
    if (!stale.leases.empty()) Send(routing, Cmd::kCancelJobs, stale);
  }

  void OnResult(const std::string& routing, std::string_view body, int64_t now) {
    WorkerConn* w = WorkerFor(routing, now);
    proto::Result m;
    Status st = proto::DecodeBody(body, &m);
    if (st.ok()) st = proto::Validate(m);
    if (!st.ok()) return SendError(routing, 0, "bad_request", st.message());
    proto::ResultAck immediate;  // rejections and give-backs, answered at once
    FinishGroup group;
    for (auto& r : m.results) {
      Job* j = table.Find(r.id);
      std::string why;
      if (!w) why = "unknown worker; send READY first";
      else if (!j) why = "no such job";
      else if (j->state != JobState::kLeased || j->finishing) why = std::string("job is ") + proto::StateName(j->state);
      else if (j->epoch != r.epoch) why = "stale lease: epoch " + std::to_string(r.epoch) + " is not the current one";
      else if (j->worker != w->id) why = "job is leased to another worker";
      if (!why.empty()) {
        LogWarn("result_rejected").Kv("job", r.id).Kv("epoch", r.epoch).Kv("why", why);
        immediate.rejected.push_back({r.id, r.epoch, why});
        continue;
      }
      if (r.requeue) {
        // The worker stopped the job on purpose after saving its state: run it again, no attempt.
        LogInfo("job_given_back").Kv("job", j->id).Kv("worker", w->id).Kv("reason", r.error);
        DropLease(*j);
        table.SetState(*j, JobState::kQueued);
        AbortGang(*j, "member " + std::to_string(j->id) + " given back by its worker", false);
        JournalBatch b;
        AddEvent(&b, {RowOf(*j, JobState::kQueued)});
        if (!b.empty()) journal->Write(std::move(b), /*sync=*/false, 0);
        immediate.accepted.push_back({r.id, r.epoch});
        continue;
      }
      if (r.error.size() > proto::kMaxStringBytes) r.error.resize(proto::kMaxStringBytes);
      if (!r.ok && r.retry) {
        // A passing failure (the worker's device ran out of memory): an attempt, and again later.
        LogWarn("job_failed_passing").Kv("job", j->id).Kv("worker", w->id).Kv("error", r.error);
        immediate.accepted.push_back({r.id, r.epoch});
        LoseLease(*j, "failed on worker " + w->id + ": " + (r.error.empty() ? "no message" : r.error), now);
        continue;
      }
      if (r.result.data.size() > proto::kMaxResultBytes) {
        r.ok = false;
        r.error = "result of " + std::to_string(r.result.data.size()) + " bytes is over the " +
                  std::to_string(proto::kMaxResultBytes) + "-byte limit";
        r.result.data.clear();
      }
      if (r.ok) {
        Finish(*j, JobState::kDone, "", std::move(r.result.data), r.run_ms, routing, &group);
      } else {
        Finish(*j, JobState::kFailed, r.error.empty() ? "job failed without a message" : r.error,
               std::move(r.result.data), r.run_ms, routing, &group);
      }
    }
    CommitFinishes(std::move(group));
    if (!immediate.rejected.empty() || !immediate.accepted.empty()) Send(routing, Cmd::kResultAck, immediate);
  }

  void OnProgress(const std::string& routing, std::string_view body, int64_t now) {
    WorkerConn* w = WorkerFor(routing, now);
    proto::Progress m;
    if (!w || !proto::DecodeBody(body, &m).ok()) return;
    Job* j = table.Find(m.id);
    if (!j || j->state != JobState::kLeased || j->epoch != m.epoch) return;
    j->progress = m.info.substr(0, 65536);
    if (watchers.count(j->batch)) {
      proto::JobEvent e;
      e.id = j->id;
      e.state = proto::StateName(j->state);
      e.attempts = j->attempts;
      e.progress = j->progress;
      pending_events[j->batch].push_back(std::move(e));
    }
  }

  // MODELS: answered by the sink thread from PostgreSQL (never on this thread).
  void OnModels(const std::string& routing, std::string_view body) {
    proto::ModelsReq m;
    Status st = proto::DecodeBody(body, &m, proto::kMaxModelBytes);
    if (st.ok() && m.op != "list" && m.op != "export" && m.op != "import") {
      st = Status::Invalid("op must be list, export or import, not \"" + m.op.substr(0, 64) + "\"");
    }
    if (st.ok() && m.op != "list" && (m.name.empty() || m.name.size() > 256)) st = Status::Invalid("name must be 1 to 256 bytes");
    if (st.ok() && m.op == "import") st = proto::ValidModelName(m.name);
    if (st.ok() && m.op == "import" && m.bytes.data.empty()) st = Status::Invalid("import needs the model's bytes");
    if (!st.ok()) return SendError(routing, PeekReq(body), "bad_request", st.message());
    if (!sink) {
      return SendError(routing, m.req, "no_registry",
                       "this broker runs without --pg; the model registry lives in PostgreSQL");
    }
    ResultLookup l;
    l.routing = routing;
    l.req = m.req;
    const uint64_t req = m.req;
    l.models = std::move(m);
    if (!sink->Lookup(std::move(l))) return SendError(routing, req, "busy", kSinkBusy);
  }

  void OnDisconnect(const std::string& routing, std::string_view body, int64_t now) {
    proto::Disconnect d;
    if (!proto::DecodeBody(body, &d).ok()) return;  // malformed: ignored (protocol §5.3)
    auto it = worker_by_routing.find(routing);
    if (it == worker_by_routing.end()) return;
    RemoveWorker(it->second, "said goodbye", now);
  }

  // ---- dispatch and timers --------------------------------------------------------------------

  // Leases a job to a worker; returns the assignment to send.
  proto::Assignment LeaseTo(Job& j, WorkerConn& w, uint64_t group, const std::string& model) {
    table.SetState(j, JobState::kLeased);
    j.epoch = ++next_epoch;
    j.worker = w.id;
    j.started = false;
    j.leased_mono = MonoMs();
    j.group = group;
    w.leases.insert(j.id);
    proto::Assignment a;
    a.id = j.id;
    a.epoch = j.epoch;
    a.kind = j.kind;
    a.payload.data = j.payload;
    a.timeout_ms = j.timeout_ms;
    a.attempt = j.attempts;
    a.group = group;
    a.model = model;
    return a;
  }

  // A gang runs whole or not at all, so a member requeued after another member ended `done`
  // (its worker lost between the two ranks' last words) would wait for ever. A rank reports done
  // only after rank 0 has validated, saved and registered the model (the gang's last word), so
  // the training is complete: the left rank ends cancelled, saying so.
  void EndStrandedGangs() {
    for (const auto& [gang, ids] : table.StrandedGangs()) {
      const Job* done = nullptr;
      for (uint64_t id : table.GangMembers(gang)) {
        const Job* m = table.Find(id);
        if (m && m->state == JobState::kDone && (!done || m->rank == 0)) done = m;
      }
      for (uint64_t id : ids) {
        Job* j = table.Find(id);
        if (!j || j->state != JobState::kQueued || j->finishing || !done) continue;
        FinishOne(*j, JobState::kCancelled,
                  "gang " + gang + ": rank " + std::to_string(done->rank) + " (job " + std::to_string(done->id) +
                      ") ended done, which a rank does only once rank 0 has finished the training; this rank "
                      "was lost before its own report, and nothing is left for it");
      }
    }
  }

  void Dispatch() {
    EndStrandedGangs();
    if (!table.HasReady()) return;
    std::vector<WorkerConn*> order;
    for (auto& [id, w] : workers) {
      if (!w.draining && w.UsedSlots() < w.slots) order.push_back(&w);
    }
    // Round-robin one job (or one batch) at a time so work spreads over workers, then send the
    // ASSIGNs, split at ~32 MiB / 1,000 jobs (a batch is never split).
    std::unordered_map<WorkerConn*, std::vector<proto::Assign>> out;
    std::unordered_map<WorkerConn*, size_t> bytes;
    auto add = [&](WorkerConn* w, proto::Assignment a, bool new_message_ok) {
      auto& msgs = out[w];
      size_t size = a.payload.data.size() + 128;
      if (msgs.empty() || (new_message_ok && (bytes[w] + size > (32u << 20) || msgs.back().jobs.size() >= 1000))) {
        msgs.emplace_back();
        bytes[w] = 0;
      }
      bytes[w] += size;
      msgs.back().jobs.push_back(std::move(a));
    };
    // Gangs first: every member at once on idle workers, or none (two gangs never hold parts
    // of the fleet waiting for each other).
    // A gang that could run on the connected workers but finds too few idle holds K of them (the
    // least busy) free of new single jobs until they are, so a stream of small jobs cannot starve it.
    std::unordered_set<WorkerConn*> reserved;
    for (const auto& members : table.ReadyGangs()) {
      Job* first = table.Find(members.front());
      const size_t k = members.size();
      std::vector<WorkerConn*> able, vacant;
      for (auto& [id, w] : workers) {
        if (w.draining || w.slots == 0 || !w.gangs || !(w.kinds.empty() || w.kinds.count(first->kind))) continue;
        able.push_back(&w);
        if (w.UsedSlots() == 0 && !reserved.count(&w)) vacant.push_back(&w);
      }
      // Ranks all-reduce with NCCL on GPUs (one GPU per rank) and Gloo on CPUs: a gang runs on K
      // distinct GPUs when that many are idle, else on K idle CPU workers; else it waits, holding
      // the K least busy workers of the first kind that could ever take it (a worker with several
      // slots may never be idle otherwise).
      std::vector<WorkerConn*> idle;
      for (bool on_gpu : {true, false}) {
        if (std::vector<WorkerConn*> c = GangCandidates(vacant, on_gpu); c.size() >= k) {
          idle.assign(c.begin(), c.begin() + static_cast<std::ptrdiff_t>(k));
          break;
        }
      }
      if (idle.empty()) {
        for (bool on_gpu : {true, false}) {
          std::vector<WorkerConn*> c = GangCandidates(able, on_gpu);
          if (c.size() < k) continue;
          std::stable_sort(c.begin(), c.end(),
                           [](const WorkerConn* a, const WorkerConn* b) { return a->UsedSlots() < b->UsedSlots(); });
          reserved.insert(c.begin(), c.begin() + static_cast<std::ptrdiff_t>(k));
          break;
        }
        continue;
      }
      reserved.insert(idle.begin(), idle.end());  // no single job beside a rank in this round
      std::string rendezvous = (idle[0]->host.empty() ? std::string("127.0.0.1") : idle[0]->host) + ":" +
                               std::to_string(opt.gang_port_base + static_cast<int>(next_gang_port++ % 1000));
      for (size_t i = 0; i < members.size(); ++i) {
        Job* m = table.Find(members[i]);
        proto::Assignment a = LeaseTo(*m, *idle[i], 0, "");
        a.rank = m->rank;
        a.world_size = m->world_size;
        a.rendezvous = rendezvous;
        add(idle[i], std::move(a), true);
      }
      LogInfo("gang_placed").Kv("gang", first->gang).Kv("ranks", static_cast<uint64_t>(members.size()))
          .Kv("rendezvous", rendezvous).Kv("rank0_worker", idle[0]->id);
    }
    bool progress = true;
    while (progress && table.HasReady()) {
      progress = false;
      for (WorkerConn* w : order) {
        if (w->UsedSlots() >= w->slots || reserved.count(w)) continue;
        TakenBatch tb;
        if (!w->models.empty() &&
            table.TakeBatch([w](const std::string& m) { return w->HasModel(m); }, &tb)) {
          uint64_t group = next_group++;
          std::string model = tb.model == proto::kDefaultModel ? w->models.front() : tb.model;
          for (size_t i = 0; i < tb.ids.size(); ++i) {
            Job* j = table.Find(tb.ids[i]);
            add(w, LeaseTo(*j, *w, group, model), i == 0);
          }
          w->groups[group] = static_cast<uint32_t>(tb.ids.size());
          w->grouped_leases += tb.ids.size();
          double budget_ms = opt.batch_budget_s * 1000;
          double fill = std::min(1.0, tb.padded_ms / budget_ms);
          double pad = tb.padded_ms > 0 ? 1.0 - static_cast<double>(tb.audio_ms) / tb.padded_ms : 0;
          batch_fill = batch_fill == 0 ? fill : 0.9 * batch_fill + 0.1 * fill;
          batch_padding = batch_padding == 0 ? pad : 0.9 * batch_padding + 0.1 * pad;
          LogInfo("batch_assigned")
              .Kv("worker", w->id)
              .Kv("model", model)
              .Kv("group", group)
              .Kv("segments", static_cast<uint64_t>(tb.ids.size()))
              .Kv("audio_s", tb.audio_ms / 1000.0)
              .Kv("padding", pad)
              .Kv("full", tb.full);
          progress = true;
          continue;
        }
        uint64_t id = table.PopReady(w->kinds);
        if (id == 0) continue;
        add(w, LeaseTo(*table.Find(id), *w, 0, ""), true);
        progress = true;
      }
    }
    for (auto& [w, msgs] : out) {
      for (const auto& assign : msgs) Send(w->routing, Cmd::kAssign, assign);
    }
  }

  void Timers(int64_t now) {
    table.Promote(now);
    // Workers that missed their heartbeats (at the slower of its interval and the worker's).
    std::vector<std::pair<std::string, int64_t>> gone;
    for (const auto& [id, w] : workers) {
      const int64_t silence = SilenceLimit(w);
      if (now - w.last_seen > silence) gone.emplace_back(id, silence);
    }
    for (const auto& [id, silence] : gone) {
      RemoveWorker(id, "lost (no heartbeat for " + std::to_string(silence) + " ms)", now);
    }
    // Jobs past their per-job timeout.
    while (!deadlines.empty() && deadlines.begin()->first <= now) {
      uint64_t id = deadlines.begin()->second;
      deadlines.erase(deadlines.begin());
      Job* j = table.Find(id);
      if (!j || j->state != JobState::kLeased || j->finishing) continue;
      j->deadline_mono = 0;
      auto w = workers.find(j->worker);
      if (w != workers.end()) {
        proto::CancelJobs c;
        c.leases.push_back({j->id, j->epoch});
        c.reason = "timed out";
        Send(w->second.routing, Cmd::kCancelJobs, c);
      }
      LoseLease(*j, "timed out after " + std::to_string(j->timeout_ms) + " ms", now);
    }
    if (now >= next_heartbeat) {
      ExpireUnstartedLeases(now);
      for (const auto& [id, w] : workers) Send(w.routing, Cmd::kHeartbeat, BrokerHeartbeat());
      next_heartbeat = now + opt.heartbeat_ms;
    }
    if (now >= next_snapshot) {
      next_snapshot = now + 500;
      PublishSnapshot(now);
    }
    if (now >= next_housekeeping) {
      next_housekeeping = now + 1000;
      for (auto it = watchers.begin(); it != watchers.end();) {
        auto& list = it->second;
        list.erase(std::remove_if(list.begin(), list.end(), [&](const Watcher& w) { return w.expires <= now; }),
                   list.end());
        it = list.empty() ? watchers.erase(it) : std::next(it);
      }
      DropExpiredResults();
      ForgetOldJobs();
    }
  }

  static constexpr size_t kMaxKindSeries = 50;

  void PublishSnapshot(int64_t now) {
    auto s = std::make_shared<FleetSnapshot>();
    s->taken_ms = WallMs();
    const auto& c = table.counts();
    for (int i = 0; i < proto::kNumStates; ++i) s->counts[i] = c[i];
    // At most kMaxKindSeries kinds by name, those with the most jobs (queued and leased first);
    // the rest are summed under kind "other", so clients cannot grow the metrics without bound.
    {
      const auto& all = table.kind_counts();
      std::vector<std::pair<std::pair<int64_t, int64_t>, const std::string*>> rank;
      rank.reserve(all.size());
      for (const auto& [kind, kc] : all) {
        int64_t live = kc[static_cast<int>(JobState::kQueued)] + kc[static_cast<int>(JobState::kLeased)], total = 0;
        for (int i = 0; i < proto::kNumStates; ++i) total += kc[i];
        rank.push_back({{-live, -total}, &kind});
      }
      size_t keep = std::min(rank.size(), kMaxKindSeries);
      std::partial_sort(rank.begin(), rank.begin() + static_cast<std::ptrdiff_t>(keep), rank.end());
      for (size_t k = 0; k < rank.size(); ++k) {
        const auto& kc = all.at(*rank[k].second);
        auto& row = s->by_kind[k < keep ? *rank[k].second : std::string("other")];
        for (int i = 0; i < proto::kNumStates; ++i) row[i] += kc[i];
      }
    }
    s->finished_total = finished_total;
    s->submitted_total = submitted_total;
    if (uint64_t oldest = table.OldestQueued()) {
      if (Job* j = table.Find(oldest)) s->oldest_queued_s = std::max<int64_t>(0, s->taken_ms - j->submitted_ms) / 1000.0;
    }
    s->leases = c[static_cast<int>(JobState::kLeased)];
    uint64_t finished = 0;
    for (int i = 2; i < proto::kNumStates; ++i) finished += finished_total[i];
    rate_samples.push_back({now, finished});
    while (rate_samples.size() > 2 && rate_samples.front().first < now - 10000) rate_samples.pop_front();
    if (rate_samples.size() >= 2 && rate_samples.back().first > rate_samples.front().first) {
      s->jobs_per_s = static_cast<double>(rate_samples.back().second - rate_samples.front().second) * 1000.0 /
                      static_cast<double>(rate_samples.back().first - rate_samples.front().first);
    }
    s->batch_fill_ratio = batch_fill;
    s->padding_ratio = batch_padding;
    s->audio_seconds_total = audio_ms_done / 1000.0;
    audio_samples.push_back({now, audio_ms_done});
    while (audio_samples.size() > 2 && audio_samples.front().first < now - 10000) audio_samples.pop_front();
    if (audio_samples.size() >= 2 && audio_samples.back().first > audio_samples.front().first) {
      s->audio_seconds_per_s = (audio_samples.back().second - audio_samples.front().second) /
                               static_cast<double>(audio_samples.back().first - audio_samples.front().first);
    }
    for (const auto& [m, mt] : model_time) s->rtfx_by_model[m] = mt.second > 0 ? mt.first / mt.second : 0;
    for (const auto& [id, w] : workers) {
      FleetSnapshot::Worker x;
      x.id = id;
      x.host = w.host;
      x.device = w.device;
      x.slots = w.slots;
      x.running = static_cast<uint32_t>(w.leases.size());
      x.draining = w.draining;
      x.gpu_mem_bytes = w.gpu_mem_bytes;
      x.outbox_results = w.outbox_results;
      x.idle_ms = now - w.last_seen;
      for (uint64_t l : w.leases) {
        if (x.jobs.size() >= 8) break;
        x.jobs.push_back(l);
      }
      std::sort(x.jobs.begin(), x.jobs.end());
      s->workers.push_back(std::move(x));
    }
    std::sort(s->workers.begin(), s->workers.end(), [](const auto& a, const auto& b) { return a.id < b.id; });
    s->recent_failures.assign(recent_failures.begin(), recent_failures.end());
    if (now >= next_history) {
      next_history = now + 2000;
      history.push_back({s->taken_ms, c[static_cast<int>(JobState::kQueued)], s->leases, s->jobs_per_s});
      if (history.size() > 300) history.pop_front();
    }
    s->history.assign(history.begin(), history.end());
    JournalStats js = journal->Stats();
    s->journal_ok = js.last_ok;
    s->journal_syncs = js.syncs;
    s->journal_errors = js.errors;
    s->pg_configured = sink != nullptr;
    if (sink) {
      EventSinkStats es = sink->GetStats();
      s->pg_up = es.pg_up;
      s->event_backlog = es.records_behind;
    }
    snapshots.Set(std::move(s));
  }

  // Done and cancelled jobs leave the broker --forget-after-s after their end: memory and journal
  // would otherwise grow with every job ever run (about 1 KB each). Their history and results stay
  // in PostgreSQL. A gang leaves whole, once every rank has ended.
  void ForgetOldJobs() {
    if (opt.forget_after_s <= 0) return;
    int64_t cutoff = WallMs() - opt.forget_after_s * 1000;
    JournalBatch b;
    uint64_t n = 0;
    std::vector<uint64_t> cancelled;  // their checkpoints can go: nothing can bring them back now
    while (!forgetting.empty() && forgetting.front().first <= cutoff && b.ops.size() < 10000) {
      uint64_t id = forgetting.front().second;
      forgetting.pop_front();
      // Dead and failed jobs stay: they wait for an operator's RETRY (the dead-letter list).
      auto forgettable = [&](const Job* x) {
        return x && (x->state == JobState::kDone || x->state == JobState::kCancelled) && !x->finishing &&
               x->finished_ms <= cutoff;
      };
      Job* j = table.Find(id);
      if (!forgettable(j)) continue;
      std::vector<uint64_t> ids = {id};
      if (IsGangMember(*j)) {
        ids = table.GangMembers(j->gang);
        bool ended = std::all_of(ids.begin(), ids.end(), [&](uint64_t m) { return forgettable(table.Find(m)); });
        if (!ended) continue;  // the last rank's end brings the gang here again
      }
      for (uint64_t m : ids) {
        if (const Job* x = table.Find(m); x && x->state == JobState::kCancelled) cancelled.push_back(m);
        table.Forget(m);
        b.Erase(rec::JobKey(m));
        b.Erase(rec::StateKey(m));
        ForgetRequestJob(m, &b);
        n++;
      }
    }
    if (!b.empty()) {
      // The next id too: the highest ids may be among these (a journal older than m/next_job_id
      // would otherwise replay to a lower next id).
      b.Put(kNextIdKey, std::to_string(next_job_id));
      journal->Write(std::move(b), /*sync=*/false, 0);
      LogInfo("jobs_forgotten").Kv("jobs", n).Kv("forget_after_s", opt.forget_after_s);
      if (sink) sink->ForgetCheckpoints(std::move(cancelled));
    }
  }

  // Job `id` was forgotten: the request that submitted it goes with its last job (a repeat of that
  // request id is then a new submission).
  void ForgetRequestJob(uint64_t id, JournalBatch* b) {
    auto it = request_by_first.upper_bound(id);
    if (it == request_by_first.begin()) return;
    --it;
    auto rq = requests.find(it->second);
    if (rq == requests.end() || id >= rq->second.first + rq->second.count) return;
    auto left = request_jobs_left.find(it->second);
    if (left == request_jobs_left.end() || --left->second > 0) return;
    b->Erase(rec::RequestKey(it->second));
    request_jobs_left.erase(left);
    requests.erase(rq);
    request_by_first.erase(it);
  }

  void DropExpiredResults() {
    int64_t cutoff = WallMs() - opt.result_retention_s * 1000;
    JournalBatch b;
    while (!retention.empty() && retention.front().first <= cutoff && b.ops.size() < 10000) {
      uint64_t id = retention.front().second;
      retention.pop_front();
      Job* j = table.Find(id);
      if (!j || !proto::IsTerminal(j->state) || j->result_dropped || j->result.empty()) continue;
      if (j->finished_ms > cutoff) continue;  // retried and finished again since; a newer entry exists
      std::string().swap(j->result);
      j->result_dropped = true;
      b.Put(rec::StateKey(id), proto::EncodeBody(StateOf(*j)));
    }
    if (!b.empty()) journal->Write(std::move(b), /*sync=*/false, 0);
  }

  void FlushEvents() {
    for (auto& [batch, events] : pending_events) {
      auto wl = watchers.find(batch);
      if (wl == watchers.end() || events.empty()) continue;
      // Messages of at most 1,000 events and ~32 MiB of results.
      size_t i = 0;
      while (i < events.size()) {
        proto::Event full, lean;
        full.batch = lean.batch = batch;
        size_t bytes = 0;
        for (; i < events.size() && full.jobs.size() < 1000 && bytes < (32u << 20); ++i) {
          bytes += events[i].result.data.size() + 64;
          proto::JobEvent c = events[i];
          c.result.data.clear();
          lean.jobs.push_back(std::move(c));
          full.jobs.push_back(std::move(events[i]));
        }
        for (const auto& w : wl->second) Send(w.routing, Cmd::kEvent, w.results ? full : lean);
      }
    }
    pending_events.clear();
  }

  void HandleLookups() {
    if (!sink) return;
    for (auto& l : sink->TakeLookups()) {
      if (!l.models.op.empty()) {
        if (!l.error.empty()) {
          SendError(l.routing, l.req, l.error_code.empty() ? "pg_unavailable" : l.error_code, l.error);
        } else {
          l.reply.req = l.req;
          Send(l.routing, Cmd::kReply, l.reply);
        }
        continue;
      }
      proto::Reply r;
      r.req = l.req;
      if (l.found) l.info.why.clear();
      else l.info.why = "result dropped after the retention period and not in PostgreSQL" +
                        (l.error.empty() ? std::string() : " (" + l.error + ")");
      r.batch = l.info.batch;
      r.jobs.push_back(std::move(l.info));
      Send(l.routing, Cmd::kReply, r);
    }
  }

  void HandleCompletions() {
    auto completions = journal->TakeCompletions();
    if (sink && !completions.empty()) sink->Notify();
    for (const auto& c : completions) {
      if (auto it = pending_submits.find(c.token); it != pending_submits.end()) {
        OnSubmitWritten(it->second, c.status);
        pending_submits.erase(it);
      } else if (auto f = pending_finishes.find(c.token); f != pending_finishes.end()) {
        // One RESULT_ACK per worker connection for the whole group.
        std::unordered_map<std::string, proto::ResultAck> acks;
        for (auto& pf : f->second) OnFinishWritten(pf, c.status, &acks[pf.worker_routing]);
        for (auto& [routing, ack] : acks) {
          if (!routing.empty() && (!ack.accepted.empty() || !ack.rejected.empty())) {
            Send(routing, Cmd::kResultAck, ack);
          }
        }
        pending_finishes.erase(f);
      }
      if (auto rt = pending_retries.find(c.token); rt != pending_retries.end()) {
        RetryWritten(rt->second, c.status);
        pending_retries.erase(rt);
      }
      // (A reply may share its token with a group of finishes: CANCEL's.)
      if (auto r = pending_replies.find(c.token); r != pending_replies.end()) {
        if (c.status.ok()) {
          Send(r->second.routing, Cmd::kReply, r->second.reply);
        } else {
          SendError(r->second.routing, r->second.reply.req, "journal_unavailable", c.status.message());
        }
        pending_replies.erase(r);
      }
    }
  }

  // Handles one message; never throws.
  void HandleMessage(std::vector<zmq::message_t>& frames, int64_t now) {
    if (frames.size() < 2) return;  // cannot even reply
    const std::string routing = frames[0].to_string();
    if (frames.size() != 4) {
      SendError(routing, 0, "bad_frames", "a message has exactly 3 frames after the routing id: tag, command, body");
      return;
    }
    Status st = proto::CheckTag(frames[1].to_string_view());
    if (!st.ok()) {
      SendError(routing, PeekReq(frames[3].to_string_view()), st.code() == Status::Code::kUnavailable ? "unsupported_version" : "bad_tag", st.message());
      return;
    }
    Cmd cmd;
    st = proto::ParseCmd(frames[2].to_string_view(), &cmd);
    if (!st.ok()) {
      SendError(routing, PeekReq(frames[3].to_string_view()), "unknown_command", st.message());
      return;
    }
    std::string_view body = frames[3].to_string_view();
    switch (cmd) {
      case Cmd::kSubmit: return OnSubmit(routing, body);
      case Cmd::kStatus: return OnStatus(routing, body);
      case Cmd::kCancel: return OnCancel(routing, body);
      case Cmd::kWatch: return OnWatch(routing, body, now);
      case Cmd::kWorkers: return OnWorkers(routing, body, now);
      case Cmd::kJobs: return OnJobs(routing, body);
      case Cmd::kRetry: return OnRetry(routing, body);
      case Cmd::kModels: return OnModels(routing, body);
      case Cmd::kReady: return OnReady(routing, body, now);
      case Cmd::kHeartbeat: return OnHeartbeat(routing, body, now);
      case Cmd::kStarted: return OnStarted(routing, body, now);
      case Cmd::kResult: return OnResult(routing, body, now);
      case Cmd::kProgress: return OnProgress(routing, body, now);
      case Cmd::kDisconnect: return OnDisconnect(routing, body, now);
      default:
        SendError(routing, 0, "unknown_command",
                  std::string("the broker does not accept ") + proto::CmdName(cmd) + " from peers");
    }
  }
};

Broker::Broker(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Broker::~Broker() = default;
std::string Broker::endpoint() const { return impl_->endpoint; }
int Broker::http_port() const { return impl_->http ? impl_->http->port() : 0; }

Status Broker::Open(const BrokerOptions& options, std::unique_ptr<Broker>* out) {
  auto impl = std::make_unique<Impl>();
  impl->opt = options;
  ASRF_RETURN_IF_ERROR(impl->opt.Sanitize());
  BatcherOptions bo;
  bo.budget_s = impl->opt.batch_budget_s;
  bo.max_items = impl->opt.batch_max_items;
  bo.max_delay_ms = impl->opt.batch_max_delay_ms;
  impl->table.SetBatching(bo);
  impl->table.SetNow(MonoMs());
  std::error_code ec;
  std::filesystem::create_directories(impl->opt.state_dir, ec);
  if (ec) return Status::IOError("cannot create state dir " + impl->opt.state_dir + ": " + ec.message());
  JournalOptions jo;
  jo.dir = impl->opt.state_dir + "/journal";
  jo.env = impl->opt.journal_env;
  ASRF_RETURN_IF_ERROR(Journal::Open(jo, &impl->journal));
  impl->next_epoch = impl->journal->generation() << 32;
  impl->next_event_seq = (impl->journal->generation() << 32) + 1;
  if (!impl->opt.pg.empty()) {
    ASRF_RETURN_IF_ERROR(CheckConninfo(impl->opt.pg).WithContext("--pg"));
    EventSinkOptions eo;
    eo.conninfo = impl->opt.pg;
    eo.statement_timeout_ms = impl->opt.pg_statement_timeout_ms;
    impl->sink = std::make_unique<EventSink>(eo, impl->journal.get());
  } else {
    LogWarn("no_postgresql").Kv("detail", "no --pg / ASRF_PG: job history is kept only in the journal");
  }
  ASRF_RETURN_IF_ERROR(impl->Replay());
  const std::string restored = impl->opt.state_dir + "/continue-ids-after-postgres";
  std::error_code marker_ec;
  if (!impl->opt.pg.empty() && (impl->next_job_id == 1 || std::filesystem::exists(restored, marker_ec)) &&
      impl->ContinueIdsAfterPostgres()) {
    std::filesystem::remove(restored, marker_ec);
  }
  try {
    impl->sock.set(zmq::sockopt::maxmsgsize, proto::kMaxMessageBytes);
    impl->sock.set(zmq::sockopt::linger, 0);
    // Per peer: a client that never reads its replies holds at most this many in the broker's
    // memory (then they are dropped), and a peer sending faster than the broker reads is held
    // back by TCP instead of queueing without bound.
    impl->sock.set(zmq::sockopt::sndhwm, 1000);
    impl->sock.set(zmq::sockopt::rcvhwm, 1000);
    impl->sock.bind(impl->opt.listen);
    impl->endpoint = impl->sock.get(zmq::sockopt::last_endpoint);
  } catch (const zmq::error_t& e) {
    return Status::Unavailable("cannot listen on " + impl->opt.listen + ": " + e.what());
  }
  if (!impl->opt.http.empty()) {
    impl->PublishSnapshot(MonoMs());
    Journal* journal = impl->journal.get();
    ASRF_RETURN_IF_ERROR(HttpServer::Start(
        impl->opt.http, &impl->snapshots,
        [journal, state = impl->opt.state_dir](const std::string& dir) -> Status {
          // Only a new folder inside the state dir (the journal holds every job's payload), and
          // readable by the broker's user only.
          std::error_code ec;
          std::filesystem::path root = std::filesystem::weakly_canonical(state, ec);
          std::filesystem::path want = std::filesystem::weakly_canonical(dir, ec);
          if (ec || want.parent_path() != root) {
            return Status::Invalid("dir must be a new folder directly inside the state dir " + root.string());
          }
          ASRF_RETURN_IF_ERROR(journal->Checkpoint(want.string()));
          std::filesystem::permissions(want, std::filesystem::perms::owner_all, ec);
          return Status::Ok();
        },
        &impl->http));
    std::ofstream f(impl->opt.state_dir + "/http.endpoint.tmp");
    f << impl->opt.http.substr(0, impl->opt.http.rfind(':')) << ":" << impl->http->port() << "\n";
    f.close();
    std::filesystem::rename(impl->opt.state_dir + "/http.endpoint.tmp", impl->opt.state_dir + "/http.endpoint", ec);
  }
  {
    std::string tmp = impl->opt.endpoint_file + ".tmp";
    std::ofstream f(tmp);
    f << impl->endpoint << "\n";
    f.close();
    std::filesystem::rename(tmp, impl->opt.endpoint_file, ec);
  }
  out->reset(new Broker(std::move(impl)));
  return Status::Ok();
}

Status Broker::Run(const std::atomic<bool>* stop) {
  Impl& s = *impl_;
  LogInfo("broker_listening").Kv("endpoint", s.endpoint).Kv("state_dir", s.opt.state_dir);
  std::vector<zmq::message_t> frames;
  while (!stop->load()) {
    zmq::pollitem_t items[3] = {{s.sock.handle(), 0, ZMQ_POLLIN, 0},
                                {nullptr, s.journal->wake_fd(), ZMQ_POLLIN, 0},
                                {nullptr, s.sink ? s.sink->wake_fd() : -1, ZMQ_POLLIN, 0}};
    try {
      zmq::poll(items, s.sink ? 3 : 2, std::chrono::milliseconds(s.table.HasReady() ? 10 : 50));
    } catch (const zmq::error_t& e) {
      if (e.num() != EINTR) return Status::IOError(std::string("poll: ") + e.what());
    }
    int64_t now = MonoMs();
    s.table.SetNow(now);
    for (int n = 0; n < s.opt.max_messages_per_wake; ++n) {
      frames.clear();
      try {
        zmq::message_t msg;
        if (!s.sock.recv(msg, zmq::recv_flags::dontwait)) break;
        bool more = msg.more();
        frames.push_back(std::move(msg));
        while (more) {
          zmq::message_t part;
          if (!s.sock.recv(part, zmq::recv_flags::none)) break;
          more = part.more();
          if (frames.size() < 8) frames.push_back(std::move(part));  // extra frames: malformed anyway
          else frames.back() = zmq::message_t(1);
        }
      } catch (const zmq::error_t& e) {
        if (e.num() == EINTR) break;
        LogError("recv_failed").Kv("error", e.what());
        break;
      }
      s.HandleMessage(frames, now);
    }
    s.HandleCompletions();
    s.HandleLookups();
    s.Timers(now);
    s.Dispatch();
    s.FlushEvents();
  }
  LogInfo("broker_stopping").Kv("pending_writes", static_cast<uint64_t>(s.pending_submits.size() +
                                                                         s.pending_finishes.size()));
  s.journal->Flush();
  s.HandleCompletions();
  s.FlushEvents();
  return Status::Ok();
}

}  // namespace asrf
