#pragma once
// Coordination between hub processes (issue 17, docs/adr/0014): one small
// interface — leases, create-if-absent, compare-and-swap on a key's mod
// revision, get/range by prefix, delete, and a resumable prefix watch — with
// two backends, as k3s does: an embedded SQLite file (the default, one hub)
// and etcd 3.4 through its v3 JSON gateway (several hubs).
//
// Both backends share etcd's model, so code written against one runs on the
// other: one store-wide revision, bumped once per write transaction; every
// key carries its create and mod revisions; a key attached to a lease is
// deleted when the lease expires. Ownership-dependent writes are fenced by
// the owner key's lease and revisions inside the same transaction
// (CellOwnership, below): a lock alone is not a lock (etcd#11457).
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "flotilla/common/clock.hpp"
#include "flotilla/common/options.hpp"
#include "flotilla/common/result.hpp"

namespace flotilla::hub::coord {

using LeaseId = int64_t;  // 0 = no lease

// Bounds on what goes in and comes out (both backends enforce the same).
inline constexpr size_t kMaxKeyBytes = 1024;
inline constexpr size_t kMaxValueBytes = 1u << 20;
inline constexpr size_t kMaxOpsPerTxn = 128;   // etcd's default --max-txn-ops
inline constexpr size_t kMaxRangeLimit = 10000;

struct KeyValue {
  std::string key;
  std::string value;
  int64_t create_revision = 0;
  int64_t mod_revision = 0;
  int64_t version = 0;  // writes since creation, 1 for a new key
  LeaseId lease = 0;
};

struct Lease {
  LeaseId id = 0;
  std::chrono::seconds ttl{0};
};

// One condition of a transaction, always "equal": etcd's other comparisons
// are not needed here and would double the surface of both backends.
struct Compare {
  enum class Target { create_revision, mod_revision, version, lease, value };
  std::string key;
  Target target = Target::mod_revision;
  int64_t number = 0;   // for the revision, version and lease targets
  std::string value;    // for Target::value
  // create_revision == 0: the key does not exist.
  static Compare absent(std::string key) { return {std::move(key), Target::create_revision, 0, {}}; }
  static Compare mod_revision_is(std::string key, int64_t rev) { return {std::move(key), Target::mod_revision, rev, {}}; }
  static Compare create_revision_is(std::string key, int64_t rev) {
    return {std::move(key), Target::create_revision, rev, {}};
  }
  static Compare lease_is(std::string key, LeaseId lease) { return {std::move(key), Target::lease, lease, {}}; }
};

struct Op {
  enum class Kind { put, remove };
  Kind kind = Kind::put;
  std::string key;
  std::string value;
  LeaseId lease = 0;
  static Op put(std::string key, std::string value, LeaseId lease = 0) {
    return {Kind::put, std::move(key), std::move(value), lease};
  }
  static Op remove(std::string key) { return {Kind::remove, std::move(key), {}, 0}; }
};

struct TxnResult {
  bool succeeded = false;
  int64_t revision = 0;  // the store's revision after the transaction
};

struct RangeResult {
  std::vector<KeyValue> kvs;  // in key order
  bool more = false;          // truncated at the limit
  int64_t revision = 0;       // the store's revision the range was read at
};

struct WatchEvent {
  enum class Type { put, remove };
  Type type = Type::put;
  KeyValue kv;  // for remove: key and mod_revision (the deletion's revision)
};

// A prefix watch. Events arrive in revision order, each exactly once, from
// the revision it was opened at. After an error the caller opens a new watch
// from last_revision() + 1 and misses nothing — unless the history was
// compacted past it (compacted_at() > 0), when it must re-read with range().
class Watch {
 public:
  virtual ~Watch() = default;
  // Waits up to `wait` for events; an empty vector means none yet.
  virtual Result<std::vector<WatchEvent>> next(std::chrono::milliseconds wait) = 0;
  // The revision of the last event delivered (or the start revision - 1).
  virtual int64_t last_revision() const = 0;
  // > 0 when the start revision was compacted away: the oldest revision kept.
  virtual int64_t compacted_at() const = 0;
};

class Coordinator {
 public:
  virtual ~Coordinator() = default;
  virtual std::string_view backend() const = 0;  // "sqlite" or "etcd"

  // Leases. keep_alive and ttl answer not_found for a lease that expired or
  // was revoked: that is how a holder notices it lost everything under it.
  virtual Result<Lease> grant_lease(std::chrono::seconds ttl) = 0;
  virtual Result<std::chrono::seconds> keep_alive(LeaseId id) = 0;
  virtual Result<std::chrono::seconds> lease_ttl(LeaseId id) = 0;
  virtual Status revoke_lease(LeaseId id) = 0;  // a lease already gone is fine

  virtual Result<std::optional<KeyValue>> get(const std::string& key) = 0;
  // Keys starting with prefix, at most `limit` (1..kMaxRangeLimit).
  virtual Result<RangeResult> range(const std::string& prefix, size_t limit) = 0;
  // All compares hold → all ops apply at one new revision; else nothing does.
  virtual Result<TxnResult> txn(const std::vector<Compare>& compares, const std::vector<Op>& ops) = 0;
  // Events for keys under prefix from revision `from` (0 = from now on).
  virtual Result<std::unique_ptr<Watch>> watch(const std::string& prefix, int64_t from) = 0;

