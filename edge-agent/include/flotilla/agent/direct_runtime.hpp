#pragma once
// K3sRuntime for a real node. k3s is run by a ServiceManager: systemd
// (`systemctl restart k3s`), OpenRC (`rc-service k3s restart`) or, by
// default, direct supervision: the agent starts `k3s server` itself,
// remembers its pid in a pidfile (so a restarted agent adopts it instead of
// starting a second one). Health is checked the way k3s documents it:
// `k3s kubectl get --raw /readyz` with the node's kubeconfig, plus the node's
// Ready condition.
#include <filesystem>
#include <memory>
#include <string>

#include "flotilla/agent/seams.hpp"

namespace flotilla::agent {

struct DirectRuntimeConfig {
  std::filesystem::path root = "/";
  std::string k3s_bin;        // host path; default <root>/usr/local/bin/k3s
  std::string node_name;      // used unless config.yaml names the node itself
  // "server" (`k3s server`, unit k3s) or "agent" (`k3s agent`, unit k3s-agent,
  // joining server_url with the token in token_file, a device path).
  std::string role = "server";
  std::string server_url;
  std::string token_file;
  std::chrono::milliseconds stop_grace{10000};
  std::chrono::milliseconds kubectl_timeout{5000};
  // TimeoutStartSec= of a unit the agent writes (0 = none, as k3s's own);
  // also bounds how long the agent waits for the init tool.
  std::chrono::milliseconds service_start_timeout{0};
  std::chrono::milliseconds service_tool_timeout{600000};
};

class DirectK3sRuntime final : public K3sRuntime {
 public:
  // Without a service manager the runtime supervises k3s itself.
  explicit DirectK3sRuntime(DirectRuntimeConfig cfg, std::unique_ptr<ServiceManager> service = nullptr);
  Result<std::string> version() override;
  Status restart() override;
  Status ensure_running() override;
  K3sHealth health() override;
  void stop() override;
  int64_t serving_cert_expiry() override;
  std::string role() const override { return cfg_.role; }
  std::string data_dir() const override { return "/var/lib/rancher/k3s"; }
  Result<WorkloadState> workload(const WorkloadRef& w) override;
  std::optional<int64_t> node_heartbeat() override { return health().heartbeat_unix; }
  Result<std::vector<std::string>> delete_manifest(const std::string& path) override;
  uint64_t datastore_bytes() override;
  Result<DatastoreSnapshot> snapshot_datastore(const std::string& dest_dir, const std::string& tag) override;
  Status restore_datastore(const DatastoreSnapshot& s) override;
  Result<std::string> rotate_certificates() override;
  Status restore_certificates(const std::string& backup) override;
  std::vector<std::string> data_dirs() override;
  Status remove_data_dirs(const std::vector<std::string>& names, const std::string& running) override;

  // The unit / init script and env file k3s's installer would write for this
  // role and init system, for the ones that do not exist yet (an adopted
  // node keeps its own). Written by ensure_service_files().
  std::vector<ServiceFile> missing_service_files();
  // Writes them, then `systemctl daemon-reload` + `enable`, or `rc-update add`.
  // Returns the host paths written.
  Result<std::vector<std::string>> ensure_service_files();
  // The node name k3s runs with: config.yaml's node-name when an adopted
  // node sets one, else the agent's.
  std::string effective_node_name() const;
  // The agent's drop-in (config.yaml.d/00-flotilla-node.yaml): only what
  // config.yaml does not already say. Empty when nothing is needed.
  std::string node_dropin_text() const;

  std::filesystem::path config_path() const;
  std::filesystem::path kubeconfig_path() const;
  std::filesystem::path pidfile() const;
  std::filesystem::path serving_cert_path() const;
  std::string service_manager() const { return service_ ? service_->name() : "direct"; }

 private:
  Status write_node_dropin();
  Status start();
  pid_t running_pid();
  std::string unit_name() const { return cfg_.role == "agent" ? "k3s-agent" : "k3s"; }
  std::filesystem::path node_dropin_path() const;
  // `k3s kubectl` with the node's kubeconfig (a server's admin kubeconfig,
  // an agent node's kubelet kubeconfig).
  std::vector<std::string> kubectl(std::vector<std::string> args) const;
  std::filesystem::path host(const std::string& device_path) const;
  // `--config <root>/etc/rancher/k3s/config.yaml` under a test root (k3s's
  // maintenance commands read the config for the data-dir); nothing on a device.
  std::vector<std::string> config_args() const;

  DirectRuntimeConfig cfg_;
  std::unique_ptr<ServiceManager> service_;
};

// Service managers (runtime/service_managers.cpp). Failures of the service
// tool (non-zero exit) are Errc::refused, which the core reports as
// REASON_SERVICE_FAILED.
std::string find_on_path(const std::string& program);
// `timeout` bounds each call of the init tool (a Type=notify restart waits
// until k3s is up).
Result<std::unique_ptr<ServiceManager>> make_systemd_manager(const std::string& unit = "k3s",
                                                             std::chrono::milliseconds timeout = std::chrono::minutes(10));
Result<std::unique_ptr<ServiceManager>> make_openrc_manager(const std::string& service = "k3s",
                                                            std::chrono::milliseconds timeout = std::chrono::minutes(10));
// "systemd" when <root>/run/systemd/system exists, "openrc" when
// <root>/sbin/openrc-run exists, else "direct".
std::string detect_service_manager(const std::filesystem::path& root);

// notAfter of the first certificate in a PEM file (unix seconds).
Result<int64_t> pem_cert_not_after(const std::filesystem::path& pem);

}  // namespace flotilla::agent
