#include "flotilla/agent/disk.hpp"

#include <cerrno>
#include <cstring>
#include <sys/stat.h>
#include <unistd.h>

#include "flotilla/common/fs.hpp"

namespace flotilla::agent {

std::filesystem::path DiskFileTree::host_path(const std::string& device_path) const {
  std::string rel = device_path;
  while (!rel.empty() && rel.front() == '/') rel.erase(rel.begin());
  return root_ / rel;
}

Result<std::optional<FileData>> DiskFileTree::read(const std::string& path) {
  const auto p = host_path(path);
  auto r = fs::read_file(p);
  if (!r) {
    if (r.error().code == Errc::not_found) return std::optional<FileData>();
    return r.error();
  }
  struct stat st {};
  if (::stat(p.c_str(), &st) != 0) return make_error(Errc::io, "stat " + p.string() + ": " + std::strerror(errno));
  return std::optional<FileData>(FileData{std::move(*r), static_cast<unsigned>(st.st_mode & 07777)});
}

Status DiskFileTree::write_atomic(const std::string& path, const std::string& content, unsigned mode) {
  auto p = host_path(path);
  if (auto s = fs::ensure_dir(p.parent_path()); !s) return s;
  return fs::write_file_atomic(p, content, mode);
}

Status DiskFileTree::remove(const std::string& path) {
  auto p = host_path(path);
  if (::unlink(p.c_str()) != 0 && errno != ENOENT) {
    return make_error(Errc::io, "remove " + p.string() + ": " + std::strerror(errno));
  }
  return fs::fsync_dir(p.parent_path()).ok() ? Status{} : Status{};
}

Result<uint64_t> DiskFileTree::free_bytes(const std::string& path) {
  auto p = host_path(path);
  while (!std::filesystem::exists(p) && p.has_parent_path() && p != p.parent_path()) p = p.parent_path();
  return fs::free_bytes(p);
}

Result<std::unique_ptr<SqliteStateStore>> SqliteStateStore::open(const std::string& path) {
  auto db = sql::Db::open(path);
  if (!db) return db.error();
  std::unique_ptr<SqliteStateStore> s(new SqliteStateStore(std::move(*db)));
  auto st = s->db_->exec(R"SQL(
CREATE TABLE IF NOT EXISTS applied (
  id INTEGER PRIMARY KEY CHECK (id = 1), bundle_name TEXT NOT NULL, channel TEXT NOT NULL,
  version INTEGER NOT NULL, manifest_sha256 TEXT NOT NULL, generation INTEGER NOT NULL,
  campaign_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS placed_files (path TEXT PRIMARY KEY, sha256 TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS highest_version (channel TEXT PRIMARY KEY, version INTEGER NOT NULL);
)SQL");
  if (!st) return st.error().with_context("agent state " + path);
  return s;
}

Result<AppliedState> SqliteStateStore::load() {
  AppliedState a;
  auto st = db_->prepare(
      "SELECT bundle_name, channel, version, manifest_sha256, generation, campaign_id FROM applied WHERE id = 1");
  if (!st) return st.error();
  auto r = st->step();
  if (!r) return r.error();
  if (*r) {
    a.bundle_name = st->col_text(0);
    a.channel = st->col_text(1);
    a.version = static_cast<uint64_t>(st->col_int(2));
    a.manifest_sha256_hex = st->col_text(3);
    a.generation = static_cast<uint64_t>(st->col_int(4));
    a.campaign_id = st->col_text(5);
  }
  auto fst = db_->prepare("SELECT path, sha256 FROM placed_files ORDER BY path");
  if (!fst) return fst.error();
  for (;;) {
    auto fr = fst->step();
    if (!fr) return fr.error();
    if (!*fr) break;
    a.files.push_back({fst->col_text(0), fst->col_text(1)});
  }
  auto hst = db_->prepare("SELECT channel, version FROM highest_version");
  if (!hst) return hst.error();
  for (;;) {
    auto hr = hst->step();
    if (!hr) return hr.error();
    if (!*hr) break;
    a.highest_version[hst->col_text(0)] = static_cast<uint64_t>(hst->col_int(1));
  }
  return a;
}

Status SqliteStateStore::save(const AppliedState& a) {
  sql::Transaction tx(*db_);
  if (!tx.ok()) return make_error(Errc::unavailable, "agent state: cannot begin transaction", true);
  auto st = db_->prepare(
      "INSERT OR REPLACE INTO applied (id, bundle_name, channel, version, manifest_sha256, generation, campaign_id) "
      "VALUES (1,?,?,?,?,?,?)");
  if (!st) return st.error();
  st->bind(1, std::string_view(a.bundle_name)).bind(2, std::string_view(a.channel))
      .bind(3, static_cast<int64_t>(a.version)).bind(4, std::string_view(a.manifest_sha256_hex))
      .bind(5, static_cast<int64_t>(a.generation)).bind(6, std::string_view(a.campaign_id));
  if (auto s = st->run(); !s) return s;
  if (auto s = db_->exec("DELETE FROM placed_files"); !s) return s;
  auto ins = db_->prepare("INSERT INTO placed_files (path, sha256) VALUES (?, ?)");
  if (!ins) return ins.error();
  for (const auto& f : a.files) {
    ins->reset();
    ins->bind(1, std::string_view(f.path)).bind(2, std::string_view(f.sha256_hex));
    if (auto s = ins->run(); !s) return s;
  }
  auto hv = db_->prepare(
      "INSERT INTO highest_version (channel, version) VALUES (?, ?) "
      "ON CONFLICT(channel) DO UPDATE SET version = MAX(version, excluded.version)");
  if (!hv) return hv.error();
  for (const auto& [ch, v] : a.highest_version) {
    hv->reset();
    hv->bind(1, std::string_view(ch)).bind(2, static_cast<int64_t>(v));
    if (auto s = hv->run(); !s) return s;
  }
  return tx.commit();
}

}  // namespace flotilla::agent
