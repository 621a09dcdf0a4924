// A federation in front of two regional hubs, all real processes on
// loopback: each region is a full hub over TLS (its own CA) with its own
// mosquitto and real agents with the k3s stand-in; the federation talks to
// them only through their REST API.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <algorithm>
#include <set>

#include "flotilla/bundles/keys.hpp"
#include "flotilla/common/fs.hpp"
#include "flotilla/common/sqlite.hpp"
#include "sim_support.hpp"
#include "tests/support/harness.hpp"
#include "tests/support/pki.hpp"

using namespace flotilla;
using namespace flotilla::test;

namespace {

struct RegionFleet {
  std::string name;
  stdfs::path dir;
  std::string ca;  // the region's CA file
  int port = 0;
  std::unique_ptr<Hub> hub;
  std::vector<std::unique_ptr<Agent>> agents;
  std::string token;  // the operator "*" token the federation holds

  RegionFleet(const stdfs::path& root, std::string n) : name(std::move(n)), dir(root / name) {
    stdfs::create_directories(dir);
    make_ca(dir, "ca");
    make_server_cert(dir, "ca", "hub");
    ca = (dir / "ca.pem").string();
    port = free_loopback_port();
    hub = std::make_unique<Hub>(dir / "hub");
    start();
    token = hub->api_token("operator", "*");
  }
  void start() {
    hub->start({"--listen", "127.0.0.1:" + std::to_string(port), "--tls-cert", (dir / "hub.pem").string(),
                "--tls-key", (dir / "hub.key").string(), "--enroll-rate", "0", "--enroll-rate-per-token", "0"},
               ca);
  }
  // n agents enrolled with labels env=it, site=<region> (and project).
  void add_agents(int n, const bundles::KeyPair& release, const std::string& project = "") {
    const std::map<std::string, std::string> labels = {{"env", "it"}, {"site", name}};
    const std::string tok = project.empty() ? hub->enrollment_token(labels, n) : hub->project_enrollment_token(project, labels, n);
    for (int i = 0; i < n; ++i) {
      AgentOptions o;
      o.root_keys = {bundles::public_key_text(release.pub)};
      o.health_timeout = "4s";
      const size_t slot = agents.size();
      agents.push_back(std::make_unique<Agent>(dir / ("dev-" + std::to_string(slot)), hub->url(), tok, o));
      agents.back()->start_with_env({{"SSL_CERT_FILE", ca}});
    }
  }
  bool wait_online(size_t count) {
    return wait_until(
        [&] {
          size_t online = 0;
          for (const auto& d : hub->devices()) online += d["online"].get<bool>() && d["k3s_version"] != "" ? 1 : 0;
          return online == count;
        },
        std::chrono::seconds(120));
  }
  json region_body() const {
    return json{{"name", name}, {"url", hub->url()}, {"ca_pem", fs::read_file(ca).value()}, {"token", token}};
  }
};

struct Federated {
  TempDir tmp;
  bundles::KeyPair release = bundles::generate_key();
  RegionFleet r1{tmp.path(), "r1"};
  RegionFleet r2{tmp.path(), "r2"};
  Hub fed{tmp.path() / "federation"};

  Federated() {
    fed.start({"--role", "federation", "--federation-poll-interval", "200ms", "--federation-region-timeout", "2s"});
  }
  void join() {
    for (auto* r : {&r1, &r2}) {
      auto [status, body] = fed.call("POST", "/v1/regions", r->region_body().dump());
      INFO(body.dump(2));
      REQUIRE(status == 201);
      CHECK_FALSE(body.contains("token"));
    }
  }
  std::string push(uint64_t version, const std::vector<v1::Overlay>& overlays = {}) {
    auto b = make_bundle("edge-base", version,
                         {std::make_tuple(v1::FILE_KIND_K3S_CONFIG, std::string("50-edge.yaml"),
                                          "node-label:\n  - \"edge-version=" + std::to_string(version) + "\"\n")},
                         {&release}, overlays);
    auto [status, body] = fed.call("POST", "/v1/bundles", b.bytes, "application/octet-stream");
    INFO(body.dump(2));
    REQUIRE((status == 201 || status == 200));
    return body["id"].get<std::string>();
  }
  std::string create(const json& body) {
    auto [status, answer] = fed.call("POST", "/v1/campaigns", body.dump());
    INFO(answer.dump(2));
    REQUIRE(status == 201);
    CHECK(answer["kind"] == "federation");
    return answer["id"].get<std::string>();
  }
  json campaign(const std::string& id) { return fed.call("GET", "/v1/campaigns/" + id).second; }
  json wait_state(const std::string& id, const std::vector<std::string>& states, std::chrono::seconds timeout) {
    json c;
    wait_until(
        [&] {
          c = campaign(id);
          return c.is_object() && std::find(states.begin(), states.end(), c.value("state", "")) != states.end();
        },
        timeout);
    return c;
  }
};

json part_of(const json& c, const std::string& region) {
  for (const auto& p : c["regions"]) {
    if (p["region"] == region) return p;
  }
  return json();
}

std::set<std::string> ids_of(const json& items) {
  std::set<std::string> out;
  for (const auto& i : items) out.insert(i["id"].get<std::string>());
  return out;
}

int64_t count_rows(const stdfs::path& db, const std::string& sql) {
  auto d = sql::Db::open(db.string());
  REQUIRE(d);
  auto st = (*d)->prepare(sql);
  REQUIRE(st);
  auto row = st->step();
  REQUIRE(row);
  return st->col_int(0);
}

}  // namespace

