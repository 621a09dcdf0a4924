// [unit] How a campaign holds up in a real fleet, with a fake clock: live
// membership, a rate limit with an exponential ramp, maintenance windows in
// device-local time, approval gates between waves, and the audit entry every
// automatic threshold action writes.
#include <catch2/catch.hpp>

#include <cmath>
#include <set>

#include "flotilla/hub/timezone.hpp"
#include "tests/support/campaign_fleet.hpp"

using namespace flotilla;
using namespace flotilla::hub;
using flotilla::test::Fleet;
using nlohmann::json;

namespace {

// Runs the engine for `seconds` of fake time in 250 ms ticks, answering every
// released device with "applied"; returns the release time of each device.
std::map<std::string, int64_t> run_applying(Fleet& f, const std::string& id, int seconds) {
  std::map<std::string, int64_t> released;
  for (int t = 0; t < seconds * 4; ++t) {
    f.hub->tick();
    for (const auto& d : f.in_flight(id)) {
      released.emplace(d, f.clock.now_unix_ms());
      f.report(d, v1::AGENT_STATE_APPLIED);
    }
    f.clock.advance(std::chrono::milliseconds(250));
  }
  return released;
}

std::vector<AuditRecord> engine_audit(Fleet& f) {
  auto all = f.hub->list_audit(0, 1000, "*");
  REQUIRE(all);
  std::vector<AuditRecord> out;
  for (const auto& a : *all) {
    if (a.method == "AUTO") out.push_back(a);
  }
  return out;
}

}  // namespace

TEST_CASE("strategy parsing of membership, rate, maintenance window and approval", "[unit][hub][campaign]") {
  auto ok = Strategy::from_json(json::parse(R"({"waves": [10, 50, 100], "membership": "static",
      "rate": {"max_per_minute": 600, "start_per_minute": 10, "factor": 3, "every_applied": 20},
      "maintenance_window": {"start": "22:00", "end": "04:30", "timezone": "Europe/Berlin", "timezone_label": "tz"},
      "approval": ["wave 3", "wave 2"]})"));
  REQUIRE(ok);
  CHECK(ok->membership == Membership::fixed);
  CHECK(ok->approval_waves == std::vector<int>{1, 2});
  CHECK(ok->window.start_minute == 22 * 60);
  CHECK(ok->window.end_minute == 4 * 60 + 30);
  // Round trip through the stored JSON.
  auto again = Strategy::from_json(ok->to_json());
  REQUIRE(again);
  CHECK(again->to_json() == ok->to_json());
  // The ramp: 10, 30, 90, 270, then the cap.
  CHECK(ok->rate.per_minute(0) == 10);
  CHECK(ok->rate.per_minute(19) == 10);
  CHECK(ok->rate.per_minute(20) == 30);
  CHECK(ok->rate.per_minute(65) == 270);
  CHECK(ok->rate.per_minute(100000) == 600);
  auto each = Strategy::from_json(json::parse(R"({"canary": 2, "waves": [50, 100], "approval": "each_wave"})"));
  REQUIRE(each);
  CHECK(each->approval_waves == std::vector<int>{1, 2});

  auto bad = [](const char* text) {
    auto s = Strategy::from_json(json::parse(text));
    REQUIRE_FALSE(s);
    return s.error().message;
  };
  CHECK_THAT(bad(R"({"membership": "sometimes"})"), Catch::Contains("strategy.membership"));
  CHECK_THAT(bad(R"({"rate": {"start_per_minute": 5}})"), Catch::Contains("rate.max_per_minute"));
  CHECK_THAT(bad(R"({"rate": {"max_per_minute": 0}})"), Catch::Contains("rate.max_per_minute"));
  CHECK_THAT(bad(R"({"rate": {"max_per_minute": 10, "start_per_minute": 20}})"), Catch::Contains("start_per_minute"));
  CHECK_THAT(bad(R"({"rate": {"max_per_minute": 100, "start_per_minute": 20}})"), Catch::Contains("every_applied"));
  CHECK_THAT(bad(R"({"rate": {"max_per_minute": 100, "factor": 1}})"), Catch::Contains("rate.factor"));
  CHECK_THAT(bad(R"({"rate": {"max_per_minute": 100, "burst": 1}})"), Catch::Contains("rate.burst"));
  CHECK_THAT(bad(R"({"maintenance_window": {"start": "25:00", "end": "04:00"}})"),
             Catch::Contains("maintenance_window.start"));
  CHECK_THAT(bad(R"({"maintenance_window": {"start": "02:00"}})"), Catch::Contains("maintenance_window.end"));
  CHECK_THAT(bad(R"({"maintenance_window": {"start": "02:00", "end": "02:00"}})"), Catch::Contains("same time"));
  CHECK_THAT(bad(R"({"maintenance_window": {"start": "02:00", "end": "03:00", "timezone": "Mars/Olympus"}})"),
             Catch::Contains("unknown time zone"));
  CHECK_THAT(bad(R"({"maintenance_window": {"start": "02:00", "end": "03:00", "timezone": "../../etc/passwd"}})"),
             Catch::Contains("not a time zone name"));
  CHECK_THAT(bad(R"({"approval": ["wave 9"]})"), Catch::Contains("not a wave"));
  CHECK_THAT(bad(R"({"approval": ["wave 1"]})"), Catch::Contains("first wave"));
  CHECK_THAT(bad(R"({"approval": "sometimes"})"), Catch::Contains("strategy.approval"));
}

