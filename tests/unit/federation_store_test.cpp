// The federation's own pieces that need no network: its store (regions and
// federated campaigns survive a reopen, an unreachable region keeps the time
// of its last answer), region names, the role's settings, and its API's
// query parameter checks (a federation with no region yet).
#include <catch2/catch.hpp>

#include <filesystem>

#include "flotilla/common/clock.hpp"
#include "flotilla/common/options.hpp"
#include "flotilla/hub/api.hpp"
#include "flotilla/hub/federation.hpp"
#include "flotilla/hub/service.hpp"
#include "flotilla/hub/store.hpp"
#include "tests/support/federation_fixtures.hpp"
#include "tests/support/hub_fixtures.hpp"
#include "tests/support/hub_test_support.hpp"
#include "tests/support/temp_dir.hpp"

using namespace flotilla;
using namespace flotilla::hub::federation;

TEST_CASE("federation store keeps regions and campaigns across a reopen", "[unit][federation]") {
  flotilla::test::TempDir dir;
  const std::string path = (dir.path() / "federation.db").string();
  {
    auto s = FederationStore::open(path);
    REQUIRE(s);
    Region r;
    r.name = "eu";
    r.url = "https://eu:8443";
    r.ca_pem = "PEM";
    r.token = "flt_api_secret";
    r.created_ms = 1000;
    REQUIRE((*s)->add_region(r));
    // The same name twice is refused and changes nothing.
    Region other = r;
    other.url = "https://other:1";
    other.token = "other";
    auto dup = (*s)->add_region(other);
    REQUIRE_FALSE(dup);
    CHECK(dup.error().code == Errc::already_exists);
    REQUIRE((*s)->note_answer("eu", true, "", 5000));
    // An unreachable region keeps the time of its last answer.
    REQUIRE((*s)->note_answer("eu", false, "connection refused", 9000));

    FedCampaign c;
    c.id = "f-1";
    c.project = "acme";
    c.bundle_id = "b1";
    c.bundle_name = "edge-base";
    c.bundle_version = 3;
    c.steps = {{"eu"}, {"us", "ap"}};
    c.thresholds["eu"] = RegionThreshold{2.5, 7};
    c.soak_ms = 1500;
    c.state = FedState::soaking;
    c.current_step = 1;
    c.parts.push_back(RegionPart{"eu", 0, "c-9", "completed", nlohmann::json{{"applied", 4}, {"total", 4}}, 4000, true, ""});
    // A create sent without an answer is remembered, so a restarted
    // federation does not send it again while the region may be making it.
    c.parts.push_back(RegionPart{"us", 1, "", "", nlohmann::json::object(), 0, false, "timed out", 6000});
    REQUIRE((*s)->save_campaign(c));
  }
  auto s = FederationStore::open(path);
  REQUIRE(s);
  auto r = (*s)->get_region("eu");
  REQUIRE(r);
  REQUIRE(*r);
  CHECK((*r)->url == "https://eu:8443");
  CHECK((*r)->token == "flt_api_secret");
  CHECK((*r)->state == "unreachable");
  CHECK((*r)->last_answer_ms == 5000);
  CHECK((*r)->error == "connection refused");
  auto c = (*s)->get_campaign("f-1");
  REQUIRE(c);
  REQUIRE(*c);
  CHECK((*c)->state == FedState::soaking);
  CHECK((*c)->steps == std::vector<std::vector<std::string>>{{"eu"}, {"us", "ap"}});
  CHECK((*c)->thresholds.at("eu").percent == 2.5);
  CHECK((*c)->thresholds.at("eu").min_sample == 7);
  CHECK((*c)->bundle_version == 3);
  REQUIRE((*c)->parts.size() == 2);
  CHECK((*c)->parts[0].regional_id == "c-9");
  CHECK((*c)->parts[0].create_sent_ms == 0);
  CHECK((*c)->parts[1].create_sent_ms == 6000);
  CHECK((*c)->parts[0].counts["applied"] == 4);
  auto live = (*s)->live_campaign_ids();
  REQUIRE(live);
  CHECK(*live == std::vector<std::string>{"f-1"});
  auto removed = (*s)->remove_region("eu");
  REQUIRE(removed);
  CHECK(*removed);
  auto again = (*s)->remove_region("eu");
  REQUIRE(again);
  CHECK_FALSE(*again);
}