TEST_CASE("a federation lists both regions, pages across them and runs one campaign region by region to exact counts",
          "[integration][federation]") {
  Federated f;
  f.r1.add_agents(3, f.release);
  f.r1.add_agents(1, f.release, "acme");
  f.r2.add_agents(3, f.release);
  f.r2.add_agents(1, f.release, "acme");
  REQUIRE(f.r1.wait_online(4));
  REQUIRE(f.r2.wait_online(4));
  f.join();

  // One list over both regions, every item naming its region; pages of 3
  // through one opaque cursor give every device exactly once.
  std::set<std::string> expected;
  for (auto* r : {&f.r1, &f.r2}) {
    for (const auto& a : r->agents) expected.insert(a->device_id());
  }
  std::set<std::string> seen;
  std::string after;
  int pages = 0;
  do {
    auto [status, page] = f.fed.call("GET", "/v1/devices?limit=3" + (after.empty() ? "" : "&after=" + after));
    INFO(page.dump(2));
    REQUIRE(status == 200);
    CHECK(page["items"].size() <= 3);
    for (const auto& d : page["items"]) {
      CHECK(seen.insert(d["id"].get<std::string>()).second);
      CHECK((d["region"] == "r1" || d["region"] == "r2"));
    }
    for (const auto& r : page["regions"]) CHECK(r["state"] == "ok");
    after = page["next"].get<std::string>();
    REQUIRE(++pages < 10);
  } while (!after.empty());
  CHECK(seen == expected);
  CHECK(pages >= 3);
  // region= narrows to one region.
  auto [st1, only1] = f.fed.call("GET", "/v1/devices?region=r1");
  REQUIRE(st1 == 200);
  CHECK(only1["items"].size() == 4);
  for (const auto& d : only1["items"]) CHECK(d["region"] == "r1");

  // The CLI pointed at the federation works unchanged.
  auto cli = f.fed.cli({"device", "list"});
  INFO(cli.err);
  REQUIRE(cli.exit_code == 0);
  for (const auto& id : expected) CHECK(cli.out.find(id) != std::string::npos);

  // A project-scoped operator at the federation sees only their project, in
  // every region.
  const std::string acme = f.fed.api_token("operator", "acme");
  auto [st2, scoped] = f.fed.call("GET", "/v1/devices", "", "application/json", acme);
  REQUIRE(st2 == 200);
  CHECK(scoped["items"].size() == 2);
  std::set<std::string> scoped_regions;
  for (const auto& d : scoped["items"]) {
    CHECK(d["project"] == "acme");
    scoped_regions.insert(d["region"].get<std::string>());
  }
  CHECK(scoped_regions == std::set<std::string>{"r1", "r2"});
  // Its pages are full: each region is asked for acme's devices only
  // (?project=acme with the federation's "*" token), so pages of 1 give the
  // two acme devices in exactly two pages. Were the regions asked for every
  // project and the page filtered afterwards, r1's three other devices
  // would make empty pages in between.
  std::set<std::string> acme_seen;
  std::string acme_after;
  int acme_pages = 0;
  do {
    auto [st, page] = f.fed.call("GET", "/v1/devices?limit=1" + (acme_after.empty() ? "" : "&after=" + acme_after), "",
                                 "application/json", acme);
    INFO(page.dump(2));
    REQUIRE(st == 200);
    REQUIRE(++acme_pages <= 2);
    REQUIRE(page["items"].size() == 1);
    CHECK(page["items"][0]["project"] == "acme");
    CHECK(acme_seen.insert(page["items"][0]["id"].get<std::string>()).second);
    acme_after = page["next"].get<std::string>();
  } while (!acme_after.empty());
  CHECK(acme_seen.size() == 2);
  // A caller of every project narrows itself the same way; a project-scoped
  // one cannot widen itself to another project.
  auto [st_p, narrowed] = f.fed.call("GET", "/v1/devices?project=acme");
  REQUIRE(st_p == 200);
  CHECK(ids_of(narrowed["items"]) == acme_seen);
  auto [st_w, widened] = f.fed.call("GET", "/v1/devices?project=default", "", "application/json", acme);
  CHECK(st_w == 403);
  CHECK(f.fed.call("GET", "/v1/campaigns?project=default", "", "application/json", acme).first == 403);

  // One campaign, r1 then r2 after a soak: the bundle (project default)
  // reaches the 3 default-project devices of each region.
  const std::string bundle = f.push(1);
  const std::string id = f.create({{"bundle", bundle}, {"selector", "env=it"}, {"regions", {"r1", "r2"}}, {"soak", "1s"},
                                   {"threshold", {{"percent", 10}, {"min_sample", 1}}}});
  json c = f.wait_state(id, {"completed", "stopped", "aborted"}, std::chrono::seconds(180));
  INFO(c.dump(2));
  REQUIRE(c["state"] == "completed");
  CHECK(c["counts"]["total"] == 6);
  CHECK(c["counts"]["applied"] == 6);
  CHECK(c["counts"]["failed"] == 0);
  for (const char* r : {"r1", "r2"}) {
    const json p = part_of(c, r);
    CHECK(p["state"] == "completed");
    CHECK(p["counts"]["applied"] == 3);
    CHECK(p["share"].get<double>() == Approx(0.5));
    CHECK_FALSE(p["last_answer_at"].get<std::string>().empty());
  }
  // r2's campaign was created only after r1's had finished.
  const json rc1 = f.r1.hub->campaign(part_of(c, "r1")["regional_campaign"], true);
  const json rc2 = f.r2.hub->campaign(part_of(c, "r2")["regional_campaign"], true);
  int64_t r1_last = 0;
  for (const auto& d : rc1["devices"]) r1_last = std::max(r1_last, d["updated_at_ms"].get<int64_t>());
  int64_t r2_first = INT64_MAX;
  for (const auto& d : rc2["devices"]) r2_first = std::min(r2_first, d["released_at_ms"].get<int64_t>());
  CHECK(r2_first >= r1_last + 1000);
  // Every device of the default project applied it; the acme ones were never targeted.
  for (auto* r : {&f.r1, &f.r2}) {
    for (const auto& a : r->agents) {
      const json d = r->hub->device(a->device_id());
      CHECK(d["applied_version"] == (d["project"] == "acme" ? 0 : 1));
    }
  }
  // Every action fanned out is in the federation's audit, with the region's answer.
  int creates = 0, bundles_published = 0;
  for (const auto& a : f.fed.audit()) {
    const std::string path = a.value("path", "");
    if (path == "region:r1 POST /v1/campaigns" || path == "region:r2 POST /v1/campaigns") {
      ++creates;
      CHECK(a["status"] == 201);
      CHECK_THAT(a["detail"].get<std::string>(), Catch::Contains("region answered: 201"));
    }
    if (path.find(" POST /v1/bundles") != std::string::npos) ++bundles_published;
  }
  CHECK(creates == 2);
  CHECK(bundles_published == 2);
  // The campaign list shows the federated campaign and each regional one with its region.
  auto [st3, list] = f.fed.call("GET", "/v1/campaigns");
  REQUIRE(st3 == 200);
  std::set<std::string> kinds;
  for (const auto& x : list["items"]) kinds.insert(x["kind"].get<std::string>() + ":" + x.value("region", "*"));
  CHECK(kinds == std::set<std::string>{"federation:*", "regional:r1", "regional:r2"});
  // The acme operator does not see the default-project campaign anywhere.
  auto [st4, acme_list] = f.fed.call("GET", "/v1/campaigns", "", "application/json", acme);
  REQUIRE(st4 == 200);
  CHECK(acme_list["items"].empty());
  auto cli_campaigns = f.fed.cli({"campaign", "list"});
  REQUIRE(cli_campaigns.exit_code == 0);
  CHECK(cli_campaigns.out.find(id) != std::string::npos);
}

