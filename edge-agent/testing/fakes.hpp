#pragma once
// Hand-written fakes for the agent core's seams (seams.hpp), for unit tests.
// Each one lets a test drive what a real device cannot be made to do on cue
// and see what the agent did, without k3s, a disk or SQLite:
//  - FakeK3sRuntime: health that is good, never good, or good after N polls,
//    and a restart that can fail, so the health gate and rollback paths run
//    in milliseconds; it counts restarts so a test sees whether k3s was touched.
//  - MemFileTree: the device's files as a map, so a test can compare the whole
//    tree before and after; free space and write failures are settable to
//    reach the disk-full and install-failure paths.
//  - MemStateStore: what the agent persisted, so a second Agent over the same
//    store shows what survives a restart; it counts saves, keeps the journal
//    and can refuse saves (a full disk at the worst moment).
//  - FakeDownloader: serves artifact bytes from a map by URL into a
//    MemFileTree, can fail or truncate, and counts fetches.
#include <cstdint>
#include <functional>
#include <map>
#include <vector>
#include <optional>
#include <set>
#include <string>

#include "flotilla/agent/seams.hpp"
#include "flotilla/common/crypto.hpp"

namespace flotilla::agent::testing {

class FakeK3sRuntime final : public K3sRuntime {
 public:
  // Counts polls since the last restart: a real k3s needs time after each one.
  void set_healthy() { unhealthy_polls_ = 0; never_ = false; }
  void set_never_healthy() { never_ = true; }
  void set_healthy_after(int polls) { unhealthy_polls_ = polls; never_ = false; }

  Result<std::string> version() override { return installed_version; }
  Status restart() override {
    ++restarts;
    polls_since_restart_ = 0;
    // Like k3s: certificates a rotation removed are issued anew at the start.
    if (rotated_) {
      rotated_ = false;
      cert_expiry += renewed_by;
    }
    // Like k3s: a new binary extracts its payload at its first start.
    if (!extract_on_restart.empty()) {
      data.insert(extract_on_restart);
      current_dir = extract_on_restart;
      extract_on_restart.clear();
    }
    if (fail_restart) return make_error(Errc::io, "fake: k3s failed to start");
    return {};
  }
  Status ensure_running() override {
    ++ensure_running_calls;
    return {};
  }
  K3sHealth health() override {
    ++health_polls;
    ++polls_since_restart_;
    K3sHealth h;
    const bool ok = !never_ && polls_since_restart_ > unhealthy_polls_;
    h.api_ready = ok;
    h.node_ready = ok;
    h.heartbeat_unix = heartbeat;
    h.kubelet_version = kubelet_version;
    if (!ok) h.detail = "fake: node not ready";
    if (script) script(polls_since_restart_, h);
    return h;
  }
  std::optional<int64_t> node_heartbeat() override { return heartbeat_before; }
  Result<WorkloadState> workload(const WorkloadRef& w) override {
    ++workload_polls;
    auto it = workloads.find(w.text());
    if (it == workloads.end()) return WorkloadState{false, false, "not found"};
    return it->second;
  }
  Result<std::vector<std::string>> delete_manifest(const std::string& path) override {
    deleted_manifests.push_back(path);
    return std::vector<std::string>{"configmap/" + path.substr(path.rfind('/') + 1)};
  }
  void stop() override { ++stops; }
  int64_t serving_cert_expiry() override { return cert_expiry; }
  std::vector<std::string> data_dirs() override { return {data.begin(), data.end()}; }
  Status remove_data_dirs(const std::vector<std::string>& names, const std::string& running) override {
    for (const auto& n : names) {
      data.erase(n);
      removed_dirs.push_back(n);
      if (current_dir == n) current_dir = running;
    }
    return {};
  }
  Result<std::string> rotate_certificates() override {
    ++rotations;
    if (fail_rotate) return make_error(Errc::io, "fake: certificate rotate failed");
    rotated_ = true;
    backup_expiry_ = cert_expiry;
    return std::string("/var/lib/rancher/k3s/server/tls-fake");
  }
  Status restore_certificates(const std::string& backup) override {
    restored_certificates.push_back(backup);
    rotated_ = false;
    cert_expiry = backup_expiry_;
    return {};
  }

  std::string installed_version = "v1.30.4+k3s1";
  // What health() reports besides Ready (nullopt / "": the runtime cannot tell).
  std::optional<int64_t> heartbeat;
  std::optional<int64_t> heartbeat_before;
  std::string kubelet_version;
  // Edits each health answer (poll number since the last restart, answer).
  std::function<void(int, K3sHealth&)> script;
  std::map<std::string, WorkloadState> workloads;  // by WorkloadRef::text()
  int workload_polls = 0;
  std::vector<std::string> deleted_manifests;
  bool fail_restart = false;
  int64_t cert_expiry = 1'900'000'000;  // notAfter of the serving certificate
  int64_t renewed_by = 86400;           // how much later a rotated one expires (0: k3s did not renew)
  bool fail_rotate = false;
  std::set<std::string> data;          // data/<hash> directories
  std::string current_dir;             // what data/current points at
  std::string extract_on_restart;      // extracted (and made current) at the next restart
  std::vector<std::string> removed_dirs;
  int rotations = 0;
  std::vector<std::string> restored_certificates;
  int restarts = 0;
  int ensure_running_calls = 0;
  int health_polls = 0;
  int stops = 0;

