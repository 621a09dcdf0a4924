// Commands that talk to the hub's REST API: devices, API tokens, enrollment
// tokens and the audit log.
#include <unistd.h>

#include <iomanip>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "cli.hpp"
#include "client.hpp"
#include "output.hpp"
#include "flotilla/common/encoding.hpp"
#include "flotilla/common/fs.hpp"
#include "flotilla/common/http_client.hpp"
#include "flotilla/common/options.hpp"

namespace flotilla::cli {

using nlohmann::json;

namespace {

std::string labels_text(const json& labels) {
  std::string out;
  for (const auto& [k, v] : labels.items()) out += (out.empty() ? "" : ",") + k + "=" + v.get<std::string>();
  return out.empty() ? "-" : out;
}

std::string or_dash(const std::string& s) { return s.empty() ? "-" : s; }

// Prints the answer as JSON or YAML for scripts; returns true if it did.
bool print_json(const Options& o, const json& j) { return print_structured(o, j); }

// ---- device -------------------------------------------------------------------

int device_list(int argc, char** argv) {
  Options o("flotilla device list",
            "Usage: flotilla device list [--selector SEL] [--limit N] [--after ID] [--all]\n\n"
            "Lists devices ordered by id. Decommissioned devices are left out unless --all.",
            "FLOTILLA_");
  add_hub_flags(o);
  o.add("selector", "label selector, e.g. 'env=prod,region in (eu,us)'")
      .add("cert-expires-before", "only devices whose k3s certificates expire before this time (RFC 3339 or unix "
                                  "seconds)")
      .add("limit", "page size", "500")
      .add("after", "start after this device id (the previous page's last)")
      .add_switch("all", "include decommissioned devices");
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 0, 0); rc >= 0) return rc;
  auto c = Client::from(o);
  if (!c) return fail(c.error().message, 2);
  std::string path = "/v1/devices?limit=" + url_encode(o.get("limit"));
  if (!o.get("selector").empty()) path += "&selector=" + url_encode(o.get("selector"));
  if (!o.get("after").empty()) path += "&after=" + url_encode(o.get("after"));
  if (!o.get("cert-expires-before").empty()) path += "&certExpiresBefore=" + url_encode(o.get("cert-expires-before"));
  if (o.get_bool("all")) path += "&include_decommissioned=true";
  auto r = c->call("GET", path);
  if (!r) return fail(r.error().message);
  if (print_json(o, *r)) return 0;
  const bool w = wide(o);
  std::vector<std::string> header{"ID", "PROJECT", "ONLINE", "STATE", "BUNDLE", "K3S", "LABELS"};
  if (w) {
    header.insert(header.end(), {"ARCH", "AGENT", "HOSTNAME", "LAST SEEN", "CAMPAIGN", "LAST REASON", "ROLE", "CLUSTER",
                                 "CERT EXPIRES", "OS", "DISK FREE"});
  }
  Table t(header);
  for (const auto& d : (*r)["items"]) {
    std::string bundle = str(d, "applied_bundle").empty() ? "-" : str(d, "applied_bundle") + " v" + str(d, "applied_version");
    std::vector<std::string> row{str(d, "id"), str(d, "project"), d.value("online", false) ? "yes" : "no",
                                 str(d, "state"), bundle, or_dash(str(d, "k3s_version")), labels_text(d["labels"])};
    if (w) {
      for (const char* k : {"arch", "agent_version", "hostname", "last_seen_at", "campaign_id", "last_reason", "k3s_role",
                            "cluster_id", "k3s_cert_expires_at", "os"}) {
        row.push_back(or_dash(str(d, k)));
      }
      // "free of total" of the filesystem holding k3s's data dir.
      const uint64_t free_b = d.value("disk_free_bytes", uint64_t{0});
      const uint64_t total_b = d.value("disk_total_bytes", uint64_t{0});
      row.push_back(!free_b ? "-"
                    : total_b ? std::to_string(free_b >> 20) + "/" + std::to_string(total_b >> 20) + " MiB"
                              : std::to_string(free_b >> 20) + " MiB");
    }
    t.add(row);
  }
  t.print(std::cout);
  if (!str(*r, "next").empty()) std::cout << "(more: --after " << str(*r, "next") << ")\n";
  warn_regions(*r);
  return 0;
}

