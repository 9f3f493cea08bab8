// asr-submit subcommands: small command objects (name, help, run). Only main() turns their
// result into an exit code.
#pragma once

#include <string>
#include <vector>

#include <boost/program_options.hpp>

#include "client/broker_client.h"

namespace asrf {

// Exit codes shared by every subcommand.
inline constexpr int kExitOk = 0;
inline constexpr int kExitJobsFailed = 1;  // some job failed, is dead or was cancelled
inline constexpr int kExitUsage = 2;
inline constexpr int kExitUnreachable = 3;  // broker unreachable, or --timeout passed

struct GlobalOptions {
  std::string broker = "tcp://127.0.0.1:5555";
  double timeout_s = 0;           // overall limit for waiting commands; 0 = none
  double request_timeout_s = 10;  // longest wait for one broker answer
};

struct Command {
  const char* name;
  const char* summary;
  // args: the words after the subcommand name.
  int (*run)(const GlobalOptions& g, const std::vector<std::string>& args);
};

const std::vector<Command>& Commands();

// Transcription subcommands (client/transcribe_cmd.cc).
int RunTranscribe(const GlobalOptions& g, const std::vector<std::string>& args);
int RunCollect(const GlobalOptions& g, const std::vector<std::string>& args);

// Helpers shared by the subcommands.
namespace cli {
// Prints the error and maps it to an exit code.
int ExitFor(const Status& st);
int64_t RequestTimeoutMs(const GlobalOptions& g);
// Parses a subcommand's words; prints help or a usage error. Returns -1 to proceed.
int ParseSub(const std::vector<std::string>& args, boost::program_options::options_description& desc,
             boost::program_options::positional_options_description* pos, const std::string& usage,
             boost::program_options::variables_map* vm);
std::string RandomHex(int bytes);
}  // namespace cli

}  // namespace asrf
