// Cells in one hub process (docs/architecture.md, "Cells"), with real
// agents and one mosquitto per cell: devices spread over the cells' brokers;
// a drain in the middle of a campaign moves every device of a cell to the
// others by a director-signed desired state, and the campaign completes with
// every device applied exactly once; a forged move moves nobody.
#include <catch2/catch.hpp>

#include <signal.h>

#include <array>
#include <filesystem>
#include <map>
#include <memory>
#include <set>

#include "flotilla/bundles/director.hpp"
#include "flotilla/bundles/keys.hpp"
#include "flotilla/common/crypto.hpp"
#include "flotilla/common/fs.hpp"
#include "flotilla/common/sqlite.hpp"
#include "flotilla/v1/desired.pb.h"
#include "tests/support/harness.hpp"
#include "tests/support/sim_campaign.hpp"

using namespace flotilla;
using namespace flotilla::test;

namespace {

json cells(Hub& hub) {
  auto [status, body] = hub.call("GET", "/v1/cells");
  REQUIRE(status == 200);
  return body["items"];
}

}  // namespace

TEST_CASE("cell drain mid-campaign: every device moves and applies once and stays online and a forged move moves nobody",
          "[integration][cells][drain]") {
  constexpr int kAgents = 6;
  Fleet fleet(kAgents, {{"env", "it"}}, {"--cells", "3"});
  Hub& hub = fleet.hub;

  // Spread over the three brokers, two each (least loaded at enrollment).
  json list = cells(hub);
  REQUIRE(list.size() == 3);
  std::set<std::string> urls;
  for (const auto& c : list) {
    CHECK(c["devices_total"] == 2);
    CHECK(c["devices_online"] == 2);
    CHECK(c["broker"] == "up");
    CHECK(c["draining"] == false);
    urls.insert(c["broker_url"].get<std::string>());
  }
  CHECK(urls.size() == 3);
  std::map<std::string, int> cell_of;
  for (const auto& a : fleet.agents) {
    const int cell = hub.device(a->device_id())["cell"].get<int>();
    cell_of[a->device_id()] = cell;
    // Each agent connected to the broker its cell names.
    CHECK(a->log().find("broker=" + list[cell]["broker_url"].get<std::string>()) != std::string::npos);
  }
  auto table = hub.cli({"cell", "list"});
  CHECK(table.exit_code == 0);
  CHECK(table.out.find("CELL") != std::string::npos);
  CHECK(table.out.find(list[2]["broker_url"].get<std::string>()) != std::string::npos);

  // Bad input: a move to cell 2's broker, on the desired topic of an agent of
  // cell 0, from a client that may publish there (the hub's broker name) but
  // signed by another key than the director's. Refused, and nothing changed.
  std::string victim;
  const Agent* victim_agent = nullptr;
  for (const auto& a : fleet.agents) {
    if (cell_of[a->device_id()] == 0) {
      victim = a->device_id();
      victim_agent = a.get();
    }
  }
  REQUIRE(!victim.empty());
  const std::string creds_before =
      fs::read_file(victim_agent->root() / "var/lib/flotilla/credentials.pb", 1 << 16).value_or("");
  REQUIRE(!creds_before.empty());
  {
    v1::DesiredHeader h;
    h.set_device_id(victim);
    h.set_issued_unix_ms(SystemClock::instance().now_unix_ms());
    h.set_broker_url(list[2]["broker_url"].get<std::string>());
    const auto digest = crypto::sha256(std::string());
    h.set_manifest_sha256(std::string(digest.begin(), digest.end()));
    v1::DesiredState ds;
    ds.set_device_id(victim);
    *ds.mutable_header() = bundles::sign_desired_header(h, bundles::generate_key());
    // The broker keys sessions by user name, so the forger takes the hub's
    // session over and the hub takes it back as soon as it notices, which
    // may cut the forger off before its message is through (its client
    // then counts the message as done): forge again until the victim saw it.
    auto co = hub.broker_client("flotilla-hub", fleet.tmp.path() / "forger");
    co.client_id = "forger";
    co.url = list[0]["broker_url"].get<std::string>();
    bool seen = false;
    for (int attempt = 0; attempt < 15 && !seen; ++attempt) {
      auto t = transport::make_paho_transport();
      if (t->connect(co)) {
        (void)t->publish({transport::device_topic(victim, "desired"), ds.SerializeAsString(), 1, false});
        (void)t->flush(std::chrono::seconds(2));
      }
      t->disconnect();
      seen = wait_until([&] { return victim_agent->log().find("refused desired state") != std::string::npos; },
                        std::chrono::seconds(2));
    }
    REQUIRE(seen);
  }
  CHECK(victim_agent->log().find("moves this device") == std::string::npos);
  CHECK(hub.device(victim)["cell"] == 0);
  CHECK(fs::read_file(victim_agent->root() / "var/lib/flotilla/credentials.pb", 1 << 16).value_or("") == creds_before);

  // A slow campaign; cell 0 is drained while it runs.
  auto [status, body] = hub.call(
      "POST", "/v1/campaigns",
      json{{"bundle", fleet.push(make_bundle("edge-base", 1, {}, {&fleet.release}))},
           {"selector", "env=it"},
           {"strategy", json::parse(R"({"waves": [34, 67, 100], "soak": "2s", "max_in_flight": 2})")}}
          .dump());
  INFO(body.dump());
  REQUIRE(status == 201);
  const std::string campaign = body["id"].get<std::string>();
  REQUIRE(wait_until([&] { return hub.campaign(campaign)["counts"]["applied"].get<int>() >= 1; },
                     std::chrono::seconds(60)));
  REQUIRE(hub.campaign(campaign)["counts"]["applied"].get<int>() < kAgents);

  // Refused: not an admin; no such cell.
  const std::string operator_token = hub.api_token("operator", "*");
  CHECK(hub.call("POST", "/v1/cells/0/drain", "{}", "application/json", operator_token).first == 403);
  CHECK(hub.call("POST", "/v1/cells/9/drain", "{}").first == 404);

  auto drained = hub.cli({"cell", "drain", "0", "--timeout", "90s"});
  INFO(drained.out + drained.err);
  INFO(hub.log());
  REQUIRE(drained.exit_code == 0);
  CHECK(drained.err.find("remaining") != std::string::npos);

  json c;
  const bool done = wait_until(
      [&] {
        c = hub.campaign(campaign);
        return c["state"] != "running";
      },
      std::chrono::seconds(120));
  INFO(c.dump(2));
  REQUIRE(done);
  CHECK(c["state"] == "completed");
  CHECK(c["counts"]["total"] == kAgents);
  CHECK(c["counts"]["applied"] == kAgents);
  CHECK(c["counts"]["failed"] == 0);
  REQUIRE(fleet.wait_online(kAgents, std::chrono::seconds(60)));
  for (const auto& a : fleet.agents) {
    auto d = hub.device(a->device_id());
    CHECK(d["cell"] != 0);
    CHECK(d["online"] == true);
    // What it runs (its state after a reconnect is the idle report's).
    CHECK(d["applied_bundle"] == "edge-base");
    CHECK(d["applied_version"] == 1);
  }
  list = cells(hub);
  CHECK(list[0]["devices_total"] == 0);
  CHECK(list[0]["draining"] == true);
  CHECK(list[1]["devices_total"].get<int>() + list[2]["devices_total"].get<int>() == kAgents);
  const std::string m = metrics_text(hub);
  CHECK(metric(m, "flotilla_cell_devices_moved_total{cell=\"0\",direction=\"out\"}") == 2);
  CHECK(metric(m, "flotilla_cell_move_requests_total{cell=\"0\",kind=\"move\"}") >= 2);  // both asked, maybe again
  CHECK(metric(m, "flotilla_cell_move_requests_total{cell=\"0\",kind=\"withdrawal\"}") == 0);
  bool audited = false;
  for (const auto& a : hub.audit()) audited = audited || a["path"] == "/v1/cells/0/drain";
  CHECK(audited);
  // The agents that moved said so, and the victim of the forgery moved only now.
  CHECK(victim_agent->log().find("moves this device") != std::string::npos);

  // The drain stopped: only by an admin; then the cell is no longer
  // draining and its devices stay where they went.
  CHECK(hub.call("DELETE", "/v1/cells/0/drain", "", "application/json", operator_token).first == 403);
  auto undrained = hub.cli({"cell", "undrain", "0"});
  INFO(undrained.out + undrained.err);
  REQUIRE(undrained.exit_code == 0);
  CHECK(undrained.out.find("cell 0 is not draining: 0 devices in it, 2 moved out") != std::string::npos);
  list = cells(hub);
  CHECK(list[0]["draining"] == false);
  CHECK(list[0]["devices_total"] == 0);
  for (const auto& a : fleet.agents) CHECK(hub.device(a->device_id())["cell"] != 0);
  CHECK(hub.cli({"cell", "undrain", "x"}).exit_code == 2);
}

