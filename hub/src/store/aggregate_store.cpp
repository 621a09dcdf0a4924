// The dashboard's read models: the schema that keeps them (triggers inside
// SQLite, so every writer keeps them exact) and the bounded queries over it.
//
// What a report costs is the hub's hot path (docs/scale.md), so nothing here
// adds an index that every report rewrites: a full index on devices.state
// doubled the cost of a report's UPDATE in a 300k-device measurement (SQLite
// rewrites an index entry whenever its column is in the SET list, changed or
// not). The indexes added are on columns reports never set (hostname,
// enrolled_ms), a partial one whose rows are the rare ones (offline
// devices), and tables written only when the state, labels, inventory or an
// outcome change; bench/read_models_cost.sh measures what a report pays.
#include "flotilla/hub/aggregates.hpp"

#include <algorithm>
#include <charconv>
#include <map>
#include <nlohmann/json.hpp>

#include "flotilla/common/encoding.hpp"
#include "flotilla/common/log.hpp"
#include "flotilla/hub/merge.hpp"
#include "rows.hpp"

namespace flotilla::hub {

namespace {

using sql::query;

// Bumped when the tables or triggers below change: a store of an older
// version drops them and rebuilds them from the device rows.
constexpr int kAggregateSchema = 10;

// How many failure reasons one store gives a campaign's failure groups to
// merge. Reasons are names of v1::Reason (a report's) or the hub's own
// (deadline_exceeded, ...), a few dozen; the bound keeps a part bounded
// whatever a store holds.
constexpr int64_t kFailureReasonsPerStore = 256;

// The dimensions counted: name, the device columns it depends on, and its
// value as an SQL expression over "@." (OLD., NEW. or a table alias); NULL =
// not counted. Every dimension but state leaves decommissioned devices out
// (they are history, not fleet): the reported ones by the state a
// decommission sets, the directory's by its own column (kReportedLive,
// kDirectoryLive).
//
// Two tables hold them, split by who writes the columns (ADR 18, slice 3):
// fleet_counts the dimensions of what devices report (state, the reported
// ones, cert_day from inventories), kept by triggers on the report columns;
// directory_counts those of the device directory (the labelled ones, and
// broker_cert_day from the certificates the hub issued), kept by triggers on
// labels, project, enrollment, decommissioning and certificates, never by a
// report. When a cell's devices get a file of their own, fleet_counts goes
// with them and directory_counts stays in hub.db; readers sum both.
struct Dim {
  const char* name;
  const char* cols;
  const char* expr;
};
constexpr Dim kState = {"state", "state", "@.state"};
// Set by reports, but rarely changed by one.
constexpr Dim kReported[] = {
    {"online", "online", "CASE @.online WHEN 1 THEN 'online' ELSE 'offline' END"},
    {"version", "applied_bundle, applied_version",
     "CASE WHEN @.applied_bundle = '' THEN '' ELSE @.applied_bundle || ':' || @.applied_version END"},
    {"k3s", "k3s_version", "@.k3s_version"},
    {"agent", "agent_version", "@.agent_version"},
};
// Never set by reports: counted in directory_counts.
constexpr Dim kLabelled[] = {
    {"region", "labels", "CASE WHEN json_valid(@.labels) THEN json_extract(@.labels, '$.region') END"},
    {"cell", "labels", "CASE WHEN json_valid(@.labels) THEN json_extract(@.labels, '$.cell') END"},
};
// Which rows of devices are fleet, not history, as an SQL condition over "@.":
// the report side reads the state a decommission sets, the directory its own
// column (ADR 18: the directory never reads a column a report writes).
constexpr const char* kReportedLive = "@.state != 'decommissioned'";
constexpr const char* kDirectoryLive = "@.decommissioned = 0";
constexpr const char* kTroubleStates = "('failed', 'refused', 'rolled_back', 'rolling_back')";
// The same test written out: inside a trigger, "x IN (list)" builds a lookup
// table at every run of the trigger (2 us a report, measured), a chain of
// comparisons does not.
std::string is_trouble(const std::string& x) {
  return "(" + x + " = 'failed' OR " + x + " = 'refused' OR " + x + " = 'rolled_back' OR " + x + " = 'rolling_back')";
}

// A devices row's text labels as (key, value) rows.
constexpr const char* kLabelsOf = "json_each(CASE WHEN json_valid(@.labels) THEN @.labels ELSE '{}' END)";

std::string with(const std::string& expr, const std::string& who) {
  std::string out = expr;
  for (size_t at = out.find("@."); at != std::string::npos; at = out.find("@.", at + who.size())) {
    out.replace(at, 2, who);
  }
  return out;
}

// "a, b" -> "OLD.a != NEW.a OR OLD.b != NEW.b"
std::string changed(const std::string& cols) {
  std::string out;
  size_t at = 0;
  while (at < cols.size()) {
    size_t end = cols.find(',', at);
    if (end == std::string::npos) end = cols.size();
    const size_t start = cols.find_first_not_of(' ', at);
    const std::string c = cols.substr(start, end - start);
    out += (out.empty() ? "" : " OR ") + std::string("OLD.") + c + " != NEW." + c;
    at = end + 1;
  }
  return out;
}

// One dimension's move from the OLD row to the NEW one in `table`, each
// statement run only when `guard` holds (evaluated once: OLD and NEW are
// constants here); unless `all`, only rows for which `live` holds count.
std::string move(const Dim& d, const std::string& guard, bool all, const std::string& table = "fleet_counts",
                 const std::string& live = kReportedLive) {
  const std::string name = d.name;
  return "UPDATE " + table + " SET n = n - 1 WHERE (" + guard + ")" + (all ? "" : " AND " + with(live, "OLD.")) +
         " AND project = OLD.project AND dim = '" + name + "' AND value = " + with(d.expr, "OLD.") +
         ";\n  INSERT INTO " + table + " SELECT NEW.project, '" + name + "', " + with(d.expr, "NEW.") +
         ", 1 WHERE (" + guard + ")" + (all ? "" : " AND " + with(live, "NEW.")) + " AND " + with(d.expr, "NEW.") +
         " IS NOT NULL ON CONFLICT DO UPDATE SET n = n + 1;\n  ";
}

// The report's UPDATE sets every reported column, and SQLite runs every
// trigger named on one of them (its WHEN is checked inside it): each costs
// about half a microsecond even when it does nothing (bench/read_models_cost.sh).
// So the always-firing trigger (the state's) holds only its counts, and
// everything else sits behind a WHEN that a report rarely meets.
std::string fleet_triggers() {
  const std::string decom = "(OLD.state = 'decommissioned') != (NEW.state = 'decommissioned')";
  std::string sql;
  // Insert and delete: every reported dimension at once.
  std::vector<Dim> dims = {kState};
  dims.insert(dims.end(), std::begin(kReported), std::end(kReported));
  std::string ins_values, del_values;
  for (const auto& d : dims) {
    const bool all = std::string(d.name) == "state";
    ins_values += std::string(ins_values.empty() ? "" : " UNION ALL ") + "SELECT '" + d.name + "' AS dim, " +
                  with(d.expr, "NEW.") + " AS value" + (all ? "" : " WHERE " + with(kReportedLive, "NEW."));
    del_values += std::string(del_values.empty() ? "" : " UNION ALL ") + "SELECT '" + d.name + "', " +
                  with(d.expr, "OLD.") + (all ? "" : " WHERE " + with(kReportedLive, "OLD."));
  }
  sql += "CREATE TRIGGER fleet_counts_insert AFTER INSERT ON devices BEGIN "
         "INSERT INTO fleet_counts SELECT NEW.project, dim, value, 1 FROM (" + ins_values +
         ") WHERE value IS NOT NULL ON CONFLICT DO UPDATE SET n = n + 1; "
         "INSERT OR IGNORE INTO device_trouble SELECT NEW.state, NEW.id WHERE " + is_trouble("NEW.state") +
         "; END;\n";
  sql += "CREATE TRIGGER fleet_counts_delete AFTER DELETE ON devices BEGIN "
         "UPDATE fleet_counts SET n = n - 1 WHERE project = OLD.project AND (dim, value) IN (" + del_values +
         "); DELETE FROM device_trouble WHERE state = OLD.state AND device_id = OLD.id; END;\n";
  // The state: the one dimension almost every report changes, so its
  // trigger does nothing else (a statement skipped inside a trigger still
  // costs about a microsecond; a trigger whose WHEN fails, half of one).
  // A device's project is fixed at its first enrollment (a token of another
  // project gets 409; the upsert never writes it again), so the report
  // side's triggers are named on report columns only (ADR 18).
  sql += "CREATE TRIGGER fleet_counts_state AFTER UPDATE OF state ON devices "
         "WHEN OLD.state != NEW.state BEGIN\n  " +
         move(kState, "1", true) + "\nEND;\n";
  sql += "CREATE TRIGGER device_trouble_update AFTER UPDATE OF state ON devices WHEN OLD.state != NEW.state "
         "AND (" + is_trouble("OLD.state") + " OR " + is_trouble("NEW.state") + ") BEGIN\n  "
         "DELETE FROM device_trouble WHERE state = OLD.state AND device_id = OLD.id;\n  "
         "INSERT OR IGNORE INTO device_trouble SELECT NEW.state, NEW.id WHERE " + is_trouble("NEW.state") +
         ";\nEND;\n";
  // The reported dimensions, and all of them when a device's reported state
  // moves in or out of decommissioned.
  std::string when = decom;
  std::string body;
  for (const auto& d : kReported) {
    when += " OR " + changed(d.cols);
    body += move(d, decom + " OR " + changed(d.cols), false);
  }
  sql += "CREATE TRIGGER fleet_counts_reported AFTER UPDATE OF state, online, applied_bundle, "
         "applied_version, k3s_version, agent_version ON devices WHEN " + when + " BEGIN\n  " + body + "\nEND;\n";
  // Certificate expiry lives in device_inventory, by day.
  sql += R"SQL(
CREATE TRIGGER fleet_counts_cert_insert AFTER INSERT ON device_inventory WHEN NEW.cert_expiry_unix > 0 BEGIN
  INSERT INTO fleet_counts VALUES (NEW.project, 'cert_day', NEW.cert_expiry_unix / 86400, 1)
    ON CONFLICT DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER fleet_counts_cert_update AFTER UPDATE OF cert_expiry_unix, project ON device_inventory
    WHEN OLD.cert_expiry_unix / 86400 != NEW.cert_expiry_unix / 86400 OR OLD.project != NEW.project BEGIN
  UPDATE fleet_counts SET n = n - 1 WHERE OLD.cert_expiry_unix > 0 AND project = OLD.project AND dim = 'cert_day'
    AND value = CAST(OLD.cert_expiry_unix / 86400 AS TEXT);
  INSERT INTO fleet_counts SELECT NEW.project, 'cert_day', NEW.cert_expiry_unix / 86400, 1
    WHERE NEW.cert_expiry_unix > 0 ON CONFLICT DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER fleet_counts_cert_delete AFTER DELETE ON device_inventory WHEN OLD.cert_expiry_unix > 0 BEGIN
  UPDATE fleet_counts SET n = n - 1 WHERE project = OLD.project AND dim = 'cert_day'
    AND value = CAST(OLD.cert_expiry_unix / 86400 AS TEXT);
END;
)SQL";
  // Broker client certificates (issue 16): each device's latest unrevoked
  // one, kept in device_broker_cert from device_certs (written at enrollment,
  // renewal, decommission and pruning, never by a report), counted by day of
  // not_after in directory_counts (decommissioning drops the row: see
  // directory_triggers). A renewal replaces the device's row; a revocation or the
  // pruning of that very certificate removes it.
  sql += R"SQL(
CREATE TRIGGER broker_cert_issued AFTER INSERT ON device_certs WHEN NEW.revoked_ms = 0 BEGIN
  INSERT INTO device_broker_cert SELECT NEW.device_id, d.project, NEW.serial, NEW.not_after FROM devices d
    WHERE d.id = NEW.device_id AND d.decommissioned = 0
    ON CONFLICT (device_id) DO UPDATE SET project = excluded.project, serial = excluded.serial,
      not_after = excluded.not_after;
END;
CREATE TRIGGER broker_cert_revoked AFTER UPDATE OF revoked_ms ON device_certs
    WHEN OLD.revoked_ms = 0 AND NEW.revoked_ms != 0 BEGIN
  DELETE FROM device_broker_cert WHERE device_id = NEW.device_id AND serial = NEW.serial;
END;
CREATE TRIGGER broker_cert_forgotten AFTER DELETE ON device_certs BEGIN
  DELETE FROM device_broker_cert WHERE device_id = OLD.device_id AND serial = OLD.serial;
END;
CREATE TRIGGER broker_cert_device_deleted AFTER DELETE ON devices BEGIN
  DELETE FROM device_broker_cert WHERE device_id = OLD.id;
END;
CREATE TRIGGER fleet_counts_broker_cert_insert AFTER INSERT ON device_broker_cert BEGIN
  INSERT INTO directory_counts VALUES (NEW.project, 'broker_cert_day', CAST(NEW.not_after / 86400 AS TEXT), 1)
    ON CONFLICT DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER fleet_counts_broker_cert_update AFTER UPDATE ON device_broker_cert
    WHEN OLD.not_after / 86400 != NEW.not_after / 86400 OR OLD.project != NEW.project BEGIN
  UPDATE directory_counts SET n = n - 1 WHERE project = OLD.project AND dim = 'broker_cert_day'
    AND value = CAST(OLD.not_after / 86400 AS TEXT);
  INSERT INTO directory_counts VALUES (NEW.project, 'broker_cert_day', CAST(NEW.not_after / 86400 AS TEXT), 1)
    ON CONFLICT DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER fleet_counts_broker_cert_delete AFTER DELETE ON device_broker_cert BEGIN
  UPDATE directory_counts SET n = n - 1 WHERE project = OLD.project AND dim = 'broker_cert_day'
    AND value = CAST(OLD.not_after / 86400 AS TEXT);
END;
)SQL";
  return sql;
}

}  // namespace

