#pragma once
// The control log (issue 17, docs/adr/0016): with several hub processes, the
// control data (tokens, bundles, campaigns, audit, trust, device registry
// rows, certificates, declarative objects, Git repositories) has one truth,
// a linearised log of SQLite changesets in the coordinator, and every hub
// keeps a mirror of it in its own SQLite so every query works unchanged.
//
// A control write runs its closure inside one local transaction with a
// session recording the control tables; the changeset becomes the next log
// entry in a coordinator transaction that holds only if the log's head is
// still where this mirror applied it. Then, and only then, the local
// transaction commits (with the revision applied). Head moved: roll back,
// apply the missing entries, run the closure again. Coordinator unreachable:
// roll back and refuse (coordination_unavailable). Nothing is half-written.
//
// A watcher applies the other hubs' entries in log order, each in its own
// local transaction with its revision. Writes to the control tables made on
// the store's connection outside a control write (or the applier) are
// refused by SQLite itself (temporary triggers): a control write cannot
// escape the log.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "flotilla/common/result.hpp"
#include "flotilla/common/sqlite.hpp"
#include "flotilla/hub/coord.hpp"
#include "flotilla/hub/store_mutex.hpp"

namespace flotilla::hub {

struct ControlLogOptions {
  std::string prefix = "/flotilla/control/";
  // Head moved under a write this many times in a row: conflict.
  int max_retries = 8;
  // How long a write waits to catch up with the log before it gives up.
  std::chrono::milliseconds catch_up_timeout{10000};
  // After the coordinator could not be reached, writes in this window are
  // refused at once with that error instead of each waiting for every
  // member's timeout while holding the store (report batches wait on it).
  std::chrono::milliseconds unreachable_hold{1000};
  // Snapshots (docs/adr/0016, "Snapshots and trimming"): once the log has
  // grown `snapshot_every` entries past the last snapshot, a hub writes the
  // control tables as they stand at one entry to the coordinator and deletes
  // the entries older than `keep_entries` before it. A hub that needs
  // entries that are gone (trimmed, or etcd's history compacted) loads the
  // snapshot and follows the log from there. 0 = never snapshot.
  int64_t snapshot_every = 10000;
  int64_t keep_entries = 1000;
  // How often the watcher looks whether a snapshot is due.
  std::chrono::milliseconds snapshot_check{5000};
  // One coordinator value per chunk of a snapshot (at most the value bound).
  size_t snapshot_chunk_bytes = 512 * 1024;
};

// The last snapshot of the control tables, as the coordinator's
// <prefix>snapshot key describes it.
struct ControlSnapshot {
  int64_t seq = 0;       // the last entry it contains
  int64_t revision = 0;  // that entry's revision
  int64_t log_from = 1;  // the oldest entry still in the log
  std::string id;        // its chunks live under <prefix>snapshots/<id>/
  int64_t chunks = 0;
  int64_t bytes = 0;
  std::string sha256;    // of the whole file, hex
  int64_t taken_ms = 0;
  int64_t mod_revision = 0;  // of the manifest key (0 = no snapshot yet)
};

class ControlLog {
 public:
  // The tables whose rows are control data (the devices table only for the
  // columns control operations write; see control_log.cpp).
  static const std::vector<std::string>& tables();

  // db is the hub store's connection and mu what serialises its use. Creates
  // the local control_log_state table and the guard triggers; starts nothing.
  static Result<std::unique_ptr<ControlLog>> open(sql::Db& db, StoreMutex& mu, coord::Coordinator& c,
                                                  ControlLogOptions opts = {});
  ~ControlLog();
  ControlLog(const ControlLog&) = delete;
  ControlLog& operator=(const ControlLog&) = delete;

  // Runs fn as one control write (see above); fn may run more than once and
  // must take its inputs afresh each time. Inside another control write on
  // the same thread it simply runs fn (the outer write carries its changes).
  // guard: compares the entry also depends on, checked in the same
  // transaction as the append (a campaign leader's key, so a deposed
  // leader's decision is refused rather than serialised after its
  // successor's): when one fails the write is refused (Errc::refused) and
  // nothing is written anywhere.
  Status write(const std::function<Status()>& fn, const std::vector<coord::Compare>& guard = {});
  // Writes made in its scope by a control write on this thread stay in this
  // hub's store and out of the write's log entry: the columns of devices
  // that are each hub's own (ADR 16) when the engine's control write sets
  // them, a device's desired generation, bundle and campaign. Without it
  // each released device's new generation went into the entry (123 KB for a
  // tick releasing 1,000), other hubs overwrote theirs with it, and a
  // rollback (one control write, not chunked) of some 8,500 to 12,000
  // devices (about 100 to 123 bytes each) would have passed the 1 MiB entry
  // limit and been refused. Outside a control write it does nothing.
  class LocalWrites {
   public:
    LocalWrites();
    ~LocalWrites();
    LocalWrites(const LocalWrites&) = delete;
    LocalWrites& operator=(const LocalWrites&) = delete;

   private:
    void* session_ = nullptr;  // the control write's sqlite3_session, paused
    int was_enabled_ = 0;
  };
  bool in_write() const;

