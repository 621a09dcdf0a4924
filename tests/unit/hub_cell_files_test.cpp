// [unit] A cell's own device file (ADR 18, slice 7): what it refuses to be
// opened as, the copies of its devices' directory columns that the hub
// keeps in it, and "the directory decides" at open (reconcile_cell_file),
// on real SQLite files.
#include <catch2/catch.hpp>

#include <algorithm>
#include <filesystem>
#include <functional>
#include <future>
#include <mutex>
#include <thread>
#include <memory>

#include "flotilla/common/sqlite.hpp"
#include "flotilla/hub/store.hpp"
#include "flotilla/hub/store_mutex.hpp"
#include "tests/support/store_helpers.hpp"
#include "tests/support/temp_dir.hpp"

using namespace flotilla;
using namespace flotilla::hub;
using flotilla::test::TempDir;

namespace {

DeviceRecord enrolled(const std::string& id, int cell, Labels labels = {{"env", "prod"}}) {
  DeviceRecord d;
  d.id = id;
  d.project = "default";
  d.labels = std::move(labels);
  d.public_key_hex = "00ff";
  d.hostname = "host-" + id;
  d.arch = "arm64";
  d.agent_version = "1.2.3";
  d.enrolled_ms = 5000;
  d.cell = cell;
  return d;
}

DeviceDirectoryEntry entry_of(Store& directory, const std::string& id) {
  auto e = directory.directory_entry(id);
  REQUIRE(e);
  REQUIRE(e->has_value());
  return **e;
}

int64_t count(Store& s, const std::string& sql_text) {
  auto n = sql::query<int64_t>(s.db(), sql_text, [](const sql::Stmt& st) { return st.col_int(0); });
  REQUIRE(n);
  REQUIRE(n->size() == 1);
  return n->front();
}

std::vector<std::string> all_ids(DeviceStore& s) {
  auto ids = s.device_ids("", 1000);
  REQUIRE(ids);
  return *ids;
}

// A campaign record (and its bundle) in the directory's store.
void record_campaign(Store& directory, const std::string& id) {
  REQUIRE(directory.insert_bundle(test::stand_in_bundle()));
  REQUIRE(directory.insert_campaign_record(test::running_record(id, 0)));
}

// The trigger-kept counts equal the ones grouped from the rows.
void check_counts_exact(Store& s, const std::vector<std::string>& campaigns, int cell) {
  auto kept = s.fleet_counts();
  auto recount = s.recount_fleet();
  REQUIRE(kept);
  REQUIRE(recount);
  CHECK(*kept == *recount);
  for (const auto& c : campaigns) {
    auto k = s.campaign_counts(c, cell);
    auto r = s.recount_campaign(c, cell);
    REQUIRE(k);
    REQUIRE(r);
    CHECK(*k == *r);
  }
}

// hub.db and one file per cell, as a hub with per-cell files opens them.
struct CellFiles {
  TempDir dir;
  std::unique_ptr<Store> directory;
  std::vector<std::unique_ptr<Store>> files;
  explicit CellFiles(int cells) {
    auto d = Store::open((dir.path() / "hub.db").string());
    REQUIRE(d);
    directory = std::move(*d);
    for (int i = 0; i < cells; ++i) files.push_back(test::open_cell_file(dir.path(), i));
  }
  Store& file(int cell) { return *files[static_cast<size_t>(cell)]; }
  int64_t follow(const std::function<Status(const DirectoryChange&)>& on_labelled = {}) {
    auto n = follow_directory_outbox(
        *directory, [&](int cell) -> DeviceStore& { return file(cell); }, on_labelled, true);
    REQUIRE(n);
    return *n;
  }
  std::vector<std::string> ids(int cell) { return all_ids(file(cell)); }
};

}  // namespace

// What made enrollment at 1M devices slow (bench/enroll_store): statement
// journals spilled to temporary files, and a checkpoint every 4 MiB of WAL.
TEST_CASE("the store's writers keep statement journals in memory and checkpoint every 64 MiB of WAL",
          "[unit][hub][cells][store]") {
  TempDir dir;
  auto pragma = [](Store& s, const char* name) {
    auto st = s.db().prepare(std::string("PRAGMA ") + name);
    REQUIRE(st);
    auto row = st->step();
    REQUIRE(row);
    REQUIRE(*row);
    return st->col_int(0);
  };
  auto hub = Store::open((dir.path() / "hub.db").string());
  REQUIRE(hub);
  auto cell = test::open_cell_file(dir.path(), 0);
  for (Store* s : {hub->get(), cell.get()}) {
    CHECK(pragma(*s, "temp_store") == 2);  // MEMORY
    CHECK(pragma(*s, "wal_autocheckpoint") == 16384);
    CHECK(pragma(*s, "journal_size_limit") == 64 << 20);
  }
}

