// [unit] The dashboard's read models in the store: trigger-kept fleet counts
// against a recount from the rows, the label index, outcome history,
// inventory, device lists (filters, orders, cursors, the scan bound) against
// a brute-force filter of the same rows, and the campaign timeline sampler.
#include <catch2/catch.hpp>

#include <algorithm>
#include <map>
#include <random>
#include <set>

#include "flotilla/common/clock.hpp"
#include "flotilla/common/encoding.hpp"
#include "flotilla/hub/aggregates.hpp"
#include "flotilla/hub/store.hpp"
#include "tests/support/store_helpers.hpp"
#include "tests/support/temp_dir.hpp"

using namespace flotilla;
using namespace flotilla::hub;
using flotilla::test::TempDir;

namespace {

struct Stores {
  TempDir dir;
  std::unique_ptr<Store> store;
  std::unique_ptr<AggregateStore> agg;
  explicit Stores(AggregateStore::Config cfg = {}) {
    auto s = Store::open((dir.path() / "hub.db").string());
    REQUIRE(s);
    store = std::move(*s);
    auto a = AggregateStore::open((dir.path() / "hub.db").string(), cfg);
    REQUIRE(a);
    agg = std::move(*a);
  }
  DeviceRecord enroll(const std::string& id, const Labels& labels, const std::string& project = "default",
                      const std::string& hostname = "", int64_t enrolled_ms = 1000) {
    DeviceRecord d;
    d.id = id;
    d.project = project;
    d.labels = labels;
    d.public_key_hex = "00";
    d.hostname = hostname.empty() ? "host-" + id : hostname;
    d.arch = "amd64";
    d.agent_version = "0.1.0";
    d.enrolled_ms = enrolled_ms;
    REQUIRE(store->upsert_enrolled_device(d));
    auto got = store->get_device(id);
    REQUIRE(got);
    REQUIRE(*got);
    return **got;
  }
  void save(const DeviceRecord& d) { REQUIRE(store->save_device_state(d)); }
  // Bundle "b1" and a running campaign `id` of it over `members`, made at `at_ms`.
  CampaignRecord running_campaign(const std::string& id, const std::vector<Store::CampaignMember>& members,
                                  int64_t at_ms) {
    REQUIRE(store->insert_bundle(test::stand_in_bundle()));
    CampaignRecord c = test::running_record(id, at_ms);
    REQUIRE(store->insert_campaign(c, members));
    return c;
  }
  // A counts table's rows, "project/dim/value=n", those not zero, sorted.
  std::vector<std::string> counts(const std::string& table) {
    auto r = sql::query<std::string>(store->db(), "SELECT project || '/' || dim || '/' || value || '=' || n FROM " +
                                                      table + " WHERE n != 0 ORDER BY 1",
                                     [](const sql::Stmt& st) { return st.col_text(0); });
    REQUIRE(r);
    return *r;
  }
  int64_t rows(const std::string& sql) {
    auto st = store->db().prepare(sql);
    REQUIRE(st);
    auto r = st->step();
    REQUIRE(r);
    return st->col_int(0);
  }
};

// What HubService does after a write that changed the directory.
void follow(Store& s) {
  auto n = follow_directory_outbox(s, [&](int) -> DeviceStore& { return s; });
  REQUIRE(n);
}

std::map<std::string, int64_t> dim(const std::vector<FleetCount>& rows, const std::string& name) {
  std::map<std::string, int64_t> out;
  for (const auto& r : rows) {
    if (r.dim == name) out[r.value] += r.n;
  }
  return out;
}

void check_counts_agree(Store& s) {
  // The trouble table holds exactly the devices in those states.
  auto rows = [&](const std::string& sql) {
    auto r = sql::query<std::string>(s.db(), sql, [](const sql::Stmt& st) { return st.col_text(0) + "/" + st.col_text(1); });
    REQUIRE(r);
    return *r;
  };
  CHECK(rows("SELECT state, device_id FROM device_trouble ORDER BY 1, 2") ==
        rows("SELECT state, id FROM devices WHERE state IN ('failed', 'refused', 'rolled_back', 'rolling_back') "
             "ORDER BY 1, 2"));
  auto kept = s.fleet_counts();
  auto recount = s.recount_fleet();
  REQUIRE(kept);
  REQUIRE(recount);
  std::vector<FleetCount> a = *kept, b = *recount;
  std::sort(a.begin(), a.end());
  std::sort(b.begin(), b.end());
  CHECK(a == b);
}

}  // namespace

TEST_CASE("fleet counts kept by triggers equal a recount from the rows after every kind of write",
          "[unit][hub][views]") {
  Stores s;
  std::mt19937 rng(7);
  const std::vector<std::string> states = {"idle", "downloading", "applied", "failed", "rolled_back"};
  const std::vector<std::string> regions = {"eu", "us", "ap"};
  std::vector<DeviceRecord> devs;
  for (int i = 0; i < 60; ++i) {
    Labels l{{"env", i % 2 ? "prod" : "dev"}};
    if (i % 3) l["region"] = regions[static_cast<size_t>(i) % 3];
    if (i % 4 == 0) l["cell"] = "c" + std::to_string(i % 8);
    devs.push_back(s.enroll("d-" + std::to_string(1000 + i), l, i % 5 == 0 ? "blue" : "default"));
  }
  check_counts_agree(*s.store);
  for (int round = 0; round < 400; ++round) {
    auto& d = devs[rng() % devs.size()];
    switch (rng() % 7) {
      case 0:
      case 1:
      case 2:  // a report: state, version, k3s, presence
        d.state = states[rng() % states.size()];
        d.online = rng() % 4 != 0;
        if (d.state == "applied") {
          d.applied_bundle = "edge";
          d.applied_version = 1 + rng() % 3;
        }
        d.k3s_version = rng() % 2 ? "v1.30" : "v1.31";
        d.last_seq += 1;
        d.last_seen_ms += 10;
        s.save(d);
        break;
      case 3: {  // labels change
        Labels l = d.labels;
        if (rng() % 2) l["region"] = regions[rng() % regions.size()];
        else l.erase("region");
        REQUIRE(s.store->set_device_labels(d.id, l));
        d.labels = l;
        break;
      }
      case 4: {  // inventory with a certificate expiry
        DeviceInventory inv;
        inv.os = "Linux";
        inv.cert_expiry_unix = rng() % 3 ? 1'800'000'000 + static_cast<int64_t>(rng() % 90) * 86400 : 0;
        REQUIRE(s.store->save_device_inventory(d.id, inv));
        break;
      }
      case 5:  // a gateway's devices go offline together
        REQUIRE(s.store->set_gateway_devices_offline("gw-none", 5));
        break;
      case 6:  // re-enrollment (an upsert)
        s.enroll(d.id, d.labels, d.project, d.hostname);
        break;
    }
    if (round % 50 == 0) check_counts_agree(*s.store);
  }
  // Decommissioning leaves the fleet's figures (but stays counted by state),
  // and its inventory goes.
  DeviceInventory inv;
  inv.cert_expiry_unix = 1'800'000'000;
  REQUIRE(s.store->save_device_inventory(devs[3].id, inv));
  REQUIRE(test::decommission(*s.store, devs[3].id));
  follow(*s.store);
  CHECK(s.rows("SELECT COUNT(*) FROM device_inventory WHERE device_id = '" + devs[3].id + "'") == 0);
  // A decommissioned device's inventory is not stored again (no error: a late report).
  REQUIRE(s.store->save_device_inventory(devs[3].id, inv));
  CHECK(s.rows("SELECT COUNT(*) FROM device_inventory WHERE device_id = '" + devs[3].id + "'") == 0);
  check_counts_agree(*s.store);

  // The positive control: the figures are the fleet's, by project.
  auto all = s.agg->fleet("*");
  REQUIRE(all);
  auto by_state = dim(*all, "state");
  int64_t total = 0;
  for (const auto& [k, n] : by_state) total += n;
  CHECK(total == 60);
  CHECK(by_state["decommissioned"] == 1);
  auto online = dim(*all, "online");
  CHECK(online["online"] + online["offline"] == 59);
  auto blue = s.agg->fleet("blue");
  REQUIRE(blue);
  int64_t blue_total = 0;
  for (const auto& [k, n] : dim(*blue, "state")) blue_total += n;
  CHECK(blue_total == 12);
}

