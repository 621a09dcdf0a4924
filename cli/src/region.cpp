// flotilla region add|list|remove: the regional hubs a federation fronts
// (docs/operations.md, "Federation"). The region token is read from a file
// or the environment, never from the command line (ps shows arguments).
#include <iostream>
#include <nlohmann/json.hpp>

#include "cli.hpp"
#include "client.hpp"
#include "output.hpp"
#include "flotilla/common/fs.hpp"
#include "flotilla/common/options.hpp"

namespace flotilla::cli {

using nlohmann::json;

namespace {

std::string trim(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r' || s.back() == ' ')) s.pop_back();
  return s;
}

int region_add(int argc, char** argv) {
  Options o("flotilla region add",
            "Usage: flotilla region add NAME --url https://HOST:PORT --ca-file FILE --region-token-file FILE\n\n"
            "Adds a regional hub to the federation (admin). The federation checks, before storing anything,\n"
            "that the region answers over TLS verified against --ca-file and that the token is an operator\n"
            "token of project \"*\" made at that region (flotilla token create federation --role operator\n"
            "--project '*', run against the region).",
            "FLOTILLA_");
  add_hub_flags(o);
  o.add("url", "the region's REST base URL (https://)")
      .add("ca-file", "PEM file of the CA that signed the region's TLS certificate")
      .add("region-token-file", "file holding the region's API token (or FLOTILLA_REGION_TOKEN)")
      .add("region-token", "the region's API token (prefer the file or the environment)");
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 1, 1); rc >= 0) return rc;
  if (o.get("url").empty()) return fail("--url is required", 2);
  if (o.get("ca-file").empty()) return fail("--ca-file is required", 2);
  auto ca = fs::read_file(o.get("ca-file"), 64u << 10);
  if (!ca) return fail("--ca-file: " + ca.error().message, 2);
  std::string token = o.get("region-token");
  if (!o.get("region-token-file").empty()) {
    auto t = fs::read_file(o.get("region-token-file"), 4096);
    if (!t) return fail("--region-token-file: " + t.error().message, 2);
    token = trim(*t);
  }
  if (token.empty()) return fail("give the region's token with --region-token-file (or FLOTILLA_REGION_TOKEN)", 2);
  auto c = Client::from(o);
  if (!c) return fail(c.error().message, 2);
  auto r = c->call("POST", "/v1/regions", json{{"name", pos[0]}, {"url", o.get("url")}, {"ca_pem", *ca}, {"token", token}}.dump());
  if (!r) return fail(r.error().message);
  if (!print_structured(o, *r)) std::cout << "added region " << str(*r, "name") << " (" << str(*r, "url") << ")\n";
  return 0;
}

int region_list(int argc, char** argv) {
  Options o("flotilla region list", "Usage: flotilla region list [-o table|wide|json|yaml]", "FLOTILLA_");
  add_hub_flags(o);
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 0, 0); rc >= 0) return rc;
  auto c = Client::from(o);
  if (!c) return fail(c.error().message, 2);
  auto r = c->call("GET", "/v1/regions");
  if (!r) return fail(r.error().message);
  if (print_structured(o, *r)) return 0;
  std::vector<std::string> header{"NAME", "URL", "STATE", "LAST ANSWER", "ERROR"};
  if (wide(o)) header.insert(header.end(), {"CREATED", "CA SHA256"});
  Table t(header);
  for (const auto& x : (*r)["items"]) {
    std::vector<std::string> row{str(x, "name"), str(x, "url"), str(x, "state"),
                                 str(x, "last_answer_at").empty() ? "-" : str(x, "last_answer_at"),
                                 str(x, "error").empty() ? "-" : str(x, "error")};
    if (wide(o)) row.insert(row.end(), {str(x, "created_at"), str(x, "ca_sha256").substr(0, 16)});
    t.add(row);
  }
  t.print(std::cout);
  return 0;
}

int region_remove(int argc, char** argv) {
  Options o("flotilla region remove",
            "Usage: flotilla region remove NAME\n\nForgets a region and its token (admin). Refused while a "
            "federated campaign that has not finished names the region.",
            "FLOTILLA_");
  add_hub_flags(o);
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 1, 1); rc >= 0) return rc;
  auto c = Client::from(o);
  if (!c) return fail(c.error().message, 2);
  auto r = c->call("DELETE", "/v1/regions/" + pos[0]);
  if (!r) return fail(r.error().message);
  if (!print_structured(o, *r)) std::cout << "removed region " << str(*r, "name") << "\n";
  return 0;
}

}  // namespace

void warn_regions(const json& answer) {
  if (!answer.is_object() || !answer.contains("regions") || !answer["regions"].is_array()) return;
  for (const auto& r : answer["regions"]) {
    const std::string state = str(r, "state");
    if (state == "ok") continue;
    std::cerr << "warning: region " << str(r, "region") << " is " << state
              << (str(r, "last_answer_at").empty() ? "" : " (last answer " + str(r, "last_answer_at") + ")")
              << (str(r, "error").empty() ? "" : ": " + str(r, "error")) << "\n";
  }
}

int cmd_region(int argc, char** argv) {
  const std::string sub = argc > 1 ? argv[1] : "";
  if (sub == "add") return region_add(argc, argv);
  if (sub == "list") return region_list(argc, argv);
  if (sub == "remove") return region_remove(argc, argv);
  return fail("usage: flotilla region add|list|remove ... (regional hubs of a federation; admin; --help for each)", 2);
}

}  // namespace flotilla::cli
