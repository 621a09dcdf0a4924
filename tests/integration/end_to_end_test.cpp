// The demo's path with real parts: flotilla-hub with its embedded mosquitto,
// real flotilla-agent processes with the k3s stand-in, signed bundles.
#include <catch2/catch.hpp>

#include <signal.h>

#include <algorithm>
#include <fstream>
#include <mutex>
#include <thread>

#include "flotilla/common/fs.hpp"
#include "flotilla/common/transport.hpp"
#include "tests/support/harness.hpp"

using namespace flotilla;
using namespace flotilla::test;

namespace {


const auto kConfigDropIn = std::make_tuple(v1::FILE_KIND_K3S_CONFIG, std::string("50-edge.yaml"),
                                           std::string("node-label:\n  - \"tier=edge\"\n"));
const auto kManifest = std::make_tuple(v1::FILE_KIND_MANIFEST, std::string("hello.yaml"),
                                       std::string("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: hello\n"));

}  // namespace

TEST_CASE("a signed bundle rolls out to every agent with exact counts", "[integration][e2e-path]") {
  Fleet fleet(3);
  // Built, signed and pushed with the CLI, as an operator would.
  const auto dir = fleet.tmp.path() / "spec";
  stdfs::create_directories(dir / "files");
  std::ofstream(dir / "bundle.yaml") << "name: edge-base\nversion: 1\nexpires-in: 1d\n"
                                        "files:\n  - kind: k3s-config\n    source: files/50-edge.yaml\n"
                                        "  - kind: manifest\n    source: files/hello.yaml\n";
  std::ofstream(dir / "files/50-edge.yaml") << std::get<2>(kConfigDropIn);
  std::ofstream(dir / "files/hello.yaml") << std::get<2>(kManifest);
  REQUIRE(bundles::write_private_key(fleet.tmp.path() / "release.key", fleet.release));
  const std::string bundle_file = (fleet.tmp.path() / "edge.fbundle").string();
  auto built = Hub::cli_local({"bundle", "build", dir.string(), "--out", bundle_file});
  REQUIRE(built.exit_code == 0);
  auto signed_ = Hub::cli_local({"bundle", "sign", bundle_file, "--key", (fleet.tmp.path() / "release.key").string()});
  REQUIRE(signed_.exit_code == 0);
  auto pushed = fleet.hub.cli({"bundle", "push", bundle_file, "-o", "json"});
  REQUIRE(pushed.exit_code == 0);
  const std::string bundle_id = json::parse(pushed.out)["id"];

  auto created = fleet.hub.cli({"campaign", "create", "--bundle", bundle_id, "--selector", "env=it", "-o", "json"});
  REQUIRE(created.exit_code == 0);
  const std::string campaign_id = json::parse(created.out)["id"];
  auto watched = fleet.hub.cli({"campaign", "status", campaign_id, "--watch", "--timeout", "90s", "--interval", "100ms"});
  INFO(fleet.hub.log());
  REQUIRE(watched.exit_code == 0);

  json c = fleet.hub.campaign(campaign_id, true);
  CHECK(c["state"] == "completed");
  CHECK(c["counts"]["total"] == 3);
  CHECK(c["counts"]["applied"] == 3);
  CHECK(c["counts"]["failed"] == 0);
  CHECK(c["counts"]["pending"] == 0);
  CHECK(c["counts"]["in_progress"] == 0);
  for (const auto& a : fleet.agents) {
    auto d = fleet.hub.device(a->device_id());
    CHECK(d["applied_bundle"] == "edge-base");
    CHECK(d["applied_version"] == 1);
    CHECK(d["state"] == "applied");
    CHECK(d["node_ready"] == true);
    // The files are where k3s reads them, under the agent's root.
    std::ifstream drop(a->root() / "etc/rancher/k3s/config.yaml.d/50-edge.yaml");
    CHECK(std::string(std::istreambuf_iterator<char>(drop), {}) == std::get<2>(kConfigDropIn));
    CHECK(stdfs::exists(a->root() / "var/lib/rancher/k3s/server/manifests/hello.yaml"));
  }

  // Counts stay exact when agents restart and see the retained desired state again.
  fleet.agents[0]->stop();
  fleet.agents[0]->start();
  REQUIRE(wait_until([&] { return fleet.hub.device(fleet.agents[0]->device_id())["online"] == true; },
                     std::chrono::seconds(30)));
  c = fleet.hub.campaign(campaign_id);
  CHECK(c["counts"]["applied"] == 3);
  CHECK(c["counts"]["total"] == 3);
}