 private:
  bool never_ = false;
  bool rotated_ = false;
  int64_t backup_expiry_ = 0;
  int unhealthy_polls_ = 0;
  int polls_since_restart_ = 0;
};

class MemFileTree final : public FileTree {
 public:
  struct Entry {
    std::string content;
    unsigned mode = 0644;
    bool operator==(const Entry&) const = default;
  };

  Result<std::optional<FileData>> read(const std::string& path) override {
    auto it = files.find(path);
    if (it == files.end()) return std::optional<FileData>();
    return std::optional<FileData>(FileData{it->second.content, it->second.mode});
  }
  Status write_atomic(const std::string& path, const std::string& content, unsigned mode) override {
    if (!fail_writes_containing.empty() && path.find(fail_writes_containing) != std::string::npos) {
      return make_error(Errc::io, "fake: write " + path + " failed");
    }
    ++writes;
    files[path] = Entry{content, mode};
    return {};
  }
  // Like the real tree, removing a missing file is not an error.
  Status remove(const std::string& path) override {
    files.erase(path);
    return {};
  }
  Result<uint64_t> free_bytes(const std::string& path) override {
    space_asked.push_back(path);
    return free;
  }
  Result<uint64_t> total_bytes(const std::string& path) override {
    space_asked.push_back(path);
    return total;
  }
  bool exists(const std::string& path) override { return files.count(path) > 0; }
  Result<std::optional<std::string>> sha256_hex(const std::string& path) override {
    auto it = files.find(path);
    if (it == files.end()) return std::optional<std::string>();
    return std::optional<std::string>(crypto::sha256_hex(it->second.content));
  }
  Result<uint64_t> size_of(const std::string& path) override {
    auto it = files.find(path);
    if (it == files.end()) return make_error(Errc::not_found, "fake: no " + path);
    return static_cast<uint64_t>(it->second.content.size());
  }
  Status preserve(const std::string& path, const std::string& backup) override {
    auto it = files.find(path);
    if (it == files.end()) return make_error(Errc::not_found, "fake: no " + path);
    files[backup] = it->second;
    return {};
  }
  Status rename(const std::string& from, const std::string& to, std::optional<unsigned> mode) override {
    if (!fail_writes_containing.empty() && to.find(fail_writes_containing) != std::string::npos) {
      return make_error(Errc::io, "fake: rename to " + to + " failed");
    }
    auto it = files.find(from);
    if (it == files.end()) return make_error(Errc::not_found, "fake: no " + from);
    Entry e = it->second;
    if (mode) e.mode = *mode;
    files.erase(it);
    files[to] = std::move(e);
    return {};
  }
  Status remove_tree(const std::string& dir) override {
    const std::string prefix = dir + "/";
    for (auto it = files.begin(); it != files.end();) {
      it = it->first.rfind(prefix, 0) == 0 ? files.erase(it) : std::next(it);
    }
    return {};
  }
  // The tree without the agent's own state directory (staging, backups).
  std::map<std::string, Entry> node_files(const std::string& state_dir = "/var/lib/flotilla/") const {
    std::map<std::string, Entry> out;
    for (const auto& [p, e] : files) {
      if (p.rfind(state_dir, 0) != 0) out[p] = e;
    }
    return out;
  }

  std::map<std::string, Entry> files;
  uint64_t free = uint64_t{1} << 40;
  uint64_t total = uint64_t{2} << 40;
  std::vector<std::string> space_asked;  // paths free_bytes/total_bytes were asked about
  std::string fail_writes_containing;  // empty: every write succeeds
  int writes = 0;                      // successful writes
};

class MemStateStore final : public StateStore {
 public:
  Result<AppliedState> load() override { return state; }
  Status save(const AppliedState& s) override {
    // A full disk or an I/O error: the store keeps what it had.
    if (fail_saves) return make_error(Errc::io, "fake: cannot save agent state");
    state = s;
    ++saves;
    return {};
  }
  Status journal(const JournalEntry& e) override {
    entries.push_back(e);
    return {};
  }

  AppliedState state;
  int saves = 0;
  bool fail_saves = false;  // every save fails (the state stays as it was)
  std::vector<JournalEntry> entries;
};

class FakeDownloader final : public Downloader {
 public:
  explicit FakeDownloader(MemFileTree& files) : files_(files) {}
  Status fetch(const std::string& url, const std::string& dest, uint64_t max_bytes) override {
    ++fetches;
    urls.push_back(url);
    if (fail) return make_error(Errc::unavailable, "fake: network down", true);
    auto it = content.find(url);
    if (it == content.end()) return make_error(Errc::not_found, "fake: 404 " + url);
    if (it->second.size() > max_bytes) return make_error(Errc::too_large, "fake: more than " + std::to_string(max_bytes));
    files_.files[dest] = MemFileTree::Entry{it->second, 0600};
    return {};
  }

  std::map<std::string, std::string> content;  // by URL
  bool fail = false;
  int fetches = 0;
  std::vector<std::string> urls;

 private:
  MemFileTree& files_;
};

}  // namespace flotilla::agent::testing
