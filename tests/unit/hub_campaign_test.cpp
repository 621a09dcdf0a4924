// [unit] The campaign engine with a fake clock: waves, canary, max in flight,
// soak, deadlines, failure threshold actions, operator actions, rollback, and
// carrying on after a restart over the same store.
#include <catch2/catch.hpp>

#include "tests/support/campaign_fleet.hpp"

#include <map>
#include <mutex>
#include <random>
#include <set>

#include "edge-agent/testing/fakes.hpp"
#include "flotilla/agent/agent.hpp"
#include "flotilla/bundles/bundle.hpp"
#include "flotilla/bundles/director.hpp"
#include "flotilla/common/crypto.hpp"
#include "flotilla/hub/service.hpp"
#include "flotilla/v1/desired.pb.h"

using namespace flotilla;
using namespace flotilla::hub;
using nlohmann::json;

using flotilla::test::Fleet;

TEST_CASE("strategy parsing refuses bad values with the field's name", "[unit][hub][campaign]") {
  CHECK(Strategy::from_json(json::parse(R"({"waves": [10, 50, 100], "canary": "5%"})")));
  auto bad = [](const char* text) {
    auto s = Strategy::from_json(json::parse(text));
    REQUIRE_FALSE(s);
    return s.error().message;
  };
  CHECK_THAT(bad(R"({"waves": [50, 40, 100]})"), Catch::Contains("strategy.waves"));
  CHECK_THAT(bad(R"({"waves": [10, 50]})"), Catch::Contains("reach 100"));
  CHECK_THAT(bad(R"({"canary": "lots"})"), Catch::Contains("strategy.canary"));
  CHECK_THAT(bad(R"({"soak": "5 minutes"})"), Catch::Contains("strategy.soak"));
  CHECK_THAT(bad(R"({"failure_threshold": {"action": "panic"}})"), Catch::Contains("pause, abort or rollback"));
  CHECK_THAT(bad(R"({"failure_threshold": {"percent": 0}})"), Catch::Contains("failure_threshold.percent"));
  CHECK_THAT(bad(R"({"max_in_flight": -1})"), Catch::Contains("max_in_flight"));
  CHECK_THAT(bad(R"({"speed": "fast"})"), Catch::Contains("strategy.speed"));
}

TEST_CASE("wave membership is a deterministic hash of campaign and device", "[unit][hub][campaign]") {
  CHECK(campaign_rank("c-1", "d-1") == campaign_rank("c-1", "d-1"));
  CHECK(campaign_rank("c-1", "d-1") != campaign_rank("c-2", "d-1"));
  Strategy s;
  s.canary_count = 5;
  s.waves = {10, 50, 100};
  std::vector<double> ranks;
  for (int i = 0; i < 2000; ++i) ranks.push_back(campaign_rank("c-x", "d-" + std::to_string(i)));
  auto w = assign_waves(s, ranks);
  std::map<int, int> per;
  for (int x : w) ++per[x];
  CHECK(per[0] == 5);  // exactly the canary count
  // Roughly 10% / 40% / 50% of the rest, as the cumulative percentages say.
  CHECK(per[1] > 140);
  CHECK(per[1] < 260);
  CHECK(per[2] > 700);
  CHECK(per[3] > 900);
  CHECK(assign_waves(s, ranks) == w);
}