TEST_CASE("a cell's device file is refused as hub.db or another cell's, and hub.db as a cell's",
          "[unit][hub][cells][store]") {
  TempDir dir;
  const auto hub_db = (dir.path() / "hub.db").string();
  const auto cell_db = (dir.path() / "cell-1.db").string();
  {
    auto hub = Store::open(hub_db);
    REQUIRE(hub);
    REQUIRE((*hub)->upsert_enrolled_device(enrolled("d-1", 1)));
    auto cell = Store::open_cell(cell_db, 1);
    REQUIRE(cell);
    CHECK((*cell)->own_cell() == 1);
    CHECK((*hub)->own_cell() == -1);
    REQUIRE((*cell)->adopt_device(entry_of(**hub, "d-1")));
  }
  auto as_cell = Store::open_cell(hub_db, 1);
  REQUIRE_FALSE(as_cell);
  CHECK(as_cell.error().code == Errc::conflict);
  CHECK(as_cell.error().message.find("is hub.db, not cell 1's device file") != std::string::npos);
  auto as_hub = Store::open(cell_db);
  REQUIRE_FALSE(as_hub);
  CHECK(as_hub.error().message.find("is cell 1's device file, not hub.db") != std::string::npos);
  auto as_other = Store::open_cell(cell_db, 2);
  REQUIRE_FALSE(as_other);
  CHECK(as_other.error().message.find("not cell 2's device file") != std::string::npos);
  CHECK_FALSE(Store::open_cell(cell_db, -1));

  // A hub.db from before the mark is recognised by what it holds.
  {
    auto hub = Store::open(hub_db);
    REQUIRE(hub);
    TokenRecord t;
    t.id = "t-1";
    t.name = "ops";
    t.role = "admin";
    REQUIRE((*hub)->insert_token("api", t, "hash"));
    REQUIRE((*hub)->db().exec("DROP TABLE store_role"));
  }
  auto old_hub = Store::open_cell(hub_db, 0);
  REQUIRE_FALSE(old_hub);
  CHECK(old_hub.error().message.find("holds tokens") != std::string::npos);

  // Refused opens lost nothing: each file opens as what it is, its rows there.
  auto hub = Store::open(hub_db);
  REQUIRE(hub);
  CHECK((*hub)->count_tokens("api").value() == 1);
  auto cell = Store::open_cell(cell_db, 1);
  REQUIRE(cell);
  auto copy = (*cell)->get_device("d-1");
  REQUIRE(copy);
  REQUIRE(copy->has_value());
  CHECK((*copy)->hostname == "host-d-1");
}

