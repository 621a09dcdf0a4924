// [unit] Campaigns across cells (docs/architecture.md, "Campaigns across
// cells"): per-cell counts kept by the store's triggers, published to the
// coordinator under each cell's fence, and one leader deciding on the sum.
// Two hub services with separate cell owners share one SQLite coordinator
// and a fake clock.
#include <catch2/catch.hpp>

#include "tests/support/campaign_fleet.hpp"

#include <map>
#include <random>
#include <set>

#include "flotilla/hub/campaign_board.hpp"
#include "flotilla/hub/coord.hpp"

using namespace flotilla;
using namespace flotilla::hub;
using flotilla::test::Fleet;
using flotilla::test::RecordingTransport;
using nlohmann::json;

namespace {

std::unique_ptr<coord::Coordinator> open_coord(const flotilla::test::TempDir& dir, const Clock& clock) {
  auto c = coord::open_sqlite_coordinator({(dir.path() / "coord.db").string()}, clock);
  REQUIRE(c);
  return std::move(*c);
}

std::vector<CampaignCountRow> rows_of(int64_t applied, int64_t failed, int64_t pending = 0) {
  std::vector<CampaignCountRow> r;
  if (applied) r.push_back({0, "applied", true, applied});
  if (failed) r.push_back({0, "failed", true, failed});
  if (pending) r.push_back({0, "pending", true, pending});
  return r;
}

CellSummary total_of(CampaignBoard& b, const std::string& campaign) {
  auto cells = b.read(campaign);
  REQUIRE(cells);
  return summarize(sum_cell_counts(*cells));
}

void advance(FakeClock& clock, std::chrono::seconds s) { clock.advance(std::chrono::duration_cast<std::chrono::milliseconds>(s)); }

}  // namespace

TEST_CASE("cells' counts are summed once each, and a stale fence's counts are refused and not counted",
          "[unit][hub][campaign][cells]") {
  flotilla::test::TempDir dir;
  FakeClock clock;
  auto c = open_coord(dir, clock);
  coord::CellOwnership a(*c, "hub-a", std::chrono::seconds(10), clock), b(*c, "hub-b", std::chrono::seconds(10), clock);
  REQUIRE(a.start());
  REQUIRE(b.start());
  REQUIRE(a.claim("0"));
  REQUIRE(b.claim("1"));
  CampaignBoard board_a(*c, a, clock), board_b(*c, b, clock);

  // Counts from both cells are summed.
  CHECK(*board_a.publish("c-1", 0, rows_of(3, 1)));
  CHECK(*board_b.publish("c-1", 1, rows_of(2, 2, 4)));
  auto t = total_of(board_a, "c-1");
  CHECK(t.applied == 5);
  CHECK(t.failed == 3);
  CHECK(t.pending == 4);
  CHECK(t.total == 12);

  // The same counts again: nothing written; changed counts replace the
  // cell's (one key per cell, the latest wins), never add to them.
  auto before = c->get(campaign_cell_key("c-1", 1));
  REQUIRE(before);
  REQUIRE(*before);
  CHECK_FALSE(*board_b.publish("c-1", 1, rows_of(2, 2, 4)));
  CHECK((*c->get(campaign_cell_key("c-1", 1)))->mod_revision == (*before)->mod_revision);
  CHECK(*board_b.publish("c-1", 1, rows_of(6, 2)));
  t = total_of(board_a, "c-1");
  CHECK(t.applied == 9);
  CHECK(t.failed == 3);
  CHECK(t.total == 12);
  auto cells = board_a.read("c-1");
  REQUIRE(cells->size() == 2);
  CHECK((*cells)[1].revision == 2);
  CHECK((*cells)[1].holder == "hub-b");

  // hub-b stops renewing (paused, partitioned): its lease expires and hub-c
  // takes cell 1 over. hub-b still believes it owns the cell; its write is
  // refused by the coordinator and counts for nothing.
  advance(clock, std::chrono::seconds(11));
  auto renewed = a.renew();  // hub-a's lease ran out too: it starts again
  REQUIRE_FALSE(renewed);
  CHECK(renewed.error().code == Errc::refused);
  REQUIRE(a.start());
  REQUIRE(a.claim("0"));
  coord::CellOwnership cc(*c, "hub-c", std::chrono::seconds(10), clock);
  REQUIRE(cc.start());
  REQUIRE(cc.claim("1"));
  CampaignBoard board_c(*c, cc, clock);
  // hub-c republishes what the cell holds now (a takeover rebuilt its rows).
  CHECK(*board_c.publish("c-1", 1, rows_of(6, 2)));
  auto stale = board_b.publish("c-1", 1, rows_of(60, 20));
  REQUIRE_FALSE(stale);
  CHECK(stale.error().code == Errc::refused);
  CHECK_THAT(stale.error().message, Catch::Contains("stale fence"));
  t = total_of(board_a, "c-1");
  CHECK(t.applied == 9);
  CHECK(t.failed == 3);
  cells = board_a.read("c-1");
  REQUIRE(cells->size() == 2);
  CHECK((*cells)[1].holder == "hub-c");
  CHECK((*cells)[1].revision == 3);  // the cell's count revision goes on
  // A cell's owner writes only its own cells.
  auto other = board_c.publish("c-1", 0, rows_of(1, 0));
  REQUIRE_FALSE(other);
  CHECK(other.error().code == Errc::refused);
  CHECK(total_of(board_a, "c-1").total == 12);
}