// ADR 18, slice 3: the counts of what devices report and the counts of what
// the directory holds live in two tables, so that when a cell's devices get
// a file of their own each table's triggers write only their own file.
TEST_CASE("a report writes only the reported counts and a label change only the directory's",
          "[unit][hub][views]") {
  Stores s;
  auto table = [&](const std::string& name) { return s.counts(name); };
  std::vector<DeviceRecord> devs;
  for (int i = 0; i < 6; ++i) {
    devs.push_back(s.enroll("d-" + std::to_string(i), {{"region", i % 2 ? "eu" : "us"}, {"cell", "c1"}}));
    DeviceCertRecord c;
    c.serial = "0a0" + std::to_string(i);
    c.device_id = devs.back().id;
    c.not_after = 1'900'000'000;
    c.issued_ms = 1;
    REQUIRE(s.store->insert_device_cert(c));
  }
  const auto directory = table("directory_counts");
  const auto reported = table("fleet_counts");
  // The directory's table holds the labels and the broker certificates, and
  // nothing a report sets; the other the reverse.
  for (const auto& row : directory) {
    CHECK((row.find("/region/") != std::string::npos || row.find("/cell/") != std::string::npos ||
           row.find("/broker_cert_day/") != std::string::npos));
  }
  CHECK(std::find(directory.begin(), directory.end(), "default/region/eu=3") != directory.end());
  CHECK(std::find(directory.begin(), directory.end(), "default/broker_cert_day/21990=6") != directory.end());
  for (const auto& row : reported) {
    CHECK(row.find("/region/") == std::string::npos);
    CHECK(row.find("/broker_cert_day/") == std::string::npos);
  }

  // Reports, presence and inventories move the reported counts only.
  for (auto& d : devs) {
    d.state = "applied";
    d.applied_bundle = "edge";
    d.applied_version = 2;
    d.online = true;
    d.last_seq += 1;
    s.save(d);
    DeviceInventory inv;
    inv.cert_expiry_unix = 1'800'000'000;
    REQUIRE(s.store->save_device_inventory(d.id, inv));
  }
  CHECK(table("directory_counts") == directory);
  CHECK(table("fleet_counts") != reported);
  check_counts_agree(*s.store);

  // A label change moves the directory's counts only.
  const auto reported_after = table("fleet_counts");
  REQUIRE(s.store->set_device_labels(devs[0].id, {{"region", "eu"}}));
  CHECK(table("fleet_counts") == reported_after);
  auto moved = table("directory_counts");
  CHECK(std::find(moved.begin(), moved.end(), "default/region/eu=4") != moved.end());
  CHECK(std::find(moved.begin(), moved.end(), "default/cell/c1=5") != moved.end());
  check_counts_agree(*s.store);

  // Decommissioning moves both: the state in one, labels and the broker
  // certificate out of the other.
  REQUIRE(test::decommission(*s.store, devs[1].id));
  follow(*s.store);
  moved = table("directory_counts");
  CHECK(std::find(moved.begin(), moved.end(), "default/region/eu=3") != moved.end());
  CHECK(std::find(moved.begin(), moved.end(), "default/broker_cert_day/21990=5") != moved.end());
  auto after = table("fleet_counts");
  CHECK(std::find(after.begin(), after.end(), "default/state/decommissioned=1") != after.end());
  check_counts_agree(*s.store);

  // A decommissioning that changes the labels in the same statement is
  // counted once.
  REQUIRE(s.store->db().exec("UPDATE devices SET decommissioned = 1, state = 'decommissioned', "
                             "labels = '{\"region\":\"ap\"}' "
                             "WHERE id = 'd-2'"));
  moved = table("directory_counts");
  CHECK(std::find(moved.begin(), moved.end(), "default/region/us=1") != moved.end());
  CHECK(std::find(moved.begin(), moved.end(), "default/cell/c1=3") != moved.end());
  for (const auto& row : moved) CHECK(row.find("/region/ap") == std::string::npos);
  check_counts_agree(*s.store);
}

// ADR 18, slice 5: a move or a decommission is written to the directory,
// and the device's rows in its cell's store follow it from the outbox after
// the write commits. The outbox is in the write's transaction (a write that
// rolls back leaves nothing to follow), survives a crash before the
// following, and following twice changes nothing.
TEST_CASE("directory changes reach the device rows through the outbox, after their write and once",
          "[unit][hub][views]") {
  Stores s;
  auto moving = s.enroll("d-moving", {{"region", "eu"}});
  auto leaving = s.enroll("d-leaving", {{"region", "eu"}});
  DeviceInventory inv;
  inv.os = "Linux";
  inv.cert_expiry_unix = 1'800'000'000;
  REQUIRE(s.store->save_device_inventory(leaving.id, inv));
  auto outbox = [&] {
    auto r = s.store->directory_outbox(100);
    REQUIRE(r);
    return *r;
  };
  // Enrollments are followed by live membership (the hub's), nothing else.
  auto enrolled = outbox();
  REQUIRE(enrolled.size() == 2);
  CHECK(enrolled[0].kind == DirectoryChange::Kind::labelled);
  CHECK(enrolled[1].device_id == leaving.id);
  CHECK(enrolled[1].kind == DirectoryChange::Kind::labelled);
  follow(*s.store);
  CHECK(outbox().empty());
  CHECK(s.rows("SELECT COUNT(*) FROM device_inventory WHERE device_id = 'd-leaving'") == 1);
  // So is a label change; writing the same labels again is no change.
  REQUIRE(s.store->set_device_labels(moving.id, {{"region", "us"}}));
  REQUIRE(s.store->set_device_labels(moving.id, {{"region", "us"}}));
  auto relabelled = outbox();
  REQUIRE(relabelled.size() == 1);
  CHECK(relabelled[0].device_id == moving.id);
  CHECK(relabelled[0].kind == DirectoryChange::Kind::labelled);
  follow(*s.store);

  // A write that rolls back leaves nothing to follow.
  {
    sql::Transaction tx(s.store->db());
    REQUIRE(s.store->set_device_cell(moving.id, 2));
    CHECK(outbox().size() == 1);
  }
  CHECK(outbox().empty());

  REQUIRE(s.store->set_device_cell(moving.id, 2));
  REQUIRE(s.store->mark_device_decommissioned(leaving.id));
  auto pending = outbox();
  REQUIRE(pending.size() == 2);
  CHECK(pending[0].device_id == moving.id);
  CHECK(pending[0].kind == DirectoryChange::Kind::moved);
  CHECK(pending[0].from_cell == 0);
  CHECK(pending[0].cell == 2);
  CHECK(pending[1].device_id == leaving.id);
  CHECK(pending[1].kind == DirectoryChange::Kind::decommissioned);
  // Not followed yet: the inventory and the reported state are still there.
  CHECK(s.rows("SELECT COUNT(*) FROM device_inventory WHERE device_id = 'd-leaving'") == 1);
  CHECK(s.rows("SELECT COUNT(*) FROM devices WHERE id = 'd-leaving' AND state = 'decommissioned'") == 0);

  // A crash here: the outbox is in the file, so the next open still has it.
  const auto path = (s.dir.path() / "hub.db").string();
  s.agg.reset();
  s.store.reset();
  auto reopened = Store::open(path);
  REQUIRE(reopened);
  s.store = std::move(*reopened);
  CHECK(outbox().size() == 2);

  // Followed in the store of the cell that holds the rows.
  std::vector<int> asked;
  auto n = follow_directory_outbox(*s.store, [&](int cell) -> DeviceStore& {
    asked.push_back(cell);
    return *s.store;
  });
  REQUIRE(n);
  CHECK(*n == 2);
  CHECK(asked == std::vector<int>{0, 0});  // the move's rows are where it was
  CHECK(s.rows("SELECT COUNT(*) FROM device_inventory WHERE device_id = 'd-leaving'") == 0);
  CHECK(s.rows("SELECT COUNT(*) FROM devices WHERE id = 'd-leaving' AND state = 'decommissioned' AND online = 0") == 1);
  CHECK(outbox().empty());
  auto again = follow_directory_outbox(*s.store, [&](int) -> DeviceStore& { return *s.store; });
  REQUIRE(again);
  CHECK(*again == 0);
  check_counts_agree(*s.store);
}

