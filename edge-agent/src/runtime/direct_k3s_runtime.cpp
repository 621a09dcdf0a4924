#include <nlohmann/json.hpp>
#include <signal.h>
#include <sys/wait.h>

#include <algorithm>
#include <cctype>
#include <ctime>
#include <set>
#include <thread>

#include <yaml-cpp/yaml.h>

#include "flotilla/agent/direct_runtime.hpp"
#include "flotilla/bundles/bundle.hpp"
#include "flotilla/common/fs.hpp"
#include "flotilla/common/log.hpp"
#include "flotilla/common/process.hpp"

namespace flotilla::agent {

namespace {
std::string trim(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r' || s.back() == ' ')) s.pop_back();
  return s;
}

// "2026-12-03T15:04:32Z" (what Kubernetes writes in lastHeartbeatTime).
std::optional<int64_t> parse_rfc3339(const std::string& t) {
  struct tm tm {};
  int y = 0, mo = 0, d = 0, h = 0, mi = 0, se = 0;
  if (std::sscanf(t.c_str(), "%4d-%2d-%2dT%2d:%2d:%2d", &y, &mo, &d, &h, &mi, &se) != 6) return std::nullopt;
  tm.tm_year = y - 1900;
  tm.tm_mon = mo - 1;
  tm.tm_mday = d;
  tm.tm_hour = h;
  tm.tm_min = mi;
  tm.tm_sec = se;
  return static_cast<int64_t>(::timegm(&tm));
}

// Top-level scalar keys of a k3s config file (config.yaml), to leave alone
// what an adopted node already sets. A file that does not parse sets nothing
// the agent can rely on; k3s itself will complain about it.
std::map<std::string, std::string> config_keys(const std::filesystem::path& p) {
  std::map<std::string, std::string> out;
  auto text = fs::read_file(p, 1 << 20);
  if (!text) return out;
  try {
    YAML::Node y = YAML::Load(*text);
    if (!y.IsMap()) return out;
    for (const auto& kv : y) {
      out[kv.first.as<std::string>()] = kv.second.IsScalar() ? kv.second.as<std::string>() : std::string("<set>");
    }
  } catch (const std::exception&) {
  }
  return out;
}

int64_t json_int(const nlohmann::json& j, const char* key) {
  return j.is_object() && j.contains(key) && j[key].is_number() ? j[key].get<int64_t>() : 0;
}
}  // namespace

DirectK3sRuntime::DirectK3sRuntime(DirectRuntimeConfig cfg, std::unique_ptr<ServiceManager> service)
    : cfg_(std::move(cfg)), service_(std::move(service)) {
  if (cfg_.k3s_bin.empty()) cfg_.k3s_bin = (cfg_.root / "usr/local/bin/k3s").string();
}

std::filesystem::path DirectK3sRuntime::host(const std::string& device_path) const {
  std::string rel = device_path;
  while (!rel.empty() && rel.front() == '/') rel.erase(rel.begin());
  return cfg_.root / rel;
}
std::filesystem::path DirectK3sRuntime::config_path() const { return cfg_.root / "etc/rancher/k3s/config.yaml"; }
std::filesystem::path DirectK3sRuntime::node_dropin_path() const {
  return cfg_.root / "etc/rancher/k3s/config.yaml.d" / bundles::kNodeDropInName;
}
std::filesystem::path DirectK3sRuntime::kubeconfig_path() const { return cfg_.root / "etc/rancher/k3s/k3s.yaml"; }
std::filesystem::path DirectK3sRuntime::pidfile() const { return cfg_.root / "run/flotilla/k3s.pid"; }
std::filesystem::path DirectK3sRuntime::serving_cert_path() const {
  return cfg_.role == "agent" ? cfg_.root / "var/lib/rancher/k3s/agent/serving-kubelet.crt"
                              : cfg_.root / "var/lib/rancher/k3s/server/tls/serving-kube-apiserver.crt";
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

std::string DirectK3sRuntime::effective_node_name() const {
  auto keys = config_keys(config_path());
  auto it = keys.find("node-name");
  return it != keys.end() && !it->second.empty() ? it->second : cfg_.node_name;
}

std::string DirectK3sRuntime::node_dropin_text() const {
  // Flotilla never edits config.yaml, where `k3s install.sh` users keep
  // token, server, tls-san, node-label: its own settings go to a drop-in
  // that k3s reads after config.yaml (pkg/configfilearg), and only the ones
  // config.yaml does not set, so an adopted node keeps its own.
  const auto keys = config_keys(config_path());
  std::string text;
  auto put = [&](const std::string& key, const std::string& value) {
    if (!keys.count(key) && !value.empty()) text += key + ": " + value + "\n";
  };
  // On a device (root "/") k3s's defaults are right; under a test root
  // they would point at the host.
  if (cfg_.root != "/") {
    put("data-dir", (cfg_.root / "var/lib/rancher/k3s").string());
    if (cfg_.role == "server") put("write-kubeconfig", kubeconfig_path().string());
  }
  if (cfg_.role == "server") put("write-kubeconfig-mode", "\"0600\"");
  put("node-name", cfg_.node_name);
  if (cfg_.role == "agent") {
    put("server", cfg_.server_url);
    if (!keys.count("token")) put("token-file", cfg_.token_file.empty() ? "" : host(cfg_.token_file).string());
  }
  if (text.empty()) return text;
  return "# Written by flotilla-agent: only what config.yaml does not set. Flotilla never edits config.yaml.\n" + text;
}

Status DirectK3sRuntime::write_node_dropin() {
  const std::string text = node_dropin_text();
  const auto path = node_dropin_path();
  auto cur = fs::read_file(path, 1 << 20);
  if (text.empty()) {
    if (cur) std::filesystem::remove(path);
    return {};
  }
  if (cur && *cur == text) return {};
  if (auto s = fs::ensure_dir(path.parent_path(), 0755); !s) return s;
  return fs::write_file_atomic(path, text, 0600);
}

std::vector<ServiceFile> DirectK3sRuntime::missing_service_files() {
  std::vector<ServiceFile> out;
  if (!service_) return out;
  const std::string unit = unit_name();
  const std::string exec = cfg_.role == "agent" ? "agent" : "server";
  // Under a test root k3s must be told where its config is; on a device
  // it reads /etc/rancher/k3s/config.yaml (and config.yaml.d/) by itself.
  const std::string config_arg = cfg_.root == "/" ? "" : " --config " + config_path().string();
  std::error_code ec;
  if (service_->name() == "systemd") {
    // As k3s's install.sh (create_systemd_service_file) writes it, minus the
    // ExecStartPre= lines that need the host's modprobe and nm-cloud-setup.
    const auto unit_path = cfg_.root / "etc/systemd/system" / (unit + ".service");
    const auto env_path = cfg_.root / "etc/systemd/system" / (unit + ".service.env");
    if (std::filesystem::exists(unit_path, ec)) return out;  // adopted: its unit stays as it is
    const long timeout_s = static_cast<long>(cfg_.service_start_timeout.count() / 1000);
    out.push_back({unit_path.string(),
                   "# Written by flotilla-agent as k3s's install.sh writes it.\n"
                   "[Unit]\n"
                   "Description=Lightweight Kubernetes\n"
                   "Documentation=https://k3s.io\n"
                   "Wants=network-online.target\n"
                   "After=network-online.target\n"
                   "\n"
                   "[Install]\n"
                   "WantedBy=multi-user.target\n"
                   "\n"
                   "[Service]\n"
                   "Type=notify\n"
                   "EnvironmentFile=-/etc/default/%N\n"
                   "EnvironmentFile=-/etc/sysconfig/%N\n"
                   "EnvironmentFile=-" + env_path.string() + "\n"
                   "KillMode=process\n"
                   "Delegate=yes\n"
                   "User=root\n"
                   "LimitNOFILE=1048576\n"
                   "LimitNPROC=infinity\n"
                   "LimitCORE=infinity\n"
                   "TasksMax=infinity\n"
                   "TimeoutStartSec=" + std::to_string(timeout_s) + "\n"
                   "Restart=always\n"
                   "RestartSec=5s\n"
                   "ExecStart=" + cfg_.k3s_bin + " \\\n    " + exec + config_arg + "\n",
                   0644});
    if (!std::filesystem::exists(env_path, ec)) out.push_back({env_path.string(), "", 0600});
  } else if (service_->name() == "openrc") {
    // As install.sh (create_openrc_service_file) writes it.
    const auto script = cfg_.root / "etc/init.d" / unit;
    const auto env_path = cfg_.root / "etc/rancher/k3s" / (unit + ".env");
    if (std::filesystem::exists(script, ec)) return out;
    const std::string log_file = (cfg_.root / "var/log" / (unit + ".log")).string();
    out.push_back({script.string(),
                   "#!/sbin/openrc-run\n"
                   "# Written by flotilla-agent as k3s's install.sh writes it.\n"
                   "\n"
                   "depend() {\n"
                   "    after network-online\n"
                   "    want cgroups\n"
                   "}\n"
                   "\n"
                   "supervisor=supervise-daemon\n"
                   "name=" + unit + "\n"
                   "command=\"" + cfg_.k3s_bin + "\"\n"
                   "command_args=\"" + exec + config_arg + "\n"
                   "    >>" + log_file + " 2>&1\"\n"
                   "\n"
                   "output_log=" + log_file + "\n"
                   "error_log=" + log_file + "\n"
                   "\n"
                   "pidfile=\"/var/run/" + unit + ".pid\"\n"
                   "respawn_delay=5\n"
                   "respawn_max=0\n"
                   "\n"
                   "set -o allexport\n"
                   "if [ -f /etc/environment ]; then . /etc/environment; fi\n"
                   "if [ -f " + env_path.string() + " ]; then . " + env_path.string() + "; fi\n"
                   "set +o allexport\n",
                   0755});
    if (!std::filesystem::exists(env_path, ec)) out.push_back({env_path.string(), "", 0600});
  }
  return out;
}

Result<std::vector<std::string>> DirectK3sRuntime::ensure_service_files() {
  std::vector<std::string> written;
  // The OpenRC script appends k3s's output to /var/log/<unit>.log.
  if (auto s = fs::ensure_dir(cfg_.root / "var/log", 0755); !s) return s.error();
  for (const auto& f : missing_service_files()) {
    const std::filesystem::path p = f.path;
    if (auto s = fs::ensure_dir(p.parent_path(), 0755); !s) return s.error();
    if (auto s = fs::write_file_atomic(p, f.content, f.mode); !s) return s.error();
    written.push_back(f.path);
  }
  if (!written.empty()) {
    log::get("agent")->info("wrote k3s service files for {} ({}): {}", service_->name(), unit_name(), written.front());
    if (auto s = service_->install_service(); !s) return s.error();
  }
  return written;
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
  if (auto s = write_node_dropin(); !s) return s;
  if (auto s = fs::ensure_dir(pidfile().parent_path()); !s) return s;
  if (auto s = fs::ensure_dir(cfg_.root / "var/log"); !s) return s;
  // A stale kubeconfig would let the health gate talk to the old server.
  std::filesystem::remove(kubeconfig_path());
  proc::SpawnOptions so;
  so.argv = {cfg_.k3s_bin, cfg_.role == "agent" ? "agent" : "server", "--config", config_path().string()};
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
    if (auto s = write_node_dropin(); !s) return s;
    if (auto w = ensure_service_files(); !w) return make_error(Errc::refused, w.error().message);
    // A stale kubeconfig would let the health gate talk to the old server.
    if (cfg_.role == "server") std::filesystem::remove(kubeconfig_path());
    return service_->restart();
  }
  stop();
  return start();
}

Status DirectK3sRuntime::ensure_running() {
  if (!std::filesystem::exists(cfg_.k3s_bin)) return {};  // nothing installed yet
  if (service_) {
    if (service_->active()) return {};
    if (auto s = write_node_dropin(); !s) return s;
    if (auto w = ensure_service_files(); !w) return make_error(Errc::refused, w.error().message);
    return service_->start();
  }
  if (running_pid() > 0) return {};
  return start();
}

std::vector<std::string> DirectK3sRuntime::kubectl(std::vector<std::string> args) const {
  // A server reads with its admin kubeconfig; an agent node has only its
  // kubelet's, which may read its own node through the server.
  const std::string kc = cfg_.role == "agent" ? (cfg_.root / "var/lib/rancher/k3s/agent/kubelet.kubeconfig").string()
                                              : kubeconfig_path().string();
  std::vector<std::string> argv = {cfg_.k3s_bin, "kubectl", "--kubeconfig", kc};
  argv.insert(argv.end(), args.begin(), args.end());
  return argv;
}

K3sHealth DirectK3sRuntime::health() {
  K3sHealth h;
  ::waitpid(-1, nullptr, WNOHANG);  // reap a k3s that died, so its pid reads as gone
  if (service_ ? !service_->active() : running_pid() <= 0) {
    h.running = false;
    h.detail = "k3s is not running";
    return h;
  }
  const std::string node_name = effective_node_name();
  if (cfg_.role == "server") {
    auto ready = proc::run(kubectl({"get", "--raw", "/readyz"}), cfg_.kubectl_timeout, 64 * 1024);
    if (!ready || ready->exit_code != 0 || trim(ready->out) != "ok") {
      h.detail = ready ? "readyz: " + trim(ready->err.empty() ? ready->out : ready->err) : ready.error().message;
      return h;
    }
  }
  auto node = proc::run(kubectl({"get", "--raw", "/api/v1/nodes/" + node_name}), cfg_.kubectl_timeout, 1 << 20);
  if (!node || node->exit_code != 0) {
    h.detail = node ? "node " + node_name + ": " + trim(node->err) : node.error().message;
    return h;
  }
  // An agent node has no API server of its own: the server answering for
  // its node is what its kubelet's kubeconfig can reach.
  h.api_ready = true;
  auto j = nlohmann::json::parse(node->out, nullptr, false);
  std::string status = "missing";
  if (j.is_object() && j.contains("status") && j["status"].is_object()) {
    const auto& st = j["status"];
    if (st.contains("conditions") && st["conditions"].is_array()) {
      for (const auto& c : st["conditions"]) {
        if (!c.is_object() || c.value("type", "") != "Ready") continue;
        status = c.value("status", "");
        h.node_ready = status == "True";
        h.heartbeat_unix = parse_rfc3339(c.value("lastHeartbeatTime", ""));
      }
    }
    if (st.contains("nodeInfo") && st["nodeInfo"].is_object()) h.kubelet_version = st["nodeInfo"].value("kubeletVersion", "");
  }
  if (!h.node_ready) h.detail = "node " + node_name + " Ready is " + status;
  return h;
}

Result<WorkloadState> DirectK3sRuntime::workload(const WorkloadRef& w) {
  const std::string ns = w.ns.empty() ? (w.kind == "HelmChart" ? "kube-system" : "default") : w.ns;
  static const std::map<std::string, std::string> kinds = {{"Deployment", "deployments.apps"},
                                                           {"DaemonSet", "daemonsets.apps"},
                                                           {"StatefulSet", "statefulsets.apps"},
                                                           {"Job", "jobs.batch"},
                                                           {"HelmChart", "helmcharts.helm.cattle.io"}};
  auto kind = kinds.find(w.kind);
  if (kind == kinds.end()) return make_error(Errc::invalid_argument, "unknown workload kind " + w.kind);
  auto r = proc::run(kubectl({"get", kind->second, w.name, "-n", ns, "-o", "json"}), cfg_.kubectl_timeout, 4 << 20);
  if (!r) return r.error();
  WorkloadState out;
  if (r->exit_code != 0) {
    out.detail = trim(r->err.empty() ? r->out : r->err).substr(0, 300);
    if (out.detail.find("NotFound") != std::string::npos || out.detail.find("not found") != std::string::npos) {
      out.detail = "not found";
    }
    return out;
  }
  auto j = nlohmann::json::parse(r->out, nullptr, false);
  if (!j.is_object()) return make_error(Errc::parse, "kubectl get " + w.text() + ": not JSON");
  const auto status = j.value("status", nlohmann::json::object());
  const auto spec = j.value("spec", nlohmann::json::object());
  const auto meta = j.value("metadata", nlohmann::json::object());
  const int64_t generation = json_int(meta, "generation");
  const bool observed = json_int(status, "observedGeneration") >= generation;
  if (w.kind == "Deployment" || w.kind == "StatefulSet") {
    // kubectl rollout status: the controller saw this generation, every
    // replica is updated and available.
    const int64_t want = spec.is_object() && spec.contains("replicas") ? json_int(spec, "replicas") : 1;
    const int64_t updated = json_int(status, "updatedReplicas");
    const int64_t avail = json_int(status, w.kind == "Deployment" ? "availableReplicas" : "readyReplicas");
    out.ready = observed && updated >= want && avail >= want;
    out.detail = std::to_string(avail) + "/" + std::to_string(want) + " replicas available";
  } else if (w.kind == "DaemonSet") {
    const int64_t want = json_int(status, "desiredNumberScheduled");
    const int64_t updated = json_int(status, "updatedNumberScheduled");
    const int64_t avail = json_int(status, "numberAvailable");
    out.ready = observed && updated >= want && avail >= want;
    out.detail = std::to_string(avail) + "/" + std::to_string(want) + " pods available";
  } else if (w.kind == "Job") {
    out.ready = json_int(status, "succeeded") > 0;
    out.failed = !out.ready && json_int(status, "failed") > 0 && json_int(status, "active") == 0;
    out.detail = out.ready ? "succeeded" : out.failed ? "failed" : "running";
  } else {  // HelmChart: helm-controller's install job decides
    const std::string job = status.is_object() ? status.value("jobName", "") : "";
    if (job.empty()) {
      out.detail = "install job not started";
      return out;
    }
    auto js = workload(WorkloadRef{"Job", ns, job});
    if (!js) return js.error();
    out = *js;
    out.detail = "install job " + job + " " + out.detail;
  }
  return out;
}

Result<std::vector<std::string>> DirectK3sRuntime::delete_manifest(const std::string& path) {
  if (cfg_.role != "server") return std::vector<std::string>{};
  auto r = proc::run(kubectl({"delete", "-f", host(path).string(), "--ignore-not-found"}), cfg_.kubectl_timeout * 6,
                     1 << 20);
  if (!r) return r.error();
  if (r->exit_code != 0) {
    return make_error(Errc::io, "kubectl delete -f " + path + ": " + trim(r->err.empty() ? r->out : r->err).substr(0, 300));
  }
  // `deployment.apps "web" deleted` -> deployment.apps/web
  std::vector<std::string> out;
  size_t at = 0;
  while (at < r->out.size()) {
    const auto nl = r->out.find('\n', at);
    std::string line = r->out.substr(at, nl == std::string::npos ? std::string::npos : nl - at);
    at = nl == std::string::npos ? r->out.size() : nl + 1;
    const auto q1 = line.find(" \"");
    const auto q2 = line.rfind("\" deleted");
    if (q1 != std::string::npos && q2 != std::string::npos && q2 > q1 + 2) {
      out.push_back(line.substr(0, q1) + "/" + line.substr(q1 + 2, q2 - q1 - 2));
    }
  }
  return out;
}

std::vector<std::string> DirectK3sRuntime::config_args() const {
  if (cfg_.root == "/") return {};
  return {"--config", config_path().string()};
}

uint64_t DirectK3sRuntime::datastore_bytes() {
  if (cfg_.role != "server") return 0;
  const auto db = cfg_.root / "var/lib/rancher/k3s/server/db";
  uint64_t total = 0;
  std::error_code ec;
  for (auto it = std::filesystem::recursive_directory_iterator(db, ec);
       !ec && it != std::filesystem::recursive_directory_iterator(); it.increment(ec)) {
    if (it->path().filename() == "snapshots") {
      it.disable_recursion_pending();
      continue;
    }
    if (it->is_regular_file(ec)) total += it->file_size(ec);
  }
  return total;
}

Result<DatastoreSnapshot> DirectK3sRuntime::snapshot_datastore(const std::string& dest_dir, const std::string& tag) {
  if (cfg_.role != "server") return DatastoreSnapshot{};  // an agent node keeps no datastore
  const auto db = cfg_.root / "var/lib/rancher/k3s/server/db";
  std::error_code ec;
  const auto dest = host(dest_dir);
  if (auto s = fs::ensure_dir(dest, 0700); !s) return s.error();
  if (std::filesystem::exists(db / "etcd", ec)) {
    // Embedded etcd: an on-demand snapshot of the running k3s
    // (docs.k3s.io/cli/etcd-snapshot).
    std::vector<std::string> argv = {cfg_.k3s_bin, "etcd-snapshot", "save"};
    for (const auto& a : config_args()) argv.push_back(a);
    argv.insert(argv.end(), {"--name", "flotilla-" + tag, "--etcd-snapshot-dir", dest.string()});
    auto r = proc::run(argv, std::chrono::minutes(5), 64 * 1024);
    if (!r) return r.error();
    if (r->exit_code != 0) {
      return make_error(Errc::io, "k3s etcd-snapshot save: " + trim(r->err.empty() ? r->out : r->err).substr(0, 300));
    }
    // The newest file it wrote is the snapshot.
    std::filesystem::path newest;
    for (const auto& e : std::filesystem::directory_iterator(dest, ec)) {
      if (e.path().filename().string().rfind("flotilla-" + tag, 0) == 0) newest = e.path();
    }
    if (newest.empty()) return make_error(Errc::io, "k3s etcd-snapshot save wrote no file into " + dest.string());
    return DatastoreSnapshot{"etcd", dest_dir + "/" + newest.filename().string()};
  }
  if (!std::filesystem::exists(db / "state.db", ec)) return DatastoreSnapshot{};  // no datastore yet
  // SQLite (kine): a consistent copy needs k3s stopped; the copy includes the
  // WAL files that exist.
  stop();
  for (const char* f : {"state.db", "state.db-wal", "state.db-shm"}) {
    if (!std::filesystem::exists(db / f, ec)) continue;
    std::filesystem::copy_file(db / f, dest / f, std::filesystem::copy_options::overwrite_existing, ec);
    if (ec) return make_error(Errc::io, "copy " + (db / f).string() + ": " + ec.message());
  }
  (void)fs::fsync_dir(dest);
  return DatastoreSnapshot{"sqlite", dest_dir};
}

Status DirectK3sRuntime::restore_datastore(const DatastoreSnapshot& snap) {
  if (snap.kind.empty()) return {};
  const auto db = cfg_.root / "var/lib/rancher/k3s/server/db";
  std::error_code ec;
  stop();
  if (snap.kind == "etcd") {
    // k3s server --cluster-reset --cluster-reset-restore-path=<snapshot>,
    // then a normal start (docs.k3s.io, "Restoring a Cluster from a Snapshot").
    std::vector<std::string> argv = {cfg_.k3s_bin, "server", "--cluster-reset",
                                     "--cluster-reset-restore-path=" + host(snap.path).string()};
    for (const auto& a : config_args()) argv.push_back(a);
    auto r = proc::run(argv, std::chrono::minutes(10), 64 * 1024);
    if (!r) return r.error();
    if (r->exit_code != 0) {
      return make_error(Errc::io, "k3s cluster-reset restore: " + trim(r->err.empty() ? r->out : r->err).substr(0, 300));
    }
    return {};
  }
  const auto src = host(snap.path);
  if (!std::filesystem::exists(src / "state.db", ec)) return make_error(Errc::not_found, "no snapshot at " + src.string());
  for (const char* f : {"state.db", "state.db-wal", "state.db-shm"}) {
    std::filesystem::remove(db / f, ec);
    if (std::filesystem::exists(src / f, ec)) {
      std::filesystem::copy_file(src / f, db / f, std::filesystem::copy_options::overwrite_existing, ec);
      if (ec) return make_error(Errc::io, "restore " + (db / f).string() + ": " + ec.message());
    }
  }
  return fs::fsync_dir(db);
}

// docs.k3s.io "Certificate Management": stop k3s, `k3s certificate rotate`,
// start k3s. rotate moves the node's leaf certificates (not the CAs) into a
// backup directory (server/tls-<unix>, an agent node's agent/tls-agent-<unix>)
// and k3s issues new ones at its next start. The backup is what a failed
// rotation puts back.
Result<std::string> DirectK3sRuntime::rotate_certificates() {
  if (!std::filesystem::exists(cfg_.k3s_bin)) return make_error(Errc::not_found, "k3s is not installed at " + cfg_.k3s_bin);
  stop();
  const auto parent = cfg_.root / "var/lib/rancher/k3s" / (cfg_.role == "agent" ? "agent" : "server");
  const std::string prefix = cfg_.role == "agent" ? "tls-agent-" : "tls-";
  std::error_code ec;
  auto backups = [&] {
    std::set<std::string> out;
    for (const auto& e : std::filesystem::directory_iterator(parent, ec)) {
      const std::string n = e.path().filename().string();
      if (n.rfind(prefix, 0) == 0 && n.size() > prefix.size() && std::isdigit(static_cast<unsigned char>(n[prefix.size()]))) {
        out.insert(n);
      }
    }
    return out;
  };
  const auto before = backups();
  std::vector<std::string> argv = {cfg_.k3s_bin, "certificate", "rotate"};
  for (const auto& a : config_args()) argv.push_back(a);
  auto r = proc::run(argv, std::chrono::minutes(2), 64 * 1024);
  if (!r) return r.error();
  if (r->exit_code != 0) {
    return make_error(Errc::io, "k3s certificate rotate: " + trim(r->err.empty() ? r->out : r->err).substr(0, 300));
  }
  // The backup is the directory this run made (k3s names it by the time).
  std::string made;
  for (const auto& n : backups()) {
    if (!before.count(n)) made = n;
  }
  if (made.empty()) return make_error(Errc::io, "k3s certificate rotate made no backup under " + parent.string());
  const std::string device = std::string("/var/lib/rancher/k3s/") + (cfg_.role == "agent" ? "agent/" : "server/") + made;
  log::get("agent")->info("k3s certificate rotate: old certificates kept at {}", device);
  return device;
}

Status DirectK3sRuntime::restore_certificates(const std::string& backup) {
  if (backup.empty()) return {};
  const auto src = host(backup);
  const auto tls = cfg_.root / "var/lib/rancher/k3s" / (cfg_.role == "agent" ? "agent" : "server/tls");
  std::error_code ec;
  if (!std::filesystem::is_directory(src, ec)) return make_error(Errc::not_found, "no certificate backup at " + src.string());
  stop();
  int restored = 0;
  for (const auto& e : std::filesystem::directory_iterator(src, ec)) {
    if (!e.is_regular_file(ec)) continue;
    std::filesystem::copy_file(e.path(), tls / e.path().filename(), std::filesystem::copy_options::overwrite_existing, ec);
    if (ec) return make_error(Errc::io, "restore " + (tls / e.path().filename()).string() + ": " + ec.message());
    ++restored;
  }
  if (restored == 0) return make_error(Errc::not_found, "the certificate backup " + src.string() + " is empty");
  return fs::fsync_dir(tls);
}

// k3s extracts its payload into ${data-dir}/data/<hash> and keeps
// `data/current` and `data/previous` symlinks (cmd/k3s/main.go, extract());
// it never removes an old directory itself.
std::vector<std::string> DirectK3sRuntime::data_dirs() {
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(cfg_.root / "var/lib/rancher/k3s/data", ec)) {
    const std::string n = e.path().filename().string();
    if (n.empty() || n[0] == '.' || e.is_symlink(ec) || !e.is_directory(ec)) continue;
    out.push_back(n);
  }
  std::sort(out.begin(), out.end());
  return out;
}

Status DirectK3sRuntime::remove_data_dirs(const std::vector<std::string>& names, const std::string& running) {
  const auto data = cfg_.root / "var/lib/rancher/k3s/data";
  std::error_code ec;
  const std::set<std::string> gone(names.begin(), names.end());
  for (const char* link : {"current", "previous"}) {
    const auto l = data / link;
    if (!std::filesystem::is_symlink(std::filesystem::symlink_status(l, ec))) continue;
    const auto target = std::filesystem::read_symlink(l, ec).filename().string();
    if (!gone.count(target)) continue;
    std::filesystem::remove(l, ec);
    if (std::string(link) == "current" && !running.empty() && !gone.count(running)) {
      std::filesystem::create_symlink(data / running, l, ec);
      if (ec) return make_error(Errc::io, "point " + l.string() + " at " + running + ": " + ec.message());
    }
  }
  for (const auto& n : names) {
    if (n.empty() || n.find('/') != std::string::npos || n == "." || n == "..") continue;
    std::filesystem::remove_all(data / n, ec);
    if (ec) return make_error(Errc::io, "remove " + (data / n).string() + ": " + ec.message());
  }
  return {};
}

}  // namespace flotilla::agent
