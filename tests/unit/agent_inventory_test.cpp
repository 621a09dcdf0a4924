// Inventory on change: the periodic check reports only when something an
// operator cares about changed since the last inventory sent, so 100k
// devices checking every few minutes cost no MQTT traffic while nothing moves.
#include <catch2/catch.hpp>

#include <memory>
#include <vector>

#include "edge-agent/testing/fakes.hpp"
#include "flotilla/agent/agent.hpp"
#include "flotilla/agent/disk.hpp"
#include "tests/support/temp_dir.hpp"
#include "flotilla/bundles/keys.hpp"
#include "flotilla/common/clock.hpp"

namespace {

using flotilla::FakeClock;
using flotilla::agent::Agent;
using flotilla::agent::CoreConfig;
using flotilla::agent::testing::FakeK3sRuntime;
using flotilla::agent::testing::MemFileTree;
using flotilla::agent::testing::MemStateStore;
namespace v1 = flotilla::v1;

struct InventoryRig {
  FakeClock clock;
  FakeK3sRuntime runtime;
  MemFileTree files;
  MemStateStore store;
  uint64_t mem_free = uint64_t{900} << 20;
  std::vector<v1::Report> reports;
  std::unique_ptr<Agent> agent;

  InventoryRig() {
    CoreConfig cfg;
    cfg.device_id = "d-inv";
    cfg.arch = "amd64";
    cfg.labels = {{"site", "berlin"}};
    cfg.keyring.add(flotilla::bundles::generate_key().pub);
    cfg.mem_free_bytes = [this] { return mem_free; };
    files.free = uint64_t{20} << 30;
    agent = std::make_unique<Agent>(cfg, runtime, files, store, clock,
                                    [this](v1::Report&& r) { reports.push_back(std::move(r)); });
    REQUIRE(agent->start());
    // What a connect sends: the baseline the periodic check compares with.
    agent->report_inventory();
    REQUIRE(reports.size() == 1);
    reports.clear();
  }
};

}  // namespace

TEST_CASE("inventory check: nothing changed, nothing is sent", "[unit][agent][inventory]") {
  InventoryRig rig;
  for (int i = 0; i < 5; ++i) CHECK_FALSE(rig.agent->check_inventory());
  CHECK(rig.reports.empty());
  // Small drifts of free disk and memory are noise, not news.
  rig.files.free -= uint64_t{100} << 20;  // 20 GiB -> 19.9 GiB
  rig.mem_free -= uint64_t{20} << 20;     // 900 MiB -> 880 MiB
  CHECK_FALSE(rig.agent->check_inventory());
  CHECK(rig.reports.empty());
}

TEST_CASE("inventory check: node Ready going false is reported exactly once", "[unit][agent][inventory]") {
  InventoryRig rig;
  rig.runtime.set_never_healthy();
  CHECK(rig.agent->check_inventory());
  REQUIRE(rig.reports.size() == 1);
  const auto& r = rig.reports.back();
  CHECK(r.state() == v1::AGENT_STATE_IDLE);
  REQUIRE(r.has_inventory());
  CHECK_FALSE(r.inventory().node_ready());
  CHECK(r.inventory().k3s_version() == "v1.30.4+k3s1");
  // Still not Ready: no second report.
  CHECK_FALSE(rig.agent->check_inventory());
  CHECK_FALSE(rig.agent->check_inventory());
  CHECK(rig.reports.size() == 1);
  // Ready again: one more.
  rig.runtime.set_healthy();
  CHECK(rig.agent->check_inventory());
  REQUIRE(rig.reports.size() == 2);
  CHECK(rig.reports.back().inventory().node_ready());
}

TEST_CASE("inventory check: a new k3s version is reported exactly once", "[unit][agent][inventory]") {
  InventoryRig rig;
  rig.runtime.installed_version = "v1.31.1+k3s1";
  CHECK(rig.agent->check_inventory());
  CHECK_FALSE(rig.agent->check_inventory());
  REQUIRE(rig.reports.size() == 1);
  CHECK(rig.reports[0].inventory().k3s_version() == "v1.31.1+k3s1");
  // Seq keeps rising, so the hub takes it after the connect report.
  CHECK(rig.reports[0].seq() > 0);
}

