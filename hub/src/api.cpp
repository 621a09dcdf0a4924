// REST API v1: routing, authentication and authorisation, and the routes for
// enrollment, tokens and devices. Bundles/artifacts and campaigns have their
// own files; docs/api/openapi.yaml describes every route.
#include "flotilla/hub/api.hpp"

#include <variant>

#include "api_internal.hpp"
#include "flotilla/bundles/bundle.hpp"
#include "flotilla/common/log.hpp"
#include "flotilla/common/options.hpp"

namespace flotilla::hub {

using nlohmann::json;

std::string role_name(Role r) {
  switch (r) {
    case Role::viewer: return "viewer";
    case Role::operator_: return "operator";
    case Role::admin: return "admin";
  }
  return "viewer";
}

std::optional<Role> parse_role(const std::string& s) {
  if (s == "viewer") return Role::viewer;
  if (s == "operator") return Role::operator_;
  if (s == "admin") return Role::admin;
  return std::nullopt;
}

namespace rest {

namespace {
std::string url_decode(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '%' && i + 2 < s.size() && std::isxdigit(static_cast<unsigned char>(s[i + 1])) &&
        std::isxdigit(static_cast<unsigned char>(s[i + 2]))) {
      out.push_back(static_cast<char>(std::stoi(s.substr(i + 1, 2), nullptr, 16)));
      i += 2;
    } else if (s[i] == '+') {
      out.push_back(' ');
    } else {
      out.push_back(s[i]);
    }
  }
  return out;
}

int http_status_for(Errc code) {
  switch (code) {
    case Errc::invalid_argument:
    case Errc::parse: return 400;
    case Errc::unauthenticated: return 401;
    case Errc::permission_denied: return 403;
    case Errc::not_found: return 404;
    case Errc::already_exists:
    case Errc::conflict: return 409;
    case Errc::too_large: return 413;
    case Errc::unavailable:
    case Errc::timeout: return 503;
    default: return 500;
  }
}
}  // namespace

Target parse_target(const std::string& target) {
  Target t;
  auto q = target.find('?');
  std::string path = target.substr(0, q);
  size_t start = 1;
  while (start <= path.size()) {
    auto slash = path.find('/', start);
    std::string part = path.substr(start, slash == std::string::npos ? std::string::npos : slash - start);
    if (!part.empty()) t.parts.push_back(url_decode(part));
    if (slash == std::string::npos) break;
    start = slash + 1;
  }
  if (q != std::string::npos) {
    std::string qs = target.substr(q + 1);
    size_t s = 0;
    while (s < qs.size()) {
      auto amp = qs.find('&', s);
      std::string kv = qs.substr(s, amp == std::string::npos ? std::string::npos : amp - s);
      auto eq = kv.find('=');
      t.query[url_decode(kv.substr(0, eq))] = eq == std::string::npos ? "" : url_decode(kv.substr(eq + 1));
      if (amp == std::string::npos) break;
      s = amp + 1;
    }
  }
  return t;
}

HttpResponse json_response(int status, const json& body) {
  HttpResponse r;
  r.status = status;
  r.body = body.dump(2) + "\n";
  return r;
}

HttpResponse from_error(const Error& e) {
  const int status = http_status_for(e.code);
  // Internal details stay in the log; the client gets the code and a safe message.
  if (status == 500) {
    log::get("hub")->error("internal error: {}", e.message);
    return Api::error(500, "internal", "internal error; see the hub log");
  }
  return Api::error(status, std::string(errc_name(e.code)), e.message);
}

Result<json> parse_body(const HttpRequest& req, const std::set<std::string>& allowed) {
  if (req.body.size() > kMaxJsonBody) {
    return make_error(Errc::too_large, "request body is larger than " + std::to_string(kMaxJsonBody) + " bytes");
  }
  json j = json::parse(req.body, nullptr, false);
  if (j.is_discarded()) return make_error(Errc::invalid_argument, "request body is not valid JSON");
  if (!j.is_object()) return make_error(Errc::invalid_argument, "request body must be a JSON object");
  for (const auto& [k, v] : j.items()) {
    if (!allowed.count(k)) return make_error(Errc::invalid_argument, "unknown field '" + k + "'");
  }
  return j;
}

