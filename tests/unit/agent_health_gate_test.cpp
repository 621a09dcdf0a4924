// [unit] Issue 15: the health gate real k3s cannot fool, on the injected
// clock (a FakeClock: every wait is time passing at once), the apply
// pipeline's transition table, report sequence numbers that survive a
// restart and a clock set back, and labels from a signed header.
#include <catch2/catch.hpp>

#include <memory>

#include "edge-agent/testing/desired.hpp"
#include "edge-agent/testing/fakes.hpp"
#include "flotilla/agent/agent.hpp"
#include "flotilla/bundles/bundle.hpp"
#include "flotilla/common/clock.hpp"
#include "flotilla/common/crypto.hpp"

namespace {

using flotilla::FakeClock;
using namespace flotilla::agent;
using flotilla::agent::testing::FakeK3sRuntime;
using flotilla::agent::testing::MemFileTree;
using flotilla::agent::testing::MemStateStore;
namespace bundles = flotilla::bundles;
namespace v1 = flotilla::v1;

constexpr const char* kDevice = "d-gate";

struct GateRig {
  FakeClock clock;
  FakeK3sRuntime runtime;
  MemFileTree files;
  MemStateStore store;
  bundles::KeyPair key = bundles::generate_key();
  bundles::KeyPair director = bundles::generate_key();
  std::vector<v1::Report> reports;
  std::unique_ptr<Agent> agent;
  uint64_t generation = 0;
  // The hub's clock, which stays right while the device's goes wrong.
  int64_t hub_ms = clock.now_unix_ms();

  GateRig() { restart(); }

  void restart() {
    CoreConfig cfg;
    cfg.device_id = kDevice;
    cfg.arch = "amd64";
    cfg.labels = {{"env", "prod"}};
    cfg.keyring.add(key.pub);
    cfg.director_key = director.pub;
    cfg.health_timeout = std::chrono::seconds(60);
    cfg.health_settle = std::chrono::seconds(10);
    cfg.health_poll = std::chrono::seconds(1);
    cfg.min_free_bytes = 4096;
    agent = std::make_unique<Agent>(cfg, runtime, files, store, clock,
                                    [this](v1::Report&& r) { reports.push_back(std::move(r)); });
    REQUIRE(agent->start());
  }

  v1::BundleManifest manifest(uint64_t version, const std::string& dropin = "a: 1\n") {
    v1::BundleManifest m;
    m.set_format_version(1);
    m.set_name("edge");
    m.set_channel("stable");
    m.set_version(version);
    m.set_k3s_version("v1.30.4+k3s1");
    m.set_created_unix(clock.now_unix());
    m.set_expires_unix(clock.now_unix() + 30 * 86400);
    auto* f = m.add_files();
    f->set_kind(v1::FILE_KIND_K3S_CONFIG);
    f->set_name("10-edge.yaml");
    f->set_content(dropin);
    auto h = flotilla::crypto::sha256(dropin);
    f->set_sha256(std::string(h.begin(), h.end()));
    return m;
  }

  // A desired state with a header signed by the director, carrying labels if given.
  void apply(const v1::BundleManifest& m, std::optional<std::map<std::string, std::string>> labels = std::nullopt) {
    auto env = bundles::wrap(m);
    REQUIRE(bundles::sign(env, key));
    v1::DesiredState ds;
    ds.set_device_id(kDevice);
    ds.set_generation(++generation);
    ds.set_campaign_id("c");
    hub_ms += 1000;
    ds.set_issued_unix_ms(hub_ms);
    *ds.mutable_bundle() = env;
    auto h = flotilla::agent::testing::header_of(ds);
    if (labels) {
      for (const auto& [k, v] : *labels) (*h.mutable_labels())[k] = v;
      h.set_labels_set(true);
    }
    *ds.mutable_header() = bundles::sign_desired_header(h, director);
    agent->handle_desired(ds.SerializeAsString());
  }

