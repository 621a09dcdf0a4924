#include "flotilla/hub/campaign.hpp"

#include <algorithm>
#include <cctype>
#include <numeric>
#include <sstream>

#include "flotilla/common/crypto.hpp"
#include "flotilla/common/options.hpp"
#include "flotilla/hub/timezone.hpp"

namespace flotilla::hub {

using nlohmann::json;

namespace {
Error bad(const std::string& field, const std::string& why) {
  return make_error(Errc::invalid_argument, "strategy." + field + ": " + why);
}

std::string format_duration(std::chrono::milliseconds d) {
  if (d.count() % 1000 != 0) return std::to_string(d.count()) + "ms";
  return std::to_string(d.count() / 1000) + "s";
}

// "HH:MM", 00:00 to 23:59 (24:00 as the end of a day).
int parse_clock(const std::string& text) {
  if (text.size() != 5 || text[2] != ':' || !std::isdigit(static_cast<unsigned char>(text[0])) ||
      !std::isdigit(static_cast<unsigned char>(text[1])) || !std::isdigit(static_cast<unsigned char>(text[3])) ||
      !std::isdigit(static_cast<unsigned char>(text[4]))) {
    return -1;
  }
  const int h = (text[0] - '0') * 10 + (text[1] - '0'), m = (text[3] - '0') * 10 + (text[4] - '0');
  if (m > 59 || h > 24 || (h == 24 && m != 0)) return -1;
  return h * 60 + m;
}

std::string format_clock(int minutes) {
  const int h = minutes / 60, m = minutes % 60;
  return std::string{static_cast<char>('0' + h / 10), static_cast<char>('0' + h % 10), ':',
                     static_cast<char>('0' + m / 10), static_cast<char>('0' + m % 10)};
}

Result<RateLimit> parse_rate(const json& r) {
  RateLimit out;
  if (!r.is_object()) return bad("rate", "an object {max_per_minute, start_per_minute, factor, every_applied}");
  for (const auto& [k, v] : r.items()) {
    if (k != "max_per_minute" && k != "start_per_minute" && k != "factor" && k != "every_applied") {
      return bad("rate." + k, "unknown field");
    }
  }
  auto whole = [&](const char* key, int64_t min, int64_t& into) -> Status {
    if (!r.contains(key)) return {};
    if (!r[key].is_number_integer() || r[key].get<int64_t>() < min || r[key].get<int64_t>() > 1000000) {
      return bad(std::string("rate.") + key, "a whole number from " + std::to_string(min) + " to 1000000");
    }
    into = r[key].get<int64_t>();
    return {};
  };
  if (!r.contains("max_per_minute")) return bad("rate.max_per_minute", "required: devices released per minute");
  if (auto s = whole("max_per_minute", 1, out.max_per_minute); !s) return s.error();
  if (auto s = whole("start_per_minute", 1, out.start_per_minute); !s) return s.error();
  if (auto s = whole("every_applied", 1, out.every_applied); !s) return s.error();
  if (r.contains("factor")) {
    if (!r["factor"].is_number() || r["factor"].get<double>() <= 1 || r["factor"].get<double>() > 10) {
      return bad("rate.factor", "a number above 1 and at most 10");
    }
    out.factor = r["factor"].get<double>();
  }
  if (out.start_per_minute > out.max_per_minute) {
    return bad("rate.start_per_minute", "must not be above max_per_minute");
  }
  if (out.start_per_minute > 0 && out.start_per_minute < out.max_per_minute && out.every_applied == 0) {
    return bad("rate.every_applied", "required with a start_per_minute below max_per_minute: how many applied "
                                     "devices raise the rate by the factor");
  }
  return out;
}

Result<MaintenanceWindow> parse_window(const json& w) {
  MaintenanceWindow out;
  if (!w.is_object()) return bad("maintenance_window", "an object {start, end, timezone, timezone_label}");
  for (const auto& [k, v] : w.items()) {
    if (k != "start" && k != "end" && k != "timezone" && k != "timezone_label") {
      return bad("maintenance_window." + k, "unknown field");
    }
  }
  for (const char* key : {"start", "end"}) {
    const int m = w.contains(key) && w[key].is_string() ? parse_clock(w[key].get<std::string>()) : -1;
    if (m < 0) return bad(std::string("maintenance_window.") + key, "a local time \"HH:MM\", like \"01:30\"");
    (std::string(key) == "start" ? out.start_minute : out.end_minute) = m;
  }
  if (out.start_minute == 1440) return bad("maintenance_window.start", "must be before 24:00");
  if (out.start_minute == out.end_minute % 1440) {
    return bad("maintenance_window", "start and end are the same time: no window (leave it out for always)");
  }
  if (w.contains("timezone")) {
    if (!w["timezone"].is_string()) return bad("maintenance_window.timezone", "a zone name like Europe/Berlin");
    out.timezone = w["timezone"].get<std::string>();
  }
  // The zone must exist here: a typo would otherwise hold every device.
  if (auto off = utc_offset_seconds(out.timezone, 0); !off) return bad("maintenance_window.timezone", off.error().message);
  if (w.contains("timezone_label")) {
    if (!w["timezone_label"].is_string() || w["timezone_label"].get<std::string>().empty()) {
      return bad("maintenance_window.timezone_label", "a label key, like timezone");
    }
    out.timezone_label = w["timezone_label"].get<std::string>();
  }
  return out;
}
}  // namespace

double RateLimit::per_minute(int64_t applied) const {
  if (!enabled()) return 0;
  double r = static_cast<double>(start_per_minute > 0 ? start_per_minute : max_per_minute);
  if (every_applied > 0) {
    for (int64_t steps = applied / every_applied; steps > 0 && r < static_cast<double>(max_per_minute); --steps) {
      r *= factor;
    }
  }
  return std::min(r, static_cast<double>(max_per_minute));
}

bool MaintenanceWindow::open_at(int m) const {
  if (!enabled()) return true;
  const int end = end_minute % 1440;  // 24:00 is the next midnight
  if (start_minute < end) return m >= start_minute && m < end;
  return m >= start_minute || m < end;  // spans midnight
}

std::string MaintenanceWindow::zone_for(const std::map<std::string, std::string>& labels) const {
  if (!timezone_label.empty()) {
    if (auto it = labels.find(timezone_label); it != labels.end()) {
      std::string z = it->second;
      std::replace(z.begin(), z.end(), '.', '/');
      if (valid_zone_name(z) && utc_offset_seconds(z, 0)) return z;
    }
  }
  return timezone;
}

Result<Strategy> Strategy::from_json(const json& j) {
  Strategy s;
  if (j.is_null()) return s;
  if (!j.is_object()) return make_error(Errc::invalid_argument, "strategy must be an object");
  static const std::vector<std::string> known = {"canary",          "waves",      "max_in_flight",
                                                 "soak",            "device_deadline", "failure_threshold",
                                                 "membership",      "rate",       "maintenance_window",
                                                 "approval",        "k3s_action"};
  for (const auto& [k, v] : j.items()) {
    if (std::find(known.begin(), known.end(), k) == known.end()) return bad(k, "unknown field");
  }
  if (j.contains("k3s_action")) {
    const auto& a = j["k3s_action"];
    if (!a.is_string() || (a != "" && a != "rotate_certificates")) {
      return bad("k3s_action", "must be \"rotate_certificates\" (or \"\" for none)");
    }
    s.k3s_action = a.get<std::string>();
  }
  if (j.contains("canary")) {
    const auto& c = j["canary"];
    // 3 = three devices; "5%" = five percent.
    if (c.is_number_integer()) {
      s.canary_count = c.get<int64_t>();
      if (s.canary_count < 0) return bad("canary", "must not be negative");
    } else if (c.is_string() && !c.get<std::string>().empty() && c.get<std::string>().back() == '%') {
      try {
        s.canary_percent = std::stod(c.get<std::string>());
      } catch (const std::exception&) {
        return bad("canary", "'" + c.get<std::string>() + "' is not a percentage");
      }
      if (s.canary_percent <= 0 || s.canary_percent >= 100) return bad("canary", "percentage must be in (0, 100)");
    } else {
      return bad("canary", "a device count (3) or a percentage (\"5%\")");
    }
  }
  if (j.contains("waves")) {
    if (!j["waves"].is_array() || j["waves"].empty()) return bad("waves", "a non-empty list of cumulative percentages");
    s.waves.clear();
    double prev = 0;
    for (const auto& w : j["waves"]) {
      if (!w.is_number()) return bad("waves", "every wave is a percentage number, like [10, 50, 100]");
      const double p = w.get<double>();
      if (p <= prev || p > 100) return bad("waves", "percentages must increase and stay within 100");
      s.waves.push_back(p);
      prev = p;
    }
    if (s.waves.back() != 100) return bad("waves", "the last wave must reach 100");
  }
  if (j.contains("max_in_flight")) {
    if (!j["max_in_flight"].is_number_integer() || j["max_in_flight"].get<int64_t>() < 0) {
      return bad("max_in_flight", "a whole number >= 0 (0 = no limit)");
    }
    s.max_in_flight = j["max_in_flight"].get<int64_t>();
  }
  for (const char* key : {"soak", "device_deadline"}) {
    if (!j.contains(key)) continue;
    if (!j[key].is_string()) return bad(key, "a duration like \"90s\" or \"10m\"");
    auto d = parse_duration(j[key].get<std::string>());
    if (!d) return bad(key, d.error().message);
    (std::string(key) == "soak" ? s.soak : s.device_deadline) = *d;
  }
  if (s.device_deadline.count() < 1000) return bad("device_deadline", "must be at least 1s");
  if (j.contains("failure_threshold")) {
    const auto& t = j["failure_threshold"];
    if (!t.is_object()) return bad("failure_threshold", "an object {percent, min_sample, action}");
    for (const auto& [k, v] : t.items()) {
      if (k != "percent" && k != "min_sample" && k != "action") return bad("failure_threshold." + k, "unknown field");
    }
    if (t.contains("percent")) {
      if (!t["percent"].is_number() || t["percent"].get<double>() <= 0 || t["percent"].get<double>() > 100) {
        return bad("failure_threshold.percent", "a number in (0, 100]");
      }
      s.threshold.percent = t["percent"].get<double>();
    }
    if (t.contains("min_sample")) {
      if (!t["min_sample"].is_number_integer() || t["min_sample"].get<int64_t>() < 1) {
        return bad("failure_threshold.min_sample", "a whole number >= 1");
      }
      s.threshold.min_sample = t["min_sample"].get<int64_t>();
    }
    if (t.contains("action")) {
      const std::string a = t["action"].is_string() ? t["action"].get<std::string>() : "";
      if (a != "pause" && a != "abort" && a != "rollback") {
        return bad("failure_threshold.action", "pause, abort or rollback");
      }
      s.threshold.action = a;
    }
  }
  if (j.contains("membership")) {
    const std::string m = j["membership"].is_string() ? j["membership"].get<std::string>() : "";
    if (m != "live" && m != "static") return bad("membership", "live or static");
    s.membership = m == "live" ? Membership::live : Membership::fixed;
  }
  if (j.contains("rate")) {
    auto r = parse_rate(j["rate"]);
    if (!r) return r.error();
    s.rate = *r;
  }
  if (j.contains("maintenance_window")) {
    auto w = parse_window(j["maintenance_window"]);
    if (!w) return w.error();
    s.window = *w;
  }
  if (j.contains("approval")) {
    // "each_wave": every wave after the first waits; or the waves by name.
    const auto& a = j["approval"];
    if (a.is_string() && a.get<std::string>() == "each_wave") {
      for (int w = 1; w < s.wave_count(); ++w) s.approval_waves.push_back(w);
    } else if (a.is_array()) {
      for (const auto& name : a) {
        int found = -1;
        for (int w = 0; w < s.wave_count() && name.is_string(); ++w) {
          if (s.wave_name(w) == name.get<std::string>()) found = w;
        }
        if (found < 0) {
          return bad("approval", (name.is_string() ? "'" + name.get<std::string>() + "'" : std::string("a non-string")) +
                                     " is not a wave of this strategy (" + s.wave_name(0) + " .. " +
                                     s.wave_name(s.wave_count() - 1) + ")");
        }
        if (found == 0) return bad("approval", "the first wave starts with the campaign; gate a later one");
        if (std::find(s.approval_waves.begin(), s.approval_waves.end(), found) == s.approval_waves.end()) {
          s.approval_waves.push_back(found);
        }
      }
      std::sort(s.approval_waves.begin(), s.approval_waves.end());
    } else {
      return bad("approval", "\"each_wave\" or a list of wave names, like [\"wave 2\"]");
    }
  }
  return s;
}

json Strategy::to_json() const {
  json j{{"waves", waves},
         {"max_in_flight", max_in_flight},
         {"soak", format_duration(soak)},
         {"device_deadline", format_duration(device_deadline)},
         {"failure_threshold",
          {{"percent", threshold.percent}, {"min_sample", threshold.min_sample}, {"action", threshold.action}}}};
  j["membership"] = membership == Membership::live ? "live" : "static";
  if (rate.enabled()) {
    j["rate"] = {{"max_per_minute", rate.max_per_minute}};
    if (rate.start_per_minute > 0) j["rate"]["start_per_minute"] = rate.start_per_minute;
    if (rate.every_applied > 0) {
      j["rate"]["every_applied"] = rate.every_applied;
      j["rate"]["factor"] = rate.factor;
    }
  }
  if (window.enabled()) {
    j["maintenance_window"] = {{"start", format_clock(window.start_minute)},
                               {"end", format_clock(window.end_minute)},
                               {"timezone", window.timezone}};
    if (!window.timezone_label.empty()) j["maintenance_window"]["timezone_label"] = window.timezone_label;
  }
  if (!approval_waves.empty()) {
    json names = json::array();
    for (int w : approval_waves) names.push_back(wave_name(w));
    j["approval"] = names;
  }
  if (!k3s_action.empty()) j["k3s_action"] = k3s_action;
  if (canary_count > 0) j["canary"] = canary_count;
  else if (canary_percent > 0) {
    std::ostringstream o;
    o << canary_percent << "%";
    j["canary"] = o.str();
  }
  return j;
}

std::string Strategy::wave_name(int wave) const {
  if (has_canary()) {
    if (wave == 0) return "canary";
    return "wave " + std::to_string(wave);
  }
  return "wave " + std::to_string(wave + 1);
}

bool Strategy::needs_approval(int wave) const {
  return std::find(approval_waves.begin(), approval_waves.end(), wave) != approval_waves.end();
}

int Strategy::wave_for_rank(double rank) const {
  const int offset = has_canary() ? 1 : 0;
  if (canary_percent > 0 && rank * 100 < canary_percent) return 0;
  for (size_t k = 0; k < waves.size(); ++k) {
    if (rank * 100 < waves[k]) return static_cast<int>(k) + offset;
  }
  return static_cast<int>(waves.size()) - 1 + offset;
}

double campaign_rank(const std::string& campaign_id, const std::string& device_id) {
  auto h = crypto::sha256(campaign_id + ":" + device_id);
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = v << 8 | h[i];
  return static_cast<double>(v >> 11) / static_cast<double>(uint64_t{1} << 53);
}

std::vector<int> assign_waves(const Strategy& s, const std::vector<double>& ranks) {
  std::vector<int> wave(ranks.size(), 0);
  for (size_t i = 0; i < ranks.size(); ++i) wave[i] = s.wave_for_rank(ranks[i]);
  if (s.canary_count > 0) {
    // A count-based canary: the N lowest ranks, and a percentage wave for the rest.
    std::vector<size_t> order(ranks.size());
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return ranks[a] < ranks[b]; });
    for (size_t i = 0; i < order.size() && static_cast<int64_t>(i) < s.canary_count; ++i) wave[order[i]] = 0;
  }
  return wave;
}

namespace {
constexpr std::pair<CampaignState, std::string_view> kStateNames[] = {
    {CampaignState::running, "running"},       {CampaignState::waiting_approval, "waiting_approval"},
    {CampaignState::converging, "converging"}, {CampaignState::paused, "paused"},
    {CampaignState::completed, "completed"},   {CampaignState::aborted, "aborted"},
    {CampaignState::rolling_back, "rolling_back"}, {CampaignState::rolled_back, "rolled_back"}};
}  // namespace

std::string_view state_name(CampaignState s) {
  for (const auto& [state, name] : kStateNames) {
    if (state == s) return name;
  }
  return "unknown";
}

std::optional<CampaignState> campaign_state_from(std::string_view name) {
  for (const auto& [state, n] : kStateNames) {
    if (n == name) return state;
  }
  return std::nullopt;
}

bool campaign_runs(CampaignState s) {
  return s == CampaignState::running || s == CampaignState::waiting_approval || s == CampaignState::converging;
}

bool campaign_active(CampaignState s) {
  return campaign_runs(s) || s == CampaignState::paused || s == CampaignState::rolling_back;
}

bool campaign_final(CampaignState s) { return !campaign_active(s); }

}  // namespace flotilla::hub
