// The control log: SQLite changesets of the control tables, linearised in
// the coordinator (docs/adr/0016-control-log-of-changesets.md).
#define SQLITE_ENABLE_SESSION 1
#define SQLITE_ENABLE_PREUPDATE_HOOK 1
#include "flotilla/hub/control_log.hpp"

#include <sqlite3.h>

#include <algorithm>
#include <charconv>
#include <cstdio>

#include "flotilla/common/log.hpp"

namespace flotilla::hub {

namespace {

// The control log this thread is writing or applying for (the guard
// triggers let exactly those writes through).
thread_local const ControlLog* t_open = nullptr;
thread_local int64_t t_last_write_revision = 0;

struct OpenScope {
  const ControlLog* prev;
  explicit OpenScope(const ControlLog* log) : prev(t_open) { t_open = log; }
  ~OpenScope() { t_open = prev; }
};

void guard_open(sqlite3_context* ctx, int, sqlite3_value**) {
  sqlite3_result_int(ctx, t_open == sqlite3_user_data(ctx) ? 1 : 0);
}

// devices is shared between control operations (enrollment, labels,
// decommission) and the report path (presence, state, desired generation,
// cell moves, which stay per hub): only the control columns are guarded, and
// a report can never write them.
constexpr const char* kDeviceControlColumns = "project, labels, public_key, enrolled_ms, gateway, enroll_issued_ms";

std::string guard_sql() {
  std::string out;
  auto refuse = [](const std::string& table) {
    return " BEGIN SELECT RAISE(ABORT, 'control table " + table +
           " written outside a control write (docs/adr/0016)'); END;\n";
  };
  for (const auto& t : ControlLog::tables()) {
    const std::string when = " WHEN NOT flotilla_control_open()";
    out += "CREATE TEMP TRIGGER IF NOT EXISTS flotilla_guard_" + t + "_i BEFORE INSERT ON main." + t + when + refuse(t);
    out += "CREATE TEMP TRIGGER IF NOT EXISTS flotilla_guard_" + t + "_d BEFORE DELETE ON main." + t + when + refuse(t);
    if (t == "devices") {
      out += "CREATE TEMP TRIGGER IF NOT EXISTS flotilla_guard_devices_u BEFORE UPDATE OF " +
             std::string(kDeviceControlColumns) + " ON main.devices" + when + refuse(t);
      out += "CREATE TEMP TRIGGER IF NOT EXISTS flotilla_guard_devices_s BEFORE UPDATE OF state ON main.devices" + when +
             " AND NEW.state = 'decommissioned' AND OLD.state != 'decommissioned'" + refuse(t);
    } else {
      out += "CREATE TEMP TRIGGER IF NOT EXISTS flotilla_guard_" + t + "_u BEFORE UPDATE ON main." + t + when +
             refuse(t);
    }
  }
  return out;
}

std::string entry_key(const std::string& prefix, int64_t seq) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%020lld", static_cast<long long>(seq));
  return prefix + buf;
}

// One session on the control tables for the length of a control write.
class Session {
 public:
  explicit Session(sqlite3* db) {
    if (sqlite3session_create(db, "main", &s_) != SQLITE_OK) {
      s_ = nullptr;
      return;
    }
    for (const auto& t : ControlLog::tables()) {
      if (sqlite3session_attach(s_, t.c_str()) != SQLITE_OK) {
        sqlite3session_delete(s_);
        s_ = nullptr;
        return;
      }
    }
  }
  ~Session() {
    if (s_) sqlite3session_delete(s_);
  }
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;
  bool ok() const { return s_ != nullptr; }
  Result<std::string> changeset() {
    int n = 0;
    void* p = nullptr;
    if (int rc = sqlite3session_changeset(s_, &n, &p); rc != SQLITE_OK) {
      return make_error(Errc::internal, std::string("control write: take the changeset: ") + sqlite3_errstr(rc));
    }
    std::string out(static_cast<const char*>(p), static_cast<size_t>(n));
    sqlite3_free(p);
    return out;
  }

