// The federation's own pieces that need no network: its store (regions and
// federated campaigns survive a reopen, an unreachable region keeps the time
// of its last answer), region names and the role's settings.
#include <catch2/catch.hpp>

#include "flotilla/common/options.hpp"
#include "flotilla/hub/federation.hpp"
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
  REQUIRE((*c)->parts.size() == 1);
  CHECK((*c)->parts[0].regional_id == "c-9");
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
