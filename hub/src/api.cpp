#include "flotilla/hub/api.hpp"

#include <nlohmann/json.hpp>

#include <set>

#include "flotilla/bundles/bundle.hpp"
#include "flotilla/common/log.hpp"
#include "flotilla/common/options.hpp"

namespace flotilla::hub {

using nlohmann::json;

namespace {

struct Target {
  std::vector<std::string> parts;
  std::map<std::string, std::string> query;
};

std::string url_decode(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '%' && i + 2 < s.size() && std::isxdigit(s[i + 1]) && std::isxdigit(s[i + 2])) {
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

HttpResponse from_error(const Error& e) {
  const int status = http_status_for(e.code);
  // Internal details stay in the log; the client gets the code and a safe message.
  if (status == 500) {
    log::get("hub")->error("internal error: {}", e.message);
    return Api::error(500, "internal", "internal error; see the hub log");
  }
  return Api::error(status, std::string(errc_name(e.code)), e.message);
}

// Parses a JSON object body, refusing fields the endpoint does not know:
// a typo must not silently become a default.
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

json campaign_json(const CampaignView& v) {
  json j{{"id", v.campaign.id},
         {"name", v.campaign.name},
         {"bundle", bundle_json(v.bundle)},
         {"selector", v.campaign.selector},
         {"state", v.campaign.state},
         {"created_at", iso_ms(v.campaign.created_ms)},
         {"updated_at", iso_ms(v.campaign.updated_ms)},
         {"counts",
          {{"total", v.counts.total},
           {"pending", v.counts.pending},
           {"in_progress", v.counts.in_progress},
           {"applied", v.counts.applied},
           {"failed", v.counts.failed},
           {"superseded", v.counts.superseded},
           {"offline", v.counts.offline}}},
         {"failure_reasons", v.failure_reasons}};
  if (!v.devices.empty()) {
    json arr = json::array();
    for (const auto& d : v.devices) {
      arr.push_back({{"device_id", d.device_id}, {"status", d.status}, {"reason", d.reason},
                     {"message", d.message}, {"updated_at", iso_ms(d.updated_ms)}});
    }
    j["devices"] = arr;
  }
  return j;
}

}  // namespace

HttpResponse Api::error(int status, const std::string& code, const std::string& message) {
  return json_response(status, json{{"error", {{"code", code}, {"message", message}}}});
}

HttpResponse Api::handle(const HttpRequest& req) {
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

  // Everything else needs an API token.
  auto auth = req.headers.find("authorization");
  if (auth == req.headers.end() || auth->second.rfind("Bearer ", 0) != 0) {
    return error(401, "unauthenticated", "missing 'Authorization: Bearer <api token>'");
  }
  auto tok = service_.authenticate("api", auth->second.substr(7));
  if (!tok) return from_error(tok.error());
  if (!*tok) return error(401, "unauthenticated", "API token is unknown, expired or revoked");

  if (p.size() >= 2 && p[1] == "enrollment-tokens") {
    if (p.size() == 2 && m == "POST") {
      auto j = parse_body(req, {"name", "labels", "ttl", "max_uses"});
      if (!j) return from_error(j.error());
      TokenRecord rec;
      rec.role = "enroll";
      rec.project = (*tok)->project;
      auto name = string_field(*j, "name", false);
      if (!name) return from_error(name.error());
      rec.name = *name;
      if (j->contains("labels")) {
        if (!(*j)["labels"].is_object()) return error(400, "invalid_argument", "'labels' must be an object");
        for (const auto& [k, v] : (*j)["labels"].items()) {
          if (!v.is_string() || !valid_label_key(k) || !valid_label_value(v.get<std::string>())) {
            return error(400, "invalid_argument", "bad label '" + k + "'");
          }
          rec.labels[k] = v.get<std::string>();
        }
      }
      auto ttl = string_field(*j, "ttl", false);
      if (!ttl) return from_error(ttl.error());
      auto d = parse_duration(ttl->empty() ? "24h" : *ttl);
      if (!d) return from_error(d.error().with_context("ttl"));
      if (d->count() < 1000) return error(400, "invalid_argument", "ttl must be at least 1s");
      if (j->contains("max_uses")) {
        if (!(*j)["max_uses"].is_number_integer() || (*j)["max_uses"].get<int64_t>() < 0) {
          return error(400, "invalid_argument", "'max_uses' must be a whole number >= 0");
        }
        rec.max_uses = (*j)["max_uses"].get<int64_t>();
      }
      auto created = service_.create_token("enroll", rec, *d);
      if (!created) return from_error(created.error());
      return json_response(201, {{"id", created->record.id},
                                 {"token", created->secret},
                                 {"labels", created->record.labels},
                                 {"max_uses", created->record.max_uses},
                                 {"expires_at", bundles::format_rfc3339(created->record.expires_unix)}});
    }
    return error(405, "method_not_allowed", m + " is not allowed on " + req.target);
  }

  if (p.size() >= 2 && p[1] == "bundles") {
    if (p.size() == 2 && m == "POST") {
      if (req.body.size() > bundles::kMaxEnvelopeBytes) {
        return error(413, "too_large", "bundle is larger than " + std::to_string(bundles::kMaxEnvelopeBytes) + " bytes");
      }
      auto up = service_.upload_bundle(req.body);
      if (!up) return from_error(up.error());
      return json_response(up->second ? 201 : 200, bundle_json(up->first));
    }
    if (p.size() == 2 && m == "GET") {
      auto list = service_.list_bundles();
      if (!list) return from_error(list.error());
      json items = json::array();
      for (const auto& b : *list) items.push_back(bundle_json(b));
      return json_response(200, {{"items", items}});
    }
    if (p.size() == 3 && m == "GET") {
      auto b = service_.get_bundle(p[2]);
      if (!b) return from_error(b.error());
      if (!*b) return error(404, "not_found", "no bundle '" + p[2] + "'");
      return json_response(200, bundle_json(**b));
    }
    return error(405, "method_not_allowed", m + " is not allowed on " + req.target);
  }

  if (p.size() >= 2 && p[1] == "devices") {
    if (m != "GET") return error(405, "method_not_allowed", m + " is not allowed on " + req.target);
    if (p.size() == 2) {
      auto sel = Selector::parse(t.query.count("selector") ? t.query.at("selector") : "");
      if (!sel) return from_error(sel.error());
      int64_t limit = 500;
      if (t.query.count("limit")) {
        try {
          limit = std::stoll(t.query.at("limit"));
        } catch (const std::exception&) {
          limit = -1;
        }
        if (limit < 1 || limit > 10000) return error(400, "invalid_argument", "limit must be 1..10000");
      }
      const std::string after = t.query.count("after") ? t.query.at("after") : "";
      auto list = service_.list_devices(*sel);
      if (!list) return from_error(list.error());
      json items = json::array();
      std::string next;
      for (const auto& d : *list) {
        if (!after.empty() && d.id <= after) continue;
        if (static_cast<int64_t>(items.size()) == limit) {
          next = items.back()["id"].get<std::string>();
          break;
        }
        items.push_back(device_json(d));
      }
      return json_response(200, {{"items", items}, {"next", next}});
    }
    if (p.size() == 3) {
      auto d = service_.get_device(p[2]);
      if (!d) return from_error(d.error());
      if (!*d) return error(404, "not_found", "no device '" + p[2] + "'");
      return json_response(200, device_json(**d));
    }
  }

  if (p.size() >= 2 && p[1] == "campaigns") {
    if (p.size() == 2 && m == "POST") {
      auto j = parse_body(req, {"name", "bundle", "selector"});
      if (!j) return from_error(j.error());
      auto name = string_field(*j, "name", false);
      auto bundle = string_field(*j, "bundle", true);
      auto selector = string_field(*j, "selector", false);
      for (auto* f : {&name, &bundle, &selector}) if (!*f) return from_error(f->error());
      auto c = service_.create_campaign(*name, *bundle, *selector);
      if (!c) return from_error(c.error());
      auto v = service_.campaign_view(c->id, false);
      if (!v || !*v) return error(500, "internal", "campaign vanished after creation");
      return json_response(201, campaign_json(**v));
    }
    if (p.size() == 2 && m == "GET") {
      auto list = service_.list_campaigns();
      if (!list) return from_error(list.error());
      json items = json::array();
      for (const auto& v : *list) items.push_back(campaign_json(v));
      return json_response(200, {{"items", items}});
    }
    if (p.size() == 3 && m == "GET") {
      const bool with_devices = t.query.count("devices") && t.query.at("devices") == "true";
      auto v = service_.campaign_view(p[2], with_devices);
      if (!v) return from_error(v.error());
      if (!*v) return error(404, "not_found", "no campaign '" + p[2] + "'");
      return json_response(200, campaign_json(**v));
    }
    return error(405, "method_not_allowed", m + " is not allowed on " + req.target);
  }

  return error(404, "not_found", "no route for " + m + " " + req.target);
}

}  // namespace flotilla::hub
