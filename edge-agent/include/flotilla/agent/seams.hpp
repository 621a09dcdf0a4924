#pragma once
// The agent core's seams, owned here by their consumer: the k3s runtime it
// drives, the file tree it installs into and the store that remembers what
// it applied. Real implementations: runtime/direct_k3s_runtime.cpp,
// disk_file_tree.cpp, sqlite_state_store.cpp. The simulator brings in-memory ones.
#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "flotilla/common/result.hpp"

namespace flotilla::agent {

struct K3sHealth {
  bool api_ready = false;   // `k3s kubectl get --raw /readyz` answered ok
  bool node_ready = false;  // the node's Ready condition is True
  std::string detail;       // why not, for the report
  bool ok() const { return api_ready && node_ready; }
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
};

struct PlacedFile {
  std::string path;
  std::string sha256_hex;
};

// What the agent must remember across restarts.
struct AppliedState {
  std::string bundle_name;
  std::string channel;
  uint64_t version = 0;
  std::string manifest_sha256_hex;
  uint64_t generation = 0;           // last desired generation with a final outcome
  std::string campaign_id;
  std::vector<PlacedFile> files;     // what the applied bundle placed
  std::map<std::string, uint64_t> highest_version;  // per channel, anti-rollback
};

class StateStore {
 public:
  virtual ~StateStore() = default;
  virtual Result<AppliedState> load() = 0;
  virtual Status save(const AppliedState& s) = 0;
};

}  // namespace flotilla::agent
