// The control log: SQLite changesets of the control tables, linearised in
// the coordinator (docs/adr/0016-control-log-of-changesets.md).
#define SQLITE_ENABLE_SESSION 1
#define SQLITE_ENABLE_PREUPDATE_HOOK 1
#include "flotilla/hub/control_log.hpp"

#include <sodium.h>
#include <sqlite3.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>

#include <nlohmann/json.hpp>

#include "flotilla/common/crypto.hpp"
#include "flotilla/common/encoding.hpp"
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

// The session of the control write this thread is running (LocalWrites
// pauses it).
thread_local sqlite3_session* t_session = nullptr;

struct SessionScope {
  sqlite3_session* prev;
  explicit SessionScope(sqlite3_session* s) : prev(t_session) { t_session = s; }
  ~SessionScope() { t_session = prev; }
};

void guard_open(sqlite3_context* ctx, int, sqlite3_value**) {
  sqlite3_result_int(ctx, t_open == sqlite3_user_data(ctx) ? 1 : 0);
}

// devices is shared between control operations (enrollment, labels,
// decommission) and the report path (presence, state, desired generation,
// cell moves, which stay per hub): only the control columns are guarded, and
// a report can never write them. A decommission sets the directory's column
// in the control write, and the state follows from the directory's outbox
// after it commits (ADR 18); the state guard below refuses the state
// `decommissioned` on a row whose directory column does not say so, so a
// report cannot decommission a device.
constexpr const char* kDeviceControlColumns =
    "project, labels, public_key, enrolled_ms, gateway, enroll_issued_ms, decommissioned";

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
             " AND NEW.state = 'decommissioned' AND OLD.state != 'decommissioned' AND NEW.decommissioned = 0" +
             refuse(t);
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
  sqlite3_session* raw() const { return s_; }
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

struct TableColumn {
  std::string name;
  int pk = 0;  // position in the primary key, 0 when not part of it
};

Result<std::vector<TableColumn>> table_columns(sql::Db& db, const std::string& schema, const std::string& table) {
  auto st = db.prepare("SELECT name, pk FROM pragma_table_info(?, ?) ORDER BY cid");
  if (!st) return st.error();
  st->bind(1, std::string_view(table)).bind(2, std::string_view(schema));
  std::vector<TableColumn> out;
  for (;;) {
    auto r = st->step();
    if (!r) return r.error();
    if (!*r) break;
    out.push_back({st->col_text(0), static_cast<int>(st->col_int(1))});
  }
  return out;
}

// Every table an entry changes must have, in this hub's store, the columns
// the writing hub's had. SQLite (3.40) skips the changes of a table that has
// fewer columns than the changeset and reports success, and applies those
// of one with more, leaving the extra columns unset: an entry from a hub of
// another version (a column added since, as devices.decommissioned was)
// would make the hubs' control data drift apart in silence. Checked before
// anything is applied: such an entry stops the mirror, with why.
Status check_entry_layout(sql::Db& db, const std::string& changeset) {
  sqlite3_changeset_iter* it = nullptr;
  if (sqlite3changeset_start(&it, static_cast<int>(changeset.size()), const_cast<char*>(changeset.data())) !=
      SQLITE_OK) {
    return make_error(Errc::parse, "not a changeset");
  }
  std::map<std::string, int> checked;  // table -> its column count here
  int rc = SQLITE_OK;
  Status result;
  while ((rc = sqlite3changeset_next(it)) == SQLITE_ROW) {
    const char* table = nullptr;
    int cols = 0, op = 0, indirect = 0;
    if (sqlite3changeset_op(it, &table, &cols, &op, &indirect) != SQLITE_OK || !table) {
      result = make_error(Errc::parse, "a change names no table");
      break;
    }
    auto [known, fresh] = checked.try_emplace(table, 0);
    if (fresh) {
      auto mine = table_columns(db, "main", table);
      if (!mine) {
        result = mine.error();
        break;
      }
      known->second = static_cast<int>(mine->size());
    }
    // A table this store lacks is the filter's to refuse.
    if (known->second != 0 && known->second != cols) {
      result = make_error(Errc::internal, "it changes table " + known->first + " as a table of " +
                                              std::to_string(cols) + " columns; this hub's has " +
                                              std::to_string(known->second) +
                                              " (a hub of another version wrote it: run one version on every hub "
                                              "sharing the log)");
      break;
    }
  }
  const int done = sqlite3changeset_finalize(it);
  if (!result) return result;
  if (rc != SQLITE_DONE || done != SQLITE_OK) return make_error(Errc::parse, "not a changeset");
  return {};
}

Result<int64_t> parse_seq(const std::string& text) {
  int64_t v = 0;
  auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || p != text.data() + text.size() || v <= 0) {
    return make_error(Errc::parse, "control log: bad sequence number '" + text.substr(0, 40) + "'");
  }
  return v;
}