void print_device(const json& d) {
  for (const auto& [k, v] : d.items()) {
    std::cout << pad(k, 16) << (k == "labels" ? labels_text(v) : v.is_string() ? v.get<std::string>() : v.dump())
              << "\n";
  }
}

int device_get(int argc, char** argv) {
  Options o("flotilla device get", "Usage: flotilla device get ID", "FLOTILLA_");
  add_hub_flags(o);
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 1, 1); rc >= 0) return rc;
  auto c = Client::from(o);
  if (!c) return fail(c.error().message, 2);
  auto r = c->call("GET", "/v1/devices/" + url_encode(pos[0]));
  if (!r) return fail(r.error().message);
  if (!print_json(o, *r)) print_device(*r);
  return 0;
}

int device_label(int argc, char** argv) {
  Options o("flotilla device label",
            "Usage: flotilla device label ID KEY=VALUE... KEY-...\n\n"
            "Sets labels (KEY=VALUE) and removes them (KEY-) in one change; other labels stay.\n"
            "Example: flotilla device label d-1234 tier=edge legacy-",
            "FLOTILLA_");
  add_hub_flags(o);
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 2, 1000); rc >= 0) return rc;
  json labels = json::object();
  for (size_t i = 1; i < pos.size(); ++i) {
    const std::string& a = pos[i];
    const auto eq = a.find('=');
    if (eq != std::string::npos && eq > 0) {
      labels[a.substr(0, eq)] = a.substr(eq + 1);
    } else if (eq == std::string::npos && a.size() > 1 && a.back() == '-') {
      labels[a.substr(0, a.size() - 1)] = nullptr;
    } else {
      return fail("bad label change '" + a + "': use KEY=VALUE to set or KEY- to remove", 2);
    }
  }
  auto c = Client::from(o);
  if (!c) return fail(c.error().message, 2);
  auto r = c->call("PATCH", "/v1/devices/" + url_encode(pos[0]), json{{"labels", labels}}.dump());
  if (!r) return fail(r.error().message);
  if (!print_json(o, *r)) std::cout << str(*r, "id") << " labels: " << labels_text((*r)["labels"]) << "\n";
  return 0;
}

int device_decommission(int argc, char** argv) {
  Options o("flotilla device decommission",
            "Usage: flotilla device decommission ID --yes\n\n"
            "Removes the device's broker credential (it cannot connect again), clears its desired\n"
            "state and marks it decommissioned. Its key can never enroll again.",
            "FLOTILLA_");
  add_hub_flags(o);
  o.add_switch("yes", "confirm: this cannot be undone").flag_only("yes");
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 1, 1); rc >= 0) return rc;
  if (!o.get_bool("yes")) return fail("decommissioning cannot be undone; add --yes to confirm", 2);
  auto c = Client::from(o);
  if (!c) return fail(c.error().message, 2);
  auto r = c->call("DELETE", "/v1/devices/" + url_encode(pos[0]));
  if (!r) return fail(r.error().message);
  if (!print_json(o, *r)) std::cout << "decommissioned " << str(*r, "id") << "\n";
  return 0;
}

// ---- tokens ---------------------------------------------------------------------

int token_create(int argc, char** argv) {
  Options o("flotilla token create",
            "Usage: flotilla token create NAME --role viewer|operator|admin [--project P] [--ttl 90d]\n\n"
            "Makes an API token (admin only). The secret is printed once on stdout; the hub keeps\n"
            "only its hash. Without --project it is for your own token's project.",
            "FLOTILLA_");
  add_hub_flags(o);
  o.add("role", "viewer (read), operator (change the fleet) or admin (also tokens and audit)")
      .add("project", "project the token is for; '*' = all (only a '*' admin may grant it)")
      .add("ttl", "how long it is valid (e.g. 90d); empty = no expiry");
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 1, 1); rc >= 0) return rc;
  if (o.get("role").empty()) return fail("--role is required (viewer, operator or admin)", 2);
  json body{{"name", pos[0]}, {"role", o.get("role")}};
  if (!o.get("project").empty()) body["project"] = o.get("project");
  if (!o.get("ttl").empty()) body["ttl"] = o.get("ttl");
  auto c = Client::from(o);
  if (!c) return fail(c.error().message, 2);
  auto r = c->call("POST", "/v1/tokens", body.dump());
  if (!r) return fail(r.error().message);
  if (print_json(o, *r)) return 0;
  std::cout << str(*r, "token") << "\n";
  std::cerr << "API token " << str(*r, "id") << " role=" << str(*r, "role") << " project=" << str(*r, "project")
            << " expires=" << or_dash(str(*r, "expires_at")) << " (shown once; store it now)\n";
  return 0;
}

