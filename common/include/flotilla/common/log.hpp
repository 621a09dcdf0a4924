#pragma once
#include <memory>
#include <string>

#include <spdlog/spdlog.h>

namespace flotilla::log {

// Configures the default sink (stderr), level and format once per process.
// Level names are spdlog's: trace, debug, info, warn, error, critical, off.
// Format "text" (the default: "<time> <level> <logger> <message>") or
// "json" (one object per line: time, level, logger, msg); times are UTC,
// RFC 3339 with milliseconds, in both.
// Returns false (and keeps "info"/"text") for a name it does not know.
bool setup(const std::string& level = "info", const std::string& format = "text");
bool valid_level(const std::string& level);
bool valid_format(const std::string& format);

// One named logger per module ("hub", "agent", "bundles", ...), sharing the sink.
std::shared_ptr<spdlog::logger> get(const std::string& module);

}  // namespace flotilla::log