TEST_CASE("region names and federation settings are validated", "[unit][federation]") {
  CHECK(valid_region_name("eu-west-1"));
  CHECK(valid_region_name("r1"));
  for (const char* bad : {"", "-eu", "EU", "eu/x", "eu west", "a.b"}) {
    INFO(bad);
    CHECK_FALSE(valid_region_name(bad));
  }
  CHECK_FALSE(valid_region_name(std::string(64, 'a')));

  auto parse = [](std::vector<std::string> args) {
    Options o("t", "t", "FLOTILLA_TEST_FED_");
    add_federation_options(o);
    std::vector<char*> argv{const_cast<char*>("t")};
    for (auto& a : args) argv.push_back(a.data());
    REQUIRE(o.parse(static_cast<int>(argv.size()), argv.data()));
    return federation_config_from(o);
  };
  auto ok = parse({"--federation-region-timeout", "2s", "--federation-poll-interval", "250ms"});
  REQUIRE(ok);
  CHECK(ok->region_timeout == std::chrono::seconds(2));
  CHECK(ok->poll_interval == std::chrono::milliseconds(250));
  auto too_short = parse({"--federation-region-timeout", "10ms"});
  REQUIRE_FALSE(too_short);
  CHECK_THAT(too_short.error().message, Catch::Contains("federation-region-timeout"));
  auto bad = parse({"--federation-poll-interval", "soon"});
  REQUIRE_FALSE(bad);
  CHECK_THAT(bad.error().message, Catch::Contains("federation-poll-interval"));
}

// As at a hub (hub_api_test): a typo in a query parameter is a 400 naming
// it, never "no filter" over every region.
TEST_CASE("federation API refuses an unknown query parameter on each of its routes and takes the ones it documents",
          "[unit][federation]") {
  flotilla::test::TempDir dir;
  flotilla::test::FederationFront f(dir.path());
  auto& front = f.front;
  const std::string& admin = f.admin;
  auto call = [&](const std::string& method, const std::string& target) {
    return front.handle(flotilla::test::api_request(method, target, R"({"bundle": "b", "regions": ["eu"]})", admin));
  };
  auto message = [](const hub::HttpResponse& r) {
    return flotilla::test::body_of(r)["error"]["message"].get<std::string>();
  };

  for (const auto& [method, pattern] : federation_routes()) {
    std::string target = pattern;
    for (size_t open; (open = target.find('{')) != std::string::npos;) {
      target.replace(open, target.find('}', open) - open + 1, "eu");
    }
    auto r = call(method, target + "?projet=acme");
    INFO(method << " " << target << ": " << r.body);
    CHECK(r.status == 400);
    CHECK(message(r).find("unknown query parameter 'projet' for " + method + " " + pattern + "; it takes ") == 0);
  }
  // The routes a federation hands to its own hub code refuse them too, and
  // so do its probes.
  CHECK(call("GET", "/v1/tokens?projet=acme").status == 400);
  CHECK(message(call("GET", "/readyz?verbose=1")) == "unknown query parameter 'verbose' for GET /readyz; it takes none");
  CHECK(message(call("GET", "/healthz?verbose=1")) ==
        "unknown query parameter 'verbose' for GET /healthz; it takes none");
  CHECK(call("GET", "/readyz").status == 200);
  CHECK(message(call("GET", "/v1/devices?projet=acme")) ==
        "unknown query parameter 'projet' for GET /v1/devices; it takes after, certExpiresBefore, "
        "include_decommissioned, limit, project, region, selector");
  // Nothing was stored by the refused writes.
  auto campaigns = f.fstore->list_campaigns();
  REQUIRE(campaigns);
  CHECK(campaigns->empty());
  auto regions = f.fstore->list_regions();
  REQUIRE(regions);
  CHECK(regions->empty());

  // The parameters it takes still work: no region yet, so an empty, complete page.
  auto page = call("GET", "/v1/devices?project=acme&limit=10&selector=env%3Dprod&include_decommissioned=false");
  INFO(page.body);
  REQUIRE(page.status == 200);
  CHECK(flotilla::test::body_of(page)["items"].empty());
  CHECK(flotilla::test::body_of(page)["complete"] == true);
  CHECK(call("GET", "/v1/campaigns?project=acme").status == 200);
}