  const v1::Report& last() const {
    REQUIRE(!reports.empty());
    return reports.back();
  }
  int64_t mono_s() const {
    return std::chrono::duration_cast<std::chrono::seconds>(clock.monotonic().time_since_epoch()).count();
  }
};

}  // namespace

TEST_CASE("the health gate does not take a Ready whose heartbeat is from before the restart",
          "[unit][agent][health]") {
  GateRig rig;
  rig.runtime.heartbeat_before = rig.clock.now_unix() - 5;
  rig.runtime.heartbeat = rig.clock.now_unix() - 5;  // the old k3s's last post, forever
  const int64_t before = rig.mono_s();
  rig.apply(rig.manifest(1));
  CHECK(rig.last().state() == v1::AGENT_STATE_ROLLED_BACK);
  CHECK(rig.last().error().reason() == v1::REASON_HEALTH_GATE_FAILED);
  CHECK_THAT(rig.last().error().message(), Catch::Contains("before the restart"));
  // The whole timeout passed on the injected clock, not in real time.
  CHECK(rig.mono_s() - before >= 60);
  CHECK(rig.runtime.restarts == 2);  // the apply, then the rollback
}

TEST_CASE("the health gate waits for a fresh heartbeat and a Ready held for the settling window",
          "[unit][agent][health]") {
  GateRig rig;
  rig.runtime.heartbeat_before = rig.clock.now_unix() - 5;
  const int64_t restart_at = rig.clock.now_unix();
  // Polls 1-3: the stale Ready; then fresh heartbeats, except one NotReady
  // lapse at poll 8 that starts the settling window again.
  rig.runtime.script = [&](int poll, K3sHealth& h) {
    h.heartbeat_unix = poll <= 3 ? restart_at - 5 : rig.clock.now_unix();
    if (poll == 8) {
      h.node_ready = false;
      h.detail = "node Ready is False";
    }
  };
  const int64_t before = rig.mono_s();
  rig.apply(rig.manifest(1));
  REQUIRE(rig.last().state() == v1::AGENT_STATE_APPLIED);
  // Fresh from poll 4, lapse at 8, Ready again from 9 for 10 s: about 17 s.
  CHECK(rig.mono_s() - before >= 17);
  CHECK(rig.mono_s() - before < 30);
}

TEST_CASE("the health gate rolls back a k3s of another version than the bundle's", "[unit][agent][health]") {
  SECTION("k3s --version") {
    GateRig rig;
    rig.runtime.installed_version = "v1.29.9+k3s1";
    rig.apply(rig.manifest(1));
    CHECK(rig.last().state() == v1::AGENT_STATE_ROLLED_BACK);
    CHECK(rig.last().error().reason() == v1::REASON_K3S_VERSION);
    CHECK_THAT(rig.last().error().message(), Catch::Contains("v1.29.9+k3s1") && Catch::Contains("v1.30.4+k3s1"));
  }
  SECTION("the kubelet that answers") {
    GateRig rig;
    rig.runtime.kubelet_version = "v1.29.9+k3s1";
    rig.apply(rig.manifest(1));
    CHECK(rig.last().state() == v1::AGENT_STATE_ROLLED_BACK);
    CHECK(rig.last().error().reason() == v1::REASON_K3S_VERSION);
  }
}

