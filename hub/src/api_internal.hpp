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

// Who is calling, from their API token.
struct Caller {
  std::string token_id;
  std::string name;
  Role role = Role::viewer;
  std::string project;  // "*" = every project
  bool sees(const std::string& p) const { return project == "*" || project == p; }
};

struct Context {
  const HttpRequest& req;
  const Target& target;
  const Caller& caller;
  std::vector<std::string> params;  // the {placeholders} of the route, in order
  std::string audit_detail;         // what the audit log records about this call
};

using Handler = std::function<HttpResponse(HubService&, Context&)>;

struct Route {
  std::string method;
  std::string pattern;  // "/v1/campaigns/{id}/actions/{action}"
  Role min_role;        // viewer, operator or admin
  Handler handler;
};

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
// The hub's and the federation's routing both use it.
std::optional<HttpResponse> authorize(HubService& service, const HttpRequest& req, const std::string& pattern,
                                      Role min_role, Caller& caller, bool& authenticated);
// A JSON object body with only the allowed fields (a typo must not silently become a default).
Result<json> parse_body(const HttpRequest& req, const std::set<std::string>& allowed);
Result<std::string> string_field(const json& j, const std::string& key, bool required);
std::string iso_ms(int64_t ms);
json bundle_json(const BundleRecord& b);

}  // namespace flotilla::hub::rest
