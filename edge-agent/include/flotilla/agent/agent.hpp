#pragma once
// The agent core: one desired-state message in, reports out. Single-threaded;
// the daemon (session.hpp) and the simulator feed it.
#include <functional>
#include <map>
#include <string>

#include "flotilla/agent/seams.hpp"
#include "flotilla/bundles/bundle.hpp"
#include "flotilla/common/clock.hpp"
#include "flotilla/v1/desired.pb.h"
#include "flotilla/v1/report.pb.h"

namespace flotilla::agent {

inline constexpr const char* kAgentVersion = "0.1.0";

struct CoreConfig {
  std::string device_id;
  std::string arch;                          // amd64, arm64, arm
  std::map<std::string, std::string> labels;
  bundles::Keyring keyring;                  // pinned root keys
  std::chrono::milliseconds health_timeout{60000};
  std::chrono::milliseconds health_poll{250};
  uint64_t min_free_bytes = 16u << 20;       // refuse to install below this
};

class Agent {
 public:
  using Reporter = std::function<void(v1::Report&&)>;

  Agent(CoreConfig cfg, K3sRuntime& runtime, FileTree& files, StateStore& state, const Clock& clock,
        Reporter reporter);

  Status start();  // loads persisted state
  // Handles one raw desired-state payload end to end (verify, install,
  // restart, health gate, commit or roll back), reporting as it goes.
  void handle_desired(const std::string& payload);
  // An inventory report (on connect and when something changed).
  void report_inventory();

  const AppliedState& applied() const { return state_; }

  // Where each kind of bundle file lives on a device (k3s's own layout).
  static std::string path_for(const v1::BundleFile& f);

 private:
  struct Attempt {
    uint64_t generation = 0;
    std::string campaign_id;
    std::string bundle_name;
    uint64_t bundle_version = 0;
  };
  void report(v1::AgentState state, const Attempt& a, v1::Reason reason = v1::REASON_NONE,
              const std::string& message = "", uint32_t progress = 0, bool with_inventory = false);
  v1::Inventory inventory();
  v1::AppliedBundle applied_bundle() const;
  using Backup = std::map<std::string, std::optional<FileData>>;
  Status install(const v1::BundleManifest& m, Backup& backup, std::vector<PlacedFile>& placed);
  void restore(const Backup& backup);

  CoreConfig cfg_;
  K3sRuntime& runtime_;
  FileTree& files_;
  StateStore& store_;
  const Clock& clock_;
  Reporter reporter_;
  AppliedState state_;
  uint64_t seq_ = 0;
  bool last_node_ready_ = false;
};

}  // namespace flotilla::agent
