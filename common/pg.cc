#include "common/pg.h"

#include <libpq-fe.h>

#include <cstring>

namespace asrf {


Status CheckConninfo(const std::string& conninfo) {
  char* err = nullptr;
  PQconninfoOption* opts = PQconninfoParse(conninfo.c_str(), &err);
  if (!opts) {
    std::string m = err ? err : "unparsable";
    if (err) PQfreemem(err);
    while (!m.empty() && m.back() == '\n') m.pop_back();
    return Status::Invalid("bad PostgreSQL conninfo: " + m);
  }
  bool has_password = false;
  for (PQconninfoOption* o = opts; o->keyword; ++o) {
    if (std::strcmp(o->keyword, "password") == 0 && o->val && *o->val) has_password = true;
  }
  PQconninfoFree(opts);
  if (has_password) {
    return Status::Invalid(
        "the PostgreSQL conninfo holds a password, which would be visible to every user of this machine; "
        "put it in PGPASSWORD or a PGPASSFILE instead");
  }
  return Status::Ok();
}

PgResult::PgResult(pg_result* r) : r_(r) {}
PgResult::~PgResult() {
  if (r_) PQclear(r_);
}
PgResult::PgResult(PgResult&& o) noexcept : r_(o.r_) { o.r_ = nullptr; }
PgResult& PgResult::operator=(PgResult&& o) noexcept {
  if (this != &o) {
    if (r_) PQclear(r_);
    r_ = o.r_;
    o.r_ = nullptr;
  }
  return *this;
}
int PgResult::rows() const { return r_ ? PQntuples(r_) : 0; }
bool PgResult::is_null(int row, int col) const { return !r_ || PQgetisnull(r_, row, col); }
std::string PgResult::get(int row, int col) const {
  if (!r_) return "";
  return std::string(PQgetvalue(r_, row, col), PQgetlength(r_, row, col));
}
int64_t PgResult::get_int(int row, int col) const {
  std::string v = get(row, col);
  return v.empty() ? 0 : std::stoll(v);
}

Status PgConn::Connect(const std::string& conninfo, std::unique_ptr<PgConn>* out, int connect_timeout_s) {
  ASRF_RETURN_IF_ERROR(CheckConninfo(conninfo));
  // TCP keepalives first, so a conninfo's own settings win: a server that vanished without
  // closing the connection is noticed in about a minute, not after the kernel's two hours.
  const char* keys[] = {"keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count",
                        "dbname", "connect_timeout", "application_name", nullptr};
  std::string timeout = std::to_string(connect_timeout_s);
  const char* vals[] = {"1", "30", "10", "3", conninfo.c_str(), timeout.c_str(), "asr-fleet", nullptr};
  pg_conn* c = PQconnectdbParams(keys, vals, /*expand_dbname=*/1);
  if (!c) return Status::Unavailable("PostgreSQL: out of memory");
  if (PQstatus(c) != CONNECTION_OK) {
    std::string m = PQerrorMessage(c);
    PQfinish(c);
    while (!m.empty() && (m.back() == '\n' || m.back() == ' ')) m.pop_back();
    return Status::Unavailable("cannot connect to PostgreSQL: " + m);
  }
  PQsetNoticeProcessor(c, [](void*, const char*) {}, nullptr);
  // Binary columns are read back as hex (DecodeByteaHex), whatever the server's own setting.
  pg_result* r = PQexec(c, "SET bytea_output = 'hex'");
  bool set = r && PQresultStatus(r) == PGRES_COMMAND_OK;
  if (r) PQclear(r);
  if (!set) {
    std::string m = PQerrorMessage(c);
    PQfinish(c);
    return Status::Unavailable("PostgreSQL: cannot set bytea_output: " + m);
  }
  out->reset(new PgConn(c));
  return Status::Ok();
}

PgConn::~PgConn() {
  if (c_) PQfinish(c_);
}

bool PgConn::healthy() const { return c_ && PQstatus(c_) == CONNECTION_OK; }

static Status ResultStatus(pg_conn* c, pg_result* r, const char* what) {
  ExecStatusType st = r ? PQresultStatus(r) : PGRES_FATAL_ERROR;
  if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK) return Status::Ok();
  std::string m = r ? PQresultErrorMessage(r) : PQerrorMessage(c);
  while (!m.empty() && (m.back() == '\n' || m.back() == ' ')) m.pop_back();
  if (PQstatus(c) != CONNECTION_OK) return Status::Unavailable(std::string(what) + ": connection lost: " + m);
  return Status::IOError(std::string(what) + ": " + m);
}