// ---- Snapshots ----------------------------------------------------------

constexpr int kSnapshotFormat = 1;
// The value of entry 1 when a hub's existing store seeded the log: never
// applied (the seed's snapshot starts the log at entry 2), and not a
// changeset, so applying it would fail loudly.
constexpr const char* kSeedMarker = "flotilla: seeded from a hub's store; see the snapshot";

std::string chunk_key(const std::string& prefix, const std::string& id, int64_t i) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "%06lld", static_cast<long long>(i));
  return prefix + "snapshots/" + id + "/" + buf;
}

std::string manifest_json(const ControlSnapshot& m) {
  return nlohmann::json{{"format", kSnapshotFormat}, {"seq", m.seq},       {"revision", m.revision},
                        {"log_from", m.log_from},    {"id", m.id},         {"chunks", m.chunks},
                        {"bytes", m.bytes},          {"sha256", m.sha256}, {"taken_ms", m.taken_ms}}
      .dump();
}

Result<ControlSnapshot> parse_manifest(const coord::KeyValue& kv) {
  auto bad = [&](const std::string& why) {
    return make_error(Errc::parse, "control log: snapshot manifest " + kv.key + ": " + why);
  };
  auto j = nlohmann::json::parse(kv.value, nullptr, false);
  if (!j.is_object()) return bad("not a JSON object");
  if (j.value("format", 0) != kSnapshotFormat) {
    return bad("format " + j.value("format", nlohmann::json()).dump() + ", this hub reads format " +
               std::to_string(kSnapshotFormat) + " (a hub of another version wrote it)");
  }
  ControlSnapshot m;
  try {
    m.seq = j.at("seq").get<int64_t>();
    m.revision = j.at("revision").get<int64_t>();
    m.log_from = j.at("log_from").get<int64_t>();
    m.id = j.at("id").get<std::string>();
    m.chunks = j.at("chunks").get<int64_t>();
    m.bytes = j.at("bytes").get<int64_t>();
    m.sha256 = j.at("sha256").get<std::string>();
    m.taken_ms = j.value("taken_ms", int64_t{0});
  } catch (const std::exception& e) {
    return bad(e.what());
  }
  const bool id_ok = !m.id.empty() && m.id.size() <= 80 &&
                     std::all_of(m.id.begin(), m.id.end(), [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '-'; });
  // The seed's manifest is written with its entry: its revision is its own.
  if (m.revision == 0) m.revision = kv.mod_revision;
  if (m.seq <= 0 || m.revision <= 0 || m.log_from <= 0 || m.log_from > m.seq + 1 || !id_ok || m.chunks <= 0 ||
      m.chunks > 1000000 || m.bytes <= 0 || m.sha256.size() != 64) {
    return bad("fields out of range");
  }
  m.mod_revision = kv.mod_revision;
  return m;
}

bool holds_seed(const std::vector<coord::WatchEvent>& events) {
  return std::any_of(events.begin(), events.end(), [](const coord::WatchEvent& ev) {
    return ev.type == coord::WatchEvent::Type::put && ev.kv.value == kSeedMarker;
  });
}

// Which entry (seq, at etcd revision) the store now holds, committed with
// the rows that entry (or snapshot) brought.
Status record_applied(sql::Db& db, int64_t revision, int64_t seq) {
  auto st = db.prepare("INSERT INTO control_log_state (id, revision, seq) VALUES (1, ?, ?) "
                       "ON CONFLICT (id) DO UPDATE SET revision = excluded.revision, seq = excluded.seq");
  if (!st) return st.error();
  return st->bind(1, revision).bind(2, seq).run();
}

// Removes a file when it goes out of scope.
struct FileGuard {
  std::string path;
  ~FileGuard() {
    std::error_code ec;
    if (!path.empty()) std::filesystem::remove(path, ec);
  }
};