TEST_CASE("a cell's file keeps copies of its devices: the directory's columns, its own reports",
          "[unit][hub][cells][store]") {
  CellFiles cells(2);
  Store& directory = *cells.directory;
  Store& file = cells.file(1);
  REQUIRE(directory.upsert_enrolled_device(enrolled("d-1", 1)));
  REQUIRE(directory.upsert_enrolled_device(enrolled("d-2", 1, {{"env", "dev"}})));
  REQUIRE(directory.upsert_enrolled_device(enrolled("d-9", 2)));

  // Only a cell's own file takes copies, and only of its own cell's devices.
  auto on_hub = directory.adopt_device(entry_of(directory, "d-1"));
  REQUIRE_FALSE(on_hub);
  CHECK(on_hub.error().code == Errc::internal);
  auto other = file.adopt_device(entry_of(directory, "d-9"));
  REQUIRE_FALSE(other);
  CHECK(other.error().message.find("not in this file's cell 1") != std::string::npos);
  CHECK(all_ids(file).empty());

  REQUIRE(file.adopt_device(entry_of(directory, "d-1")));
  REQUIRE(file.adopt_device(entry_of(directory, "d-2")));
  CHECK(all_ids(file) == std::vector<std::string>{"d-1", "d-2"});
  auto copy = file.get_device("d-1");
  REQUIRE(copy);
  REQUIRE(copy->has_value());
  CHECK((*copy)->labels == Labels{{"env", "prod"}});
  CHECK((*copy)->arch == "arm64");
  CHECK((*copy)->agent_version == "1.2.3");
  CHECK((*copy)->cell == 1);
  CHECK((*copy)->state == "enrolled");
  // None of the directory's own tables is written in a cell's file; the
  // file's label index holds its copies' labels (its device walks read it).
  CHECK(count(file, "SELECT COUNT(*) FROM directory_outbox") == 0);
  CHECK(count(file, "SELECT COUNT(*) FROM directory_counts") == 0);
  CHECK(count(file, "SELECT COUNT(*) FROM device_labels WHERE key = 'env' AND value = 'prod' AND device_id = 'd-1'") ==
        1);
  CHECK(count(file, "SELECT COUNT(*) FROM device_labels") == 2);

  // A report goes to the copy; the directory's row keeps what enrollment wrote.
  DeviceRecord report = **copy;
  report.state = "applied";
  report.online = true;
  report.last_seen_ms = 9000;
  report.applied_bundle = "edge";
  report.applied_version = 3;
  REQUIRE(file.save_device_state(report));
  auto dir_row = directory.get_device("d-1");
  REQUIRE(dir_row);
  CHECK((*dir_row)->state == "enrolled");
  CHECK_FALSE((*dir_row)->online);

  // A label change in the directory reaches the copy; its reports stay.
  REQUIRE(directory.set_device_labels("d-1", {{"env", "canary"}}));
  REQUIRE(file.adopt_device(entry_of(directory, "d-1")));
  copy = file.get_device("d-1");
  REQUIRE(copy);
  CHECK((*copy)->labels == Labels{{"env", "canary"}});
  CHECK((*copy)->state == "applied");
  CHECK((*copy)->online);
  CHECK(count(file, "SELECT COUNT(*) FROM device_labels WHERE device_id = 'd-1' AND value = 'canary'") == 1);
  CHECK(count(file, "SELECT COUNT(*) FROM device_labels WHERE device_id = 'd-1' AND value = 'prod'") == 0);
  // Adopting what the copy already holds writes nothing.
  REQUIRE(file.adopt_device(entry_of(directory, "d-1")));
  CHECK(file.db().changes() == 0);

  // Campaign rows need no campaign record here (it is hub.db's).
  CampaignMember m1{"d-1", 0.5, 0, "", 1};
  CampaignMember m2{"d-2", 0.2, 1, "", 1};
  REQUIRE(file.add_campaign_member("c-1", m1, 100));
  REQUIRE(file.add_campaign_member("c-1", m2, 100));
  CHECK(file.campaigns_with_rows().value() == std::vector<std::string>{"c-1"});
  check_counts_exact(file, {"c-1"}, 1);
  CHECK(count(file, "SELECT COALESCE(SUM(n), 0) FROM campaign_counts WHERE campaign_id = 'c-1'") == 2);

  // Forgetting a copy takes its rows and its counts with it.
  DeviceInventory inv;
  inv.os = "debian";
  inv.cert_expiry_unix = 1'800'000'000;
  REQUIRE(file.save_device_inventory("d-1", inv));
  REQUIRE(file.forget_device("d-1"));
  CHECK(all_ids(file) == std::vector<std::string>{"d-2"});
  CHECK(count(file, "SELECT COUNT(*) FROM device_labels WHERE device_id = 'd-1'") == 0);
  CHECK(count(file, "SELECT COUNT(*) FROM device_inventory") == 0);
  CHECK(count(file, "SELECT COALESCE(SUM(n), 0) FROM campaign_counts WHERE campaign_id = 'c-1'") == 1);
  check_counts_exact(file, {"c-1"}, 1);
  REQUIRE(file.forget_device("d-1"));  // nothing left: nothing to do
  // The directory still has the device: only the cell's copy went.
  CHECK(directory.directory_entry("d-1").value().has_value());

  // A device the directory decommissioned arrives decommissioned.
  REQUIRE(directory.upsert_enrolled_device(enrolled("d-3", 1)));
  REQUIRE(directory.mark_device_decommissioned("d-3"));
  REQUIRE(file.adopt_device(entry_of(directory, "d-3")));
  auto gone = file.get_device("d-3");
  REQUIRE(gone);
  CHECK((*gone)->state == "decommissioned");
  check_counts_exact(file, {"c-1"}, 1);
}

