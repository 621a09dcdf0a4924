// Campaign tables of the hub's SQLite store.
#include <algorithm>
#include <map>

#include "flotilla/hub/store.hpp"
#include "rows.hpp"

namespace flotilla::hub {

namespace {

constexpr const char* kCampaignCols =
    "id, name, bundle_id, selector, state, created_ms, updated_ms, project, strategy, current_wave, wave_done_ms, "
    "state_reason, baseline_failed, baseline_finals, approved_wave, rate_tokens, rate_ms, zones";

CampaignRecord campaign_from(const sql::Stmt& s) {
  CampaignRecord c;
  c.id = s.col_text(0);
  c.name = s.col_text(1);
  c.bundle_id = s.col_text(2);
  c.selector = s.col_text(3);
  // A name that is no state (a store edited by hand) stops the engine there.
  c.state = campaign_state_from(s.col_text(4)).value_or(CampaignState::paused);
  c.created_ms = s.col_int(5);
  c.updated_ms = s.col_int(6);
  c.project = s.col_text(7);
  c.strategy = s.col_text(8);
  c.current_wave = static_cast<int>(s.col_int(9));
  c.wave_done_ms = s.col_int(10);
  c.state_reason = s.col_text(11);
  c.baseline_failed = s.col_int(12);
  c.baseline_finals = s.col_int(13);
  c.approved_wave = static_cast<int>(s.col_int(14));
  c.rate_tokens = s.col_double(15);
  c.rate_ms = s.col_int(16);
  c.zones = s.col_text(17);
  return c;
}

constexpr const char* kRowCols =
    "campaign_id, device_id, status, generation, updated_ms, reason, message, wave, rank, released_ms, deadline_ms, "
    "prev_bundle_id, rollback_generation, deadline_left_ms, zone, cell";

CampaignDeviceRecord row_from(const sql::Stmt& s, int o = 0) {
  CampaignDeviceRecord r;
  r.campaign_id = s.col_text(o + 0);
  r.device_id = s.col_text(o + 1);
  r.status = s.col_text(o + 2);
  r.generation = static_cast<uint64_t>(s.col_int(o + 3));
  r.updated_ms = s.col_int(o + 4);
  r.reason = s.col_text(o + 5);
  r.message = s.col_text(o + 6);
  r.wave = static_cast<int>(s.col_int(o + 7));
  r.rank = s.col_double(o + 8);
  r.released_ms = s.col_int(o + 9);
  r.deadline_ms = s.col_int(o + 10);
  r.prev_bundle_id = s.col_text(o + 11);
  r.rollback_generation = static_cast<uint64_t>(s.col_int(o + 12));
  r.deadline_left_ms = s.col_int(o + 13);
  r.zone = s.col_text(o + 14);
  r.cell = static_cast<int>(s.col_int(o + 15));
  return r;
}

using sql::query;

// "AND <p>cell IN (1,2) " for a cell filter; nothing for none (every cell).
std::string cell_condition(const std::optional<std::vector<int>>& cells, const char* prefix) {
  if (!cells) return "";
  std::string in;
  for (int c : *cells) in += (in.empty() ? "" : ",") + std::to_string(c);
  return std::string("AND ") + prefix + "cell IN (" + in + ") ";
}


// "a, b" -> "cd.a, cd.b", for a column list used in a join.
std::string qualified(const std::string& cols, const std::string& prefix) {
  std::string out;
  size_t at = 0;
  while (at < cols.size()) {
    size_t end = cols.find(',', at);
    if (end == std::string::npos) end = cols.size();
    const size_t start = cols.find_first_not_of(' ', at);
    out += (out.empty() ? "" : ", ") + prefix + cols.substr(start, end - start);
    at = end + 1;
  }
  return out;
}

}  // namespace

Status Store::migrate_campaigns() {
  // Data dirs made before waves existed gain the columns; new ones get them here too.
  const std::vector<std::pair<std::string, std::string>> campaign_cols = {
      {"project", "TEXT NOT NULL DEFAULT 'default'"}, {"strategy", "TEXT NOT NULL DEFAULT '{}'"},
      {"current_wave", "INTEGER NOT NULL DEFAULT 0"},   {"wave_done_ms", "INTEGER NOT NULL DEFAULT 0"},
      {"state_reason", "TEXT NOT NULL DEFAULT ''"},
      {"baseline_failed", "INTEGER NOT NULL DEFAULT 0"},
      {"baseline_finals", "INTEGER NOT NULL DEFAULT 0"},
      {"approved_wave", "INTEGER NOT NULL DEFAULT 0"},
      {"rate_tokens", "REAL NOT NULL DEFAULT 0"},
      {"rate_ms", "INTEGER NOT NULL DEFAULT 0"},
      {"zones", "TEXT NOT NULL DEFAULT ''"}};
  const std::vector<std::pair<std::string, std::string>> row_cols = {
      {"wave", "INTEGER NOT NULL DEFAULT 0"},         {"rank", "REAL NOT NULL DEFAULT 0"},
      {"released_ms", "INTEGER NOT NULL DEFAULT 0"},  {"deadline_ms", "INTEGER NOT NULL DEFAULT 0"},
      {"prev_bundle_id", "TEXT NOT NULL DEFAULT ''"}, {"rollback_generation", "INTEGER NOT NULL DEFAULT 0"},
      {"deadline_left_ms", "INTEGER NOT NULL DEFAULT 0"}, {"zone", "TEXT NOT NULL DEFAULT ''"},
      {"cell", "INTEGER NOT NULL DEFAULT -1"}};
  auto add_missing = [&](const std::string& table, const std::vector<std::pair<std::string, std::string>>& cols) -> Status {
    auto st = db_->prepare("SELECT name FROM pragma_table_info('" + table + "')");
    if (!st) return st.error();
    auto have = st->rows<std::string>([](const sql::Stmt& s) { return s.col_text(0); });
    if (!have) return have.error();
    for (const auto& [name, decl] : cols) {
      if (std::find(have->begin(), have->end(), name) != have->end()) continue;
      if (auto s = db_->exec("ALTER TABLE " + table + " ADD COLUMN " + name + " " + decl); !s) return s;
    }
    return {};
  };
  auto had_cell = has_column(*db_, "campaign_devices", "cell");
  if (!had_cell) return had_cell.error();
  const bool rows_had_cell = *had_cell;
  if (auto s = add_missing("campaigns", campaign_cols); !s) return s;
  if (auto s = add_missing("campaign_devices", row_cols); !s) return s;
  // Rows from before campaigns were counted per cell take their device's cell.
  if (!rows_had_cell) {
    if (auto s = db_->exec("UPDATE campaign_devices SET cell = COALESCE((SELECT cell FROM devices d WHERE "
                           "d.id = campaign_devices.device_id), 0)");
        !s) {
      return s;
    }
  }
  if (auto s = add_missing("devices", {{"gateway", "TEXT NOT NULL DEFAULT ''"}}); !s) return s;
  // Rows released before deadlines paused while offline: a device away now
  // gets its whole deadline when it comes back instead of failing at once.
  if (auto s = db_->exec(
          "UPDATE campaign_devices SET deadline_left_ms = MAX(deadline_ms - released_ms, 1), deadline_ms = 0 "
          "WHERE deadline_left_ms = 0 AND deadline_ms > 0 AND status IN ('pending', 'in_progress') "
          "AND COALESCE((SELECT online FROM devices d WHERE d.id = campaign_devices.device_id), 0) = 0");
      !s) {
    return s;
  }
  // Indexes: status lookups and wave release in rank order (campaign,
  // status, wave, rank),
  // deadline expiry without scanning every device in flight (the rows in
  // flight with a deadline only: a campaign's rows are made waiting, most
  // wait or are done at any time, and an index of every row cost a write at
  // creation and at each status change), a device's rows across campaigns, a
  // gateway's devices.
  if (auto s = db_->exec(
          "DROP INDEX IF EXISTS campaign_devices_status;"
          "DROP INDEX IF EXISTS campaign_devices_deadline;"
          "CREATE INDEX IF NOT EXISTS campaign_devices_wave ON campaign_devices(campaign_id, status, wave, rank);"
          "CREATE INDEX IF NOT EXISTS campaign_devices_in_flight ON campaign_devices(campaign_id, deadline_ms) "
          "WHERE status IN ('pending', 'in_progress') AND deadline_ms > 0;"
          "CREATE INDEX IF NOT EXISTS campaign_devices_device ON campaign_devices(device_id, status);"
          "CREATE INDEX IF NOT EXISTS devices_gateway ON devices(gateway) WHERE gateway != '';"
          // Release by time zone, for campaigns with a maintenance window only.
          "CREATE INDEX IF NOT EXISTS campaign_devices_zone ON campaign_devices(campaign_id, status, zone, wave, rank) "
          "WHERE zone != '';");
      !s) {
    return s;
  }
  return migrate_campaign_counts();
}

// campaign_counts holds COUNT(*) of campaign_devices by (campaign, cell,
// wave, status, device online), kept by triggers inside SQLite so every writer
// (reports, presence, the engine's bulk updates, a drain moving a device to
// another cell) keeps it exact, and the engine's tick and the status API read
// a few rows instead of grouping every device of a campaign. Each cell's rows
// are what its owner publishes to the coordinator (campaign_board.hpp). It is
// rebuilt from the rows at every open, so a data directory from before it
// existed (or before it had cells), or one edited by hand, starts right.
Status Store::migrate_campaign_counts() {
  auto has_cell = has_column(*db_, "campaign_counts", "cell");
  if (!has_cell) return has_cell.error();
  const bool per_cell = *has_cell;
  if (!per_cell) {
    // A table from before cells: its triggers name the old columns.
    if (auto s = db_->exec("DROP TRIGGER IF EXISTS campaign_counts_insert; DROP TRIGGER IF EXISTS "
                           "campaign_counts_update; DROP TRIGGER IF EXISTS campaign_counts_online; "
                           "DROP TABLE IF EXISTS campaign_counts;");
        !s) {
      return s;
    }
  }
  return db_->exec(R"SQL(
CREATE TABLE IF NOT EXISTS campaign_counts (
  campaign_id TEXT NOT NULL, cell INTEGER NOT NULL, wave INTEGER NOT NULL, status TEXT NOT NULL,
  online INTEGER NOT NULL, n INTEGER NOT NULL, PRIMARY KEY (campaign_id, cell, wave, status, online)) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS campaign_counts_insert AFTER INSERT ON campaign_devices BEGIN
  INSERT INTO campaign_counts VALUES (NEW.campaign_id, NEW.cell, NEW.wave, NEW.status,
      COALESCE((SELECT online FROM devices WHERE id = NEW.device_id), 0), 1)
    ON CONFLICT DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS campaign_counts_update AFTER UPDATE OF status, wave, cell ON campaign_devices
    WHEN OLD.status != NEW.status OR OLD.wave != NEW.wave OR OLD.cell != NEW.cell BEGIN
  UPDATE campaign_counts SET n = n - 1
    WHERE campaign_id = OLD.campaign_id AND cell = OLD.cell AND wave = OLD.wave AND status = OLD.status
      AND online = COALESCE((SELECT online FROM devices WHERE id = OLD.device_id), 0);
  INSERT INTO campaign_counts VALUES (NEW.campaign_id, NEW.cell, NEW.wave, NEW.status,
      COALESCE((SELECT online FROM devices WHERE id = NEW.device_id), 0), 1)
    ON CONFLICT DO UPDATE SET n = n + 1;
END;
-- Rows go only with their device's copy out of a cell's own file, or with a
-- campaign whose record never committed (Store::forget_device,
-- forget_campaign_rows).
CREATE TRIGGER IF NOT EXISTS campaign_counts_delete AFTER DELETE ON campaign_devices BEGIN
  UPDATE campaign_counts SET n = n - 1
    WHERE campaign_id = OLD.campaign_id AND cell = OLD.cell AND wave = OLD.wave AND status = OLD.status
      AND online = COALESCE((SELECT online FROM devices WHERE id = OLD.device_id), 0);
END;
-- A device moved to another cell (a drain) takes its campaign rows along
-- through the directory's outbox (HubService::follow_directory), no longer
-- by a trigger here: with a store per cell the two tables are in two files.
DROP TRIGGER IF EXISTS campaign_devices_cell;
-- A device's deadline counts only time online: going away pauses it (what is
-- left is kept), coming back resumes it. Every writer of devices.online sets
-- last_seen_ms to its clock's now in the same statement, so that is "now".
CREATE TRIGGER IF NOT EXISTS campaign_deadline_pause AFTER UPDATE OF online ON devices
    WHEN OLD.online = 1 AND NEW.online = 0 BEGIN
  UPDATE campaign_devices SET deadline_left_ms = MAX(deadline_ms - NEW.last_seen_ms, 1), deadline_ms = 0
    WHERE device_id = NEW.id AND status IN ('pending', 'in_progress') AND deadline_ms > 0;
END;
CREATE TRIGGER IF NOT EXISTS campaign_deadline_resume AFTER UPDATE OF online ON devices
    WHEN OLD.online = 0 AND NEW.online = 1 BEGIN
  UPDATE campaign_devices SET deadline_ms = NEW.last_seen_ms + deadline_left_ms
    WHERE device_id = NEW.id AND status IN ('pending', 'in_progress') AND deadline_ms = 0 AND deadline_left_ms > 0;
END;
CREATE TRIGGER IF NOT EXISTS campaign_counts_online AFTER UPDATE OF online ON devices
    WHEN OLD.online != NEW.online BEGIN
  UPDATE campaign_counts SET n = n - 1
    WHERE (campaign_id, cell, wave, status, online) IN
      (SELECT campaign_id, cell, wave, status, OLD.online FROM campaign_devices WHERE device_id = NEW.id);
  INSERT INTO campaign_counts
    SELECT campaign_id, cell, wave, status, NEW.online, 1 FROM campaign_devices WHERE device_id = NEW.id
    ON CONFLICT DO UPDATE SET n = n + 1;
END;
DELETE FROM campaign_counts;
INSERT INTO campaign_counts
  SELECT cd.campaign_id, cd.cell, cd.wave, cd.status, COALESCE(d.online, 0), COUNT(*) FROM campaign_devices cd
    LEFT JOIN devices d ON d.id = cd.device_id GROUP BY 1, 2, 3, 4, 5;
)SQL");
}