TEST_CASE("a failure threshold crossed in the first region stops the rollout before the second receives anything",
          "[integration][federation]") {
  Federated f;
  f.r1.add_agents(3, f.release);
  f.r2.add_agents(3, f.release);
  REQUIRE(f.r1.wait_online(3));
  REQUIRE(f.r2.wait_online(3));
  f.join();
  // Every r1 device gets a config that keeps k3s from becoming ready, so its
  // health gate fails; r2's devices would be fine.
  v1::Overlay bad;
  bad.set_selector("site=r1");
  (*bad.mutable_k3s_config())["standin-never-ready"] = "true";
  const std::string bundle = f.push(1, {bad});
  const std::string id =
      f.create({{"bundle", bundle}, {"selector", "env=it"}, {"regions", {"r1", "r2"}},
                {"threshold", {{"percent", 20}, {"min_sample", 1}}},
                {"strategy", {{"failure_threshold", {{"percent", 50}, {"min_sample", 2}, {"action", "pause"}}}}}});
  json c = f.wait_state(id, {"stopped", "completed", "aborted"}, std::chrono::seconds(180));
  INFO(c.dump(2));
  REQUIRE(c["state"] == "stopped");
  CHECK_THAT(c["state_reason"].get<std::string>(), Catch::Contains("region r1"));
  CHECK(part_of(c, "r1")["counts"]["failed"].get<int>() >= 1);
  CHECK(part_of(c, "r2").is_null());
  // Region 2 received nothing: no campaign, no bundle.
  auto [s1, campaigns] = f.r2.hub->call("GET", "/v1/campaigns");
  REQUIRE(s1 == 200);
  CHECK(campaigns["items"].empty());
  auto [s2, bundles] = f.r2.hub->call("GET", "/v1/bundles");
  REQUIRE(s2 == 200);
  CHECK(bundles["items"].empty());
  for (const auto& a : f.r2.agents) CHECK(f.r2.hub->device(a->device_id())["applied_version"] == 0);
}

