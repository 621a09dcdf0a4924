// [unit] Coordination on the embedded SQLite backend: the shared contract
// (tests/support/coord_contract.hpp, run on a real etcd cluster by
// tests/integration/hub_etcd_test.cpp), with lease expiry driven by a fake
// clock; plus what only this backend has (a file that survives a restart,
// bounded history) and the hub's coordination settings.
#include <catch2/catch.hpp>

#include <string>
#include <thread>
#include <vector>

#include "flotilla/common/clock.hpp"
#include "flotilla/hub/app.hpp"
#include "flotilla/hub/coord.hpp"
#include "tests/support/coord_contract.hpp"
#include "tests/support/temp_dir.hpp"

using namespace flotilla;
namespace co = flotilla::hub::coord;
namespace contract = flotilla::test::coord_contract;

namespace {

struct SqliteFixture {
  test::TempDir tmp{"coord"};
  FakeClock clock;
  std::unique_ptr<co::Coordinator> c;
  explicit SqliteFixture(int64_t history = 100000) {
    auto r = co::open_sqlite_coordinator({(tmp.path() / "coord.db").string(), history}, clock);
    REQUIRE(r.ok());
    c = std::move(*r);
  }
  // A lease runs out when the clock passes its TTL.
  contract::ExpireFn expire() {
    return [this](co::Coordinator& cc, co::LeaseId id) {
      auto ttl = cc.lease_ttl(id);
      REQUIRE(ttl.ok());
      clock.advance(std::chrono::seconds(ttl->count() + 1));
    };
  }
};

Result<co::CoordinationConfig> config(std::vector<std::string> args) {
  Options o("flotilla-hub", "", "FLOTILLA_HUB_TEST_UNSET_");
  hub::add_hub_options(o);
  std::vector<std::string> argv = {"flotilla-hub", "--config", ""};
  argv.insert(argv.end(), args.begin(), args.end());
  std::vector<char*> cargv;
  for (auto& a : argv) cargv.push_back(a.data());
  REQUIRE(o.parse(static_cast<int>(cargv.size()), cargv.data()));
  return co::coordination_config_from(o);
}

}  // namespace

TEST_CASE("coord sqlite: compare-and-swap on a stale mod revision is a conflict and writes nothing", "[unit][coord]") {
  SqliteFixture f;
  contract::cas_conflict(*f.c, "/t/");
}

TEST_CASE("coord sqlite: create-if-absent twice keeps the first value", "[unit][coord]") {
  SqliteFixture f;
  contract::create_twice(*f.c, "/t/");
}

TEST_CASE("coord sqlite: range by prefix is ordered and bounded, oversized input is refused", "[unit][coord]") {
  SqliteFixture f;
  contract::range_and_bounds(*f.c, "/t/");
}

TEST_CASE("coord sqlite: an expired lease removes its keys and is gone for keep-alive", "[unit][coord]") {
  SqliteFixture f;
  contract::lease_expiry(*f.c, "/t/", f.expire());
}

TEST_CASE("coord sqlite: a watch sees every event in order and resumes from a revision", "[unit][coord]") {
  SqliteFixture f;
  contract::watch_in_order_and_resume(*f.c, "/t/");
}

TEST_CASE("coord sqlite: a stale fence is refused after the cell changed hands", "[unit][coord]") {
  SqliteFixture f;
  contract::stale_fence_refused(*f.c, "/t/", f.expire());
}

TEST_CASE("coord sqlite: an unrenewed lease expires by the clock, a renewed one does not", "[unit][coord]") {
  SqliteFixture f;
  co::CellOwnership a(*f.c, "hub-a", std::chrono::seconds(9), f.clock);
  co::CellOwnership b(*f.c, "hub-b", std::chrono::seconds(9), f.clock);
  REQUIRE(a.start().ok());
  REQUIRE(b.start().ok());
  auto taken = a.claim_unowned({"1", "2"});
  REQUIRE(taken.ok());
  CHECK(taken->size() == 2);
  auto none = b.claim_unowned({"1", "2", "3"});
  REQUIRE(none.ok());
  CHECK(*none == std::vector<std::string>{"3"});
  // b renews on its timer, a does not: after the TTL a's cells are free.
  for (int i = 0; i < 4; ++i) {
    f.clock.advance(std::chrono::seconds(3));
    REQUIRE(b.tick().ok());
  }
  auto lost = a.verify();
  REQUIRE(lost.ok());
  CHECK(lost->size() == 2);
  CHECK(a.cells().empty());
  auto now = b.claim_unowned({"1", "2", "3"});
  REQUIRE(now.ok());
  CHECK(now->size() == 2);
  CHECK(b.cells() == std::vector<std::string>{"1", "2", "3"});
  // Bad cell ids are refused before anything is written.
  auto bad = b.claim("a/b");
  REQUIRE_FALSE(bad.ok());
  CHECK(bad.error().code == Errc::invalid_argument);
  auto kvs = f.c->range("/flotilla/cells/", 100);
  REQUIRE(kvs.ok());
  CHECK(kvs->kvs.size() == 3);
}

TEST_CASE("coord sqlite: a watch opened before compaction reports it and names the oldest revision", "[unit][coord]") {
  SqliteFixture f(5);
  auto w = f.c->watch("/h/", 1);
  REQUIRE(w.ok());
  for (int i = 0; i < 12; ++i) REQUIRE(f.c->put("/h/k", std::to_string(i)).ok());
  auto late = f.c->watch("/h/", 2);
  REQUIRE(late.ok());
  auto evs = (*late)->next(std::chrono::milliseconds(0));
  REQUIRE_FALSE(evs.ok());
  CHECK((*late)->compacted_at() > 2);
  CHECK(evs.error().message.find("compacted") != std::string::npos);
  // From the oldest revision kept, everything after is there.
  auto ok = f.c->watch("/h/", (*late)->compacted_at());
  REQUIRE(ok.ok());
  auto tail = contract::collect(**ok, 5);
  CHECK(tail.size() == 5);
  CHECK(tail.back().kv.value == "11");
}

