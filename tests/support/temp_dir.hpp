#pragma once
// A private temporary directory for one test, removed afterwards unless
// FLOTILLA_KEEP_TEST_DIRS is set (to read the logs of a failed run).
#include <stdlib.h>
#include <sys/stat.h>

#include <cstdlib>
#include <filesystem>
#include <stdexcept>
#include <string>

namespace flotilla::test {

class TempDir {
 public:
  explicit TempDir(const std::string& prefix = "flotilla-test") {
    std::string pattern = (std::filesystem::temp_directory_path() / (prefix + "-XXXXXX")).string();
    if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed for " + pattern);
    path_ = pattern;
    // Traversable, so a root-started mosquitto that drops to its own user reaches its files.
    ::chmod(path_.c_str(), 0711);
  }
  ~TempDir() {
    std::error_code ec;
    if (!std::getenv("FLOTILLA_KEEP_TEST_DIRS")) std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

}  // namespace flotilla::test
