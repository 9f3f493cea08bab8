// BrokerClient: the client side of the protocol over one DEALER socket. Requests carry a `req`
// number; replies are matched by it. EVENTs that arrive while waiting for a reply are kept and
// handed out by Receive(). Not thread-safe: one client per thread.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <string>

#include <zmq.hpp>

#include "common/clock.h"
#include "common/status.h"
#include "schema/protocol.h"

namespace asrf {

struct Incoming {
  proto::Cmd cmd = proto::Cmd::kReply;
  proto::Reply reply;  // cmd == kReply
  proto::Error error;  // cmd == kError
  proto::Event event;  // cmd == kEvent
  uint64_t req() const { return cmd == proto::Cmd::kError ? error.req : reply.req; }
};

// Turns an ERROR reply into a Status.
Status StatusFromError(const proto::Error& e);

class BrokerClient {
 public:
  explicit BrokerClient(std::string endpoint);
  ~BrokerClient();

  const std::string& endpoint() const { return endpoint_; }
  uint64_t NextReq() { return ++req_; }

  // Sends one message. Never blocks (the message is queued until the broker is reachable).
  template <typename T>
  void Send(proto::Cmd cmd, const T& body) {
    SendRaw(cmd, proto::EncodeBody(body));
  }
  void SendRaw(proto::Cmd cmd, const std::string& body);

  // Waits up to timeout_ms for the next message (kept EVENTs first). Timeout status when none.
  Status Receive(int64_t timeout_ms, Incoming* out);

  // Sends a request (setting its req) and waits for the matching REPLY, resending it every
  // resend_ms in case the broker restarted. Returns Timeout when timeout_ms passes with no answer,
  // or the ERROR as a Status.
  template <typename T>
  Status Call(proto::Cmd cmd, T body, proto::Reply* out, int64_t timeout_ms, int64_t resend_ms = 2000) {
    body.req = NextReq();
    return CallRaw(cmd, body.req, proto::EncodeBody(body), out, timeout_ms, resend_ms);
  }
  Status CallRaw(proto::Cmd cmd, uint64_t req, const std::string& body, proto::Reply* out, int64_t timeout_ms,
                 int64_t resend_ms);

  // EVENTs received while waiting inside Call.
  std::deque<proto::Event>& pending_events() { return events_; }

 private:
  Status ReceiveSocket(int64_t timeout_ms, Incoming* out);
  Status Decode(std::vector<zmq::message_t>& frames, Incoming* out);
  std::string endpoint_;
  zmq::context_t ctx_{1};
  std::unique_ptr<zmq::socket_t> sock_;
  uint64_t req_ = 0;
  std::deque<proto::Event> events_;
};

}  // namespace asrf