TEST_CASE("a region stopped mid-campaign is shown unreachable with its last counts, and after its restart all converge",
          "[integration][federation]") {
  Federated f;
  f.r1.add_agents(4, f.release);
  f.r2.add_agents(4, f.release);
  REQUIRE(f.r1.wait_online(4));
  REQUIRE(f.r2.wait_online(4));
  f.join();
  const std::string bundle = f.push(1);
  // Both regions in one group, in waves with a soak, so it takes a while.
  const std::string id = f.create({{"bundle", bundle},
                                   {"selector", "env=it"},
                                   {"regions", json::array({json::array({"r1", "r2"})})},
                                   {"strategy", {{"waves", {25, 50, 100}}, {"soak", "2s"}}}});
  // Wait until r2 has reported progress, then stop its hub.
  json c;
  REQUIRE(wait_until(
      [&] {
        c = f.campaign(id);
        const json p = part_of(c, "r2");
        return !p.is_null() && p["counts"].value("applied", 0) >= 1;
      },
      std::chrono::seconds(120)));
  // The federation has seen both regions' campaign lists once.
  REQUIRE(f.fed.call("GET", "/v1/campaigns").first == 200);
  f.r2.hub->stop();
  json last;
  REQUIRE(wait_until(
      [&] {
        c = f.campaign(id);
        return part_of(c, "r2")["reachable"] == false;
      },
      std::chrono::seconds(30)));
  last = part_of(c, "r2");
  INFO(c.dump(2));
  // Its last counts are kept, not dropped or zeroed.
  CHECK(last["counts"]["total"] == 4);
  CHECK(last["counts"]["applied"].get<int>() >= 1);
  CHECK_FALSE(last["last_answer_at"].get<std::string>().empty());
  // The lists name it unreachable; the other region's devices are all there.
  auto [sd, devices] = f.fed.call("GET", "/v1/devices");
  REQUIRE(sd == 200);
  CHECK(devices["complete"] == false);
  CHECK(devices["items"].size() == 4);
  bool shown = false;
  for (const auto& r : devices["regions"]) {
    if (r["region"] == "r2") {
      shown = true;
      CHECK(r["state"] == "unreachable");
    } else {
      CHECK(r["state"] == "ok");
    }
  }
  CHECK(shown);
  auto [sc, campaigns] = f.fed.call("GET", "/v1/campaigns");
  REQUIRE(sc == 200);
  bool stale_r2 = false;
  for (const auto& x : campaigns["items"]) stale_r2 = stale_r2 || (x.value("region", "") == "r2" && x["stale"] == true);
  CHECK(stale_r2);
  // r1 is unaffected and completes.
  REQUIRE(wait_until([&] { return part_of(f.campaign(id), "r1")["state"] == "completed"; }, std::chrono::seconds(120)));
  CHECK(part_of(f.campaign(id), "r1")["counts"]["applied"] == 4);

  f.r2.start();
  c = f.wait_state(id, {"completed", "stopped", "aborted"}, std::chrono::seconds(180));
  INFO(c.dump(2));
  REQUIRE(c["state"] == "completed");
  CHECK(c["counts"]["total"] == 8);
  CHECK(c["counts"]["applied"] == 8);
  CHECK(c["counts"]["failed"] == 0);
  CHECK(part_of(c, "r2")["reachable"] == true);
  CHECK(part_of(c, "r2")["counts"]["applied"] == 4);
}

