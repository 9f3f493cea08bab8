// asr-submit: the command-line client. Global options come before the subcommand:
//   asr-submit [--broker URL] [--timeout S] SUBCOMMAND [options]
#include <algorithm>
#include <csignal>
#include <cstring>
#include <iostream>

#include <zmq.hpp>

#include "client/commands.h"
#include "common/log.h"
#include "common/options.h"

int main(int argc, char** argv) {
  using namespace asrf;
  SetLogProcessName("asr-submit");
  std::signal(SIGPIPE, SIG_IGN);
  // Split argv at the subcommand: the first word that is not an option or an option's value.
  static const char* kValued[] = {"--broker", "--timeout", "--request-timeout", "--config", "--log-level"};
  int split = argc;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("-", 0) != 0) {
      split = i;
      break;
    }
    for (const char* v : kValued) {
      if (a == v) ++i;
    }
  }
  GlobalOptions g;
  po::options_description desc("global options (before the subcommand)");
  desc.add_options()
      ("broker", po::value(&g.broker)->default_value(g.broker), "broker endpoint (env ASRF_BROKER)")
      ("timeout", po::value(&g.timeout_s)->default_value(0),
       "seconds a waiting command (submit --wait, watch) may take in all; 0 = no limit; exit 3 when passed")
      ("request-timeout", po::value(&g.request_timeout_s)->default_value(10),
       "seconds to wait for the broker to answer before giving up with exit 3");
  std::string usage = "usage: asr-submit [global options] SUBCOMMAND [options]\n\nsubcommands:\n";
  std::size_t name_width = 0;
  for (const auto& c : Commands()) name_width = std::max(name_width, std::strlen(c.name));
  for (const auto& c : Commands()) {
    usage += "  " + std::string(c.name) + std::string(name_width + 2 - std::strlen(c.name), ' ') + c.summary + "\n";
  }
  usage += "\n`asr-submit SUBCOMMAND --help` describes each. Exit codes: 0 all done, 1 a job failed, is dead or "
           "was cancelled, 2 usage error, 3 broker unreachable or --timeout passed.";
  po::variables_map vm;
  ParseResult pr = ParseOptions(split, argv, desc, usage, &vm);
  if (!pr.proceed) return pr.exit_code;
  if (split >= argc) {
    std::cerr << usage << "\n";
    return kExitUsage;
  }
  if (g.request_timeout_s <= 0) g.request_timeout_s = 10;
  try {
    // The endpoint's form, checked once here so a typo is a usage error with the option's name.
    zmq::context_t ctx(1);
    zmq::socket_t probe(ctx, zmq::socket_type::dealer);
    probe.set(zmq::sockopt::linger, 0);
    probe.connect(g.broker);
  } catch (const zmq::error_t& e) {
    std::cerr << "asr-submit: --broker \"" << g.broker << "\" (or ASRF_BROKER) is not an endpoint such as "
              << "tcp://host:5555: " << e.what() << "\n";
    return kExitUsage;
  }
  std::string name = argv[split];
  std::vector<std::string> rest(argv + split + 1, argv + argc);
  for (const auto& c : Commands()) {
    if (name == c.name) {
      try {
        return c.run(g, rest);
      } catch (const std::exception& e) {
        std::cerr << "asr-submit: " << e.what() << "\n";
        return kExitUnreachable;
      }
    }
  }
  std::cerr << "asr-submit: unknown subcommand \"" << name << "\"\n\n" << usage << "\n";
  return kExitUsage;
}
