// [unit] Merges of reads that span cells (flotilla/hub/merge.hpp, ADR 18
// slice 4): sums, the largest failure reasons, releasable rows in (wave,
// rank) order, and device pages of several stores walked as one, against
// one store holding every device.
#include <catch2/catch.hpp>

#include <algorithm>
#include <map>
#include <random>
#include <set>
#include <tuple>

#include "flotilla/hub/aggregates.hpp"
#include "flotilla/hub/merge.hpp"
#include "flotilla/hub/store.hpp"
#include "tests/support/store_helpers.hpp"
#include "tests/support/temp_dir.hpp"

using namespace flotilla;
using namespace flotilla::hub;
using flotilla::test::TempDir;

TEST_CASE("fleet counts sum over stores, and a value summing to zero is left out", "[unit][hub][merge]") {
  std::vector<FleetCount> a = {{"default", "state", "applied", 3}, {"default", "region", "eu", 2},
                               {"blue", "state", "failed", 1}};
  std::vector<FleetCount> b = {{"default", "state", "applied", 4}, {"default", "region", "eu", -2},
                               {"default", "state", "idle", 1}};
  auto sum = sum_fleet_counts({a, b});
  std::vector<FleetCount> want = {{"blue", "state", "failed", 1},
                                  {"default", "state", "applied", 7},
                                  {"default", "state", "idle", 1}};
  CHECK(sum == want);
  CHECK(sum_fleet_counts({}).empty());
}

TEST_CASE("failure reasons: the largest over every store, not each store's largest", "[unit][hub][merge]") {
  auto group = [](std::string reason, int64_t n) {
    FailureGroup g;
    g.reason = std::move(reason);
    g.count = n;
    return g;
  };
  // "timeout" is third in each store and first overall.
  std::vector<FailureGroup> a = {group("health", 5), group("disk", 4), group("timeout", 3)};
  std::vector<FailureGroup> b = {group("verify", 5), group("arch", 4), group("timeout", 3)};
  auto top = top_failure_reasons({a, b}, 3);
  REQUIRE(top.size() == 3);
  CHECK(top[0].reason == "timeout");
  CHECK(top[0].count == 6);
  // Ties by reason.
  CHECK(top[1].reason == "health");
  CHECK(top[2].reason == "verify");
  CHECK(top_failure_reasons({a, b}, 0).empty());

  std::vector<FailureGroup::Device> da = {{"d-1", "m", 10}, {"d-4", "m", 30}};
  std::vector<FailureGroup::Device> db = {{"d-2", "m", 10}, {"d-3", "m", 20}};
  auto first = first_failed_devices({da, db}, 3);
  REQUIRE(first.size() == 3);
  CHECK(first[0].id == "d-1");
  CHECK(first[1].id == "d-2");
  CHECK(first[2].id == "d-3");
}

TEST_CASE("releasable rows merge in wave and rank order and stop at the limit", "[unit][hub][merge]") {
  auto row = [](std::string id, int wave, int64_t rank) {
    CampaignDeviceRecord r;
    r.device_id = std::move(id);
    r.wave = wave;
    r.rank = rank;
    return r;
  };
  std::vector<CampaignDeviceRecord> a = {row("d-a1", 0, 5), row("d-a2", 1, 1), row("d-a3", 1, 9)};
  std::vector<CampaignDeviceRecord> b = {row("d-b1", 0, 7), row("d-b2", 1, 1), row("d-b3", 2, 0)};
  auto out = merge_releasable({a, b}, 4);
  std::vector<std::string> ids;
  for (const auto& r : out) ids.push_back(r.device_id);
  CHECK(ids == std::vector<std::string>{"d-a1", "d-b1", "d-a2", "d-b2"});
  CHECK(merge_releasable({a, b}, 0).empty());
}

