#include "broker/http_server.h"

#include <thread>

#include <httplib.h>

#include "common/log.h"

namespace asrf {

struct HttpServer::Impl {
  httplib::Server server;
  std::thread thread;
};

Status HttpServer::Start(const std::string& listen, const SnapshotHolder* snapshots, std::unique_ptr<HttpServer>* out) {
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
  srv.Get("/", [](const httplib::Request&, httplib::Response& res) {
    res.set_content(kStatusPageHtml, "text/html; charset=utf-8");
  });
  if (port == 0) {
    port = srv.bind_to_any_port(host);
    if (port <= 0) return Status::Unavailable("cannot listen for HTTP on " + listen);
  } else if (!srv.bind_to_port(host, port)) {
    return Status::Unavailable("cannot listen for HTTP on " + listen + " (in use, or a bad address?)");
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
