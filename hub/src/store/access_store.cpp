// The store's access-control side: API and enrollment token listing and
// revocation, broker credential removal, device labels and decommissioning,
// and the append-only audit log.
#include <nlohmann/json.hpp>

#include "flotilla/hub/store.hpp"

namespace flotilla::hub {

namespace {

constexpr const char* kTokenCols =
    "id, name, role, project, labels, expires_unix, max_uses, uses, created_ms, revoked, device_label_keys";

TokenRecord token_from(const sql::Stmt& s) {
  TokenRecord t;
  t.id = s.col_text(0);
  t.name = s.col_text(1);
  t.role = s.col_text(2);
  t.project = s.col_text(3);
  auto j = nlohmann::json::parse(s.col_text(4), nullptr, false);
  if (j.is_object()) t.labels = j.get<Labels>();
  t.expires_unix = s.col_int(5);
  t.max_uses = s.col_int(6);
  t.uses = s.col_int(7);
  t.created_ms = s.col_int(8);
  t.revoked = s.col_int(9) != 0;
  auto keys = nlohmann::json::parse(s.col_text(10), nullptr, false);
  if (keys.is_array()) {
    for (const auto& k : keys) if (k.is_string()) t.device_label_keys.push_back(k.get<std::string>());
  }
  return t;
}

constexpr const char* kAuditCols = "id, time_ms, actor, actor_name, role, project, method, path, detail, status, peer";

AuditRecord audit_from(const sql::Stmt& s) {
  AuditRecord a;
  a.id = s.col_int(0);
  a.time_ms = s.col_int(1);
  a.actor = s.col_text(2);
  a.actor_name = s.col_text(3);
  a.role = s.col_text(4);
  a.project = s.col_text(5);
  a.method = s.col_text(6);
  a.path = s.col_text(7);
  a.detail = s.col_text(8);
  a.status = static_cast<int>(s.col_int(9));
  a.peer = s.col_text(10);
  return a;
}

}  // namespace

Result<std::vector<TokenRecord>> Store::list_tokens(const std::string& kind) {
  auto st = db_->prepare(std::string("SELECT ") + kTokenCols + " FROM tokens WHERE kind = ? ORDER BY created_ms, id");
  if (!st) return st.error();
  st->bind(1, std::string_view(kind));
  return st->rows<TokenRecord>(token_from);
}

Result<std::optional<TokenRecord>> Store::get_token(const std::string& kind, const std::string& id) {
  auto st = db_->prepare(std::string("SELECT ") + kTokenCols + " FROM tokens WHERE kind = ? AND id = ?");
  if (!st) return st.error();
  st->bind(1, std::string_view(kind)).bind(2, std::string_view(id));
  auto r = st->step();
  if (!r) return r.error();
  if (!*r) return std::optional<TokenRecord>();
  return std::optional<TokenRecord>(token_from(*st));
}

Status Store::revoke_token(const std::string& kind, const std::string& id) {
  auto st = db_->prepare("UPDATE tokens SET revoked = 1 WHERE kind = ? AND id = ?");
  if (!st) return st.error();
  st->bind(1, std::string_view(kind)).bind(2, std::string_view(id));
  if (auto s = st->run(); !s) return s;
  if (db_->changes() != 1) return make_error(Errc::not_found, "no token '" + id + "'");
  return {};
}

Status Store::delete_credential(const std::string& username) {
  auto st = db_->prepare("DELETE FROM broker_credentials WHERE username = ?");
  if (!st) return st.error();
  st->bind(1, std::string_view(username));
  return st->run();
}

Status Store::set_device_labels(const std::string& id, const Labels& labels) {
  auto st = db_->prepare("UPDATE devices SET labels = ? WHERE id = ?");
  if (!st) return st.error();
  st->bind(1, std::string_view(nlohmann::json(labels).dump())).bind(2, std::string_view(id));
  if (auto s = st->run(); !s) return s;
  if (db_->changes() != 1) return make_error(Errc::not_found, "no device '" + id + "'");
  return {};
}

Status Store::mark_device_decommissioned(const std::string& id) {
  // The directory's column only: the report side (state, presence,
  // inventory) follows from the outbox entry this makes (follow_directory).
  auto st = db_->prepare("UPDATE devices SET decommissioned = 1 WHERE id = ?");
  if (!st) return st.error();
  st->bind(1, std::string_view(id));
  if (auto s = st->run(); !s) return s;
  if (db_->changes() != 1) return make_error(Errc::not_found, "no device '" + id + "'");
  return {};
}

Result<int64_t> Store::append_audit(const AuditRecord& a) {
  auto st = db_->prepare(
      "INSERT INTO audit_log (time_ms, actor, actor_name, role, project, method, path, detail, status, peer) "
      "VALUES (?,?,?,?,?,?,?,?,?,?)");
  if (!st) return st.error();
  st->bind(1, a.time_ms).bind(2, std::string_view(a.actor)).bind(3, std::string_view(a.actor_name))
      .bind(4, std::string_view(a.role)).bind(5, std::string_view(a.project)).bind(6, std::string_view(a.method))
      .bind(7, std::string_view(a.path)).bind(8, std::string_view(a.detail)).bind(9, static_cast<int64_t>(a.status))
      .bind(10, std::string_view(a.peer));
  if (auto s = st->run(); !s) return s.error();
  return db_->last_insert_rowid();
}

// Shared with store/aggregate_store.cpp (store/rows.hpp).
std::string audit_columns() { return kAuditCols; }
AuditRecord audit_row(const sql::Stmt& s) { return audit_from(s); }

Result<std::vector<AuditRecord>> Store::list_audit(int64_t after, int64_t limit, const std::string& project) {
  const bool all = project == "*";
  auto st = db_->prepare(std::string("SELECT ") + kAuditCols + " FROM audit_log WHERE id > ?" +
                         (all ? "" : " AND project = ?") + " ORDER BY id LIMIT ?");
  if (!st) return st.error();
  st->bind(1, after);
  if (all) {
    st->bind(2, limit);
  } else {
    st->bind(2, std::string_view(project)).bind(3, limit);
  }
  return st->rows<AuditRecord>(audit_from);
}

}  // namespace flotilla::hub
