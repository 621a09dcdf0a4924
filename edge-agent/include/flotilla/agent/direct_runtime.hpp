#pragma once
// K3sRuntime by direct supervision: the agent starts `k3s server` itself,
// remembers its pid in a pidfile (so a restarted agent adopts it instead of
// starting a second one) and checks health the way k3s documents it:
// `k3s kubectl get --raw /readyz` with the node's kubeconfig, plus the
// node's Ready condition. systemd and OpenRC managers come with issue 7.
#include <filesystem>
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
  explicit DirectK3sRuntime(DirectRuntimeConfig cfg);
  Result<std::string> version() override;
  Status restart() override;
  Status ensure_running() override;
  K3sHealth health() override;
  void stop() override;

  std::filesystem::path config_path() const;
  std::filesystem::path kubeconfig_path() const;
  std::filesystem::path pidfile() const;

 private:
  Status write_base_config();
  Status start();
  pid_t running_pid();

  DirectRuntimeConfig cfg_;
};

}  // namespace flotilla::agent
