#include "worker/worker.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <filesystem>
#include <mutex>
#include <random>
#include <set>
#include <thread>
#include <unordered_map>

#include <zmq.hpp>

#include "common/clock.h"
#include "common/log.h"
#include "schema/protocol.h"
#include "worker/result_sink.h"

namespace asrf {

using proto::Cmd;

Status WorkerOptions::Sanitize() {
  if (broker.empty()) return Status::Invalid("--broker must not be empty");
  if (device != "cpu" && device.rfind("cuda:", 0) != 0) {
    return Status::Invalid("--device must be cpu or cuda:N, not \"" + device + "\"");
  }
  ClampOption("--slots", &slots, 1, 1024);
  ClampOption<int64_t>("--heartbeat-ms", &heartbeat_ms, 50, 60000);
  ClampOption("--heartbeat-misses", &heartbeat_misses, 1, 100);
  ClampOption<int64_t>("--pg-statement-timeout-ms", &pg_statement_timeout_ms, 100, 3600000);
  if (worker_id.size() > 256) {
    return Status::Invalid("--worker-id must be at most 256 bytes (the broker refuses longer ones), not " +
                           std::to_string(worker_id.size()));
  }
  if (worker_id.empty()) {
    char host[256] = {0};
    gethostname(host, sizeof(host) - 1);
    worker_id = std::string(host) + "/" + device + "/" + std::to_string(getpid());
  }
  return Status::Ok();
}

namespace {

struct Task {
  proto::Assignment a;
  std::shared_ptr<std::atomic<bool>> cancelled;
};

// What an executor runs: one job, or the jobs of one batch (ASSIGN group).
struct Work {
  std::vector<Task> tasks;
};

struct Done {
  proto::Lease lease;
  std::string kind;
  proto::JobResult result;
};

// A result sent and not yet acknowledged.
struct Unacked {
  uint64_t epoch = 0;
  std::string kind;
  bool done = false;  // ok and not given back: acknowledged, the job is done
  bool sent = false;  // `result` holds what was sent, to send again on a new connection
  proto::JobResult result;
};

}  // namespace

struct Worker::Impl {
  WorkerOptions opt;
  JobRegistry registry;
  zmq::context_t ctx{1};
  std::unique_ptr<zmq::socket_t> sock;
  std::unique_ptr<ResultSink> sink;  // with --pg: results become durable there before RESULT
  int wake_fd = -1;

  std::mutex mu;
  std::condition_variable cv;
  std::deque<Work> tasks;   // GUARDED_BY(mu)
  std::vector<Done> done;   // GUARDED_BY(mu)
  std::unordered_map<uint64_t, proto::Progress> progress;  // latest per job; GUARDED_BY(mu)
  std::atomic<bool> stopping{false};  // draining: long jobs checkpoint and give their job back
  bool stopping_threads = false;
  std::vector<std::thread> threads;

  // Poll-thread state.
  std::unordered_map<uint64_t, std::pair<uint64_t, std::shared_ptr<std::atomic<bool>>>> running;  // id -> epoch
  std::unordered_map<uint64_t, Task> awaiting_start;  // assigned, STARTED sent, not yet confirmed
  std::unordered_map<uint64_t, std::vector<Task>> confirmed_groups;  // batch members confirmed so far
  std::unordered_map<uint64_t, Unacked> unacked;  // id -> result sent but not acknowledged
  int64_t last_broker_seen = 0;
  int64_t broker_heartbeat_ms = 0;  // the broker's interval, from its HEARTBEATs (0: not yet said)
  std::string instance;  // this process's random token in READY (a reconnect keeps it)
  bool refused = false;  // READY refused (worker_id_in_use): no heartbeats until READY again
  int64_t next_heartbeat = 0;
  bool draining = false;
  int64_t last_results_sent = 0;  // when the last RESULT went out

