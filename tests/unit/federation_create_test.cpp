// [unit] The federation's engine against a stand-in region on loopback HTTPS
// whose campaign creates outlast the region timeout, as a busy region making
// 250,000 campaign rows did in the 1M run (docs/scale.md): the create is
// looked for by name, never sent twice while the region may still be making
// it, and sent again only once the grace is over.
#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <functional>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "flotilla/bundles/bundle.hpp"
#include "flotilla/bundles/keys.hpp"
#include "flotilla/common/clock.hpp"
#include "flotilla/hub/federation.hpp"
#include "flotilla/hub/http_server.hpp"
#include "tests/support/federation_fixtures.hpp"
#include "tests/support/hub_fixtures.hpp"
#include "tests/support/pki.hpp"
#include "tests/support/temp_dir.hpp"

namespace {

using namespace flotilla;
using namespace flotilla::hub::federation;
using nlohmann::json;

// A region that answers what the federation asks, and takes `create_delay`
// to make a campaign; with `keeps` false it makes none (the create is lost).
struct StandInRegion {
  std::mutex mu;
  int creates_started = 0, creates_done = 0;
  bool keeps = true;
  json campaigns = json::array();
  std::atomic<int> create_delay_ms{2500};

  int started() {
    std::lock_guard lock(mu);
    return creates_started;
  }
  int done() {
    std::lock_guard lock(mu);
    return creates_done;
  }

  hub::HttpResponse handle(const hub::HttpRequest& req) {
    const std::string path = req.target.substr(0, req.target.find('?'));
    if (req.method == "GET" && path == "/v1/whoami") return test::json_answer(200, {{"role", "operator"}, {"project", "*"}});
    if (req.method == "POST" && path == "/v1/bundles") return test::json_answer(201, {{"id", "b-region"}});
    if (req.method == "POST" && path == "/v1/campaigns") {
      int n = 0;
      {
        std::lock_guard lock(mu);
        n = ++creates_started;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(create_delay_ms.load()));
      const json c = {{"id", "c-" + std::to_string(n)},
                      {"name", json::parse(req.body).value("name", "")},
                      {"state", "running"},
                      {"counts", {{"total", 1}, {"applied", 0}}}};
      std::lock_guard lock(mu);
      if (keeps) campaigns.push_back(c);
      ++creates_done;
      return test::json_answer(201, c);
    }
    std::lock_guard lock(mu);
    if (req.method == "GET" && path == "/v1/campaigns") return test::json_answer(200, {{"items", campaigns}});
    for (const auto& c : campaigns) {
      if (req.method == "GET" && path == "/v1/campaigns/" + c["id"].get<std::string>()) return test::json_answer(200, c);
    }
    return test::json_answer(404, {{"error", {{"code", "not_found"}, {"message", "no " + path}}}});
  }
};

bool eventually(const std::function<bool()>& pred) {
  for (int i = 0; i < 400; ++i) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return pred();
}

}  // namespace

TEST_CASE("federation: a regional campaign create without an answer is looked for by name, not sent again until "
          "the grace is over", "[unit][federation]") {
  test::TempDir dir;
  const std::string ca_pem = test::region_pki(dir.path());
  StandInRegion region;
  auto server = test::serve_region(dir.path(), [&](const hub::HttpRequest& r) { return region.handle(r); }, 4);

  auto fstore = FederationStore::open((dir.path() / "federation.db").string());
  REQUIRE(fstore);
  FakeClock clock;
  FederationConfig cfg;
  cfg.region_timeout = std::chrono::milliseconds(1000);  // shorter than the region takes to create
  const auto key = bundles::generate_key();
  hub::BundleRecord bundle;
  bundle.id = "b-fed";
  bundle.name = "edge-base";
  bundle.version = 1;
  bundle.envelope =
      bundles::serialize_envelope(test::signed_bundle(clock.now_unix(), "edge-base", 1, "kind: ConfigMap\n", {&key}));
  std::filesystem::create_directories(dir.path() / "region-ca");
  Federation fed(
      **fstore, clock, cfg, dir.path() / "region-ca", [](hub::AuditRecord) {},
      [&](const std::string&, const std::string&) -> Result<hub::BundleRecord> { return bundle; },
      [](const std::string&) { return std::string(); });
  Region r;
  r.name = "eu";
  r.url = "https://127.0.0.1:" + std::to_string(server->port());
  r.ca_pem = ca_pem;
  r.token = "flt_api_standin";
  REQUIRE(fed.add_region(r));
  hub::Caller admin;
  admin.role = hub::Role::admin;
  admin.project = "*";
  FedCampaign want;
  want.bundle_id = "b-fed";
  want.selector = "env=prod";
  want.steps = {{"eu"}};
  auto made = fed.create_campaign(want, admin);
  REQUIRE(made);
  auto part = [&] {
    auto c = (*fstore)->get_campaign(made->id);
    REQUIRE(c);
    REQUIRE(*c);
    REQUIRE((*c)->parts.size() == 1);
    return (*c)->parts[0];
  };

  SECTION("the region makes it late: the federation follows that one campaign") {
    fed.tick();  // publishes the bundle and sends the create; no answer within the timeout
    REQUIRE(region.started() == 1);
    CHECK(part().create_sent_ms != 0);
    CHECK(part().regional_id.empty());
    // While the region is still making it, every pass looks and none sends it again.
    for (int i = 0; i < 3; ++i) fed.tick();
    CHECK(region.started() == 1);
    REQUIRE(eventually([&] { return region.done() == 1; }));
    fed.tick();
    CHECK(part().regional_id == "c-1");
    CHECK(part().create_sent_ms == 0);
    CHECK(region.started() == 1);
  }

  SECTION("the region lost it: sent again once the grace is over, not before") {
    {
      std::lock_guard lock(region.mu);
      region.keeps = false;
    }
    fed.tick();
    REQUIRE(region.started() == 1);
    REQUIRE(eventually([&] { return region.done() == 1; }));
    region.create_delay_ms = 0;
    clock.advance(Federation::kCreateGraceMin - std::chrono::seconds(1));
    fed.tick();
    CHECK(region.started() == 1);
    CHECK(part().regional_id.empty());
    {
      std::lock_guard lock(region.mu);
      region.keeps = true;
    }
    clock.advance(std::chrono::seconds(2));
    fed.tick();
    CHECK(region.started() == 2);
    CHECK(part().regional_id == "c-2");
  }
  server->stop();
}
