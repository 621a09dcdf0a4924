// The agent core's journaled pipeline over fakes: a crash at every step
// boundary, artifacts, campaign rollback, drift, the outbox, the reconnect
// jitter and the SQLite journal store.
#include <catch2/catch.hpp>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "edge-agent/testing/desired.hpp"
#include "edge-agent/testing/fakes.hpp"
#include "flotilla/agent/agent.hpp"
#include "flotilla/agent/daemon.hpp"
#include "flotilla/agent/disk.hpp"
#include "flotilla/bundles/bundle.hpp"
#include "flotilla/bundles/keys.hpp"
#include "flotilla/common/clock.hpp"
#include "flotilla/common/crypto.hpp"
#include "flotilla/v1/desired.pb.h"
#include "tests/support/temp_dir.hpp"

namespace {

using flotilla::FakeClock;
using flotilla::agent::Agent;
using flotilla::agent::CoreConfig;
using flotilla::agent::testing::FakeDownloader;
using flotilla::agent::testing::FakeK3sRuntime;
using flotilla::agent::testing::MemFileTree;
using flotilla::agent::testing::MemStateStore;
namespace bundles = flotilla::bundles;
namespace v1 = flotilla::v1;

constexpr const char* kDevice = "d-pipe";
constexpr const char* kBin = "/usr/local/bin/k3s";
constexpr const char* kDropIn = "/etc/rancher/k3s/config.yaml.d/10-flotilla.yaml";
constexpr const char* kBase = "http://hub.test/v1/artifacts/";

#define REQUIRE_APPLIED(rig)                                                        \
  do {                                                                              \
    INFO("last report: " << v1::AgentState_Name((rig).last().state()) << " "        \
                         << (rig).last().error().message());                        \
    REQUIRE((rig).last().state() == v1::AGENT_STATE_APPLIED);                       \
  } while (0)

struct Crash {
  std::string at;
};

std::string raw(const std::string& hex_text) {
  auto b = flotilla::from_hex(hex_text);
  return std::string(b->begin(), b->end());
}

struct Rig {
  FakeClock clock;
  FakeK3sRuntime runtime;
  MemFileTree files;
  MemStateStore store;
  FakeDownloader downloader{files};
  int saves_at_start = 0;
  bundles::KeyPair key = bundles::generate_key();
  // The hub's director key: desired states carry a header it signed, and the
  // agent pins it. `director_pinned = false` is an agent enrolled before the
  // hub signed (no key): its messages then carry no header either.
  bundles::KeyPair director = bundles::generate_key();
  bool director_pinned = true;
  std::vector<v1::Report> reports;
  std::unique_ptr<Agent> agent;
  std::string crash_at;  // "<step>:<phase>": the hook throws Crash there
  std::string fail_saves_at;  // "<step>:<phase>": every save from there on fails (a full disk)

  explicit Rig(bool pin_director = true) : director_pinned(pin_director) {
    files.files[kBin] = MemFileTree::Entry{"k3s-binary-v1", 0755};
    restart_agent();
  }

  void restart_agent() {
    CoreConfig cfg;
    cfg.device_id = kDevice;
    cfg.arch = "amd64";
    cfg.keyring.add(key.pub);
    if (director_pinned) cfg.director_key = director.pub;
    cfg.health_timeout = std::chrono::milliseconds(30);
    cfg.health_poll = std::chrono::milliseconds(1);
    cfg.min_free_bytes = 4096;
    cfg.step_hook = [this](const std::string& step, const std::string& phase) {
      if (!fail_saves_at.empty() && fail_saves_at == step + ":" + phase) store.fail_saves = true;
      if (!crash_at.empty() && crash_at == step + ":" + phase) throw Crash{crash_at};
    };
    agent = std::make_unique<Agent>(cfg, runtime, files, store, clock,
                                    [this](v1::Report&& r) { reports.push_back(std::move(r)); }, &downloader);
    REQUIRE(agent->start());
    saves_at_start = store.saves;  // start() reserves report sequence numbers once
  }

  // A bundle with a k3s drop-in, a manifest and (optionally) a k3s binary artifact.
  v1::SignedBundle bundle(uint64_t version, const std::string& binary = "", const std::string& bad_hash = "",
                          uint64_t size_delta = 0) {
    v1::BundleManifest m;
    m.set_format_version(1);
    m.set_name("edge");
    m.set_channel("stable");
    m.set_version(version);
    m.set_created_unix(clock.now_unix());
    m.set_expires_unix(clock.now_unix() + 86400);
    auto add = [&](v1::FileKind k, const std::string& name, const std::string& content) {
      auto* f = m.add_files();
      f->set_kind(k);
      f->set_name(name);
      f->set_content(content);
      auto h = flotilla::crypto::sha256(content);
      f->set_sha256(std::string(h.begin(), h.end()));
    };
    add(v1::FILE_KIND_K3S_CONFIG, "10-flotilla.yaml", "node-label: [v=" + std::to_string(version) + "]\n");
    add(v1::FILE_KIND_MANIFEST, "app-" + std::to_string(version) + ".yaml", "kind: ConfigMap\n");
    if (!binary.empty()) {
      auto* a = m.add_artifacts();
      a->set_name("k3s");
      a->set_kind(v1::ARTIFACT_KIND_K3S_BINARY);
      const std::string hex_text = bad_hash.empty() ? flotilla::crypto::sha256_hex(binary) : bad_hash;
      a->set_sha256(raw(hex_text));
      a->set_url(hex_text);  // relative: resolved against DesiredState.artifact_base_url
      a->set_size(binary.size() + size_delta);
      downloader.content[kBase + flotilla::crypto::sha256_hex(binary)] = binary;
      if (!bad_hash.empty()) downloader.content[kBase + bad_hash] = binary;
    }
    auto env = bundles::wrap(m);
    REQUIRE(bundles::sign(env, key));
    return env;
  }

