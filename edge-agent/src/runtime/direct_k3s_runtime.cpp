#include <nlohmann/json.hpp>
#include <signal.h>
#include <sys/wait.h>

#include <thread>

#include "flotilla/agent/direct_runtime.hpp"
#include "flotilla/common/fs.hpp"
#include "flotilla/common/log.hpp"
#include "flotilla/common/process.hpp"

namespace flotilla::agent {

namespace {
std::string trim(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r' || s.back() == ' ')) s.pop_back();
  return s;
}
}  // namespace

DirectK3sRuntime::DirectK3sRuntime(DirectRuntimeConfig cfg, std::unique_ptr<ServiceManager> service)
    : cfg_(std::move(cfg)), service_(std::move(service)) {
  if (cfg_.k3s_bin.empty()) cfg_.k3s_bin = (cfg_.root / "usr/local/bin/k3s").string();
}

std::filesystem::path DirectK3sRuntime::config_path() const { return cfg_.root / "etc/rancher/k3s/config.yaml"; }
std::filesystem::path DirectK3sRuntime::kubeconfig_path() const { return cfg_.root / "etc/rancher/k3s/k3s.yaml"; }
std::filesystem::path DirectK3sRuntime::pidfile() const { return cfg_.root / "run/flotilla/k3s.pid"; }
std::filesystem::path DirectK3sRuntime::serving_cert_path() const {
  return cfg_.root / "var/lib/rancher/k3s/server/tls/serving-kube-apiserver.crt";
}

int64_t DirectK3sRuntime::serving_cert_expiry() {
  auto t = pem_cert_not_after(serving_cert_path());
  return t ? *t : 0;
}

Result<std::string> DirectK3sRuntime::version() {
  if (!std::filesystem::exists(cfg_.k3s_bin)) return std::string();
  auto r = proc::run({cfg_.k3s_bin, "--version"}, std::chrono::seconds(5), 4096);
  if (!r) return r.error();
  if (r->exit_code != 0) return make_error(Errc::io, "k3s --version exited " + std::to_string(r->exit_code));
  // "k3s version v1.30.4+k3s1 (abcdef)"
  auto line = r->out.substr(0, r->out.find('\n'));
  const std::string prefix = "k3s version ";
  if (line.rfind(prefix, 0) != 0) return make_error(Errc::parse, "unexpected k3s --version output: " + line);
  auto v = line.substr(prefix.size());
  return v.substr(0, v.find(' '));
}

Status DirectK3sRuntime::write_base_config() {
  // The agent owns config.yaml: where k3s writes its kubeconfig and keeps its
  // data (under the agent's root) and the node name. Bundles add drop-ins in
  // config.yaml.d/, which k3s merges over this file.
  std::string text =
      "# Written by flotilla-agent. Bundle settings go to config.yaml.d/.\n"
      "write-kubeconfig: " + kubeconfig_path().string() + "\n"
      "write-kubeconfig-mode: \"0600\"\n"
      "data-dir: " + (cfg_.root / "var/lib/rancher/k3s").string() + "\n"
      "node-name: " + cfg_.node_name + "\n";
  auto cur = fs::read_file(config_path());
  if (cur && *cur == text) return {};
  if (auto s = fs::ensure_dir(config_path().parent_path()); !s) return s;
  return fs::write_file_atomic(config_path(), text, 0600);
}

pid_t DirectK3sRuntime::running_pid() {
  auto text = fs::read_file(pidfile(), 64);
  if (!text) return -1;
  try {
    pid_t pid = static_cast<pid_t>(std::stol(*text));
    return proc::alive(pid) ? pid : -1;
  } catch (const std::exception&) {
    return -1;
  }
}

void DirectK3sRuntime::stop() {
  if (service_) return service_->stop();
  pid_t pid = running_pid();
  if (pid <= 0) return;
  // k3s runs in its own process group (we started it with setsid-like setpgid).
  if (::kill(-pid, SIGTERM) != 0) ::kill(pid, SIGTERM);
  const auto deadline = std::chrono::steady_clock::now() + cfg_.stop_grace;
  while (proc::alive(pid) && std::chrono::steady_clock::now() < deadline) {
    ::waitpid(pid, nullptr, WNOHANG);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  if (proc::alive(pid)) {
    if (::kill(-pid, SIGKILL) != 0) ::kill(pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
  }
  ::waitpid(pid, nullptr, WNOHANG);
  std::filesystem::remove(pidfile());
}

Status DirectK3sRuntime::start() {
  if (!std::filesystem::exists(cfg_.k3s_bin)) {
    return make_error(Errc::not_found, "k3s is not installed at " + cfg_.k3s_bin);
  }
  if (auto s = write_base_config(); !s) return s;
  if (auto s = fs::ensure_dir(pidfile().parent_path()); !s) return s;
  if (auto s = fs::ensure_dir(cfg_.root / "var/log"); !s) return s;
  // A stale kubeconfig would let the health gate talk to the old server.
  std::filesystem::remove(kubeconfig_path());
  proc::SpawnOptions so;
  so.argv = {cfg_.k3s_bin, "server", "--config", config_path().string()};
  so.stdout_path = (cfg_.root / "var/log/k3s.log").string();
  so.stderr_path = "stdout";
  auto child = proc::spawn(so);
  if (!child) return child.error().with_context("start k3s");
  const pid_t pid = child->pid();
  child->release();  // k3s outlives agent restarts; the pidfile tracks it
  if (auto s = fs::write_file_atomic(pidfile(), std::to_string(pid), 0644); !s) return s;
  log::get("agent")->info("started k3s pid={}", pid);
  return {};
}

Status DirectK3sRuntime::restart() {
  if (service_) {
    if (auto s = write_base_config(); !s) return s;
    // A stale kubeconfig would let the health gate talk to the old server.
    std::filesystem::remove(kubeconfig_path());
    return service_->restart();
  }
  stop();
  return start();
}

Status DirectK3sRuntime::ensure_running() {
  if (!std::filesystem::exists(cfg_.k3s_bin)) return {};  // nothing installed yet
  if (service_) {
    if (service_->active()) return {};
    if (auto s = write_base_config(); !s) return s;
    return service_->start();
  }
  if (running_pid() > 0) return {};
  return start();
}

K3sHealth DirectK3sRuntime::health() {
  K3sHealth h;
  ::waitpid(-1, nullptr, WNOHANG);  // reap a k3s that died, so its pid reads as gone
  if (service_ ? !service_->active() : running_pid() <= 0) {
    h.detail = "k3s is not running";
    return h;
  }
  const std::string kc = kubeconfig_path().string();
  auto ready = proc::run({cfg_.k3s_bin, "kubectl", "--kubeconfig", kc, "get", "--raw", "/readyz"},
                         cfg_.kubectl_timeout, 64 * 1024);
  if (!ready || ready->exit_code != 0 || trim(ready->out) != "ok") {
    h.detail = ready ? "readyz: " + trim(ready->err.empty() ? ready->out : ready->err) : ready.error().message;
    return h;
  }
  h.api_ready = true;
  auto node = proc::run({cfg_.k3s_bin, "kubectl", "--kubeconfig", kc, "get", "--raw", "/api/v1/nodes/" + cfg_.node_name},
                        cfg_.kubectl_timeout, 1 << 20);
  if (!node || node->exit_code != 0) {
    h.detail = node ? "node: " + trim(node->err) : node.error().message;
    return h;
  }
  auto j = nlohmann::json::parse(node->out, nullptr, false);
  if (j.is_object() && j.contains("status") && j["status"].contains("conditions")) {
    for (const auto& c : j["status"]["conditions"]) {
      if (c.value("type", "") == "Ready") h.node_ready = c.value("status", "") == "True";
    }
  }
  if (!h.node_ready) h.detail = "node " + cfg_.node_name + " is not Ready";
  return h;
}

}  // namespace flotilla::agent
