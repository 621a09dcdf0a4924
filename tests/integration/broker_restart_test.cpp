// The embedded broker killed outright (kill -9) in the middle of a campaign:
// the hub starts it again, stops trusting the presence it had (a dead broker
// sends no last wills), calls the roll, and real agents and the simulator's
// gateways reconnect and re-announce; the campaign completes with exact counts.
#include <catch2/catch.hpp>

#include <signal.h>

#include "flotilla/bundles/keys.hpp"
#include "flotilla/common/crypto.hpp"
#include "flotilla/common/fs.hpp"
#include "tests/support/harness.hpp"
#include "tests/support/sim_campaign.hpp"

namespace flotilla::test {
namespace {

pid_t broker_pid(const Hub& hub) {
  auto text = fs::read_file(hub.data_dir() / "broker" / "mosquitto.pid", 64);
  return text ? static_cast<pid_t>(std::stol(*text)) : -1;
}

bool online(Hub& hub, const std::string& id) { return hub.device(id)["online"] == true; }

}  // namespace

TEST_CASE("kill -9 of the broker mid-campaign: restarted, devices re-announce, exact counts, presence right",
          "[integration][broker][presence]") {
  TempDir tmp;
  Hub hub(tmp.path() / "hub");
  hub.start();
  const std::string label = "bk" + crypto::random_token(4);
  const uint64_t seed = 29;
  AgentOptions opts;
  opts.root_keys = {bundles::public_key_text(sim_release_key(seed).pub)};
  const std::string token = hub.enrollment_token({{"sim-run", label}});
  Agent a(tmp.path() / "a", hub.url(), token, opts), b(tmp.path() / "b", hub.url(), token, opts);
  a.start();
  b.start();
  REQUIRE(wait_until([&] { return !a.device_id().empty() && !b.device_id().empty() && online(hub, a.device_id()) &&
                                  online(hub, b.device_id()); },
                     std::chrono::seconds(60)));

  // 400 simulated devices behind 4 gateways, with the 2 agents in one
  // campaign, slowed (4 waves, 3 s of soak each) so that the broker dies
  // while it runs.
  SimCampaign sim(hub, tmp.path(), label, seed,
             {"--devices", "400", "--mode", "gateway", "--devices-per-gateway", "100", "--strategy",
              R"({"waves": [10, 30, 60, 100], "soak": "3s", "max_in_flight": 40})", "--timeout", "150s"});
  const std::string campaign_id = wait_sim_campaign(hub, label, 20, std::chrono::seconds(90));
  if (campaign_id.empty()) {
    INFO(sim.log_tail());
    INFO(hub.call("GET", "/v1/campaigns").second.dump());
    INFO(hub.log());
    REQUIRE(!campaign_id.empty());
  }
  auto mid = hub.campaign(campaign_id);
  INFO(mid.dump());
  REQUIRE(mid["counts"]["applied"].get<int>() < 402);  // still running when the broker dies

  const pid_t first = broker_pid(hub);
  REQUIRE(first > 0);
  REQUIRE(::kill(first, SIGKILL) == 0);
  // The hub's watchdog starts another one ...
  REQUIRE(wait_until([&] { const pid_t p = broker_pid(hub); return p > 0 && p != first && proc::alive(p); },
                     std::chrono::seconds(30)));
  // ... and the campaign completes, every device counted exactly once.
  auto exit_code = sim.wait_for(std::chrono::seconds(170));
  INFO(sim.log_tail());
  REQUIRE(exit_code);
  CHECK(*exit_code == 0);
  auto c = hub.campaign(campaign_id);
  INFO(c.dump());
  CHECK(c["state"] == "completed");
  CHECK(c["counts"]["total"] == 402);
  CHECK(c["counts"]["applied"] == 402);
  CHECK(c["counts"]["failed"] == 0);
  for (auto* agent : {&a, &b}) {
    auto d = hub.device(agent->device_id());
    INFO(d.dump());
    // Each runs the campaign's bundle. Its state is its last report's: an
    // agent that applied before the broker died re-announces as idle.
    CHECK(d["applied_bundle"] == c["bundle"]["name"]);
    CHECK(d["applied_version"] == c["bundle"]["version"]);
    CHECK((d["state"] == "applied" || d["state"] == "idle"));
    CHECK(d["online"] == true);
  }
  auto report = sim.report();
  // Every gateway session came back by itself.
  CHECK(report["figures"]["reconnects"].get<int>() >= 4);

  const std::string m = metrics_text(hub);
  CHECK(metric(m, "flotilla_broker_restarts_total{cell=\"0\"}") >= 1);
  // At the start, and again when the restarted broker took the hub back.
  CHECK(metric(m, "flotilla_presence_resets_total{cell=\"0\"}") >= 2);
  CHECK(metric(m, "flotilla_rollcalls_published_total{cell=\"0\"}") >= 2);
  CHECK(hub.log().find("embedded broker exited") != std::string::npos);

  // A device that dies with its broker leaves no will behind: before, the
  // hub kept it online for good. Freeze the broker, kill agent b, then the
  // broker: after the restart a is online again and b is not.
  const pid_t second = broker_pid(hub);
  const double resets = metric(metrics_text(hub), "flotilla_presence_resets_total{cell=\"0\"}");
  REQUIRE(::kill(second, SIGSTOP) == 0);
  b.kill9();
  REQUIRE(::kill(second, SIGKILL) == 0);
  REQUIRE(wait_until([&] { return metric(metrics_text(hub), "flotilla_presence_resets_total{cell=\"0\"}") > resets; },
                     std::chrono::seconds(60)));
  REQUIRE(wait_until([&] { return online(hub, a.device_id()); }, std::chrono::seconds(60)));
  INFO(a.log());
  CHECK_FALSE(online(hub, b.device_id()));
  // The gateways are gone too (the simulator ended): none of its devices is
  // online. (Retained "online" messages are ignored: a unit test shows it,
  // as a broker killed within its 60 s autosave here has kept none.)
  int sim_online = 0;
  for (const auto& d : hub.devices("sim-run=" + label)) {
    if (d["online"] == true && d["id"] != a.device_id()) ++sim_online;
  }
  CHECK(sim_online == 0);
}

}  // namespace flotilla::test
