#include "flotilla/common/daemon_main.hpp"

#include <csignal>
#include <iostream>

#include "flotilla/common/log.hpp"
#include "flotilla/common/version.hpp"

namespace flotilla {

namespace {
std::atomic<bool> g_stop{false};
void on_signal(int) { g_stop = true; }
}  // namespace

int daemon_main(Options& opts, int argc, char** argv, const std::string& logger,
                const std::function<Status(const Options&, const std::atomic<bool>& stop)>& run) {
  const std::string program = argc > 0 ? std::string(argv[0]).substr(std::string(argv[0]).rfind('/') + 1) : "flotilla";
  auto pos = opts.parse(argc, argv);
  if (!pos) {
    std::cerr << program << ": " << pos.error().message << "\n";
    return 2;
  }
  if (opts.help_requested()) {
    std::cout << opts.help();
    return 0;
  }
  if (opts.version_requested()) {
    std::cout << program << " " << version() << "\n";
    return 0;
  }
  if (!pos->empty()) {
    std::cerr << program << ": unexpected argument '" << pos->front() << "'\n";
    return 2;
  }
  const std::string format = opts.has("log-format") ? opts.get("log-format") : "text";
  if (!log::valid_format(format)) {
    std::cerr << program << ": log-format must be text or json; got '" << format << "' (from "
              << opts.source("log-format") << ")\n";
    return 2;
  }
  if (!log::setup(opts.get("log-level"), format)) {
    std::cerr << program << ": log-level must be one of trace, debug, info, warn, error, critical, off; got '"
              << opts.get("log-level") << "'\n";
    return 2;
  }
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
  std::signal(SIGPIPE, SIG_IGN);
  auto s = run(opts, g_stop);
  if (!s) {
    const bool usage = s.error().code == Errc::invalid_argument;
    if (usage) std::cerr << program << ": " << s.error().message << "\n";
    else log::get(logger)->critical("{}", s.error().message);
    return usage ? 2 : 1;
  }
  return 0;
}

}  // namespace flotilla
