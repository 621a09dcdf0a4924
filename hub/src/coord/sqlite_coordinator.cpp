// The embedded coordination backend: etcd's data model in one SQLite file
// (<data-dir>/coord.db), for a hub that runs alone. One store-wide revision,
// bumped once per write transaction; an event row per change, kept for
// history_revisions revisions so watches can resume; leases expire by the
// injected clock, checked at every call.
#include <algorithm>
#include <condition_variable>
#include <mutex>
#include <random>

#include "flotilla/common/sqlite.hpp"
#include "flotilla/hub/coord.hpp"

namespace flotilla::hub::coord {
namespace {

constexpr int kEventPut = 0;
constexpr int kEventRemove = 1;
constexpr size_t kWatchBatch = 1000;

// The first key after every key starting with prefix ("" = no end).
std::string prefix_end(std::string p) {
  while (!p.empty() && static_cast<unsigned char>(p.back()) == 0xff) p.pop_back();
  if (p.empty()) return {};
  p.back() = static_cast<char>(static_cast<unsigned char>(p.back()) + 1);
  return p;
}

KeyValue kv_row(const sql::Stmt& s) {
  KeyValue kv;
  kv.key = s.col_blob(0);
  kv.value = s.col_blob(1);
  kv.create_revision = s.col_int(2);
  kv.mod_revision = s.col_int(3);
  kv.version = s.col_int(4);
  kv.lease = s.col_int(5);
  return kv;
}

Error store_error(const Error& e) { return e.with_context("coordination store (sqlite)"); }

// Everything behind one mutex; watches share it with the coordinator.
struct State {
  std::mutex mu;
  std::condition_variable changed;
  std::unique_ptr<sql::Db> db;
  const Clock* clock = nullptr;
  int64_t history = 100000;

  Result<int64_t> meta(const char* name) {
    auto st = db->prepare("SELECT value FROM meta WHERE name = ?");
    if (!st) return st.error();
    st->bind(1, std::string_view(name));
    auto row = st->step();
    if (!row) return row.error();
    return *row ? st->col_int(0) : 0;
  }
  Status set_meta(const char* name, int64_t v) {
    auto st = db->prepare("INSERT INTO meta(name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = excluded.value");
    if (!st) return st.error();
    st->bind(1, std::string_view(name)).bind(2, v);
    return st->run();
  }

  Result<std::optional<KeyValue>> get_locked(const std::string& key) {
    auto st = db->prepare("SELECT key, value, create_rev, mod_rev, version, lease FROM kv WHERE key = ?");
    if (!st) return st.error();
    st->bind_blob(1, key);
    auto row = st->step();
    if (!row) return row.error();
    if (!*row) return std::optional<KeyValue>{};
    return std::optional<KeyValue>{kv_row(*st)};
  }

  Status add_event(int64_t rev, int type, const KeyValue& kv) {
    auto st = db->prepare(
        "INSERT INTO events(rev, type, key, value, create_rev, mod_rev, version, lease) VALUES (?,?,?,?,?,?,?,?)");
    if (!st) return st.error();
    st->bind(1, rev).bind(2, int64_t{type}).bind_blob(3, kv.key).bind_blob(4, kv.value);
    st->bind(5, kv.create_revision).bind(6, kv.mod_revision).bind(7, kv.version).bind(8, kv.lease);
    return st->run();
  }

  // Keeps the event history bounded: revisions older than `history` go.
  Status compact(int64_t rev) {
    auto floor = meta("compact_floor");
    if (!floor) return floor.error();
    const int64_t want = rev - history + 1;
    if (want <= *floor) return {};
    auto st = db->prepare("DELETE FROM events WHERE rev < ?");
    if (!st) return st.error();
    st->bind(1, want);
    FLOTILLA_TRY_STATUS(st->run());
    return set_meta("compact_floor", want);
  }

  Status remove_key(int64_t rev, const KeyValue& old) {
    auto del = db->prepare("DELETE FROM kv WHERE key = ?");
    if (!del) return del.error();
    del->bind_blob(1, old.key);
    FLOTILLA_TRY_STATUS(del->run());
    KeyValue ev{old.key, {}, 0, rev, 0, 0};
    return add_event(rev, kEventRemove, ev);
  }

