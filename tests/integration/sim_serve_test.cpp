// flotilla-sim --serve-only: its virtual devices enroll with a plain hub and
// serve a campaign someone else creates through the REST API; the simulator
// creates none itself and says what its devices applied when told to stop.
#include <catch2/catch.hpp>

#include "flotilla/bundles/keys.hpp"
#include "sim_support.hpp"

using namespace flotilla;
using namespace flotilla::test;

TEST_CASE("serve-only virtual devices converge a campaign created through the REST API", "[integration][sim]") {
  TempDir tmp;
  Hub hub(tmp.path() / "hub");
  hub.start({"--enroll-rate", "0", "--enroll-rate-per-token", "0", "--http-max-connections-per-peer", "0"});
  const auto release = bundles::generate_key();
  ServingSim sim(tmp.path() / "sim", hub.url(), hub.api_token("operator", "*"),
                 {"--devices", "30", "--devices-per-gateway", "10", "--label", "serve-it", "--seed", "3", "--root-key",
                  bundles::public_key_text(release.pub)});
  const json serving = sim.wait_serving(std::chrono::seconds(120));
  INFO(sim.log());
  REQUIRE(serving.is_object());
  CHECK(serving["label"] == "serve-it");
  CHECK(serving["devices"] == 30);
  // It pushed no bundle and created no campaign.
  CHECK(hub.call("GET", "/v1/campaigns").second["items"].empty());
  CHECK(hub.call("GET", "/v1/bundles").second["items"].empty());
  CHECK(hub.devices("sim-run=serve-it").size() == 30);

  auto b = make_bundle("edge-base", 1,
                       {std::make_tuple(v1::FILE_KIND_K3S_CONFIG, std::string("50-edge.yaml"),
                                        std::string("node-label:\n  - \"edge=1\"\n"))},
                       {&release});
  auto [sb, bundle] = hub.call("POST", "/v1/bundles", b.bytes, "application/octet-stream");
  REQUIRE((sb == 201 || sb == 200));
  const json c = run_campaign(hub, bundle["id"].get<std::string>(), "sim-run=serve-it", std::chrono::seconds(120));
  INFO(c.dump(2));
  REQUIRE(c["state"] == "completed");
  CHECK(c["counts"]["total"] == 30);
  CHECK(c["counts"]["applied"] == 30);
  CHECK(c["counts"]["failed"] == 0);

  auto [code, report] = sim.stop();
  REQUIRE(code == 0);
  REQUIRE(report.is_object());
  CHECK(report["serve"]["stopped_by"] == "signal");
  CHECK(report["serve"]["applied"] == json{{"edge-base@1", 30}});
  CHECK(report["serve"]["phases"] == json{{"applied", 30}});
  // Each device's own record names the hub's campaign.
  REQUIRE(report["devices"].size() == 30);
  for (const auto& [id, d] : report["devices"].items()) {
    CHECK(d["campaign"] == c["id"]);
    CHECK(hub.device(id)["applied_version"] == 1);
  }
  // Still exactly the one campaign, the test's own.
  CHECK(hub.call("GET", "/v1/campaigns").second["items"].size() == 1);
}

TEST_CASE("serve-only stops by itself after --serve-for, and its options are checked before anything starts",
          "[integration][sim]") {
  TempDir tmp;
  Hub hub(tmp.path() / "hub");
  hub.start({"--enroll-rate", "0", "--enroll-rate-per-token", "0", "--http-max-connections-per-peer", "0"});
  const std::string token = hub.api_token("operator", "*");
  {
    ServingSim sim(tmp.path() / "timed", hub.url(), token, {"--devices", "5", "--serve-for", "1s", "--label", "t"});
    REQUIRE(sim.child.wait_for(std::chrono::seconds(120)) == 0);
    auto report = json::parse(fs::read_file(tmp.path() / "timed" / "report.json").value());
    CHECK(report["serve"]["stopped_by"] == "serve-for");
    CHECK(report["serve"]["served_s"].get<double>() >= 1.0);
    CHECK(report["serve"]["applied"] == json{{"none", 5}});
    CHECK(report["serve"]["phases"] == json{{"idle", 5}});
  }
  const size_t devices_before = hub.devices().size();
  struct Bad {
    std::vector<std::string> args;
    const char* message;
  };
  const std::vector<Bad> cases = {
      {{"--serve-for", "5s"}, "--serve-for is for --serve-only"},
      {{"--serve-only", "--serve-for", "soon"}, "serve-for"},
      {{"--serve-only", "--strategy", "{\"waves\":[50,100]}"}, "--strategy has no effect with --serve-only"},
      {{"--serve-only", "--root-key", "ed25519:nope"}, "root-key 'ed25519:nope'"},
      {{"--serve-only", "--mode", "direct", "--processes", "2"}, "--serve-only runs in one process"},
  };
  int n = 0;
  for (const auto& bad : cases) {
    const stdfs::path out = tmp.path() / ("bad-" + std::to_string(n++));
    std::vector<std::string> argv = {bin_dir() + "/flotilla-sim", "run", "--hub", hub.url(), "--token-file",
                                     (tmp.path() / "timed" / "token").string(), "--out", out.string(), "--devices", "3"};
    argv.insert(argv.end(), bad.args.begin(), bad.args.end());
    auto r = proc::run(argv, std::chrono::seconds(30));
    REQUIRE(r);
    INFO(r->err);
    CHECK(r->exit_code == 2);
    CHECK_THAT(r->err, Catch::Contains(bad.message));
    CHECK_FALSE(stdfs::exists(out));
    CHECK(hub.devices().size() == devices_before);
  }
  // The environment works like the flag, and --help names both.
  auto env = proc::run({bin_dir() + "/flotilla-sim", "run", "--hub", hub.url(), "--token-file",
                        (tmp.path() / "timed" / "token").string(), "--out", (tmp.path() / "env").string()},
                       std::chrono::seconds(30), 1 << 20, {{"FLOTILLA_SIM_SERVE_FOR", "5s"}});
  REQUIRE(env);
  CHECK(env->exit_code == 2);
  CHECK_THAT(env->err, Catch::Contains("--serve-for is for --serve-only"));
  auto help = proc::run({bin_dir() + "/flotilla-sim", "run", "--help"}, std::chrono::seconds(10));
  REQUIRE(help);
  CHECK_THAT(help->out, Catch::Contains("serve-only"));
  CHECK_THAT(help->out, Catch::Contains("serve-for"));
}