  void Connect() {
    sock = std::make_unique<zmq::socket_t>(ctx, zmq::socket_type::dealer);
    sock->set(zmq::sockopt::linger, 0);
    sock->set(zmq::sockopt::maxmsgsize, proto::kMaxMessageBytes);
    sock->set(zmq::sockopt::sndhwm, 100000);
    sock->set(zmq::sockopt::rcvhwm, 100000);
    sock->connect(opt.broker);
    proto::Ready r;
    r.worker_id = opt.worker_id;
    char host[256] = {0};
    gethostname(host, sizeof(host) - 1);
    r.host = opt.advertise_host.empty() ? std::string(host) : opt.advertise_host;
    r.device = opt.device;
    r.gpu = opt.gpu;
    r.gangs = opt.gangs;
    r.slots = static_cast<uint32_t>(opt.slots);
    r.kinds = registry.Kinds();
    r.models = registry.models();
    r.draining = draining;
    r.heartbeat_ms = static_cast<uint32_t>(opt.heartbeat_ms);
    r.instance = instance;
    for (const auto& [id, e] : running) r.running.push_back({id, e.first});
    // Finished here but not yet acknowledged: the lease is still ours until the broker has the
    // result, which goes again on this connection (a broker that saw it already answers it).
    for (const auto& [id, u] : unacked) {
      if (!running.count(id)) r.running.push_back({id, u.epoch});
    }
    Send(Cmd::kReady, r);
    proto::Started again;  // confirmations lost with the old connection
    for (const auto& [id, t] : awaiting_start) again.leases.push_back({id, t.a.epoch});
    if (!again.leases.empty()) Send(Cmd::kStarted, again);
    std::vector<proto::JobResult> resend;
    for (const auto& [id, u] : unacked) {
      if (u.sent) resend.push_back(u.result);
    }
    if (!resend.empty()) {
      LogInfo("results_sent_again").Kv("results", static_cast<uint64_t>(resend.size()));
      SendResults(std::move(resend), /*fresh=*/false);
    }
    last_broker_seen = MonoMs();
    LogInfo("worker_connecting").Kv("broker", opt.broker).Kv("worker", opt.worker_id)
        .Kv("running", static_cast<uint64_t>(running.size()));
  }

  template <typename T>
  void Send(Cmd cmd, const T& body) {
    std::string b = proto::EncodeBody(body);
    uint8_t c = static_cast<uint8_t>(cmd);
    try {
      sock->send(zmq::buffer(proto::kTag), zmq::send_flags::sndmore | zmq::send_flags::dontwait);
      sock->send(zmq::buffer(&c, 1), zmq::send_flags::sndmore | zmq::send_flags::dontwait);
      sock->send(zmq::buffer(b), zmq::send_flags::dontwait);
    } catch (const zmq::error_t& e) {
      LogWarn("send_failed").Kv("cmd", proto::CmdName(cmd)).Kv("error", e.what());
    }
  }

  void Wake() {
    uint64_t one = 1;
    ssize_t unused = ::write(wake_fd, &one, sizeof(one));
    (void)unused;
  }