  // The shapes everyone needs, on top of txn.
  // Creates key only if absent: already_exists otherwise. Returns the revision.
  Result<int64_t> create(const std::string& key, const std::string& value, LeaseId lease = 0);
  // Writes key only if its mod revision is still `expected` (0 = absent):
  // conflict otherwise. Returns the new revision.
  Result<int64_t> compare_and_swap(const std::string& key, int64_t expected, const std::string& value,
                                   LeaseId lease = 0);
  Result<int64_t> put(const std::string& key, const std::string& value, LeaseId lease = 0);
  // true when the key existed.
  Result<bool> remove(const std::string& key);
};

// Shared by both backends: the bounds above, as clear errors.
Status validate_txn(const std::vector<Compare>& compares, const std::vector<Op>& ops);
Status validate_key(const std::string& key);

// ---- Backends ----------------------------------------------------------

struct SqliteCoordOptions {
  std::string path;                 // e.g. <data-dir>/coord.db
  // Watch history kept for resuming; older revisions are compacted.
  int64_t history_revisions = 100000;
};
// The embedded store. Lease expiry follows `clock` (a FakeClock in tests)
// and is applied at every call; watches are woken in-process at once and
// poll the file for writes by other processes.
Result<std::unique_ptr<Coordinator>> open_sqlite_coordinator(const SqliteCoordOptions& opts,
                                                             const Clock& clock = SystemClock::instance());

struct EtcdOptions {
  // http://host:port or https://host:port client URLs of the members; tried
  // in order, moving on to the next when one cannot be reached.
  std::vector<std::string> endpoints;
  // https endpoints: the CA that signed the members' certificates (empty =
  // the system store) and, for client-certificate authentication, both of
  // cert and key (docs/operations.md, "Coordination").
  std::string ca_file;
  std::string cert_file;
  std::string key_file;
  std::chrono::milliseconds request_timeout{5000};   // per endpoint
  std::chrono::milliseconds connect_timeout{1000};   // per endpoint
  size_t max_response_bytes = 16u << 20;
};
// Checks the options; does not connect (etcd may come later: degraded mode).
Result<std::unique_ptr<Coordinator>> open_etcd_coordinator(const EtcdOptions& opts);

// ---- Hub settings ------------------------------------------------------

struct CoordinationConfig {
  enum class Backend { sqlite, etcd };
  Backend backend = Backend::sqlite;
  EtcdOptions etcd;
};
void add_coordination_options(Options& o);
Result<CoordinationConfig> coordination_config_from(const Options& o);
// The configured backend; sqlite lives in <data_dir>/coord.db.
Result<std::unique_ptr<Coordinator>> open_coordinator(const CoordinationConfig& cfg, const std::string& data_dir);

// ---- Fencing -----------------------------------------------------------

// Proof of ownership that guarded writes carry: the owner key as this holder
// created it. A write guarded by it applies only while that very key — same
// lease, same create and mod revision — still exists, so a holder that lost
// the key (lease expired, cell taken over, key re-created by anyone) cannot
// write with an old token even if it still believes it owns the cell.
struct Fence {
  std::string owner_key;
  LeaseId lease = 0;
  int64_t revision = 0;  // the owner key's create (= mod) revision: the token
};

// The guards a fenced write adds to its transaction.
std::vector<Compare> fence_compares(const Fence& fence);
// ops applied only under the fence: refused ("stale fence") otherwise.
Result<TxnResult> guarded_txn(Coordinator& c, const Fence& fence, std::vector<Compare> extra, const std::vector<Op>& ops);

// Cells claimed by one hub process under one lease:
// /flotilla/cells/<id>/owner holds the holder's name. Not thread-safe: one
// owner per process drives it (claims, renew on a timer, guarded writes).
class CellOwnership {
 public:
  CellOwnership(Coordinator& c, std::string holder, std::chrono::seconds ttl,
                const Clock& clock = SystemClock::instance());
  static std::string owner_key(const std::string& cell);
  // The prefix of every cell's owner key, and the cell an owner key names
  // (nullopt for any other key under it).
  static constexpr const char* kOwnersPrefix = "/flotilla/cells/";
  static std::optional<int> cell_of_owner_key(const std::string& key);
  // A cell id as keys and the API spell it: 1 to 3 decimal digits.
  static std::optional<int> parse_cell_id(std::string_view text);

  // Grants the lease (again, after the old one was lost).
  Status start();
  LeaseId lease() const { return lease_; }
  // When the coordinator last confirmed the lease (granted or kept alive).
  // Past the TTL without one, another holder may own these cells already.
  std::chrono::steady_clock::time_point last_renewed() const { return last_renew_; }
  const std::string& holder() const { return holder_; }

  // Takes the cell if nobody owns it: already_exists (naming the holder)
  // when someone does. Owning it already returns the same fence.
  Result<Fence> claim(const std::string& cell);
  // Claims each of cells that has no owner now; returns those taken.
  Result<std::vector<std::string>> claim_unowned(const std::vector<std::string>& cells);
  // Keep-alive now. A lease that is gone drops every cell (refused).
  Status renew();
  // renew() when a third of the TTL has passed since the last one.
  Status tick();
  // Re-reads every owner key and drops the cells whose key is no longer
  // ours; returns the cells lost.
  Result<std::vector<std::string>> verify();
  std::vector<std::string> cells() const;
  std::optional<Fence> fence(const std::string& cell) const;
  Status release(const std::string& cell);
  // Revokes the lease: every cell is freed at once for the others.
  Status close();

  // A write that depends on owning the cell.
  Result<TxnResult> guarded_put(const std::string& cell, const std::string& key, const std::string& value);

 private:
  Coordinator& c_;
  std::string holder_;
  std::chrono::seconds ttl_;
  const Clock& clock_;
  LeaseId lease_ = 0;
  std::chrono::steady_clock::time_point last_renew_{};
  std::map<std::string, Fence> owned_;
};

}  // namespace flotilla::hub::coord
