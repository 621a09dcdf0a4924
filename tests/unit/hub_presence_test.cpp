// Presence across broker sessions: a new session of the hub's (a broker
// restart, a lost connection, a start) forgets who is online and calls the
// roll; a retained "online" is no evidence; waves wait for the answers.
#include <catch2/catch.hpp>

#include "tests/support/campaign_fleet.hpp"

namespace flotilla::test {
namespace {

bool online(Fleet& f, const std::string& id) {
  auto d = f.store->get_device(id);
  REQUIRE(d);
  REQUIRE(*d);
  return (*d)->online;
}

void retained_presence(Fleet& f, const std::string& id, bool up) {
  v1::Presence p;
  p.set_online(up);
  f.hub->on_message({transport::device_topic(id, "presence"), p.SerializeAsString(), 1, true});
  f.hub->drain();
}

}  // namespace

TEST_CASE("a new broker session marks every device offline and calls the roll", "[unit][hub][presence]") {
  Fleet f;
  f.enroll(3);
  for (const auto& d : f.devices) REQUIRE(online(f, d));
  REQUIRE(f.broker.rollcalls().size() == 1);  // the first attach called it too
  REQUIRE(f.hub->attach_transport(f.broker));
  for (const auto& d : f.devices) CHECK_FALSE(online(f, d));
  const auto calls = f.broker.rollcalls();
  REQUIRE(calls.size() == 2);
  CHECK(calls.back().topic == "flotilla/v1/rollcall");
  CHECK_FALSE(calls.back().retained);
  // Each call went to every shard devices read, and to the unsharded topic.
  CHECK(f.broker.rollcall_topics().size() == flotilla::transport::kRollcallShards + 1);
  CHECK(f.broker.rollcall_topics().count(flotilla::transport::rollcall_topic(f.devices[0])) == 1);
  v1::Rollcall rc;
  REQUIRE(rc.ParseFromString(calls.back().payload));
  CHECK(rc.spread_ms() == 3);  // a millisecond per device that was online
  v1::Rollcall first;
  REQUIRE(first.ParseFromString(calls.front().payload));
  CHECK(rc.id() != first.id());
  const auto m = f.hub->mqtt_counters();
  CHECK(m.presence_resets == 2);
  CHECK(m.rollcalls == 2);
  // The answer (a live presence) brings a device back.
  f.presence(f.devices[0], true);
  CHECK(online(f, f.devices[0]));
  CHECK_FALSE(online(f, f.devices[1]));
}

TEST_CASE("a lost broker session marks its devices offline at once and the next roll call waits for them",
          "[unit][hub][presence]") {
  Fleet f;
  f.enroll(3);
  for (const auto& d : f.devices) REQUIRE(online(f, d));
  // A report queued before the loss is applied first, then the devices are
  // offline: a dead broker sends no last wills, and nothing else will come.
  f.hub->on_message({transport::device_topic(f.devices[0], "presence"), v1::Presence().SerializeAsString(), 1, false});
  f.hub->lost_broker_session(0);
  for (const auto& d : f.devices) CHECK_FALSE(online(f, d));
  CHECK(f.hub->cell(0).presence_reset_devices == 2);  // the first said it left
  CHECK(f.broker.rollcalls().size() == 1);            // no session, no roll call
  CHECK(f.hub->mqtt_counters().presence_resets == 2);
  // The next session's roll call is spread over the devices marked at the loss.
  REQUIRE(f.hub->attach_transport(f.broker));
  const auto calls = f.broker.rollcalls();
  REQUIRE(calls.size() == 2);
  v1::Rollcall rc;
  REQUIRE(rc.ParseFromString(calls.back().payload));
  CHECK(rc.spread_ms() == 2);
  CHECK(f.hub->cell(0).presence_reset_devices == 2);
  f.presence(f.devices[1], true);
  CHECK(online(f, f.devices[1]));
  CHECK_FALSE(online(f, f.devices[2]));
}

TEST_CASE("a retained online presence is not evidence that a device is online", "[unit][hub][presence]") {
  Fleet f;
  f.enroll(2);
  REQUIRE(f.hub->attach_transport(f.broker));
  REQUIRE_FALSE(online(f, f.devices[0]));
  // What a broker kept from before its crash: ignored, and counted.
  retained_presence(f, f.devices[0], true);
  CHECK_FALSE(online(f, f.devices[0]));
  CHECK(f.hub->mqtt_counters().stale_presence_ignored == 1);
  // A retained last will still says the device is gone.
  f.presence(f.devices[1], true);
  REQUIRE(online(f, f.devices[1]));
  retained_presence(f, f.devices[1], false);
  CHECK_FALSE(online(f, f.devices[1]));
  CHECK(f.hub->mqtt_counters().stale_presence_ignored == 1);
}

TEST_CASE("a wave is not judged done while devices have not re-announced", "[unit][hub][presence][campaign]") {
  Fleet f;
  f.enroll(40);
  const auto id = f.create(json::parse(R"({"waves": [50, 100]})"), f.bundle(1));
  f.hub->tick();
  REQUIRE_FALSE(f.in_flight(id).empty());
  REQUIRE(f.view(id).campaign.current_wave == 0);
  // The broker restarts: every device looks offline, though the first
  // wave's devices may still be applying.
  REQUIRE(f.hub->attach_transport(f.broker));
  for (int round = 0; round < 3; ++round) f.hub->tick();
  CHECK(f.view(id).campaign.current_wave == 0);

  SECTION("once every device re-announced, the wave waits for its outcomes as before") {
    for (const auto& d : f.devices) f.presence(d, true);
    f.hub->tick();
    CHECK(f.view(id).campaign.current_wave == 0);
    for (const auto& d : f.in_flight(id)) f.report(d, v1::AGENT_STATE_APPLIED);
    f.hub->tick();
    CHECK(f.view(id).campaign.current_wave == 1);
  }
  SECTION("after the roll call's spread and margin, silent devices count as offline") {
    f.clock.advance(std::chrono::milliseconds(40 + HubService::kPresenceSettleMarginMs + 1));
    f.hub->tick();
    CHECK(f.view(id).campaign.current_wave == 1);
  }
}

}  // namespace flotilla::test
