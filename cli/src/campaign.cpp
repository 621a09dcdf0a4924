// flotilla campaign ...: create, follow and steer rollouts.
#include <unistd.h>

#include <iostream>
#include <sstream>
#include <thread>

#include "cli.hpp"
#include "client.hpp"
#include "flotilla/common/options.hpp"

namespace flotilla::cli {

using nlohmann::json;

namespace {

std::string bar(int64_t done, int64_t failed, int64_t total, int width = 30) {
  if (total <= 0) return std::string(width, ' ');
  int ok_cells = static_cast<int>(done * width / total);
  int fail_cells = static_cast<int>(failed * width / total);
  if (ok_cells + fail_cells > width) fail_cells = width - ok_cells;
  return std::string(ok_cells, '#') + std::string(fail_cells, 'x') + std::string(width - ok_cells - fail_cells, '.');
}

std::string campaign_line(const json& c) {
  const auto& n = c["counts"];
  const int64_t total = n["total"], applied = n["applied"], failed = n["failed"];
  std::ostringstream s;
  s << "[" << bar(applied, failed, total) << "] " << applied << "/" << total << " applied";
  if (failed) s << ", " << failed << " failed";
  if (n["in_progress"].get<int64_t>()) s << ", " << n["in_progress"].get<int64_t>() << " in progress";
  if (n["pending"].get<int64_t>()) s << ", " << n["pending"].get<int64_t>() << " pending";
  if (n.value("superseded", int64_t{0})) s << ", " << n["superseded"].get<int64_t>() << " superseded";
  if (n["offline"].get<int64_t>()) s << " (" << n["offline"].get<int64_t>() << " offline)";
  s << "  " << c["state"].get<std::string>();
  return s.str();
}

void print_campaign(const json& c) {
  std::cout << "campaign  " << str(c, "id") << " (" << str(c, "name") << ")\n"
            << "bundle    " << str(c["bundle"], "name") << " v" << str(c["bundle"], "version") << " ["
            << str(c["bundle"], "id") << "]\n"
            << "selector  " << (str(c, "selector").empty() ? "(all devices)" : str(c, "selector")) << "\n"
            << "state     " << str(c, "state") << "\n"
            << "progress  " << campaign_line(c) << "\n";
  if (c.contains("failure_reasons") && !c["failure_reasons"].empty()) {
    std::cout << "failures:\n";
    for (const auto& [reason, count] : c["failure_reasons"].items()) std::cout << "  " << reason << ": " << count << "\n";
  }
  if (c.contains("devices")) {
    std::cout << "\n" << pad("DEVICE", 24) << pad("STATUS", 12) << "REASON\n";
    for (const auto& d : c["devices"]) {
      std::cout << pad(str(d, "device_id"), 24) << pad(str(d, "status"), 12) << str(d, "reason");
      if (!str(d, "message").empty()) std::cout << " (" << str(d, "message") << ")";
      std::cout << "\n";
    }
  }
}

int campaign_create(int argc, char** argv) {
  Options o("flotilla campaign create",
            "Usage: flotilla campaign create --bundle ID|NAME:VERSION [--selector SEL] [--name NAME]\n\n"
            "Assigns the bundle to every enrolled device the label selector matches\n"
            "(Kubernetes syntax: env=prod,region in (eu,us),!legacy). Empty = all devices.",
            "FLOTILLA_");
  add_hub_flags(o);
  o.add("bundle", "bundle id, or name:version").add("selector", "label selector").add("name", "campaign name");
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 0, 0); rc >= 0) return rc;
  if (o.get("bundle").empty()) return fail("--bundle is required", 2);
  auto c = Client::from(o);
  if (!c) return fail(c.error().message, 2);
  json body{{"bundle", o.get("bundle")}, {"selector", o.get("selector")}, {"name", o.get("name")}};
  auto r = c->call("POST", "/v1/campaigns", body.dump());
  if (!r) return fail(r.error().message);
  if (o.get("o") == "json") {
    std::cout << r->dump(2) << "\n";
  } else {
    std::cout << "created campaign " << str(*r, "id") << " for " << (*r)["counts"]["total"] << " device(s)\n"
              << "follow it with: flotilla campaign status " << str(*r, "id") << " --watch\n";
  }
  return 0;
}