TEST_CASE("time zones come from the system's zone files, daylight saving included", "[unit][hub][campaign]") {
  const int64_t summer = 1782864000;  // 2026-07-01T00:00:00Z
  const int64_t winter = 1768435200;  // 2026-01-15T00:00:00Z
  CHECK(*utc_offset_seconds("Europe/Berlin", summer) == 7200);
  CHECK(*utc_offset_seconds("Europe/Berlin", winter) == 3600);
  CHECK(*utc_offset_seconds("America/New_York", winter) == -5 * 3600);
  CHECK(*utc_offset_seconds("Asia/Kolkata", summer) == 5 * 3600 + 1800);
  CHECK(*utc_offset_seconds("UTC", summer) == 0);
  CHECK(*local_minute_of_day("Europe/Berlin", summer) == 120);      // 02:00
  CHECK(*local_minute_of_day("America/New_York", winter) == 19 * 60);  // 19:00 the day before
  for (const char* bad : {"", "/etc/passwd", "Europe/../../etc/passwd", "Europe//Berlin", "Europe/Berlin/", "a.b"}) {
    INFO(bad);
    CHECK_FALSE(valid_zone_name(bad));
    CHECK_FALSE(utc_offset_seconds(bad, summer));
  }
  CHECK_FALSE(utc_offset_seconds("Nowhere/Atlantis", summer));
}

TEST_CASE("a device enrolled mid-campaign with matching labels joins and applies", "[unit][hub][campaign]") {
  Fleet f;
  f.enroll(6);
  const auto id = f.create(json::parse(R"({"waves": [50, 100]})"), f.bundle(1));
  for (int i = 0; i < 8; ++i) {
    f.hub->tick();
    for (const auto& d : f.in_flight(id)) f.report(d, v1::AGENT_STATE_APPLIED);
  }
  CHECK(f.view(id).campaign.state == "completed");
  // A campaign that still runs: the new device joins that one.
  const auto live = f.create(json::parse(R"({"waves": [50, 100], "soak": "1h"})"), f.bundle(2));
  f.hub->tick();
  for (const auto& d : f.in_flight(live)) f.report(d, v1::AGENT_STATE_APPLIED);
  f.hub->tick();
  f.enroll(1);                              // env=prod, like the selector
  f.enroll(1, {{"env", "staging"}});        // does not match
  const std::string joined = f.devices[6], other = f.devices[7];
  auto st = f.statuses(live);
  REQUIRE(st.count(joined));
  CHECK_FALSE(st.count(other));
  CHECK(f.view(live).counts.total == 7);
  // It joined where its hash puts it, never in a wave already done, and applies.
  for (const auto& row : f.view(live).devices) {
    if (row.device_id == joined) CHECK(row.wave >= f.view(live).campaign.current_wave);
  }
  f.clock.advance(std::chrono::hours(2));
  for (int i = 0; i < 6; ++i) {
    f.hub->tick();
    for (const auto& d : f.in_flight(live)) f.report(d, v1::AGENT_STATE_APPLIED);
    f.clock.advance(std::chrono::hours(2));
  }
  auto v = f.view(live);
  CHECK(v.campaign.state == "completed");
  CHECK(v.counts.applied == 7);
  // The completed campaign took nobody in.
  CHECK(f.view(id).counts.total == 6);
}

