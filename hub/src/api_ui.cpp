// The dashboard's reads (docs/api/openapi.yaml, tag "views"): who is
// calling, the fleet's counts, device lists filtered and paged in the store,
// a device's detail, campaigns with their waves, failures and timeline,
// bundles, the audit log, and the event streams the UI listener holds open.
// Every figure comes from AggregateStore (bounded SQL); nothing here loads a
// fleet. Every answer is scoped to the caller's project.
#include <algorithm>
#include <set>

#include "api_internal.hpp"
#include "flotilla/bundles/bundle.hpp"
#include "flotilla/hub/aggregates.hpp"

namespace flotilla::hub::rest {

namespace {

Result<std::optional<bool>> bool_param(const Context& c, const std::string& key) {
  const auto& q = c.target.query;
  if (!q.count(key) || q.at(key).empty()) return std::optional<bool>();
  if (q.at(key) == "true") return std::optional<bool>(true);
  if (q.at(key) == "false") return std::optional<bool>(false);
  return make_error(Errc::invalid_argument, key + " must be true or false");
}

std::string param(const Context& c, const std::string& key) {
  return c.target.query.count(key) ? c.target.query.at(key) : "";
}

AggregateStore* aggregates(HubService& s) { return s.aggregates(); }

HttpResponse no_aggregates() {
  return Api::error(503, "unavailable", "the hub's read models are not open (the hub is starting or stopping)");
}

// ---- JSON ------------------------------------------------------------------

json counts_json(const CampaignCounts& n) {
  return {{"total", n.total},           {"waiting", n.waiting},       {"pending", n.pending},
          {"in_progress", n.in_progress}, {"applied", n.applied},     {"failed", n.failed},
          {"superseded", n.superseded}, {"skipped", n.skipped},       {"rolling_back", n.rolling_back},
          {"rolled_back", n.rolled_back}, {"rollback_failed", n.rollback_failed}, {"offline", n.offline}};
}

bool unfinished(const std::string& status) {
  return status == "waiting" || status == "pending" || status == "in_progress" || status == "rolling_back";
}

json device_item(const DeviceRecord& d) {
  return json{{"id", d.id},
              {"project", d.project},
              {"hostname", d.hostname},
              {"labels", d.labels},
              {"state", d.state},
              {"online", d.online},
              {"applied_bundle", d.applied_bundle},
              {"applied_version", d.applied_version},
              {"k3s_version", d.k3s_version},
              {"agent_version", d.agent_version},
              {"arch", d.arch},
              {"node_ready", d.node_ready},
              {"last_reason", d.last_reason},
              {"last_message", d.last_message},
              {"enrolled_at", iso_ms(d.enrolled_ms)},
              {"last_seen_at", iso_ms(d.last_seen_ms)},
              {"campaign_id", d.campaign_id},
              {"gateway", d.gateway}};
}

// The engine's rules for operator actions (campaign_engine.cpp,
// HubService::campaign_action), so the UI offers only what can succeed; the
// hub still decides. A unit test holds the two together.
json allowed_actions(CampaignState state) {
  const bool runs = campaign_runs(state);
  json a = json::array();
  if (runs) a.push_back("pause");
  if (state == CampaignState::paused) a.push_back("resume");
  if (state == CampaignState::waiting_approval) a.push_back("approve");
  if (runs || state == CampaignState::paused) a.push_back("abort");
  if (state != CampaignState::rolling_back && state != CampaignState::rolled_back) a.push_back("rollback");
  return a;
}

// A campaign's state, counts by state and by wave (measured: from
// campaign_counts, never estimated), and what an operator may do now.
json campaign_summary_json(const CampaignSummary& cs) {
  const auto& c = cs.campaign;
  const Strategy strategy = strategy_of(c);
  CampaignCounts total;
  std::vector<CampaignCounts> waves(static_cast<size_t>(std::max(1, strategy.wave_count())));
  for (const auto& row : cs.counts) {
    total.add(row.status, row.count);
    if (unfinished(row.status) && !row.online) total.offline += row.count;
    if (row.wave >= 0 && row.wave < static_cast<int>(waves.size())) {
      auto& w = waves[static_cast<size_t>(row.wave)];
      w.add(row.status, row.count);
      if (unfinished(row.status) && !row.online) w.offline += row.count;
    }
  }
  json wj = json::array();
  for (size_t i = 0; i < waves.size(); ++i) {
    const int index = static_cast<int>(i);
    const std::string state = index < c.current_wave ? "done"
                              : index == c.current_wave ? (c.state == CampaignState::completed ? "done" : "current")
                                                        : "next";
    wj.push_back({{"index", index},
                  {"name", strategy.wave_name(index)},
                  {"state", state},
                  {"needs_approval", strategy.needs_approval(index) && index > c.approved_wave},
                  {"counts", counts_json(waves[i])}});
  }
  json j{{"id", c.id},
         {"name", c.name},
         {"project", c.project},
         {"state", state_name(c.state)},
         {"state_reason", c.state_reason},
         {"bundle", {{"id", c.bundle_id}, {"name", cs.bundle_name}, {"channel", cs.bundle_channel},
                     {"version", cs.bundle_version}}},
         {"selector", c.selector},
         {"strategy", strategy.to_json()},
         {"current_wave", c.current_wave},
         {"created_at", iso_ms(c.created_ms)},
         {"updated_at", iso_ms(c.updated_ms)},
         {"counts", counts_json(total)},
         {"waves", wj},
         {"actions", allowed_actions(c.state)}};
  if (c.state == CampaignState::waiting_approval) j["waiting_for_approval"] = strategy.wave_name(c.current_wave + 1);
  if (strategy.rate.enabled()) j["rate_per_minute"] = strategy.rate.per_minute(total.applied);
  return j;
}

json point_json(const TimelinePoint& p) {
  return {{"t", p.time_ms},         {"state", p.state},     {"total", p.total},   {"waiting", p.waiting},
          {"in_flight", p.in_flight}, {"applied", p.applied}, {"failed", p.failed}, {"rolled_back", p.rolled_back},
          {"other", p.other},       {"offline", p.offline}};
}

// ---- what a caller may see ------------------------------------------------

Result<CampaignSummary> visible_campaign(AggregateStore& a, const Caller& caller, const std::string& id) {
  auto c = a.campaign(id);
  if (!c) return c.error();
  if (!*c || !caller.sees((*c)->campaign.project)) return make_error(Errc::not_found, "no campaign '" + id + "'");
  return std::move(**c);
}

Result<json> campaign_view_json(AggregateStore& a, const Caller& caller, const std::string& id, int64_t now_ms) {
  auto cs = visible_campaign(a, caller, id);
  if (!cs) return cs.error();
  json j = campaign_summary_json(*cs);
  auto groups = a.failure_groups(id, 20, 5);
  if (!groups) return groups.error();
  json fg = json::array();
  for (const auto& g : *groups) {
    json first = json::array();
    for (const auto& d : g.first) {
      first.push_back({{"device_id", d.id}, {"message", d.message}, {"updated_at", iso_ms(d.updated_ms)}});
    }
    fg.push_back({{"reason", g.reason}, {"count", g.count}, {"first", first}});
  }
  j["failure_groups"] = fg;
  json away = json::array();
  if (const int64_t offline = j["counts"]["offline"].get<int64_t>(); offline > 0) {
    const auto& n = j["counts"];
    const int64_t unfinished = n["waiting"].get<int64_t>() + n["pending"].get<int64_t>() +
                               n["in_progress"].get<int64_t>() + n["rolling_back"].get<int64_t>();
    int64_t fleet_offline = 0;
    if (auto f = a.fleet("*"); f) {
      for (const auto& r : *f) fleet_offline += r.dim == "online" && r.value == "offline" ? r.n : 0;
    }
    auto ids = a.away(id, 20, offline, unfinished, fleet_offline);
    if (!ids) return ids.error();
    for (const auto& d : *ids) away.push_back(d);
  }
  j["away"] = away;
  // The counts as a timeline point, so a live page can extend its chart.
  const auto& n = j["counts"];
  j["sample"] = {{"t", now_ms},
                 {"applied", n["applied"]},
                 {"failed", n["failed"].get<int64_t>() + n["rollback_failed"].get<int64_t>()},
                 {"in_flight", n["pending"].get<int64_t>() + n["in_progress"].get<int64_t>() +
                                   n["rolling_back"].get<int64_t>()},
                 {"waiting", n["waiting"]},
                 {"rolled_back", n["rolled_back"]},
                 {"offline", n["offline"]}};
  return j;
}

// Certificate expiry by bucket (cert_expiry_counts); devices with none are
// "not_reported" or "none".
json cert_buckets(const std::vector<FleetCount>& rows, const char* dim, const char* rest, int64_t total,
                  int64_t now_unix) {
  const CertExpiryCounts c = cert_expiry_counts(rows, dim, now_unix);
  return {{"expired", c.expired},
          {"within_7_days", c.within_7_days},
          {"within_30_days", c.within_30_days},
          {"later", c.later},
          {rest, std::max<int64_t>(0, total - c.expired - c.within_7_days - c.within_30_days - c.later)}};
}

Result<json> fleet_json(AggregateStore& a, const Caller& caller, int64_t now_ms) {
  auto rows = a.fleet(caller.project);
  if (!rows) return rows.error();
  std::map<std::string, std::vector<const FleetCount*>> by;
  for (const auto& r : *rows) by[r.dim].push_back(&r);
  int64_t total = 0, decommissioned = 0;
  for (const auto* r : by["state"]) {
    if (r->value == "decommissioned") decommissioned += r->n;
    else total += r->n;
  }
  // The largest values first, at most 50 of each; the rest summed as "others".
  auto dim = [&](const std::string& name) {
    auto v = by[name];
    std::sort(v.begin(), v.end(), [](const FleetCount* x, const FleetCount* y) {
      return x->n != y->n ? x->n > y->n : x->value < y->value;
    });
    json items = json::array();
    int64_t others = 0;
    for (size_t i = 0; i < v.size(); ++i) {
      if (name == "state" && v[i]->value == "decommissioned") continue;
      if (items.size() < 50) items.push_back({{"value", v[i]->value}, {"count", v[i]->n}});
      else others += v[i]->n;
    }
    return json{{"items", items}, {"others", others}};
  };
  int64_t online = 0;
  for (const auto* r : by["online"]) online += r->value == "online" ? r->n : 0;
  json j{{"project", caller.project},
         {"total", total},
         {"decommissioned", decommissioned},
         {"online", online},
         {"offline", total - online},
         {"states", dim("state")},
         {"versions", dim("version")},
         {"k3s_versions", dim("k3s")},
         {"agent_versions", dim("agent")},
         {"regions", dim("region")},
         {"cells", dim("cell")},
         {"certificates", cert_buckets(*rows, "cert_day", "not_reported", total, now_ms / 1000)},
         {"broker_certificates", cert_buckets(*rows, "broker_cert_day", "none", total, now_ms / 1000)},
         {"generated_at", iso_ms(now_ms)}};
  return j;
}

Result<json> campaigns_json(AggregateStore& a, const Caller& caller, const std::string& state, const std::string& after,
                            int64_t limit) {
  auto page = a.campaigns(caller.project, state, after, limit);
  if (!page) return page.error();
  json items = json::array();
  for (const auto& cs : page->items) items.push_back(campaign_summary_json(cs));
  return json{{"items", items}, {"next", page->next}};
}

Result<json> device_detail_json(AggregateStore& a, const Caller& caller, const std::string& id) {
  auto d = a.device(id);
  if (!d) return d.error();
  // Another project's device is "not found": its existence is not ours to tell.
  if (!*d || !caller.sees((*d)->device.project)) return make_error(Errc::not_found, "no device '" + id + "'");
  const auto& dd = **d;
  json j = device_item(dd.device);
  j["last_seq"] = dd.device.last_seq;
  j["generation"] = dd.device.generation;
  j["desired_bundle_id"] = dd.device.desired_bundle_id;
  if (dd.inventory) {
    const auto& inv = *dd.inventory;
    j["inventory"] = {{"os", inv.os},
                      {"k3s_cert_expires_at", iso_s(inv.cert_expiry_unix)},
                      {"disk_free_bytes", inv.disk_free_bytes},
                      {"disk_total_bytes", inv.disk_total_bytes},
                      {"mem_free_bytes", inv.mem_free_bytes},
                      {"mem_total_bytes", inv.mem_total_bytes},
                      {"reported_at", iso_ms(inv.updated_ms)}};
  } else {
    j["inventory"] = nullptr;
  }
  json failures = json::array();
  for (const auto& o : dd.failures) {
    failures.push_back({{"time", iso_ms(o.time_ms)},
                        {"seq", o.seq},
                        {"state", o.state},
                        {"reason", o.reason},
                        {"message", o.message},
                        {"campaign_id", o.campaign_id},
                        {"bundle_id", o.bundle_id},
                        {"applied_bundle", o.applied_bundle},
                        {"applied_version", o.applied_version}});
  }
  j["recent_failures"] = failures;
  json campaigns = json::array();
  for (const auto& r : dd.campaigns) {
    // Campaigns of another project (a device moved projects) stay private to it.
    campaigns.push_back({{"campaign_id", r.row.campaign_id},
                         {"campaign_name", r.campaign_name},
                         {"campaign_state", r.campaign_state},
                         {"bundle", r.bundle_name},
                         {"bundle_version", r.bundle_version},
                         {"wave", r.row.wave},
                         {"status", r.row.status},
                         {"reason", r.row.reason},
                         {"message", r.row.message},
                         {"released_at", iso_ms(r.row.released_ms)},
                         {"updated_at", iso_ms(r.row.updated_ms)}});
  }
  j["campaigns"] = campaigns;
  return j;
}

// ---- handlers --------------------------------------------------------------

HttpResponse whoami(HubService&, Context& c) {
  const bool op = c.caller.role >= Role::operator_;
  return json_response(200, {{"token_id", c.caller.token_id},
                             {"name", c.caller.name},
                             {"role", role_name(c.caller.role)},
                             {"project", c.caller.project},
                             {"may", {{"campaign_actions", op}, {"cells", op}, {"audit", c.caller.role >= Role::admin}}}});
}

HttpResponse view_fleet(HubService& s, Context& c) {
  auto* a = aggregates(s);
  if (!a) return no_aggregates();
  auto j = fleet_json(*a, c.caller, s.clock().now_unix_ms());
  if (!j) return from_error(j.error());
  return json_response(200, *j);
}

HttpResponse view_devices(HubService& s, Context& c) {
  auto* a = aggregates(s);
  if (!a) return no_aggregates();
  DeviceQuery q;
  q.project = c.caller.project;
  auto sel = Selector::parse(param(c, "selector"));
  if (!sel) return from_error(sel.error());
  q.selector = *sel;
  q.state = param(c, "state");
  if (q.state.size() > 64) return Api::error(400, "invalid_argument", "state is too long");
  auto online = bool_param(c, "online");
  if (!online) return from_error(online.error());
  q.online = *online;
  if (c.target.query.count("bundle")) q.bundle = param(c, "bundle");
  if (c.target.query.count("version")) {
    if (!q.bundle || q.bundle->empty()) {
      return Api::error(400, "invalid_argument", "version needs bundle (a version is a bundle's)");
    }
    auto v = int_param(c, "version", 0, 1, INT64_MAX);
    if (!v) return from_error(v.error());
    q.version = static_cast<uint64_t>(*v);
  }
  if (c.target.query.count("k3s")) q.k3s = param(c, "k3s");
  q.text = param(c, "q");
  if (c.target.query.count("cert_within_days")) {
    auto d = int_param(c, "cert_within_days", 30, 0, 3650);
    if (!d) return from_error(d.error());
    q.cert_before_unix = s.clock().now_unix() + *d * 86400;
  }
  auto inc = bool_param(c, "include_decommissioned");
  if (!inc) return from_error(inc.error());
  q.include_decommissioned = inc->value_or(false);
  if (c.target.query.count("sort")) {
    auto sort = parse_device_sort(param(c, "sort"));
    if (!sort) return Api::error(400, "invalid_argument", "sort must be id, hostname, enrolled or cert_expiry");
    q.sort = *sort;
  }
  const std::string order = param(c, "order");
  if (!order.empty() && order != "asc" && order != "desc") {
    return Api::error(400, "invalid_argument", "order must be asc or desc");
  }
  q.descending = order == "desc";
  q.after = param(c, "after");
  auto limit = int_param(c, "limit", 50, 1, 500);
  if (!limit) return from_error(limit.error());
  q.limit = *limit;
  q.scan_limit = a->device_scan_limit();
  auto page = a->devices(q);
  if (!page) return from_error(page.error());
  json items = json::array();
  for (const auto& d : page->items) items.push_back(device_item(d));
  return json_response(200, {{"items", items},
                             {"next", page->next},
                             {"scanned", page->scanned},
                             {"complete", page->complete},
                             {"sort", sort_name(page->sort)},
                             {"order", page->descending ? "desc" : "asc"},
                             {"index", page->index}});
}

HttpResponse view_device(HubService& s, Context& c) {
  auto* a = aggregates(s);
  if (!a) return no_aggregates();
  auto j = device_detail_json(*a, c.caller, c.params[0]);
  if (!j) return from_error(j.error());
  return json_response(200, *j);
}

HttpResponse view_campaigns(HubService& s, Context& c) {
  auto* a = aggregates(s);
  if (!a) return no_aggregates();
  auto limit = int_param(c, "limit", 50, 1, 200);
  if (!limit) return from_error(limit.error());
  auto j = campaigns_json(*a, c.caller, param(c, "state"), param(c, "after"), *limit);
  if (!j) return from_error(j.error());
  return json_response(200, *j);
}

HttpResponse view_campaign(HubService& s, Context& c) {
  auto* a = aggregates(s);
  if (!a) return no_aggregates();
  auto j = campaign_view_json(*a, c.caller, c.params[0], s.clock().now_unix_ms());
  if (!j) return from_error(j.error());
  return json_response(200, *j);
}

HttpResponse view_timeline(HubService& s, Context& c) {
  auto* a = aggregates(s);
  if (!a) return no_aggregates();
  auto cs = visible_campaign(*a, c.caller, c.params[0]);
  if (!cs) return from_error(cs.error());
  auto points = a->timeline(c.params[0]);
  if (!points) return from_error(points.error());
  json pj = json::array();
  for (const auto& p : *points) pj.push_back(point_json(p));
  return json_response(200, {{"campaign_id", c.params[0]},
                             {"interval_ms", a->sample_interval().count()},
                             {"points", pj}});
}

HttpResponse view_bundles(HubService& s, Context& c) {
  auto* a = aggregates(s);
  if (!a) return no_aggregates();
  auto limit = int_param(c, "limit", 50, 1, 200);
  if (!limit) return from_error(limit.error());
  auto page = a->bundles(c.caller.project, param(c, "after"), *limit);
  if (!page) return from_error(page.error());
  const int64_t now = s.clock().now_unix();
  json items = json::array();
  for (const auto& b : page->items) {
    json j = bundle_json(b);
    j["project"] = b.project;
    j["expired"] = b.expires_unix != 0 && b.expires_unix <= now;
    j["expires_in_s"] = b.expires_unix != 0 ? b.expires_unix - now : 0;
    items.push_back(j);
  }
  return json_response(200, {{"items", items}, {"next", page->next}});
}

HttpResponse view_audit(HubService& s, Context& c) {
  auto* a = aggregates(s);
  if (!a) return no_aggregates();
  auto limit = int_param(c, "limit", 50, 1, 500);
  if (!limit) return from_error(limit.error());
  auto before = int_param(c, "before", 0, 0, INT64_MAX);
  if (!before) return from_error(before.error());
  auto page = a->audit(c.caller.project, *before, *limit);
  if (!page) return from_error(page.error());
  json items = json::array();
  for (const auto& e : page->items) {
    items.push_back({{"id", e.id},
                     {"time", iso_ms(e.time_ms)},
                     {"actor", e.actor},
                     {"actor_name", e.actor_name},
                     {"role", e.role},
                     {"project", e.project},
                     {"method", e.method},
                     {"path", e.path},
                     {"detail", e.detail},
                     {"status", e.status},
                     {"peer", e.peer}});
  }
  return json_response(200, {{"items", items}, {"next_before", page->next_before}});
}

// The topic of a stream, checked: it exists and the caller may see it.
Result<std::string> stream_topic(HubService& s, const Context& c) {
  const std::string topic = param(c, "topic");
  const std::string id = param(c, "id");
  if (topic == "fleet" || topic == "campaigns") {
    if (!id.empty()) return make_error(Errc::invalid_argument, "topic " + topic + " takes no id");
    return topic;
  }
  if (topic != "campaign" && topic != "device") {
    return make_error(Errc::invalid_argument, "topic must be fleet, campaigns, campaign or device");
  }
  if (id.empty()) return make_error(Errc::invalid_argument, "topic " + topic + " needs an id");
  auto snap = event_snapshot(s, c.caller, topic + ":" + id);
  if (!snap) return snap.error();
  return topic + ":" + id;
}

HttpResponse events(HubService& s, Context& c) {
  if (!aggregates(s)) return no_aggregates();
  if (!c.req.event_streams) {
    return Api::error(400, "invalid_argument", "event streams are served on the UI listener (ui-listen), not here");
  }
  auto topic = stream_topic(s, c);
  if (!topic) return from_error(topic.error());
  HttpResponse r;
  r.content_type = "text/event-stream";
  r.event_topic = *topic;
  return r;
}

}  // namespace

Result<json> event_snapshot(HubService& s, const Caller& caller, const std::string& topic) {
  auto* a = aggregates(s);
  if (!a) return make_error(Errc::unavailable, "the hub's read models are not open");
  const int64_t now = s.clock().now_unix_ms();
  if (topic == "fleet") return fleet_json(*a, caller, now);
  if (topic == "campaigns") return campaigns_json(*a, caller, "", "", 20);
  if (topic.rfind("campaign:", 0) == 0) return campaign_view_json(*a, caller, topic.substr(9), now);
  if (topic.rfind("device:", 0) == 0) return device_detail_json(*a, caller, topic.substr(7));
  return make_error(Errc::invalid_argument, "unknown topic '" + topic + "'");
}

void add_ui_routes(std::vector<Route>& r) {
  r.push_back({"GET", "/v1/whoami", Role::viewer, {}, whoami});
  r.push_back({"GET", "/v1/views/fleet", Role::viewer, {}, view_fleet});
  r.push_back({"GET", "/v1/views/devices", Role::viewer,
               {"selector", "state", "online", "bundle", "version", "k3s", "q", "cert_within_days",
                "include_decommissioned", "sort", "order", "after", "limit"},
               view_devices});
  r.push_back({"GET", "/v1/views/devices/{id}", Role::viewer, {}, view_device});
  r.push_back({"GET", "/v1/views/campaigns", Role::viewer, {"state", "after", "limit"}, view_campaigns});
  r.push_back({"GET", "/v1/views/campaigns/{id}", Role::viewer, {}, view_campaign});
  r.push_back({"GET", "/v1/views/campaigns/{id}/timeline", Role::viewer, {}, view_timeline});
  r.push_back({"GET", "/v1/views/bundles", Role::viewer, {"after", "limit"}, view_bundles});
  r.push_back({"GET", "/v1/views/audit", Role::admin, {"before", "limit"}, view_audit});
  r.push_back({"GET", "/v1/events", Role::viewer, {"topic", "id"}, events});
}

}  // namespace flotilla::hub::rest
