#pragma once
#include <memory>
#include <string>

#include <spdlog/spdlog.h>

namespace flotilla::log {

// Configures the default sink (stderr) and level once per process. Level names
// are spdlog's: trace, debug, info, warn, error, critical, off.
void setup(const std::string& level = "info");

// One named logger per module ("hub", "agent", "bundles", ...), sharing the sink.
std::shared_ptr<spdlog::logger> get(const std::string& module);

}  // namespace flotilla::log
