// bench/result_sink_bench: results per second that one worker's ResultSink makes durable in
// PostgreSQL (batched, epoch-fenced upserts), beside the same rows written one INSERT per row in
// autocommit mode on the same database. Needs a database URL (bench/run_result_sink_bench.sh
// starts a private cluster for it). Prints one JSON line.
#include <iostream>
#include <thread>

#include <boost/program_options.hpp>

#include "common/clock.h"
#include "common/pg.h"
#include "worker/result_sink.h"

int main(int argc, char** argv) {
  namespace po = boost::program_options;
  using namespace asrf;
  std::string pg, outbox;
  int64_t count = 200000, single = 5000;
  int payload_bytes = 64;
  po::options_description desc("result_sink_bench options");
  desc.add_options()("help,h", "print this help")
      ("pg", po::value(&pg)->required(), "PostgreSQL conninfo")
      ("outbox", po::value(&outbox)->default_value("/tmp/asrf-sink-bench-outbox"), "outbox directory")
      ("count", po::value(&count)->default_value(count), "results through the sink")
      ("single", po::value(&single)->default_value(single), "rows for the one-INSERT-per-row baseline")
      ("payload-bytes", po::value(&payload_bytes)->default_value(payload_bytes), "bytes of each result");
  po::variables_map vm;
  try {
    po::store(po::parse_command_line(argc, argv, desc), vm);
    if (vm.count("help")) {
      std::cout << desc;
      return 0;
    }
    po::notify(vm);
  } catch (const po::error& e) {
    std::cerr << e.what() << "\n" << desc;
    return 2;
  }
  std::unique_ptr<PgConn> conn;
  Status st = PgConn::Connect(pg, &conn);
  int applied = 0;
  if (st.ok()) st = Migrate(conn.get(), &applied);
  if (st.ok()) st = conn->Exec("TRUNCATE results");
  if (!st.ok()) {
    std::cerr << st.ToString() << "\n";
    return 1;
  }
  const std::string payload(payload_bytes, 'r');

  // Through the sink, the way a worker uses it: Put as results finish, take back the durable ones.
  double sink_per_s = 0;
  {
    ResultSinkOptions o;
    o.conninfo = pg;
    o.outbox_dir = outbox;
    o.worker_id = "bench";
    o.host = "bench";
    o.device = "cpu";
    std::unique_ptr<ResultSink> sink;
    st = ResultSink::Open(o, &sink);
    if (!st.ok()) {
      std::cerr << st.ToString() << "\n";
      return 1;
    }
    // Let it connect first.
    for (int i = 0; i < 100 && !sink->GetStats().pg_up; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(20));
    int64_t t0 = MonoUs(), durable = 0;
    for (int64_t id = 1; id <= count;) {
      std::vector<proto::JobResult> batch;
      for (int k = 0; k < 1000 && id <= count; ++k, ++id) {
        proto::JobResult r;
        r.id = static_cast<uint64_t>(id);
        r.epoch = 1;
        r.ok = true;
        r.result.data = payload;
        r.run_ms = 1;
        batch.push_back(std::move(r));
      }
      sink->Put(std::move(batch));
      durable += sink->TakeDurable().size();
    }
    while (durable < count) {
      durable += sink->TakeDurable().size();
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    double secs = (MonoUs() - t0) / 1e6;
    sink_per_s = count / secs;
    ResultSinkStats s = sink->GetStats();
    std::cerr << "sink: " << count << " results durable in " << secs << " s (" << s.written << " straight to "
              << "PostgreSQL, " << s.outboxed << " via the outbox)\n";
  }
  PgResult r;
  st = conn->Query("SELECT count(*) FROM results", {}, &r);
  int64_t rows = st.ok() ? r.get_int(0, 0) : -1;

  // Baseline: one INSERT per row, autocommit.
  int64_t t0 = MonoUs();
  for (int64_t i = 0; i < single; ++i) {
    st = conn->Query("INSERT INTO results (job_id, lease_epoch, worker, ok, payload, run_ms) VALUES ($1, 1, 'bench', "
                     "true, $2, 1)",
                     {std::to_string(count + 1 + i), payload}, nullptr, {false, true});
    if (!st.ok()) {
      std::cerr << st.ToString() << "\n";
      return 1;
    }
  }
  double single_per_s = single / ((MonoUs() - t0) / 1e6);
  std::printf("{\"sink_results_per_s\":%.0f,\"sink_results\":%lld,\"rows_in_table\":%lld,"
              "\"one_insert_per_row_per_s\":%.0f,\"single_rows\":%lld,\"payload_bytes\":%d}\n",
              sink_per_s, static_cast<long long>(count), static_cast<long long>(rows), single_per_s,
              static_cast<long long>(single), payload_bytes);
  return rows == count ? 0 : 1;
}
