// bench/queue_throughput: end-to-end durable echo jobs through the real binaries.
//
// Starts asr-broker and two asr-worker processes on loopback with a fresh state dir, then
//  1. throughput: submits --count echo jobs (SUBMITs of 1,000, 8 in flight) and waits for every
//     result to arrive at the client as an EVENT; jobs/s = count / (first submit -> last result);
//  2. latency: submits --latency-count jobs one per SUBMIT at a fixed --rate and measures, per
//     job, the time from sending its SUBMIT to receiving its result EVENT; prints p50 and p99.
// Every SUBMIT is acknowledged only after its journal record is synced, and every result after
// its done record is synced: these are durable jobs, not in-memory ones.
// Prints one JSON line: {"system":"asr-fleet",...}.
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include <boost/program_options.hpp>

#include "client/broker_client.h"
#include "common/clock.h"

extern char** environ;

namespace {

using asrf::BrokerClient;
using asrf::Incoming;
using asrf::MonoUs;
using asrf::proto::Cmd;
namespace po = boost::program_options;

pid_t Spawn(const std::vector<std::string>& argv, const std::string& log) {
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  posix_spawn_file_actions_adddup2(&fa, 1, 2);
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = -1;
  if (posix_spawn(&pid, args[0], &fa, nullptr, args.data(), environ) != 0) pid = -1;
  posix_spawn_file_actions_destroy(&fa);
  return pid;
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  size_t i = std::min(v.size() - 1, static_cast<size_t>(p * (v.size() - 1) + 0.5));
  return v[i];
}

}  // namespace

