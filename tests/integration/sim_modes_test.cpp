// flotilla-sim against the real hub and mosquitto: virtual devices (the real
// agent core in memory) converge a campaign in both modes, and the report
// files carry the figures and the plots.
#include <catch2/catch.hpp>

#include "flotilla/bundles/keys.hpp"
#include "sim_support.hpp"

using namespace flotilla;
using namespace flotilla::test;

TEST_CASE("virtual devices behind gateways converge a campaign through the real hub", "[integration][sim]") {
  TempDir tmp;
  auto s = run_sim(tmp.path() / "gw", {"--devices", "150", "--mode", "gateway", "--devices-per-gateway", "50",
                                       "--enroll-rate", "500", "--seed", "11"});
  INFO(s.out << s.err);
  REQUIRE(s.exit_code == 0);
  const auto& r = s.report;
  REQUIRE(r.is_object());
  CHECK(r["config"]["mode"] == "gateway");
  CHECK(r["config"]["sessions"] == 3);  // 150 devices over 3 gateway sessions
  CHECK(r["campaign"]["end_state"] == "completed");
  // The hub's own counts, not the simulator's: every device applied.
  const auto& counts = r["campaign"]["hub"]["counts"];
  CHECK(counts["total"] == 150);
  CHECK(counts["applied"] == 150);
  CHECK(counts["failed"] == 0);
  CHECK(r["figures"]["finished_devices"] == 150);
  CHECK(r["figures"]["latency_p50_ms"].is_number());
  CHECK(r["figures"]["latency_p99_ms"].get<double>() >= r["figures"]["latency_p50_ms"].get<double>());
  // The real core ran: verify ... commit journaled for each device.
  CHECK(r["figures"]["journal_rows"].get<int>() >= 150 * 14);
  // Each device pinned the hub's director key from its batch enrollment and
  // applied only desired states whose header that key signed.
  auto director = bundles::read_public_key((tmp.path() / "gw" / "hub" / "director.pub").string());
  REQUIRE(director);
  CHECK(r["director_key_id"] == director->key_id);
  // Enrollment at 500/s: 150 devices take at least ~0.3 s.
  CHECK(r["figures"]["enroll_s"].get<double>() >= 0.25);
  CHECK(r["timeline"].size() >= 2);
  CHECK(r["timeline"].back()["devices"]["applied"] == 150);
  CHECK(r["timeline"].back().contains("hub_rss_bytes"));
  CHECK(r["latency_cdf"].back()[1] == 1.0);

  // The page stands alone: inline SVG, every plot, no scripts or external files.
  CHECK(s.html.find("<svg") != std::string::npos);
  for (const char* title : {"Devices by state", "Per-device latency CDF", "Hub memory", "Hub CPU",
                            "Messages per second", "Campaign counts (hub)"}) {
    INFO(title);
    CHECK(s.html.find(title) != std::string::npos);
  }
  CHECK(s.html.find(">p99.9<") != std::string::npos);
  CHECK(s.html.find("<script") == std::string::npos);
  CHECK(s.html.find("http://") == s.html.find("http://www.w3.org/2000/svg"));
}

TEST_CASE("virtual devices with one MQTT session each converge a campaign, on either MQTT client",
          "[integration][sim]") {
  TempDir tmp;
  for (const std::string client : {"loop", "paho"}) {
    INFO("--mqtt-client " << client);
    auto s = run_sim(tmp.path() / ("direct-" + client),
                     {"--devices", "60", "--mode", "direct", "--seed", "12", "--mqtt-client", client});
    INFO(s.out << s.err);
    REQUIRE(s.exit_code == 0);
    const auto& r = s.report;
    CHECK(r["config"]["mode"] == "direct");
    CHECK(r["config"]["mqtt_client"] == client);
    CHECK(r["config"]["sessions"] == 60);
    CHECK(r["campaign"]["end_state"] == "completed");
    CHECK(r["campaign"]["hub"]["counts"]["applied"] == 60);
    CHECK(r["figures"]["finished_devices"] == 60);
  }
}