 private:
  sqlite3_session* s_ = nullptr;
};

struct ApplyContext {
  std::set<std::string>* tables;
  std::string unknown_table;
  std::string refused;  // a constraint or foreign key the entry broke
};

int apply_filter(void* ctx, const char* table) {
  auto* a = static_cast<ApplyContext*>(ctx);
  const auto& known = ControlLog::tables();
  if (std::find(known.begin(), known.end(), table) == known.end()) {
    a->unknown_table = table;
    return 0;
  }
  a->tables->insert(table);
  return 1;
}

int apply_conflict(void* ctx, int kind, sqlite3_changeset_iter* it) {
  auto* a = static_cast<ApplyContext*>(ctx);
  switch (kind) {
    case SQLITE_CHANGESET_DATA:
    case SQLITE_CHANGESET_CONFLICT:
      // The log is the truth: the mirror's row gives way.
      return SQLITE_CHANGESET_REPLACE;
    case SQLITE_CHANGESET_NOTFOUND:
      // Updating or deleting a row the mirror no longer has: the outcome is
      // the same either way.
      return SQLITE_CHANGESET_OMIT;
    default: {
      const char* table = nullptr;
      int cols = 0, op = 0, indirect = 0;
      if (it && sqlite3changeset_op(it, &table, &cols, &op, &indirect) == SQLITE_OK && table) {
        a->refused = std::string(kind == SQLITE_CHANGESET_FOREIGN_KEY ? "a foreign key" : "a constraint") +
                     " of table " + table;
      } else {
        a->refused = kind == SQLITE_CHANGESET_FOREIGN_KEY ? "foreign keys" : "a constraint";
      }
      return SQLITE_CHANGESET_ABORT;
    }
  }
}

Result<int64_t> parse_seq(const std::string& text) {
  int64_t v = 0;
  auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || p != text.data() + text.size() || v <= 0) {
    return make_error(Errc::parse, "control log: bad sequence number '" + text.substr(0, 40) + "'");
  }
  return v;
}

}  // namespace

const std::vector<std::string>& ControlLog::tables() {
  // campaign_devices, device_inventory, the counts and the dashboard's read
  // models are per-cell caches of device reports: never in the log.
  static const std::vector<std::string> t = {"tokens",    "broker_credentials", "devices",        "bundles",
                                             "campaigns", "audit_log",          "trust",          "device_certs",
                                             "applied_objects", "gitrepos"};
  return t;
}

int64_t ControlLog::last_write_revision() { return t_last_write_revision; }

ControlLog::ControlLog(sql::Db& db, std::recursive_mutex& mu, coord::Coordinator& c, ControlLogOptions opts)
    : db_(db), mu_(mu), c_(c), opts_(std::move(opts)) {}

ControlLog::~ControlLog() {
  stop();
  std::lock_guard lock(mu_);
  for (const auto& t : tables()) {
    for (const char* suffix : {"_i", "_d", "_u", "_s"}) {
      (void)db_.exec("DROP TRIGGER IF EXISTS temp.flotilla_guard_" + t + suffix);
    }
  }
  (void)sqlite3_create_function_v2(db_.raw(), "flotilla_control_open", 0, SQLITE_UTF8, this, nullptr, nullptr,
                                   nullptr, nullptr);
}

Result<std::unique_ptr<ControlLog>> ControlLog::open(sql::Db& db, std::recursive_mutex& mu, coord::Coordinator& c,
                                                     ControlLogOptions opts) {
  if (opts.prefix.empty() || opts.prefix.back() != '/') {
    return make_error(Errc::invalid_argument, "control log: prefix must end in '/'");
  }
  std::unique_ptr<ControlLog> log(new ControlLog(db, mu, c, std::move(opts)));
  if (auto s = log->install(); !s) return s.error().with_context("control log");
  return log;
}

Status ControlLog::install() {
  std::lock_guard lock(mu_);
  if (sqlite3_create_function_v2(db_.raw(), "flotilla_control_open", 0, SQLITE_UTF8, this,
                                 guard_open, nullptr, nullptr, nullptr) != SQLITE_OK) {
    return make_error(Errc::internal, std::string("register guard: ") + sqlite3_errmsg(db_.raw()));
  }
  if (auto s = db_.exec(
          "CREATE TABLE IF NOT EXISTS control_log_state (id INTEGER PRIMARY KEY CHECK (id = 1), "
          "revision INTEGER NOT NULL, seq INTEGER NOT NULL)");
      !s) {
    return s;
  }
  if (auto s = db_.exec(guard_sql()); !s) return s;
  auto st = db_.prepare("SELECT revision, seq FROM control_log_state WHERE id = 1");
  if (!st) return st.error();
  auto r = st->step();
  if (!r) return r.error();
  if (*r) {
    applied_rev_ = st->col_int(0);
    applied_seq_ = st->col_int(1);
  }
  st->reset();
  return {};
}