TEST_CASE("regions are checked before they are stored and a region token acts only within its rights",
          "[integration][federation]") {
  Federated f;
  const stdfs::path fed_db = f.fed.data_dir() / "federation.db";
  auto regions_stored = [&] { return count_rows(fed_db, "SELECT COUNT(*) FROM regions"); };
  json good = f.r1.region_body();

  struct Bad {
    const char* what;
    json body;
    const char* message;
  };
  json http_url = good;
  http_url["url"] = "http://127.0.0.1:" + std::to_string(f.r1.port);
  json other_ca = good;
  make_ca(f.tmp.path(), "stranger");
  other_ca["ca_pem"] = fs::read_file(f.tmp.path() / "stranger.pem").value();
  json not_pem = good;
  not_pem["ca_pem"] = "hello";
  json admin_token = good;
  admin_token["token"] = f.r1.hub->admin_token();
  json viewer_token = good;
  viewer_token["token"] = f.r1.hub->api_token("viewer", "*");
  json scoped_token = good;
  scoped_token["token"] = f.r1.hub->api_token("operator", "acme");
  json foreign_token = good;
  foreign_token["token"] = f.r2.token;  // r2's token at r1
  json bad_name = good;
  bad_name["name"] = "R1/../x";
  json with_path = good;
  with_path["url"] = f.r1.hub->url() + "/v1";
  const std::vector<Bad> cases = {
      {"plain http", http_url, "https://"},
      {"a CA that does not verify the region", other_ca, "did not answer over TLS verified"},
      {"not a certificate", not_pem, "ca_pem"},
      {"the region's admin token (more than needed)", admin_token, "exactly an operator token"},
      {"a viewer token (less than needed)", viewer_token, "exactly an operator token"},
      {"a project-scoped token", scoped_token, "exactly an operator token"},
      {"another region's token", foreign_token, "refused the token"},
      {"a bad name", bad_name, "bad region name"},
      {"a URL with a path", with_path, "without a path"},
  };
  for (const auto& b : cases) {
    INFO(b.what);
    auto [status, body] = f.fed.call("POST", "/v1/regions", b.body.dump());
    INFO(body.dump(2));
    CHECK(status == 400);
    CHECK_THAT(body["error"]["message"].get<std::string>(), Catch::Contains(b.message));
    CHECK(regions_stored() == 0);
  }
  // Only an admin of the federation adds regions.
  const std::string fed_operator = f.fed.api_token("operator", "*");
  auto [s_op, b_op] = f.fed.call("POST", "/v1/regions", good.dump(), "application/json", fed_operator);
  CHECK(s_op == 403);
  CHECK(regions_stored() == 0);

  f.join();
  CHECK(regions_stored() == 2);
  // The token is never given back, and never in the log.
  auto [sl, listed] = f.fed.call("GET", "/v1/regions");
  REQUIRE(sl == 200);
  CHECK(listed.dump().find(f.r1.token) == std::string::npos);
  CHECK(f.fed.log().find(f.r1.token) == std::string::npos);
  // Twice the same name: 409, nothing changed.
  auto [sd, dup] = f.fed.call("POST", "/v1/regions", good.dump());
  CHECK(sd == 409);
  CHECK(regions_stored() == 2);

  // Unknown regions are clear 4xx and store nothing.
  const std::string bundle = f.push(1);
  const int64_t campaigns_before = count_rows(fed_db, "SELECT COUNT(*) FROM fed_campaigns");
  auto [su, unknown] = f.fed.call("POST", "/v1/campaigns",
                                  json{{"bundle", bundle}, {"regions", {"r1", "nowhere"}}}.dump());
  CHECK(su == 400);
  CHECK_THAT(unknown["error"]["message"].get<std::string>(), Catch::Contains("no region 'nowhere'"));
  auto [sbad, badstrategy] = f.fed.call("POST", "/v1/campaigns",
                                        json{{"bundle", bundle}, {"regions", {"r1"}}, {"strategy", {{"waves", "x"}}}}.dump());
  CHECK(sbad == 400);
  CHECK(count_rows(fed_db, "SELECT COUNT(*) FROM fed_campaigns") == campaigns_before);
  auto [sr, nolist] = f.fed.call("GET", "/v1/devices?region=nowhere");
  CHECK(sr == 404);
  auto [srm, norm] = f.fed.call("DELETE", "/v1/regions/nowhere");
  CHECK(srm == 404);
  CHECK(regions_stored() == 2);

  // The region token the federation holds is an operator token of its own
  // region only: another region does not know it, and at its own region it
  // cannot manage tokens or read the audit log.
  auto [s_other, b_other] = f.r2.hub->call("GET", "/v1/devices", "", "application/json", f.r1.token);
  CHECK(s_other == 401);
  auto [s_tok, b_tok] = f.r1.hub->call("POST", "/v1/tokens", json{{"name", "x"}, {"role", "admin"}}.dump(),
                                       "application/json", f.r1.token);
  CHECK(s_tok == 403);
  auto [s_aud, b_aud] = f.r1.hub->call("GET", "/v1/audit", "", "application/json", f.r1.token);
  CHECK(s_aud == 403);

  // The CLI manages regions too: list, and remove one (audited).
  auto cl = f.fed.cli({"region", "list"});
  REQUIRE(cl.exit_code == 0);
  CHECK(cl.out.find("r1") != std::string::npos);
  CHECK(cl.out.find("r2") != std::string::npos);
  auto rm = f.fed.cli({"region", "remove", "r2"});
  INFO(rm.err);
  CHECK(rm.exit_code == 0);
  CHECK(regions_stored() == 1);
  bool audited = false;
  for (const auto& a : f.fed.audit()) audited = audited || (a["path"] == "/v1/regions/r2" && a["status"] == 200);
  CHECK(audited);
}

