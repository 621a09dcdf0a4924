// [integration] A cell drain across hub processes (issue 17, docs/adr/0019):
// one etcd member, two flotilla-hub processes holding one cell each, a
// mosquitto per cell running on its own, and real agents (simulated devices
// do not move). The drain is asked of the process that does NOT hold the
// cell: the holder learns it from etcd and asks the cell's devices to move,
// the other process records each arrival for both, and the campaign the
// drain lands in completes counting every device once. Then the drain is
// stopped through the same process, and both processes let the cell be.
#include <catch2/catch.hpp>

#include <algorithm>
#include <array>
#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "flotilla/bundles/keys.hpp"
#include "flotilla/common/fs.hpp"
#include "tests/support/harness.hpp"
#include "tests/support/shared_cells.hpp"

using namespace flotilla;
using namespace flotilla::test;

namespace {

constexpr size_t kCells = 2;

json cells_of(Hub& hub, const std::string& admin) {
  auto [status, body] = hub.call("GET", "/v1/cells", "", "application/json", admin);
  REQUIRE(status == 200);
  return body["items"];
}

std::string tails(Hub& a, Hub& b) {
  auto tail = [](const std::string& s) { return s.substr(s.size() > 10000 ? s.size() - 10000 : 0); };
  return "\n--- hub A (tail) ---\n" + tail(a.log()) + "\n--- hub B (tail) ---\n" + tail(b.log());
}

// Waits until each of the two hubs holds one cell; the cells each holds.
std::array<int, kCells> split_cells(Hub& a, Hub& b) {
  std::array<int, kCells> held{};
  const bool ok = wait_until(
      [&] {
        held = SharedCells::owners<kCells>({&a, &b});
        return (held[0] == 0 && held[1] == 1) || (held[0] == 1 && held[1] == 0);
      },
      std::chrono::seconds(30));
  INFO(tails(a, b));
  REQUIRE(ok);
  return held;
}

// One etcd member, a broker per cell, and two hub processes holding one
// cell each; `drained` is the cell hub B holds. The admin token is the
// fleet's (in the control log), so both hubs take it.
struct TwoHubs {
  TempDir tmp;
  SharedCells site;
  Hub a, b;
  std::string admin;
  int drained = -1;
  bundles::KeyPair release = bundles::generate_key();
  TwoHubs(const std::string& name, bool cell_files)
      : tmp(name), site(tmp.path(), kCells, 1, cell_files), a(tmp.path() / "hub-a"), b(tmp.path() / "hub-b") {
    a.start(site.hub_args);
    b.start(site.hub_args);
    admin = a.admin_token();
    REQUIRE(fs::write_file_atomic(b.data_dir() / "admin.token", admin + "\n", 0600));
    const std::array<int, kCells> held = split_cells(a, b);
    drained = held[0] == 1 ? 0 : 1;
  }
  ~TwoHubs() {
    for (auto& br : site.brokers) br->stop();
  }
  // n agents enrolled through hub A (least loaded cell each), all online.
  std::vector<std::unique_ptr<Agent>> start_agents(int n) {
    const std::string token = a.enrollment_token({{"env", "it"}}, n);
    std::vector<std::unique_ptr<Agent>> agents;
    for (int i = 0; i < n; ++i) {
      AgentOptions o;
      o.root_keys = {bundles::public_key_text(release.pub)};
      agents.push_back(std::make_unique<Agent>(tmp.path() / ("dev-" + std::to_string(i)), a.url(), token, o));
      agents.back()->start();
    }
    for (auto& agent : agents) {
      const bool online = wait_agent_online(a, *agent, std::chrono::seconds(60));
      INFO("agent log:\n" << agent->log() << tails(a, b));
      REQUIRE(online);
    }
    return agents;
  }
};

}  // namespace

