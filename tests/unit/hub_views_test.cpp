// [unit] The dashboard's API (/v1/whoami, /v1/views/..., /v1/events) over a
// real HubService, SQLite store and read models, and the UI listener's
// routing (ui_route): what it serves, with which headers, and what it
// refuses to pass to the API.
#include <catch2/catch.hpp>

#include <algorithm>
#include <regex>
#include <set>

#include "flotilla/hub/aggregates.hpp"
#include "flotilla/hub/api.hpp"
#include "flotilla/hub/ui_server.hpp"
#include "tests/support/campaign_fleet.hpp"
#include "tests/support/store_helpers.hpp"

using namespace flotilla;
using namespace flotilla::hub;
using flotilla::test::body_of;
using flotilla::test::error_code;
using nlohmann::json;

namespace {

// A hub with its read models, the API over it, and tokens to call it with.
struct Views {
  test::Fleet f;
  std::unique_ptr<AggregateStore> agg;
  std::unique_ptr<Api> api;
  explicit Views(AggregateStore::Config cfg = {}) {
    auto a = AggregateStore::open((f.dir.path() / "hub.db").string(), cfg);
    REQUIRE(a);
    agg = std::move(*a);
    f.hub->set_aggregates(agg.get());
    api = std::make_unique<Api>(*f.hub);
  }
  ~Views() { f.hub->set_aggregates(nullptr); }

  std::string token(const std::string& role, const std::string& project) {
    TokenRecord t;
    t.name = role + "-" + project;
    t.role = role;
    t.project = project;
    auto tok = f.hub->create_token("api", t);
    REQUIRE(tok);
    return tok->secret;
  }
  // Devices of another project (the fleet's own enroll() uses "default").
  std::vector<std::string> enroll_project(int n, const std::string& project, const Labels& labels) {
    TokenRecord t;
    t.role = "enroll";
    t.project = project;
    t.labels = labels;
    auto tok = f.hub->create_token("enroll", t);
    REQUIRE(tok);
    std::vector<std::string> ids;
    for (int i = 0; i < n; ++i) {
      auto k = bundles::generate_key();
      v1::EnrollRequest req;
      req.set_enrollment_token(tok->secret);
      req.set_device_public_key(std::string(k.pub.key.begin(), k.pub.key.end()));
      auto proof = bundles::sign_detached(k, bundles::enroll_proof_message(tok->secret, k.pub.key));
      req.set_proof(std::string(proof.begin(), proof.end()));
      req.set_hostname(project + "-" + std::to_string(i));
      auto r = f.hub->enroll(req);
      REQUIRE(r);
      ids.push_back(r->device_id());
      f.presence(r->device_id(), true);
    }
    return ids;
  }
  HttpResponse call(const std::string& method, const std::string& target, const std::string& secret,
                    bool streams = false) {
    HttpRequest req;
    req.method = method;
    req.target = target;
    req.peer = "127.0.0.1";
    if (!secret.empty()) req.headers["authorization"] = "Bearer " + secret;
    req.event_streams = streams;
    return api->handle(req);
  }
  json get(const std::string& target, const std::string& secret) {
    auto r = call("GET", target, secret);
    INFO(target << " -> " << r.body);
    REQUIRE(r.status == 200);
    return body_of(r);
  }
};

using flotilla::test::ids_of;

}  // namespace