  // Revokes one lease in its own revision: its keys go with it.
  Status revoke_locked(LeaseId id) {
    auto keys = sql::query<KeyValue>(
        *db, "SELECT key, value, create_rev, mod_rev, version, lease FROM kv WHERE lease = ? ORDER BY key",
        [&](sql::Stmt& s) { s.bind(1, id); }, kv_row);
    if (!keys) return keys.error();
    auto rev = meta("revision");
    if (!rev) return rev.error();
    if (!keys->empty()) {
      const int64_t next = *rev + 1;
      for (const auto& kv : *keys) FLOTILLA_TRY_STATUS(remove_key(next, kv));
      FLOTILLA_TRY_STATUS(set_meta("revision", next));
      FLOTILLA_TRY_STATUS(compact(next));
    }
    auto st = db->prepare("DELETE FROM leases WHERE id = ?");
    if (!st) return st.error();
    st->bind(1, id);
    return st->run();
  }

  // Expiry is applied lazily, at every call, against the injected clock:
  // a FakeClock moved past a TTL expires the lease at the next call.
  Status expire_locked() {
    auto due = sql::query<int64_t>(
        *db, "SELECT id FROM leases WHERE expires_ms <= ? ORDER BY expires_ms",
        [&](sql::Stmt& s) { s.bind(1, clock->now_unix_ms()); }, [](const sql::Stmt& s) { return s.col_int(0); });
    if (!due) return due.error();
    if (due->empty()) return {};
    sql::Transaction tx(*db);
    if (!tx.ok()) return make_error(Errc::unavailable, "cannot begin a transaction", true);
    for (LeaseId id : *due) FLOTILLA_TRY_STATUS(revoke_locked(id));
    FLOTILLA_TRY_STATUS(tx.commit());
    changed.notify_all();
    return {};
  }
};

class SqliteWatch final : public Watch {
 public:
  SqliteWatch(std::shared_ptr<State> st, std::string prefix, int64_t last, int64_t compacted)
      : st_(std::move(st)), prefix_(std::move(prefix)), end_(prefix_end(prefix_)), last_(last),
        compacted_(compacted) {}

  Result<std::vector<WatchEvent>> next(std::chrono::milliseconds wait) override {
    if (compacted_ > 0) {
      return make_error(Errc::not_found, "watch " + prefix_ + " from revision " + std::to_string(last_ + 1) +
                                             ": compacted; the oldest revision kept is " +
                                             std::to_string(compacted_));
    }
    const auto deadline = std::chrono::steady_clock::now() + wait;
    std::unique_lock lock(st_->mu);
    for (;;) {
      if (auto s = st_->expire_locked(); !s) return store_error(s.error());
      auto floor = st_->meta("compact_floor");
      if (!floor) return store_error(floor.error());
      if (last_ + 1 < *floor) {
        // Fell behind the kept history while not reading.
        compacted_ = *floor;
        return make_error(Errc::not_found, "watch " + prefix_ + ": revision " + std::to_string(last_ + 1) +
                                               " compacted; the oldest revision kept is " + std::to_string(*floor));
      }
      auto evs = read(kWatchBatch + 1, 0);
      if (!evs) return store_error(evs.error());
      if (evs->size() > kWatchBatch) {
        // Never split a revision across batches: resuming at last+1 would
        // skip the rest of it.
        const int64_t cut = evs->back().kv.mod_revision;
        while (!evs->empty() && evs->back().kv.mod_revision == cut) evs->pop_back();
        if (evs->empty()) {
          evs = read(0, cut);
          if (!evs) return store_error(evs.error());
        }
      }
      if (!evs->empty()) {
        last_ = evs->back().kv.mod_revision;
        return std::move(*evs);
      }
      const auto now = std::chrono::steady_clock::now();
      if (now >= deadline) return std::vector<WatchEvent>{};
      // Woken at once by writes in this process; other processes' writes are
      // seen at the next poll.
      st_->changed.wait_for(lock, std::min<std::chrono::steady_clock::duration>(deadline - now,
                                                                                std::chrono::milliseconds(200)));
    }
  }
  int64_t last_revision() const override { return last_; }
  int64_t compacted_at() const override { return compacted_; }