// The columns of devices each hub keeps for itself (presence, reports,
// desired generation): a snapshot loaded over an existing row leaves them
// as they are. The control columns, the cell and a decommission follow it.
Result<std::vector<std::string>> hub_local_device_columns(sql::Db& db) {
  std::set<std::string> shared = {"id", "cell", "state"};
  std::string cols = kDeviceControlColumns;
  for (size_t at = 0; at < cols.size();) {
    size_t end = cols.find(',', at);
    if (end == std::string::npos) end = cols.size();
    std::string c = cols.substr(at, end - at);
    c.erase(0, c.find_first_not_of(' '));
    shared.insert(c);
    at = end + 1;
  }
  auto all = sql::query<std::string>(db, "SELECT name FROM pragma_table_info('devices', 'main')",
                                     [](const sql::Stmt& st) { return st.col_text(0); });
  if (!all) return all.error();
  std::vector<std::string> out;
  for (auto& c : *all) {
    if (!shared.count(c)) out.push_back(c);
  }
  return out;
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

ControlLog::ControlLog(sql::Db& db, StoreMutex& mu, coord::Coordinator& c, ControlLogOptions opts)
    : db_(db), mu_(mu), c_(c), opts_(std::move(opts)) {
  remove_stale_work_files();
}

void ControlLog::remove_stale_work_files() {
  // A hub killed while writing, seeding or loading a snapshot leaves its
  // work file behind (each has a random name, so nothing reuses it). One
  // store has one hub, so every such file in its directory is stale here.
  auto dir = work_path("");
  if (!dir) return;  // a store without a file has no directory
  std::error_code ec;
  std::filesystem::directory_iterator it(*dir, ec);
  for (; !ec && it != std::filesystem::directory_iterator(); it.increment(ec)) {
    const std::string name = it->path().filename().string();
    const bool ours = name.starts_with("control-snapshot-") || name.starts_with("control-seed-");
    if (!ours || !name.ends_with(".db.part")) continue;
    std::error_code rm;
    if (std::filesystem::remove(it->path(), rm)) {
      log::get("hub")->info("control log: removed {} (left by a snapshot that did not finish)", name);
    }
  }
}

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

Result<std::unique_ptr<ControlLog>> ControlLog::open(sql::Db& db, StoreMutex& mu, coord::Coordinator& c,
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

ControlLog::LocalWrites::LocalWrites() : session_(t_session) {
  if (!session_) return;
  auto* s = static_cast<sqlite3_session*>(session_);
  was_enabled_ = sqlite3session_enable(s, -1);
  sqlite3session_enable(s, 0);
}

ControlLog::LocalWrites::~LocalWrites() {
  if (session_) sqlite3session_enable(static_cast<sqlite3_session*>(session_), was_enabled_);
}

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
    SessionScope recording(session.raw());
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
  Status committed = record_applied(db_, r->revision, seq);
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
  // A mirror behind the oldest entry the log still has (a new hub, or one
  // away for long) starts from the snapshot rather than the history.
  auto snap = last_snapshot();
  if (!snap) {
    note_unreachable(snap.error());
    return snap.error().with_context("control log: read the snapshot");
  }
  if (*snap && applied_seq_ + 1 < (*snap)->log_from) return catch_up_by_key();
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
    if ((*w)->compacted_at() > 0) return catch_up_by_key();  // the history is gone, the entries may not be
    if (!ev) return ev.error().with_context("control log: catch up");
    if (holds_seed(*ev)) return catch_up_by_key();
    if (auto s = apply_events(*ev); !s) return s;
  }
  return {};
}

Status ControlLog::stuck(const Error& e) {
  std::lock_guard st(state_mu_);
  if (stuck_ != e.message) log::get("hub")->error("control log: {}", e.message);  // once per reason, not per retry
  stuck_ = e.message;
  return make_error(e.code, "control log: " + stuck_, e.retryable);
}

Status ControlLog::poll(std::chrono::milliseconds wait) {
  std::lock_guard pl(poll_mu_);
  if (!watch_) {
    auto w = c_.watch(log_prefix(), applied_rev_ + 1);
    if (!w) return w.error();
    watch_ = std::move(*w);
  }
  auto ev = watch_->next(wait);
  if (watch_->compacted_at() > 0) {
    // etcd compacted the revisions this watch starts from: read the
    // entries by key instead (or the snapshot, where they were trimmed),
    // then watch on from the head.
    watch_.reset();
    return catch_up_by_key();
  }
  if (!ev) {
    watch_.reset();  // reopened from what was applied
    return ev.error();
  }
  if (holds_seed(*ev)) {
    // The log was seeded from a hub's store meanwhile: its first entry
    // stands for the snapshot written with it.
    watch_.reset();
    return catch_up_by_key();
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
      if (ev.type != coord::WatchEvent::Type::put) continue;  // an entry deleted behind a snapshot
      if (ev.kv.mod_revision <= applied_rev_) continue;       // ours, or applied by another caller
      if (out = apply_counted(ev.kv, changed); !out) break;
    }
  }
  applied(changed);
  return out;
}

Status ControlLog::apply_counted(const coord::KeyValue& kv, std::set<std::string>& changed) {
  if (auto s = apply_entry(kv, changed); !s) {
    {
      std::lock_guard st(state_mu_);
      ++counters_.apply_failures;
    }
    return stuck(s.error());
  }
  std::lock_guard st(state_mu_);
  ++counters_.entries_applied;
  stuck_.clear();
  return {};
}

