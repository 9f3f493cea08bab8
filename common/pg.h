// A thin libpq wrapper: one connection, text-format parameters, every failure a Status.
// Not thread-safe: one PgConn per thread.
//
// Conninfo is anything libpq takes (key=value pairs or a postgresql:// URI); the standard libpq
// environment (PGHOST, PGUSER, PGPASSFILE, PGPASSWORD, ...) applies. CheckConninfo refuses a
// password written into the conninfo itself, since it would show in `ps`.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"

struct pg_conn;
struct pg_result;

namespace asrf {

// Rejects a conninfo that carries a password or that libpq cannot parse.
Status CheckConninfo(const std::string& conninfo);

class PgResult {
 public:
  PgResult() = default;
  explicit PgResult(pg_result* r);
  ~PgResult();
  PgResult(PgResult&& o) noexcept;
  PgResult& operator=(PgResult&& o) noexcept;
  int rows() const;
  bool is_null(int row, int col) const;
  std::string get(int row, int col) const;  // text value; binary columns come hex-escaped ("\x..")
  int64_t get_int(int row, int col) const;

 private:
  pg_result* r_ = nullptr;
};

class PgConn {
 public:
  // Connects with a bounded wait (connect_timeout).
  static Status Connect(const std::string& conninfo, std::unique_ptr<PgConn>* out, int connect_timeout_s = 5);
  ~PgConn();

  // Runs one or more statements without parameters.
  Status Exec(const std::string& sql);
  // Runs one statement with text parameters ($1, $2, ...); nullopt is SQL NULL. Binary values
  // are passed with `binary` set for their index.
  Status Query(const std::string& sql, const std::vector<std::optional<std::string>>& params, PgResult* out = nullptr,
               const std::vector<bool>& binary = {});
  // False once the connection is broken (then reconnect).
  bool healthy() const;
  // The SQLSTATE of the last failed statement ("" when it succeeded or the server gave none):
  // class 22 (data) and 23 (constraint) refuse the rows themselves; 40, 53, 55 and 57 (conflict,
  // resources, locks, timeouts) pass.
  const std::string& sqlstate() const { return sqlstate_; }

 private:
  explicit PgConn(pg_conn* c) : c_(c) {}
  Status Check(pg_result* r);
  pg_conn* c_;
  std::string sqlstate_;
};

// Generated from schema/sql/NNN_*.sql by CMake (see CMakeLists.txt), in version order.
struct Migration {
  int version;
  const char* name;
  const char* sql;
};
extern const Migration kMigrations[];
extern const int kNumMigrations;

// Applies the migrations in schema/sql (compiled into the binary) that the database lacks, in one
// transaction under an advisory lock. Returns how many were applied.
Status Migrate(PgConn* conn, int* applied);

// Connects (bounded wait) and, unless *migrated is already true, applies the migrations and sets
// *migrated: a sink may come up before anyone migrated the database. *applied, when given, gets
// how many migrations ran. statement_timeout_ms > 0 bounds every statement of the connection,
// the migrations' included (a lock held elsewhere then fails a statement instead of hanging it).
Status ConnectAndMigrate(const std::string& conninfo, bool* migrated, std::unique_ptr<PgConn>* out,
                         int* applied = nullptr, int64_t statement_timeout_ms = 0);

// Text for a text column: invalid UTF-8 sequences become '?' (PostgreSQL rejects them).
std::string ValidUtf8(const std::string& s);

// Quotes bytes as a bytea hex literal's text form ("\x...") for a text-format parameter.
std::string ByteaHex(const std::string& bytes);
std::string DecodeByteaHex(const std::string& text);

}  // namespace asrf