  std::string desired(const v1::SignedBundle& b, uint64_t generation, bool rollback = false) {
    v1::DesiredState ds;
    ds.set_device_id(kDevice);
    ds.set_generation(generation);
    ds.set_campaign_id("c-" + std::to_string(generation));
    *ds.mutable_bundle() = b;
    ds.set_artifact_base_url(kBase);
    ds.set_rollback(rollback);
    if (director_pinned) flotilla::agent::testing::sign_header(ds, director);
    return ds.SerializeAsString();
  }

  const v1::Report& last() const {
    REQUIRE(!reports.empty());
    return reports.back();
  }
};

std::vector<std::string> all_boundaries() {
  std::vector<std::string> out;
  for (const auto& s : flotilla::agent::apply_steps()) {
    if (s == "rollback") continue;  // reached only when the gate fails (covered below)
    if (s == "rotate") continue;    // only when the header asks for it (certificate rotation test)
    out.push_back(s + ":begin");
    out.push_back(s + ":end");
  }
  return out;
}

}  // namespace

TEST_CASE("agent journals every step of an apply, begin and end, in order", "[unit][agent][journal]") {
  Rig rig;
  rig.agent->handle_desired(rig.desired(rig.bundle(1, "k3s-binary-v2"), 1));
  REQUIRE_APPLIED(rig);
  std::vector<std::string> got;
  for (const auto& e : rig.store.entries) {
    got.push_back(e.step + ":" + e.phase);
    CHECK(e.generation == 1);
    CHECK(e.apply_id == rig.store.entries.front().apply_id);
  }
  CHECK(got == all_boundaries());
  CHECK_FALSE(rig.store.state.in_flight.has_value());
}

TEST_CASE("a crash at any step leaves the old bundle or the new one, never a mix", "[unit][agent][journal]") {
  for (const auto& at : all_boundaries()) {
    DYNAMIC_SECTION("crash at " << at) {
      Rig rig;
      rig.agent->handle_desired(rig.desired(rig.bundle(1), 1));
      REQUIRE_APPLIED(rig);
      const auto old_tree = rig.files.node_files();
      const auto v2 = rig.bundle(2, "k3s-binary-v2");

      rig.crash_at = at;
      REQUIRE_THROWS_AS(rig.agent->handle_desired(rig.desired(v2, 2)), Crash);
      rig.crash_at.clear();
      const int restarts_before = rig.runtime.restarts;
      rig.restart_agent();  // the process comes back: start() recovers

      CHECK_FALSE(rig.store.state.in_flight.has_value());
      const bool committed = at == "commit:end";
      if (committed) {
        CHECK(rig.agent->applied().version == 2);
        CHECK(rig.files.node_files().at(kBin).content == "k3s-binary-v2");
      } else {
        // Exactly the old tree: binary, drop-in, manifests; no backups left behind.
        CHECK(rig.files.node_files() == old_tree);
        CHECK(rig.agent->applied().version == 1);
        for (const auto& [p, e] : rig.files.files) CHECK(p.find("/var/lib/flotilla/backup") == std::string::npos);
      }
      // k3s is restarted by recovery exactly when the node had been touched
      // (a datastore snapshot may have stopped k3s: that counts).
      const std::set<std::string> touched = {"snapshot:begin", "snapshot:end", "install:begin", "install:end",
                                             "restart:begin",  "restart:end",  "health:begin",  "health:end",
                                             "commit:begin"};
      CHECK(rig.runtime.restarts - restarts_before == (touched.count(at) ? 1 : 0));

      // The retained desired state, delivered again on reconnect, completes the apply.
      rig.agent->handle_desired(rig.desired(v2, 2));
      CHECK(rig.agent->applied().version == 2);
      CHECK(rig.files.files.at(kBin) == MemFileTree::Entry{"k3s-binary-v2", 0755});
      CHECK(rig.files.files.at(kDropIn).content == "node-label: [v=2]\n");
      CHECK_FALSE(rig.files.exists("/var/lib/rancher/k3s/server/manifests/app-1.yaml"));
      // The final outcome waits in the outbox until the daemon confirms delivery.
      REQUIRE_FALSE(rig.agent->outbox().empty());
      rig.agent->outbox_delivered(rig.agent->outbox().rbegin()->first);
      CHECK(rig.store.state.outbox.empty());
    }
  }
}

