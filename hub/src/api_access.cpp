// Access control: API tokens, enrollment tokens and the audit log.
#include "api_internal.hpp"
#include "flotilla/bundles/bundle.hpp"
#include "flotilla/common/options.hpp"

namespace flotilla::hub::rest {

namespace {

// The project a created object belongs to: the caller's own (a caller of
// every project: "default"), or the one the body names.
Result<std::string> target_project(const Caller& caller, const json& body, bool allow_all) {
  auto asked = string_field(body, "project", false);
  if (!asked) return asked.error();
  if (asked->empty()) return caller.project == "*" ? std::string("default") : caller.project;
  if (auto ok = check_named_project(caller, *asked, allow_all); !ok) return ok.error();
  return *asked;
}

Result<std::string> token_name(const json& body, bool required) {
  auto name = string_field(body, "name", required);
  if (!name) return name.error();
  if (name->size() > 128) return make_error(Errc::invalid_argument, "'name' is longer than 128 characters");
  if (required && name->empty()) return make_error(Errc::invalid_argument, "'name' must not be empty");
  return name;
}

// ---- enrollment tokens ------------------------------------------------------

json enrollment_token_json(const TokenRecord& t) {
  return json{{"id", t.id},
              {"name", t.name},
              {"project", t.project},
              {"labels", t.labels},
              {"device_label_keys", t.device_label_keys},
              {"max_uses", t.max_uses},
              {"unlimited_uses", t.max_uses == 0},
              {"uses", t.uses},
              {"expires_at", iso_s(t.expires_unix)},
              {"created_at", iso_ms(t.created_ms)},
              {"revoked", t.revoked}};
}

// Enrollment tokens end up in device images and config files, so the
// defaults are the safe ones: one use, 24 hours, labels only from the token.
// More uses, no use limit, or labels a device may choose are asked for explicitly.
constexpr int64_t kDefaultEnrollmentUses = 1;
constexpr int64_t kMaxEnrollmentUses = 1'000'000'000;
constexpr auto kMaxEnrollmentTtl = std::chrono::hours(24 * 366);
constexpr size_t kMaxDeviceLabelKeys = 64;

HttpResponse create_enrollment_token(HubService& s, Context& c) {
  auto j = parse_body(c.req, {"name", "labels", "ttl", "max_uses", "unlimited_uses", "device_label_keys", "project"});
  if (!j) return from_error(j.error());
  TokenRecord rec;
  rec.role = "enroll";
  auto name = token_name(*j, false);
  if (!name) return from_error(name.error());
  rec.name = *name;
  auto project = target_project(c.caller, *j, false);
  if (!project) return from_error(project.error());
  rec.project = *project;
  if (j->contains("labels")) {
    if (!(*j)["labels"].is_object()) return Api::error(400, "invalid_argument", "'labels' must be an object");
    for (const auto& [k, v] : (*j)["labels"].items()) {
      if (!v.is_string() || !valid_label_key(k) || !valid_label_value(v.get<std::string>())) {
        return Api::error(400, "invalid_argument", "bad label '" + k + "'");
      }
      rec.labels[k] = v.get<std::string>();
    }
  }
  if (j->contains("device_label_keys")) {
    const json& keys = (*j)["device_label_keys"];
    if (!keys.is_array() || keys.size() > kMaxDeviceLabelKeys) {
      return Api::error(400, "invalid_argument", "'device_label_keys' must be a list of at most " +
                                                     std::to_string(kMaxDeviceLabelKeys) + " label keys");
    }
    for (const auto& k : keys) {
      if (!k.is_string() || !valid_label_key(k.get<std::string>())) {
        return Api::error(400, "invalid_argument", "bad label key in 'device_label_keys': " + k.dump());
      }
      if (rec.labels.count(k.get<std::string>())) {
        return Api::error(400, "invalid_argument", "label '" + k.get<std::string>() +
                                                       "' is set by the token; it cannot also be the device's to choose");
      }
      rec.device_label_keys.push_back(k.get<std::string>());
    }
  }
  auto ttl = string_field(*j, "ttl", false);
  if (!ttl) return from_error(ttl.error());
  auto d = parse_duration(ttl->empty() ? "24h" : *ttl);
  if (!d) return from_error(d.error().with_context("ttl"));
  if (d->count() < 1000) return Api::error(400, "invalid_argument", "ttl must be at least 1s");
  if (*d > kMaxEnrollmentTtl) return Api::error(400, "invalid_argument", "ttl must be at most 366d");
  bool unlimited = false;
  if (j->contains("unlimited_uses")) {
    if (!(*j)["unlimited_uses"].is_boolean()) return Api::error(400, "invalid_argument", "'unlimited_uses' must be true or false");
    unlimited = (*j)["unlimited_uses"].get<bool>();
  }
  rec.max_uses = kDefaultEnrollmentUses;
  if (j->contains("max_uses")) {
    if (unlimited) {
      return Api::error(400, "invalid_argument", "give either 'max_uses' or 'unlimited_uses', not both");
    }
    const json& m = (*j)["max_uses"];
    if (!m.is_number_integer() || m.get<int64_t>() < 1 || m.get<int64_t>() > kMaxEnrollmentUses) {
      return Api::error(400, "invalid_argument", "'max_uses' must be a whole number 1.." +
                                                     std::to_string(kMaxEnrollmentUses) +
                                                     " (a token without a use limit: \"unlimited_uses\": true)");
    }
    rec.max_uses = m.get<int64_t>();
  }
  if (unlimited) rec.max_uses = 0;  // the store's "no limit"
  auto created = s.create_token("enroll", rec, *d);
  if (!created) return from_error(created.error());
  c.audit_detail = "enrollment token " + created->record.id + " project=" + rec.project;
  json out = enrollment_token_json(created->record);
  out["token"] = created->secret;  // shown once; the hub keeps only its hash
  return json_response(201, out);
}

HttpResponse list_enrollment_tokens(HubService& s, Context& c) {
  auto list = s.list_tokens("enroll");
  if (!list) return from_error(list.error());
  json items = json::array();
  for (const auto& t : *list) {
    if (c.caller.sees(t.project)) items.push_back(enrollment_token_json(t));
  }
  return json_response(200, {{"items", items}});
}

HttpResponse revoke_token_route(HubService& s, Context& c, const std::string& kind,
                                json (*to_json)(const TokenRecord&)) {
  const std::string what = kind == "api" ? "API token" : "enrollment token";
  c.audit_detail = "revoke " + what + " " + c.params[0];
  auto t = s.get_token(kind, c.params[0]);
  if (!t) return from_error(t.error());
  if (!*t || !c.caller.sees((*t)->project)) return Api::error(404, "not_found", "no " + what + " '" + c.params[0] + "'");
  // Revoking twice is not an error: the caller's intent holds either way.
  if (auto r = s.revoke_token(kind, c.params[0]); !r) return from_error(r.error());
  TokenRecord rec = **t;
  rec.revoked = true;
  return json_response(200, to_json(rec));
}

HttpResponse revoke_enrollment_token(HubService& s, Context& c) {
  return revoke_token_route(s, c, "enroll", enrollment_token_json);
}

// ---- API tokens ---------------------------------------------------------------

json api_token_json(const TokenRecord& t) {
  return json{{"id", t.id},
              {"name", t.name},
              {"role", t.role},
              {"project", t.project},
              {"expires_at", iso_s(t.expires_unix)},
              {"created_at", iso_ms(t.created_ms)},
              {"revoked", t.revoked}};
}

HttpResponse create_api_token(HubService& s, Context& c) {
  auto j = parse_body(c.req, {"name", "role", "project", "ttl"});
  if (!j) return from_error(j.error());
  TokenRecord rec;
  auto name = token_name(*j, true);
  if (!name) return from_error(name.error());
  rec.name = *name;
  auto role = string_field(*j, "role", true);
  if (!role) return from_error(role.error());
  if (!parse_role(*role)) return Api::error(400, "invalid_argument", "'role' must be viewer, operator or admin");
  rec.role = *role;
  auto project = target_project(c.caller, *j, true);
  if (!project) return from_error(project.error());
  rec.project = *project;
  auto ttl = string_field(*j, "ttl", false);
  if (!ttl) return from_error(ttl.error());
  std::chrono::milliseconds d(0);  // no ttl = no expiry, like the bootstrap token
  if (!ttl->empty()) {
    auto parsed = parse_duration(*ttl);
    if (!parsed) return from_error(parsed.error().with_context("ttl"));
    if (parsed->count() < 1000) return Api::error(400, "invalid_argument", "ttl must be at least 1s");
    d = *parsed;
  }
  auto created = s.create_token("api", rec, d);
  if (!created) return from_error(created.error());
  c.audit_detail = "API token " + created->record.id + " role=" + rec.role + " project=" + rec.project;
  json out = api_token_json(created->record);
  out["token"] = created->secret;  // shown once; the hub keeps only its hash
  return json_response(201, out);
}

HttpResponse list_api_tokens(HubService& s, Context& c) {
  auto list = s.list_tokens("api");
  if (!list) return from_error(list.error());
  json items = json::array();
  for (const auto& t : *list) {
    if (c.caller.sees(t.project)) items.push_back(api_token_json(t));
  }
  return json_response(200, {{"items", items}});
}

HttpResponse revoke_api_token(HubService& s, Context& c) { return revoke_token_route(s, c, "api", api_token_json); }

// ---- audit log ----------------------------------------------------------------

HttpResponse list_audit(HubService& s, Context& c) {
  auto limit = int_param(c, "limit", 100, 1, 1000);
  if (!limit) return from_error(limit.error());
  auto after = int_param(c, "after", 0, 0, INT64_MAX);
  if (!after) return from_error(after.error());
  // One more than asked tells whether there is a next page.
  auto rows = s.list_audit(*after, *limit + 1, c.caller.project);
  if (!rows) return from_error(rows.error());
  json items = json::array();
  int64_t next = 0;
  for (const auto& a : *rows) {
    if (static_cast<int64_t>(items.size()) == *limit) {
      next = items.back()["id"].get<int64_t>();
      break;
    }
    items.push_back({{"id", a.id},
                     {"time", iso_ms(a.time_ms)},
                     {"time_ms", a.time_ms},
                     {"actor", a.actor},
                     {"actor_name", a.actor_name},
                     {"role", a.role},
                     {"project", a.project},
                     {"method", a.method},
                     {"path", a.path},
                     {"detail", a.detail},
                     {"status", a.status},
                     {"peer", a.peer}});
  }
  return json_response(200, {{"items", items}, {"next", next}});
}

}  // namespace

void add_access_routes(std::vector<Route>& r) {
  r.push_back({"POST", "/v1/enrollment-tokens", Role::operator_, {}, create_enrollment_token});
  r.push_back({"GET", "/v1/enrollment-tokens", Role::operator_, {}, list_enrollment_tokens});
  r.push_back({"DELETE", "/v1/enrollment-tokens/{id}", Role::operator_, {}, revoke_enrollment_token});
  r.push_back({"POST", "/v1/tokens", Role::admin, {}, create_api_token});
  r.push_back({"GET", "/v1/tokens", Role::admin, {}, list_api_tokens});
  r.push_back({"DELETE", "/v1/tokens/{id}", Role::admin, {}, revoke_api_token});
  r.push_back({"GET", "/v1/audit", Role::admin, {"after", "limit"}, list_audit});
}

}  // namespace flotilla::hub::rest
