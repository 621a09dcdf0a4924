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
  std::string node_name;
  std::chrono::milliseconds stop_grace{10000};
  std::chrono::milliseconds kubectl_timeout{5000};
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

  std::filesystem::path config_path() const;
  std::filesystem::path kubeconfig_path() const;
  std::filesystem::path pidfile() const;
  std::filesystem::path serving_cert_path() const;
  std::string service_manager() const { return service_ ? service_->name() : "direct"; }

 private:
  Status write_base_config();
  Status start();
  pid_t running_pid();

  DirectRuntimeConfig cfg_;
  std::unique_ptr<ServiceManager> service_;
};

// Service managers (runtime/service_managers.cpp). Failures of the service
// tool (non-zero exit) are Errc::refused, which the core reports as
// REASON_SERVICE_FAILED.
std::string find_on_path(const std::string& program);
Result<std::unique_ptr<ServiceManager>> make_systemd_manager(const std::string& unit = "k3s");
Result<std::unique_ptr<ServiceManager>> make_openrc_manager(const std::string& service = "k3s");
// "systemd" when <root>/run/systemd/system exists, "openrc" when
// <root>/sbin/openrc-run exists, else "direct".
std::string detect_service_manager(const std::filesystem::path& root);

// notAfter of the first certificate in a PEM file (unix seconds).
Result<int64_t> pem_cert_not_after(const std::filesystem::path& pem);

}  // namespace flotilla::agent