TEST_CASE("cell drain across hub processes: asked of the hub that does not hold the cell, every device moves to the "
          "other process's cell mid-campaign, both agree, and the campaign counts each once",
          "[integration][etcd][multihub][drain]") {
  REQUIRE(EtcdCluster::available());
  const bool cell_files = GENERATE(false, true);  // device rows in hub.db, then in a file per cell
  INFO("cell files: " << cell_files);
  TwoHubs site("multihub-drain", cell_files);
  Hub &a = site.a, &b = site.b;
  const std::string& admin = site.admin;
  const auto& release = site.release;
  std::vector<Hub*> hubs = {&a, &b};
  // The cell hub B holds is drained; its devices go to hub A's.
  const int drained = site.drained;
  const int kept = 1 - drained;

  // Four agents enrolled through hub A: two per cell (least loaded).
  constexpr int kAgents = 4;
  auto agents = site.start_agents(kAgents);
  int in_drained = 0;
  for (auto& agent : agents) in_drained += a.device(agent->device_id())["cell"] == drained ? 1 : 0;
  REQUIRE(in_drained == kAgents / 2);

  // A slow campaign through hub B, every device; the drain lands in it.
  auto pushed = b.call("POST", "/v1/bundles", make_bundle("edge-base", 1, {}, {&release}).bytes,
                       "application/octet-stream", admin);
  INFO(pushed.second.dump());
  REQUIRE(pushed.first == 201);
  auto made = b.call("POST", "/v1/campaigns",
                     json{{"bundle", pushed.second["id"]},
                          {"selector", "env=it"},
                          {"strategy", json::parse(R"({"waves": [50, 100], "soak": "3s", "max_in_flight": 1})")}}
                         .dump(),
                     "application/json", admin);
  INFO(made.second.dump());
  REQUIRE(made.first == 201);
  const std::string id = made.second["id"].get<std::string>();
  REQUIRE(wait_until([&] { return b.campaign(id)["counts"]["applied"].get<int>() >= 1; }, std::chrono::seconds(60)));
  REQUIRE(b.campaign(id)["counts"]["applied"].get<int>() < kAgents);

  // Asked of hub A, which does not hold the cell: recorded in etcd, the
  // holder (B) works on it.
  auto [status, body] = a.call("POST", "/v1/cells/" + std::to_string(drained) + "/drain", "{}", "application/json",
                               admin);
  INFO(body.dump());
  REQUIRE(status == 200);
  CHECK(body["draining"] == true);
  CHECK(body["remaining"] == kAgents / 2);

  // Every device ends in the kept cell, online, as both processes see it
  // (their own mirrors' counts, and the device read forwarded to its holder).
  const bool moved = wait_until(
      [&] {
        for (Hub* h : hubs) {
          const json cells = cells_of(*h, admin);
          if (cells[drained]["devices_total"] != 0 || cells[kept]["devices_total"] != kAgents) return false;
        }
        for (auto& agent : agents) {
          for (Hub* h : hubs) {
            const json d = h->device(agent->device_id());
            if (d["cell"] != kept || d["online"] != true) return false;
          }
        }
        return true;
      },
      std::chrono::seconds(90));
  {
    std::string agent_logs;
    for (auto& agent : agents) agent_logs += "\n--- agent ---\n" + agent->log();
    INFO(agent_logs << tails(a, b));
    REQUIRE(moved);
  }
  for (Hub* h : hubs) {
    const json cells = cells_of(*h, admin);
    CHECK(cells[drained]["draining"] == true);
    CHECK(cells[kept]["draining"] == false);
  }
  for (auto& agent : agents) {
    if (agent->log().find("moves this device") != std::string::npos) --in_drained;
  }
  CHECK(in_drained == 0);  // the two of the drained cell moved; the others never were asked to
  // The old holder, not the process that saw them arrive, is on the old
  // broker: it clears their retained desired state (with the move) there.
  CHECK(wait_until(
      [&] {
        return b.log().find("device(s) that moved away from cell " + std::to_string(drained)) != std::string::npos;
      },
      std::chrono::seconds(20)));

  // The last cell that is not draining cannot be drained, on either hub.
  for (Hub* h : hubs) {
    auto last = h->call("POST", "/v1/cells/" + std::to_string(kept) + "/drain", "{}", "application/json", admin);
    CHECK(last.first == 409);
  }

  // The campaign completes with every device counted once, in its new
  // cell for the ones that moved.
  json c;
  const bool done = wait_until(
      [&] {
        c = b.campaign(id);
        return c["state"] == "completed";
      },
      std::chrono::seconds(90));
  INFO(c.dump(2) << tails(a, b));
  REQUIRE(done);
  CHECK(c["counts"]["total"] == kAgents);
  CHECK(c["counts"]["applied"] == kAgents);
  for (auto& agent : agents) CHECK(a.device(agent->device_id())["applied_version"] == 1);

  // The drain stopped, again through A: the key leaves etcd, and B (the
  // holder) clears its flag on its next tick; the cell is usable again.
  auto stop = a.call("DELETE", "/v1/cells/" + std::to_string(drained) + "/drain", "", "application/json", admin);
  INFO(stop.second.dump());
  REQUIRE(stop.first == 200);
  CHECK(stop.second["draining"] == false);
  CHECK(wait_until(
      [&] {
        for (Hub* h : hubs) {
          if (cells_of(*h, admin)[drained]["draining"] != false) return false;
        }
        return true;
      },
      std::chrono::seconds(20)));
  CHECK(b.log().find("cell " + std::to_string(drained) + " no longer draining") != std::string::npos);
  // B held the cell before the drain began: it knew every move it asked,
  // and withdrew only those.
  CHECK(b.log().find("withdrawing the move of every device") == std::string::npos);
}