namespace {

struct CellStores {
  TempDir dir;
  std::vector<std::unique_ptr<Store>> stores;
  std::vector<std::unique_ptr<AggregateStore>> aggs;
  void add(const std::string& name) {
    auto s = Store::open((dir.path() / (name + ".db")).string());
    REQUIRE(s);
    stores.push_back(std::move(*s));
    auto a = AggregateStore::open((dir.path() / (name + ".db")).string(), {});
    REQUIRE(a);
    aggs.push_back(std::move(*a));
  }
};

std::vector<std::string> ids_of(const std::vector<DeviceRecord>& items) {
  std::vector<std::string> out;
  for (const auto& d : items) out.push_back(d.id);
  return out;
}

}  // namespace

// Three stores hold a third of the devices each, a fourth holds them all.
// Walking the three page by page, merging each round and carrying the merged
// cursor into every store's next walk, must list exactly the fourth's
// devices in the fourth's order: none lost where one store stopped at its
// scan bound before another, none twice.
TEST_CASE("device pages of several stores merge into the walk of one store holding every device",
          "[unit][hub][merge]") {
  CellStores cells;
  for (int i = 0; i < 4; ++i) cells.add("cell-" + std::to_string(i));
  std::mt19937 rng(11);
  for (int i = 0; i < 90; ++i) {
    DeviceRecord d;
    d.id = "d-" + std::to_string(1000 + i);
    d.project = "default";
    d.labels = {{"env", rng() % 2 ? "prod" : "dev"}};
    d.public_key_hex = "00";
    d.hostname = "host-" + std::to_string(rng() % 30);  // shared hostnames: the id breaks ties
    d.enrolled_ms = 1000 + static_cast<int64_t>(rng() % 40);
    d.arch = "amd64";
    // Skewed: cell 0 gets most, so its walks stop at the scan bound first.
    const size_t cell = rng() % 5 < 3 ? 0 : 1 + rng() % 2;
    REQUIRE(cells.stores[cell]->upsert_enrolled_device(d));
    REQUIRE(cells.stores[3]->upsert_enrolled_device(d));
    if (i % 3 == 0) {
      DeviceInventory inv;
      inv.cert_expiry_unix = 1'800'000'000 + static_cast<int64_t>(rng() % 10) * 86400;
      REQUIRE(cells.stores[cell]->save_device_inventory(d.id, inv));
      REQUIRE(cells.stores[3]->save_device_inventory(d.id, inv));
    }
  }
  auto prod = Selector::parse("env!=dev");  // not an equality: a filter, not an index walk
  REQUIRE(prod);

  for (auto sort : {DeviceSort::id, DeviceSort::hostname, DeviceSort::enrolled, DeviceSort::cert_expiry}) {
    for (bool descending : {false, true}) {
      DYNAMIC_SECTION("sort " << sort_name(sort) << (descending ? " descending" : "")) {
        DeviceQuery q;
        q.sort = sort;
        q.descending = descending;
        q.selector = *prod;
        q.limit = 4;
        q.scan_limit = 6;

        // One store holding every device, walked to the end.
        std::vector<std::string> want;
        DeviceQuery one = q;
        for (int guard = 0; guard < 200; ++guard) {
          auto page = cells.aggs[3]->devices(one);
          REQUIRE(page);
          for (const auto& id : ids_of(page->items)) want.push_back(id);
          if (page->complete) break;
          one.after = page->next;
        }
        REQUIRE(want.size() > 10);

        // Three stores, merged page by page.
        std::vector<std::string> got;
        int64_t scanned = 0;
        bool complete = false;
        for (int guard = 0; guard < 200 && !complete; ++guard) {
          std::vector<DevicePage> parts;
          for (int c = 0; c < 3; ++c) {
            auto page = cells.aggs[static_cast<size_t>(c)]->devices(q);
            REQUIRE(page);
            parts.push_back(std::move(*page));
          }
          auto merged = merge_device_pages(std::move(parts), q.limit);
          CHECK(static_cast<int64_t>(merged.items.size()) <= q.limit);
          CHECK(merged.sort == sort);
          scanned += merged.scanned;
          for (const auto& id : ids_of(merged.items)) got.push_back(id);
          complete = merged.complete;
          if (!complete) {
            REQUIRE_FALSE(merged.next.empty());
            q.after = merged.next;
          }
        }
        CHECK(complete);
        CHECK(got == want);
        CHECK(scanned > 0);
      }
    }
  }
}

