#include "flotilla/hub/campaign.hpp"

#include <algorithm>
#include <numeric>
#include <sstream>

#include "flotilla/common/crypto.hpp"
#include "flotilla/common/options.hpp"

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
}  // namespace

Result<Strategy> Strategy::from_json(const json& j) {
  Strategy s;
  if (j.is_null()) return s;
  if (!j.is_object()) return make_error(Errc::invalid_argument, "strategy must be an object");
  static const std::vector<std::string> known = {"canary", "waves", "max_in_flight", "soak", "device_deadline",
                                                 "failure_threshold"};
  for (const auto& [k, v] : j.items()) {
    if (std::find(known.begin(), known.end(), k) == known.end()) return bad(k, "unknown field");
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
  return s;
}

json Strategy::to_json() const {
  json j{{"waves", waves},
         {"max_in_flight", max_in_flight},
         {"soak", format_duration(soak)},
         {"device_deadline", format_duration(device_deadline)},
         {"failure_threshold",
          {{"percent", threshold.percent}, {"min_sample", threshold.min_sample}, {"action", threshold.action}}}};
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

double campaign_rank(const std::string& campaign_id, const std::string& device_id) {
  auto h = crypto::sha256(campaign_id + ":" + device_id);
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = v << 8 | h[i];
  return static_cast<double>(v >> 11) / static_cast<double>(uint64_t{1} << 53);
}

std::vector<int> assign_waves(const Strategy& s, const std::vector<double>& ranks) {
  std::vector<int> wave(ranks.size(), 0);
  const int offset = s.has_canary() ? 1 : 0;
  std::vector<bool> canary(ranks.size(), false);
  if (s.canary_count > 0) {
    std::vector<size_t> order(ranks.size());
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return ranks[a] < ranks[b]; });
    for (size_t i = 0; i < order.size() && static_cast<int64_t>(i) < s.canary_count; ++i) canary[order[i]] = true;
  } else if (s.canary_percent > 0) {
    for (size_t i = 0; i < ranks.size(); ++i) canary[i] = ranks[i] * 100 < s.canary_percent;
  }
  for (size_t i = 0; i < ranks.size(); ++i) {
    if (canary[i]) {
      wave[i] = 0;
      continue;
    }
    int w = static_cast<int>(s.waves.size()) - 1;
    for (size_t k = 0; k < s.waves.size(); ++k) {
      if (ranks[i] * 100 < s.waves[k]) {
        w = static_cast<int>(k);
        break;
      }
    }
    wave[i] = w + offset;
  }
  return wave;
}

}  // namespace flotilla::hub
