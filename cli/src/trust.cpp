// flotilla trust push FILE / trust show: the operator's trust message on the
// hub (PUT/GET /v1/trust), which the hub attaches to every desired state.
#include <iostream>

#include "cli.hpp"
#include "client.hpp"
#include "output.hpp"
#include "flotilla/bundles/trust.hpp"
#include "flotilla/common/fs.hpp"
#include "flotilla/v1/bundle.pb.h"

namespace flotilla::cli {

namespace {

void print_summary(const nlohmann::json& r) {
  std::cout << "root version:    " << str(r, "root_version") << "\n";
  for (const auto& root : r.value("roots", nlohmann::json::array())) {
    std::cout << "  root v" << str(root, "version") << " threshold " << str(root, "threshold") << " keys";
    for (const auto& k : root["key_ids"]) std::cout << " " << k.get<std::string>();
    std::cout << "\n";
  }
  std::cout << "signing version: " << str(r, "signing_version") << "\n";
  if (r.contains("signing")) {
    const auto& s = r["signing"];
    std::cout << "  keys";
    for (const auto& k : s["key_ids"]) std::cout << " " << k.get<std::string>();
    std::cout << "\n  revoked";
    for (const auto& k : s["revoked_key_ids"]) std::cout << " " << k.get<std::string>();
    std::cout << "\n";
  }
}

int trust_push(int argc, char** argv) {
  Options o("flotilla trust push",
            "Usage: flotilla trust push FILE\n\n"
            "Stores the trust message FILE (flotilla key verify-chain ... --out trust.pb) on the hub\n"
            "(admin). The hub attaches it to every desired state it publishes from then on.",
            "FLOTILLA_");
  add_hub_flags(o);
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 1, 1); rc >= 0) return rc;
  auto bytes = fs::read_file(pos[0], bundles::kMaxTrustBytes);
  if (!bytes) return fail(bytes.error().message);
  // Checked here too, so a wrong file is caught before it leaves the machine.
  v1::Trust t;
  if (!t.ParseFromString(*bytes)) return fail(pos[0] + " is not a trust message (flotilla key verify-chain --out)");
  auto c = Client::from(o);
  if (!c) return fail(c.error().message, 2);
  auto r = c->call("PUT", "/v1/trust", *bytes, "application/octet-stream");
  if (!r) return fail(r.error().message);
  if (print_structured(o, *r)) return 0;
  print_summary(*r);
  return 0;
}

int trust_show(int argc, char** argv) {
  Options o("flotilla trust show", "Usage: flotilla trust show\n\nThe trust message the hub holds.", "FLOTILLA_");
  add_hub_flags(o);
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 0, 0); rc >= 0) return rc;
  auto c = Client::from(o);
  if (!c) return fail(c.error().message, 2);
  auto r = c->call("GET", "/v1/trust");
  if (!r) return fail(r.error().message);
  if (print_structured(o, *r)) return 0;
  print_summary(*r);
  return 0;
}

}  // namespace

int cmd_trust(int argc, char** argv) {
  const std::string sub = argc > 1 ? argv[1] : "";
  if (sub == "push") return trust_push(argc, argv);
  if (sub == "show") return trust_show(argc, argv);
  return fail("usage: flotilla trust push FILE | flotilla trust show (--help for each)", 2);
}

}  // namespace flotilla::cli