namespace {

// The devices whose rows a cell's own file holds, read while the hub runs
// (SQLite's WAL lets another connection read what is committed).
std::set<std::string> devices_in_file(const Hub& hub, int cell) {
  std::set<std::string> ids;
  auto db = sql::Db::open((hub.data_dir() / "cells" / std::to_string(cell) / "devices.db").string());
  REQUIRE(db);
  auto rows =
      sql::query<std::string>(**db, "SELECT id FROM devices", [](const sql::Stmt& st) { return st.col_text(0); });
  REQUIRE(rows);
  ids.insert(rows->begin(), rows->end());
  return ids;
}

}  // namespace

// ADR 18 slice 7 with real processes: each cell's device rows in a file of
// its own. The API, /metrics and `flotilla cell list` read them; a drain
// carries a device's rows from one file to the other; a restart without the
// flag opens the files anyway.
TEST_CASE("cell files: a campaign converges over two cells' files and a drain moves the rows between them",
          "[integration][cells][drain]") {
  constexpr int kAgents = 4;
  Fleet fleet(kAgents, {{"env", "it"}}, {"--cells", "2", "--cell-files", "true"});
  Hub& hub = fleet.hub;
  json list = cells(hub);
  REQUIRE(list.size() == 2);
  for (const auto& c : list) {
    CHECK(c["devices_total"] == 2);
    CHECK(c["devices_online"] == 2);
  }
  std::map<std::string, int> cell_of;
  for (const auto& a : fleet.agents) cell_of[a->device_id()] = hub.device(a->device_id())["cell"].get<int>();
  for (int cell = 0; cell < 2; ++cell) {
    std::set<std::string> expected;
    for (const auto& [id, c] : cell_of) {
      if (c == cell) expected.insert(id);
    }
    CHECK(devices_in_file(hub, cell) == expected);
  }

  json c = run_campaign(hub, fleet.push(make_bundle("edge-base", 1, {}, {&fleet.release})), "env=it");
  INFO(c.dump(2));
  REQUIRE(c["state"] == "completed");
  CHECK(c["counts"]["total"] == kAgents);
  CHECK(c["counts"]["applied"] == kAgents);
  // Each cell's share of the campaign, counted in its own file.
  REQUIRE(c["cells"].size() == 2);
  for (const auto& share : c["cells"]) {
    CHECK(share["total"] == 2);
    CHECK(share["applied"] == 2);
  }
  // Device pages, a device, and /metrics: what the agents reported, from the files.
  json page = hub.devices("env=it");
  REQUIRE(page.size() == static_cast<size_t>(kAgents));
  for (const auto& d : page) {
    CHECK(d["applied_bundle"] == "edge-base");
    CHECK(d["online"] == true);
  }
  std::string m = metrics_text(hub);
  CHECK(metric(m, "flotilla_devices_presence{presence=\"online\"}") == kAgents);
  auto table = hub.cli({"cell", "list"});
  CHECK(table.exit_code == 0);
  // hub.db keeps the directory, not what devices report.
  {
    auto db = sql::Db::open((hub.data_dir() / "hub.db").string());
    REQUIRE(db);
    auto rows = sql::query<int64_t>(**db, "SELECT COUNT(*) FROM campaign_devices",
                                    [](const sql::Stmt& st) { return st.col_int(0); });
    REQUIRE(rows);
    CHECK(rows->front() == 0);
  }

  // Draining cell 0 carries its devices' rows into cell 1's file.
  auto drained = hub.cli({"cell", "drain", "0", "--timeout", "90s"});
  INFO(drained.out + drained.err);
  INFO(hub.log());
  REQUIRE(drained.exit_code == 0);
  REQUIRE(fleet.wait_online(kAgents, std::chrono::seconds(60)));
  CHECK(devices_in_file(hub, 0).empty());
  CHECK(devices_in_file(hub, 1).size() == static_cast<size_t>(kAgents));
  for (const auto& a : fleet.agents) {
    auto d = hub.device(a->device_id());
    CHECK(d["cell"] == 1);
    CHECK(d["applied_bundle"] == "edge-base");
  }
  c = hub.campaign(c["id"].get<std::string>());
  CHECK(c["counts"]["applied"] == kAgents);
  list = cells(hub);
  CHECK(list[0]["devices_total"] == 0);
  CHECK(list[1]["devices_total"] == kAgents);

  // Restarted with the flag false: the rows are in the files, so it opens them.
  hub.stop();
  hub.start({"--cells", "2", "--cell-files", "false"});
  CHECK(hub.log().find("cells' files (cells/<n>/devices.db): opening them") != std::string::npos);
  REQUIRE(fleet.wait_online(kAgents, std::chrono::seconds(60)));
  for (const auto& a : fleet.agents) CHECK(hub.device(a->device_id())["applied_bundle"] == "edge-base");
  c = hub.campaign(c["id"].get<std::string>());
  CHECK(c["counts"]["applied"] == kAgents);
}