Result<std::string> string_field(const json& j, const std::string& key, bool required) {
  if (!j.contains(key)) {
    if (required) return make_error(Errc::invalid_argument, "field '" + key + "' is required");
    return std::string();
  }
  if (!j[key].is_string()) return make_error(Errc::invalid_argument, "field '" + key + "' must be a string");
  return j[key].get<std::string>();
}

std::string iso_ms(int64_t ms) {
  if (ms <= 0) return "";
  return bundles::format_rfc3339(ms / 1000);
}

json bundle_json(const BundleRecord& b) {
  return json{{"id", b.id},
              {"digest", b.digest},
              {"name", b.name},
              {"channel", b.channel},
              {"version", b.version},
              {"expires_at", b.expires_unix ? bundles::format_rfc3339(b.expires_unix) : ""},
              {"signatures", b.signatures},
              {"uploaded_at", iso_ms(b.uploaded_ms)}};
}

namespace {

json device_json(const DeviceRecord& d) {
  return json{{"id", d.id},
              {"project", d.project},
              {"labels", d.labels},
              {"hostname", d.hostname},
              {"arch", d.arch},
              {"agent_version", d.agent_version},
              {"online", d.online},
              {"state", d.state},
              {"applied_bundle", d.applied_bundle},
              {"applied_version", d.applied_version},
              {"k3s_version", d.k3s_version},
              {"node_ready", d.node_ready},
              {"last_reason", d.last_reason},
              {"last_message", d.last_message},
              {"enrolled_at", iso_ms(d.enrolled_ms)},
              {"last_seen_at", iso_ms(d.last_seen_ms)},
              {"campaign_id", d.campaign_id},
              {"generation", d.generation}};
}

HttpResponse create_enrollment_token(HubService& s, Context& c) {
  auto j = parse_body(c.req, {"name", "labels", "ttl", "max_uses", "project"});
  if (!j) return from_error(j.error());
  TokenRecord rec;
  rec.role = "enroll";
  rec.project = c.caller.project == "*" ? "default" : c.caller.project;
  auto name = string_field(*j, "name", false);
  if (!name) return from_error(name.error());
  rec.name = *name;
  auto project = string_field(*j, "project", false);
  if (!project) return from_error(project.error());
  if (!project->empty()) {
    if (!c.caller.sees(*project)) return Api::error(403, "permission_denied", "your token is not for project " + *project);
    if (!bundles::valid_label_value(*project) || project->empty()) {
      return Api::error(400, "invalid_argument", "bad project name");
    }
    rec.project = *project;
  }
  if (j->contains("labels")) {
    if (!(*j)["labels"].is_object()) return Api::error(400, "invalid_argument", "'labels' must be an object");
    for (const auto& [k, v] : (*j)["labels"].items()) {
      if (!v.is_string() || !valid_label_key(k) || !valid_label_value(v.get<std::string>())) {
        return Api::error(400, "invalid_argument", "bad label '" + k + "'");
      }
      rec.labels[k] = v.get<std::string>();
    }
  }
  auto ttl = string_field(*j, "ttl", false);
  if (!ttl) return from_error(ttl.error());
  auto d = parse_duration(ttl->empty() ? "24h" : *ttl);
  if (!d) return from_error(d.error().with_context("ttl"));
  if (d->count() < 1000) return Api::error(400, "invalid_argument", "ttl must be at least 1s");
  if (j->contains("max_uses")) {
    if (!(*j)["max_uses"].is_number_integer() || (*j)["max_uses"].get<int64_t>() < 0) {
      return Api::error(400, "invalid_argument", "'max_uses' must be a whole number >= 0");
    }
    rec.max_uses = (*j)["max_uses"].get<int64_t>();
  }
  auto created = s.create_token("enroll", rec, *d);
  if (!created) return from_error(created.error());
  c.audit_detail = "enrollment token " + created->record.id + " project=" + rec.project;
  return json_response(201, {{"id", created->record.id},
                             {"token", created->secret},
                             {"project", created->record.project},
                             {"labels", created->record.labels},
                             {"max_uses", created->record.max_uses},
                             {"expires_at", bundles::format_rfc3339(created->record.expires_unix)}});
}

HttpResponse list_devices(HubService& s, Context& c) {
  const auto& q = c.target.query;
  auto sel = Selector::parse(q.count("selector") ? q.at("selector") : "");
  if (!sel) return from_error(sel.error());
  int64_t limit = 500;
  if (q.count("limit")) {
    try {
      limit = std::stoll(q.at("limit"));
    } catch (const std::exception&) {
      limit = -1;
    }
    if (limit < 1 || limit > 10000) return Api::error(400, "invalid_argument", "limit must be 1..10000");
  }
  const std::string after = q.count("after") ? q.at("after") : "";
  auto list = s.list_devices(*sel);
  if (!list) return from_error(list.error());
  json items = json::array();
  std::string next;
  for (const auto& d : *list) {
    if (!c.caller.sees(d.project)) continue;
    if (!after.empty() && d.id <= after) continue;
    if (static_cast<int64_t>(items.size()) == limit) {
      next = items.back()["id"].get<std::string>();
      break;
    }
    items.push_back(device_json(d));
  }
  return json_response(200, {{"items", items}, {"next", next}});
}

HttpResponse get_device(HubService& s, Context& c) {
  auto d = s.get_device(c.params[0]);
  if (!d) return from_error(d.error());
  // Another project's device is "not found", not "forbidden": its existence is not ours to tell.
  if (!*d || !c.caller.sees((*d)->project)) return Api::error(404, "not_found", "no device '" + c.params[0] + "'");
  return json_response(200, device_json(**d));
}

std::vector<Route> build_routes() {
  std::vector<Route> r;
  r.push_back({"POST", "/v1/enrollment-tokens", Role::operator_, create_enrollment_token});
  r.push_back({"GET", "/v1/devices", Role::viewer, list_devices});
  r.push_back({"GET", "/v1/devices/{id}", Role::viewer, get_device});
  add_bundle_routes(r);
  add_campaign_routes(r);
  return r;
}

const std::vector<Route>& routes() {
  static const std::vector<Route> r = build_routes();
  return r;
}

// Matches a path against "/v1/x/{id}"; fills params.
bool match(const std::string& pattern, const std::vector<std::string>& parts, std::vector<std::string>& params) {
  const Target p = parse_target(pattern);
  if (p.parts.size() != parts.size()) return false;
  params.clear();
  for (size_t i = 0; i < parts.size(); ++i) {
    const auto& want = p.parts[i];
    if (want.size() > 2 && want.front() == '{' && want.back() == '}') {
      params.push_back(parts[i]);
    } else if (want != parts[i]) {
      return false;
    }
  }
  return true;
}

}  // namespace
}  // namespace rest