// Heartbeats are in whole seconds: the k3s from before can post in the
// second its restart began. A Ready of another version with such a heartbeat
// is that kubelet's last word; only a later one says the new k3s is wrong.
TEST_CASE("the health gate does not take the old kubelet's post during the restart for a wrong version",
          "[unit][agent][health]") {
  GateRig rig;
  rig.runtime.heartbeat_before = rig.clock.now_unix() - 5;
  rig.runtime.kubelet_version = "v1.29.9+k3s1";  // what ran before; the bundle is v1.30.4
  std::optional<int64_t> restart_second;
  SECTION("the old kubelet's last post, and the new one never posts") {
    rig.runtime.script = [&](int, K3sHealth& h) {
      if (!restart_second) restart_second = rig.clock.now_unix();  // the first poll follows the restart at once
      h.heartbeat_unix = *restart_second;
    };
    rig.apply(rig.manifest(1));
    CHECK(rig.last().state() == v1::AGENT_STATE_ROLLED_BACK);
    CHECK(rig.last().error().reason() == v1::REASON_HEALTH_GATE_FAILED);
    CHECK_THAT(rig.last().error().message(), Catch::Contains("during the restart"));
  }
  SECTION("the positive control: a kubelet of the wrong version posting after the restart") {
    rig.runtime.script = [&](int, K3sHealth& h) { h.heartbeat_unix = rig.clock.now_unix(); };
    rig.apply(rig.manifest(1));
    CHECK(rig.last().state() == v1::AGENT_STATE_ROLLED_BACK);
    CHECK(rig.last().error().reason() == v1::REASON_K3S_VERSION);
  }
}

TEST_CASE("the health gate checks the bundle's workloads and names the one that does not roll out",
          "[unit][agent][health]") {
  GateRig rig;
  auto m = rig.manifest(1);
  for (const auto& [kind, name] : {std::pair{"Deployment", "web"}, std::pair{"Job", "migrate"}}) {
    auto* w = m.mutable_health()->add_workloads();
    w->set_kind(kind);
    w->set_name(name);
    w->set_namespace_("apps");
  }
  m.mutable_health()->set_settle_seconds(2);
  SECTION("never ready: rolled back at the bundle's timeout") {
    m.mutable_health()->set_timeout_seconds(30);
    rig.runtime.workloads["Deployment apps/web"] = {true, false, "2/2 replicas available"};
    rig.runtime.workloads["Job apps/migrate"] = {false, false, "running"};
    const int64_t before = rig.mono_s();
    rig.apply(m);
    CHECK(rig.last().state() == v1::AGENT_STATE_ROLLED_BACK);
    CHECK(rig.last().error().reason() == v1::REASON_WORKLOAD_NOT_READY);
    CHECK_THAT(rig.last().error().message(), Catch::Contains("Job apps/migrate"));
    CHECK(rig.mono_s() - before >= 30);
    CHECK(rig.mono_s() - before < 60);  // the bundle's timeout, not the agent's
  }
  SECTION("a failed Job fails the gate at once") {
    rig.runtime.workloads["Deployment apps/web"] = {true, false, ""};
    rig.runtime.workloads["Job apps/migrate"] = {false, true, "failed"};
    const int64_t before = rig.mono_s();
    rig.apply(m);
    CHECK(rig.last().error().reason() == v1::REASON_WORKLOAD_NOT_READY);
    CHECK_THAT(rig.last().error().message(), Catch::Contains("Job apps/migrate failed"));
    CHECK(rig.mono_s() - before < 10);
  }
  SECTION("all rolled out") {
    rig.runtime.workloads["Deployment apps/web"] = {true, false, ""};
    rig.runtime.workloads["Job apps/migrate"] = {true, false, ""};
    rig.apply(m);
    CHECK(rig.last().state() == v1::AGENT_STATE_APPLIED);
  }
}

TEST_CASE("a manifest the new bundle drops has its resources deleted first, and the report says so",
          "[unit][agent][manifests]") {
  GateRig rig;
  auto m1 = rig.manifest(1);
  auto* f = m1.add_files();
  f->set_kind(v1::FILE_KIND_MANIFEST);
  f->set_name("web.yaml");
  f->set_content("kind: ConfigMap\n");
  auto h = flotilla::crypto::sha256(f->content());
  f->set_sha256(std::string(h.begin(), h.end()));
  rig.apply(m1);
  REQUIRE(rig.last().state() == v1::AGENT_STATE_APPLIED);
  rig.apply(rig.manifest(2));
  REQUIRE(rig.last().state() == v1::AGENT_STATE_APPLIED);
  CHECK(rig.runtime.deleted_manifests ==
        std::vector<std::string>{"/var/lib/rancher/k3s/server/manifests/web.yaml"});
  REQUIRE(rig.last().deleted_resources_size() == 1);
  CHECK(rig.last().deleted_resources(0) == "configmap/web.yaml");
  CHECK_FALSE(rig.files.exists("/var/lib/rancher/k3s/server/manifests/web.yaml"));
}