// What a crash can leave in a cell's file, all at once: a copy of a device
// the directory moved to another cell (a drain stopped between its two
// commits), a copy of a device the directory never had, a device of the
// cell with no copy yet (an enrollment whose follow never ran), and the
// rows of a campaign whose record never committed (rows are written first).
TEST_CASE("at open the directory decides what a cell's file holds", "[unit][hub][cells][store]") {
  CellFiles cells(2);
  Store& directory = *cells.directory;
  Store& file = cells.file(1);
  record_campaign(directory, "c-kept");

  // The directory: d-01..d-08 in cell 1, d-moved in cell 2.
  std::vector<std::string> want;
  for (int i = 1; i <= 8; ++i) {
    const std::string id = "d-0" + std::to_string(i);
    REQUIRE(directory.upsert_enrolled_device(enrolled(id, 1)));
    want.push_back(id);
  }
  REQUIRE(directory.upsert_enrolled_device(enrolled("d-moved", 1)));
  // The file: copies of d-01..d-05 and of d-moved (adopted while it was in
  // cell 1), each with rows of both campaigns.
  for (const auto& id : {"d-01", "d-02", "d-03", "d-04", "d-05", "d-moved"}) {
    REQUIRE(file.adopt_device(entry_of(directory, id)));
    REQUIRE(file.add_campaign_member("c-kept", CampaignMember{id, 0.5, 0, "", 1}, 100));
    REQUIRE(file.add_campaign_member("c-orphan", CampaignMember{id, 0.5, 0, "", 1}, 100));
  }
  REQUIRE(directory.set_device_cell("d-moved", 2).value() == 1);
  // A copy of a device the directory does not know, ordered between others.
  DeviceDirectoryEntry stray_entry;
  stray_entry.id = "d-035";
  stray_entry.cell = 1;
  REQUIRE(file.adopt_device(stray_entry));
  REQUIRE(file.add_campaign_member("c-kept", CampaignMember{"d-035", 0.5, 0, "", 1}, 100));
  // One copy's report, which reconciliation must keep.
  auto d2 = file.get_device("d-02");
  REQUIRE(d2);
  DeviceRecord r = **d2;
  r.state = "applied";
  r.online = true;
  REQUIRE(file.save_device_state(r));

  auto done = reconcile_cell_file(directory, 1, file, 2);  // small batches: the walk crosses them
  REQUIRE(done);
  CHECK(done->adopted == 3);    // d-06, d-07, d-08
  CHECK(done->forgotten == 2);  // d-035, d-moved
  CHECK(done->orphan_campaigns == 1);
  CHECK(all_ids(file) == want);
  CHECK(file.campaigns_with_rows().value() == std::vector<std::string>{"c-kept"});
  CHECK(count(file, "SELECT COUNT(*) FROM campaign_devices") == 5);  // c-kept's of d-01..d-05
  auto still = file.get_device("d-02");
  REQUIRE(still);
  CHECK((*still)->state == "applied");
  CHECK((*still)->online);
  check_counts_exact(file, {"c-kept", "c-orphan"}, 1);

  // Reconciling again finds nothing to do.
  auto again = reconcile_cell_file(directory, 1, file, 3);
  REQUIRE(again);
  CHECK(again->adopted == 0);
  CHECK(again->forgotten == 0);
  CHECK(again->orphan_campaigns == 0);
  CHECK(all_ids(file) == want);

  // An empty directory cell empties the file.
  auto other = Store::open_cell((cells.dir.path() / "cell-5.db").string(), 5);
  REQUIRE(other);
  REQUIRE((*other)->adopt_device([&] {
    DeviceDirectoryEntry e;
    e.id = "d-zz";
    e.cell = 5;
    return e;
  }()));
  auto emptied = reconcile_cell_file(directory, 5, **other, 4);
  REQUIRE(emptied);
  CHECK(emptied->forgotten == 1);
  CHECK(all_ids(**other).empty());
}