TEST_CASE("a value under a campaign's cell key that is not a cell's counts is not counted", "[unit][hub][campaign][cells]") {
  flotilla::test::TempDir dir;
  FakeClock clock;
  auto c = open_coord(dir, clock);
  coord::CellOwnership a(*c, "hub-a", std::chrono::seconds(10), clock);
  REQUIRE(a.start());
  REQUIRE(a.claim("0"));
  CampaignBoard board(*c, a, clock);
  REQUIRE(*board.publish("c-1", 0, rows_of(3, 1)));
  // Garbage, a value naming another cell than its key, negative counts.
  REQUIRE(c->put(campaign_cell_key("c-1", 1), "not json"));
  CellCampaignCounts wrong{"c-1", 3, 1, 0, "x", rows_of(100, 0)};
  REQUIRE(c->put(campaign_cell_key("c-1", 2), wrong.encode()));
  REQUIRE(c->put(campaign_cell_key("c-1", 4), R"({"campaign":"c-1","cell":4,"revision":1,"updated_ms":0,"rows":[[0,"applied",1,-5]]})"));
  auto cells = board.read("c-1");
  REQUIRE(cells);
  REQUIRE(cells->size() == 1);
  CHECK(summarize(sum_cell_counts(*cells)).total == 4);
  CHECK_FALSE(CellCampaignCounts::decode(R"({"campaign":"c-1","cell":99,"revision":1,"updated_ms":0,"rows":[]})"));
}

TEST_CASE("count-based canaries take the lowest ranks over every cell", "[unit][hub][campaign][cells]") {
  // Each cell reports its lowest N ranks; the cut is the N-th lowest of all.
  std::vector<double> all;
  std::vector<std::vector<double>> per_cell(3);
  for (int i = 0; i < 300; ++i) {
    const double r = campaign_rank("c-x", "d-" + std::to_string(i));
    all.push_back(r);
    per_cell[static_cast<size_t>(i % 3)].push_back(r);
  }
  for (auto& cell : per_cell) {
    std::sort(cell.begin(), cell.end());
    cell.resize(5);
  }
  Strategy s;
  s.canary_count = 5;
  auto waves = assign_waves(s, all);
  const double cut = canary_cut(per_cell, 5);
  for (size_t i = 0; i < all.size(); ++i) CHECK((waves[i] == 0) == (all[i] <= cut));
  CHECK(canary_cut({{0.1, 0.2}}, 5) == 1.0);  // fewer members than the count: all of them
}

