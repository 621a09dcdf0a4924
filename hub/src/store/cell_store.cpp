// A cell's own device file (ADR 18, slice 7): the rows of one cell's
// devices in `<data-dir>/cells/<n>/devices.db`, apart from hub.db's control
// data and device directory, so each cell commits on a connection and lock
// of its own. The file has the store's tables (every DeviceStore query runs
// on it unchanged) and keeps a copy of each of its devices' directory
// columns, which the hub derives from the directory; "the directory
// decides" (reconcile_cell_file) repairs what a crash left between steps.
#include <algorithm>
#include <set>

#include "flotilla/common/sqlite.hpp"
#include "flotilla/hub/store.hpp"
#include "rows.hpp"

namespace flotilla::hub {

namespace {

using sql::query;

std::string role_name(int cell) { return cell < 0 ? "hub.db" : "cell " + std::to_string(cell) + "'s device file"; }

// The directory's triggers (store/aggregate_store.cpp, directory_triggers):
// in a cell's file nothing writes a directory column but the hub's copy of
// it, and the label index, labelled counts and outbox they keep are hub.db's.
constexpr const char* kDirectoryTriggers[] = {"directory_insert", "directory_delete", "directory_labels",
                                              "directory_decommission", "directory_moved"};

// What keeps hub.db's report side (fleet counts, trouble, failures,
// campaign counts and deadlines), none of it needed once its device rows
// live in cells' files.
constexpr const char* kReportTriggers[] = {
    "fleet_counts_insert", "fleet_counts_delete", "fleet_counts_state", "fleet_counts_reported",
    "device_trouble_update", "device_events_record", "fleet_counts_cert_insert", "fleet_counts_cert_update",
    "fleet_counts_cert_delete", "campaign_counts_insert", "campaign_counts_update", "campaign_counts_delete",
    "campaign_deadline_pause", "campaign_deadline_resume", "campaign_counts_online"};

}  // namespace

Result<int> Store::cell_files_in_use() {
  if (auto s = db_->exec("CREATE TABLE IF NOT EXISTS cell_files (id INTEGER PRIMARY KEY CHECK (id = 1), "
                         "cells INTEGER NOT NULL, moved_ms INTEGER NOT NULL)");
      !s) {
    return s.error();
  }
  auto n = query<int64_t>(*db_, "SELECT cells FROM cell_files WHERE id = 1",
                          [](const sql::Stmt& st) { return st.col_int(0); });
  if (!n) return n.error();
  return n->empty() ? 0 : static_cast<int>(n->front());
}

Status Store::drop_report_side() {
  std::string drop;
  for (const char* t : kReportTriggers) drop += std::string("DROP TRIGGER IF EXISTS ") + t + ";";
  // Every enrollment wrote a random page of each (devices_offline held every
  // directory row: online is the files' column), and no read of hub.db
  // walks them once device pages are the files' (AggregateStore::devices).
  drop += "DROP INDEX IF EXISTS devices_hostname; DROP INDEX IF EXISTS devices_enrolled; "
          "DROP INDEX IF EXISTS devices_offline;";
  if (auto s = db_->exec(drop); !s) return s;
  directory_only_ = true;
  return {};
}

Result<CellFilesMove> move_rows_to_cell_files(Store& directory, const std::vector<DeviceStore*>& files,
                                              const std::function<void(int, int64_t)>& progress) {
  CellFilesMove out;
  auto in_use = directory.cell_files_in_use();
  if (!in_use) return in_use.error();
  const int cells = static_cast<int>(files.size());
  if (*in_use == cells && cells > 0) {
    out.already = true;
    return out;
  }
  auto totals = directory.cell_device_totals();
  if (!totals) return totals.error();
  for (const auto& t : *totals) {
    if (t.cell < 0 || t.cell >= cells) {
      return make_error(Errc::conflict, "hub.db has devices in cell " + std::to_string(t.cell) + " and only " +
                                            std::to_string(cells) + " cells' files were given");
    }
  }
  if (*in_use != 0) {
    // The rows are in files already and the cells changed: a cell added
    // (its file starts empty) or a drained one gone (no device is in it,
    // checked above). Nothing moves; the mark says how many files there are.
    auto mark = directory.db().prepare("UPDATE cell_files SET cells = ? WHERE id = 1");
    if (!mark) return mark.error();
    mark->bind(1, static_cast<int64_t>(cells));
    if (auto s = mark->run(); !s) return s.error();
    out.already = true;
    return out;
  }
  for (int cell = 0; cell < cells; ++cell) {
    DeviceStore& file = *files[static_cast<size_t>(cell)];
    std::string after;
    int64_t done = 0;
    for (;;) {
      auto entries = directory.directory_entries(cell, after, 4096);
      if (!entries) return entries.error();
      if (entries->empty()) break;
      sql::Transaction tx(file.device_db());
      if (!tx.ok()) {
        return make_error(Errc::unavailable, "move rows to cell " + std::to_string(cell) + ": cannot begin", true);
      }
      for (const auto& e : *entries) {
        auto rows = directory.export_device(e.id);
        if (!rows) return rows.error().with_context("device " + e.id);
        if (!*rows) continue;
        if (auto s = file.import_device(e, **rows); !s) return s.error().with_context("device " + e.id);
        out.campaign_rows += static_cast<int64_t>((*rows)->campaigns.size());
        ++out.devices;
      }
      if (auto s = tx.commit(); !s) return s.error();
      done += static_cast<int64_t>(entries->size());
      after = entries->back().id;
      if (progress) progress(cell, done);
    }
  }
  // Every file holds its rows: hub.db keeps the directory and control data.
  sql::Transaction tx(directory.db());
  if (!tx.ok()) return make_error(Errc::unavailable, "move rows to cells' files: cannot begin", true);
  if (auto s = directory.drop_report_side(); !s) return s.error();
  if (auto s = directory.db().exec("DELETE FROM campaign_devices; DELETE FROM campaign_counts; "
                                   "DELETE FROM fleet_counts; DELETE FROM device_inventory; "
                                   "DELETE FROM device_events; DELETE FROM device_trouble;");
      !s) {
    return s.error();
  }
  auto mark = directory.db().prepare("INSERT INTO cell_files (id, cells, moved_ms) VALUES (1, ?, "
                                     "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER))");
  if (!mark) return mark.error();
  mark->bind(1, static_cast<int64_t>(cells));
  if (auto s = mark->run(); !s) return s.error();
  if (auto s = tx.commit(); !s) return s.error();
  return out;
}

Result<std::unique_ptr<Store>> Store::open_cell(const std::string& path, int cell, const StoreTuning& tuning) {
  if (cell < 0) return make_error(Errc::invalid_argument, "a cell's device file needs a cell >= 0");
  return open_writer(path, tuning, cell);
}

Status Store::claim_role(const std::string& path, int cell) {
  if (auto s = db_->exec("CREATE TABLE IF NOT EXISTS store_role (id INTEGER PRIMARY KEY CHECK (id = 1), "
                         "cell INTEGER NOT NULL)");
      !s) {
    return s;
  }
  auto have = query<int64_t>(*db_, "SELECT cell FROM store_role WHERE id = 1",
                             [](const sql::Stmt& st) { return st.col_int(0); });
  if (!have) return have.error();
  if (have->empty()) {
    // A hub.db from before the mark is hub.db; a new file is what it is opened as.
    if (cell >= 0) {
      auto tokens = query<int64_t>(*db_, "SELECT COUNT(*) FROM tokens",
                                   [](const sql::Stmt& st) { return st.col_int(0); });
      if (tokens && !tokens->empty() && tokens->front() > 0) {
        return make_error(Errc::conflict, path + " holds tokens: it is a hub.db, not " + role_name(cell));
      }
    }
    auto st = db_->prepare("INSERT INTO store_role (id, cell) VALUES (1, ?)");
    if (!st) return st.error();
    st->bind(1, static_cast<int64_t>(cell));
    if (auto r = st->run(); !r) return r;
  } else if (static_cast<int>(have->front()) != std::max(cell, -1)) {
    return make_error(Errc::conflict, path + " is " + role_name(static_cast<int>(have->front())) + ", not " +
                                          role_name(cell) + ": refusing to open it as that");
  }
  own_cell_ = cell;
  return {};
}

Status Store::prepare_cell_file() {
  // migrate() makes the table only if it is missing: this is the cell's
  // definition (a row's campaign is a record in hub.db; its device is the
  // copy in this file).
  return db_->exec(R"SQL(
CREATE TABLE IF NOT EXISTS campaign_devices (
  campaign_id TEXT NOT NULL, device_id TEXT NOT NULL REFERENCES devices(id),
  status TEXT NOT NULL, generation INTEGER NOT NULL, updated_ms INTEGER NOT NULL,
  reason TEXT NOT NULL DEFAULT '', message TEXT NOT NULL DEFAULT '',
  PRIMARY KEY (campaign_id, device_id));
)SQL");
}

Status Store::finish_cell_file() {
  std::string sql_text;
  for (const char* t : kDirectoryTriggers) sql_text += std::string("DROP TRIGGER IF EXISTS ") + t + ";";
  // What those triggers filled when migrate() first built the read models
  // (the label index it filled from the copies is right: it stays).
  sql_text += "DELETE FROM directory_counts; DELETE FROM directory_outbox;";
  // The cell's own label index of its copies: what a device walk of this
  // file with a label selector reads (AggregateStore's index walk). A
  // report never writes labels, so no report fires these.
  sql_text += "CREATE TRIGGER IF NOT EXISTS cell_labels_insert AFTER INSERT ON devices BEGIN " +
              label_index_add("NEW") + "; END;"
              "CREATE TRIGGER IF NOT EXISTS cell_labels_delete AFTER DELETE ON devices BEGIN " +
              label_index_remove("OLD") + "; END;"
              "CREATE TRIGGER IF NOT EXISTS cell_labels_update AFTER UPDATE OF labels ON devices "
              "WHEN OLD.labels != NEW.labels BEGIN " +
              label_index_remove("OLD") + "; " + label_index_add("NEW") + "; END;";
  return db_->exec(sql_text);
}

Status Store::only_in_cell_file(const char* what) const {
  if (own_cell_ >= 0) return {};
  return make_error(Errc::internal, std::string(what) + ": only a cell's own device file keeps copies of devices");
}

Status Store::adopt_device(const DeviceDirectoryEntry& e) {
  if (auto s = only_in_cell_file("adopt a device"); !s) return s;
  if (e.cell != own_cell_) {
    return make_error(Errc::internal, "device " + e.id + " is in cell " + std::to_string(e.cell) +
                                          ", not in this file's cell " + std::to_string(own_cell_));
  }
  // A new copy starts as the directory says (a decommissioned device's
  // reported state is that too); an existing one keeps its report columns.
  auto st = db_->prepare(
      "INSERT INTO devices (id, project, labels, public_key, hostname, arch, agent_version, enrolled_ms, gateway, "
      "enroll_issued_ms, cell, decommissioned, state) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET "
      "labels = excluded.labels, public_key = excluded.public_key, hostname = excluded.hostname, "
      "enrolled_ms = excluded.enrolled_ms, gateway = excluded.gateway, enroll_issued_ms = excluded.enroll_issued_ms, "
      "decommissioned = excluded.decommissioned "
      "WHERE labels != excluded.labels OR public_key != excluded.public_key OR hostname != excluded.hostname OR "
      "enrolled_ms != excluded.enrolled_ms OR gateway != excluded.gateway OR "
      "enroll_issued_ms != excluded.enroll_issued_ms OR decommissioned != excluded.decommissioned");
  if (!st) return st.error();
  st->bind(1, std::string_view(e.id)).bind(2, std::string_view(e.project))
      .bind(3, std::string_view(labels_json(e.labels))).bind(4, std::string_view(e.public_key_hex))
      .bind(5, std::string_view(e.hostname)).bind(6, std::string_view(e.arch))
      .bind(7, std::string_view(e.agent_version)).bind(8, e.enrolled_ms).bind(9, std::string_view(e.gateway))
      .bind(10, static_cast<int64_t>(e.enroll_issued_ms)).bind(11, static_cast<int64_t>(e.cell))
      .bind(12, static_cast<int64_t>(e.decommissioned ? 1 : 0))
      .bind(13, e.decommissioned ? std::string_view("decommissioned") : std::string_view("enrolled"));
  return st->run();
}

Status Store::forget_device(const std::string& id) {
  if (auto s = only_in_cell_file("forget a device"); !s) return s;
  for (const char* sql_text : {"DELETE FROM campaign_devices WHERE device_id = ?",
                               "DELETE FROM device_inventory WHERE device_id = ?",
                               "DELETE FROM device_events WHERE device_id = ?", "DELETE FROM devices WHERE id = ?"}) {
    auto st = db_->prepare(sql_text);
    if (!st) return st.error();
    st->bind(1, std::string_view(id));
    if (auto r = st->run(); !r) return r;
  }
  return {};
}

Result<std::vector<std::string>> Store::device_ids(const std::string& after, int64_t limit) {
  return query<std::string>(
      *db_, "SELECT id FROM devices WHERE id > ? ORDER BY id LIMIT ?",
      [&](sql::Stmt& st) { st.bind(1, std::string_view(after)).bind(2, limit); },
      [](const sql::Stmt& st) { return st.col_text(0); });
}

Result<std::vector<std::string>> Store::campaigns_with_rows() {
  // One probe per campaign down the (campaign, ...) index, not a scan of
  // every row: the next campaign id after the last one found.
  std::vector<std::string> out;
  auto st = db_->prepare("SELECT campaign_id FROM campaign_devices WHERE campaign_id > ? ORDER BY campaign_id LIMIT 1");
  if (!st) return st.error();
  std::string after;
  for (;;) {
    st->reset();
    st->bind(1, std::string_view(after));
    auto r = st->step();
    if (!r) return r.error();
    if (!*r) return out;
    after = st->col_text(0);
    out.push_back(after);
  }
}

Result<int64_t> Store::forget_campaign_rows(const std::string& campaign_id) {
  if (auto s = only_in_cell_file("forget a campaign's rows"); !s) return s.error();
  auto st = db_->prepare("DELETE FROM campaign_devices WHERE campaign_id = ?");
  if (!st) return st.error();
  st->bind(1, std::string_view(campaign_id));
  if (auto r = st->run(); !r) return r.error();
  return db_->changes();
}

Result<std::optional<DeviceRows>> Store::export_device(const std::string& id) {
  auto d = get_device(id);
  if (!d) return d.error();
  if (!*d) return std::optional<DeviceRows>();
  DeviceRows rows;
  rows.device = std::move(**d);
  auto campaigns = query<CampaignDeviceRecord>(
      *db_, "SELECT " + campaign_device_columns() + " FROM campaign_devices WHERE device_id = ? ORDER BY campaign_id",
      [&](sql::Stmt& st) { st.bind(1, std::string_view(id)); },
      [](const sql::Stmt& st) { return campaign_device_row(st, 0); });
  if (!campaigns) return campaigns.error();
  rows.campaigns = std::move(*campaigns);
  return std::optional<DeviceRows>(std::move(rows));
}

Status Store::import_device(const DeviceDirectoryEntry& e, const DeviceRows& rows) {
  if (auto s = adopt_device(e); !s) return s;
  DeviceRecord reported = rows.device;
  reported.id = e.id;
  if (auto s = save_device_state(reported); !s) return s;
  if (rows.device.inventory.updated_ms > 0) {
    if (auto s = save_device_inventory(e.id, rows.device.inventory); !s) return s;
  }
  auto st = db_->prepare("INSERT INTO campaign_devices (" + campaign_device_columns() +
                         ") VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (campaign_id, device_id) DO UPDATE SET "
                         "status = excluded.status, generation = excluded.generation, updated_ms = excluded.updated_ms, "
                         "reason = excluded.reason, message = excluded.message, wave = excluded.wave, "
                         "rank = excluded.rank, released_ms = excluded.released_ms, "
                         "deadline_ms = excluded.deadline_ms, prev_bundle_id = excluded.prev_bundle_id, "
                         "rollback_generation = excluded.rollback_generation, "
                         "deadline_left_ms = excluded.deadline_left_ms, zone = excluded.zone, cell = excluded.cell");
  if (!st) return st.error();
  for (const auto& r : rows.campaigns) {
    st->reset();
    st->bind(1, std::string_view(r.campaign_id)).bind(2, std::string_view(e.id)).bind(3, std::string_view(r.status))
        .bind(4, static_cast<int64_t>(r.generation)).bind(5, r.updated_ms).bind(6, std::string_view(r.reason))
        .bind(7, std::string_view(r.message)).bind(8, static_cast<int64_t>(r.wave)).bind_double(9, r.rank)
        .bind(10, r.released_ms).bind(11, r.deadline_ms).bind(12, std::string_view(r.prev_bundle_id))
        .bind(13, static_cast<int64_t>(r.rollback_generation)).bind(14, r.deadline_left_ms)
        .bind(15, std::string_view(r.zone)).bind(16, static_cast<int64_t>(e.cell));
    if (auto s = st->run(); !s) return s;
  }
  return {};
}

Result<CellReconciliation> reconcile_cell_file(Store& directory, int cell, DeviceStore& file, int64_t batch) {
  CellReconciliation out;
  batch = std::max<int64_t>(1, batch);
  // Campaigns first: an orphan's rows would otherwise outlive a forgotten copy's.
  auto known = directory.campaign_ids();
  if (!known) return known.error().with_context("reconcile cell " + std::to_string(cell));
  const std::set<std::string> campaigns(known->begin(), known->end());
  auto held = file.campaigns_with_rows();
  if (!held) return held.error().with_context("reconcile cell " + std::to_string(cell));
  for (const auto& id : *held) {
    if (campaigns.count(id)) continue;
    auto gone = file.forget_campaign_rows(id);
    if (!gone) return gone.error().with_context("reconcile cell " + std::to_string(cell) + " campaign " + id);
    ++out.orphan_campaigns;
  }
  // Then a merge of two id-ordered walks: the directory's devices of the
  // cell, and the file's copies.
  std::vector<DeviceDirectoryEntry> dir;
  std::vector<std::string> copies;
  size_t di = 0, ci = 0;
  std::string dir_after, copy_after;
  bool dir_done = false, copies_done = false;
  for (;;) {
    if (di == dir.size() && !dir_done) {
      auto next = directory.directory_entries(cell, dir_after, batch);
      if (!next) return next.error().with_context("reconcile cell " + std::to_string(cell));
      dir = std::move(*next);
      di = 0;
      dir_done = static_cast<int64_t>(dir.size()) < batch;
      if (!dir.empty()) dir_after = dir.back().id;
    }
    if (ci == copies.size() && !copies_done) {
      auto next = file.device_ids(copy_after, batch);
      if (!next) return next.error().with_context("reconcile cell " + std::to_string(cell));
      copies = std::move(*next);
      ci = 0;
      copies_done = static_cast<int64_t>(copies.size()) < batch;
      if (!copies.empty()) copy_after = copies.back();
    }
    const bool have_dir = di < dir.size(), have_copy = ci < copies.size();
    if (!have_dir && !have_copy) return out;
    // One transaction per step of the walk would be slow: take up to a
    // batch of decisions, then write them together.
    std::vector<const DeviceDirectoryEntry*> adopt;
    std::vector<std::string> forget;
    while (di < dir.size() || ci < copies.size()) {
      if (ci == copies.size() && !copies_done) break;  // more copies to read first
      if (di == dir.size() && !dir_done) break;         // more entries to read first
      if (ci == copies.size() || (di < dir.size() && dir[di].id < copies[ci])) {
        adopt.push_back(&dir[di++]);
      } else if (di == dir.size() || copies[ci] < dir[di].id) {
        forget.push_back(copies[ci++]);
      } else {
        ++di;
        ++ci;
      }
    }
    if (adopt.empty() && forget.empty()) continue;
    sql::Transaction tx(file.device_db());
    if (!tx.ok()) {
      return make_error(Errc::unavailable, "reconcile cell " + std::to_string(cell) + ": cannot begin", true);
    }
    for (const auto* e : adopt) {
      if (auto s = file.adopt_device(*e); !s) return s.error().with_context("reconcile device " + e->id);
    }
    for (const auto& id : forget) {
      if (auto s = file.forget_device(id); !s) return s.error().with_context("reconcile device " + id);
    }
    if (auto s = tx.commit(); !s) return s.error();
    out.adopted += static_cast<int64_t>(adopt.size());
    out.forgotten += static_cast<int64_t>(forget.size());
  }
}

}  // namespace flotilla::hub