TEST_CASE("direct sessions spread over several simulator processes converge one campaign", "[integration][sim]") {
  TempDir tmp;
  const auto out = tmp.path() / "multi";
  auto s = run_sim(out, {"--devices", "90", "--mode", "direct", "--processes", "3", "--enroll-threads", "24",
                         "--seed", "13"});
  INFO(s.out << s.err);
  REQUIRE(s.exit_code == 0);
  const auto& r = s.report;
  CHECK(r["config"]["processes"] == 3);
  CHECK(r["config"]["sessions"] == 90);
  CHECK(r["campaign"]["end_state"] == "completed");
  CHECK(r["campaign"]["hub"]["counts"]["applied"] == 90);
  // The workers' outcomes came back to the driving process: every device's
  // latency and final phase, not just counts.
  CHECK(r["figures"]["finished_devices"] == 90);
  CHECK(r["timeline"].back()["devices"]["applied"] == 90);
  // The workers' counters are summed: each device got its desired state and
  // ran the whole core (journal rows), in whichever process it lived.
  CHECK(r["figures"]["messages_received"].get<int>() >= 90);
  CHECK(r["figures"]["journal_rows"].get<int>() >= 90 * 14);
  REQUIRE(r["device_phases"].size() == 90);
  for (const auto& [id, phase] : r["device_phases"].items()) {
    INFO(id);
    CHECK(phase == "applied");
  }
  // Three processes, each with a contiguous share, each stopped cleanly. The
  // spec holds the enrollment token: only its owner may read it.
  uint32_t next = 0;
  for (int k = 0; k < 3; ++k) {
    const auto dir = out / ("worker-" + std::to_string(k));
    auto st = json::parse(fs::read_file(dir / "status.json", 16u << 20).value_or("{}"));
    CHECK(st["state"] == "stopped");
    CHECK(st["first"] == next);
    next += st["count"].get<uint32_t>();
    CHECK(st["phases"][4] == st["count"]);  // applied
    const auto owner_rw = stdfs::perms::owner_read | stdfs::perms::owner_write;
    CHECK((stdfs::status(dir / "spec.json").permissions() & stdfs::perms::all) == owner_rw);
  }
  CHECK(next == 90);
}

TEST_CASE("flotilla-sim refuses bad settings with a clear message", "[integration][sim]") {
  TempDir tmp;
  auto bad_share = run_sim(tmp.path() / "x", {"--install-fail", "1.5"});
  CHECK(bad_share.exit_code == 2);
  CHECK(bad_share.err.find("install-fail must be a share between 0 and 1") != std::string::npos);
  auto bad_mode = run_sim(tmp.path() / "y", {"--mode", "mesh"});
  CHECK(bad_mode.exit_code == 2);
  CHECK(bad_mode.err.find("mode must be direct or gateway") != std::string::npos);
  auto gw_processes = run_sim(tmp.path() / "z", {"--mode", "gateway", "--processes", "2"});
  CHECK(gw_processes.exit_code == 2);
  CHECK(gw_processes.err.find("--processes is for direct mode") != std::string::npos);
  const std::vector<std::string> bad_client_args = {"--mode", "direct", "--mqtt-client", "mosquitto"};
  auto bad_client = run_sim(tmp.path() / "w", bad_client_args);
  CHECK(bad_client.exit_code == 2);
  CHECK(bad_client.err.find("mqtt-client must be loop or paho, got 'mosquitto'") != std::string::npos);
  // Nothing was started or written.
  CHECK_FALSE(stdfs::exists(tmp.path() / "x"));
  CHECK_FALSE(stdfs::exists(tmp.path() / "y"));
  CHECK_FALSE(stdfs::exists(tmp.path() / "z"));
  CHECK_FALSE(stdfs::exists(tmp.path() / "w"));
}