TEST_CASE("report sequence numbers keep rising across a restart with the clock set back to 1970",
          "[unit][agent][clock]") {
  GateRig rig;
  rig.apply(rig.manifest(1));
  REQUIRE(rig.last().state() == v1::AGENT_STATE_APPLIED);
  const uint64_t seq = rig.last().seq();
  const auto m2 = rig.manifest(2, "a: 2\n");  // made on the operator's (right) clock
  rig.clock.set_unix(86400);                   // no RTC: booted in 1970
  rig.restart();
  rig.agent->report_inventory();
  CHECK(rig.last().seq() > seq);
  CHECK(rig.last().inventory().clock_suspect());
  // Bundles still verify against the hub's signed time, and apply.
  rig.apply(m2);
  CHECK(rig.last().seq() > seq);
  CHECK(rig.last().state() == v1::AGENT_STATE_APPLIED);
}

TEST_CASE("a device 10 years ahead keeps applying: bundle validity falls back to the hub's signed time",
          "[unit][agent][clock]") {
  GateRig rig;
  rig.apply(rig.manifest(1));
  REQUIRE(rig.last().state() == v1::AGENT_STATE_APPLIED);
  auto m2 = rig.manifest(2, "a: 2\n");  // expires in 30 days of real time
  rig.clock.set_unix(rig.clock.now_unix() + int64_t{3650} * 86400);
  rig.apply(m2);
  // The header carries the hub's (right) time: bundle validity is checked
  // against it instead of the device's.
  CHECK(rig.last().state() == v1::AGENT_STATE_APPLIED);
  CHECK(rig.last().inventory().clock_suspect());
}

TEST_CASE("labels in the signed header replace the enrollment labels for overlay selection", "[unit][agent][labels]") {
  GateRig rig;
  auto m = rig.manifest(1);
  auto* o = m.add_overlays();
  o->set_selector("site=berlin");
  (*o->mutable_k3s_config())["node-label"] = "berlin";
  const std::string overlay = std::string("/etc/rancher/k3s/config.yaml.d/") + bundles::kOverlayDropInName;
  rig.apply(m);
  REQUIRE(rig.last().state() == v1::AGENT_STATE_APPLIED);
  CHECK_FALSE(rig.files.exists(overlay));
  // The same bundle, relabelled on the hub: applied again with the overlay.
  rig.apply(m, std::map<std::string, std::string>{{"env", "prod"}, {"site", "berlin"}});
  REQUIRE(rig.last().state() == v1::AGENT_STATE_APPLIED);
  CHECK(rig.files.exists(overlay));
  CHECK(rig.files.files.at(overlay).content.find("node-label: berlin") != std::string::npos);
  CHECK(rig.last().inventory().labels().at("site") == "berlin");
  // Remembered across a restart.
  rig.restart();
  CHECK(rig.agent->applied().hub_labels.at("site") == "berlin");
}

TEST_CASE("the apply pipeline's transition table", "[unit][agent]") {
  CHECK(step_allowed(std::nullopt, Step::verify));
  CHECK_FALSE(step_allowed(std::nullopt, Step::install));
  CHECK(step_allowed(Step::backup, Step::snapshot));
  CHECK(step_allowed(Step::backup, Step::install));
  CHECK(step_allowed(Step::restart, Step::rollback));
  CHECK(step_allowed(Step::health, Step::commit));
  CHECK_FALSE(step_allowed(Step::install, Step::commit));  // never commit without restart and health
  CHECK_FALSE(step_allowed(Step::commit, Step::rollback));
  CHECK(step_allowed(Step::commit, Step::recover));
  for (const auto& name : apply_steps()) CHECK(step_from_name(name));
}