// The default (cell-files left unset): a new data directory gets the files;
// a hub.db that already holds devices keeps their rows until told to move
// them, since the move is one way.
TEST_CASE("cell files by default: a new data directory gets them, an existing hub.db with devices keeps its rows",
          "[integration][cells]") {
  constexpr int kAgents = 2;
  {
    TempDir tmp;
    Hub fresh(tmp.path() / "hub");
    fresh.start({});
    CHECK(std::filesystem::exists(fresh.data_dir() / "cells" / "0" / "devices.db"));
    fresh.stop();
  }
  Fleet fleet(kAgents, {{"env", "it"}}, {"--cell-files", "false"});
  Hub& hub = fleet.hub;
  REQUIRE_FALSE(std::filesystem::exists(hub.data_dir() / "cells"));
  hub.stop();
  hub.start({});
  INFO(hub.log());
  CHECK(hub.log().find("hub.db holds the rows of 2 devices: they stay there") != std::string::npos);
  CHECK_FALSE(std::filesystem::exists(hub.data_dir() / "cells"));
  REQUIRE(fleet.wait_online(kAgents, std::chrono::seconds(60)));
  for (const auto& a : fleet.agents) CHECK(hub.device(a->device_id())["online"] == true);

  // Asked for: the rows move, and the devices read the same from the file.
  hub.stop();
  hub.start({"--cell-files", "true"});
  CHECK(hub.log().find("device rows moved into 1 cells' files: 2 devices") != std::string::npos);
  REQUIRE(fleet.wait_online(kAgents, std::chrono::seconds(60)));
  std::set<std::string> ids;
  for (const auto& a : fleet.agents) {
    ids.insert(a->device_id());
    const json d = hub.device(a->device_id());
    CHECK(d["online"] == true);
    CHECK(d["last_seen_at"] != "");
  }
  CHECK(devices_in_file(hub, 0) == ids);
}

