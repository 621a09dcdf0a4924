#pragma once
// The agent core's seams, owned here by their consumer: the k3s runtime it
// drives (and the service manager under it), the file tree it installs into,
// the downloader that fetches artifacts and the store that remembers what it
// applied and journals each step. Real implementations:
// runtime/direct_k3s_runtime.cpp, runtime/service_managers.cpp, disk.cpp,
// daemon.cpp (HTTP downloader). The simulator brings in-memory ones; fakes
// for tests live in testing/fakes.hpp.
#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "flotilla/common/result.hpp"

namespace flotilla::agent {

struct K3sHealth {
  bool running = true;      // the k3s process (or its service) runs
  bool api_ready = false;   // `k3s kubectl get --raw /readyz` answered ok
  bool node_ready = false;  // the node's Ready condition is True
  // lastHeartbeatTime of that condition (unix seconds, k3s's clock); nullopt
  // when the runtime cannot tell. Right after a restart k3s still shows the
  // Ready it had before: only a heartbeat newer than the restart is news.
  std::optional<int64_t> heartbeat_unix;
  std::string kubelet_version;  // nodeInfo.kubeletVersion: the k3s that answers
  std::string detail;       // why not, for the report
  bool ok() const { return running && api_ready && node_ready; }
};

// A workload a bundle's health gate names, and what the cluster says of it.
struct WorkloadRef {
  std::string kind;  // Deployment, DaemonSet, StatefulSet, Job, HelmChart
  std::string ns;
  std::string name;
  std::string text() const { return kind + " " + ns + "/" + name; }
};
struct WorkloadState {
  bool ready = false;   // rolled out / succeeded
  bool failed = false;  // will not get there (a failed Job)
  std::string detail;   // "1/2 replicas available", "not found"
};

// A copy of the datastore taken before a k3s version change, to put back if
// the new k3s is rolled back (Kubernetes does not support downgrades).
struct DatastoreSnapshot {
  std::string kind;  // "etcd" (k3s etcd-snapshot), "sqlite" (a copy of state.db*), "" none taken
  std::string path;  // device path: the etcd snapshot file, or the directory holding the copies
  bool operator==(const DatastoreSnapshot&) const = default;
};

// A file the init system needs to run k3s (unit, env file, init script).
struct ServiceFile {
  std::string path;  // device path
  std::string content;
  unsigned mode = 0644;
};

class K3sRuntime {
 public:
  virtual ~K3sRuntime() = default;
  // The installed k3s version ("v1.30.4+k3s1"); empty if none is installed.
  virtual Result<std::string> version() = 0;
  // (Re)starts k3s with the current config; returns once the process runs.
  virtual Status restart() = 0;
  // Starts k3s if installed and not running (agent start-up).
  virtual Status ensure_running() = 0;
  virtual K3sHealth health() = 0;
  virtual void stop() = 0;
  // notAfter of k3s's serving certificate (unix seconds); 0 when unknown.
  virtual int64_t serving_cert_expiry() { return 0; }