Api::Api(HubService& service) : service_(service) {}

HttpResponse Api::error(int status, const std::string& code, const std::string& message) {
  return rest::json_response(status, json{{"error", {{"code", code}, {"message", message}}}});
}

std::vector<std::pair<std::string, std::string>> Api::routes() const {
  std::vector<std::pair<std::string, std::string>> out = {
      {"GET", "/healthz"}, {"GET", "/readyz"}, {"POST", "/v1/enroll"}};
  for (const auto& r : rest::routes()) out.emplace_back(r.method, r.pattern);
  return out;
}

namespace {
struct Resolved {
  const rest::Route* route = nullptr;
  std::vector<std::string> params;
  rest::Caller caller;
};

// Finds the route and authenticates and authorises the caller; a response
// means the request stops here.
std::variant<HttpResponse, Resolved> resolve(HubService& service, const HttpRequest& req, const rest::Target& t) {
  using namespace rest;
  const auto& p = t.parts;
  const std::string& m = req.method;
  Resolved out;
  bool path_known = false;
  for (const auto& r : rest::routes()) {
    std::vector<std::string> ps;
    if (!match(r.pattern, p, ps)) continue;
    path_known = true;
    if (r.method == m) {
      out.route = &r;
      out.params = ps;
      break;
    }
  }
  // Unknown paths are 404 even without a token: there is nothing to protect.
  if (!path_known) return Api::error(404, "not_found", "no route for " + m + " " + req.target);
  if (!out.route) return Api::error(405, "method_not_allowed", m + " is not allowed on " + req.target);

  auto auth = req.headers.find("authorization");
  if (auth == req.headers.end() || auth->second.rfind("Bearer ", 0) != 0) {
    return Api::error(401, "unauthenticated", "missing 'Authorization: Bearer <api token>'");
  }
  auto tok = service.authenticate("api", auth->second.substr(7));
  if (!tok) return from_error(tok.error());
  if (!*tok) return Api::error(401, "unauthenticated", "API token is unknown, expired or revoked");
  out.caller.token_id = (*tok)->id;
  out.caller.name = (*tok)->name;
  out.caller.role = parse_role((*tok)->role).value_or(Role::viewer);
  out.caller.project = (*tok)->project;
  if (out.caller.role < out.route->min_role) {
    return Api::error(403, "permission_denied",
                      "a " + role_name(out.caller.role) + " token cannot " + m + " " + out.route->pattern +
                          " (needs " + role_name(out.route->min_role) + ")");
  }
  return out;
}
}  // namespace

