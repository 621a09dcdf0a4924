#pragma once
// A small RAII layer over the SQLite C API. Errors become Result values;
// nothing here throws.
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "flotilla/common/result.hpp"

struct sqlite3;
struct sqlite3_stmt;

namespace flotilla::sql {

class Stmt {
 public:
  Stmt() = default;
  Stmt(sqlite3* db, sqlite3_stmt* s) : db_(db), stmt_(s) {}
  Stmt(Stmt&& o) noexcept;
  Stmt& operator=(Stmt&& o) noexcept;
  Stmt(const Stmt&) = delete;
  Stmt& operator=(const Stmt&) = delete;
  ~Stmt();

  // Bind by 1-based index. Chainable.
  Stmt& bind(int i, int64_t v);
  Stmt& bind(int i, std::string_view v);
  Stmt& bind_blob(int i, std::string_view v);
  Stmt& bind_null(int i);
  Stmt& bind_double(int i, double v);
  Stmt& bind(int i, const std::optional<std::string>& v) {
    return v ? bind(i, std::string_view(*v)) : bind_null(i);
  }

  // true = a row is ready, false = done.
  Result<bool> step();
  // Runs to completion (for INSERT/UPDATE/DELETE).
  Status run();
  // Steps through every remaining row, calling f(*this) on each.
  template <class F>
  Status each(F&& f) {
    for (;;) {
      auto r = step();
      if (!r) return r.error();
      if (!*r) return {};
      f(static_cast<const Stmt&>(*this));
    }
  }
  // One T per remaining row, made by row(*this).
  template <class T, class F>
  Result<std::vector<T>> rows(F&& row) {
    std::vector<T> out;
    if (auto s = each([&](const Stmt& st) { out.push_back(row(st)); }); !s) return s.error();
    return out;
  }
  void reset();

  int64_t col_int(int i) const;
  double col_double(int i) const;
  std::string col_text(int i) const;
  std::string col_blob(int i) const;
  bool col_is_null(int i) const;

 private:
  sqlite3* db_ = nullptr;
  sqlite3_stmt* stmt_ = nullptr;
};

class Db {
 public:
  // Opens (creating if needed) with WAL journaling, foreign keys and a busy timeout.
  static Result<std::unique_ptr<Db>> open(const std::string& path);
  ~Db();
  Db(const Db&) = delete;
  Db& operator=(const Db&) = delete;

  Status exec(std::string_view sql);
  Result<Stmt> prepare(std::string_view sql);
  int64_t changes() const;
  int64_t last_insert_rowid() const;
  sqlite3* raw() { return db_; }

 private:
  explicit Db(sqlite3* db) : db_(db) {}
  sqlite3* db_;
};

// Prepares text, lets bind(stmt) set its parameters and returns one T per
// row, made by row(stmt).
template <class T, class B, class F>
Result<std::vector<T>> query(Db& db, std::string_view text, B&& bind, F&& row) {
  auto st = db.prepare(text);
  if (!st) return st.error();
  bind(*st);
  return st->template rows<T>(std::forward<F>(row));
}

// The same for a statement without parameters.
template <class T, class F>
Result<std::vector<T>> query(Db& db, std::string_view text, F&& row) {
  return query<T>(db, text, [](Stmt&) {}, std::forward<F>(row));
}

// BEGIN IMMEDIATE ... COMMIT, rolled back on destruction unless committed.
// Within another transaction it is a SAVEPOINT (released on commit).
class Transaction {
 public:
  explicit Transaction(Db& db);
  ~Transaction();
  Status commit();
  bool ok() const { return began_; }

 private:
  Db& db_;
  bool began_ = false;
  bool done_ = false;
  bool nested_ = false;
};

}  // namespace flotilla::sql
