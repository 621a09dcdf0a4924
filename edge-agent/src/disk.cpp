#include "flotilla/agent/disk.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>

#include "flotilla/common/crypto.hpp"
#include "flotilla/common/fs.hpp"

namespace flotilla::agent {

namespace {
Error errno_error(const std::string& what, const std::filesystem::path& p) {
  return make_error(Errc::io, what + " " + p.string() + ": " + std::strerror(errno));
}

// Streams `from` into a new file `to` with `mode`, fsynced.
Status copy_file(const std::filesystem::path& from, const std::filesystem::path& to, unsigned mode) {
  int in = ::open(from.c_str(), O_RDONLY | O_CLOEXEC);
  if (in < 0) return errno_error("open", from);
  int out = ::open(to.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
  if (out < 0) {
    auto e = errno_error("create", to);
    ::close(in);
    return e;
  }
  char buf[65536];
  Status st;
  for (;;) {
    ssize_t n = ::read(in, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) { st = errno_error("read", from); break; }
    if (n == 0) break;
    for (ssize_t off = 0; off < n;) {
      ssize_t w = ::write(out, buf + off, static_cast<size_t>(n - off));
      if (w < 0 && errno == EINTR) continue;
      if (w < 0) { st = errno_error("write", to); break; }
      off += w;
    }
    if (!st) break;
  }
  if (st && (::fchmod(out, mode) != 0 || ::fsync(out) != 0)) st = errno_error("sync", to);
  ::close(in);
  ::close(out);
  if (!st) ::unlink(to.c_str());
  return st;
}
}  // namespace

Result<std::optional<std::string>> sha256_file_hex(const std::filesystem::path& p) {
  int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT || errno == ENOTDIR) return std::optional<std::string>();
    return errno_error("open", p);
  }
  crypto::Sha256Stream h;
  char buf[65536];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      auto e = errno_error("read", p);
      ::close(fd);
      return e;
    }
    if (n == 0) break;
    h.update(reinterpret_cast<const uint8_t*>(buf), static_cast<size_t>(n));
  }
  ::close(fd);
  auto d = h.finish();
  return std::optional<std::string>(to_hex(d.data(), d.size()));
}

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
  (void)fs::fsync_dir(p.parent_path());
  return {};
}

Result<uint64_t> DiskFileTree::free_bytes(const std::string& path) {
  auto p = host_path(path);
  while (!std::filesystem::exists(p) && p.has_parent_path() && p != p.parent_path()) p = p.parent_path();
  return fs::free_bytes(p);
}

Result<uint64_t> DiskFileTree::total_bytes(const std::string& path) {
  auto p = host_path(path);
  while (!std::filesystem::exists(p) && p.has_parent_path() && p != p.parent_path()) p = p.parent_path();
  return fs::total_bytes(p);
}

bool DiskFileTree::exists(const std::string& path) {
  struct stat st {};
  return ::lstat(host_path(path).c_str(), &st) == 0;
}

Result<std::optional<std::string>> DiskFileTree::sha256_hex(const std::string& path) {
  return sha256_file_hex(host_path(path));
}

Result<uint64_t> DiskFileTree::size_of(const std::string& path) {
  struct stat st {};
  const auto p = host_path(path);
  if (::stat(p.c_str(), &st) != 0) return errno_error("stat", p);
  return static_cast<uint64_t>(st.st_size);
}

Status DiskFileTree::preserve(const std::string& path, const std::string& backup) {
  const auto from = host_path(path);
  const auto to = host_path(backup);
  if (auto s = fs::ensure_dir(to.parent_path(), 0700); !s) return s;
  ::unlink(to.c_str());
  // A hard link costs no space and no copy; the install then replaces `path`
  // by rename, so the link keeps the old content. Across filesystems: copy.
  if (::link(from.c_str(), to.c_str()) != 0) {
    if (errno != EXDEV && errno != EPERM && errno != EMLINK) return errno_error("link", to);
    struct stat st {};
    if (::stat(from.c_str(), &st) != 0) return errno_error("stat", from);
    if (auto s = copy_file(from, to, st.st_mode & 07777); !s) return s;
  }
  return fs::fsync_dir(to.parent_path());
}

Status DiskFileTree::rename(const std::string& from, const std::string& to, std::optional<unsigned> mode) {
  const auto f = host_path(from);
  const auto t = host_path(to);
  if (auto s = fs::ensure_dir(t.parent_path()); !s) return s;
  if (mode && ::chmod(f.c_str(), *mode) != 0) return errno_error("chmod", f);
  if (::rename(f.c_str(), t.c_str()) != 0) {
    if (errno != EXDEV) return errno_error("rename to " + t.string() + " from", f);
    // Another filesystem: copy next to the target, then rename there.
    const auto tmp = t.parent_path() / ("." + t.filename().string() + ".tmp-" + crypto::random_token(6));
    struct stat st {};
    if (::stat(f.c_str(), &st) != 0) return errno_error("stat", f);
    if (auto s = copy_file(f, tmp, mode ? *mode : (st.st_mode & 07777)); !s) return s;
    if (::rename(tmp.c_str(), t.c_str()) != 0) {
      auto e = errno_error("rename", tmp);
      ::unlink(tmp.c_str());
      return e;
    }
    ::unlink(f.c_str());
  }
  (void)fs::fsync_dir(f.parent_path());
  return fs::fsync_dir(t.parent_path());
}

