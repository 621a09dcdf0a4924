// Campaigns.
#include "api_internal.hpp"

namespace flotilla::hub::rest {

namespace {

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

HttpResponse create_campaign(HubService& s, Context& c) {
  auto j = parse_body(c.req, {"name", "bundle", "selector"});
  if (!j) return from_error(j.error());
  auto name = string_field(*j, "name", false);
  auto bundle = string_field(*j, "bundle", true);
  auto selector = string_field(*j, "selector", false);
  for (auto* f : {&name, &bundle, &selector}) if (!*f) return from_error(f->error());
  auto created = s.create_campaign(*name, *bundle, *selector);
  if (!created) return from_error(created.error());
  auto v = s.campaign_view(created->id, false);
  if (!v || !*v) return Api::error(500, "internal", "campaign vanished after creation");
  c.audit_detail = "campaign " + created->id;
  return json_response(201, campaign_json(**v));
}

HttpResponse list_campaigns(HubService& s, Context&) {
  auto list = s.list_campaigns();
  if (!list) return from_error(list.error());
  json items = json::array();
  for (const auto& v : *list) items.push_back(campaign_json(v));
  return json_response(200, {{"items", items}});
}

HttpResponse get_campaign(HubService& s, Context& c) {
  const bool with_devices = c.target.query.count("devices") && c.target.query.at("devices") == "true";
  auto v = s.campaign_view(c.params[0], with_devices);
  if (!v) return from_error(v.error());
  if (!*v) return Api::error(404, "not_found", "no campaign '" + c.params[0] + "'");
  return json_response(200, campaign_json(**v));
}

}  // namespace

void add_campaign_routes(std::vector<Route>& r) {
  r.push_back({"POST", "/v1/campaigns", Role::operator_, create_campaign});
  r.push_back({"GET", "/v1/campaigns", Role::viewer, list_campaigns});
  r.push_back({"GET", "/v1/campaigns/{id}", Role::viewer, get_campaign});
}

}  // namespace flotilla::hub::rest
