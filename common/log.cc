#include "common/log.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <ctime>

namespace asrf {
namespace {

std::atomic<int> g_level{static_cast<int>(LogLevel::kInfo)};
std::string g_process = "asrf";

bool StderrIsTerminal() {
  static const bool tty = isatty(STDERR_FILENO) == 1;
  return tty;
}

const char* LevelName(LogLevel l) {
  switch (l) {
    case LogLevel::kDebug: return "debug";
    case LogLevel::kInfo: return "info";
    case LogLevel::kWarn: return "warn";
    case LogLevel::kError: return "error";
  }
  return "info";
}

std::string TimeStamp() {
  auto now = std::chrono::system_clock::now();
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count();
  std::time_t secs = ms / 1000;
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char buf[96];  // room for any int the format could print
  std::snprintf(buf, sizeof(buf), "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1,
                tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, static_cast<int>(ms % 1000));
  return buf;
}

}  // namespace

void SetLogLevel(LogLevel level) { g_level.store(static_cast<int>(level)); }
void SetLogProcessName(std::string name) { g_process = std::move(name); }

bool ParseLogLevel(std::string_view name, LogLevel* out) {
  if (name == "debug") *out = LogLevel::kDebug;
  else if (name == "info") *out = LogLevel::kInfo;
  else if (name == "warn") *out = LogLevel::kWarn;
  else if (name == "error") *out = LogLevel::kError;
  else return false;
  return true;
}

void AppendJsonEscaped(std::string* out, std::string_view s) {
  for (unsigned char c : s) {
    switch (c) {
      case '"': out->append("\\\""); break;
      case '\\': out->append("\\\\"); break;
      case '\n': out->append("\\n"); break;
      case '\r': out->append("\\r"); break;
      case '\t': out->append("\\t"); break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          out->append(buf);
        } else {
          out->push_back(static_cast<char>(c));
        }
    }
  }
}

LogLine::LogLine(LogLevel level, std::string_view event)
    : enabled_(static_cast<int>(level) >= g_level.load()), json_(!StderrIsTerminal()) {
  if (!enabled_) return;
  if (json_) {
    line_ = "{\"ts\":\"" + TimeStamp() + "\",\"level\":\"" + LevelName(level) + "\",\"proc\":\"";
    AppendJsonEscaped(&line_, g_process);
    line_ += "\",\"event\":\"";
    AppendJsonEscaped(&line_, event);
    line_ += "\"";
  } else {
    line_ = TimeStamp() + " " + LevelName(level) + " " + g_process + " " + std::string(event);
  }
}

LogLine::~LogLine() {
  if (!enabled_) return;
  line_ += json_ ? "}\n" : "\n";
  ssize_t unused = ::write(STDERR_FILENO, line_.data(), line_.size());
  (void)unused;
}

void LogLine::Raw(std::string_view key, std::string_view rendered, bool quoted) {
  if (!enabled_) return;
  if (json_) {
    line_ += ",\"";
    AppendJsonEscaped(&line_, key);
    line_ += "\":";
    if (quoted) {
      line_ += '"';
      AppendJsonEscaped(&line_, rendered);
      line_ += '"';
    } else {
      line_ += rendered;
    }
  } else {
    line_ += ' ';
    line_ += key;
    line_ += '=';
    bool needs_quotes = quoted && (rendered.empty() || rendered.find_first_of(" \"=") != std::string_view::npos);
    if (needs_quotes) {
      line_ += '"';
      AppendJsonEscaped(&line_, rendered);
      line_ += '"';
    } else {
      line_ += rendered;
    }
  }
}

LogLine& LogLine::Kv(std::string_view key, std::string_view value) {
  Raw(key, value, true);
  return *this;
}
LogLine& LogLine::Kv(std::string_view key, int64_t value) {
  Raw(key, std::to_string(value), false);
  return *this;
}
LogLine& LogLine::Kv(std::string_view key, uint64_t value) {
  Raw(key, std::to_string(value), false);
  return *this;
}
LogLine& LogLine::Kv(std::string_view key, double value) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.6g", value);
  Raw(key, buf, false);
  return *this;
}
LogLine& LogLine::Kv(std::string_view key, bool value) {
  Raw(key, value ? "true" : "false", false);
  return *this;
}

}  // namespace asrf
