// The broker's HTTP side: health, readiness, Prometheus metrics registered from the start and
// matching the queue, and the status page rendered by headless Chromium after real jobs ran.
#include <gtest/gtest.h>

#include <filesystem>
#include <thread>
#include <regex>

#include "broker/fleet_snapshot.h"
#include "tests/harness.h"

namespace asrf::testing {
namespace {

std::string HttpEndpoint(const std::string& state_dir) {
  std::string e = ReadFile(state_dir + "/http.endpoint");
  while (!e.empty() && e.back() == '\n') e.pop_back();
  return e;
}

RunResult Curl(const std::string& url) { return RunCommand({"/usr/bin/curl", "-s", "-w", "\n%{http_code}", url}); }

// The value of one sample line ("name{labels} value") in a Prometheus text page; -1 if absent.
double Metric(const std::string& page, const std::string& sample) {
  size_t at = page.find("\n" + sample + " ");
  if (at == std::string::npos) return -1;
  return std::stod(page.substr(at + sample.size() + 2));
}

TEST(Http, HealthReadinessAndMetricsFromTheStart) {
  if (!std::filesystem::exists("/usr/bin/curl")) GTEST_SKIP() << "curl is not installed";
  TempDir tmp;
  BrokerProc b = StartBroker(tmp / "broker", tmp / "broker.log");
  std::string http = HttpEndpoint(tmp / "broker");
  ASSERT_FALSE(http.empty()) << ReadFile(tmp / "broker.log");
  EXPECT_EQ(Curl("http://" + http + "/healthz").out, "ok\n\n200");
  EXPECT_EQ(Curl("http://" + http + "/readyz").out, "ready\n\n200");
  std::string m = Curl("http://" + http + "/metrics").out;
  // Every family is present (at 0) before anything happened, so dashboards never break.
  for (const char* name :
       {"asrf_jobs{state=\"queued\"}", "asrf_jobs{state=\"dead\"}", "asrf_jobs_submitted_total",
        "asrf_jobs_finished_total{state=\"done\"}", "asrf_jobs_per_second", "asrf_oldest_queued_job_age_seconds",
        "asrf_leases", "asrf_workers{device=\"cpu\"}", "asrf_batch_fill_ratio", "asrf_batch_padding_ratio",
        "asrf_audio_seconds_total", "asrf_audio_seconds_per_second", "asrf_rtfx{model=\"default\"}",
        "asrf_journal_ok", "asrf_postgres_up", "asrf_event_sink_lag_records"}) {
    EXPECT_EQ(Metric(m, name), 0.0 + (std::string(name) == "asrf_journal_ok")) << name << "\n" << m;
  }
  for (const char* family : {"asrf_worker_outbox_results", "asrf_worker_gpu_memory_bytes", "asrf_worker_slots"}) {
    EXPECT_NE(m.find(std::string("# TYPE ") + family + " gauge"), std::string::npos) << family;
  }
  // Jobs, one worker: the numbers follow.
  Proc w = StartWorker(b.endpoint, tmp / "w", tmp / "w.log", {"--slots", "2"});
  ASSERT_EQ(Submit(b.endpoint, {"submit", "--kind", "echo", "--count", "30", "--wait"}).code, 0);
  ASSERT_EQ(Submit(b.endpoint, {"submit", "--kind", "fail", "--count", "2", "--wait"}).code, 1);
  ASSERT_EQ(Submit(b.endpoint, {"submit", "--kind", "sleep", "--payload", "{\"ms\":1}", "--count", "5",
                                "--priority", "-1"}).code, 0);
  std::this_thread::sleep_for(std::chrono::milliseconds(1200));
  m = Curl("http://" + http + "/metrics").out;
  EXPECT_EQ(Metric(m, "asrf_jobs{state=\"done\"}"), 35) << m;
  EXPECT_EQ(Metric(m, "asrf_jobs{state=\"failed\"}"), 2);
  EXPECT_EQ(Metric(m, "asrf_jobs_submitted_total"), 37);
  EXPECT_EQ(Metric(m, "asrf_jobs_by_kind{kind=\"echo\",state=\"done\"}"), 30);
  EXPECT_EQ(Metric(m, "asrf_workers{device=\"cpu\"}"), 1);
  EXPECT_GT(Metric(m, "asrf_jobs_per_second"), 0);
}

// A taken HTTP port (another broker here; on many hosts 9100 is node-exporter's) stops the
// broker at start with what to do about it. A second broker used to share the port with the
// first (SO_REUSEPORT), each answering some of the requests.
TEST(Http, ATakenPortIsAClearErrorAtStart) {
  TempDir t;
  BrokerProc a = StartBroker(t / "a", t / "a.log");
  ASSERT_FALSE(a.endpoint.empty()) << ReadFile(t / "a.log");
  const std::string taken = HttpEndpoint(t / "a");
  ASSERT_FALSE(taken.empty());
  RunResult b = RunCommand({ASRF_BROKER_BIN, "--listen", "tcp://127.0.0.1:*", "--state-dir", t / "b", "--http", taken},
                           20000);
  EXPECT_NE(b.code, 0);
  const std::string said = b.out + b.err;
  EXPECT_NE(said.find("cannot listen for HTTP on " + taken + ": the port is taken"), std::string::npos) << said;
  EXPECT_NE(said.find("--http HOST:PORT"), std::string::npos) << said;
}

// What a hostile or careless HTTP client can make the broker hold or do is bounded: a body over
// 64 KiB is refused, a job kind that is not a metric-safe name is refused at SUBMIT, and the
// journal checkpoint is taken neither for a web page (an Origin header) nor outside the state dir.
// Counters past a million print every digit (six significant ones turned a rate over a minute
// into a staircase of 10s and 100s), fractions read back as themselves; and the history backlog,
// counted up to 1,000,000, makes the broker not ready at that count while PostgreSQL is down (it
// tested "over 1,000,000", which the count never reaches).
TEST(Http, LargeCountersPrintExactlyAndTheBacklogLimitIsReached) {
  FleetSnapshot s;
  s.audio_seconds_total = 1234567.0;
  s.journal_syncs = 98765432;
  s.batch_fill_ratio = 0.1;
  std::string m = RenderMetrics(s);
  EXPECT_NE(m.find("\nasrf_audio_seconds_total 1234567\n"), std::string::npos) << m;
  EXPECT_NE(m.find("\nasrf_journal_syncs_total 98765432\n"), std::string::npos) << m;
  EXPECT_NE(m.find(" 0.1\n"), std::string::npos) << m;
  std::string why;
  s.pg_configured = true;
  s.pg_up = false;
  s.event_backlog = 999999;
  EXPECT_TRUE(IsReady(s, &why)) << why;
  s.event_backlog = 1000000;
  EXPECT_FALSE(IsReady(s, &why));
  EXPECT_NE(why.find("1,000,000"), std::string::npos) << why;
}

TEST(Http, BoundsAgainstHostileClients) {
  if (!std::filesystem::exists("/usr/bin/curl")) GTEST_SKIP() << "curl is not installed";
  TempDir tmp;
  BrokerProc b = StartBroker(tmp / "broker", tmp / "broker.log");
  std::string http = HttpEndpoint(tmp / "broker");
  ASSERT_FALSE(http.empty()) << ReadFile(tmp / "broker.log");
  RunResult big = RunCommand({"/usr/bin/curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
                              "-H", "Content-Length: 100000000000", "--data-binary", "x", "--max-time", "10",
                              "http://" + http + "/"});
  EXPECT_EQ(big.out, "413") << big.err;
  RunResult bad = Submit(b.endpoint, {"submit", "--kind", "bad\xff\"kind"});
  EXPECT_NE(bad.code, 0);
  EXPECT_NE(bad.err.find("only letters, digits"), std::string::npos) << bad.err;
  auto post = [&](const std::string& dir, bool from_page) {
    std::vector<std::string> argv = {"/usr/bin/curl", "-s", "-w", "\n%{http_code}", "-X", "POST",
                                     "--data-urlencode", "dir=" + dir};
    if (from_page) argv.insert(argv.end(), {"-H", "Origin: http://evil.example"});
    argv.push_back("http://" + http + "/admin/journal-checkpoint");
    return RunCommand(argv).out;
  };
  std::string page = post(tmp / "broker/from-page", true);
  EXPECT_NE(page.find("403"), std::string::npos) << page;
  EXPECT_FALSE(std::filesystem::exists(tmp / "broker/from-page"));
  std::string outside = post(tmp / "elsewhere", false);
  EXPECT_NE(outside.find("inside the state dir"), std::string::npos) << outside;
  EXPECT_FALSE(std::filesystem::exists(tmp / "elsewhere"));
  std::string ok = post(tmp / "broker/cp", false);
  EXPECT_EQ(ok.rfind("ok pid=", 0), 0u) << ok;
  EXPECT_TRUE(std::filesystem::exists(tmp / "broker/cp/CURRENT"));
  EXPECT_EQ(std::filesystem::status(tmp / "broker/cp").permissions() & std::filesystem::perms::others_all,
            std::filesystem::perms::none);
  EXPECT_EQ(Curl("http://" + http + "/healthz").out, "ok\n\n200") << "the broker stopped answering";
}

TEST(Http, StatusPageShowsWhatMetricsSay) {
  const char* chromium = "/usr/bin/chromium";
  if (!std::filesystem::exists(chromium)) GTEST_SKIP() << "chromium is not installed (scripts/setup.sh installs it)";
  TempDir tmp;
  BrokerProc b = StartBroker(tmp / "broker", tmp / "broker.log");
  std::string http = HttpEndpoint(tmp / "broker");
  Proc w = StartWorker(b.endpoint, tmp / "w", tmp / "w.log", {"--slots", "2", "--worker-id", "page-worker"});
  ASSERT_EQ(Submit(b.endpoint, {"submit", "--kind", "echo", "--count", "25", "--wait"}).code, 0);
  ASSERT_EQ(Submit(b.endpoint, {"submit", "--kind", "fail", "--payload", "{\"message\":\"bad input 7\"}", "--wait"}).code,
            1);
  // One job stays leased and one queued behind it while the page is looked at (steady numbers).
  ASSERT_EQ(Submit(b.endpoint, {"submit", "--kind", "sleep", "--payload", "{\"ms\":60000}", "--count", "3"}).code, 0);
  std::this_thread::sleep_for(std::chrono::milliseconds(1200));
  std::string shot = std::string(ASRF_TEST_OUTPUT_DIR) + "/status_page.png";
  std::vector<std::string> flags = {chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                                    "--no-first-run", "--disable-background-networking", "--disable-component-update",
                                    "--disable-sync", "--user-data-dir=" + tmp / "chrome", "--virtual-time-budget=8000",
                                    "--window-size=1200,1000"};
  std::vector<std::string> dump = flags;
  dump.insert(dump.end(), {"--dump-dom", "http://" + http + "/"});
  RunResult dom = RunCommand(dump, 120000);
  ASSERT_EQ(dom.code, 0) << dom.err;
  std::vector<std::string> s = flags;
  s.insert(s.end(), {"--screenshot=" + shot, "http://" + http + "/"});
  RunResult png = RunCommand(s, 120000);
  EXPECT_EQ(png.code, 0) << png.err;
  EXPECT_TRUE(std::filesystem::exists(shot)) << "screenshot missing";
  std::string m = Curl("http://" + http + "/metrics").out;
  auto shown = [&](const std::string& id) {
    std::smatch match;
    std::regex re("id=\"" + id + "\">([^<]*)<");
    return std::regex_search(dom.out, match, re) ? match[1].str() : std::string("(missing)");
  };
  ASSERT_NE(dom.out.find("data-loaded=\"1\""), std::string::npos) << "the page never loaded its data\n" << dom.out;
  for (const char* st : {"queued", "leased", "done", "failed", "dead", "cancelled"}) {
    double metric = Metric(m, std::string("asrf_jobs{state=\"") + st + "\"}");
    EXPECT_EQ(shown(std::string("count-") + st), std::to_string(static_cast<long>(metric))) << st;
  }
  EXPECT_EQ(shown("count-done"), "25");
  EXPECT_EQ(shown("count-failed"), "1");
  EXPECT_EQ(shown("count-leased"), "2");
  EXPECT_EQ(shown("count-queued"), "1");
  EXPECT_NE(dom.out.find("bad input 7"), std::string::npos) << "recent failures do not show the reason";
}

}  // namespace
}  // namespace asrf::testing
