#pragma once
// Real implementations of the core's file and state seams.
#include <filesystem>
#include <memory>

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

 private:
  std::filesystem::path root_;
};

// The agent's local SQLite database (WAL): applied bundle, placed files and
// the highest version applied per channel.
class SqliteStateStore final : public StateStore {
 public:
  static Result<std::unique_ptr<SqliteStateStore>> open(const std::string& path);
  Result<AppliedState> load() override;
  Status save(const AppliedState& s) override;

 private:
  explicit SqliteStateStore(std::unique_ptr<sql::Db> db) : db_(std::move(db)) {}
  std::unique_ptr<sql::Db> db_;
};

}  // namespace flotilla::agent
