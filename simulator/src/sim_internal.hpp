#pragma once
// Pieces of flotilla_sim shared between its source files.
#include <cstdint>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "flotilla/common/http_client.hpp"
#include "flotilla/common/result.hpp"
#include "flotilla/sim/fleet.hpp"

namespace flotilla::sim {

// The hub's REST API with a bearer token.
struct Rest {
  std::string url;
  std::string token;
  Result<http::Response> call(const std::string& method, const std::string& path, const std::string& body = "",
                              const std::string& content_type = "application/json") const;
  // Expects want_status and a JSON answer.
  Result<nlohmann::json> call_json(const std::string& method, const std::string& path, const nlohmann::json& body,
                                   int want_status) const;
};

struct ProcUsage {
  uint64_t rss_bytes = 0;
  double cpu_s = 0;  // user + system
};
// From /proc/<pid>/stat and /proc/<pid>/statm; nullopt when gone.
std::optional<ProcUsage> proc_usage(int pid);

Result<nlohmann::json> run_fleet(const SimOptions& opts, Rest rest);

}  // namespace flotilla::sim