TEST_CASE("hub views: the fleet counts each device's latest unrevoked broker certificate by expiry",
          "[unit][hub][views][certs]") {
  Views v;
  v.f.enroll(4, {{"env", "prod"}});
  const auto blue = v.enroll_project(2, "blue", {{"env", "prod"}});
  const auto admin = v.token("admin", "*");
  const auto blue_viewer = v.token("viewer", "blue");
  // Before any certificate: every device has none.
  json f = v.get("/v1/views/fleet", admin);
  CHECK(f["broker_certificates"] ==
        json({{"expired", 0}, {"within_7_days", 0}, {"within_30_days", 0}, {"later", 0}, {"none", 6}}));

  const int64_t now = v.f.clock.now_unix();
  int serial = 0;
  auto issue = [&](const std::string& id, int64_t not_after) {
    DeviceCertRecord c;
    c.serial = "5e" + std::to_string(++serial);
    c.device_id = id;
    c.not_before = now - 86400;
    c.not_after = not_after;
    c.issued_ms = v.f.clock.now_unix_ms() + serial;
    REQUIRE(v.f.store->insert_device_cert(c));
    return c.serial;
  };
  const auto& d = v.f.devices;
  issue(d[0], now + 3 * 86400);       // within 7 days
  issue(d[1], now + 20 * 86400);      // renewed: only the new one counts
  issue(d[1], now + 80 * 86400);      //   later
  issue(d[2], now - 2 * 86400);       // expired, not yet forgotten
  issue(d[3], now + 5 * 86400);       // revoked below: none
  REQUIRE(v.f.store->revoke_device_certs(d[3], v.f.clock.now_unix_ms()));
  issue(blue[0], now + 15 * 86400);   // within 30 days
  f = v.get("/v1/views/fleet", admin);
  CHECK(f["broker_certificates"] ==
        json({{"expired", 1}, {"within_7_days", 1}, {"within_30_days", 1}, {"later", 1}, {"none", 2}}));
  // The k3s card is another figure: no inventory was reported.
  CHECK(f["certificates"]["not_reported"] == 6);
  json mine = v.get("/v1/views/fleet", blue_viewer);
  CHECK(mine["broker_certificates"] ==
        json({{"expired", 0}, {"within_7_days", 0}, {"within_30_days", 1}, {"later", 0}, {"none", 1}}));
  // Kept by triggers, equal to a recount from the rows.
  auto kept = v.f.store->fleet_counts();
  auto recount = v.f.store->recount_fleet();
  REQUIRE(kept);
  REQUIRE(recount);
  auto nonzero = [](std::vector<FleetCount> rows) {
    rows.erase(std::remove_if(rows.begin(), rows.end(), [](const FleetCount& r) { return r.n == 0; }), rows.end());
    return rows;
  };
  CHECK(nonzero(*kept) == nonzero(*recount));

  // Forgetting expired certificates, a decommission and time passing move the figures.
  REQUIRE(v.f.store->prune_device_certs(now));
  REQUIRE(test::decommission(*v.f.store, d[0]));
  f = v.get("/v1/views/fleet", admin);
  CHECK(f["broker_certificates"] ==
        json({{"expired", 0}, {"within_7_days", 0}, {"within_30_days", 1}, {"later", 1}, {"none", 3}}));
  v.f.clock.advance(std::chrono::hours(24 * 70));
  f = v.get("/v1/views/fleet", admin);
  CHECK(f["broker_certificates"] ==
        json({{"expired", 1}, {"within_7_days", 0}, {"within_30_days", 1}, {"later", 0}, {"none", 3}}));
  kept = v.f.store->fleet_counts();
  recount = v.f.store->recount_fleet();
  REQUIRE(kept);
  REQUIRE(recount);
  CHECK(nonzero(*kept) == nonzero(*recount));
}

TEST_CASE("hub views: the fleet, its devices and one device, each as the caller's project sees it",
          "[unit][hub][views]") {
  Views v;
  v.f.enroll(3, {{"env", "prod"}, {"region", "eu"}});
  const auto blue = v.enroll_project(2, "blue", {{"env", "prod"}, {"cell", "b1"}});
  const auto admin = v.token("admin", "*");
  const auto blue_viewer = v.token("viewer", "blue");

  json all = v.get("/v1/views/fleet", admin);
  CHECK(all["total"] == 5);
  CHECK(all["online"] == 5);
  CHECK(all["regions"]["items"] == json::parse(R"([{"value": "eu", "count": 3}])"));
  CHECK(all["cells"]["items"] == json::parse(R"([{"value": "b1", "count": 2}])"));
  CHECK(all["certificates"]["not_reported"] == 5);
  json mine = v.get("/v1/views/fleet", blue_viewer);
  CHECK(mine["total"] == 2);
  CHECK(mine["project"] == "blue");
  CHECK(mine["regions"]["items"].empty());

  CHECK(ids_of(v.get("/v1/views/devices", blue_viewer)["items"]) == std::set<std::string>(blue.begin(), blue.end()));
  CHECK(v.get("/v1/views/devices", admin)["items"].size() == 5);
  CHECK(v.get("/v1/views/devices?selector=region%3Deu", admin)["index"] == "device_labels");
  CHECK(v.get("/v1/views/devices?selector=region%3Deu", blue_viewer)["items"].empty());
  // Another project's device is "not found", as everywhere in the API.
  CHECK(v.call("GET", "/v1/views/devices/" + v.f.devices[0], blue_viewer).status == 404);
  json d = v.get("/v1/views/devices/" + blue[0], blue_viewer);
  CHECK(d["id"] == blue[0]);
  CHECK(d["hostname"] == "blue-0");
  CHECK(d["inventory"].is_null());
  CHECK(d["recent_failures"].empty());

  json who = v.get("/v1/whoami", blue_viewer);
  CHECK(who["role"] == "viewer");
  CHECK(who["project"] == "blue");
  CHECK(who["may"]["campaign_actions"] == false);
  CHECK(who["may"]["audit"] == false);
  CHECK(who["may"]["cells"] == false);
  CHECK(v.get("/v1/whoami", admin)["may"]["audit"] == true);
  CHECK(v.get("/v1/whoami", admin)["may"]["cells"] == true);
  CHECK(v.call("GET", "/v1/whoami", "").status == 401);
}

