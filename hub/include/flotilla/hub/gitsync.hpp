#pragma once
// Git sync: the hub follows the GitRepos stored in it (url, branch, path,
// poll interval), fetches each with libgit2 into a bare clone under its data
// dir, and applies every new commit's documents through HubService::apply
// with the repository's own apply set ("gitrepo-<name>", pruned within it).
// Files are read from Git's object database, never from a checkout: no path
// in a repository can point the hub at a file outside it.
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <filesystem>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "flotilla/common/clock.hpp"
#include "flotilla/common/result.hpp"
#include "flotilla/hub/declarative.hpp"
#include "flotilla/hub/service.hpp"

namespace flotilla::hub {

struct GitSyncConfig {
  std::filesystem::path dir;  // <data-dir>/gitrepos: <name>/repo.git and <name>/secrets/
  std::chrono::milliseconds tick{500};
  // A fetch that receives more, or takes longer while receiving, is cut off.
  uint64_t max_fetch_bytes = uint64_t{256} << 20;
  std::chrono::seconds fetch_timeout{120};
  // What one commit may hold under the repository's path.
  size_t max_total_bytes = 64u << 20;
  int max_depth = 16;
};

// Opens (or makes) the bare clone at `clone_dir`, fetches `branch` from `url`
// and returns the full hex id of its head commit.
Result<std::string> git_fetch(const std::filesystem::path& clone_dir, const GitRepoRecord& repo,
                              const GitSyncConfig& cfg);
// Every *.yaml, *.yml and *.json file under `path` of that commit, read from
// the object database; paths are from the repository's top.
Result<std::vector<SourceFile>> git_documents(const std::filesystem::path& clone_dir, const std::string& commit,
                                              const std::string& path, const GitSyncConfig& cfg);
// A file of that commit by its path from the repository's top: a regular
// file (not a symlink, directory or submodule), at most max_bytes.
Result<std::string> git_read_file(const std::filesystem::path& clone_dir, const std::string& commit,
                                  const std::string& path, size_t max_bytes);

class GitSync {
 public:
  GitSync(HubService& hub, const Clock& clock, GitSyncConfig cfg);
  ~GitSync();
  GitSync(const GitSync&) = delete;
  GitSync& operator=(const GitSync&) = delete;

  void start();
  void stop();
  // Polls this repository at the next tick, whatever its interval says.
  void trigger(const std::string& name);
  // One pass over the repositories that are due (or asked for). The thread
  // calls it every tick; tests may call it directly.
  void poll_once();
  // Fetches, reads and applies one repository; records how it went in its status.
  void sync(const GitRepoRecord& repo);

 private:
  void loop();

  HubService& hub_;
  const Clock& clock_;
  GitSyncConfig cfg_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::set<std::string> asked_;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace flotilla::hub
