// flotilla-agent: the on-device agent. See docs/operations.md.
#include <csignal>
#include <iostream>

#include "flotilla/agent/daemon.hpp"
#include "flotilla/common/log.hpp"

namespace {
std::atomic<bool> g_stop{false};
void on_signal(int) { g_stop = true; }
}  // namespace

int main(int argc, char** argv) {
  flotilla::Options opts("flotilla-agent",
                         "flotilla-agent — installs, upgrades and health-checks k3s on this device as the\n"
                         "Flotilla hub directs, verifying every bundle against pinned keys.\n\n"
                         "Usage: flotilla-agent [options]",
                         "FLOTILLA_AGENT_");
  flotilla::agent::add_agent_options(opts);
  auto pos = opts.parse(argc, argv);
  if (!pos) {
    std::cerr << "flotilla-agent: " << pos.error().message << "\n";
    return 2;
  }
  if (opts.help_requested()) {
    std::cout << opts.help();
    return 0;
  }
  if (!pos->empty()) {
    std::cerr << "flotilla-agent: unexpected argument '" << pos->front() << "'\n";
    return 2;
  }
  flotilla::log::setup(opts.get("log-level"));
  auto cfg = flotilla::agent::agent_config_from(opts);
  if (!cfg) {
    std::cerr << "flotilla-agent: " << cfg.error().message << "\n";
    return 2;
  }
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
  std::signal(SIGPIPE, SIG_IGN);
  auto s = flotilla::agent::run_agent(*cfg, g_stop);
  if (!s) {
    flotilla::log::get("agent")->critical("{}", s.error().message);
    return 1;
  }
  return 0;
}