Status Store::insert_campaign_record(const CampaignRecord& c) {
  auto st = db_->prepare(std::string("INSERT INTO campaigns (") + kCampaignCols +
                         ") VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)");
  if (!st) return st.error();
  st->bind(1, std::string_view(c.id)).bind(2, std::string_view(c.name)).bind(3, std::string_view(c.bundle_id))
      .bind(4, std::string_view(c.selector)).bind(5, state_name(c.state)).bind(6, c.created_ms)
      .bind(7, c.updated_ms).bind(8, std::string_view(c.project)).bind(9, std::string_view(c.strategy))
      .bind(10, static_cast<int64_t>(c.current_wave)).bind(11, c.wave_done_ms)
      .bind(12, std::string_view(c.state_reason)).bind(13, c.baseline_failed).bind(14, c.baseline_finals)
      .bind(15, static_cast<int64_t>(c.approved_wave)).bind_double(16, c.rate_tokens).bind(17, c.rate_ms)
      .bind(18, std::string_view(c.zones));
  return st->run();
}

Status Store::insert_campaign(const CampaignRecord& c, const std::vector<CampaignMember>& members) {
  sql::Transaction tx(*db_);
  if (!tx.ok()) return make_error(Errc::unavailable, "cannot begin transaction", true);
  if (auto s = insert_campaign_record(c); !s) return s;
  for (const auto& m : members) {
    if (auto s = add_campaign_member(c.id, m, c.created_ms); !s) return s;
  }
  return tx.commit();
}

