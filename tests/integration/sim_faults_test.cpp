// Fault profiles of flotilla-sim have the intended effect on the real hub's
// campaign, and a seed makes a run repeatable.
#include <catch2/catch.hpp>

#include "sim_support.hpp"

using namespace flotilla;
using namespace flotilla::test;

TEST_CASE("injected install failures trip the campaign's failure threshold", "[integration][sim]") {
  TempDir tmp;
  auto s = run_sim(tmp.path() / "fail",
                   {"--devices", "60", "--devices-per-gateway", "30", "--seed", "21", "--install-fail", "0.3",
                    "--strategy",
                    R"({"canary": 10, "waves": [50, 100],
                        "failure_threshold": {"percent": 10, "min_sample": 5, "action": "pause"}})"});
  INFO(s.out << s.err);
  REQUIRE(s.exit_code == 0);
  const auto& r = s.report;
  const auto& hub = r["campaign"]["hub"];
  INFO(hub.dump(2));
  CHECK(r["faults_assigned"]["install_fail"].get<int>() > 5);
  // The threshold reacted: paused, and the later waves were never released.
  CHECK(hub["state"] == "paused");
  CHECK(hub["counts"]["waiting"].get<int>() > 0);
  CHECK(hub["failure_reasons"]["install_failed"].get<int>() >= 1);
  // Only devices with the fault failed, and they failed the way it says.
  for (const auto& [id, phase] : r["device_phases"].items()) {
    const int faults = r["fault_devices"].value(id, 0);
    if (phase == "failed") CHECK((faults & 4) != 0);
  }
}

TEST_CASE("offline devices are counted offline, not failed, health faults roll back", "[integration][sim]") {
  TempDir tmp;
  auto s = run_sim(tmp.path() / "offline", {"--devices", "80", "--devices-per-gateway", "40", "--seed", "22",
                                            "--offline", "0.25", "--health-fail", "0.1", "--strategy",
                                            R"({"failure_threshold": {"percent": 100, "min_sample": 1000}})"});
  INFO(s.out << s.err);
  REQUIRE(s.exit_code == 0);
  const auto& r = s.report;
  const auto& counts = r["campaign"]["hub"]["counts"];
  INFO(r["campaign"]["hub"].dump(2));
  const int offline = r["faults_assigned"]["offline"];
  REQUIRE(offline > 5);
  // The campaign waits for them without failing them.
  CHECK(r["campaign"]["end_state"] == "converging");
  CHECK(counts["offline"] == offline);
  CHECK(counts["pending"] == offline);
  int health_only = 0;
  for (const auto& [id, f] : r["fault_devices"].items()) health_only += (f.get<int>() & 8) && !(f.get<int>() & 1);
  REQUIRE(health_only > 0);
  CHECK(counts["failed"] == health_only);
  CHECK(r["campaign"]["hub"]["failure_reasons"]["health_gate_failed"] == health_only);
  CHECK(counts["applied"] == 80 - offline - health_only);
  CHECK(r["timeline"].back()["devices"]["rolled_back"] == health_only);
}

TEST_CASE("power cuts mid-apply and dropped links recover to applied", "[integration][sim]") {
  TempDir tmp;
  auto s = run_sim(tmp.path() / "reboot", {"--devices", "60", "--devices-per-gateway", "60", "--seed", "23",
                                           "--reboot-mid-apply", "0.3", "--flaky", "0.3", "--clock-skew", "120"});
  INFO(s.out << s.err);
  REQUIRE(s.exit_code == 0);
  const auto& r = s.report;
  CHECK(r["figures"]["power_cuts"] == r["faults_assigned"]["reboot_mid_apply"]);
  CHECK(r["figures"]["link_drops"] == r["faults_assigned"]["flaky"]);
  CHECK(r["figures"]["power_cuts"].get<int>() > 5);
  // Recovery rolled the half-installed node back, then the retained desired
  // state applied it for good.
  CHECK(r["campaign"]["end_state"] == "completed");
  CHECK(r["campaign"]["hub"]["counts"]["applied"] == 60);
}

TEST_CASE("the same seed gives the same faults and outcomes, another seed does not", "[integration][sim]") {
  TempDir tmp;
  // A threshold that never trips, so every device reaches its outcome.
  const std::vector<std::string> profile = {"--devices", "40", "--install-fail", "0.3", "--health-fail", "0.2",
                                            "--offline", "0.1", "--strategy",
                                            R"({"failure_threshold": {"percent": 100, "min_sample": 1000}})"};
  auto with_seed = [&](const std::string& dir, const std::string& seed) {
    auto args = profile;
    args.insert(args.end(), {"--seed", seed});
    auto s = run_sim(tmp.path() / dir, args);
    INFO(s.out << s.err);
    REQUIRE(s.exit_code == 0);
    return s.report;
  };
  const json a = with_seed("a", "31"), b = with_seed("b", "31"), c = with_seed("c", "32");
  REQUIRE(a["fault_devices"].size() > 5);
  // Same seed: same identities, same faults, same outcome per device.
  CHECK(a["fault_devices"] == b["fault_devices"]);
  CHECK(a["device_phases"] == b["device_phases"]);
  // Another seed draws other faults for the same device indexes.
  CHECK(a["fault_bits"] == b["fault_bits"]);
  CHECK(a["fault_bits"] != c["fault_bits"]);
}

// A bundle with an artifact, downloaded by every device from the hub under a
// bandwidth cap. Every device used to refuse it as malformed_manifest: the
// simulator's manifest carried no artifact url, which the bundle format
// requires (the relative hex digest).
TEST_CASE("a bundle with an artifact under a bandwidth cap applies on every device", "[integration][sim]") {
  TempDir tmp;
  auto s = run_sim(tmp.path() / "artifact", {"--devices", "20", "--devices-per-gateway", "10", "--seed", "24",
                                             "--artifact-bytes", "25000", "--download-kbps", "2000"});
  INFO(s.out << s.err);
  REQUIRE(s.exit_code == 0);
  const auto& r = s.report;
  const auto& hub = r["campaign"]["hub"];
  INFO(hub.dump(2));
  CHECK(hub["counts"]["applied"] == 20);
  CHECK(hub["counts"]["failed"] == 0);
  CHECK(hub["failure_reasons"].empty());
  // The artifact came from the hub (once per simulator process; the devices share the bytes).
  CHECK(r["figures"]["artifact_downloads"] == 1);
  for (const auto& [id, phase] : r["device_phases"].items()) {
    INFO(id);
    CHECK(phase == "applied");
  }
}