namespace {

pid_t cell_broker_pid(const Hub& hub, int cell) {
  const auto dir = cell == 0 ? hub.data_dir() / "broker" : hub.data_dir() / ("broker-cell" + std::to_string(cell));
  auto text = fs::read_file(dir / "mosquitto.pid", 64);
  return text ? static_cast<pid_t>(std::stol(*text)) : -1;
}

// A hub of four cells and one real agent (label sim-run=<label>) that
// trusts the simulator's bundles for `seed`, online.
struct FourCells {
  TempDir tmp;
  Hub hub{tmp.path() / "hub"};
  std::string label;
  uint64_t seed;
  std::unique_ptr<Agent> agent;
  int agent_cell = -1;
  FourCells(const std::string& prefix, uint64_t s) : label(prefix + crypto::random_token(4)), seed(s) {
    hub.start({"--cells", "4"});
    AgentOptions opts;
    opts.root_keys = {bundles::public_key_text(sim_release_key(seed).pub)};
    agent = std::make_unique<Agent>(tmp.path() / "agent", hub.url(), hub.enrollment_token({{"sim-run", label}}), opts);
    agent->start();
    REQUIRE(wait_agent_online(hub, *agent, std::chrono::seconds(60)));
    agent_cell = hub.device(agent->device_id())["cell"].get<int>();
  }
};

}  // namespace

