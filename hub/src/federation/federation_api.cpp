// The federation's REST front. /v1/regions, /v1/devices and /v1/campaigns
// are answered here from the regions; the federation's own tokens, audit,
// whoami, bundles and artifacts go to the hub's Api over the federation's
// hub store (the same code and checks as on any hub).
#include <algorithm>
#include <set>

#include "../api_internal.hpp"
#include "flotilla/bundles/bundle.hpp"
#include "flotilla/common/crypto.hpp"
#include "flotilla/common/encoding.hpp"
#include "flotilla/common/log.hpp"
#include "flotilla/common/options.hpp"
#include "flotilla/hub/federation.hpp"

namespace flotilla::hub::federation {

namespace {

using rest::from_error;
using rest::json_response;

// The federation's routes: found, authenticated and authorised by the hub's
// own rest::resolve, with the hub's Context.
using FedContext = rest::Context;
using FedRoute = rest::BasicRoute<Federation>;
using FedHandler = std::function<HttpResponse(Federation&, FedContext&)>;

// ---- regions ----

json region_json(const Region& r) {
  // Never the token: it is the region's secret, kept only in the store.
  return {{"name", r.name},
          {"url", r.url},
          {"ca_sha256", crypto::sha256_hex(r.ca_pem)},
          {"created_at", iso_ms(r.created_ms)},
          {"state", r.state},
          {"last_answer_at", iso_ms(r.last_answer_ms)},
          {"error", r.error}};
}

HttpResponse list_regions(Federation& f, FedContext&) {
  auto list = f.store().list_regions();
  if (!list) return from_error(list.error());
  json items = json::array();
  for (const auto& r : *list) items.push_back(region_json(r));
  return json_response(200, {{"items", items}});
}

HttpResponse get_region(Federation& f, FedContext& c) {
  auto r = f.store().get_region(c.params[0]);
  if (!r) return from_error(r.error());
  if (!*r) return Api::error(404, "not_found", "no region '" + c.params[0] + "'");
  return json_response(200, region_json(**r));
}

HttpResponse add_region(Federation& f, FedContext& c) {
  auto j = rest::parse_body(c.req, {"name", "url", "ca_pem", "token"});
  if (!j) return from_error(j.error());
  Region r;
  for (auto [key, out] : {std::pair{"name", &r.name}, std::pair{"url", &r.url}, std::pair{"ca_pem", &r.ca_pem},
                          std::pair{"token", &r.token}}) {
    auto v = rest::string_field(*j, key, true);
    if (!v) return from_error(v.error());
    *out = *v;
  }
  c.audit_detail = "add region " + r.name.substr(0, 80) + " url=" + r.url.substr(0, 200);
  auto added = f.add_region(std::move(r));
  if (!added) return from_error(added.error());
  return json_response(201, region_json(*added));
}

HttpResponse remove_region(Federation& f, FedContext& c) {
  const std::string& name = c.params[0];
  c.audit_detail = "remove region " + name.substr(0, 80);
  auto r = f.store().get_region(name);
  if (!r) return from_error(r.error());
  if (!*r) return Api::error(404, "not_found", "no region '" + name + "'");
  // A region a live federated campaign still has to reach stays: removing
  // it would stop that rollout half way without anyone deciding so.
  auto live = f.store().live_campaign_ids();
  if (!live) return from_error(live.error());
  for (const auto& id : *live) {
    auto camp = f.store().get_campaign(id);
    if (!camp || !*camp) continue;
    for (const auto& step : (*camp)->steps) {
      if (std::find(step.begin(), step.end(), name) != step.end()) {
        return Api::error(409, "conflict", "region '" + name + "' is in federated campaign " + id +
                                               ", which is still " + fed_state_name((*camp)->state) +
                                               "; abort it first");
      }
    }
  }
  auto removed = f.store().remove_region(name);
  if (!removed) return from_error(removed.error());
  log::get("federation")->info("removed region={}", name);
  return json_response(200, region_json(**r));
}

// ---- devices ----

// The opaque cursor of a device list: each region's position (the last
// device id it gave) and whether it has nothing more. URL-safe base64 of JSON.
std::string encode_cursor(const json& regions) {
  const std::string raw = json{{"r", regions}}.dump();
  std::string b = to_base64(reinterpret_cast<const uint8_t*>(raw.data()), raw.size());
  for (auto& ch : b) ch = ch == '+' ? '-' : ch == '/' ? '_' : ch;
  while (!b.empty() && b.back() == '=') b.pop_back();
  return b;
}

Result<json> decode_cursor(std::string c) {
  if (c.size() > 16384) return make_error(Errc::invalid_argument, "after: cursor too long");
  for (auto& ch : c) ch = ch == '-' ? '+' : ch == '_' ? '/' : ch;
  while (c.size() % 4) c.push_back('=');
  auto raw = from_base64(c);
  if (!raw) return make_error(Errc::invalid_argument, "after: not a cursor this federation gave");
  json j = json::parse(std::string(raw->begin(), raw->end()), nullptr, false);
  if (j.is_discarded() || !j.is_object() || !j.contains("r") || !j["r"].is_object()) {
    return make_error(Errc::invalid_argument, "after: not a cursor this federation gave");
  }
  return j["r"];
}

// What a region is asked besides the path: the caller's project, so a region
// answers a project-scoped caller's page (or get) with that project's objects
// only (its "*" token narrowed by ?project=, docs/api). A caller of every
// project asks for everything.
std::string project_query(const Caller& caller, char sep) {
  return caller.project == "*" ? "" : std::string(1, sep) + "project=" + url_encode(caller.project);
}

HttpResponse list_devices(Federation& f, FedContext& c) {
  const auto& q = c.target.query;
  auto limit_param = rest::int_param(c, "limit", 500, 1, rest::kMaxDevicePage);
  if (!limit_param) return from_error(limit_param.error());
  const int64_t limit = *limit_param;
  auto caller = rest::reading_caller(c);
  if (!caller) return from_error(caller.error());
  json cursor = json::object();
  if (q.count("after") && !q.at("after").empty()) {
    auto d = decode_cursor(q.at("after"));
    if (!d) return from_error(d.error());
    cursor = *d;
  }
  const std::string only = q.count("region") ? q.at("region") : "";
  // What every region is asked; its own position is added per region.
  std::string common = "/v1/devices?limit=" + std::to_string(limit) + project_query(*caller, '&');
  for (const char* k : {"selector", "include_decommissioned", "certExpiresBefore"}) {
    if (q.count(k)) common += std::string("&") + k + "=" + url_encode(q.at(k));
  }
  auto answers = f.fan_out("", [&](const Region& r) -> std::string {
    if (cursor.contains(r.name) && cursor[r.name].value("d", false)) return "";  // nothing more there
    const std::string after = cursor.contains(r.name) ? cursor[r.name].value("a", "") : "";
    return common + (after.empty() ? "" : "&after=" + url_encode(after));
  }, only);
  if (!answers) return from_error(answers.error());
  json items = json::array(), regions = json::array();
  bool complete = true;
  bool more = false;
  for (auto& fo : *answers) {
    const std::string& name = fo.region.name;
    json pos = cursor.contains(name) ? cursor[name] : json{{"a", ""}, {"d", false}};
    if (fo.answer.status == 204) {  // already done in an earlier page
      regions.push_back(f.region_status(fo.region));
      cursor[name] = pos;
      continue;
    }
    json st = f.region_status(fo.region);
    if (!fo.answer.ok() || !fo.answer.body.is_object()) {
      // Shown, never dropped: the region keeps its position for a later page.
      if (fo.answer.reached) st["state"] = "error";
      st["error"] = fo.answer.summary();
      complete = false;
      regions.push_back(st);
      cursor[name] = pos;
      continue;
    }
    regions.push_back(st);
    const json raw = fo.answer.body.value("items", json::array());
    const std::string region_next = fo.answer.body.value("next", "");
    bool page_full_here = false;
    for (const auto& d : raw) {
      if (static_cast<int64_t>(items.size()) >= limit) {
        page_full_here = true;
        break;
      }
      pos["a"] = d.value("id", "");
      // The region was asked for the caller's project only; a region that
      // does not know ?project= yet answers every project, so look again.
      if (!caller->sees(d.value("project", ""))) continue;
      json item = d;
      item["region"] = name;
      items.push_back(std::move(item));
    }
    // Every item taken: carry on from where the region stopped looking,
    // which may be past its last item (a page its scan limit cut short, even
    // an empty one, must not be asked again from the same place).
    if (!page_full_here && !region_next.empty()) pos["a"] = region_next;
    pos["d"] = !page_full_here && region_next.empty();
    if (!pos["d"].get<bool>()) more = true;
    cursor[name] = pos;
  }
  return json_response(200, {{"items", items},
                             {"next", more ? encode_cursor(cursor) : ""},
                             {"complete", complete},
                             {"regions", regions}});
}

HttpResponse get_device(Federation& f, FedContext& c) {
  auto caller = rest::reading_caller(c);
  if (!caller) return from_error(caller.error());
  const std::string only = c.target.query.count("region") ? c.target.query.at("region") : "";
  auto answers = f.fan_out("/v1/devices/" + url_encode(c.params[0]) + project_query(*caller, '?'), nullptr, only);
  if (!answers) return from_error(answers.error());
  json regions = json::array();
  for (auto& fo : *answers) {
    regions.push_back(f.region_status(fo.region));
    if (fo.answer.ok() && fo.answer.body.is_object() && caller->sees(fo.answer.body.value("project", ""))) {
      json d = fo.answer.body;
      d["region"] = fo.region.name;
      return json_response(200, d);
    }
  }
  json err{{"error", {{"code", "not_found"}, {"message", "no device '" + c.params[0] + "' in any region that answered"}}},
           {"regions", regions}};
  return json_response(404, err);
}

// ---- campaigns ----

HttpResponse list_campaigns(Federation& f, FedContext& c) {
  auto caller = rest::reading_caller(c);
  if (!caller) return from_error(caller.error());
  const std::string only = c.target.query.count("region") ? c.target.query.at("region") : "";
  auto answers = f.fan_out("/v1/campaigns" + project_query(*caller, '?'), nullptr, only);
  if (!answers) return from_error(answers.error());
  json items = json::array(), regions = json::array();
  auto fed = f.store().list_campaigns();
  if (!fed) return from_error(fed.error());
  for (const auto& camp : *fed) {
    if (!caller->sees(camp.project)) continue;
    if (!only.empty()) {
      bool in = false;
      for (const auto& step : camp.steps) in = in || std::find(step.begin(), step.end(), only) != step.end();
      if (!in) continue;
    }
    items.push_back(f.campaign_json(camp));
  }
  for (auto& fo : *answers) {
    json st = f.region_status(fo.region);
    json list;
    bool stale = false;
    if (fo.answer.ok() && fo.answer.body.is_object()) {
      list = fo.answer.body.value("items", json::array());
      // Only a list of every project stands in for the region while it is
      // away; one project's list would hide the others' campaigns.
      if (caller->project == "*") (void)f.store().keep_campaign_list(fo.region.name, list);
    } else {
      // Away: what it said last, marked stale, so it is never missing.
      if (fo.answer.reached) st["state"] = "error";
      st["error"] = fo.answer.summary();
      auto last = f.store().last_campaign_list(fo.region.name);
      list = last ? *last : json::array();
      stale = true;
    }
    regions.push_back(st);
    for (const auto& item : list) {
      if (!caller->sees(item.value("project", ""))) continue;
      json x = item;
      x["region"] = fo.region.name;
      x["kind"] = "regional";
      x["stale"] = stale;
      items.push_back(std::move(x));
    }
  }
  return json_response(200, {{"items", items}, {"regions", regions}});
}

HttpResponse get_campaign(Federation& f, FedContext& c) {
  auto caller = rest::reading_caller(c);
  if (!caller) return from_error(caller.error());
  auto camp = f.store().get_campaign(c.params[0]);
  if (!camp) return from_error(camp.error());
  if (*camp && caller->sees((*camp)->project)) return json_response(200, f.campaign_json(**camp));
  // A regional campaign's id: the region that holds it answers.
  const std::string only = c.target.query.count("region") ? c.target.query.at("region") : "";
  const bool devices = c.target.query.count("devices") && c.target.query.at("devices") == "true";
  const std::string query = (devices ? "?devices=true" : "") + project_query(*caller, devices ? '&' : '?');
  auto answers = f.fan_out("/v1/campaigns/" + url_encode(c.params[0]) + query, nullptr, only);
  if (!answers) return from_error(answers.error());
  for (auto& fo : *answers) {
    if (fo.answer.ok() && fo.answer.body.is_object() && caller->sees(fo.answer.body.value("project", ""))) {
      json x = fo.answer.body;
      x["region"] = fo.region.name;
      x["kind"] = "regional";
      return json_response(200, x);
    }
  }
  return Api::error(404, "not_found", "no campaign '" + c.params[0] + "'");
}

Result<RegionThreshold> threshold_field(const json& j, const std::string& what) {
  if (!j.is_object()) return make_error(Errc::invalid_argument, what + " must be {\"percent\": P, \"min_sample\": N}");
  RegionThreshold t;
  for (const auto& [k, v] : j.items()) {
    if (k == "percent" && v.is_number()) t.percent = v.get<double>();
    else if (k == "min_sample" && v.is_number_integer()) t.min_sample = v.get<int64_t>();
    else return make_error(Errc::invalid_argument, what + ": unknown or mistyped field '" + k + "'");
  }
  return t;
}

HttpResponse create_campaign(Federation& f, FedContext& c) {
  auto j = rest::parse_body(c.req, {"name", "bundle", "selector", "strategy", "regions", "threshold", "thresholds", "soak"});
  if (!j) return from_error(j.error());
  FedCampaign camp;
  auto name = rest::string_field(*j, "name", false);
  auto bundle = rest::string_field(*j, "bundle", true);
  auto selector = rest::string_field(*j, "selector", false);
  for (auto* v : {&name, &bundle, &selector}) if (!*v) return from_error(v->error());
  camp.name = *name;
  camp.bundle_id = *bundle;
  camp.selector = *selector;
  if (j->contains("strategy")) {
    if (!(*j)["strategy"].is_object()) return Api::error(400, "invalid_argument", "'strategy' must be an object");
    camp.strategy = (*j)["strategy"];
  }
  // regions: ["eu", ["us-east", "us-west"], "ap"] — one step after another;
  // a group's regions run together.
  if (!j->contains("regions") || !(*j)["regions"].is_array()) {
    return Api::error(400, "invalid_argument", "'regions' is required: the order of regions, e.g. [\"eu\", [\"us\", \"ap\"]]");
  }
  for (const auto& step : (*j)["regions"]) {
    if (step.is_string()) {
      camp.steps.push_back({step.get<std::string>()});
    } else if (step.is_array() && std::all_of(step.begin(), step.end(), [](const json& x) { return x.is_string(); })) {
      camp.steps.push_back(step.get<std::vector<std::string>>());
    } else {
      return Api::error(400, "invalid_argument", "each entry of 'regions' is a region name or a list of them");
    }
  }
  if (j->contains("threshold")) {
    auto t = threshold_field((*j)["threshold"], "threshold");
    if (!t) return from_error(t.error());
    camp.default_threshold = *t;
  }
  if (j->contains("thresholds")) {
    if (!(*j)["thresholds"].is_object()) return Api::error(400, "invalid_argument", "'thresholds' maps region to threshold");
    for (const auto& [region, tj] : (*j)["thresholds"].items()) {
      auto t = threshold_field(tj, "thresholds." + region);
      if (!t) return from_error(t.error());
      camp.thresholds[region] = *t;
    }
  }
  if (j->contains("soak")) {
    auto soak = rest::string_field(*j, "soak", true);
    if (!soak) return from_error(soak.error());
    auto d = parse_duration(*soak);
    if (!d) return Api::error(400, "invalid_argument", "soak: " + d.error().message);
    camp.soak_ms = d->count();
  }
  auto made = f.create_campaign(std::move(camp), c.caller);
  if (!made) return from_error(made.error());
  c.audit_detail = "federated campaign " + made->id + " bundle=" + made->bundle_id + " steps=" +
                   std::to_string(made->steps.size());
  return json_response(201, f.campaign_json(*made));
}

FedHandler action(const std::string& verb) {
  return [verb](Federation& f, FedContext& c) {
    if (!c.req.body.empty()) {
      auto j = rest::parse_body(c.req, {});
      if (!j) return from_error(j.error());
    }
    auto r = f.act(c.params[0], verb, c.caller);
    c.audit_detail = "federated campaign " + c.params[0] + " " + verb;
    if (!r) return from_error(r.error());
    std::string regions;
    for (const auto& a : (*r)["answers"]) {
      regions += (regions.empty() ? "" : ", ") + a.value("region", "") + "=" + a.value("answer", "");
    }
    c.audit_detail += " regions: [" + regions.substr(0, 600) + "]";
    return json_response(200, *r);
  };
}

const std::vector<FedRoute>& fed_routes() {
  static const std::vector<FedRoute> r = [] {
    std::vector<FedRoute> v;
    v.push_back({"GET", "/v1/regions", Role::admin, {}, list_regions});
    v.push_back({"POST", "/v1/regions", Role::admin, {}, add_region});
    v.push_back({"GET", "/v1/regions/{name}", Role::admin, {}, get_region});
    v.push_back({"DELETE", "/v1/regions/{name}", Role::admin, {}, remove_region});
    v.push_back({"GET", "/v1/devices", Role::viewer,
                 {"selector", "limit", "after", "region", "include_decommissioned", "certExpiresBefore", "project"},
                 list_devices});
    v.push_back({"GET", "/v1/devices/{id}", Role::viewer, {"region", "project"}, get_device});
    v.push_back({"GET", "/v1/campaigns", Role::viewer, {"region", "project"}, list_campaigns});
    v.push_back({"POST", "/v1/campaigns", Role::operator_, {}, create_campaign});
    v.push_back({"GET", "/v1/campaigns/{id}", Role::viewer, {"region", "devices", "project"}, get_campaign});
    for (const char* verb : {"pause", "resume", "abort", "rollback"}) {
      v.push_back({"POST", std::string("/v1/campaigns/{id}/") + verb, Role::operator_, {}, action(verb)});
    }
    return v;
  }();
  return r;
}

// The hub routes a federation serves as any hub does: its own API tokens,
// audit log, identity, bundles and artifacts, the API description, probes.
bool delegated(const std::vector<std::string>& p) {
  if (p.size() == 1) return p[0] == "healthz" || p[0] == "metrics";
  if (p.size() < 2 || p[0] != "v1") return false;
  static const std::set<std::string> kDelegated = {"tokens", "audit", "whoami", "bundles", "artifacts", "openapi.yaml"};
  return kDelegated.count(p[1]) > 0;
}

using Resolved = rest::Resolved<FedRoute>;

std::optional<HttpResponse> resolve(HubService& service, const HttpRequest& req, const rest::Target& t, Resolved& out) {
  return rest::resolve(service, fed_routes(), req, t, out, " on a federation (devices enroll with their regional hub)");
}

void audit_call(HubService& service, const HttpRequest& req, const Resolved& r, int status, const std::string& detail) {
  if (!rest::mutating(req.method)) return;
  AuditRecord a;
  rest::fill_actor(a, r);
  a.method = req.method;
  a.path = req.target.substr(0, req.target.find('?')).substr(0, 512);
  a.status = status;
  a.peer = req.peer;
  a.detail = detail;
  if (auto s = service.append_audit(a); !s) {
    log::get("federation")->error("audit write failed method={} path={} status={}: {}", a.method, a.path, status,
                                  s.error().message);
  }
}

}  // namespace

std::vector<std::pair<std::string, std::string>> federation_routes() {
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& r : fed_routes()) out.emplace_back(r.method, r.pattern);
  return out;
}