// ADR 18, before slice 7: a campaign's record is control data and each
// member's row belongs to the store of the cell the directory gives it, so a
// row takes its cell from the member, never from a devices row (which a
// cell's file will not have for a device of another cell).
TEST_CASE("a campaign member's row is in the cell the member names", "[unit][hub][views]") {
  Stores s;
  s.enroll("d-1", {});
  s.enroll("d-2", {});
  CampaignMember in_2{"d-1", 0.5, 0, "", 2};
  CampaignMember in_0{"d-2", 0.25, 1, "", 0};
  s.running_campaign("c1", {in_2, in_0}, 1000);
  auto row = s.store->campaign_device("c1", "d-1");
  REQUIRE(row);
  REQUIRE(*row);
  CHECK((*row)->cell == 2);
  CHECK(s.rows("SELECT cell FROM devices WHERE id = 'd-1'") == 0);  // the device row says otherwise
  auto cells = s.store->campaign_cells("c1");
  REQUIRE(cells);
  CHECK(*cells == std::vector<int>{0, 2});
  // A record alone has no rows; a member added again changes nothing.
  CampaignRecord c2;
  c2.id = "c2";
  c2.bundle_id = "b1";
  c2.state = CampaignState::running;
  REQUIRE(s.store->insert_campaign_record(c2));
  CHECK(s.rows("SELECT COUNT(*) FROM campaign_devices WHERE campaign_id = 'c2'") == 0);
  REQUIRE(s.store->add_campaign_member("c1", CampaignMember{"d-1", 0.9, 1, "", 1}, 2000));
  row = s.store->campaign_device("c1", "d-1");
  REQUIRE(row);
  REQUIRE(*row);
  CHECK((*row)->cell == 2);
  CHECK((*row)->wave == 0);
}

// ADR 18, before slice 7: a decommission is the directory's own column. The
// directory's counts, label index, broker certificates, outbox and targeting
// follow that column; the state, a report column a cell's file will keep, is
// the report side's. Written apart here (they go together in one statement
// in the hub) to show which side reads which.
TEST_CASE("the directory follows its decommissioned column, not the reported state", "[unit][hub][views]") {
  Stores s;
  auto table = [&](const std::string& name) { return s.counts(name); };
  for (int i = 0; i < 3; ++i) {
    s.enroll("d-" + std::to_string(i), {{"region", "eu"}});
    DeviceCertRecord c;
    c.serial = "0b0" + std::to_string(i);
    c.device_id = "d-" + std::to_string(i);
    c.not_after = 1'900'000'000;
    c.issued_ms = 1;
    REQUIRE(s.store->insert_device_cert(c));
  }
  follow(*s.store);  // the enrollments' entries (live membership)
  auto directory_says = [&](const std::string& id) {
    auto e = s.store->directory_entry(id);
    REQUIRE(e);
    REQUIRE(*e);
    return (*e)->decommissioned;
  };
  auto targeted = [&] {
    std::set<std::string> ids;
    REQUIRE(s.store->each_device_target([&](const std::string& id, const std::string&, bool decommissioned,
                                            const Labels&) {
      if (!decommissioned) ids.insert(id);
    }));
    return ids;
  };
  const auto before = table("directory_counts");

  // A reported state of "decommissioned" alone (a cell copy's, or a stray
  // report's) is not a decommission: nothing on the directory's side moves.
  REQUIRE(s.store->db().exec("UPDATE devices SET state = 'decommissioned' WHERE id = 'd-0'"));
  CHECK_FALSE(directory_says("d-0"));
  CHECK(table("directory_counts") == before);
  CHECK(s.rows("SELECT COUNT(*) FROM directory_outbox") == 0);
  CHECK(s.rows("SELECT COUNT(*) FROM device_broker_cert WHERE device_id = 'd-0'") == 1);
  CHECK(targeted() == std::set<std::string>{"d-0", "d-1", "d-2"});
  auto ids = s.store->decommissioned_device_ids();
  REQUIRE(ids);
  CHECK(ids->empty());

  // The directory's column alone is one, whatever the reported state says.
  REQUIRE(s.store->db().exec("UPDATE devices SET decommissioned = 1 WHERE id = 'd-1'"));
  CHECK(directory_says("d-1"));
  auto moved = table("directory_counts");
  CHECK(std::find(moved.begin(), moved.end(), "default/region/eu=2") != moved.end());
  CHECK(std::find(moved.begin(), moved.end(), "default/broker_cert_day/21990=2") != moved.end());
  CHECK(s.rows("SELECT COUNT(*) FROM directory_outbox WHERE device_id = 'd-1' AND kind = 'decommissioned'") == 1);
  CHECK(s.rows("SELECT COUNT(*) FROM device_broker_cert WHERE device_id = 'd-1'") == 0);
  CHECK(targeted() == std::set<std::string>{"d-0", "d-2"});
  ids = s.store->decommissioned_device_ids();
  REQUIRE(ids);
  CHECK(*ids == std::vector<std::string>{"d-1"});
  auto cells = s.store->cell_device_totals("*");
  REQUIRE(cells);
  REQUIRE(cells->size() == 1);
  CHECK(cells->front().total == 2);
  check_counts_agree(*s.store);
}