void ControlLog::applied(const std::set<std::string>& changed) {
  applied_cv_.notify_all();
  if (!changed.empty() && on_applied_) on_applied_(changed);
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
  if (auto s = check_entry_layout(db_, kv.value); !s) {
    return make_error(Errc::internal, where + " cannot be applied to this hub's store: " + s.error().message +
                                          "; the mirror stops here until it is repaired");
  }
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
  if (auto s = record_applied(db_, kv.mod_revision, *seq); !s) return s;
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
  if (opts_.snapshot_every > 0) {
    // Snapshots on a thread of their own: copying and uploading a large
    // store must not hold up following the log.
    snapshotter_ = std::thread([this] {
      for (;;) {
        {
          std::unique_lock lock(state_mu_);
          applied_cv_.wait_for(lock, opts_.snapshot_check, [&] { return stopping_.load(); });
          if (stopping_) return;
        }
        maybe_snapshot();
      }
    });
  }
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
  if (snapshotter_.joinable()) snapshotter_.join();
}

ControlLog::Counters ControlLog::counters() const {
  std::lock_guard lock(state_mu_);
  return counters_;
}

std::string ControlLog::stuck_reason() const {
  std::lock_guard lock(state_mu_);
  return stuck_;
}


// ---- Snapshots and trimming (docs/adr/0016) -----------------------------

Result<std::optional<ControlSnapshot>> ControlLog::last_snapshot() {
  auto kv = c_.get(snapshot_key());
  if (!kv) return kv.error();
  if (!*kv) return std::optional<ControlSnapshot>();
  auto m = parse_manifest(**kv);
  if (!m) return m.error();
  return std::optional<ControlSnapshot>(std::move(*m));
}

Result<std::string> ControlLog::work_path(const std::string& what) const {
  const char* file = sqlite3_db_filename(db_.raw(), "main");
  if (!file || !*file) return make_error(Errc::invalid_argument, "control log snapshot: the store has no file");
  return (std::filesystem::path(file).parent_path() / what).string();
}

Status ControlLog::copy_control_tables(const std::string& tmp, ControlSnapshot& m) {
  // A copy of the control tables at one entry, read through a connection of
  // its own inside one read transaction: the tables and the entry they are
  // at (control_log_state) commit together, so the copy is exact, and the
  // store stays open to writers meanwhile (WAL). m gets that entry's seq and
  // revision (0 for a store that has applied none).
  const char* store_file = sqlite3_db_filename(db_.raw(), "main");
  if (!store_file || !*store_file) return make_error(Errc::invalid_argument, "the store has no file");
  auto reader = sql::Db::open(store_file);
  if (!reader) return reader.error();
  auto schema = sql::query<std::pair<std::string, std::string>>(
      **reader, "SELECT name, sql FROM main.sqlite_master WHERE type = 'table'",
      [](const sql::Stmt& st) { return std::make_pair(st.col_text(0), st.col_text(1)); });
  if (!schema) return schema.error().with_context("read the schema");
  {
    auto out = sql::Db::open(tmp);
    if (!out) return out.error();
    if (auto s = (*out)->exec("PRAGMA journal_mode=DELETE; PRAGMA foreign_keys=OFF"); !s) return s;
    for (const auto& t : tables()) {
      auto it = std::find_if(schema->begin(), schema->end(), [&](const auto& p) { return p.first == t; });
      if (it == schema->end()) return make_error(Errc::internal, "the store has no table " + t);
      if (auto s = (*out)->exec(it->second); !s) return s.error().with_context("table " + t);
    }
  }
  auto attach = (*reader)->prepare("ATTACH DATABASE ? AS flotilla_snap");
  if (!attach) return attach.error();
  if (auto s = attach->bind(1, std::string_view(tmp)).run(); !s) return s;
  auto copy = [&]() -> Status {
    if (auto s = (*reader)->exec("PRAGMA foreign_keys=OFF; BEGIN"); !s) return s;
    auto st = (*reader)->prepare("SELECT revision, seq FROM main.control_log_state WHERE id = 1");
    if (!st) return st.error();
    auto r = st->step();
    if (!r) return r.error();
    m.revision = *r ? st->col_int(0) : 0;
    m.seq = *r ? st->col_int(1) : 0;
    st->reset();
    for (const auto& t : tables()) {
      if (auto s = (*reader)->exec("INSERT INTO flotilla_snap." + t + " SELECT * FROM main." + t); !s) return s;
    }
    return (*reader)->exec("COMMIT");
  };
  auto copied = copy();
  if (!copied) (void)(*reader)->exec("ROLLBACK");
  (void)(*reader)->exec("DETACH DATABASE flotilla_snap");
  if (!copied) return copied.error().with_context("copy the control tables");
  return {};
}