TEST_CASE("the directory's outbox, followed with per-cell files, keeps each file's copies and carries a move's rows",
          "[unit][hub][cells][store]") {
  CellFiles cells(3);
  Store& directory = *cells.directory;
  REQUIRE(directory.upsert_enrolled_device(enrolled("d-1", 0)));
  REQUIRE(directory.upsert_enrolled_device(enrolled("d-2", 1)));
  REQUIRE(directory.upsert_enrolled_device(enrolled("d-3", 1, {{"env", "dev"}})));
  // An enrollment's entry makes the copy before live membership sees it,
  // so a membership row can be written in the device's file.
  std::vector<std::string> labelled;
  CHECK(cells.follow([&](const DirectoryChange& c) -> Status {
    labelled.push_back(c.device_id);
    auto copy = cells.file(c.cell).get_device(c.device_id);
    if (!copy || !*copy) return make_error(Errc::internal, "no copy of " + c.device_id + " when its entry is followed");
    return cells.file(c.cell).add_campaign_member("c-1", CampaignMember{c.device_id, 0.5, 0, "", c.cell}, 100);
  }) == 3);
  CHECK(labelled == std::vector<std::string>{"d-1", "d-2", "d-3"});
  CHECK(cells.ids(0) == std::vector<std::string>{"d-1"});
  CHECK(cells.ids(1) == std::vector<std::string>{"d-2", "d-3"});
  CHECK(cells.ids(2).empty());
  CHECK(cells.follow() == 0);  // nothing left in the outbox

  // A label change reaches the copy in the device's file.
  REQUIRE(directory.set_device_labels("d-2", {{"env", "canary"}}));
  CHECK(cells.follow() == 1);
  CHECK(cells.file(1).get_device("d-2").value()->labels == Labels{{"env", "canary"}});

  // A move carries the device's report, inventory and campaign rows to its
  // new cell's file and leaves nothing in the old one.
  DeviceRecord d2 = *cells.file(1).get_device("d-2").value();
  d2.state = "applied";
  d2.online = true;
  d2.last_seen_ms = 7000;
  d2.applied_bundle = "edge";
  d2.applied_version = 4;
  REQUIRE(cells.file(1).save_device_state(d2));
  DeviceInventory inv;
  inv.os = "debian";
  inv.cert_expiry_unix = 1'800'000'000;
  inv.updated_ms = 7000;
  REQUIRE(cells.file(1).save_device_inventory("d-2", inv));
  auto row = cells.file(1).campaign_device("c-1", "d-2").value();
  REQUIRE(row);
  row->status = "applied";
  row->prev_bundle_id = "b-old";
  row->updated_ms = 7000;
  REQUIRE(cells.file(1).save_campaign_device(*row));
  REQUIRE(directory.set_device_cell("d-2", 2).value() == 1);
  CHECK(cells.follow() == 1);
  CHECK(cells.ids(1) == std::vector<std::string>{"d-3"});
  CHECK(cells.ids(2) == std::vector<std::string>{"d-2"});
  auto moved = cells.file(2).get_device("d-2").value();
  REQUIRE(moved);
  CHECK(moved->cell == 2);
  CHECK(moved->state == "applied");
  CHECK(moved->online);
  CHECK(moved->applied_version == 4);
  CHECK(moved->labels == Labels{{"env", "canary"}});
  CHECK(moved->inventory.os == "debian");
  auto moved_row = cells.file(2).campaign_device("c-1", "d-2").value();
  REQUIRE(moved_row);
  CHECK(moved_row->status == "applied");
  CHECK(moved_row->prev_bundle_id == "b-old");
  CHECK(moved_row->cell == 2);
  CHECK_FALSE(cells.file(1).campaign_device("c-1", "d-2").value());
  CHECK(count(cells.file(1), "SELECT COUNT(*) FROM device_inventory") == 0);
  for (int c = 0; c < 3; ++c) check_counts_exact(cells.file(c), {"c-1"}, c);
  CHECK(count(cells.file(2), "SELECT COALESCE(SUM(n), 0) FROM campaign_counts WHERE status = 'applied'") == 1);
  CHECK(count(cells.file(1), "SELECT COALESCE(SUM(n), 0) FROM campaign_counts") == 1);  // d-3's only

  // Two moves before a follow (1 -> 0 -> 2): the rows go straight to where
  // the directory says now, once.
  REQUIRE(directory.set_device_cell("d-3", 0).value() == 1);
  REQUIRE(directory.set_device_cell("d-3", 2).value() == 1);
  CHECK(cells.follow() == 2);
  CHECK(cells.ids(0) == std::vector<std::string>{"d-1"});
  CHECK(cells.ids(1).empty());
  CHECK(cells.ids(2) == std::vector<std::string>{"d-2", "d-3"});
  CHECK(cells.file(2).campaign_device("c-1", "d-3").value().has_value());
  for (int c = 0; c < 3; ++c) check_counts_exact(cells.file(c), {"c-1"}, c);

  // A decommission reaches the copy: its reported side follows too.
  REQUIRE(directory.mark_device_decommissioned("d-1"));
  CHECK(cells.follow() == 1);
  auto gone = cells.file(0).get_device("d-1").value();
  REQUIRE(gone);
  CHECK(gone->state == "decommissioned");
  CHECK_FALSE(gone->online);
  check_counts_exact(cells.file(0), {"c-1"}, 0);
}