TEST_CASE("pause and resume fan out to every region, and a federation killed mid-campaign carries on without "
          "duplicating regional campaigns",
          "[integration][federation]") {
  Federated f;
  f.r1.add_agents(3, f.release);
  f.r2.add_agents(3, f.release);
  REQUIRE(f.r1.wait_online(3));
  REQUIRE(f.r2.wait_online(3));
  f.join();
  const std::string bundle = f.push(1);
  const std::string id = f.create({{"bundle", bundle},
                                   {"selector", "env=it"},
                                   {"regions", json::array({json::array({"r1", "r2"})})},
                                   {"strategy", {{"waves", {34, 67, 100}}, {"soak", "2s"}}}});
  json c;
  REQUIRE(wait_until(
      [&] {
        c = f.campaign(id);
        auto started = [&](const char* r) {
          const json p = part_of(c, r);
          return p.is_object() && !p.value("regional_campaign", "").empty();
        };
        return started("r1") && started("r2");
      },
      std::chrono::seconds(60)));
  const std::string rid1 = part_of(c, "r1")["regional_campaign"], rid2 = part_of(c, "r2")["regional_campaign"];

  auto [sp, paused] = f.fed.call("POST", "/v1/campaigns/" + id + "/pause");
  INFO(paused.dump(2));
  REQUIRE(sp == 200);
  CHECK(paused["state"] == "paused");
  CHECK(paused["answers"].size() == 2);
  for (const auto& a : paused["answers"]) CHECK(a["status"] == 200);
  CHECK(f.r1.hub->campaign(rid1)["state"] == "paused");
  CHECK(f.r2.hub->campaign(rid2)["state"] == "paused");
  // Pausing twice is a clear conflict, and nothing is sent to the regions.
  auto [sp2, again] = f.fed.call("POST", "/v1/campaigns/" + id + "/pause");
  CHECK(sp2 == 409);

  auto [sr, resumed] = f.fed.call("POST", "/v1/campaigns/" + id + "/resume");
  INFO(resumed.dump(2));
  REQUIRE(sr == 200);
  CHECK(resumed["state"] == "running");
  CHECK(f.r1.hub->campaign(rid1)["state"] != "paused");
  CHECK(f.r2.hub->campaign(rid2)["state"] != "paused");
  int fanned = 0;
  for (const auto& a : f.fed.audit()) {
    const std::string path = a.value("path", "");
    if (path == "region:r1 POST /v1/campaigns/" + rid1 + "/pause" ||
        path == "region:r2 POST /v1/campaigns/" + rid2 + "/resume") {
      ++fanned;
      CHECK(a["status"] == 200);
    }
  }
  CHECK(fanned == 2);

  // kill -9 of the federation; it starts again over the same data.
  f.fed.kill9();
  f.fed.start({"--role", "federation", "--federation-poll-interval", "200ms", "--federation-region-timeout", "2s"});
  c = f.wait_state(id, {"completed", "stopped", "aborted"}, std::chrono::seconds(180));
  INFO(c.dump(2));
  REQUIRE(c["state"] == "completed");
  CHECK(c["counts"]["total"] == 6);
  CHECK(c["counts"]["applied"] == 6);
  // One regional campaign per region, the same ones as before the kill.
  CHECK(part_of(c, "r1")["regional_campaign"] == rid1);
  CHECK(part_of(c, "r2")["regional_campaign"] == rid2);
  for (auto* r : {&f.r1, &f.r2}) {
    auto [s, list] = r->hub->call("GET", "/v1/campaigns");
    REQUIRE(s == 200);
    CHECK(list["items"].size() == 1);
  }
}