Status ControlLog::upload_snapshot(const std::string& tmp, ControlSnapshot& m) {
  // The chunks, under a name of its own (m.id: two hubs snapshotting the
  // same entry never touch each other's), hashing as they go.
  std::ifstream in(tmp, std::ios::binary);
  if (!in) return make_error(Errc::io, "cannot read " + tmp);
  crypto_hash_sha256_state hs;
  crypto_hash_sha256_init(&hs);
  const size_t chunk = std::clamp<size_t>(opts_.snapshot_chunk_bytes, 1024, coord::kMaxValueBytes);
  std::string buf(chunk, '\0');
  m.chunks = 0;
  m.bytes = 0;
  while (in) {
    if (stopping_) {
      drop_chunks(m);
      return make_error(Errc::unavailable, "stopped");
    }
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    const auto n = static_cast<size_t>(in.gcount());
    if (n == 0) break;
    crypto_hash_sha256_update(&hs, reinterpret_cast<const unsigned char*>(buf.data()), n);
    if (auto r = c_.put(chunk_key(opts_.prefix, m.id, m.chunks), buf.substr(0, n)); !r) {
      drop_chunks(m);
      return r.error().with_context("write chunk " + std::to_string(m.chunks));
    }
    ++m.chunks;
    m.bytes += static_cast<int64_t>(n);
  }
  unsigned char digest[crypto_hash_sha256_BYTES];
  crypto_hash_sha256_final(&hs, digest);
  m.sha256 = to_hex(digest, sizeof digest);
  m.taken_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                   std::chrono::system_clock::now().time_since_epoch()).count();
  return {};
}

void ControlLog::drop_chunks(const ControlSnapshot& m) {
  for (int64_t i = 0; i < m.chunks; ++i) (void)c_.remove(chunk_key(opts_.prefix, m.id, i));
}

Result<int64_t> ControlLog::snapshot() {
  auto old = last_snapshot();
  if (!old) return old.error().with_context("control log snapshot: read the last one");
  const ControlSnapshot prev = old->value_or(ControlSnapshot{});
  if (applied_seq_ <= prev.seq) return int64_t{0};
  auto tmp = work_path("control-snapshot-" + crypto::random_token(6) + ".db.part");
  if (!tmp) return tmp.error();
  FileGuard guard{*tmp};
  ControlSnapshot m;
  if (auto s = copy_control_tables(*tmp, m); !s) return s.error().with_context("control log snapshot");
  if (m.seq <= prev.seq) return int64_t{0};
  m.id = std::to_string(m.seq) + "-" + crypto::random_token(6);
  m.log_from = std::max<int64_t>(prev.log_from, m.seq + 1 - std::max<int64_t>(0, opts_.keep_entries));
  if (auto s = upload_snapshot(*tmp, m); !s) return s.error().with_context("control log snapshot");
  // The manifest, written only if no other hub replaced the last one
  // meanwhile.
  auto swapped = c_.compare_and_swap(snapshot_key(), prev.mod_revision, manifest_json(m));
  if (!swapped) {
    drop_chunks(m);
    if (swapped.error().code == Errc::conflict) return int64_t{0};  // another hub's snapshot won
    return swapped.error().with_context("control log snapshot: write the manifest");
  }
  m.mod_revision = *swapped;
  auto trimmed = trim(prev, m);
  {
    std::lock_guard st(state_mu_);
    ++counters_.snapshots_written;
    if (trimmed) counters_.entries_trimmed += static_cast<uint64_t>(*trimmed);
  }
  log::get("hub")->info("control log: snapshot of seq={} revision={} written ({} bytes in {} chunks); entries "
                        "before seq={} trimmed ({} deleted now)",
                        m.seq, m.revision, m.bytes, m.chunks, m.log_from, trimmed ? *trimmed : 0);
  if (!trimmed) {
    log::get("hub")->warn("control log: trimming after the snapshot of seq={}: {} (the next snapshot tries again)",
                          m.seq, trimmed.error().message);
  }
  return m.seq;
}

Result<int64_t> ControlLog::own_control_rows() {
  int64_t n = 0;
  for (const char* t : {"tokens", "bundles", "devices"}) {
    auto st = db_.prepare(std::string("SELECT COUNT(*) FROM main.") + t);
    if (!st) return st.error();
    auto r = st->step();
    if (!r) return r.error();
    n += st->col_int(0);
    st->reset();
  }
  return n;
}

Status ControlLog::adopt_existing_store() {
  // A store that has control data but never followed a log (a one-hub
  // install switched to etcd) either starts the fleet's log with it, as its
  // first snapshot, or — when the log already has other hubs' data — is
  // refused before it loses anything: loading the log's snapshot would
  // replace its rows.
  if (applied_seq_ > 0) return {};
  auto own = own_control_rows();
  if (!own) return own.error();
  if (*own == 0) return {};
  const std::string mine = "this hub's store has control data of its own (" + std::to_string(*own) +
                           " tokens, bundles and devices) that is not in the control log";
  auto head = c_.get(head_key());
  auto snap = head ? last_snapshot() : Result<std::optional<ControlSnapshot>>(head.error());
  if (!snap) {
    return make_error(Errc::unavailable, mine + ", and the log cannot be read to decide whether this store starts "
                                                "it (" + snap.error().message + "); start the hub again when it can");
  }
  if (*head || *snap) {
    return make_error(Errc::conflict, mine + ", and the log already holds other hubs' data; nothing was changed. "
                                             "Start this hub from an empty data dir, or, to make this store the "
                                             "fleet's, start it first on an etcd without /flotilla/control/");
  }
  return seed();
}

