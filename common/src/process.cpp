#include "flotilla/common/process.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <thread>

extern char** environ;

namespace flotilla::proc {

namespace {
// A child gets stdin/stdout/stderr and nothing else: no listening socket,
// database or broker connection of ours (sockets made without CLOEXEC would
// otherwise keep our ports open after we die). Async-signal-safe: runs
// between fork and exec. keep = the exec-error pipe, which is CLOEXEC.
void close_inherited_fds(int keep) {
#ifdef SYS_close_range
  if (keep > 3) {
    if (::syscall(SYS_close_range, 3u, static_cast<unsigned>(keep - 1), 0u) == 0 &&
        ::syscall(SYS_close_range, static_cast<unsigned>(keep + 1), ~0u, 0u) == 0) {
      return;
    }
  } else if (::syscall(SYS_close_range, static_cast<unsigned>(keep + 1), ~0u, 0u) == 0) {
    return;
  }
#endif
  const long max = ::sysconf(_SC_OPEN_MAX);
  for (int fd = 3; fd < (max > 0 ? max : 65536); ++fd) {
    if (fd != keep) ::close(fd);
  }
}

int decode_status(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}

std::vector<std::string> merged_env(const std::map<std::string, std::string>& set) {
  std::vector<std::string> out;
  for (char** e = environ; *e; ++e) {
    std::string kv(*e);
    auto eq = kv.find('=');
    if (eq != std::string::npos && set.count(kv.substr(0, eq))) continue;
    out.push_back(std::move(kv));
  }
  for (const auto& [k, v] : set) out.push_back(k + "=" + v);
  return out;
}
}  // namespace

Child& Child::operator=(Child&& o) noexcept {
  pid_ = o.pid_;
  exit_ = o.exit_;
  o.pid_ = -1;
  return *this;
}

std::optional<int> Child::poll() {
  if (exit_) return exit_;
  if (pid_ <= 0) return std::nullopt;
  int status = 0;
  pid_t r = ::waitpid(pid_, &status, WNOHANG);
  if (r == pid_) {
    exit_ = decode_status(status);
    return exit_;
  }
  if (r < 0 && errno == ECHILD) {
    // Not our child (adopted by pid) — fall back to liveness.
    if (!alive(pid_)) exit_ = -1;
    return exit_;
  }
  return std::nullopt;
}

std::optional<int> Child::wait_for(std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    if (auto s = poll()) return s;
    if (std::chrono::steady_clock::now() >= deadline) return std::nullopt;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

bool Child::signal(int sig) {
  if (pid_ <= 0 || exit_) return false;
  // Signal the process group when the child leads one, else the process.
  if (::kill(-pid_, sig) == 0) return true;
  return ::kill(pid_, sig) == 0;
}

void Child::terminate(std::chrono::milliseconds grace) {
  if (pid_ <= 0 || poll()) return;
  signal(SIGTERM);
  if (wait_for(grace)) return;
  kill_now();
}

void Child::kill_now() {
  if (pid_ <= 0 || poll()) return;
  signal(SIGKILL);
  wait_for(std::chrono::milliseconds(5000));
}

namespace {
// The step of spawn's child that failed before exec.
enum : int { kSpawnExec = 0, kSpawnStdout = 1, kSpawnStderr = 2, kSpawnCwd = 3 };
}  // namespace

Result<Child> spawn(const SpawnOptions& opts) {
  if (opts.argv.empty()) return make_error(Errc::invalid_argument, "spawn: empty argv");
  std::vector<std::string> env = merged_env(opts.env_set);
  std::vector<char*> envp;
  for (auto& e : env) envp.push_back(e.data());
  envp.push_back(nullptr);
  std::vector<std::string> args = opts.argv;
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);

  int errpipe[2];
  if (::pipe2(errpipe, O_CLOEXEC) != 0) return make_error(Errc::io, "pipe: " + std::string(std::strerror(errno)));
  pid_t pid = ::fork();
  if (pid < 0) {
    ::close(errpipe[0]);
    ::close(errpipe[1]);
    return make_error(Errc::io, "fork: " + std::string(std::strerror(errno)));
  }
  if (pid == 0) {
    ::close(errpipe[0]);
    if (opts.new_process_group) ::setpgid(0, 0);
    if (opts.die_with_parent) ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    // What failed before exec goes back to the parent as (step, errno): a
    // log file that cannot be opened is an error, not output sent wherever
    // the parent's own goes.
    auto fail = [&](int step) {
      const int report[2] = {step, errno};
      ssize_t ignored = ::write(errpipe[1], report, sizeof report);
      (void)ignored;
      _exit(127);
    };
    auto redirect = [&](const std::string& path, int fd, int step) {
      int f = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
      if (f < 0) fail(step);
      ::dup2(f, fd);
      ::close(f);
    };
    if (opts.stdout_fd >= 0) ::dup2(opts.stdout_fd, STDOUT_FILENO);
    else if (!opts.stdout_path.empty()) redirect(opts.stdout_path, STDOUT_FILENO, kSpawnStdout);
    if (opts.stderr_path == "stdout") ::dup2(STDOUT_FILENO, STDERR_FILENO);
    else if (!opts.stderr_path.empty()) redirect(opts.stderr_path, STDERR_FILENO, kSpawnStderr);
    int devnull = ::open("/dev/null", O_RDONLY);
    if (devnull >= 0) { ::dup2(devnull, STDIN_FILENO); ::close(devnull); }
    if (!opts.cwd.empty() && ::chdir(opts.cwd.c_str()) != 0) fail(kSpawnCwd);
    close_inherited_fds(errpipe[1]);
    // Default signal dispositions for the child.
    ::signal(SIGPIPE, SIG_DFL);
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    ::execve(argv[0], argv.data(), envp.data());
    fail(kSpawnExec);
  }
  ::close(errpipe[1]);
  int report[2] = {0, 0};
  ssize_t n = ::read(errpipe[0], report, sizeof report);
  ::close(errpipe[0]);
  if (n == sizeof report) {
    int st;
    ::waitpid(pid, &st, 0);
    const std::string why = std::strerror(report[1]);
    switch (report[0]) {
      case kSpawnStdout:
        return make_error(Errc::io, "start " + opts.argv[0] + ": cannot open its output file " + opts.stdout_path +
                                        ": " + why);
      case kSpawnStderr:
        return make_error(Errc::io, "start " + opts.argv[0] + ": cannot open its error output file " +
                                        opts.stderr_path + ": " + why);
      case kSpawnCwd:
        return make_error(Errc::io, "start " + opts.argv[0] + ": cannot change to directory " + opts.cwd + ": " + why);
      default:
        return make_error(Errc::not_found, "exec " + opts.argv[0] + ": " + why);
    }
  }
  return Child(pid);
}

Result<RunResult> run(const std::vector<std::string>& argv, std::chrono::milliseconds timeout,
                      size_t max_output) {
  return run(argv, timeout, max_output, {});
}

Result<RunResult> run(const std::vector<std::string>& argv, std::chrono::milliseconds timeout, size_t max_output,
                      const std::map<std::string, std::string>& env_set) {
  if (argv.empty()) return make_error(Errc::invalid_argument, "run: empty argv");
  // Built before fork: the child only calls async-signal-safe functions.
  std::vector<std::string> env_strings;
  std::vector<char*> cenv;
  if (!env_set.empty()) {
    env_strings = merged_env(env_set);
    for (auto& e : env_strings) cenv.push_back(e.data());
    cenv.push_back(nullptr);
  }
  int outp[2] = {-1, -1}, errp[2] = {-1, -1}, execp[2] = {-1, -1};
  // Every early return closes what was opened: a caller that retries after
  // EAGAIN (fork) or EMFILE (pipe) must not lose six descriptors each time.
  auto close_all = [&] {
    for (int* p : {outp, errp, execp}) {
      for (int i = 0; i < 2; ++i) {
        if (p[i] >= 0) ::close(p[i]);
        p[i] = -1;
      }
    }
  };
  if (::pipe2(outp, O_CLOEXEC) || ::pipe2(errp, O_CLOEXEC) || ::pipe2(execp, O_CLOEXEC)) {
    const int err = errno;
    close_all();
    return make_error(Errc::io, "pipe: " + std::string(std::strerror(err)));
  }
  std::vector<std::string> args = argv;
  std::vector<char*> cargv;
  for (auto& a : args) cargv.push_back(a.data());
  cargv.push_back(nullptr);
  pid_t pid = ::fork();
  if (pid < 0) {
    const int err = errno;
    close_all();
    return make_error(Errc::io, "fork: " + std::string(std::strerror(err)), err == EAGAIN);
  }
  if (pid == 0) {
    ::setpgid(0, 0);
    ::dup2(outp[1], STDOUT_FILENO);
    ::dup2(errp[1], STDERR_FILENO);
    int devnull = ::open("/dev/null", O_RDONLY);
    if (devnull >= 0) { ::dup2(devnull, STDIN_FILENO); ::close(devnull); }
    ::signal(SIGPIPE, SIG_DFL);
    close_inherited_fds(execp[1]);
    if (cenv.empty()) ::execv(cargv[0], cargv.data());
    else ::execve(cargv[0], cargv.data(), cenv.data());
    int err = errno;
    ssize_t ignored = ::write(execp[1], &err, sizeof err);
    (void)ignored;
    _exit(127);
  }
  ::close(outp[1]);
  ::close(errp[1]);
  ::close(execp[1]);
  int child_errno = 0;
  ssize_t en = ::read(execp[0], &child_errno, sizeof child_errno);
  ::close(execp[0]);
  if (en == sizeof child_errno) {
    ::close(outp[0]);
    ::close(errp[0]);
    int st;
    ::waitpid(pid, &st, 0);
    return make_error(Errc::not_found, "exec " + argv[0] + ": " + std::strerror(child_errno));
  }

  RunResult res;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  struct pollfd fds[2] = {{outp[0], POLLIN, 0}, {errp[0], POLLIN, 0}};
  int open_fds = 2;
  char buf[4096];
  while (open_fds > 0) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      res.timed_out = true;
      break;
    }
    int pr = ::poll(fds, 2, static_cast<int>(left.count()));
    if (pr < 0 && errno == EINTR) continue;
    if (pr <= 0) continue;
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || !(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      ssize_t n = ::read(fds[i].fd, buf, sizeof buf);
      if (n <= 0) {
        ::close(fds[i].fd);
        fds[i].fd = -1;
        --open_fds;
        continue;
      }
      std::string& dst = i == 0 ? res.out : res.err;
      if (dst.size() < max_output) dst.append(buf, std::min(static_cast<size_t>(n), max_output - dst.size()));
    }
  }
  for (auto& f : fds) if (f.fd >= 0) ::close(f.fd);
  Child child(pid);
  if (res.timed_out) {
    child.kill_now();
    res.exit_code = -1;
    return res;
  }
  auto code = child.wait_for(std::max(std::chrono::milliseconds(100),
      std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now())));
  if (!code) {
    child.kill_now();
    res.timed_out = true;
    return res;
  }
  res.exit_code = *code;
  return res;
}

bool alive(pid_t pid) {
  if (pid <= 0) return false;
  if (::kill(pid, 0) != 0) return errno == EPERM;
  // A zombie still answers kill(0); check its state.
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%d/stat", pid);
  FILE* f = std::fopen(path, "r");
  if (!f) return false;
  char state = 0;
  int ignored_pid;
  char comm[256];
  bool zombie = std::fscanf(f, "%d %255s %c", &ignored_pid, comm, &state) == 3 && state == 'Z';
  std::fclose(f);
  return !zombie;
}

std::string self_exe() {
  char buf[4096];
  ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n <= 0) return {};
  buf[n] = 0;
  return buf;
}

}  // namespace flotilla::proc