  void ExecutorLoop() {
    for (;;) {
      Work w;
      {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return stopping_threads || !tasks.empty(); });
        if (tasks.empty()) return;
        w = std::move(tasks.front());
        tasks.pop_front();
      }
      std::vector<Done> out;
      const BatchFn* bfn = w.tasks.empty() ? nullptr : registry.FindBatch(w.tasks.front().a.kind);
      if (bfn) out = RunBatch(*bfn, w);
      else for (auto& t : w.tasks) out.push_back(RunOne(t));
      for (auto& d : out) {
        if (d.result.ok && d.result.result.data.size() > proto::kMaxResultBytes) {
          d.result.ok = false;
          d.result.error = "result of " + std::to_string(d.result.result.data.size()) + " bytes is over the " +
                           std::to_string(proto::kMaxResultBytes) + "-byte limit";
          d.result.result.data.clear();
        }
      }
      bool first;
      {
        std::lock_guard<std::mutex> lock(mu);
        first = done.empty();
        for (auto& d : out) done.push_back(std::move(d));
      }
      if (first) Wake();  // the poll thread takes everything queued at once
    }
  }

  Done RunOne(Task& t) {
    Done d;
    d.lease = {t.a.id, t.a.epoch};
    d.kind = t.a.kind;
    d.result.id = t.a.id;
    d.result.epoch = t.a.epoch;
    int64_t t0 = MonoUs();
    const JobFn* fn = registry.Find(t.a.kind);
    Status st;
    std::string result;
    if (!fn) {
      st = Status::Invalid("this worker has no job kind \"" + t.a.kind + "\"");
    } else if (t.cancelled->load()) {
      st = Status::Unavailable("cancelled");
    } else {
      JobContext ctx;
      ctx.id = t.a.id;
      ctx.attempt = t.a.attempt;
      ctx.rank = t.a.rank;
      ctx.world_size = std::max<uint32_t>(t.a.world_size, 1);
      ctx.rendezvous = t.a.rendezvous;
      ctx.cancelled = t.cancelled.get();
      ctx.stopping = &stopping;
      ctx.progress = [this, id = t.a.id, epoch = t.a.epoch](const std::string& info) {
        bool first;
        {
          std::lock_guard<std::mutex> lock(mu);
          first = progress.empty() && done.empty();
          progress[id] = proto::Progress{id, epoch, info};
        }
        if (first) Wake();
      };
      try {
        st = (*fn)(t.a.payload.data, ctx, &result);
      } catch (const std::exception& e) {
        st = Status::Invalid(std::string("job threw: ") + e.what());
      }
    }
    d.result.run_ms = (MonoUs() - t0) / 1000;
    // Busy: the job stopped on purpose after saving its state (the worker drains, or a training
    // gang lost a member) and goes back to the queue without an attempt.
    d.result.requeue = st.code() == Status::Code::kBusy;
    d.result.ok = st.ok();
    if (st.ok()) d.result.result.data = std::move(result);
    else d.result.error = st.message().substr(0, proto::kMaxStringBytes);
    return d;
  }

  // One call for the whole batch; each job's run time is its share (by payload size) of the
  // batch's, so summed run times stay the real compute time.
  std::vector<Done> RunBatch(const BatchFn& fn, Work& w) {
    size_t n = w.tasks.size();
    std::vector<std::string_view> payloads;
    size_t total_bytes = 0;
    for (auto& t : w.tasks) {
      payloads.push_back(t.a.payload.data);
      total_bytes += t.a.payload.data.size();
    }
    std::vector<Status> statuses(n);
    std::vector<std::string> results(n);
    BatchContext ctx;
    ctx.model = w.tasks.front().a.model;
    ctx.all_cancelled = [&w] {
      for (auto& t : w.tasks) if (!t.cancelled->load()) return false;
      return true;
    };
    int64_t t0 = MonoUs();
    try {
      fn(payloads, ctx, &statuses, &results);
    } catch (const std::exception& e) {
      for (auto& st : statuses) st = Status::Invalid(std::string("batch threw: ") + e.what());
    }
    int64_t run_us = MonoUs() - t0;
    std::vector<Done> out(n);
    for (size_t i = 0; i < n; ++i) {
      Done& d = out[i];
      const proto::Assignment& a = w.tasks[i].a;
      d.lease = {a.id, a.epoch};
      d.kind = a.kind;
      d.result.id = a.id;
      d.result.epoch = a.epoch;
      double share = total_bytes ? static_cast<double>(a.payload.data.size()) / total_bytes : 1.0 / n;
      d.result.run_ms = static_cast<int64_t>(run_us * share / 1000);
      const bool cancelled = w.tasks[i].cancelled->load();
      Status st = cancelled ? Status::Unavailable("cancelled") : statuses[i];
      d.result.ok = st.ok();
      // The batch's device or library failed, not this job's input (that is Invalid): another
      // try, counted, on this worker or another.
      d.result.retry = !st.ok() && !cancelled &&
                       (st.code() == Status::Code::kUnavailable || st.code() == Status::Code::kIOError);
      if (st.ok()) d.result.result.data = std::move(results[i]);
      else d.result.error = st.message().substr(0, proto::kMaxStringBytes);
    }
    LogInfo("batch_done")
        .Kv("jobs", static_cast<uint64_t>(n))
        .Kv("first_job", w.tasks.front().a.id)
        .Kv("model", ctx.model)
        .Kv("ms", run_us / 1000);
    return out;
  }

  // A job runs only after the broker confirmed its STARTED: then a job that kills this process
  // is known to have started and counts an attempt.
  void OnAssign(std::string_view body) {
    proto::Assign m;
    Status st = proto::DecodeBody(body, &m);
    if (!st.ok()) {
      LogError("bad_assign").Kv("error", st.message());
      return;
    }
    proto::Started started;
    for (auto& a : m.jobs) {
      auto flag = std::make_shared<std::atomic<bool>>(false);
      running[a.id] = {a.epoch, flag};
      LogDebug("job_assigned").Kv("job", a.id).Kv("epoch", a.epoch).Kv("kind", a.kind);
      started.leases.push_back({a.id, a.epoch});
      awaiting_start[a.id] = {std::move(a), flag};
    }
    if (!started.leases.empty()) Send(Cmd::kStarted, started);
  }

  void OnStartConfirmed(std::string_view body) {
    proto::Started m;
    if (!proto::DecodeBody(body, &m).ok()) return;
    std::vector<uint64_t> groups;
    std::lock_guard<std::mutex> lock(mu);
    for (const auto& l : m.leases) {
      auto it = awaiting_start.find(l.id);
      if (it == awaiting_start.end() || it->second.a.epoch != l.epoch) continue;
      if (uint64_t g = it->second.a.group) {
        confirmed_groups[g].push_back(std::move(it->second));
        groups.push_back(g);
      } else {
        tasks.push_back(Work{{std::move(it->second)}});
        cv.notify_one();
      }
      awaiting_start.erase(it);
    }
    for (uint64_t g : groups) ReleaseGroupIfComplete(g);
  }

  // A batch runs once every member is confirmed (or was cancelled before it started).
  // REQUIRES: mu held.
  void ReleaseGroupIfComplete(uint64_t g) {
    auto it = confirmed_groups.find(g);
    if (it == confirmed_groups.end()) return;
    for (const auto& [id, t] : awaiting_start) if (t.a.group == g) return;
    tasks.push_back(Work{std::move(it->second)});
    confirmed_groups.erase(it);
    cv.notify_one();
  }

  void OnCancelJobs(std::string_view body) {
    proto::CancelJobs m;
    if (!proto::DecodeBody(body, &m).ok()) return;
    for (const auto& l : m.leases) {
      auto it = running.find(l.id);
      if (it != running.end() && it->second.first == l.epoch) {
        it->second.second->store(true);
        LogInfo("job_cancel_requested").Kv("job", l.id).Kv("reason", m.reason);
        auto waiting = awaiting_start.find(l.id);
        if (waiting != awaiting_start.end() && waiting->second.a.epoch == l.epoch) {
          // Never started here: nothing to report.
          uint64_t g = waiting->second.a.group;
          awaiting_start.erase(waiting);
          running.erase(it);
          if (g) {
            std::lock_guard<std::mutex> lock(mu);
            ReleaseGroupIfComplete(g);
          }
        }
      }
    }
  }

  void OnResultAck(std::string_view body) {
    proto::ResultAck m;
    if (!proto::DecodeBody(body, &m).ok()) return;
    for (const auto& l : m.accepted) {
      auto it = unacked.find(l.id);
      if (it == unacked.end() || it->second.epoch != l.epoch) continue;
      if (it->second.done) registry.Done(it->second.kind, l.id);
      unacked.erase(it);
    }
    for (const auto& r : m.rejected) {
      // From a connection the broker did not know (ZeroMQ reconnected underneath, so the broker
      // saw a new peer): kept, and sent again after the READY the broker asks for next.
      if (r.reason.rfind("unknown worker", 0) == 0) {
        LogInfo("result_held_for_ready").Kv("job", r.id).Kv("epoch", r.epoch);
        continue;
      }
      auto it = unacked.find(r.id);  // only that lease's: the job may have come back with a new epoch
      if (it != unacked.end() && it->second.epoch == r.epoch) unacked.erase(it);
      LogWarn("result_rejected").Kv("job", r.id).Kv("epoch", r.epoch).Kv("reason", r.reason);
    }
  }

  void HandleIncoming(int64_t now) {
    for (int n = 0; n < 1000; ++n) {
      std::vector<zmq::message_t> frames;
      try {
        zmq::message_t msg;
        if (!sock->recv(msg, zmq::recv_flags::dontwait)) return;
        bool more = msg.more();
        frames.push_back(std::move(msg));
        while (more) {
          zmq::message_t part;
          if (!sock->recv(part, zmq::recv_flags::none)) break;
          more = part.more();
          frames.push_back(std::move(part));
        }
      } catch (const zmq::error_t& e) {
        return;
      }
      if (frames.size() != 3 || !proto::CheckTag(frames[0].to_string_view()).ok()) continue;
      Cmd cmd;
      if (!proto::ParseCmd(frames[1].to_string_view(), &cmd).ok()) continue;
      last_broker_seen = now;
      std::string_view body = frames[2].to_string_view();
      switch (cmd) {
        case Cmd::kAssign: OnAssign(body); break;
        case Cmd::kCancelJobs: OnCancelJobs(body); break;
        case Cmd::kResultAck: OnResultAck(body); break;
        case Cmd::kStarted: OnStartConfirmed(body); break;
        case Cmd::kHeartbeat: {
          refused = false;
          proto::Heartbeat h;
          if (proto::DecodeBody(body, &h).ok()) broker_heartbeat_ms = std::min<int64_t>(h.heartbeat_ms, 600000);
          break;
        }
        case Cmd::kDisconnect: {
          // The broker does not know us (it restarted): introduce ourselves again.
          LogInfo("broker_asked_ready");
          sock.reset();
          Connect();
          return;
        }
        case Cmd::kError: {
          proto::Error e;
          if (proto::DecodeBody(body, &e).ok()) LogError("broker_error").Kv("code", e.code).Kv("message", e.message);
          // Another live process has this worker id: stay quiet (a HEARTBEAT would only bring a
          // DISCONNECT and another READY at once) and try again after the silence limit.
          if (e.code == "worker_id_in_use") refused = true;
          break;
        }
        default: break;
      }
    }
  }

  void FlushDone() {
    std::vector<Done> batch;
    std::unordered_map<uint64_t, proto::Progress> reports;
    {
      std::lock_guard<std::mutex> lock(mu);
      batch.swap(done);
      reports.swap(progress);
    }
    for (const auto& [id, p] : reports) {
      if (running.count(id)) Send(Cmd::kProgress, p);
    }
    if (batch.empty()) return;
    std::vector<proto::JobResult> results;
    for (auto& d : batch) {
      // Only this lease: the job may have been leased again (new epoch) meanwhile.
      auto it = running.find(d.lease.id);
      if (it != running.end() && it->second.first == d.lease.epoch) running.erase(it);
      Unacked u;
      u.epoch = d.lease.epoch;
      u.kind = d.kind;
      u.done = d.result.ok && !d.result.requeue;
      unacked[d.lease.id] = std::move(u);
      if (!d.result.ok) LogInfo("job_failed").Kv("job", d.lease.id).Kv("error", d.result.error);
      results.push_back(std::move(d.result));
    }
    if (sink) sink->Put(std::move(results));
    else SendResults(std::move(results));
  }

  // RESULT messages of at most 1,000 results and ~32 MiB. `fresh`: not results sent again on a
  // new connection (a reconnect every few seconds must not put off a stop's end for ever).
  void SendResults(std::vector<proto::JobResult> all, bool fresh = true) {
    proto::Result results;
    size_t bytes = 0;
    for (auto& r : all) {
      auto u = unacked.find(r.id);
      if (u != unacked.end() && u->second.epoch == r.epoch) {
        u->second.result = r;
        u->second.sent = true;
      }
      bytes += r.result.data.size() + r.error.size() + 64;
      results.results.push_back(std::move(r));
      if (results.results.size() >= 1000 || bytes >= (32u << 20)) {
        Send(Cmd::kResult, results);
        results.results.clear();
        bytes = 0;
      }
    }
    if (!results.results.empty()) Send(Cmd::kResult, results);
    if (fresh) last_results_sent = MonoMs();
  }
};

