// REST API v1: routing, authentication and authorisation, and the routes for
// enrollment, tokens and devices. Bundles/artifacts and campaigns have their
// own files; docs/api/openapi.yaml describes every route.
#include "flotilla/hub/api.hpp"


#include <atomic>
#include <charconv>
#include <cmath>

#include "api_internal.hpp"
#include "flotilla/bundles/bundle.hpp"
#include "flotilla/bundles/trust.hpp"
#include "flotilla/common/log.hpp"
#include "flotilla/common/options.hpp"
#include "flotilla/hub/rate_limit.hpp"

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

std::string iso_s(int64_t unix_s) { return unix_s > 0 ? bundles::format_rfc3339(unix_s) : ""; }
std::string iso_ms(int64_t unix_ms) { return unix_ms > 0 ? iso_s(unix_ms / 1000) : ""; }

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
    case Errc::coordination_unavailable:
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

Status check_named_project(const Caller& caller, const std::string& asked, bool allow_all) {
  if (asked == "*" ? !allow_all : asked.empty() || !valid_label_value(asked)) {
    return make_error(Errc::invalid_argument,
                      "bad project '" + asked.substr(0, 80) + "': a label value" + (allow_all ? " or \"*\"" : ""));
  }
  if (caller.project != "*" && asked != caller.project) {
    return make_error(Errc::permission_denied, "your token is for project " + caller.project +
                                                   "; it cannot act for project " + asked.substr(0, 80));
  }
  return {};
}

Result<Caller> reading_caller(const Context& c) {
  auto q = c.target.query.find("project");
  if (q == c.target.query.end()) return c.caller;
  if (auto ok = check_named_project(c.caller, q->second, true); !ok) return ok.error();
  Caller narrowed = c.caller;
  narrowed.project = q->second;
  return narrowed;
}

std::optional<HttpResponse> only_params(const Target& t, const std::set<std::string>& allowed,
                                        const std::string& what) {
  for (const auto& [k, v] : t.query) {
    if (!allowed.count(k)) {
      std::string takes;
      for (const auto& a : allowed) takes += (takes.empty() ? "" : ", ") + a;
      return Api::error(400, "invalid_argument",
                        "unknown query parameter '" + k.substr(0, 64) + "' for " + what + "; it takes " +
                            (takes.empty() ? "none" : takes));
    }
    if (v.size() > 1024) return Api::error(400, "invalid_argument", "query parameter '" + k + "' is too long");
  }
  return std::nullopt;
}

Result<int64_t> int_param(const Context& c, const std::string& key, int64_t def, int64_t lo, int64_t hi) {
  const auto& q = c.target.query;
  if (!q.count(key)) return def;
  int64_t v = 0;
  try {
    size_t used = 0;
    v = std::stoll(q.at(key), &used);
    if (used != q.at(key).size()) throw std::invalid_argument(key);
  } catch (const std::exception&) {
    return make_error(Errc::invalid_argument, key + " must be a whole number");
  }
  if (v < lo || v > hi) {
    return make_error(Errc::invalid_argument, key + " must be " + std::to_string(lo) + ".." + std::to_string(hi));
  }
  return v;
}

json bundle_json(const BundleRecord& b) {
  return json{{"id", b.id},
              {"digest", b.digest},
              {"name", b.name},
              {"channel", b.channel},
              {"version", b.version},
              {"expires_at", iso_s(b.expires_unix)},
              {"signatures", b.signatures},
              {"uploaded_at", iso_ms(b.uploaded_ms)}};
}