TEST_CASE("hub views: a campaign's measured counts, waves, grouped failures and what an operator may do",
          "[unit][hub][views]") {
  Views v;
  v.f.enroll(4);
  const auto admin = v.token("admin", "*");
  // The fleet's campaigns belong to project "*" (made by the service itself).
  const auto viewer = v.token("viewer", "*");
  const auto blue_op = v.token("operator", "blue");
  const std::string id = v.f.create(json::parse(R"({"canary": 2, "failure_threshold": {"percent": 90}})"),
                                    v.f.bundle(1));
  v.f.hub->tick();
  const auto released = v.f.in_flight(id);
  REQUIRE(released.size() == 2);
  v.f.report(released[0], v1::AGENT_STATE_APPLIED);
  v.f.report(released[1], v1::AGENT_STATE_FAILED, v1::REASON_HEALTH_GATE_FAILED);

  json c = v.get("/v1/views/campaigns/" + id, viewer);
  CHECK(c["state"] == "running");
  CHECK(c["counts"]["total"] == 4);
  CHECK(c["counts"]["applied"] == 1);
  CHECK(c["counts"]["failed"] == 1);
  CHECK(c["counts"]["waiting"] == 2);
  REQUIRE(c["waves"].size() == 2);
  CHECK(c["waves"][0]["counts"]["total"] == 2);
  CHECK(c["waves"][0]["state"] == "current");
  CHECK(c["waves"][1]["counts"]["waiting"] == 2);
  CHECK(c["actions"] == json::parse(R"(["pause", "abort", "rollback"])"));
  REQUIRE(c["failure_groups"].size() == 1);
  CHECK(c["failure_groups"][0]["reason"] == "health_gate_failed");
  CHECK(c["failure_groups"][0]["count"] == 1);
  CHECK(c["failure_groups"][0]["first"][0]["device_id"] == released[1]);
  CHECK(c["sample"]["applied"] == 1);
  // The failed device's page names the failure, from its campaign row and its recent failures.
  json dev = v.get("/v1/views/devices/" + released[1], viewer);
  REQUIRE(dev["campaigns"].size() == 1);
  CHECK(dev["campaigns"][0]["status"] == "failed");
  CHECK(dev["campaigns"][0]["reason"] == "health_gate_failed");
  CHECK(dev["last_reason"] == "health_gate_failed");
  REQUIRE(dev["recent_failures"].size() == 1);
  CHECK(dev["recent_failures"][0]["reason"] == "health_gate_failed");

  json list = v.get("/v1/views/campaigns", viewer);
  REQUIRE(list["items"].size() == 1);
  CHECK(list["items"][0]["counts"]["applied"] == 1);
  CHECK(v.get("/v1/views/campaigns?state=paused", viewer)["items"].empty());
  CHECK(v.get("/v1/views/campaigns", blue_op)["items"].empty());
  CHECK(v.call("GET", "/v1/views/campaigns/" + id, blue_op).status == 404);
  CHECK(v.call("GET", "/v1/views/campaigns/" + id + "/timeline", blue_op).status == 404);

  // A viewer's (forged) action is refused, audited, and changes nothing; an
  // operator of another project does not even see the campaign.
  const auto audit_before = v.get("/v1/views/audit", admin)["items"].size();
  auto forged = v.call("POST", "/v1/campaigns/" + id + "/pause", viewer);
  CHECK(forged.status == 403);
  CHECK(error_code(forged) == "permission_denied");
  CHECK(v.call("POST", "/v1/campaigns/" + id + "/pause", blue_op).status == 404);
  CHECK(v.get("/v1/views/campaigns/" + id, admin)["state"] == "running");
  json audit = v.get("/v1/views/audit", admin);
  CHECK(audit["items"].size() == audit_before + 2);
  CHECK(audit["items"][1]["status"] == 403);  // newest first: the viewer's, then the blue operator's
  CHECK(audit["items"][1]["role"] == "viewer");
  CHECK(audit["items"][0]["status"] == 404);
  CHECK(v.call("GET", "/v1/views/audit", viewer).status == 403);

  // The timeline: the sampler's points, oldest first.
  REQUIRE(v.agg->sample_campaigns(v.f.clock.now_unix_ms()));
  json tl = v.get("/v1/views/campaigns/" + id + "/timeline", viewer);
  REQUIRE(tl["points"].size() == 1);
  CHECK(tl["points"][0]["applied"] == 1);
  CHECK(tl["points"][0]["failed"] == 1);
}