  // The node's role in its cluster: "server" or "agent" (k3s agent: no API
  // server, no datastore, no auto-deployed manifests).
  virtual std::string role() const { return "server"; }
  // Where k3s keeps its data (device path; k3s's data-dir).
  virtual std::string data_dir() const { return "/var/lib/rancher/k3s"; }
  // lastHeartbeatTime of the node's Ready condition now (before a restart:
  // what the health gate must see superseded); nullopt when unknown.
  virtual std::optional<int64_t> node_heartbeat() { return std::nullopt; }
  // A workload through `k3s kubectl get ... -o json`.
  virtual Result<WorkloadState> workload(const WorkloadRef& w) {
    return make_error(Errc::unavailable, "this runtime cannot read workloads (" + w.text() + ")");
  }
  // `k3s kubectl delete -f <manifest> --ignore-not-found` of a manifest file
  // (device path) about to leave server/manifests: k3s itself deletes
  // nothing when the file goes. Returns what the cluster deleted
  // ("deployment.apps/web").
  virtual Result<std::vector<std::string>> delete_manifest(const std::string& path) {
    (void)path;
    return std::vector<std::string>{};
  }
  // Bytes the datastore takes (what a snapshot will need).
  virtual uint64_t datastore_bytes() { return 0; }
  // Before a k3s version change: `k3s etcd-snapshot save` (embedded etcd,
  // k3s running), or k3s stopped and state.db* copied into dest_dir (SQLite).
  // Leaves k3s stopped in the SQLite case. kind "" when there is nothing to
  // keep (an agent node, no datastore yet).
  virtual Result<DatastoreSnapshot> snapshot_datastore(const std::string& dest_dir, const std::string& tag) {
    (void)dest_dir;
    (void)tag;
    return DatastoreSnapshot{};
  }
  // With k3s stopped: puts the snapshot back (etcd: `k3s server
  // --cluster-reset --cluster-reset-restore-path`; SQLite: the copies).
  virtual Status restore_datastore(const DatastoreSnapshot& s) {
    (void)s;
    return {};
  }
  // With k3s stopped: `k3s certificate rotate`. Returns where k3s backed the
  // old certificates up (device path), for restore_certificates.
  virtual Result<std::string> rotate_certificates() {
    return make_error(Errc::unavailable, "this runtime cannot rotate certificates");
  }
  virtual Status restore_certificates(const std::string& backup) {
    (void)backup;
    return {};
  }
  // The directories k3s extracted its payload into (data/<hash>), by name;
  // the `current`/`previous` symlinks are not among them.
  virtual std::vector<std::string> data_dirs() { return {}; }
  // Removes those data/<hash> directories. A `current` or `previous` symlink
  // that pointed at one points at data/<running> afterwards (current) or
  // goes (previous), so k3s's own bookkeeping names no missing directory.
  virtual Status remove_data_dirs(const std::vector<std::string>& names, const std::string& running) {
    (void)names;
    (void)running;
    return {};
  }
};

// How k3s runs as a service on the device: systemd, OpenRC, or the agent
// supervising it directly. The runtime asks it to start, stop and restart k3s.
class ServiceManager {
 public:
  virtual ~ServiceManager() = default;
  virtual std::string name() const = 0;
  virtual Status restart() = 0;
  virtual Status start() = 0;
  virtual void stop() = 0;
  virtual bool active() = 0;
  // After a unit / init script was written: `systemctl daemon-reload` and
  // `enable`, or `rc-update add`.
  virtual Status install_service() { return {}; }
};

// Absolute device paths ("/etc/rancher/k3s/config.yaml"); implementations
// map them under a root.
struct FileData {
  std::string content;
  unsigned mode = 0644;  // permission bits, restored exactly on rollback
};

class FileTree {
 public:
  virtual ~FileTree() = default;
  virtual Result<std::optional<FileData>> read(const std::string& path) = 0;
  virtual Status write_atomic(const std::string& path, const std::string& content, unsigned mode) = 0;
  virtual Status remove(const std::string& path) = 0;
  virtual Result<uint64_t> free_bytes(const std::string& path) = 0;
  // Size of the filesystem holding `path` (the inventory's disk_total_bytes).
  virtual Result<uint64_t> total_bytes(const std::string& path) = 0;
  // Large files (artifacts, backups) never pass through memory:
  virtual bool exists(const std::string& path) = 0;
  // SHA-256 (hex) of a file, streamed; nullopt when it does not exist.
  virtual Result<std::optional<std::string>> sha256_hex(const std::string& path) = 0;
  virtual Result<uint64_t> size_of(const std::string& path) = 0;
  // Keeps the current content of `path` at `backup` without touching `path`
  // (a hard link where possible, else a copy with the same mode).
  virtual Status preserve(const std::string& path, const std::string& backup) = 0;
  // Atomically moves `from` over `to` (creating parent directories), setting
  // the permission bits first when given.
  virtual Status rename(const std::string& from, const std::string& to, std::optional<unsigned> mode) = 0;
  // Removes a directory and everything below it; missing is fine.
  virtual Status remove_tree(const std::string& dir) = 0;
};

// Fetches a URL into a device path, resuming a partial file already there.
// Never writes more than max_bytes in total: larger answers are too_large.
class Downloader {
 public:
  virtual ~Downloader() = default;
  virtual Status fetch(const std::string& url, const std::string& dest, uint64_t max_bytes) = 0;
};

struct PlacedFile {
  std::string path;
  std::string sha256_hex;
  bool operator==(const PlacedFile&) const = default;
};

// A file the running apply changed, and where its previous content waits.
struct BackupEntry {
  std::string path;
  std::string backup;  // device path of the preserved copy
  bool existed = false;
  bool operator==(const BackupEntry&) const = default;
};

// An apply that began and has not finished. Persisted before anything on the
// node changes, so a restart after a crash can undo a half-done install.
struct InFlight {
  std::string apply_id;
  uint64_t generation = 0;
  std::string campaign_id;
  std::string bundle_name;
  uint64_t version = 0;
  std::string step;                  // the last step begun
  std::vector<BackupEntry> backups;  // complete once step is past "backup"
  // The datastore copy taken before a k3s version change (step "snapshot"):
  // recovery puts it back if the new k3s may have started on the datastore.
  DatastoreSnapshot snapshot;
  std::string cert_backup;           // where `k3s certificate rotate` kept the old certificates
  bool operator==(const InFlight&) const = default;
};

// What the agent must remember across restarts.
struct AppliedState {
  std::string bundle_name;
  std::string channel;
  uint64_t version = 0;
  std::string manifest_sha256_hex;
  uint64_t generation = 0;           // last desired generation with a final outcome
  // The highest generation with a final outcome that came in a header signed
  // by the pinned director key: the replay floor. An unsigned generation is
  // never a floor (anyone able to publish could freeze the device with one).
  uint64_t director_generation = 0;
  std::string campaign_id;
  std::vector<PlacedFile> files;     // what the applied bundle placed (files and artifacts)
  std::map<std::string, uint64_t> highest_version;  // per channel, anti-rollback
  // The bundle applied before the current one: the only target a campaign
  // rollback may return to below the highest applied version.
  std::string previous_manifest_sha256_hex;
  // The applied desired-state message (with its signed bundle), kept to
  // repair drift without the hub.
  std::string applied_desired;
  std::optional<InFlight> in_flight;
  // Interrupted attempts of one generation: a desired state that keeps
  // crashing the agent is given up after a few.
  uint64_t interrupted_generation = 0;
  uint32_t interrupted_count = 0;
  // Final outcome reports not yet acknowledged by the broker (serialized
  // v1::Report by seq); re-sent after a restart.
  std::map<uint64_t, std::string> outbox;
  // Report sequence numbers are handed out below this; it is persisted a
  // block ahead, so a restart (or a clock set back) never reuses one.
  uint64_t seq_reserved = 0;
  // The newest issued_unix_ms of a director-signed header: a lower bound of
  // the real time, for a device clock that is wrong.
  int64_t hub_time_ms = 0;
  // The device's labels as the hub last sent them in a signed header (they
  // replace the enrollment-time labels; hub_labels_set says they were sent).
  std::map<std::string, std::string> hub_labels;
  bool hub_labels_set = false;
  // The data/<hash> directory the committed k3s runs from ("" = not known
  // yet): what the next commit keeps for a rollback, besides the new one.
  std::string k3s_data_dir;
};

// One journal row: a step of an apply, before ("begin") and after ("end").
struct JournalEntry {
  std::string apply_id;
  uint64_t generation = 0;
  std::string step;
  std::string phase;
  int64_t time_unix_ms = 0;
  std::string detail;
};

class StateStore {
 public:
  virtual ~StateStore() = default;
  virtual Result<AppliedState> load() = 0;
  // Atomic: after a crash the store holds the old or the new state, whole.
  virtual Status save(const AppliedState& s) = 0;
  virtual Status journal(const JournalEntry& e) = 0;
};

}  // namespace flotilla::agent