TEST_CASE("a device page of one store is its own merge", "[unit][hub][merge]") {
  DevicePage p;
  p.items.resize(2);
  p.items[0].id = "d-1";
  p.items[1].id = "d-2";
  p.next = "abc";
  p.next_id = "d-2";
  p.scanned = 7;
  p.index = "devices primary key";
  auto m = merge_device_pages({p}, 1);
  CHECK(ids_of(m.items) == std::vector<std::string>{"d-1", "d-2"});
  CHECK(m.next == "abc");
  CHECK(m.scanned == 7);
  CHECK_FALSE(m.complete);
  auto none = merge_device_pages({}, 5);
  CHECK(none.items.empty());
  CHECK(none.complete);
}

namespace {

// Three stores (cells 0, 1 and 2) hold a third of the devices and of one
// campaign's rows each, skewed; a fourth holds them all. Each device's
// campaign row is failed, applied, pending or waiting, the same in both
// stores that hold it, and about two in three devices are online.
struct SplitCampaign {
  CellStores cells;
  CampaignRecord c;
  std::vector<DeviceRecord> devices;
  std::mt19937 rng{23};

  SplitCampaign() {
    for (int i = 0; i < 4; ++i) cells.add("cell-" + std::to_string(i));
    const BundleRecord b = test::stand_in_bundle();
    c = test::running_record("c1", 1000);
    std::vector<std::vector<CampaignMember>> members(4);
    for (int i = 0; i < 120; ++i) {
      DeviceRecord d;
      d.id = "d-" + std::to_string(1000 + i);
      d.project = i % 7 == 0 ? "blue" : "default";
      d.public_key_hex = "00";
      d.arch = "amd64";
      // Skewed, and cell 2 (the third store's) holds its devices alone.
      d.cell = rng() % 5 < 3 ? 0 : 1 + static_cast<int>(rng() % 2);
      REQUIRE(cells.stores[static_cast<size_t>(d.cell)]->upsert_enrolled_device(d));
      REQUIRE(cells.stores[3]->upsert_enrolled_device(d));
      CampaignMember m{d.id, static_cast<double>(rng() % 1000) / 1000.0, 0, "", d.cell};
      members[static_cast<size_t>(d.cell)].push_back(m);
      members[3].push_back(m);
      devices.push_back(d);
    }
    for (size_t s = 0; s < 4; ++s) {
      REQUIRE(cells.stores[s]->insert_bundle(b));
      REQUIRE(cells.stores[s]->insert_campaign(c, members[s]));
    }
    const std::vector<std::string> reasons = {"health", "disk", "verify", ""};
    for (auto& d : devices) {
      d.online = rng() % 3 != 0;
      d.last_seq = 1;
      CampaignDeviceRecord row;
      row.campaign_id = c.id;
      row.device_id = d.id;
      const auto pick = rng() % 4;
      row.status = pick == 0 ? "failed" : pick == 1 ? "applied" : pick == 2 ? "pending" : "waiting";
      row.reason = row.status == "failed" ? reasons[rng() % reasons.size()] : "";
      row.updated_ms = 2000 + static_cast<int64_t>(rng() % 20);  // shared times: the id breaks ties
      DeviceInventory inv;
      inv.os = "linux";
      inv.clock_suspect = rng() % 4 == 0;
      for (size_t s : {static_cast<size_t>(d.cell), size_t{3}}) {
        auto have = cells.stores[s]->campaign_device(c.id, d.id);
        REQUIRE(have);
        REQUIRE(*have);
        CampaignDeviceRecord r = **have;
        r.status = row.status;
        r.reason = row.reason;
        r.updated_ms = row.updated_ms;
        REQUIRE(cells.stores[s]->save_campaign_device(r));
        REQUIRE(cells.stores[s]->save_device_state(d));
        REQUIRE(cells.stores[s]->save_device_inventory(d.id, inv));
      }
    }
  }