namespace {

// Authorisation only: the page needs the Api's HTTP counters, so
// Api::dispatch renders it once this has let the caller through.
HttpResponse metrics_access(HubService&, Context& c) {
  if (c.caller.project != "*") {
    return Api::error(403, "permission_denied", "metrics cover every project; use a token of project \"*\"");
  }
  return HttpResponse{};
}

std::vector<Route> build_routes() {
  std::vector<Route> r;
  add_access_routes(r);
  add_device_routes(r);
  add_cell_routes(r);
  add_bundle_routes(r);
  add_campaign_routes(r);
  add_trust_routes(r);
  add_declarative_routes(r);
  add_ui_routes(r);
  // Metrics span every project (campaign ids, device counts): a viewer token
  // of project "*" may read them, a project-scoped token may not.
  r.push_back({"GET", "/metrics", Role::viewer, {}, metrics_access});
  return r;
}

const std::vector<Route>& routes() {
  static const std::vector<Route> r = build_routes();
  return r;
}

}  // namespace

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

bool mutating(const std::string& method) {
  return method == "POST" || method == "PUT" || method == "PATCH" || method == "DELETE";
}

}  // namespace rest

Api::Api(HubService& service, ApiLimits limits)
    : service_(service),
      http_metrics_(std::make_unique<HttpMetrics>()),
      enroll_limit_(std::make_unique<KeyedLimiter>(service.clock(), limits.enroll_per_token_per_s,
                                                   std::max(1.0, limits.enroll_per_token_per_s), limits.enroll_per_s,
                                                   std::max(1.0, limits.enroll_per_s))) {}
Api::~Api() = default;

void Api::set_server_stats(const ServerStats* stats) { http_metrics_->set_server_stats(stats); }

HttpResponse Api::error(int status, const std::string& code, const std::string& message) {
  return rest::json_response(status, json{{"error", {{"code", code}, {"message", message}}}});
}

std::vector<std::pair<std::string, std::string>> Api::routes() const {
  // The routes outside the table: no API token (probes, the API's own
  // description, device enrollment, content-addressed artifact downloads).
  std::vector<std::pair<std::string, std::string>> out = {
      {"GET", "/healthz"},           {"GET", "/readyz"},
      {"GET", "/v1/openapi.yaml"},   {"POST", "/v1/enroll"}, {"POST", "/v1/enroll/batch"},
      {"POST", "/v1/renew"},         {"GET", "/v1/device-ca"}, {"GET", "/v1/device-ca/crl"},
      {"GET", "/v1/artifacts/{sha256}"}, {"HEAD", "/v1/artifacts/{sha256}"}};
  for (const auto& r : rest::routes()) out.emplace_back(r.method, r.pattern);
  return out;
}

namespace rest {

std::optional<HttpResponse> authorize(HubService& service, const HttpRequest& req, const std::string& pattern,
                                      Role min_role, Caller& caller, bool& authenticated) {
  auto auth = req.headers.find("authorization");
  if (auth == req.headers.end() || auth->second.rfind("Bearer ", 0) != 0) {
    return Api::error(401, "unauthenticated", "missing 'Authorization: Bearer <api token>'");
  }
  auto tok = service.authenticate("api", auth->second.substr(7));
  if (!tok) return from_error(tok.error());
  if (!*tok) return Api::error(401, "unauthenticated", "API token is unknown, expired or revoked");
  authenticated = true;
  caller.token_id = (*tok)->id;
  caller.name = (*tok)->name;
  caller.role = parse_role((*tok)->role).value_or(Role::viewer);
  caller.project = (*tok)->project;
  if (caller.role < min_role) {
    return Api::error(403, "permission_denied",
                      "a " + role_name(caller.role) + " token cannot " + req.method + " " + pattern + " (needs " +
                          role_name(min_role) + ")");
  }
  return std::nullopt;
}

}  // namespace rest

namespace {

using HubResolved = rest::Resolved<rest::Route>;

std::optional<HttpResponse> resolve(HubService& service, const HttpRequest& req, const rest::Target& t,
                                    HubResolved& out) {
  return rest::resolve(service, rest::routes(), req, t, out);
}

using rest::fill_actor;
using rest::mutating;

std::string path_of(const std::string& target) { return target.substr(0, target.find('?')); }

}  // namespace

