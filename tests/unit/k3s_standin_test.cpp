// Integration tests for simulator/k3s-standin: runs the real binary (found via
// $FLOTILLA_BIN_DIR) and talks to it over loopback through its own kubectl.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>

#include "tests/support/temp_dir.hpp"
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

extern char** environ;

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

constexpr auto kDeadline = 10s;

fs::path standin_binary() {
  const char* dir = std::getenv("FLOTILLA_BIN_DIR");
  INFO("FLOTILLA_BIN_DIR must name the directory holding k3s-standin");
  REQUIRE(dir != nullptr);
  const fs::path binary = fs::path(dir) / "k3s-standin";
  INFO("binary: " << binary);
  REQUIRE(::access(binary.c_str(), X_OK) == 0);
  return binary;
}

using flotilla::test::TempDir;

void write_text(const fs::path& path, const std::string& text) {
  fs::create_directories(path.parent_path());
  std::ofstream(path) << text;
}

std::string read_text(const fs::path& path) {
  std::ifstream in(path);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

// The caller's K3S_STANDIN_* / KUBECONFIG must not leak into the child, and
// every child gets a lifetime cap so a failed test never leaves a server.
std::vector<std::string> child_env(const std::vector<std::string>& extra) {
  std::vector<std::string> out;
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string_view kv(*e);
    const auto name = kv.substr(0, kv.find('='));
    if (name.starts_with("K3S_") || name == "KUBECONFIG") continue;
    out.emplace_back(kv);
  }
  out.emplace_back("K3S_STANDIN_MAX_LIFETIME_S=60");
  out.insert(out.end(), extra.begin(), extra.end());
  return out;
}

// fork+exec with stdout/stderr on the given fds; the child dies with us.
pid_t spawn(const std::vector<std::string>& argv, const std::vector<std::string>& envv, int out_fd,
            int err_fd) {
  std::vector<char*> c_argv;
  for (const auto& a : argv) c_argv.push_back(const_cast<char*>(a.c_str()));
  c_argv.push_back(nullptr);
  std::vector<char*> c_env;
  for (const auto& e : envv) c_env.push_back(const_cast<char*>(e.c_str()));
  c_env.push_back(nullptr);
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(127);
    const int devnull = ::open("/dev/null", O_RDONLY);
    ::dup2(devnull, STDIN_FILENO);
    ::dup2(out_fd, STDOUT_FILENO);
    ::dup2(err_fd, STDERR_FILENO);
    ::execve(c_argv[0], c_argv.data(), c_env.data());
    ::_exit(127);
  }
  return pid;
}

int decode_status(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}

struct RunResult {
  int exit_code = -1;
  std::string out;
  std::string err;
};

// Runs a short-lived command to completion (killed after kDeadline).
RunResult run(const std::vector<std::string>& argv,
              const std::vector<std::string>& extra_env = {}) {
  int out_pipe[2];
  int err_pipe[2];
  REQUIRE(::pipe2(out_pipe, O_CLOEXEC) == 0);
  REQUIRE(::pipe2(err_pipe, O_CLOEXEC) == 0);
  const pid_t pid = spawn(argv, child_env(extra_env), out_pipe[1], err_pipe[1]);
  ::close(out_pipe[1]);
  ::close(err_pipe[1]);
  RunResult result;
  const auto deadline = Clock::now() + kDeadline;
  pollfd fds[2] = {{out_pipe[0], POLLIN, 0}, {err_pipe[0], POLLIN, 0}};
  std::string* sinks[2] = {&result.out, &result.err};
  int open_fds = 2;
  while (open_fds > 0) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0 || ::poll(fds, 2, static_cast<int>(left.count())) <= 0) {
      ::kill(pid, SIGKILL);
      break;
    }
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || fds[i].revents == 0) continue;
      char buf[4096];
      const auto n = ::read(fds[i].fd, buf, sizeof buf);
      if (n > 0) {
        sinks[i]->append(buf, static_cast<std::size_t>(n));
      } else {
        ::close(fds[i].fd);
        fds[i].fd = -1;
        --open_fds;
      }
    }
  }
  for (auto& fd : fds) {
    if (fd.fd >= 0) ::close(fd.fd);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  result.exit_code = decode_status(status);
  return result;
}

