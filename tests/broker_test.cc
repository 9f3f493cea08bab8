// The broker in this process, driven by raw DEALER peers on loopback: durability of
// acknowledgements across a simulated power cut, stale-epoch rejection, and hostile input.
#include <gtest/gtest.h>

#include <csignal>
#include <deque>
#include <map>
#include <set>
#include <thread>

#include <zmq.hpp>

#include "broker/fault_fs.h"
#include "client/broker_client.h"
#include "tests/harness.h"

namespace asrf {
namespace {

using proto::Cmd;
using testing::InProcBroker;
using testing::TempDir;

// Every frame of the next message on `sock` (one is ready).
std::vector<zmq::message_t> ReadFrames(zmq::socket_t& sock) {
  std::vector<zmq::message_t> frames;
  bool more = true;
  while (more) {
    zmq::message_t m;
    (void)sock.recv(m);
    more = m.more();
    frames.push_back(std::move(m));
  }
  return frames;
}

// A peer speaking raw frames, for fake workers and hostile clients.
class RawPeer {
 public:
  explicit RawPeer(const std::string& endpoint) : sock_(ctx_, zmq::socket_type::dealer) {
    sock_.set(zmq::sockopt::linger, 0);
    sock_.connect(endpoint);
  }
  void SendFrames(const std::vector<std::string>& frames) {
    for (size_t i = 0; i < frames.size(); ++i) {
      sock_.send(zmq::buffer(frames[i]), i + 1 < frames.size() ? zmq::send_flags::sndmore : zmq::send_flags::none);
    }
  }
  template <typename T>
  void Send(Cmd cmd, const T& body) {
    SendFrames({std::string(proto::kTag), std::string(1, static_cast<char>(cmd)), proto::EncodeBody(body)});
  }
  // Next message with this command (others are skipped); false on timeout.
  bool Expect(Cmd want, std::string* body, int timeout_ms = 5000) {
    int64_t deadline = MonoMs() + timeout_ms;
    while (MonoMs() < deadline) {
      zmq::pollitem_t item{sock_.handle(), 0, ZMQ_POLLIN, 0};
      zmq::poll(&item, 1, std::chrono::milliseconds(50));
      if (!(item.revents & ZMQ_POLLIN)) continue;
      std::vector<zmq::message_t> frames = ReadFrames(sock_);
      if (frames.size() == 3 && frames[1].size() == 1 && static_cast<Cmd>(frames[1].data<char>()[0]) == want) {
        *body = frames[2].to_string();
        return true;
      }
    }
    return false;
  }
  proto::Error ExpectError(int timeout_ms = 5000) {
    std::string body;
    proto::Error e;
    e.code = "(none)";
    if (Expect(Cmd::kError, &body, timeout_ms)) {
      EXPECT_TRUE(proto::DecodeBody(body, &e).ok());
    }
    return e;
  }

 private:
  zmq::context_t ctx_{1};
  zmq::socket_t sock_;
};

// PostgreSQL holding the models table (a lock taken elsewhere, for ten minutes): registry
// requests fail after --pg-statement-timeout-ms with pg_unavailable, instead of waiting as long as
// the lock is held, and while they wait the broker holds at most 256 MiB of the model bytes
// clients send; the rest are answered "busy" at once (they used to queue without a bound).
TEST(BrokerPostgres, ALockedRegistryAnswersWithinTheTimeoutAndBoundsWhatWaits) {
  TempDir t;
  testing::PgCluster pg(t / "pg");
  ASSERT_TRUE(pg.Start());
  ASSERT_EQ(testing::RunCommand({ASRF_BROKER_BIN, "--migrate", "--pg", pg.url()}).code, 0);
  testing::Proc locker({"/usr/bin/psql", pg.url(), "-c",
                        "BEGIN; LOCK TABLE models IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(600); COMMIT;"},
                       t / "locker.log");
  ASSERT_TRUE(testing::WaitFor([&] {
    return pg.Query("SELECT count(*) FROM pg_locks WHERE relation = 'models'::regclass AND granted") == "1";
  }, 10000)) << testing::ReadFile(t / "locker.log");
  testing::BrokerProc b = testing::StartBroker(t / "broker", t / "broker.log",
                                               {"--pg", pg.url(), "--pg-statement-timeout-ms", "3000"});
  ASSERT_FALSE(b.endpoint.empty()) << testing::ReadFile(t / "broker.log");
  RawPeer peer(b.endpoint);
  proto::ModelsReq m;
  m.op = "import";
  m.name = "big";
  m.bytes.data.assign(30u << 20, 'x');
  for (uint64_t i = 1; i <= 12; ++i) {
    m.req = i;
    peer.Send(Cmd::kModels, m);
  }
  std::set<uint64_t> answered;
  int busy = 0, timed_out = 0;
  for (int i = 0; i < 12; ++i) {
    proto::Error e = peer.ExpectError(30000);
    if (e.code == "(none)") break;
    answered.insert(e.req);
    if (e.code == "busy") busy++;
    if (e.code == "pg_unavailable" && e.message.find("statement timeout") != std::string::npos) timed_out++;
  }
  EXPECT_EQ(answered.size(), 12u) << testing::ReadFile(t / "broker.log");
  // Each waiting import holds its 30 MiB for 3 s (the statement timeout), so the ninth to arrive
  // within the first one's 3 s is refused.
  EXPECT_GE(busy, 1) << "12 x 30 MiB waited for PostgreSQL: more than 256 MiB held";
  EXPECT_GE(timed_out, 1) << testing::ReadFile(t / "broker.log");
  locker.Signal(SIGKILL);
}

// A stand-in broker: a raw ROUTER that a real asr-worker process connects to, to play sequences
// a real broker only gets into by accident (a lost connection, a reconnect under way).
class StandInBroker {
 public:
  StandInBroker() : router_(ctx_, zmq::socket_type::router) {
    router_.set(zmq::sockopt::linger, 0);
    router_.bind("tcp://127.0.0.1:*");
    endpoint_ = router_.get(zmq::sockopt::last_endpoint);
  }
  const std::string& endpoint() const { return endpoint_; }
  // The next message with this command within timeout_ms (others are skipped): the worker's
  // routing id and the body. False on timeout.
  bool Next(Cmd want, std::string* routing, std::string* body = nullptr, int64_t timeout_ms = 15000) {
    for (int64_t end = MonoMs() + timeout_ms; MonoMs() < end;) {
      zmq::pollitem_t item{router_.handle(), 0, ZMQ_POLLIN, 0};
      zmq::poll(&item, 1, std::chrono::milliseconds(50));
      if (!(item.revents & ZMQ_POLLIN)) continue;
      std::vector<zmq::message_t> frames = ReadFrames(router_);
      if (frames.size() == 4 && frames[2].size() == 1 && static_cast<Cmd>(frames[2].data<char>()[0]) == want) {
        *routing = frames[0].to_string();
        if (body) *body = frames[3].to_string();
        return true;
      }
    }
    return false;
  }
  void SendRaw(const std::string& routing, Cmd cmd, const std::string& body) {
    router_.send(zmq::buffer(routing), zmq::send_flags::sndmore);
    router_.send(zmq::buffer(std::string(proto::kTag)), zmq::send_flags::sndmore);
    router_.send(zmq::buffer(std::string(1, static_cast<char>(cmd))), zmq::send_flags::sndmore);
    router_.send(zmq::buffer(body), zmq::send_flags::none);
  }
  template <typename T>
  void Send(const std::string& routing, Cmd cmd, const T& body) {
    SendRaw(routing, cmd, proto::EncodeBody(body));
  }

