#include "flotilla/common/sqlite.hpp"

#include <sqlite3.h>

#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace flotilla::sql {

namespace {
Error db_error(sqlite3* db, std::string_view what) {
  const int code = sqlite3_errcode(db);
  Errc errc = Errc::io;
  if (code == SQLITE_CONSTRAINT) errc = Errc::conflict;
  if (code == SQLITE_BUSY || code == SQLITE_LOCKED) errc = Errc::unavailable;
  if (code == SQLITE_FULL) errc = Errc::io;
  return make_error(errc, std::string(what) + ": " + sqlite3_errmsg(db),
                    code == SQLITE_BUSY || code == SQLITE_LOCKED);
}

// Prepared statements are kept after use and handed out again for the same
// SQL text: preparing (parsing, planning) cost more than running the hub's
// per-report statements (flotilla-sim profile, docs/scale.md). Bounded per
// connection; dropped when the connection closes.
struct StmtCache {
  std::mutex mu;
  std::unordered_map<sqlite3*, std::unordered_map<std::string, std::vector<sqlite3_stmt*>>> idle;
};
StmtCache& stmt_cache() {
  static StmtCache* c = new StmtCache();  // outlives every Db, even at exit
  return *c;
}
constexpr size_t kMaxCachedSql = 256;  // distinct statements per connection
constexpr size_t kMaxIdlePerSql = 4;

sqlite3_stmt* take_cached(sqlite3* db, std::string_view sql) {
  auto& c = stmt_cache();
  std::lock_guard lock(c.mu);
  auto per_db = c.idle.find(db);
  if (per_db == c.idle.end()) return nullptr;
  auto it = per_db->second.find(std::string(sql));
  if (it == per_db->second.end() || it->second.empty()) return nullptr;
  sqlite3_stmt* s = it->second.back();
  it->second.pop_back();
  return s;
}

void release(sqlite3_stmt* s) {
  if (!s) return;
  sqlite3_reset(s);
  sqlite3_clear_bindings(s);
  const char* text = sqlite3_sql(s);
  if (text) {
    auto& c = stmt_cache();
    std::lock_guard lock(c.mu);
    auto& per_db = c.idle[sqlite3_db_handle(s)];
    auto it = per_db.find(text);
    if (it == per_db.end() && per_db.size() < kMaxCachedSql) it = per_db.emplace(text, std::vector<sqlite3_stmt*>()).first;
    if (it != per_db.end() && it->second.size() < kMaxIdlePerSql) {
      it->second.push_back(s);
      return;
    }
  }
  sqlite3_finalize(s);
}

void drop_cached(sqlite3* db) {
  auto& c = stmt_cache();
  std::lock_guard lock(c.mu);
  auto per_db = c.idle.find(db);
  if (per_db == c.idle.end()) return;
  for (auto& [sql, stmts] : per_db->second) {
    for (auto* s : stmts) sqlite3_finalize(s);
  }
  c.idle.erase(per_db);
}
}  // namespace

Stmt::Stmt(Stmt&& o) noexcept : db_(o.db_), stmt_(o.stmt_) { o.stmt_ = nullptr; }
Stmt& Stmt::operator=(Stmt&& o) noexcept {
  if (this != &o) {
    release(stmt_);
    db_ = o.db_;
    stmt_ = o.stmt_;
    o.stmt_ = nullptr;
  }
  return *this;
}
Stmt::~Stmt() { release(stmt_); }

