// flotilla-hub: REST API, campaigns, device store and (by default) an
// embedded mosquitto. See docs/operations.md.
#include "flotilla/common/daemon_main.hpp"
#include "flotilla/hub/app.hpp"

int main(int argc, char** argv) {
  flotilla::Options opts("flotilla-hub",
                         "flotilla-hub — the Flotilla hub: REST API, rollout campaigns and device store.\n"
                         "By default it starts its own mosquitto broker and keeps everything in --data-dir.\n\n"
                         "Usage: flotilla-hub [options]",
                         "FLOTILLA_HUB_");
  flotilla::hub::add_hub_options(opts);
  return flotilla::daemon_main(opts, argc, argv, "hub", [](const flotilla::Options& o, const std::atomic<bool>& stop) {
    auto cfg = flotilla::hub::hub_config_from(o);
    if (!cfg) return flotilla::Status(cfg.error());
    return flotilla::hub::run_hub(*cfg, stop);
  });
}
