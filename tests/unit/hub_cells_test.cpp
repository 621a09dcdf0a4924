// Cells in one hub process (docs/architecture.md, "Cells"): devices spread
// over cells at enrollment and told their cell's broker; a cell's broker
// session resets only its own devices' presence; desired states go out on
// the device's cell; a drain moves devices by a signed header and only a
// device's arrival on its new broker changes its cell.
#include <catch2/catch.hpp>

#include <filesystem>

#include "flotilla/bundles/director.hpp"
#include "flotilla/common/sqlite.hpp"
#include "flotilla/hub/aggregates.hpp"
#include "tests/support/campaign_fleet.hpp"

namespace flotilla::test {
namespace {

struct Cells {
  TempDir dir;
  FakeClock clock;
  std::unique_ptr<Store> store;
  std::unique_ptr<HubService> hub;
  std::vector<std::unique_ptr<RecordingTransport>> brokers;
  bundles::KeyPair director = bundles::generate_key();
  std::string token;
  ServiceConfig cfg;
  // With cell_files: each cell's device rows in cells/<n>/devices.db (ADR 18).
  std::vector<std::unique_ptr<Store>> files;
  explicit Cells(int64_t move_chunk = HubService::kMoveChunk, bool cell_files = false) {
    auto s = Store::open((dir.path() / "hub.db").string());
    REQUIRE(s);
    store = std::move(*s);
    if (cell_files) open_cell_files();
    cfg.broker_url = "ssl://cell0.test:8883";
    cfg.cell_broker_urls = {"ssl://cell0.test:8883", "ssl://cell1.test:8884", "ssl://cell2.test:8885"};
    cfg.public_url = "http://hub.test";
    cfg.engine_thread = false;
    cfg.director_key = director;
    cfg.move_chunk = move_chunk;
    hub = std::make_unique<HubService>(*store, clock, cfg);
    for (int i = 0; i < 3; ++i) {
      brokers.push_back(std::make_unique<RecordingTransport>());
      REQUIRE(hub->attach_transport(i, *brokers.back()));
    }
    TokenRecord t;
    t.role = "enroll";
    t.labels = {{"env", "prod"}};
    auto tok = hub->create_token("enroll", t);
    REQUIRE(tok);
    token = tok->secret;
  }
  // Each cell's rows in cells/<n>/devices.db from the next start (ADR 18).
  void open_cell_files() {
    for (int i = 0; i < 3; ++i) {
      files.push_back(open_cell_file(dir.path(), i));
      cfg.cell_files.push_back(files.back().get());
    }
  }
  v1::EnrollResponse enroll() {
    auto k = bundles::generate_key();
    v1::EnrollRequest req;
    req.set_enrollment_token(token);
    req.set_device_public_key(std::string(k.pub.key.begin(), k.pub.key.end()));
    auto proof = bundles::sign_detached(k, bundles::enroll_proof_message(token, k.pub.key));
    req.set_proof(std::string(proof.begin(), proof.end()));
    auto r = hub->enroll(req);
    REQUIRE(r);
    return *r;
  }
  // The hub process stops and starts again on the same store; the brokers
  // (and what they kept) stay.
  void restart() {
    hub.reset();
    hub = std::make_unique<HubService>(*store, clock, cfg);
    for (int i = 0; i < 3; ++i) REQUIRE(hub->attach_transport(i, *brokers[static_cast<size_t>(i)]));
  }
  int cell_of(const std::string& id) {
    auto d = store->get_device(id);
    REQUIRE(d);
    REQUIRE(*d);
    return (*d)->cell;
  }
  bool online(const std::string& id) { return hub->get_device(id).value()->online; }
  Store& file(int cell) { return *files[static_cast<size_t>(cell)]; }
  void presence(int cell, const std::string& id, bool up) {
    v1::Presence p;
    p.set_online(up);
    hub->on_message(cell, {transport::device_topic(id, "presence"), p.SerializeAsString(), 1, false});
    hub->drain();
  }
  // n devices enrolled and online on their cells' brokers.
  std::vector<std::string> enroll_online(int n) {
    std::vector<std::string> ids;
    for (int i = 0; i < n; ++i) {
      ids.push_back(enroll().device_id());
      presence(cell_of(ids.back()), ids.back(), true);
    }
    return ids;
  }
  // A campaign of one signed bundle to every device in one wave, and the
  // engine tick that sends its desired states.
  std::string campaign_to_all() {
    auto key = bundles::generate_key();
    v1::BundleManifest m;
    m.set_format_version(1);
    m.set_name("edge-base");
    m.set_channel("stable");
    m.set_version(1);
    m.set_expires_unix(clock.now_unix() + 86400);
    auto env = bundles::wrap(m);
    REQUIRE(bundles::sign(env, key));
    auto up = hub->upload_bundle(bundles::serialize_envelope(env));
    REQUIRE(up);
    auto strategy = hub::Strategy::from_json(json::parse(R"({"waves": [100]})"));
    REQUIRE(strategy);
    auto created = hub->create_campaign("", up->first.id, "env=prod", *strategy, "*");
    REQUIRE(created);
    hub->tick();
    return created->id;
  }
  // A device reports that it applied the last desired state its cell sent.
  void applied(const std::string& id) {
    const int cell = cell_of(id);
    auto sent = desired(cell, id);
    REQUIRE_FALSE(sent.empty());
    v1::Report r;
    r.set_device_id(id);
    r.set_seq(++seq);
    r.set_state(v1::AGENT_STATE_APPLIED);
    r.set_generation(sent.back().generation());
    r.set_campaign_id(sent.back().campaign_id());
    hub->on_message(cell, {transport::device_topic(id, "report"), r.SerializeAsString(), 1, false});
    hub->drain();
  }
  uint64_t seq = 1000;
  // The devices enrolled so far in one cell.
  std::vector<std::string> in_cell(const std::vector<std::string>& ids, int cell) {
    std::vector<std::string> out;
    for (const auto& id : ids) if (cell_of(id) == cell) out.push_back(id);
    return out;
  }
  // The desired states published on one cell's broker for a device.
  std::vector<v1::DesiredState> desired(int cell, const std::string& id) {
    std::vector<v1::DesiredState> out;
    for (const auto& m : brokers[static_cast<size_t>(cell)]->published()) {
      v1::DesiredState ds;
      if (m.topic == transport::device_topic(id, "desired") && !m.payload.empty() && ds.ParseFromString(m.payload)) {
        out.push_back(ds);
      }
    }
    return out;
  }
};

}  // namespace

TEST_CASE("devices are spread over cells at enrollment and told their cell's broker", "[unit][hub][cells]") {
  Cells c;
  std::map<int, int> per_cell;
  for (int i = 0; i < 9; ++i) {
    auto r = c.enroll();
    const int cell = c.cell_of(r.device_id());
    ++per_cell[cell];
    CHECK(r.broker_url() == "ssl://cell" + std::to_string(cell) + ".test:" + std::to_string(8883 + cell));
  }
  CHECK(per_cell == std::map<int, int>{{0, 3}, {1, 3}, {2, 3}});
  auto cells = c.hub->list_cells();
  REQUIRE(cells);
  REQUIRE(cells->size() == 3);
  for (const auto& v : *cells) {
    CHECK(v.devices_total == 3);
    CHECK(v.broker_state == "external");  // no embedded broker in this test
  }
  // Counts are per project: another project sees none of these.
  auto other = c.hub->list_cells("other");
  REQUIRE(other);
  for (const auto& v : *other) CHECK(v.devices_total == 0);
  // A draining cell takes no new device.
  REQUIRE(c.hub->drain_cell_devices(1));
  for (int i = 0; i < 4; ++i) CHECK(c.cell_of(c.enroll().device_id()) != 1);
}

TEST_CASE("a device's directory entry holds who it is and where it lives, and no report changes it",
          "[unit][hub][cells]") {
  Cells c;
  const std::vector<std::string> ids = c.enroll_online(3);
  const std::string& id = ids[1];
  auto full = c.store->get_device(id);
  REQUIRE(full);
  REQUIRE(*full);
  auto e = c.store->directory_entry(id);
  REQUIRE(e);
  REQUIRE(*e);
  CHECK((*e)->id == id);
  CHECK((*e)->project == (*full)->project);
  CHECK((*e)->labels == bundles::Labels{{"env", "prod"}});
  CHECK((*e)->public_key_hex == (*full)->public_key_hex);
  CHECK((*e)->public_key_hex.size() == 64);
  CHECK((*e)->enrolled_ms == (*full)->enrolled_ms);
  CHECK((*e)->enroll_issued_ms == (*full)->enroll_issued_ms);
  CHECK((*e)->gateway.empty());
  CHECK((*e)->cell == c.cell_of(id));
  CHECK_FALSE((*e)->decommissioned);

  // A report and a presence change the device's record, not its entry.
  v1::Report r;
  r.set_seq(1);
  r.set_state(v1::AGENT_STATE_IDLE);
  c.hub->on_message((*e)->cell, {transport::device_topic(id, "report"), r.SerializeAsString(), 1, false});
  c.presence((*e)->cell, id, false);
  auto after = c.store->directory_entry(id);
  REQUIRE(after);
  REQUIRE(*after);
  CHECK((*after)->cell == (*e)->cell);
  CHECK((*after)->labels == (*e)->labels);
  CHECK((*c.store->get_device(id))->last_seq == 1);

  REQUIRE(c.hub->decommission_device(id));
  after = c.store->directory_entry(id);
  REQUIRE(after);
  REQUIRE(*after);
  CHECK((*after)->decommissioned);
  // The others are untouched, and an unknown id has no entry.
  CHECK_FALSE((*c.store->directory_entry(ids[0]))->decommissioned);
  auto none = c.store->directory_entry("d-unknown");
  REQUIRE(none);
  CHECK_FALSE(*none);
}

TEST_CASE("a cell's new broker session resets only its own devices' presence and calls its own roll",
          "[unit][hub][cells][presence]") {
  Cells c;
  const std::vector<std::string> ids = c.enroll_online(6);
  for (const auto& id : ids) REQUIRE(c.online(id));
  const auto calls0 = c.brokers[0]->rollcalls().size(), calls1 = c.brokers[1]->rollcalls().size();
  REQUIRE(c.hub->attach_transport(1, *c.brokers[1]));
  for (const auto& id : ids) CHECK(c.online(id) == (c.cell_of(id) != 1));
  CHECK(c.brokers[1]->rollcalls().size() == calls1 + 1);
  CHECK(c.brokers[0]->rollcalls().size() == calls0);
  CHECK(c.hub->cell(1).presence_resets.load() == 2);
  CHECK(c.hub->cell(0).presence_resets.load() == 1);
}

TEST_CASE("a campaign spans cells: each device's desired state goes out on its own cell's broker",
          "[unit][hub][cells][campaign]") {
  Cells c;
  const std::vector<std::string> ids = c.enroll_online(6);
  c.campaign_to_all();
  for (const auto& id : ids) {
    const int home = c.cell_of(id);
    for (int cell = 0; cell < 3; ++cell) CHECK(c.desired(cell, id).size() == (cell == home ? 1u : 0u));
  }
}

TEST_CASE("draining a cell asks its devices to move in a signed header and only their arrival moves them",
          "[unit][hub][cells][drain]") {
  Cells c;
  const std::vector<std::string> ids = c.enroll_online(6);
  std::vector<std::string> in0;
  for (const auto& id : ids) if (c.cell_of(id) == 0) in0.push_back(id);
  REQUIRE(in0.size() == 2);

  SECTION("the last undrained cell cannot be drained, and nothing changes") {
    REQUIRE(c.hub->drain_cell_devices(1));
    REQUIRE(c.hub->drain_cell_devices(2));
    auto refused = c.hub->drain_cell_devices(0);
    REQUIRE_FALSE(refused);
    CHECK(refused.error().code == Errc::conflict);
    CHECK_FALSE(c.hub->cell(0).draining());
    CHECK(c.hub->drain_cell_devices(7).error().code == Errc::not_found);
  }

  SECTION("moves") {
    auto p = c.hub->drain_cell_devices(0);
    REQUIRE(p);
    CHECK(p->remaining == 2);
    CHECK(p->moved == 0);
    c.hub->tick();
    for (const auto& id : in0) {
      auto sent = c.desired(0, id);
      REQUIRE(sent.size() == 1);
      // The move is in the header the director signed, for this device.
      auto hv = bundles::verify_desired_header(sent[0].header(), c.director.pub);
      REQUIRE(hv.ok());
      CHECK(hv.header.device_id() == id);
      CHECK((hv.header.broker_url() == "ssl://cell1.test:8884" || hv.header.broker_url() == "ssl://cell2.test:8885"));
      CHECK(c.cell_of(id) == 0);  // not moved until it arrives
    }
    // Asked again only after the retry interval.
    c.hub->tick();
    CHECK(c.desired(0, in0[0]).size() == 1);

    // A device of a cell that does not drain, heard on another cell's
    // broker: dropped, nothing changes.
    std::string in1;
    for (const auto& id : ids) if (c.cell_of(id) == 1) in1 = id;
    c.presence(1, in1, false);
    REQUIRE_FALSE(c.online(in1));
    c.presence(2, in1, true);
    CHECK_FALSE(c.online(in1));
    CHECK(c.cell_of(in1) == 1);
    CHECK(c.hub->other_cell_dropped() == 1);

    // The devices arrive on the brokers they were told.
    for (const auto& id : in0) {
      auto hv = bundles::verify_desired_header(c.desired(0, id)[0].header(), c.director.pub);
      const int target = hv.header.broker_url() == "ssl://cell1.test:8884" ? 1 : 2;
      c.presence(target, id, true);
      CHECK(c.cell_of(id) == target);
      CHECK(c.online(id));
    }
    auto done = c.hub->drain_cell_devices(0);
    REQUIRE(done);
    CHECK(done->remaining == 0);
    CHECK(done->moved == 2);
    // A late message from the drained cell's broker does not bring one back.
    c.presence(0, in0[0], false);
    CHECK(c.online(in0[0]));
    CHECK(c.cell_of(in0[0]) != 0);
  }
}

TEST_CASE("a stopped drain withdraws the moves not taken, lets devices that took one arrive for a while, and takes "
          "enrollments again",
          "[unit][hub][cells][drain]") {
  Cells c;
  const std::vector<std::string> ids = c.enroll_online(6);
  // Every device has a desired state (generation 1) before the drain.
  c.campaign_to_all();
  std::vector<std::string> in0;
  for (const auto& id : ids) if (c.cell_of(id) == 0) in0.push_back(id);
  REQUIRE(in0.size() == 2);
  auto header = [&](int cell, const std::string& id) {
    auto sent = c.desired(cell, id);
    REQUIRE_FALSE(sent.empty());
    auto hv = bundles::verify_desired_header(sent.back().header(), c.director.pub);
    REQUIRE(hv.ok());
    return hv.header;
  };
  REQUIRE(header(0, in0[1]).generation() == 1);

  // Nothing to stop: nothing changes; no such cell: not found.
  auto idle = c.hub->undrain_cell(1);
  REQUIRE(idle);
  CHECK_FALSE(idle->draining);
  CHECK(idle->remaining == 2);
  CHECK(c.hub->undrain_cell(7).error().code == Errc::not_found);

  REQUIRE(c.hub->drain_cell_devices(0));
  c.hub->tick();
  const std::string went = header(0, in0[0]).broker_url();
  REQUIRE_FALSE(went.empty());
  REQUIRE_FALSE(header(0, in0[1]).broker_url().empty());
  const int target = went == "ssl://cell1.test:8884" ? 1 : 2;
  c.presence(target, in0[0], true);  // took its move
  REQUIRE(c.cell_of(in0[0]) == target);

  auto stopped = c.hub->undrain_cell(0);
  REQUIRE(stopped);
  CHECK_FALSE(stopped->draining);
  CHECK(stopped->remaining == 1);
  CHECK(stopped->moved == 1);
  CHECK_FALSE(c.hub->cell(0).draining());
  const size_t before = c.desired(0, in0[1]).size();
  c.hub->tick();
  // The move not taken is withdrawn: the same desired state, signed again,
  // with its own cell's broker as the one to be on (after a move queued in
  // its session, this comes next and keeps it); the device that moved is
  // not asked back.
  REQUIRE(c.desired(0, in0[1]).size() == before + 1);
  auto withdrawn = header(0, in0[1]);
  CHECK(withdrawn.broker_url() == "ssl://cell0.test:8883");
  CHECK(withdrawn.generation() == 1);
  CHECK(withdrawn.device_id() == in0[1]);
  CHECK(c.cell_of(in0[1]) == 0);
  CHECK(c.cell_of(in0[0]) == target);
  // And not asked to move again.
  c.clock.advance(std::chrono::milliseconds(HubService::kMoveRetryMs + 1000));
  c.hub->tick();
  CHECK(c.desired(0, in0[1]).size() == before + 1);

  // The cell takes enrollments again (it is the least loaded).
  const std::string fresh = c.enroll().device_id();
  CHECK(c.cell_of(fresh) == 0);

  // A device that took its move before the withdrawal reached it still
  // arrives, within the grace period.
  c.presence(2, in0[1], true);
  CHECK(c.cell_of(in0[1]) == 2);
  CHECK(c.online(in0[1]));

  // After it, a device heard on another cell's broker is a late message again.
  const uint64_t dropped = c.hub->other_cell_dropped();
  c.clock.advance(std::chrono::milliseconds(HubService::kUndrainGraceMs));
  c.presence(0, fresh, true);
  c.presence(1, fresh, false);
  CHECK(c.cell_of(fresh) == 0);
  CHECK(c.online(fresh));
  CHECK(c.hub->other_cell_dropped() == dropped + 1);

  // Stopped and drained again before the engine's next tick: the move stands.
  REQUIRE(c.hub->drain_cell_devices(0));
  c.hub->tick();
  REQUIRE_FALSE(header(0, fresh).broker_url().empty());
  REQUIRE(c.hub->undrain_cell(0));
  REQUIRE(c.hub->drain_cell_devices(0));
  const size_t asked = c.desired(0, fresh).size();
  c.hub->tick();
  CHECK(c.desired(0, fresh).size() == asked);  // nothing withdrawn
  CHECK_FALSE(header(0, fresh).broker_url().empty());
  CHECK(header(0, fresh).broker_url() != "ssl://cell0.test:8883");
}

TEST_CASE("a drain asks every device in turn, however many before it have not moved",
          "[unit][hub][cells][drain]") {
  Cells c(2);  // two move requests per engine tick
  const std::vector<std::string> ids = c.enroll_online(15);
  const std::vector<std::string> in0 = c.in_cell(ids, 0);
  REQUIRE(in0.size() == 5);
  REQUIRE(c.hub->drain_cell_devices(0));
  auto asked = [&] {
    size_t n = 0;
    for (const auto& id : in0) n += c.desired(0, id).size();
    return n;
  };
  // No device takes its move: each tick asks the next two, in id order.
  c.hub->tick();
  CHECK(asked() == 2);
  CHECK(c.hub->cell(0).moves_asked == 2);
  c.hub->tick();
  CHECK(asked() == 4);
  c.hub->tick();
  CHECK(asked() == 5);
  for (const auto& id : in0) CHECK(c.desired(0, id).size() == 1);
  // Everyone asked and none due again: nothing more goes out.
  c.hub->tick();
  CHECK(asked() == 5);
  // After the retry interval they are asked again, round the cell.
  c.clock.advance(std::chrono::milliseconds(HubService::kMoveRetryMs + 1000));
  for (int i = 0; i < 3; ++i) c.hub->tick();
  CHECK(asked() == 10);
  CHECK(c.hub->cell(0).moves_asked == 10);
  CHECK(c.hub->cell(0).moves_withdrawn == 0);
  for (const auto& id : in0) CHECK(c.desired(0, id).size() == 2);
}

TEST_CASE("a drain outlives a hub restart: devices that took a move asked before it arrive, and stopping it "
          "withdraws every move the hub no longer knows it asked",
          "[unit][hub][cells][drain]") {
  Cells c;
  const std::vector<std::string> ids = c.enroll_online(6);
  c.campaign_to_all();
  // Applied everywhere: a restarted hub has nothing in flight to send again.
  for (const auto& id : ids) c.applied(id);
  const std::vector<std::string> in0 = c.in_cell(ids, 0);
  REQUIRE(in0.size() == 2);
  REQUIRE(c.hub->drain_cell_devices(0));
  c.hub->tick();
  auto header = [&](const std::string& id) {
    auto sent = c.desired(0, id);
    REQUIRE_FALSE(sent.empty());
    auto hv = bundles::verify_desired_header(sent.back().header(), c.director.pub);
    REQUIRE(hv.ok());
    return hv.header;
  };
  const std::string went = header(in0[0]).broker_url();
  REQUIRE_FALSE(went.empty());
  REQUIRE_FALSE(header(in0[1]).broker_url().empty());

  c.restart();
  CHECK(c.hub->cell(0).draining());
  CHECK_FALSE(c.hub->cell(1).draining());
  // The cell still takes no enrollments.
  CHECK(c.cell_of(c.enroll().device_id()) != 0);
  // A device that took its move while the hub was down arrives.
  const int target = went == "ssl://cell1.test:8884" ? 1 : 2;
  c.presence(target, in0[0], true);
  CHECK(c.cell_of(in0[0]) == target);

  // Stopped: the other device's move, asked by the hub before its restart,
  // is withdrawn all the same (its desired state again, signed, staying on
  // its own cell's broker).
  const size_t before = c.desired(0, in0[1]).size();
  REQUIRE(c.hub->undrain_cell(0));
  c.hub->tick();
  REQUIRE(c.desired(0, in0[1]).size() == before + 1);
  CHECK(header(in0[1]).broker_url() == "ssl://cell0.test:8883");
  CHECK(c.hub->cell(0).moves_withdrawn == 1);
  CHECK(c.hub->cell(0).moves_asked == 0);  // this process asked none
  CHECK(header(in0[1]).generation() == 1);
  CHECK(c.cell_of(in0[1]) == 0);
  // The device that moved is not asked back.
  CHECK(c.desired(0, in0[0]).size() == 2);  // the campaign and the move

  // Stopped is stopped after the next restart too.
  c.restart();
  CHECK_FALSE(c.hub->cell(0).draining());
  c.hub->tick();
  CHECK(c.desired(0, in0[1]).size() == before + 1);
}

}  // namespace flotilla::test