std::optional<HttpResponse> Api::precheck_upload(const HttpRequest& req) {
  const rest::Target t = rest::parse_target(req.target);
  auto r = resolve(service_, req, t);
  if (auto* refusal = std::get_if<HttpResponse>(&r)) return *refusal;
  return rest::precheck_artifact_upload(service_, t, req);
}

HttpResponse Api::handle(const HttpRequest& req) {
  using namespace rest;
  const Target t = parse_target(req.target);
  const auto& p = t.parts;
  const std::string& m = req.method;

  if (p.size() == 1 && p[0] == "healthz" && m == "GET") return json_response(200, {{"status", "ok"}});
  if (p.size() == 1 && p[0] == "readyz" && m == "GET") {
    if (!service_.mqtt_connected()) return error(503, "unavailable", "not connected to the broker");
    return json_response(200, {{"status", "ready"}});
  }
  if (p.empty() || p[0] != "v1") return error(404, "not_found", "no route for " + m + " " + req.target);

  // Device enrollment: the enrollment token inside the protobuf body is the credential.
  if (p.size() == 2 && p[1] == "enroll") {
    if (m != "POST") return error(405, "method_not_allowed", "use POST");
    if (!service_.mqtt_connected()) {
      HttpResponse r = error(503, "unavailable", "the hub is not connected to its broker yet; retry shortly");
      r.headers["Retry-After"] = "2";
      return r;
    }
    if (req.body.size() > 64 * 1024) return error(413, "too_large", "enrollment request above 64 KiB");
    v1::EnrollRequest er;
    if (!er.ParseFromString(req.body)) {
      return error(400, "invalid_argument", "body is not a flotilla.v1.EnrollRequest (application/x-protobuf)");
    }
    auto resp = service_.enroll(er);
    if (!resp) return from_error(resp.error());
    HttpResponse r;
    r.content_type = "application/x-protobuf";
    r.body = resp->SerializeAsString();
    return r;
  }

  // Artifact downloads are public: content-addressed, and agents check every
  // byte against the signed manifest (docs/security.md).
  if (p.size() == 3 && p[1] == "artifacts" && (m == "GET" || m == "HEAD")) {
    return serve_artifact(service_, p[2], req);
  }

  auto r = resolve(service_, req, t);
  if (auto* refusal = std::get_if<HttpResponse>(&r)) return *refusal;
  auto& ok = std::get<Resolved>(r);
  Context ctx{req, t, ok.caller, ok.params, ""};
  return ok.route->handler(service_, ctx);
}

}  // namespace flotilla::hub