Status ControlLog::seed() {
  auto tmp = work_path("control-seed-" + crypto::random_token(6) + ".db.part");
  if (!tmp) return tmp.error();
  FileGuard guard{*tmp};
  ControlSnapshot m;
  if (auto s = copy_control_tables(*tmp, m); !s) return s.error().with_context("control log seed");
  // The log's first entry is the seed: a marker no hub applies (log_from
  // is 2), written in one transaction with the head and the manifest, which
  // therefore carries no revision of its own (it is the manifest's).
  m.seq = 1;
  m.revision = 0;
  m.log_from = 2;
  m.id = "seed-" + crypto::random_token(6);
  if (auto s = upload_snapshot(*tmp, m); !s) return s.error().with_context("control log seed");
  auto r = c_.txn({coord::Compare::absent(head_key()), coord::Compare::absent(snapshot_key())},
                  {coord::Op::put(entry_key(log_prefix(), 1), kSeedMarker), coord::Op::put(head_key(), "1"),
                   coord::Op::put(snapshot_key(), manifest_json(m))});
  if (!r || !r->succeeded) {
    drop_chunks(m);
    if (!r) return r.error().with_context("control log seed");
    return make_error(Errc::conflict, "another hub started the control log first; this hub's store has control "
                                      "data of its own that is not in it: start it from an empty data dir");
  }
  {
    std::lock_guard lock(mu_);
    if (auto s = record_applied(db_, r->revision, 1); !s) return s.error().with_context("control log seed");
    applied_rev_ = r->revision;
    applied_seq_ = 1;
  }
  log::get("hub")->info("control log: this hub's store seeded the fleet's control log ({} bytes of control data "
                        "as its first snapshot, revision={})",
                        m.bytes, r->revision);
  return {};
}

Result<int64_t> ControlLog::trim(const ControlSnapshot& old, const ControlSnapshot& now) {
  // The entries the new snapshot made redundant, by key (entry keys are
  // their seq), in transactions of the coordinator's largest size; then the
  // old snapshot's chunks. A hub that still needs a deleted entry loads the
  // snapshot instead.
  int64_t deleted = 0;
  std::vector<coord::Op> ops;
  auto flush = [&]() -> Status {
    if (ops.empty()) return {};
    auto r = c_.txn({}, ops);
    if (!r) return r.error();
    ops.clear();
    return {};
  };
  // From the old snapshot's log_from, or from its own entry when that is
  // below (the seed: its entry 1 is a marker that log_from 2 left out).
  for (int64_t seq = std::max<int64_t>(1, std::min(old.log_from, old.seq)); seq < now.log_from; ++seq) {
    // Stopped halfway: the next snapshot deletes the rest (deleting an
    // entry that is already gone is harmless).
    if (stopping_) return deleted;
    ops.push_back(coord::Op::remove(entry_key(log_prefix(), seq)));
    if (ops.size() == coord::kMaxOpsPerTxn) {
      if (auto s = flush(); !s) return s.error();
      deleted += static_cast<int64_t>(coord::kMaxOpsPerTxn);
    }
  }
  deleted += static_cast<int64_t>(ops.size());
  if (auto s = flush(); !s) return s.error();
  if (old.mod_revision > 0 && old.id != now.id) {
    for (int64_t i = 0; i < old.chunks; ++i) {
      ops.push_back(coord::Op::remove(chunk_key(opts_.prefix, old.id, i)));
      if (ops.size() == coord::kMaxOpsPerTxn) {
        if (auto s = flush(); !s) return s.error();
      }
    }
    if (auto s = flush(); !s) return s.error();
  }
  return deleted;
}

void ControlLog::maybe_snapshot() {
  if (opts_.snapshot_every <= 0) return;
  if (!stuck_reason().empty()) return;  // a mirror that cannot follow the log does not describe it
  auto last = last_snapshot();
  if (!last) return;  // etcd away: the next look tries again
  const int64_t since = applied_seq_ - (*last ? (*last)->seq : 0);
  if (since < opts_.snapshot_every) return;
  if (auto s = snapshot(); !s) log::get("hub")->warn("control log: snapshot: {}", s.error().message);
}