  // The three cells' answers to one read, and the fourth store's.
  template <class Read>
  auto parts_and_whole(Read read) {
    using Part = std::decay_t<decltype(*read(*cells.stores[0]))>;
    std::vector<Part> parts;
    for (size_t s = 0; s < 3; ++s) {
      auto part = read(*cells.stores[s]);
      REQUIRE(part);
      parts.push_back(*part);
    }
    auto whole = read(*cells.stores[3]);
    REQUIRE(whole);
    return std::make_pair(parts, *whole);
  }
};

}  // namespace

// The campaign reads that span cells (ADR 18, before slice 7): failure
// counts by reason, the first failed rows, the devices away, and the cells
// a campaign has rows in. Each merge of the three stores' answers must be
// the fourth's answer.
TEST_CASE("a campaign's failures, away devices and cells merge over stores into one store's answer",
          "[unit][hub][merge]") {
  SplitCampaign split;
  auto& cells = split.cells;
  auto& c = split.c;
  auto parts_and_whole = [&](auto read) { return split.parts_and_whole(read); };

  // Failure counts by reason.
  auto [reason_parts, whole_reasons] = parts_and_whole([&](Store& s) { return s.failure_reasons(c.id); });
  REQUIRE(whole_reasons.size() >= 3);
  CHECK(sum_reason_counts(reason_parts) == whole_reasons);

  auto ids = [](const std::vector<CampaignDeviceRecord>& rows) {
    std::vector<std::string> out;
    for (const auto& r : rows) out.push_back(r.device_id);
    return out;
  };
  for (int64_t limit : {1, 7, 500}) {
    CAPTURE(limit);
    // The first failed rows, in (updated_ms, id) order.
    auto [failed_parts, whole_failed] =
        parts_and_whole([&](Store& s) { return s.campaign_failures(c.id, limit); });
    CHECK(ids(first_failed_rows(failed_parts, limit)) == ids(whole_failed));

    // Devices away: the campaign view's walk and both of the dashboard's.
    std::vector<std::vector<std::string>> away_parts, by_rows_parts, by_offline_parts;
    for (size_t s = 0; s < 3; ++s) {
      auto part = cells.stores[s]->away_devices(c.id, limit);
      REQUIRE(part);
      away_parts.push_back(*part);
      auto by_rows = cells.aggs[s]->away(c.id, limit, 1, 1, 2);
      auto by_offline = cells.aggs[s]->away(c.id, limit, 1, 2, 1);
      REQUIRE(by_rows);
      REQUIRE(by_offline);
      by_rows_parts.push_back(*by_rows);
      by_offline_parts.push_back(*by_offline);
    }
    auto whole_away = cells.stores[3]->away_devices(c.id, limit);
    REQUIRE(whole_away);
    REQUIRE_FALSE(whole_away->empty());
    CHECK(merge_device_ids(away_parts, limit) == *whole_away);
    CHECK(merge_device_ids(by_rows_parts, limit) == *whole_away);
    CHECK(merge_device_ids(by_offline_parts, limit) == *whole_away);
  }
  // A device in two stores (a drain's crash window) is one device.
  CHECK(merge_device_ids({{"d-1", "d-3"}, {"d-1", "d-2"}}, 10) == std::vector<std::string>{"d-1", "d-2", "d-3"});

  // The cells the campaign has rows in.
  auto [cell_parts, whole_cells] = parts_and_whole([&](Store& s) { return s.campaign_cells(c.id); });
  CHECK(whole_cells == std::vector<int>{0, 1, 2});
  CHECK(merge_cells(cell_parts) == whole_cells);
}