TEST_CASE("inventory check: free space counts when it moves a lot or crosses its low mark",
          "[unit][agent][inventory]") {
  InventoryRig rig;
  rig.files.free = uint64_t{15} << 30;  // -25%
  CHECK(rig.agent->check_inventory());
  CHECK_FALSE(rig.agent->check_inventory());
  rig.mem_free = uint64_t{100} << 20;  // below 128 MiB
  CHECK(rig.agent->check_inventory());
  CHECK(rig.reports.size() == 2);
  CHECK(rig.reports.back().inventory().mem_free_bytes() == (uint64_t{100} << 20));
}

TEST_CASE("inventory_changed compares the fields that matter", "[unit][agent][inventory]") {
  v1::Inventory a;
  a.set_agent_version("0.2.0");
  a.set_os("Linux 6.1");
  a.set_k3s_version("v1.30.4+k3s1");
  a.set_node_ready(true);
  a.set_k3s_cert_expiry_unix(1800000000);
  a.set_disk_free_bytes(uint64_t{10} << 30);
  a.set_mem_free_bytes(uint64_t{512} << 20);
  (*a.mutable_labels())["site"] = "berlin";
  using flotilla::agent::inventory_changed;
  CHECK_FALSE(inventory_changed(a, a));
  auto b = a;
  b.set_k3s_cert_expiry_unix(1900000000);  // k3s rotated its certificate
  CHECK(inventory_changed(a, b));
  b = a;
  (*b.mutable_labels())["site"] = "paris";
  CHECK(inventory_changed(a, b));
  b = a;
  (*b.mutable_labels())["rack"] = "7";
  CHECK(inventory_changed(a, b));
  b = a;
  b.set_os("Linux 6.6");
  CHECK(inventory_changed(a, b));
  b = a;
  b.set_agent_version("0.3.0");
  CHECK(inventory_changed(a, b));
  b = a;
  b.set_disk_free_bytes((uint64_t{10} << 30) - (uint64_t{900} << 20));  // -8.8%
  CHECK_FALSE(inventory_changed(a, b));
  b.set_disk_free_bytes(uint64_t{8} << 30);  // -20%
  CHECK(inventory_changed(a, b));
  b = a;
  b.set_disk_free_bytes(uint64_t{1000} << 20);  // under the 1 GiB mark
  CHECK(inventory_changed(a, b));
  // A tiny device: 10% of 50 MiB is below the 16 MiB floor, so it is noise.
  auto tiny = a;
  tiny.set_mem_free_bytes(uint64_t{50} << 20);
  b = tiny;
  b.set_mem_free_bytes(uint64_t{42} << 20);
  CHECK_FALSE(inventory_changed(tiny, b));
}

// The disk figures are those of the filesystem k3s fills (its data dir:
// data/<hash>, images, the datastore), free and total of the same one.
TEST_CASE("inventory: disk free and total are those of k3s's data dir", "[unit][agent][inventory]") {
  InventoryRig rig;
  rig.files.total = uint64_t{32} << 30;
  rig.files.space_asked.clear();
  rig.agent->report_inventory();
  REQUIRE(rig.reports.size() == 1);
  CHECK(rig.reports[0].inventory().disk_free_bytes() == (uint64_t{20} << 30));
  CHECK(rig.reports[0].inventory().disk_total_bytes() == (uint64_t{32} << 30));
  REQUIRE_FALSE(rig.files.space_asked.empty());
  for (const auto& p : rig.files.space_asked) CHECK(p == rig.runtime.data_dir());
  // The real tree answers statvfs of the nearest existing directory: a data
  // dir not made yet is measured on the filesystem it will be made on.
  flotilla::test::TempDir dir;
  flotilla::agent::DiskFileTree tree(dir.path());
  auto total = tree.total_bytes("/var/lib/rancher/k3s");
  auto free = tree.free_bytes("/var/lib/rancher/k3s");
  REQUIRE(total);
  REQUIRE(free);
  CHECK(*total > 0);
  CHECK(*free <= *total);
}