Status ControlLog::catch_up_by_key() {
  auto head = c_.get(head_key());
  if (!head) {
    note_unreachable(head.error());
    return head.error().with_context("control log: read the head");
  }
  if (!*head) return {};
  auto head_seq = parse_seq((*head)->value);
  if (!head_seq) return stuck(head_seq.error());
  auto snap = last_snapshot();
  if (!snap) {
    note_unreachable(snap.error());
    return snap.error().with_context("control log: read the snapshot");
  }
  std::set<std::string> changed;
  Status out;
  while (out && applied_seq_ < *head_seq) {
    const int64_t next = applied_seq_ + 1;
    if (*snap && next < (*snap)->log_from) {  // trimmed, or the seed: the snapshot stands for it
      out = load_snapshot(next, changed);
      continue;
    }
    auto kv = c_.get(entry_key(log_prefix(), next));
    if (!kv) {
      note_unreachable(kv.error());
      out = kv.error().with_context("control log: read entry " + std::to_string(next));
      break;
    }
    if (!*kv) {
      out = load_snapshot(next, changed);
      continue;
    }
    std::lock_guard lock(mu_);
    if (applied_seq_ >= next) continue;  // another caller applied it meanwhile
    out = apply_counted(**kv, changed);
  }
  applied(changed);
  return out;
}

Status ControlLog::load_snapshot(int64_t need, std::set<std::string>& changed) {
  auto last = last_snapshot();
  if (!last) {
    note_unreachable(last.error());
    return last.error().with_context("control log: read the snapshot");
  }
  if (!*last || (*last)->seq < need) {
    return stuck(make_error(Errc::unavailable,
                            "entry " + std::to_string(need) + " is no longer in the log and no snapshot contains it (" +
                                (*last ? "the last is at seq " + std::to_string((*last)->seq) : "there is none") +
                                "): rebuild this hub's store from an empty data dir"));
  }
  const ControlSnapshot& m = **last;
  auto tmp = work_path("control-snapshot-load-" + crypto::random_token(6) + ".db.part");
  if (!tmp) return stuck(tmp.error());
  FileGuard guard{*tmp};
  {
    // Fetched and checked whole before anything local changes.
    std::ofstream out(*tmp, std::ios::binary | std::ios::trunc);
    if (!out) return stuck(make_error(Errc::io, "control log: cannot write " + *tmp));
    crypto_hash_sha256_state hs;
    crypto_hash_sha256_init(&hs);
    int64_t bytes = 0;
    for (int64_t i = 0; i < m.chunks; ++i) {
      auto kv = c_.get(chunk_key(opts_.prefix, m.id, i));
      if (!kv) {
        note_unreachable(kv.error());
        return kv.error().with_context("control log: read snapshot " + m.id + " chunk " + std::to_string(i));
      }
      // A newer snapshot replaced this one while it was read: the next
      // attempt reads that one.
      if (!*kv) return make_error(Errc::conflict, "control log: snapshot " + m.id + " chunk " + std::to_string(i) +
                                                      " is gone (a newer snapshot replaced it); trying again", true);
      const auto& v = (*kv)->value;
      crypto_hash_sha256_update(&hs, reinterpret_cast<const unsigned char*>(v.data()), v.size());
      out.write(v.data(), static_cast<std::streamsize>(v.size()));
      bytes += static_cast<int64_t>(v.size());
    }
    out.close();
    if (!out) return stuck(make_error(Errc::io, "control log: cannot write " + *tmp));
    unsigned char digest[crypto_hash_sha256_BYTES];
    crypto_hash_sha256_final(&hs, digest);
    if (bytes != m.bytes || to_hex(digest, sizeof digest) != m.sha256) {
      return stuck(make_error(Errc::parse, "snapshot " + m.id + " of seq " + std::to_string(m.seq) +
                                               " does not match its manifest (" + std::to_string(bytes) +
                                               " bytes, sha256 " + to_hex(digest, sizeof digest) + "; expected " +
                                               std::to_string(m.bytes) + " bytes, sha256 " + m.sha256 +
                                               "); not loaded, this hub's store is unchanged"));
    }
  }
  std::lock_guard lock(mu_);
  if (applied_seq_ >= m.seq) return {};  // loaded by another caller meanwhile
  if (auto s = apply_snapshot_file(*tmp, m); !s) {
    std::lock_guard st(state_mu_);
    ++counters_.apply_failures;
    return stuck(s.error());
  }
  changed.insert(tables().begin(), tables().end());
  {
    std::lock_guard st(state_mu_);
    ++counters_.snapshots_loaded;
    stuck_.clear();
  }
  log::get("hub")->info("control log: loaded the snapshot of seq={} revision={} ({} bytes); the entries before it "
                        "are no longer in the log",
                        m.seq, m.revision, m.bytes);
  return {};
}

namespace {

std::string joined(const std::vector<std::string>& items, const std::string& prefix = "") {
  std::string out;
  for (const auto& i : items) out += (out.empty() ? "" : ", ") + prefix + i;
  return out;
}

}  // namespace

