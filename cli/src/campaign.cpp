// flotilla campaign ...: create, follow and steer rollouts.
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <iostream>
#include <sstream>
#include <thread>

#include "cli.hpp"
#include "client.hpp"
#include "flotilla/common/options.hpp"
#include "output.hpp"
#include "status.hpp"

namespace flotilla::cli {

using nlohmann::json;

namespace {

int64_t count(const json& n, const char* k) { return n.value(k, int64_t{0}); }

std::string bar(int64_t done, int64_t failed, int64_t total, int width = 30) {
  if (total <= 0) return std::string(static_cast<size_t>(width), ' ');
  int ok_cells = static_cast<int>(done * width / total);
  int fail_cells = static_cast<int>(failed * width / total);
  if (failed > 0 && fail_cells == 0) fail_cells = 1;  // one failure must show
  if (ok_cells + fail_cells > width) ok_cells = width - fail_cells;
  return std::string(static_cast<size_t>(ok_cells), '#') + std::string(static_cast<size_t>(fail_cells), 'x') +
         std::string(static_cast<size_t>(width - ok_cells - fail_cells), '.');
}

// "[#####x....] 12/40 applied, 1 failed, 3 in progress (2 offline)"
std::string progress(const json& n, int width = 30) {
  const int64_t total = count(n, "total"), applied = count(n, "applied") + count(n, "rolled_back");
  const int64_t failed = count(n, "failed") + count(n, "rollback_failed");
  std::ostringstream s;
  s << "[" << bar(applied, failed, total, width) << "] " << count(n, "applied") << "/" << total << " applied";
  if (failed) s << ", " << failed << " failed";
  if (const auto busy = count(n, "pending") + count(n, "in_progress")) s << ", " << busy << " in progress";
  if (count(n, "rolling_back")) s << ", " << count(n, "rolling_back") << " rolling back";
  if (count(n, "rolled_back")) s << ", " << count(n, "rolled_back") << " rolled back";
  if (count(n, "superseded")) s << ", " << count(n, "superseded") << " superseded";
  if (count(n, "skipped")) s << ", " << count(n, "skipped") << " skipped";
  if (count(n, "offline")) s << " (" << count(n, "offline") << " offline)";
  return s.str();
}

std::string campaign_line(const json& c) { return progress(c["counts"]) + "  " + str(c, "state"); }

// One line per wave; the current wave is marked.
std::vector<std::string> wave_lines(const json& c) {
  std::vector<std::string> out;
  if (!c.contains("waves")) return out;
  for (const auto& w : c["waves"]) {
    const std::string mark = str(w, "state") == "current" ? "> " : "  ";
    out.push_back(mark + pad(str(w, "name"), 9) + progress(w["counts"], 24));
  }
  return out;
}

void print_campaign(const json& c) {
  std::cout << "campaign  " << str(c, "id") << " (" << str(c, "name") << ")\n"
            << "bundle    " << str(c["bundle"], "name") << " v" << str(c["bundle"], "version") << " ["
            << str(c["bundle"], "id") << "]\n"
            << "selector  " << (str(c, "selector").empty() ? "(all devices)" : str(c, "selector")) << "\n"
            << "state     " << str(c, "state") << (str(c, "state_reason").empty() ? "" : " — " + str(c, "state_reason"))
            << "\n"
            << "progress  " << progress(c["counts"]) << "\n";
  for (const auto& l : wave_lines(c)) std::cout << "  " << l << "\n";
  // A federated campaign: each region's share, with its own campaign and the
  // time of its last answer (an unreachable region keeps its last counts).
  if (c.contains("regions") && c["regions"].is_array() && !c["regions"].empty()) {
    std::cout << "regions:\n";
    for (const auto& p : c["regions"]) {
      if (!p.is_object()) continue;
      std::cout << "  " << pad(str(p, "region"), 12) << pad(str(p, "state").empty() ? "-" : str(p, "state"), 12)
                << progress(p.value("counts", json::object()), 20) << "  " << str(p, "regional_campaign")
                << (p.value("reachable", true) ? "" : "  UNREACHABLE") << "  last answer " << str(p, "last_answer_at")
                << "\n";
    }
  }
  // Each cell's share, one line a cell (a hub with one cell has nothing to add).
  if (c.contains("cells") && c["cells"].is_array() && c["cells"].size() > 1) {
    std::cout << "cells:\n";
    for (const auto& p : c["cells"]) {
      if (!p.is_object()) continue;
      auto n = [&](const char* k) { return std::to_string(p.value(k, int64_t{0})); };
      std::cout << "  " << pad("cell " + n("cell"), 9) << pad("applied " + n("applied") + "/" + n("total"), 20)
                << pad("failed " + n("failed"), 12) << pad("pending " + n("pending"), 14) << "online " << n("online")
                << "\n";
    }
  }
  if (c.contains("failure_reasons") && !c["failure_reasons"].empty()) {
    std::cout << "failures:\n";
    for (const auto& [reason, n] : c["failure_reasons"].items()) std::cout << "  " << reason << ": " << n << "\n";
  }
  if (c.contains("first_failures") && !c["first_failures"].empty()) {
    std::cout << "first failures:\n";
    for (const auto& f : c["first_failures"]) {
      std::cout << "  " << pad(str(f, "device_id"), 24) << pad(str(f, "reason"), 22) << str(f, "message") << "\n";
    }
  }
  if (c.contains("away") && !c["away"].empty()) {
    std::cout << "still away (they converge when they return):";
    for (const auto& id : c["away"]) std::cout << " " << id.get<std::string>();
    std::cout << "\n";
  }
  if (c.contains("devices")) {
    std::cout << "\n" << pad("DEVICE", 24) << pad("WAVE", 6) << pad("STATUS", 16) << "REASON\n";
    for (const auto& d : c["devices"]) {
      std::cout << pad(str(d, "device_id"), 24) << pad(str(d, "wave"), 6) << pad(str(d, "status"), 16)
                << str(d, "reason");
      if (!str(d, "message").empty()) std::cout << " (" << str(d, "message") << ")";
      std::cout << "\n";
    }
  }
}

json yaml_to_json(const YAML::Node& n) {
  if (n.IsMap()) {
    json j = json::object();
    for (const auto& kv : n) j[kv.first.as<std::string>()] = yaml_to_json(kv.second);
    return j;
  }
  if (n.IsSequence()) {
    json j = json::array();
    for (const auto& v : n) j.push_back(yaml_to_json(v));
    return j;
  }
  if (n.IsNull()) return nullptr;
  // Scalars: numbers stay numbers (waves: [10, 50, 100]); the rest are strings.
  const std::string s = n.as<std::string>();
  if (n.Tag() != "!") {
    try {
      size_t used = 0;
      const long long i = std::stoll(s, &used);
      if (used == s.size()) return i;
      const double d = std::stod(s, &used);
      if (used == s.size()) return d;
    } catch (const std::exception&) {
    }
  }
  return s;
}

int campaign_create(int argc, char** argv) {
  Options o("flotilla campaign create",
            "Usage: flotilla campaign create --bundle ID|NAME:VERSION [--selector SEL] [strategy flags]\n"
            "       flotilla campaign create -f campaign.yaml\n\n"
            "Rolls the bundle out to the devices the label selector matches (Kubernetes syntax:\n"
            "env=prod,region in (eu,us),!legacy; empty = every device of your project): a canary\n"
            "first, then waves, each finishing and soaking before the next. Offline devices\n"
            "never hold a wave up; they converge when they return. When the share of failures\n"
            "reaches the threshold the campaign pauses, aborts, or rolls the devices that took\n"
            "the bundle back to what they ran before.\n\n"
            "The YAML file has the keys name, bundle, selector and strategy (canary, waves,\n"
            "max_in_flight, soak, device_deadline, failure_threshold {percent, min_sample, action});\n"
            "flags override it.",
            "FLOTILLA_");
  add_hub_flags(o);
  o.add("f", "campaign YAML file")
      .add("bundle", "bundle id, or name:version")
      .add("selector", "label selector")
      .add("name", "campaign name")
      .add("canary", "canary size: a device count (3) or a share (5%)")
      .add("waves", "cumulative percentages after the canary, e.g. 10,50,100")
      .add("max-in-flight", "online devices applying at once (0 = no limit)")
      .add("soak", "wait after each wave before the next, e.g. 5m")
      .add("device-deadline", "a device that has no outcome after this long counts as failed")
      .add("failure-threshold", "percent of failed outcomes that triggers the action")
      .add("min-sample", "outcomes needed before the threshold applies")
      .add("on-failure", "pause, abort or rollback");
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 0, 0); rc >= 0) return rc;
  json body = json::object();
  if (!o.get("f").empty()) {
    try {
      body = yaml_to_json(YAML::LoadFile(o.get("f")));
    } catch (const YAML::Exception& e) {
      return fail(o.get("f") + ": " + e.what(), 2);
    }
    if (!body.is_object()) return fail(o.get("f") + ": the top level must be a mapping", 2);
  }
  for (const char* k : {"bundle", "selector", "name"}) {
    if (!o.get(k).empty()) body[k] = o.get(k);
  }
  if (!body.contains("bundle")) return fail("--bundle (or bundle: in -f) is required", 2);
  json& st = body["strategy"];
  if (st.is_null()) st = json::object();
  const std::string canary = o.get("canary");
  if (!canary.empty()) {
    if (canary.back() == '%') st["canary"] = canary;
    else {
      try {
        st["canary"] = std::stoll(canary);
      } catch (const std::exception&) {
        return fail("--canary takes a count (3) or a percentage (5%)", 2);
      }
    }
  }
  if (!o.get("waves").empty()) {
    json waves = json::array();
    std::stringstream ss(o.get("waves"));
    std::string item;
    while (std::getline(ss, item, ',')) {
      try {
        waves.push_back(std::stod(item));
      } catch (const std::exception&) {
        return fail("--waves takes percentages like 10,50,100", 2);
      }
    }
    st["waves"] = waves;
  }
  if (!o.get("max-in-flight").empty()) {
    auto n = o.get_int("max-in-flight", 0, 10'000'000);
    if (!n) return fail(n.error().message, 2);
    st["max_in_flight"] = *n;
  }
  if (!o.get("soak").empty()) st["soak"] = o.get("soak");
  if (!o.get("device-deadline").empty()) st["device_deadline"] = o.get("device-deadline");
  json& th = st["failure_threshold"];
  if (th.is_null()) th = json::object();
  if (!o.get("failure-threshold").empty()) {
    try {
      th["percent"] = std::stod(o.get("failure-threshold"));
    } catch (const std::exception&) {
      return fail("--failure-threshold takes a percentage", 2);
    }
  }
  if (!o.get("min-sample").empty()) {
    auto n = o.get_int("min-sample", 1, 10'000'000);
    if (!n) return fail(n.error().message, 2);
    th["min_sample"] = *n;
  }
  if (!o.get("on-failure").empty()) th["action"] = o.get("on-failure");
  if (th.empty()) st.erase("failure_threshold");
  if (st.empty()) body.erase("strategy");

