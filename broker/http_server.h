// The broker's HTTP endpoints, on their own thread (never the poll thread), served from the latest
// FleetSnapshot: /healthz (alive), /readyz (journal writes; PostgreSQL reachable or its backlog
// bounded), /metrics (Prometheus text), /api/status (JSON for the page) and / (the status page,
// embedded in the binary).
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "broker/fleet_snapshot.h"
#include "common/status.h"

namespace asrf {

class HttpServer {
 public:
  // listen: "HOST:PORT" (port 0 picks a free one). `snapshots` must outlive the server.
  // `checkpoint`, when set, serves POST /admin/journal-checkpoint?dir=DIR (loopback clients only).
  static Status Start(const std::string& listen, const SnapshotHolder* snapshots,
                      std::function<Status(const std::string&)> checkpoint, std::unique_ptr<HttpServer>* out);
  ~HttpServer();
  int port() const { return port_; }

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
  int port_ = 0;
};

// The status page (HTML with inline JavaScript).
extern const char kStatusPageHtml[];

}  // namespace asrf
