// [integration] Several hub processes sharing cells by leases (issue 17;
// docs/operations.md, "Several hub processes"): a real 3-member etcd on
// loopback, three flotilla-hub processes and three mosquittos that run on
// their own (one per cell, configured as the hub configures its own), and
// simulated gateways. The hubs balance the cells (one each); kill -9 of one
// hub in the middle of a campaign → another takes its cell over within the
// lease TTL, asks the cell's devices to re-report, rebuilds their rows, and
// the campaign completes with every device counted exactly once; one etcd
// member stopped meanwhile changes nothing.
#include <catch2/catch.hpp>

#include <array>
#include <filesystem>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "flotilla/bundles/keys.hpp"
#include "flotilla/common/clock.hpp"
#include "flotilla/hub/broker.hpp"
#include "flotilla/hub/declarative.hpp"
#include "flotilla/hub/device_ca.hpp"
#include "flotilla/hub/store.hpp"
#include "tests/support/etcd_cluster.hpp"
#include "tests/support/harness.hpp"
#include "tests/support/shared_cells.hpp"
#include "tests/support/sim_campaign.hpp"

using namespace flotilla;
using namespace flotilla::test;

namespace {

constexpr int kCells = 3;

std::array<int, kCells> owners(const std::vector<Hub*>& hubs) { return SharedCells::owners<kCells>(hubs); }

bool balanced(const std::array<int, kCells>& owner) {
  std::array<int, kCells> per_hub{};
  for (int o : owner) {
    if (o < 0) return false;
    ++per_hub[static_cast<size_t>(o)];
  }
  for (int n : per_hub) {
    if (n != 1) return false;
  }
  return true;
}

// The last part of each hub's log, for a failure's message.
std::string log_tails(const std::vector<Hub*>& hubs) {
  std::string out;
  const char* names[] = {"A", "B", "C"};
  for (size_t h = 0; h < hubs.size(); ++h) {
    if (!hubs[h]) continue;
    const std::string log = hubs[h]->log();
    out += std::string("\n--- hub ") + names[h % 3] + " log (tail) ---\n" +
           log.substr(log.size() > 12000 ? log.size() - 12000 : 0);
  }
  return out;
}

int leader_of(const std::vector<Hub*>& hubs) {
  for (size_t h = 0; h < hubs.size(); ++h) {
    if (hubs[h] && metric(metrics_text(*hubs[h]), "flotilla_campaign_leader") == 1) return static_cast<int>(h);
  }
  return -1;
}

}  // namespace