void Api::finish(const HttpRequest& req, AuditRecord& audit, const std::string& route, int status) {
  http_metrics_->count(req.method, route, status);
  // A request a rate limit refused changed nothing and is counted
  // (flotilla_rate_limited_total); auditing each one would let a flood
  // write to the audit log without bound.
  if (!mutating(req.method) || status == 429 || audit.stored) return;
  audit.method = req.method;
  audit.path = path_of(req.target).substr(0, 512);
  audit.status = status;
  audit.peer = req.peer;
  if (auto s = service_.append_audit(audit); !s) {
    // The call already happened; losing its record is logged and counted
    // (flotilla_audit_write_failures_total), not hidden.
    http_metrics_->count_audit_failure();
    log::get("hub")->error("audit write failed method={} path={} status={}: {}", audit.method, audit.path, status,
                           s.error().message);
  }
}

std::optional<HttpResponse> Api::precheck_upload(const HttpRequest& req) {
  const rest::Target t = rest::parse_target(req.target);
  HubResolved r;
  auto refusal = resolve(service_, req, t, r);
  if (!refusal) refusal = rest::precheck_artifact_upload(service_, t, req);
  // A refused upload never reaches handle(): audit it here.
  if (refusal) {
    AuditRecord a;
    fill_actor(a, r);
    a.detail = "upload refused before its body was read";
    finish(req, a, r.route ? r.route->pattern : "unmatched", refusal->status);
  }
  return refusal;
}

namespace {

// The largest body each route takes, known from its headers alone.
size_t body_limit(const std::string& method, const std::string& route) {
  if (route == "/v1/enroll" || route == "/v1/renew") return kMaxEnrollBody;
  if (route == "/v1/enroll/batch") return kMaxEnrollBatchBody;
  if (method == "POST" && route == "/v1/bundles") return bundles::kMaxEnvelopeBytes;
  if (method == "PUT" && route == "/v1/trust") return bundles::kMaxTrustBytes;
  if (mutating(method)) return kMaxJsonBody;
  return kMaxNoBody;
}

// Routes that need no API token (Api::dispatch answers them before resolve()).
std::optional<std::string> public_route(const std::vector<std::string>& p) {
  if (p.size() == 1 && (p[0] == "healthz" || p[0] == "readyz")) return "/" + p[0];
  if (p.size() == 2 && p[0] == "v1" && p[1] == "openapi.yaml") return "/v1/openapi.yaml";
  if (p.size() == 2 && p[0] == "v1" && p[1] == "enroll") return "/v1/enroll";
  if (p.size() == 3 && p[0] == "v1" && p[1] == "enroll" && p[2] == "batch") return "/v1/enroll/batch";
  if (p.size() == 2 && p[0] == "v1" && p[1] == "renew") return "/v1/renew";
  if (p.size() == 2 && p[0] == "v1" && p[1] == "device-ca") return "/v1/device-ca";
  if (p.size() == 3 && p[0] == "v1" && p[1] == "device-ca" && p[2] == "crl") return "/v1/device-ca/crl";
  if (p.size() == 3 && p[0] == "v1" && p[1] == "artifacts") return "/v1/artifacts/{sha256}";
  return std::nullopt;
}

}  // namespace

Admission Api::admit(const HttpRequest& req) {
  const rest::Target t = rest::parse_target(req.target);
  Admission a;
  HubResolved r;
  std::string route;
  std::optional<HttpResponse> refusal;
  if (auto pub = public_route(t.parts); pub && !(*pub == "/v1/artifacts/{sha256}" && mutating(req.method))) {
    route = *pub;
  } else {
    refusal = resolve(service_, req, t, r);
    route = r.route ? r.route->pattern : "unmatched";
  }
  a.max_body = body_limit(req.method, route);
  // A declared body above the route's limit is refused now, with the
  // caller known, rather than by the HTTP layer after routing.
  if (!refusal) {
    if (auto len = req.headers.find("content-length"); len != req.headers.end()) {
      uint64_t n = 0;
      try {
        n = std::stoull(len->second);
      } catch (const std::exception&) {
        n = UINT64_MAX;
      }
      if (n > a.max_body) {
        refusal = error(413, "too_large", "request body of " + len->second + " bytes is larger than the limit for " +
                                              req.method + " " + route + " (" + std::to_string(a.max_body) + " bytes)");
      }
    }
  }
  if (refusal) {
    // Refused on its headers: the body is never read, and handle() never runs.
    AuditRecord audit;
    fill_actor(audit, r);
    audit.detail = "refused before its body was read";
    finish(req, audit, route, refusal->status);
    a.refusal = std::move(refusal);
  }
  return a;
}