// A device that arrives from a cell another hub process held gets its rows
// by id (HubService::members_by_id, docs/adr/0019): they must be the rows
// the campaign's creation gave it, over every cell.
TEST_CASE("members by id are the rows the campaign's creation gave, a count-based canary included, and leave out "
          "devices it does not target",
          "[unit][hub][campaign][cells]") {
  Fleet f(2);
  f.enroll(40);
  f.enroll(3, {{"env", "lab"}});  // not matched by env=prod
  REQUIRE(f.hub->decommission_device(f.devices[0]));
  std::vector<std::string> asked = f.devices;
  asked.push_back("d-never-enrolled");
  for (const char* text : {R"({"canary": 3, "waves": [50, 100]})", R"({"canary": "10%", "waves": [30, 60, 100]})",
                           R"({"waves": [25, 100]})", R"({"canary": 60, "waves": [100]})"}) {
    INFO(text);
    const auto strategy = Strategy::from_json(json::parse(text));
    REQUIRE(strategy);
    const auto id = f.create(json::parse(text), f.bundle(1));
    auto c = f.store->get_campaign(id);
    REQUIRE(c);
    REQUIRE(*c);
    std::map<std::string, CampaignDeviceRecord> made;
    for (const auto& row : f.view(id).devices) made[row.device_id] = row;
    REQUIRE(made.size() == 39);  // 40 prod devices, one decommissioned
    // Asked twice: the second answer comes from the kept canary cutoff.
    for (int round = 0; round < 2; ++round) {
      auto by_id = f.hub->members_by_id(**c, asked);
      REQUIRE(by_id);
      CHECK(by_id->size() == made.size());
      int64_t canary = 0;
      for (const auto& m : *by_id) {
        INFO(m.device_id);
        REQUIRE(made.count(m.device_id));
        CHECK(m.wave == made[m.device_id].wave);
        CHECK(m.rank == made[m.device_id].rank);
        CHECK(m.zone == made[m.device_id].zone);
        canary += m.wave == 0 ? 1 : 0;
      }
      if (strategy->canary_count > 0) CHECK(canary == std::min<int64_t>(strategy->canary_count, 39));
    }
  }
}

TEST_CASE("campaign counts per cell stay exact through reports, presence and drains", "[unit][hub][campaign][cells]") {
  Fleet f(3);
  f.enroll(30);
  std::mt19937 rng(11);
  const auto id = f.create(json::parse(R"({"waves": [30, 100], "device_deadline": "1m"})"), f.bundle(1));
  auto require_exact = [&] {
    int64_t sum = 0;
    for (int cell = 0; cell < 3; ++cell) {
      auto kept = f.store->campaign_counts(id, cell);
      auto counted = f.store->recount_campaign(id, cell);
      REQUIRE(kept);
      REQUIRE(counted);
      CHECK(*kept == *counted);
      for (const auto& r : *kept) sum += r.count;
    }
    CHECK(*f.store->campaign_counts(id) == *f.store->recount_campaign(id));
    CHECK(sum == 30);  // every device in exactly one cell
  };
  require_exact();
  std::set<int> seen;
  for (const auto& d : f.devices) seen.insert(f.cell_of(d));
  CHECK(seen.size() == 3);  // spread over the cells
  // Creation put each row in its device's cell.
  for (const auto& row : f.view(id).devices) CHECK(row.cell == f.cell_of(row.device_id));
  for (int round = 0; round < 30; ++round) {
    f.hub->tick();
    require_exact();
    for (const auto& d : f.devices) {
      const auto kind = static_cast<unsigned>(rng() % 8);
      if (f.random_event(d, kind, rng) || kind != 3) continue;
      // A drain moves the device to another cell; its campaign rows follow
      // through the directory's outbox, as HubService follows it.
      REQUIRE(f.store->set_device_cell(d, static_cast<int>(rng() % 3)));
    }
    REQUIRE(follow_directory_outbox(*f.store, [&](int) -> DeviceStore& { return *f.store; }));
    require_exact();
    if (round == 10) f.clock.advance(std::chrono::minutes(2));
  }
  // The rows carry their device's cell.
  for (const auto& row : f.view(id).devices) CHECK(row.cell == f.cell_of(row.device_id));
  // And the view shows each cell's share.
  auto v = f.view(id);
  int64_t total = 0;
  for (const auto& cell : v.cells) total += summarize(cell.rows).total;
  CHECK(total == 30);
}