Status DiskFileTree::remove_tree(const std::string& dir) {
  std::error_code ec;
  std::filesystem::remove_all(host_path(dir), ec);
  if (ec) return make_error(Errc::io, "remove " + host_path(dir).string() + ": " + ec.message());
  return {};
}

Result<std::unique_ptr<SqliteStateStore>> SqliteStateStore::open(const std::string& path) {
  auto db = sql::Db::open(path);
  if (!db) return db.error();
  std::unique_ptr<SqliteStateStore> s(new SqliteStateStore(std::move(*db)));
  // FULL: a committed step must survive a power cut, not only a crash.
  auto st = s->db_->exec(R"SQL(
PRAGMA synchronous=FULL;
CREATE TABLE IF NOT EXISTS applied (
  id INTEGER PRIMARY KEY CHECK (id = 1), bundle_name TEXT NOT NULL, channel TEXT NOT NULL,
  version INTEGER NOT NULL, manifest_sha256 TEXT NOT NULL, generation INTEGER NOT NULL,
  campaign_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS placed_files (path TEXT PRIMARY KEY, sha256 TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS highest_version (channel TEXT PRIMARY KEY, version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS in_flight (
  id INTEGER PRIMARY KEY CHECK (id = 1), apply_id TEXT NOT NULL, generation INTEGER NOT NULL,
  campaign_id TEXT NOT NULL, bundle_name TEXT NOT NULL, version INTEGER NOT NULL, step TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS backups (
  n INTEGER PRIMARY KEY, path TEXT NOT NULL, backup TEXT NOT NULL, existed INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY, report BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS journal (
  id INTEGER PRIMARY KEY AUTOINCREMENT, apply_id TEXT NOT NULL, generation INTEGER NOT NULL,
  step TEXT NOT NULL, phase TEXT NOT NULL, time_unix_ms INTEGER NOT NULL, detail TEXT NOT NULL);
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
  // Every row of a parameterless query, handed to f.
  auto each_row = [&](const char* text, auto&& f) -> Status {
    auto q = db_->prepare(text);
    if (!q) return q.error();
    return q->each(f);
  };
  if (auto s = each_row("SELECT path, sha256 FROM placed_files ORDER BY path",
                        [&](const sql::Stmt& q) { a.files.push_back({q.col_text(0), q.col_text(1)}); });
      !s) {
    return s.error();
  }
  if (auto s = each_row("SELECT channel, version FROM highest_version",
                        [&](const sql::Stmt& q) {
                          a.highest_version[q.col_text(0)] = static_cast<uint64_t>(q.col_int(1));
                        });
      !s) {
    return s.error();
  }
  std::string snapshot_text;  // "kind\npath" of the in-flight apply's datastore snapshot
  std::string cert_backup;    // where the in-flight apply's `k3s certificate rotate` kept the old certificates
  if (auto s = each_row("SELECT key, value FROM meta",
                        [&](const sql::Stmt& q) {
                          const std::string key = q.col_text(0);
                          std::string value = q.col_blob(1);
                          if (key == "previous_manifest_sha256") a.previous_manifest_sha256_hex = value;
                          else if (key == "applied_desired") a.applied_desired = std::move(value);
                          else if (key == "interrupted_generation") a.interrupted_generation = std::stoull("0" + value);
                          else if (key == "interrupted_count")
                            a.interrupted_count = static_cast<uint32_t>(std::stoul("0" + value));
                          else if (key == "director_generation") a.director_generation = std::stoull("0" + value);
                          else if (key == "seq_reserved") a.seq_reserved = std::stoull("0" + value);
                          else if (key == "hub_time_ms") a.hub_time_ms = std::stoll("0" + value);
                          else if (key == "hub_labels_set") a.hub_labels_set = value == "1";
                          else if (key == "in_flight_snapshot") snapshot_text = value;
                          else if (key == "in_flight_cert_backup") cert_backup = value;
                          else if (key == "k3s_data_dir") a.k3s_data_dir = value;
                          else if (key == "hub_labels") {
                            // key=value lines (label keys and values never hold '=' or newlines).
                            size_t at = 0;
                            while (at < value.size()) {
                              const auto nl = value.find('\n', at);
                              const std::string line = value.substr(at, nl == std::string::npos ? nl : nl - at);
                              at = nl == std::string::npos ? value.size() : nl + 1;
                              const auto eq = line.find('=');
                              if (eq != std::string::npos) a.hub_labels[line.substr(0, eq)] = line.substr(eq + 1);
                            }
                          }
                        });
      !s) {
    return s.error();
  }
  auto ist = db_->prepare("SELECT apply_id, generation, campaign_id, bundle_name, version, step FROM in_flight");
  if (!ist) return ist.error();
  if (auto ir = ist->step(); !ir) {
    return ir.error();
  } else if (*ir) {
    InFlight f;
    f.apply_id = ist->col_text(0);
    f.generation = static_cast<uint64_t>(ist->col_int(1));
    f.campaign_id = ist->col_text(2);
    f.bundle_name = ist->col_text(3);
    f.version = static_cast<uint64_t>(ist->col_int(4));
    f.step = ist->col_text(5);
    if (auto s = each_row("SELECT path, backup, existed FROM backups ORDER BY n",
                          [&](const sql::Stmt& q) {
                            f.backups.push_back({q.col_text(0), q.col_text(1), q.col_int(2) != 0});
                          });
        !s) {
      return s.error();
    }
    if (const auto nl = snapshot_text.find('\n'); nl != std::string::npos) {
      f.snapshot = DatastoreSnapshot{snapshot_text.substr(0, nl), snapshot_text.substr(nl + 1)};
    }
    f.cert_backup = cert_backup;
    a.in_flight = std::move(f);
  }
  if (auto s = each_row("SELECT seq, report FROM outbox ORDER BY seq",
                        [&](const sql::Stmt& q) { a.outbox[static_cast<uint64_t>(q.col_int(0))] = q.col_blob(1); });
      !s) {
    return s.error();
  }
  last_ = a;
  return a;
}

namespace {
// SQLite integers are int64. A uint64 above that would be stored negative
// and read back as something else (a version of 2^63+1 compares below 1 in
// the MAX() that keeps the anti-rollback floor): refuse it instead.
Status check_stored(const AppliedState& a) {
  auto fits = [](uint64_t v) { return v <= static_cast<uint64_t>(INT64_MAX); };
  std::string what;
  if (!fits(a.version)) what = "version " + std::to_string(a.version);
  else if (!fits(a.generation)) what = "generation " + std::to_string(a.generation);
  else if (!fits(a.director_generation)) what = "director generation " + std::to_string(a.director_generation);
  else if (a.in_flight && (!fits(a.in_flight->generation) || !fits(a.in_flight->version))) what = "in-flight apply";
  for (const auto& [ch, v] : a.highest_version) {
    if (what.empty() && !fits(v)) what = "highest version " + std::to_string(v) + " of channel " + ch;
  }
  for (const auto& [seq, r] : a.outbox) {
    if (what.empty() && !fits(seq)) what = "report seq " + std::to_string(seq);
  }
  if (what.empty()) return {};
  return make_error(Errc::invalid_argument, "agent state: " + what + " is above 2^63-1 and cannot be stored");
}
}  // namespace

Status SqliteStateStore::save(const AppliedState& a) {
  if (auto s = check_stored(a); !s) return s;
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
  // Only what changed since the last save is written: an apply saves at
  // every step, and rewriting the applied desired state (bundle files
  // inline, up to MiBs) each time wore flash for nothing.
  const bool first = !last_.has_value();
  if (first || last_->files != a.files) {
  if (auto s = db_->exec("DELETE FROM placed_files"); !s) return s;
  auto ins = db_->prepare("INSERT INTO placed_files (path, sha256) VALUES (?, ?)");
  if (!ins) return ins.error();
  for (const auto& f : a.files) {
    ins->reset();
    ins->bind(1, std::string_view(f.path)).bind(2, std::string_view(f.sha256_hex));
    if (auto s = ins->run(); !s) return s;
  }
  }
  if (first || last_->highest_version != a.highest_version) {
  auto hv = db_->prepare(
      "INSERT INTO highest_version (channel, version) VALUES (?, ?) "
      "ON CONFLICT(channel) DO UPDATE SET version = MAX(version, excluded.version)");
  if (!hv) return hv.error();
  for (const auto& [ch, v] : a.highest_version) {
    hv->reset();
    hv->bind(1, std::string_view(ch)).bind(2, static_cast<int64_t>(v));
    if (auto s = hv->run(); !s) return s;
  }
  }
  auto meta = db_->prepare("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)");
  if (!meta) return meta.error();
  auto meta_of = [](const AppliedState& x) {
    std::string labels;
    for (const auto& [k, v] : x.hub_labels) labels += k + "=" + v + "\n";
    return std::vector<std::pair<std::string, std::string>>{
        {"previous_manifest_sha256", x.previous_manifest_sha256_hex},
        {"applied_desired", x.applied_desired},
        {"interrupted_generation", std::to_string(x.interrupted_generation)},
        {"interrupted_count", std::to_string(x.interrupted_count)},
        {"director_generation", std::to_string(x.director_generation)},
        {"seq_reserved", std::to_string(x.seq_reserved)},
        {"hub_time_ms", std::to_string(x.hub_time_ms)},
        {"hub_labels_set", x.hub_labels_set ? "1" : "0"},
        {"hub_labels", labels},
        {"in_flight_snapshot", x.in_flight && !x.in_flight->snapshot.kind.empty()
                                   ? x.in_flight->snapshot.kind + "\n" + x.in_flight->snapshot.path
                                   : std::string()},
        {"in_flight_cert_backup", x.in_flight ? x.in_flight->cert_backup : std::string()},
        {"k3s_data_dir", x.k3s_data_dir}};
  };
  const auto rows = meta_of(a);
  const auto before = first ? decltype(rows){} : meta_of(*last_);
  for (size_t i = 0; i < rows.size(); ++i) {
    const auto& [k, v] = rows[i];
    if (!first && before[i].second == v) continue;
    meta->reset();
    meta->bind(1, std::string_view(k)).bind_blob(2, std::string_view(v));
    if (auto s = meta->run(); !s) return s;
  }
  if (first || last_->in_flight != a.in_flight) {
  if (auto s = db_->exec("DELETE FROM in_flight; DELETE FROM backups;"); !s) return s;
  if (a.in_flight) {
    const auto& f = *a.in_flight;
    auto is = db_->prepare(
        "INSERT INTO in_flight (id, apply_id, generation, campaign_id, bundle_name, version, step) "
        "VALUES (1,?,?,?,?,?,?)");
    if (!is) return is.error();
    is->bind(1, std::string_view(f.apply_id)).bind(2, static_cast<int64_t>(f.generation))
        .bind(3, std::string_view(f.campaign_id)).bind(4, std::string_view(f.bundle_name))
        .bind(5, static_cast<int64_t>(f.version)).bind(6, std::string_view(f.step));
    if (auto s = is->run(); !s) return s;
    auto bs = db_->prepare("INSERT INTO backups (n, path, backup, existed) VALUES (?,?,?,?)");
    if (!bs) return bs.error();
    int64_t n = 0;
    for (const auto& b : f.backups) {
      bs->reset();
      bs->bind(1, n++).bind(2, std::string_view(b.path)).bind(3, std::string_view(b.backup))
          .bind(4, static_cast<int64_t>(b.existed ? 1 : 0));
      if (auto s = bs->run(); !s) return s;
    }
  }
  }
  if (first || last_->outbox != a.outbox) {
  if (auto s = db_->exec("DELETE FROM outbox"); !s) return s;
  auto ob = db_->prepare("INSERT INTO outbox (seq, report) VALUES (?, ?)");
  if (!ob) return ob.error();
  for (const auto& [seq, bytes] : a.outbox) {
    ob->reset();
    ob->bind(1, static_cast<int64_t>(seq)).bind_blob(2, bytes);
    if (auto s = ob->run(); !s) return s;
  }
  }
  if (auto s = tx.commit(); !s) {
    last_.reset();  // not known what is on disk: write everything next time
    return s;
  }
  last_ = a;
  return {};
}

Status SqliteStateStore::journal(const JournalEntry& e) {
  auto st = db_->prepare(
      "INSERT INTO journal (apply_id, generation, step, phase, time_unix_ms, detail) VALUES (?,?,?,?,?,?)");
  if (!st) return st.error();
  st->bind(1, std::string_view(e.apply_id)).bind(2, static_cast<int64_t>(e.generation))
      .bind(3, std::string_view(e.step)).bind(4, std::string_view(e.phase)).bind(5, e.time_unix_ms)
      .bind(6, std::string_view(e.detail));
  if (auto s = st->run(); !s) return s;
  // Bounded: keep the newest rows only.
  return db_->exec("DELETE FROM journal WHERE id <= (SELECT MAX(id) FROM journal) - 2000");
}

Result<std::vector<JournalEntry>> SqliteStateStore::journal_tail(size_t n) {
  auto st = db_->prepare(
      "SELECT apply_id, generation, step, phase, time_unix_ms, detail FROM "
      "(SELECT * FROM journal ORDER BY id DESC LIMIT ?) ORDER BY id");
  if (!st) return st.error();
  st->bind(1, static_cast<int64_t>(n));
  return st->rows<JournalEntry>([](const sql::Stmt& q) {
    return JournalEntry{q.col_text(0), static_cast<uint64_t>(q.col_int(1)), q.col_text(2), q.col_text(3),
                        q.col_int(4), q.col_text(5)};
  });
}

}  // namespace flotilla::agent