TEST_CASE("simulated devices in two regions: a federated campaign converges with exact counts, its rollback reaches "
          "both regions, and device get and campaign get work at the federation",
          "[integration][federation]") {
  Federated f;
  f.join();
  constexpr int kPerRegion = 36;
  // One serve-only simulator per region, each with its own seed (so its own
  // device ids), pinning the federation's release key; the region's CA for
  // its REST API, the broker's CA from the enrollment answers.
  std::vector<std::unique_ptr<ServingSim>> sims;
  uint64_t seed = 21;
  for (auto* r : {&f.r1, &f.r2}) {
    sims.push_back(std::make_unique<ServingSim>(
        f.tmp.path() / ("sim-" + r->name), r->hub->url(), r->hub->api_token("operator", "*"),
        std::vector<std::string>{"--devices", std::to_string(kPerRegion), "--devices-per-gateway", "12", "--label",
                                 "fed", "--seed", std::to_string(seed++), "--root-key",
                                 bundles::public_key_text(f.release.pub)},
        std::map<std::string, std::string>{{"SSL_CERT_FILE", r->ca}}));
  }
  for (auto& s : sims) {
    INFO(s->log());
    REQUIRE(s->wait_serving(std::chrono::seconds(180)).is_object());
  }

  auto run_to_end = [&](uint64_t version) {
    const std::string bundle = f.push(version);
    const std::string id = f.create({{"bundle", bundle}, {"selector", "sim-run=fed"}, {"regions", {"r1", "r2"}},
                                     {"threshold", {{"percent", 10}, {"min_sample", 1}}}});
    json c = f.wait_state(id, {"completed", "stopped", "aborted"}, std::chrono::seconds(180));
    INFO(c.dump(2));
    REQUIRE(c["state"] == "completed");
    CHECK(c["counts"]["total"] == 2 * kPerRegion);
    CHECK(c["counts"]["applied"] == 2 * kPerRegion);
    CHECK(c["counts"]["failed"] == 0);
    for (const char* r : {"r1", "r2"}) {
      CHECK(part_of(c, r)["counts"]["total"] == kPerRegion);
      CHECK(part_of(c, r)["counts"]["applied"] == kPerRegion);
    }
    return c;
  };
  const json first = run_to_end(1);
  const json second = run_to_end(2);
  const std::string id2 = second["id"];

  // GET /v1/devices/{id} at the federation finds a device in either region
  // and names it; an unknown id is a 404 naming the regions asked.
  const json r1_devices = f.r1.hub->devices("sim-run=fed");
  const json r2_devices = f.r2.hub->devices("sim-run=fed");
  REQUIRE(r1_devices.size() == kPerRegion);
  REQUIRE(r2_devices.size() == kPerRegion);
  for (const auto& [devs, region] : {std::pair{&r1_devices, "r1"}, std::pair{&r2_devices, "r2"}}) {
    const std::string did = (*devs)[0]["id"];
    auto [sd, d] = f.fed.call("GET", "/v1/devices/" + did);
    INFO(d.dump(2));
    REQUIRE(sd == 200);
    CHECK(d["id"] == did);
    CHECK(d["region"] == region);
    CHECK(d["applied_version"] == 2);
  }
  auto [snf, nf] = f.fed.call("GET", "/v1/devices/d-nowhere");
  CHECK(snf == 404);
  CHECK(nf["regions"].size() == 2);

  // flotilla campaign get on the federated campaign: its state and both regions.
  auto cli = f.fed.cli({"campaign", "get", id2});
  INFO(cli.err);
  REQUIRE(cli.exit_code == 0);
  CHECK(cli.out.find(id2) != std::string::npos);
  CHECK(cli.out.find("completed") != std::string::npos);
  CHECK(cli.out.find("r1") != std::string::npos);
  CHECK(cli.out.find("r2") != std::string::npos);

  // Rollback of the second campaign fans out to both regions: every device
  // goes back to version 1, and the federation audits each region's answer.
  auto [sr, rolled] = f.fed.call("POST", "/v1/campaigns/" + id2 + "/rollback");
  INFO(rolled.dump(2));
  REQUIRE(sr == 200);
  REQUIRE(rolled["answers"].size() == 2);
  for (const auto& a : rolled["answers"]) CHECK(a["status"] == 200);
  CHECK_THAT(rolled["state_reason"].get<std::string>(), Catch::Contains("rolled back"));
  for (auto* r : {&f.r1, &f.r2}) {
    INFO(r->name);
    CHECK(wait_until(
        [&] {
          for (const auto& d : r->hub->devices("sim-run=fed")) {
            if (d["applied_version"] != 1) return false;
          }
          return true;
        },
        std::chrono::seconds(120)));
  }
  int audited = 0;
  for (const auto& a : f.fed.audit()) {
    const std::string path = a.value("path", "");
    for (const char* r : {"r1", "r2"}) {
      if (path == std::string("region:") + r + " POST /v1/campaigns/" +
                      part_of(second, r)["regional_campaign"].get<std::string>() + "/rollback") {
        ++audited;
        CHECK(a["status"] == 200);
      }
    }
  }
  CHECK(audited == 2);
  // Each simulator saw its devices back on the first bundle.
  for (auto& s : sims) {
    auto [code, report] = s->stop();
    INFO(s->log());
    REQUIRE(code == 0);
    CHECK(report["serve"]["applied"] == json{{"edge-base@1", kPerRegion}});
  }
  (void)first;
}