Status PgConn::Check(pg_result* r) {
  Status st = ResultStatus(c_, r, "query");
  const char* state = st.ok() || !r ? nullptr : PQresultErrorField(r, PG_DIAG_SQLSTATE);
  sqlstate_ = state ? state : "";
  return st;
}

Status PgConn::Exec(const std::string& sql) {
  pg_result* r = PQexec(c_, sql.c_str());
  Status st = Check(r);
  if (r) PQclear(r);
  return st;
}

Status PgConn::Query(const std::string& sql, const std::vector<std::optional<std::string>>& params, PgResult* out,
                     const std::vector<bool>& binary) {
  std::vector<const char*> values(params.size());
  std::vector<int> lengths(params.size()), formats(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    values[i] = params[i] ? params[i]->data() : nullptr;
    lengths[i] = params[i] ? static_cast<int>(params[i]->size()) : 0;
    formats[i] = i < binary.size() && binary[i] ? 1 : 0;
  }
  pg_result* r = PQexecParams(c_, sql.c_str(), static_cast<int>(params.size()), nullptr, values.data(),
                              lengths.data(), formats.data(), 0);
  Status st = Check(r);
  if (out) *out = PgResult(r);
  else if (r) PQclear(r);
  return st;
}

Status Migrate(PgConn* conn, int* applied) {
  *applied = 0;
  // One transaction under an advisory lock: a broker and its workers starting together never
  // race on CREATE TABLE, and a failed migration leaves nothing half applied.
  ASRF_RETURN_IF_ERROR(conn->Exec("BEGIN"));
  Status st = conn->Exec(
      "SELECT pg_advisory_xact_lock(727274); "
      "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, name text NOT NULL, "
      "applied_at timestamptz NOT NULL DEFAULT now())");
  for (int i = 0; st.ok() && i < kNumMigrations; ++i) {
    const Migration& m = kMigrations[i];
    PgResult r;
    st = conn->Query("SELECT 1 FROM schema_migrations WHERE version = $1", {std::to_string(m.version)}, &r);
    if (!st.ok() || r.rows() > 0) continue;
    st = conn->Exec(m.sql).WithContext(std::string("migration ") + m.name);
    if (st.ok()) {
      st = conn->Query("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                       {std::to_string(m.version), std::string(m.name)});
    }
    if (st.ok()) ++*applied;
  }
  if (!st.ok()) {
    (void)conn->Exec("ROLLBACK");
    *applied = 0;
    return st;
  }
  return conn->Exec("COMMIT");
}

Status ConnectAndMigrate(const std::string& conninfo, bool* migrated, std::unique_ptr<PgConn>* out, int* applied,
                         int64_t statement_timeout_ms) {
  std::unique_ptr<PgConn> c;
  ASRF_RETURN_IF_ERROR(PgConn::Connect(conninfo, &c, 2));
  if (statement_timeout_ms > 0) {
    ASRF_RETURN_IF_ERROR(c->Exec("SET statement_timeout = " + std::to_string(statement_timeout_ms)));
  }
  int n = 0;
  if (!*migrated) {
    ASRF_RETURN_IF_ERROR(Migrate(c.get(), &n));
    *migrated = true;
  }
  if (applied) *applied = n;
  *out = std::move(c);
  return Status::Ok();
}

std::string ValidUtf8(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    bool ok = n > 0 && i + n <= s.size() && c != 0;
    for (size_t k = 1; ok && k < n; ++k) ok = (static_cast<unsigned char>(s[i + k]) >> 6) == 2;
    if (ok) {
      out.append(s, i, n);
      i += n;
    } else {
      out.push_back('?');
      i += 1;
    }
  }
  return out;
}

std::string ByteaHex(const std::string& bytes) {
  static const char* hex = "0123456789abcdef";
  std::string out = "\\x";
  out.reserve(2 + bytes.size() * 2);
  for (unsigned char c : bytes) {
    out.push_back(hex[c >> 4]);
    out.push_back(hex[c & 15]);
  }
  return out;
}

std::string DecodeByteaHex(const std::string& text) {
  if (text.size() < 2 || text[0] != '\\' || text[1] != 'x') return text;
  auto v = [](char c) { return c <= '9' ? c - '0' : (c | 32) - 'a' + 10; };
  std::string out;
  out.reserve((text.size() - 2) / 2);
  for (size_t i = 2; i + 1 < text.size(); i += 2) out.push_back(static_cast<char>(v(text[i]) << 4 | v(text[i + 1])));
  return out;
}

}  // namespace asrf
