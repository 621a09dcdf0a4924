#include "flotilla/common/log.hpp"

#include <mutex>

#include <spdlog/sinks/stdout_color_sinks.h>

namespace flotilla::log {
namespace {
std::mutex g_mu;
spdlog::level::level_enum g_level = spdlog::level::info;
}  // namespace

bool valid_level(const std::string& level) {
  for (const char* l : {"trace", "debug", "info", "warn", "warning", "error", "critical", "off"}) {
    if (level == l) return true;
  }
  return false;
}

bool setup(const std::string& level) {
  std::lock_guard lock(g_mu);
  // spdlog maps unknown names to "off": refuse them instead of going silent.
  const bool known = valid_level(level);
  g_level = known ? spdlog::level::from_str(level == "warning" ? "warn" : level) : spdlog::level::info;
  spdlog::set_level(g_level);
  spdlog::set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%l%$ %n %v");
  for (const auto& name : {"hub", "agent", "bundles", "common"}) {
    if (auto existing = spdlog::get(name)) existing->set_level(g_level);
  }
  return known;
}

std::shared_ptr<spdlog::logger> get(const std::string& module) {
  std::lock_guard lock(g_mu);
  if (auto existing = spdlog::get(module)) return existing;
  auto logger = spdlog::stderr_color_mt(module);
  logger->set_level(g_level);
  logger->set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%l%$ %n %v");
  return logger;
}

}  // namespace flotilla::log
