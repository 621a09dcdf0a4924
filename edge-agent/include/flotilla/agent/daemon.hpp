#pragma once
// The on-device daemon around the core: configuration, identity,
// enrollment, the MQTT session and the single-threaded event loop.
#include <atomic>
#include <chrono>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "flotilla/common/options.hpp"
#include "flotilla/common/result.hpp"

namespace flotilla::agent {

struct AgentConfig {
  std::filesystem::path root = "/";
  std::string hub_url;
  std::string enrollment_token;
  std::vector<std::string> root_keys;   // "ed25519:<base64>" or key files (under root)
  unsigned key_threshold = 1;
  std::map<std::string, std::string> labels;
  std::string arch;
  std::string k3s_bin;                  // device path; default /usr/local/bin/k3s
  std::string node_name;
  std::string state_dir = "/var/lib/flotilla";
  std::chrono::milliseconds health_timeout{60000};
  std::chrono::milliseconds reconnect_max{300000};
};

void add_agent_options(Options& o);
// Validates every value; errors name the setting and where it came from.
Result<AgentConfig> agent_config_from(const Options& o);
std::string detect_arch();

// Runs until *stop becomes true. Returns an error only for problems a
// restart would not fix (bad configuration, unusable state directory).
Status run_agent(const AgentConfig& cfg, const std::atomic<bool>& stop);

}  // namespace flotilla::agent
