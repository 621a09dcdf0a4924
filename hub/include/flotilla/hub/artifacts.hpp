#pragma once
// Content-addressed artifact storage: <data-dir>/artifacts/<sha256 hex>.
// Uploads are verified against the name they claim before they become
// visible; downloads support HTTP Range so agents resume.
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>

#include "flotilla/common/result.hpp"

namespace flotilla::hub {

struct ArtifactInfo {
  std::string sha256;
  uint64_t size = 0;
};

class ArtifactStore {
 public:
  explicit ArtifactStore(std::filesystem::path dir) : dir_(std::move(dir)) {}
  Status init();
  const std::filesystem::path& dir() const { return dir_; }

  static bool valid_name(const std::string& sha256_hex);
  // Hashes the staged upload; keeps it under its hash if it matches, else
  // refuses (and the caller's temporary file is removed by the server).
  Result<std::pair<ArtifactInfo, bool>> commit(const std::string& staged_path, const std::string& claimed_sha256);
  std::optional<ArtifactInfo> stat(const std::string& sha256_hex) const;
  std::filesystem::path path(const std::string& sha256_hex) const { return dir_ / sha256_hex; }

 private:
  std::filesystem::path dir_;
};

// Parses "bytes=a-b", "bytes=a-" or "bytes=-n" against a size. nullopt = no
// usable single range (the caller answers 416 if a Range header was sent).
std::optional<std::pair<uint64_t, uint64_t>> parse_byte_range(const std::string& header, uint64_t size);

}  // namespace flotilla::hub
