#include <nlohmann/json.hpp>

#include "flotilla/hub/store.hpp"

namespace flotilla::hub {

namespace {

std::string labels_json(const Labels& l) { return nlohmann::json(l).dump(); }
Labels labels_from(const std::string& s) {
  if (s.empty()) return {};
  auto j = nlohmann::json::parse(s, nullptr, false);
  if (!j.is_object()) return {};
  return j.get<Labels>();
}

constexpr const char* kDeviceCols =
    "id, project, labels, public_key, hostname, arch, agent_version, enrolled_ms, last_seen_ms, online, "
    "state, applied_bundle, applied_version, k3s_version, node_ready, last_reason, last_message, last_seq, "
    "generation, desired_bundle_id, campaign_id, gateway";

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

Result<std::unique_ptr<Store>> Store::open(const std::string& path, const StoreTuning& tuning) {
  auto db = sql::Db::open(path);
  if (!db) return db.error();
  std::unique_ptr<Store> s(new Store(std::move(*db)));
  // A negative cache_size is in KiB (see StoreTuning).
  if (auto c = s->db_->exec("PRAGMA cache_size = -" + std::to_string(std::max<int64_t>(1, tuning.cache_mib) * 1024));
      !c) {
    return c.error();
  }
  if (auto m = s->db_->exec("PRAGMA mmap_size = " + std::to_string(std::max<int64_t>(0, tuning.mmap_mib) << 20)); !m) {
    return m.error();
  }
  if (auto m = s->migrate(); !m) return m.error().with_context("migrate " + path);
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
  id TEXT PRIMARY KEY, digest TEXT NOT NULL UNIQUE, name TEXT NOT NULL, channel TEXT NOT NULL,
  version INTEGER NOT NULL, expires_unix INTEGER NOT NULL, signatures INTEGER NOT NULL,
  uploaded_ms INTEGER NOT NULL, envelope BLOB NOT NULL, project TEXT NOT NULL DEFAULT 'default');
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
  if (auto s = migrate_campaigns(); !s) return s;
  return migrate_aggregates();
}

Status Store::insert_token(const std::string& kind, const TokenRecord& t, const std::string& secret_hash) {
  auto st = db_->prepare(
      "INSERT INTO tokens (id, kind, secret_hash, name, role, project, labels, expires_unix, max_uses, uses, "
      "created_ms) VALUES (?,?,?,?,?,?,?,?,?,0,?)");
  if (!st) return st.error();
  st->bind(1, std::string_view(t.id)).bind(2, std::string_view(kind)).bind(3, std::string_view(secret_hash))
      .bind(4, std::string_view(t.name)).bind(5, std::string_view(t.role)).bind(6, std::string_view(t.project))
      .bind(7, std::string_view(labels_json(t.labels))).bind(8, t.expires_unix).bind(9, t.max_uses)
      .bind(10, t.created_ms);
  return st->run();
}

Result<std::optional<TokenRecord>> Store::find_token(const std::string& kind, const std::string& secret_hash) {
  auto st = db_->prepare(
      "SELECT id, name, role, project, labels, expires_unix, max_uses, uses, created_ms, revoked FROM tokens "
      "WHERE kind = ? AND secret_hash = ?");
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
      "INSERT INTO devices (id, project, labels, public_key, hostname, arch, agent_version, enrolled_ms, gateway) "
      "VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET project = excluded.project, "
      "labels = excluded.labels, hostname = excluded.hostname, arch = excluded.arch, "
      "agent_version = excluded.agent_version, enrolled_ms = excluded.enrolled_ms, gateway = excluded.gateway");
  if (!st) return st.error();
  st->bind(1, std::string_view(d.id)).bind(2, std::string_view(d.project))
      .bind(3, std::string_view(labels_json(d.labels))).bind(4, std::string_view(d.public_key_hex))
      .bind(5, std::string_view(d.hostname)).bind(6, std::string_view(d.arch))
      .bind(7, std::string_view(d.agent_version)).bind(8, d.enrolled_ms).bind(9, std::string_view(d.gateway));
  return st->run();
}

Result<std::optional<DeviceRecord>> Store::get_device(const std::string& id) {
  auto st = db_->prepare(std::string("SELECT ") + kDeviceCols + " FROM devices WHERE id = ?");
  if (!st) return st.error();
  st->bind(1, std::string_view(id));
  auto r = st->step();
  if (!r) return r.error();
  if (!*r) return std::optional<DeviceRecord>();
  return std::optional<DeviceRecord>(device_from(*st));
}

Result<std::vector<DeviceRecord>> Store::list_devices() {
  return query<DeviceRecord>(*db_, std::string("SELECT ") + kDeviceCols + " FROM devices ORDER BY id",
                               device_from);
}

Status Store::each_device_target(
    const std::function<void(const std::string&, const std::string&, const std::string&, const Labels&)>& f) {
  auto st = db_->prepare("SELECT id, project, state, labels FROM devices ORDER BY id");
  if (!st) return st.error();
  return st->each([&](const sql::Stmt& s) { f(s.col_text(0), s.col_text(1), s.col_text(2), labels_from(s.col_text(3))); });
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

Result<std::optional<BundleRecord>> Store::get_bundle(const std::string& key, bool with_envelope) {
  std::string cols = std::string(kBundleCols) + (with_envelope ? ", envelope" : "");
  auto colon = key.rfind(':');
  Result<sql::Stmt> st = colon == std::string::npos
      ? db_->prepare("SELECT " + cols + " FROM bundles WHERE id = ?")
      : db_->prepare("SELECT " + cols + " FROM bundles WHERE name = ? AND version = ? ORDER BY uploaded_ms DESC LIMIT 1");
  if (!st) return st.error();
  if (colon == std::string::npos) {
    st->bind(1, std::string_view(key));
  } else {
    int64_t version = 0;
    try {
      version = std::stoll(key.substr(colon + 1));
    } catch (const std::exception&) {
      return std::optional<BundleRecord>();
    }
    st->bind(1, std::string_view(key).substr(0, colon)).bind(2, version);
  }
  auto r = st->step();
  if (!r) return r.error();
  if (!*r) return std::optional<BundleRecord>();
  return std::optional<BundleRecord>(bundle_from(*st, with_envelope));
}

// One mapping of a devices row, shared with store/aggregate_store.cpp.
std::string device_columns() { return kDeviceCols; }
DeviceRecord device_row(const sql::Stmt& s) { return device_from(s); }
std::string bundle_columns() { return kBundleCols; }
BundleRecord bundle_row(const sql::Stmt& s) { return bundle_from(s, false); }

Result<std::vector<BundleRecord>> Store::list_bundles() {
  return query<BundleRecord>(*db_, std::string("SELECT ") + kBundleCols + " FROM bundles ORDER BY uploaded_ms",
                               [](const sql::Stmt& s) { return bundle_from(s, false); });
}

}  // namespace flotilla::hub