TEST_CASE("faults in simulated regions: install failures stop the rollout at that region's threshold with exact "
          "counts, and devices whose link drops mid-campaign converge when they return",
          "[integration][federation]") {
  Federated f;
  f.join();
  constexpr int kPerRegion = 24;
  // r1: a quarter of the devices cannot write node files (install_failed);
  // r2: half of them lose their link as the desired state arrives and come
  // back 1-4 s later. Same seeds, same faulty devices every run.
  std::map<std::string, std::unique_ptr<ServingSim>> sims;
  for (const auto& [r, fault] : {std::pair{&f.r1, "--install-fail"}, std::pair{&f.r2, "--flaky"}}) {
    sims[r->name] = std::make_unique<ServingSim>(
        f.tmp.path() / ("sim-" + r->name), r->hub->url(), r->hub->api_token("operator", "*"),
        std::vector<std::string>{"--devices", std::to_string(kPerRegion), "--devices-per-gateway", "8", "--label",
                                 "faults", "--seed", r->name == "r1" ? "31" : "32", fault,
                                 r->name == "r1" ? "0.25" : "0.5", "--root-key",
                                 bundles::public_key_text(f.release.pub)},
        std::map<std::string, std::string>{{"SSL_CERT_FILE", r->ca}});
  }
  for (auto& [name, s] : sims) {
    INFO(s->log());
    REQUIRE(s->wait_serving(std::chrono::seconds(180)).is_object());
  }
  // Each regional campaign runs to its end whatever fails (its own threshold
  // trips only if every device failed): the federation's per-region
  // threshold decides, once all of r1's devices have an outcome.
  const json regional_strategy = {{"failure_threshold", {{"percent", 100}, {"min_sample", kPerRegion}}}};

  const std::string v1 = f.push(1);
  const std::string a = f.create({{"bundle", v1},
                                  {"selector", "sim-run=faults"},
                                  {"regions", {"r1", "r2"}},
                                  {"strategy", regional_strategy},
                                  {"thresholds", {{"r1", {{"percent", 10}, {"min_sample", kPerRegion}}}}}});
  json c = f.wait_state(a, {"stopped", "completed", "aborted"}, std::chrono::seconds(180));
  INFO(c.dump(2));
  REQUIRE(c["state"] == "stopped");
  CHECK_THAT(c["state_reason"].get<std::string>(), Catch::Contains("region r1 failed its threshold"));
  CHECK_THAT(c["state_reason"].get<std::string>(), Catch::Contains("later regions were not started"));
  // Exact per region: r1's counts are the region's own, every device decided.
  const json p1 = part_of(c, "r1");
  const int failed = p1["counts"]["failed"].get<int>();
  CHECK(failed >= 1);
  CHECK(failed < kPerRegion);
  CHECK(p1["counts"]["total"] == kPerRegion);
  CHECK(p1["counts"]["applied"] == kPerRegion - failed);
  const json own = f.r1.hub->campaign(p1["regional_campaign"].get<std::string>());
  CHECK(own["counts"]["failed"] == failed);
  CHECK(own["counts"]["applied"] == kPerRegion - failed);
  CHECK(c["counts"]["total"] == kPerRegion);
  CHECK(c["counts"]["failed"] == failed);
  for (const auto& x : own["failure_reasons"].items()) CHECK(x.key() == "install_failed");
  // r2 received nothing: no part, no campaign, no bundle, no device changed.
  CHECK(part_of(c, "r2").is_null());
  CHECK(f.r2.hub->call("GET", "/v1/campaigns").second["items"].empty());
  CHECK(f.r2.hub->call("GET", "/v1/bundles").second["items"].empty());
  for (const auto& d : f.r2.hub->devices("sim-run=faults")) CHECK(d["applied_version"] == 0);

  // The next bundle goes to r2 first, where links drop mid-campaign, then to
  // r1 with a threshold its known failures stay within: the dropped devices
  // converge once back, and the counts are exact in both regions.
  const std::string v2 = f.push(2);
  const std::string b = f.create({{"bundle", v2},
                                  {"selector", "sim-run=faults"},
                                  {"regions", {"r2", "r1"}},
                                  {"strategy", regional_strategy},
                                  {"thresholds", {{"r1", {{"percent", 100}, {"min_sample", 1}}}}}});
  c = f.wait_state(b, {"stopped", "completed", "aborted"}, std::chrono::seconds(180));
  INFO(c.dump(2));
  REQUIRE(c["state"] == "completed");
  CHECK(c["counts"]["total"] == 2 * kPerRegion);
  CHECK(c["counts"]["applied"] == 2 * kPerRegion - failed);
  CHECK(c["counts"]["failed"] == failed);
  CHECK(part_of(c, "r2")["state"] == "completed");
  CHECK(part_of(c, "r2")["counts"]["applied"] == kPerRegion);
  CHECK(part_of(c, "r2")["counts"]["failed"] == 0);
  CHECK(part_of(c, "r1")["counts"]["applied"] == kPerRegion - failed);
  CHECK(part_of(c, "r1")["counts"]["failed"] == failed);
  for (const auto& d : f.r2.hub->devices("sim-run=faults")) CHECK(d["applied_version"] == 2);

  // The simulators agree device by device: r2's links did drop, and all its
  // devices hold v2; r1's failing devices never applied anything.
  auto [code2, rep2] = sims["r2"]->stop();
  INFO(sims["r2"]->log());
  REQUIRE(code2 == 0);
  CHECK(rep2["serve"]["link_drops"].get<int>() >= 1);
  CHECK(rep2["serve"]["applied"] == json{{"edge-base@2", kPerRegion}});
  auto [code1, rep1] = sims["r1"]->stop();
  REQUIRE(code1 == 0);
  CHECK(rep1["serve"]["applied"] == json{{"edge-base@2", kPerRegion - failed}, {"none", failed}});
}