// The label index's statements for one devices row ("NEW" or "OLD"), run
// only when `also` holds (empty: always).
std::string label_index_add(const std::string& row, const std::string& also) {
  return "INSERT OR IGNORE INTO device_labels SELECT key, value, " + row + ".id FROM " +
         with(kLabelsOf, row + ".") + " WHERE type = 'text'" + (also.empty() ? "" : " AND " + also);
}
std::string label_index_remove(const std::string& row, const std::string& also) {
  return "DELETE FROM device_labels WHERE " + (also.empty() ? "" : also + " AND ") +
         "(key, value, device_id) IN (SELECT key, value, " + row + ".id FROM " + with(kLabelsOf, row + ".") +
         " WHERE type = 'text')";
}

namespace {

// The directory's triggers: the label index and the labelled counts follow
// a device's enrollment, labels, project and decommissioning, and its broker
// certificate row goes when it is decommissioned. None is named on, or reads,
// a column a report sets: a decommission is the directory's own column
// (devices.decommissioned), set with the state in the same statement.
std::string directory_triggers() {
  std::string ins_values, del_values, moved, decom_moved;
  for (const auto& d : kLabelled) {
    ins_values += std::string(ins_values.empty() ? "" : " UNION ALL ") + "SELECT '" + d.name + "' AS dim, " +
                  with(d.expr, "NEW.") + " AS value WHERE " + with(kDirectoryLive, "NEW.");
    del_values += std::string(del_values.empty() ? "" : " UNION ALL ") + "SELECT '" + d.name + "', " +
                  with(d.expr, "OLD.") + " WHERE " + with(kDirectoryLive, "OLD.");
    moved += move(d, "1", false, "directory_counts", kDirectoryLive);
    // A decommissioning that also changes labels or project is moved by
    // directory_labels (both triggers fire; only one may move).
    decom_moved += move(d, "OLD.labels = NEW.labels AND OLD.project = NEW.project", false, "directory_counts",
                        kDirectoryLive);
  }
  std::string sql;
  // An enrollment and a label change are followed by live membership.
  const std::string labelled = "INSERT INTO directory_outbox (device_id, kind, cell, from_cell) SELECT NEW.id, "
                               "'labelled', NEW.cell, NEW.cell WHERE NEW.decommissioned = 0";
  sql += "CREATE TRIGGER directory_insert AFTER INSERT ON devices BEGIN\n  " + label_index_add("NEW") + ";\n  " +
         labelled + ";\n  "
         "INSERT INTO directory_counts SELECT NEW.project, dim, value, 1 FROM (" + ins_values +
         ") WHERE value IS NOT NULL ON CONFLICT DO UPDATE SET n = n + 1;\nEND;\n";
  sql += "CREATE TRIGGER directory_delete AFTER DELETE ON devices BEGIN\n  " + label_index_remove("OLD") + ";\n  "
         "UPDATE directory_counts SET n = n - 1 WHERE project = OLD.project AND (dim, value) IN (" + del_values +
         ");\nEND;\n";
  sql += "CREATE TRIGGER directory_labels AFTER UPDATE OF labels, project ON devices "
         "WHEN OLD.labels != NEW.labels OR OLD.project != NEW.project BEGIN\n  " +
         label_index_remove("OLD", "OLD.labels != NEW.labels") + ";\n  " +
         label_index_add("NEW", "OLD.labels != NEW.labels") + ";\n  " + labelled +
         " AND OLD.labels != NEW.labels;\n  " +
         moved + "\nEND;\n";
  // What the device's rows in its cell's store must follow, through the
  // outbox (HubService::follow_directory): a decommissioned device's
  // inventory goes (it leaves the fleet's inventory figures); a moved
  // device's campaign rows are counted in its new cell.
  sql += "CREATE TRIGGER directory_decommission AFTER UPDATE OF decommissioned ON devices "
         "WHEN OLD.decommissioned != NEW.decommissioned BEGIN\n  "
         "DELETE FROM device_broker_cert WHERE NEW.decommissioned != 0 AND device_id = NEW.id;\n  "
         "INSERT INTO directory_outbox (device_id, kind, cell, from_cell) SELECT NEW.id, 'decommissioned', NEW.cell, "
         "OLD.cell "
         "WHERE NEW.decommissioned != 0;\n  " +
         decom_moved + "\nEND;\n";
  sql += "CREATE TRIGGER directory_moved AFTER UPDATE OF cell ON devices WHEN OLD.cell != NEW.cell BEGIN\n  "
         "INSERT INTO directory_outbox (device_id, kind, cell, from_cell) VALUES (NEW.id, 'moved', NEW.cell, OLD.cell);"
         "\nEND;\n";
  return sql;
}

// What fleet_counts must equal, grouped from the rows (the initial fill and
// the tests' recount).
std::string fleet_recount_select() {
  std::vector<Dim> dims = {kState};
  dims.insert(dims.end(), std::begin(kReported), std::end(kReported));
  std::string sql;
  for (const auto& d : dims) {
    const bool all = std::string(d.name) == "state";
    sql += std::string(sql.empty() ? "" : " UNION ALL ") + "SELECT project, '" + d.name + "', " +
           with(d.expr, "devices.") + " AS v, COUNT(*) FROM devices WHERE v IS NOT NULL" +
           (all ? "" : " AND " + with(kReportedLive, "devices.")) + " GROUP BY 1, 3";
  }
  sql += " UNION ALL SELECT project, 'cert_day', CAST(cert_expiry_unix / 86400 AS TEXT), COUNT(*) FROM device_inventory "
         "WHERE cert_expiry_unix > 0 GROUP BY 1, 3";
  return sql;
}

// What directory_counts must equal.
std::string directory_recount_select() {
  std::string sql;
  for (const auto& d : kLabelled) {
    sql += std::string(sql.empty() ? "" : " UNION ALL ") + "SELECT project, '" + d.name + "', " +
           with(d.expr, "devices.") + " AS v, COUNT(*) FROM devices WHERE v IS NOT NULL AND " +
           with(kDirectoryLive, "devices.") + " GROUP BY 1, 3";
  }
  sql += " UNION ALL SELECT project, 'broker_cert_day', CAST(not_after / 86400 AS TEXT), COUNT(*) "
         "FROM device_broker_cert GROUP BY 1, 3";
  return sql;
}

// Both count tables as one (their dimensions do not overlap).
constexpr const char* kAllCounts =
    "(SELECT project, dim, value, n FROM fleet_counts UNION ALL SELECT project, dim, value, n FROM directory_counts)";

constexpr const char* kAggregateTables = R"SQL(
CREATE TABLE IF NOT EXISTS aggregate_schema (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL);
-- Devices by (project, dimension, value), kept by the triggers above: what
-- devices report in fleet_counts, what the directory holds (labels, broker
-- certificates) in directory_counts.
CREATE TABLE IF NOT EXISTS fleet_counts (
  project TEXT NOT NULL, dim TEXT NOT NULL, value TEXT NOT NULL, n INTEGER NOT NULL,
  PRIMARY KEY (project, dim, value)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS directory_counts (
  project TEXT NOT NULL, dim TEXT NOT NULL, value TEXT NOT NULL, n INTEGER NOT NULL,
  PRIMARY KEY (project, dim, value)) WITHOUT ROWID;
-- Devices in trouble (failed, refused, rolled_back, rolling_back) by state:
-- what a partial index on devices would hold, kept by the state's trigger
-- (such an index cost a report 3.6 us; this, a trigger whose WHEN fails).
CREATE TABLE IF NOT EXISTS device_trouble (
  state TEXT NOT NULL, device_id TEXT NOT NULL, PRIMARY KEY (state, device_id)) WITHOUT ROWID;
-- The label index: a selector's equality term walks (key, value) in device
-- id order. Written when a device enrolls or its labels change, never by a report.
CREATE TABLE IF NOT EXISTS device_labels (
  key TEXT NOT NULL, value TEXT NOT NULL, device_id TEXT NOT NULL,
  PRIMARY KEY (key, value, device_id)) WITHOUT ROWID;
-- What a device's reports said about its machine (HubService writes it when
-- a report carries an inventory: at connect and when it changes).
-- The only copy of a device's inventory: device reads LEFT JOIN it.
-- Stores made before issue 15's columns get them in migrate_inventory.
CREATE TABLE IF NOT EXISTS device_inventory (
  device_id TEXT PRIMARY KEY, project TEXT NOT NULL, os TEXT NOT NULL, cert_expiry_unix INTEGER NOT NULL,
  disk_free_bytes INTEGER NOT NULL, mem_free_bytes INTEGER NOT NULL, updated_ms INTEGER NOT NULL,
  k3s_role TEXT NOT NULL DEFAULT '', cluster_id TEXT NOT NULL DEFAULT '',
  disk_total_bytes INTEGER NOT NULL DEFAULT 0, mem_total_bytes INTEGER NOT NULL DEFAULT 0,
  clock_suspect INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS device_inventory_cert ON device_inventory(cert_expiry_unix, device_id)
  WHERE cert_expiry_unix > 0;
-- Each device's latest unrevoked broker client certificate (its serial and
-- end), from device_certs by the triggers above: what the fleet's broker
-- certificate expiry counts.
CREATE TABLE IF NOT EXISTS device_broker_cert (
  device_id TEXT PRIMARY KEY, project TEXT NOT NULL, serial TEXT NOT NULL, not_after INTEGER NOT NULL) WITHOUT ROWID;
-- Directory changes (moves, decommissions, enrollments and label changes)
-- not yet followed by the device's rows in its cell's store
-- (HubService::follow_directory; ADR 18 slice 5).
-- Local to this hub: filled by triggers, so changes applied from the control
-- log feed it too.
CREATE TABLE IF NOT EXISTS directory_outbox (
  seq INTEGER PRIMARY KEY, device_id TEXT NOT NULL, kind TEXT NOT NULL, cell INTEGER NOT NULL,
  from_cell INTEGER NOT NULL, local INTEGER NOT NULL DEFAULT 0);
-- A device's recent failures, the last 10 per device.
CREATE TABLE IF NOT EXISTS device_events (
  id INTEGER PRIMARY KEY, device_id TEXT NOT NULL, time_ms INTEGER NOT NULL, seq INTEGER NOT NULL,
  state TEXT NOT NULL, reason TEXT NOT NULL, message TEXT NOT NULL, campaign_id TEXT NOT NULL,
  bundle_id TEXT NOT NULL, applied_bundle TEXT NOT NULL, applied_version INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS device_events_device ON device_events(device_id, id);
-- A campaign's counts over time (AggregateStore::sample_campaigns).
CREATE TABLE IF NOT EXISTS campaign_samples (
  campaign_id TEXT NOT NULL, time_ms INTEGER NOT NULL, state TEXT NOT NULL, total INTEGER NOT NULL,
  waiting INTEGER NOT NULL, in_flight INTEGER NOT NULL, applied INTEGER NOT NULL, failed INTEGER NOT NULL,
  rolled_back INTEGER NOT NULL, other INTEGER NOT NULL, offline INTEGER NOT NULL,
  PRIMARY KEY (campaign_id, time_ms)) WITHOUT ROWID;
DROP INDEX IF EXISTS devices_trouble;
CREATE INDEX IF NOT EXISTS campaigns_created ON campaigns(created_ms, id);
CREATE INDEX IF NOT EXISTS audit_log_project ON audit_log(project, id);
)SQL";

// Device-list orders and filters. Reports never set hostname or
// enrolled_ms; the partial index holds only offline devices, so an online
// device's report does not touch it (measured: no cost). Not in a hub.db
// whose device rows are in cells' files (Store::drop_report_side).
constexpr const char* kDeviceListIndexes = R"SQL(
CREATE INDEX IF NOT EXISTS devices_hostname ON devices(hostname, id);
CREATE INDEX IF NOT EXISTS devices_enrolled ON devices(enrolled_ms, id);
CREATE INDEX IF NOT EXISTS devices_offline ON devices(id) WHERE online = 0;
)SQL";

