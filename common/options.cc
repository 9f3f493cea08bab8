#include "common/options.h"

#include <cctype>
#include <cstdlib>
#include <fstream>
#include <iostream>

#include "common/log.h"

namespace asrf {

std::string EnvNameFor(const std::string& option) {
  std::string out = "ASRF_";
  for (char c : option) out.push_back(c == '-' ? '_' : static_cast<char>(std::toupper(static_cast<unsigned char>(c))));
  return out;
}

ParseResult ParseOptions(int argc, char** argv, po::options_description& desc, const std::string& usage,
                         po::variables_map* vm, bool allow_unrecognized) {
  desc.add_options()
      ("help,h", "print this help and exit")
      ("config", po::value<std::string>()->default_value(""),
       "config file of 'name = value' lines using the long option names; the command line and ASRF_* "
       "environment variables override it")
      ("log-level", po::value<std::string>()->default_value("info"), "debug, info, warn or error");
  ParseResult r;
  try {
    auto parser = po::command_line_parser(argc, argv).options(desc);
    po::parsed_options parsed = allow_unrecognized ? parser.allow_unregistered().run() : parser.run();
    if (allow_unrecognized) r.unrecognized = po::collect_unrecognized(parsed.options, po::include_positional);
    po::store(parsed, *vm);
    if (vm->count("help")) {
      std::cout << usage << "\n\n" << desc << "\nEvery option can also be set with an environment variable "
                << "(ASRF_ and the option name in capitals, dashes as underscores) or in the --config file.\n";
      r.exit_code = 0;
      return r;
    }
    po::store(po::parse_environment(desc,
                                    [&desc](const std::string& env) -> std::string {
                                      if (env.rfind("ASRF_", 0) != 0) return "";
                                      for (const auto& opt : desc.options()) {
                                        const std::string& name = opt->long_name();
                                        if (name == "help" || name == "config") continue;
                                        if (EnvNameFor(name) == env) return name;
                                      }
                                      return "";
                                    }),
              *vm);
    std::string config;
    if (vm->count("config")) config = (*vm)["config"].as<std::string>();
    if (!config.empty()) {
      std::ifstream in(config);
      if (!in) {
        std::cerr << "error: cannot read config file " << config << "\n";
        r.exit_code = 2;
        return r;
      }
      po::store(po::parse_config_file(in, desc, /*allow_unregistered=*/false), *vm);
    }
    po::notify(*vm);
  } catch (const po::error& e) {
    std::cerr << "error: " << e.what() << "\n\n" << usage << "\n(run with --help for every option)\n";
    r.exit_code = 2;
    return r;
  }
  LogLevel level;
  if (!ParseLogLevel((*vm)["log-level"].as<std::string>(), &level)) {
    std::cerr << "error: --log-level must be debug, info, warn or error\n";
    r.exit_code = 2;
    return r;
  }
  SetLogLevel(level);
  r.proceed = true;
  return r;
}

}  // namespace asrf