// A crash after the new file committed and before the old copy was
// forgotten and the entry removed: the entry is followed again at the next
// start, and the rows end up once, in the new file.
TEST_CASE("a move followed again after a crash between its commits ends with the rows once",
          "[unit][hub][cells][store]") {
  CellFiles cells(2);
  Store& directory = *cells.directory;
  record_campaign(directory, "c-1");
  REQUIRE(directory.upsert_enrolled_device(enrolled("d-1", 0)));
  CHECK(cells.follow() == 1);
  REQUIRE(cells.file(0).add_campaign_member("c-1", CampaignMember{"d-1", 0.5, 0, "", 0}, 100));
  REQUIRE(directory.set_device_cell("d-1", 1).value() == 1);
  // What the first commit of the follow wrote, and no more.
  auto rows = cells.file(0).export_device("d-1");
  REQUIRE(rows);
  REQUIRE(*rows);
  REQUIRE(cells.file(1).import_device(entry_of(directory, "d-1"), **rows));
  CHECK(cells.ids(0) == std::vector<std::string>{"d-1"});
  CHECK(cells.ids(1) == std::vector<std::string>{"d-1"});

  CHECK(cells.follow() == 1);
  CHECK(cells.ids(0).empty());
  CHECK(cells.ids(1) == std::vector<std::string>{"d-1"});
  CHECK(count(cells.file(1), "SELECT COUNT(*) FROM campaign_devices") == 1);
  for (int c = 0; c < 2; ++c) check_counts_exact(cells.file(c), {"c-1"}, c);
  // And reconciliation, run after the follow at open, agrees.
  for (int c = 0; c < 2; ++c) {
    auto r = reconcile_cell_file(directory, c, cells.file(c));
    REQUIRE(r);
    CHECK(r->adopted + r->forgotten + r->orphan_campaigns == 0);
  }
}