TEST_CASE("a relabelled device joins a live campaign, or leaves it before its release", "[unit][hub][campaign]") {
  Fleet f;
  f.enroll(10);
  f.enroll(1, {{"env", "staging"}});
  const std::string moved = f.devices[10];
  const auto id = f.create(json::parse(R"({"max_in_flight": 1})"), f.bundle(1));
  REQUIRE(f.view(id).counts.total == 10);
  REQUIRE(f.hub->edit_device_labels(moved, {{"env", std::string("prod")}}));
  CHECK(f.statuses(id).at(moved) == "waiting");
  CHECK(f.view(id).counts.total == 11);
  // A device not yet released that stops matching leaves (skipped, with why);
  // one already released stays.
  f.hub->tick();
  const auto released = f.in_flight(id);
  REQUIRE(released.size() == 1);
  std::string leaving;
  for (const auto& [d, s] : f.statuses(id)) {
    if (s == "waiting" && d != moved) leaving = d;
  }
  REQUIRE(f.hub->edit_device_labels(leaving, {{"env", std::string("lab")}}));
  REQUIRE(f.hub->edit_device_labels(released[0], {{"env", std::string("lab")}}));
  auto v = f.view(id);
  for (const auto& row : v.devices) {
    if (row.device_id == leaving) {
      CHECK(row.status == "skipped");
      CHECK(row.reason == "left_selector");
    }
    if (row.device_id == released[0]) CHECK(row.status == "pending");
  }
  // Coming back to the selector rejoins.
  REQUIRE(f.hub->edit_device_labels(leaving, {{"env", std::string("prod")}}));
  CHECK(f.statuses(id).at(leaving) == "waiting");
  for (int i = 0; i < 30; ++i) {
    f.hub->tick();
    for (const auto& d : f.in_flight(id)) f.report(d, v1::AGENT_STATE_APPLIED);
  }
  v = f.view(id);
  CHECK(v.campaign.state == "completed");
  CHECK(v.counts.applied == 11);
  CHECK(v.counts.skipped == 0);
}

TEST_CASE("a static campaign leaves new and relabelled devices alone", "[unit][hub][campaign]") {
  Fleet f;
  f.enroll(4);
  f.enroll(1, {{"env", "staging"}});
  const std::string relabelled = f.devices[4];
  const auto id = f.create(json::parse(R"({"membership": "static", "max_in_flight": 1})"), f.bundle(1));
  f.hub->tick();
  f.enroll(1);
  REQUIRE(f.hub->edit_device_labels(relabelled, {{"env", std::string("prod")}}));
  auto st = f.statuses(id);
  CHECK(st.size() == 4);
  CHECK_FALSE(st.count(relabelled));
  CHECK_FALSE(st.count(f.devices[5]));
  // A member relabelled away stays a member too.
  std::string waiting;
  for (const auto& [d, s] : st) {
    if (s == "waiting") waiting = d;
  }
  REQUIRE(f.hub->edit_device_labels(waiting, {{"env", std::string("lab")}}));
  CHECK(f.statuses(id).at(waiting) == "waiting");
}