TEST_CASE("four cells in one hub: devices spread over 4 mosquittos and one campaign converges and kill -9 of one cell's "
          "broker touches only that cell", "[integration][cells]") {
  FourCells f("c4", 31);
  Hub& hub = f.hub;
  Agent& agent = *f.agent;
  const int agent_cell = f.agent_cell;
  const std::string& label = f.label;

  // 240 simulated devices, each with its own session (direct mode), and the
  // agent, in one campaign slowed so that a broker dies while it runs.
  SimCampaign sim(hub, f.tmp.path(), label, f.seed,
             {"--devices", "240", "--mode", "direct", "--strategy",
              R"({"waves": [10, 40, 70, 100], "soak": "2s", "max_in_flight": 40})", "--timeout", "170s"});
  const std::string campaign_id = wait_sim_campaign(hub, label, 10, std::chrono::seconds(120));
  INFO(sim.log_tail());
  REQUIRE(!campaign_id.empty());
  REQUIRE(hub.campaign(campaign_id)["counts"]["applied"].get<int>() < 241);

  // Every broker has some of the devices, and all of them together.
  auto [status, body] = hub.call("GET", "/v1/cells");
  REQUIRE(status == 200);
  REQUIRE(body["items"].size() == 4);
  int total = 0;
  for (const auto& c : body["items"]) {
    CHECK(c["devices_total"].get<int>() > 0);
    total += c["devices_total"].get<int>();
  }
  CHECK(total == 241);

  // kill -9 of the agent's cell's broker: the hub restarts it; only that
  // cell's presence is reset and only its devices are called.
  const std::string before = metrics_text(hub);
  const pid_t first = cell_broker_pid(hub, agent_cell);
  REQUIRE(first > 0);
  REQUIRE(::kill(first, SIGKILL) == 0);
  REQUIRE(wait_until([&] { const pid_t p = cell_broker_pid(hub, agent_cell); return p > 0 && p != first && proc::alive(p); },
                     std::chrono::seconds(30)));
  auto exit_code = sim.wait_for(std::chrono::seconds(180));
  REQUIRE(exit_code);
  CHECK(*exit_code == 0);
  auto c = hub.campaign(campaign_id);
  INFO(c.dump());
  CHECK(c["state"] == "completed");
  CHECK(c["counts"]["total"] == 241);
  CHECK(c["counts"]["applied"] == 241);
  CHECK(c["counts"]["failed"] == 0);
  REQUIRE(wait_agent_online(hub, agent, std::chrono::seconds(60)));
  CHECK(hub.device(agent.device_id())["applied_bundle"] != "");
  const std::string after = metrics_text(hub);
  for (int cell = 0; cell < 4; ++cell) {
    const std::string l = "{cell=\"" + std::to_string(cell) + "\"}";
    INFO("cell " << cell);
    if (cell == agent_cell) {
      CHECK(metric(after, "flotilla_broker_restarts_total" + l) == 1);
      CHECK(metric(after, "flotilla_presence_resets_total" + l) > metric(before, "flotilla_presence_resets_total" + l));
      CHECK(metric(after, "flotilla_rollcalls_published_total" + l) >
            metric(before, "flotilla_rollcalls_published_total" + l));
    } else {
      CHECK(metric(after, "flotilla_broker_restarts_total" + l) == 0);
      CHECK(metric(after, "flotilla_presence_resets_total" + l) == metric(before, "flotilla_presence_resets_total" + l));
      CHECK(metric(after, "flotilla_rollcalls_published_total" + l) ==
            metric(before, "flotilla_rollcalls_published_total" + l));
    }
  }
}