 private:
  // limit > 0: the next events after last_; else every event of revision `only`.
  Result<std::vector<WatchEvent>> read(size_t limit, int64_t only) {
    std::string q = "SELECT type, key, value, create_rev, mod_rev, version, lease, rev FROM events WHERE key >= ?";
    if (!end_.empty()) q += " AND key < ?";
    q += limit > 0 ? " AND rev > ? ORDER BY seq LIMIT ?" : " AND rev = ? ORDER BY seq";
    return sql::query<WatchEvent>(
        *st_->db, q,
        [&](sql::Stmt& s) {
          int i = 1;
          s.bind_blob(i++, prefix_);
          if (!end_.empty()) s.bind_blob(i++, end_);
          s.bind(i++, limit > 0 ? last_ : only);
          if (limit > 0) s.bind(i++, static_cast<int64_t>(limit));
        },
        [](const sql::Stmt& s) {
          WatchEvent e;
          e.type = s.col_int(0) == kEventRemove ? WatchEvent::Type::remove : WatchEvent::Type::put;
          e.kv.key = s.col_blob(1);
          e.kv.value = s.col_blob(2);
          e.kv.create_revision = s.col_int(3);
          e.kv.mod_revision = s.col_int(7);
          e.kv.version = s.col_int(5);
          e.kv.lease = s.col_int(6);
          return e;
        });
  }

  std::shared_ptr<State> st_;
  std::string prefix_, end_;
  int64_t last_;
  int64_t compacted_;
};

class SqliteCoordinator final : public Coordinator {
 public:
  explicit SqliteCoordinator(std::shared_ptr<State> st) : st_(std::move(st)) {}
  std::string_view backend() const override { return "sqlite"; }

  Result<Lease> grant_lease(std::chrono::seconds ttl) override {
    if (ttl.count() < 1 || ttl > std::chrono::hours(24 * 365)) {
      return make_error(Errc::invalid_argument, "lease TTL must be between 1s and a year");
    }
    std::lock_guard lock(st_->mu);
    if (auto s = st_->expire_locked(); !s) return store_error(s.error());
    // Random ids, as etcd's: an id from a deleted file is never reused by accident.
    static thread_local std::mt19937_64 rng{std::random_device{}()};
    for (int attempt = 0; attempt < 8; ++attempt) {
      const LeaseId id = static_cast<LeaseId>(rng() >> 2) + 1;
      auto st = st_->db->prepare("INSERT OR IGNORE INTO leases(id, ttl_s, expires_ms) VALUES (?, ?, ?)");
      if (!st) return store_error(st.error());
      st->bind(1, id).bind(2, static_cast<int64_t>(ttl.count())).bind(3, st_->clock->now_unix_ms() + ttl.count() * 1000);
      if (auto s = st->run(); !s) return store_error(s.error());
      if (st_->db->changes() == 1) return Lease{id, ttl};
    }
    return make_error(Errc::internal, "cannot pick a free lease id");
  }

  Result<std::chrono::seconds> keep_alive(LeaseId id) override {
    std::lock_guard lock(st_->mu);
    if (auto s = st_->expire_locked(); !s) return store_error(s.error());
    auto st = st_->db->prepare("UPDATE leases SET expires_ms = ? + ttl_s * 1000 WHERE id = ? RETURNING ttl_s");
    if (!st) return store_error(st.error());
    st->bind(1, st_->clock->now_unix_ms()).bind(2, id);
    auto row = st->step();
    if (!row) return store_error(row.error());
    if (!*row) return make_error(Errc::not_found, "lease " + std::to_string(id) + " not found (expired or revoked)");
    return std::chrono::seconds(st->col_int(0));
  }

  Result<std::chrono::seconds> lease_ttl(LeaseId id) override {
    std::lock_guard lock(st_->mu);
    if (auto s = st_->expire_locked(); !s) return store_error(s.error());
    auto st = st_->db->prepare("SELECT expires_ms FROM leases WHERE id = ?");
    if (!st) return store_error(st.error());
    st->bind(1, id);
    auto row = st->step();
    if (!row) return store_error(row.error());
    if (!*row) return make_error(Errc::not_found, "lease " + std::to_string(id) + " not found (expired or revoked)");
    return std::chrono::seconds((st->col_int(0) - st_->clock->now_unix_ms() + 999) / 1000);
  }

