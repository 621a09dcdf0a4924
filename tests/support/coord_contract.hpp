#pragma once
// The coordination contract (hub/include/flotilla/hub/coord.hpp), written
// once and run against every backend: the embedded SQLite one in the unit
// tier (tests/unit/hub_coord_test.cpp), a real 3-member etcd cluster in the
// integration tier (tests/integration/hub_etcd_test.cpp). Each check takes a
// key prefix of its own so runs on one etcd never see each other's keys, and
// an `expire` function that makes a lease run out (a FakeClock moved on, or
// real time polled with a deadline).
#include <catch2/catch.hpp>

#include <functional>
#include <string>

#include "flotilla/hub/coord.hpp"

namespace flotilla::test::coord_contract {

namespace c = flotilla::hub::coord;
using ExpireFn = std::function<void(c::Coordinator&, c::LeaseId)>;

inline std::string value_of(c::Coordinator& co, const std::string& key) {
  auto g = co.get(key);
  REQUIRE(g.ok());
  return *g ? (*g)->value : std::string("<absent>");
}

// Compare-and-swap on the mod revision: the loser of a race gets conflict
// and its value is not written.
inline void cas_conflict(c::Coordinator& co, const std::string& p) {
  const std::string k = p + "cas";
  auto r1 = co.compare_and_swap(k, 0, "v1");
  REQUIRE(r1.ok());
  auto kv = co.get(k);
  REQUIRE(kv.ok());
  REQUIRE(kv->has_value());
  CHECK((*kv)->mod_revision == *r1);
  CHECK((*kv)->create_revision == *r1);
  CHECK((*kv)->version == 1);

  auto r2 = co.compare_and_swap(k, *r1, "v2");
  REQUIRE(r2.ok());
  CHECK(*r2 > *r1);  // revisions only go up

  // A writer still holding r1 loses.
  auto stale = co.compare_and_swap(k, *r1, "v3");
  REQUIRE_FALSE(stale.ok());
  CHECK(stale.error().code == Errc::conflict);
  CHECK(value_of(co, k) == "v2");
  auto after = co.get(k);
  REQUIRE(after.ok());
  CHECK((*after)->mod_revision == *r2);
  CHECK((*after)->create_revision == *r1);
  CHECK((*after)->version == 2);

  // "Absent" (0) on an existing key is a conflict too.
  auto again = co.compare_and_swap(k, 0, "v4");
  REQUIRE_FALSE(again.ok());
  CHECK(again.error().code == Errc::conflict);
  CHECK(value_of(co, k) == "v2");
}

inline void create_twice(c::Coordinator& co, const std::string& p) {
  const std::string k = p + "once";
  auto first = co.create(k, "first");
  REQUIRE(first.ok());
  auto second = co.create(k, "second");
  REQUIRE_FALSE(second.ok());
  CHECK(second.error().code == Errc::already_exists);
  CHECK(value_of(co, k) == "first");
  auto kv = co.get(k);
  REQUIRE(kv.ok());
  CHECK((*kv)->mod_revision == *first);  // the failed create wrote nothing

  // After a delete it can be created again, at a new revision.
  auto rm = co.remove(k);
  REQUIRE(rm.ok());
  CHECK(*rm);
  auto rm2 = co.remove(k);
  REQUIRE(rm2.ok());
  CHECK_FALSE(*rm2);
  auto third = co.create(k, "third");
  REQUIRE(third.ok());
  CHECK(*third > *first);
}

inline void range_and_bounds(c::Coordinator& co, const std::string& p) {
  for (const char* s : {"b", "a", "c"}) REQUIRE(co.put(p + "r/" + s, s).ok());
  REQUIRE(co.put(p + "r0", "outside").ok());  // shares the prefix's characters, not the prefix "r/"
  auto all = co.range(p + "r/", 10);
  REQUIRE(all.ok());
  REQUIRE(all->kvs.size() == 3);
  CHECK(all->kvs[0].key == p + "r/a");
  CHECK(all->kvs[2].key == p + "r/c");
  CHECK_FALSE(all->more);
  auto two = co.range(p + "r/", 2);
  REQUIRE(two.ok());
  CHECK(two->kvs.size() == 2);
  CHECK(two->more);

  // Bounded input: refused, nothing written.
  auto big = co.put(p + "big", std::string(c::kMaxValueBytes + 1, 'x'));
  REQUIRE_FALSE(big.ok());
  CHECK(big.error().code == Errc::too_large);
  CHECK(value_of(co, p + "big") == "<absent>");
  auto dup = co.txn({}, {c::Op::put(p + "d", "1"), c::Op::put(p + "d", "2")});
  REQUIRE_FALSE(dup.ok());
  CHECK(dup.error().code == Errc::invalid_argument);
  CHECK(value_of(co, p + "d") == "<absent>");
  auto bad_limit = co.range(p, 0);
  REQUIRE_FALSE(bad_limit.ok());
}

// A key under a lease goes when the lease expires; keep-alive and ttl then
// say not_found, and a put under the dead lease is refused.
inline void lease_expiry(c::Coordinator& co, const std::string& p, const ExpireFn& expire) {
  auto lease = co.grant_lease(std::chrono::seconds(2));
  REQUIRE(lease.ok());
  REQUIRE(lease->id != 0);
  REQUIRE(co.put(p + "leased", "x", lease->id).ok());
  REQUIRE(co.put(p + "kept", "y").ok());
  auto ka = co.keep_alive(lease->id);
  REQUIRE(ka.ok());
  CHECK(ka->count() >= 1);
  auto kv = co.get(p + "leased");
  REQUIRE(kv.ok());
  CHECK((*kv)->lease == lease->id);

  expire(co, lease->id);

  CHECK(value_of(co, p + "leased") == "<absent>");
  CHECK(value_of(co, p + "kept") == "y");
  auto gone = co.keep_alive(lease->id);
  REQUIRE_FALSE(gone.ok());
  CHECK(gone.error().code == Errc::not_found);
  auto ttl = co.lease_ttl(lease->id);
  REQUIRE_FALSE(ttl.ok());
  CHECK(ttl.error().code == Errc::not_found);
  auto put = co.put(p + "late", "z", lease->id);
  REQUIRE_FALSE(put.ok());
  CHECK(put.error().code == Errc::not_found);
  CHECK(value_of(co, p + "late") == "<absent>");

  // Revoke takes keys at once, and revoking twice is fine.
  auto l2 = co.grant_lease(std::chrono::seconds(30));
  REQUIRE(l2.ok());
  REQUIRE(co.put(p + "revoked", "x", l2->id).ok());
  REQUIRE(co.revoke_lease(l2->id).ok());
  CHECK(value_of(co, p + "revoked") == "<absent>");
  CHECK(co.revoke_lease(l2->id).ok());
}

// Collects events until `count` arrived (bounded by a deadline).
inline std::vector<c::WatchEvent> collect(c::Watch& w, size_t count) {
  std::vector<c::WatchEvent> out;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (out.size() < count && std::chrono::steady_clock::now() < deadline) {
    auto evs = w.next(std::chrono::milliseconds(500));
    REQUIRE(evs.ok());
    out.insert(out.end(), evs->begin(), evs->end());
  }
  return out;
}

// Every event, in revision order, once; a new watch from a revision replays
// from exactly there.
inline void watch_in_order_and_resume(c::Coordinator& co, const std::string& p) {
  const std::string w = p + "w/";
  auto watch = co.watch(w, 0);
  REQUIRE(watch.ok());
  auto r1 = co.put(w + "a", "1");
  REQUIRE(r1.ok());
  REQUIRE(co.put(p + "not-watched", "x").ok());
  auto r2 = co.put(w + "b", "2");
  REQUIRE(r2.ok());
  auto r3 = co.put(w + "a", "3");
  REQUIRE(r3.ok());
  auto rm = co.remove(w + "b");
  REQUIRE(rm.ok());
  auto r5 = co.txn({}, {c::Op::put(w + "c", "5"), c::Op::put(w + "d", "6")});  // one revision, two events
  REQUIRE(r5.ok());

  auto evs = collect(**watch, 6);
  REQUIRE(evs.size() == 6);
  CHECK(evs[0].kv.key == w + "a");
  CHECK(evs[0].kv.value == "1");
  CHECK(evs[0].kv.mod_revision == *r1);
  CHECK(evs[1].kv.key == w + "b");
  CHECK(evs[1].kv.mod_revision == *r2);
  CHECK(evs[2].kv.value == "3");
  CHECK(evs[2].kv.version == 2);
  CHECK(evs[3].type == c::WatchEvent::Type::remove);
  CHECK(evs[3].kv.key == w + "b");
  CHECK(evs[4].kv.mod_revision == r5->revision);
  CHECK(evs[5].kv.mod_revision == r5->revision);
  for (size_t i = 1; i < evs.size(); ++i) CHECK(evs[i].kv.mod_revision >= evs[i - 1].kv.mod_revision);
  CHECK((*watch)->last_revision() == r5->revision);

  // Nothing more, and nothing twice.
  auto none = (*watch)->next(std::chrono::milliseconds(100));
  REQUIRE(none.ok());
  CHECK(none->empty());

  // Resume from the third event's revision: the same tail again.
  auto resumed = co.watch(w, *r3);
  REQUIRE(resumed.ok());
  auto tail = collect(**resumed, 4);
  REQUIRE(tail.size() == 4);
  CHECK(tail[0].kv.mod_revision == *r3);
  CHECK(tail[1].type == c::WatchEvent::Type::remove);
  CHECK(tail[3].kv.key == w + "d");
}

// A holder whose lease ran out cannot write with its old fence, even though
// it still "thinks" it owns the cell; the new owner can. A fence from an
// earlier claim of the same holder is refused too.
inline void stale_fence_refused(c::Coordinator& co, const std::string& p, const ExpireFn& expire) {
  const std::string cell = p.substr(0, p.size() - 1);  // "<prefix>/" → a cell id without '/'
  const std::string cell_id = std::to_string(std::hash<std::string>{}(cell));
  hub::coord::CellOwnership a(co, "hub-a", std::chrono::seconds(2));
  hub::coord::CellOwnership b(co, "hub-b", std::chrono::seconds(30));
  REQUIRE(a.start().ok());
  REQUIRE(b.start().ok());
  auto fa = a.claim(cell_id);
  REQUIRE(fa.ok());
  auto fb_early = b.claim(cell_id);
  REQUIRE_FALSE(fb_early.ok());
  CHECK(fb_early.error().code == Errc::already_exists);
  CHECK(fb_early.error().message.find("hub-a") != std::string::npos);

  const std::string data = p + "fenced";
  REQUIRE(a.guarded_put(cell_id, data, "from-a-1").ok());

  expire(co, a.lease());

  auto fb = b.claim(cell_id);
  REQUIRE(fb.ok());
  CHECK(fb->revision > fa->revision);
  // a still holds its fence locally: the store refuses it.
  REQUIRE(a.fence(cell_id).has_value());
  auto late = a.guarded_put(cell_id, data, "from-a-2");
  REQUIRE_FALSE(late.ok());
  CHECK(late.error().code == Errc::refused);
  CHECK(late.error().message.find("stale fence") != std::string::npos);
  CHECK(value_of(co, data) == "from-a-1");
  CHECK_FALSE(a.fence(cell_id).has_value());  // and a has noticed
  auto renew = a.renew();
  REQUIRE_FALSE(renew.ok());
  CHECK(renew.error().code == Errc::refused);

  REQUIRE(b.guarded_put(cell_id, data, "from-b").ok());
  CHECK(value_of(co, data) == "from-b");

  // Same holder, same lease, released and claimed again: the old token is dead.
  auto old = *b.fence(cell_id);
  REQUIRE(b.release(cell_id).ok());
  auto again = b.claim(cell_id);
  REQUIRE(again.ok());
  CHECK(again->revision > old.revision);
  auto by_old = hub::coord::guarded_txn(co, old, {}, {c::Op::put(data, "old-token")});
  REQUIRE_FALSE(by_old.ok());
  CHECK(by_old.error().code == Errc::refused);
  CHECK(value_of(co, data) == "from-b");
  REQUIRE(b.close().ok());
  CHECK(value_of(co, hub::coord::CellOwnership::owner_key(cell_id)) == "<absent>");
}

inline void run_all(c::Coordinator& co, const std::string& p, const ExpireFn& expire) {
  cas_conflict(co, p);
  create_twice(co, p);
  range_and_bounds(co, p);
  lease_expiry(co, p, expire);
  watch_in_order_and_resume(co, p);
  stale_fence_refused(co, p, expire);
}

}  // namespace flotilla::test::coord_contract