  auto c = Client::from(o);
  if (!c) return fail(c.error().message, 2);
  auto r = c->call("POST", "/v1/campaigns", body.dump());
  if (!r) return fail(r.error().message);
  if (!print_structured(o, *r)) {
    std::cout << "created campaign " << str(*r, "id") << " for " << (*r)["counts"]["total"] << " device(s) in "
              << (*r)["waves"].size() << " wave(s)\n"
              << "follow it with: flotilla campaign watch " << str(*r, "id") << "\n";
  }
  return 0;
}

int campaign_status(const std::string& verb, int argc, char** argv) {
  const bool watch_default = verb == "watch";
  Options o("flotilla campaign " + verb,
            "Usage: flotilla campaign " + verb +
                " ID [--devices] [--wait | --watch] [--timeout 30m]\n\n"
                "Shows progress per wave, the failure reasons and the first failures with device and\n"
                "reason. --wait refreshes the status block (worst state first, counts per state, first\n"
                "failures) until the campaign stops running; 'watch' (or --watch) follows the per-wave\n"
                "progress bars instead. Both exit 0 when every device applied the bundle, 1 otherwise.",
            "FLOTILLA_");
  add_hub_flags(o);
  o.add_switch("watch", "follow per-wave progress bars until the campaign finishes")
      .add_switch("wait", "refresh the status block until the campaign finishes")
      .add_switch("devices", "list every device's status")
      .add("timeout", "with --wait/--watch: give up after this long", "30m")
      .add("interval", "with --wait/--watch: poll interval", "500ms");
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 1, 1); rc >= 0) return rc;
  auto c = Client::from(o);
  if (!c) return fail(c.error().message, 2);
  const std::string path = "/v1/campaigns/" + pos[0] + (o.get_bool("devices") ? "?devices=true" : "");
  auto timeout = parse_duration(o.get("timeout"));
  auto interval = parse_duration(o.get("interval"));
  if (!timeout || !interval) return fail("bad --timeout or --interval", 2);
  if (o.get_bool("wait")) {
    const bool structured = o.get("o") == "json" || o.get("o") == "yaml";
    auto done = wait_for_campaigns(*c, {pos[0]}, WaitOptions{*timeout, *interval, structured});
    if (!done) return fail("campaign " + pos[0] + ": " + done.error().message);
    print_structured(o, done->front());
    return campaign_clean(done->front()) ? 0 : 1;
  }
  if (!watch_default && !o.get_bool("watch")) {
    auto r = c->call("GET", path);
    if (!r) return fail(r.error().message);
    if (!print_structured(o, *r)) print_campaign(*r);
    return 0;
  }
  // json: one line per change, as it comes (scripts follow it); yaml: the
  // last state once it settles.
  const bool structured = o.get("o") == "json" || o.get("o") == "yaml";
  const bool tty = ::isatty(STDOUT_FILENO) && !structured;
  const auto deadline = std::chrono::steady_clock::now() + *timeout;
  std::string last;
  size_t drawn = 0;
  for (;;) {
    auto r = c->call("GET", path);
    if (!r) return fail(r.error().message);
    const std::string line = campaign_line(*r);
    if (structured) {
      if (line != last && o.get("o") == "json") std::cout << r->dump() << std::endl;
    } else if (tty) {
      // Redraw the block in place: overall line plus one bar per wave.
      std::vector<std::string> lines = {line};
      for (const auto& l : wave_lines(*r)) lines.push_back(l);
      if (drawn) std::cout << "\033[" << drawn << "A";
      for (const auto& l : lines) std::cout << "\r\033[K" << l << "\n";
      std::cout << std::flush;
      drawn = lines.size();
    } else if (line != last) {
      std::cout << line << std::endl;
    }
    last = line;
    // converging = every online device answered; the rest are away and will
    // converge when they return, so there is nothing left to watch.
    const std::string state = str(*r, "state");
    if (state != "running" && state != "rolling_back") {
      if (!structured) print_campaign(*r);
      else if (o.get("o") == "yaml") print_structured(o, *r);
      const auto& n = (*r)["counts"];
      const bool clean = (state == "completed" || state == "converging") && count(n, "failed") == 0 &&
                         count(n, "rollback_failed") == 0;
      return clean ? 0 : 1;
    }
    if (std::chrono::steady_clock::now() >= deadline) {
      return fail("campaign " + pos[0] + " still running after " + o.get("timeout"));
    }
    std::this_thread::sleep_for(*interval);
  }
}

