// Commands that talk to the hub's REST API.
#include <unistd.h>

#include <iomanip>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "cli.hpp"
#include "client.hpp"
#include "flotilla/common/fs.hpp"
#include "flotilla/common/http_client.hpp"
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

int device_list(int argc, char** argv) {
  Options o("flotilla device list", "Usage: flotilla device list [--selector SEL] [--limit N]", "FLOTILLA_");
  add_hub_flags(o);
  o.add("selector", "label selector").add("limit", "page size", "500");
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 0, 0); rc >= 0) return rc;
  auto c = Client::from(o);
  if (!c) return fail(c.error().message, 2);
  std::string path = "/v1/devices?limit=" + o.get("limit");
  if (!o.get("selector").empty()) {
    std::string enc;
    for (unsigned char ch : o.get("selector")) {
      if (std::isalnum(ch) || ch == '-' || ch == '_' || ch == '.') enc.push_back(static_cast<char>(ch));
      else {
        char buf[4];
        std::snprintf(buf, sizeof buf, "%%%02X", ch);
        enc += buf;
      }
    }
    path += "&selector=" + enc;
  }
  auto r = c->call("GET", path);
  if (!r) return fail(r.error().message);
  if (o.get("o") == "json") {
    std::cout << r->dump(2) << "\n";
    return 0;
  }
  std::cout << pad("ID", 24) << pad("ONLINE", 8) << pad("STATE", 14) << pad("BUNDLE", 20) << pad("K3S", 16)
            << "LABELS\n";
  for (const auto& d : (*r)["items"]) {
    std::string labels;
    for (const auto& [k, v] : d["labels"].items()) labels += (labels.empty() ? "" : ",") + k + "=" + v.get<std::string>();
    std::string bundle = str(d, "applied_bundle").empty() ? "-" : str(d, "applied_bundle") + " v" + str(d, "applied_version");
    std::cout << pad(str(d, "id"), 24) << pad(d["online"].get<bool>() ? "yes" : "no", 8) << pad(str(d, "state"), 14)
              << pad(bundle, 20) << pad(str(d, "k3s_version").empty() ? "-" : str(d, "k3s_version"), 16) << labels
              << "\n";
  }
  if (!str(*r, "next").empty()) std::cout << "(more: --limit, or the REST API's after=" << str(*r, "next") << ")\n";
  return 0;
}

int device_get(int argc, char** argv) {
  Options o("flotilla device get", "Usage: flotilla device get ID", "FLOTILLA_");
  add_hub_flags(o);
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 1, 1); rc >= 0) return rc;
  auto c = Client::from(o);
  if (!c) return fail(c.error().message, 2);
  auto r = c->call("GET", "/v1/devices/" + pos[0]);
  if (!r) return fail(r.error().message);
  if (o.get("o") == "json") {
    std::cout << r->dump(2) << "\n";
    return 0;
  }
  for (const auto& [k, v] : r->items()) std::cout << pad(k, 16) << (v.is_string() ? v.get<std::string>() : v.dump()) << "\n";
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

int cmd_device(int argc, char** argv) {
  const std::string sub = argc > 1 ? argv[1] : "";
  if (sub == "list") return device_list(argc, argv);
  if (sub == "get") return device_get(argc, argv);
  return fail("usage: flotilla device list|get ... (--help for each)", 2);
}

int cmd_enrollment_token(int argc, char** argv) {
  const std::string sub = argc > 1 ? argv[1] : "";
  if (sub != "create") return fail("usage: flotilla enrollment-token create [--label k=v] [--ttl 24h] [--max-uses N]", 2);
  Options o("flotilla enrollment-token create",
            "Usage: flotilla enrollment-token create [--label k=v ...] [--ttl 24h] [--max-uses N]\n\n"
            "Makes a fleet enrollment token. Devices enrolling with it get its labels.\n"
            "The token is shown once; the hub keeps only its hash.",
            "FLOTILLA_");
  add_hub_flags(o);
  o.add_list("label", "label given to devices that enroll with this token")
      .add("ttl", "how long the token is valid", "24h")
      .add("max-uses", "how many devices may use it (0 = unlimited)", "0")
      .add("name", "a note saying what the token is for");
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 0, 0); rc >= 0) return rc;
  auto labels = o.get_map("label");
  if (!labels) return fail(labels.error().message, 2);
  auto max_uses = o.get_int("max-uses", 0, 1'000'000'000);
  if (!max_uses) return fail(max_uses.error().message, 2);
  auto c = Client::from(o);
  if (!c) return fail(c.error().message, 2);
  json body{{"labels", *labels}, {"ttl", o.get("ttl")}, {"max_uses", *max_uses}, {"name", o.get("name")}};
  auto r = c->call("POST", "/v1/enrollment-tokens", body.dump());
  if (!r) return fail(r.error().message);
  if (o.get("o") == "json") {
    std::cout << r->dump(2) << "\n";
  } else {
    std::cout << str(*r, "token") << "\n";
    std::cerr << "enrollment token " << str(*r, "id") << ", expires " << str(*r, "expires_at")
              << " (shown once; store it now)\n";
  }
  return 0;
}

}  // namespace flotilla::cli