// A hub.db that has held every cell's rows hands them to the cells' files
// once; from then on it is the directory and the control data only.
TEST_CASE("hub.db's device rows move into the cells' files once, and hub.db keeps only the directory",
          "[unit][hub][cells][store]") {
  CellFiles cells(2);
  Store& directory = *cells.directory;
  REQUIRE(directory.insert_bundle(test::stand_in_bundle()));
  std::vector<CampaignMember> members;
  for (int i = 0; i < 10; ++i) {
    auto d = enrolled("d-" + std::to_string(10 + i), i % 2);
    REQUIRE(directory.upsert_enrolled_device(d));
    members.push_back(CampaignMember{d.id, 0.1 * i, i % 3, "", d.cell});
  }
  REQUIRE(directory.insert_campaign(test::running_record("c-1", 100), members));
  for (int i = 0; i < 10; i += 2) {
    auto d = directory.get_device("d-" + std::to_string(10 + i)).value().value();
    d.state = i % 4 == 0 ? "applied" : "failed";
    d.online = true;
    d.applied_version = 2;
    REQUIRE(directory.save_device_state(d));
    DeviceInventory inv;
    inv.os = "debian-" + std::to_string(i);
    inv.updated_ms = 50;
    REQUIRE(directory.save_device_inventory(d.id, inv));
    auto row = directory.campaign_device("c-1", d.id).value().value();
    row.status = d.state;
    REQUIRE(directory.save_campaign_device(row));
  }
  REQUIRE(directory.mark_device_decommissioned("d-19"));
  auto before = directory.list_devices();
  REQUIRE(before);
  auto rows_before = directory.campaign_devices("c-1");
  REQUIRE(rows_before);
  auto counts_before = directory.campaign_counts("c-1");
  REQUIRE(counts_before);

  // Refused when a device's cell has no file: nothing moves.
  auto too_few = move_rows_to_cell_files(directory, {&cells.file(0)});
  REQUIRE_FALSE(too_few);
  CHECK(too_few.error().message.find("devices in cell 1") != std::string::npos);
  CHECK(all_ids(cells.file(0)).empty());

  std::vector<std::pair<int, int64_t>> progress;
  auto moved = move_rows_to_cell_files(directory, {&cells.file(0), &cells.file(1)},
                                       [&](int cell, int64_t done) { progress.emplace_back(cell, done); });
  REQUIRE(moved);
  CHECK_FALSE(moved->already);
  CHECK(moved->devices == 10);
  CHECK(moved->campaign_rows == 10);
  CHECK(progress == std::vector<std::pair<int, int64_t>>{{0, 5}, {1, 5}});

  // Each device reads the same from its cell's file as from hub.db before.
  for (const auto& d : *before) {
    auto copy = cells.file(d.cell).get_device(d.id);
    REQUIRE(copy);
    REQUIRE(copy->has_value());
    CHECK((*copy)->state == (d.id == "d-19" ? "decommissioned" : d.state));
    CHECK((*copy)->online == d.online);
    CHECK((*copy)->applied_version == d.applied_version);
    CHECK((*copy)->inventory.os == d.inventory.os);
    CHECK((*copy)->labels == d.labels);
    CHECK_FALSE(cells.file(1 - d.cell).get_device(d.id).value().has_value());
  }
  std::vector<CampaignDeviceRecord> rows_after;
  for (int c = 0; c < 2; ++c) {
    auto part = cells.file(c).campaign_devices("c-1");
    REQUIRE(part);
    rows_after.insert(rows_after.end(), part->begin(), part->end());
    check_counts_exact(cells.file(c), {"c-1"}, c);
  }
  std::sort(rows_after.begin(), rows_after.end(),
            [](const auto& a, const auto& b) { return a.device_id < b.device_id; });
  REQUIRE(rows_after.size() == rows_before->size());
  for (size_t i = 0; i < rows_after.size(); ++i) {
    CHECK(rows_after[i].device_id == (*rows_before)[i].device_id);
    CHECK(rows_after[i].status == (*rows_before)[i].status);
    CHECK(rows_after[i].wave == (*rows_before)[i].wave);
    CHECK(rows_after[i].cell == (*rows_before)[i].cell);
  }
  auto sum = [&](int c) { return cells.file(c).campaign_counts("c-1").value(); };
  std::vector<CampaignCountRow> all = sum(0);
  for (const auto& r : sum(1)) all.push_back(r);
  int64_t total_before = 0, total_after = 0;
  for (const auto& r : *counts_before) total_before += r.count;
  for (const auto& r : all) total_after += r.count;
  CHECK(total_after == total_before);

  // hub.db: the directory and the record, none of the report side.
  CHECK(directory.cell_files_in_use().value() == 2);
  CHECK(count(directory, "SELECT COUNT(*) FROM campaign_devices") == 0);
  CHECK(count(directory, "SELECT COUNT(*) FROM fleet_counts") == 0);
  CHECK(count(directory, "SELECT COUNT(*) FROM device_inventory") == 0);
  CHECK(count(directory, "SELECT COUNT(*) FROM devices") == 10);
  CHECK(directory.get_campaign("c-1").value().has_value());
  CHECK(count(directory, "SELECT COUNT(*) FROM sqlite_master WHERE type = 'trigger' AND name = 'fleet_counts_insert'") ==
        0);
  // Nor the indexes only device pages walk (the files answer them), which
  // each enrollment wrote; the directory's own stay. A file holds one cell:
  // no index by cell there.
  const std::string device_list_indexes = "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name IN "
                                          "('devices_hostname', 'devices_enrolled', 'devices_offline')";
  CHECK(count(directory, device_list_indexes) == 0);
  CHECK(count(directory, "SELECT COUNT(*) FROM sqlite_master WHERE name IN ('devices_cell', 'devices_gateway')") == 2);
  CHECK(count(cells.file(0), device_list_indexes) == 3);
  CHECK(count(cells.file(0), "SELECT COUNT(*) FROM sqlite_master WHERE name = 'devices_cell'") == 0);

  // Once only. A cell added later gets an empty file: nothing moves again;
  // going back to fewer files than the directory's cells is refused.
  auto again = move_rows_to_cell_files(directory, {&cells.file(0), &cells.file(1)});
  REQUIRE(again);
  CHECK(again->already);
  CHECK(all_ids(cells.file(0)).size() == 5);
  auto third = test::open_cell_file(cells.dir.path(), 2);
  auto three = move_rows_to_cell_files(directory, {&cells.file(0), &cells.file(1), third.get()});
  REQUIRE(three);
  CHECK(three->already);
  CHECK(three->devices == 0);
  CHECK(directory.cell_files_in_use().value() == 3);
  CHECK(all_ids(*third).empty());
  CHECK(all_ids(cells.file(1)).size() == 5);
  auto one = move_rows_to_cell_files(directory, {&cells.file(0)});
  REQUIRE_FALSE(one);
  CHECK(one.error().message.find("devices in cell 1 and only 1") != std::string::npos);
  CHECK(directory.cell_files_in_use().value() == 3);

  // Reopened, hub.db stays the directory: an enrollment counts nothing of
  // the report side there (migrate() made those triggers again; open drops them).
  const auto path = (cells.dir.path() / "hub.db").string();
  cells.directory.reset();
  auto reopened = Store::open(path);
  REQUIRE(reopened);
  REQUIRE((*reopened)->upsert_enrolled_device(enrolled("d-new", 0)));
  CHECK(count(**reopened, "SELECT COUNT(*) FROM fleet_counts") == 0);
  CHECK(count(**reopened, "SELECT COUNT(*) FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'campaign_%'") ==
        0);
  CHECK(count(**reopened, "SELECT COUNT(*) FROM directory_outbox WHERE device_id = 'd-new'") == 1);
  CHECK(count(**reopened, device_list_indexes) == 0);
}

