// Checkpointer (issue 17, the report path's store lock): WAL checkpoints run
// on a thread of their own instead of inside the commit that passed the
// threshold. What must hold, over a real SQLite file: the committing
// connection no longer checkpoints (the background thread does), the WAL
// stays bounded even when the thread cannot keep up, every committed row is
// there after a reopen, and the hub's store runs one.
#include <catch2/catch.hpp>

#include <chrono>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>

#include "flotilla/common/sqlite.hpp"
#include "flotilla/hub/checkpointer.hpp"
#include "flotilla/hub/store.hpp"
#include "tests/support/temp_dir.hpp"

namespace {

using flotilla::test::TempDir;
namespace sql = flotilla::sql;
using flotilla::hub::Checkpointer;

// Commits n transactions of rows big enough to dirty a page or more each.
void write_rows(sql::Db& db, int from, int n) {
  const std::string pad(3000, 'x');
  for (int i = from; i < from + n; ++i) {
    sql::Transaction tx(db);
    REQUIRE(tx.ok());
    auto st = db.prepare("INSERT INTO t (v, pad) VALUES (?, ?)");
    REQUIRE(st);
    st->bind(1, static_cast<int64_t>(i)).bind(2, std::string_view(pad));
    REQUIRE(st->run());
    REQUIRE(tx.commit());
  }
}

int64_t count_rows(const std::string& path) {
  auto db = sql::Db::open(path);
  REQUIRE(db);
  auto st = (*db)->prepare("SELECT COUNT(*), COUNT(DISTINCT v) FROM t");
  REQUIRE(st);
  auto row = st->step();
  REQUIRE(row);
  REQUIRE(*row);
  REQUIRE(st->col_int(0) == st->col_int(1));  // nothing doubled
  return st->col_int(0);
}

template <typename F>
bool eventually(F f) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (std::chrono::steady_clock::now() < deadline) {
    if (f()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return f();
}

}  // namespace

TEST_CASE("checkpointer: the background thread checkpoints, the WAL stays bounded, nothing is lost", "[unit]") {
  TempDir dir;
  const std::string path = (dir.path() / "c.db").string();
  {
    auto db = sql::Db::open(path);
    REQUIRE(db);
    REQUIRE((*db)->exec("CREATE TABLE t (v INTEGER PRIMARY KEY, pad TEXT NOT NULL)"));
    Checkpointer::Options opts;
    opts.start_pages = 50;
    opts.hard_cap_pages = 400;
    auto c = Checkpointer::start(**db, path, opts);
    REQUIRE(c);
    write_rows(**db, 0, 200);
    // Past start_pages: the thread was asked, and it ran.
    REQUIRE(eventually([&] { return (*c)->background_checkpoints() > 0; }));
    // The writer never went past the cap between checkpoints, and the log
    // started over after the thread's checkpoints (with the tails the
    // writer copied), not only at the cap.
    write_rows(**db, 200, 1000);
    CHECK((*c)->wal_pages() <= opts.hard_cap_pages);
    CHECK((*c)->tail_checkpoints() > 0);
    const auto wal = std::filesystem::path(path + "-wal");
    // Bounded by the cap (pages of 4 KiB plus frame headers), not by the
    // 1,200 transactions written.
    CHECK(std::filesystem::file_size(wal) <= static_cast<uintmax_t>(opts.hard_cap_pages + 50) * 4200);
  }
  // Reopened (the WAL replayed or checkpointed): every committed row, once.
  CHECK(count_rows(path) == 1200);
}

TEST_CASE("checkpointer: a reader holding the log makes the writer checkpoint at the cap, as SQLite would", "[unit]") {
  TempDir dir;
  const std::string path = (dir.path() / "c.db").string();
  auto db = sql::Db::open(path);
  REQUIRE(db);
  REQUIRE((*db)->exec("CREATE TABLE t (v INTEGER PRIMARY KEY, pad TEXT NOT NULL)"));
  Checkpointer::Options opts;
  opts.start_pages = 20;
  opts.hard_cap_pages = 60;
  auto c = Checkpointer::start(**db, path, opts);
  REQUIRE(c);
  write_rows(**db, 0, 10);
  {
    // A reader's snapshot: no checkpoint gets past it, so the log grows.
    auto reader = sql::Db::open(path);
    REQUIRE(reader);
    REQUIRE((*reader)->exec("BEGIN"));
    {
      auto st = (*reader)->prepare("SELECT COUNT(*) FROM t");
      REQUIRE(st);
      REQUIRE(st->step());
      CHECK(st->col_int(0) == 10);
    }
    write_rows(**db, 10, 100);
    REQUIRE((*reader)->exec("COMMIT"));
  }
  // Past the cap the committing connection checkpointed itself.
  CHECK((*c)->inline_checkpoints() > 0);
  CHECK(count_rows(path) == 110);
  auto bad = Checkpointer::start(**db, path, Checkpointer::Options{10, 5});
  REQUIRE_FALSE(bad);
  CHECK(bad.error().code == flotilla::Errc::invalid_argument);
}

TEST_CASE("checkpointer: the hub's store runs one on its file, none in memory", "[unit]") {
  TempDir dir;
  auto s = flotilla::hub::Store::open((dir.path() / "hub.db").string());
  REQUIRE(s);
  CHECK((*s)->checkpointer() != nullptr);
  auto m = flotilla::hub::Store::open(":memory:");
  REQUIRE(m);
  CHECK((*m)->checkpointer() == nullptr);
}