constexpr const char* kOtherTriggers = R"SQL(
-- A report (a new last_seq) that ends in failure (failed, rolled back,
-- refused) or brings a new failure reason: a device's recent failures, one
-- row each. Not every outcome: an applied device's outcome is its campaign
-- row, and recording every apply cost a report 5 us (bench/read_models_cost.sh).
CREATE TRIGGER device_events_record AFTER UPDATE OF last_seq ON devices
    WHEN NEW.last_seq != OLD.last_seq AND (
      (NEW.state != OLD.state AND (NEW.state = 'failed' OR NEW.state = 'rolled_back' OR NEW.state = 'refused'))
      OR (NEW.last_reason != OLD.last_reason AND NEW.last_reason != '')) BEGIN
  INSERT INTO device_events (device_id, time_ms, seq, state, reason, message, campaign_id, bundle_id,
                             applied_bundle, applied_version)
    VALUES (NEW.id, NEW.last_seen_ms, NEW.last_seq, NEW.state, NEW.last_reason, NEW.last_message,
            NEW.campaign_id, NEW.desired_bundle_id, NEW.applied_bundle, NEW.applied_version);
  DELETE FROM device_events WHERE device_id = NEW.id AND id <
    (SELECT id FROM device_events WHERE device_id = NEW.id ORDER BY id DESC LIMIT 1 OFFSET 9);
END;
)SQL";

// Every trigger this file ever made (dropped before the current ones are made).
constexpr const char* kTriggerNames[] = {
    "fleet_counts_insert", "fleet_counts_delete", "fleet_counts_state", "fleet_counts_online",
    "fleet_counts_version", "fleet_counts_k3s", "fleet_counts_agent", "fleet_counts_region",
    "fleet_counts_cell", "fleet_counts_reported", "fleet_counts_labels", "device_trouble_update",
    "fleet_counts_cert_insert",
    "fleet_counts_cert_update", "fleet_counts_cert_delete", "device_labels_insert", "device_labels_update",
    "device_labels_delete", "device_events_record", "device_inventory_decommissioned", "broker_cert_issued",
    "broker_cert_revoked", "broker_cert_forgotten", "broker_cert_device_gone", "broker_cert_device_deleted",
    "fleet_counts_broker_cert_insert", "fleet_counts_broker_cert_update", "fleet_counts_broker_cert_delete",
    "directory_insert", "directory_delete", "directory_labels", "directory_decommission", "directory_moved"};

FleetCount fleet_row(const sql::Stmt& s) { return FleetCount{s.col_text(0), s.col_text(1), s.col_text(2), s.col_int(3)}; }

}  // namespace