TEST_CASE("a bundle signed by an untrusted key is refused and the agent's root is untouched",
          "[integration][security]") {
  Fleet fleet(3);
  // Everything but the agent's private state (its own database and
  // identity) and k3s's runtime files must stay byte for byte the same.
  const std::vector<std::string> exclude = {"var/lib/flotilla", "run/", "var/log/"};
  std::vector<std::map<std::string, std::string>> before;
  for (const auto& a : fleet.agents) before.push_back(snapshot(a->root(), exclude));

  auto rogue = bundles::generate_key();
  auto b = make_bundle("edge-base", 1, {kConfigDropIn, kManifest}, {&rogue});
  json c = run_campaign(fleet.hub, fleet.push(b), "env=it");
  INFO(c.dump(2));
  CHECK(c["state"] == "completed");
  CHECK(c["counts"]["failed"] == 3);
  CHECK(c["counts"]["applied"] == 0);
  CHECK(c["failure_reasons"]["unknown_key"] == 3);
  for (const auto& d : c["devices"]) {
    CHECK(d["status"] == "failed");
    CHECK(d["reason"] == "unknown_key");
  }
  for (size_t i = 0; i < fleet.agents.size(); ++i) {
    CHECK(snapshot(fleet.agents[i]->root(), exclude) == before[i]);
    auto d = fleet.hub.device(fleet.agents[i]->device_id());
    CHECK(d["last_reason"] == "unknown_key");
    CHECK(d["applied_bundle"] == "");
  }

  // A correctly signed bundle still goes through afterwards.
  auto good = make_bundle("edge-base", 2, {kConfigDropIn}, {&fleet.release});
  c = run_campaign(fleet.hub, fleet.push(good), "env=it");
  CHECK(c["counts"]["applied"] == 3);
}

TEST_CASE("an agent reports and ignores a malformed desired-state message", "[integration][bad-input]") {
  Fleet fleet(1);
  const std::string id = fleet.agents[0]->device_id();
  // Only the hub may write desired state (broker ACL). Rather than displace the
  // hub's own session, add a test identity allowed to write desired topics, the
  // way an operator could, and make mosquitto reload its files.
  const auto broker = fleet.hub.data_dir() / "broker";
  {
    std::ofstream acl(broker / "acl", std::ios::app);
    acl << "\nuser it-injector\ntopic write flotilla/v1/d/+/desired\n";
  }
  auto pid = std::stol(fs::read_file(broker / "mosquitto.pid", 64).value());
  REQUIRE(::kill(static_cast<pid_t>(pid), SIGHUP) == 0);

  auto t = transport::make_paho_transport();
  // A certificate from the hub's device CA names it (CN = the ACL's user).
  transport::ConnectOptions co = fleet.hub.broker_client("it-injector", fleet.tmp.path() / "injector");
  REQUIRE(wait_until([&] { return t->connect(co).ok(); }, std::chrono::seconds(10)));
  REQUIRE(t->publish({transport::device_topic(id, "desired"), "\xff\xff not protobuf \x01", 1, false}));
  REQUIRE(t->flush(std::chrono::seconds(5)));
  REQUIRE(wait_until([&] { return fleet.hub.device(id)["last_reason"] == "malformed_desired"; },
                     std::chrono::seconds(20)));
  t->disconnect();

  // The agent is still alive and applies the next good desired state.
  auto good = make_bundle("edge-base", 1, {kConfigDropIn}, {&fleet.release});
  json c = run_campaign(fleet.hub, fleet.push(good), "env=it");
  CHECK(c["counts"]["applied"] == 1);
  CHECK(fleet.hub.device(id)["last_reason"] == "");
}

TEST_CASE("an upgrade whose k3s never becomes healthy is rolled back and the reason reaches the hub",
          "[integration][rollback]") {
  Fleet fleet(2);
  auto v1b = make_bundle("edge-base", 1, {kConfigDropIn, kManifest}, {&fleet.release});
  REQUIRE(run_campaign(fleet.hub, fleet.push(v1b), "env=it")["counts"]["applied"] == 2);
  const std::vector<std::string> exclude = {"var/lib/flotilla", "run/", "var/log/", "etc/rancher/k3s/k3s.yaml"};
  std::vector<std::map<std::string, std::string>> before;
  for (const auto& a : fleet.agents) before.push_back(snapshot(a->root(), exclude));

  // v2 tells the k3s stand-in (through a config drop-in) never to become ready.
  auto bad = make_bundle("edge-base", 2,
                         {std::make_tuple(v1::FILE_KIND_K3S_CONFIG, std::string("90-broken.yaml"),
                                          std::string("standin-never-ready: true\n"))},
                         {&fleet.release});
  json c = run_campaign(fleet.hub, fleet.push(bad), "env=it", std::chrono::seconds(90));
  INFO(c.dump(2));
  CHECK(c["counts"]["failed"] == 2);
  CHECK(c["failure_reasons"]["health_gate_failed"] == 2);
  for (size_t i = 0; i < fleet.agents.size(); ++i) {
    const auto& a = fleet.agents[i];
    auto d = fleet.hub.device(a->device_id());
    CHECK(d["state"] == "rolled_back");
    CHECK(d["applied_version"] == 1);
    // v1's files are back exactly, v2's drop-in is gone, and k3s runs healthy again.
    const auto after = snapshot(a->root(), exclude);
    INFO(snapshot_diff(before[i], after));
    CHECK(after == before[i]);
    CHECK_FALSE(stdfs::exists(a->root() / "etc/rancher/k3s/config.yaml.d/90-broken.yaml"));
    REQUIRE(wait_until(
        [&] {
          auto r = proc::run({(a->root() / "usr/local/bin/k3s").string(), "kubectl", "--kubeconfig",
                              (a->root() / "etc/rancher/k3s/k3s.yaml").string(), "get", "--raw", "/readyz"},
                             std::chrono::seconds(5));
          return r && r->exit_code == 0 && r->out == "ok";
        },
        std::chrono::seconds(20)));
  }
}

