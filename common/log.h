// Structured logging: one line per event on stderr. JSON objects when stderr is not a terminal
// (for journald, files and log shippers), "time level event key=value" lines on a terminal.
//
//   LogInfo("job_done").Kv("job", id).Kv("ms", elapsed);
//
// The line is written when the temporary is destroyed. Thread-safe: each line is one write(2).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace asrf {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarn = 2, kError = 3 };

// Process-wide settings; call once from main before threads start.
void SetLogLevel(LogLevel level);
void SetLogProcessName(std::string name);
// Returns false for an unknown name.
bool ParseLogLevel(std::string_view name, LogLevel* out);

class LogLine {
 public:
  LogLine(LogLevel level, std::string_view event);
  ~LogLine();
  LogLine(const LogLine&) = delete;
  LogLine& operator=(const LogLine&) = delete;

  LogLine& Kv(std::string_view key, std::string_view value);
  LogLine& Kv(std::string_view key, const std::string& value) { return Kv(key, std::string_view(value)); }
  LogLine& Kv(std::string_view key, const char* value) { return Kv(key, std::string_view(value)); }
  LogLine& Kv(std::string_view key, int64_t value);
  LogLine& Kv(std::string_view key, uint64_t value);
  LogLine& Kv(std::string_view key, int value) { return Kv(key, static_cast<int64_t>(value)); }
  LogLine& Kv(std::string_view key, unsigned value) { return Kv(key, static_cast<uint64_t>(value)); }
  LogLine& Kv(std::string_view key, long long value) { return Kv(key, static_cast<int64_t>(value)); }
  LogLine& Kv(std::string_view key, unsigned long long value) { return Kv(key, static_cast<uint64_t>(value)); }
  LogLine& Kv(std::string_view key, double value);
  LogLine& Kv(std::string_view key, bool value);

 private:
  void Raw(std::string_view key, std::string_view rendered, bool quoted);
  bool enabled_;
  bool json_;
  std::string line_;
};

inline LogLine LogDebug(std::string_view e) { return LogLine(LogLevel::kDebug, e); }
inline LogLine LogInfo(std::string_view e) { return LogLine(LogLevel::kInfo, e); }
inline LogLine LogWarn(std::string_view e) { return LogLine(LogLevel::kWarn, e); }
inline LogLine LogError(std::string_view e) { return LogLine(LogLevel::kError, e); }

// Appends `s` to `out` as the body of a JSON string (no surrounding quotes).
void AppendJsonEscaped(std::string* out, std::string_view s);

// Puts an option's value into [lo, hi]; a value outside is logged (option_out_of_range, with the
// value given and the value used) rather than changed silently.
template <typename T>
void ClampOption(std::string_view name, T* value, T lo, T hi) {
  const T used = *value < lo ? lo : (hi < *value ? hi : *value);
  if (used != *value) {
    LogWarn("option_out_of_range").Kv("option", name).Kv("given", *value).Kv("used", used).Kv("range_low", lo).Kv("range_high", hi);
  }
  *value = used;
}

}  // namespace asrf