TEST_CASE("a canary goes first, then each wave after the previous finished and soaked", "[unit][hub][campaign]") {
  // 40 devices: hashed wave membership leaves no wave empty for any campaign id.
  Fleet f;
  f.enroll(40);
  const auto b = f.bundle(1);
  const auto id = f.create(json::parse(R"({"canary": 2, "waves": [50, 100], "soak": "30s"})"), b);
  f.hub->tick();
  auto first = f.in_flight(id);
  REQUIRE(first.size() == 2);  // only the canary
  for (const auto& d : f.view(id).devices) {
    if (std::find(first.begin(), first.end(), d.device_id) != first.end()) CHECK(d.wave == 0);
  }
  for (const auto& d : first) f.report(d, v1::AGENT_STATE_APPLIED);
  f.hub->tick();
  CHECK(f.in_flight(id).empty());  // soaking: the next wave waits
  CHECK(f.view(id).campaign.current_wave == 0);
  f.clock.advance(std::chrono::seconds(31));
  f.hub->tick();  // soak over: wave 1 starts
  f.hub->tick();  // ... and is released
  auto second = f.in_flight(id);
  CHECK(f.view(id).campaign.current_wave == 1);
  REQUIRE_FALSE(second.empty());
  for (const auto& d : f.view(id).devices) {
    if (std::find(second.begin(), second.end(), d.device_id) != second.end()) CHECK(d.wave == 1);
  }
  for (const auto& d : second) f.report(d, v1::AGENT_STATE_APPLIED);
  // The last wave: it only starts once wave 1 soaked too.
  f.hub->tick();
  f.hub->tick();
  CHECK(f.in_flight(id).empty());
  for (int round = 0; round < 6; ++round) {
    f.clock.advance(std::chrono::seconds(31));
    f.hub->tick();
    for (const auto& d : f.in_flight(id)) {
      CHECK(f.view(id).campaign.current_wave == 2);
      f.report(d, v1::AGENT_STATE_APPLIED);
    }
  }
  auto v = f.view(id);
  CHECK(v.campaign.state == "completed");
  CHECK(v.counts.applied == 40);
  CHECK(v.counts.total == 40);
}

TEST_CASE("max in flight bounds how many online devices apply at once", "[unit][hub][campaign]") {
  Fleet f;
  f.enroll(10);
  const auto id = f.create(json::parse(R"({"max_in_flight": 3})"), f.bundle(1));
  f.hub->tick();
  auto busy = f.in_flight(id);
  CHECK(busy.size() == 3);
  f.hub->tick();
  CHECK(f.in_flight(id).size() == 3);  // no outcome yet, no new slot
  f.report(busy[0], v1::AGENT_STATE_APPLIED);
  f.hub->tick();
  CHECK(f.in_flight(id).size() == 3);
  CHECK(f.view(id).counts.applied == 1);
  CHECK(f.view(id).counts.waiting == 6);
}

TEST_CASE("offline devices are released but neither stall nor fail a wave", "[unit][hub][campaign]") {
  Fleet f;
  f.enroll(6);
  for (int i = 0; i < 2; ++i) f.presence(f.devices[static_cast<size_t>(i)], false);
  const auto id = f.create(json::parse(R"({"waves": [50, 100], "max_in_flight": 1})"), f.bundle(1));
  for (int round = 0; round < 20; ++round) {
    f.hub->tick();
    for (const auto& d : f.in_flight(id)) {
      if (d != f.devices[0] && d != f.devices[1]) f.report(d, v1::AGENT_STATE_APPLIED);
    }
  }
  auto v = f.view(id);
  CHECK(v.campaign.state == "converging");
  CHECK(v.counts.applied == 4);
  CHECK(v.counts.failed == 0);
  CHECK(v.counts.offline == 2);
  CHECK(std::set<std::string>(v.away.begin(), v.away.end()) == std::set<std::string>{f.devices[0], f.devices[1]});
  // Their desired state went out anyway (retained): they converge when back.
  CHECK(f.desired(f.devices[0]));
  f.report(f.devices[0], v1::AGENT_STATE_APPLIED);
  f.report(f.devices[1], v1::AGENT_STATE_APPLIED);
  f.hub->tick();
  CHECK(f.view(id).campaign.state == "completed");
  CHECK(f.view(id).counts.applied == 6);
}

TEST_CASE("an online device past its deadline counts as failed", "[unit][hub][campaign]") {
  Fleet f;
  f.enroll(3);
  const auto id = f.create(json::parse(R"({"device_deadline": "10m", "failure_threshold": {"percent": 90, "min_sample": 3}})"),
                           f.bundle(1));
  f.hub->tick();
  f.report(f.devices[0], v1::AGENT_STATE_APPLIED);
  f.report(f.devices[1], v1::AGENT_STATE_INSTALLING);
  f.presence(f.devices[2], false);  // away: its clock does not run out
  f.clock.advance(std::chrono::minutes(11));
  f.hub->tick();
  auto st = f.statuses(id);
  CHECK(st[f.devices[0]] == "applied");
  CHECK(st[f.devices[1]] == "failed");
  CHECK(st[f.devices[2]] == "pending");
  CHECK(f.view(id).failure_reasons.at("deadline_exceeded") == 1);
}

