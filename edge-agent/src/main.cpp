// flotilla-agent: the on-device agent. See docs/operations.md.
#include "flotilla/agent/daemon.hpp"
#include "flotilla/common/daemon_main.hpp"

int main(int argc, char** argv) {
  flotilla::Options opts("flotilla-agent",
                         "flotilla-agent — installs, upgrades and health-checks k3s on this device as the\n"
                         "Flotilla hub directs, verifying every bundle against pinned keys.\n\n"
                         "Usage: flotilla-agent [options]",
                         "FLOTILLA_AGENT_");
  flotilla::agent::add_agent_options(opts);
  return flotilla::daemon_main(opts, argc, argv, "agent", [](const flotilla::Options& o, const std::atomic<bool>& stop) {
    auto cfg = flotilla::agent::agent_config_from(o);
    if (!cfg) return flotilla::Status(cfg.error());
    return flotilla::agent::run_agent(*cfg, stop);
  });
}