int campaign_list(int argc, char** argv) {
  Options o("flotilla campaign list", "Usage: flotilla campaign list [-o table|wide|json|yaml]", "FLOTILLA_");
  add_hub_flags(o);
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 0, 0); rc >= 0) return rc;
  auto c = Client::from(o);
  if (!c) return fail(c.error().message, 2);
  auto r = c->call("GET", "/v1/campaigns");
  if (!r) return fail(r.error().message);
  if (print_structured(o, *r)) return 0;
  const bool w = wide(o);
  std::vector<std::string> header{"ID", "NAME", "BUNDLE", "STATE", "PROGRESS"};
  if (w) header.insert(header.end(), {"PROJECT", "SELECTOR", "WAVE", "CREATED", "REASON"});
  // A federation's answer: which region each campaign runs in ("*" for a
  // federated campaign across regions).
  const bool federation = r->contains("regions");
  if (federation) header.insert(header.begin() + 1, "REGION");
  Table t(header);
  for (const auto& x : (*r)["items"]) {
    std::vector<std::string> row{str(x, "id"), str(x, "name"), str(x["bundle"], "name") + " v" + str(x["bundle"], "version"),
                                 str(x, "state"), progress(x["counts"])};
    if (federation) {
      row.insert(row.begin() + 1, str(x, "kind") == "federation" ? "*" : str(x, "region") + (x.value("stale", false) ? " (stale)" : ""));
    }
    if (w) {
      std::string wave;
      for (const auto& wv : x.value("waves", json::array())) {
        if (str(wv, "state") == "current") wave = str(wv, "name");
      }
      row.insert(row.end(), {str(x, "project"), str(x, "selector").empty() ? "(all)" : str(x, "selector"),
                             wave.empty() ? "-" : wave, str(x, "created_at"),
                             str(x, "state_reason").empty() ? "-" : str(x, "state_reason")});
    }
    t.add(row);
  }
  t.print(std::cout);
  warn_regions(*r);
  return 0;
}