TEST_CASE("a device away longer than its deadline applies when it returns and counts as applied",
          "[unit][hub][campaign]") {
  // The strictest threshold: a single failed outcome rolls the fleet back.
  Fleet f;
  f.enroll(8);
  const std::string away = f.devices[0];
  f.presence(away, false);  // a shop closed overnight
  const auto id = f.create(
      json::parse(R"({"device_deadline": "30m", "failure_threshold": {"percent": 1, "min_sample": 1, "action": "rollback"}})"),
      f.bundle(1));
  f.hub->tick();
  for (const auto& d : f.in_flight(id)) {
    if (d != away) f.report(d, v1::AGENT_STATE_APPLIED);
  }
  f.hub->tick();
  CHECK(f.view(id).campaign.state == "converging");
  // Ten hours away: three hundred minutes past the deadline.
  for (int hour = 0; hour < 10; ++hour) {
    f.clock.advance(std::chrono::hours(1));
    f.hub->tick();
  }
  CHECK(f.statuses(id)[away] == "pending");
  // Back: the retained desired state is delivered now, and the deadline runs
  // from here. Ticks while it applies must not fail it.
  f.presence(away, true);
  f.hub->tick();
  f.clock.advance(std::chrono::minutes(5));
  f.hub->tick();
  f.report(away, v1::AGENT_STATE_INSTALLING);
  f.clock.advance(std::chrono::minutes(5));
  f.hub->tick();
  auto v = f.view(id);
  CHECK(f.statuses(id)[away] == "in_progress");
  CHECK(v.campaign.state == "converging");
  CHECK(v.counts.failed == 0);
  CHECK(v.failure_reasons.empty());
  f.report(away, v1::AGENT_STATE_APPLIED);
  f.hub->tick();
  v = f.view(id);
  CHECK(v.campaign.state == "completed");
  CHECK(v.counts.applied == 8);
  CHECK(v.counts.failed == 0);
  CHECK(v.counts.rolling_back + v.counts.rolled_back == 0);
}

TEST_CASE("a deadline counts only the time a device is online after delivery", "[unit][hub][campaign]") {
  Fleet f;
  f.enroll(4);
  const auto id = f.create(
      json::parse(R"({"device_deadline": "10m", "failure_threshold": {"percent": 100, "min_sample": 100}})"),
      f.bundle(1));
  f.hub->tick();
  const std::string d = f.devices[1];
  f.report(d, v1::AGENT_STATE_DOWNLOADING);
  f.clock.advance(std::chrono::minutes(8));  // 8 of its 10 minutes online ...
  f.presence(d, false);                      // ... then a reboot, and a long one
  f.clock.advance(std::chrono::hours(3));
  f.hub->tick();
  CHECK(f.statuses(id)[d] == "in_progress");
  f.presence(d, true);
  f.clock.advance(std::chrono::seconds(90));  // 9.5 minutes online in all
  f.hub->tick();
  CHECK(f.statuses(id)[d] == "in_progress");
  f.clock.advance(std::chrono::seconds(40));  // 10 min 10 s online: out of time
  f.hub->tick();
  CHECK(f.statuses(id)[d] == "failed");
  // The others were online throughout, with no outcome: long expired.
  for (const auto& other : {f.devices[0], f.devices[2], f.devices[3]}) CHECK(f.statuses(id)[other] == "failed");
  CHECK(f.view(id).failure_reasons.at("deadline_exceeded") == 4);
}

