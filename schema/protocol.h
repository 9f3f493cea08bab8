// The ASR Fleet wire protocol: constants, command bytes and message bodies. The normative text is
// schema/protocol.md; keep the two in step. Every body is a MessagePack map; unknown keys are
// ignored and missing keys take the defaults below, so fields can be added without a version bump.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include <msgpack.hpp>

#include "common/status.h"

namespace asrf::proto {

// Frame 1 of every message (after the ROUTER's routing id): "ASRF/<version>".
inline constexpr std::string_view kTagPrefix = "ASRF/";
inline constexpr int kVersion = 1;
inline constexpr std::string_view kTag = "ASRF/1";

// Size limits. A message over kMaxMessageBytes is dropped by ZeroMQ itself (ZMQ_MAXMSGSIZE);
// the others are checked when decoding and answered with an error.
inline constexpr int64_t kMaxMessageBytes = 64ll << 20;
inline constexpr size_t kMaxPayloadBytes = 16u << 20;   // one job's payload
inline constexpr size_t kMaxResultBytes = 1u << 20;     // one job's result
inline constexpr size_t kMaxJobsPerMessage = 10000;     // SUBMIT, ASSIGN, RESULT, STARTED
inline constexpr size_t kMaxValuesPerMessage = 1000000; // MessagePack values in one body, all nested
inline constexpr size_t kMaxStringBytes = 4096;         // error texts (longer ones are cut)
inline constexpr int64_t kMaxTimeoutMs = 30ll * 24 * 3600 * 1000;  // one attempt's time limit: 30 days

enum class Cmd : uint8_t {
  // client -> broker (each carries "req", echoed in the REPLY or ERROR)
  kSubmit = 0x01,
  kStatus = 0x02,
  kCancel = 0x03,
  kWatch = 0x04,
  kWorkers = 0x05,
  kJobs = 0x06,
  kRetry = 0x07,
  kModels = 0x08,
  // worker -> broker
  kReady = 0x10,
  kHeartbeat = 0x11,  // both ways
  kStarted = 0x12,    // worker -> broker, and the broker's confirmation back
  kResult = 0x13,
  kProgress = 0x14,
  kDisconnect = 0x15,
  // broker -> worker
  kAssign = 0x20,
  kCancelJobs = 0x21,
  kResultAck = 0x22,
  // broker -> client
  kReply = 0x30,
  kEvent = 0x31,
  kError = 0x3f,
};

bool IsKnownCmd(uint8_t c);
const char* CmdName(Cmd c);

// Job states. Stored in the journal as these strings' index; never renumber.
enum class JobState : uint8_t { kQueued = 0, kLeased = 1, kDone = 2, kFailed = 3, kDead = 4, kCancelled = 5 };
inline constexpr int kNumStates = 6;
const char* StateName(JobState s);
bool ParseState(std::string_view name, JobState* out);
inline bool IsTerminal(JobState s) { return s >= JobState::kDone; }

// Bytes that travel as MessagePack BIN (payloads, results). Accepts STR or BIN when decoding.
struct Blob {
  std::string data;
};

}  // namespace asrf::proto

// MessagePack adaptor for Blob: packs as BIN, unpacks from BIN or STR.
namespace msgpack {
MSGPACK_API_VERSION_NAMESPACE(MSGPACK_DEFAULT_API_NS) {
namespace adaptor {
template <>
struct convert<asrf::proto::Blob> {
  const msgpack::object& operator()(const msgpack::object& o, asrf::proto::Blob& v) const {
    if (o.type == msgpack::type::BIN) v.data.assign(o.via.bin.ptr, o.via.bin.size);
    else if (o.type == msgpack::type::STR) v.data.assign(o.via.str.ptr, o.via.str.size);
    else if (o.type == msgpack::type::NIL) v.data.clear();
    else throw msgpack::type_error();
    return o;
  }
};
template <>
struct pack<asrf::proto::Blob> {
  template <typename Stream>
  msgpack::packer<Stream>& operator()(msgpack::packer<Stream>& p, const asrf::proto::Blob& v) const {
    p.pack_bin(static_cast<uint32_t>(v.data.size()));
    p.pack_bin_body(v.data.data(), static_cast<uint32_t>(v.data.size()));
    return p;
  }
};
}  // namespace adaptor
}
}  // namespace msgpack

