// [integration] flotilla-sim's control writes against a hub whose etcd is
// away for a moment (an etcd leader election, a member restart): a real etcd
// on loopback, a real flotilla-hub on it and a real flotilla-sim run. The
// hub refuses the writes with a 503 naming etcd (docs/operations.md); the
// simulator sends them again until etcd answers instead of ending its run
// at the first one, and its campaign is created once.
#include <catch2/catch.hpp>

#include <chrono>
#include <string>

#include "flotilla/common/crypto.hpp"
#include "tests/support/etcd_cluster.hpp"
#include "tests/support/harness.hpp"
#include "tests/support/sim_campaign.hpp"

using namespace flotilla;
using namespace flotilla::test;

TEST_CASE("flotilla-sim repeats the control writes a hub refuses while its etcd is away, then runs its campaign once",
          "[integration][etcd][sim]") {
  REQUIRE(EtcdCluster::available());
  TempDir tmp("sim-etcd");
  EtcdCluster cluster(tmp.path() / "etcd", 1);
  cluster.start();
  Hub hub(tmp.path() / "hub");
  hub.start({"--coordination", "etcd", "--etcd-timeout", "2s", "--etcd-endpoints", cluster.client_urls().front()});
  const std::string admin = hub.admin_token();

  // etcd away before the simulator's first write (its enrollment tokens).
  cluster.stop_all();
  const std::string label = "se" + crypto::random_token(4);
  SimCampaign sim(hub, tmp.path(), label, 7,
                  {"--devices", "20", "--mode", "gateway", "--devices-per-gateway", "10", "--timeout", "90s"});
  {
    const bool refused = wait_until(
        [&] { return sim.log().find("hub answered 503 to POST /v1/enrollment-tokens") != std::string::npos; },
        std::chrono::seconds(30));
    INFO(sim.log_tail());
    REQUIRE(refused);
  }
  CHECK_FALSE(sim.wait_for(std::chrono::milliseconds(0)));  // still running: it did not give up
  cluster.start_all();

  auto code = sim.wait_for(std::chrono::seconds(120));
  INFO(sim.log_tail() << "\n--- hub log (tail) ---\n" << hub.log().substr(hub.log().size() > 8000 ? hub.log().size() - 8000 : 0));
  REQUIRE(code);
  CHECK(*code == 0);
  // One campaign of that name, every device applied.
  auto [status, list] = hub.call("GET", "/v1/campaigns", "", "application/json", admin);
  REQUIRE(status == 200);
  int named = 0;
  for (const auto& c : list["items"]) {
    if (c["name"] != "sim-" + label) continue;
    ++named;
    CHECK(c["state"] == "completed");
    CHECK(c["counts"]["applied"] == 20);
  }
  CHECK(named == 1);
}