TEST_CASE("hub views offer exactly the campaign actions the engine accepts, in every state", "[unit][hub][views]") {
  Views v;
  v.f.enroll(2);
  const auto admin = v.token("admin", "*");
  const std::string bundle = v.f.bundle(1);
  for (const std::string state : {"running", "waiting_approval", "converging", "paused", "completed", "aborted",
                                  "rolling_back", "rolled_back"}) {
    for (const std::string action : {"pause", "resume", "approve", "abort", "rollback"}) {
      const std::string id = v.f.create(json::parse(R"({"waves": [50, 100], "approval": ["wave 2"]})"), bundle);
      auto rec = v.f.store->get_campaign(id);
      REQUIRE(rec);
      REQUIRE(*rec);
      auto c = **rec;
      c.state = *campaign_state_from(state);
      REQUIRE(v.f.store->update_campaign(c));
      const json offered = v.get("/v1/views/campaigns/" + id, admin)["actions"];
      const bool offers = std::find(offered.begin(), offered.end(), action) != offered.end();
      const bool accepted = static_cast<bool>(v.f.hub->campaign_action(id, action));
      INFO(state << " " << action);
      CHECK(offers == accepted);
    }
  }
}

// GET /v1/devices is one bounded walk on a read connection: a selector no
// index serves stops at the scan limit with a shorter page (even an empty
// one) and a `next` to go on from; following `next` visits every matching
// device exactly once, in id order.
TEST_CASE("hub REST device list: a walk cut short by the scan limit says where to go on, and loses nothing",
          "[unit][hub][views]") {
  AggregateStore::Config cfg;
  cfg.device_scan_limit = 3;
  Views v(cfg);
  const std::string viewer = v.token("viewer", "*");
  auto legacy = v.enroll_project(4, "default", {{"legacy", "yes"}});
  auto plain = v.enroll_project(5, "default", {{"tier", "edge"}});
  std::vector<std::string> want = plain;
  std::sort(want.begin(), want.end());

  std::vector<std::string> got;
  std::string after;
  int pages = 0, short_pages = 0;
  for (; pages < 20; ++pages) {
    auto r = v.call("GET", "/v1/devices?limit=4&selector=%21legacy" + (after.empty() ? "" : "&after=" + after), viewer);
    REQUIRE(r.status == 200);
    const json page = json::parse(r.body);
    REQUIRE(page["items"].size() <= 3);  // never more than the scan limit examined
    if (page["items"].size() < 4 && !page["next"].get<std::string>().empty()) ++short_pages;
    for (const auto& d : page["items"]) {
      CHECK_FALSE(d["labels"].contains("legacy"));
      got.push_back(d["id"].get<std::string>());
    }
    after = page["next"].get<std::string>();
    if (after.empty()) break;
  }
  CHECK(got == want);  // each once, in order
  CHECK(short_pages > 0);
  CHECK(pages < 20);
  // An equality term walks the label index: only the 4 labelled devices
  // are examined, 3 (the scan limit) on the first page, the last after it.
  auto first = v.call("GET", "/v1/devices?limit=10&selector=legacy%3Dyes", viewer);
  REQUIRE(first.status == 200);
  const json p1 = json::parse(first.body);
  REQUIRE(p1["items"].size() == 3);
  auto second = v.call("GET", "/v1/devices?limit=10&selector=legacy%3Dyes&after=" + p1["next"].get<std::string>(),
                       viewer);
  REQUIRE(second.status == 200);
  const json p2 = json::parse(second.body);
  CHECK(p2["items"].size() == 1);
  CHECK(p2["next"] == "");
  std::vector<std::string> labelled;
  for (const auto* p : {&p1, &p2}) {
    for (const auto& d : (*p)["items"]) labelled.push_back(d["id"].get<std::string>());
  }
  std::sort(legacy.begin(), legacy.end());
  CHECK(labelled == legacy);
}