TEST_CASE("backups outlive a failed save of the outcome, so the next start restores the node exactly",
          "[unit][agent][journal]") {
  // The backups are the only copy of the old files once the install ran; the
  // store says what the node runs. They may go only once the store says so.
  for (const std::string at : {"commit:begin", "rollback:begin"}) {
    DYNAMIC_SECTION("the store fails from " << at) {
      Rig rig;
      rig.agent->handle_desired(rig.desired(rig.bundle(1), 1));
      REQUIRE_APPLIED(rig);
      const auto old_tree = rig.files.node_files();
      if (at == "rollback:begin") rig.runtime.set_never_healthy();

      rig.fail_saves_at = at;
      rig.agent->handle_desired(rig.desired(rig.bundle(2, "k3s-binary-v2"), 2));
      // On disk the apply is still in flight, with its backups listed ...
      const auto& stored = rig.store.state;
      REQUIRE(stored.in_flight.has_value());
      CHECK(stored.version == 1);
      REQUIRE_FALSE(stored.in_flight->backups.empty());
      if (at == "commit:begin") {
        // ... and every one of them is still there: the node runs v2 files.
        for (const auto& b : stored.in_flight->backups) {
          INFO(b.path);
          if (b.existed) CHECK(rig.files.exists(b.backup));
        }
      } else {
        // ... while the rollback already moved them back into place.
        CHECK(rig.files.node_files() == old_tree);
      }

      // Power cut; the disk has room again; the agent starts and recovers.
      rig.fail_saves_at.clear();
      rig.store.fail_saves = false;
      rig.runtime.set_healthy();
      rig.restart_agent();
      CHECK_FALSE(rig.store.state.in_flight.has_value());
      CHECK(rig.agent->applied().version == 1);
      CHECK(rig.files.node_files() == old_tree);
      for (const auto& [p, e] : rig.files.files) CHECK(p.find("/var/lib/flotilla/backup") == std::string::npos);
    }
  }
}

TEST_CASE("an apply that keeps crashing the agent is given up after a few attempts", "[unit][agent][journal]") {
  Rig rig;
  const auto v1b = rig.bundle(1);
  rig.crash_at = "restart:begin";
  for (int i = 0; i < 3; ++i) {
    REQUIRE_THROWS_AS(rig.agent->handle_desired(rig.desired(v1b, 5)), Crash);
    rig.restart_agent();
  }
  rig.crash_at.clear();
  rig.reports.clear();
  rig.agent->handle_desired(rig.desired(v1b, 5));
  CHECK(rig.last().state() == v1::AGENT_STATE_FAILED);
  CHECK(rig.last().error().reason() == v1::REASON_INTERNAL);
  CHECK(rig.last().error().message().find("interrupted 3 times") != std::string::npos);
  CHECK(rig.agent->applied().generation == 5);
  CHECK(rig.files.files.at(kBin).content == "k3s-binary-v1");
}

TEST_CASE("agent downloads a k3s binary artifact, installs it 0755 and rolls it back when unhealthy",
          "[unit][agent][artifacts]") {
  Rig rig;
  rig.agent->handle_desired(rig.desired(rig.bundle(1, "k3s-binary-v2"), 1));
  REQUIRE_APPLIED(rig);
  CHECK(rig.files.files.at(kBin) == MemFileTree::Entry{"k3s-binary-v2", 0755});
  CHECK(rig.downloader.urls == std::vector<std::string>{kBase + flotilla::crypto::sha256_hex("k3s-binary-v2")});
  // The placed binary is tracked for drift like any file.
  bool tracked = false;
  for (const auto& pf : rig.store.state.files) tracked |= pf.path == kBin;
  CHECK(tracked);

  // v2 brings a binary that never gets healthy: the previous binary returns.
  const auto before = rig.files.node_files();
  rig.runtime.set_never_healthy();
  rig.agent->handle_desired(rig.desired(rig.bundle(2, "k3s-binary-v3-broken"), 2));
  CHECK(rig.last().state() == v1::AGENT_STATE_ROLLED_BACK);
  CHECK(rig.last().error().reason() == v1::REASON_HEALTH_GATE_FAILED);
  CHECK(rig.files.node_files() == before);
  CHECK(rig.agent->applied().version == 1);

  // Same binary again in v3: nothing to download, it is installed already.
  rig.runtime.set_healthy();
  const int fetches = rig.downloader.fetches;
  rig.agent->handle_desired(rig.desired(rig.bundle(3, "k3s-binary-v2"), 3));
  CHECK(rig.last().state() == v1::AGENT_STATE_APPLIED);
  CHECK(rig.downloader.fetches == fetches);
}

TEST_CASE("agent refuses an artifact with the wrong hash or size and installs nothing", "[unit][agent][artifacts]") {
  Rig rig;
  rig.agent->handle_desired(rig.desired(rig.bundle(1), 1));
  REQUIRE_APPLIED(rig);
  const auto before = rig.files.node_files();
  const int restarts = rig.runtime.restarts;

  SECTION("hash") {
    rig.agent->handle_desired(rig.desired(rig.bundle(2, "evil-binary", std::string(64, 'a')), 2));
    CHECK(rig.last().state() == v1::AGENT_STATE_REFUSED);
    CHECK(rig.last().error().reason() == v1::REASON_ARTIFACT_HASH);
    CHECK(rig.last().error().message().find(std::string(64, 'a')) != std::string::npos);
  }
  SECTION("size: the server sends more than the manifest says") {
    rig.agent->handle_desired(rig.desired(rig.bundle(2, "longer-binary", "", static_cast<uint64_t>(-3)), 2));
    CHECK(rig.last().error().reason() == v1::REASON_ARTIFACT_SIZE);
  }
  SECTION("size: fewer bytes than the manifest says") {
    rig.agent->handle_desired(rig.desired(rig.bundle(2, "short-binary", "", 10), 2));
    CHECK(rig.last().error().reason() == v1::REASON_ARTIFACT_SIZE);
  }
  SECTION("download fails") {
    rig.downloader.fail = true;
    rig.agent->handle_desired(rig.desired(rig.bundle(2, "some-binary"), 2));
    CHECK(rig.last().state() == v1::AGENT_STATE_FAILED);
    CHECK(rig.last().error().reason() == v1::REASON_DOWNLOAD_FAILED);
  }
  // Nothing on the node changed, k3s was not touched, v1 still applied.
  CHECK(rig.files.node_files() == before);
  CHECK(rig.runtime.restarts == restarts);
  CHECK(rig.agent->applied().version == 1);
  for (const auto& [p, e] : rig.files.files) CHECK(p.find("/var/lib/flotilla/staging/") == std::string::npos);
}