TEST_CASE("a rate limit paces releases, and its ramp raises the rate as devices apply", "[unit][hub][campaign]") {
  SECTION("a fixed rate of 120 per minute holds within 10% over 600 devices") {
    Fleet f;
    f.enroll(600);
    const auto id = f.create(json::parse(R"({"rate": {"max_per_minute": 120}})"), f.bundle(1));
    auto released = run_applying(f, id, 6 * 60);
    REQUIRE(released.size() == 600);
    std::vector<int64_t> times;
    for (const auto& [d, t] : released) times.push_back(t);
    std::sort(times.begin(), times.end());
    // Every full minute of the run released 120 +- 10%.
    const int64_t t0 = times.front();
    std::map<int64_t, int> per_minute;
    for (auto t : times) ++per_minute[(t - t0) / 60000];
    for (const auto& [minute, n] : per_minute) {
      if (minute >= 4) break;  // the last minute is partial
      INFO("minute " << minute);
      CHECK(n >= 108);
      CHECK(n <= 132);
    }
    // 600 devices at 120/min: five minutes, not less.
    CHECK(times.back() - t0 >= 4 * 60000 + 50000);
    CHECK(f.view(id).campaign.state == "completed");
  }
  SECTION("an exponential ramp: 10/min, x2 every 10 applied, up to 80/min") {
    Fleet f;
    f.enroll(150);
    const auto id = f.create(
        json::parse(R"({"rate": {"max_per_minute": 80, "start_per_minute": 10, "factor": 2, "every_applied": 10}})"),
        f.bundle(1));
    auto released = run_applying(f, id, 6 * 60);
    REQUIRE(released.size() == 150);
    std::vector<int64_t> times;
    for (const auto& [d, t] : released) times.push_back(t);
    std::sort(times.begin(), times.end());
    // The first ten devices took about a minute (10/min); the last 50 went at
    // 80/min, eight times faster.
    const double first_ten = static_cast<double>(times[9] - times[0]) / 9;
    const double last_fifty = static_cast<double>(times[149] - times[100]) / 49;
    CHECK(first_ten == Approx(6000).epsilon(0.1));
    CHECK(last_fifty == Approx(750).epsilon(0.1));
    CHECK(f.view(id).counts.applied == 150);
  }
}

TEST_CASE("a maintenance window holds devices outside their local hours, and they are never failed",
          "[unit][hub][campaign]") {
  Fleet f;
  // 2026-01-15 00:00 UTC: 01:00 in Berlin, 19:00 (the day before) in New York.
  f.clock.set_unix(1768435200);
  f.enroll(3, {{"env", "prod"}, {"timezone", "Europe.Berlin"}});
  f.enroll(3, {{"env", "prod"}, {"timezone", "America.New_York"}});
  f.enroll(2, {{"env", "prod"}});  // no label: the campaign's zone, UTC (00:00)
  const auto id = f.create(json::parse(R"({"device_deadline": "10m",
      "failure_threshold": {"percent": 1, "min_sample": 1, "action": "abort"},
      "maintenance_window": {"start": "01:00", "end": "03:00", "timezone_label": "timezone"}})"),
                           f.bundle(1));
  auto released_now = [&] {
    std::set<std::string> out;
    for (const auto& row : f.view(id).devices) {
      if (row.status != "waiting") out.insert(row.device_id);
    }
    return out;
  };
  f.hub->tick();
  // Only Berlin is at 01:00.
  CHECK(released_now() == std::set<std::string>{f.devices[0], f.devices[1], f.devices[2]});
  for (int i = 0; i < 3; ++i) f.report(f.devices[static_cast<size_t>(i)], v1::AGENT_STATE_APPLIED);
  // Hours pass: the others wait, are not failed, and hold the wave.
  for (int h = 0; h < 5; ++h) {
    f.clock.advance(std::chrono::minutes(11));
    f.hub->tick();
  }
  auto v = f.view(id);
  CHECK(v.counts.waiting == 5);
  CHECK(v.counts.failed == 0);
  CHECK(v.campaign.state == "running");
  // 01:00 UTC: the two without a label.
  f.clock.set_unix(1768435200 + 3600);
  f.hub->tick();
  CHECK(released_now().size() == 5);
  f.report(f.devices[6], v1::AGENT_STATE_APPLIED);
  f.report(f.devices[7], v1::AGENT_STATE_APPLIED);
  // 01:00 in New York (06:00 UTC).
  f.clock.set_unix(1768435200 + 6 * 3600);
  f.hub->tick();
  CHECK(released_now().size() == 8);
  for (int i = 3; i < 6; ++i) f.report(f.devices[static_cast<size_t>(i)], v1::AGENT_STATE_APPLIED);
  f.hub->tick();
  v = f.view(id);
  CHECK(v.campaign.state == "completed");
  CHECK(v.counts.applied == 8);
  CHECK(v.counts.failed == 0);
}

