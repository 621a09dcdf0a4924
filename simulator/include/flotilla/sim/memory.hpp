#pragma once
// In-memory implementations of the agent core's seams (edge-agent seams.hpp)
// for virtual devices. A million devices must fit in a few processes, so a
// device keeps only two small things between messages (DeviceStorage): its
// AppliedState encoded into one string, and its file tree as a short vector
// whose paths and contents are interned — every device that applied the same
// bundle points at the same bytes (CONVENTIONS.md: one copy of a shared
// payload). The seam objects below are cheap adapters made per message over
// that storage, so nothing else stays resident per device.
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "flotilla/agent/seams.hpp"
#include "flotilla/common/clock.hpp"

namespace flotilla::sim {

using Shared = std::shared_ptr<const std::string>;

// Process-wide, thread-safe pool of immutable strings keyed by content.
Shared intern(std::string_view bytes);
// Distinct strings the pool holds (for the footprint report).
size_t interned_count();

struct FileEntry {
  Shared path;
  Shared content;
  uint16_t mode = 0644;
};

// What a virtual device keeps between messages.
struct DeviceStorage {
  std::string state;               // encode_state(AppliedState)
  std::vector<FileEntry> files;
};

// Compact, lossless encoding of the agent's persisted state. The applied
// desired-state message is stored without its signed bundle and trust, which
// are interned (they are the same for every device of a campaign).
std::string encode_state(const agent::AppliedState& s);
Result<agent::AppliedState> decode_state(const std::string& blob);

class SimFileTree final : public agent::FileTree {
 public:
  // fail_writes: every write and rename of a node file fails (install failure).
  SimFileTree(std::vector<FileEntry>& files, bool fail_writes) : files_(files), fail_writes_(fail_writes) {}
  Result<std::optional<agent::FileData>> read(const std::string& path) override;
  Status write_atomic(const std::string& path, const std::string& content, unsigned mode) override;
  Status remove(const std::string& path) override;
  Result<uint64_t> free_bytes(const std::string&) override { return uint64_t{1} << 40; }
  Result<uint64_t> total_bytes(const std::string&) override { return uint64_t{2} << 40; }
  bool exists(const std::string& path) override { return find(path) != nullptr; }
  Result<std::optional<std::string>> sha256_hex(const std::string& path) override;
  Result<uint64_t> size_of(const std::string& path) override;
  Status preserve(const std::string& path, const std::string& backup) override;
  Status rename(const std::string& from, const std::string& to, std::optional<unsigned> mode) override;
  Status remove_tree(const std::string& dir) override;
  // Writes shared bytes without copying them (the downloader's artifacts).
  void put(const std::string& path, Shared content, unsigned mode);

 private:
  FileEntry* find(const std::string& path);
  bool refuse(const std::string& path) const;
  std::vector<FileEntry>& files_;
  bool fail_writes_;
};

class SimStateStore final : public agent::StateStore {
 public:
  explicit SimStateStore(std::string& blob) : blob_(blob) {}
  Result<agent::AppliedState> load() override;
  Status save(const agent::AppliedState& s) override;
  // Journal rows are counted, not kept: nobody reads them back in a simulation.
  Status journal(const agent::JournalEntry& e) override;
  static uint64_t journal_rows() { return journal_rows_.load(); }

 private:
  std::string& blob_;
  static std::atomic<uint64_t> journal_rows_;
};

// k3s that restarts at once and is healthy, or never healthy (health fault).
class SimK3sRuntime final : public agent::K3sRuntime {
 public:
  explicit SimK3sRuntime(bool healthy) : healthy_(healthy) {}
  Result<std::string> version() override { return std::string("v1.30.4+k3s1"); }
  Status restart() override { return {}; }
  Status ensure_running() override { return {}; }
  agent::K3sHealth health() override;
  void stop() override {}

 private:
  bool healthy_;
};

// Serves artifacts from a process-wide cache filled once per URL by `fetch`
// (the real HTTP download from the hub), so a million devices download one
// copy. Bandwidth caps are modelled by the fleet delaying the apply.
class SimDownloader final : public agent::Downloader {
 public:
  using Fetch = Result<Shared> (*)(const std::string& url, uint64_t max_bytes);
  SimDownloader(SimFileTree& files, Fetch fetch) : files_(files), fetch_(fetch) {}
  Status fetch(const std::string& url, const std::string& dest, uint64_t max_bytes) override;

 private:
  SimFileTree& files_;
  Fetch fetch_;
};

// The wall clock shifted by a device's skew.
class SkewedClock final : public Clock {
 public:
  explicit SkewedClock(int32_t skew_s) : skew_(skew_s) {}
  std::chrono::system_clock::time_point now() const override {
    return std::chrono::system_clock::now() + std::chrono::seconds(skew_);
  }

 private:
  int32_t skew_;
};

}  // namespace flotilla::sim