TEST_CASE("agent counts artifact sizes in the free-disk check", "[unit][agent][artifacts]") {
  Rig rig;
  const auto before = rig.files.files;
  const auto b = rig.bundle(1, std::string(100000, 'k'));
  rig.files.free = 4096 + 100000;  // enough for the reserve and the binary, not the files too
  rig.agent->handle_desired(rig.desired(b, 1));
  CHECK(rig.last().error().reason() == v1::REASON_DISK_FULL);
  CHECK(rig.last().error().message().find("reserve 4096") != std::string::npos);
  CHECK(rig.files.files == before);
  CHECK(rig.downloader.fetches == 0);
  CHECK(rig.store.saves == rig.saves_at_start);
}

TEST_CASE("campaign rollback returns to exactly the previous bundle and nothing else", "[unit][agent][rollback]") {
  Rig rig;
  const auto v1b = rig.bundle(1);
  rig.agent->handle_desired(rig.desired(v1b, 1));
  rig.agent->handle_desired(rig.desired(rig.bundle(2), 2));
  REQUIRE(rig.agent->applied().version == 2);

  SECTION("the exact previous bundle with rollback set is applied; highest stays 2") {
    rig.agent->handle_desired(rig.desired(v1b, 3, true));
    CHECK(rig.last().state() == v1::AGENT_STATE_APPLIED);
    CHECK(rig.agent->applied().version == 1);
    CHECK(rig.agent->applied().manifest_sha256_hex == bundles::manifest_digest_hex(v1b));
    CHECK(rig.agent->applied().highest_version.at("stable") == 2);
    CHECK(rig.files.files.at(kDropIn).content == "node-label: [v=1]\n");
    // Without the flag the same old bundle is still a rollback attack.
    rig.agent->handle_desired(rig.desired(rig.bundle(2), 4));
    CHECK(rig.last().state() == v1::AGENT_STATE_REFUSED);
    CHECK(rig.last().error().reason() == v1::REASON_ROLLBACK_VERSION);
  }
  SECTION("a different version-1 bundle with rollback set is refused") {
    rig.clock.advance(std::chrono::seconds(1));  // another build: other bytes, other hash
    const auto other = rig.bundle(1);
    REQUIRE(bundles::manifest_digest_hex(other) != bundles::manifest_digest_hex(v1b));
    const auto tree = rig.files.files;
    rig.agent->handle_desired(rig.desired(other, 3, true));
    CHECK(rig.last().state() == v1::AGENT_STATE_REFUSED);
    CHECK(rig.last().error().reason() == v1::REASON_ROLLBACK_TARGET);
    CHECK(rig.files.files == tree);
    CHECK(rig.agent->applied().version == 2);
  }
  SECTION("the old bundle without rollback set is refused as a rollback attack") {
    rig.agent->handle_desired(rig.desired(v1b, 3, false));
    CHECK(rig.last().error().reason() == v1::REASON_ROLLBACK_VERSION);
  }
  SECTION("an expired previous bundle is refused even with rollback set") {
    rig.clock.advance(std::chrono::hours(48));
    rig.agent->handle_desired(rig.desired(v1b, 3, true));
    CHECK(rig.last().error().reason() == v1::REASON_BUNDLE_EXPIRED);
    CHECK(rig.agent->applied().version == 2);
  }
}

TEST_CASE("an agent without a director key refuses every rollback and keeps no generation floor",
          "[unit][agent][rollback][director]") {
  // Enrolled before the hub signed desired states: nothing in the message is
  // authenticated beyond the bundle, so what an unsigned field can do is bounded.
  Rig rig(false);
  const auto v1b = rig.bundle(1);
  rig.agent->handle_desired(rig.desired(v1b, 1));
  rig.agent->handle_desired(rig.desired(rig.bundle(2), 2));
  REQUIRE_APPLIED(rig);
  const auto tree = rig.files.files;
  const int saves = rig.store.saves;

  // The flip attack: back to the previous bundle by setting `rollback`.
  rig.agent->handle_desired(rig.desired(v1b, 3, true));
  CHECK(rig.last().state() == v1::AGENT_STATE_REFUSED);
  CHECK(rig.last().error().reason() == v1::REASON_DESIRED_UNSIGNED);
  CHECK(rig.files.files == tree);
  CHECK(rig.store.saves == saves);
  CHECK(rig.agent->applied().version == 2);

  // The freeze attack: a huge generation is handled (its bundle is the one
  // running) but is not a floor: the hub's next generation still applies.
  rig.agent->handle_desired(rig.desired(rig.bundle(2), INT64_MAX));
  CHECK(rig.last().state() == v1::AGENT_STATE_APPLIED);
  // One that could not even be stored is refused outright.
  rig.agent->handle_desired(rig.desired(rig.bundle(2), UINT64_MAX));
  CHECK(rig.last().error().reason() == v1::REASON_MALFORMED_DESIRED);
  rig.agent->handle_desired(rig.desired(rig.bundle(3), 3));
  REQUIRE_APPLIED(rig);
  CHECK(rig.agent->applied().version == 3);
  CHECK(rig.agent->applied().director_generation == 0);
}