TEST_CASE("an approval gate holds a wave until an operator approves it", "[unit][hub][campaign]") {
  Fleet f;
  f.enroll(40);
  const auto id = f.create(json::parse(R"({"canary": 2, "waves": [50, 100], "approval": ["wave 2"]})"), f.bundle(1));
  auto settle = [&] {
    for (int i = 0; i < 6; ++i) {
      f.hub->tick();
      for (const auto& d : f.in_flight(id)) f.report(d, v1::AGENT_STATE_APPLIED);
    }
  };
  // Approving before the gate is reached is refused, and changes nothing.
  auto early = f.hub->campaign_action(id, "approve");
  REQUIRE_FALSE(early);
  CHECK(early.error().code == Errc::conflict);
  settle();  // canary, then wave 1 (ungated)
  auto v = f.view(id);
  CHECK(v.campaign.state == "waiting_approval");
  CHECK(v.campaign.current_wave == 1);
  CHECK_THAT(v.campaign.state_reason, Catch::Contains("wave 2 waits for approval"));
  const int64_t waiting = v.counts.waiting;
  REQUIRE(waiting > 0);
  f.clock.advance(std::chrono::hours(24));
  settle();
  CHECK(f.view(id).campaign.state == "waiting_approval");
  CHECK(f.view(id).counts.waiting == waiting);  // nothing of wave 2 went out
  // Paused while waiting: approve says resume first.
  REQUIRE(f.hub->campaign_action(id, "pause"));
  auto paused = f.hub->campaign_action(id, "approve");
  REQUIRE_FALSE(paused);
  CHECK_THAT(paused.error().message, Catch::Contains("resume it first"));
  REQUIRE(f.hub->campaign_action(id, "resume"));
  settle();
  CHECK(f.view(id).campaign.state == "waiting_approval");
  REQUIRE(f.hub->campaign_action(id, "approve"));
  settle();
  v = f.view(id);
  CHECK(v.campaign.state == "completed");
  CHECK(v.counts.applied == 40);
}