TEST_CASE("three hub processes share three cells by leases: kill -9 of one mid-campaign, its cell is taken over and "
          "the campaign completes with exact counts, one etcd member down changes nothing",
          "[integration][etcd][multihub]") {
  REQUIRE(EtcdCluster::available());
  TempDir tmp("multihub");
  // One etcd of three members, one broker per cell started and supervised
  // by the test, one device CA and director key for every hub.
  // Each hub's device rows in hub.db, then in a file per cell.
  const bool cell_files = GENERATE(false, true);
  INFO("cell files: " << cell_files);
  SharedCells site(tmp.path(), kCells, 3, cell_files);
  EtcdCluster& cluster = site.cluster;
  const std::vector<std::string>& args = site.hub_args;
  auto& brokers = site.brokers;

  Hub a(tmp.path() / "hub-a"), b(tmp.path() / "hub-b"), c(tmp.path() / "hub-c");
  a.start(args);
  b.start(args);
  c.start(args);
  const std::string admin = a.admin_token();  // the fleet's, in the control log
  for (Hub* h : {&b, &c}) REQUIRE(fs::write_file_atomic(h->data_dir() / "admin.token", admin + "\n", 0600));
  std::vector<Hub*> hubs = {&a, &b, &c};
  // One cell each once the later hubs are in (the first took all three).
  {
    const bool ok = wait_until([&] { return balanced(owners(hubs)); }, std::chrono::seconds(30));
    INFO(log_tails(hubs));
    REQUIRE(ok);
  }

  // Gateways of 250 devices, two per cell (least loaded at enrollment),
  // enrolled and run through hub A; waves with a soak so the kill lands in
  // the middle of the campaign.
  const std::string label = "mh" + crypto::random_token(4);
  constexpr int kDevices = 1500, kPerGateway = 250;
  SimCampaign sim(a, tmp.path(), label, 41,
             {"--devices", std::to_string(kDevices), "--mode", "gateway", "--devices-per-gateway",
              std::to_string(kPerGateway), "--enroll-threads", "4", "--strategy",
              R"({"waves": [10, 40, 70, 100], "soak": "2s"})", "--timeout", "120s"});
  std::string seen;
  const std::string campaign_id = wait_sim_campaign(a, label, kDevices / 10, std::chrono::seconds(90), &seen);
  {
    INFO("the campaign as hub A last answered: " << seen << "\n--- the simulator's log (tail) ---\n"
                                                 << sim.log_tail() << log_tails(hubs));
    REQUIRE(!campaign_id.empty());
  }
  REQUIRE(a.campaign(campaign_id)["counts"]["applied"].get<int>() < kDevices);

  // The victim: the leader if B or C leads (leadership moves too), else C.
  const auto before = owners(hubs);
  REQUIRE(balanced(before));
  const int lead = leader_of(hubs);
  const int victim = lead == 1 || lead == 2 ? lead : 2;
  int cell = -1;
  for (int i = 0; i < kCells; ++i) {
    if (before[static_cast<size_t>(i)] == victim) cell = i;
  }
  REQUIRE(cell >= 0);
  hubs[static_cast<size_t>(victim)]->kill9();
  hubs[static_cast<size_t>(victim)] = nullptr;
  // One etcd member down as well: nothing changes for the rest.
  cluster.stop_member(0);

  // Taken over by a surviving hub; the victim's lease (4 s) must run out
  // first, so this is a matter of seconds.
  int taker = -1;
  const bool taken = wait_until(
      [&] {
        auto now_owners = owners(hubs);
        taker = now_owners[static_cast<size_t>(cell)];
        return taker >= 0;
      },
      std::chrono::seconds(30));
  INFO(log_tails(hubs));
  REQUIRE(taken);
  CHECK(taker != victim);
  CHECK(wait_until([&] { return leader_of(hubs) >= 0; }, std::chrono::seconds(30)));
  const std::string taker_log = hubs[static_cast<size_t>(taker)]->log();
  CHECK(taker_log.find("took cell=" + std::to_string(cell)) != std::string::npos);

  auto exit_code = sim.wait_for(std::chrono::seconds(120));
  {
    INFO("--- the simulator's log (tail) ---\n" << sim.log_tail() << log_tails(hubs));
    REQUIRE(exit_code);
    CHECK(*exit_code == 0);
  }
  // Every device applied exactly once in the totals, answered the same by
  // every surviving hub (the REST API answers from any of them).
  for (Hub* h : hubs) {
    if (!h) continue;
    json view;
    REQUIRE(wait_until(
        [&] {
          auto [status, body] = h->call("GET", "/v1/campaigns/" + campaign_id, "", "application/json", admin);
          view = body;
          return status == 200 && body["state"] == "completed";
        },
        std::chrono::seconds(30)));
    INFO(view.dump() << log_tails(hubs));
    CHECK(view["counts"]["total"] == kDevices);
    CHECK(view["counts"]["applied"] == kDevices);
    CHECK(view["counts"]["failed"] == 0);
    int cells_total = 0, cells_applied = 0;
    for (const auto& per : view["cells"]) {
      cells_total += per["total"].get<int>();
      cells_applied += per["applied"].get<int>();
    }
    CHECK(cells_total == kDevices);
    CHECK(cells_applied == kDevices);
  }
  // The cell's devices re-reported to the hub that took it over (its roll
  // call): its rows of them say what they run, the campaign's bundle.
  Hub& t = *hubs[static_cast<size_t>(taker)];
  CHECK(metric(metrics_text(t), "flotilla_rollcalls_published_total{cell=\"" + std::to_string(cell) + "\"}") >= 1);
  auto devices = t.call("GET", "/v1/devices?limit=10000", "", "application/json", admin);
  REQUIRE(devices.first == 200);
  int in_cell = 0, rebuilt = 0;
  json sample;  // one device of the taken-over cell, as its owner describes it
  for (const auto& d : devices.second["items"]) {
    if (d["cell"] != cell || d["campaign_id"] != campaign_id) continue;  // the cell's members
    ++in_cell;
    if (d["applied_bundle"] != "" && d["generation"].get<int>() > 0) ++rebuilt;
    CHECK_FALSE(d.contains("stale"));  // its own cell: current
    if (sample.is_null()) sample = d;
  }
  REQUIRE_FALSE(sample.is_null());
  if (cell_files) {
    // The taker rebuilt the cell's rows in that cell's own file.
    auto file = hub::Store::open_reader((t.data_dir() / "cells" / std::to_string(cell) / "devices.db").string());
    REQUIRE(file);
    auto counts = (*file)->campaign_counts(campaign_id, cell);
    REQUIRE(counts);
    int64_t applied_in_file = 0;
    for (const auto& r : *counts) applied_in_file += r.status == "applied" ? r.count : 0;
    CHECK(applied_in_file == in_cell);
  }

  // The other survivor does not hold that cell: a read of one of its devices
  // is answered by the taker (what it runs, online), not from the other's
  // stale rows, and so is its device list (the taker's part of the page); a
  // read that was already forwarded once is answered locally, marked stale,
  // never forwarded again.
  size_t other = 0;
  while (other < hubs.size() && (!hubs[other] || static_cast<int>(other) == taker)) ++other;
  REQUIRE(other < hubs.size());
  Hub& o = *hubs[other];
  const std::string path = "/v1/devices/" + sample["id"].get<std::string>();
  auto [got_status, got] = o.call("GET", path, "", "application/json", admin);
  INFO("through the other hub: " << got_status << " " << got.dump());
  CHECK(got_status == 200);
  CHECK_FALSE(got.contains("stale"));
  CHECK(got["online"] == sample["online"]);
  CHECK(got["applied_bundle"] == sample["applied_bundle"]);
  CHECK(got["generation"] == sample["generation"]);
  std::map<std::string, json> taker_rows;
  for (const auto& d : devices.second["items"]) taker_rows[d["id"].get<std::string>()] = d;
  // Pages of 400 (the fleet is 1,500 devices and gateways): following
  // `next` through the other hub visits every device once, the taken cell's
  // as the taker has them.
  std::set<std::string> listed;
  int fresh = 0, pages = 0;
  std::string after;
  do {
    auto page = o.call("GET", "/v1/devices?limit=400" + (after.empty() ? "" : "&after=" + after), "",
                       "application/json", admin);
    REQUIRE(page.first == 200);
    for (const auto& d : page.second["items"]) {
      const std::string id = d["id"].get<std::string>();
      CHECK(listed.insert(id).second);
      if (d["cell"] != cell || d["campaign_id"] != campaign_id) continue;
      INFO(d.dump());
      CHECK_FALSE(d.contains("stale"));
      CHECK(d["applied_bundle"] == taker_rows[id]["applied_bundle"]);
      CHECK(d["generation"] == taker_rows[id]["generation"]);
      ++fresh;
    }
    after = page.second["next"].get<std::string>();
  } while (!after.empty() && ++pages < 50);
  CHECK(fresh == in_cell);
  CHECK(listed.size() == taker_rows.size());
  // A list that was already forwarded once is answered from this hub's
  // store alone: that cell's rows marked stale.
  http::Request once_list;
  once_list.url = o.url() + "/v1/devices?limit=10000";
  once_list.headers = {{"Authorization", "Bearer " + admin}, {"X-Flotilla-Forwarded", "1"}};
  once_list.max_response_bytes = 64u << 20;
  auto local_list = http::send(once_list);
  REQUIRE(local_list);
  REQUIRE(local_list->status == 200);
  const json local_page = json::parse(local_list->body);
  int marked = 0;
  for (const auto& d : local_page["items"]) {
    if (d["cell"] == cell && d.value("stale", false)) ++marked;
  }
  CHECK(marked >= in_cell);
  http::Request once;
  once.url = o.url() + path;
  once.headers = {{"Authorization", "Bearer " + admin}, {"X-Flotilla-Forwarded", "1"}};
  auto local = http::send(once);
  REQUIRE(local);
  CHECK(local->status == 200);
  const json local_view = json::parse(local->body, nullptr, false);
  CHECK(local_view.value("stale", false));
  int members = 0;
  auto [view_status, taker_view] = t.call("GET", "/v1/campaigns/" + campaign_id, "", "application/json", admin);
  INFO("the taker's campaign view: " << view_status << " " << taker_view.dump());
  REQUIRE(view_status == 200);
  for (const auto& per : taker_view["cells"]) {
    if (per["cell"] == cell) members = per["total"].get<int>();
  }
  CHECK(members > 0);
  CHECK(in_cell == members);  // every member's row followed the device here
  CHECK(rebuilt == in_cell);

  // A declared campaign of the same devices, made through the taker and
  // changed through the other survivor: each apply reports its devices over
  // every cell (the other hub's store holds only the rows of its own cells).
  {
    const json first = a.campaign(campaign_id);
    const auto decl = tmp.path() / "declared";
    std::filesystem::create_directories(decl);
    auto declare = [&](int per_minute) {
      const std::string doc = "apiVersion: flotilla.dev/v1\nkind: Campaign\nmetadata:\n  name: again\nspec:\n"
                              "  bundle: \"" + first["bundle"]["id"].get<std::string>() + "\"\n  selector: \"" +
                              first["selector"].get<std::string>() +
                              "\"\n  strategy: {waves: [100], rate: {max_per_minute: " + std::to_string(per_minute) +
                              "}}\n";
      REQUIRE(fs::write_file_atomic(decl / "again.yaml", doc, 0600));
    };
    const std::string all_devices = std::to_string(kDevices) + " devices:";
    declare(60);
    auto made = t.cli({"apply", "-f", decl.string()});
    INFO(made.out << made.err);
    REQUIRE(made.exit_code == 0);
    CHECK(made.out.find("created") != std::string::npos);
    CHECK(made.out.find(all_devices) != std::string::npos);
    const std::string again = hub::declared_campaign_id("default", "again", 1);
    CHECK(wait_until(
        [&] {
          auto [status, body] = o.call("GET", "/v1/campaigns/" + again, "", "application/json", admin);
          return status == 200 && body["counts"]["total"] == kDevices;
        },
        std::chrono::seconds(30)));
    declare(30);
    auto changed = o.cli({"apply", "-f", decl.string()});
    INFO(changed.out << changed.err << log_tails(hubs));
    REQUIRE(changed.exit_code == 0);
    CHECK(changed.out.find("configured") != std::string::npos);
    CHECK(changed.out.find(all_devices) != std::string::npos);
  }

  // Every etcd member stopped: control writes are refused with a 503 naming
  // etcd and nothing is written; reads keep answering from each hub's store;
  // once the leases go unconfirmed for a TTL no hub serves a cell (none can
  // prove it holds one), and the brokers keep running for the devices.
  const auto token_body = [](const std::string& name) {
    return json{{"name", name}, {"role", "viewer"}, {"project", "default"}}.dump();
  };
  const size_t tokens_before = t.call("GET", "/v1/tokens", "", "application/json", admin).second["items"].size();
  cluster.stop_all();
  auto refused = t.call("POST", "/v1/tokens", token_body("while-etcd-down"), "application/json", admin);
  INFO(refused.second.dump());
  CHECK(refused.first == 503);
  CHECK(refused.second.dump().find("etcd") != std::string::npos);
  CHECK(t.call("GET", path, "", "application/json", admin).first == 200);
  CHECK(wait_until([&] { return t.log().find("serving no cell until etcd answers") != std::string::npos; },
                   std::chrono::seconds(30)));
  for (auto& br : brokers) CHECK(br->running());

  // etcd back: the hubs hold every cell again between them, control writes
  // work, and the refused one left nothing behind.
  cluster.start_all();
  {
    const bool back = wait_until(
        [&] {
          for (int owner : owners(hubs)) {
            if (owner < 0) return false;
          }
          return true;
        },
        std::chrono::seconds(60));
    INFO(log_tails(hubs));
    CHECK(back);
  }
  json made;
  CHECK(wait_until(
      [&] {
        auto r = o.call("POST", "/v1/tokens", token_body("after-etcd"), "application/json", admin);
        made = r.second;
        return r.first == 201;
      },
      std::chrono::seconds(30)));
  INFO(made.dump());
  size_t tokens_after = 0;
  CHECK(wait_until(
      [&] {
        tokens_after = t.call("GET", "/v1/tokens", "", "application/json", admin).second["items"].size();
        return tokens_after == tokens_before + 1;  // on the other hub too, and only the one that was accepted
      },
      std::chrono::seconds(30)));
  CHECK(tokens_after == tokens_before + 1);

  for (Hub* h : hubs) {
    if (h) h->stop();
  }
  for (auto& br : brokers) br->stop();
}