TEST_CASE("agent finds drifted files, repairs them, restarts k3s for config and reports the paths",
          "[unit][agent][drift]") {
  Rig rig;
  rig.agent->handle_desired(rig.desired(rig.bundle(1, "k3s-binary-v2"), 1));
  REQUIRE_APPLIED(rig);
  const auto good = rig.files.node_files();
  CHECK(rig.agent->check_drift().empty());

  rig.files.files[kDropIn].content = "node-label: [tampered]\n";
  rig.files.files.erase(kBin);
  const int restarts = rig.runtime.restarts;
  rig.reports.clear();
  auto drifted = rig.agent->check_drift();
  std::sort(drifted.begin(), drifted.end());
  CHECK(drifted == std::vector<std::string>{kDropIn, kBin});
  CHECK(rig.files.node_files() == good);
  CHECK(rig.runtime.restarts == restarts + 1);
  REQUIRE(rig.reports.size() == 1);
  CHECK(rig.last().error().reason() == v1::REASON_DRIFT);
  CHECK(rig.last().error().message().find(kDropIn) != std::string::npos);
  CHECK(rig.agent->check_drift().empty());
}

TEST_CASE("enrollment retry delays draw from 64 random bits: far more than 256 patterns across a fleet",
          "[unit][agent]") {
  // Seeded from one random byte, every device of a fleet booting together
  // picked one of 256 delay sequences, so they came back in 256 herds.
  std::set<std::vector<int64_t>> patterns;
  for (int device = 0; device < 2000; ++device) {
    auto b = flotilla::agent::make_enroll_backoff(std::chrono::hours(1));
    std::vector<int64_t> delays;
    for (int attempt = 0; attempt < 4; ++attempt) delays.push_back(b.next().count());
    CHECK(delays[0] <= 1000);  // full jitter under the first ceiling (1 s)
    patterns.insert(delays);
  }
  CHECK(patterns.size() > 1900);
}

TEST_CASE("an artifact's overall download deadline grows with its size, never below the floor", "[unit][agent]") {
  flotilla::agent::AgentConfig cfg;
  cfg.download_deadline_min = std::chrono::minutes(5);
  cfg.download_min_rate = 16 * 1024;
  CHECK(flotilla::agent::download_deadline(cfg, 1000) == std::chrono::minutes(5));
  // 4 GiB at 16 KiB/s: about 73 hours.
  CHECK(flotilla::agent::download_deadline(cfg, uint64_t{4} << 30) == std::chrono::seconds((uint64_t{4} << 30) / 16384 + 1));
}

TEST_CASE("the issued time of signed enrollment and renewal requests never goes backwards across restarts",
          "[unit][agent][clock]") {
  flotilla::test::TempDir tmp;
  const auto floor_file = tmp.path() / "issued-floor";
  const int64_t t2026 = 1796000000000;
  auto a = flotilla::agent::next_issued_ms(floor_file, t2026);
  REQUIRE(a);
  CHECK(*a == static_cast<uint64_t>(t2026));
  // The same millisecond twice (a quick retry): still increasing.
  auto b = flotilla::agent::next_issued_ms(floor_file, t2026);
  REQUIRE(b);
  CHECK(*b == *a + 1);
  // A reboot without an RTC into 1970: the hub would refuse anything at or
  // below its last value, so the floor carries the request above it.
  auto c = flotilla::agent::next_issued_ms(floor_file, 5000);
  REQUIRE(c);
  CHECK(*c == *b + 1);
  // A clock that is right again is used as it is.
  auto d = flotilla::agent::next_issued_ms(floor_file, t2026 + 60000);
  REQUIRE(d);
  CHECK(*d == static_cast<uint64_t>(t2026 + 60000));
  // A floor file that cannot be written is an error, not a reused value.
  auto e = flotilla::agent::next_issued_ms(tmp.path() / "missing-dir" / "issued-floor", t2026);
  CHECK_FALSE(e);
}

TEST_CASE("reconnect delays of many devices after a broker restart are spread, not in lockstep",
          "[unit][agent][backoff]") {
  // 10,000 devices lose the broker at the same instant; all share one pid salt.
  const auto cap = std::chrono::milliseconds(300000);
  std::vector<int64_t> first, third;
  for (int i = 0; i < 10000; ++i) {
    auto b = flotilla::agent::make_reconnect_backoff("d-" + std::to_string(i), cap, 42);
    first.push_back(b.next().count());
    b.next();
    third.push_back(b.next().count());
  }
  // Attempt 3 is uniform in [0, 2000ms]: ten 200 ms buckets each hold ~10%.
  std::vector<int> buckets(10, 0);
  for (auto d : third) {
    REQUIRE(d >= 0);
    REQUIRE(d <= 2000);
    ++buckets[std::min<int64_t>(9, d / 200)];
  }
  for (int c : buckets) {
    CHECK(c > 700);
    CHECK(c < 1300);
  }
  // And no single millisecond is shared by a crowd.
  std::map<int64_t, int> same;
  for (auto d : first) ++same[d];
  int crowd = 0;
  for (const auto& [d, n] : same) crowd = std::max(crowd, n);
  CHECK(crowd < 40);
}