TEST_CASE("each threshold-triggered pause, abort and rollback is audited with its trigger", "[unit][hub][campaign]") {
  for (const std::string action : {"pause", "abort", "rollback"}) {
    DYNAMIC_SECTION(action) {
      Fleet f;
      f.enroll(6);
      const auto b1 = f.bundle(1);
      // Every device runs bundle 1 first, so a rollback has somewhere to go.
      const auto first = f.create(json::parse("{}"), b1);
      f.hub->tick();
      for (const auto& d : f.in_flight(first)) f.report(d, v1::AGENT_STATE_APPLIED);
      f.hub->tick();
      REQUIRE(f.view(first).campaign.state == "completed");
      CHECK(engine_audit(f).empty());
      const auto id = f.create(json::parse(R"({"max_in_flight": 3, "failure_threshold":
          {"percent": 50, "min_sample": 3, "action": ")" + action + R"("}})"), f.bundle(2));
      f.hub->tick();
      auto busy = f.in_flight(id);
      REQUIRE(busy.size() == 3);
      f.report(busy[0], v1::AGENT_STATE_FAILED, v1::REASON_HEALTH_GATE_FAILED);
      f.report(busy[1], v1::AGENT_STATE_FAILED, v1::REASON_INSTALL_FAILED);
      f.report(busy[2], v1::AGENT_STATE_APPLIED);
      f.hub->tick();
      auto audit = engine_audit(f);
      REQUIRE(audit.size() == 1);
      const auto& a = audit[0];
      CHECK(a.actor == "hub");
      CHECK(a.actor_name == "campaign-engine");
      CHECK(a.path == "/v1/campaigns/" + id + "/" + action);
      auto detail = json::parse(a.detail);
      CHECK(detail["trigger"] == "failure_threshold");
      CHECK(detail["failed"] == 2);
      CHECK(detail["outcomes"] == 3);
      CHECK(detail["threshold_percent"] == 50);
      CHECK(detail["failure_reasons"]["health_gate_failed"] == 1);
      CHECK(detail["failure_reasons"]["install_failed"] == 1);
      // Further ticks do not audit it again.
      f.hub->tick();
      f.hub->tick();
      CHECK(engine_audit(f).size() == 1);
    }
  }
}

// Issue 15: a multi-node k3s cluster is upgraded in k3s's own order, one node
// at a time, servers first; devices outside any cluster are not held back.
TEST_CASE("a campaign releases one node of a k3s cluster at a time, servers before agents",
          "[unit][hub][campaign][cluster]") {
  Fleet f;
  f.enroll(5);
  // d0 agent, d1 server, d2 agent of cluster "line-1"; d3 and d4 stand alone.
  const std::map<int, std::string> roles = {{0, "agent"}, {1, "server"}, {2, "agent"}};
  for (int i = 0; i < 5; ++i) {
    v1::Report r;
    r.set_device_id(f.devices[static_cast<size_t>(i)]);
    r.set_seq(++f.seq[f.devices[static_cast<size_t>(i)]] + 1000);
    r.set_state(v1::AGENT_STATE_IDLE);
    auto* inv = r.mutable_inventory();
    inv->set_k3s_version("v1.30.4+k3s1");
    if (roles.count(i)) {
      inv->set_k3s_role(roles.at(i));
      inv->set_cluster_id("line-1");
    } else {
      inv->set_k3s_role("server");
    }
    f.deliver(f.devices[static_cast<size_t>(i)], "report", r.SerializeAsString());
  }
  auto dev = f.hub->get_device(f.devices[1]);
  REQUIRE(dev);
  REQUIRE(*dev);
  CHECK((*dev)->inventory.cluster_id == "line-1");
  CHECK((*dev)->inventory.k3s_role == "server");

  const std::string id = f.create(json{{"waves", {100}}, {"max_in_flight", 10}}, f.bundle(2));
  std::vector<std::string> order;  // cluster nodes, in release order
  const std::set<std::string> cluster = {f.devices[0], f.devices[1], f.devices[2]};
  for (int t = 0; t < 40 && order.size() < 3; ++t) {
    f.hub->tick();
    auto flying = f.in_flight(id);
    int cluster_down = 0;
    for (const auto& d : flying) cluster_down += cluster.count(d) ? 1 : 0;
    // Never two nodes of the cluster released without an outcome at once.
    REQUIRE(cluster_down <= 1);
    for (const auto& d : flying) {
      if (cluster.count(d)) order.push_back(d);
      f.report(d, v1::AGENT_STATE_APPLIED);
    }
    f.clock.advance(std::chrono::milliseconds(250));
  }
  REQUIRE(order.size() == 3);
  CHECK(order[0] == f.devices[1]);  // the server first
  CHECK(std::set<std::string>(order.begin() + 1, order.end()) == std::set<std::string>{f.devices[0], f.devices[2]});
  // The stand-alone devices went at once, beside the server.
  auto st = f.statuses(id);
  CHECK(st[f.devices[3]] == "applied");
  CHECK(st[f.devices[4]] == "applied");
}