HttpResponse FederationApi::handle(const HttpRequest& req) {
  const rest::Target t = rest::parse_target(req.target);
  if (t.parts.size() == 1 && t.parts[0] == "readyz" && req.method == "GET") {
    if (auto bad = rest::only_params(t, {}, "GET /readyz")) return *bad;
    // A federation has no broker: it is ready once it serves.
    return json_response(200, {{"status", "ready"}, {"role", "federation"}});
  }
  if (delegated(t.parts)) return api_.handle(req);
  Resolved r;
  auto refusal = resolve(service_, req, t, r);
  if (refusal) {
    audit_call(service_, req, r, refusal->status, "");
    return *refusal;
  }
  FedContext ctx{req, t, r.caller, r.params, ""};
  HttpResponse resp = r.route->handler(fed_, ctx);
  audit_call(service_, req, r, resp.status, ctx.audit_detail);
  return resp;
}

Admission FederationApi::admit(const HttpRequest& req) {
  const rest::Target t = rest::parse_target(req.target);
  if (t.parts.size() == 1 && t.parts[0] == "readyz") return Admission{};
  if (delegated(t.parts)) return api_.admit(req);
  Admission a;
  Resolved r;
  auto refusal = resolve(service_, req, t, r);
  a.max_body = rest::mutating(req.method) ? kMaxJsonBody : kMaxNoBody;
  if (refusal) {
    audit_call(service_, req, r, refusal->status, "refused before its body was read");
    a.refusal = std::move(refusal);
  }
  return a;
}

}  // namespace flotilla::hub::federation
