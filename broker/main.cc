// asr-broker: the durable job queue. See `asr-broker --help` and schema/protocol.md.
#include <csignal>
#include <iostream>

#include "broker/broker.h"
#include "common/log.h"
#include "common/options.h"
#include "common/pg.h"

namespace {
std::atomic<bool> g_stop{false};
void OnSignal(int) { g_stop.store(true); }
}  // namespace

int main(int argc, char** argv) {
  using namespace asrf;
  SetLogProcessName("asr-broker");
  BrokerOptions o;
  po::options_description desc("asr-broker options");
  desc.add_options()
      ("listen", po::value(&o.listen)->default_value(o.listen),
       "ZeroMQ endpoint to bind; tcp://127.0.0.1:0 picks a free port (written to the endpoint file)")
      ("state-dir", po::value(&o.state_dir)->default_value(o.state_dir),
       "directory for the RocksDB journal; a restarted broker replays it")
      ("endpoint-file", po::value(&o.endpoint_file)->default_value(""),
       "file that receives the bound endpoint (default: STATE_DIR/broker.endpoint)")
      ("max-attempts", po::value(&o.max_attempts)->default_value(o.max_attempts),
       "attempts (started and lost, or timed out) before a job is dead")
      ("heartbeat-ms", po::value(&o.heartbeat_ms)->default_value(o.heartbeat_ms),
       "heartbeat interval, both ways")
      ("heartbeat-misses", po::value(&o.heartbeat_misses)->default_value(o.heartbeat_misses),
       "missed heartbeats after which a worker loses its leases")
      ("backoff-ms", po::value(&o.backoff_ms)->default_value(o.backoff_ms),
       "delay before a lost job runs again; doubles with each attempt")
      ("backoff-max-ms", po::value(&o.backoff_max_ms)->default_value(o.backoff_max_ms), "longest retry delay")
      ("result-retention-s", po::value(&o.result_retention_s)->default_value(o.result_retention_s),
       "seconds a finished job's result is kept for clients")
      ("forget-after-s", po::value(&o.forget_after_s)->default_value(o.forget_after_s, "3 days with --pg, else 0"),
       "seconds after which a done or cancelled job leaves the broker's memory and journal (its history and "
       "result stay in PostgreSQL); at least --result-retention-s; 0 = never; default: 3 days with --pg, "
       "never without")
      ("pg", po::value(&o.pg)->default_value(""),
       "PostgreSQL conninfo (key=value or postgresql:// URI; PGHOST, PGPASSFILE... honoured; never a password "
       "here) for the job history; empty: the broker runs without it")
      ("pg-statement-timeout-ms", po::value(&o.pg_statement_timeout_ms)->default_value(o.pg_statement_timeout_ms),
       "the longest one PostgreSQL statement may take (job history, results past retention, the registry); one "
       "held longer by a lock or a stalled server fails and is tried again")
      ("http", po::value(&o.http)->default_value("127.0.0.1:9100"),
       "HOST:PORT for /healthz, /readyz, /metrics and the status page at /; localhost unless you mean it; "
       "empty turns it off; port 0 picks one (written to STATE_DIR/http.endpoint)")
      ("batch-budget-s", po::value(&o.batch_budget_s)->default_value(o.batch_budget_s),
       "transcription batches: padded audio seconds per batch (segments x the longest one), 1..1000")
      ("batch-max-items", po::value(&o.batch_max_items)->default_value(o.batch_max_items),
       "transcription batches: most segments per batch (1 turns batching off)")
      ("batch-max-delay-ms", po::value(&o.batch_max_delay_ms)->default_value(o.batch_max_delay_ms),
       "transcription batches: a partial batch leaves once its oldest segment has waited this long")
      ("gang-port-base", po::value(&o.gang_port_base)->default_value(o.gang_port_base),
       "gangs (data-parallel training): rank 0 serves the rendezvous on this port + (a counter mod 1000) on its "
       "worker's advertised host")
      ("migrate", po::bool_switch(), "apply the SQL migrations to --pg and exit")
      ("max-messages-per-wake", po::value(&o.max_messages_per_wake)->default_value(o.max_messages_per_wake),
       "messages handled per poll wake-up before timers and dispatch run");
  po::variables_map vm;
  ParseResult pr = ParseOptions(argc, argv, desc,
                                "usage: asr-broker [--listen tcp://127.0.0.1:5555] [--state-dir DIR] [--config FILE]",
                                &vm);
  if (!pr.proceed) return pr.exit_code;

  if (vm["migrate"].as<bool>()) {
    if (o.pg.empty()) {
      std::cerr << "asr-broker: --migrate needs --pg (or ASRF_PG)\n";
      return 2;
    }
    std::unique_ptr<PgConn> conn;
    Status st = PgConn::Connect(o.pg, &conn);
    int applied = 0;
    if (st.ok()) st = Migrate(conn.get(), &applied);
    if (!st.ok()) {
      std::cerr << "asr-broker: " << st.message() << "\n";
      return st.code() == Status::Code::kInvalid ? 2 : 1;
    }
    std::cout << "applied " << applied << " migration(s); the schema is at version " << kMigrations[kNumMigrations - 1].version
              << "\n";
    return 0;
  }

  std::signal(SIGTERM, OnSignal);
  std::signal(SIGINT, OnSignal);
  std::signal(SIGPIPE, SIG_IGN);
  std::unique_ptr<Broker> broker;
  Status st = Broker::Open(o, &broker);
  if (!st.ok()) {
    LogError("broker_start_failed").Kv("error", st.ToString());
    std::cerr << "asr-broker: " << st.ToString() << "\n";
    return 1;
  }
  st = broker->Run(&g_stop);
  if (!st.ok()) {
    LogError("broker_failed").Kv("error", st.ToString());
    return 1;
  }
  LogInfo("broker_stopped");
  return 0;
}