Worker::Worker(WorkerOptions options, JobRegistry registry) : impl_(std::make_unique<Impl>()) {
  impl_->opt = std::move(options);
  std::random_device rd;
  char token[17];
  std::snprintf(token, sizeof(token), "%08x%08x", rd(), rd());
  impl_->instance = token;
  impl_->registry = std::move(registry);
}

Worker::~Worker() {
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    impl_->stopping_threads = true;
  }
  impl_->cv.notify_all();
  for (auto& t : impl_->threads) if (t.joinable()) t.join();
  if (impl_->wake_fd >= 0) ::close(impl_->wake_fd);
}

Status Worker::Run(const std::atomic<bool>* stop) {
  Impl& s = *impl_;
  ASRF_RETURN_IF_ERROR(s.opt.Sanitize());
  std::error_code ec;
  std::filesystem::create_directories(s.opt.state_dir, ec);
  if (ec) return Status::IOError("cannot create state dir " + s.opt.state_dir + ": " + ec.message());
  s.wake_fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (s.wake_fd < 0) return Status::IOError("eventfd failed");
  if (!s.opt.pg.empty()) {
    ResultSinkOptions so;
    so.conninfo = s.opt.pg;
    so.outbox_dir = s.opt.state_dir + "/outbox";
    so.worker_id = s.opt.worker_id;
    so.statement_timeout_ms = s.opt.pg_statement_timeout_ms;
    char host[256] = {0};
    gethostname(host, sizeof(host) - 1);
    so.host = host;
    so.device = s.opt.device;
    ASRF_RETURN_IF_ERROR(ResultSink::Open(so, &s.sink));
  } else {
    LogWarn("no_postgresql").Kv("detail", "no --pg / ASRF_PG: results go only to the broker");
  }
  for (int i = 0; i < s.opt.slots; ++i) s.threads.emplace_back([&s] { s.ExecutorLoop(); });
  try {
    s.Connect();
  } catch (const zmq::error_t& e) {
    return Status::Invalid("cannot connect to " + s.opt.broker + ": " + e.what());
  }
  int64_t drain_started = 0;
  for (;;) {
    int64_t now = MonoMs();
    if (stop->load() && !s.draining) {
      s.draining = true;
      s.stopping = true;
      drain_started = now;
      s.Send(Cmd::kHeartbeat, proto::Heartbeat{true, 0, 0});
      LogInfo("worker_draining").Kv("running", static_cast<uint64_t>(s.running.size()));
    }
    // Leases the broker never confirmed (it may be gone): they never ran here, and the broker
    // requeues them when this worker says goodbye. Waiting for them would never end; but they
    // are given up only once nothing else holds the stop, as a confirmation that comes while a
    // long job finishes still runs its job (dropped, the lease was a started job the broker
    // counted an attempt for and then requeued).
    // The wait counts from the later of the stop's start and the last new RESULT sent.
    const bool waited = now - std::max(drain_started, s.last_results_sent) > s.opt.drain_ack_wait_ms;
    bool only_unstarted = true;
    for (const auto& [id, e] : s.running) only_unstarted = only_unstarted && s.awaiting_start.count(id);
    if (s.draining && !s.awaiting_start.empty() && only_unstarted && (!s.sink || s.sink->Pending() == 0) && waited) {
      std::lock_guard<std::mutex> lock(s.mu);
      std::set<uint64_t> groups;
      for (const auto& [id, t] : s.awaiting_start) {
        LogWarn("lease_left_unstarted").Kv("job", id).Kv("epoch", t.a.epoch);
        s.running.erase(id);
        if (t.a.group) groups.insert(t.a.group);
      }
      s.awaiting_start.clear();
      for (uint64_t g : groups) s.ReleaseGroupIfComplete(g);
    }
    if (s.draining && s.running.empty() && (!s.sink || s.sink->Pending() == 0)) {
      bool sent_now = false;  // then `waited` is out of date: their wait starts now
      if (s.sink) {
        std::vector<proto::JobResult> durable = s.sink->TakeDurable();
        sent_now = !durable.empty();
        if (sent_now) s.SendResults(std::move(durable));
      }
      // The wait for acknowledgements counts from the last RESULT sent: a job that ended after a
      // long drain gets the same wait as one that ended at its start (its result used to go out
      // as the worker left, unacknowledged, and a broker that missed it ran the job again).
      if (s.unacked.empty()) break;
      if (waited && !sent_now) {
        LogWarn("results_unacknowledged").Kv("results", static_cast<uint64_t>(s.unacked.size()))
            .Kv("job", s.unacked.begin()->first)
            .Kv("detail", s.sink ? "durable in PostgreSQL or the outbox; the broker may run them again"
                                 : "the broker did not confirm them and may run them again");
        break;
      }
    }
    zmq::pollitem_t items[3] = {{s.sock->handle(), 0, ZMQ_POLLIN, 0},
                                {nullptr, s.wake_fd, ZMQ_POLLIN, 0},
                                {nullptr, s.sink ? s.sink->wake_fd() : -1, ZMQ_POLLIN, 0}};
    try {
      zmq::poll(items, s.sink ? 3 : 2, std::chrono::milliseconds(50));
    } catch (const zmq::error_t& e) {
      if (e.num() != EINTR) return Status::IOError(std::string("poll: ") + e.what());
    }
    if (items[1].revents & ZMQ_POLLIN) {
      uint64_t drained;
      ssize_t unused = ::read(s.wake_fd, &drained, sizeof(drained));
      (void)unused;
    }
    now = MonoMs();
    s.HandleIncoming(now);
    s.FlushDone();
    if (s.sink) {
      std::vector<proto::JobResult> durable = s.sink->TakeDurable();
      if (!durable.empty()) s.SendResults(std::move(durable));
    }
    if (now >= s.next_heartbeat && !s.refused) {
      proto::Heartbeat hb{s.draining, s.opt.gpu_memory ? s.opt.gpu_memory() : 0, 0};
      if (s.sink) hb.outbox_results = static_cast<int64_t>(s.sink->GetStats().outbox_size);
      s.Send(Cmd::kHeartbeat, hb);
      s.next_heartbeat = now + s.opt.heartbeat_ms;
    }
    // The broker is taken for gone after heartbeat_misses of the slower of the two intervals.
    if (now - s.last_broker_seen > std::max(s.opt.heartbeat_ms, s.broker_heartbeat_ms) * s.opt.heartbeat_misses) {
      LogWarn("broker_lost").Kv("broker", s.opt.broker).Kv("silent_ms", now - s.last_broker_seen);
      s.Connect();  // unacknowledged results go again: a restarted broker answers stale ones
    }
  }
  proto::Disconnect d;
  d.reason = "drained";
  s.Send(Cmd::kDisconnect, d);
  // The last RESULT and the DISCONNECT may still sit in the socket's queue: give them a second
  // to leave (linger 0, set for reconnects, would drop them when the socket closes).
  try {
    s.sock->set(zmq::sockopt::linger, 1000);
  } catch (const zmq::error_t&) {
  }
  LogInfo("worker_stopped").Kv("worker", s.opt.worker_id);
  return Status::Ok();
}

}  // namespace asrf