TEST_CASE("the SQLite store keeps the in-flight apply, outbox and journal across reopen", "[unit][agent][journal]") {
  const auto dir = std::filesystem::temp_directory_path() / ("agent-store-" + flotilla::crypto::random_token(4));
  std::filesystem::create_directories(dir);
  const std::string path = (dir / "agent.db").string();
  flotilla::agent::AppliedState s;
  s.bundle_name = "edge";
  s.version = 3;
  s.previous_manifest_sha256_hex = "ab";
  s.applied_desired = std::string("\0\x01\x02payload", 10);
  s.interrupted_generation = 7;
  s.interrupted_count = 2;
  s.in_flight = flotilla::agent::InFlight{"g7-1", 7, "c", "edge", 4, "install",
                                          {{"/usr/local/bin/k3s", "/var/lib/flotilla/backup/g7-1/0", true},
                                           {"/etc/x", "/var/lib/flotilla/backup/g7-1/1", false}},
                                          {"sqlite", "/var/lib/flotilla/backup/g7-1/datastore"},
                                          "/var/lib/rancher/k3s/server/tls-1800000000"};
  s.outbox[12] = std::string("\0report", 7);
  s.seq_reserved = 123456;
  s.hub_time_ms = 1'800'000'000'000;
  s.hub_labels = {{"site", "berlin"}, {"env", "prod"}};
  s.hub_labels_set = true;
  s.k3s_data_dir = "0123abcd";
  {
    auto store = flotilla::agent::SqliteStateStore::open(path);
    REQUIRE(store);
    REQUIRE((*store)->save(s));
    REQUIRE((*store)->journal({"g7-1", 7, "install", "begin", 5, ""}));
  }
  auto store = flotilla::agent::SqliteStateStore::open(path);
  REQUIRE(store);
  auto loaded = (*store)->load();
  REQUIRE(loaded);
  CHECK(loaded->in_flight == s.in_flight);
  CHECK(loaded->outbox == s.outbox);
  CHECK(loaded->applied_desired == s.applied_desired);
  CHECK(loaded->previous_manifest_sha256_hex == "ab");
  CHECK(loaded->interrupted_generation == 7);
  CHECK(loaded->interrupted_count == 2);
  CHECK(loaded->in_flight->snapshot.kind == "sqlite");  // recovery restores the datastore from it
  CHECK(loaded->seq_reserved == 123456);
  CHECK(loaded->hub_time_ms == 1'800'000'000'000);
  CHECK(loaded->hub_labels == s.hub_labels);
  CHECK(loaded->hub_labels_set);
  // Recovery puts the certificates back from here; the next commit keeps this data dir.
  CHECK(loaded->in_flight->cert_backup == "/var/lib/rancher/k3s/server/tls-1800000000");
  CHECK(loaded->k3s_data_dir == "0123abcd");
  auto tail = (*store)->journal_tail(10);
  REQUIRE(tail);
  REQUIRE(tail->size() == 1);
  CHECK(tail->front().step == "install");
  // Clearing the in-flight apply really clears it.
  s.in_flight.reset();
  REQUIRE((*store)->save(s));
  CHECK_FALSE((*store)->load()->in_flight.has_value());
  std::filesystem::remove_all(dir);
}

namespace {
// The agent's config from these flags (no config file, no environment) and a
// pinned root key, as flotilla-agent parses its command line.
flotilla::Result<flotilla::agent::AgentConfig> parse_agent_flags(std::vector<std::string> args) {
  flotilla::Options opts("flotilla-agent", "", "FLOTILLA_AGENT_TEST_UNSET_");
  flotilla::agent::add_agent_options(opts);
  std::vector<std::string> argv = {"flotilla-agent", "--config", "", "--root-keys",
                                   "ed25519:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="};
  argv.insert(argv.end(), args.begin(), args.end());
  std::vector<char*> cargv;
  for (auto& a : argv) cargv.push_back(a.data());
  REQUIRE(opts.parse(static_cast<int>(cargv.size()), cargv.data()));
  return flotilla::agent::agent_config_from(opts);
}
}  // namespace

TEST_CASE("agent config rejects bad new settings with a clear message", "[unit][agent][config]") {
  auto parse = parse_agent_flags;
  auto bad_sm = parse({"--service-manager", "upstart"});
  REQUIRE_FALSE(bad_sm);
  CHECK(bad_sm.error().message.find("service-manager must be auto, systemd, openrc or direct") != std::string::npos);
  auto bad_size = parse({"--min-free", "12 parsecs"});
  REQUIRE_FALSE(bad_size);
  CHECK(bad_size.error().message.find("min-free") != std::string::npos);
  auto bad_ca = parse({"--tls-ca-file", "relative/ca.pem"});
  REQUIRE_FALSE(bad_ca);
  CHECK(bad_ca.error().message.find("tls-ca-file") != std::string::npos);
  auto good = parse({"--service-manager", "openrc", "--min-free", "1GiB", "--drift-interval", "30s"});
  REQUIRE(good);
  CHECK(good->service_manager == "openrc");
  CHECK(good->min_free_bytes == (uint64_t{1} << 30));
  CHECK(good->drift_interval == std::chrono::seconds(30));
  CHECK(good->inventory_interval == std::chrono::minutes(5));
  auto bad_inventory = parse({"--inventory-interval", "often"});
  REQUIRE_FALSE(bad_inventory);
  CHECK(bad_inventory.error().message.find("inventory-interval") != std::string::npos);
  auto zero_rate = parse({"--download-min-rate", "0"});
  REQUIRE_FALSE(zero_rate);
  CHECK(zero_rate.error().message.find("download-min-rate must be at least 1 byte per second") != std::string::npos);
  auto bad_rate = parse({"--download-min-rate", "fast"});
  REQUIRE_FALSE(bad_rate);
  CHECK(bad_rate.error().message.find("download-min-rate") != std::string::npos);
  auto zero_deadline = parse({"--download-deadline-min", "0s"});
  REQUIRE_FALSE(zero_deadline);
  CHECK(zero_deadline.error().message.find("download-deadline-min must be positive") != std::string::npos);
  auto deadlines = parse({"--download-deadline-min", "90s", "--download-min-rate", "1MiB", "--director-key",
                          "ed25519:AAAA"});
  REQUIRE(deadlines);
  CHECK(deadlines->download_deadline_min == std::chrono::seconds(90));
  CHECK(deadlines->download_min_rate == (uint64_t{1} << 20));
  CHECK(deadlines->director_key == "ed25519:AAAA");  // read (and checked) at start, like root-keys
}

