// Campaigns end to end with 20 real agents, the real hub and its mosquitto,
// and the k3s stand-in: waves in order, the failure threshold rolling devices
// back, offline devices, and kill -9 of the hub in the middle.
#include <catch2/catch.hpp>

#include <algorithm>
#include <fstream>
#include <map>
#include <set>

#include "flotilla/common/fs.hpp"
#include "tests/support/harness.hpp"

using namespace flotilla;
using namespace flotilla::test;

namespace {

constexpr int kAgents = 20;

BuiltBundle bundle_v(Fleet& f, uint64_t version, const std::vector<v1::Overlay>& overlays = {}) {
  return make_bundle("edge-base", version,
                     {std::make_tuple(v1::FILE_KIND_K3S_CONFIG, std::string("50-edge.yaml"),
                                      "node-label:\n  - \"edge-version=" + std::to_string(version) + "\"\n")},
                     {&f.release}, overlays);
}

std::string create(Hub& hub, const std::string& bundle_id, const json& strategy) {
  auto [status, body] =
      hub.call("POST", "/v1/campaigns", json{{"bundle", bundle_id}, {"selector", "env=it"}, {"strategy", strategy}}.dump());
  INFO(body.dump(2));
  REQUIRE(status == 201);
  return body["id"].get<std::string>();
}

// Waits for one of the given states.
json wait_state(Hub& hub, const std::string& id, const std::vector<std::string>& states,
                std::chrono::seconds timeout = std::chrono::seconds(120)) {
  json c;
  wait_until(
      [&] {
        c = hub.campaign(id, true);
        return std::find(states.begin(), states.end(), c["state"].get<std::string>()) != states.end();
      },
      timeout);
  return c;
}

std::string drop_in(const Agent& a) {
  return fs::read_file(a.root() / "etc/rancher/k3s/config.yaml.d/50-edge.yaml").value_or("");
}

}  // namespace

TEST_CASE("a canary-then-waves campaign converges across 20 agents, wave after wave", "[integration][campaign]") {
  Fleet fleet(kAgents);
  const std::string id = create(fleet.hub, fleet.push(bundle_v(fleet, 1)),
                                json::parse(R"({"canary": 2, "waves": [40, 100], "max_in_flight": 6, "soak": "1s"})"));
  json c = wait_state(fleet.hub, id, {"completed", "paused", "aborted"});
  INFO(c.dump(2));
  REQUIRE(c["state"] == "completed");
  CHECK(c["counts"]["total"] == kAgents);
  CHECK(c["counts"]["applied"] == kAgents);
  CHECK(c["counts"]["failed"] == 0);
  REQUIRE(c["waves"].size() == 3);
  CHECK(c["waves"][0]["name"] == "canary");
  CHECK(c["waves"][0]["counts"]["total"] == 2);

  // Every device of a wave was released only after every device of the wave
  // before it had its outcome (and the soak passed).
  std::map<int, int64_t> last_outcome, first_release;
  for (const auto& d : c["devices"]) {
    const int w = d["wave"];
    CHECK(d["status"] == "applied");
    last_outcome[w] = std::max(last_outcome[w], d["updated_at_ms"].get<int64_t>());
    const int64_t r = d["released_at_ms"];
    first_release[w] = first_release.count(w) ? std::min(first_release[w], r) : r;
  }
  for (int w = 1; w < 3; ++w) {
    if (!first_release.count(w)) continue;
    CHECK(first_release[w] >= last_outcome[w - 1] + 1000);  // soak 1s
  }
  for (const auto& a : fleet.agents) CHECK(drop_in(*a).find("edge-version=1") != std::string::npos);
}

