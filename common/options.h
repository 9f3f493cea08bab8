// One table of options per binary: each binary declares every option once, with its default and
// help line, in a boost::program_options description. ParseOptions reads the same declarations
// from three places, in this precedence: command line > environment (ASRF_<NAME>, dashes become
// underscores, e.g. --state-dir ↔ ASRF_STATE_DIR) > config file (--config FILE, "name = value"
// lines) > the declared default.
#pragma once

#include <boost/program_options.hpp>
#include <string>
#include <vector>

namespace asrf {

namespace po = boost::program_options;

struct ParseResult {
  bool proceed = false;  // false: the process should exit with exit_code
  int exit_code = 0;     // 0 after --help, 2 after a usage error
  std::vector<std::string> unrecognized;  // only filled when allow_unrecognized is set
};

// Adds --help, --config and --log-level to `desc` and parses. `usage` is printed above the option
// list by --help and after a usage error. With `allow_unrecognized`, options and positional words
// that are not declared are returned in order (for subcommand CLIs) instead of being an error.
ParseResult ParseOptions(int argc, char** argv, po::options_description& desc, const std::string& usage,
                         po::variables_map* vm, bool allow_unrecognized = false);

// Maps an option name to its environment variable: "state-dir" -> "ASRF_STATE_DIR".
std::string EnvNameFor(const std::string& option);

}  // namespace asrf