namespace {

// A second hub process over the same device store, owning other cells of
// the same coordinator (the control data is shared: the `control` work
// replicates it between stores; here both read one).
struct Peer {
  RecordingTransport t0, t1;
  std::unique_ptr<HubService> hub;
  Peer(Fleet& f, coord::Coordinator& c, const std::string& holder, std::vector<int> claim) {
    ServiceConfig cfg;
    cfg.broker_url = "tcp://127.0.0.1:1";
    cfg.cell_broker_urls = {"tcp://127.0.0.1:1", "tcp://127.0.0.1:2"};
    cfg.public_url = "http://hub.test";
    cfg.engine_thread = false;
    cfg.coordinator = &c;
    cfg.coord_holder = holder;
    cfg.claim_cells = std::move(claim);
    hub = std::make_unique<HubService>(*f.store, f.clock, cfg);
    REQUIRE(hub->attach_transport(0, t0));
    REQUIRE(hub->attach_transport(1, t1));
  }
};

// The generations each device was sent by any of the transports.
std::map<std::string, std::set<uint64_t>> generations(const std::vector<const RecordingTransport*>& ts) {
  std::map<std::string, std::set<uint64_t>> out;
  for (const auto* t : ts) {
    for (const auto& m : t->published()) {
      v1::DesiredState ds;
      if (ds.ParseFromString(m.payload) && ds.generation() > 0) out[ds.device_id()].insert(ds.generation());
    }
  }
  return out;
}

}  // namespace