Status Store::add_campaign_member(const std::string& campaign_id, const CampaignMember& m, int64_t now_ms) {
  // In a cell's own file a device the directory has may have no copy yet
  // (its enrollment's outbox entry not followed): no row then; following
  // the entry adds it to live campaigns it matches (live membership).
  auto st = db_->prepare(
      "INSERT INTO campaign_devices (campaign_id, device_id, status, generation, updated_ms, wave, rank, zone, cell) "
      "SELECT ?, ?, 'waiting', 0, ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM devices WHERE id = ?2) "
      "ON CONFLICT DO NOTHING");
  if (!st) return st.error();
  st->bind(1, std::string_view(campaign_id)).bind(2, std::string_view(m.device_id)).bind(3, now_ms)
      .bind(4, static_cast<int64_t>(m.wave)).bind_double(5, m.rank).bind(6, std::string_view(m.zone))
      .bind(7, static_cast<int64_t>(m.cell));
  return st->run();
}

Result<std::optional<CampaignRecord>> Store::get_campaign(const std::string& id) {
  auto rows = query<CampaignRecord>(
      *db_, std::string("SELECT ") + kCampaignCols + " FROM campaigns WHERE id = ?",
      [&](sql::Stmt& s) { s.bind(1, std::string_view(id)); }, campaign_from);
  if (!rows) return rows.error();
  if (rows->empty()) return std::optional<CampaignRecord>();
  return std::optional<CampaignRecord>(rows->front());
}