// RAII handle on a background `k3s server`; the destructor always reaps it.
class ServerProcess {
 public:
  ServerProcess(const fs::path& binary, const fs::path& config, const fs::path& log,
                const std::vector<std::string>& extra_env = {}) {
    const int log_fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    REQUIRE(log_fd >= 0);
    pid_ = spawn({binary.string(), "server", "--config", config.string(), "--disable=traefik"},
                 child_env(extra_env), log_fd, log_fd);
    ::close(log_fd);
    REQUIRE(pid_ > 0);
  }
  ~ServerProcess() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }
  ServerProcess(const ServerProcess&) = delete;
  ServerProcess& operator=(const ServerProcess&) = delete;

  pid_t pid() const { return pid_; }

  // Exit code once the process has exited, or nullopt at the deadline.
  std::optional<int> wait_for_exit(std::chrono::milliseconds timeout) {
    const auto deadline = Clock::now() + timeout;
    while (pid_ > 0) {
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return decode_status(status);
      }
      if (Clock::now() >= deadline) break;
      std::this_thread::sleep_for(10ms);
    }
    return std::nullopt;
  }

  std::optional<int> terminate() {
    ::kill(pid_, SIGTERM);
    return wait_for_exit(kDeadline);
  }

 private:
  pid_t pid_ = -1;
};

// Polls `condition` until it holds or the deadline passes.
template <typename Condition>
bool eventually(Condition condition, std::chrono::milliseconds timeout = kDeadline) {
  const auto deadline = Clock::now() + timeout;
  while (true) {
    if (condition()) return true;
    if (Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(20ms);
  }
}

RunResult kubectl_raw(const fs::path& binary, const fs::path& kubeconfig, const std::string& path) {
  return run(
      {binary.string(), "kubectl", "--kubeconfig", kubeconfig.string(), "get", "--raw", path});
}

constexpr const char* kNode = "standin-test-node";

}  // namespace

TEST_CASE("k3s stand-in reports its version, overridable by a sidecar file",
          "[integration][standin]") {
  const auto binary = standin_binary();
  for (const char* flag : {"--version", "-v", "version"}) {
    const auto result = run({binary.string(), flag});
    CHECK(result.exit_code == 0);
    CHECK(result.out ==
          "k3s version v1.30.4+k3s1 (flotilla-standin)\n"
          "go version go1.22.5 (k3s stand-in, not real k3s)\n");
  }

  const auto from_env = run({binary.string(), "--version"}, {"K3S_STANDIN_VERSION=v1.29.8+k3s1"});
  CHECK(from_env.out.starts_with("k3s version v1.29.8+k3s1 (flotilla-standin)\n"));

  TempDir dir;
  const auto installed = dir.path() / "k3s";
  fs::copy_file(binary, installed);
  write_text(dir.path() / "k3s.version", "v1.31.1+k3s1\nignored second line\n");
  const auto sidecar = run({installed.string(), "--version"});
  CHECK(sidecar.exit_code == 0);
  CHECK(sidecar.out.starts_with("k3s version v1.31.1+k3s1 (flotilla-standin)\n"));
  // The sidecar belongs to this one binary, so it beats the process-wide env.
  const auto both = run({installed.string(), "--version"}, {"K3S_STANDIN_VERSION=v1.29.8+k3s1"});
  CHECK(both.out.starts_with("k3s version v1.31.1+k3s1 "));
}

TEST_CASE("k3s stand-in help and unknown commands", "[integration][standin]") {
  const auto binary = standin_binary();
  const auto help = run({binary.string(), "--help"});
  CHECK(help.exit_code == 0);
  CHECK(help.out.find("NOT k3s") != std::string::npos);
  const auto unknown = run({binary.string(), "frobnicate"});
  CHECK(unknown.exit_code == 1);
  CHECK(unknown.err.find("usage:") != std::string::npos);
  const auto none = run({binary.string()});
  CHECK(none.exit_code == 1);
}

