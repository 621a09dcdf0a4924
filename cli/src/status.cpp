#include "status.hpp"

#include <unistd.h>

#include <algorithm>
#include <iostream>
#include <thread>

namespace flotilla::cli {

using nlohmann::json;

namespace {

// Device states, worst first, as the block lists them.
const std::vector<std::pair<const char*, const char*>> kStatesWorstFirst = {
    {"rollback_failed", "rollback failed"}, {"failed", "failed"},   {"rolling_back", "rolling back"},
    {"rolled_back", "rolled back"},         {"in_progress", "in progress"}, {"pending", "pending"},
    {"waiting", "waiting"},                 {"skipped", "skipped"}, {"superseded", "superseded"},
    {"applied", "applied"}};

int64_t n(const json& counts, const char* k) { return counts.is_object() ? counts.value(k, int64_t{0}) : 0; }

}  // namespace

int campaign_severity(const std::string& state) {
  static const std::vector<std::string> order = {"rolled_back", "rolling_back",     "aborted",
                                                 "paused",      "waiting_approval", "running",
                                                 "converging",  "completed"};
  auto it = std::find(order.begin(), order.end(), state);
  return it == order.end() ? 0 : static_cast<int>(it - order.begin());
}

bool campaign_settled(const json& c) {
  const std::string state = str(c, "state");
  return state != "running" && state != "rolling_back";
}

bool campaign_clean(const json& c) {
  const std::string state = str(c, "state");
  const json& counts = c.contains("counts") ? c["counts"] : json::object();
  return (state == "completed" || state == "converging") && n(counts, "failed") == 0 &&
         n(counts, "rollback_failed") == 0;
}

std::vector<std::string> status_block(const json& c) {
  std::vector<std::string> out;
  const json& counts = c.contains("counts") ? c["counts"] : json::object();
  std::string head = "campaign " + str(c, "name") + " (" + str(c, "id") + "): " + str(c, "state");
  if (!str(c, "state_reason").empty()) head += " - " + str(c, "state_reason");
  out.push_back(head);
  std::string wave;
  if (c.contains("waves")) {
    for (const auto& w : c["waves"]) {
      if (str(w, "state") == "current") wave = str(w, "name");
    }
  }
  std::string info = "  " + std::to_string(n(counts, "total")) + " devices";
  if (c.contains("bundle")) info += ", bundle " + str(c["bundle"], "name") + " v" + str(c["bundle"], "version");
  if (!wave.empty() && !campaign_settled(c)) info += ", in " + wave;
  out.push_back(info);
  for (const auto& [key, label] : kStatesWorstFirst) {
    if (const int64_t v = n(counts, key); v > 0) out.push_back("  " + pad(label, 17) + std::to_string(v));
  }
  if (const int64_t away = n(counts, "offline"); away > 0) {
    out.push_back("  " + pad("offline", 17) + std::to_string(away) + "  (unfinished; they converge when they return)");
  }
  if (c.contains("first_failures") && !c["first_failures"].empty()) {
    out.push_back("  first failures:");
    for (const auto& f : c["first_failures"]) {
      std::string line = "    " + pad(str(f, "device_id"), 24) + pad(str(f, "reason").empty() ? "unknown" : str(f, "reason"), 22);
      if (!str(f, "message").empty()) line += str(f, "message").substr(0, 120);
      while (!line.empty() && line.back() == ' ') line.pop_back();
      out.push_back(line);
    }
  }
  return out;
}

Result<std::vector<json>> wait_for_campaigns(const Client& c, const std::vector<std::string>& ids,
                                             const WaitOptions& w) {
  const bool tty = !w.structured && ::isatty(STDOUT_FILENO);
  const auto deadline = std::chrono::steady_clock::now() + w.timeout;
  std::vector<std::string> last;
  size_t drawn = 0;
  for (;;) {
    std::vector<json> now;
    for (const auto& id : ids) {
      auto r = c.call("GET", "/v1/campaigns/" + id);
      if (!r) return r.error();
      now.push_back(std::move(*r));
    }
    std::vector<size_t> order(now.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    // Worst first: the campaign that needs the operator comes on top.
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
      const int sa = campaign_severity(str(now[a], "state")), sb = campaign_severity(str(now[b], "state"));
      if (sa != sb) return sa < sb;
      return n(now[a]["counts"], "failed") > n(now[b]["counts"], "failed");
    });
    std::vector<std::string> lines;
    for (size_t i : order) {
      for (auto& l : status_block(now[i])) lines.push_back(std::move(l));
    }
    const bool done = std::all_of(now.begin(), now.end(), campaign_settled);
    if (!w.structured) {
      if (tty) {
        if (drawn) std::cout << "\033[" << drawn << "A";
        for (const auto& l : lines) std::cout << "\r\033[K" << l << "\n";
        // Lines left over from a longer block before.
        for (size_t i = lines.size(); i < drawn; ++i) std::cout << "\r\033[K\n";
        std::cout << std::flush;
        drawn = std::max(drawn, lines.size());
      } else if (lines != last) {
        for (const auto& l : lines) std::cout << l << "\n";
        std::cout << std::flush;
      }
    }
    last = lines;
    if (done) return now;
    if (std::chrono::steady_clock::now() >= deadline) {
      return make_error(Errc::timeout, "still running after the timeout");
    }
    std::this_thread::sleep_for(w.interval);
  }
}

}  // namespace flotilla::cli