// Stores made before the column get it from the state at open, at the end
// of devices' columns (as a new store has it: snapshots compare the column
// lists), and the directory's counts stay what they were.
TEST_CASE("a store from before the decommissioned column gets it from the state at open", "[unit][hub][views]") {
  TempDir dir;
  const std::string path = (dir.path() / "hub.db").string();
  auto columns = [](Store& s) {
    auto r = sql::query<std::string>(s.db(), "SELECT name FROM pragma_table_info('devices')",
                                     [](const sql::Stmt& st) { return st.col_text(0); });
    REQUIRE(r);
    return *r;
  };
  std::vector<std::string> fresh_columns;
  {
    auto s = Store::open(path);
    REQUIRE(s);
    fresh_columns = columns(**s);
    REQUIRE(fresh_columns.back() == "decommissioned");
    for (int i = 0; i < 4; ++i) {
      DeviceRecord d;
      d.id = "d-" + std::to_string(i);
      d.labels = {{"region", "eu"}};
      d.public_key_hex = "00";
      REQUIRE((*s)->upsert_enrolled_device(d));
    }
    REQUIRE(test::decommission(**s, "d-2"));
    // What an older hub left: the state only, and read models of version 7
    // (SQLite drops a column no trigger names: the ones on it go first, and
    // the open rebuilds them all).
    REQUIRE((*s)->db().exec("DROP TRIGGER directory_insert; DROP TRIGGER directory_delete; "
                            "DROP TRIGGER directory_labels; DROP TRIGGER directory_decommission; "
                            "DROP TRIGGER broker_cert_issued; ALTER TABLE devices DROP COLUMN decommissioned; "
                            "UPDATE aggregate_schema SET version = 7;"));
  }
  auto s = Store::open(path);
  REQUIRE(s);
  CHECK(columns(**s) == fresh_columns);
  auto e = (*s)->directory_entry("d-2");
  REQUIRE(e);
  REQUIRE(*e);
  CHECK((*e)->decommissioned);
  auto ids = (*s)->decommissioned_device_ids();
  REQUIRE(ids);
  CHECK(*ids == std::vector<std::string>{"d-2"});
  auto kept = (*s)->fleet_counts();
  REQUIRE(kept);
  CHECK(dim(*kept, "region") == std::map<std::string, int64_t>{{"eu", 3}});
  check_counts_agree(**s);
  // Its triggers are the new ones: a decommission after the upgrade moves
  // the counts once.
  REQUIRE(test::decommission(**s, "d-3"));
  kept = (*s)->fleet_counts();
  REQUIRE(kept);
  CHECK(dim(*kept, "region") == std::map<std::string, int64_t>{{"eu", 2}});
  check_counts_agree(**s);
}

// A decommission is a control write of the directory's column alone (ADR
// 18): the reported state, presence and inventory, which a cell's file will
// keep, follow from the outbox after it commits.
TEST_CASE("a decommission writes the directory's column and its follow the reported side", "[unit][hub][views]") {
  TempDir dir;
  auto s = Store::open((dir.path() / "hub.db").string());
  REQUIRE(s);
  Store& st = **s;
  DeviceRecord d;
  d.id = "d-gone";
  d.labels = {{"region", "eu"}};
  d.public_key_hex = "00";
  REQUIRE(st.upsert_enrolled_device(d));
  REQUIRE(follow_directory_outbox(st, [&](int) -> DeviceStore& { return st; }));
  REQUIRE(st.db().exec("UPDATE devices SET state = 'applied', online = 1 WHERE id = 'd-gone'"));
  auto row = [&] {
    auto r = sql::query<std::string>(st.db(), "SELECT state || ' ' || online || ' ' || decommissioned FROM devices",
                                     [](const sql::Stmt& q) { return q.col_text(0); });
    REQUIRE(r);
    REQUIRE(r->size() == 1);
    return r->front();
  };
  const auto before = st.fleet_counts();
  REQUIRE(before);

  REQUIRE(st.mark_device_decommissioned("d-gone"));
  CHECK(row() == "applied 1 1");
  auto reported = st.fleet_counts();
  REQUIRE(reported);
  CHECK(dim(*reported, "state") == dim(*before, "state"));
  auto pending = st.directory_outbox(10);
  REQUIRE(pending);
  REQUIRE(pending->size() == 1);
  CHECK(pending->front().kind == DirectoryChange::Kind::decommissioned);

  REQUIRE(follow_directory_outbox(st, [&](int) -> DeviceStore& { return st; }));
  CHECK(row() == "decommissioned 0 1");
  auto after = st.fleet_counts();
  REQUIRE(after);
  CHECK(dim(*after, "state") == std::map<std::string, int64_t>{{"decommissioned", 1}});
  // Following again changes nothing.
  REQUIRE(st.db().exec("INSERT INTO directory_outbox (device_id, kind, cell, from_cell) "
                       "VALUES ('d-gone', 'decommissioned', 0, 0)"));
  REQUIRE(follow_directory_outbox(st, [&](int) -> DeviceStore& { return st; }));
  CHECK(row() == "decommissioned 0 1");
  check_counts_agree(st);
}

// An outbox from before entries carried their writer keeps what it holds,
// as not this hub's (nothing said so then), and local writes mark theirs.
TEST_CASE("a directory outbox from before the local mark keeps its entries at open", "[unit][hub][views]") {
  TempDir dir;
  const std::string path = (dir.path() / "hub.db").string();
  {
    auto s = Store::open(path);
    REQUIRE(s);
    DeviceRecord d;
    d.id = "d-old";
    d.labels = {{"region", "eu"}};
    d.public_key_hex = "00";
    REQUIRE((*s)->upsert_enrolled_device(d));
    REQUIRE((*s)->db().exec("ALTER TABLE directory_outbox DROP COLUMN local"));
  }
  auto s = Store::open(path);
  REQUIRE(s);
  auto before = (*s)->directory_outbox(10);
  REQUIRE(before);
  REQUIRE(before->size() == 1);
  CHECK(before->front().device_id == "d-old");
  CHECK(before->front().kind == DirectoryChange::Kind::labelled);
  CHECK_FALSE(before->front().local);
  // A local write marks only the entries it made.
  {
    sql::Transaction tx((*s)->db());
    REQUIRE((*s)->local_directory_write([&] { return (*s)->set_device_labels("d-old", {{"region", "us"}}); }));
    REQUIRE(tx.commit());
  }
  auto after = (*s)->directory_outbox(10);
  REQUIRE(after);
  REQUIRE(after->size() == 2);
  CHECK_FALSE(after->front().local);
  CHECK(after->back().local);
  CHECK(after->back().device_id == "d-old");
}

TEST_CASE("a store from before the read models gets them built from its rows at open", "[unit][hub][views]") {
  TempDir dir;
  const std::string path = (dir.path() / "hub.db").string();
  {
    auto s = Store::open(path);
    REQUIRE(s);
    for (int i = 0; i < 20; ++i) {
      DeviceRecord d;
      d.id = "d-" + std::to_string(i);
      d.labels = {{"region", i < 5 ? "eu" : "us"}};
      d.public_key_hex = "00";
      REQUIRE((*s)->upsert_enrolled_device(d));
    }
    // What an older hub left: no read-model tables, no triggers.
    REQUIRE((*s)->db().exec("DROP TABLE fleet_counts; DROP TABLE directory_counts; DROP TABLE device_labels;"
                            "DROP TABLE aggregate_schema; DROP TRIGGER fleet_counts_insert;"
                            "DROP TRIGGER directory_insert;"));
  }
  auto s = Store::open(path);
  REQUIRE(s);
  auto kept = (*s)->fleet_counts();
  REQUIRE(kept);
  CHECK(dim(*kept, "region") == std::map<std::string, int64_t>{{"eu", 5}, {"us", 15}});
  check_counts_agree(**s);
  auto labels = (*s)->db().prepare("SELECT COUNT(*) FROM device_labels WHERE key = 'region' AND value = 'eu'");
  REQUIRE(labels);
  REQUIRE(*labels->step());
  CHECK(labels->col_int(0) == 5);
}