namespace {
// Read-your-writes across hub processes (docs/api/openapi.yaml, "Several
// hubs"): every answer of a hub on the control log carries the log revision
// its store has applied, which is at least that of a write it just answered
// (and of the call's audit row). A client that sends the highest revision
// it has seen as X-Flotilla-Min-Revision to any hub gets an answer from a
// store at least that new: the hub waits up to kMinRevisionWait for its
// mirror to get there, or answers 503 and changes nothing.
constexpr const char* kRevisionHeader = "X-Flotilla-Revision";
constexpr const char* kMinRevisionHeader = "x-flotilla-min-revision";
constexpr auto kMinRevisionWait = std::chrono::seconds(5);
// HTTP threads a waiting request may hold at once, so that clients asking
// for a revision no hub has reached never stop the API answering.
constexpr int kMaxRevisionWaiters = 4;

std::optional<HttpResponse> await_revision(HubService& s, const HttpRequest& req) {
  auto h = req.headers.find(kMinRevisionHeader);
  if (h == req.headers.end()) return std::nullopt;
  int64_t want = 0;
  const std::string& v = h->second;
  auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), want);
  if (v.empty() || v.size() > 19 || ec != std::errc() || end != v.data() + v.size() || want < 0) {
    return Api::error(400, "invalid_argument",
                      "X-Flotilla-Min-Revision must be a revision this API gave in X-Flotilla-Revision (a "
                      "non-negative integer), got '" + v.substr(0, 40) + "'");
  }
  ControlLog* log = s.control_log();
  // One hub without the control log: its store is the only one, every
  // answer is already as new as any write it made.
  if (!log || log->applied_revision() >= want) return std::nullopt;
  static std::atomic<int> waiters{0};
  const bool admitted = ++waiters <= kMaxRevisionWaiters;
  const bool reached = admitted && log->wait_applied(want, kMinRevisionWait);
  --waiters;
  if (reached) return std::nullopt;
  HttpResponse r = Api::error(
      503, "unavailable",
      "this hub's store has applied the control log up to revision " + std::to_string(log->applied_revision()) +
          ", not yet " + std::to_string(want) + " (" +
          (admitted ? "waited " + std::to_string(kMinRevisionWait.count()) + "s" : "too many requests waiting") +
          "); retry, or ask the hub that answered the write");
  r.headers["Retry-After"] = "1";
  return r;
}

void stamp_revision(HubService& s, HttpResponse& r) {
  if (const ControlLog* log = s.control_log()) r.headers[kRevisionHeader] = std::to_string(log->applied_revision());
}
}  // namespace

HttpResponse Api::handle(const HttpRequest& req) {
  AuditRecord audit;
  std::string route = "unmatched";
  HttpResponse resp = dispatch(req, audit, route);
  finish(req, audit, route, resp.status);
  // After the audit row, which is a control write of its own.
  stamp_revision(service_, resp);
  return resp;
}

