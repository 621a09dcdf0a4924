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