// Issue 17: a 20,000-device gateway simulation used to stall for good when
// its broker was killed (the gateways never came back) while the hub kept
// every device online (a dead broker sends no last wills). Here gateways
// carrying thousands of devices and a real agent share 4 cells; one cell's
// broker dies mid-campaign: the hub marks that cell's devices offline as soon
// as it loses the session, restarts the broker, and calls the roll; the
// gateways and the agent come back by themselves, the campaign completes with
// every device counted once, and no device of another cell changes presence.
TEST_CASE("four cells with gateways: kill -9 of one cell's broker mid-campaign marks only its devices offline until "
          "they re-announce and the campaign completes", "[integration][cells][presence]") {
  FourCells f("cg", 37);
  Hub& hub = f.hub;
  Agent& agent = *f.agent;
  const int killed = f.agent_cell;
  const std::string& label = f.label;
  constexpr int kSimDevices = 4000, kPerGateway = 500, kTotal = kSimDevices + 1;

  // 8 gateways of 500 devices each (least loaded at enrollment: two per
  // cell), in a campaign slowed by waves and soak so the broker dies in it.
  SimCampaign sim(hub, f.tmp.path(), label, f.seed,
             {"--devices", std::to_string(kSimDevices), "--mode", "gateway", "--devices-per-gateway",
              std::to_string(kPerGateway), "--enroll-threads", "8", "--strategy",
              R"({"waves": [10, 40, 70, 100], "soak": "2s"})", "--timeout", "150s"});
  const std::string campaign_id = wait_sim_campaign(hub, label, kTotal / 10, std::chrono::seconds(90));
  INFO(sim.log_tail());
  REQUIRE(!campaign_id.empty());

  // Before: every device of every cell online, each cell with some.
  std::array<int, 4> total{};
  {
    json list = cells(hub);
    REQUIRE(list.size() == 4);
    int sum = 0;
    for (int i = 0; i < 4; ++i) {
      total[i] = list[i]["devices_total"].get<int>();
      CHECK(total[i] > 0);
      CHECK(list[i]["devices_online"] == total[i]);
      sum += total[i];
    }
    // The devices plus the 8 gateways themselves.
    CHECK(sum == kTotal + kSimDevices / kPerGateway);
  }
  REQUIRE(hub.campaign(campaign_id)["counts"]["applied"].get<int>() < kTotal);

  const std::string before = metrics_text(hub);
  const pid_t first = cell_broker_pid(hub, killed);
  REQUIRE(first > 0);
  REQUIRE(::kill(first, SIGKILL) == 0);
  // Watch presence per cell until the killed cell was reset and is whole
  // again: the other cells never lose a device meanwhile.
  const std::string reset_metric = "flotilla_presence_reset_devices_total{cell=\"" + std::to_string(killed) + "\"}";
  const double reset_before = metric(before, reset_metric);
  std::array<int, 4> lowest = total;
  const bool back = wait_until(
      [&] {
        json list = cells(hub);
        for (int i = 0; i < 4; ++i) lowest[i] = std::min(lowest[i], list[i]["devices_online"].get<int>());
        return metric(metrics_text(hub), reset_metric) > reset_before &&
               list[killed]["devices_online"] == total[killed] && list[killed]["broker"] == "up";
      },
      std::chrono::seconds(60));
  INFO(hub.log());
  REQUIRE(back);
  const pid_t second = cell_broker_pid(hub, killed);
  CHECK(second != first);
  for (int i = 0; i < 4; ++i) {
    INFO("cell " << i << " lowest online " << lowest[i] << " of " << total[i]);
    if (i != killed) CHECK(lowest[i] == total[i]);
  }
  // Every device of the killed cell was marked offline once its session was
  // lost, as the hub said; no device of another cell was.
  const std::string after = metrics_text(hub);
  for (int i = 0; i < 4; ++i) {
    const std::string l = "{cell=\"" + std::to_string(i) + "\"}";
    const double reset =
        metric(after, "flotilla_presence_reset_devices_total" + l) - metric(before, "flotilla_presence_reset_devices_total" + l);
    INFO("cell " << i);
    CHECK(reset == static_cast<double>(i == killed ? total[i] : 0));
    CHECK(metric(after, "flotilla_broker_restarts_total" + l) == (i == killed ? 1 : 0));
  }
  CHECK(hub.log().find("lost the broker session cell=" + std::to_string(killed) + ": " +
                       std::to_string(total[killed]) + " devices marked offline") != std::string::npos);

  auto exit_code = sim.wait_for(std::chrono::seconds(150));
  REQUIRE(exit_code);
  CHECK(*exit_code == 0);
  auto c = hub.campaign(campaign_id);
  INFO(c.dump());
  CHECK(c["state"] == "completed");
  CHECK(c["counts"]["total"] == kTotal);
  CHECK(c["counts"]["applied"] == kTotal);
  CHECK(c["counts"]["failed"] == 0);
  auto d = hub.device(agent.device_id());
  CHECK(d["online"] == true);
  CHECK(d["applied_bundle"] != "");
  // Only the killed cell's gateways reconnected (its total is the agent and
  // each gateway with its devices).
  CHECK(sim.report()["figures"]["reconnects"] == (total[killed] - 1) / (kPerGateway + 1));
}