TEST_CASE("30% of a wave away past the deadline: the waves complete, no threshold fires, the returning devices apply",
          "[unit][hub][campaign]") {
  Fleet f;
  f.enroll(40);
  const auto id = f.create(json::parse(R"({"waves": [50, 100], "device_deadline": "10m", "soak": "1m",
      "failure_threshold": {"percent": 5, "min_sample": 1, "action": "abort"}})"),
                           f.bundle(1));
  // Before the first release, 30% of the first wave goes away.
  std::vector<std::string> first;
  for (const auto& row : f.view(id).devices) {
    if (row.wave == 0) first.push_back(row.device_id);
  }
  REQUIRE(first.size() >= 10);
  const size_t n_away = (first.size() * 3 + 9) / 10;
  std::set<std::string> away(first.begin(), first.begin() + static_cast<long>(n_away));
  for (const auto& d : away) f.presence(d, false);
  for (int round = 0; round < 12; ++round) {
    f.hub->tick();
    for (const auto& d : f.in_flight(id)) {
      if (!away.count(d)) f.report(d, v1::AGENT_STATE_APPLIED);
    }
    f.clock.advance(std::chrono::minutes(20));  // each round, twice the deadline
  }
  auto v = f.view(id);
  CHECK(v.campaign.state == "converging");  // every wave out, the away ones pending
  CHECK(v.campaign.current_wave == 1);
  CHECK(v.counts.failed == 0);
  CHECK(v.counts.applied == 40 - static_cast<int64_t>(away.size()));
  CHECK(v.counts.offline == static_cast<int64_t>(away.size()));
  for (const auto& d : away) {
    f.presence(d, true);
    f.clock.advance(std::chrono::minutes(3));
    f.hub->tick();
    f.report(d, v1::AGENT_STATE_APPLIED);
  }
  f.hub->tick();
  v = f.view(id);
  CHECK(v.campaign.state == "completed");
  CHECK(v.counts.applied == 40);
  CHECK(v.counts.failed == 0);
  CHECK(v.counts.skipped == 0);
}

TEST_CASE("the failure threshold pauses, resume judges only what comes next", "[unit][hub][campaign]") {
  Fleet f;
  f.enroll(10);
  const auto id = f.create(
      json::parse(R"({"max_in_flight": 4, "failure_threshold": {"percent": 50, "min_sample": 4, "action": "pause"}})"),
      f.bundle(1));
  f.hub->tick();
  auto busy = f.in_flight(id);
  REQUIRE(busy.size() == 4);
  f.report(busy[0], v1::AGENT_STATE_FAILED, v1::REASON_HEALTH_GATE_FAILED);
  f.report(busy[1], v1::AGENT_STATE_FAILED, v1::REASON_HEALTH_GATE_FAILED);
  f.report(busy[2], v1::AGENT_STATE_APPLIED);
  f.hub->tick();
  CHECK(f.view(id).campaign.state == "running");  // 3 outcomes < min sample 4
  f.report(busy[3], v1::AGENT_STATE_APPLIED);
  f.hub->tick();
  auto v = f.view(id);
  CHECK(v.campaign.state == "paused");
  CHECK_THAT(v.campaign.state_reason, Catch::Contains("2 of 4"));
  // Paused: devices already released finish, nothing new goes out.
  const auto released = f.in_flight(id);
  const auto waiting = v.counts.waiting;
  REQUIRE(waiting > 0);
  f.hub->tick();
  f.hub->tick();
  CHECK(f.in_flight(id) == released);
  CHECK(f.view(id).counts.waiting == waiting);

  REQUIRE(f.hub->campaign_action(id, "resume"));
  for (const auto& d : released) f.report(d, v1::AGENT_STATE_APPLIED);
  f.hub->tick();
  CHECK(f.view(id).campaign.state == "running");
  CHECK(f.view(id).counts.waiting < waiting);
  CHECK_FALSE(f.hub->campaign_action(id, "resume"));  // only a paused campaign resumes
}

