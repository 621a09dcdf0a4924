#pragma once
// Campaign strategy: canary, waves, max in flight, soak, per-device deadline
// and a failure threshold whose action is pause, abort or rollback.
#include <chrono>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "flotilla/common/result.hpp"

namespace flotilla::hub {

struct FailureThreshold {
  double percent = 20;       // failed / (applied + failed) at or above this ...
  int64_t min_sample = 5;    // ... once at least this many outcomes are in
  std::string action = "pause";  // pause | abort | rollback
};

struct Strategy {
  int64_t canary_count = 0;      // the N devices first in hash order, or
  double canary_percent = 0;     // this share of the targets (0 = no canary)
  std::vector<double> waves{100};  // cumulative percentages of the targets, last = 100
  int64_t max_in_flight = 0;     // online devices applying at once; 0 = no limit
  std::chrono::milliseconds soak{0};  // wait after a wave finished before the next starts
  std::chrono::milliseconds device_deadline{std::chrono::minutes(30)};
  FailureThreshold threshold;

  // Parses the "strategy" object of POST /v1/campaigns; every bad value is an
  // error naming the field. Absent fields keep the defaults above.
  static Result<Strategy> from_json(const nlohmann::json& j);
  nlohmann::json to_json() const;

  bool has_canary() const { return canary_count > 0 || canary_percent > 0; }
  int wave_count() const { return static_cast<int>(waves.size()) + (has_canary() ? 1 : 0); }
  std::string wave_name(int wave) const;
};

// Deterministic position of a device in a campaign, uniform in [0, 1): every
// shard computes the same wave for the same (campaign, device) without asking.
double campaign_rank(const std::string& campaign_id, const std::string& device_id);

// Wave index for each device given their ranks (index 0 is the canary when
// there is one). ranks[i] belongs to device i.
std::vector<int> assign_waves(const Strategy& s, const std::vector<double>& ranks);

}  // namespace flotilla::hub