  // Applies the entries up to the log's head now (this thread).
  Status catch_up();
  // At start, before catch_up(): a store with control data that never
  // followed a log (a one-hub install switched to etcd) becomes the log's
  // first snapshot when the log is empty (the seed); when the log already
  // has data it is refused (conflict) and nothing changes. Any error means
  // the hub must not start. A store without such data: nothing to do.
  Status adopt_existing_store();
  // Applies what has arrived, waiting up to `wait` for more (the watcher's step).
  Status poll(std::chrono::milliseconds wait);
  // The watcher: poll() in a loop on a thread of its own until stop(); and,
  // with snapshot_every > 0, a thread that writes snapshots when due.
  void start();
  void stop();
  // Writes a snapshot at the entry this mirror has applied, unless the last
  // snapshot already covers it, then trims the log behind it. Returns the
  // snapshot's seq (0: none written — not due, or another hub wrote first).
  // Reads the store through a connection of its own: the store stays open to
  // writers while the copy runs.
  Result<int64_t> snapshot();
  // The last snapshot (nullopt: none yet).
  Result<std::optional<ControlSnapshot>> last_snapshot();

  // Waits until the mirror has applied `revision` (a write's answer on
  // another hub); false at the timeout.
  bool wait_applied(int64_t revision, std::chrono::milliseconds timeout);

  // Called after an applied entry commits, with the control tables it
  // changed (caches derived from them are refreshed there). Not called for
  // this hub's own writes. Set before start().
  void on_applied(std::function<void(const std::set<std::string>&)> f) { on_applied_ = std::move(f); }

  int64_t applied_revision() const { return applied_rev_.load(); }
  int64_t applied_seq() const { return applied_seq_.load(); }
  // The revision this thread's last control write committed at (0: none or nothing changed).
  static int64_t last_write_revision();

  struct Counters {
    uint64_t writes = 0;            // entries appended by this hub
    uint64_t retries = 0;           // a write re-run because another hub wrote first
    uint64_t refused_unavailable = 0, refused_conflict = 0, refused_too_large = 0, refused_stuck = 0;
    uint64_t refused_guard = 0;     // a write whose guard no longer held (a deposed leader's)
    uint64_t entries_applied = 0;   // other hubs' entries applied here
    uint64_t apply_failures = 0;    // entries that could not be applied (the mirror stops there)
    uint64_t snapshots_written = 0; // snapshots this hub wrote
    uint64_t snapshots_loaded = 0;  // snapshots this hub loaded (entries it needed were gone)
    uint64_t entries_trimmed = 0;   // log entries this hub deleted behind a snapshot
  };
  Counters counters() const;
  // Why the mirror stopped at an entry ("" while it follows the log).
  std::string stuck_reason() const;

 private:
  ControlLog(sql::Db& db, StoreMutex& mu, coord::Coordinator& c, ControlLogOptions opts);
  Status install();
  std::string head_key() const { return opts_.prefix + "head"; }
  std::string log_prefix() const { return opts_.prefix + "log/"; }
  Status write_once(const std::function<Status()>& fn, const std::vector<coord::Compare>& guard, bool* moved);
  // Applies watch events in order (store lock held inside).
  Status apply_events(const std::vector<coord::WatchEvent>& events);
  Status apply_entry(const coord::KeyValue& kv, std::set<std::string>& tables);
  // apply_entry, counted; a failure stops the mirror there (stuck). mu_ held.
  Status apply_counted(const coord::KeyValue& kv, std::set<std::string>& changed);
  // After entries were applied: wakes the waiters, refreshes the caches.
  void applied(const std::set<std::string>& changed);
  Status refuse_if_unreachable();
  std::string snapshot_key() const { return opts_.prefix + "snapshot"; }
  // The entries this mirror needs, read one by one by key up to the head:
  // for when the watch cannot deliver them (etcd compacted its history),
  // loading the snapshot where entries were trimmed.
  Status catch_up_by_key();
  // Loads the last snapshot, which must contain entry `need`; `changed`
  // gets every control table.
  Status load_snapshot(int64_t need, std::set<std::string>& changed);
  Status apply_snapshot_file(const std::string& path, const ControlSnapshot& m);
  Result<int64_t> trim(const ControlSnapshot& old, const ControlSnapshot& now);
  // Copies the control tables into the SQLite file tmp; m gets the entry
  // they are at.
  Status copy_control_tables(const std::string& tmp, ControlSnapshot& m);
  // Puts tmp's chunks under m.id; m gets chunks, bytes, sha256, taken_ms.
  Status upload_snapshot(const std::string& tmp, ControlSnapshot& m);
  void drop_chunks(const ControlSnapshot& m);
  // Rows of tokens, bundles and devices in the store.
  Result<int64_t> own_control_rows();
  Status seed();
  // The snapshotter's periodic look at whether a snapshot is due.
  void maybe_snapshot();
  // Where snapshot files are built and loaded: the store's directory.
  Result<std::string> work_path(const std::string& what) const;
  // Removes the work files of snapshots a killed hub left in the store's directory.
  void remove_stale_work_files();
  // The mirror cannot go on: stuck until repaired or rebuilt.
  Status stuck(const Error& e);
  void note_unreachable(const Error& e);

  sql::Db& db_;
  StoreMutex& mu_;
  coord::Coordinator& c_;
  ControlLogOptions opts_;
  std::atomic<int64_t> applied_rev_{0}, applied_seq_{0};
  std::function<void(const std::set<std::string>&)> on_applied_;
  std::unique_ptr<coord::Watch> watch_;  // the watcher's (poll() callers hold poll_mu_)
  std::mutex poll_mu_;
  mutable std::mutex state_mu_;
  std::condition_variable applied_cv_;
  Counters counters_;
  std::string stuck_;
  std::chrono::steady_clock::time_point unreachable_since_{};
  std::string unreachable_error_;
  std::atomic<bool> stopping_{false};
  std::thread watcher_;
  std::thread snapshotter_;  // maybe_snapshot() every snapshot_check
};

}  // namespace flotilla::hub