Result<std::vector<CampaignRecord>> Store::list_campaigns() {
  return query<CampaignRecord>(
      *db_, std::string("SELECT ") + kCampaignCols + " FROM campaigns ORDER BY created_ms, id", [](sql::Stmt&) {},
      campaign_from);
}

Status Store::update_campaign(const CampaignRecord& c) {
  auto st = db_->prepare(
      "UPDATE campaigns SET state = ?, updated_ms = ?, current_wave = ?, wave_done_ms = ?, state_reason = ?, "
      "baseline_failed = ?, baseline_finals = ?, approved_wave = ?, rate_tokens = ?, rate_ms = ?, zones = ? "
      "WHERE id = ?");
  if (!st) return st.error();
  st->bind(1, state_name(c.state)).bind(2, c.updated_ms).bind(3, static_cast<int64_t>(c.current_wave))
      .bind(4, c.wave_done_ms).bind(5, std::string_view(c.state_reason)).bind(6, c.baseline_failed)
      .bind(7, c.baseline_finals).bind(8, static_cast<int64_t>(c.approved_wave)).bind_double(9, c.rate_tokens)
      .bind(10, c.rate_ms).bind(11, std::string_view(c.zones)).bind(12, std::string_view(c.id));
  return st->run();
}

Result<std::vector<CampaignDeviceRecord>> Store::campaign_devices(const std::string& campaign_id) {
  return query<CampaignDeviceRecord>(
      *db_, std::string("SELECT ") + kRowCols + " FROM campaign_devices WHERE campaign_id = ? ORDER BY device_id",
      [&](sql::Stmt& s) { s.bind(1, std::string_view(campaign_id)); },
      [](const sql::Stmt& s) { return row_from(s); });
}