bool ControlLog::in_write() const { return t_open == this; }

Status ControlLog::refuse_if_unreachable() {
  std::lock_guard lock(state_mu_);
  if (unreachable_error_.empty()) return {};
  if (std::chrono::steady_clock::now() - unreachable_since_ >= opts_.unreachable_hold) return {};
  ++counters_.refused_unavailable;
  return make_error(Errc::coordination_unavailable, unreachable_error_, true);
}

void ControlLog::note_unreachable(const Error& e) {
  if (e.code != Errc::coordination_unavailable) return;
  std::lock_guard lock(state_mu_);
  unreachable_since_ = std::chrono::steady_clock::now();
  unreachable_error_ = e.message;
}

Status ControlLog::write(const std::function<Status()>& fn, const std::vector<coord::Compare>& guard) {
  t_last_write_revision = 0;
  if (t_open == this) return fn();  // part of the outer control write
  for (int attempt = 0;; ++attempt) {
    bool moved = false;
    auto s = write_once(fn, guard, &moved);
    if (!s || !moved) return s;
    {
      std::lock_guard lock(state_mu_);
      if (attempt + 1 >= opts_.max_retries) {
        ++counters_.refused_conflict;
        return make_error(Errc::conflict, "control write: other hubs wrote first " + std::to_string(attempt + 1) +
                                              " times in a row; nothing was written, try again",
                          true);
      }
      ++counters_.retries;
    }
    if (auto c = catch_up(); !c) return c;
  }
}

Status ControlLog::write_once(const std::function<Status()>& fn, const std::vector<coord::Compare>& guard,
                              bool* moved) {
  std::unique_lock lock(mu_);
  {
    std::lock_guard st(state_mu_);
    if (!stuck_.empty()) {
      ++counters_.refused_stuck;
      return make_error(Errc::unavailable, "control write refused: this hub's mirror of the control log is stuck: " +
                                               stuck_);
    }
  }
  if (auto s = refuse_if_unreachable(); !s) return s;
  if (sqlite3_get_autocommit(db_.raw()) == 0) {
    return make_error(Errc::internal, "control write inside a transaction it did not open");
  }
  sql::Transaction tx(db_);
  if (!tx.ok()) return make_error(Errc::unavailable, "store: cannot begin a transaction", true);
  Session session(db_.raw());
  if (!session.ok()) return make_error(Errc::internal, "control write: cannot start a session on the control tables");
  {
    OpenScope open(this);
    if (auto s = fn(); !s) return s;  // rolled back, nothing sent
  }
  auto changes = session.changeset();
  if (!changes) return changes.error();
  if (changes->empty()) return tx.commit();  // nothing of the control data changed
  // etcd refuses requests over 1.5 MiB by default and values over our own
  // bound: one entry must fit (ADR 0016).
  if (changes->size() + 64 > coord::kMaxValueBytes) {
    std::lock_guard st(state_mu_);
    ++counters_.refused_too_large;
    return make_error(Errc::too_large, "control write of " + std::to_string(changes->size()) +
                                           " bytes exceeds the control log's entry limit of " +
                                           std::to_string(coord::kMaxValueBytes - 64) + " bytes; nothing was written");
  }
  const int64_t base = applied_rev_.load();
  const int64_t seq = applied_seq_.load() + 1;
  std::vector<coord::Compare> cmp = {base == 0 ? coord::Compare::absent(head_key())
                                               : coord::Compare::mod_revision_is(head_key(), base)};
  cmp.insert(cmp.end(), guard.begin(), guard.end());
  std::vector<coord::Op> ops = {coord::Op::put(entry_key(log_prefix(), seq), *changes),
                                coord::Op::put(head_key(), std::to_string(seq))};
  auto r = c_.txn(cmp, ops);
  if (!r) {
    note_unreachable(r.error());
    std::lock_guard st(state_mu_);
    if (r.error().code == Errc::coordination_unavailable) ++counters_.refused_unavailable;
    return r.error().with_context("control write refused, nothing was written");
  }
  if (!r->succeeded) {
    // The head moved (another hub wrote first: catch up and run fn again),
    // or the guard no longer holds (refused for good).
    if (!guard.empty()) {
      auto held = c_.txn(guard, {});
      if (!held) return held.error().with_context("control write refused, nothing was written");
      if (!held->succeeded) {
        std::lock_guard st(state_mu_);
        ++counters_.refused_guard;
        return make_error(Errc::refused, "control write refused: " + guard.front().key +
                                             " is no longer as this hub holds it (another hub took over); "
                                             "nothing was written");
      }
    }
    *moved = true;
    return {};  // rolled back; the caller catches up and runs fn again
  }
  {
    std::lock_guard st(state_mu_);
    unreachable_error_.clear();
  }
  auto st = db_.prepare("INSERT INTO control_log_state (id, revision, seq) VALUES (1, ?, ?) "
                        "ON CONFLICT (id) DO UPDATE SET revision = excluded.revision, seq = excluded.seq");
  Status committed = st ? st->bind(1, r->revision).bind(2, seq).run() : Status(st.error());
  if (committed) committed = tx.commit();
  if (!committed) {
    // The entry is in the log: the watcher applies it like any other.
    log::get("hub")->error("control write seq={} revision={}: local commit failed ({}); it comes back from the log",
                           seq, r->revision, committed.error().message);
    return committed.error().with_context("control write in the log but not yet in this hub's store");
  }
  applied_rev_ = r->revision;
  applied_seq_ = seq;
  t_last_write_revision = r->revision;
  {
    std::lock_guard s2(state_mu_);
    ++counters_.writes;
  }
  applied_cv_.notify_all();
  return {};
}