TEST_CASE("the REST API answers bad input with a JSON 4xx and stores nothing", "[integration][bad-input]") {
  TempDir tmp;
  Hub hub(tmp.path() / "hub");
  hub.start();

  auto [s1, b1] = hub.call("POST", "/v1/campaigns", "{\"bundle\": ");
  CHECK(s1 == 400);
  CHECK(b1["error"]["code"] == "invalid_argument");
  CHECK(b1["error"]["message"].get<std::string>().find("JSON") != std::string::npos);

  auto [s2, b2] = hub.call("POST", "/v1/campaigns", R"({"bundle":"x","selector":"","colour":"red"})");
  CHECK(s2 == 400);
  CHECK(b2["error"]["message"].get<std::string>().find("colour") != std::string::npos);

  auto [s3, b3] = hub.call("GET", "/v1/campaigns/c-doesnotexist");
  CHECK(s3 == 404);
  CHECK(b3["error"]["message"].get<std::string>().find("c-doesnotexist") != std::string::npos);

  auto [s4, b4] = hub.call("POST", "/v1/campaigns", R"({"bundle":"nope","selector":""})");
  CHECK(s4 == 404);
  CHECK(b4["error"]["code"] == "not_found");

  // Bodies are bounded: above the server's hard cap the request is cut off with 413.
  auto [s5, b5] = hub.call("POST", "/v1/bundles", std::string(9u << 20, 'x'), "application/octet-stream");
  CHECK(s5 == 413);
  CHECK(b5["error"]["code"] == "too_large");
  auto [s6, b6] = hub.call("POST", "/v1/campaigns", "{\"name\":\"" + std::string(2u << 20, 'a') + "\"}");
  CHECK(s6 == 413);

  auto [s7, b7] = hub.call("POST", "/v1/bundles", "definitely not a bundle", "application/octet-stream");
  CHECK(s7 == 400);

  auto [s8, b8] = hub.call("GET", "/v1/devices", "", "application/json", std::string(""));
  CHECK(s8 == 401);
  CHECK(b8["error"]["code"] == "unauthenticated");

  // Nothing was stored by any of it, and the hub still serves.
  CHECK(hub.call("GET", "/v1/campaigns").second["items"].empty());
  CHECK(hub.call("GET", "/v1/bundles").second["items"].empty());
  CHECK(hub.call("GET", "/healthz").first == 200);
}

