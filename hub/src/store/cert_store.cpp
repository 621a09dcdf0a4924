// The store's certificate side: the broker client certificates the device
// CA issued, kept only so a decommission can put the ones still valid on the
// revocation list (docs/security.md, "Device certificates").
#include "flotilla/hub/store.hpp"

namespace flotilla::hub {

Status Store::migrate_certs() {
  return db_->exec(R"SQL(
CREATE TABLE IF NOT EXISTS device_certs (
  serial TEXT PRIMARY KEY, device_id TEXT NOT NULL, not_before INTEGER NOT NULL, not_after INTEGER NOT NULL,
  issued_ms INTEGER NOT NULL, revoked_ms INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS device_certs_device ON device_certs(device_id, issued_ms);
CREATE INDEX IF NOT EXISTS device_certs_revoked ON device_certs(not_after) WHERE revoked_ms != 0;
CREATE INDEX IF NOT EXISTS device_certs_expiry ON device_certs(not_after);
)SQL");
}

Status Store::insert_device_cert(const DeviceCertRecord& c) {
  auto st = db_->prepare(
      "INSERT INTO device_certs (serial, device_id, not_before, not_after, issued_ms, revoked_ms) "
      "VALUES (?,?,?,?,?,?)");
  if (!st) return st.error();
  st->bind(1, std::string_view(c.serial)).bind(2, std::string_view(c.device_id)).bind(3, c.not_before)
      .bind(4, c.not_after).bind(5, c.issued_ms).bind(6, c.revoked_ms);
  return st->run();
}

Result<int64_t> Store::revoke_device_certs(const std::string& device_id, int64_t now_ms) {
  auto st = db_->prepare("UPDATE device_certs SET revoked_ms = ? WHERE device_id = ? AND revoked_ms = 0");
  if (!st) return st.error();
  st->bind(1, now_ms).bind(2, std::string_view(device_id));
  if (auto s = st->run(); !s) return s.error();
  return db_->changes();
}

Result<std::vector<std::pair<std::string, int64_t>>> Store::revoked_unexpired_certs(int64_t now_unix) {
  return sql::query<std::pair<std::string, int64_t>>(
      *db_, "SELECT serial, revoked_ms FROM device_certs WHERE revoked_ms != 0 AND not_after > ? ORDER BY serial",
      [&](sql::Stmt& s) { s.bind(1, now_unix); },
      [](const sql::Stmt& s) { return std::make_pair(s.col_text(0), s.col_int(1) / 1000); });
}

Result<int64_t> Store::prune_device_certs(int64_t before_unix) {
  auto st = db_->prepare("DELETE FROM device_certs WHERE not_after < ?");
  if (!st) return st.error();
  st->bind(1, before_unix);
  if (auto s = st->run(); !s) return s.error();
  return db_->changes();
}

Result<std::vector<std::string>> Store::decommissioned_device_ids() {
  return sql::query<std::string>(*db_, "SELECT id FROM devices WHERE decommissioned != 0",
                                 [](const sql::Stmt& s) { return s.col_text(0); });
}

Status Store::set_enroll_issued_ms(const std::string& device_id, uint64_t issued_ms) {
  auto st = db_->prepare("UPDATE devices SET enroll_issued_ms = ? WHERE id = ?");
  if (!st) return st.error();
  st->bind(1, static_cast<int64_t>(issued_ms)).bind(2, std::string_view(device_id));
  return st->run();
}

Result<bool> Store::has_credential(const std::string& username) {
  auto st = db_->prepare("SELECT 1 FROM broker_credentials WHERE username = ?");
  if (!st) return st.error();
  st->bind(1, std::string_view(username));
  auto r = st->step();
  if (!r) return r.error();
  return *r;
}

}  // namespace flotilla::hub