Result<std::vector<CampaignDeviceRecord>> Store::campaign_devices_with_status(
    const std::string& campaign_id, const std::vector<std::string>& statuses) {
  std::string in;
  for (size_t i = 0; i < statuses.size(); ++i) in += i ? ",?" : "?";
  return query<CampaignDeviceRecord>(
      *db_,
      std::string("SELECT ") + kRowCols + " FROM campaign_devices WHERE campaign_id = ? AND status IN (" + in +
          ") ORDER BY rank",
      [&](sql::Stmt& s) {
        s.bind(1, std::string_view(campaign_id));
        for (size_t i = 0; i < statuses.size(); ++i) s.bind(static_cast<int>(i + 2), std::string_view(statuses[i]));
      },
      [](const sql::Stmt& s) { return row_from(s); });
}

Result<std::optional<CampaignDeviceRecord>> Store::campaign_device(const std::string& campaign_id,
                                                                   const std::string& device_id) {
  auto rows = query<CampaignDeviceRecord>(
      *db_, std::string("SELECT ") + kRowCols + " FROM campaign_devices WHERE campaign_id = ? AND device_id = ?",
      [&](sql::Stmt& s) { s.bind(1, std::string_view(campaign_id)).bind(2, std::string_view(device_id)); },
      [](const sql::Stmt& s) { return row_from(s); });
  if (!rows) return rows.error();
  if (rows->empty()) return std::optional<CampaignDeviceRecord>();
  return std::optional<CampaignDeviceRecord>(rows->front());
}

