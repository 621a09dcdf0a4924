#include <nlohmann/json.hpp>

#include <memory>

#include "flotilla/common/crypto.hpp"
#include "flotilla/hub/store.hpp"
#include "rows.hpp"

namespace flotilla::hub {

std::string labels_json(const Labels& l) { return nlohmann::json(l).dump(); }

namespace {

Labels labels_from(const std::string& s) {
  if (s.empty()) return {};
  auto j = nlohmann::json::parse(s, nullptr, false);
  if (!j.is_object()) return {};
  return j.get<Labels>();
}

std::vector<std::string> label_keys_from(const std::string& s) {
  auto j = nlohmann::json::parse(s, nullptr, false);
  std::vector<std::string> out;
  if (!j.is_array()) return out;
  for (const auto& k : j) if (k.is_string()) out.push_back(k.get<std::string>());
  return out;
}

// A device row with its inventory (device_inventory, LEFT JOINed: one place
// for it, see DeviceInventory). Plain column names only: column counts and
// cursors are computed from this list.
constexpr const char* kDeviceCols =
    "d.id, d.project, d.labels, d.public_key, d.hostname, d.arch, d.agent_version, d.enrolled_ms, d.last_seen_ms, "
    "d.online, d.state, d.applied_bundle, d.applied_version, d.k3s_version, d.node_ready, d.last_reason, "
    "d.last_message, d.last_seq, d.generation, d.desired_bundle_id, d.campaign_id, d.gateway, d.enroll_issued_ms, "
    "i.k3s_role, i.cluster_id, i.cert_expiry_unix, i.os, i.disk_free_bytes, i.disk_total_bytes, i.mem_free_bytes, "
    "i.mem_total_bytes, i.clock_suspect, i.updated_ms, d.cell";
// What kDeviceCols reads from.
constexpr const char* kDeviceFrom = "devices d LEFT JOIN device_inventory i ON i.device_id = d.id";

DeviceRecord device_from(const sql::Stmt& s) {
  DeviceRecord d;
  d.id = s.col_text(0);
  d.project = s.col_text(1);
  d.labels = labels_from(s.col_text(2));
  d.public_key_hex = s.col_text(3);
  d.hostname = s.col_text(4);
  d.arch = s.col_text(5);
  d.agent_version = s.col_text(6);
  d.enrolled_ms = s.col_int(7);
  d.last_seen_ms = s.col_int(8);
  d.online = s.col_int(9) != 0;
  d.state = s.col_text(10);
  d.applied_bundle = s.col_text(11);
  d.applied_version = static_cast<uint64_t>(s.col_int(12));
  d.k3s_version = s.col_text(13);
  d.node_ready = s.col_int(14) != 0;
  d.last_reason = s.col_text(15);
  d.last_message = s.col_text(16);
  d.last_seq = static_cast<uint64_t>(s.col_int(17));
  d.generation = static_cast<uint64_t>(s.col_int(18));
  d.desired_bundle_id = s.col_text(19);
  d.campaign_id = s.col_text(20);
  d.gateway = s.col_text(21);
  d.enroll_issued_ms = static_cast<uint64_t>(s.col_int(22));
  auto& inv = d.inventory;
  inv.k3s_role = s.col_text(23);
  inv.cluster_id = s.col_text(24);
  inv.cert_expiry_unix = s.col_int(25);
  inv.os = s.col_text(26);
  inv.disk_free_bytes = static_cast<uint64_t>(s.col_int(27));
  inv.disk_total_bytes = static_cast<uint64_t>(s.col_int(28));
  inv.mem_free_bytes = static_cast<uint64_t>(s.col_int(29));
  inv.mem_total_bytes = static_cast<uint64_t>(s.col_int(30));
  inv.clock_suspect = s.col_int(31) != 0;
  inv.updated_ms = s.col_int(32);
  d.cell = static_cast<int>(s.col_int(33));
  return d;
}

constexpr const char* kBundleCols = "id, digest, name, channel, version, expires_unix, signatures, uploaded_ms, project";

BundleRecord bundle_from(const sql::Stmt& s, bool with_envelope) {
  BundleRecord b;
  b.id = s.col_text(0);
  b.digest = s.col_text(1);
  b.name = s.col_text(2);
  b.channel = s.col_text(3);
  b.version = static_cast<uint64_t>(s.col_int(4));
  b.expires_unix = s.col_int(5);
  b.signatures = static_cast<int>(s.col_int(6));
  b.uploaded_ms = s.col_int(7);
  b.project = s.col_text(8);
  if (with_envelope) b.envelope = s.col_blob(9);
  return b;
}

using sql::query;

}  // namespace

Result<std::unique_ptr<Store>> Store::open_tuned(const std::string& path, const StoreTuning& tuning,
                                                 bool read_only) {
  auto db = sql::Db::open(path);
  if (!db) return db.error();
  std::unique_ptr<Store> s(new Store(std::move(*db)));
  // A negative cache_size is in KiB (see StoreTuning).
  std::string pragmas = "PRAGMA cache_size = -" + std::to_string(std::max<int64_t>(1, tuning.cache_mib) * 1024) +
                        "; PRAGMA mmap_size = " + std::to_string(std::max<int64_t>(0, tuning.mmap_mib) << 20) + ";";
  // A reader never writes: a bug that tried would fail here, not corrupt a row.
  if (read_only) pragmas += "PRAGMA query_only = 1;";
  if (auto c = s->db_->exec(pragmas); !c) return c.error();
  return s;
}

Result<std::unique_ptr<Store>> Store::open_reader(const std::string& path, const StoreTuning& tuning) {
  return open_tuned(path, tuning, true);
}

Result<std::unique_ptr<Store>> Store::open(const std::string& path, const StoreTuning& tuning) {
  return open_writer(path, tuning, -1);
}

Result<std::unique_ptr<Store>> Store::open_writer(const std::string& path, const StoreTuning& tuning, int cell) {
  auto s = open_tuned(path, tuning, false);
  if (!s) return s.error();
  // Control data (tokens, revocations, decommissions, credentials, bundles,
  // campaigns, audit) must survive a power cut once the API has answered:
  // FULL syncs the WAL at every commit. Only report batches relax it
  // (relaxed_sync), see docs/operations.md "Durability".
  if (auto f = (*s)->db_->exec("PRAGMA synchronous = FULL"); !f) return f.error();
  // One big transaction (creating a campaign over 250,000 devices writes
  // about 68 MB of pages) grows hub.db-wal, and SQLite reuses the file from
  // its start afterwards without shrinking it: keep at most 64 MiB once it
  // starts over, not the largest transaction's size for the store's life.
  if (auto j = (*s)->db_->exec("PRAGMA journal_size_limit = 67108864"); !j) return j.error();
  // A statement that can fail halfway (an upsert, anything that fires a
  // trigger) keeps the pages it changes in a statement journal so it can be
  // undone alone. Past 64 KiB SQLite spills that journal to a temporary
  // file, and every page the statement touches is written there first:
  // half of an enrollment's time at 300k devices went to those writes
  // (bench/enroll_store, docs/scale.md). In memory it is the size of one
  // statement's pages, freed when the statement ends.
  if (auto t = (*s)->db_->exec("PRAGMA temp_store = MEMORY"); !t) return t.error();
  // Checkpoint once the WAL holds 64 MiB of pages (journal_size_limit)
  // rather than SQLite's 4 MiB: a page that many commits change (an index
  // page taking random device ids) is copied into the file once per
  // checkpoint, not once per commit that crossed the smaller mark. A quarter
  // less enrollment time at 300k devices (bench/enroll_store).
  if (auto w = (*s)->db_->exec("PRAGMA wal_autocheckpoint = 16384"); !w) return w.error();
  if (auto r = (*s)->claim_role(path, cell); !r) return r.error();
  if (cell >= 0) {
    if (auto c = (*s)->prepare_cell_file(); !c) return c.error().with_context(path);
  } else {
    auto moved = (*s)->cell_files_in_use();
    if (!moved) return moved.error().with_context(path);
    (*s)->directory_only_ = *moved > 0;
  }
  if (auto m = (*s)->migrate(); !m) return m.error().with_context("migrate " + path);
  if (cell >= 0) {
    if (auto c = (*s)->finish_cell_file(); !c) return c.error().with_context(path);
  } else if ((*s)->directory_only_) {
    if (auto d = (*s)->drop_report_side(); !d) return d.error().with_context(path);
  }
  return s;
}

Status Store::migrate() {
  if (auto s = db_->exec(R"SQL(
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (
  id TEXT PRIMARY KEY, kind TEXT NOT NULL, secret_hash TEXT NOT NULL UNIQUE, name TEXT NOT NULL,
  role TEXT NOT NULL, project TEXT NOT NULL, labels TEXT NOT NULL, expires_unix INTEGER NOT NULL,
  max_uses INTEGER NOT NULL, uses INTEGER NOT NULL DEFAULT 0, created_ms INTEGER NOT NULL,
  revoked INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS broker_credentials (username TEXT PRIMARY KEY, hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
  id TEXT PRIMARY KEY, project TEXT NOT NULL, labels TEXT NOT NULL, public_key TEXT NOT NULL,
  hostname TEXT NOT NULL, arch TEXT NOT NULL, agent_version TEXT NOT NULL, enrolled_ms INTEGER NOT NULL,
  last_seen_ms INTEGER NOT NULL DEFAULT 0, online INTEGER NOT NULL DEFAULT 0,
  state TEXT NOT NULL DEFAULT 'enrolled', applied_bundle TEXT NOT NULL DEFAULT '',
  applied_version INTEGER NOT NULL DEFAULT 0, k3s_version TEXT NOT NULL DEFAULT '',
  node_ready INTEGER NOT NULL DEFAULT 0, last_reason TEXT NOT NULL DEFAULT '',
  last_message TEXT NOT NULL DEFAULT '', last_seq INTEGER NOT NULL DEFAULT 0,
  generation INTEGER NOT NULL DEFAULT 0, desired_bundle_id TEXT NOT NULL DEFAULT '',
  campaign_id TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS bundles (
  id TEXT PRIMARY KEY, digest TEXT NOT NULL, name TEXT NOT NULL, channel TEXT NOT NULL,
  version INTEGER NOT NULL, expires_unix INTEGER NOT NULL, signatures INTEGER NOT NULL,
  uploaded_ms INTEGER NOT NULL, envelope BLOB NOT NULL, project TEXT NOT NULL DEFAULT 'default',
  UNIQUE (project, digest));
CREATE INDEX IF NOT EXISTS bundles_name_version ON bundles(name, version);
CREATE TABLE IF NOT EXISTS campaigns (
  id TEXT PRIMARY KEY, name TEXT NOT NULL, bundle_id TEXT NOT NULL REFERENCES bundles(id),
  selector TEXT NOT NULL, state TEXT NOT NULL, created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS campaign_devices (
  campaign_id TEXT NOT NULL REFERENCES campaigns(id), device_id TEXT NOT NULL REFERENCES devices(id),
  status TEXT NOT NULL, generation INTEGER NOT NULL, updated_ms INTEGER NOT NULL,
  reason TEXT NOT NULL DEFAULT '', message TEXT NOT NULL DEFAULT '',
  PRIMARY KEY (campaign_id, device_id));
-- Append-only: one row per mutating API call (docs/security.md). The triggers
-- make the store itself refuse to rewrite history, not just the hub's code.
CREATE TABLE IF NOT EXISTS audit_log (
  id INTEGER PRIMARY KEY AUTOINCREMENT, time_ms INTEGER NOT NULL, actor TEXT NOT NULL,
  actor_name TEXT NOT NULL, role TEXT NOT NULL, project TEXT NOT NULL, method TEXT NOT NULL,
  path TEXT NOT NULL, detail TEXT NOT NULL, status INTEGER NOT NULL, peer TEXT NOT NULL);
CREATE TRIGGER IF NOT EXISTS audit_log_no_update BEFORE UPDATE ON audit_log
  BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_log_no_delete BEFORE DELETE ON audit_log
  BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
-- The operator's current trust message (v1::Trust): one row for the hub.
CREATE TABLE IF NOT EXISTS trust (
  id INTEGER PRIMARY KEY CHECK (id = 1), trust BLOB NOT NULL, updated_ms INTEGER NOT NULL);
)SQL"); !s) {
    return s;
  }
  if (auto s = migrate_declarative(); !s) return s;
  // Before the campaigns: their rows and counts carry the device's cell.
  if (auto s = migrate_cells(); !s) return s;
  if (auto s = migrate_campaigns(); !s) return s;
  if (auto s = migrate_certs(); !s) return s;
  if (auto s = migrate_scopes(); !s) return s;
  // Last of the devices columns (a snapshot compares column order), and
  // before the triggers that read it are made.
  if (auto s = migrate_directory(); !s) return s;
  if (auto s = migrate_aggregates(); !s) return s;
  return migrate_inventory();
}

// Stores made before cells hold every device in cell 0, which is where a
// one-cell hub (the default) has them.
Status Store::migrate_cells() {
  auto has = has_column(*db_, "devices", "cell");
  if (!has) return has.error();
  if (!*has) {
    if (auto s = db_->exec("ALTER TABLE devices ADD COLUMN cell INTEGER NOT NULL DEFAULT 0"); !s) return s;
  }
  // Not on online: presence changes with every report, the cell almost never.
  // A cell's file holds one cell: its rows in id order are the index.
  if (auto s = db_->exec(own_cell_ < 0 ? "CREATE INDEX IF NOT EXISTS devices_cell ON devices(cell, id)"
                                       : "DROP INDEX IF EXISTS devices_cell");
      !s) {
    return s;
  }
  // This hub's own drains (not shared: hubs sharing cells keep theirs in the
  // coordinator), so that a restart neither forgets a drain nor strands the
  // devices that took a move asked before it.
  return db_->exec("CREATE TABLE IF NOT EXISTS cell_drains (cell INTEGER PRIMARY KEY, since_ms INTEGER NOT NULL)");
}

// A decommission is the directory's own column (ADR 18): the state a
// decommission also sets is a report column, which a cell's file keeps.
// Stores made before it get the column from the state, in one transaction
// (no trigger reads the column yet: migrate_aggregates rebuilds them next).
Status Store::migrate_directory() {
  auto has = has_column(*db_, "devices", "decommissioned");
  if (!has) return has.error();
  if (*has) return {};
  sql::Transaction tx(*db_);
  if (!tx.ok()) return make_error(Errc::unavailable, "cannot begin transaction", true);
  if (auto s = db_->exec("ALTER TABLE devices ADD COLUMN decommissioned INTEGER NOT NULL DEFAULT 0; "
                         "UPDATE devices SET decommissioned = 1 WHERE state = 'decommissioned';");
      !s) {
    return s.error().with_context("add devices.decommissioned");
  }
  return tx.commit();
}

std::string bundle_id(const std::string& project, const std::string& digest) {
  if (project == "default") return digest.substr(0, 16);
  return crypto::sha256_hex(project + ":" + digest).substr(0, 16);
}

Result<bool> has_column(sql::Db& db, const std::string& table, const std::string& column) {
  auto st = db.prepare("SELECT COUNT(*) FROM pragma_table_info(?) WHERE name = ?");
  if (!st) return st.error();
  st->bind(1, std::string_view(table)).bind(2, std::string_view(column));
  auto r = st->step();
  if (!r) return r.error();
  const bool has = st->col_int(0) > 0;
  st->reset();
  return has;
}

Status Store::migrate_scopes() {
  for (const auto& [table, col, decl] :
       {std::tuple{"devices", "enroll_issued_ms", "INTEGER NOT NULL DEFAULT 0"},
        std::tuple{"tokens", "device_label_keys", "TEXT NOT NULL DEFAULT '[]'"}}) {
    auto has = has_column(*db_, table, col);
    if (!has) return has.error();
    if (!*has) {
      if (auto s = db_->exec(std::string("ALTER TABLE ") + table + " ADD COLUMN " + col + " " + decl); !s) return s;
    }
  }
  // Stores made before bundles were scoped held each manifest once for the
  // whole hub (digest UNIQUE): another project's upload of the same manifest
  // merged its signatures into yours. Rebuilt with UNIQUE (project, digest),
  // the way SQLite documents for changing a constraint (foreign keys off,
  // new table, copy, swap, check).
  auto st = db_->prepare("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'bundles'");
  if (!st) return st.error();
  auto r = st->step();
  if (!r) return r.error();
  const std::string ddl = *r ? st->col_text(0) : std::string();
  st->reset();
  if (ddl.find("digest TEXT NOT NULL UNIQUE") != std::string::npos) {
    if (auto s = db_->exec("PRAGMA foreign_keys = OFF"); !s) return s;
    auto rebuilt = db_->exec(R"SQL(
BEGIN IMMEDIATE;
CREATE TABLE bundles_scoped (
  id TEXT PRIMARY KEY, digest TEXT NOT NULL, name TEXT NOT NULL, channel TEXT NOT NULL,
  version INTEGER NOT NULL, expires_unix INTEGER NOT NULL, signatures INTEGER NOT NULL,
  uploaded_ms INTEGER NOT NULL, envelope BLOB NOT NULL, project TEXT NOT NULL DEFAULT 'default',
  UNIQUE (project, digest));
INSERT INTO bundles_scoped (id, digest, name, channel, version, expires_unix, signatures, uploaded_ms, envelope, project)
  SELECT id, digest, name, channel, version, expires_unix, signatures, uploaded_ms, envelope, project FROM bundles;
DROP TABLE bundles;
ALTER TABLE bundles_scoped RENAME TO bundles;
CREATE INDEX IF NOT EXISTS bundles_name_version ON bundles(name, version);
COMMIT;
)SQL");
    if (!rebuilt) (void)db_->exec("ROLLBACK");
    if (auto s = db_->exec("PRAGMA foreign_keys = ON"); !s) return s;
    if (!rebuilt) return rebuilt.error().with_context("scope bundles by project");
    auto check = db_->prepare("PRAGMA foreign_key_check");
    if (!check) return check.error();
    auto bad = check->step();
    if (!bad) return bad.error();
    if (*bad) return make_error(Errc::internal, "scope bundles by project: a foreign key no longer holds");
  }
  return db_->exec("CREATE INDEX IF NOT EXISTS bundles_project_name_version ON bundles(project, name, version)");
}

Status Store::relaxed_sync(bool relaxed) {
  return db_->exec(relaxed ? "PRAGMA synchronous = NORMAL" : "PRAGMA synchronous = FULL");
}

Result<int64_t> Store::synchronous() {
  auto st = db_->prepare("PRAGMA synchronous");
  if (!st) return st.error();
  auto r = st->step();
  if (!r) return r.error();
  return st->col_int(0);
}

Status Store::insert_token(const std::string& kind, const TokenRecord& t, const std::string& secret_hash) {
  auto st = db_->prepare(
      "INSERT INTO tokens (id, kind, secret_hash, name, role, project, labels, expires_unix, max_uses, uses, "
      "created_ms, device_label_keys) VALUES (?,?,?,?,?,?,?,?,?,0,?,?)");
  if (!st) return st.error();
  st->bind(1, std::string_view(t.id)).bind(2, std::string_view(kind)).bind(3, std::string_view(secret_hash))
      .bind(4, std::string_view(t.name)).bind(5, std::string_view(t.role)).bind(6, std::string_view(t.project))
      .bind(7, std::string_view(labels_json(t.labels))).bind(8, t.expires_unix).bind(9, t.max_uses)
      .bind(10, t.created_ms).bind(11, std::string_view(nlohmann::json(t.device_label_keys).dump()));
  return st->run();
}

Result<std::optional<TokenRecord>> Store::find_token(const std::string& kind, const std::string& secret_hash) {
  return find_token_on(*db_, kind, secret_hash);
}

Result<std::optional<TokenRecord>> find_token_on(sql::Db& db, const std::string& kind,
                                                 const std::string& secret_hash) {
  auto st = db.prepare(
      "SELECT id, name, role, project, labels, expires_unix, max_uses, uses, created_ms, revoked, device_label_keys "
      "FROM tokens WHERE kind = ? AND secret_hash = ?");
  if (!st) return st.error();
  st->bind(1, std::string_view(kind)).bind(2, std::string_view(secret_hash));
  auto r = st->step();
  if (!r) return r.error();
  if (!*r) return std::optional<TokenRecord>();
  TokenRecord t;
  t.id = st->col_text(0);
  t.name = st->col_text(1);
  t.role = st->col_text(2);
  t.project = st->col_text(3);
  t.labels = labels_from(st->col_text(4));
  t.expires_unix = st->col_int(5);
  t.max_uses = st->col_int(6);
  t.uses = st->col_int(7);
  t.created_ms = st->col_int(8);
  t.revoked = st->col_int(9) != 0;
  t.device_label_keys = label_keys_from(st->col_text(10));
  return std::optional<TokenRecord>(t);
}

Result<bool> Store::claim_token_use(const std::string& id) {
  auto st = db_->prepare("UPDATE tokens SET uses = uses + 1 WHERE id = ? AND (max_uses = 0 OR uses < max_uses)");
  if (!st) return st.error();
  st->bind(1, std::string_view(id));
  if (auto s = st->run(); !s) return s.error();
  return db_->changes() == 1;
}

Result<int64_t> Store::count_tokens(const std::string& kind) {
  auto st = db_->prepare("SELECT COUNT(*) FROM tokens WHERE kind = ?");
  if (!st) return st.error();
  st->bind(1, std::string_view(kind));
  auto r = st->step();
  if (!r) return r.error();
  return st->col_int(0);
}

Status Store::upsert_credential(const std::string& username, const std::string& hash) {
  auto st = db_->prepare(
      "INSERT INTO broker_credentials (username, hash) VALUES (?, ?) "
      "ON CONFLICT(username) DO UPDATE SET hash = excluded.hash");
  if (!st) return st.error();
  st->bind(1, std::string_view(username)).bind(2, std::string_view(hash));
  return st->run();
}

Result<std::vector<std::pair<std::string, std::string>>> Store::credentials() {
  return query<std::pair<std::string, std::string>>(
      *db_, "SELECT username, hash FROM broker_credentials ORDER BY username",
      [](const sql::Stmt& s) { return std::make_pair(s.col_text(0), s.col_text(1)); });
}

Status Store::upsert_enrolled_device(const DeviceRecord& d) {
  auto st = db_->prepare(
      "INSERT INTO devices (id, project, labels, public_key, hostname, arch, agent_version, enrolled_ms, gateway, "
      "enroll_issued_ms, cell) VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET "
      "labels = excluded.labels, hostname = excluded.hostname, arch = excluded.arch, "
      "agent_version = excluded.agent_version, enrolled_ms = excluded.enrolled_ms, gateway = excluded.gateway, "
      "enroll_issued_ms = excluded.enroll_issued_ms");
  if (!st) return st.error();
  st->bind(1, std::string_view(d.id)).bind(2, std::string_view(d.project))
      .bind(3, std::string_view(labels_json(d.labels))).bind(4, std::string_view(d.public_key_hex))
      .bind(5, std::string_view(d.hostname)).bind(6, std::string_view(d.arch))
      .bind(7, std::string_view(d.agent_version)).bind(8, d.enrolled_ms).bind(9, std::string_view(d.gateway))
      .bind(10, static_cast<int64_t>(d.enroll_issued_ms)).bind(11, static_cast<int64_t>(d.cell));
  // Neither the project nor the cell is in the update: a re-enrollment
  // keeps both (HubService::check_reenrollment refuses a token of another
  // project), so the report side's count triggers need not watch project.
  return st->run();
}

Result<std::optional<DeviceRecord>> Store::get_device(const std::string& id) {
  auto st = db_->prepare(std::string("SELECT ") + kDeviceCols + " FROM " + kDeviceFrom + " WHERE d.id = ?");
  if (!st) return st.error();
  st->bind(1, std::string_view(id));
  auto r = st->step();
  if (!r) return r.error();
  if (!*r) return std::optional<DeviceRecord>();
  return std::optional<DeviceRecord>(device_from(*st));
}

namespace {

constexpr const char* kDirectoryCols =
    "id, project, labels, public_key, hostname, enrolled_ms, enroll_issued_ms, gateway, cell, decommissioned, arch, "
    "agent_version";

DeviceDirectoryEntry directory_entry_from(const sql::Stmt& st) {
  DeviceDirectoryEntry e;
  e.id = st.col_text(0);
  e.project = st.col_text(1);
  e.labels = labels_from(st.col_text(2));
  e.public_key_hex = st.col_text(3);
  e.hostname = st.col_text(4);
  e.enrolled_ms = st.col_int(5);
  e.enroll_issued_ms = static_cast<uint64_t>(st.col_int(6));
  e.gateway = st.col_text(7);
  e.cell = static_cast<int>(st.col_int(8));
  e.decommissioned = st.col_int(9) != 0;
  e.arch = st.col_text(10);
  e.agent_version = st.col_text(11);
  return e;
}

}  // namespace

Result<std::optional<DeviceDirectoryEntry>> Store::directory_entry(const std::string& id) {
  auto st = db_->prepare(std::string("SELECT ") + kDirectoryCols + " FROM devices WHERE id = ?");
  if (!st) return st.error();
  st->bind(1, std::string_view(id));
  auto r = st->step();
  if (!r) return r.error();
  if (!*r) return std::optional<DeviceDirectoryEntry>();
  return std::optional<DeviceDirectoryEntry>(directory_entry_from(*st));
}

Result<std::vector<DeviceDirectoryEntry>> Store::directory_entries(int cell, const std::string& after, int64_t limit) {
  return query<DeviceDirectoryEntry>(
      *db_, std::string("SELECT ") + kDirectoryCols + " FROM devices WHERE cell = ? AND id > ? ORDER BY id LIMIT ?",
      [&](sql::Stmt& st) { st.bind(1, static_cast<int64_t>(cell)).bind(2, std::string_view(after)).bind(3, limit); },
      directory_entry_from);
}

Result<std::vector<std::string>> Store::campaign_ids() {
  return query<std::string>(*db_, "SELECT id FROM campaigns ORDER BY id",
                            [](const sql::Stmt& st) { return st.col_text(0); });
}

Result<std::vector<DeviceRecord>> Store::list_devices() {
  return query<DeviceRecord>(*db_, std::string("SELECT ") + kDeviceCols + " FROM " + kDeviceFrom + " ORDER BY d.id", device_from);
}

Status Store::each_device_target(
    const std::function<void(const std::string&, const std::string&, bool, const Labels&)>& f) {
  auto st = db_->prepare("SELECT id, project, decommissioned, labels FROM devices ORDER BY id");
  if (!st) return st.error();
  return st->each(
      [&](const sql::Stmt& s) { f(s.col_text(0), s.col_text(1), s.col_int(2) != 0, labels_from(s.col_text(3))); });
}

Status Store::each_device_target_cell(
    const std::function<void(const std::string&, const std::string&, bool, const Labels&, int)>& f) {
  auto st = db_->prepare("SELECT id, project, decommissioned, labels, cell FROM devices ORDER BY id");
  if (!st) return st.error();
  return st->each([&](const sql::Stmt& s) {
    f(s.col_text(0), s.col_text(1), s.col_int(2) != 0, labels_from(s.col_text(3)), static_cast<int>(s.col_int(4)));
  });
}

Status Store::save_device_state(const DeviceRecord& d) {
  auto st = db_->prepare(
      "UPDATE devices SET last_seen_ms=?, online=?, state=?, applied_bundle=?, applied_version=?, "
      "k3s_version=?, node_ready=?, last_reason=?, last_message=?, last_seq=?, generation=?, "
      "desired_bundle_id=?, campaign_id=?, agent_version=?, arch=? "
      // A report or presence message still queued when a device was
      // decommissioned must not bring it back to life.
      "WHERE id=? AND state != 'decommissioned'");
  if (!st) return st.error();
  st->bind(1, d.last_seen_ms).bind(2, d.online ? 1 : 0).bind(3, std::string_view(d.state))
      .bind(4, std::string_view(d.applied_bundle)).bind(5, static_cast<int64_t>(d.applied_version))
      .bind(6, std::string_view(d.k3s_version)).bind(7, d.node_ready ? 1 : 0)
      .bind(8, std::string_view(d.last_reason)).bind(9, std::string_view(d.last_message))
      .bind(10, static_cast<int64_t>(d.last_seq)).bind(11, static_cast<int64_t>(d.generation))
      .bind(12, std::string_view(d.desired_bundle_id)).bind(13, std::string_view(d.campaign_id))
      .bind(14, std::string_view(d.agent_version)).bind(15, std::string_view(d.arch))
      .bind(16, std::string_view(d.id));
  return st->run();
}

Status Store::set_gateway_devices_offline(const std::string& gateway, int64_t now_ms) {
  auto st = db_->prepare(
      // "gateway != ''" lets SQLite use the partial index devices_gateway: a
      // bound parameter alone does not prove it, and without it each gateway
      // going offline scanned every device (200 scans of 1M rows when a
      // 1M-device simulator stopped).
      "UPDATE devices SET online=0, last_seen_ms=MAX(last_seen_ms, ?) WHERE gateway=? AND gateway != '' "
      "AND online=1 AND state != 'decommissioned'");
  if (!st) return st.error();
  st->bind(1, now_ms).bind(2, std::string_view(gateway));
  return st->run();
}

Result<int64_t> Store::set_all_devices_offline() {
  // last_seen_ms stays what it was: the last time the device was heard from.
  auto st = db_->prepare("UPDATE devices SET online=0 WHERE online=1");
  if (!st) return st.error();
  if (auto s = st->run(); !s) return s.error();
  return db_->changes();
}

Result<int64_t> Store::set_cell_devices_offline(int cell) {
  auto st = db_->prepare("UPDATE devices SET online=0 WHERE cell=? AND online=1");
  if (!st) return st.error();
  st->bind(1, static_cast<int64_t>(cell));
  if (auto s = st->run(); !s) return s.error();
  return db_->changes();
}

namespace {

// One count of devices by cell: COUNT(*) of the directory's or SUM(online)
// of the reports', as `total` or `online`.
Result<std::vector<CellDeviceCount>> count_by_cell(sql::Db& db, const std::string& what, const std::string& where,
                                                   const std::string& project, bool as_total) {
  const bool any = project == "*";
  auto st = db.prepare("SELECT cell, " + what + " FROM devices WHERE " + where + (any ? "" : " AND project = ?") +
                       " GROUP BY cell ORDER BY cell");
  if (!st) return st.error();
  if (!any) st->bind(1, std::string_view(project));
  return st->rows<CellDeviceCount>([as_total](const sql::Stmt& s) {
    CellDeviceCount c;
    c.cell = static_cast<int>(s.col_int(0));
    (as_total ? c.total : c.online) = s.col_int(1);
    return c;
  });
}

}  // namespace

Result<std::vector<Store::CellCount>> Store::cell_device_totals(const std::string& project) {
  return count_by_cell(*db_, "COUNT(*)", "decommissioned = 0", project, true);
}

Result<std::vector<CellDeviceCount>> Store::online_by_cell(const std::string& project) {
  // The report side's own condition: a decommission sets the state (and
  // clears online) in the cell's copy too.
  return count_by_cell(*db_, "COALESCE(SUM(online), 0)", "state != 'decommissioned'", project, false);
}

Result<int64_t> Store::set_device_cell(const std::string& id, int cell) {
  auto st = db_->prepare("UPDATE devices SET cell=? WHERE (id=? OR (gateway=? AND gateway != '')) AND cell != ?");
  if (!st) return st.error();
  st->bind(1, static_cast<int64_t>(cell)).bind(2, std::string_view(id)).bind(3, std::string_view(id))
      .bind(4, static_cast<int64_t>(cell));
  if (auto s = st->run(); !s) return s.error();
  return db_->changes();
}

Result<std::vector<DirectoryChange>> Store::directory_outbox(int64_t limit) {
  return query<DirectoryChange>(
      *db_, "SELECT seq, device_id, kind, cell, from_cell, local FROM directory_outbox ORDER BY seq LIMIT ?",
      [&](sql::Stmt& s) { s.bind(1, limit); },
      [](const sql::Stmt& s) {
        DirectoryChange c;
        c.seq = s.col_int(0);
        c.device_id = s.col_text(1);
        const std::string kind = s.col_text(2);
        c.kind = kind == "decommissioned" ? DirectoryChange::Kind::decommissioned
                 : kind == "labelled"     ? DirectoryChange::Kind::labelled
                                          : DirectoryChange::Kind::moved;
        c.cell = static_cast<int>(s.col_int(3));
        c.from_cell = static_cast<int>(s.col_int(4));
        c.local = s.col_int(5) != 0;
        return c;
      });
}

namespace {

// The transactions one batch of the outbox opens on cells' files, in the
// order they must commit.
class FileWrites {
 public:
  Status begin(DeviceStore& s) {
    sql::Db* db = &s.device_db();
    for (const auto& t : txs_) {
      if (t.first == db) return {};
    }
    auto tx = std::make_unique<sql::Transaction>(*db);
    if (!tx->ok()) return make_error(Errc::unavailable, "follow the device directory: cannot begin a transaction", true);
    txs_.emplace_back(db, std::move(tx));
    return {};
  }
  Status commit() {
    for (auto& t : txs_) {
      if (auto s = t.second->commit(); !s) return s;
    }
    txs_.clear();
    return {};
  }

 private:
  std::vector<std::pair<sql::Db*, std::unique_ptr<sql::Transaction>>> txs_;
};

// cell_files: the device's copy in the file of the cell the directory
// names now; a move's rows carried there from the old cell's file, whose
// copy goes into `leaving` (forgotten once the new file committed).
// Returns the cell whose store follows the change further (nullopt: done).
Result<std::optional<int>> follow_copy(Store& directory, const std::function<DeviceStore&(int cell)>& store_of,
                         const DirectoryChange& c, FileWrites& writes,
                         std::vector<std::pair<DeviceStore*, std::string>>& leaving) {
  auto e = directory.directory_entry(c.device_id);
  if (!e) return e.error();
  if (!*e) return std::optional<int>();  // no such device any more: nothing of it to follow
  DeviceStore& to = store_of((*e)->cell);
  if (auto s = writes.begin(to); !s) return s.error();
  if (c.kind == DirectoryChange::Kind::moved) {
    DeviceStore& from = store_of(c.from_cell);
    if (&from.device_db() != &to.device_db()) {
      auto rows = from.export_device(c.device_id);
      if (!rows) return rows.error();
      if (*rows) {
        if (auto s = to.import_device(**e, **rows); !s) return s.error();
        leaving.emplace_back(&from, c.device_id);
        return std::optional<int>();
      }
    }
    // Rows already where the directory says (a later move took them), or
    // back where they were: the copy is all there is to follow.
    if (auto s = to.adopt_device(**e); !s) return s.error();
    return std::optional<int>();
  }
  if (auto s = to.adopt_device(**e); !s) return s.error();
  return std::optional<int>((*e)->cell);
}

}  // namespace

Result<int64_t> follow_directory_outbox(Store& directory, const std::function<DeviceStore&(int cell)>& store_of,
                                        const std::function<Status(const DirectoryChange&)>& on_labelled,
                                        bool cell_files) {
  int64_t followed = 0;
  for (;;) {
    auto changes = directory.directory_outbox(4096);
    if (!changes) return changes.error();
    if (changes->empty()) return followed;
    sql::Transaction tx(directory.db());
    if (!tx.ok()) return make_error(Errc::unavailable, "follow the device directory: cannot begin a transaction", true);
    FileWrites writes;
    std::vector<std::pair<DeviceStore*, std::string>> leaving;
    for (const auto& c : *changes) {
      // A move's rows are still where the device was (one file: cell_files
      // moves them here). A decommission's are in the device's cell.
      int cell = c.kind == DirectoryChange::Kind::moved ? c.from_cell : c.cell;
      if (cell_files) {
        auto more = follow_copy(directory, store_of, c, writes, leaving);
        if (!more) return more.error().with_context("device=" + c.device_id);
        if (!*more) continue;
        cell = **more;
      }
      if (c.kind == DirectoryChange::Kind::labelled) {
        if (!on_labelled) continue;
        if (auto s = on_labelled(c); !s) return s.error().with_context("device=" + c.device_id);
        continue;
      }
      DeviceStore& rows = store_of(cell);
      if (auto s = rows.follow_directory(c); !s) return s.error().with_context("device=" + c.device_id);
    }
    if (auto s = writes.commit(); !s) return s.error().with_context("follow the device directory");
    // Only once the rows are in their new files: the copies they left.
    for (const auto& [from, id] : leaving) {
      if (auto s = writes.begin(*from); !s) return s.error();
      if (auto s = from->forget_device(id); !s) return s.error().with_context("device=" + id);
    }
    if (auto s = writes.commit(); !s) return s.error().with_context("follow the device directory");
    if (auto s = directory.forget_directory_changes(changes->back().seq); !s) return s.error();
    if (auto s = tx.commit(); !s) return s.error();
    followed += static_cast<int64_t>(changes->size());
  }
}

Status Store::forget_directory_changes(int64_t seq) {
  auto st = db_->prepare("DELETE FROM directory_outbox WHERE seq <= ?");
  if (!st) return st.error();
  st->bind(1, seq);
  return st->run();
}

Status Store::local_directory_write(const std::function<Status()>& write) {
  auto end = query<int64_t>(*db_, "SELECT COALESCE(MAX(seq), 0) FROM directory_outbox",
                            [](const sql::Stmt& s) { return s.col_int(0); });
  if (!end) return end.error();
  if (auto s = write(); !s) return s;
  auto st = db_->prepare("UPDATE directory_outbox SET local = 1 WHERE seq > ?");
  if (!st) return st.error();
  st->bind(1, end->empty() ? 0 : end->front());
  return st->run();
}

Status Store::follow_directory(const DirectoryChange& c) {
  if (c.kind == DirectoryChange::Kind::labelled) return {};  // the hub's (live membership)
  if (c.kind == DirectoryChange::Kind::decommissioned) {
    // The report side of a decommission: the state reports can no longer
    // change, offline, no inventory. Idempotent.
    auto gone = db_->prepare("UPDATE devices SET state = 'decommissioned', online = 0 WHERE id = ? AND "
                             "(state != 'decommissioned' OR online != 0)");
    if (!gone) return gone.error();
    gone->bind(1, std::string_view(c.device_id));
    if (auto s = gone->run(); !s) return s;
    auto st = db_->prepare("DELETE FROM device_inventory WHERE device_id = ?");
    if (!st) return st.error();
    st->bind(1, std::string_view(c.device_id));
    return st->run();
  }
  auto st = db_->prepare("UPDATE campaign_devices SET cell = ? WHERE device_id = ? AND cell != ?");
  if (!st) return st.error();
  st->bind(1, static_cast<int64_t>(c.cell)).bind(2, std::string_view(c.device_id)).bind(3, static_cast<int64_t>(c.cell));
  return st->run();
}

Result<std::vector<std::string>> Store::devices_of_owner(const std::string& id) {
  auto st = db_->prepare("SELECT id FROM devices WHERE id=? OR (gateway=? AND gateway != '')");
  if (!st) return st.error();
  st->bind(1, std::string_view(id)).bind(2, std::string_view(id));
  return st->rows<std::string>([](const sql::Stmt& s) { return s.col_text(0); });
}

Result<std::vector<std::string>> Store::cell_session_devices(int cell, int64_t limit, const std::string& after) {
  auto st = db_->prepare("SELECT id FROM devices WHERE cell=? AND id > ? AND gateway='' AND decommissioned = 0 "
                         "ORDER BY id LIMIT ?");
  if (!st) return st.error();
  st->bind(1, static_cast<int64_t>(cell)).bind(2, std::string_view(after)).bind(3, limit);
  return st->rows<std::string>([](const sql::Stmt& s) { return s.col_text(0); });
}

Result<std::map<int, int64_t>> Store::cell_drains() {
  auto st = db_->prepare("SELECT cell, since_ms FROM cell_drains ORDER BY cell");
  if (!st) return st.error();
  auto rows = st->rows<std::pair<int, int64_t>>(
      [](const sql::Stmt& s) { return std::pair{static_cast<int>(s.col_int(0)), s.col_int(1)}; });
  if (!rows) return rows.error();
  return std::map<int, int64_t>(rows->begin(), rows->end());
}

Status Store::set_cell_drain(int cell, bool draining, int64_t since_ms) {
  auto st = db_->prepare(draining ? "INSERT INTO cell_drains (cell, since_ms) VALUES (?, ?) ON CONFLICT(cell) DO NOTHING"
                                  : "DELETE FROM cell_drains WHERE cell = ?");
  if (!st) return st.error();
  st->bind(1, static_cast<int64_t>(cell));
  if (draining) st->bind(2, since_ms);
  return st->run();
}

Status Store::insert_bundle(const BundleRecord& b) {
  auto st = db_->prepare(
      "INSERT INTO bundles (id, digest, name, channel, version, expires_unix, signatures, uploaded_ms, envelope, project) "
      "VALUES (?,?,?,?,?,?,?,?,?,?)");
  if (!st) return st.error();
  st->bind(1, std::string_view(b.id)).bind(2, std::string_view(b.digest)).bind(3, std::string_view(b.name))
      .bind(4, std::string_view(b.channel)).bind(5, static_cast<int64_t>(b.version)).bind(6, b.expires_unix)
      .bind(7, static_cast<int64_t>(b.signatures)).bind(8, b.uploaded_ms).bind_blob(9, b.envelope)
      .bind(10, std::string_view(b.project));
  return st->run();
}

Status Store::update_bundle_signatures(const std::string& id, const std::string& envelope, int signatures) {
  auto st = db_->prepare("UPDATE bundles SET envelope = ?, signatures = ? WHERE id = ?");
  if (!st) return st.error();
  st->bind_blob(1, envelope).bind(2, static_cast<int64_t>(signatures)).bind(3, std::string_view(id));
  return st->run();
}

Result<std::optional<BundleRecord>> Store::get_bundle(const std::string& key, bool with_envelope,
                                                     const std::string& project) {
  const std::string cols = std::string(kBundleCols) + (with_envelope ? ", envelope" : "");
  const bool any = project == "*";
  const std::string scope = any ? "" : " AND project = ?";
  const auto colon = key.rfind(':');
  if (colon == std::string::npos) {
    auto st = db_->prepare("SELECT " + cols + " FROM bundles WHERE id = ?" + scope);
    if (!st) return st.error();
    st->bind(1, std::string_view(key));
    if (!any) st->bind(2, std::string_view(project));
    auto r = st->step();
    if (!r) return r.error();
    if (!*r) return std::optional<BundleRecord>();
    return std::optional<BundleRecord>(bundle_from(*st, with_envelope));
  }
  int64_t version = 0;
  try {
    size_t used = 0;
    version = std::stoll(key.substr(colon + 1), &used);
    if (used != key.size() - colon - 1) return std::optional<BundleRecord>();
  } catch (const std::exception&) {
    return std::optional<BundleRecord>();
  }
  const std::string_view name = std::string_view(key).substr(0, colon);
  if (any) {
    // name:version is a project's name for its bundle; across projects it
    // may name several, and guessing one would send one team's files to another's devices.
    auto n = db_->prepare("SELECT COUNT(DISTINCT project) FROM bundles WHERE name = ? AND version = ?");
    if (!n) return n.error();
    n->bind(1, name).bind(2, version);
    auto c = n->step();
    if (!c) return c.error();
    if (n->col_int(0) > 1) {
      return make_error(Errc::conflict, "bundle " + key + " exists in more than one project; use its id");
    }
  }
  auto st = db_->prepare("SELECT " + cols + " FROM bundles WHERE name = ? AND version = ?" + scope +
                         " ORDER BY uploaded_ms DESC LIMIT 1");
  if (!st) return st.error();
  st->bind(1, name).bind(2, version);
  if (!any) st->bind(3, std::string_view(project));
  auto r = st->step();
  if (!r) return r.error();
  if (!*r) return std::optional<BundleRecord>();
  return std::optional<BundleRecord>(bundle_from(*st, with_envelope));
}

// One mapping of a devices row, shared with store/aggregate_store.cpp.
std::string device_columns() { return kDeviceCols; }
std::string device_from_clause() { return kDeviceFrom; }
DeviceRecord device_row(const sql::Stmt& s) { return device_from(s); }
std::string bundle_columns() { return kBundleCols; }
BundleRecord bundle_row(const sql::Stmt& s) { return bundle_from(s, false); }

Result<std::optional<BundleRecord>> Store::find_bundle_by_digest(const std::string& project, const std::string& digest,
                                                                bool with_envelope) {
  const std::string cols = std::string(kBundleCols) + (with_envelope ? ", envelope" : "");
  auto st = db_->prepare("SELECT " + cols + " FROM bundles WHERE project = ? AND digest = ?");
  if (!st) return st.error();
  st->bind(1, std::string_view(project)).bind(2, std::string_view(digest));
  auto r = st->step();
  if (!r) return r.error();
  if (!*r) return std::optional<BundleRecord>();
  return std::optional<BundleRecord>(bundle_from(*st, with_envelope));
}

Result<std::vector<BundleRecord>> Store::list_bundles(const std::string& project) {
  if (project == "*") {
    return query<BundleRecord>(*db_, std::string("SELECT ") + kBundleCols + " FROM bundles ORDER BY uploaded_ms",
                               [](const sql::Stmt& s) { return bundle_from(s, false); });
  }
  auto st = db_->prepare(std::string("SELECT ") + kBundleCols + " FROM bundles WHERE project = ? ORDER BY uploaded_ms");
  if (!st) return st.error();
  st->bind(1, std::string_view(project));
  return st->rows<BundleRecord>([](const sql::Stmt& s) { return bundle_from(s, false); });
}

}  // namespace flotilla::hub
