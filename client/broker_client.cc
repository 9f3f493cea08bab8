#include "client/broker_client.h"

namespace asrf {

using proto::Cmd;

Status StatusFromError(const proto::Error& e) {
  std::string m = e.code + ": " + e.message;
  if (e.code == "not_found") return Status::NotFound(m);
  if (e.code == "journal_unavailable" || e.code == "pg_unavailable" || e.code == "busy") return Status::Unavailable(m);
  return Status::Invalid(m);
}

BrokerClient::BrokerClient(std::string endpoint) : endpoint_(std::move(endpoint)) {
  sock_ = std::make_unique<zmq::socket_t>(ctx_, zmq::socket_type::dealer);
  sock_->set(zmq::sockopt::linger, 0);
  sock_->set(zmq::sockopt::maxmsgsize, proto::kMaxMessageBytes);
  sock_->set(zmq::sockopt::sndhwm, 100000);
  sock_->set(zmq::sockopt::rcvhwm, 100000);
  sock_->connect(endpoint_);
}

BrokerClient::~BrokerClient() = default;

void BrokerClient::SendRaw(Cmd cmd, const std::string& body) {
  uint8_t c = static_cast<uint8_t>(cmd);
  sock_->send(zmq::buffer(proto::kTag), zmq::send_flags::sndmore | zmq::send_flags::dontwait);
  sock_->send(zmq::buffer(&c, 1), zmq::send_flags::sndmore | zmq::send_flags::dontwait);
  sock_->send(zmq::buffer(body), zmq::send_flags::dontwait);
}

Status BrokerClient::Decode(std::vector<zmq::message_t>& frames, Incoming* out) {
  if (frames.size() != 3) return Status::Invalid("bad frame count from broker");
  ASRF_RETURN_IF_ERROR(proto::CheckTag(frames[0].to_string_view()));
  Cmd cmd;
  ASRF_RETURN_IF_ERROR(proto::ParseCmd(frames[1].to_string_view(), &cmd));
  out->cmd = cmd;
  std::string_view body = frames[2].to_string_view();
  switch (cmd) {
    case Cmd::kReply: return proto::DecodeBody(body, &out->reply, proto::kMaxModelBytes);  // MODELS export
    case Cmd::kError: return proto::DecodeBody(body, &out->error);
    case Cmd::kEvent: return proto::DecodeBody(body, &out->event);
    default: return Status::Invalid(std::string("unexpected ") + proto::CmdName(cmd) + " from broker");
  }
}

Status BrokerClient::Receive(int64_t timeout_ms, Incoming* out) {
  if (!events_.empty()) {
    out->cmd = Cmd::kEvent;
    out->event = std::move(events_.front());
    events_.pop_front();
    return Status::Ok();
  }
  return ReceiveSocket(timeout_ms, out);
}

Status BrokerClient::ReceiveSocket(int64_t timeout_ms, Incoming* out) {
  int64_t deadline = MonoMs() + std::max<int64_t>(timeout_ms, 0);
  for (;;) {
    zmq::pollitem_t item{sock_->handle(), 0, ZMQ_POLLIN, 0};
    int64_t left = deadline - MonoMs();
    try {
      zmq::poll(&item, 1, std::chrono::milliseconds(std::max<int64_t>(left, 0)));
    } catch (const zmq::error_t& e) {
      if (e.num() != EINTR) return Status::IOError(e.what());
    }
    if (item.revents & ZMQ_POLLIN) {
      std::vector<zmq::message_t> frames;
      zmq::message_t msg;
      if (sock_->recv(msg, zmq::recv_flags::dontwait)) {
        bool more = msg.more();
        frames.push_back(std::move(msg));
        while (more) {
          zmq::message_t part;
          if (!sock_->recv(part, zmq::recv_flags::none)) break;
          more = part.more();
          frames.push_back(std::move(part));
        }
        if (Decode(frames, out).ok()) return Status::Ok();
      }
    }
    if (MonoMs() >= deadline) return Status::Timeout("no message from the broker at " + endpoint_);
  }
}

Status BrokerClient::CallRaw(Cmd cmd, uint64_t req, const std::string& body, proto::Reply* out, int64_t timeout_ms,
                             int64_t resend_ms) {
  int64_t start = MonoMs();
  int64_t deadline = start + timeout_ms;
  int64_t next_send = start;
  for (;;) {
    int64_t now = MonoMs();
    if (now >= deadline) {
      return Status::Timeout("the broker at " + endpoint_ + " did not answer within " +
                             std::to_string(timeout_ms / 1000.0).substr(0, 5) + " s (is asr-broker running?)");
    }
    if (now >= next_send) {
      SendRaw(cmd, body);
      next_send = now + resend_ms;
    }
    Incoming in;
    Status st = ReceiveSocket(std::min(next_send, deadline) - now, &in);
    if (!st.ok()) {
      if (st.code() == Status::Code::kTimeout) continue;
      return st;
    }
    if (in.cmd == Cmd::kEvent) {
      events_.push_back(std::move(in.event));
      continue;
    }
    if (in.req() != req) continue;  // an answer to an earlier, resent request
    if (in.cmd == Cmd::kError) return StatusFromError(in.error);
    *out = std::move(in.reply);
    return Status::Ok();
  }
}

}  // namespace asrf