Status Store::migrate_aggregates() {
  if (auto s = db_->exec(kAggregateTables); !s) return s;
  if (!directory_only_) {
    if (auto s = db_->exec(kDeviceListIndexes); !s) return s;
  }
  // Outboxes made before entries were marked local: what they hold counts
  // as applied from elsewhere (the mark's absence before it existed).
  auto local = has_column(*db_, "directory_outbox", "local");
  if (!local) return local.error();
  if (!*local) {
    if (auto s = db_->exec("ALTER TABLE directory_outbox ADD COLUMN local INTEGER NOT NULL DEFAULT 0"); !s) {
      return s.error().with_context("add directory_outbox.local");
    }
  }
  auto have = query<int64_t>(*db_, "SELECT version FROM aggregate_schema", [](const sql::Stmt& s) { return s.col_int(0); });
  if (!have) return have.error();
  if (!have->empty() && have->front() == kAggregateSchema) return {};
  // First open with these read models (or an older version of them): build
  // the triggers and fill the tables from the device rows, in one transaction.
  auto logger = log::get("hub");
  logger->info("building the dashboard's read models (fleet counts, label index) from the device rows");
  sql::Transaction tx(*db_);
  if (!tx.ok()) return make_error(Errc::unavailable, "cannot begin transaction", true);
  std::string drop;
  for (const char* t : kTriggerNames) drop += std::string("DROP TRIGGER IF EXISTS ") + t + ";";
  if (auto s = db_->exec(drop); !s) return s;
  if (auto s = db_->exec(fleet_triggers() + directory_triggers() + kOtherTriggers); !s) return s;
  // Each device's latest unrevoked certificate, before the recount that counts them.
  if (auto s = db_->exec(
          "DELETE FROM device_broker_cert; INSERT INTO device_broker_cert "
          "SELECT c.device_id, d.project, c.serial, c.not_after FROM device_certs c JOIN devices d ON d.id = c.device_id "
          "WHERE c.revoked_ms = 0 AND d.decommissioned = 0 AND c.issued_ms = (SELECT MAX(issued_ms) FROM "
          "device_certs l WHERE l.device_id = c.device_id AND l.revoked_ms = 0) ON CONFLICT DO NOTHING;");
      !s) {
    return s;
  }
  if (auto s = db_->exec("DELETE FROM fleet_counts; INSERT INTO fleet_counts " + fleet_recount_select() +
                         "; DELETE FROM directory_counts; INSERT INTO directory_counts " + directory_recount_select() +
                         ";"
                         "DELETE FROM device_trouble; INSERT INTO device_trouble SELECT state, id FROM devices "
                         "WHERE state IN " + std::string(kTroubleStates) + ";"
                         "DELETE FROM device_labels;"
                         "INSERT OR IGNORE INTO device_labels SELECT j.key, j.value, d.id FROM devices d, "
                         "json_each(CASE WHEN json_valid(d.labels) THEN d.labels ELSE '{}' END) j WHERE j.type = 'text';"
                         "INSERT INTO aggregate_schema VALUES (1, " + std::to_string(kAggregateSchema) +
                         ") ON CONFLICT DO UPDATE SET version = excluded.version;");
      !s) {
    return s;
  }
  return tx.commit();
}

// Stores made while issue 15 was half done kept the inventory twice: nine
// columns of the devices row (written at every report) and device_inventory.
// It now lives in device_inventory only. An older store's devices columns are
// copied in first (a row device_inventory lacks is made from them; one it has
// gets the columns it did not hold), then dropped, in one transaction.
Status Store::migrate_inventory() {
  auto columns = [&](const std::string& table) -> Result<std::vector<std::string>> {
    return query<std::string>(*db_, "SELECT name FROM pragma_table_info('" + table + "')",
                              [](const sql::Stmt& s) { return s.col_text(0); });
  };
  auto inv_cols = columns("device_inventory");
  if (!inv_cols) return inv_cols.error();
  auto has = [](const std::vector<std::string>& cols, const char* c) {
    return std::find(cols.begin(), cols.end(), c) != cols.end();
  };
  sql::Transaction tx(*db_);
  if (!tx.ok()) return make_error(Errc::unavailable, "cannot begin transaction", true);
  for (const auto& [col, decl] : {std::pair{"k3s_role", "TEXT NOT NULL DEFAULT ''"},
                                  std::pair{"cluster_id", "TEXT NOT NULL DEFAULT ''"},
                                  std::pair{"disk_total_bytes", "INTEGER NOT NULL DEFAULT 0"},
                                  std::pair{"mem_total_bytes", "INTEGER NOT NULL DEFAULT 0"},
                                  std::pair{"clock_suspect", "INTEGER NOT NULL DEFAULT 0"}}) {
    if (has(*inv_cols, col)) continue;
    if (auto s = db_->exec(std::string("ALTER TABLE device_inventory ADD COLUMN ") + col + " " + decl); !s) return s;
  }
  auto dev_cols = columns("devices");
  if (!dev_cols) return dev_cols.error();
  constexpr const char* kMoved[] = {"k3s_role", "cluster_id", "k3s_cert_expiry_unix", "os", "disk_free_bytes",
                                    "disk_total_bytes", "mem_free_bytes", "mem_total_bytes", "clock_suspect"};
  bool all = true, any = false;
  for (const char* c : kMoved) {
    all = all && has(*dev_cols, c);
    any = any || has(*dev_cols, c);
  }
  if (any && !all) {
    return make_error(Errc::internal, "devices holds only some of the inventory columns; this store was not made "
                                      "by a Flotilla hub");
  }
  if (all) {
    log::get("hub")->info("moving device inventory from the devices rows into device_inventory");
    // Decommissioned devices have no inventory (device_inventory_decommissioned).
    if (auto s = db_->exec(R"SQL(
INSERT INTO device_inventory (device_id, project, os, cert_expiry_unix, disk_free_bytes, mem_free_bytes, updated_ms,
                              k3s_role, cluster_id, disk_total_bytes, mem_total_bytes, clock_suspect)
  SELECT id, project, os, k3s_cert_expiry_unix, disk_free_bytes, mem_free_bytes, last_seen_ms,
         k3s_role, cluster_id, disk_total_bytes, mem_total_bytes, clock_suspect
  FROM devices WHERE state != 'decommissioned' AND (k3s_role != '' OR cluster_id != '' OR k3s_cert_expiry_unix != 0
    OR os != '' OR disk_free_bytes != 0 OR disk_total_bytes != 0 OR mem_free_bytes != 0 OR mem_total_bytes != 0
    OR clock_suspect != 0)
  ON CONFLICT DO UPDATE SET k3s_role = excluded.k3s_role, cluster_id = excluded.cluster_id,
    disk_total_bytes = excluded.disk_total_bytes, mem_total_bytes = excluded.mem_total_bytes,
    clock_suspect = excluded.clock_suspect;
)SQL");
        !s) {
      return s.error().with_context("copy the devices rows' inventory into device_inventory");
    }
    for (const char* c : kMoved) {
      if (auto s = db_->exec(std::string("ALTER TABLE devices DROP COLUMN ") + c); !s) {
        return s.error().with_context(std::string("drop devices.") + c);
      }
    }
  }
  // The few devices whose clock looked wrong, for /metrics to count (once
  // the column is there).
  if (auto s = db_->exec("CREATE INDEX IF NOT EXISTS device_inventory_clock_suspect ON device_inventory(device_id) "
                         "WHERE clock_suspect != 0");
      !s) {
    return s;
  }
  return tx.commit();
}

Status Store::save_device_inventory(const std::string& device_id, const DeviceInventory& inv) {
  auto st = db_->prepare(
      "INSERT INTO device_inventory (device_id, project, os, cert_expiry_unix, disk_free_bytes, mem_free_bytes, "
      "updated_ms, k3s_role, cluster_id, disk_total_bytes, mem_total_bytes, clock_suspect) "
      "SELECT id, project, ?, ?, ?, ?, ?, ?, ?, ?, ?, ? FROM devices WHERE id = ? AND state != 'decommissioned' "
      "ON CONFLICT DO UPDATE SET project = excluded.project, os = excluded.os, "
      "cert_expiry_unix = excluded.cert_expiry_unix, disk_free_bytes = excluded.disk_free_bytes, "
      "mem_free_bytes = excluded.mem_free_bytes, updated_ms = excluded.updated_ms, k3s_role = excluded.k3s_role, "
      "cluster_id = excluded.cluster_id, disk_total_bytes = excluded.disk_total_bytes, "
      "mem_total_bytes = excluded.mem_total_bytes, clock_suspect = excluded.clock_suspect");
  if (!st) return st.error();
  auto u64 = [](uint64_t v) { return static_cast<int64_t>(std::min<uint64_t>(v, INT64_MAX)); };
  // Bounded: reported by the device, shown to operators and filtered on.
  st->bind(1, std::string_view(inv.os).substr(0, 128)).bind(2, inv.cert_expiry_unix)
      .bind(3, u64(inv.disk_free_bytes)).bind(4, u64(inv.mem_free_bytes)).bind(5, inv.updated_ms)
      .bind(6, std::string_view(inv.k3s_role).substr(0, 128)).bind(7, std::string_view(inv.cluster_id).substr(0, 128))
      .bind(8, u64(inv.disk_total_bytes)).bind(9, u64(inv.mem_total_bytes)).bind(10, inv.clock_suspect ? 1 : 0)
      .bind(11, std::string_view(device_id));
  return st->run();
}

Result<std::vector<FleetCount>> Store::fleet_counts() {
  return query<FleetCount>(
      *db_, std::string("SELECT project, dim, value, n FROM ") + kAllCounts + " WHERE n != 0 ORDER BY 1, 2, 3", fleet_row);
}

Result<std::vector<FleetCount>> Store::recount_fleet() {
  return query<FleetCount>(
      *db_, "SELECT * FROM (" + fleet_recount_select() + " UNION ALL " + directory_recount_select() + ") ORDER BY 1, 2, 3",
      fleet_row);
}

// ---- reads ---------------------------------------------------------------

std::string sort_name(DeviceSort s) {
  switch (s) {
    case DeviceSort::id: return "id";
    case DeviceSort::hostname: return "hostname";
    case DeviceSort::enrolled: return "enrolled";
    case DeviceSort::cert_expiry: return "cert_expiry";
  }
  return "id";
}

std::optional<DeviceSort> parse_device_sort(const std::string& s) {
  if (s == "id") return DeviceSort::id;
  if (s == "hostname") return DeviceSort::hostname;
  if (s == "enrolled") return DeviceSort::enrolled;
  if (s == "cert_expiry") return DeviceSort::cert_expiry;
  return std::nullopt;
}

bool is_trouble_state(const std::string& state) {
  return state == "failed" || state == "refused" || state == "rolled_back" || state == "rolling_back";
}

CertExpiryCounts cert_expiry_counts(const std::vector<FleetCount>& rows, const std::string& dim, int64_t now_unix) {
  const int64_t today = now_unix / 86400;
  CertExpiryCounts c;
  for (const auto& r : rows) {
    if (r.dim != dim) continue;
    int64_t day = 0;
    if (std::from_chars(r.value.data(), r.value.data() + r.value.size(), day).ec != std::errc()) continue;
    if (day < today) c.expired += r.n;
    else if (day < today + 7) c.within_7_days += r.n;
    else if (day < today + 30) c.within_30_days += r.n;
    else c.later += r.n;
  }
  return c;
}

struct AggregateStore::Pool {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<std::unique_ptr<Store>> idle;
};

