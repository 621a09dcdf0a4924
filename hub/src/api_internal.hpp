#pragma once
// Shared by the REST handler files: the caller, the route table, JSON helpers.
#include <functional>
#include <optional>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "flotilla/hub/api.hpp"

namespace flotilla::hub::rest {

using nlohmann::json;

struct Target {
  std::vector<std::string> parts;
  std::map<std::string, std::string> query;
};
Target parse_target(const std::string& target);

using hub::Caller;

struct Context {
  const HttpRequest& req;
  const Target& target;
  const Caller& caller;
  std::vector<std::string> params;  // the {placeholders} of the route, in order
  std::string audit_detail;         // what the audit log records about this call
};

// A route of a table. The hub's routes answer over its HubService, the
// federation's over its Federation; both find and authorise them the same way
// (resolve below).
template <class Service>
struct BasicRoute {
  std::string method;
  std::string pattern;  // "/v1/campaigns/{id}/actions/{action}"
  Role min_role;        // viewer, operator or admin
  // The query parameters the route takes; resolve() refuses any other with a
  // 400 before the handler runs, so a typo (?projet=) never silently becomes
  // "no filter". Every route names its own: there is no default.
  std::set<std::string> query;
  std::function<HttpResponse(Service&, Context&)> handler;
};
using Handler = std::function<HttpResponse(HubService&, Context&)>;
using Route = BasicRoute<HubService>;

void add_bundle_routes(std::vector<Route>& routes);
// GET/HEAD /v1/artifacts/{sha256}, with Range.
HttpResponse serve_artifact(HubService& s, const std::string& name, const HttpRequest& req);
// Before an upload's body is read: name, size and space.
std::optional<HttpResponse> precheck_artifact_upload(HubService& s, const Target& t, const HttpRequest& req);
void add_campaign_routes(std::vector<Route>& routes);
// Devices (api_devices.cpp); tokens, enrollment tokens, audit (api_access.cpp).
void add_device_routes(std::vector<Route>& routes);
// GET /v1/cells, POST /v1/cells/{id}/drain (api_cells.cpp).
void add_cell_routes(std::vector<Route>& routes);
void add_access_routes(std::vector<Route>& routes);
// POST /v1/apply, GET /v1/objects, /v1/gitrepos (api_declarative.cpp).
void add_declarative_routes(std::vector<Route>& routes);
// PUT/GET /v1/trust (api_trust.cpp).
void add_trust_routes(std::vector<Route>& routes);
// The dashboard's reads: /v1/whoami, /v1/views/..., /v1/events (api_ui.cpp).
void add_ui_routes(std::vector<Route>& routes);
// What an event stream of this topic sends now, as the caller may see it;
// not_found when the caller may not (api_ui.cpp).
Result<json> event_snapshot(HubService& s, const Caller& caller, const std::string& topic);
// docs/api/openapi.yaml, embedded at build time (openapi_document.cpp.in).
std::string_view openapi_document();

HttpResponse json_response(int status, const json& body);
HttpResponse from_error(const Error& e);

// Authenticates the request's bearer API token and checks its role against
// the route's (pattern, min_role); fills caller (and sets authenticated) as far as it is known,
// so a refusal is audited with whoever was refused. A response = refused.
std::optional<HttpResponse> authorize(HubService& service, const HttpRequest& req, const std::string& pattern,
                                      Role min_role, Caller& caller, bool& authenticated);

// Matches a path's parts against a pattern like "/v1/x/{id}"; fills params.
bool match(const std::string& pattern, const std::vector<std::string>& parts, std::vector<std::string>& params);

bool mutating(const std::string& method);

// Query parameters a route (`what`, "GET /v1/devices") takes; any other is a
// 400 naming it and listing the accepted ones, and so is a value above 1 KiB.
std::optional<HttpResponse> only_params(const Target& t, const std::set<std::string>& allowed,
                                        const std::string& what);

// A request as resolve() found it: its route, the route's {placeholders},
// and the caller as far as known.
template <class R>
struct Resolved {
  const R* route = nullptr;
  std::vector<std::string> params;
  Caller caller;
  bool authenticated = false;
};

// Finds the request's route in `table`, then authenticates and authorises the
// caller (authorize). A response means the request stops here: 404 for a path
// no route has (`unknown_hint` is added to its message), 405, 401 or 403.
// The hub's and the federation's routing both use it.
template <class R>
std::optional<HttpResponse> resolve(HubService& service, const std::vector<R>& table, const HttpRequest& req,
                                    const Target& t, Resolved<R>& out, const std::string& unknown_hint = "") {
  bool path_known = false;
  for (const auto& r : table) {
    std::vector<std::string> ps;
    if (!match(r.pattern, t.parts, ps)) continue;
    path_known = true;
    if (r.method == req.method) {
      out.route = &r;
      out.params = std::move(ps);
      break;
    }
  }
  // Unknown paths are 404 even without a token: there is nothing to protect.
  if (!path_known) {
    return Api::error(404, "not_found", "no route for " + req.method + " " + req.target.substr(0, 200) + unknown_hint);
  }
  if (!out.route) {
    return Api::error(405, "method_not_allowed", req.method + " is not allowed on " + req.target.substr(0, 200));
  }
  if (auto refused = authorize(service, req, out.route->pattern, out.route->min_role, out.caller, out.authenticated)) {
    return refused;
  }
  return only_params(t, out.route->query, req.method + " " + out.route->pattern);
}

// The audit record's actor: whoever resolve() found, if anyone.
template <class R>
void fill_actor(AuditRecord& a, const Resolved<R>& r) {
  if (!r.authenticated) return;
  a.actor = r.caller.token_id;
  a.actor_name = r.caller.name;
  a.role = role_name(r.caller.role);
  a.project = r.caller.project;
}
// A project a request names (a body's "project", a ?project=): a label
// value, or "*" where allow_all; a caller of one project may name only its own
// (permission_denied), a caller of every project ("*") any.
Status check_named_project(const Caller& caller, const std::string& asked, bool allow_all);
// The caller as a read sees it: with ?project=P a caller of every project is
// narrowed to P (how the federation asks a region for one project's page with
// its "*" token); a project-scoped caller may name only its own project.
Result<Caller> reading_caller(const Context& c);
// The largest page of GET /v1/devices (?limit=), at a hub and at a federation.
inline constexpr int64_t kMaxDevicePage = 10000;
// A whole-number query parameter in lo..hi, def when absent.
Result<int64_t> int_param(const Context& c, const std::string& key, int64_t def, int64_t lo, int64_t hi);
// A JSON object body with only the allowed fields (a typo must not silently become a default).
Result<json> parse_body(const HttpRequest& req, const std::set<std::string>& allowed);
Result<std::string> string_field(const json& j, const std::string& key, bool required);
json bundle_json(const BundleRecord& b);

}  // namespace flotilla::hub::rest