 private:
  zmq::context_t ctx_{1};
  zmq::socket_t router_;
  std::string endpoint_;
};

BrokerOptions TestOptions(const std::string& dir) {
  BrokerOptions o;
  o.listen = "tcp://127.0.0.1:0";
  o.state_dir = dir;
  o.heartbeat_ms = 100;
  o.heartbeat_misses = 3;
  o.backoff_ms = 0;
  return o;
}

proto::Submit Jobs(int n, const std::string& kind = "echo", const std::string& request_id = "") {
  proto::Submit s;
  s.request_id = request_id;
  s.batch = "t";
  for (int i = 0; i < n; ++i) s.jobs.push_back({kind, proto::Blob{"{\"i\":" + std::to_string(i) + "}"}, 0, 0});
  return s;
}

TEST(Broker, AcknowledgedJobsSurviveAPowerCut) {
  TempDir tmp;
  FaultFs fs;
  std::set<uint64_t> acked;
  {
    BrokerOptions o = TestOptions(tmp / "b");
    o.journal_env = fs.env();
    InProcBroker broker(o);
    ASSERT_TRUE(broker.open_status().ok()) << broker.open_status().ToString();
    BrokerClient client(broker.endpoint());
    // Keep 16 SUBMITs of 10 jobs in flight; cut the power once 100 are acknowledged.
    int in_flight = 0;
    int64_t deadline = MonoMs() + 20000;
    while (acked.size() < 100 && MonoMs() < deadline) {
      while (in_flight < 16) {
        proto::Submit s = Jobs(10);
        s.req = client.NextReq();
        client.Send(Cmd::kSubmit, s);
        in_flight++;
      }
      Incoming in;
      if (!client.Receive(100, &in).ok()) continue;
      ASSERT_EQ(in.cmd, Cmd::kReply) << in.error.message;
      in_flight--;
      for (uint64_t id : in.reply.job_ids) acked.insert(id);
    }
    fs.Crash();
    ASSERT_GE(acked.size(), 100u);
  }
  // Restart on the real file system: every acknowledged job is there.
  InProcBroker broker(TestOptions(tmp / "b"));
  ASSERT_TRUE(broker.open_status().ok());
  BrokerClient client(broker.endpoint());
  for (uint64_t id : acked) {
    proto::StatusReq q;
    q.job = id;
    proto::Reply r;
    Status st = client.Call(Cmd::kStatus, q, &r, 5000);
    ASSERT_TRUE(st.ok()) << "acknowledged job " << id << " was lost: " << st.ToString();
    EXPECT_EQ(r.jobs.at(0).state, "queued");
  }
}

TEST(Broker, RepeatedSubmitReturnsTheOriginalIds) {
  TempDir tmp;
  InProcBroker broker(TestOptions(tmp / "b"));
  ASSERT_TRUE(broker.open_status().ok());
  BrokerClient client(broker.endpoint());
  proto::Reply first, second;
  ASSERT_TRUE(client.Call(Cmd::kSubmit, Jobs(5, "echo", "req-1"), &first, 5000).ok());
  ASSERT_TRUE(client.Call(Cmd::kSubmit, Jobs(5, "echo", "req-1"), &second, 5000).ok());
  EXPECT_EQ(first.job_ids, second.job_ids);
  EXPECT_FALSE(first.duplicate);
  EXPECT_TRUE(second.duplicate);
  // A repeat's own jobs are not looked at: even none, or of no known kind, gets the original ids.
  proto::Reply empty_repeat, odd_repeat;
  ASSERT_TRUE(client.Call(Cmd::kSubmit, Jobs(0, "echo", "req-1"), &empty_repeat, 5000).ok());
  ASSERT_TRUE(client.Call(Cmd::kSubmit, Jobs(2, "", "req-1"), &odd_repeat, 5000).ok());
  EXPECT_EQ(empty_repeat.job_ids, first.job_ids);
  EXPECT_EQ(odd_repeat.job_ids, first.job_ids);
  EXPECT_TRUE(empty_repeat.duplicate && odd_repeat.duplicate);
  proto::Reply status;
  ASSERT_TRUE(client.Call(Cmd::kStatus, proto::StatusReq{}, &status, 5000).ok());
  EXPECT_EQ(status.counts["queued"], 5);
  // Still true after a restart (the request record is journaled with the jobs).
  broker.Stop();
  InProcBroker again(TestOptions(tmp / "b"));
  BrokerClient c2(again.endpoint());
  proto::Reply third;
  ASSERT_TRUE(c2.Call(Cmd::kSubmit, Jobs(5, "echo", "req-1"), &third, 5000).ok());
  EXPECT_EQ(third.job_ids, first.job_ids);
}

// Finished jobs leave the broker's memory and journal --forget-after-s after their end (here 1 s),
// and the ids they held are never given again, across a restart too.
TEST(Broker, FinishedJobsAreForgottenAndTheirIdsNeverReused) {
  TempDir tmp;
  BrokerOptions o = TestOptions(tmp / "b");
  o.result_retention_s = 0;
  o.forget_after_s = 1;
  InProcBroker broker(o);
  ASSERT_TRUE(broker.open_status().ok());
  BrokerClient client(broker.endpoint());
  proto::Reply sub, r, kept;
  // Still queued: stays, and so does its request id. The highest ids: forgotten, with their
  // request id (request ids used to be kept for ever, in memory and in the journal).
  ASSERT_TRUE(client.Call(Cmd::kSubmit, Jobs(3, "sleep", "req-kept"), &kept, 5000).ok());
  ASSERT_TRUE(client.Call(Cmd::kSubmit, Jobs(500, "echo", "req-gone"), &sub, 5000).ok());
  ASSERT_EQ(sub.job_ids.size(), 500u);
  proto::CancelReq c;
  for (uint64_t id : sub.job_ids) {
    c.job = id;
    ASSERT_TRUE(client.Call(Cmd::kCancel, c, &r, 5000).ok());
  }
  auto total = [&] {
    proto::Reply st;
    if (!client.Call(Cmd::kStatus, proto::StatusReq{}, &st, 5000).ok()) return int64_t{-1};
    int64_t n = 0;
    for (const auto& [state, k] : st.counts) n += k;
    return n;
  };
  int64_t end = MonoMs() + 10000;
  while (total() != 3 && MonoMs() < end) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_EQ(total(), 3) << "the finished jobs were not forgotten";
  proto::StatusReq one;
  one.job = sub.job_ids.front();
  Status st = client.Call(Cmd::kStatus, one, &r, 5000);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("forgotten"), std::string::npos) << st.ToString();
  // The batch (all 503 jobs are in batch "t") keeps counting its forgotten jobs while it has others:
  // a client following it must never see its total shrink.
  proto::StatusReq of_batch;
  of_batch.batch = "t";
  ASSERT_TRUE(client.Call(Cmd::kStatus, of_batch, &r, 5000).ok());
  EXPECT_EQ(r.counts["cancelled"], 500);
  EXPECT_EQ(r.counts["queued"], 3);
  proto::Reply repeat;
  ASSERT_TRUE(client.Call(Cmd::kSubmit, Jobs(3, "sleep", "req-kept"), &repeat, 5000).ok());
  EXPECT_TRUE(repeat.duplicate) << "a request id whose jobs are still held was forgotten";
  EXPECT_EQ(repeat.job_ids, kept.job_ids);
  // After a restart the journal holds only the queued jobs, and new ids continue after all of them.
  broker.Stop();
  InProcBroker again(o);
  ASSERT_TRUE(again.open_status().ok());
  BrokerClient c2(again.endpoint());
  proto::Reply status, next;
  ASSERT_TRUE(c2.Call(Cmd::kStatus, proto::StatusReq{}, &status, 5000).ok());
  EXPECT_EQ(status.counts["queued"], 3);
  EXPECT_EQ(status.counts["cancelled"], 0);
  ASSERT_TRUE(c2.Call(Cmd::kSubmit, Jobs(1), &next, 5000).ok());
  ASSERT_EQ(next.job_ids.size(), 1u);
  EXPECT_GT(next.job_ids[0], sub.job_ids.back()) << "an id of a forgotten job was given again";
  ASSERT_TRUE(c2.Call(Cmd::kSubmit, Jobs(3, "sleep", "req-kept"), &repeat, 5000).ok());
  EXPECT_TRUE(repeat.duplicate) << "a kept request id did not survive the restart";
  ASSERT_TRUE(c2.Call(Cmd::kSubmit, Jobs(1, "echo", "req-gone"), &repeat, 5000).ok());
  EXPECT_FALSE(repeat.duplicate) << "the request id of forgotten jobs is still remembered";
  ASSERT_EQ(repeat.job_ids.size(), 1u);
  EXPECT_GT(repeat.job_ids[0], next.job_ids[0]);
}

// A worker whose lease expired sends its result late: rejected; the new lease holder's is kept.
TEST(Broker, StaleResultFromAnExpiredLeaseIsRejected) {
  TempDir tmp;
  InProcBroker broker(TestOptions(tmp / "b"));
  ASSERT_TRUE(broker.open_status().ok());
  BrokerClient client(broker.endpoint());
  proto::Reply sub;
  ASSERT_TRUE(client.Call(Cmd::kSubmit, Jobs(1), &sub, 5000).ok());
  uint64_t job = sub.job_ids.at(0);

  RawPeer a(broker.endpoint());
  proto::Ready ra;
  ra.worker_id = "A";
  ra.kinds = {"echo"};
  a.Send(Cmd::kReady, ra);
  std::string body;
  ASSERT_TRUE(a.Expect(Cmd::kAssign, &body));
  proto::Assign assign_a;
  ASSERT_TRUE(proto::DecodeBody(body, &assign_a).ok());
  ASSERT_EQ(assign_a.jobs.at(0).id, job);
  uint64_t old_epoch = assign_a.jobs[0].epoch;
  a.Send(Cmd::kStarted, proto::Started{{{job, old_epoch}}});
  // A now goes silent: no heartbeats. After 3 x 100 ms the broker takes the lease back.
  RawPeer b(broker.endpoint());
  proto::Ready rb;
  rb.worker_id = "B";
  rb.kinds = {"echo"};
  b.Send(Cmd::kReady, rb);
  proto::Assign assign_b;
  int64_t deadline = MonoMs() + 5000;
  while (MonoMs() < deadline) {
    b.Send(Cmd::kHeartbeat, proto::Heartbeat{});
    if (b.Expect(Cmd::kAssign, &body, 100)) {
      ASSERT_TRUE(proto::DecodeBody(body, &assign_b).ok());
      break;
    }
  }
  ASSERT_EQ(assign_b.jobs.size(), 1u) << "the lost lease was never reassigned";
  EXPECT_EQ(assign_b.jobs[0].id, job);
  EXPECT_GT(assign_b.jobs[0].epoch, old_epoch);
  EXPECT_EQ(assign_b.jobs[0].attempt, 1u) << "a started-then-lost job counts one attempt";

  // A's late result: rejected.
  a.Send(Cmd::kReady, ra);  // A comes back (new connection state) and reports its result
  proto::Result late;
  late.results.push_back({job, old_epoch, true, proto::Blob{"\"from A\""}, "", 1});
  a.Send(Cmd::kResult, late);
  ASSERT_TRUE(a.Expect(Cmd::kResultAck, &body));
  proto::ResultAck ack_a;
  ASSERT_TRUE(proto::DecodeBody(body, &ack_a).ok());
  ASSERT_EQ(ack_a.rejected.size(), 1u);
  EXPECT_TRUE(ack_a.accepted.empty());

  // B's result: accepted, and it is the one kept.
  proto::Result good;
  good.results.push_back({job, assign_b.jobs[0].epoch, true, proto::Blob{"\"from B\""}, "", 1});
  b.Send(Cmd::kResult, good);
  ASSERT_TRUE(b.Expect(Cmd::kResultAck, &body));
  proto::ResultAck ack_b;
  ASSERT_TRUE(proto::DecodeBody(body, &ack_b).ok());
  ASSERT_EQ(ack_b.accepted.size(), 1u);
  proto::StatusReq q;
  q.job = job;
  proto::Reply r;
  ASSERT_TRUE(client.Call(Cmd::kStatus, q, &r, 5000).ok());
  EXPECT_EQ(r.jobs.at(0).state, "done");
  EXPECT_EQ(r.jobs.at(0).result.data, "\"from B\"");
  EXPECT_EQ(r.jobs.at(0).attempts, 1u);

  // And a second copy of B's result (a retransmission) is not accepted twice.
  b.Send(Cmd::kResult, good);
  ASSERT_TRUE(b.Expect(Cmd::kResultAck, &body));
  proto::ResultAck again;
  ASSERT_TRUE(proto::DecodeBody(body, &again).ok());
  EXPECT_EQ(again.rejected.size(), 1u);
}

// Broker and worker heartbeat intervals are set separately. A worker slower than the broker
// (READY says its interval) is dropped only after heartbeat_misses of its own interval, not the
// broker's: it used to be dropped (and its leases lost) between two of its heartbeats. The
// broker's HEARTBEAT carries its own interval for the worker to do the same.
TEST(Broker, AWorkerWithALongerHeartbeatIntervalIsNotDroppedBetweenBeats) {
  TempDir tmp;
  InProcBroker broker(TestOptions(tmp / "b"));  // 100 ms, 3 misses: silent 300 ms = lost
  ASSERT_TRUE(broker.open_status().ok()) << broker.open_status().ToString();
  BrokerClient client(broker.endpoint());
  auto listed = [&](const std::string& id) {
    proto::Reply r;
    if (!client.Call(Cmd::kWorkers, proto::WorkersReq{}, &r, 5000).ok()) return false;
    for (const auto& w : r.workers) if (w.id == id) return true;
    return false;
  };
  // Beats every 400 ms for 2 s; true when the broker never asked it to introduce itself again.
  auto beats_kept = [&](RawPeer& peer, const std::string& id, uint32_t said_ms) {
    proto::Ready ready;
    ready.worker_id = id;
    ready.heartbeat_ms = said_ms;
    peer.Send(Cmd::kReady, ready);
    std::string body;
    if (!peer.Expect(Cmd::kHeartbeat, &body)) return false;
    proto::Heartbeat h;
    EXPECT_TRUE(proto::DecodeBody(body, &h).ok());
    EXPECT_EQ(h.heartbeat_ms, 100u) << "the broker's HEARTBEAT says its interval";
    for (int i = 0; i < 5; ++i) {
      if (peer.Expect(Cmd::kDisconnect, &body, 400)) return false;
      peer.Send(Cmd::kHeartbeat, proto::Heartbeat{});
    }
    return listed(id);
  };
  RawPeer slow(broker.endpoint());
  EXPECT_TRUE(beats_kept(slow, "slow", 500)) << "a worker beating every 400 ms of its 500 was dropped";
  // Silent now: gone after 3 x 500 ms, not before.
  std::this_thread::sleep_for(std::chrono::milliseconds(700));
  EXPECT_TRUE(listed("slow"));
  EXPECT_TRUE(testing::WaitFor([&] { return !listed("slow"); }, 5000)) << "a silent worker was never dropped";
  // The same beats from a worker that does not say its interval: the broker's own holds.
  RawPeer unsaid(broker.endpoint());
  EXPECT_FALSE(beats_kept(unsaid, "unsaid", 0));
}

// Two worker processes given the same --worker-id (a shared env file, a scaled compose service):
// the second READY used to count as the first one reconnecting, so each took the other's leases
// away in turn until the jobs ran out of attempts. READY carries a per-process instance token: a
// READY with another instance while the first worker is alive is refused (worker_id_in_use), the
// first keeps its place, a reconnect of the same process (same instance) is still welcome, and
// the id is free again once its worker has gone silent.
TEST(Broker, ASecondProcessWithALiveWorkersIdIsRefused) {
  TempDir tmp;
  BrokerOptions o = TestOptions(tmp / "b");
  o.heartbeat_ms = 500;  // a worker is alive for 1.5 s after its last word: room for a slow test machine
  InProcBroker broker(o);
  ASSERT_TRUE(broker.open_status().ok()) << broker.open_status().ToString();
  auto ready = [](const std::string& instance, const std::string& host) {
    proto::Ready r;
    r.worker_id = "twin";
    r.host = host;
    r.instance = instance;
    return r;
  };
  std::string body;
  RawPeer first(broker.endpoint());
  first.Send(Cmd::kReady, ready("aaaa", "host-a"));
  ASSERT_TRUE(first.Expect(Cmd::kHeartbeat, &body));
  RawPeer second(broker.endpoint());
  second.Send(Cmd::kReady, ready("bbbb", "host-b"));
  proto::Error e = second.ExpectError(2000);
  EXPECT_EQ(e.code, "worker_id_in_use") << e.message;
  EXPECT_NE(e.message.find("host-a"), std::string::npos) << e.message;
  // The first is still the worker: its heartbeats are answered, never with DISCONNECT.
  for (int i = 0; i < 4; ++i) {
    first.Send(Cmd::kHeartbeat, proto::Heartbeat{});
    EXPECT_FALSE(first.Expect(Cmd::kDisconnect, &body, 60)) << "the first worker lost its place";
  }
  // The same process on a new connection (same instance): a reconnect, accepted.
  RawPeer again(broker.endpoint());
  again.Send(Cmd::kReady, ready("aaaa", "host-a"));
  EXPECT_TRUE(again.Expect(Cmd::kHeartbeat, &body)) << "a reconnect of the same process was refused";
  EXPECT_FALSE(again.Expect(Cmd::kError, &body, 200));
  // Silent now: once it is gone, the other process may have the id.
  std::this_thread::sleep_for(std::chrono::milliseconds(2000));
  second.Send(Cmd::kReady, ready("bbbb", "host-b"));
  EXPECT_TRUE(second.Expect(Cmd::kHeartbeat, &body)) << "the id stayed taken after its worker went silent";
}

// What a registered worker's connection says that does not fit: READY with a new worker_id (the
// connection is that worker from then on; the old one left, and its expiry later must not take
// the new one's place), an instance over the protocol's 64 bytes (refused; it was cut and then
// never matched the worker's own reconnect), and DISCONNECT with a body that is not msgpack
// (ignored, as the protocol says, rather than taken as a goodbye).
TEST(Broker, AWorkerConnectionsOddMessagesKeepItsPlace) {
  TempDir tmp;
  InProcBroker broker(TestOptions(tmp / "b"));  // silent for 300 ms: gone
  ASSERT_TRUE(broker.open_status().ok());
  std::string body;
  RawPeer peer(broker.endpoint());
  proto::Ready ready;
  ready.worker_id = "a";
  ready.instance = "i1";
  peer.Send(Cmd::kReady, ready);
  ASSERT_TRUE(peer.Expect(Cmd::kHeartbeat, &body));
  ready.worker_id = "b";
  peer.Send(Cmd::kReady, ready);
  ASSERT_TRUE(peer.Expect(Cmd::kHeartbeat, &body));
  for (int64_t end = MonoMs() + 1200; MonoMs() < end;) {
    peer.Send(Cmd::kHeartbeat, proto::Heartbeat{});
    if (peer.Expect(Cmd::kDisconnect, &body, 50)) {
      ADD_FAILURE() << "worker b lost its place when a expired";
      break;
    }
  }
  peer.SendFrames({std::string(proto::kTag), std::string(1, static_cast<char>(Cmd::kDisconnect)), "\xff"});
  for (int i = 0; i < 4; ++i) {
    peer.Send(Cmd::kHeartbeat, proto::Heartbeat{});
    EXPECT_FALSE(peer.Expect(Cmd::kDisconnect, &body, 60)) << "a malformed DISCONNECT removed the worker";
  }
  RawPeer other(broker.endpoint());
  ready.worker_id = "c";
  ready.instance = std::string(100, 'x');
  other.Send(Cmd::kReady, ready);
  proto::Error e = other.ExpectError(2000);
  EXPECT_EQ(e.code, "bad_request") << e.message;
  EXPECT_NE(e.message.find("instance"), std::string::npos) << e.message;
}

// An ASSIGN that never reaches the worker (dropped from a full send queue) or that it cannot read
// leaves a lease with no STARTED while the worker stays connected. It used to hold the job (and a
// slot) for as long as the worker lived; after ten heartbeat intervals it goes back to the queue
// without an attempt, and the worker is told to drop it.
TEST(Broker, ALeaseNeverStartedGoesBackToTheQueueWithoutAnAttempt) {
  TempDir tmp;
  BrokerOptions o = TestOptions(tmp / "b");
  o.heartbeat_ms = 200;  // 2 s for a STARTED; the peer is lost after 0.6 s of silence
  InProcBroker broker(o);
  ASSERT_TRUE(broker.open_status().ok()) << broker.open_status().ToString();
  BrokerClient client(broker.endpoint());
  RawPeer peer(broker.endpoint());
  proto::Ready ready;
  ready.worker_id = "deaf";
  ready.slots = 1;
  peer.Send(Cmd::kReady, ready);
  std::string body;
  ASSERT_TRUE(peer.Expect(Cmd::kHeartbeat, &body));
  proto::Reply submitted;
  ASSERT_TRUE(client.Call(Cmd::kSubmit, Jobs(1), &submitted, 5000).ok());
  ASSERT_EQ(submitted.job_ids.size(), 1u);
  const uint64_t id = submitted.job_ids[0];
  proto::Assign first;
  ASSERT_TRUE(peer.Expect(Cmd::kAssign, &body));
  ASSERT_TRUE(proto::DecodeBody(body, &first).ok());
  ASSERT_EQ(first.jobs.size(), 1u);
  // The worker never got it: it only beats, and never sends STARTED.
  bool cancelled = false, again = false;
  proto::Assign second;
  for (int64_t end = MonoMs() + 10000; MonoMs() < end && !again;) {
    peer.Send(Cmd::kHeartbeat, proto::Heartbeat{});
    if (!cancelled && peer.Expect(Cmd::kCancelJobs, &body, 50)) {
      proto::CancelJobs c;
      ASSERT_TRUE(proto::DecodeBody(body, &c).ok());
      cancelled = c.leases.size() == 1 && c.leases[0].id == id && c.leases[0].epoch == first.jobs[0].epoch;
      EXPECT_NE(c.reason.find("never started"), std::string::npos) << c.reason;
    }
    if (cancelled && peer.Expect(Cmd::kAssign, &body, 50)) {
      ASSERT_TRUE(proto::DecodeBody(body, &second).ok());
      again = second.jobs.size() == 1 && second.jobs[0].id == id;
    }
  }
  ASSERT_TRUE(cancelled) << "the lease with no STARTED was never taken back";
  ASSERT_TRUE(again) << "the job was not handed out again";
  EXPECT_GT(second.jobs[0].epoch, first.jobs[0].epoch);
  EXPECT_EQ(second.jobs[0].attempt, 0u) << "a lease that never started used an attempt";
  // This time it runs.
  proto::Started st;
  st.leases.push_back({id, second.jobs[0].epoch});
  peer.Send(Cmd::kStarted, st);
  ASSERT_TRUE(peer.Expect(Cmd::kStarted, &body));
  proto::Result r;
  r.results.push_back({id, second.jobs[0].epoch, true, proto::Blob{"{}"}, "", 1, false});
  peer.Send(Cmd::kResult, r);
  ASSERT_TRUE(testing::WaitFor([&] {
    proto::StatusReq q;
    q.job = id;
    proto::Reply rep;
    return client.Call(Cmd::kStatus, q, &rep, 5000).ok() && rep.jobs.size() == 1 && rep.jobs[0].state == "done" &&
           rep.jobs[0].attempts == 0;
  }, 5000));
}

// A transcription segment's audio_ms is the client's word: one far longer than its payload can
// hold used to be taken as it was (overflowing the batcher's padded-length arithmetic, and a
// segment alone over the batch budget). The broker keeps it within what the payload holds, so two
// such segments still go out in one batch.
TEST(Broker, AnAudioLengthBeyondThePayloadIsNotBelieved) {
  TempDir tmp;
  BrokerOptions o = TestOptions(tmp / "b");
  o.heartbeat_ms = 1000;  // the peer below never beats: alive for 3 s
  InProcBroker broker(o);
  ASSERT_TRUE(broker.open_status().ok()) << broker.open_status().ToString();
  BrokerClient client(broker.endpoint());
  RawPeer peer(broker.endpoint());
  proto::Ready ready;
  ready.worker_id = "gpu-ish";
  ready.slots = 1;
  ready.models = {"en-small"};
  peer.Send(Cmd::kReady, ready);
  std::string body;
  ASSERT_TRUE(peer.Expect(Cmd::kHeartbeat, &body));
  proto::Submit s;
  s.batch = "t";
  for (int i = 0; i < 2; ++i) {
    proto::SubmitJob j{proto::kTranscribeKind, proto::Blob{std::string(3200, 'x')}, 0, 0};  // 100 ms
    j.model = "en-small";
    j.audio_ms = int64_t{1} << 60;
    s.jobs.push_back(j);
  }
  proto::Reply r;
  ASSERT_TRUE(client.Call(Cmd::kSubmit, s, &r, 5000).ok());
  ASSERT_EQ(r.job_ids.size(), 2u);
  proto::Assign a;
  ASSERT_TRUE(peer.Expect(Cmd::kAssign, &body, 3000));
  ASSERT_TRUE(proto::DecodeBody(body, &a).ok());
  EXPECT_EQ(a.jobs.size(), 2u) << "two 100 ms segments were not batched together";
}

TEST(Broker, HostileInputGetsErrorsAndTheBrokerKeepsServing) {
  TempDir tmp;
  InProcBroker broker(TestOptions(tmp / "b"));
  ASSERT_TRUE(broker.open_status().ok());
  RawPeer bad(broker.endpoint());

  bad.SendFrames({"just one frame"});
  EXPECT_EQ(bad.ExpectError().code, "bad_frames");
  bad.SendFrames({"ASRF/9", std::string(1, '\x02'), proto::EncodeBody(proto::StatusReq{})});
  proto::Error e = bad.ExpectError();
  EXPECT_EQ(e.code, "unsupported_version");
  EXPECT_NE(e.message.find("1"), std::string::npos);
  bad.SendFrames({"GET / HTTP/1.1", "x", "y"});
  EXPECT_EQ(bad.ExpectError().code, "bad_tag");
  bad.SendFrames({std::string(proto::kTag), std::string(1, '\x66'), "x"});
  EXPECT_EQ(bad.ExpectError().code, "unknown_command");
  bad.SendFrames({std::string(proto::kTag), std::string(1, '\x01'), "\x81\xa4jobs\xdd\xff\xff"});  // truncated
  EXPECT_EQ(bad.ExpectError().code, "bad_request");
  bad.SendFrames({std::string(proto::kTag), std::string(1, '\x01'), "\xc1\xc1\xc1"});
  EXPECT_EQ(bad.ExpectError().code, "bad_request");
  // A job payload over the per-job limit.
  proto::Submit big = Jobs(1);
  big.jobs[0].payload.data.assign(proto::kMaxPayloadBytes + 10, 'x');
  bad.Send(Cmd::kSubmit, big);
  EXPECT_EQ(bad.ExpectError().code, "bad_request");
  // A message over the transport limit: ZeroMQ drops that connection.
  {
    RawPeer huge(broker.endpoint());
    huge.SendFrames({std::string(proto::kTag), std::string(1, '\x01'),
                     std::string(static_cast<size_t>(proto::kMaxMessageBytes) + 1024, 'x')});
    std::string body;
    EXPECT_FALSE(huge.Expect(Cmd::kReply, &body, 500));
  }
  // A result for a job that does not exist, from a worker that never said READY.
  proto::Result r;
  r.results.push_back({123456, 1, true, proto::Blob{"x"}, "", 0});
  bad.Send(Cmd::kResult, r);
  std::string body;
  ASSERT_TRUE(bad.Expect(Cmd::kResultAck, &body));

  // Everyone else is still served.
  BrokerClient client(broker.endpoint());
  proto::Reply ok;
  ASSERT_TRUE(client.Call(Cmd::kSubmit, Jobs(3), &ok, 5000).ok());
  EXPECT_EQ(ok.job_ids.size(), 3u);
  proto::Reply st;
  ASSERT_TRUE(client.Call(Cmd::kStatus, proto::StatusReq{}, &st, 5000).ok());
  EXPECT_EQ(st.counts["queued"], 3);
}

TEST(Broker, FullDiskRefusesSubmitsWithAClearErrorAndRecovers) {
  TempDir tmp;
  FaultFs fs;
  BrokerOptions o = TestOptions(tmp / "b");
  o.journal_env = fs.env();
  InProcBroker broker(o);
  ASSERT_TRUE(broker.open_status().ok());
  BrokerClient client(broker.endpoint());
  proto::Reply r;
  fs.SetNoSpace(true);
  Status st = client.Call(Cmd::kSubmit, Jobs(2), &r, 5000);
  EXPECT_EQ(st.code(), Status::Code::kUnavailable) << st.ToString();
  EXPECT_NE(st.message().find("journal_unavailable"), std::string::npos);
  fs.SetNoSpace(false);
  ASSERT_TRUE(client.Call(Cmd::kSubmit, Jobs(2), &r, 5000).ok());
  proto::Reply counts;
  ASSERT_TRUE(client.Call(Cmd::kStatus, proto::StatusReq{}, &counts, 5000).ok());
  EXPECT_EQ(counts.counts["queued"], 2) << "the refused jobs must not have been accepted";
}

// Fake workers on raw sockets: they heartbeat while the test waits and collect what they are given.
class FakeWorkers {
 public:
  struct Fake {
    std::string id;
    std::unique_ptr<RawPeer> peer;
    std::vector<proto::Assignment> given;
  };
  explicit FakeWorkers(std::string endpoint) : endpoint_(std::move(endpoint)) {}
  Fake& Connect(const std::string& id, const std::string& device, const std::string& gpu, uint32_t slots = 1,
                bool gangs = true, std::vector<std::string> kinds = {"gangwork"}) {
    fakes_.push_back({id, std::make_unique<RawPeer>(endpoint_), {}});
    proto::Ready r;
    r.worker_id = id;
    r.host = "box";
    r.device = device;
    r.gpu = gpu;
    r.gangs = gangs;
    r.slots = slots;
    r.kinds = std::move(kinds);
    fakes_.back().peer->Send(Cmd::kReady, r);
    return fakes_.back();
  }
  void Pump(int ms) {
    for (int64_t end = MonoMs() + ms; MonoMs() < end;) {
      for (Fake& f : fakes_) {
        f.peer->Send(Cmd::kHeartbeat, proto::Heartbeat{});
        std::string body;
        proto::Assign a;
        if (f.peer->Expect(Cmd::kAssign, &body, 10) && proto::DecodeBody(body, &a).ok()) {
          for (const auto& j : a.jobs) {
            f.given.push_back(j);
            f.peer->Send(Cmd::kStarted, proto::Started{{{j.id, j.epoch}}});
          }
        }
      }
    }
  }
  Fake& operator[](size_t i) { return fakes_[i]; }