  Status revoke_lease(LeaseId id) override {
    std::lock_guard lock(st_->mu);
    if (auto s = st_->expire_locked(); !s) return store_error(s.error());
    sql::Transaction tx(*st_->db);
    if (!tx.ok()) return make_error(Errc::unavailable, "coordination store busy", true);
    if (auto s = st_->revoke_locked(id); !s) return store_error(s.error());
    if (auto s = tx.commit(); !s) return store_error(s.error());
    st_->changed.notify_all();
    return {};
  }

  Result<std::optional<KeyValue>> get(const std::string& key) override {
    FLOTILLA_TRY_STATUS(validate_key(key));
    std::lock_guard lock(st_->mu);
    if (auto s = st_->expire_locked(); !s) return store_error(s.error());
    auto r = st_->get_locked(key);
    if (!r) return store_error(r.error());
    return r;
  }

  Result<RangeResult> range(const std::string& prefix, size_t limit) override {
    if (prefix.size() > kMaxKeyBytes) return make_error(Errc::too_large, "range prefix too long");
    if (limit < 1 || limit > kMaxRangeLimit) {
      return make_error(Errc::invalid_argument, "range limit must be 1.." + std::to_string(kMaxRangeLimit));
    }
    std::lock_guard lock(st_->mu);
    if (auto s = st_->expire_locked(); !s) return store_error(s.error());
    const std::string end = prefix_end(prefix);
    std::string q = "SELECT key, value, create_rev, mod_rev, version, lease FROM kv WHERE key >= ?";
    if (!end.empty()) q += " AND key < ?";
    q += " ORDER BY key LIMIT ?";
    auto rows = sql::query<KeyValue>(
        *st_->db, q,
        [&](sql::Stmt& s) {
          int i = 1;
          s.bind_blob(i++, prefix);
          if (!end.empty()) s.bind_blob(i++, end);
          s.bind(i++, static_cast<int64_t>(limit + 1));
        },
        kv_row);
    if (!rows) return store_error(rows.error());
    RangeResult out;
    out.more = rows->size() > limit;
    if (out.more) rows->pop_back();
    out.kvs = std::move(*rows);
    auto rev = st_->meta("revision");
    if (!rev) return store_error(rev.error());
    out.revision = *rev;
    return out;
  }

  Result<TxnResult> txn(const std::vector<Compare>& compares, const std::vector<Op>& ops) override {
    FLOTILLA_TRY_STATUS(validate_txn(compares, ops));
    std::lock_guard lock(st_->mu);
    if (auto s = st_->expire_locked(); !s) return store_error(s.error());
    sql::Transaction tx(*st_->db);
    if (!tx.ok()) return make_error(Errc::unavailable, "coordination store busy", true);
    auto rev = st_->meta("revision");
    if (!rev) return store_error(rev.error());
    TxnResult out{true, *rev};
    for (const auto& c : compares) {
      auto cur = st_->get_locked(c.key);
      if (!cur) return store_error(cur.error());
      const KeyValue none;
      const KeyValue& kv = *cur ? **cur : none;
      bool holds = false;
      switch (c.target) {
        case Compare::Target::create_revision: holds = kv.create_revision == c.number; break;
        case Compare::Target::mod_revision: holds = kv.mod_revision == c.number; break;
        case Compare::Target::version: holds = kv.version == c.number; break;
        case Compare::Target::lease: holds = kv.lease == c.number; break;
        // As etcd: a value compare on a missing key never holds.
        case Compare::Target::value: holds = cur->has_value() && kv.value == c.value; break;
      }
      if (!holds) {
        out.succeeded = false;
        return out;
      }
    }
    const int64_t next = *rev + 1;
    bool wrote = false;
    for (const auto& op : ops) {
      auto cur = st_->get_locked(op.key);
      if (!cur) return store_error(cur.error());
      if (op.kind == Op::Kind::remove) {
        if (!*cur) continue;
        if (auto s = st_->remove_key(next, **cur); !s) return store_error(s.error());
        wrote = true;
        continue;
      }
      if (op.lease != 0) {
        auto l = sql::query<int64_t>(
            *st_->db, "SELECT id FROM leases WHERE id = ?", [&](sql::Stmt& s) { s.bind(1, op.lease); },
            [](const sql::Stmt& s) { return s.col_int(0); });
        if (!l) return store_error(l.error());
        // Nothing is written: the transaction rolls back.
        if (l->empty()) return make_error(Errc::not_found, "lease " + std::to_string(op.lease) + " not found");
      }
      KeyValue kv{op.key, op.value, *cur ? (*cur)->create_revision : next, next, *cur ? (*cur)->version + 1 : 1,
                  op.lease};
      auto st = st_->db->prepare(
          "INSERT INTO kv(key, value, create_rev, mod_rev, version, lease) VALUES (?,?,?,?,?,?) "
          "ON CONFLICT(key) DO UPDATE SET value = excluded.value, mod_rev = excluded.mod_rev, "
          "version = excluded.version, lease = excluded.lease");
      if (!st) return store_error(st.error());
      st->bind_blob(1, kv.key).bind_blob(2, kv.value).bind(3, kv.create_revision).bind(4, kv.mod_revision);
      st->bind(5, kv.version).bind(6, kv.lease);
      if (auto s = st->run(); !s) return store_error(s.error());
      if (auto s = st_->add_event(next, kEventPut, kv); !s) return store_error(s.error());
      wrote = true;
    }
    if (wrote) {
      if (auto s = st_->set_meta("revision", next); !s) return store_error(s.error());
      if (auto s = st_->compact(next); !s) return store_error(s.error());
      out.revision = next;
    }
    if (auto s = tx.commit(); !s) return store_error(s.error());
    if (wrote) st_->changed.notify_all();
    return out;
  }

