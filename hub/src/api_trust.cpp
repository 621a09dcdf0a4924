// The operator's trust message: PUT /v1/trust (the bytes `flotilla key
// verify-chain ... --out trust.pb` wrote) and GET /v1/trust (a summary).
// One trust message for the whole hub, not per project: devices of every
// project pin roots of the same operator (docs/api/openapi.yaml, "Trust").
// So only an admin of every project ("*") may replace it: a project's admin
// could otherwise make every other tenant's devices refuse their updates.
#include <algorithm>

#include "api_internal.hpp"
#include "flotilla/bundles/trust.hpp"

namespace flotilla::hub::rest {

namespace {

json trust_json(const v1::Trust& t) {
  json roots = json::array();
  uint64_t root_version = 0;
  for (const auto& r : t.roots()) {
    auto m = bundles::parse_keyring_manifest(r, bundles::KeyringRole::root);
    if (!m) continue;
    root_version = std::max<uint64_t>(root_version, m->version());
    json ids = json::array();
    for (const auto& k : m->keys()) ids.push_back(k.key_id());
    roots.push_back({{"version", m->version()}, {"threshold", m->threshold()}, {"expires_unix", m->expires_unix()},
                     {"key_ids", ids}, {"sha256", bundles::keyring_digest_hex(r)}});
  }
  json out = {{"root_version", root_version}, {"roots", roots}};
  if (t.has_signing()) {
    if (auto m = bundles::parse_keyring_manifest(t.signing(), bundles::KeyringRole::signing)) {
      json ids = json::array();
      for (const auto& k : m->keys()) ids.push_back(k.key_id());
      json revoked = json::array();
      for (const auto& k : m->revoked_key_ids()) revoked.push_back(k);
      out["signing"] = {{"version", m->version()},  {"threshold", m->threshold()},
                        {"expires_unix", m->expires_unix()}, {"key_ids", ids},
                        {"revoked_key_ids", revoked}, {"sha256", bundles::keyring_digest_hex(t.signing())}};
      out["signing_version"] = m->version();
    }
  }
  if (!out.contains("signing_version")) out["signing_version"] = 0;
  return out;
}

HttpResponse put_trust(HubService& s, Context& c) {
  if (c.caller.project != "*") {
    return Api::error(403, "permission_denied", "the trust message covers every project; only an admin of project "
                                                "\"*\" may replace it");
  }
  if (c.req.body.size() > bundles::kMaxTrustBytes) {
    return Api::error(413, "too_large", "trust message is larger than " + std::to_string(bundles::kMaxTrustBytes) +
                                            " bytes");
  }
  auto t = s.put_trust(c.req.body);
  if (!t) return from_error(t.error());
  auto summary = trust_json(*t);
  c.audit_detail = "trust root_version=" + summary["root_version"].dump() +
                   " signing_version=" + summary["signing_version"].dump();
  return json_response(200, summary);
}

HttpResponse get_trust(HubService& s, Context&) {
  auto t = s.get_trust();
  if (!t) return from_error(t.error());
  if (!*t) return Api::error(404, "not_found", "no trust message stored yet (PUT /v1/trust)");
  return json_response(200, trust_json(**t));
}

}  // namespace

void add_trust_routes(std::vector<Route>& r) {
  r.push_back({"PUT", "/v1/trust", Role::admin, {}, put_trust});
  r.push_back({"GET", "/v1/trust", Role::viewer, {}, get_trust});
}

}  // namespace flotilla::hub::rest