Stmt& Stmt::bind(int i, int64_t v) {
  sqlite3_bind_int64(stmt_, i, v);
  return *this;
}
Stmt& Stmt::bind(int i, std::string_view v) {
  sqlite3_bind_text(stmt_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
  return *this;
}
Stmt& Stmt::bind_blob(int i, std::string_view v) {
  sqlite3_bind_blob(stmt_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
  return *this;
}
Stmt& Stmt::bind_double(int i, double v) {
  sqlite3_bind_double(stmt_, i, v);
  return *this;
}
Stmt& Stmt::bind_null(int i) {
  sqlite3_bind_null(stmt_, i);
  return *this;
}

Result<bool> Stmt::step() {
  const int rc = sqlite3_step(stmt_);
  if (rc == SQLITE_ROW) return true;
  if (rc == SQLITE_DONE) return false;
  return db_error(db_, "step");
}

Status Stmt::run() {
  for (;;) {
    auto r = step();
    if (!r) return r.error();
    if (!*r) return {};
  }
}

void Stmt::reset() {
  sqlite3_reset(stmt_);
  sqlite3_clear_bindings(stmt_);
}

int64_t Stmt::col_int(int i) const { return sqlite3_column_int64(stmt_, i); }
double Stmt::col_double(int i) const { return sqlite3_column_double(stmt_, i); }
std::string Stmt::col_text(int i) const {
  const auto* p = sqlite3_column_text(stmt_, i);
  return p ? std::string(reinterpret_cast<const char*>(p),
                         static_cast<size_t>(sqlite3_column_bytes(stmt_, i)))
           : std::string();
}
std::string Stmt::col_blob(int i) const {
  const void* p = sqlite3_column_blob(stmt_, i);
  return p ? std::string(static_cast<const char*>(p),
                         static_cast<size_t>(sqlite3_column_bytes(stmt_, i)))
           : std::string();
}
bool Stmt::col_is_null(int i) const { return sqlite3_column_type(stmt_, i) == SQLITE_NULL; }

Result<std::unique_ptr<Db>> Db::open(const std::string& path) {
  sqlite3* raw = nullptr;
  const int rc = sqlite3_open_v2(path.c_str(), &raw,
                                 SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX,
                                 nullptr);
  if (rc != SQLITE_OK) {
    Error e = make_error(Errc::io, "open database " + path + ": " +
                                       (raw ? sqlite3_errmsg(raw) : "out of memory"));
    sqlite3_close(raw);
    return e;
  }
  std::unique_ptr<Db> db(new Db(raw));
  sqlite3_busy_timeout(raw, 5000);
  if (auto s = db->exec("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;");
      !s) {
    return s.error().with_context("open database " + path);
  }
  return db;
}

Db::~Db() {
  drop_cached(db_);
  sqlite3_close(db_);
}

Status Db::exec(std::string_view sql) {
  char* msg = nullptr;
  const std::string s(sql);
  if (sqlite3_exec(db_, s.c_str(), nullptr, nullptr, &msg) != SQLITE_OK) {
    Error e = db_error(db_, "exec");
    sqlite3_free(msg);
    return e;
  }
  return {};
}

Result<Stmt> Db::prepare(std::string_view sql) {
  if (sqlite3_stmt* cached = take_cached(db_, sql)) return Stmt(db_, cached);
  sqlite3_stmt* s = nullptr;
  if (sqlite3_prepare_v2(db_, sql.data(), static_cast<int>(sql.size()), &s, nullptr) != SQLITE_OK) {
    return db_error(db_, "prepare");
  }
  return Stmt(db_, s);
}

int64_t Db::changes() const { return sqlite3_changes(db_); }
int64_t Db::last_insert_rowid() const { return sqlite3_last_insert_rowid(db_); }

// Inside an open transaction a Transaction is a savepoint: its commit
// releases into the outer one and its rollback undoes only its own work, so
// an operation that commits on its own (creating a campaign) also composes
// into a larger all-or-nothing change (a declarative apply).
Transaction::Transaction(Db& db) : db_(db) {
  nested_ = sqlite3_get_autocommit(db_.raw()) == 0;
  began_ = db_.exec(nested_ ? "SAVEPOINT flotilla_tx" : "BEGIN IMMEDIATE").ok();
}
Transaction::~Transaction() {
  if (!began_ || done_) return;
  if (nested_) {
    (void)db_.exec("ROLLBACK TO flotilla_tx");
    (void)db_.exec("RELEASE flotilla_tx");
  } else {
    (void)db_.exec("ROLLBACK");
  }
}
Status Transaction::commit() {
  if (!began_) return make_error(Errc::internal, "transaction did not begin");
  // A COMMIT that fails (a deferred foreign key, a full disk) can leave the
  // transaction open: it is rolled back when this goes out of scope, so a
  // failed commit never leaves the connection inside a transaction.
  auto s = db_.exec(nested_ ? "RELEASE flotilla_tx" : "COMMIT");
  if (s || (!nested_ && sqlite3_get_autocommit(db_.raw()) != 0)) done_ = true;
  return s;
}

}  // namespace flotilla::sql