Status Store::save_campaign_device(const CampaignDeviceRecord& cd) {
  auto st = db_->prepare(
      "UPDATE campaign_devices SET status = ?, generation = ?, updated_ms = ?, reason = ?, message = ?, "
      "released_ms = ?, prev_bundle_id = ?, rollback_generation = ? "
      "WHERE campaign_id = ? AND device_id = ?");
  if (!st) return st.error();
  // Not the deadline: the presence triggers own it once it runs, and a row
  // read before a presence change in the same batch must not undo it.
  st->bind(1, std::string_view(cd.status)).bind(2, static_cast<int64_t>(cd.generation)).bind(3, cd.updated_ms)
      .bind(4, std::string_view(cd.reason)).bind(5, std::string_view(cd.message)).bind(6, cd.released_ms)
      .bind(7, std::string_view(cd.prev_bundle_id)).bind(8, static_cast<int64_t>(cd.rollback_generation))
      .bind(9, std::string_view(cd.campaign_id)).bind(10, std::string_view(cd.device_id));
  return st->run();
}

Status Store::start_deadline(const std::string& campaign_id, const std::string& device_id, int64_t budget_ms,
                             int64_t now_ms) {
  // Runs from now for a device that is online (it gets its desired state
  // now); waits for the device to come online otherwise.
  auto st = db_->prepare(
      "UPDATE campaign_devices SET deadline_left_ms = ?1, deadline_ms = CASE WHEN "
      "COALESCE((SELECT online FROM devices WHERE id = ?3), 0) = 1 THEN ?2 + ?1 ELSE 0 END "
      "WHERE campaign_id = ?4 AND device_id = ?3");
  if (!st) return st.error();
  st->bind(1, budget_ms).bind(2, now_ms).bind(3, std::string_view(device_id)).bind(4, std::string_view(campaign_id));
  return st->run();
}

namespace {
CampaignCountRow count_row(const sql::Stmt& s) {
  return CampaignCountRow{static_cast<int>(s.col_int(0)), s.col_text(1), s.col_int(2) != 0, s.col_int(3)};
}
}  // namespace

Result<std::vector<CampaignCountRow>> campaign_counts_on(sql::Db& db, const std::string& campaign_id) {
  return query<CampaignCountRow>(
      db,
      "SELECT wave, status, online, SUM(n) FROM campaign_counts WHERE campaign_id = ? AND n != 0 "
      "GROUP BY 1, 2, 3 HAVING SUM(n) != 0 ORDER BY 1, 2, 3",
      [&](sql::Stmt& s) { s.bind(1, std::string_view(campaign_id)); }, count_row);
}

Result<std::vector<CampaignCountRow>> Store::campaign_counts(const std::string& campaign_id) {
  return campaign_counts_on(*db_, campaign_id);
}