TEST_CASE("when 30% fail their health gate the campaign stops and rolls the others back", "[integration][campaign]") {
  Fleet fleet(kAgents);
  const std::string v1_id = fleet.push(bundle_v(fleet, 1));
  json first = run_campaign(fleet.hub, v1_id, "env=it", std::chrono::seconds(120));
  REQUIRE(first["counts"]["applied"] == kAgents);

  // Version 2 carries a bad config for one device variant: six devices (30%,
  // slots 1, 4, 7, 10, 13, 16) get an overlay that keeps k3s from ever
  // becoming ready (the stand-in's standin-never-ready key), so their health
  // gate fails; v1 has no such overlay, so going back to it heals them.
  v1::Overlay bad;
  bad.set_selector("slot in (1,4,7,10,13,16)");
  (*bad.mutable_k3s_config())["standin-never-ready"] = "true";
  const std::string id = create(
      fleet.hub, fleet.push(bundle_v(fleet, 2, {bad})),
      json::parse(R"({"failure_threshold": {"percent": 20, "min_sample": 5, "action": "rollback"}})"));
  json c = wait_state(fleet.hub, id, {"rolled_back", "completed", "paused", "aborted"}, std::chrono::seconds(180));
  INFO(c.dump(2));
  REQUIRE(c["state"] == "rolled_back");
  CHECK(c["counts"]["failed"].get<int>() >= 1);
  CHECK(c["counts"]["applied"] == 0);
  CHECK(c["counts"]["rollback_failed"] == 0);
  CHECK(c["counts"]["failed"].get<int>() + c["counts"]["rolled_back"].get<int>() == kAgents);
  CHECK_THAT(c["state_reason"].get<std::string>(), Catch::Contains("failure threshold"));
  for (const auto& [reason, n] : c["failure_reasons"].items()) CHECK(reason == "health_gate_failed");
  // Only the variant with the bad overlay failed.
  std::set<std::string> bad_ids;
  for (size_t i : {1, 4, 7, 10, 13, 16}) bad_ids.insert(fleet.agents[i]->device_id());
  for (const auto& row : c["devices"]) {
    if (row["status"] == "failed") CHECK(bad_ids.count(row["device_id"].get<std::string>()) == 1);
  }

  // Every device is back on v1: files, what it reports, and a healthy k3s.
  for (const auto& a : fleet.agents) {
    const std::string dev = a->device_id();
    CHECK(wait_until([&] { return fleet.hub.device(dev)["applied_version"] == 1; }, std::chrono::seconds(30)));
    CHECK(drop_in(*a).find("edge-version=1") != std::string::npos);
  }
}

TEST_CASE("offline devices neither stall nor fail the waves and converge when they return",
          "[integration][campaign]") {
  Fleet fleet(kAgents);
  std::vector<size_t> away = {0, 5, 11, 19};
  for (size_t i : away) fleet.agents[i]->stop();
  REQUIRE(fleet.wait_online(kAgents - away.size()));

  const std::string id = create(fleet.hub, fleet.push(bundle_v(fleet, 1)),
                                json::parse(R"({"waves": [50, 100], "max_in_flight": 8})"));
  json c = wait_state(fleet.hub, id, {"converging", "completed", "paused", "aborted"});
  INFO(c.dump(2));
  REQUIRE(c["state"] == "converging");
  CHECK(c["counts"]["applied"] == kAgents - 4);
  CHECK(c["counts"]["failed"] == 0);
  CHECK(c["counts"]["offline"] == 4);
  std::vector<std::string> expected;
  for (size_t i : away) expected.push_back(fleet.agents[i]->device_id());
  std::vector<std::string> reported = c["away"].get<std::vector<std::string>>();
  std::sort(expected.begin(), expected.end());
  std::sort(reported.begin(), reported.end());
  CHECK(reported == expected);

  for (size_t i : away) fleet.agents[i]->start();
  c = wait_state(fleet.hub, id, {"completed"});
  CHECK(c["state"] == "completed");
  CHECK(c["counts"]["applied"] == kAgents);
  for (size_t i : away) CHECK(drop_in(*fleet.agents[i]).find("edge-version=1") != std::string::npos);
}

TEST_CASE("kill -9 of the hub mid-campaign: it restarts and completes with exact counts", "[integration][campaign]") {
  Fleet fleet(kAgents);
  const std::string id = create(fleet.hub, fleet.push(bundle_v(fleet, 1)),
                                json::parse(R"({"canary": 2, "waves": [50, 100], "max_in_flight": 4, "soak": "500ms"})"));
  REQUIRE(wait_until([&] { return fleet.hub.campaign(id)["counts"]["applied"].get<int>() >= 4; },
                     std::chrono::seconds(60)));
  const int before = fleet.hub.campaign(id)["counts"]["applied"];
  REQUIRE(before < kAgents);  // really in the middle
  fleet.hub.kill9();
  fleet.hub.start();

  json c = wait_state(fleet.hub, id, {"completed", "paused", "aborted"}, std::chrono::seconds(180));
  INFO(c.dump(2));
  REQUIRE(c["state"] == "completed");
  CHECK(c["counts"]["total"] == kAgents);
  CHECK(c["counts"]["applied"] == kAgents);
  CHECK(c["counts"]["failed"] == 0);
  // Exactly one row per device, each counted once.
  std::set<std::string> seen;
  for (const auto& d : c["devices"]) {
    CHECK(seen.insert(d["device_id"].get<std::string>()).second);
    CHECK(d["status"] == "applied");
  }
  CHECK(seen.size() == static_cast<size_t>(kAgents));
  for (const auto& a : fleet.agents) {
    CHECK(fleet.hub.device(a->device_id())["applied_version"] == 1);
  }
}