TEST_CASE("the abort action skips devices not yet released", "[unit][hub][campaign]") {
  Fleet f;
  f.enroll(6);
  const auto id = f.create(
      json::parse(R"({"max_in_flight": 2, "failure_threshold": {"percent": 50, "min_sample": 2, "action": "abort"}})"),
      f.bundle(1));
  f.hub->tick();
  for (const auto& d : f.in_flight(id)) f.report(d, v1::AGENT_STATE_REFUSED, v1::REASON_UNKNOWN_KEY);
  f.hub->tick();
  auto v = f.view(id);
  CHECK(v.campaign.state == "aborted");
  CHECK(v.counts.failed == 2);
  CHECK(v.counts.skipped == 4);
  CHECK(f.sent().size() == 2);  // the skipped devices were never told
}

TEST_CASE("the rollback action returns devices that took the bundle to what they ran", "[unit][hub][campaign]") {
  Fleet f;
  f.enroll(6);
  const auto v1_id = f.bundle(1);
  const auto first = f.create(json::object(), v1_id);
  f.hub->tick();
  for (const auto& d : f.devices) {
    // The device now runs v1, and says so.
    v1::Report r;
    auto ds = f.desired(d);
    r.set_device_id(d);
    r.set_seq(++f.seq[d] + 1000);
    r.set_state(v1::AGENT_STATE_APPLIED);
    r.set_generation(ds->generation());
    r.set_campaign_id(first);
    r.mutable_applied()->set_name("edge-base");
    r.mutable_applied()->set_version(1);
    f.deliver(d, "report", r.SerializeAsString());
  }
  f.hub->tick();
  REQUIRE(f.view(first).campaign.state == "completed");

  const auto v2_id = f.bundle(2);
  const auto id = f.create(
      json::parse(R"({"failure_threshold": {"percent": 30, "min_sample": 6, "action": "rollback"}})"), v2_id);
  f.hub->tick();
  // Two fail their health gate (they restored v1 themselves), four apply v2.
  f.report(f.devices[0], v1::AGENT_STATE_ROLLED_BACK, v1::REASON_HEALTH_GATE_FAILED);
  f.report(f.devices[1], v1::AGENT_STATE_ROLLED_BACK, v1::REASON_HEALTH_GATE_FAILED);
  for (size_t i = 2; i < 6; ++i) f.report(f.devices[i], v1::AGENT_STATE_APPLIED);
  f.hub->tick();
  auto v = f.view(id);
  CHECK(v.campaign.state == "rolling_back");
  CHECK(v.counts.rolling_back == 4);
  CHECK(v.counts.failed == 2);
  for (size_t i = 2; i < 6; ++i) {
    auto ds = f.desired(f.devices[i]);
    REQUIRE(ds);
    CHECK(ds->rollback());
    v1::BundleManifest m;
    REQUIRE(m.ParseFromString(ds->bundle().manifest()));
    CHECK(m.version() == 1);  // back to what it ran
  }
  CHECK_FALSE(f.desired(f.devices[0])->rollback());  // failed ones already restored themselves
  for (size_t i = 2; i < 6; ++i) f.report(f.devices[i], v1::AGENT_STATE_APPLIED);
  f.hub->tick();
  v = f.view(id);
  CHECK(v.campaign.state == "rolled_back");
  CHECK(v.counts.rolled_back == 4);
  CHECK(v.counts.applied == 0);
}

TEST_CASE("a campaign carries on after a restart without counting anything twice", "[unit][hub][campaign]") {
  // Wave membership is a hash of (campaign, device): with 40 devices the
  // first wave holds at least two for any campaign id (8 would not: 3.5%).
  Fleet f;
  f.enroll(40);
  const auto id = f.create(json::parse(R"({"waves": [50, 100], "max_in_flight": 2})"), f.bundle(1));
  f.hub->tick();
  auto busy = f.in_flight(id);
  REQUIRE(busy.size() == 2);
  f.report(busy[0], v1::AGENT_STATE_APPLIED);
  f.restart();
  for (const auto& d : f.devices) f.presence(d, true);
  // A duplicate of the outcome already counted, redelivered after the restart.
  {
    auto ds = f.desired(busy[0]);
    v1::Report r;
    r.set_device_id(busy[0]);
    r.set_seq(f.seq[busy[0]] + 1000);  // same seq as before
    r.set_state(v1::AGENT_STATE_APPLIED);
    r.set_generation(ds->generation());
    r.set_campaign_id(id);
    f.deliver(busy[0], "report", r.SerializeAsString());
  }
  for (int round = 0; round < 60; ++round) {
    f.hub->tick();
    for (const auto& d : f.in_flight(id)) f.report(d, v1::AGENT_STATE_APPLIED);
  }
  auto v = f.view(id);
  CHECK(v.campaign.state == "completed");
  CHECK(v.counts.applied == 40);
  CHECK(v.counts.total == 40);
}