// The rest of ADR 18's reads that span cells: a campaign's rows and counts
// (the view, the dashboard's summaries), the devices by cell (`flotilla cell
// list`: the directory's totals, each cell's presence) and the devices whose
// clock looked wrong (/metrics).
TEST_CASE("a campaign's rows and counts and the devices by cell merge over stores into one store's answer",
          "[unit][hub][merge]") {
  SplitCampaign split;
  auto& cells = split.cells;
  const std::string id = split.c.id;
  // A decommissioned device counts nowhere, neither in totals nor online.
  auto online = std::find_if(split.devices.begin(), split.devices.end(), [](const DeviceRecord& d) { return d.online; });
  REQUIRE(online != split.devices.end());
  const DeviceRecord gone = *online;
  for (size_t s : {static_cast<size_t>(gone.cell), size_t{3}}) {
    REQUIRE(test::decommission(*cells.stores[s], gone.id));
  }

  auto [row_parts, whole_rows] = split.parts_and_whole([&](Store& s) { return s.campaign_devices(id); });
  REQUIRE(whole_rows.size() == split.devices.size());
  auto rows = merge_campaign_rows(row_parts);
  REQUIRE(rows.size() == whole_rows.size());
  for (size_t i = 0; i < rows.size(); ++i) {
    CAPTURE(i);
    CHECK(std::tie(rows[i].device_id, rows[i].status, rows[i].cell, rows[i].updated_ms) ==
          std::tie(whole_rows[i].device_id, whole_rows[i].status, whole_rows[i].cell, whole_rows[i].updated_ms));
  }

  // Counts by wave, status and presence: the store's and the dashboard's.
  auto [count_parts, whole_counts] = split.parts_and_whole([&](Store& s) { return s.campaign_counts(id); });
  REQUIRE(whole_counts.size() >= 6);
  CHECK(sum_campaign_counts(count_parts) == whole_counts);
  std::vector<std::vector<CampaignCountRow>> summary_parts;
  for (size_t s = 0; s < 3; ++s) {
    auto v = cells.aggs[s]->campaign(id);
    REQUIRE(v);
    REQUIRE(*v);
    summary_parts.push_back((*v)->counts);
  }
  CHECK(sum_campaign_counts(summary_parts) == whole_counts);

  // Devices by cell, for every project and for one.
  for (const std::string project : {"*", "blue"}) {
    CAPTURE(project);
    std::map<int, CellDeviceCount> want;
    for (const auto& d : split.devices) {
      if (d.id == gone.id || (project != "*" && d.project != project)) continue;
      auto& w = want[d.cell];
      w.cell = d.cell;
      ++w.total;
      w.online += d.online ? 1 : 0;
    }
    std::vector<CellDeviceCount> want_rows;
    for (const auto& [cell, w] : want) want_rows.push_back(w);
    REQUIRE(want_rows.size() == 3);
    auto totals = cells.stores[3]->cell_device_totals(project);
    REQUIRE(totals);
    auto [online_parts, whole_online] = split.parts_and_whole([&](Store& s) { return s.online_by_cell(project); });
    CHECK(merge_cell_device_counts(*totals, online_parts) == want_rows);
    CHECK(merge_cell_device_counts(*totals, {whole_online}) == want_rows);
  }
  // The directory decides which cells have devices.
  CHECK(merge_cell_device_counts({{0, 5, 0}}, {{{0, 0, 2}, {4, 0, 1}}, {{0, 0, 1}}}) ==
        std::vector<CellDeviceCount>{{0, 5, 3}});

  // Devices whose clock looked wrong: a count per store, summed.
  int64_t suspect = 0;
  for (size_t s = 0; s < 3; ++s) {
    auto n = cells.aggs[s]->clock_suspect_devices();
    REQUIRE(n);
    suspect += *n;
  }
  auto whole_suspect = cells.aggs[3]->clock_suspect_devices();
  REQUIRE(whole_suspect);
  CHECK(*whole_suspect > 0);
  CHECK(suspect == *whole_suspect);

  // A device with rows in two stores (a drain's crash window) is listed
  // once, with the row updated last.
  CampaignDeviceRecord old_row, new_row, other;
  old_row.device_id = new_row.device_id = "d-1";
  old_row.status = "pending";
  old_row.updated_ms = 10;
  new_row.status = "applied";
  new_row.updated_ms = 20;
  other.device_id = "d-0";
  auto merged = merge_campaign_rows({{old_row}, {other, new_row}});
  REQUIRE(merged.size() == 2);
  CHECK(merged[0].device_id == "d-0");
  CHECK(merged[1].status == "applied");
  CHECK(merge_campaign_rows({{new_row}, {old_row}})[0].status == "applied");
}