AggregateStore::Lease::Lease(Pool& p, std::unique_ptr<Store> s) : pool_(p), store_(std::move(s)) {}
AggregateStore::Lease::Lease(Lease&& o) noexcept : pool_(o.pool_), store_(std::move(o.store_)) {}
AggregateStore::Lease::~Lease() {
  if (!store_) return;
  std::lock_guard lock(pool_.mu);
  pool_.idle.push_back(std::move(store_));
  pool_.cv.notify_one();
}

namespace {
AggregateStore::Lease lease_from(AggregateStore::Pool& pool) {
  std::unique_lock lock(pool.mu);
  pool.cv.wait(lock, [&] { return !pool.idle.empty(); });
  auto store = std::move(pool.idle.back());
  pool.idle.pop_back();
  return AggregateStore::Lease(pool, std::move(store));
}

Result<std::unique_ptr<AggregateStore::Pool>> open_pool(const std::string& path, int readers, const StoreTuning& t) {
  auto pool = std::make_unique<AggregateStore::Pool>();
  for (int i = 0; i < std::max(1, readers); ++i) {
    auto r = Store::open_reader(path, t);
    if (!r) return r.error().with_context("open a read connection to " + path);
    pool->idle.push_back(std::move(*r));
  }
  return pool;
}
}  // namespace

AggregateStore::Lease AggregateStore::reader() { return lease_from(*pool_); }

std::vector<AggregateStore::Lease> AggregateStore::cell_readers() {
  std::vector<Lease> out;
  out.reserve(cell_pools_.size());
  for (auto& p : cell_pools_) out.push_back(lease_from(*p));
  return out;
}

std::vector<sql::Db*> AggregateStore::device_dbs(sql::Db& hub, std::vector<Lease>& cells) {
  if (cells.empty()) return {&hub};
  std::vector<sql::Db*> out;
  for (auto& c : cells) out.push_back(&c.db());
  return out;
}

