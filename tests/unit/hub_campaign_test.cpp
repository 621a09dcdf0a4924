// [unit] The campaign engine with a fake clock: waves, canary, max in flight,
// soak, deadlines, failure threshold actions, operator actions, rollback, and
// carrying on after a restart over the same store.
#include <catch2/catch.hpp>

#include "tests/support/hub_test_support.hpp"
#include "tests/support/temp_dir.hpp"

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

namespace {

using flotilla::test::RecordingTransport;
using flotilla::test::TempDir;

struct Fleet {
  TempDir dir;
  FakeClock clock;
  std::unique_ptr<Store> store;
  std::unique_ptr<HubService> hub;
  RecordingTransport broker;
  bundles::KeyPair key = bundles::generate_key();
  std::vector<std::string> devices;
  std::map<std::string, uint64_t> seq;
  std::set<std::string> director_keys;  // as enrollment answers named them

  Fleet() { open(); }

  void open() {
    auto s = Store::open((dir.path() / "hub.db").string());
    REQUIRE(s);
    store = std::move(*s);
    ServiceConfig cfg;
    cfg.broker_url = "tcp://127.0.0.1:1";
    cfg.public_url = "http://hub.test";
    cfg.engine_thread = false;  // the test ticks, with its fake clock
    hub = std::make_unique<HubService>(*store, clock, cfg);
    REQUIRE(hub->attach_transport(broker));
  }

  // A "restart": a new service over the same SQLite file.
  void restart() {
    hub->stop();
    hub.reset();
    store.reset();
    open();
  }

  void enroll(int n, const std::map<std::string, std::string>& labels = {{"env", "prod"}}) {
    TokenRecord t;
    t.role = "enroll";
    t.labels = labels;
    auto tok = hub->create_token("enroll", t);
    REQUIRE(tok);
    for (int i = 0; i < n; ++i) {
      auto k = bundles::generate_key();
      v1::EnrollRequest req;
      req.set_enrollment_token(tok->secret);
      req.set_device_public_key(std::string(k.pub.key.begin(), k.pub.key.end()));
      auto proof = bundles::sign_detached(k, bundles::enroll_proof_message(tok->secret, k.pub.key));
      req.set_proof(std::string(proof.begin(), proof.end()));
      auto r = hub->enroll(req);
      REQUIRE(r);
      devices.push_back(r->device_id());
      director_keys.insert(r->director_public_key());
      presence(r->device_id(), true);
    }
  }

  void deliver(const std::string& device, const std::string& leaf, const std::string& payload) {
    hub->on_message({transport::device_topic(device, leaf.c_str()), payload, 1, false});
    hub->drain();
  }

  void presence(const std::string& device, bool online) {
    v1::Presence p;
    p.set_online(online);
    deliver(device, "presence", p.SerializeAsString());
  }

  // Every desired state the hub published, in order.
  std::vector<v1::DesiredState> sent() const {
    std::vector<v1::DesiredState> out;
    for (const auto& m : broker.published()) {
      v1::DesiredState ds;
      if (ds.ParseFromString(m.payload)) out.push_back(ds);
    }
    return out;
  }

  // What the last desired state sent to a device was.
  std::optional<v1::DesiredState> desired(const std::string& device) {
    std::optional<v1::DesiredState> last;
    for (const auto& d : sent()) if (d.device_id() == device) last = d;
    return last;
  }

  void report(const std::string& device, v1::AgentState state, v1::Reason reason = v1::REASON_NONE) {
    auto ds = desired(device);
    REQUIRE(ds);
    v1::Report r;
    r.set_device_id(device);
    r.set_seq(++seq[device] + 1000);
    r.set_state(state);
    r.set_generation(ds->generation());
    r.set_campaign_id(ds->campaign_id());
    if (reason != v1::REASON_NONE) r.mutable_error()->set_reason(reason);
    deliver(device, "report", r.SerializeAsString());
  }

  std::string bundle(uint64_t version) {
    v1::BundleManifest m;
    m.set_format_version(1);
    m.set_name("edge-base");
    m.set_channel("stable");
    m.set_version(version);
    m.set_expires_unix(clock.now_unix() + 86400);
    auto env = bundles::wrap(m);
    REQUIRE(bundles::sign(env, key));
    auto up = hub->upload_bundle(bundles::serialize_envelope(env));
    REQUIRE(up);
    return up->first.id;
  }

  CampaignView view(const std::string& id) {
    auto v = hub->campaign_view(id, true);
    REQUIRE(v);
    REQUIRE(*v);
    return **v;
  }

  std::map<std::string, std::string> statuses(const std::string& id) {
    std::map<std::string, std::string> out;
    for (const auto& d : view(id).devices) out[d.device_id] = d.status;
    return out;
  }

  std::string create(const json& strategy, const std::string& bundle_id, const std::string& selector = "env=prod") {
    auto s = Strategy::from_json(strategy);
    REQUIRE(s);
    auto c = hub->create_campaign("", bundle_id, selector, *s, "*");
    REQUIRE(c);
    return c->id;
  }

  // Devices of the campaign currently released and waiting for an outcome.
  std::vector<std::string> in_flight(const std::string& id) {
    std::vector<std::string> out;
    for (const auto& d : view(id).devices) {
      if (d.status == "pending" || d.status == "in_progress") out.push_back(d.device_id);
    }
    return out;
  }
};

}  // namespace

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
    for (const auto& d : f.devices) {
      switch (rng() % 6) {
        case 0: f.presence(d, rng() % 2 == 0); break;
        case 1:
          if (f.desired(d)) f.report(d, v1::AGENT_STATE_INSTALLING);
          break;
        case 2:
          if (f.desired(d)) f.report(d, rng() % 3 ? v1::AGENT_STATE_APPLIED : v1::AGENT_STATE_FAILED);
          break;
        default: break;
      }
    }
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

TEST_CASE("a lost outcome report is recovered from the device's next idle report", "[unit][hub][campaign]") {
  // A hub killed after its MQTT client acknowledged a report but before
  // storing it never sees that outcome again; the agent's idle report on
  // reconnect names the generation it finished and what it runs.
  Fleet f;
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