int token_list(const char* what, const char* path, int argc, char** argv) {
  Options o(std::string("flotilla ") + what + " list", std::string("Usage: flotilla ") + what + " list", "FLOTILLA_");
  add_hub_flags(o);
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 0, 0); rc >= 0) return rc;
  auto c = Client::from(o);
  if (!c) return fail(c.error().message, 2);
  auto r = c->call("GET", path);
  if (!r) return fail(r.error().message);
  if (print_json(o, *r)) return 0;
  const bool api = std::string(path) == "/v1/tokens";
  std::vector<std::string> header{"ID", "NAME", api ? "ROLE" : "USES", "PROJECT", "EXPIRES", "STATUS"};
  if (!api) header.push_back("LABELS");
  if (wide(o)) header.push_back("CREATED");
  Table table(header);
  for (const auto& t : (*r)["items"]) {
    std::string uses = str(t, "uses") + "/" + (t.value("max_uses", 0) == 0 ? std::string("unlimited") : str(t, "max_uses"));
    std::vector<std::string> row{str(t, "id"), or_dash(str(t, "name")), api ? str(t, "role") : uses, str(t, "project"),
                                 str(t, "expires_at").empty() ? "never" : str(t, "expires_at"),
                                 t.value("revoked", false) ? "revoked" : "active"};
    if (!api) row.push_back(labels_text(t["labels"]));
    if (wide(o)) row.push_back(or_dash(str(t, "created_at")));
    table.add(row);
  }
  table.print(std::cout);
  return 0;
}

int token_revoke(const char* what, const std::string& path, int argc, char** argv) {
  Options o(std::string("flotilla ") + what + " revoke",
            std::string("Usage: flotilla ") + what + " revoke ID\n\nRevokes at once; the hub refuses it from the next request on.",
            "FLOTILLA_");
  add_hub_flags(o);
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 1, 1); rc >= 0) return rc;
  auto c = Client::from(o);
  if (!c) return fail(c.error().message, 2);
  auto r = c->call("DELETE", path + url_encode(pos[0]));
  if (!r) return fail(r.error().message);
  if (!print_json(o, *r)) std::cout << "revoked " << str(*r, "id") << "\n";
  return 0;
}

int enrollment_token_create(int argc, char** argv) {
  Options o("flotilla enrollment-token create",
            "Usage: flotilla enrollment-token create [--label k=v ...] [--device-label-key K ...] [--ttl 24h]\n"
            "                                        [--max-uses N | --unlimited-uses] [--project P]\n\n"
            "Makes a fleet enrollment token. Devices enrolling with it get its labels and project;\n"
            "a device may set only the label keys given with --device-label-key.\n"
            "The token is shown once; the hub keeps only its hash.",
            "FLOTILLA_");
  add_hub_flags(o);
  o.add_list("label", "label given to devices that enroll with this token")
      .add_list("device-label-key", "a label key devices may set themselves (any other device label is refused)")
      .add("ttl", "how long the token is valid (at most 366d)", "24h")
      .add("max-uses", "how many devices may use it", "1")
      .add_switch("unlimited-uses", "no limit on uses (instead of --max-uses)")
      .add("project", "project of the devices (default: your token's project)")
      .add("name", "a note saying what the token is for");
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 0, 0); rc >= 0) return rc;
  auto labels = o.get_map("label");
  if (!labels) return fail(labels.error().message, 2);
  auto max_uses = o.get_int("max-uses", 1, 1'000'000'000);
  if (!max_uses) return fail(max_uses.error().message, 2);
  auto c = Client::from(o);
  if (!c) return fail(c.error().message, 2);
  json body{{"labels", *labels}, {"ttl", o.get("ttl")}, {"name", o.get("name")},
            {"device_label_keys", o.get_list("device-label-key")}};
  if (o.get_bool("unlimited-uses")) {
    body["unlimited_uses"] = true;
  } else {
    body["max_uses"] = *max_uses;
  }
  if (!o.get("project").empty()) body["project"] = o.get("project");
  auto r = c->call("POST", "/v1/enrollment-tokens", body.dump());
  if (!r) return fail(r.error().message);
  if (print_json(o, *r)) return 0;
  std::cout << str(*r, "token") << "\n";
  std::cerr << "enrollment token " << str(*r, "id") << " project=" << str(*r, "project") << ", expires "
            << str(*r, "expires_at") << " (shown once; store it now)\n";
  return 0;
}

}  // namespace