Result<std::vector<CampaignCountRow>> Store::campaign_counts(const std::string& campaign_id, int cell) {
  return query<CampaignCountRow>(
      *db_,
      "SELECT wave, status, online, n FROM campaign_counts WHERE campaign_id = ? AND cell = ? AND n != 0 "
      "ORDER BY 1, 2, 3",
      [&](sql::Stmt& s) { s.bind(1, std::string_view(campaign_id)).bind(2, static_cast<int64_t>(cell)); }, count_row);
}

Result<std::vector<int>> Store::campaign_cells(const std::string& campaign_id) {
  return query<int>(
      *db_, "SELECT DISTINCT cell FROM campaign_counts WHERE campaign_id = ? AND n != 0 ORDER BY 1",
      [&](sql::Stmt& s) { s.bind(1, std::string_view(campaign_id)); },
      [](const sql::Stmt& s) { return static_cast<int>(s.col_int(0)); });
}

Result<std::vector<CampaignCountRow>> Store::recount_campaign(const std::string& campaign_id) {
  return query<CampaignCountRow>(
      *db_,
      "SELECT cd.wave, cd.status, COALESCE(d.online, 0), COUNT(*) FROM campaign_devices cd "
      "LEFT JOIN devices d ON d.id = cd.device_id WHERE cd.campaign_id = ? GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
      [&](sql::Stmt& s) { s.bind(1, std::string_view(campaign_id)); }, count_row);
}

Result<std::vector<CampaignCountRow>> Store::recount_campaign(const std::string& campaign_id, int cell) {
  // The cell a row is counted in is its device's (drains move both).
  return query<CampaignCountRow>(
      *db_,
      "SELECT cd.wave, cd.status, COALESCE(d.online, 0), COUNT(*) FROM campaign_devices cd "
      "LEFT JOIN devices d ON d.id = cd.device_id WHERE cd.campaign_id = ? AND COALESCE(d.cell, 0) = ? "
      "GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
      [&](sql::Stmt& s) { s.bind(1, std::string_view(campaign_id)).bind(2, static_cast<int64_t>(cell)); }, count_row);
}

Result<std::map<std::string, int64_t>> Store::failure_reasons(const std::string& campaign_id) {
  auto rows = query<std::pair<std::string, int64_t>>(
      *db_,
      "SELECT reason, COUNT(*) FROM campaign_devices WHERE campaign_id = ? AND status IN ('failed', 'rollback_failed') "
      "GROUP BY 1",
      [&](sql::Stmt& s) { s.bind(1, std::string_view(campaign_id)); },
      [](const sql::Stmt& s) { return std::make_pair(s.col_text(0), s.col_int(1)); });
  if (!rows) return rows.error();
  std::map<std::string, int64_t> out;
  for (auto& [reason, n] : *rows) out[reason.empty() ? "unknown" : reason] += n;
  return out;
}

Result<std::vector<std::string>> Store::away_devices(const std::string& campaign_id, int64_t limit) {
  return query<std::string>(
      *db_,
      "SELECT cd.device_id FROM campaign_devices cd JOIN devices d ON d.id = cd.device_id "
      "WHERE cd.campaign_id = ? AND cd.status IN ('waiting', 'pending', 'in_progress', 'rolling_back') "
      "AND d.online = 0 ORDER BY cd.device_id LIMIT ?",
      [&](sql::Stmt& s) { s.bind(1, std::string_view(campaign_id)).bind(2, limit); },
      [](const sql::Stmt& s) { return s.col_text(0); });
}