namespace flotilla::test {
namespace {

int64_t rows_in(Store& s, const std::string& sql_text) {
  auto n = sql::query<int64_t>(s.db(), sql_text, [](const sql::Stmt& st) { return st.col_int(0); });
  REQUIRE(n);
  return n->empty() ? 0 : n->front();
}

}  // namespace

TEST_CASE("with a file per cell, a campaign converges over the cells' files and hub.db keeps the directory and "
          "the record",
          "[unit][hub][cells]") {
  Cells c(HubService::kMoveChunk, true);
  const std::vector<std::string> ids = c.enroll_online(6);
  for (const auto& id : ids) {
    const int cell = c.cell_of(id);
    for (int other = 0; other < 3; ++other) {
      auto copy = c.file(other).get_device(id);
      REQUIRE(copy);
      CHECK(copy->has_value() == (other == cell));
    }
    // Presence went to the cell's file; hub.db's row is the directory's.
    CHECK(c.file(cell).get_device(id).value()->online);
    CHECK(c.online(id));
    CHECK_FALSE(c.store->get_device(id).value()->online);
  }

  const std::string campaign = c.campaign_to_all();
  CHECK(rows_in(*c.store, "SELECT COUNT(*) FROM campaign_devices") == 0);
  int64_t rows = 0;
  for (int cell = 0; cell < 3; ++cell) {
    rows += rows_in(c.file(cell), "SELECT COUNT(*) FROM campaign_devices");
    CHECK(rows_in(c.file(cell), "SELECT COUNT(*) FROM campaign_devices WHERE cell != " + std::to_string(cell)) == 0);
  }
  CHECK(rows == 6);
  for (const auto& id : ids) c.applied(id);
  c.hub->tick();
  auto counts = c.hub->campaign_counts(campaign);
  REQUIRE(counts);
  int64_t applied = 0;
  for (const auto& r : *counts) applied += r.status == "applied" ? r.count : 0;
  CHECK(applied == 6);
  auto record = c.store->get_campaign(campaign);
  REQUIRE(record);
  REQUIRE(*record);
  CHECK((*record)->state == hub::CampaignState::completed);
  CHECK(rows_in(*c.store, "SELECT COUNT(*) FROM campaign_devices") == 0);

  // What a crash can leave in a file is gone at the next start: a copy of a
  // device the directory does not have, rows of a campaign hub.db does not.
  hub::DeviceDirectoryEntry stray;
  stray.id = "d-stray";
  stray.cell = 0;
  REQUIRE(c.file(0).adopt_device(stray));
  const std::string in_zero = c.in_cell(ids, 0).front();
  REQUIRE(c.file(0).add_campaign_member("c-never-committed", hub::CampaignMember{in_zero, 0.1, 0, "", 0}, 1));
  c.restart();
  CHECK_FALSE(c.file(0).get_device("d-stray").value().has_value());
  CHECK(c.file(0).campaigns_with_rows().value() == std::vector<std::string>{campaign});
  CHECK(c.file(0).get_device(in_zero).value().has_value());
}

// A hub that ran with every cell's rows in hub.db starts with cell files
// in the middle of a campaign: the rows move, the campaign carries on.
TEST_CASE("a hub restarted with cell files moves hub.db's rows into them and its campaign completes",
          "[unit][hub][cells]") {
  Cells c;
  const std::vector<std::string> ids = c.enroll_online(6);
  const std::string campaign = c.campaign_to_all();
  for (size_t i = 0; i < 3; ++i) c.applied(ids[i]);
  CHECK(rows_in(*c.store, "SELECT COUNT(*) FROM campaign_devices") == 6);

  c.open_cell_files();
  c.restart();
  CHECK(rows_in(*c.store, "SELECT COUNT(*) FROM campaign_devices") == 0);
  int64_t applied_rows = 0;
  for (int cell = 0; cell < 3; ++cell) {
    applied_rows += rows_in(c.file(cell), "SELECT COUNT(*) FROM campaign_devices WHERE status = 'applied'");
  }
  CHECK(applied_rows == 3);
  for (size_t i = 3; i < ids.size(); ++i) {
    // Presence after the restart: the hub trusts none from before it.
    c.presence(c.cell_of(ids[i]), ids[i], true);
    c.applied(ids[i]);
  }
  // The restart's roll call (presence unknown until devices re-announce) ends.
  c.clock.advance(std::chrono::seconds(30));
  c.hub->tick();
  auto record = c.store->get_campaign(campaign);
  REQUIRE(record);
  REQUIRE(*record);
  CHECK((*record)->state == hub::CampaignState::completed);

  // hub.db no longer holds the rows: a hub without the files is refused.
  c.hub.reset();
  ServiceConfig without = c.cfg;
  without.cell_files.clear();
  CHECK_THROWS_WITH(HubService(*c.store, c.clock, without), Catch::Contains("cells' own files"));
}

namespace {
// What the API reads of a fleet (every read that spans devices), as text:
// the same fleet must read the same from hub.db and from the cells' files.
struct ApiReads {
  std::string fleet, walk, detail, summary, view, failures, groups, cells;
  bool operator==(const ApiReads&) const = default;
};

ApiReads api_reads(HubService& hub, const std::string& campaign, const std::string& failed_device) {
  ApiReads out;
  hub::AggregateStore* reads = hub.reads();
  REQUIRE(reads);
  auto fleet = reads->fleet("*");
  REQUIRE(fleet);
  for (const auto& f : *fleet) out.fleet += f.dim + "/" + f.value + "=" + std::to_string(f.n) + " ";
  // Two rows a page: a walk across cells' files continues where each stopped.
  hub::DeviceQuery q;
  q.limit = 2;
  for (int pages = 0; pages < 20; ++pages) {
    auto page = reads->devices(q);
    REQUIRE(page);
    for (const auto& d : page->items) {
      out.walk += d.id + ":" + d.state + ":" + (d.online ? "up" : "down") + ":" + std::to_string(d.cell) + " ";
    }
    if (page->next.empty()) break;
    q.after = page->next;
  }
  auto detail = reads->device(failed_device).value();
  REQUIRE(detail);
  out.detail = detail->device.state + " " + std::to_string(detail->failures.size());
  for (const auto& r : detail->campaigns) {
    out.detail += " " + r.campaign_name + "/" + r.row.status + "/" + r.bundle_name;
  }
  auto summary = reads->campaign(campaign).value();
  REQUIRE(summary);
  for (const auto& r : summary->counts) {
    out.summary += std::to_string(r.wave) + r.status + (r.online ? "+" : "-") + std::to_string(r.count) + " ";
  }
  auto view = hub.campaign_view(campaign, true).value();
  REQUIRE(view);
  const auto& n = view->counts;
  out.view = std::to_string(n.total) + " " + std::to_string(n.applied) + " " + std::to_string(n.failed) + " " +
             std::to_string(n.offline) + " away " + std::to_string(view->away.size()) + " rows " +
             std::to_string(view->devices.size());
  for (const auto& [reason, k] : view->failure_reasons) out.view += " " + reason + "=" + std::to_string(k);
  for (const auto& c : view->cells) {
    int64_t total = 0;
    for (const auto& r : c.rows) total += r.count;
    out.view += " cell" + std::to_string(c.cell) + "=" + std::to_string(total);
  }
  auto failures = hub.campaign_failures(campaign, 10);
  REQUIRE(failures);
  for (const auto& r : *failures) out.failures += r.device_id + "/" + r.reason + " ";
  auto groups = reads->failure_groups(campaign, 5, 5);
  REQUIRE(groups);
  for (const auto& g : *groups) {
    out.groups += g.reason + "=" + std::to_string(g.count) + ":" + std::to_string(g.first.size()) + " ";
  }
  auto cells = hub.list_cells();
  REQUIRE(cells);
  for (const auto& c : *cells) {
    out.cells += std::to_string(c.devices_total) + "/" + std::to_string(c.devices_online) + " ";
  }
  return out;
}
}  // namespace

// The API's reads (device pages, a device, fleet counts, a campaign's
// counts, failures and cells) answer from every cell's file once the rows
// are there, exactly as they answered from hub.db, and keep following
// what devices report after.
TEST_CASE("with cell files the API's reads answer over every cell's file as they did over hub.db",
          "[unit][hub][cells]") {
  Cells c;
  const std::vector<std::string> ids = c.enroll_online(7);
  const std::string campaign = c.campaign_to_all();
  for (size_t i = 0; i < 3; ++i) c.applied(ids[i]);
  // One failure with a reason, one device gone offline mid-campaign.
  const std::string failing = ids[3];
  {
    auto sent = c.desired(c.cell_of(failing), failing);
    REQUIRE_FALSE(sent.empty());
    v1::Report r;
    r.set_device_id(failing);
    r.set_seq(++c.seq);
    r.set_state(v1::AGENT_STATE_FAILED);
    r.set_generation(sent.back().generation());
    r.set_campaign_id(campaign);
    r.mutable_error()->set_reason(v1::REASON_DISK_FULL);
    r.mutable_error()->set_message("no space left");
    c.hub->on_message(c.cell_of(failing),
                      {transport::device_topic(failing, "report"), r.SerializeAsString(), 1, false});
    c.hub->drain();
  }
  c.presence(c.cell_of(ids[4]), ids[4], false);
  const ApiReads before = api_reads(*c.hub, campaign, failing);
  CHECK(before.view.starts_with("7 3 1 1 away 1 rows 7"));
  CHECK(before.failures == failing + "/disk_full ");
  CHECK(before.detail.find("edge-base") != std::string::npos);

  c.open_cell_files();
  c.restart();
  // A restart trusts no presence from before it: the devices announce again.
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i != 4) c.presence(c.cell_of(ids[i]), ids[i], true);
  }
  REQUIRE(rows_in(*c.store, "SELECT COUNT(*) FROM campaign_devices") == 0);
  const ApiReads after = api_reads(*c.hub, campaign, failing);
  CHECK(after.fleet == before.fleet);
  CHECK(after.walk == before.walk);
  CHECK(after.detail == before.detail);
  CHECK(after.summary == before.summary);
  CHECK(after.view == before.view);
  CHECK(after.failures == before.failures);
  CHECK(after.groups == before.groups);
  CHECK(after.cells == before.cells);
  CHECK(c.hub->get_device(failing).value()->state == "failed");

  // The reads follow the files: a report after the move shows at once.
  c.applied(ids[5]);
  const ApiReads later = api_reads(*c.hub, campaign, failing);
  CHECK(later.view.starts_with("7 4 1 1"));
  CHECK(later.fleet != before.fleet);
  CHECK(c.hub->get_device(ids[5]).value()->state == "applied");
  // A page of one cell's devices walks that cell's file only.
  hub::DeviceQuery one;
  one.cells = std::vector<int>{c.cell_of(ids[5])};
  one.limit = 50;
  auto page = c.hub->reads()->devices(one);
  REQUIRE(page);
  CHECK(page->items.size() == c.in_cell(ids, c.cell_of(ids[5])).size());
  for (const auto& d : page->items) CHECK(d.cell == c.cell_of(ids[5]));
}

TEST_CASE("cell files that do not match the cells are refused", "[unit][hub][cells]") {
  TempDir dir;
  auto hub_db = Store::open((dir.path() / "hub.db").string());
  REQUIRE(hub_db);
  auto one = Store::open_cell((dir.path() / "c1.db").string(), 1);
  REQUIRE(one);
  FakeClock clock;
  ServiceConfig cfg;
  cfg.engine_thread = false;
  cfg.cell_broker_urls = {"ssl://a:1", "ssl://b:2"};
  cfg.cell_files = {one->get(), one->get()};  // cell 1's file given as cell 0's
  CHECK_THROWS_WITH(HubService(**hub_db, clock, cfg), Catch::Contains("cell i's own file"));
  cfg.cell_files = {one->get()};  // one file for two cells
  CHECK_THROWS_WITH(HubService(**hub_db, clock, cfg), Catch::Contains("each of the 2 cells"));
}

}  // namespace flotilla::test