TEST_CASE("the leader decides on the sum of the cells' published counts, and a new leader carries on from the stored state",
          "[unit][hub][campaign][cells]") {
  // Declared first, so it outlives both hubs (they resign on it when they stop).
  flotilla::test::TempDir coord_dir;
  std::unique_ptr<coord::Coordinator> coordinator;
  Fleet f(2);
  coordinator = open_coord(coord_dir, f.clock);
  // hub-a: cell 0 and the leadership (it starts first); hub-b: cell 1.
  f.tune = [&](ServiceConfig& cfg) {
    cfg.coordinator = coordinator.get();
    cfg.coord_holder = "hub-a";
    cfg.claim_cells = {0};
  };
  f.restart();
  Peer b(f, *coordinator, "hub-b", {});  // claims what is free: cell 1
  CHECK(f.hub->owned_cells() == std::vector<int>{0});
  CHECK(b.hub->owned_cells() == std::vector<int>{1});
  CHECK(f.hub->campaign_leader());
  CHECK_FALSE(b.hub->campaign_leader());

  f.enroll(16);
  std::map<int, std::vector<std::string>> by_cell;
  for (const auto& d : f.devices) by_cell[f.cell_of(d)].push_back(d);
  REQUIRE(by_cell[0].size() == 8);
  REQUIRE(by_cell[1].size() == 8);
  auto hub_of = [&](const std::string& d) { return f.cell_of(d) == 0 ? f.hub.get() : b.hub.get(); };
  auto desired_for = [&](const std::string& d) -> std::optional<v1::DesiredState> {
    std::optional<v1::DesiredState> last;
    for (const auto* t : {&f.broker, &b.t0, &b.t1}) {
      for (const auto& m : t->published()) {
        v1::DesiredState ds;
        if (ds.ParseFromString(m.payload) && ds.device_id() == d) last = ds;
      }
    }
    return last;
  };
  std::map<std::string, uint64_t> seq;
  auto report = [&](const std::string& d, v1::AgentState state) {
    auto ds = desired_for(d);
    REQUIRE(ds);
    v1::Report r;
    r.set_device_id(d);
    r.set_seq(++seq[d] + 5000);
    r.set_state(state);
    r.set_generation(ds->generation());
    r.set_campaign_id(ds->campaign_id());
    HubService* h = hub_of(d);
    h->on_message(f.cell_of(d), {transport::device_topic(d, "report"), r.SerializeAsString(), 1, false});
    h->drain();
  };
  auto released = [&](const RecordingTransport& t) {
    std::set<std::string> out;
    for (const auto& m : t.published()) {
      v1::DesiredState ds;
      if (ds.ParseFromString(m.payload) && ds.generation() > 0) out.insert(ds.device_id());
    }
    return out;
  };

  SECTION("the leader judges nothing while a cell with members has published no counts") {
    // Cell 1's owner has not ticked yet: its 8 devices are in no count the
    // leader has. Judged on cell 0 alone the campaign would be complete.
    const auto id = f.create(json::parse(R"({"waves": [100]})"), f.bundle(1));
    f.hub->tick();
    for (const auto& d : by_cell[0]) report(d, v1::AGENT_STATE_APPLIED);
    f.hub->tick();
    f.hub->tick();
    CHECK(f.view(id).campaign.state == "running");
    // Cell 1 is released and heard from; its devices apply: now it completes.
    b.hub->tick();
    for (const auto& d : by_cell[1]) report(d, v1::AGENT_STATE_APPLIED);
    b.hub->tick();
    f.hub->tick();
    auto v = f.view(id);
    CHECK(v.campaign.state == "completed");
    CHECK(v.counts.applied == 16);
  }

  SECTION("a threshold crossed only in the total pauses the campaign") {
    // At most 5 outcomes in one cell, 6 needed: no cell alone can trip it.
    const auto id = f.create(
        json::parse(R"({"failure_threshold": {"percent": 50, "min_sample": 6, "action": "pause"}})"), f.bundle(1));
    f.hub->tick();
    b.hub->tick();
    // Each hub released the devices of its own cell, and only those.
    CHECK(released(f.broker) == std::set<std::string>(by_cell[0].begin(), by_cell[0].end()));
    CHECK(released(b.t1) == std::set<std::string>(by_cell[1].begin(), by_cell[1].end()));
    CHECK(released(b.t0).empty());
    // Cell 0: 2 failed of 3; cell 1: 2 failed of 3.
    for (int i = 0; i < 3; ++i) report(by_cell[0][i], i < 2 ? v1::AGENT_STATE_FAILED : v1::AGENT_STATE_APPLIED);
    for (int i = 0; i < 3; ++i) report(by_cell[1][i], i < 2 ? v1::AGENT_STATE_FAILED : v1::AGENT_STATE_APPLIED);
    // The leader has not seen cell 1's outcomes yet (hub-b has not published):
    // 3 outcomes of its own are under the sample.
    f.hub->tick();
    CHECK(f.view(id).campaign.state == "running");
    // A non-leader never decides, whatever it sees.
    b.hub->tick();
    CHECK(f.view(id).campaign.state == "running");
    // hub-b published cell 1's counts in that tick: the leader's sum trips it.
    f.hub->tick();
    auto v = f.view(id);
    CHECK(v.campaign.state == "paused");
    CHECK_THAT(v.campaign.state_reason, Catch::Contains("4 of 6"));
    // Both cells, as the API shows them.
    REQUIRE(v.cells.size() == 2);
    CHECK(summarize(v.cells[0].rows).failed == 2);
    CHECK(summarize(v.cells[1].rows).failed == 2);
    CHECK(v.cells[1].holder == "hub-b");
  }

  SECTION("an abort on either hub skips the waiting devices of every hub's cells and releases nobody after it") {
    const auto id = f.create(json::parse(R"({"waves": [50, 100]})"), f.bundle(1));
    f.hub->tick();
    b.hub->tick();
    const auto wave0 = generations({&f.broker, &b.t0, &b.t1});
    REQUIRE(!wave0.empty());
    REQUIRE(wave0.size() < 16);
    std::map<int, int64_t> waiting_in;  // wave 1's devices, by cell
    for (const auto& d : f.devices) {
      if (!wave0.count(d)) ++waiting_in[f.cell_of(d)];
    }
    REQUIRE(waiting_in[0] > 0);
    REQUIRE(waiting_in[1] > 0);
    // An operator's abort reaches hub-b, which owns cell 1 only and does not
    // lead: hub-a's cell 0 is not its to write.
    auto aborted = b.hub->campaign_action(id, "abort");
    REQUIRE(aborted);
    CHECK(aborted->state == CampaignState::aborted);
    // hub-a's next tick skips cell 0's waiting rows; the counts both
    // publish say so.
    f.hub->tick();
    b.hub->tick();
    f.hub->tick();
    auto v = f.view(id);
    CHECK(v.campaign.state == "aborted");
    CHECK(v.counts.waiting == 0);
    CHECK(v.counts.skipped == waiting_in[0] + waiting_in[1]);
    REQUIRE(v.cells.size() == 2);
    for (const auto& cell : v.cells) {
      for (const auto& row : cell.rows) CHECK(row.status != "waiting");
    }
    // Nobody got a desired state after the abort, on either hub.
    for (int i = 0; i < 3; ++i) {
      f.hub->tick();
      b.hub->tick();
    }
    CHECK(generations({&f.broker, &b.t0, &b.t1}) == wave0);
  }

  SECTION("when the leader's lease expires another hub leads and continues without re-releasing or double-counting") {
    const auto id = f.create(json::parse(R"({"waves": [50, 100]})"), f.bundle(1));
    f.hub->tick();
    b.hub->tick();
    const auto wave0 = generations({&f.broker, &b.t0, &b.t1});
    REQUIRE(!wave0.empty());
    for (const auto& [d, gens] : wave0) report(d, v1::AGENT_STATE_APPLIED);
    // hub-a is gone (killed: it neither renews nor resigns). hub-b goes on
    // ticking; once hub-a's leases expire it takes cell 0 and the leadership.
    for (int i = 0; i < 4; ++i) {
      advance(f.clock, std::chrono::seconds(4));
      b.hub->tick();
    }
    CHECK(b.hub->campaign_leader());
    CHECK(b.hub->owned_cells() == std::vector<int>({0, 1}));
    // It carries on from the stored state: wave 0 is done, wave 1 goes out.
    b.hub->tick();
    auto v = f.view(id);
    CHECK(v.campaign.current_wave == 1);
    CHECK(v.counts.total == 16);
    CHECK(v.counts.applied == static_cast<int64_t>(wave0.size()));
    // Nobody of wave 0 got a second release.
    auto now = generations({&f.broker, &b.t0, &b.t1});
    for (const auto& [d, gens] : wave0) CHECK(now[d] == gens);
    for (const auto& [d, gens] : now) {
      CHECK(gens.size() == 1);
      if (!wave0.count(d)) report(d, v1::AGENT_STATE_APPLIED);
    }
    b.hub->tick();
    v = f.view(id);
    CHECK(v.campaign.state == "completed");
    CHECK(v.counts.applied == 16);
    CHECK(v.counts.total == 16);
    // The totals the new leader decided on are the cells' published ones.
    coord::CellOwnership reader(*coordinator, "reader", std::chrono::seconds(10), f.clock);
    auto cells = CampaignBoard(*coordinator, reader, f.clock).read(id);
    REQUIRE(cells);
    CHECK(summarize(sum_cell_counts(*cells)).applied == 16);
  }
}