TEST_CASE("a device's failures are kept, the last ten, and no other report adds one", "[unit][hub][views]") {
  Stores s;
  DeviceRecord d = s.enroll("d-out", {});
  auto report = [&](const std::string& state, const std::string& reason = "") {
    d.state = state;
    d.last_reason = reason;
    d.last_message = reason.empty() ? "" : "because " + reason;
    d.last_seq += 1;
    d.last_seen_ms += 1000;
    s.save(d);
  };
  for (const char* st : {"verifying", "downloading", "installing", "health_check", "applied", "idle"}) report(st);
  CHECK(s.rows("SELECT COUNT(*) FROM device_events") == 0);
  report("rolling_back", "health_gate_failed");  // a new reason
  report("rolled_back", "health_gate_failed");   // a failed end
  report("downloading");
  report("applied");
  report("refused", "bad_signature");
  auto detail = s.agg->device("d-out");
  REQUIRE(detail);
  REQUIRE(*detail);
  const auto& f = (*detail)->failures;
  REQUIRE(f.size() == 3);
  CHECK(f[0].state == "refused");
  CHECK(f[0].reason == "bad_signature");
  CHECK(f[1].state == "rolled_back");
  CHECK(f[2].state == "rolling_back");
  CHECK(f[2].message == "because health_gate_failed");
  // A presence change (no new report) adds nothing.
  d.online = !d.online;
  s.save(d);
  CHECK(s.rows("SELECT COUNT(*) FROM device_events") == 3);
  for (int i = 0; i < 12; ++i) {
    report("downloading");
    report("failed", i % 2 ? "download_failed" : "disk_full");
  }
  CHECK(s.rows("SELECT COUNT(*) FROM device_events WHERE device_id = 'd-out'") == kDeviceOutcomesKept);
  detail = s.agg->device("d-out");
  REQUIRE(detail);
  CHECK((*detail)->failures.front().reason == "download_failed");
  CHECK((*detail)->failures.front().seq == d.last_seq);
}

namespace {

// The brute-force answer: every device row, filtered and ordered in C++.
std::vector<std::string> expected_ids(Store& store, const DeviceQuery& q,
                                      const std::map<std::string, int64_t>& cert) {
  auto all = store.list_devices();
  REQUIRE(all);
  std::vector<DeviceRecord> keep;
  for (const auto& d : *all) {
    if (q.project != "*" && d.project != q.project) continue;
    if (!q.state.empty() && d.state != q.state) continue;
    if (q.state.empty() && !q.include_decommissioned && d.state == "decommissioned") continue;
    if (q.online && d.online != *q.online) continue;
    if (q.bundle && d.applied_bundle != *q.bundle) continue;
    if (q.bundle && q.version && d.applied_version != *q.version) continue;
    if (q.k3s && d.k3s_version != *q.k3s) continue;
    if (!q.selector.matches(d.labels)) continue;
    if (!q.text.empty()) {
      const std::string& col = q.text.rfind("d-", 0) == 0 ? d.id : d.hostname;
      if (col.rfind(q.text, 0) != 0) continue;
    }
    if (q.cert_before_unix || q.sort == DeviceSort::cert_expiry) {
      auto c = cert.find(d.id);
      if (c == cert.end() || c->second <= 0) continue;
      if (q.cert_before_unix && c->second >= *q.cert_before_unix) continue;
    }
    keep.push_back(d);
  }
  DeviceSort sort = q.sort;
  if (!q.text.empty()) sort = q.text.rfind("d-", 0) == 0 ? DeviceSort::id : DeviceSort::hostname;
  else if (q.cert_before_unix) sort = DeviceSort::cert_expiry;
  auto key = [&](const DeviceRecord& d) {
    switch (sort) {
      case DeviceSort::hostname: return std::make_pair(d.hostname, d.id);
      case DeviceSort::enrolled: return std::make_pair(std::to_string(1'000'000'000'000 + d.enrolled_ms), d.id);
      case DeviceSort::cert_expiry: return std::make_pair(std::to_string(cert.at(d.id)), d.id);
      default: return std::make_pair(d.id, d.id);
    }
  };
  std::sort(keep.begin(), keep.end(), [&](const DeviceRecord& a, const DeviceRecord& b) {
    return q.descending ? key(b) < key(a) : key(a) < key(b);
  });
  std::vector<std::string> ids;
  for (const auto& d : keep) ids.push_back(d.id);
  return ids;
}

// Follows the cursors to the end, checking each page's bounds.
std::vector<std::string> all_pages(AggregateStore& agg, DeviceQuery q, std::string* index = nullptr) {
  std::vector<std::string> ids;
  for (int pages = 0; pages < 1000; ++pages) {
    auto p = agg.devices(q);
    REQUIRE(p);
    CHECK(static_cast<int64_t>(p->items.size()) <= q.limit);
    CHECK(p->scanned <= q.scan_limit);
    if (index) *index = p->index;
    for (const auto& d : p->items) ids.push_back(d.id);
    if (p->next.empty()) {
      CHECK(p->complete);
      return ids;
    }
    q.after = p->next;
  }
  FAIL("the cursors never ended");
  return ids;
}

}  // namespace

