#pragma once
// The status block operators look for while a campaign runs (flotilla
// campaign status --wait, flotilla apply --wait): worst state first, counts
// per state, the first failures with device and reason.
#include <chrono>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "client.hpp"

namespace flotilla::cli {

// The block for one campaign (GET /v1/campaigns/{id}).
std::vector<std::string> status_block(const nlohmann::json& campaign);
// Lower is worse: rolled_back, rolling_back, aborted, paused, running,
// converging, completed.
int campaign_severity(const std::string& state);
// True once a campaign will not move on its own (not running or rolling back).
bool campaign_settled(const nlohmann::json& campaign);
// True when it settled with every device applied (or away) and no failure.
bool campaign_clean(const nlohmann::json& campaign);

struct WaitOptions {
  std::chrono::milliseconds timeout{std::chrono::minutes(30)};
  std::chrono::milliseconds interval{std::chrono::milliseconds(500)};
  bool structured = false;  // -o json/yaml: no blocks, the caller prints the result
};

// Polls the campaigns until every one settled or the timeout passed,
// printing their blocks (worst first) whenever they change; redrawn in place
// on a terminal. Returns the last state of each, or an error.
Result<std::vector<nlohmann::json>> wait_for_campaigns(const Client& c, const std::vector<std::string>& ids,
                                                       const WaitOptions& w);

}  // namespace flotilla::cli