TEST_CASE("cell drain across hub processes: the holder killed mid-drain, the process that takes the cell over "
          "withdraws on undrain the moves the dead one asked, and an offline device asked to move stays",
          "[integration][etcd][multihub][drain]") {
  REQUIRE(EtcdCluster::available());
  const bool cell_files = GENERATE(false, true);  // device rows in hub.db, then in a file per cell
  INFO("cell files: " << cell_files);
  TwoHubs site("multihub-drain-holder", cell_files);
  Hub &a = site.a, &b = site.b;
  const std::string& admin = site.admin;
  const int drained = site.drained;

  // Two agents, one per cell; the one in B's cell goes offline.
  auto agents = site.start_agents(2);
  Agent& away = a.device(agents[0]->device_id())["cell"] == drained ? *agents[0] : *agents[1];
  REQUIRE(a.device(away.device_id())["cell"] == drained);
  away.stop();
  REQUIRE(wait_until([&] { return a.device(away.device_id())["online"] == false; }, std::chrono::seconds(30)));

  // Drained; B, the holder, asks the offline device to move (retained on
  // the cell's broker), then dies.
  REQUIRE(a.call("POST", "/v1/cells/" + std::to_string(drained) + "/drain", "{}", "application/json", admin).first ==
          200);
  {
    const bool asked = wait_until(
        [&] { return b.log().find("asked 1 devices to move to another cell") != std::string::npos; },
        std::chrono::seconds(30));
    INFO(tails(a, b));
    REQUIRE(asked);
  }
  b.kill9();
  {
    const bool taken = wait_until(
        [&] {
          const auto own = SharedCells::owners<kCells>({&a});
          return own[0] == 0 && own[1] == 0;
        },
        std::chrono::seconds(30));
    INFO(tails(a, b));
    REQUIRE(taken);
  }

  // Stopped through A, which took the cell over mid-drain: it cannot know
  // what B asked, so every device still in the cell gets its move withdrawn.
  auto stop = a.call("DELETE", "/v1/cells/" + std::to_string(drained) + "/drain", "", "application/json", admin);
  REQUIRE(stop.first == 200);
  {
    const bool withdrawn = wait_until(
        [&] {
          return a.log().find("cell " + std::to_string(drained) + ": withdrawing the move of every device") !=
                     std::string::npos &&
                 a.log().find("withdrew the move of") != std::string::npos;
        },
        std::chrono::seconds(30));
    INFO(tails(a, b));
    REQUIRE(withdrawn);
  }
  // The device comes back to a broker that no longer tells it to move.
  away.start();
  REQUIRE(wait_agent_online(a, away, std::chrono::seconds(60)));
  // Long enough for a retained move to reach it and for it to act on one.
  std::this_thread::sleep_for(std::chrono::seconds(3));
  CHECK(a.device(away.device_id())["cell"] == drained);
  CHECK(a.device(away.device_id())["online"] == true);
  // Its persistent session had queued the move, and the withdrawal behind
  // it: the agent handled both before reconnecting, and stayed.
  INFO(away.log());
  CHECK(away.log().find("stays on broker") != std::string::npos);
}
