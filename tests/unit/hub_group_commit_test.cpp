// GroupCommit (the enrollment rate, issue 16): work queued while a batch is
// committing goes into the next transaction together, each piece in its own
// savepoint, over a real SQLite database. What must hold: one commit for all
// that queued, a failing piece leaves none of its writes while the others
// keep theirs, and nobody hears back before its writes are visible to
// another connection.
#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "flotilla/common/sqlite.hpp"
#include "flotilla/hub/group_commit.hpp"
#include "tests/support/temp_dir.hpp"

namespace {

using flotilla::Errc;
using flotilla::Status;
using flotilla::test::TempDir;
namespace sql = flotilla::sql;

// Through a connection of its own: what is committed, nothing else. No
// REQUIRE here: it runs on the test's threads too.
bool has_row(const std::string& path, int v) {
  auto db = sql::Db::open(path);
  if (!db) return false;
  auto st = (*db)->prepare("SELECT COUNT(*) FROM t WHERE v = ?");
  if (!st) return false;
  st->bind(1, static_cast<int64_t>(v));
  auto row = st->step();
  return row && *row && st->col_int(0) == 1;
}

}  // namespace

TEST_CASE("group commit: queued work shares one commit and a failing piece leaves nothing of itself", "[unit]") {
  TempDir dir;
  const std::string path = (dir.path() / "g.db").string();
  auto db = sql::Db::open(path);
  REQUIRE(db);
  REQUIRE((*db)->exec("CREATE TABLE t (v INTEGER NOT NULL)"));
  flotilla::hub::StoreMutex mu;
  flotilla::hub::GroupCommit gc(mu, **db);
  auto insert = [&](int v) -> Status {
    auto st = (*db)->prepare("INSERT INTO t (v) VALUES (?)");
    if (!st) return st.error();
    st->bind(1, static_cast<int64_t>(v));
    auto r = st->step();
    if (!r) return r.error();
    return {};
  };

  constexpr int kOthers = 7;
  constexpr int kFailing = 3;
  std::atomic<bool> first_inside{false};
  std::vector<Status> results(kOthers + 1);
  std::vector<bool> visible_on_return(kOthers + 1, false);
  // The first piece holds its batch open until all the others have queued,
  // so they must all go into the second batch.
  std::thread first([&] {
    results[0] = gc.run([&]() -> Status {
      if (auto s = insert(0); !s) return s;
      first_inside = true;
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
      while (gc.queued() < static_cast<size_t>(kOthers) && std::chrono::steady_clock::now() < deadline) {
        std::this_thread::yield();
      }
      return {};
    });
    visible_on_return[0] = has_row(path, 0);
  });
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (!first_inside && std::chrono::steady_clock::now() < deadline) std::this_thread::yield();
  REQUIRE(first_inside);
  std::vector<std::thread> others;
  for (int i = 1; i <= kOthers; ++i) {
    others.emplace_back([&, i] {
      results[i] = gc.run([&, i]() -> Status {
        if (auto s = insert(i); !s) return s;
        // Written, then refused: its row must go with it.
        if (i == kFailing) return flotilla::make_error(Errc::conflict, "piece 3 is refused");
        return {};
      });
      if (i != kFailing) visible_on_return[i] = has_row(path, i);
    });
  }
  first.join();
  for (auto& t : others) t.join();

  for (int i = 0; i <= kOthers; ++i) {
    INFO("piece " << i);
    if (i == kFailing) {
      REQUIRE_FALSE(results[i]);
      CHECK(results[i].error().message == "piece 3 is refused");
      CHECK_FALSE(has_row(path, i));
    } else {
      CHECK(results[i]);
      CHECK(visible_on_return[i]);
    }
  }
  auto count = (*db)->prepare("SELECT COUNT(*) FROM t");
  REQUIRE(count);
  REQUIRE(*count->step());
  CHECK(count->col_int(0) == kOthers);  // 0..7 but 3
  CHECK(gc.runs() == kOthers + 1);
  CHECK(gc.commits() == 2);  // the first alone, then all seven others together
}