int cmd_device(int argc, char** argv) {
  const std::string sub = argc > 1 ? argv[1] : "";
  if (sub == "list") return device_list(argc, argv);
  if (sub == "get") return device_get(argc, argv);
  if (sub == "label") return device_label(argc, argv);
  if (sub == "decommission") return device_decommission(argc, argv);
  return fail("usage: flotilla device list|get|label|decommission ... (--help for each)", 2);
}

int cmd_enrollment_token(int argc, char** argv) {
  const std::string sub = argc > 1 ? argv[1] : "";
  if (sub == "create") return enrollment_token_create(argc, argv);
  if (sub == "list") return token_list("enrollment-token", "/v1/enrollment-tokens", argc, argv);
  if (sub == "revoke") return token_revoke("enrollment-token", "/v1/enrollment-tokens/", argc, argv);
  return fail("usage: flotilla enrollment-token create|list|revoke ... (--help for each)", 2);
}

int cmd_token(int argc, char** argv) {
  const std::string sub = argc > 1 ? argv[1] : "";
  if (sub == "create") return token_create(argc, argv);
  if (sub == "list") return token_list("token", "/v1/tokens", argc, argv);
  if (sub == "revoke") return token_revoke("token", "/v1/tokens/", argc, argv);
  return fail("usage: flotilla token create|list|revoke ... (API tokens; admin only; --help for each)", 2);
}

int cmd_audit(int argc, char** argv) {
  Options o("flotilla audit",
            "Usage: flotilla audit [--after ID] [--limit N]\n\n"
            "The hub's audit log (admin only), oldest first: every mutating call with who, what and\n"
            "the HTTP status. Page with --after (the last id shown).",
            "FLOTILLA_");
  add_hub_flags(o);
  o.add("after", "show entries after this id", "0").add("limit", "entries per page (1..1000)", "100");
  // The command has no subcommand: its options start at argv[1].
  auto parsed = o.parse(argc, argv, 1);
  if (!parsed) return fail(parsed.error().message, 2);
  if (o.help_requested()) {
    std::cout << o.help();
    return 0;
  }
  if (!parsed->empty()) {
    std::cerr << o.help();
    return 2;
  }
  if (auto s = check_output(o); !s) return fail(s.error().message, 2);
  auto c = Client::from(o);
  if (!c) return fail(c.error().message, 2);
  auto r = c->call("GET", "/v1/audit?after=" + url_encode(o.get("after")) + "&limit=" + url_encode(o.get("limit")));
  if (!r) return fail(r.error().message);
  if (print_json(o, *r)) return 0;
  std::vector<std::string> header{"ID", "TIME", "WHO", "STATUS", "CALL", "DETAIL"};
  if (wide(o)) header.insert(header.end(), {"ROLE", "PROJECT", "PEER"});
  Table t(header);
  for (const auto& a : (*r)["items"]) {
    std::string who = str(a, "actor") + (str(a, "actor_name").empty() ? "" : " (" + str(a, "actor_name") + ")");
    std::vector<std::string> row{str(a, "id"), str(a, "time"), who, str(a, "status"),
                                 str(a, "method") + " " + str(a, "path"), str(a, "detail")};
    if (wide(o)) {
      for (const char* k : {"role", "project", "peer"}) row.push_back(or_dash(str(a, k)));
    }
    t.add(row);
  }
  t.print(std::cout);
  if ((*r)["next"].get<int64_t>() != 0) std::cout << "(more: --after " << str(*r, "next") << ")\n";
  return 0;
}

}  // namespace flotilla::cli