HttpResponse Api::dispatch(const HttpRequest& req, AuditRecord& audit, std::string& route) {
  using namespace rest;
  const Target t = parse_target(req.target);
  const auto& p = t.parts;
  const std::string& m = req.method;

  // The routes without a token take no query parameters: a typo there is an
  // error too, never ignored (the table's routes check theirs in resolve()).
  if (auto pub = public_route(p); pub && !(*pub == "/v1/artifacts/{sha256}" && mutating(m))) {
    if (auto bad = only_params(t, {}, m + " " + *pub)) {
      route = *pub;
      return *bad;
    }
  }

  if (p.size() == 1 && p[0] == "healthz" && m == "GET") {
    route = "/healthz";
    return json_response(200, {{"status", "ok"}});
  }
  if (p.size() == 1 && p[0] == "readyz" && m == "GET") {
    route = "/readyz";
    if (!service_.mqtt_connected()) return error(503, "unavailable", "not connected to the broker");
    return json_response(200, {{"status", "ready"}});
  }
  // The API's description is public, like the docs it is generated from.
  if (p.size() == 2 && p[0] == "v1" && p[1] == "openapi.yaml" && m == "GET") {
    route = "/v1/openapi.yaml";
    HttpResponse r;
    r.content_type = "application/yaml";
    r.body = std::string(openapi_document());
    return r;
  }

  // Device enrollment: the enrollment token inside the protobuf body is the
  // credential. /v1/enroll/batch is a gateway enrolling devices behind it.
  const bool enroll_one = p.size() == 2 && p[0] == "v1" && p[1] == "enroll";
  const bool enroll_batch = p.size() == 3 && p[0] == "v1" && p[1] == "enroll" && p[2] == "batch";
  if (enroll_one || enroll_batch) {
    route = enroll_one ? "/v1/enroll" : "/v1/enroll/batch";
    return enroll(req, audit, enroll_batch);
  }

  // Certificate renewal: the device's signature with its identity key is
  // the credential (docs/security.md, "Device certificates").
  if (p.size() == 2 && p[0] == "v1" && p[1] == "renew") {
    route = "/v1/renew";
    return renew(req, audit);
  }
  // The device CA and its revocation list are public: what any broker
  // trusting this hub's devices needs, and nothing secret.
  if (p.size() >= 2 && p.size() <= 3 && p[0] == "v1" && p[1] == "device-ca" &&
      (p.size() == 2 || p[2] == "crl") && m == "GET") {
    route = p.size() == 2 ? "/v1/device-ca" : "/v1/device-ca/crl";
    const std::string body = p.size() == 2 ? service_.device_ca_pem() : service_.crl_pem();
    if (body.empty()) return error(404, "not_found", "this hub has no device CA");
    HttpResponse r;
    r.content_type = "application/x-pem-file";
    r.body = body;
    return r;
  }

  // Artifact downloads are public: content-addressed, and agents check every
  // byte against the signed manifest (docs/security.md).
  if (p.size() == 3 && p[0] == "v1" && p[1] == "artifacts" && (m == "GET" || m == "HEAD")) {
    route = "/v1/artifacts/{sha256}";
    return serve_artifact(service_, p[2], req);
  }

  HubResolved ok;
  auto refusal = resolve(service_, req, t, ok);
  if (ok.route) route = ok.route->pattern;
  fill_actor(audit, ok);
  if (refusal) return *refusal;
  if (auto behind = await_revision(service_, req)) return *behind;
  Context ctx{req, t, ok.caller, ok.params, ""};
  HttpResponse r = ok.route->handler(service_, ctx);
  audit.detail = ctx.audit_detail;
  if (ok.route->pattern == "/metrics" && r.status == 200) {
    r.content_type = "text/plain; version=0.0.4; charset=utf-8";
    r.body = render_metrics(service_, *http_metrics_);
  }
  return r;
}

HttpResponse Api::renew(const HttpRequest& req, AuditRecord& audit) {
  using namespace rest;
  if (req.method != "POST") return error(405, "method_not_allowed", "use POST");
  // The same budget as enrollment: each request costs two signature checks
  // and a signature, before and after the store.
  int64_t retry_ms = 0;
  if (!enroll_limit_->admit_all(&retry_ms)) {
    http_metrics_->count_rate_limited("enroll");
    HttpResponse r = error(429, "rate_limited", "too many enrollment and renewal requests to this hub; retry later");
    r.headers["Retry-After"] = std::to_string(std::max<int64_t>(1, (retry_ms + 999) / 1000));
    return r;
  }
  if (req.body.size() > kMaxEnrollBody) {
    return error(413, "too_large", "renewal request above " + std::to_string(kMaxEnrollBody / 1024) + " KiB");
  }
  v1::RenewRequest rr;
  if (!rr.ParseFromString(req.body)) {
    return error(400, "invalid_argument", "body is not a flotilla.v1.RenewRequest (application/x-protobuf)");
  }
  audit.actor = "device:" + rr.device_id().substr(0, 64);
  audit.role = "device";
  auto resp = service_.renew(rr);
  if (!resp) return from_error(resp.error());
  audit.detail = "renewed the certificate of device " + rr.device_id();
  HttpResponse r;
  r.content_type = "application/x-protobuf";
  r.body = resp->SerializeAsString();
  return r;
}