TEST_CASE("coord sqlite: keys, revisions and leases survive reopening the file", "[unit][coord]") {
  test::TempDir tmp{"coord"};
  FakeClock clock;
  const std::string path = (tmp.path() / "coord.db").string();
  int64_t rev = 0;
  co::LeaseId lease = 0;
  {
    auto c = co::open_sqlite_coordinator({path, 1000}, clock);
    REQUIRE(c.ok());
    auto l = (*c)->grant_lease(std::chrono::seconds(10));
    REQUIRE(l.ok());
    lease = l->id;
    auto r = (*c)->put("/p/k", "v", lease);
    REQUIRE(r.ok());
    rev = *r;
  }
  auto c = co::open_sqlite_coordinator({path, 1000}, clock);
  REQUIRE(c.ok());
  auto kv = (*c)->get("/p/k");
  REQUIRE(kv.ok());
  REQUIRE(kv->has_value());
  CHECK((*kv)->mod_revision == rev);
  auto next = (*c)->put("/p/j", "w");
  REQUIRE(next.ok());
  CHECK(*next == rev + 1);
  clock.advance(std::chrono::seconds(11));
  auto gone = (*c)->get("/p/k");
  REQUIRE(gone.ok());
  CHECK_FALSE(gone->has_value());
}

TEST_CASE("coord sqlite: a waiting watch is woken by a write from another thread", "[unit][coord]") {
  SqliteFixture f;
  auto w = f.c->watch("/x/", 0);
  REQUIRE(w.ok());
  std::thread writer([&] { REQUIRE(f.c->put("/x/1", "a").ok()); });
  auto evs = contract::collect(**w, 1);
  writer.join();
  REQUIRE(evs.size() == 1);
  CHECK(evs[0].kv.key == "/x/1");
}

TEST_CASE("coord settings: sqlite by default, etcd needs endpoints, bad values name the setting", "[unit][coord]") {
  auto def = config({});
  REQUIRE(def.ok());
  CHECK(def->backend == co::CoordinationConfig::Backend::sqlite);

  auto etcd = config({"--coordination", "etcd", "--etcd-endpoints", "http://127.0.0.1:2379", "--etcd-endpoints",
                      "http://127.0.0.2:2379", "--etcd-timeout", "2s"});
  REQUIRE(etcd.ok());
  CHECK(etcd->backend == co::CoordinationConfig::Backend::etcd);
  CHECK(etcd->etcd.endpoints.size() == 2);
  CHECK(etcd->etcd.request_timeout == std::chrono::seconds(2));

  struct Bad {
    std::vector<std::string> args;
    std::string says;
  };
  const std::vector<Bad> bad = {
      {{"--coordination", "zookeeper"}, "coordination must be sqlite or etcd"},
      {{"--coordination", "etcd"}, "needs etcd-endpoints"},
      {{"--etcd-endpoints", "http://127.0.0.1:2379"}, "need coordination: etcd"},
      {{"--coordination", "etcd", "--etcd-endpoints", "ftp://x:1"}, "unsupported URL scheme"},
      {{"--coordination", "etcd", "--etcd-endpoints", "http://x:1/v3"}, "must have no path"},
      {{"--coordination", "etcd", "--etcd-endpoints", "https://x:1", "--etcd-cert", "/nonexistent.pem"},
       "etcd-cert and etcd-key go together"},
      {{"--coordination", "etcd", "--etcd-endpoints", "https://x:1", "--etcd-ca", "/nonexistent/ca.pem"},
       "cannot read etcd TLS file"},
      {{"--coordination", "etcd", "--etcd-endpoints", "http://x:1", "--etcd-ca", "/etc/hostname"},
       "no endpoint is https://"},
      {{"--coordination", "etcd", "--etcd-endpoints", "http://x:1", "--etcd-timeout", "1ms"}, "etcd-timeout"},
  };
  for (const auto& b : bad) {
    auto r = config(b.args);
    INFO(b.says);
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().code == Errc::invalid_argument);
    CHECK(r.error().message.find(b.says) != std::string::npos);
  }
}

// A device page lists every cell's owner in one range over this prefix, so
// the owner key of each cell, and only those, must map back to its cell.
TEST_CASE("coord cell ownership: owner keys map back to their cell, other keys under the prefix do not",
          "[unit][coord]") {
  for (const std::string cell : {"0", "3", "17", "255"}) {
    const std::string key = co::CellOwnership::owner_key(cell);
    CHECK(key.rfind(co::CellOwnership::kOwnersPrefix, 0) == 0);
    CHECK(co::CellOwnership::cell_of_owner_key(key) == std::stoi(cell));
  }
  for (const std::string key : {"/flotilla/cells/", "/flotilla/cells//owner", "/flotilla/cells/x/owner",
                                "/flotilla/cells/3/counts", "/flotilla/cells/3/owner/x", "/flotilla/hubs/3/owner",
                                "/flotilla/cells/-1/owner", "/flotilla/cells/99999999999/owner"}) {
    INFO(key);
    CHECK_FALSE(co::CellOwnership::cell_of_owner_key(key).has_value());
  }
}