TEST_CASE("device lists filter, order and page in the store exactly as a filter over every row would",
          "[unit][hub][views]") {
  Stores s;
  std::mt19937 rng(11);
  std::map<std::string, int64_t> cert;
  const std::vector<std::string> states = {"idle", "applied", "failed", "downloading", "refused", "rolled_back"};
  for (int i = 0; i < 240; ++i) {
    char id[32];
    std::snprintf(id, sizeof id, "d-%02x%04d", static_cast<unsigned>(rng() % 256), i);
    Labels l{{"env", i % 3 ? "prod" : "dev"}, {"region", i % 4 ? "eu" : "us"}};
    if (i % 5 == 0) l["gpu"] = "yes";
    DeviceRecord d = s.enroll(id, l, i % 7 == 0 ? "blue" : "default",
                              "shop-" + std::to_string(rng() % 50) + "-" + std::to_string(i),
                              static_cast<int64_t>(rng() % 100000));
    d.state = states[rng() % states.size()];
    d.online = rng() % 5 != 0;
    d.applied_bundle = rng() % 4 ? "edge" : "";
    d.applied_version = d.applied_bundle.empty() ? 0 : 1 + rng() % 2;
    d.k3s_version = rng() % 3 ? "v1.30" : "";
    d.last_seq = 1;
    s.save(d);
    if (rng() % 3) {
      DeviceInventory inv;
      inv.cert_expiry_unix = 1'800'000'000 + static_cast<int64_t>(rng() % 1000) * 3600;
      REQUIRE(s.store->save_device_inventory(id, inv));
      cert[id] = inv.cert_expiry_unix;
    }
  }
  REQUIRE(test::decommission(*s.store, s.store->list_devices()->at(5).id));
  follow(*s.store);

  auto sel = [](const std::string& text) {
    auto p = Selector::parse(text);
    REQUIRE(p);
    return *p;
  };
  struct Case {
    std::string name;
    DeviceQuery q;
    std::string index;  // the index that must drive it ("" = any)
  };
  std::vector<Case> cases;
  auto add = [&](const std::string& name, auto set, const std::string& index = "") {
    DeviceQuery q;
    q.limit = 7;
    q.scan_limit = 1000;
    set(q);
    cases.push_back({name, q, index});
  };
  add("everything", [](DeviceQuery&) {}, "devices primary key");
  add("everything, descending", [](DeviceQuery& q) { q.descending = true; });
  add("with decommissioned", [](DeviceQuery& q) { q.include_decommissioned = true; });
  add("project blue", [](DeviceQuery& q) { q.project = "blue"; });
  add("label equality drives", [&](DeviceQuery& q) { q.selector = sel("region=us"); }, "device_labels");
  add("selector mix", [&](DeviceQuery& q) { q.selector = sel("env in (prod),region!=us,!gpu"); }, "device_labels");
  add("selector notin and exists", [&](DeviceQuery& q) { q.selector = sel("env notin (dev),gpu"); });
  add("failed devices", [](DeviceQuery& q) { q.state = "failed"; }, "device_trouble");
  add("refused, project default", [](DeviceQuery& q) {
    q.state = "refused";
    q.project = "default";
  }, "device_trouble");
  add("applied (no index of its own)", [](DeviceQuery& q) { q.state = "applied"; });
  add("offline", [](DeviceQuery& q) { q.online = false; }, "devices_offline");
  add("online", [](DeviceQuery& q) { q.online = true; });
  add("bundle and version", [](DeviceQuery& q) {
    q.bundle = "edge";
    q.version = 2;
  });
  add("nothing applied", [](DeviceQuery& q) { q.bundle = ""; });
  add("k3s not reported", [](DeviceQuery& q) { q.k3s = ""; });
  add("by hostname", [](DeviceQuery& q) { q.sort = DeviceSort::hostname; }, "devices_hostname");
  add("by hostname, descending", [](DeviceQuery& q) {
    q.sort = DeviceSort::hostname;
    q.descending = true;
  }, "devices_hostname");
  add("by enrollment", [](DeviceQuery& q) { q.sort = DeviceSort::enrolled; }, "devices_enrolled");
  add("by enrollment, newest first, failed", [](DeviceQuery& q) {
    q.sort = DeviceSort::enrolled;
    q.descending = true;
    q.state = "failed";
  }, "devices_enrolled");
  add("hostname prefix", [](DeviceQuery& q) { q.text = "shop-1"; }, "devices_hostname");
  add("id prefix", [](DeviceQuery& q) { q.text = "d-a"; }, "devices primary key");
  add("certificates expiring", [](DeviceQuery& q) { q.cert_before_unix = 1'800'000'000 + 300 * 3600; },
      "device_inventory_cert");
  add("by certificate expiry", [](DeviceQuery& q) { q.sort = DeviceSort::cert_expiry; }, "device_inventory_cert");
  add("a small scan budget", [](DeviceQuery& q) {
    q.state = "downloading";
    q.scan_limit = 13;
  });
  for (const auto& c : cases) {
    INFO(c.name);
    std::string index;
    const auto got = all_pages(*s.agg, c.q, &index);
    const auto want = expected_ids(*s.store, c.q, cert);
    CHECK(got == want);
    if (!c.index.empty()) CHECK(index == c.index);
    // Guards against a filter that quietly matches nothing.
    if (c.name != "nothing applied" && c.name != "k3s not reported") CHECK_FALSE(want.empty());
  }
}

TEST_CASE("a device list stops at its scan budget and says where to carry on", "[unit][hub][views]") {
  Stores s;
  for (int i = 0; i < 100; ++i) {
    DeviceRecord d = s.enroll("d-" + std::to_string(1000 + i), {});
    d.state = i == 95 ? "downloading" : "idle";
    s.save(d);
  }
  DeviceQuery q;
  q.state = "downloading";
  q.scan_limit = 30;
  auto p = s.agg->devices(q);
  REQUIRE(p);
  CHECK(p->items.empty());
  CHECK(p->scanned == 30);
  CHECK_FALSE(p->complete);
  REQUIRE_FALSE(p->next.empty());
  std::vector<std::string> found;
  int requests = 1;
  while (!p->next.empty()) {
    q.after = p->next;
    p = s.agg->devices(q);
    REQUIRE(p);
    ++requests;
    for (const auto& d : p->items) found.push_back(d.id);
  }
  CHECK(found == std::vector<std::string>{"d-1095"});
  CHECK(requests == 4);
}

TEST_CASE("a device list refuses a cursor it did not give out, or one of another order", "[unit][hub][views]") {
  Stores s;
  for (int i = 0; i < 5; ++i) s.enroll("d-" + std::to_string(i), {});
  DeviceQuery q;
  q.limit = 2;
  auto p = s.agg->devices(q);
  REQUIRE(p);
  REQUIRE_FALSE(p->next.empty());
  for (const std::string& bad : std::vector<std::string>{"zz", "5b5d", to_hex(std::string(R"(["id", {"x": 1}])")),
                                                         std::string(5000, 'a')}) {
    INFO(bad);
    DeviceQuery b = q;
    b.after = bad;
    auto r = s.agg->devices(b);
    REQUIRE_FALSE(r);
    CHECK(r.error().code == Errc::invalid_argument);
  }
  DeviceQuery other = q;
  other.sort = DeviceSort::hostname;
  other.after = p->next;
  auto r = s.agg->devices(other);
  REQUIRE_FALSE(r);
  CHECK_THAT(r.error().message, Catch::Contains("another order"));
}

// A sample the store was too busy for (a million-device campaign's rows
// being written) is skipped with a retryable error, and the next one still
// gives a campaign that ended before the skipped call its last point.
TEST_CASE("a timeline point the store was busy for is skipped, and a campaign that ended meanwhile keeps its end",
          "[unit][hub][views]") {
  Stores s;
  s.enroll("d-0", {});
  CampaignRecord c = s.running_campaign("c-1", {{"d-0", 0.5, 0, ""}}, 1000);
  REQUIRE(s.agg->sample_campaigns(2000));
  c.state = CampaignState::completed;
  c.updated_ms = 2500;
  REQUIRE(s.store->update_campaign(c));
  {
    // Another writer holds the store (past the 5 s busy timeout).
    sql::Transaction busy(s.store->db());
    REQUIRE(busy.ok());
    auto skipped = s.agg->sample_campaigns(10000);
    REQUIRE_FALSE(skipped);
    CHECK(skipped.error().retryable);
    CHECK_THAT(skipped.error().message, Catch::Contains("busy"));
  }
  REQUIRE(s.agg->sample_campaigns(11000));
  auto t = s.agg->timeline("c-1");
  REQUIRE(t);
  REQUIRE(t->size() == 2);
  CHECK(t->back().time_ms == 2500);
  CHECK(t->back().state == "completed");
}

TEST_CASE("the campaign timeline samples running campaigns, ends with the campaign and stays bounded",
          "[unit][hub][views]") {
  AggregateStore::Config cfg;
  cfg.max_samples = 10;
  Stores s(cfg);
  for (int i = 0; i < 4; ++i) s.enroll("d-" + std::to_string(i), {});
  std::vector<Store::CampaignMember> members;
  for (int i = 0; i < 4; ++i) members.push_back({"d-" + std::to_string(i), 0.1 * i, 0, ""});
  CampaignRecord c = s.running_campaign("c-1", members, 1000);
  REQUIRE(s.agg->sample_campaigns(2000));
  auto set_status = [&](const std::string& dev, const std::string& status) {
    auto row = s.store->campaign_device("c-1", dev);
    REQUIRE(row);
    REQUIRE(*row);
    auto r = **row;
    r.status = status;
    REQUIRE(s.store->save_campaign_device(r));
  };
  set_status("d-0", "applied");
  set_status("d-1", "failed");
  REQUIRE(s.agg->sample_campaigns(3000));
  auto t = s.agg->timeline("c-1");
  REQUIRE(t);
  REQUIRE(t->size() == 2);
  CHECK((*t)[0].waiting == 4);
  CHECK((*t)[1].applied == 1);
  CHECK((*t)[1].failed == 1);
  CHECK((*t)[1].waiting == 2);
  CHECK((*t)[1].total == 4);
  // Many samples later the count stays at most max_samples, first and last kept.
  for (int k = 0; k < 40; ++k) REQUIRE(s.agg->sample_campaigns(4000 + k * 1000));
  t = s.agg->timeline("c-1");
  REQUIRE(t);
  CHECK(t->size() <= 10);
  CHECK(t->front().time_ms == 2000);
  CHECK(t->back().time_ms == 43000);
  // It ends: one last point at the time it ended, then no more.
  set_status("d-2", "applied");
  set_status("d-3", "applied");
  c.state = CampaignState::completed;
  c.updated_ms = 43500;
  REQUIRE(s.store->update_campaign(c));
  REQUIRE(s.agg->sample_campaigns(44000));
  REQUIRE(s.agg->sample_campaigns(45000));
  t = s.agg->timeline("c-1");
  REQUIRE(t);
  CHECK(t->back().time_ms == 43500);
  CHECK(t->back().state == "completed");
  CHECK(t->back().applied == 3);
  // A new reader (the hub restarted) adds nothing to an ended campaign.
  auto again = AggregateStore::open((s.dir.path() / "hub.db").string(), cfg);
  REQUIRE(again);
  REQUIRE((*again)->sample_campaigns(90000));
  auto t2 = (*again)->timeline("c-1");
  REQUIRE(t2);
  CHECK(t2->size() == t->size());
}

TEST_CASE("a campaign's offline devices are the same whichever walk finds them", "[unit][hub][views]") {
  Stores s;
  std::vector<Store::CampaignMember> members;
  for (int i = 0; i < 40; ++i) {
    DeviceRecord d = s.enroll("d-" + std::to_string(100 + i), {});
    d.online = i % 3 != 0;  // 14 offline
    s.save(d);
    if (i < 30) members.push_back({d.id, 0.01 * i, 0, ""});
  }
  s.running_campaign("c-away", members, 0);
  auto row = s.store->campaign_device("c-away", "d-103");  // offline; finished: not away
  REQUIRE(row);
  REQUIRE(*row);
  auto r = **row;
  r.status = "applied";
  REQUIRE(s.store->save_campaign_device(r));
  std::vector<std::string> want;
  for (int i = 0; i < 30; ++i) {
    if (i % 3 == 0 && i != 3) want.push_back("d-" + std::to_string(100 + i));
  }
  auto by_campaign = s.agg->away("c-away", 100, 9, 29, 1000);
  auto by_offline = s.agg->away("c-away", 100, 9, 29, 14);
  REQUIRE(by_campaign);
  REQUIRE(by_offline);
  CHECK(*by_campaign == want);
  CHECK(*by_offline == want);
  auto first = s.agg->away("c-away", 3, 9, 29, 14);
  REQUIRE(first);
  CHECK(*first == std::vector<std::string>(want.begin(), want.begin() + 3));
  CHECK(s.agg->away("c-away", 3, 0, 29, 14)->empty());
}

// A store from while issue 15 was half done kept the inventory twice: nine
// columns of the devices row and device_inventory. Opening it moves the
// columns' values into device_inventory and drops them; nothing is lost.
TEST_CASE("opening a store that kept inventory in the devices row moves it into device_inventory",
          "[unit][hub][aggregates][inventory]") {
  TempDir dir;
  const std::string path = (dir.path() / "hub.db").string();
  const char* moved[] = {"k3s_role", "cluster_id", "k3s_cert_expiry_unix", "os", "disk_free_bytes",
                         "disk_total_bytes", "mem_free_bytes", "mem_total_bytes", "clock_suspect"};
  auto columns = [](Store& s, const std::string& table) {
    auto r = sql::query<std::string>(s.db(), "SELECT name FROM pragma_table_info('" + table + "') ORDER BY name",
                                     [](const sql::Stmt& st) { return st.col_text(0); });
    REQUIRE(r);
    return std::set<std::string>(r->begin(), r->end());
  };
  {
    // Make the old layout from a current store: the columns back on
    // devices, the ones device_inventory gained taken off it.
    auto s = Store::open(path);
    REQUIRE(s);
    Store& st = **s;
    for (const char* id : {"d-both", "d-row-only", "d-none", "d-gone"}) {
      DeviceRecord d;
      d.id = id;
      d.labels = {{"env", "prod"}};
      d.public_key_hex = "00";
      d.hostname = std::string("host-") + id;
      d.arch = "arm64";
      d.agent_version = "0.1.0";
      d.enrolled_ms = 1000;
      REQUIRE(st.upsert_enrolled_device(d));
    }
    for (const char* decl :
         {"k3s_role TEXT NOT NULL DEFAULT ''", "cluster_id TEXT NOT NULL DEFAULT ''",
          "k3s_cert_expiry_unix INTEGER NOT NULL DEFAULT 0", "os TEXT NOT NULL DEFAULT ''",
          "disk_free_bytes INTEGER NOT NULL DEFAULT 0", "disk_total_bytes INTEGER NOT NULL DEFAULT 0",
          "mem_free_bytes INTEGER NOT NULL DEFAULT 0", "mem_total_bytes INTEGER NOT NULL DEFAULT 0",
          "clock_suspect INTEGER NOT NULL DEFAULT 0"}) {
      REQUIRE(st.db().exec(std::string("ALTER TABLE devices ADD COLUMN ") + decl));
    }
    REQUIRE(st.db().exec("DROP INDEX device_inventory_clock_suspect"));  // made with the column
    for (const char* c : {"k3s_role", "cluster_id", "disk_total_bytes", "mem_total_bytes", "clock_suspect"}) {
      REQUIRE(st.db().exec(std::string("ALTER TABLE device_inventory DROP COLUMN ") + c));
    }
    // What the old hub wrote: every report into the row, an inventory
    // report into device_inventory too (not for d-row-only: reported
    // before device_inventory existed).
    REQUIRE(st.db().exec(
        "UPDATE devices SET last_seen_ms = 7000, k3s_role = 'agent', cluster_id = 'line-1', "
        "k3s_cert_expiry_unix = 1800000000, os = 'Linux 6.1', disk_free_bytes = 1000, disk_total_bytes = 8000, "
        "mem_free_bytes = 200, mem_total_bytes = 900, clock_suspect = 1 WHERE id IN ('d-both', 'd-row-only')"));
    REQUIRE(st.db().exec(
        "INSERT INTO device_inventory (device_id, project, os, cert_expiry_unix, disk_free_bytes, mem_free_bytes, "
        "updated_ms) VALUES ('d-both', 'default', 'Linux 6.1', 1800000000, 1000, 200, 5000)"));
    REQUIRE(test::decommission(st, "d-gone"));
    REQUIRE(st.db().exec("UPDATE devices SET os = 'Linux', disk_free_bytes = 5 WHERE id = 'd-gone'"));
    CHECK(columns(st, "devices").count("clock_suspect") == 1);
    CHECK(columns(st, "device_inventory").count("clock_suspect") == 0);
  }
  auto s = Store::open(path);
  REQUIRE(s);
  Store& st = **s;
  // One place: the devices row has none of the columns any more.
  const auto dev_cols = columns(st, "devices");
  for (const char* c : moved) {
    INFO(c);
    CHECK(dev_cols.count(c) == 0);
  }
  for (const char* id : {"d-both", "d-row-only"}) {
    INFO(id);
    auto d = st.get_device(id);
    REQUIRE(d);
    REQUIRE(*d);
    const auto& inv = (*d)->inventory;
    CHECK(inv.k3s_role == "agent");
    CHECK(inv.cluster_id == "line-1");
    CHECK(inv.cert_expiry_unix == 1'800'000'000);
    CHECK(inv.os == "Linux 6.1");
    CHECK(inv.disk_free_bytes == 1000);
    CHECK(inv.disk_total_bytes == 8000);
    CHECK(inv.mem_free_bytes == 200);
    CHECK(inv.mem_total_bytes == 900);
    CHECK(inv.clock_suspect);
    // The existing row keeps its time; one made from the devices row has the
    // device's last report's.
    CHECK(inv.updated_ms == (std::string(id) == "d-both" ? 5000 : 7000));
  }
  auto none = st.get_device("d-none");
  REQUIRE(none);
  REQUIRE(*none);
  CHECK((*none)->inventory.updated_ms == 0);
  CHECK((*none)->inventory.os.empty());
  // A decommissioned device has no inventory, as before.
  auto gone = st.get_device("d-gone");
  REQUIRE(gone);
  REQUIRE(*gone);
  CHECK((*gone)->inventory.updated_ms == 0);
  // The certificate-day counts include the row made from the devices row.
  check_counts_agree(st);
  auto counts = st.fleet_counts();
  REQUIRE(counts);
  CHECK(dim(*counts, "cert_day")[std::to_string(1'800'000'000 / 86400)] == 2);
  // The next open finds nothing to move and changes nothing.
  s->reset();
  auto again = Store::open(path);
  REQUIRE(again);
  auto d = (*again)->get_device("d-row-only");
  REQUIRE(d);
  REQUIRE(*d);
  CHECK((*d)->inventory.disk_total_bytes == 8000);
}

// The campaign and bundle lists (one clause builder with the device list):
// newest first, ties by id, only the caller's project ("*" all of them),
// the campaign state filter, and a cursor that walks every row once.
TEST_CASE("campaign and bundle lists page newest first within a project, each row once", "[unit][hub][views]") {
  Stores s;
  struct Row {
    std::string id, project;
    int64_t ms;
    std::string state;
  };
  // Two pairs share a time: the id decides their order.
  const std::vector<Row> rows = {{"a1", "default", 1000, "running"}, {"a2", "default", 2000, "paused"},
                                 {"a3", "default", 2000, "running"}, {"a4", "default", 3000, "running"},
                                 {"a5", "default", 5000, "completed"}, {"o1", "other", 2000, "running"},
                                 {"o2", "other", 4000, "running"},   {"o3", "other", 4000, "paused"}};
  for (const auto& r : rows) {
    BundleRecord b;
    b.id = "b-" + r.id;
    b.digest = "digest-" + r.id;
    b.project = r.project;
    b.name = "edge-" + r.id;
    b.version = 1;
    b.envelope = "x";
    b.uploaded_ms = r.ms;
    REQUIRE(s.store->insert_bundle(b));
    CampaignRecord c;
    c.id = "c-" + r.id;
    c.bundle_id = b.id;
    c.project = r.project;
    c.state = *campaign_state_from(r.state);
    c.created_ms = c.updated_ms = r.ms;
    REQUIRE(s.store->insert_campaign(c, {}));
  }
  // What a filter over every row, sorted newest first, gives.
  auto expected = [&](const std::string& prefix, const std::string& project, const std::string& state) {
    std::vector<Row> want;
    for (const auto& r : rows) {
      if ((project == "*" || r.project == project) && (state.empty() || r.state == state)) want.push_back(r);
    }
    std::sort(want.begin(), want.end(), [](const Row& a, const Row& b) { return a.ms != b.ms ? a.ms > b.ms : a.id > b.id; });
    std::vector<std::string> ids;
    for (const auto& r : want) ids.push_back(prefix + r.id);
    return ids;
  };
  for (const std::string project : {"default", "other", "*"}) {
    for (const int64_t limit : {1, 2, 3, 100}) {
      INFO(project << " limit " << limit);
      std::vector<std::string> got;
      std::string after;
      for (int pages = 0; pages < 20; ++pages) {
        auto page = s.agg->bundles(project, after, limit);
        REQUIRE(page);
        CHECK(static_cast<int64_t>(page->items.size()) <= limit);
        for (const auto& b : page->items) got.push_back(b.id);
        if (page->next.empty()) break;
        after = page->next;
      }
      CHECK(got == expected("b-", project, ""));
      for (const std::string state : {"", "running", "paused"}) {
        INFO("state '" << state << "'");
        std::vector<std::string> camps;
        std::string cafter;
        for (int pages = 0; pages < 20; ++pages) {
          auto page = s.agg->campaigns(project, state, cafter, limit);
          REQUIRE(page);
          for (const auto& c : page->items) camps.push_back(c.campaign.id);
          if (page->next.empty()) break;
          cafter = page->next;
        }
        CHECK(camps == expected("c-", project, state));
      }
    }
  }
  CHECK_FALSE(s.agg->bundles("default", "not-a-cursor", 2));
  CHECK_FALSE(s.agg->campaigns("default", "", "12", 2));
}

// ADR 18: with a file per cell, the directory (hub.db) and each cell's copy
// of its devices are apart, and a trigger can only follow the columns of its
// own side. So a trigger on devices that keeps a report-side table is named
// on no directory column, and one that keeps a directory table on no report
// column; none keeps both. (Inserts and deletes name no column: enrollment's
// insert still feeds both sides' counts, which the per-cell files change.)
TEST_CASE("each side's update triggers on devices are named only on that side's columns", "[unit][hub][views]") {
  Stores s;
  const std::set<std::string> directory_columns = {"project",  "labels",           "public_key", "enrolled_ms",
                                                   "gateway",  "enroll_issued_ms", "cell",       "decommissioned"};
  const std::set<std::string> report_columns = {"state",       "online",        "applied_bundle", "applied_version",
                                                "k3s_version", "agent_version", "last_seen_ms",   "last_seq"};
  const std::vector<std::string> directory_tables = {"directory_counts", "device_labels", "directory_outbox",
                                                     "device_broker_cert"};
  const std::vector<std::string> report_tables = {"fleet_counts",    "device_trouble", "campaign_counts",
                                                  "campaign_devices", "device_events", "device_inventory"};
  struct Trigger {
    std::string name, sql;
  };
  auto triggers = sql::query<Trigger>(
      s.store->db(), "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'devices'",
      [](const sql::Stmt& st) { return Trigger{st.col_text(0), st.col_text(1)}; });
  REQUIRE(triggers);
  auto writes_any = [](const std::string& body, const std::vector<std::string>& tables) {
    return std::any_of(tables.begin(), tables.end(), [&](const std::string& t) {
      for (const char* verb : {"INSERT INTO ", "INSERT OR IGNORE INTO ", "UPDATE ", "DELETE FROM "}) {
        if (body.find(verb + t + " ") != std::string::npos || body.find(verb + t + "\n") != std::string::npos) return true;
      }
      return false;
    });
  };
  int checked = 0;
  for (const auto& t : *triggers) {
    CAPTURE(t.name);
    const auto of = t.sql.find("UPDATE OF ");
    const auto on = t.sql.find(" ON devices");
    if (of == std::string::npos || on == std::string::npos || of > on) continue;  // insert, delete
    std::set<std::string> named;
    std::string list = t.sql.substr(of + 10, on - of - 10);
    for (size_t at = 0; at <= list.size();) {
      size_t end = list.find(',', at);
      if (end == std::string::npos) end = list.size();
      std::string col = list.substr(at, end - at);
      col.erase(0, col.find_first_not_of(' '));
      col.erase(col.find_last_not_of(' ') + 1);
      if (!col.empty()) named.insert(col);
      at = end + 1;
    }
    const std::string body = t.sql.substr(t.sql.find("BEGIN"));
    const bool directory_side = writes_any(body, directory_tables);
    const bool report_side = writes_any(body, report_tables);
    CHECK_FALSE((directory_side && report_side));
    for (const auto& col : named) {
      CAPTURE(col);
      if (report_side) CHECK(directory_columns.count(col) == 0);
      if (directory_side) CHECK(report_columns.count(col) == 0);
    }
    if (directory_side || report_side) ++checked;
  }
  // fleet_counts_state, _reported, device_trouble_update, the three
  // presence triggers of campaigns, device_events_record; directory_labels,
  // _decommission and _moved.
  CHECK(checked >= 10);
}