namespace flotilla::test {

// ADR 18, slice 8: each cell's report worker holds only its cell's file,
// so two cells' workers write at once; everything else takes the whole
// lock, which waits for every file.
TEST_CASE("the store lock: cells' files are held alone side by side and the whole lock holds them all",
          "[unit][hub][cells][store]") {
  hub::StoreMutex m;
  m.set_files(2);
  // Whether another thread could take the whole lock now (it lets it go at once).
  auto can_lock = [](hub::StoreMutex& mutex) {
    return std::async(std::launch::async, [&] {
             const bool got = mutex.try_lock();
             if (got) mutex.unlock();
             return got;
           }).get();
  };
  std::promise<void> held0, release0;
  std::thread a([&] {
    hub::StoreMutex::FileLock lock(m, 0);
    CHECK(lock.alone());
    CHECK(hub::StoreMutex::holding_file_alone());
    held0.set_value();
    release0.get_future().wait();
  });
  held0.get_future().wait();
  // Cell 1's file while cell 0's is held; the whole lock is not to be had.
  auto one = std::async(std::launch::async, [&] {
    hub::StoreMutex::FileLock lock(m, 1);
    return lock.alone();
  });
  REQUIRE(one.wait_for(std::chrono::seconds(30)) == std::future_status::ready);
  CHECK(one.get());
  CHECK_FALSE(can_lock(m));
  CHECK_FALSE(hub::StoreMutex::holding_file_alone());  // this thread holds nothing
  release0.set_value();
  a.join();

  // The whole lock, recursively, holds both files: no other thread gets
  // either. A file's lock taken inside it is the whole lock again.
  {
    std::lock_guard whole(m);
    std::lock_guard again(m);
    hub::StoreMutex::FileLock inside(m, 1);
    CHECK_FALSE(inside.alone());
    CHECK_FALSE(hub::StoreMutex::holding_file_alone());
    CHECK_FALSE(can_lock(m));
  }
  CHECK(can_lock(m));

  // Without files, a cell's "file" is the whole lock.
  hub::StoreMutex single;
  hub::StoreMutex::FileLock lock(single, 0);
  CHECK_FALSE(lock.alone());
  CHECK_FALSE(hub::StoreMutex::holding_file_alone());
  CHECK_FALSE(can_lock(single));
}

}  // namespace flotilla::test
