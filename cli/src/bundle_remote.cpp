// bundle push / bundle list: bundles on the hub.
#include <iostream>

#include "cli.hpp"
#include "client.hpp"
#include "flotilla/common/fs.hpp"

namespace flotilla::cli {

using nlohmann::json;

int remote_bundle(const std::string& sub, int argc, char** argv) {
  Options o("flotilla bundle " + sub,
            sub == "push" ? "Usage: flotilla bundle push FILE\n\nUploads a signed bundle to the hub."
                          : "Usage: flotilla bundle list",
            "FLOTILLA_");
  add_hub_flags(o);
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, sub == "push" ? 1 : 0, sub == "push" ? 1 : 0); rc >= 0) return rc;
  auto c = Client::from(o);
  if (!c) return fail(c.error().message, 2);
  if (sub == "push") {
    auto bytes = fs::read_file(pos[0], 16u << 20);
    if (!bytes) return fail(bytes.error().message);
    auto r = c->call("POST", "/v1/bundles", *bytes, "application/octet-stream");
    if (!r) return fail(r.error().message);
    if (o.get("o") == "json") std::cout << r->dump(2) << "\n";
    else std::cout << "pushed " << str(*r, "name") << " v" << str(*r, "version") << " as bundle " << str(*r, "id") << "\n";
    return 0;
  }
  auto r = c->call("GET", "/v1/bundles");
  if (!r) return fail(r.error().message);
  if (o.get("o") == "json") {
    std::cout << r->dump(2) << "\n";
    return 0;
  }
  std::cout << pad("ID", 18) << pad("NAME", 24) << pad("VERSION", 9) << pad("CHANNEL", 10) << "EXPIRES\n";
  for (const auto& b : (*r)["items"]) {
    std::cout << pad(str(b, "id"), 18) << pad(str(b, "name"), 24) << pad(str(b, "version"), 9)
              << pad(str(b, "channel"), 10) << str(b, "expires_at") << "\n";
  }
  return 0;
}

}  // namespace flotilla::cli
