#include <cctype>
#include <string>

#include "schema/protocol.h"

namespace asrf::proto {

bool IsKnownCmd(uint8_t c) {
  switch (static_cast<Cmd>(c)) {
    case Cmd::kSubmit: case Cmd::kStatus: case Cmd::kCancel: case Cmd::kWatch: case Cmd::kWorkers:
    case Cmd::kJobs: case Cmd::kRetry: case Cmd::kModels: case Cmd::kReady: case Cmd::kHeartbeat: case Cmd::kStarted:
    case Cmd::kResult: case Cmd::kProgress: case Cmd::kDisconnect: case Cmd::kAssign: case Cmd::kCancelJobs:
    case Cmd::kResultAck: case Cmd::kReply: case Cmd::kEvent: case Cmd::kError:
      return true;
  }
  return false;
}

const char* CmdName(Cmd c) {
  switch (c) {
    case Cmd::kSubmit: return "SUBMIT";
    case Cmd::kStatus: return "STATUS";
    case Cmd::kCancel: return "CANCEL";
    case Cmd::kWatch: return "WATCH";
    case Cmd::kWorkers: return "WORKERS";
    case Cmd::kJobs: return "JOBS";
    case Cmd::kRetry: return "RETRY";
    case Cmd::kModels: return "MODELS";
    case Cmd::kReady: return "READY";
    case Cmd::kHeartbeat: return "HEARTBEAT";
    case Cmd::kStarted: return "STARTED";
    case Cmd::kResult: return "RESULT";
    case Cmd::kProgress: return "PROGRESS";
    case Cmd::kDisconnect: return "DISCONNECT";
    case Cmd::kAssign: return "ASSIGN";
    case Cmd::kCancelJobs: return "CANCEL_JOBS";
    case Cmd::kResultAck: return "RESULT_ACK";
    case Cmd::kReply: return "REPLY";
    case Cmd::kEvent: return "EVENT";
    case Cmd::kError: return "ERROR";
  }
  return "UNKNOWN";
}

static const char* const kStateNames[kNumStates] = {"queued", "leased", "done", "failed", "dead", "cancelled"};

const char* StateName(JobState s) { return kStateNames[static_cast<int>(s)]; }

bool ParseState(std::string_view name, JobState* out) {
  for (int i = 0; i < kNumStates; ++i) {
    if (name == kStateNames[i]) {
      *out = static_cast<JobState>(i);
      return true;
    }
  }
  return false;
}

Status CheckTag(std::string_view tag) {
  if (tag.size() > 16 || tag.substr(0, kTagPrefix.size()) != kTagPrefix) {
    return Status::Invalid("bad_tag: frame 1 must be \"" + std::string(kTag) + "\"");
  }
  if (tag != kTag) {
    std::string v(tag.substr(kTagPrefix.size()));
    for (char& c : v) if (c < 0x20 || c > 0x7e) c = '?';
    return Status::Unavailable("unsupported_version: peer speaks version \"" + v + "\", this broker speaks " +
                               std::to_string(kVersion));
  }
  return Status::Ok();
}

Status ParseCmd(std::string_view frame, Cmd* out) {
  if (frame.size() != 1) return Status::Invalid("bad_command: command frame must be exactly one byte");
  uint8_t c = static_cast<uint8_t>(frame[0]);
  if (!IsKnownCmd(c)) return Status::Invalid("unknown_command: command byte " + std::to_string(c));
  *out = static_cast<Cmd>(c);
  return Status::Ok();
}

namespace {
// Counts the values a body declares before any is built: a decoded value takes about 24 bytes
// of memory, so 64 MiB of one-byte values would otherwise cost about 1.5 GiB.
struct ValueCounter : msgpack::null_visitor {
  size_t values = 0;
  bool Add(size_t n) { return (values += n) <= kMaxValuesPerMessage; }
  bool start_array(uint32_t n) { return Add(n); }
  bool start_map(uint32_t n) { return Add(2 * static_cast<size_t>(n)); }
};
}  // namespace

Status DecodeRaw(std::string_view body, msgpack::object_handle* out, size_t max_bin) {
  if (body.empty()) return Status::Invalid("malformed body: empty");
  if (body.size() > static_cast<size_t>(kMaxMessageBytes)) return Status::Invalid("oversized body");
  {
    ValueCounter count;
    std::size_t off = 0;
    try {
      msgpack::parse(body.data(), body.size(), off, count);
    } catch (const std::exception&) {
      // Malformed input is reported by the decoder below, with its own message.
    }
    if (count.values > kMaxValuesPerMessage) {
      return Status::Invalid("oversized body: more than " + std::to_string(kMaxValuesPerMessage) + " values");
    }
  }
  // Bounds on every container so a hostile 10-byte body cannot ask for a 4-billion-entry array.
  msgpack::unpack_limit limit(/*array=*/kMaxJobsPerMessage * 2, /*map=*/256, /*str=*/max_bin,
                              /*bin=*/max_bin, /*ext=*/1024, /*depth=*/16);
  try {
    std::size_t off = 0;
    *out = msgpack::unpack(body.data(), body.size(), off, nullptr, nullptr, limit);
    if (off != body.size()) return Status::Invalid("malformed body: trailing bytes after the MessagePack map");
  } catch (const msgpack::insufficient_bytes&) {
    return Status::Invalid("malformed body: truncated MessagePack");
  } catch (const msgpack::depth_size_overflow&) {  // a size_overflow too: caught first
    return Status::Invalid("malformed body: nested too deeply");
  } catch (const msgpack::size_overflow& e) {
    return Status::Invalid(std::string("oversized field in body: ") + e.what());
  } catch (const std::exception& e) {
    return Status::Invalid(std::string("malformed body: ") + e.what());
  }
  if (out->get().type != msgpack::type::MAP) return Status::Invalid("malformed body: not a MessagePack map");
  return Status::Ok();
}

Status ValidModelName(std::string_view name) {
  bool ok = !name.empty() && name.size() <= 128 && name[0] != '.';
  for (char c : name) ok = ok && (std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-' || c == '.');
  // Not ending in .vDIGITS: a worker caches registry version N of "en" as en.vN.pt beside the
  // models training jobs write, so a model named "en.v3" would be taken for (and overwrite) that.
  size_t v = name.rfind(".v");
  if (ok && v != std::string_view::npos && v + 2 < name.size() &&
      name.find_first_not_of("0123456789", v + 2) == std::string_view::npos) {
    ok = false;
  }
  if (ok) return Status::Ok();
  return Status::Invalid("model name \"" + std::string(name.substr(0, 128)) +
                         "\": 1 to 128 letters, digits, _ - and ., not starting with . and not ending in .v and "
                         "digits (it names files; NAME.vN is a cached registry version)");
}

Status Validate(const Submit& m) {
  if (m.jobs.empty()) return Status::Invalid("SUBMIT carries no jobs");
  if (m.jobs.size() > kMaxJobsPerMessage) {
    return Status::Invalid("SUBMIT carries " + std::to_string(m.jobs.size()) + " jobs; the limit is " +
                           std::to_string(kMaxJobsPerMessage));
  }
  if (m.request_id.size() > 256 || m.batch.size() > 256) return Status::Invalid("request_id or batch over 256 bytes");
  for (const auto& j : m.jobs) {
    if (j.kind.empty() || j.kind.size() > 64) return Status::Invalid("job kind must be 1 to 64 bytes");
    for (char c : j.kind) {
      if (!std::isalnum(static_cast<unsigned char>(c)) && c != '_' && c != '-' && c != '.' && c != ':') {
        return Status::Invalid("job kind \"" + j.kind + "\": only letters, digits, _ - . and : (it names metrics)");
      }
    }
    if (j.payload.data.size() > kMaxPayloadBytes) {
      return Status::Invalid("job payload of " + std::to_string(j.payload.data.size()) + " bytes; the limit is " +
                             std::to_string(kMaxPayloadBytes));
    }
    if (j.timeout_ms < 0 || j.timeout_ms > kMaxTimeoutMs) {
      return Status::Invalid("timeout_ms must be 0 (none) to " + std::to_string(kMaxTimeoutMs) + " (30 days)");
    }
  }
  return Status::Ok();
}

Status Validate(const Result& m) {
  if (m.results.size() > kMaxJobsPerMessage) return Status::Invalid("RESULT carries too many results");
  // Oversized results and long error texts are handled per job by the broker (the job fails, the
  // text is cut), so one bad job never blocks the others in the same message.
  return Status::Ok();
}

}  // namespace asrf::proto