Result<std::vector<CampaignDeviceRecord>> Store::releasable(const std::string& campaign_id, int max_wave,
                                                            bool online, int64_t limit, const std::string& zone,
                                                            const std::optional<std::vector<int>>& cells) {
  // Walks campaign_devices_wave (or campaign_devices_zone) in (wave, rank)
  // order and stops at `limit`: a tick reads what it releases, not every
  // waiting row.
  static const std::string cols = qualified(kRowCols, "cd.");
  if (cells && cells->empty()) return std::vector<CampaignDeviceRecord>{};
  return query<CampaignDeviceRecord>(
      *db_,
      "SELECT " + cols +
          " FROM campaign_devices cd LEFT JOIN devices d ON d.id = cd.device_id "
          "WHERE cd.campaign_id = ? AND cd.status = 'waiting' AND cd.wave <= ? AND COALESCE(d.online, 0) = ? " +
          (zone.empty() ? "" : "AND cd.zone = ? ") + cell_condition(cells, "cd.") + "ORDER BY cd.wave, cd.rank LIMIT ?",
      [&](sql::Stmt& s) {
        s.bind(1, std::string_view(campaign_id)).bind(2, static_cast<int64_t>(max_wave)).bind(3, online ? 1 : 0);
        if (zone.empty()) {
          s.bind(4, limit);
        } else {
          s.bind(4, std::string_view(zone)).bind(5, limit);
        }
      },
      [](const sql::Stmt& s) { return row_from(s); });
}

Result<int64_t> Store::expire_deadlines(const std::string& campaign_id, int64_t now_ms,
                                        const std::optional<std::vector<int>>& cells) {
  if (cells && cells->empty()) return int64_t{0};
  // Only devices that are online run out of time: offline is its own state.
  auto st = db_->prepare(
      "UPDATE campaign_devices SET status = 'failed', reason = 'deadline_exceeded', "
      "message = 'no outcome before the per-device deadline', updated_ms = ? "
      "WHERE campaign_id = ? AND status IN ('pending', 'in_progress') AND deadline_ms > 0 AND deadline_ms < ? " +
      cell_condition(cells, "") +
      "AND EXISTS (SELECT 1 FROM devices d WHERE d.id = campaign_devices.device_id AND d.online = 1)");
  if (!st) return st.error();
  st->bind(1, now_ms).bind(2, std::string_view(campaign_id)).bind(3, now_ms);
  if (auto s = st->run(); !s) return s.error();
  return db_->changes();
}

Result<std::vector<std::string>> Store::supersede_others(const std::string& device_id, const std::string& campaign_id,
                                                         int64_t now_ms) {
  auto ids = query<std::string>(
      *db_,
      "SELECT campaign_id FROM campaign_devices WHERE device_id = ? AND campaign_id != ? "
      "AND status IN ('waiting', 'pending', 'in_progress', 'rolling_back')",
      [&](sql::Stmt& s) { s.bind(1, std::string_view(device_id)).bind(2, std::string_view(campaign_id)); },
      [](const sql::Stmt& s) { return s.col_text(0); });
  if (!ids) return ids.error();
  if (ids->empty()) return ids;
  auto st = db_->prepare(
      "UPDATE campaign_devices SET status = 'superseded', updated_ms = ? WHERE device_id = ? AND campaign_id != ? "
      "AND status IN ('waiting', 'pending', 'in_progress', 'rolling_back')");
  if (!st) return st.error();
  st->bind(1, now_ms).bind(2, std::string_view(device_id)).bind(3, std::string_view(campaign_id));
  if (auto s = st->run(); !s) return s.error();
  return ids;
}

// Row mappings shared with store/aggregate_store.cpp (store/rows.hpp).
std::string campaign_columns() { return kCampaignCols; }
CampaignRecord campaign_row(const sql::Stmt& s) { return campaign_from(s); }
std::string campaign_device_columns() { return kRowCols; }
CampaignDeviceRecord campaign_device_row(const sql::Stmt& s, int offset) { return row_from(s, offset); }

Status Store::set_device_desired(const std::string& device_id, uint64_t generation, const std::string& bundle_id,
                                 const std::string& campaign_id) {
  auto st = db_->prepare("UPDATE devices SET generation = ?, desired_bundle_id = ?, campaign_id = ? WHERE id = ?");
  if (!st) return st.error();
  st->bind(1, static_cast<int64_t>(generation)).bind(2, std::string_view(bundle_id))
      .bind(3, std::string_view(campaign_id)).bind(4, std::string_view(device_id));
  return st->run();
}

}  // namespace flotilla::hub