// What one hub process asks another for (`held=true` over a page's id
// range, api_devices.cpp fresh_from_holders): `until` ends the walk at an
// id, and `held=true` says which cells the answer covers.
TEST_CASE("hub REST device list: until ends the page at an id, held=true names the cells it covers, bad values refused",
          "[unit][hub][views]") {
  Views v;
  const std::string viewer = v.token("viewer", "*");
  auto ids = v.enroll_project(6, "default", {{"tier", "edge"}});
  std::sort(ids.begin(), ids.end());

  auto r = v.call("GET", "/v1/devices?limit=10&after=" + ids[0] + "&until=" + ids[3], viewer);
  REQUIRE(r.status == 200);
  json page = json::parse(r.body);
  std::vector<std::string> got;
  for (const auto& d : page["items"]) got.push_back(d["id"].get<std::string>());
  CHECK(got == std::vector<std::string>{ids[1], ids[2], ids[3]});
  CHECK(page["next"] == "");
  CHECK_FALSE(page.contains("held_cells"));
  // A limit inside the range still says where to go on.
  auto cut = v.call("GET", "/v1/devices?limit=2&until=" + ids[3], viewer);
  REQUIRE(cut.status == 200);
  CHECK(json::parse(cut.body)["next"] == ids[1]);

  // One hub holds every cell of its own.
  auto held = v.call("GET", "/v1/devices?limit=10&held=true", viewer);
  REQUIRE(held.status == 200);
  page = json::parse(held.body);
  CHECK(page["items"].size() == ids.size());
  REQUIRE(page["held_cells"].is_array());
  CHECK(page["held_cells"].size() == static_cast<size_t>(v.f.hub->cell_count()));
  CHECK(page["held_cells"][0] == 0);

  for (const std::string& bad : std::vector<std::string>{"held=yes", "until=" + std::string(300, 'd')}) {
    auto refused = v.call("GET", "/v1/devices?" + bad, viewer);
    INFO(bad << ": " << refused.body);
    CHECK(refused.status == 400);
    const std::string says = json::parse(refused.body)["error"]["message"];
    CHECK((says.find("held must be true or false") != std::string::npos ||
           says.find("after and until are device ids") != std::string::npos));
  }
}

TEST_CASE("hub views refuse bad requests with a clear error", "[unit][hub][views]") {
  Views v;
  v.f.enroll(2);
  const auto admin = v.token("admin", "*");
  struct Case {
    std::string target;
    int status;
    std::string says;
  };
  const std::vector<Case> cases = {
      {"/v1/views/devices?colour=red", 400, "unknown query parameter 'colour'"},
      {"/v1/views/devices?limit=0", 400, "limit must be 1..500"},
      {"/v1/views/devices?limit=501", 400, "limit must be 1..500"},
      {"/v1/views/devices?version=2", 400, "version needs bundle"},
      {"/v1/views/devices?bundle=edge&version=x", 400, "version must be a whole number"},
      {"/v1/views/devices?online=maybe", 400, "online must be true or false"},
      {"/v1/views/devices?sort=colour", 400, "sort must be"},
      {"/v1/views/devices?order=up", 400, "order must be asc or desc"},
      {"/v1/views/devices?cert_within_days=-1", 400, "cert_within_days must be 0..3650"},
      {"/v1/views/devices?selector=%21%21", 400, "selector"},
      {"/v1/views/devices?after=nothex", 400, "not a cursor"},
      {"/v1/views/devices?q=" + std::string(2000, 'a'), 400, "too long"},
      {"/v1/views/campaigns?after=12", 400, "not a cursor"},
      {"/v1/views/campaigns?limit=1000", 400, "limit must be 1..200"},
      {"/v1/views/bundles?after=x", 400, "not a cursor"},
      {"/v1/views/audit?before=-3", 400, "before must be"},
      {"/v1/views/fleet?x=1", 400, "unknown query parameter"},
      {"/v1/events?topic=fleet", 400, "UI listener"},
  };
  auto before = v.f.store->fleet_counts();
  REQUIRE(before);
  for (const auto& c : cases) {
    auto r = v.call("GET", c.target, admin);
    INFO(c.target << " -> " << r.body);
    CHECK(r.status == c.status);
    CHECK(error_code(r) == "invalid_argument");
    CHECK_THAT(body_of(r)["error"]["message"].get<std::string>(), Catch::Contains(c.says));
  }
  auto after = v.f.store->fleet_counts();
  REQUIRE(after);
  CHECK(*after == *before);
  // Without read models (starting, stopping) the views say so.
  v.f.hub->set_aggregates(nullptr);
  auto r = v.call("GET", "/v1/views/fleet", admin);
  CHECK(r.status == 503);
  CHECK(error_code(r) == "unavailable");
}

