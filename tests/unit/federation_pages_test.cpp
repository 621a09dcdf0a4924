// [unit] The federation's merged device pages against stand-in regions on
// loopback HTTPS. A region examines a bounded number of rows per request
// (--views-scan-limit), so it may answer a page shorter than asked, even an
// empty one, with a `next` to go on from: the federation must carry on from
// that `next`, or a client following the federation's cursor asks the same
// rows again for ever.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "flotilla/common/clock.hpp"
#include "flotilla/hub/api.hpp"
#include "flotilla/hub/federation.hpp"
#include "flotilla/hub/http_server.hpp"
#include "tests/support/federation_fixtures.hpp"
#include "tests/support/hub_fixtures.hpp"
#include "tests/support/hub_test_support.hpp"
#include "tests/support/pki.hpp"
#include "tests/support/temp_dir.hpp"

namespace {

using namespace flotilla;
using namespace flotilla::hub::federation;
using nlohmann::json;

// A region whose device list behaves as a hub's does under its scan limit:
// it walks ids in order after `after`, examines at most `scan` of them, and
// answers the matching ones (up to `limit`) with `next` = the last id it
// looked at when it stopped before the end.
struct StandInRegion {
  std::vector<std::string> ids;  // sorted
  std::set<std::string> matching;
  int scan = 1000;
  std::mutex mu;
  std::vector<std::string> asked_after;  // every position asked, in order

  hub::HttpResponse handle(const hub::HttpRequest& req) {
    const std::string path = req.target.substr(0, req.target.find('?'));
    if (req.method == "GET" && path == "/v1/whoami") return test::json_answer(200, {{"role", "operator"}, {"project", "*"}});
    if (req.method != "GET" || path != "/v1/devices") return test::json_answer(404, {{"error", {{"code", "not_found"}}}});
    std::map<std::string, std::string> q;
    const std::string query = req.target.find('?') == std::string::npos ? "" : req.target.substr(req.target.find('?') + 1);
    for (size_t at = 0; at < query.size();) {
      size_t end = query.find('&', at);
      if (end == std::string::npos) end = query.size();
      const std::string kv = query.substr(at, end - at);
      const size_t eq = kv.find('=');
      q[kv.substr(0, eq)] = eq == std::string::npos ? "" : kv.substr(eq + 1);  // ids and limits need no escapes
      at = end + 1;
    }
    const std::string after = q["after"];
    const size_t limit = static_cast<size_t>(std::stoll(q["limit"]));
    {
      std::lock_guard lock(mu);
      asked_after.push_back(after);
    }
    json items = json::array();
    std::string next;
    int examined = 0;
    for (auto it = std::upper_bound(ids.begin(), ids.end(), after); it != ids.end(); ++it) {
      if (items.size() == limit || examined == scan) {
        next = items.size() == limit ? items.back()["id"].get<std::string>() : *std::prev(it);
        break;
      }
      ++examined;
      if (matching.count(*it)) items.push_back({{"id", *it}, {"project", "default"}});
    }
    return test::json_answer(200, {{"items", items}, {"next", next}});
  }
};

struct RunningRegion {
  StandInRegion region;
  std::unique_ptr<hub::HttpServer> server;
};

}  // namespace

TEST_CASE("federation device pages carry on from where a region's scan limit stopped it, even after an empty page",
          "[unit][federation]") {
  flotilla::test::TempDir dir;
  const std::string ca_pem = flotilla::test::region_pki(dir.path());

  // eu: 60 devices of which every seventh matches, at most 4 rows examined a
  // request (so most of its pages are short and many empty); us: 9 devices,
  // all matching, no scan limit.
  std::map<std::string, RunningRegion> regions;
  for (int i = 0; i < 60; ++i) {
    char id[16];
    std::snprintf(id, sizeof id, "d-eu%03d", i);
    regions["eu"].region.ids.push_back(id);
    if (i % 7 == 3) regions["eu"].region.matching.insert(id);
  }
  regions["eu"].region.scan = 4;
  for (int i = 0; i < 9; ++i) {
    const std::string id = "d-us" + std::to_string(i);
    regions["us"].region.ids.push_back(id);
    regions["us"].region.matching.insert(id);
  }
  std::set<std::string> want;
  for (auto& [name, rr] : regions) {
    for (const auto& id : rr.region.matching) want.insert(name + "/" + id);
  }

  flotilla::test::FederationFront f(dir.path());
  auto& fed = f.fed;
  auto& front = f.front;
  const std::string& admin = f.admin;

  for (auto& [name, rr] : regions) {
    StandInRegion* region = &rr.region;
    rr.server = flotilla::test::serve_region(dir.path(), [region](const hub::HttpRequest& r) { return region->handle(r); });
    Region r;
    r.name = name;
    r.url = "https://127.0.0.1:" + std::to_string(rr.server->port());
    r.ca_pem = ca_pem;
    r.token = "flt_api_standin";
    REQUIRE(fed.add_region(r));
  }

  // A client follows `next` from the first page to the last.
  std::vector<std::string> seen;
  std::string after;
  int pages = 0;
  do {
    auto r = front.handle(flotilla::test::api_request(
        "GET", "/v1/devices?limit=3" + (after.empty() ? "" : "&after=" + after), "", admin));
    INFO(r.body);
    REQUIRE(r.status == 200);
    const json page = flotilla::test::body_of(r);
    CHECK(page["complete"] == true);
    CHECK(page["items"].size() <= 3);
    for (const auto& d : page["items"]) seen.push_back(d["region"].get<std::string>() + "/" + d["id"].get<std::string>());
    after = page["next"].get<std::string>();
    ++pages;
  } while (!after.empty() && pages < 100);

  // Every matching device once, none twice, and the walk ended.
  CHECK(pages < 100);
  CHECK(std::set<std::string>(seen.begin(), seen.end()) == want);
  CHECK(seen.size() == want.size());
  // The scan-limited region was never asked from the same place twice: each
  // request went on from where the one before stopped looking. (eu is
  // merged first, regions go by name, and it has at most one match per
  // request, so none of its pages is cut by the federation's own limit.)
  std::vector<std::string> eu_asked;
  {
    std::lock_guard lock(regions["eu"].region.mu);
    eu_asked = regions["eu"].region.asked_after;
  }
  std::string asked;
  for (const auto& a : eu_asked) asked += "'" + a + "' ";
  INFO("eu asked after: " << asked);
  CHECK(std::set<std::string>(eu_asked.begin(), eu_asked.end()).size() == eu_asked.size());
  // 60 rows, 4 examined a request: 15 requests (the last one ends the walk).
  CHECK(eu_asked.size() == 15);
  for (auto& [name, rr] : regions) rr.server->stop();
}