  Result<std::unique_ptr<Watch>> watch(const std::string& prefix, int64_t from) override {
    if (prefix.size() > kMaxKeyBytes) return make_error(Errc::too_large, "watch prefix too long");
    if (from < 0) return make_error(Errc::invalid_argument, "negative watch revision");
    std::lock_guard lock(st_->mu);
    auto rev = st_->meta("revision");
    if (!rev) return store_error(rev.error());
    auto floor = st_->meta("compact_floor");
    if (!floor) return store_error(floor.error());
    const int64_t start = from == 0 ? *rev + 1 : from;
    const int64_t compacted = start < *floor ? *floor : 0;
    return std::unique_ptr<Watch>(std::make_unique<SqliteWatch>(st_, prefix, start - 1, compacted));
  }

 private:
  std::shared_ptr<State> st_;
};

}  // namespace

Result<std::unique_ptr<Coordinator>> open_sqlite_coordinator(const SqliteCoordOptions& opts, const Clock& clock) {
  if (opts.history_revisions < 1) return make_error(Errc::invalid_argument, "history_revisions must be positive");
  auto db = sql::Db::open(opts.path);
  if (!db) return db.error().with_context("open coordination store " + opts.path);
  auto s = (*db)->exec(R"sql(
    CREATE TABLE IF NOT EXISTS kv(
      key BLOB PRIMARY KEY, value BLOB NOT NULL, create_rev INTEGER NOT NULL, mod_rev INTEGER NOT NULL,
      version INTEGER NOT NULL, lease INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS kv_lease ON kv(lease) WHERE lease != 0;
    CREATE TABLE IF NOT EXISTS events(
      seq INTEGER PRIMARY KEY AUTOINCREMENT, rev INTEGER NOT NULL, type INTEGER NOT NULL, key BLOB NOT NULL,
      value BLOB NOT NULL, create_rev INTEGER NOT NULL, mod_rev INTEGER NOT NULL, version INTEGER NOT NULL,
      lease INTEGER NOT NULL);
    CREATE INDEX IF NOT EXISTS events_rev ON events(rev);
    CREATE TABLE IF NOT EXISTS leases(id INTEGER PRIMARY KEY, ttl_s INTEGER NOT NULL, expires_ms INTEGER NOT NULL);
    CREATE TABLE IF NOT EXISTS meta(name TEXT PRIMARY KEY, value INTEGER NOT NULL);
    -- etcd starts at revision 1; the oldest watchable revision is 1.
    INSERT OR IGNORE INTO meta(name, value) VALUES ('revision', 1), ('compact_floor', 1);
  )sql");
  if (!s) return s.error().with_context("create coordination store " + opts.path);
  auto st = std::make_shared<State>();
  st->db = std::move(*db);
  st->clock = &clock;
  st->history = opts.history_revisions;
  return std::unique_ptr<Coordinator>(std::make_unique<SqliteCoordinator>(std::move(st)));
}

}  // namespace flotilla::hub::coord