namespace asrf::proto {

// ---- client -> broker ----------------------------------------------------------------------

struct SubmitJob {
  std::string kind;
  Blob payload;
  int32_t priority = 0;     // higher runs first; FIFO within a priority
  int64_t timeout_ms = 0;   // per-attempt run time limit; 0 = none
  // Batched kinds ("transcribe"): the model the job needs ("default" or empty: any worker's
  // default model) and its audio length; the broker batches such jobs by audio seconds.
  std::string model{};
  int64_t audio_ms = 0;
  std::string parent{};     // the file a segment belongs to (informational: the broker keeps no copy)
  // Gang members (data-parallel training): world_size > 1 jobs sharing `gang` are placed all at
  // once on world_size idle workers, one rank each, or not at all.
  std::string gang{};
  uint32_t rank = 0;
  uint32_t world_size = 1;
  MSGPACK_DEFINE_MAP(kind, payload, priority, timeout_ms, model, audio_ms, parent, gang, rank, world_size);
};

// The payload of a "transcribe" job: one segment of one file, as 16 kHz mono PCM.
struct TranscribeSegment {
  std::string file;      // the input path as the client saw it (for reassembly)
  uint32_t index = 0;    // segment number within the file
  uint32_t count = 1;    // segments in the file
  double offset_s = 0;   // where the segment starts in the file
  Blob pcm;              // int16 little-endian samples at 16 kHz
  std::string source;    // the path as the client found it (echoed in the result, for `collect`)
  double file_duration_s = 0;  // the whole file's length (echoed in the result, for `collect`)
  // The file's output name, relative to the client's --out and without extension, as `transcribe`
  // chose it; bytes of no valid UTF-8 sequence, and '%', as %XX (echoed, for `collect`).
  std::string out;
  // The file as the client found it: its size in bytes and modification time (ns since the Unix
  // epoch); 0 = not known (echoed, for `collect`).
  uint64_t source_size = 0;
  int64_t source_mtime_ns = 0;
  MSGPACK_DEFINE_MAP(file, index, count, offset_s, pcm, source, file_duration_s, out, source_size, source_mtime_ns);
};
inline constexpr const char* kTranscribeKind = "transcribe";
inline constexpr const char* kDefaultModel = "default";

struct Submit {
  uint64_t req = 0;
  std::string request_id;  // idempotency key: a repeat returns the original job ids
  std::string batch;       // groups jobs for WATCH/STATUS/CANCEL; the broker names one if empty
  std::vector<SubmitJob> jobs;
  MSGPACK_DEFINE_MAP(req, request_id, batch, jobs);
};

// STATUS: one job (job != 0), one batch (batch non-empty) or everything.
struct StatusReq {
  uint64_t req = 0;
  uint64_t job = 0;
  std::string batch;
  MSGPACK_DEFINE_MAP(req, job, batch);
};

// CANCEL: one job or every unfinished job of a batch.
struct CancelReq {
  uint64_t req = 0;
  uint64_t job = 0;
  std::string batch;
  MSGPACK_DEFINE_MAP(req, job, batch);
};

// WATCH: subscribe to a batch's job events for watch_ms (renew by sending WATCH again).
struct WatchReq {
  uint64_t req = 0;
  std::string batch;
  int64_t watch_ms = 10000;
  bool results = true;  // include each job's result in events
  MSGPACK_DEFINE_MAP(req, batch, watch_ms, results);
};

struct WorkersReq {
  uint64_t req = 0;
  MSGPACK_DEFINE_MAP(req);
};

// JOBS: list jobs in one state (optionally of one batch), oldest first.
struct JobsReq {
  uint64_t req = 0;
  std::string state;
  std::string batch;
  uint32_t limit = 100;
  uint64_t after = 0;  // only jobs with a larger id: the next page after the last id seen
  MSGPACK_DEFINE_MAP(req, state, batch, limit, after);
};

// RETRY: put a dead or failed job (or every dead job) back in the queue with its attempts reset.
struct RetryReq {
  uint64_t req = 0;
  uint64_t job = 0;
  bool all_dead = false;
  MSGPACK_DEFINE_MAP(req, job, all_dead);
};

// MODELS: the model registry in PostgreSQL (the broker needs --pg). op is "list" (every name and
// version), "export" (one model's bytes: `name`, `version` 0 = the newest) or "import" (store
// `bytes` as the next version of `name`).
struct ModelsReq {
  uint64_t req = 0;
  std::string op;
  std::string name;
  int32_t version = 0;
  Blob bytes;
  std::string config;        // JSON text; import only
  std::string vocabulary;
  double valid_cer = -1;     // < 0: unknown
  std::string data_summary;  // JSON text
  double train_seconds = 0;
  MSGPACK_DEFINE_MAP(req, op, name, version, bytes, config, vocabulary, valid_cer, data_summary, train_seconds);
};
inline constexpr size_t kMaxModelBytes = 60u << 20;

// ---- broker -> client ----------------------------------------------------------------------

struct ModelInfo {
  std::string name;
  int32_t version = 0;
  std::string sha256;  // hex of the bytes
  int64_t size = 0;
  double valid_cer = -1;
  double train_seconds = 0;
  std::string created;  // ISO 8601
  std::string config;   // JSON text
  MSGPACK_DEFINE_MAP(name, version, sha256, size, valid_cer, train_seconds, created, config);
};

struct JobInfo {
  uint64_t id = 0;
  std::string batch;
  std::string kind;
  std::string state;
  int32_t priority = 0;
  uint32_t attempts = 0;
  std::string error;
  Blob result;
  int64_t submitted_ms = 0;  // wall clock
  int64_t finished_ms = 0;   // wall clock; 0 while unfinished
  std::string worker;        // current or last worker
  std::string why;           // why a queued job is waiting, when known
  std::string progress;      // the last PROGRESS of a running (or finished) job, JSON text
  int64_t run_ms = 0;        // a finished job: how long its last run took, as its worker reported
  MSGPACK_DEFINE_MAP(id, batch, kind, state, priority, attempts, error, result, submitted_ms, finished_ms, worker,
                     why, progress, run_ms);
};

struct WorkerInfo {
  std::string id;
  std::string host;
  std::string device;
  uint32_t slots = 0;
  uint32_t running = 0;
  bool draining = false;
  int64_t idle_ms = 0;  // since its last message
  std::vector<std::string> kinds;
  std::string gpu;  // from READY
  MSGPACK_DEFINE_MAP(id, host, device, slots, running, draining, idle_ms, kinds, gpu);
};

// One reply shape for every client request; each request fills the fields it documents.
struct Reply {
  uint64_t req = 0;
  std::string batch;                       // SUBMIT, WATCH
  std::vector<uint64_t> job_ids;           // SUBMIT
  bool duplicate = false;                  // SUBMIT: request_id seen before; job_ids are the originals
  std::map<std::string, int64_t> counts;   // STATUS, WATCH: every state name present
  std::vector<JobInfo> jobs;               // STATUS of a job (one entry), JOBS
  std::vector<WorkerInfo> workers;         // WORKERS
  uint64_t affected = 0;                   // CANCEL, RETRY
  std::vector<ModelInfo> models;           // MODELS list, export and import (the model concerned)
  Blob blob;                               // MODELS export: the model's bytes
  MSGPACK_DEFINE_MAP(req, batch, job_ids, duplicate, counts, jobs, workers, affected, models, blob);
};

struct JobEvent {
  uint64_t id = 0;
  std::string state;
  uint32_t attempts = 0;
  std::string error;
  Blob result;
  int64_t run_ms = 0;
  std::string progress;  // set on progress events of running jobs (state "leased")
  MSGPACK_DEFINE_MAP(id, state, attempts, error, result, run_ms, progress);
};

// EVENT: jobs of a watched batch that reached a terminal state.
struct Event {
  std::string batch;
  std::vector<JobEvent> jobs;
  MSGPACK_DEFINE_MAP(batch, jobs);
};

// ERROR: a request that could not be served. `code` is one of the codes in protocol.md.
struct Error {
  uint64_t req = 0;
  std::string code;
  std::string message;
  MSGPACK_DEFINE_MAP(req, code, message);
};

// ---- worker <-> broker ---------------------------------------------------------------------

struct Lease {
  uint64_t id = 0;
  uint64_t epoch = 0;
  MSGPACK_DEFINE_MAP(id, epoch);
};

struct Ready {
  std::string worker_id;
  std::string host;
  std::string device;
  uint32_t slots = 1;
  std::vector<std::string> kinds;
  std::vector<std::string> models;
  std::vector<Lease> running;  // leases still running after a reconnect
  bool draining = false;
  // cuda workers: the GPU's UUID ("GPU-..."), so that the ranks of a gang land on distinct GPUs
  // (two workers may share one GPU). Empty on the CPU.
  std::string gpu;
  // Whether it can be a gang rank on its device (built with NCCL for GPUs, Gloo for CPUs).
  bool gangs = true;
  // Its HEARTBEAT interval: the broker waits heartbeat_misses of the longer of this and its own
  // before it drops the worker (0: the broker's own).
  uint32_t heartbeat_ms = 0;
  // Drawn at random when the worker process starts: a READY with this worker_id and another
  // instance while the first is alive comes from a second process given the same id, and is
  // refused (worker_id_in_use); a reconnect of the same process keeps its instance.
  std::string instance;
  MSGPACK_DEFINE_MAP(worker_id, host, device, slots, kinds, models, running, draining, gpu, gangs, heartbeat_ms,
                     instance);
};

struct Heartbeat {
  bool draining = false;
  int64_t gpu_mem_bytes = 0;
  int64_t outbox_results = 0;  // results waiting in the worker's outbox for PostgreSQL
  // broker -> worker: the broker's interval; the worker waits heartbeat_misses of the longer of
  // this and its own before it takes the broker for gone (0: its own).
  uint32_t heartbeat_ms = 0;
  MSGPACK_DEFINE_MAP(draining, gpu_mem_bytes, outbox_results, heartbeat_ms);
};

struct Assignment {
  uint64_t id = 0;
  uint64_t epoch = 0;
  std::string kind;
  Blob payload;
  int64_t timeout_ms = 0;
  uint32_t attempt = 0;  // attempts already counted before this one
  uint64_t group = 0;    // jobs of one ASSIGN with the same non-zero group form one batch
  std::string model{};   // batched kinds: the model to run
  // Gang members: this job's rank, the gang's size and where rank 0 serves the rendezvous
  // ("host:port"; rank 0 listens on that port).
  uint32_t rank = 0;
  uint32_t world_size = 1;
  std::string rendezvous{};
  MSGPACK_DEFINE_MAP(id, epoch, kind, payload, timeout_ms, attempt, group, model, rank, world_size, rendezvous);
};

struct Assign {
  std::vector<Assignment> jobs;
  MSGPACK_DEFINE_MAP(jobs);
};

struct Started {
  std::vector<Lease> leases;
  MSGPACK_DEFINE_MAP(leases);
};

struct JobResult {
  uint64_t id = 0;
  uint64_t epoch = 0;
  bool ok = false;
  Blob result;
  std::string error;
  int64_t run_ms = 0;
  // The worker stopped the job on purpose (it is draining) after saving its state: the broker
  // queues it again without counting an attempt.
  bool requeue = false;
  // Failed for a passing reason (the device ran out of memory, a libtorch error): the broker
  // counts an attempt and runs the job again after the back-off, as for a lost lease (dead after
  // --max-attempts). Only with ok false.
  bool retry = false;
  MSGPACK_DEFINE_MAP(id, epoch, ok, result, error, run_ms, requeue, retry);
};

struct Result {
  std::vector<JobResult> results;
  MSGPACK_DEFINE_MAP(results);
};

struct Rejected {
  uint64_t id = 0;
  uint64_t epoch = 0;
  std::string reason;
  MSGPACK_DEFINE_MAP(id, epoch, reason);
};

// RESULT_ACK: accepted leases (after the done record is synced) and rejected ones (at once).
struct ResultAck {
  std::vector<Lease> accepted;
  std::vector<Rejected> rejected;
  MSGPACK_DEFINE_MAP(accepted, rejected);
};

struct CancelJobs {
  std::vector<Lease> leases;
  std::string reason;
  MSGPACK_DEFINE_MAP(leases, reason);
};

struct Progress {
  uint64_t id = 0;
  uint64_t epoch = 0;
  std::string info;  // JSON text
  MSGPACK_DEFINE_MAP(id, epoch, info);
};

struct Disconnect {
  std::string reason;
  MSGPACK_DEFINE_MAP(reason);
};

// ---- codec -----------------------------------------------------------------------------------

// Checks frame 1. Returns Invalid("bad_tag: ...") when it is not an ASRF tag and
// Unavailable("unsupported_version: ...") for an ASRF tag of another version.
Status CheckTag(std::string_view tag);

// Checks the command frame: exactly one byte naming a known command.
Status ParseCmd(std::string_view frame, Cmd* out);

// Decodes a MessagePack body with bounded container and string sizes. Never throws.
// `max_bin` bounds each BIN/STR value: one job's payload, except for MODELS bodies (a model file).
Status DecodeRaw(std::string_view body, msgpack::object_handle* out, size_t max_bin = kMaxPayloadBytes);

template <typename T>
Status DecodeBody(std::string_view body, T* out, size_t max_bin = kMaxPayloadBytes) {
  msgpack::object_handle oh;
  ASRF_RETURN_IF_ERROR(DecodeRaw(body, &oh, max_bin));
  try {
    oh.get().convert(*out);
  } catch (const std::exception& e) {
    return Status::Invalid(std::string("malformed body: ") + e.what());
  }
  return Status::Ok();
}

template <typename T>
std::string EncodeBody(const T& msg) {
  msgpack::sbuffer buf;
  msgpack::pack(buf, msg);
  return std::string(buf.data(), buf.size());
}

// Semantic limits on decoded messages (sizes of payloads, results and lists).
Status Validate(const Submit& m);
// A model name: 1 to 128 letters, digits, '_', '-' and '.', not starting with '.'. Names become
// file names (a worker's STATE_DIR/models/NAME.pt and its registry cache), so nothing else.
Status ValidModelName(std::string_view name);
Status Validate(const Result& m);

}  // namespace asrf::proto

