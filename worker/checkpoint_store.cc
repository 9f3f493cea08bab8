#include "worker/checkpoint_store.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>

#include <rocksdb/db.h>
#include <rocksdb/write_batch.h>

namespace asrf {

namespace {
std::string Prefix(uint64_t job) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "c/%016llx/", static_cast<unsigned long long>(job));
  return buf;
}
std::string Key(uint64_t job, int64_t step) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(step));
  return Prefix(job) + buf;
}
}  // namespace

CheckpointStore::CheckpointStore(rocksdb::DB* db) : db_(db) {}
CheckpointStore::~CheckpointStore() = default;

Status CheckpointStore::Open(const std::string& dir, std::unique_ptr<CheckpointStore>* out) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  rocksdb::Options o;
  o.create_if_missing = true;
  o.keep_log_file_num = 2;
  o.info_log_level = rocksdb::InfoLogLevel::WARN_LEVEL;
  rocksdb::DB* db = nullptr;
  rocksdb::Status s = rocksdb::DB::Open(o, dir, &db);
  if (!s.ok()) return Status::IOError("cannot open the checkpoint store in " + dir + ": " + s.ToString());
  out->reset(new CheckpointStore(db));
  return Status::Ok();
}

std::vector<int64_t> CheckpointStore::Steps(uint64_t job) {
  std::vector<int64_t> steps;
  std::string p = Prefix(job);
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
  for (it->Seek(p); it->Valid() && it->key().starts_with(p); it->Next()) {
    steps.push_back(static_cast<int64_t>(std::strtoull(it->key().ToString().substr(p.size()).c_str(), nullptr, 16)));
  }
  return steps;
}

Status CheckpointStore::Put(uint64_t job, int64_t step, const std::string& bytes, int keep) {
  rocksdb::WriteBatch wb;
  wb.Put(Key(job, step), bytes);
  std::vector<int64_t> steps = Steps(job);
  steps.push_back(step);
  std::sort(steps.begin(), steps.end());
  steps.erase(std::unique(steps.begin(), steps.end()), steps.end());
  for (size_t i = 0; i + std::max(keep, 1) < steps.size(); ++i) wb.Delete(Key(job, steps[i]));
  rocksdb::WriteOptions wo;
  wo.sync = true;
  rocksdb::Status s = db_->Write(wo, &wb);
  return s.ok() ? Status::Ok() : Status::IOError("checkpoint write: " + s.ToString());
}

Status CheckpointStore::Drop(uint64_t job) {
  rocksdb::WriteBatch wb;
  for (int64_t step : Steps(job)) wb.Delete(Key(job, step));
  rocksdb::WriteOptions wo;
  wo.sync = true;
  rocksdb::Status s = db_->Write(wo, &wb);
  if (!s.ok()) return Status::IOError("checkpoint delete: " + s.ToString());
  std::string from = Prefix(job), to = Prefix(job + 1);
  rocksdb::Slice begin(from), end(to);
  s = db_->CompactRange(rocksdb::CompactRangeOptions(), &begin, &end);
  return s.ok() ? Status::Ok() : Status::IOError("checkpoint compaction: " + s.ToString());
}

std::vector<uint64_t> CheckpointStore::Jobs() {
  std::vector<uint64_t> jobs;
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
  for (it->Seek("c/"); it->Valid() && it->key().starts_with("c/");) {
    uint64_t job = std::strtoull(it->key().ToString().substr(2, 16).c_str(), nullptr, 16);
    jobs.push_back(job);
    if (job == UINT64_MAX) break;
    it->Seek(Prefix(job + 1));
  }
  return jobs;
}

Status CheckpointStore::Latest(uint64_t job, int64_t* step, std::string* bytes) {
  std::vector<int64_t> steps = Steps(job);
  if (steps.empty()) return Status::NotFound("no checkpoint for job " + std::to_string(job));
  rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), Key(job, steps.back()), bytes);
  if (!s.ok()) return Status::IOError("checkpoint read: " + s.ToString());
  *step = steps.back();
  return Status::Ok();
}

}  // namespace asrf
