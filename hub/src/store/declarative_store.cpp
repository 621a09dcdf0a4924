// The store's declarative side: objects applied from files (with their apply
// set and generation) and the Git repositories the hub follows.
#include <nlohmann/json.hpp>

#include "flotilla/hub/store.hpp"

namespace flotilla::hub {

namespace {

constexpr const char* kAppliedCols =
    "kind, project, name, apply_set, desired, generation, observed_generation, target, source, created_ms, "
    "updated_ms, runs";

AppliedObject applied_from(const sql::Stmt& s) {
  AppliedObject o;
  o.kind = s.col_text(0);
  o.project = s.col_text(1);
  o.name = s.col_text(2);
  o.apply_set = s.col_text(3);
  o.desired = s.col_text(4);
  o.generation = s.col_int(5);
  o.observed_generation = s.col_int(6);
  o.target = s.col_text(7);
  o.source = s.col_text(8);
  o.created_ms = s.col_int(9);
  o.updated_ms = s.col_int(10);
  o.runs = static_cast<int>(s.col_int(11));
  return o;
}

constexpr const char* kGitRepoCols =
    "name, project, url, branch, path, interval_ms, created_ms, updated_ms, sync_commit, attempt_commit, "
    "last_attempt_ms, last_success_ms, error, applied";

GitRepoRecord gitrepo_from(const sql::Stmt& s) {
  GitRepoRecord r;
  r.name = s.col_text(0);
  r.project = s.col_text(1);
  r.url = s.col_text(2);
  r.branch = s.col_text(3);
  r.path = s.col_text(4);
  r.interval_ms = s.col_int(5);
  r.created_ms = s.col_int(6);
  r.updated_ms = s.col_int(7);
  r.commit = s.col_text(8);
  r.attempt_commit = s.col_text(9);
  r.last_attempt_ms = s.col_int(10);
  r.last_success_ms = s.col_int(11);
  r.error = s.col_text(12);
  r.applied = s.col_text(13);
  return r;
}

using sql::query;

}  // namespace

Status Store::migrate_declarative() {
  return db_->exec(R"SQL(
CREATE TABLE IF NOT EXISTS applied_objects (
  kind TEXT NOT NULL, project TEXT NOT NULL, name TEXT NOT NULL, apply_set TEXT NOT NULL DEFAULT '',
  desired TEXT NOT NULL, generation INTEGER NOT NULL, observed_generation INTEGER NOT NULL,
  target TEXT NOT NULL, source TEXT NOT NULL DEFAULT '', created_ms INTEGER NOT NULL,
  updated_ms INTEGER NOT NULL, runs INTEGER NOT NULL DEFAULT 1,
  PRIMARY KEY (kind, project, name));
CREATE INDEX IF NOT EXISTS applied_objects_set ON applied_objects(apply_set);
CREATE TABLE IF NOT EXISTS gitrepos (
  name TEXT PRIMARY KEY, project TEXT NOT NULL, url TEXT NOT NULL, branch TEXT NOT NULL, path TEXT NOT NULL,
  interval_ms INTEGER NOT NULL, created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL,
  sync_commit TEXT NOT NULL DEFAULT '', attempt_commit TEXT NOT NULL DEFAULT '',
  last_attempt_ms INTEGER NOT NULL DEFAULT 0, last_success_ms INTEGER NOT NULL DEFAULT 0,
  error TEXT NOT NULL DEFAULT '', applied TEXT NOT NULL DEFAULT '[]');
)SQL");
}

Result<std::optional<AppliedObject>> Store::get_applied(const std::string& kind, const std::string& project,
                                                        const std::string& name) {
  auto rows = query<AppliedObject>(
      *db_, std::string("SELECT ") + kAppliedCols + " FROM applied_objects WHERE kind = ? AND project = ? AND name = ?",
      [&](sql::Stmt& s) {
        s.bind(1, std::string_view(kind)).bind(2, std::string_view(project)).bind(3, std::string_view(name));
      },
      applied_from);
  if (!rows) return rows.error();
  if (rows->empty()) return std::optional<AppliedObject>();
  return std::optional<AppliedObject>(rows->front());
}

Result<std::vector<AppliedObject>> Store::list_applied(const std::string& apply_set, bool all_sets) {
  return query<AppliedObject>(
      *db_,
      std::string("SELECT ") + kAppliedCols + " FROM applied_objects" + (all_sets ? "" : " WHERE apply_set = ?") +
          " ORDER BY kind, project, name",
      [&](sql::Stmt& s) {
        if (!all_sets) s.bind(1, std::string_view(apply_set));
      },
      applied_from);
}

Status Store::put_applied(const AppliedObject& o) {
  auto st = db_->prepare(std::string("INSERT INTO applied_objects (") + kAppliedCols +
                         ") VALUES (?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(kind, project, name) DO UPDATE SET "
                         "apply_set = excluded.apply_set, desired = excluded.desired, generation = excluded.generation, "
                         "observed_generation = excluded.observed_generation, target = excluded.target, "
                         "source = excluded.source, updated_ms = excluded.updated_ms, runs = excluded.runs");
  if (!st) return st.error();
  st->bind(1, std::string_view(o.kind)).bind(2, std::string_view(o.project)).bind(3, std::string_view(o.name))
      .bind(4, std::string_view(o.apply_set)).bind(5, std::string_view(o.desired)).bind(6, o.generation)
      .bind(7, o.observed_generation).bind(8, std::string_view(o.target)).bind(9, std::string_view(o.source))
      .bind(10, o.created_ms).bind(11, o.updated_ms).bind(12, static_cast<int64_t>(o.runs));
  return st->run();
}

Status Store::delete_applied(const std::string& kind, const std::string& project, const std::string& name) {
  auto st = db_->prepare("DELETE FROM applied_objects WHERE kind = ? AND project = ? AND name = ?");
  if (!st) return st.error();
  st->bind(1, std::string_view(kind)).bind(2, std::string_view(project)).bind(3, std::string_view(name));
  return st->run();
}

Status Store::update_token(const TokenRecord& t) {
  auto st = db_->prepare(
      "UPDATE tokens SET name = ?, role = ?, labels = ?, expires_unix = ?, max_uses = ? WHERE id = ?");
  if (!st) return st.error();
  st->bind(1, std::string_view(t.name)).bind(2, std::string_view(t.role))
      .bind(3, std::string_view(nlohmann::json(t.labels).dump())).bind(4, t.expires_unix).bind(5, t.max_uses)
      .bind(6, std::string_view(t.id));
  if (auto s = st->run(); !s) return s;
  if (db_->changes() != 1) return make_error(Errc::not_found, "no token '" + t.id + "'");
  return {};
}

Status Store::update_campaign_strategy(const std::string& id, const std::string& strategy_json) {
  auto st = db_->prepare("UPDATE campaigns SET strategy = ? WHERE id = ?");
  if (!st) return st.error();
  st->bind(1, std::string_view(strategy_json)).bind(2, std::string_view(id));
  return st->run();
}

Result<std::optional<GitRepoRecord>> Store::get_gitrepo(const std::string& name) {
  auto rows = query<GitRepoRecord>(
      *db_, std::string("SELECT ") + kGitRepoCols + " FROM gitrepos WHERE name = ?",
      [&](sql::Stmt& s) { s.bind(1, std::string_view(name)); }, gitrepo_from);
  if (!rows) return rows.error();
  if (rows->empty()) return std::optional<GitRepoRecord>();
  return std::optional<GitRepoRecord>(rows->front());
}

Result<std::vector<GitRepoRecord>> Store::list_gitrepos() {
  return query<GitRepoRecord>(*db_, std::string("SELECT ") + kGitRepoCols + " FROM gitrepos ORDER BY name",
                              gitrepo_from);
}

Status Store::put_gitrepo(const GitRepoRecord& r) {
  // A changed source (url, branch, path) is a new history to follow: the
  // sync state starts over. A changed interval alone keeps it.
  auto st = db_->prepare(
      std::string("INSERT INTO gitrepos (") + kGitRepoCols +
      ") VALUES (?,?,?,?,?,?,?,?,'','',0,0,'','[]') ON CONFLICT(name) DO UPDATE SET "
      "sync_commit = CASE WHEN url != excluded.url OR branch != excluded.branch OR path != excluded.path "
      "  THEN '' ELSE sync_commit END, "
      "attempt_commit = CASE WHEN url != excluded.url OR branch != excluded.branch OR path != excluded.path "
      "  THEN '' ELSE attempt_commit END, "
      "project = excluded.project, url = excluded.url, branch = excluded.branch, path = excluded.path, "
      "interval_ms = excluded.interval_ms, updated_ms = excluded.updated_ms");
  if (!st) return st.error();
  st->bind(1, std::string_view(r.name)).bind(2, std::string_view(r.project)).bind(3, std::string_view(r.url))
      .bind(4, std::string_view(r.branch)).bind(5, std::string_view(r.path)).bind(6, r.interval_ms)
      .bind(7, r.created_ms).bind(8, r.updated_ms);
  return st->run();
}

Status Store::save_gitrepo_status(const GitRepoRecord& r) {
  auto st = db_->prepare(
      "UPDATE gitrepos SET sync_commit = ?, attempt_commit = ?, last_attempt_ms = ?, last_success_ms = ?, "
      "error = ?, applied = ? WHERE name = ? AND url = ? AND branch = ? AND path = ?");
  if (!st) return st.error();
  // The source it was synced from must still be the GitRepo's: a sync that
  // raced a change of url, branch or path records nothing.
  st->bind(1, std::string_view(r.commit)).bind(2, std::string_view(r.attempt_commit)).bind(3, r.last_attempt_ms)
      .bind(4, r.last_success_ms).bind(5, std::string_view(r.error)).bind(6, std::string_view(r.applied))
      .bind(7, std::string_view(r.name)).bind(8, std::string_view(r.url)).bind(9, std::string_view(r.branch))
      .bind(10, std::string_view(r.path));
  return st->run();
}

Status Store::delete_gitrepo(const std::string& name) {
  auto st = db_->prepare("DELETE FROM gitrepos WHERE name = ?");
  if (!st) return st.error();
  st->bind(1, std::string_view(name));
  if (auto s = st->run(); !s) return s;
  if (db_->changes() != 1) return make_error(Errc::not_found, "no GitRepo '" + name + "'");
  return {};
}

Result<std::vector<CampaignDeviceRecord>> Store::campaign_failures(const std::string& campaign_id, int64_t limit) {
  return query<CampaignDeviceRecord>(
      *db_,
      "SELECT campaign_id, device_id, status, generation, updated_ms, reason, message, wave, rank, released_ms, "
      "deadline_ms, prev_bundle_id, rollback_generation FROM campaign_devices "
      "WHERE campaign_id = ? AND status IN ('failed', 'rollback_failed') ORDER BY updated_ms, device_id LIMIT ?",
      [&](sql::Stmt& s) { s.bind(1, std::string_view(campaign_id)).bind(2, limit); },
      [](const sql::Stmt& s) {
        CampaignDeviceRecord r;
        r.campaign_id = s.col_text(0);
        r.device_id = s.col_text(1);
        r.status = s.col_text(2);
        r.generation = static_cast<uint64_t>(s.col_int(3));
        r.updated_ms = s.col_int(4);
        r.reason = s.col_text(5);
        r.message = s.col_text(6);
        r.wave = static_cast<int>(s.col_int(7));
        r.rank = s.col_double(8);
        r.released_ms = s.col_int(9);
        r.deadline_ms = s.col_int(10);
        r.prev_bundle_id = s.col_text(11);
        r.rollback_generation = static_cast<uint64_t>(s.col_int(12));
        return r;
      });
}

}  // namespace flotilla::hub