namespace {

// A value bound to a statement built at run time.
struct Bind {
  bool is_int = false;
  int64_t i = 0;
  std::string s;
};
Bind bind_int(int64_t v) { return Bind{true, v, {}}; }
Bind bind_text(std::string v) { return Bind{false, 0, std::move(v)}; }

// Conditions joined by AND, with their bound values in order: the filters
// of every page query (devices, campaigns, bundles, audit).
struct Clauses {
  std::string sql;
  std::vector<Bind> binds;
  Clauses& add(const std::string& cond, std::vector<Bind> b = {}) {
    sql += (sql.empty() ? "" : " AND ") + cond;
    for (auto& x : b) binds.push_back(std::move(x));
    return *this;
  }
  // Every object stays in its project; "*" is all of them.
  Clauses& project(const std::string& column, const std::string& project) {
    return project == "*" ? *this : add(column + " = ?", {bind_text(project)});
  }
  std::string where() const { return sql.empty() ? "1" : sql; }
};

void bind_all(sql::Stmt& st, const std::vector<Bind>& binds) {
  for (size_t k = 0; k < binds.size(); ++k) {
    const int at = static_cast<int>(k + 1);
    if (binds[k].is_int) {
      st.bind(at, binds[k].i);
    } else {
      st.bind(at, std::string_view(binds[k].s));
    }
  }
}

// "id, project" -> "d.id, d.project"
std::string prefixed(const std::string& cols, const std::string& prefix) {
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

int column_count(const std::string& cols) { return static_cast<int>(std::count(cols.begin(), cols.end(), ',')) + 1; }

std::string label_path(const std::string& key) { return "$.\"" + key + "\""; }

// The smallest string above every string that starts with p (p non-empty).
std::optional<std::string> prefix_end(std::string p) {
  while (!p.empty() && static_cast<unsigned char>(p.back()) == 0xff) p.pop_back();
  if (p.empty()) return std::nullopt;
  p.back() = static_cast<char>(static_cast<unsigned char>(p.back()) + 1);
  return p;
}

}  // namespace

// Cursors are opaque to clients: hex of [sort, key..., id].
std::string encode_cursor(const nlohmann::json& key) { return to_hex(key.dump()); }
Result<nlohmann::json> decode_cursor(const std::string& c) {
  auto bytes = c.size() <= 2048 ? from_hex(c) : std::nullopt;
  auto j = bytes ? nlohmann::json::parse(to_string(*bytes), nullptr, false) : nlohmann::json();
  if (!j.is_array() || j.size() < 2 || !j[0].is_string()) {
    return make_error(Errc::invalid_argument, "'after' is not a cursor this hub gave out");
  }
  return j;
}

Result<std::unique_ptr<AggregateStore>> AggregateStore::open(const std::string& path, const Config& cfg) {
  std::unique_ptr<AggregateStore> a(new AggregateStore());
  a->cfg_ = cfg;
  auto pool = open_pool(path, cfg.readers, cfg.tuning);
  if (!pool) return pool.error();
  a->pool_ = std::move(*pool);
  for (const auto& file : cfg.cell_files) {
    auto cell = open_pool(file, cfg.readers, cfg.tuning);
    if (!cell) return cell.error();
    a->cell_pools_.push_back(std::move(*cell));
  }
  // The sampler's connection, the only one here that writes (timeline points).
  auto w = sql::Db::open(path);
  if (!w) return w.error().with_context("open the sampler's connection to " + path);
  if (auto c = (*w)->exec("PRAGMA cache_size = -2048"); !c) return c.error();
  a->writer_ = std::move(*w);
  return a;
}

AggregateStore::~AggregateStore() { stop(); }

Result<std::vector<FleetCount>> AggregateStore::fleet(const std::string& project) {
  auto hub = reader();
  auto cells = cell_readers();
  const bool all = project == "*";
  auto counts = [&](sql::Db& db, const std::string& table) {
    return query<FleetCount>(
        db,
        all ? "SELECT '*', dim, value, SUM(n) FROM " + table + " GROUP BY dim, value HAVING SUM(n) != 0 ORDER BY 2, 3"
            : "SELECT project, dim, value, n FROM " + table + " WHERE project = ? AND n != 0 ORDER BY 2, 3",
        [&](sql::Stmt& s) {
          if (!all) s.bind(1, std::string_view(project));
        },
        fleet_row);
  };
  // hub.db counts what the directory holds; what devices report is counted
  // in each cell's file once they are split (hub.db's fleet_counts is then
  // what it was at the move, and is not read).
  std::vector<std::vector<FleetCount>> parts;
  auto directory = counts(hub.db(), cells.empty() ? kAllCounts : "directory_counts");
  if (!directory) return directory.error();
  parts.push_back(std::move(*directory));
  for (auto& c : cells) {
    auto reported = counts(c.db(), "fleet_counts");
    if (!reported) return reported.error();
    parts.push_back(std::move(*reported));
  }
  return sum_fleet_counts(parts);
}

Result<DevicePage> AggregateStore::devices(const DeviceQuery& q) {
  auto hub = reader();
  auto cells = cell_readers();
  auto dbs = device_dbs(hub.db(), cells);
  std::vector<DevicePage> parts;
  for (size_t i = 0; i < dbs.size(); ++i) {
    // A cell's file holds only that cell's devices: one not asked for is not walked.
    if (!cells.empty() && q.cells && std::ranges::find(*q.cells, static_cast<int>(i)) == q.cells->end()) continue;
    auto part = walk_devices(*dbs[i], q);
    if (!part) return part.error();
    parts.push_back(std::move(*part));
  }
  if (parts.empty()) {
    DevicePage none;
    none.sort = q.sort;
    none.descending = q.descending;
    none.complete = true;
    return none;
  }
  return merge_device_pages(std::move(parts), q.limit);
}

Result<DevicePage> AggregateStore::walk_devices(sql::Db& db, const DeviceQuery& q) {
  DevicePage page;
  page.sort = q.sort;
  page.descending = q.descending;
  // Which index drives the walk. The text filter and the certificate filter
  // decide the order; otherwise a filter with an index of its own drives an
  // id-ordered walk; otherwise the order's index does.
  enum class Driver { id, hostname, enrolled, cert, label, trouble, offline } driver = Driver::id;
  std::string label_key, label_value;
  if (!q.text.empty()) {
    driver = q.text.rfind("d-", 0) == 0 ? Driver::id : Driver::hostname;
    page.sort = driver == Driver::id ? DeviceSort::id : DeviceSort::hostname;
  } else if (q.cert_before_unix && !q.id_order) {
    driver = Driver::cert;
    page.sort = DeviceSort::cert_expiry;
  } else if (q.sort == DeviceSort::cert_expiry) {
    driver = Driver::cert;
  } else if (q.sort == DeviceSort::hostname) {
    driver = Driver::hostname;
  } else if (q.sort == DeviceSort::enrolled) {
    driver = Driver::enrolled;
  } else {
    for (const auto& r : q.selector.requirements()) {
      if (r.op == Selector::Op::equals || (r.op == Selector::Op::in && r.values.size() == 1)) {
        driver = Driver::label;
        label_key = r.key;
        label_value = r.values[0];
        break;
      }
    }
    if (driver == Driver::id && is_trouble_state(q.state)) driver = Driver::trouble;
    if (driver == Driver::id && q.online && !*q.online) driver = Driver::offline;
  }

  // The walk: FROM, its range, its order, and the key columns a cursor holds.
  std::string from, range;
  std::vector<Bind> range_binds;
  std::vector<std::string> keys;  // SQL columns, the last one the device id
  const std::string cmp = q.descending ? "<" : ">";
  const std::string dir = q.descending ? " DESC" : "";
  switch (driver) {
    case Driver::id:
      page.index = "devices primary key";
      from = "devices d";
      keys = {"d.id"};
      break;
    case Driver::hostname:
      page.index = "devices_hostname";
      from = "devices d INDEXED BY devices_hostname";
      keys = {"d.hostname", "d.id"};
      break;
    case Driver::enrolled:
      page.index = "devices_enrolled";
      from = "devices d INDEXED BY devices_enrolled";
      keys = {"d.enrolled_ms", "d.id"};
      break;
    case Driver::cert:
      page.index = "device_inventory_cert";
      from = "device_inventory i INDEXED BY device_inventory_cert CROSS JOIN devices d ON d.id = i.device_id";
      range = "i.cert_expiry_unix > 0";
      keys = {"i.cert_expiry_unix", "i.device_id"};
      if (q.cert_before_unix) {
        range += " AND i.cert_expiry_unix < ?";
        range_binds.push_back(bind_int(*q.cert_before_unix));
      }
      break;
    case Driver::label:
      page.index = "device_labels";
      from = "device_labels l CROSS JOIN devices d ON d.id = l.device_id";
      range = "l.key = ? AND l.value = ?";
      range_binds = {bind_text(label_key), bind_text(label_value)};
      keys = {"l.device_id"};
      break;
    case Driver::trouble:
      page.index = "device_trouble";
      from = "device_trouble t CROSS JOIN devices d ON d.id = t.device_id";
      range = "t.state = ?";
      range_binds = {bind_text(q.state)};
      keys = {"t.device_id"};
      break;
    case Driver::offline:
      page.index = "devices_offline";
      from = "devices d INDEXED BY devices_offline";
      range = "d.online = 0";
      keys = {"d.id"};
      break;
  }
  if (!q.text.empty()) {
    const std::string col = driver == Driver::id ? "d.id" : "d.hostname";
    range = col + " >= ?";
    range_binds = {bind_text(q.text)};
    if (auto end = prefix_end(q.text)) {
      range += " AND " + col + " < ?";
      range_binds.push_back(bind_text(*end));
    }
  }
  // The cursor: strictly after (before, descending) the last row examined.
  if (!q.after.empty()) {
    auto c = decode_cursor(q.after);
    if (!c) return c.error();
    if ((*c)[0] != sort_name(page.sort) || c->size() != keys.size() + 1) {
      return make_error(Errc::invalid_argument, "'after' belongs to a list in another order; start from the first page");
    }
    std::string lhs, rhs;
    for (size_t k = 0; k < keys.size(); ++k) {
      const auto& v = (*c)[k + 1];
      lhs += (k ? ", " : "") + keys[k];
      rhs += k ? ", ?" : "?";
      if (v.is_number_integer()) {
        range_binds.push_back(bind_int(v.get<int64_t>()));
      } else if (v.is_string()) {
        range_binds.push_back(bind_text(v.get<std::string>()));
      } else {
        return make_error(Errc::invalid_argument, "'after' is not a cursor this hub gave out");
      }
    }
    range += std::string(range.empty() ? "" : " AND ") + "(" + lhs + ") " + cmp + " (" + rhs + ")";
  }

  if (!q.after_id.empty()) {
    if (!q.after.empty() || page.sort != DeviceSort::id || keys.size() != 1) {
      return make_error(Errc::invalid_argument, "'after' is a device id only in a list in id order");
    }
    range += std::string(range.empty() ? "" : " AND ") + keys[0] + " " + cmp + " ?";
    range_binds.push_back(bind_text(q.after_id));
  }
  if (!q.until_id.empty()) {
    if (!q.id_order || keys.size() != 1 || q.descending) {
      return make_error(Errc::invalid_argument, "'until' is a device id only in a list in id order");
    }
    range += std::string(range.empty() ? "" : " AND ") + keys[0] + " <= ?";
    range_binds.push_back(bind_text(q.until_id));
  }

  // Whether a row matches: every filter, whatever drives the walk.
  Clauses hits;
  hits.project("d.project", q.project);
  // In id order the certificate filter is a filter, not the walk's range.
  if (q.cert_before_unix && driver != Driver::cert) {
    hits.add("i.cert_expiry_unix > 0 AND i.cert_expiry_unix < ?", {bind_int(*q.cert_before_unix)});
  }
  if (!q.state.empty()) {
    hits.add("d.state = ?", {bind_text(q.state)});
  } else if (!q.include_decommissioned) {
    hits.add("d.state != 'decommissioned'");
  }
  if (q.online) hits.add(*q.online ? "d.online = 1" : "d.online = 0");
  if (q.cells) {
    std::string in;
    std::vector<Bind> b;
    for (int cell : *q.cells) {
      in += in.empty() ? "?" : ", ?";
      b.push_back(bind_int(cell));
    }
    hits.add(in.empty() ? "0" : "d.cell IN (" + in + ")", std::move(b));
  }
  if (q.bundle) hits.add("d.applied_bundle = ?", {bind_text(*q.bundle)});
  if (q.bundle && q.version) hits.add("d.applied_version = ?", {bind_int(static_cast<int64_t>(*q.version))});
  if (q.k3s) hits.add("d.k3s_version = ?", {bind_text(*q.k3s)});
  for (const auto& r : q.selector.requirements()) {
    const std::string v = "json_extract(d.labels, ?)";
    std::string in;
    std::vector<Bind> b = {bind_text(label_path(r.key))};
    for (const auto& val : r.values) {
      in += in.empty() ? "?" : ", ?";
      b.push_back(bind_text(val));
    }
    switch (r.op) {
      case Selector::Op::equals: hits.add(v + " = ?", std::move(b)); break;
      case Selector::Op::not_equals: hits.add(v + " IS NOT ?", std::move(b)); break;
      case Selector::Op::in: hits.add(v + " IN (" + in + ")", std::move(b)); break;
      case Selector::Op::not_in: hits.add("COALESCE(" + v + " NOT IN (" + in + "), 1)", std::move(b)); break;
      case Selector::Op::exists: hits.add("json_type(d.labels, ?) IS NOT NULL", std::move(b)); break;
      case Selector::Op::not_exists: hits.add("json_type(d.labels, ?) IS NULL", std::move(b)); break;
    }
  }
  const std::string hit = hits.where();
  const std::vector<Bind>& hit_binds = hits.binds;

  std::string order;
  for (const auto& k : keys) order += (order.empty() ? "" : ", ") + k + dir;
  std::string key_cols;
  for (const auto& k : keys) key_cols += k + ", ";
  // Every walk but the certificate one (which has it already) joins the inventory.
  if (driver != Driver::cert) from += " LEFT JOIN device_inventory i ON i.device_id = d.id";
  const std::string sql = "SELECT " + device_columns() + ", " + key_cols + "(" + hit + ") FROM " +
                          from + (range.empty() ? "" : " WHERE " + range) + " ORDER BY " + order + " LIMIT ?";
  auto st = db.prepare(sql);
  if (!st) return st.error();
  std::vector<Bind> binds = hit_binds;
  binds.insert(binds.end(), range_binds.begin(), range_binds.end());
  binds.push_back(bind_int(std::max<int64_t>(1, q.scan_limit)));
  bind_all(*st, binds);
  const int key_col = column_count(device_columns());
  const int hit_col = key_col + static_cast<int>(keys.size());
  nlohmann::json last;
  bool stopped_early = false;
  for (;;) {
    auto more = st->step();
    if (!more) return more.error();
    if (!*more) break;
    ++page.scanned;
    last = nlohmann::json::array({sort_name(page.sort)});
    for (size_t k = 0; k < keys.size(); ++k) {
      const int col = key_col + static_cast<int>(k);
      // Integer keys (enrollment time, certificate expiry) stay integers.
      if (keys[k] == "d.enrolled_ms" || keys[k] == "i.cert_expiry_unix") {
        last.push_back(st->col_int(col));
      } else {
        last.push_back(st->col_text(col));
      }
    }
    if (st->col_int(hit_col) != 0) {
      page.items.push_back(device_row(*st));
      if (static_cast<int64_t>(page.items.size()) >= q.limit) {
        stopped_early = true;
        break;
      }
    }
  }
  page.complete = !stopped_early && page.scanned < std::max<int64_t>(1, q.scan_limit);
  if (!page.complete && !last.is_null()) {
    page.next = encode_cursor(last);
    page.next_id = last.back().get<std::string>();  // every walk's last key is the device id
  }
  return page;
}

Result<std::optional<DeviceDetail>> AggregateStore::device(const std::string& id) {
  auto hub = reader();
  auto cells = cell_readers();
  const auto device_at = [&](sql::Db& at) {
    return query<DeviceRecord>(at, "SELECT " + device_columns() + " FROM " + device_from_clause() + " WHERE d.id = ?",
                               [&](sql::Stmt& s) { s.bind(1, std::string_view(id)); }, device_row);
  };
  auto rows = device_at(hub.db());
  if (!rows) return rows.error();
  if (rows->empty()) return std::optional<DeviceDetail>();
  // The directory names the device's cell; that cell's file has what it
  // reported. A device whose copy is not made yet shows the directory's row.
  sql::Db* from = &hub.db();
  const int cell = rows->front().cell;
  if (cell >= 0 && cell < static_cast<int>(cells.size())) {
    auto reported = device_at(cells[static_cast<size_t>(cell)].db());
    if (!reported) return reported.error();
    if (!reported->empty()) {
      rows = std::move(reported);
      from = &cells[static_cast<size_t>(cell)].db();
    }
  }
  auto& db = *from;
  DeviceDetail d;
  d.device = std::move(rows->front());
  if (d.device.inventory.updated_ms != 0) d.inventory = d.device.inventory;
  auto failures = query<DeviceOutcome>(
      db,
      "SELECT time_ms, seq, state, reason, message, campaign_id, bundle_id, applied_bundle, applied_version "
      "FROM device_events WHERE device_id = ? ORDER BY id DESC LIMIT " + std::to_string(kDeviceOutcomesKept),
      [&](sql::Stmt& s) { s.bind(1, std::string_view(id)); },
      [](const sql::Stmt& s) {
        return DeviceOutcome{s.col_int(0), static_cast<uint64_t>(s.col_int(1)), s.col_text(2), s.col_text(3),
                             s.col_text(4), s.col_text(5), s.col_text(6), s.col_text(7),
                             static_cast<uint64_t>(s.col_int(8))};
      });
  if (!failures) return failures.error();
  d.failures = std::move(*failures);
  // campaign_devices_device walks this device's rows only.
  auto history = query<DeviceCampaignRow>(
      db,
      "SELECT " + prefixed(campaign_device_columns(), "cd.") +
          ", COALESCE(c.name, ''), COALESCE(c.state, ''), COALESCE(b.name, ''), COALESCE(b.version, 0) "
          "FROM campaign_devices cd LEFT JOIN campaigns c ON c.id = cd.campaign_id "
          "LEFT JOIN bundles b ON b.id = c.bundle_id WHERE cd.device_id = ? "
          "ORDER BY cd.updated_ms DESC, cd.campaign_id LIMIT 50",
      [&](sql::Stmt& s) { s.bind(1, std::string_view(id)); },
      [](const sql::Stmt& s) {
        DeviceCampaignRow r;
        r.row = campaign_device_row(s, 0);
        const int o = column_count(campaign_device_columns());
        r.campaign_name = s.col_text(o);
        r.campaign_state = s.col_text(o + 1);
        r.bundle_name = s.col_text(o + 2);
        r.bundle_version = static_cast<uint64_t>(s.col_int(o + 3));
        return r;
      });
  if (!history) return history.error();
  d.campaigns = std::move(*history);
  // The campaigns and bundles are hub.db's: a cell's file has only the rows.
  for (auto& r : d.campaigns) {
    if (from == &hub.db() || !r.campaign_name.empty()) continue;
    auto names = query<DeviceCampaignRow>(
        hub.db(),
        "SELECT c.name, c.state, COALESCE(b.name, ''), COALESCE(b.version, 0) FROM campaigns c "
        "LEFT JOIN bundles b ON b.id = c.bundle_id WHERE c.id = ?",
        [&](sql::Stmt& s) { s.bind(1, std::string_view(r.row.campaign_id)); },
        [](const sql::Stmt& s) {
          DeviceCampaignRow n;
          n.campaign_name = s.col_text(0);
          n.campaign_state = s.col_text(1);
          n.bundle_name = s.col_text(2);
          n.bundle_version = static_cast<uint64_t>(s.col_int(3));
          return n;
        });
    if (!names) return names.error();
    if (names->empty()) continue;
    r.campaign_name = std::move(names->front().campaign_name);
    r.campaign_state = std::move(names->front().campaign_state);
    r.bundle_name = std::move(names->front().bundle_name);
    r.bundle_version = names->front().bundle_version;
  }
  return std::optional<DeviceDetail>(std::move(d));
}

namespace {

// A campaign's counts over the stores holding its rows (hub.db, or each
// cell's file: ADR 18).
Result<std::vector<CampaignCountRow>> counts_of(const std::vector<sql::Db*>& dbs, const std::string& campaign_id) {
  std::vector<std::vector<CampaignCountRow>> parts;
  for (sql::Db* db : dbs) {
    auto n = campaign_counts_on(*db, campaign_id);
    if (!n) return n.error();
    parts.push_back(std::move(*n));
  }
  return sum_campaign_counts(parts);
}

std::string campaign_select() {
  return "SELECT " + prefixed(campaign_columns(), "c.") +
         ", COALESCE(b.name, ''), COALESCE(b.channel, ''), COALESCE(b.version, 0) FROM campaigns c "
         "LEFT JOIN bundles b ON b.id = c.bundle_id";
}

CampaignSummary summary_row(const sql::Stmt& s) {
  CampaignSummary c;
  c.campaign = campaign_row(s);
  const int o = column_count(campaign_columns());
  c.bundle_name = s.col_text(o);
  c.bundle_channel = s.col_text(o + 1);
  c.bundle_version = static_cast<uint64_t>(s.col_int(o + 2));
  return c;
}

// "<int>:<id>" cursors for lists by time.
Result<std::pair<int64_t, std::string>> time_cursor(const std::string& after) {
  const auto colon = after.find(':');
  try {
    if (colon != std::string::npos && after.size() <= 512) {
      return std::make_pair(static_cast<int64_t>(std::stoll(after.substr(0, colon))), after.substr(colon + 1));
    }
  } catch (const std::exception&) {
  }
  return make_error(Errc::invalid_argument, "'after' is not a cursor this hub gave out");
}

// Rows strictly older than a "<ms>:<id>" cursor, newest first.
Status older_than(Clauses& c, const std::string& time_col, const std::string& id_col, const std::string& after) {
  if (after.empty()) return {};
  auto cur = time_cursor(after);
  if (!cur) return cur.error();
  c.add("(" + time_col + ", " + id_col + ") < (?, ?)", {bind_int(cur->first), bind_text(cur->second)});
  return {};
}

}  // namespace

Result<CampaignPage> AggregateStore::campaigns(const std::string& project, const std::string& state,
                                               const std::string& after, int64_t limit) {
  Clauses w;
  w.project("c.project", project);
  if (!state.empty()) w.add("c.state = ?", {bind_text(state)});
  if (auto s = older_than(w, "c.created_ms", "c.id", after); !s) return s.error();
  w.binds.push_back(bind_int(limit + 1));
  auto lease = reader();
  auto cells = cell_readers();
  auto st = lease.db().prepare(campaign_select() + " WHERE " + w.where() + " ORDER BY c.created_ms DESC, c.id DESC LIMIT ?");
  if (!st) return st.error();
  bind_all(*st, w.binds);
  auto rows = st->rows<CampaignSummary>(summary_row);
  if (!rows) return rows.error();
  CampaignPage page;
  page.items = std::move(*rows);
  if (static_cast<int64_t>(page.items.size()) > limit) {
    page.items.pop_back();
    const auto& last = page.items.back().campaign;
    page.next = std::to_string(last.created_ms) + ":" + last.id;
  }
  for (auto& c : page.items) {
    auto n = counts_of(device_dbs(lease.db(), cells), c.campaign.id);
    if (!n) return n.error();
    c.counts = std::move(*n);
  }
  return page;
}

Result<std::optional<CampaignSummary>> AggregateStore::campaign(const std::string& id) {
  auto lease = reader();
  auto cells = cell_readers();
  auto rows = query<CampaignSummary>(lease.db(), campaign_select() + " WHERE c.id = ?",
                                     [&](sql::Stmt& s) { s.bind(1, std::string_view(id)); }, summary_row);
  if (!rows) return rows.error();
  if (rows->empty()) return std::optional<CampaignSummary>();
  auto n = counts_of(device_dbs(lease.db(), cells), id);
  if (!n) return n.error();
  rows->front().counts = std::move(*n);
  return std::optional<CampaignSummary>(std::move(rows->front()));
}

Result<std::vector<FailureGroup>> AggregateStore::failure_groups(const std::string& campaign_id, int64_t max_reasons,
                                                                 int64_t per_reason) {
  auto lease = reader();
  auto cells = cell_readers();
  const auto dbs = device_dbs(lease.db(), cells);
  // Both walk campaign_devices_wave's (campaign, status) range of failed rows
  // only. Each store (hub.db, or each cell's file: ADR 18) gives its
  // reasons, bounded, and the merge keeps the largest; then each kept
  // reason's first devices, merged in time order.
  const int64_t part_reasons = std::max<int64_t>(max_reasons, kFailureReasonsPerStore);
  std::vector<std::vector<FailureGroup>> reason_parts;
  for (sql::Db* db : dbs) {
    auto reasons = query<FailureGroup>(
        *db,
        "SELECT reason, COUNT(*) FROM campaign_devices WHERE campaign_id = ? "
        "AND status IN ('failed', 'rollback_failed') GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT ?",
        [&](sql::Stmt& s) { s.bind(1, std::string_view(campaign_id)).bind(2, part_reasons); },
        [](const sql::Stmt& s) {
          FailureGroup g;
          g.reason = s.col_text(0);
          g.count = s.col_int(1);
          return g;
        });
    if (!reasons) return reasons.error();
    reason_parts.push_back(std::move(*reasons));
  }
  auto groups = top_failure_reasons(reason_parts, max_reasons);
  for (auto& g : groups) {
    std::vector<std::vector<FailureGroup::Device>> first_parts;
    for (sql::Db* db : dbs) {
      auto first = query<FailureGroup::Device>(
          *db,
          "SELECT device_id, message, updated_ms FROM campaign_devices WHERE campaign_id = ? "
          "AND status IN ('failed', 'rollback_failed') AND reason = ? ORDER BY updated_ms, device_id LIMIT ?",
          [&](sql::Stmt& s) {
            s.bind(1, std::string_view(campaign_id)).bind(2, std::string_view(g.reason)).bind(3, per_reason);
          },
          [](const sql::Stmt& s) { return FailureGroup::Device{s.col_text(0), s.col_text(1), s.col_int(2)}; });
      if (!first) return first.error();
      first_parts.push_back(std::move(*first));
    }
    g.first = first_failed_devices(first_parts, per_reason);
    if (g.reason.empty()) g.reason = "unknown";
  }
  return groups;
}

Result<std::vector<std::string>> AggregateStore::away(const std::string& campaign_id, int64_t limit,
                                                      int64_t campaign_offline, int64_t campaign_unfinished,
                                                      int64_t fleet_offline) {
  if (campaign_offline <= 0) return std::vector<std::string>();
  auto lease = reader();
  auto cells = cell_readers();
  // Two walks, each finding the next such device after about (rows walked /
  // campaign_offline) rows: the campaign's rows in device order, or the
  // fleet's offline devices (a partial index). The shorter one goes.
  const bool by_offline = fleet_offline < campaign_unfinished;
  const std::string sql =
      by_offline
          ? "SELECT d.id FROM devices d INDEXED BY devices_offline CROSS JOIN campaign_devices cd "
            "ON cd.campaign_id = ? AND cd.device_id = d.id WHERE d.online = 0 "
            "AND cd.status IN ('waiting', 'pending', 'in_progress', 'rolling_back') ORDER BY d.id LIMIT ?"
          : "SELECT cd.device_id FROM campaign_devices cd CROSS JOIN devices d ON d.id = cd.device_id "
            "WHERE cd.campaign_id = ? AND cd.status IN ('waiting', 'pending', 'in_progress', 'rolling_back') "
            "AND d.online = 0 ORDER BY cd.device_id LIMIT ?";
  std::vector<std::vector<std::string>> parts;
  for (sql::Db* db : device_dbs(lease.db(), cells)) {
    auto part = query<std::string>(
        *db, sql, [&](sql::Stmt& s) { s.bind(1, std::string_view(campaign_id)).bind(2, limit); },
        [](const sql::Stmt& s) { return s.col_text(0); });
    if (!part) return part.error();
    parts.push_back(std::move(*part));
  }
  return merge_device_ids(parts, limit);
}

namespace {
constexpr const char* kSampleCols =
    "time_ms, state, total, waiting, in_flight, applied, failed, rolled_back, other, offline";
TimelinePoint point_row(const sql::Stmt& s) {
  TimelinePoint p;
  p.time_ms = s.col_int(0);
  p.state = s.col_text(1);
  p.total = s.col_int(2);
  p.waiting = s.col_int(3);
  p.in_flight = s.col_int(4);
  p.applied = s.col_int(5);
  p.failed = s.col_int(6);
  p.rolled_back = s.col_int(7);
  p.other = s.col_int(8);
  p.offline = s.col_int(9);
  return p;
}
}  // namespace

Result<std::vector<TimelinePoint>> AggregateStore::timeline(const std::string& campaign_id) {
  auto lease = reader();
  // Bounded by the sampler's thinning (max_samples); the LIMIT is a second fence.
  return query<TimelinePoint>(
      lease.db(),
      std::string("SELECT ") + kSampleCols + " FROM campaign_samples WHERE campaign_id = ? ORDER BY time_ms LIMIT ?",
      [&](sql::Stmt& s) { s.bind(1, std::string_view(campaign_id)).bind(2, cfg_.max_samples * 2); }, point_row);
}

Result<BundlePage> AggregateStore::bundles(const std::string& project, const std::string& after, int64_t limit) {
  Clauses w;
  w.project("project", project);
  if (auto s = older_than(w, "uploaded_ms", "id", after); !s) return s.error();
  w.binds.push_back(bind_int(limit + 1));
  auto lease = reader();
  auto st = lease.db().prepare("SELECT " + bundle_columns() + " FROM bundles WHERE " + w.where() +
                               " ORDER BY uploaded_ms DESC, id DESC LIMIT ?");
  if (!st) return st.error();
  bind_all(*st, w.binds);
  auto rows = st->rows<BundleRecord>(bundle_row);
  if (!rows) return rows.error();
  BundlePage page;
  page.items = std::move(*rows);
  if (static_cast<int64_t>(page.items.size()) > limit) {
    page.items.pop_back();
    page.next = std::to_string(page.items.back().uploaded_ms) + ":" + page.items.back().id;
  }
  return page;
}

Result<int64_t> AggregateStore::clock_suspect_devices() {
  auto lease = reader();
  auto cells = cell_readers();
  int64_t total = 0;
  for (sql::Db* db : device_dbs(lease.db(), cells)) {
    auto n = query<int64_t>(*db,
                            "SELECT COUNT(*) FROM device_inventory INDEXED BY device_inventory_clock_suspect "
                            "WHERE clock_suspect != 0",
                            [](const sql::Stmt& s) { return s.col_int(0); });
    if (!n) return n.error();
    total += n->empty() ? 0 : n->front();
  }
  return total;
}

Result<std::optional<TokenRecord>> AggregateStore::token(const std::string& kind, const std::string& secret_hash) {
  auto lease = reader();
  return find_token_on(lease.db(), kind, secret_hash);
}

Result<AuditPage> AggregateStore::audit(const std::string& project, int64_t before, int64_t limit) {
  Clauses w;
  if (before > 0) w.add("id < ?", {bind_int(before)});
  w.project("project", project);
  w.binds.push_back(bind_int(limit + 1));
  auto lease = reader();
  // audit_log_project serves a project's newest rows; the primary key all of them.
  auto st = lease.db().prepare("SELECT " + audit_columns() + " FROM audit_log WHERE " + w.where() +
                               " ORDER BY id DESC LIMIT ?");
  if (!st) return st.error();
  bind_all(*st, w.binds);
  auto rows = st->rows<AuditRecord>(audit_row);
  if (!rows) return rows.error();
  AuditPage page;
  page.items = std::move(*rows);
  if (static_cast<int64_t>(page.items.size()) > limit) {
    page.items.pop_back();
    page.next_before = page.items.back().id;
  }
  return page;
}

// ---- the timeline sampler ------------------------------------------------

Status AggregateStore::sample_campaigns(int64_t now_ms) {
  std::lock_guard lock(writer_mu_);
  auto& db = *writer_;
  // The counts are where the rows are: hub.db's own, or each cell's file.
  auto cells = cell_readers();
  const auto counted = device_dbs(db, cells);
  struct Open {
    std::string id;
    CampaignState state = CampaignState::running;
    int64_t updated_ms = 0;
  };
  // Campaigns the engine still runs get a point now; a campaign that ended
  // since the last call gets its last point at the time it ended (the first
  // call looks at every ended campaign: the hub may have been down when it
  // ended; a point already there is kept). "Since the last call" is since
  // the last that committed: a campaign that ended before a skipped call
  // still gets its point.
  const int64_t since = last_sample_ms_ == 0 ? int64_t{0} : last_sample_ms_ - 1000;
  auto open = query<Open>(
      db, "SELECT id, state, updated_ms FROM campaigns WHERE state NOT IN ('completed', 'aborted', 'rolled_back') "
          "OR updated_ms >= ?",
      [&](sql::Stmt& s) { s.bind(1, since); },
      [](const sql::Stmt& s) {
        return Open{s.col_text(0), campaign_state_from(s.col_text(1)).value_or(CampaignState::paused), s.col_int(2)};
      });
  if (!open) return open.error();
  sql::Transaction tx(db);
  if (!tx.ok()) {
    // Another writer held the store past the busy timeout (a campaign of a
    // million devices writes its rows in one transaction).
    return make_error(Errc::unavailable, "the store is busy with another write", true);
  }
  for (const auto& c : *open) {
    const bool ended = campaign_final(c.state);
    auto counts = counts_of(counted, c.id);
    if (!counts) return counts.error();
    TimelinePoint p;
    for (const auto& r : *counts) {
      p.total += r.count;
      const bool unfinished = r.status == "waiting" || r.status == "pending" || r.status == "in_progress" ||
                              r.status == "rolling_back";
      if (r.status == "waiting") p.waiting += r.count;
      else if (unfinished) p.in_flight += r.count;
      else if (r.status == "applied") p.applied += r.count;
      else if (r.status == "failed" || r.status == "rollback_failed") p.failed += r.count;
      else if (r.status == "rolled_back") p.rolled_back += r.count;
      else p.other += r.count;
      if (unfinished && !r.online) p.offline += r.count;
    }
    auto ins = db.prepare(
        std::string("INSERT INTO campaign_samples VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO ") +
        (ended ? "NOTHING"
               : "UPDATE SET state = excluded.state, total = excluded.total, waiting = excluded.waiting, "
                 "in_flight = excluded.in_flight, applied = excluded.applied, failed = excluded.failed, "
                 "rolled_back = excluded.rolled_back, other = excluded.other, offline = excluded.offline"));
    if (!ins) return ins.error();
    ins->bind(1, std::string_view(c.id)).bind(2, ended ? std::min(c.updated_ms, now_ms) : now_ms)
        .bind(3, state_name(c.state)).bind(4, p.total).bind(5, p.waiting).bind(6, p.in_flight)
        .bind(7, p.applied).bind(8, p.failed).bind(9, p.rolled_back).bind(10, p.other).bind(11, p.offline);
    if (auto s = ins->run(); !s) return s;
    // Past max_samples, every other point of the older half goes: the span
    // stays whole, its grain coarser.
    auto n = query<int64_t>(db, "SELECT COUNT(*) FROM campaign_samples WHERE campaign_id = ?",
                            [&](sql::Stmt& s) { s.bind(1, std::string_view(c.id)); },
                            [](const sql::Stmt& s) { return s.col_int(0); });
    if (!n) return n.error();
    if (!n->empty() && n->front() > cfg_.max_samples) {
      auto thin = db.prepare(
          "DELETE FROM campaign_samples WHERE campaign_id = ?1 AND time_ms IN (SELECT time_ms FROM "
          "(SELECT time_ms, ROW_NUMBER() OVER (ORDER BY time_ms) AS k FROM campaign_samples WHERE campaign_id = ?1) "
          "WHERE k % 2 = 0 AND k <= ?2)");
      if (!thin) return thin.error();
      thin->bind(1, std::string_view(c.id)).bind(2, n->front() / 2);
      if (auto s = thin->run(); !s) return s;
    }
  }
  if (auto s = db.exec("DELETE FROM fleet_counts WHERE n = 0; DELETE FROM directory_counts WHERE n = 0"); !s) return s;
  if (auto s = tx.commit(); !s) return s;
  last_sample_ms_ = now_ms;
  return {};
}

void AggregateStore::start_sampler(const Clock& clock, std::chrono::milliseconds interval) {
  interval_ = interval;
  sampler_ = std::thread([this, &clock] {
    std::unique_lock lock(stop_mu_);
    int64_t skipped = 0;  // points skipped in a row because the store was busy
    while (!stopping_) {
      lock.unlock();
      if (auto s = sample_campaigns(clock.now_unix_ms()); !s) {
        if (!s.error().retryable) {
          log::get("hub")->warn("campaign timeline sample failed: {}", s.error().message);
        } else if (skipped++ == 0) {
          log::get("hub")->info("campaign timeline: {}; points are skipped until it is done", s.error().message);
        }
      } else if (skipped > 0) {
        log::get("hub")->info("campaign timeline: sampling again after {} skipped point(s)", skipped);
        skipped = 0;
      }
      lock.lock();
      stop_cv_.wait_for(lock, interval_, [this] { return stopping_; });
    }
  });
}

void AggregateStore::stop() {
  {
    std::lock_guard lock(stop_mu_);
    stopping_ = true;
  }
  stop_cv_.notify_all();
  if (sampler_.joinable()) sampler_.join();
}

}  // namespace flotilla::hub