int main(int argc, char** argv) {
  std::string bin_dir, state;
  int64_t count = 20000, latency_count = 1000;
  double rate = 200;
  int slots = 64;
  int payload_bytes = 64;
  po::options_description desc("queue_throughput options");
  desc.add_options()("help,h", "print this help")
      ("bin-dir", po::value(&bin_dir)->default_value(ASRF_BUILD_DIR), "build dir holding broker/ worker/ binaries")
      ("state-dir", po::value(&state)->default_value(""), "where the broker journal goes (default: a temp dir)")
      ("count", po::value(&count)->default_value(count), "jobs for the throughput run")
      ("latency-count", po::value(&latency_count)->default_value(latency_count), "jobs for the latency run")
      ("rate", po::value(&rate)->default_value(rate), "submissions per second in the latency run")
      ("slots", po::value(&slots)->default_value(slots), "slots (credits) per worker; 2 workers")
      ("payload-bytes", po::value(&payload_bytes)->default_value(payload_bytes),
       "length of the string inside each job's JSON payload (the Celery peer sends the same)");
  po::variables_map vm;
  try {
    po::store(po::parse_command_line(argc, argv, desc), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    std::cerr << e.what() << "\n" << desc;
    return 2;
  }
  if (vm.count("help")) {
    std::cout << desc;
    return 0;
  }
  bool own_state = state.empty();
  if (own_state) {
    char tmpl[] = "/tmp/asrf-bench-XXXXXX";
    state = mkdtemp(tmpl);
  }
  std::filesystem::create_directories(state);
  std::string broker_bin = bin_dir + "/broker/asr-broker", worker_bin = bin_dir + "/worker/asr-worker";
  pid_t broker = Spawn({broker_bin, "--listen", "tcp://127.0.0.1:0", "--state-dir", state + "/broker"},
                       state + "/broker.log");
  std::string endpoint;
  for (int i = 0; i < 500 && endpoint.empty(); ++i) {
    std::ifstream f(state + "/broker/broker.endpoint");
    std::getline(f, endpoint);
    if (endpoint.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  if (endpoint.empty()) {
    std::cerr << "broker did not start; see " << state << "/broker.log\n";
    return 1;
  }
  std::vector<pid_t> workers;
  for (int i = 0; i < 2; ++i) {
    workers.push_back(Spawn({worker_bin, "--broker", endpoint, "--state-dir", state + "/w" + std::to_string(i),
                             "--slots", std::to_string(slots), "--log-level", "warn"},
                            state + "/worker" + std::to_string(i) + ".log"));
  }
  BrokerClient client(endpoint);
  // Wait for both workers.
  for (int i = 0; i < 500; ++i) {
    asrf::proto::Reply r;
    if (client.Call(Cmd::kWorkers, asrf::proto::WorkersReq{}, &r, 2000).ok() && r.workers.size() == 2) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  const std::string payload = "{\"data\":\"" + std::string(std::max(payload_bytes, 0), 'x') + "\"}";

  // ---- 1. throughput ----
  // One loop reads everything: SUBMIT replies free a window slot, EVENTs count results; the
  // WATCH on the batch starts as soon as the first SUBMIT is acknowledged (the batch exists).
  std::string batch = "tp";
  int64_t t0 = MonoUs();
  int64_t per = 1000, chunks = (count + per - 1) / per, sent = 0, in_flight = 0, results = 0;
  std::unordered_map<uint64_t, bool> submit_reqs;
  bool watching = false;
  int64_t next_watch = 0, last_progress = asrf::MonoMs();
  while (results < count) {
    while (sent < chunks && in_flight < 8) {
      asrf::proto::Submit s;
      s.req = client.NextReq();
      s.request_id = "tp/" + std::to_string(sent);
      s.batch = batch;
      int64_t n = std::min(per, count - sent * per);
      s.jobs.assign(n, asrf::proto::SubmitJob{"echo", asrf::proto::Blob{payload}, 0, 0});
      submit_reqs[s.req] = true;
      client.Send(Cmd::kSubmit, s);
      sent++;
      in_flight++;
    }
    int64_t now = asrf::MonoMs();
    if (watching && now >= next_watch) {
      asrf::proto::WatchReq w;
      w.req = client.NextReq();
      w.batch = batch;
      w.watch_ms = 10000;
      client.Send(Cmd::kWatch, w);
      next_watch = now + 2000;
    }
    if (now - last_progress > 30000) {
      std::cerr << "stalled at " << results << " results; see " << state << "\n";
      return 1;
    }
    Incoming in;
    if (!client.Receive(50, &in).ok()) continue;
    last_progress = asrf::MonoMs();
    if (in.cmd == Cmd::kReply && submit_reqs.erase(in.reply.req)) {
      in_flight--;
      if (!watching) {
        watching = true;
        next_watch = 0;
      }
    } else if (in.cmd == Cmd::kEvent) {
      for (const auto& e : in.event.jobs) results += e.state == "done";
    } else if (in.cmd == Cmd::kError) {
      std::cerr << "broker error: " << in.error.code << " " << in.error.message << "\n";
      return 1;
    }
  }
  double tp_s = (MonoUs() - t0) / 1e6;
  double jobs_per_s = count / tp_s;
  std::cerr << "throughput: " << count << " jobs in " << tp_s << " s = " << jobs_per_s << " jobs/s\n";

  // ---- 2. latency at a fixed rate ----
  std::string lbatch = "lat";
  {
    asrf::proto::Submit s;
    s.batch = lbatch;
    s.jobs.push_back({"echo", asrf::proto::Blob{payload}, 0, 0});
    asrf::proto::Reply r;
    if (!client.Call(Cmd::kSubmit, s, &r, 5000).ok()) return 1;
  }
  struct { int64_t next_watch = 0; } lf;
  std::unordered_map<uint64_t, int64_t> sent_at;  // req -> us
  std::unordered_map<uint64_t, int64_t> job_sent; // job id -> us
  std::vector<double> lat_ms;
  int64_t interval_us = static_cast<int64_t>(1e6 / rate);
  int64_t start = MonoUs(), submitted = 0;
  std::unordered_map<uint64_t, int64_t> early;  // results that beat their SUBMIT reply
  while (static_cast<int64_t>(lat_ms.size()) < latency_count) {
    int64_t now = MonoUs();
    while (submitted < latency_count && now >= start + submitted * interval_us) {
      asrf::proto::Submit s;
      s.req = client.NextReq();
      s.batch = lbatch;
      s.jobs.push_back({"echo", asrf::proto::Blob{payload}, 0, 0});
      sent_at[s.req] = MonoUs();
      client.Send(Cmd::kSubmit, s);
      submitted++;
    }
    int64_t next_due = start + submitted * interval_us;
    int64_t wait_ms = std::clamp<int64_t>((next_due - MonoUs()) / 1000, 0, 20);
    if (asrf::MonoMs() >= lf.next_watch) {
      asrf::proto::WatchReq w;
      w.req = client.NextReq();
      w.batch = lbatch;
      client.Send(Cmd::kWatch, w);
      lf.next_watch = asrf::MonoMs() + 2000;
    }
    Incoming in;
    if (!client.Receive(wait_ms, &in).ok()) continue;
    int64_t got = MonoUs();
    if (in.cmd == Cmd::kReply && sent_at.count(in.reply.req) && !in.reply.job_ids.empty()) {
      uint64_t id = in.reply.job_ids[0];
      int64_t t = sent_at[in.reply.req];
      if (auto e = early.find(id); e != early.end()) {
        lat_ms.push_back((e->second - t) / 1000.0);
        early.erase(e);
      } else {
        job_sent[id] = t;
      }
    } else if (in.cmd == Cmd::kEvent) {
      for (const auto& e : in.event.jobs) {
        auto it = job_sent.find(e.id);
        if (it != job_sent.end()) {
          lat_ms.push_back((got - it->second) / 1000.0);
          job_sent.erase(it);
        } else if (e.id > 0) {
          early[e.id] = got;
        }
      }
    }
  }
  // The warm-up job's event may sit in `early`; it is not counted.
  double p50 = Percentile(lat_ms, 0.50), p99 = Percentile(lat_ms, 0.99);
  std::cerr << "latency at " << rate << "/s: p50 " << p50 << " ms, p99 " << p99 << " ms\n";
  std::printf(
      "{\"system\":\"asr-fleet\",\"jobs\":%lld,\"jobs_per_s\":%.0f,\"workers\":2,\"slots\":%d,\"latency_rate\":%.0f,"
      "\"latency_jobs\":%zu,\"p50_ms\":%.3f,\"p99_ms\":%.3f}\n",
      static_cast<long long>(count), jobs_per_s, slots, rate, lat_ms.size(), p50, p99);
  for (pid_t w : workers) kill(w, SIGTERM);
  for (pid_t w : workers) waitpid(w, nullptr, 0);
  kill(broker, SIGTERM);
  waitpid(broker, nullptr, 0);
  if (own_state) std::filesystem::remove_all(state);
  return 0;
}