Status ControlLog::catch_up() {
  auto head = c_.get(head_key());
  if (!head) {
    note_unreachable(head.error());
    return head.error().with_context("control log: read the head");
  }
  const int64_t target = *head ? (*head)->mod_revision : 0;
  if (applied_rev_ >= target) return {};
  auto w = c_.watch(log_prefix(), applied_rev_ + 1);
  if (!w) {
    note_unreachable(w.error());
    return w.error().with_context("control log: catch up");
  }
  const auto deadline = std::chrono::steady_clock::now() + opts_.catch_up_timeout;
  while (applied_rev_ < target) {
    if (std::chrono::steady_clock::now() > deadline) {
      return make_error(Errc::timeout, "control log: could not catch up to revision " + std::to_string(target) +
                                           " (at " + std::to_string(applied_rev_.load()) + ")", true);
    }
    auto ev = (*w)->next(std::chrono::milliseconds(200));
    if ((*w)->compacted_at() > 0) return compacted((*w)->compacted_at());
    if (!ev) return ev.error().with_context("control log: catch up");
    if (auto s = apply_events(*ev); !s) return s;
  }
  return {};
}

Status ControlLog::compacted(int64_t oldest) {
  std::lock_guard st(state_mu_);
  stuck_ = "the log's history was compacted past revision " + std::to_string(applied_rev_ + 1) + " (oldest kept " +
           std::to_string(oldest) + "): rebuild this hub's store from an empty data dir";
  return make_error(Errc::unavailable, "control log: " + stuck_);
}

Status ControlLog::poll(std::chrono::milliseconds wait) {
  std::lock_guard pl(poll_mu_);
  if (!watch_) {
    auto w = c_.watch(log_prefix(), applied_rev_ + 1);
    if (!w) return w.error();
    watch_ = std::move(*w);
  }
  auto ev = watch_->next(wait);
  if (const int64_t oldest = watch_->compacted_at(); oldest > 0) {
    watch_.reset();
    return compacted(oldest);
  }
  if (!ev) {
    watch_.reset();  // reopened from what was applied
    return ev.error();
  }
  auto s = apply_events(*ev);
  if (!s) watch_.reset();  // the same entry is tried again later, never skipped
  return s;
}