 private:
  std::string endpoint_;
  std::deque<Fake> fakes_;
};

BrokerOptions GangTestOptions(const std::string& dir) {
  BrokerOptions o = TestOptions(dir);
  o.heartbeat_misses = 20;  // fakes heartbeat every few tens of ms while pumped, not while the test submits
  return o;
}

// One "gangwork" job of no gang in `batch`; its id (0 if the SUBMIT failed).
uint64_t SubmitOne(BrokerClient& client, const std::string& batch) {
  proto::Submit s;
  s.batch = batch;
  proto::SubmitJob job;
  job.kind = "gangwork";
  job.payload = proto::Blob{"{}"};
  s.jobs.push_back(job);
  proto::Reply r;
  Status st = client.Call(Cmd::kSubmit, s, &r, 5000);
  EXPECT_TRUE(st.ok() && r.job_ids.size() == 1) << st.ToString();
  return r.job_ids.empty() ? 0 : r.job_ids[0];
}

// The job as STATUS reports it (empty when it cannot be had).
proto::JobInfo JobInfoOf(BrokerClient& client, uint64_t id) {
  proto::StatusReq q;
  q.job = id;
  proto::Reply r;
  EXPECT_TRUE(client.Call(Cmd::kStatus, q, &r, 5000).ok());
  return r.jobs.empty() ? proto::JobInfo{} : r.jobs[0];
}

std::vector<uint64_t> SubmitGang(BrokerClient& client, const std::string& name) {
  proto::Submit s;
  s.batch = name;
  for (uint32_t rank = 0; rank < 2; ++rank) {
    proto::SubmitJob j;
    j.kind = "gangwork";
    j.payload = proto::Blob{"{}"};
    j.gang = name;
    j.rank = rank;
    j.world_size = 2;
    s.jobs.push_back(j);
  }
  proto::Reply r;
  Status st = client.Call(Cmd::kSubmit, s, &r, 5000);
  EXPECT_TRUE(st.ok()) << st.ToString();
  return r.job_ids;
}

// A gang's ranks end in one journal write, and a reply about them reports that write: under a
// passing write fault (one append fails), a CANCEL of a gang's batch is an ERROR with both ranks
// still queued, and a rank's failure RESULT leaves the whole gang requeued. Written apart, one
// rank could end cancelled while the other went back to the queue, to wait for a partner for ever.
TEST(Broker, AGangsRanksEndInOneWriteOrNotAtAll) {
  TempDir tmp;
  FaultFs fs;
  BrokerOptions o = GangTestOptions(tmp / "b");
  o.journal_env = fs.env();
  InProcBroker broker(o);
  ASSERT_TRUE(broker.open_status().ok()) << broker.open_status().ToString();
  BrokerClient client(broker.endpoint());
  auto counts = [&](const std::string& batch) {
    proto::StatusReq q;
    q.batch = batch;
    proto::Reply r;
    EXPECT_TRUE(client.Call(Cmd::kStatus, q, &r, 5000).ok());
    return r.counts;
  };
  SubmitGang(client, "cz");
  proto::CancelReq cancel;
  cancel.batch = "cz";
  proto::Reply r;
  fs.FailNextAppends(1);
  Status st = client.Call(Cmd::kCancel, cancel, &r, 5000);
  EXPECT_NE(st.message().find("journal_unavailable"), std::string::npos) << st.ToString();
  EXPECT_EQ(counts("cz")["queued"], 2);
  EXPECT_EQ(counts("cz")["cancelled"], 0);
  // The journal takes writes again: the same CANCEL ends both.
  for (int64_t end = MonoMs() + 5000; MonoMs() < end;) {
    st = client.Call(Cmd::kCancel, cancel, &r, 5000);
    if (st.ok()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(r.affected, 2u);
  EXPECT_EQ(counts("cz")["cancelled"], 2);

  // Rank 0 fails while its write does not go through: both ranks queued again, placed again whole.
  FakeWorkers fleet(broker.endpoint());
  auto& a = fleet.Connect("a-cpu", "cpu", "");
  auto& b = fleet.Connect("b-cpu", "cpu", "");
  const std::vector<uint64_t> g = SubmitGang(client, "cw");
  fleet.Pump(800);
  ASSERT_EQ(a.given.size(), 1u);
  ASSERT_EQ(b.given.size(), 1u);
  fs.FailNextAppends(1);
  proto::Result res;
  res.results.push_back({a.given.back().id, a.given.back().epoch, false, proto::Blob{"{}"}, "broke", 1, false});
  a.peer->Send(Cmd::kResult, res);
  fleet.Pump(1500);
  auto c = counts("cw");
  EXPECT_EQ(c["cancelled"], 0) << "a rank ended while its gang went back to the queue";
  EXPECT_EQ(c["failed"], 0);
  EXPECT_EQ(a.given.size() + b.given.size(), 4u) << "the gang was not placed again whole";
}

// RETRY reports the write that holds it, and the job follows that write: when it fails the job
// stays failed (not queued, not run), as the journal and the client's ERROR say. It used to be
// queued, and run, at once, while the journal still had it failed.
TEST(Broker, ARetryWhoseWriteFailsLeavesTheJobAsItWas) {
  TempDir tmp;
  FaultFs fs;
  BrokerOptions o = GangTestOptions(tmp / "b");
  o.journal_env = fs.env();
  InProcBroker broker(o);
  ASSERT_TRUE(broker.open_status().ok()) << broker.open_status().ToString();
  BrokerClient client(broker.endpoint());
  FakeWorkers fleet(broker.endpoint());
  auto& a = fleet.Connect("a-cpu", "cpu", "");
  const uint64_t id = SubmitOne(client, "rt");
  ASSERT_NE(id, 0u);
  fleet.Pump(800);
  ASSERT_EQ(a.given.size(), 1u);
  proto::Result res;
  res.results.push_back({id, a.given.back().epoch, false, proto::Blob{"{}"}, "broke", 1, false});
  a.peer->Send(Cmd::kResult, res);
  fleet.Pump(800);
  auto state = [&] { return JobInfoOf(client, id).state; };
  ASSERT_EQ(state(), "failed");
  proto::RetryReq retry;
  retry.job = id;
  fs.FailNextAppends(1);
  proto::Reply r;
  Status st = client.Call(Cmd::kRetry, retry, &r, 5000);
  EXPECT_NE(st.message().find("journal_unavailable"), std::string::npos) << st.ToString();
  fleet.Pump(800);
  EXPECT_EQ(state(), "failed");
  EXPECT_EQ(a.given.size(), 1u) << "the job ran again though its RETRY was not written";
  // The journal takes writes again: the same RETRY requeues it, and it runs.
  for (int64_t end = MonoMs() + 5000; MonoMs() < end;) {
    st = client.Call(Cmd::kRetry, retry, &r, 5000);
    if (st.ok()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(r.affected, 1u);
  fleet.Pump(800);
  EXPECT_EQ(a.given.size(), 2u);
}

// A result that failed for a passing reason (`retry`: the worker's device ran out of memory)
// counts an attempt and runs again, and the job is dead after --max-attempts with the reason; it
// used to end failed at once, with every other job of its batch.
TEST(Broker, APassingFailureIsTriedAgainUntilMaxAttempts) {
  TempDir tmp;
  BrokerOptions o = GangTestOptions(tmp / "b");
  o.max_attempts = 3;
  InProcBroker broker(o);
  ASSERT_TRUE(broker.open_status().ok()) << broker.open_status().ToString();
  BrokerClient client(broker.endpoint());
  FakeWorkers fleet(broker.endpoint());
  auto& a = fleet.Connect("a-cpu", "cpu", "");
  const uint64_t id = SubmitOne(client, "flaky");
  ASSERT_NE(id, 0u);
  auto info = [&] { return JobInfoOf(client, id); };
  for (size_t attempt = 1; attempt <= 3; ++attempt) {
    fleet.Pump(600);
    ASSERT_EQ(a.given.size(), attempt) << "attempt " << attempt << " was not assigned";
    proto::Result res;
    proto::JobResult jr{id, a.given.back().epoch, false, proto::Blob{}, "out of memory on cuda:0", 5, false};
    jr.retry = true;
    res.results.push_back(jr);
    a.peer->Send(Cmd::kResult, res);
    std::string body;
    ASSERT_TRUE(a.peer->Expect(Cmd::kResultAck, &body, 5000));
    proto::ResultAck ack;
    ASSERT_TRUE(proto::DecodeBody(body, &ack).ok());
    EXPECT_EQ(ack.accepted.size(), 1u);
    fleet.Pump(300);
    if (attempt < 3) {
      EXPECT_NE(info().state, "failed") << "a passing failure ended the job";
    }
  }
  ASSERT_TRUE(testing::WaitFor([&] { return info().state == "dead"; }, 5000)) << info().state;
  EXPECT_NE(info().error.find("out of memory on cuda:0"), std::string::npos) << info().error;
  EXPECT_EQ(info().attempts, 3u);
}

// A worker that reconnects while a CANCEL of its running job is being written (here a disk whose
// syncs take 1.5 s) lists that lease in its READY: the broker tells it, on the new connection, to
// cancel it. It used to keep the lease (the CANCEL_JOBS had gone to the old connection), so the
// worker went on running a cancelled job, its slot counted free.
TEST(Broker, AReconnectDuringACancelsWriteStillCancelsTheJob) {
  TempDir tmp;
  FaultFs fs;
  BrokerOptions o = GangTestOptions(tmp / "b");
  o.journal_env = fs.env();
  InProcBroker broker(o);
  ASSERT_TRUE(broker.open_status().ok()) << broker.open_status().ToString();
  BrokerClient client(broker.endpoint());
  proto::Ready ready;
  ready.worker_id = "w";
  ready.host = "box";
  ready.device = "cpu";
  ready.slots = 1;
  ready.kinds = {"gangwork"};
  ready.instance = "same-process";
  RawPeer first(broker.endpoint());
  first.Send(Cmd::kReady, ready);
  ASSERT_NE(SubmitOne(client, "c"), 0u);
  std::string body;
  proto::Assign a;
  ASSERT_TRUE(first.Expect(Cmd::kAssign, &body, 5000));
  ASSERT_TRUE(proto::DecodeBody(body, &a).ok());
  ASSERT_EQ(a.jobs.size(), 1u);
  const proto::Lease lease{a.jobs[0].id, a.jobs[0].epoch};
  first.Send(Cmd::kStarted, proto::Started{{lease}});
  ASSERT_TRUE(first.Expect(Cmd::kStarted, &body, 5000));
  fs.SetSyncDelayMs(1500);
  std::thread cancel([&] {
    proto::CancelReq c;
    c.job = lease.id;
    proto::Reply cr;
    EXPECT_TRUE(BrokerClient(broker.endpoint()).Call(Cmd::kCancel, c, &cr, 10000).ok());
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(400));  // the CANCEL's write is in flight
  RawPeer second(broker.endpoint());
  ready.running = {lease};
  second.Send(Cmd::kReady, ready);
  bool cancelled = false;
  for (int64_t end = MonoMs() + 5000; !cancelled && MonoMs() < end;) {
    if (!second.Expect(Cmd::kCancelJobs, &body, static_cast<int>(end - MonoMs()))) break;
    proto::CancelJobs cj;
    ASSERT_TRUE(proto::DecodeBody(body, &cj).ok());
    for (const auto& l : cj.leases) cancelled = cancelled || (l.id == lease.id && l.epoch == lease.epoch);
  }
  cancel.join();
  fs.SetSyncDelayMs(0);
  EXPECT_TRUE(cancelled) << "the reconnected worker was not told to cancel the job";
}

std::vector<uint64_t> Ids(const std::vector<proto::Assignment>& given) {
  std::vector<uint64_t> ids;
  for (const auto& a : given) ids.push_back(a.id);
  return ids;
}

// A broker in this process, a client and fake workers, for the gang placement tests.
class BrokerGangs : public ::testing::Test {
 protected:
  BrokerGangs() : broker_(GangTestOptions(tmp_ / "b")) {}
  void SetUp() override {
    ASSERT_TRUE(broker_.open_status().ok()) << broker_.open_status().ToString();
    client_ = std::make_unique<BrokerClient>(broker_.endpoint());
    fleet_ = std::make_unique<FakeWorkers>(broker_.endpoint());
  }
  TempDir tmp_;
  InProcBroker broker_;
  std::unique_ptr<BrokerClient> client_;
  std::unique_ptr<FakeWorkers> fleet_;
};

// Gang ranks all-reduce with NCCL on GPUs (one GPU per rank) and Gloo on CPUs, so a gang goes to
// workers on distinct GPUs, or all to CPU workers: never to two workers sharing a GPU, never mixed,
// never to a worker built without the backend its device needs.
TEST_F(BrokerGangs, RanksGoToDistinctGpusOrAllToCpuWorkers) {
  BrokerClient& client = *client_;
  FakeWorkers& fleet = *fleet_;
  const std::string gpu_a = "GPU-0a0a0a0a-0000-0000-0000-00000000000a";
  const std::string gpu_b = "GPU-0b0b0b0b-0000-0000-0000-00000000000b";
  auto& w1 = fleet.Connect("w1-gpu-a", "cuda:0", gpu_a);
  auto& w2 = fleet.Connect("w2-gpu-a", "cuda:0", gpu_a);  // a second worker on the same GPU
  auto& w3 = fleet.Connect("w3-cpu", "cpu", "");
  const std::vector<uint64_t> g1 = SubmitGang(client, "g1");
  ASSERT_EQ(g1.size(), 2u);
  fleet.Pump(1000);
  for (auto* f : {&w1, &w2, &w3}) EXPECT_TRUE(f->given.empty()) << f->id << " got a rank with one GPU and one CPU idle";

  auto& w4 = fleet.Connect("w4-gpu-b", "cuda:0", gpu_b);
  fleet.Pump(1000);
  EXPECT_EQ(Ids(w1.given), std::vector<uint64_t>{g1.at(0)}) << "the first worker on GPU a takes rank 0";
  EXPECT_TRUE(w2.given.empty()) << "GPU a has a rank already";
  EXPECT_TRUE(w3.given.empty()) << "no CPU rank beside GPU ranks";
  EXPECT_EQ(Ids(w4.given), std::vector<uint64_t>{g1.at(1)}) << "GPU b takes rank 1";

  // One distinct GPU idle (w2 shares GPU a) and two CPU workers: the next gang goes to the CPUs.
  auto& w5 = fleet.Connect("w5-cpu", "cpu", "");
  const std::vector<uint64_t> g2 = SubmitGang(client, "g2");
  fleet.Pump(1000);
  EXPECT_TRUE(w2.given.empty());
  EXPECT_EQ(Ids(w3.given), std::vector<uint64_t>{g2.at(0)}) << "rank 0 to the first CPU worker by id";
  EXPECT_EQ(Ids(w5.given), std::vector<uint64_t>{g2.at(1)});

  // A GPU worker built without NCCL never gets a rank; one with NCCL pairs with w2.
  auto& w6 = fleet.Connect("w6-gpu-c-no-nccl", "cuda:0", "GPU-0c0c0c0c-0000-0000-0000-00000000000c", 1, false);
  const std::vector<uint64_t> g3 = SubmitGang(client, "g3");
  fleet.Pump(800);
  EXPECT_TRUE(w2.given.empty() && w6.given.empty()) << "only one GPU worker that can join a gang is idle";
  auto& w7 = fleet.Connect("w7-gpu-d", "cuda:0", "GPU-0d0d0d0d-0000-0000-0000-00000000000d");
  fleet.Pump(1000);
  EXPECT_EQ(Ids(w2.given), std::vector<uint64_t>{g3.at(0)});
  EXPECT_EQ(Ids(w7.given), std::vector<uint64_t>{g3.at(1)});
  EXPECT_TRUE(w6.given.empty());

  // The listing shows each worker's GPU.
  proto::Reply listing;
  ASSERT_TRUE(client.Call(Cmd::kWorkers, proto::WorkersReq{}, &listing, 5000).ok());
  std::map<std::string, std::string> gpu_of;
  for (const auto& w : listing.workers) gpu_of[w.id] = w.gpu;
  EXPECT_EQ(gpu_of["w2-gpu-a"], gpu_a);
  EXPECT_EQ(gpu_of["w3-cpu"], "");
}

// Workers with several slots are rarely idle under a stream of small jobs: a waiting gang holds the
// ones it needs free of new work until they drain, then runs.
TEST_F(BrokerGangs, AWaitingGangHoldsWorkersWithFreeSlotsUntilTheyDrain) {
  BrokerClient& client = *client_;
  FakeWorkers& fleet = *fleet_;
  auto& a = fleet.Connect("a-cpu", "cpu", "", 2, true, {"gangwork", "echo"});
  auto& b = fleet.Connect("b-cpu", "cpu", "", 2, true, {"gangwork", "echo"});
  proto::Reply sub;
  ASSERT_TRUE(client.Call(Cmd::kSubmit, Jobs(4), &sub, 5000).ok());
  fleet.Pump(800);
  ASSERT_EQ(a.given.size(), 2u);
  ASSERT_EQ(b.given.size(), 2u);

  const std::vector<uint64_t> gang = SubmitGang(client, "g");
  ASSERT_TRUE(client.Call(Cmd::kSubmit, Jobs(4), &sub, 5000).ok());  // the stream goes on
  auto finish = [](FakeWorkers::Fake& f, size_t i) {
    proto::Result r;
    r.results.push_back({f.given.at(i).id, f.given.at(i).epoch, true, proto::Blob{"1"}, "", 1});
    f.peer->Send(Cmd::kResult, r);
  };
  finish(a, 0);
  finish(b, 0);
  fleet.Pump(800);
  EXPECT_EQ(a.given.size(), 2u) << "a freed slot of a worker the gang waits for took new work";
  EXPECT_EQ(b.given.size(), 2u) << "a freed slot of a worker the gang waits for took new work";

  finish(a, 1);
  finish(b, 1);
  fleet.Pump(1000);
  ASSERT_GE(a.given.size(), 3u);
  ASSERT_GE(b.given.size(), 3u);
  EXPECT_EQ(a.given[2].id, gang.at(0)) << "the gang runs as soon as its workers are idle";
  EXPECT_EQ(b.given[2].id, gang.at(1));
  EXPECT_EQ(a.given[2].world_size, 2u);
}

// A worker stopping while the broker is gone: a lease whose STARTED the broker never confirmed
// never ran, and used to keep the worker waiting for it for ever. Here a stand-in broker (a raw
// ROUTER) assigns one job and then says nothing.
TEST(WorkerStop, ALeaseTheBrokerNeverConfirmedDoesNotHoldUpAStop) {
  TempDir tmp;
  StandInBroker broker;
  testing::Proc w = testing::StartWorker(broker.endpoint(), tmp / "w", tmp / "w.log");
  std::string routing;
  ASSERT_TRUE(broker.Next(Cmd::kReady, &routing)) << testing::ReadFile(tmp / "w.log");
  proto::Assign a;
  proto::Assignment job;
  job.id = 1;
  job.epoch = 1;
  job.kind = "sleep";
  job.payload.data = "{\"ms\":1}";
  a.jobs.push_back(job);
  broker.Send(routing, Cmd::kAssign, a);
  ASSERT_TRUE(broker.Next(Cmd::kStarted, &routing)) << testing::ReadFile(tmp / "w.log");
  w.Signal(SIGTERM);
  EXPECT_EQ(w.Wait(20000), 0) << "the worker did not stop" << testing::ReadFile(tmp / "w.log");
  EXPECT_NE(testing::ReadFile(tmp / "w.log").find("lease_left_unstarted"), std::string::npos)
      << testing::ReadFile(tmp / "w.log");
}

// A stop that outlasts the wait for acknowledgements (a job longer than it still running): the
// result of that job gets the whole wait too. The worker used to count the wait from the stop's
// start and leave as soon as the result went out, so a broker that had not taken it ran the job
// again. Here the stand-in broker acknowledges a second and a half after the result.
TEST(WorkerStop, AResultThatEndsALongStopStillWaitsForItsAcknowledgement) {
  TempDir tmp;
  StandInBroker broker;
  testing::Proc w = testing::StartWorker(broker.endpoint(), tmp / "w", tmp / "w.log");
  std::string routing, body;
  ASSERT_TRUE(broker.Next(Cmd::kReady, &routing)) << testing::ReadFile(tmp / "w.log");
  proto::Assign a;
  proto::Assignment job;
  job.id = 3;
  job.epoch = 1;
  job.kind = "sleep";
  job.payload.data = "{\"ms\":4000}";  // past the worker's 3 s wait for acknowledgements
  a.jobs.push_back(job);
  broker.Send(routing, Cmd::kAssign, a);
  ASSERT_TRUE(broker.Next(Cmd::kStarted, &routing, &body)) << testing::ReadFile(tmp / "w.log");
  broker.SendRaw(routing, Cmd::kStarted, body);
  w.Signal(SIGTERM);
  // Heartbeats keep the worker on this connection (silent, the broker is taken for gone in 3 s).
  proto::Heartbeat h;
  h.heartbeat_ms = 1000;
  auto beat_for = [&](int64_t ms) {
    for (int64_t end = MonoMs() + ms; MonoMs() < end;) {
      broker.Send(routing, Cmd::kHeartbeat, h);
      if (broker.Next(Cmd::kResult, &routing, &body, 300)) return true;
    }
    return false;
  };
  ASSERT_TRUE(beat_for(20000)) << testing::ReadFile(tmp / "w.log");
  proto::Result sent;
  ASSERT_TRUE(proto::DecodeBody(body, &sent).ok());
  ASSERT_EQ(sent.results.size(), 1u);
  EXPECT_TRUE(sent.results[0].ok) << sent.results[0].error;
  (void)beat_for(1500);
  EXPECT_TRUE(w.Running()) << "the worker left without waiting for its last result's acknowledgement\n"
                           << testing::ReadFile(tmp / "w.log");
  proto::ResultAck ack;
  ack.accepted.push_back({3, 1});
  broker.Send(routing, Cmd::kResultAck, ack);
  EXPECT_EQ(w.Wait(20000), 0) << testing::ReadFile(tmp / "w.log");
  EXPECT_EQ(testing::ReadFile(tmp / "w.log").find("results_unacknowledged"), std::string::npos)
      << testing::ReadFile(tmp / "w.log");
}

// A lease the broker confirms late, while a long job holds the stop, still runs: the worker used
// to give up unconfirmed leases three seconds into any stop, so a confirmation after that (the
// broker counts an attempt then) found nothing, and the job waited for the goodbye to be requeued.
TEST(WorkerStop, ALeaseConfirmedWhileALongJobHoldsTheStopRuns) {
  TempDir tmp;
  StandInBroker broker;
  testing::Proc w = testing::StartWorker(broker.endpoint(), tmp / "w", tmp / "w.log");
  std::string routing, body;
  ASSERT_TRUE(broker.Next(Cmd::kReady, &routing)) << testing::ReadFile(tmp / "w.log");
  proto::Assign a;
  proto::Assignment slow, quick;
  slow.id = 10;
  slow.epoch = 1;
  slow.kind = "sleep";
  slow.payload.data = "{\"ms\":5000}";
  quick.id = 11;
  quick.epoch = 1;
  quick.kind = "echo";
  quick.payload.data = "{\"late\":true}";
  a.jobs = {slow, quick};
  broker.Send(routing, Cmd::kAssign, a);
  ASSERT_TRUE(broker.Next(Cmd::kStarted, &routing)) << testing::ReadFile(tmp / "w.log");
  proto::Started first;
  first.leases.push_back({10, 1});
  broker.Send(routing, Cmd::kStarted, first);
  w.Signal(SIGTERM);
  proto::Heartbeat h;
  h.heartbeat_ms = 1000;
  for (int64_t end = MonoMs() + 3800; MonoMs() < end;) {
    broker.Send(routing, Cmd::kHeartbeat, h);
    std::this_thread::sleep_for(std::chrono::milliseconds(400));
  }
  proto::Started late;
  late.leases.push_back({11, 1});
  broker.Send(routing, Cmd::kStarted, late);
  std::map<uint64_t, std::string> results;
  for (int64_t end = MonoMs() + 15000; results.size() < 2 && MonoMs() < end;) {
    if (!broker.Next(Cmd::kResult, &routing, &body, end - MonoMs())) break;
    proto::Result r;
    ASSERT_TRUE(proto::DecodeBody(body, &r).ok());
    proto::ResultAck ack;
    for (const auto& x : r.results) {
      results[x.id] = x.ok ? x.result.data : "failed: " + x.error;
      ack.accepted.push_back({x.id, x.epoch});
    }
    broker.Send(routing, Cmd::kResultAck, ack);
  }
  EXPECT_EQ(results[10], "{\"slept_ms\":5000}") << testing::ReadFile(tmp / "w.log");
  EXPECT_EQ(results[11], quick.payload.data) << "the late-confirmed job did not run\n" << testing::ReadFile(tmp / "w.log");
  EXPECT_EQ(w.Wait(20000), 0) << testing::ReadFile(tmp / "w.log");
  EXPECT_EQ(testing::ReadFile(tmp / "w.log").find("lease_left_unstarted"), std::string::npos);
}

// ZeroMQ reconnects a worker's socket by itself after a dropped connection, and the broker then
// sees a new peer: a RESULT sent on it is refused ("unknown worker; send READY first") and the
// broker's next word is DISCONNECT. The worker used to forget that result, leave the job out of
// its READY (so the broker requeued it and counted an attempt) and never send it again: a job
// that had finished ran again, and a few such blips dead-lettered it. Here a stand-in broker (a
// raw ROUTER) plays that sequence; the worker must list the lease in its new READY and send the
// same result again.
TEST(WorkerReconnect, AResultRefusedForAnUnknownPeerIsSentAgainAfterReady) {
  TempDir tmp;
  StandInBroker broker;
  testing::Proc w = testing::StartWorker(broker.endpoint(), tmp / "w", tmp / "w.log");
  std::string first, body;
  ASSERT_TRUE(broker.Next(Cmd::kReady, &first, &body)) << testing::ReadFile(tmp / "w.log");
  proto::Assign a;
  proto::Assignment job;
  job.id = 7;
  job.epoch = 3;
  job.kind = "echo";
  job.payload.data = "{\"said\":\"once\"}";
  a.jobs.push_back(job);
  broker.Send(first, Cmd::kAssign, a);
  ASSERT_TRUE(broker.Next(Cmd::kStarted, &first, &body)) << testing::ReadFile(tmp / "w.log");
  broker.SendRaw(first, Cmd::kStarted, body);  // confirmed: the job runs
  ASSERT_TRUE(broker.Next(Cmd::kResult, &first, &body)) << testing::ReadFile(tmp / "w.log");
  proto::Result sent;
  ASSERT_TRUE(proto::DecodeBody(body, &sent).ok());
  ASSERT_EQ(sent.results.size(), 1u);
  ASSERT_TRUE(sent.results[0].ok) << sent.results[0].error;

  // What the broker answers a peer it does not know.
  proto::ResultAck refused;
  refused.rejected.push_back({7, 3, "unknown worker; send READY first"});
  broker.Send(first, Cmd::kResultAck, refused);
  proto::Disconnect d;
  d.reason = "unknown worker; send READY";
  broker.Send(first, Cmd::kDisconnect, d);

  std::string second;
  ASSERT_TRUE(broker.Next(Cmd::kReady, &second, &body)) << testing::ReadFile(tmp / "w.log");
  EXPECT_NE(second, first) << "a new connection";
  proto::Ready ready;
  ASSERT_TRUE(proto::DecodeBody(body, &ready).ok());
  bool listed = false;
  for (const auto& l : ready.running) listed = listed || (l.id == 7 && l.epoch == 3);
  EXPECT_TRUE(listed) << "the READY after the reconnect leaves out the lease whose result is unacknowledged";
  ASSERT_TRUE(broker.Next(Cmd::kResult, &second, &body)) << "the result was not sent again\n" << testing::ReadFile(tmp / "w.log");
  proto::Result again;
  ASSERT_TRUE(proto::DecodeBody(body, &again).ok());
  ASSERT_EQ(again.results.size(), 1u);
  EXPECT_EQ(again.results[0].id, 7u);
  EXPECT_EQ(again.results[0].epoch, 3u);
  EXPECT_TRUE(again.results[0].ok);
  EXPECT_EQ(again.results[0].result.data, sent.results[0].result.data);
  EXPECT_EQ(again.results[0].result.data, job.payload.data);
  proto::ResultAck accepted;
  accepted.accepted.push_back({7, 3});
  broker.Send(second, Cmd::kResultAck, accepted);
  w.Signal(SIGTERM);
  EXPECT_EQ(w.Wait(20000), 0) << testing::ReadFile(tmp / "w.log");
}

// The other way round: a broker slower than the worker says its interval in its HEARTBEAT, and
// the worker waits heartbeat_misses of that before it takes the broker for gone and reconnects
// (it used to reconnect after its own 3 x 200 ms here, again and again).
TEST(WorkerReconnect, AWorkerWaitsOutTheBrokersLongerHeartbeatInterval) {
  TempDir tmp;
  StandInBroker broker;
  testing::Proc w = testing::StartWorker(broker.endpoint(), tmp / "w", tmp / "w.log", testing::kFastHeartbeats);
  // READYs the worker sends within `ms` (or up to the first, with `first`).
  auto readies = [&](int64_t ms, std::string* routing, bool first = false) {
    int n = 0;
    for (int64_t end = MonoMs() + ms; broker.Next(Cmd::kReady, routing, nullptr, end - MonoMs());) {
      ++n;
      if (first) break;
    }
    return n;
  };
  auto beat = [&](const std::string& to) {
    proto::Heartbeat h;
    h.heartbeat_ms = 1000;
    broker.Send(to, Cmd::kHeartbeat, h);
  };
  std::string routing;
  ASSERT_EQ(readies(5000, &routing, true), 1) << testing::ReadFile(tmp / "w.log");
  beat(routing);
  // Should the worker have reconnected before that reached it (a slow machine), answer its new
  // connection too, until it has been quiet for half a second.
  for (std::string again; readies(500, &again, true) == 1;) beat(again);
  // Silent for 1.5 s more (2 s since the last HEARTBEAT): within 3 x 1000 ms, so no new READY
  // (its own limit is 3 x 200 ms); after it, the worker reconnects.
  EXPECT_EQ(readies(1500, &routing), 0) << "the worker took a broker silent 2 s of its 3 for gone\n"
                                        << testing::ReadFile(tmp / "w.log");
  EXPECT_GE(readies(3000, &routing), 1) << "the worker never took the silent broker for gone\n"
                                        << testing::ReadFile(tmp / "w.log");
  w.Signal(SIGTERM);
  EXPECT_EQ(w.Wait(20000), 0) << testing::ReadFile(tmp / "w.log");
}

// A gang runs whole or not at all. When one rank has ended done and another is requeued (its
// worker lost between the two ranks' last words), the gang can never be placed again: the left
// rank ends (cancelled when rank 0, which writes the model, is the one done; failed otherwise)
// instead of waiting for ever beside idle workers. RETRY of a failed rank requeues the whole gang.
// CANCEL's `affected` counts the jobs it ended: cancelling one rank ends the whole gang (the
// others through the gang's abort), and those used to go uncounted.
TEST_F(BrokerGangs, CancellingAGangCountsEveryRankItEnds) {
  BrokerClient& client = *client_;
  const std::vector<uint64_t> g = SubmitGang(client, "cx");
  proto::CancelReq byjob;
  byjob.job = g.at(1);
  proto::Reply r;
  ASSERT_TRUE(client.Call(Cmd::kCancel, byjob, &r, 5000).ok());
  EXPECT_EQ(r.affected, 2u);
  SubmitGang(client, "cy");
  proto::CancelReq bybatch;
  bybatch.batch = "cy";
  ASSERT_TRUE(client.Call(Cmd::kCancel, bybatch, &r, 5000).ok());
  EXPECT_EQ(r.affected, 2u);
  proto::StatusReq q;
  q.batch = "cy";
  ASSERT_TRUE(client.Call(Cmd::kStatus, q, &r, 5000).ok());
  EXPECT_EQ(r.counts["cancelled"], 2);
  ASSERT_TRUE(client.Call(Cmd::kCancel, bybatch, &r, 5000).ok());
  EXPECT_EQ(r.affected, 0u) << "jobs already ended were counted again";
}

TEST_F(BrokerGangs, ARankLeftAloneEndsAndRetryRequeuesTheWholeGang) {
  BrokerClient& client = *client_;
  FakeWorkers& fleet = *fleet_;
  auto& a = fleet.Connect("a-cpu", "cpu", "");
  auto& b = fleet.Connect("b-cpu", "cpu", "");
  auto state_of = [&](uint64_t id) {
    proto::StatusReq q;
    q.job = id;
    proto::Reply r;
    Status st = client.Call(Cmd::kStatus, q, &r, 5000);
    return st.ok() && r.jobs.size() == 1 ? r.jobs[0].state + ": " + r.jobs[0].error : st.ToString();
  };
  auto answer = [](FakeWorkers::Fake& f, bool ok, bool requeue) {
    proto::Result r;
    r.results.push_back({f.given.back().id, f.given.back().epoch, ok, proto::Blob{"{}"}, ok ? "" : "broke", 1, requeue});
    f.peer->Send(Cmd::kResult, r);
  };

  // Rank 1 done (which it is only after rank 0 has finished the training), rank 0 given back
  // before its own report: rank 0 ends cancelled, with the reason.
  const std::vector<uint64_t> g = SubmitGang(client, "g");
  fleet.Pump(800);
  ASSERT_EQ(Ids(a.given), std::vector<uint64_t>{g.at(0)});
  ASSERT_EQ(Ids(b.given), std::vector<uint64_t>{g.at(1)});
  answer(b, true, false);
  fleet.Pump(300);
  answer(a, false, true);
  fleet.Pump(800);
  EXPECT_EQ(state_of(g.at(1)).substr(0, 5), "done:");
  std::string left = state_of(g.at(0));
  EXPECT_EQ(left.substr(0, 10), "cancelled:") << left;
  EXPECT_NE(left.find("nothing is left for it"), std::string::npos) << left;
  EXPECT_EQ(a.given.size(), 1u) << "a lone rank was placed";
  proto::RetryReq rq;
  proto::Reply rr;

  // Rank 0 fails: rank 1 is cancelled with it, and RETRY of rank 0 requeues both and places them
  // (RETRY of one rank used to requeue it alone, to wait for ever).
  const std::vector<uint64_t> h = SubmitGang(client, "h");
  fleet.Pump(800);
  ASSERT_EQ(a.given.back().id, h.at(0));
  ASSERT_EQ(b.given.back().id, h.at(1));
  answer(a, false, false);
  fleet.Pump(800);
  EXPECT_EQ(state_of(h.at(1)).substr(0, 10), "cancelled:");
  rq.job = h.at(0);
  ASSERT_TRUE(client.Call(Cmd::kRetry, rq, &rr, 5000).ok());
  EXPECT_EQ(rr.affected, 2u);
  fleet.Pump(1000);
  EXPECT_EQ(a.given.back().id, h.at(0)) << "the retried gang was not placed again";
  EXPECT_EQ(b.given.back().id, h.at(1));
  EXPECT_EQ(a.given.back().world_size, 2u);

  // Rank 0 done, rank 1 given back: the training is complete, rank 1 ends cancelled; RETRY of a
  // gang with a done rank is refused, as it can never run whole again.
  answer(a, true, false);
  fleet.Pump(300);
  answer(b, false, true);
  fleet.Pump(800);
  left = state_of(h.at(1));
  EXPECT_EQ(left.substr(0, 10), "cancelled:") << left;
  rq.job = h.at(1);
  Status st = client.Call(Cmd::kRetry, rq, &rr, 5000);
  EXPECT_FALSE(st.ok());
}

}  // namespace
}  // namespace asrf