TEST_CASE("hub event streams: a topic the caller may see, on a listener that can stream", "[unit][hub][views]") {
  Views v;
  v.f.enroll(1);
  const auto admin = v.token("admin", "*");
  const auto blue = v.token("viewer", "blue");
  const std::string id = v.f.create(json::object(), v.f.bundle(1));
  struct Case {
    std::string query;
    std::string secret;
    int status;
    std::string topic;
  };
  const std::vector<Case> cases = {
      {"topic=fleet", admin, 200, "fleet"},
      {"topic=campaigns", blue, 200, "campaigns"},
      {"topic=campaign&id=" + id, admin, 200, "campaign:" + id},
      {"topic=device&id=" + v.f.devices[0], admin, 200, "device:" + v.f.devices[0]},
      {"topic=campaign&id=" + id, blue, 404, ""},
      {"topic=device&id=" + v.f.devices[0], blue, 404, ""},
      {"topic=campaign", admin, 400, ""},
      {"topic=fleet&id=x", admin, 400, ""},
      {"topic=weather", admin, 400, ""},
      {"topic=fleet&token=abc", admin, 400, ""},
      {"topic=fleet", "", 401, ""},
  };
  for (const auto& c : cases) {
    auto r = v.call("GET", "/v1/events?" + c.query, c.secret, true);
    INFO(c.query << " -> " << r.body);
    CHECK(r.status == c.status);
    CHECK(r.event_topic == c.topic);
  }
}

namespace {
const UiAsset* asset_named(const std::string& path) {
  for (const auto& a : ui_assets()) {
    if (a.path == path) return &a;
  }
  return nullptr;
}
}  // namespace