TEST_CASE("the broker confines each device to its own topics", "[integration][security]") {
  Fleet fleet(2);
  const auto& a = fleet.agents[0];
  const auto& b = fleet.agents[1];
  auto as_device = [&](const test::Agent& who, const std::string& client) {
    auto t = transport::make_paho_transport();
    transport::ConnectOptions co = who.broker_options(fleet.hub.broker_url());
    co.client_id = client;
    REQUIRE(t->connect(co));
    return t;
  };
  // B's desired state is retained on the broker once a campaign ran.
  auto bundle = make_bundle("edge-base", 1, {kConfigDropIn}, {&fleet.release});
  REQUIRE(run_campaign(fleet.hub, fleet.push(bundle), "env=it")["counts"]["applied"] == 2);

  // Probing as A: the broker ties client id to username, so A's own agent must
  // step aside or the two sessions would keep displacing each other.
  a->stop();
  // A's credentials: its own desired topic delivers, B's never does. (mosquitto's
  // ACL file acknowledges the SUBSCRIBE but withholds every message the ACL denies.)
  auto ta = as_device(*a, a->device_id() + "-probe");
  std::mutex mu;
  std::vector<std::string> got;
  ta->on_message([&](transport::Message&& m) {
    std::lock_guard lock(mu);
    got.push_back(m.topic);
  });
  auto sub_b = ta->subscribe(transport::device_topic(b->device_id(), "desired"), 1);
  if (!sub_b) CHECK(sub_b.error().code == Errc::permission_denied);
  (void)ta->subscribe("flotilla/v1/d/+/desired", 1);
  REQUIRE(ta->subscribe(transport::device_topic(a->device_id(), "desired"), 1));
  // A's own retained desired state arrives: the subscriptions above had their chance too.
  REQUIRE(wait_until(
      [&] {
        std::lock_guard lock(mu);
        return std::count(got.begin(), got.end(), transport::device_topic(a->device_id(), "desired")) > 0;
      },
      std::chrono::seconds(10)));
  {
    std::lock_guard lock(mu);
    CHECK(std::count(got.begin(), got.end(), transport::device_topic(b->device_id(), "desired")) == 0);
  }

  // A publishing B's report is dropped by the broker: the hub never sees it.
  auto tb_before = fleet.hub.device(b->device_id());
  v1::Report fake;
  fake.set_device_id(b->device_id());
  fake.set_seq(UINT64_MAX - 1);
  fake.set_state(v1::AGENT_STATE_FAILED);
  fake.mutable_error()->set_reason(v1::REASON_INTERNAL);
  fake.mutable_error()->set_message("forged by A");
  REQUIRE(ta->publish({transport::device_topic(b->device_id(), "report"), fake.SerializeAsString(), 1, false}));
  REQUIRE(ta->flush(std::chrono::seconds(5)));
  // A real report from A right after is seen; the forged one before it must not be.
  v1::Report mine;
  mine.set_device_id(a->device_id());
  mine.set_seq(UINT64_MAX - 1);
  mine.set_state(v1::AGENT_STATE_IDLE);
  REQUIRE(ta->publish({transport::device_topic(a->device_id(), "report"), mine.SerializeAsString(), 1, false}));
  REQUIRE(wait_until([&] { return fleet.hub.device(a->device_id())["state"] == "idle"; }, std::chrono::seconds(10)));
  auto tb_after = fleet.hub.device(b->device_id());
  CHECK(tb_after["last_message"] != "forged by A");
  CHECK(tb_after["state"] == tb_before["state"]);

  // With client id = username, A cannot displace B's session or the hub's.
  {
    auto before = fleet.hub.device(b->device_id());
    CHECK(before["online"] == true);
  }

  // A's name with a password and no certificate: refused outright.
  auto t = transport::make_paho_transport();
  transport::ConnectOptions bad;
  bad.url = fleet.hub.broker_url();
  bad.ca_file = fleet.hub.broker_ca_file();
  bad.client_id = "it-bad";
  bad.username = a->device_id();
  bad.password = "wrong";
  auto r = t->connect(bad);
  REQUIRE_FALSE(r);
  // Anonymous over plain MQTT: the listener speaks only TLS.
  auto t2 = transport::make_paho_transport();
  transport::ConnectOptions anon;
  anon.url = "tcp://" + fleet.hub.broker_url().substr(fleet.hub.broker_url().find("://") + 3);
  anon.client_id = "it-anon";
  CHECK_FALSE(t2->connect(anon));
}

TEST_CASE("after kill -9 the hub restarts on the same data with a fresh broker", "[integration][restart]") {
  Fleet fleet(1);
  const std::string first = fleet.agents[0]->device_id();
  const auto broker = fleet.hub.data_dir() / "broker";
  const auto old_pid = std::stol(fs::read_file(broker / "mosquitto.pid", 64).value());
  fleet.hub.kill9();
  fleet.hub.start();
  const auto new_pid = std::stol(fs::read_file(broker / "mosquitto.pid", 64).value());
  CHECK(new_pid != old_pid);
  // The old broker is gone: it died with the hub, or the new hub stopped it.
  CHECK(wait_until([&] { return !proc::alive(static_cast<pid_t>(old_pid)); }, std::chrono::seconds(10)));

  // The enrolled device reconnects on the same port, and a new one can enroll
  // (the running broker has the current password file).
  CHECK(wait_until([&] { return fleet.hub.device(first)["online"] == true; }, std::chrono::seconds(30)));
  AgentOptions o;
  o.root_keys = {bundles::public_key_text(fleet.release.pub)};
  test::Agent late(fleet.tmp.path() / "dev-late", fleet.hub.url(), fleet.hub.enrollment_token({{"env", "it"}}), o);
  late.start();
  REQUIRE(wait_until([&] { return !late.device_id().empty(); }, std::chrono::seconds(30)));
  CHECK(wait_until([&] { return fleet.hub.device(late.device_id())["online"] == true; }, std::chrono::seconds(30)));

  auto b = make_bundle("edge-base", 1, {kConfigDropIn}, {&fleet.release});
  json c = run_campaign(fleet.hub, fleet.push(b), "env=it");
  INFO(c.dump(2));
  INFO(fleet.hub.devices().dump(2));
  CHECK(c["counts"]["applied"] == 2);
}
