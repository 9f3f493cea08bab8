#include "broker/http_server.h"

#include <unistd.h>

#include <atomic>
#include <functional>
#include <thread>

#include <httplib.h>

#include "common/log.h"

namespace asrf {

namespace {

// httplib's pool queues every accepted connection without bound, each holding a file descriptor:
// a client opening thousands of idle connections could use up the broker's descriptors and stop
// its journal. Here at most `max_waiting` wait for a thread; past that the accepting thread
// serves the connection itself, so no more are accepted meanwhile and the rest wait in the
// kernel's listen backlog, not in this process.
class BoundedQueue : public httplib::TaskQueue {
 public:
  BoundedQueue(size_t threads, size_t max_waiting) : pool_(threads), max_waiting_(max_waiting) {}
  void enqueue(std::function<void()> fn) override {
    if (waiting_.load() >= max_waiting_) {
      fn();
      return;
    }
    waiting_++;
    pool_.enqueue([this, fn = std::move(fn)] {
      waiting_--;
      fn();
    });
  }
  void shutdown() override { pool_.shutdown(); }

 private:
  httplib::ThreadPool pool_;
  std::atomic<size_t> waiting_{0};
  const size_t max_waiting_;
};

}  // namespace

struct HttpServer::Impl {
  httplib::Server server;
  std::thread thread;
};

Status HttpServer::Start(const std::string& listen, const SnapshotHolder* snapshots,
                         std::function<Status(const std::string&)> checkpoint, std::unique_ptr<HttpServer>* out) {
  auto colon = listen.rfind(':');
  if (colon == std::string::npos) return Status::Invalid("--http must be HOST:PORT, not \"" + listen + "\"");
  std::string host = listen.substr(0, colon);
  int port = 0;
  try {
    port = std::stoi(listen.substr(colon + 1));
  } catch (...) {
    return Status::Invalid("--http must be HOST:PORT, not \"" + listen + "\"");
  }
  std::unique_ptr<HttpServer> s(new HttpServer());
  s->impl_ = std::make_unique<Impl>();
  httplib::Server& srv = s->impl_->server;
  // Bounds on what a client can make the broker hold: no request here has a body over a few
  // hundred bytes, a slow or silent client is dropped after 5 s, and connections are bounded.
  srv.new_task_queue = [] { return new BoundedQueue(8, 64); };
  // SO_REUSEADDR only: the library's default, SO_REUSEPORT, let a second broker (or any server
  // that sets it) listen on the same port, and the kernel then shared connections between them:
  // /metrics, /readyz and the journal checkpoint answered by either.
  srv.set_socket_options([](socket_t sock) {
    int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, reinterpret_cast<void*>(&yes), sizeof(yes));
  });
  srv.set_payload_max_length(64 * 1024);
  srv.set_read_timeout(5, 0);
  srv.set_write_timeout(5, 0);
  srv.set_keep_alive_timeout(5);
  srv.set_keep_alive_max_count(20);
  srv.Get("/healthz", [](const httplib::Request&, httplib::Response& res) { res.set_content("ok\n", "text/plain"); });
  srv.Get("/readyz", [snapshots](const httplib::Request&, httplib::Response& res) {
    std::string why;
    if (IsReady(*snapshots->Get(), &why)) {
      res.set_content("ready\n", "text/plain");
    } else {
      res.status = 503;
      res.set_content("not ready: " + why + "\n", "text/plain");
    }
  });
  srv.Get("/metrics", [snapshots](const httplib::Request&, httplib::Response& res) {
    res.set_content(RenderMetrics(*snapshots->Get()), "text/plain; version=0.0.4");
  });
  srv.Get("/api/status", [snapshots](const httplib::Request&, httplib::Response& res) {
    res.set_content(RenderStatusJson(*snapshots->Get()), "application/json");
  });
  if (checkpoint) {
    srv.Post("/admin/journal-checkpoint", [checkpoint](const httplib::Request& req, httplib::Response& res) {
      if (req.remote_addr != "127.0.0.1" && req.remote_addr != "::1") {
        res.status = 403;
        res.set_content("only from this host\n", "text/plain");
        return;
      }
      // A web page open in a browser on this host could post here too (a cross-site form): a
      // browser always names the page's origin, curl and backup.sh never do.
      if (req.has_header("Origin")) {
        res.status = 403;
        res.set_content("not from a web page\n", "text/plain");
        return;
      }
      std::string dir = req.get_param_value("dir");
      if (dir.empty() || dir[0] != '/') {
        res.status = 400;
        res.set_content("dir must be an absolute path that does not exist yet\n", "text/plain");
        return;
      }
      Status st = checkpoint(dir);
      res.status = st.ok() ? 200 : 500;
      // "ok pid=N": the caller checks that the broker it asked is the one holding the journal.
      res.set_content(st.ok() ? "ok pid=" + std::to_string(::getpid()) + "\n" : st.ToString() + "\n", "text/plain");
      LogInfo("journal_checkpoint").Kv("dir", dir).Kv("ok", st.ok()).Kv("error", st.message());
    });
  }
  srv.Get("/", [](const httplib::Request&, httplib::Response& res) {
    res.set_content(kStatusPageHtml, "text/html; charset=utf-8");
  });
  if (port == 0) {
    port = srv.bind_to_any_port(host);
    if (port <= 0) return Status::Unavailable("cannot listen for HTTP on " + listen);
  } else if (!srv.bind_to_port(host, port)) {
    // 9100, the default, is also prometheus-node-exporter's, which many hosts run.
    return Status::Unavailable("cannot listen for HTTP on " + listen +
                               ": the port is taken (by another broker, or another server: 9100 is also "
                               "prometheus-node-exporter's) or the address is not this host's; give another with "
                               "--http HOST:PORT (ASRF_HTTP), port 0 for any free one, or --http '' for none");
  }
  s->port_ = port;
  Impl* impl = s->impl_.get();
  impl->thread = std::thread([impl] { impl->server.listen_after_bind(); });
  LogInfo("http_listening").Kv("address", host + ":" + std::to_string(port));
  *out = std::move(s);
  return Status::Ok();
}

HttpServer::~HttpServer() {
  if (impl_) {
    impl_->server.stop();
    if (impl_->thread.joinable()) impl_->thread.join();
  }
}

}  // namespace asrf