TEST_CASE("the UI listener serves the built dashboard with strict headers and no inline code", "[unit][hub][views]") {
#ifdef FLOTILLA_UI_EMBEDDED
  REQUIRE_FALSE(ui_assets().empty());
#endif
  if (ui_assets().empty()) {
    WARN("this hub was built without its dashboard (no npm): only the refusal is checked");
    Views v;
    HttpRequest req;
    req.method = "GET";
    req.target = "/ui/";
    auto r = ui_route(*v.api, req, false);
    CHECK(r.status == 503);
    return;
  }
  Views v;
  const UiAsset* index = asset_named("index.html");
  REQUIRE(index);
  const std::string html(reinterpret_cast<const char*>(index->data), index->size);
  // The CSP allows no inline script or style: the build must not make any.
  CHECK_FALSE(std::regex_search(html, std::regex(R"(<script(?![^>]*\ssrc=)[^>]*>)")));
  CHECK_FALSE(std::regex_search(html, std::regex(R"(<style)", std::regex::icase)));
  CHECK_FALSE(std::regex_search(html, std::regex(R"(\s(style|on[a-z]+)=)", std::regex::icase)));
  CHECK_FALSE(std::regex_search(html, std::regex(R"((src|href)=["']?(https?:)?//)")));  // nothing from elsewhere

  auto get = [&](const std::string& target, std::map<std::string, std::string> headers = {}) {
    HttpRequest req;
    req.method = "GET";
    req.target = target;
    req.headers = std::move(headers);
    return ui_route(*v.api, req, false);
  };
  auto r = get("/ui/");
  REQUIRE(r.status == 200);
  CHECK(r.body == html);
  CHECK(r.content_type == "text/html; charset=utf-8");
  CHECK(r.headers["Cache-Control"] == "no-cache");
  CHECK_THAT(r.headers["Content-Security-Policy"], Catch::Contains("script-src 'self'"));
  CHECK_THAT(r.headers["Content-Security-Policy"], Catch::Contains("default-src 'none'"));
  CHECK_THAT(r.headers["Content-Security-Policy"], Catch::Contains("frame-ancestors 'none'"));
  CHECK(r.headers["X-Content-Type-Options"] == "nosniff");
  CHECK(r.headers["Referrer-Policy"] == "no-referrer");
  CHECK(r.headers.count("Strict-Transport-Security") == 0);
  CHECK(ui_route(*v.api, HttpRequest{"GET", "/ui/", {}, "", "", "", false}, true).headers.count("Strict-Transport-Security") == 1);
  // An unchanged file is not sent again.
  auto again = get("/ui/", {{"if-none-match", std::string(index->etag)}});
  CHECK(again.status == 304);
  CHECK(again.body.empty());

  int hashed = 0;
  for (const auto& a : ui_assets()) {
    if (!a.path.starts_with("assets/")) continue;
    ++hashed;
    auto ar = get("/ui/" + std::string(a.path));
    INFO(a.path);
    CHECK(ar.status == 200);
    CHECK(ar.headers["Cache-Control"] == "public, max-age=31536000, immutable");
    CHECK(ar.body.size() == a.size);
    // A hashed name: <name>-<hash>.<ext>, so a new build never reuses a cached name.
    CHECK(std::regex_match(std::string(a.path), std::regex(R"(assets/[A-Za-z0-9_.-]+-[A-Za-z0-9_-]{6,}\.(js|css|svg|png|woff2))")));
  }
  CHECK(hashed >= 2);  // the script and the stylesheet

  CHECK(get("/").status == 302);
  CHECK(get("/").headers["Location"] == "/ui/");
  CHECK(get("/ui/nope.js").status == 404);
  HttpRequest post{"POST", "/ui/", {}, "", "", "", false};
  CHECK(ui_route(*v.api, post, false).status == 405);
}

TEST_CASE("the UI listener passes the API's reads and the campaign actions, nothing else", "[unit][hub][views]") {
  Views v;
  v.f.enroll(1);
  const auto admin = v.token("admin", "*");
  const auto doomed = v.token("viewer", "default");
  auto call = [&](const std::string& method, const std::string& target, const std::string& body = "") {
    HttpRequest req;
    req.method = method;
    req.target = target;
    req.body = body;
    req.headers["authorization"] = "Bearer " + admin;
    auto r = ui_route(*v.api, req, false);
    CHECK(r.headers.count("X-Frame-Options") == 1);
    return r;
  };
  auto who = call("GET", "/v1/whoami");
  CHECK(who.status == 200);
  CHECK(who.headers["Cache-Control"] == "no-store");
  CHECK(call("GET", "/healthz").status == 200);
  auto events = call("GET", "/v1/events?topic=fleet");
  CHECK(events.status == 200);
  CHECK(events.event_topic == "fleet");

  const size_t tokens_before = v.f.hub->list_tokens("api")->size();
  auto tok = v.f.hub->list_tokens("api");
  std::string doomed_id;
  for (const auto& t : *tok) {
    if (t.name == "viewer-default") doomed_id = t.id;
  }
  for (const auto& [method, target] : std::vector<std::pair<std::string, std::string>>{
           {"DELETE", "/v1/tokens/" + doomed_id},
           {"POST", "/v1/tokens"},
           {"POST", "/v1/bundles"},
           {"PATCH", "/v1/devices/" + v.f.devices[0]},
           {"PUT", "/v1/artifacts/" + std::string(64, 'a')},
           {"GET", "/v1/artifacts/" + std::string(64, 'a')},
           {"POST", "/v1/enroll"},
           {"POST", "/v1/campaigns"},
           {"POST", "/v1/campaigns/c-1/explode"}}) {
    auto r = call(method, target, "{}");
    INFO(method << " " << target << " -> " << r.body);
    CHECK((r.status == 404 || r.status == 405));
    CHECK(error_code(r) == "not_on_this_listener");
  }
  CHECK(v.f.hub->list_tokens("api")->size() == tokens_before);
  CHECK(v.call("GET", "/v1/whoami", doomed).status == 200);  // not revoked
  // A campaign action does pass (and the hub decides): an unknown campaign is 404.
  auto act = call("POST", "/v1/campaigns/c-nope/pause");
  CHECK(act.status == 404);
  CHECK(error_code(act) == "not_found");
}