TEST_CASE("agent config checks tls-ca-file under the root before anything connects", "[unit][agent][config]") {
  const auto root = std::filesystem::temp_directory_path() / ("flotilla-ca-" + flotilla::crypto::random_token(6));
  std::filesystem::create_directories(root / "etc/flotilla");
  auto parse = [&](std::vector<std::string> args) {
    args.insert(args.begin(), {"--root", root.string()});
    return parse_agent_flags(std::move(args));
  };
  auto missing = parse({"--tls-ca-file", "/etc/flotilla/ca.pem"});
  REQUIRE_FALSE(missing);
  CHECK(missing.error().message.find("tls-ca-file: cannot read") != std::string::npos);
  CHECK(missing.error().message.find((root / "etc/flotilla/ca.pem").string()) != std::string::npos);

  std::ofstream(root / "etc/flotilla/ca.pem") << "not a certificate\n";
  auto not_pem = parse({"--tls-ca-file", "/etc/flotilla/ca.pem"});
  REQUIRE_FALSE(not_pem);
  CHECK(not_pem.error().message.find("holds no PEM certificate") != std::string::npos);

  std::ofstream(root / "etc/flotilla/ca.pem") << "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
  auto good = parse({"--tls-ca-file", "/etc/flotilla/ca.pem"});
  REQUIRE(good);
  CHECK(good->tls_ca_file == "/etc/flotilla/ca.pem");
  std::filesystem::remove_all(root);
}

// A campaign's k3s_action: `k3s certificate rotate` with k3s stopped, a
// restart, the health gate, and the renewed expiry in the outcome's
// inventory; any failure puts the old certificates back.
TEST_CASE("a certificate rotation is health-gated, reports the new expiry and rolls back to the old certificates",
          "[unit][agent][rotate]") {
  Rig rig;
  const auto b1 = rig.bundle(1);
  rig.agent->handle_desired(rig.desired(b1, 1));
  REQUIRE_APPLIED(rig);
  const int64_t before = rig.runtime.cert_expiry;
  const auto tree = rig.files.node_files();
  auto rotate = [&](uint64_t generation) {
    v1::DesiredState ds;
    REQUIRE(ds.ParseFromString(rig.desired(b1, generation)));
    auto h = flotilla::agent::testing::header_of(ds);
    h.set_k3s_action(v1::K3S_ACTION_ROTATE_CERTIFICATES);
    *ds.mutable_header() = bundles::sign_desired_header(h, rig.director);
    return ds.SerializeAsString();
  };
  rig.store.entries.clear();

  SECTION("rotated: the same bundle, k3s restarted, a later notAfter reported") {
    const int restarts = rig.runtime.restarts;
    rig.agent->handle_desired(rotate(2));
    REQUIRE_APPLIED(rig);
    CHECK(rig.runtime.rotations == 1);
    CHECK(rig.runtime.restarts == restarts + 1);
    CHECK(rig.last().inventory().k3s_cert_expiry_unix() == before + 86400);
    CHECK(rig.runtime.restored_certificates.empty());
    CHECK(rig.files.node_files() == tree);
    std::vector<std::string> steps;
    for (const auto& e : rig.store.entries) steps.push_back(e.step + ":" + e.phase);
    CHECK(std::find(steps.begin(), steps.end(), "rotate:end") != steps.end());
    // The same generation again (the retained message after a reconnect) rotates nothing more.
    rig.agent->handle_desired(rotate(2));
    CHECK(rig.runtime.rotations == 1);
  }
  SECTION("k3s came back with the old certificate: rolled back, old certificates restored") {
    rig.runtime.renewed_by = 0;
    rig.agent->handle_desired(rotate(2));
    CHECK(rig.last().state() == v1::AGENT_STATE_ROLLED_BACK);
    CHECK(rig.last().error().reason() == v1::REASON_CERT_ROTATION);
    CHECK(rig.runtime.restored_certificates == std::vector<std::string>{"/var/lib/rancher/k3s/server/tls-fake"});
    CHECK(rig.runtime.cert_expiry == before);
    CHECK(rig.files.node_files() == tree);
    CHECK(rig.agent->applied().version == 1);
  }
  SECTION("unhealthy after the rotation: rolled back with the old certificates") {
    rig.runtime.set_never_healthy();
    rig.agent->handle_desired(rotate(2));
    CHECK(rig.last().state() == v1::AGENT_STATE_ROLLED_BACK);
    CHECK(rig.runtime.restored_certificates.size() == 1);
    CHECK(rig.runtime.cert_expiry == before);
    CHECK(rig.last().inventory().k3s_cert_expiry_unix() == before);
  }
  SECTION("the rotate command fails: rolled back, k3s restarted, nothing to restore") {
    rig.runtime.fail_rotate = true;
    const int restarts = rig.runtime.restarts;
    rig.agent->handle_desired(rotate(2));
    CHECK(rig.last().state() == v1::AGENT_STATE_ROLLED_BACK);
    CHECK(rig.last().error().reason() == v1::REASON_CERT_ROTATION);
    CHECK(rig.runtime.restored_certificates.empty());
    CHECK(rig.runtime.restarts == restarts + 1);
    CHECK(rig.runtime.cert_expiry == before);
  }
  SECTION("a crash after the rotation: the next start restores the old certificates") {
    uint64_t generation = 2;
    for (const std::string at : {"rotate:end", "restart:end", "health:begin"}) {
      rig.crash_at = at;
      REQUIRE_THROWS_AS(rig.agent->handle_desired(rotate(generation++)), Crash);
      rig.crash_at.clear();
      rig.restart_agent();
      INFO(at);
      CHECK_FALSE(rig.store.state.in_flight.has_value());
      CHECK(rig.runtime.restored_certificates.back() == "/var/lib/rancher/k3s/server/tls-fake");
      CHECK(rig.runtime.cert_expiry == before);
      CHECK(rig.files.node_files() == tree);
    }
  }
}