TEST_CASE("what a committed decision implies for the devices is done at the next tick, after a hub killed before "
          "doing it",
          "[unit][hub][campaign]") {
  // A tick commits its decisions first and the cells' writes after (ADR 18):
  // a hub killed in between leaves a campaign record whose devices were not
  // told. Here the record is written as the decision wrote it, and nothing
  // else, then the hub restarts.
  Fleet f;
  f.enroll(40);
  const auto id = f.create(json::parse(R"({"waves": [50, 100]})"), f.bundle(1));
  f.hub->tick();
  const auto wave0 = f.in_flight(id);
  REQUIRE(!wave0.empty());
  REQUIRE(wave0.size() < 40);
  const auto wave1 = static_cast<int64_t>(40 - wave0.size());
  for (const auto& d : wave0) f.report(d, v1::AGENT_STATE_APPLIED);
  auto decided = [&](const std::function<void(CampaignRecord&)>& change) {
    auto c = f.store->get_campaign(id);
    REQUIRE(c);
    REQUIRE(*c);
    CampaignRecord r = **c;
    change(r);
    REQUIRE(f.store->update_campaign(r));
    f.restart();
  };

  SECTION("the next wave is released, once") {
    decided([](CampaignRecord& c) {
      c.current_wave = 1;
      c.wave_done_ms = 0;
    });
    const size_t before = f.sent().size();
    f.hub->tick();
    auto v = f.view(id);
    CHECK(v.counts.waiting == 0);
    CHECK(v.counts.pending == wave1);
    CHECK(static_cast<int64_t>(f.sent().size() - before) == wave1);
    f.hub->tick();
    CHECK(static_cast<int64_t>(f.sent().size() - before) == wave1);
  }

  SECTION("an abort skips the waiting devices and tells nobody") {
    decided([](CampaignRecord& c) { c.state = CampaignState::aborted; });
    const size_t before = f.sent().size();
    f.hub->tick();
    auto v = f.view(id);
    CHECK(v.campaign.state == "aborted");
    CHECK(v.counts.waiting == 0);
    CHECK(v.counts.skipped == wave1);
    CHECK(v.counts.applied == static_cast<int64_t>(wave0.size()));
    CHECK(f.sent().size() == before);
  }
}

namespace {
// The trigger-kept counts agree with counting every row, for every campaign.
void require_counts_exact(Fleet& f) {
  auto campaigns = f.store->list_campaigns();
  REQUIRE(campaigns);
  for (const auto& c : *campaigns) {
    auto kept = f.store->campaign_counts(c.id);
    auto counted = f.store->recount_campaign(c.id);
    REQUIRE(kept);
    REQUIRE(counted);
    CHECK(*kept == *counted);
  }
}
}  // namespace

TEST_CASE("the campaign count table stays exact through reports, presence, deadlines, supersede and rollback",
          "[unit][hub][campaign]") {
  Fleet f;
  f.enroll(30);
  std::mt19937 rng(7);
  const auto first = f.create(json::parse(R"({"waves": [30, 100], "device_deadline": "1m"})"), f.bundle(1));
  require_counts_exact(f);
  for (int round = 0; round < 40; ++round) {
    f.hub->tick();
    require_counts_exact(f);
    for (const auto& d : f.devices) (void)f.random_event(d, static_cast<unsigned>(rng() % 6), rng);
    require_counts_exact(f);
    if (round == 10) f.clock.advance(std::chrono::minutes(2));  // deadlines pass for online devices in flight
    if (round == 20) {
      // A second campaign takes over the devices still unfinished in the first.
      (void)f.create(json::object(), f.bundle(2));
    }
  }
  f.hub->tick();
  require_counts_exact(f);
  auto rb = f.hub->campaign_action(first, "rollback");
  (void)rb;  // refused or not, the counts must stay exact
  require_counts_exact(f);
  CHECK_FALSE(f.store->recount_campaign(first)->empty());
}