TEST_CASE("a failed cluster node frees its cluster for the next one", "[unit][hub][campaign][cluster]") {
  Fleet f;
  f.enroll(3);
  for (int i = 0; i < 3; ++i) {
    v1::Report r;
    r.set_device_id(f.devices[static_cast<size_t>(i)]);
    r.set_seq(++f.seq[f.devices[static_cast<size_t>(i)]] + 1000);
    r.set_state(v1::AGENT_STATE_IDLE);
    r.mutable_inventory()->set_k3s_role(i == 0 ? "server" : "agent");
    r.mutable_inventory()->set_cluster_id("c");
    f.deliver(f.devices[static_cast<size_t>(i)], "report", r.SerializeAsString());
  }
  const std::string id =
      f.create(json{{"waves", {100}}, {"max_in_flight", 10}, {"failure_threshold", {{"percent", 100}}}}, f.bundle(2));
  f.hub->tick();
  REQUIRE(f.in_flight(id) == std::vector<std::string>{f.devices[0]});
  f.report(f.devices[0], v1::AGENT_STATE_APPLIED);
  f.hub->tick();
  auto first_agent = f.in_flight(id);
  REQUIRE(first_agent.size() == 1);
  // Its kubelet never came back: rolled back alone, the other agent goes next.
  f.report(first_agent[0], v1::AGENT_STATE_ROLLED_BACK, v1::REASON_HEALTH_GATE_FAILED);
  f.hub->tick();
  auto second = f.in_flight(id);
  REQUIRE(second.size() == 1);
  CHECK(second[0] != first_agent[0]);
  CHECK(f.statuses(id)[first_agent[0]] != "applied");
}

// A campaign's k3s_action is signed into each released device's header; a
// rollback's header never carries it; an unknown action is refused.
TEST_CASE("a campaign's certificate rotation reaches devices in their signed header", "[unit][hub][campaign][rotate]") {
  auto bad = Strategy::from_json(json{{"k3s_action", "reboot"}});
  REQUIRE_FALSE(bad);
  CHECK(bad.error().message.find("k3s_action") != std::string::npos);
  CHECK_FALSE(Strategy::from_json(json{{"k3s_action", 1}}));
  auto ok = Strategy::from_json(json{{"k3s_action", "rotate_certificates"}});
  REQUIRE(ok);
  CHECK(ok->to_json()["k3s_action"] == "rotate_certificates");
  CHECK_FALSE(Strategy::from_json(json::object())->to_json().contains("k3s_action"));

  Fleet f;
  f.enroll(2);
  const std::string b1 = f.bundle(1);
  const std::string plain = f.create(json{{"waves", {100}}}, b1);
  f.hub->tick();
  for (const auto& d : f.devices) {
    auto ds = f.desired(d);
    REQUIRE(ds);
    v1::DesiredHeader h;
    REQUIRE(h.ParseFromString(ds->header().header()));
    CHECK(h.k3s_action() == v1::K3S_ACTION_NONE);
    f.report(d, v1::AGENT_STATE_APPLIED);
  }
  f.hub->tick();
  const std::string rotate =
      f.create(json{{"waves", {100}}, {"k3s_action", "rotate_certificates"}}, b1, "env=prod");
  f.hub->tick();
  for (const auto& d : f.devices) {
    auto ds = f.desired(d);
    REQUIRE(ds);
    CHECK(ds->campaign_id() == rotate);
    v1::DesiredHeader h;
    REQUIRE(h.ParseFromString(ds->header().header()));
    CHECK(h.k3s_action() == v1::K3S_ACTION_ROTATE_CERTIFICATES);
  }
  (void)plain;
}
