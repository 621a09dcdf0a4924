#pragma once
// Real implementations of the core's file and state seams.
#include <filesystem>
#include <memory>
#include <optional>

#include "flotilla/agent/seams.hpp"
#include "flotilla/common/sqlite.hpp"

namespace flotilla::agent {

// Maps absolute device paths under a root directory ("/" on a real device).
class DiskFileTree final : public FileTree {
 public:
  explicit DiskFileTree(std::filesystem::path root) : root_(std::move(root)) {}
  std::filesystem::path host_path(const std::string& device_path) const;
  Result<std::optional<FileData>> read(const std::string& path) override;
  Status write_atomic(const std::string& path, const std::string& content, unsigned mode) override;
  Status remove(const std::string& path) override;
  Result<uint64_t> free_bytes(const std::string& path) override;
  Result<uint64_t> total_bytes(const std::string& path) override;
  bool exists(const std::string& path) override;
  Result<std::optional<std::string>> sha256_hex(const std::string& path) override;
  Result<uint64_t> size_of(const std::string& path) override;
  Status preserve(const std::string& path, const std::string& backup) override;
  Status rename(const std::string& from, const std::string& to, std::optional<unsigned> mode) override;
  Status remove_tree(const std::string& dir) override;

 private:
  std::filesystem::path root_;
};

// Streams a file through SHA-256 in 64 KiB pieces; nullopt when missing.
Result<std::optional<std::string>> sha256_file_hex(const std::filesystem::path& p);

// The agent's local SQLite database (WAL): applied bundle, placed files, the
// highest version applied per channel, the in-flight apply with its backups,
// unsent final reports, and the step journal.
class SqliteStateStore final : public StateStore {
 public:
  static Result<std::unique_ptr<SqliteStateStore>> open(const std::string& path);
  Result<AppliedState> load() override;
  Status save(const AppliedState& s) override;
  Status journal(const JournalEntry& e) override;
  // The newest journal rows, oldest first (for tests and diagnostics).
  Result<std::vector<JournalEntry>> journal_tail(size_t n);

 private:
  explicit SqliteStateStore(std::unique_ptr<sql::Db> db) : db_(std::move(db)) {}
  std::unique_ptr<sql::Db> db_;
  // What the last successful save() (or load()) left on disk: save() writes
  // only the parts that differ.
  std::optional<AppliedState> last_;
};

}  // namespace flotilla::agent