TEST_CASE("a count table that disagrees with the rows is rebuilt when the store opens", "[unit][hub][campaign]") {
  Fleet f;
  f.enroll(5);
  const auto id = f.create(json::object(), f.bundle(1));
  f.hub->tick();
  REQUIRE(f.store->db().exec("UPDATE campaign_counts SET n = n + 100"));
  REQUIRE_FALSE(*f.store->campaign_counts(id) == *f.store->recount_campaign(id));
  f.restart();
  CHECK(*f.store->campaign_counts(id) == *f.store->recount_campaign(id));
  CHECK(f.view(id).counts.total == 5);
}

// One cell with a file of its own is not "no files": a device's read goes
// to the file, where its reports are, not to the directory's row in hub.db
// (which once answered every read there, offline and never seen).
TEST_CASE("one cell with its own file: a device's read shows what it reported", "[unit][hub][campaign][cells]") {
  Fleet f(1);
  f.cell_files = true;
  f.restart();
  f.enroll(2);  // each announces itself online
  f.presence(f.devices[1], false);
  v1::Report r;
  r.set_device_id(f.devices[0]);
  r.set_seq(1);
  r.set_state(v1::AGENT_STATE_IDLE);
  f.deliver(f.devices[0], "report", r.SerializeAsString());
  auto d = f.hub->get_device(f.devices[0]);
  REQUIRE(d);
  REQUIRE(*d);
  CHECK((*d)->online);
  CHECK((*d)->state == "idle");
  CHECK((*d)->last_seen_ms > 0);
  auto quiet = f.hub->get_device(f.devices[1]);
  REQUIRE(quiet);
  REQUIRE(*quiet);
  CHECK_FALSE((*quiet)->online);
  CHECK((*quiet)->state == "enrolled");
}

TEST_CASE("a lost outcome report is recovered from the device's next idle report", "[unit][hub][campaign]") {
  // A hub killed after its MQTT client acknowledged a report but before
  // storing it never sees that outcome again; the agent's idle report on
  // reconnect names the generation it finished and what it runs. With a
  // file per cell, the report worker holds its file alone and must take the
  // whole lock for this (the campaign and bundle are hub.db's).
  const bool cell_files = GENERATE(false, true);
  INFO("cell files: " << cell_files);
  Fleet f(cell_files ? 2 : 1);
  if (cell_files) {
    f.cell_files = true;
    f.restart();
  }
  f.enroll(2);
  const auto id = f.create(json::object(), f.bundle(3));
  f.hub->tick();
  auto idle = [&](const std::string& d, const std::string& name, uint64_t version) {
    auto ds = f.desired(d);
    REQUIRE(ds);
    v1::Report r;
    r.set_device_id(d);
    r.set_seq(++f.seq[d] + 1000);
    r.set_state(v1::AGENT_STATE_IDLE);
    r.set_generation(ds->generation());
    r.set_campaign_id(id);
    r.mutable_applied()->set_name(name);
    r.mutable_applied()->set_version(version);
    f.deliver(d, "report", r.SerializeAsString());
  };
  f.report(f.devices[0], v1::AGENT_STATE_INSTALLING);
  idle(f.devices[0], "edge-base", 3);  // runs the campaign's bundle: it applied
  idle(f.devices[1], "edge-base", 2);  // finished but still on v2: it failed
  auto st = f.statuses(id);
  CHECK(st[f.devices[0]] == "applied");
  CHECK(st[f.devices[1]] == "failed");
  for (const auto& row : f.view(id).devices) {
    if (row.device_id == f.devices[1]) CHECK(row.reason == "outcome_lost");
  }
  f.hub->tick();
  CHECK(f.view(id).campaign.state == "completed");
}