// k3s keeps every data/<hash> it extracted (~200 MB each). After a commit
// only the running k3s's and the previous one (a rollback's) stay; after a
// rollback the failed k3s's goes and data/current names the old one again.
TEST_CASE("superseded k3s data dirs go after a commit, the failed one after a rollback", "[unit][agent][datadirs]") {
  Rig rig;
  rig.runtime.data = {"aaa"};
  rig.runtime.current_dir = "aaa";
  rig.agent->handle_desired(rig.desired(rig.bundle(1), 1));
  REQUIRE_APPLIED(rig);
  CHECK(rig.store.state.k3s_data_dir == "aaa");
  CHECK(rig.runtime.removed_dirs.empty());

  rig.runtime.extract_on_restart = "bbb";
  rig.agent->handle_desired(rig.desired(rig.bundle(2, "k3s-binary-v2"), 2));
  REQUIRE_APPLIED(rig);
  // The previous k3s's stays for a rollback.
  CHECK(rig.runtime.data == std::set<std::string>{"aaa", "bbb"});
  CHECK(rig.store.state.k3s_data_dir == "bbb");

  rig.runtime.extract_on_restart = "ccc";
  rig.agent->handle_desired(rig.desired(rig.bundle(3, "k3s-binary-v3"), 3));
  REQUIRE_APPLIED(rig);
  CHECK(rig.runtime.data == std::set<std::string>{"bbb", "ccc"});
  CHECK(rig.runtime.removed_dirs == std::vector<std::string>{"aaa"});
  CHECK(rig.store.state.k3s_data_dir == "ccc");

  // A new k3s that never becomes healthy: its directory goes, current is the old one.
  rig.runtime.extract_on_restart = "ddd";
  rig.runtime.set_never_healthy();
  rig.agent->handle_desired(rig.desired(rig.bundle(4, "k3s-binary-v4"), 4));
  CHECK(rig.last().state() == v1::AGENT_STATE_ROLLED_BACK);
  CHECK(rig.runtime.data == std::set<std::string>{"bbb", "ccc"});
  CHECK(rig.runtime.current_dir == "ccc");
  CHECK(rig.store.state.k3s_data_dir == "ccc");

  // A bundle that keeps k3s: nothing extracted, the previous one goes.
  rig.runtime.set_healthy();
  rig.agent->handle_desired(rig.desired(rig.bundle(5, "k3s-binary-v3"), 5));
  REQUIRE_APPLIED(rig);
  CHECK(rig.runtime.data == std::set<std::string>{"ccc"});
}

// The test-only clock hook is checked like a setting: a bad value stops the
// agent with a message naming it, never a silently unshifted clock.
TEST_CASE("agent config refuses a malformed FLOTILLA_TEST_CLOCK_OFFSET_S", "[unit][agent][config]") {
  struct EnvGuard {
    ~EnvGuard() { ::unsetenv("FLOTILLA_TEST_CLOCK_OFFSET_S"); }
  } guard;
  for (const char* bad : {"ten years", "12s", "99999999999"}) {
    INFO(bad);
    ::setenv("FLOTILLA_TEST_CLOCK_OFFSET_S", bad, 1);
    auto r = parse_agent_flags({"--service-manager", "openrc"});
    REQUIRE_FALSE(r);
    CHECK(r.error().message.find("FLOTILLA_TEST_CLOCK_OFFSET_S") != std::string::npos);
  }
  for (const char* good : {"-1700000000", "315360000", "0"}) {
    INFO(good);
    ::setenv("FLOTILLA_TEST_CLOCK_OFFSET_S", good, 1);
    CHECK(parse_agent_flags({"--service-manager", "openrc"}));
  }
}
