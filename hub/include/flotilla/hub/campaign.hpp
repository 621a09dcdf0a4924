#pragma once
// Campaign strategy: canary, waves, max in flight, soak, per-device deadline
// and a failure threshold whose action is pause, abort or rollback.
#include <chrono>
#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "flotilla/common/result.hpp"

namespace flotilla::hub {

// Where a campaign stands. The names (state_name) are what the store keeps
// and the API and metrics show; inside the hub it is this enum.
//   running           releasing waves and judging outcomes
//   waiting_approval  the next wave waits for an operator (an approval gate)
//   converging        every wave out, only offline devices outstanding
//   paused, aborted, completed
//   rolling_back      devices are sent back to their previous bundle; then rolled_back
enum class CampaignState { running, waiting_approval, converging, paused, completed, aborted, rolling_back, rolled_back };
std::string_view state_name(CampaignState s);
// nullopt for a name that is not a state.
std::optional<CampaignState> campaign_state_from(std::string_view name);
// The engine releases devices and judges outcomes.
bool campaign_runs(CampaignState s);
// Not over: running, waiting_approval, converging, paused or rolling_back.
bool campaign_active(CampaignState s);
// Over for good: completed, aborted or rolled_back.
bool campaign_final(CampaignState s);
// Comparing with a state's name, as the API spells it (tests of answers).
inline bool operator==(CampaignState s, std::string_view name) { return state_name(s) == name; }

struct FailureThreshold {
  double percent = 20;       // failed / (applied + failed) at or above this ...
  int64_t min_sample = 5;    // ... once at least this many outcomes are in
  std::string action = "pause";  // pause | abort | rollback
};

// Pacing in devices released per minute, with AWS IoT Jobs' exponential ramp:
// start at start_per_minute and multiply by factor each time every_applied
// more devices applied, up to max_per_minute.
struct RateLimit {
  int64_t max_per_minute = 0;    // 0 = no rate limit
  int64_t start_per_minute = 0;  // 0 = start at max_per_minute
  double factor = 2;
  int64_t every_applied = 0;     // 0 = no ramp
  bool enabled() const { return max_per_minute > 0; }
  // The rate once `applied` devices applied.
  double per_minute(int64_t applied) const;
};

// Devices are released only while it is between start and end in their own
// local time (minutes after midnight; end before start spans midnight). The
// zone is the device's timezone_label (its value a zone name with '.' for
// '/': timezone=Europe.Berlin), else `timezone`.
struct MaintenanceWindow {
  int start_minute = -1;  // -1 = no window
  int end_minute = -1;
  std::string timezone = "UTC";
  std::string timezone_label;
  bool enabled() const { return start_minute >= 0; }
  bool open_at(int local_minute) const;
  // The zone for a device with these labels.
  std::string zone_for(const std::map<std::string, std::string>& labels) const;
};

enum class Membership { live, fixed };

struct Strategy {
  int64_t canary_count = 0;      // the N devices first in hash order, or
  double canary_percent = 0;     // this share of the targets (0 = no canary)
  std::vector<double> waves{100};  // cumulative percentages of the targets, last = 100
  int64_t max_in_flight = 0;     // online devices applying at once; 0 = no limit
  std::chrono::milliseconds soak{0};  // wait after a wave finished before the next starts
  std::chrono::milliseconds device_deadline{std::chrono::minutes(30)};
  FailureThreshold threshold;
  // live: devices that come to match the selector while the campaign runs
  // join it (in the current wave at the earliest), devices that stop matching
  // before their release leave it. static ("fixed" here): the devices that
  // matched at creation, no others.
  Membership membership = Membership::live;
  RateLimit rate;
  MaintenanceWindow window;
  // Waves (by index, never 0) that start only once an operator approved them.
  std::vector<int> approval_waves;
  // What the campaign asks of k3s besides placing its bundle, signed into
  // each device's desired header: "" or "rotate_certificates" (`k3s
  // certificate rotate` and a restart, health-gated; docs/agent.md).
  std::string k3s_action;

  // Parses the "strategy" object of POST /v1/campaigns; every bad value is an
  // error naming the field. Absent fields keep the defaults above.
  static Result<Strategy> from_json(const nlohmann::json& j);
  nlohmann::json to_json() const;

  bool has_canary() const { return canary_count > 0 || canary_percent > 0; }
  int wave_count() const { return static_cast<int>(waves.size()) + (has_canary() ? 1 : 0); }
  std::string wave_name(int wave) const;
  bool needs_approval(int wave) const;
  // The wave a device of this rank belongs to, outside a count-based canary
  // (which is fixed when the campaign is created).
  int wave_for_rank(double rank) const;
};

// Deterministic position of a device in a campaign, uniform in [0, 1): every
// shard computes the same wave for the same (campaign, device) without asking.
double campaign_rank(const std::string& campaign_id, const std::string& device_id);

// Wave index for each device given their ranks (index 0 is the canary when
// there is one). ranks[i] belongs to device i.
std::vector<int> assign_waves(const Strategy& s, const std::vector<double>& ranks);

}  // namespace flotilla::hub