int campaign_status(int argc, char** argv) {
  Options o("flotilla campaign status",
            "Usage: flotilla campaign status ID [--watch] [--devices] [--timeout 10m]\n\n"
            "With --watch, shows live progress until the campaign finishes; exits 0 when\n"
            "every device applied the bundle, 1 if some failed or the timeout passed.",
            "FLOTILLA_");
  add_hub_flags(o);
  o.add_switch("watch", "follow progress until the campaign finishes")
      .add_switch("devices", "list every device's status")
      .add("timeout", "with --watch: give up after this long", "30m")
      .add("interval", "with --watch: poll interval", "500ms");
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 1, 1); rc >= 0) return rc;
  auto c = Client::from(o);
  if (!c) return fail(c.error().message, 2);
  const std::string path = "/v1/campaigns/" + pos[0] + (o.get_bool("devices") ? "?devices=true" : "");
  if (!o.get_bool("watch")) {
    auto r = c->call("GET", path);
    if (!r) return fail(r.error().message);
    if (o.get("o") == "json") std::cout << r->dump(2) << "\n";
    else print_campaign(*r);
    return 0;
  }
  auto timeout = parse_duration(o.get("timeout"));
  auto interval = parse_duration(o.get("interval"));
  if (!timeout || !interval) return fail("bad --timeout or --interval", 2);
  const bool tty = ::isatty(STDOUT_FILENO) && o.get("o") != "json";
  const auto deadline = std::chrono::steady_clock::now() + *timeout;
  std::string last;
  for (;;) {
    auto r = c->call("GET", path);
    if (!r) return fail(r.error().message);
    const std::string line = campaign_line(*r);
    if (o.get("o") == "json") {
      if (line != last) std::cout << r->dump() << std::endl;
    } else if (tty) {
      std::cout << "\r\033[K" << line << std::flush;
    } else if (line != last) {
      std::cout << line << std::endl;
    }
    last = line;
    if ((*r)["state"] != "running") {
      if (tty) std::cout << "\n";
      if (o.get("o") != "json") print_campaign(*r);
      return (*r)["counts"]["failed"].get<int64_t>() == 0 ? 0 : 1;
    }
    if (std::chrono::steady_clock::now() >= deadline) {
      if (tty) std::cout << "\n";
      return fail("campaign " + pos[0] + " still running after " + o.get("timeout"));
    }
    std::this_thread::sleep_for(*interval);
  }
}

int campaign_list(int argc, char** argv) {
  Options o("flotilla campaign list", "Usage: flotilla campaign list", "FLOTILLA_");
  add_hub_flags(o);
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 0, 0); rc >= 0) return rc;
  auto c = Client::from(o);
  if (!c) return fail(c.error().message, 2);
  auto r = c->call("GET", "/v1/campaigns");
  if (!r) return fail(r.error().message);
  if (o.get("o") == "json") {
    std::cout << r->dump(2) << "\n";
    return 0;
  }
  std::cout << pad("ID", 16) << pad("NAME", 24) << pad("BUNDLE", 20) << "PROGRESS\n";
  for (const auto& x : (*r)["items"]) {
    std::cout << pad(str(x, "id"), 16) << pad(str(x, "name"), 24)
              << pad(str(x["bundle"], "name") + " v" + str(x["bundle"], "version"), 20) << campaign_line(x) << "\n";
  }
  return 0;
}

}  // namespace

int cmd_campaign(int argc, char** argv) {
  const std::string sub = argc > 1 ? argv[1] : "";
  if (sub == "create") return campaign_create(argc, argv);
  if (sub == "status") return campaign_status(argc, argv);
  if (sub == "list") return campaign_list(argc, argv);
  return fail("usage: flotilla campaign create|status|list ... (--help for each)", 2);
}

}  // namespace flotilla::cli
