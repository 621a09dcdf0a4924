// flotilla-hub: REST API, campaigns, device store and (by default) an
// embedded mosquitto. See docs/operations.md.
#include <csignal>
#include <iostream>

#include "flotilla/common/log.hpp"
#include "flotilla/hub/app.hpp"

namespace {
std::atomic<bool> g_stop{false};
void on_signal(int) { g_stop = true; }
}  // namespace

int main(int argc, char** argv) {
  flotilla::Options opts("flotilla-hub",
                         "flotilla-hub — the Flotilla hub: REST API, rollout campaigns and device store.\n"
                         "By default it starts its own mosquitto broker and keeps everything in --data-dir.\n\n"
                         "Usage: flotilla-hub [options]",
                         "FLOTILLA_HUB_");
  flotilla::hub::add_hub_options(opts);
  auto pos = opts.parse(argc, argv);
  if (!pos) {
    std::cerr << "flotilla-hub: " << pos.error().message << "\n";
    return 2;
  }
  if (opts.help_requested()) {
    std::cout << opts.help();
    return 0;
  }
  if (!pos->empty()) {
    std::cerr << "flotilla-hub: unexpected argument '" << pos->front() << "'\n";
    return 2;
  }
  flotilla::log::setup(opts.get("log-level"));
  auto cfg = flotilla::hub::hub_config_from(opts);
  if (!cfg) {
    std::cerr << "flotilla-hub: " << cfg.error().message << "\n";
    return 2;
  }
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
  std::signal(SIGPIPE, SIG_IGN);
  auto s = flotilla::hub::run_hub(*cfg, g_stop);
  if (!s) {
    flotilla::log::get("hub")->critical("{}", s.error().message);
    return 1;
  }
  return 0;
}
