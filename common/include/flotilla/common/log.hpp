#pragma once
#include <memory>
#include <string>

#include <spdlog/spdlog.h>

namespace flotilla::log {

// Configures the default sink (stderr) and level once per process. Level names
// are spdlog's: trace, debug, info, warn, error, critical, off.
// Returns false (and keeps "info") for a name it does not know.
bool setup(const std::string& level = "info");
bool valid_level(const std::string& level);

// One named logger per module ("hub", "agent", "bundles", ...), sharing the sink.
std::shared_ptr<spdlog::logger> get(const std::string& module);

}  // namespace flotilla::log
