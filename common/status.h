// Status: the result of an operation that can fail, passed across module boundaries instead of
// exceptions. Library exceptions (zmq::error_t, rocksdb statuses, msgpack errors) are turned into
// a Status at the one wrapper per library.
#pragma once

#include <string>
#include <utility>

namespace asrf {

class [[nodiscard]] Status {
 public:
  enum class Code { kOk, kInvalid, kNotFound, kIOError, kUnavailable, kTimeout, kBusy, kCorruption };

  Status() = default;
  static Status Ok() { return Status(); }
  static Status Invalid(std::string m) { return Status(Code::kInvalid, std::move(m)); }
  static Status NotFound(std::string m) { return Status(Code::kNotFound, std::move(m)); }
  static Status IOError(std::string m) { return Status(Code::kIOError, std::move(m)); }
  static Status Unavailable(std::string m) { return Status(Code::kUnavailable, std::move(m)); }
  static Status Timeout(std::string m) { return Status(Code::kTimeout, std::move(m)); }
  static Status Busy(std::string m) { return Status(Code::kBusy, std::move(m)); }
  static Status Corruption(std::string m) { return Status(Code::kCorruption, std::move(m)); }

  bool ok() const { return code_ == Code::kOk; }
  Code code() const { return code_; }
  const std::string& message() const { return message_; }
  std::string ToString() const;

  // Returns a copy whose message is "context: message".
  Status WithContext(const std::string& context) const {
    if (ok()) return *this;
    return Status(code_, context + ": " + message_);
  }

 private:
  Status(Code c, std::string m) : code_(c), message_(std::move(m)) {}
  Code code_ = Code::kOk;
  std::string message_;
};

inline std::string Status::ToString() const {
  static const char* const kNames[] = {"ok",      "invalid argument", "not found", "I/O error",
                                       "unavailable", "timeout",     "busy",      "corruption"};
  if (ok()) return "ok";
  return std::string(kNames[static_cast<int>(code_)]) + ": " + message_;
}

#define ASRF_RETURN_IF_ERROR(expr)         \
  do {                                     \
    ::asrf::Status _st = (expr);           \
    if (!_st.ok()) return _st;             \
  } while (0)

}  // namespace asrf