int campaign_action(const std::string& verb, int argc, char** argv) {
  static const std::map<std::string, std::string> what = {
      {"pause", "Stops releasing devices; those already applying finish."},
      {"resume", "Carries on; failures so far are accepted and the threshold judges what comes next."},
      {"abort", "Stops for good: devices not yet released are skipped; nothing is undone."},
      {"rollback", "Returns every device that took the bundle to the bundle it ran before."},
      {"approve", "Lets the wave waiting at an approval gate start."}};
  Options o("flotilla campaign " + verb, "Usage: flotilla campaign " + verb + " ID\n\n" + what.at(verb), "FLOTILLA_");
  add_hub_flags(o);
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 1, 1); rc >= 0) return rc;
  auto c = Client::from(o);
  if (!c) return fail(c.error().message, 2);
  auto r = c->call("POST", "/v1/campaigns/" + pos[0] + "/" + verb);
  if (!r) return fail(r.error().message);
  if (!print_structured(o, *r)) std::cout << "campaign " << pos[0] << " is now " << str(*r, "state") << "\n";
  return 0;
}

}  // namespace

int cmd_campaign(int argc, char** argv) {
  const std::string sub = argc > 1 ? argv[1] : "";
  if (sub == "create") return campaign_create(argc, argv);
  if (sub == "status" || sub == "get" || sub == "watch") return campaign_status(sub, argc, argv);
  if (sub == "list") return campaign_list(argc, argv);
  if (sub == "pause" || sub == "resume" || sub == "abort" || sub == "rollback" || sub == "approve") {
    return campaign_action(sub, argc, argv);
  }
  if (sub == "--help" || sub == "-h" || sub == "help") {
    std::cout << "Usage: flotilla campaign VERB ...\n\n"
                 "  create          roll a bundle out to the devices a selector matches\n"
                 "  list            all campaigns (-o wide: project, selector, wave, reason)\n"
                 "  get ID          one campaign: progress per wave, failures (same as status)\n"
                 "  status ID       the same; --wait: the status block until it settles; --watch: bars\n"
                 "  watch ID        follow per-wave progress bars live\n"
                 "  pause ID        stop releasing devices\n"
                 "  resume ID       carry on after a pause\n"
                 "  abort ID        stop for good; devices not yet released are skipped\n"
                 "  rollback ID     return the devices that took the bundle to what they ran\n"
                 "  approve ID      let the wave waiting at an approval gate start\n\n"
                 "Run 'flotilla campaign VERB --help' for the options of each.\n";
    return 0;
  }
  return fail("usage: flotilla campaign create|list|get|status|watch|pause|resume|abort|rollback|approve ... "
              "(--help for each)", 2);
}

}  // namespace flotilla::cli