TEST_CASE("k3s stand-in server becomes ready and serves its node", "[integration][standin]") {
  const auto binary = standin_binary();
  TempDir dir;
  const auto kubeconfig = dir.path() / "k3s.yaml";
  const auto config = dir.path() / "config.yaml";
  write_text(config, "# test config\ndata-dir: " + (dir.path() / "data").string() + "\nwrite-kubeconfig: " + kubeconfig.string() +
                         "\nstandin-ready-delay-ms: 200\nnode-name: " + kNode + "\n");
  ServerProcess server(binary, config, dir.path() / "server.log",
                       {"K3S_STANDIN_PIDFILE=" + (dir.path() / "k3s.pid").string()});

  RunResult ready;
  const bool became_ready = eventually([&] {
    ready = kubectl_raw(binary, kubeconfig, "/readyz");
    return ready.exit_code == 0;
  });
  INFO("server log:\n"
       << read_text(dir.path() / "server.log") << "last kubectl stderr: " << ready.err);
  REQUIRE(became_ready);
  CHECK(ready.out == "ok");

  struct stat st {};
  REQUIRE(::stat(kubeconfig.c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);
  const auto kubeconfig_text = read_text(kubeconfig);
  CHECK(kubeconfig_text.find("k3s stand-in") != std::string::npos);
  CHECK(kubeconfig_text.find("server: http://127.0.0.1:") != std::string::npos);
  CHECK(read_text(dir.path() / "k3s.pid") == std::to_string(server.pid()) + "\n");

  const auto node = kubectl_raw(binary, kubeconfig, std::string("/api/v1/nodes/") + kNode);
  CHECK(node.exit_code == 0);
  CHECK(node.out.find(std::string(R"("name":")") + kNode + "\"") != std::string::npos);
  CHECK(node.out.find(R"({"type":"Ready","status":"True")") != std::string::npos);

  const auto livez = kubectl_raw(binary, kubeconfig, "/livez");
  CHECK(livez.exit_code == 0);
  CHECK(livez.out == "ok");
  const auto version = kubectl_raw(binary, kubeconfig, "/version");
  CHECK(version.out.find(R"("gitVersion":"v1.30.4+k3s1")") != std::string::npos);

  const auto other = kubectl_raw(binary, kubeconfig, "/api/v1/nodes/someone-else");
  CHECK(other.exit_code == 1);
  CHECK(other.err == "Error from server (NotFound): nodes \"someone-else\" not found\n");

  // KUBECONFIG is honoured when --kubeconfig is absent.
  const auto table = run({binary.string(), "kubectl", "get", "node", kNode},
                         {"KUBECONFIG=" + kubeconfig.string()});
  CHECK(table.exit_code == 0);
  CHECK(table.out.starts_with("NAME"));
  CHECK(table.out.find(std::string(kNode) + "   Ready ") != std::string::npos);
}

TEST_CASE("k3s stand-in never-ready drop-in keeps /readyz failing", "[integration][standin]") {
  const auto binary = standin_binary();
  TempDir dir;
  const auto kubeconfig = dir.path() / "k3s.yaml";
  const auto config = dir.path() / "config.yaml";
  // Unparseable-for-us content must be skipped, not fatal.
  write_text(config, "data-dir: " + (dir.path() / "data").string() + "\nwrite-kubeconfig: " + kubeconfig.string() + "\nnode-name: " + kNode +
                         "\nstandin-ready-delay-ms: 0\nstandin-never-ready: false\n"
                         "tls-san:\n  - example.test\nnode-label: [a=b]\n---\n");
  write_text(dir.path() / "config.yaml.d" / "10-a.yaml", "standin-never-ready: false\n");
  write_text(dir.path() / "config.yaml.d" / "50-x.yaml", "standin-never-ready: true # rollback\n");
  write_text(dir.path() / "config.yaml.d" / "90-z.yaml.disabled", "standin-never-ready: false\n");
  ServerProcess server(binary, config, dir.path() / "server.log");

  REQUIRE(eventually([&] { return fs::exists(kubeconfig); }));
  const auto until = Clock::now() + 1500ms;
  int attempts = 0;
  while (Clock::now() < until) {
    const auto readyz = kubectl_raw(binary, kubeconfig, "/readyz");
    ++attempts;
    REQUIRE(readyz.exit_code == 1);
    REQUIRE(readyz.err ==
            "Error from server (InternalError): [-]poststarthook/k3s-ready failed: not ready\n");
    std::this_thread::sleep_for(50ms);
  }
  CHECK(attempts >= 3);

  const auto node = kubectl_raw(binary, kubeconfig, std::string("/api/v1/nodes/") + kNode);
  CHECK(node.exit_code == 0);
  CHECK(node.out.find(R"({"type":"Ready","status":"False")") != std::string::npos);
  const auto livez = kubectl_raw(binary, kubeconfig, "/livez");
  CHECK(livez.exit_code == 0);
}

TEST_CASE("k3s stand-in rejects a wrong token", "[integration][standin]") {
  const auto binary = standin_binary();
  TempDir dir;
  const auto kubeconfig = dir.path() / "k3s.yaml";
  const auto config = dir.path() / "config.yaml";
  write_text(config, "data-dir: " + (dir.path() / "data").string() + "\nwrite-kubeconfig: " + kubeconfig.string() + "\nstandin-ready-delay-ms: 0\n");
  ServerProcess server(binary, config, dir.path() / "server.log");
  REQUIRE(eventually([&] { return kubectl_raw(binary, kubeconfig, "/readyz").exit_code == 0; }));

  std::string forged = read_text(kubeconfig);
  const auto at = forged.find("token: ");
  REQUIRE(at != std::string::npos);
  forged = forged.substr(0, at) + "token: not-the-token\n";
  const auto wrong = dir.path() / "wrong.yaml";
  write_text(wrong, forged);
  const auto result = kubectl_raw(binary, wrong, "/readyz");
  CHECK(result.exit_code == 1);
  CHECK(result.err.starts_with("Error from server (Unauthorized)"));
  CHECK(result.out.empty());
}

TEST_CASE("k3s stand-in stops cleanly on SIGTERM", "[integration][standin]") {
  const auto binary = standin_binary();
  TempDir dir;
  const auto kubeconfig = dir.path() / "k3s.yaml";
  const auto config = dir.path() / "config.yaml";
  write_text(config, "data-dir: " + (dir.path() / "data").string() + "\nwrite-kubeconfig: " + kubeconfig.string() + "\n");
  ServerProcess server(binary, config, dir.path() / "server.log");
  REQUIRE(eventually([&] { return fs::exists(kubeconfig); }));
  CHECK(server.terminate() == std::optional<int>(0));
  const auto log = read_text(dir.path() / "server.log");
  CHECK(log.find("k3s-standin: received SIGTERM, stopping") != std::string::npos);

  // Nothing listens any more, which kubectl reports like the real one.
  const auto refused = kubectl_raw(binary, kubeconfig, "/readyz");
  CHECK(refused.exit_code == 1);
  CHECK(refused.err.find("was refused - did you specify the right host or port?") !=
        std::string::npos);
}

TEST_CASE("k3s stand-in start failures", "[integration][standin]") {
  const auto binary = standin_binary();
  TempDir dir;

  const auto missing =
      run({binary.string(), "server", "--config", (dir.path() / "absent.yaml").string()});
  CHECK(missing.exit_code == 1);
  CHECK_FALSE(missing.err.empty());

  const auto config = dir.path() / "config.yaml";
  write_text(config, "data-dir: " + (dir.path() / "data").string() + "\nwrite-kubeconfig: " + (dir.path() / "k3s.yaml").string() +
                         "\nstandin-fail-start: true\n");
  const auto failed = run({binary.string(), "server", "--config", config.string()});
  CHECK(failed.exit_code == 1);
  CHECK(failed.err.find("stand-in: configured to fail at start") != std::string::npos);
  CHECK_FALSE(fs::exists(dir.path() / "k3s.yaml"));

  const auto no_kubeconfig = kubectl_raw(binary, dir.path() / "nope.yaml", "/readyz");
  CHECK(no_kubeconfig.exit_code == 1);
  CHECK(no_kubeconfig.err ==
        "error: stat " + (dir.path() / "nope.yaml").string() + ": no such file or directory\n");
}
