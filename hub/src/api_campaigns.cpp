// Campaigns: create with a strategy, follow per wave, steer (pause, resume,
// abort, rollback).
#include "api_internal.hpp"

namespace flotilla::hub::rest {

namespace {

json counts_json(const CampaignCounts& n) {
  return {{"total", n.total},           {"waiting", n.waiting},       {"pending", n.pending},
          {"in_progress", n.in_progress}, {"applied", n.applied},     {"failed", n.failed},
          {"superseded", n.superseded}, {"skipped", n.skipped},       {"rolling_back", n.rolling_back},
          {"rolled_back", n.rolled_back}, {"rollback_failed", n.rollback_failed}, {"offline", n.offline}};
}

json campaign_json(const CampaignView& v) {
  json waves = json::array();
  for (const auto& w : v.waves) {
    std::string state = w.index < v.campaign.current_wave ? "done"
                        : w.index == v.campaign.current_wave ? (v.campaign.state == CampaignState::completed ? "done" : "current")
                                                             : "next";
    waves.push_back({{"index", w.index}, {"name", w.name}, {"state", state}, {"counts", counts_json(w.counts)}});
  }
  json j{{"id", v.campaign.id},
         {"name", v.campaign.name},
         {"project", v.campaign.project},
         {"bundle", bundle_json(v.bundle)},
         {"selector", v.campaign.selector},
         {"state", state_name(v.campaign.state)},
         {"state_reason", v.campaign.state_reason},
         {"strategy", v.strategy.to_json()},
         {"current_wave", v.campaign.current_wave},
         {"waves", waves},
         {"created_at", iso_ms(v.campaign.created_ms)},
         {"updated_at", iso_ms(v.campaign.updated_ms)},
         {"counts", counts_json(v.counts)},
         {"failure_reasons", v.failure_reasons},
         {"away", v.away}};
  // Each cell's share, counted by the hub that owns the cell (as it last
  // published it, for a cell of another hub process).
  json cells = json::array();
  for (const auto& cell : v.cells) {
    const CellSummary n = summarize(cell.rows);
    cells.push_back({{"cell", cell.cell},
                     {"total", n.total},
                     {"applied", n.applied},
                     {"failed", n.failed},
                     {"pending", n.pending},
                     {"online", n.online},
                     {"updated", iso_ms(cell.updated_ms)}});
  }
  j["cells"] = cells;
  if (v.campaign.state == CampaignState::waiting_approval) {
    j["waiting_for_approval"] = v.strategy.wave_name(v.campaign.current_wave + 1);
  }
  if (v.strategy.rate.enabled()) j["rate_per_minute"] = v.strategy.rate.per_minute(v.counts.applied);
  if (!v.devices.empty()) {
    json arr = json::array();
    for (const auto& d : v.devices) {
      arr.push_back({{"device_id", d.device_id}, {"wave", d.wave}, {"status", d.status}, {"reason", d.reason},
                     {"message", d.message}, {"updated_at", iso_ms(d.updated_ms)},
                     {"released_at_ms", d.released_ms}, {"updated_at_ms", d.updated_ms}});
    }
    j["devices"] = arr;
  }
  return j;
}

// A campaign is visible to tokens of its project (and to "*" tokens).
Result<CampaignView> visible_campaign(HubService& s, const Caller& caller, const std::string& id, bool with_devices) {
  auto v = s.campaign_view(id, with_devices);
  if (!v) return v.error();
  if (!*v || !caller.sees((*v)->campaign.project)) {
    return make_error(Errc::not_found, "no campaign '" + id + "'");
  }
  return std::move(**v);
}

HttpResponse create_campaign(HubService& s, Context& c) {
  auto j = parse_body(c.req, {"name", "bundle", "selector", "strategy"});
  if (!j) return from_error(j.error());
  auto name = string_field(*j, "name", false);
  auto bundle = string_field(*j, "bundle", true);
  auto selector = string_field(*j, "selector", false);
  for (auto* f : {&name, &bundle, &selector}) if (!*f) return from_error(f->error());
  auto strategy = Strategy::from_json(j->contains("strategy") ? (*j)["strategy"] : json());
  if (!strategy) return from_error(strategy.error());
  auto created = s.create_campaign(*name, *bundle, *selector, *strategy, c.caller.project);
  if (!created) return from_error(created.error());
  auto v = s.campaign_view(created->id, false);
  if (!v || !*v) return Api::error(500, "internal", "campaign vanished after creation");
  c.audit_detail = "campaign " + created->id + " bundle=" + created->bundle_id + " selector=" + created->selector;
  return json_response(201, campaign_json(**v));
}

HttpResponse list_campaigns(HubService& s, Context& c) {
  auto caller = reading_caller(c);
  if (!caller) return from_error(caller.error());
  auto list = s.list_campaigns(caller->project);
  if (!list) return from_error(list.error());
  json items = json::array();
  for (const auto& v : *list) items.push_back(campaign_json(v));
  return json_response(200, {{"items", items}});
}

HttpResponse get_campaign(HubService& s, Context& c) {
  const bool with_devices = c.target.query.count("devices") && c.target.query.at("devices") == "true";
  auto caller = reading_caller(c);
  if (!caller) return from_error(caller.error());
  auto v = visible_campaign(s, *caller, c.params[0], with_devices);
  if (!v) return from_error(v.error());
  json j = campaign_json(*v);
  // The first failures with device and reason: what a status block shows
  // without listing every device of a large campaign.
  auto failures = s.campaign_failures(v->campaign.id, 10);
  if (!failures) return from_error(failures.error());
  j["first_failures"] = json::array();
  for (const auto& f : *failures) {
    j["first_failures"].push_back({{"device_id", f.device_id}, {"wave", f.wave}, {"status", f.status},
                                   {"reason", f.reason}, {"message", f.message}, {"updated_at", iso_ms(f.updated_ms)}});
  }
  return json_response(200, j);
}

Handler action(const std::string& verb) {
  return [verb](HubService& s, Context& c) {
    if (!c.req.body.empty()) {
      auto j = parse_body(c.req, {});
      if (!j) return from_error(j.error());
    }
    auto v = visible_campaign(s, c.caller, c.params[0], false);
    if (!v) return from_error(v.error());
    auto r = s.campaign_action(c.params[0], verb);
    c.audit_detail = "campaign " + c.params[0] + " " + verb;
    if (!r) return from_error(r.error());
    auto after = s.campaign_view(c.params[0], false);
    if (!after || !*after) return Api::error(500, "internal", "campaign vanished");
    return json_response(200, campaign_json(**after));
  };
}

}  // namespace

void add_campaign_routes(std::vector<Route>& r) {
  r.push_back({"POST", "/v1/campaigns", Role::operator_, {}, create_campaign});
  r.push_back({"GET", "/v1/campaigns", Role::viewer, {"project"}, list_campaigns});
  r.push_back({"GET", "/v1/campaigns/{id}", Role::viewer, {"devices", "project"}, get_campaign});
  for (const char* verb : {"pause", "resume", "abort", "rollback", "approve"}) {
    r.push_back({"POST", std::string("/v1/campaigns/{id}/") + verb, Role::operator_, {}, action(verb)});
  }
}

}  // namespace flotilla::hub::rest
