#pragma once
// Child processes: the hub starts mosquitto, the agent drives k3s, tests run
// real binaries. Every wait has a deadline.
#include <sys/types.h>

#include <chrono>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "flotilla/common/result.hpp"

namespace flotilla::proc {

struct SpawnOptions {
  std::vector<std::string> argv;
  std::map<std::string, std::string> env_set;  // added to (or replacing in) the inherited env
  std::string stdout_path;                     // empty = inherit
  // An open descriptor the child gets as stdout instead of stdout_path (the
  // caller keeps and closes its own copy): lets the caller open the file
  // its own way (O_NOFOLLOW, relative to a directory descriptor).
  int stdout_fd = -1;
  std::string stderr_path;                     // empty = inherit; "stdout" = same as stdout
  bool new_process_group = true;               // so a kill reaches the whole tree
  bool die_with_parent = false;                // SIGTERM when the spawning thread's process dies (Linux)
  std::string cwd;
};

class Child {
 public:
  Child() = default;
  explicit Child(pid_t pid) : pid_(pid) {}
  Child(Child&& o) noexcept : pid_(o.pid_), exit_(o.exit_) { o.pid_ = -1; }
  Child& operator=(Child&& o) noexcept;
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;
  // Does not kill: owners decide (a supervised k3s outlives a restarting agent).
  ~Child() = default;

  pid_t pid() const { return pid_; }
  bool valid() const { return pid_ > 0; }
  // Non-blocking: the exit status if the child has exited.
  std::optional<int> poll();
  std::optional<int> wait_for(std::chrono::milliseconds timeout);
  // SIGTERM, then SIGKILL after grace; reaps.
  void terminate(std::chrono::milliseconds grace = std::chrono::milliseconds(3000));
  void kill_now();
  bool signal(int sig);
  void release() { pid_ = -1; }

 private:
  pid_t pid_ = -1;
  std::optional<int> exit_;
};

Result<Child> spawn(const SpawnOptions& opts);

struct RunResult {
  int exit_code = -1;  // 128+signal when killed by a signal
  std::string out;     // stdout, capped
  std::string err;     // stderr, capped
  bool timed_out = false;
};

// Runs to completion or until timeout (then kills the group). Output is capped.
Result<RunResult> run(const std::vector<std::string>& argv, std::chrono::milliseconds timeout,
                      size_t max_output = 1 << 20);
// The same, with these variables added to (or replacing in) the child's environment.
Result<RunResult> run(const std::vector<std::string>& argv, std::chrono::milliseconds timeout, size_t max_output,
                      const std::map<std::string, std::string>& env_set);

bool alive(pid_t pid);

// Path of the running executable (for finding sibling binaries).
std::string self_exe();

}  // namespace flotilla::proc