TEST_CASE("every desired state carries a header signed per device by the director key, binding its bundle",
          "[unit][hub][campaign][director]") {
  Fleet f;
  f.enroll(3);
  // Enrollment names the hub's director key, the same for every device.
  REQUIRE(f.director_keys.size() == 1);
  const std::string raw = *f.director_keys.begin();
  REQUIRE(raw.size() == 32);
  const auto& director = f.hub->director_public_key();
  CHECK(raw == std::string(director.key.begin(), director.key.end()));

  // Each device applies and says what it runs (what a rollback returns it to).
  auto applied = [&f](const std::string& campaign, uint64_t version) {
    for (const auto& d : f.devices) {
      v1::Report r;
      r.set_device_id(d);
      r.set_seq(++f.seq[d] + 1000);
      r.set_state(v1::AGENT_STATE_APPLIED);
      r.set_generation(f.desired(d)->generation());
      r.set_campaign_id(campaign);
      r.mutable_applied()->set_name("edge-base");
      r.mutable_applied()->set_version(version);
      f.deliver(d, "report", r.SerializeAsString());
    }
    f.hub->tick();
  };
  const auto id = f.create(json::object(), f.bundle(1));
  f.hub->tick();
  applied(id, 1);
  const auto id2 = f.create(json::object(), f.bundle(2));
  f.hub->tick();
  applied(id2, 2);
  REQUIRE(f.hub->campaign_action(id2, "rollback"));

  size_t checked = 0, rollbacks = 0;
  for (const auto& ds : f.sent()) {
    INFO(ds.device_id() << " generation " << ds.generation());
    auto hv = bundles::verify_desired_header(ds.header(), director);
    REQUIRE(hv.ok());
    const auto& h = hv.header;
    CHECK(h.device_id() == ds.device_id());
    CHECK(h.generation() == ds.generation());
    CHECK(h.campaign_id() == ds.campaign_id());
    CHECK(h.rollback() == ds.rollback());
    CHECK(h.issued_unix_ms() == ds.issued_unix_ms());
    CHECK(h.artifact_base_url() == "http://hub.test/v1/artifacts/");
    const auto digest = crypto::sha256(ds.bundle().manifest());
    CHECK(h.manifest_sha256() == std::string(digest.begin(), digest.end()));
    rollbacks += h.rollback() ? 1 : 0;
    ++checked;
  }
  CHECK(checked == 9);    // v1 and v2 to three devices, then three rollbacks to v1
  CHECK(rollbacks == 3);

  // The agent core takes the hub's message as it is, under the key from enrollment ...
  namespace t = flotilla::agent::testing;
  t::FakeK3sRuntime runtime;
  t::MemFileTree files;
  t::MemStateStore state;
  std::vector<v1::Report> reports;
  agent::CoreConfig cfg;
  cfg.device_id = f.devices[0];
  cfg.arch = "amd64";
  cfg.keyring.add(f.key.pub);
  cfg.director_key = director;
  cfg.health_poll = std::chrono::milliseconds(1);
  agent::Agent a(cfg, runtime, files, state, f.clock, [&](v1::Report&& r) { reports.push_back(std::move(r)); });
  REQUIRE(a.start());
  std::string first_payload;
  for (const auto& m : f.broker.published()) {
    if (m.topic == transport::device_topic(f.devices[0], "desired")) {
      first_payload = m.payload;
      break;
    }
  }
  a.handle_desired(first_payload);
  REQUIRE_FALSE(reports.empty());
  INFO(reports.back().error().message());
  CHECK(reports.back().state() == v1::AGENT_STATE_APPLIED);
  // ... and refuses the same message meant for another device.
  std::string other;
  for (const auto& m : f.broker.published()) {
    if (m.topic == transport::device_topic(f.devices[1], "desired")) other = m.payload;
  }
  a.handle_desired(other);
  CHECK(reports.back().error().reason() == v1::REASON_WRONG_DEVICE);
}