Status ControlLog::apply_events(const std::vector<coord::WatchEvent>& events) {
  std::set<std::string> changed;
  Status out;
  {
    std::lock_guard lock(mu_);
    for (const auto& ev : events) {
      if (ev.type != coord::WatchEvent::Type::put) continue;  // entries are never deleted, only compacted
      if (ev.kv.mod_revision <= applied_rev_) continue;       // ours, or applied by another caller
      if (auto s = apply_entry(ev.kv, changed); !s) {
        std::lock_guard st(state_mu_);
        ++counters_.apply_failures;
        stuck_ = s.error().message;
        log::get("hub")->error("control log: {}", stuck_);
        out = s;
        break;
      }
      std::lock_guard st(state_mu_);
      ++counters_.entries_applied;
      stuck_.clear();
    }
  }
  applied_cv_.notify_all();
  if (!changed.empty() && on_applied_) on_applied_(changed);
  return out;
}

Status ControlLog::apply_entry(const coord::KeyValue& kv, std::set<std::string>& tables) {
  const std::string where = "entry " + kv.key + " at revision " + std::to_string(kv.mod_revision);
  if (kv.key.rfind(log_prefix(), 0) != 0) return make_error(Errc::parse, "unexpected key " + kv.key);
  auto seq = parse_seq(kv.key.substr(log_prefix().size()));
  if (!seq) return seq.error().with_context(where);
  if (*seq != applied_seq_ + 1) {
    return make_error(Errc::internal, where + ": expected sequence " + std::to_string(applied_seq_ + 1) +
                                          " (a gap or a reordering in the log); not applied");
  }
  if (sqlite3_get_autocommit(db_.raw()) == 0) {
    return make_error(Errc::internal, where + ": cannot apply inside an open transaction");
  }
  OpenScope open(this);
  sql::Transaction tx(db_);
  if (!tx.ok()) return make_error(Errc::unavailable, where + ": store: cannot begin a transaction", true);
  std::set<std::string> touched;
  ApplyContext ctx{&touched, {}, {}};
  const int rc = sqlite3changeset_apply(db_.raw(), static_cast<int>(kv.value.size()),
                                        const_cast<char*>(kv.value.data()), apply_filter, apply_conflict, &ctx);
  if (rc != SQLITE_OK) {
    std::string why = ctx.refused.empty() ? std::string(sqlite3_errmsg(db_.raw())) : "it breaks " + ctx.refused;
    return make_error(Errc::internal, where + " cannot be applied to this hub's store: " + why +
                                          "; the mirror stops here until it is repaired");
  }
  if (!ctx.unknown_table.empty()) {
    return make_error(Errc::refused, where + " changes table '" + ctx.unknown_table +
                                         "', which is not control data; not applied");
  }
  auto st = db_.prepare("INSERT INTO control_log_state (id, revision, seq) VALUES (1, ?, ?) "
                        "ON CONFLICT (id) DO UPDATE SET revision = excluded.revision, seq = excluded.seq");
  if (!st) return st.error();
  if (auto s = st->bind(1, kv.mod_revision).bind(2, *seq).run(); !s) return s;
  if (auto s = tx.commit(); !s) return s.error().with_context(where);
  applied_rev_ = kv.mod_revision;
  applied_seq_ = *seq;
  tables.insert(touched.begin(), touched.end());
  return {};
}

bool ControlLog::wait_applied(int64_t revision, std::chrono::milliseconds timeout) {
  std::unique_lock lock(state_mu_);
  return applied_cv_.wait_for(lock, timeout, [&] { return applied_rev_.load() >= revision; });
}

void ControlLog::start() {
  if (watcher_.joinable()) return;
  stopping_ = false;
  watcher_ = std::thread([this] {
    int64_t failures = 0;
    while (!stopping_) {
      auto s = poll(std::chrono::milliseconds(500));
      if (s) {
        failures = 0;
        continue;
      }
      if (failures++ == 0) log::get("hub")->warn("control log watcher: {}", s.error().message);
      // Back off (bounded) before trying again; stop() wakes it.
      std::unique_lock lock(state_mu_);
      applied_cv_.wait_for(lock, std::chrono::milliseconds(std::min<int64_t>(2000, 250 * failures)),
                           [&] { return stopping_.load(); });
    }
  });
}

void ControlLog::stop() {
  {
    std::lock_guard lock(state_mu_);
    stopping_ = true;
  }
  applied_cv_.notify_all();
  if (watcher_.joinable()) watcher_.join();
}

ControlLog::Counters ControlLog::counters() const {
  std::lock_guard lock(state_mu_);
  return counters_;
}

std::string ControlLog::stuck_reason() const {
  std::lock_guard lock(state_mu_);
  return stuck_;
}

}  // namespace flotilla::hub