Status ControlLog::apply_snapshot_file(const std::string& path, const ControlSnapshot& m) {
  // mu_ held. The store becomes the snapshot's control data in one local
  // transaction, table by table in SQL against the attached file: the rows
  // the snapshot lacks are deleted (the log deleted them), its rows are
  // upserted, and an upsert that would change nothing writes nothing. So
  // a new hub's empty tables are filled by plain inserts, a lagging hub
  // rewrites only what changed, memory stays the page cache's (a session
  // diff held the whole difference in memory: 1 GB at 1M devices), the
  // count triggers run per row, and foreign keys are checked once at the end.
  const std::string where = "snapshot of seq " + std::to_string(m.seq);
  if (sqlite3_get_autocommit(db_.raw()) == 0) {
    return make_error(Errc::internal, where + ": cannot load inside an open transaction");
  }
  auto attach = db_.prepare("ATTACH DATABASE ? AS flotilla_snap");
  if (!attach) return attach.error();
  if (auto s = attach->bind(1, std::string_view(path)).run(); !s) return s.error().with_context(where);
  struct Detach {
    sql::Db& db;
    ~Detach() { (void)db.exec("DETACH DATABASE flotilla_snap"); }
  } detach{db_};
  Status result;
  {
    OpenScope open(this);
    sql::Transaction tx(db_);
    if (!tx.ok()) return make_error(Errc::unavailable, where + ": store: cannot begin a transaction", true);
    // Reset by SQLite when the transaction ends.
    if (auto s = db_.exec("PRAGMA defer_foreign_keys = ON"); !s) return s.error().with_context(where);
    // This hub's own columns of the devices it has stay as they are.
    auto local = hub_local_device_columns(db_);
    if (!local) return local.error().with_context(where);
    const std::set<std::string> keep(local->begin(), local->end());
    for (const auto& t : tables()) {
      auto mine = table_columns(db_, "main", t);
      auto theirs = table_columns(db_, "flotilla_snap", t);
      if (!mine) return mine.error().with_context(where);
      if (!theirs) return theirs.error().with_context(where);
      auto names = [](const std::vector<TableColumn>& cs) {
        std::vector<std::string> out;
        for (const auto& c : cs) out.push_back(c.name);
        return out;
      };
      if (theirs->empty()) return make_error(Errc::parse, where + ": it has no table " + t);
      if (names(*mine) != names(*theirs)) {
        return make_error(Errc::parse, where + ": table " + t + " has columns (" + joined(names(*theirs)) +
                                           "), this hub's has (" + joined(names(*mine)) +
                                           ") (a hub of another version wrote it?)");
      }
      std::vector<TableColumn> key_cols;
      std::vector<std::string> set_cols, set_vals;
      for (const auto& c : *mine) {
        if (c.pk > 0) {
          key_cols.push_back(c);
        } else if (t == "devices" && keep.count(c.name)) {
          continue;
        } else if (t == "devices" && c.name == "state") {
          // A decommission follows the snapshot; any other state is this hub's.
          set_cols.push_back(c.name);
          set_vals.push_back("CASE WHEN excluded.state = 'decommissioned' THEN excluded.state ELSE cur.state END");
        } else {
          set_cols.push_back(c.name);
          set_vals.push_back("excluded." + c.name);
        }
      }
      if (key_cols.empty()) return make_error(Errc::internal, where + ": table " + t + " has no primary key");
      std::sort(key_cols.begin(), key_cols.end(), [](const auto& a, const auto& b) { return a.pk < b.pk; });
      const std::string key = joined(names(key_cols));
      const std::string all = joined(names(*mine));
      if (auto s = db_.exec("DELETE FROM main." + t + " WHERE (" + key + ") NOT IN (SELECT " + key +
                            " FROM flotilla_snap." + t + ")");
          !s) {
        return s.error().with_context(where + ": table " + t);
      }
      std::string upsert = "INSERT INTO main." + t + " AS cur (" + all + ") SELECT " + all + " FROM flotilla_snap." +
                           t + " WHERE true ON CONFLICT (" + key + ") DO ";
      if (set_cols.empty()) {
        upsert += "NOTHING";
      } else {
        std::string assign;
        for (size_t i = 0; i < set_cols.size(); ++i) {
          assign += (i ? ", " : "") + set_cols[i] + " = " + set_vals[i];
        }
        upsert += "UPDATE SET " + assign + " WHERE (" + joined(set_cols, "cur.") + ") IS NOT (" + joined(set_vals) + ")";
      }
      if (auto s = db_.exec(upsert); !s) return s.error().with_context(where + ": table " + t);
    }
    if (auto s = record_applied(db_, m.revision, m.seq); !s) return s;
    result = tx.commit();
    if (!result) {
      std::string why = result.error().message;
      if (why.find("FOREIGN KEY") != std::string::npos) why = "it breaks foreign keys: " + why;
      return make_error(Errc::internal, where + " cannot be applied to this hub's store: " + why);
    }
  }
  applied_rev_ = m.revision;
  applied_seq_ = m.seq;
  return {};
}

}  // namespace flotilla::hub
