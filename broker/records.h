// Journal record layouts (see schema/protocol.md, "Journal"). Keys sort by job id.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>

#include "schema/protocol.h"

namespace asrf::records {

// "j/<id>": what was submitted. Written once, synced, with the SUBMIT; rewritten without the
// payload in the same synced write as the job's terminal record.
struct JobRecord {
  std::string batch;
  std::string kind;
  proto::Blob payload;
  int32_t priority = 0;
  int64_t timeout_ms = 0;
  int64_t submitted_ms = 0;
  std::string model;     // batched kinds
  int64_t audio_ms = 0;
  std::string gang;      // gang members
  uint32_t rank = 0;
  uint32_t world_size = 1;
  MSGPACK_DEFINE_MAP(batch, kind, payload, priority, timeout_ms, submitted_ms, model, audio_ms, gang, rank,
                     world_size);
};

// "s/<id>": where the job stands. Written unsynced when attempts change, synced when terminal.
struct StateRecord {
  uint8_t state = 0;
  uint32_t attempts = 0;
  std::string error;
  proto::Blob result;
  bool result_dropped = false;
  int64_t finished_ms = 0;
  int64_t run_ms = 0;
  std::string worker;
  MSGPACK_DEFINE_MAP(state, attempts, error, result, result_dropped, finished_ms, run_ms, worker);
};

// "r/<request_id>": the ids a SUBMIT created, so a retried SUBMIT returns them again.
struct RequestRecord {
  std::string batch;
  uint64_t first = 0;
  uint32_t count = 0;
  MSGPACK_DEFINE_MAP(batch, first, count);
};

// One row of the PostgreSQL jobs table as of an event.
struct JobRow {
  uint64_t id = 0;
  uint64_t parent = 0;
  std::string batch;
  std::string kind;
  uint8_t state = 0;
  int32_t priority = 0;
  uint32_t attempts = 0;
  int64_t submitted_ms = 0;
  int64_t started_ms = 0;
  int64_t finished_ms = 0;
  std::string worker;
  std::string error;
  MSGPACK_DEFINE_MAP(id, parent, batch, kind, state, priority, attempts, submitted_ms, started_ms, finished_ms,
                     worker, error);
};

// "e/<seq>": job lifecycle rows waiting for the PostgreSQL event sink, written in the same journal
// batch as the change they describe (so they need no sync of their own) and erased once in
// PostgreSQL. `seq` increases across restarts (generation << 32 | counter).
struct EventRecord {
  uint64_t seq = 0;
  std::vector<JobRow> rows;
  MSGPACK_DEFINE_MAP(seq, rows);
};

inline std::string EventKey(uint64_t seq) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "e/%016llx", static_cast<unsigned long long>(seq));
  return buf;
}

inline std::string JobKey(uint64_t id) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "j/%016llx", static_cast<unsigned long long>(id));
  return buf;
}
inline std::string StateKey(uint64_t id) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "s/%016llx", static_cast<unsigned long long>(id));
  return buf;
}
inline std::string RequestKey(const std::string& request_id) { return "r/" + request_id; }

// Parses the id out of a "j/<hex>" or "s/<hex>" key; 0 on a malformed key.
inline uint64_t IdFromKey(std::string_view key) {
  if (key.size() != 18) return 0;
  return std::strtoull(std::string(key.substr(2)).c_str(), nullptr, 16);
}

}  // namespace asrf::records