namespace {
HttpResponse rate_limited(int64_t retry_after_ms, const std::string& what) {
  HttpResponse r = Api::error(429, "rate_limited", "too many enrollment requests " + what + "; retry later");
  r.headers["Retry-After"] = std::to_string(std::max<int64_t>(1, (retry_after_ms + 999) / 1000));
  return r;
}
}  // namespace

HttpResponse Api::enroll(const HttpRequest& req, AuditRecord& audit, bool batch) {
  using namespace rest;
  if (req.method != "POST") return error(405, "method_not_allowed", "use POST");
  if (!service_.mqtt_connected()) {
    HttpResponse r = error(503, "unavailable", "the hub is not connected to its broker yet; retry shortly");
    r.headers["Retry-After"] = "2";
    return r;
  }
  // Before any work (parsing, signature checks, token lookups), so a flood
  // costs the hub little.
  int64_t retry_ms = 0;
  if (!enroll_limit_->admit_all(&retry_ms)) {
    http_metrics_->count_rate_limited("enroll");
    return rate_limited(retry_ms, "to this hub");
  }
  const size_t cap = batch ? kMaxEnrollBatchBody : kMaxEnrollBody;
  if (req.body.size() > cap) {
    return error(413, "too_large", "enrollment request above " + std::to_string(cap / 1024) + " KiB");
  }
  v1::EnrollRequest one;
  v1::EnrollBatchRequest many;
  if (batch ? !many.ParseFromString(req.body) : !one.ParseFromString(req.body)) {
    return error(400, "invalid_argument", std::string("body is not a flotilla.v1.") +
                                              (batch ? "EnrollBatchRequest" : "EnrollRequest") +
                                              " (application/x-protobuf)");
  }
  // Who enrolls is the token, named by its id (never its secret).
  const std::string& secret = batch ? many.enrollment_token() : one.enrollment_token();
  if (auto tok = service_.authenticate("enroll", secret); tok && *tok) {
    audit.actor = "enrollment-token:" + (*tok)->id;
    audit.actor_name = (*tok)->name;
    audit.role = "enroll";
    audit.project = (*tok)->project;
    // One token may not use up the hub's whole enrollment rate.
    if (!enroll_limit_->admit((*tok)->id, &retry_ms)) {
      http_metrics_->count_rate_limited("enroll_token");
      return rate_limited(retry_ms, "with this enrollment token");
    }
  }
  HttpResponse r;
  r.content_type = "application/x-protobuf";
  if (!batch) {
    // On success the record goes into the enrollment's own commit (status
    // 200); a refusal is audited by finish() with its status, as before.
    audit.method = req.method;
    audit.path = path_of(req.target).substr(0, 512);
    audit.status = 200;
    audit.peer = req.peer;
    auto resp = service_.enroll(one, &audit);
    if (!resp) return from_error(resp.error());
    audit.detail = "enrolled device " + resp->device_id();
    r.body = resp->SerializeAsString();
  } else {
    auto resp = service_.enroll_batch(many);
    if (!resp) return from_error(resp.error());
    int ok = 0;
    for (const auto& res : resp->results()) ok += res.has_enrolled() ? 1 : 0;
    audit.detail = "enrolled " + std::to_string(ok) + " of " + std::to_string(resp->results_size()) +
                   " devices behind gateway " + many.gateway_id();
    r.body = resp->SerializeAsString();
  }
  return r;
}

}  // namespace flotilla::hub
