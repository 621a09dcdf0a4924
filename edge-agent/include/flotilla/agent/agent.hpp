#pragma once
// The agent core: one desired-state message in, reports out. Single-threaded;
// the daemon (daemon.hpp) and the simulator feed it. Every step of an apply
// is journaled (StateStore::journal) and the node-changing part is bracketed
// by a persisted InFlight record, so start() after a crash rolls a
// half-installed node back (docs/agent.md, "Journal and recovery").
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "flotilla/agent/seams.hpp"
#include "flotilla/bundles/bundle.hpp"
#include "flotilla/bundles/trust.hpp"
#include "flotilla/common/clock.hpp"
#include "flotilla/common/version.hpp"
#include "flotilla/v1/desired.pb.h"
#include "flotilla/v1/report.pb.h"

namespace flotilla::agent {

// The agent reports Flotilla's one version (common/version.hpp).
inline const char* const kAgentVersion = flotilla::version();

// What one desired-state message asks, once decoded and checked against the
// director key (decide_desired). Pure: no state is touched.
struct DesiredDecision {
  enum class Action {
    handle,   // go on: trust update, bundle verification, apply
    ignore,   // nothing to do (a cleared retained message, one already handled)
    refuse,   // report `reason` and change nothing
    malformed // does not parse: report REASON_MALFORMED_DESIRED
  };
  Action action = Action::handle;
  v1::Reason reason = v1::REASON_NONE;
  std::string message;
  v1::DesiredState ds;               // the parsed message (bundle, trust)
  // The fields to act on: from the verified header when signed_header.
  uint64_t generation = 0;
  std::string campaign_id;
  bool rollback = false;
  std::string artifact_base_url;
  bool signed_header = false;
  std::string manifest_sha256_hex;   // of ds.bundle().manifest(), hashed once (when handled)
  // From a verified header only: the device's labels as the hub records
  // them (when the hub sent them) and when the hub signed it.
  std::optional<std::map<std::string, std::string>> labels;
  int64_t issued_unix_ms = 0;
  // The signed header asks for `k3s certificate rotate` (K3S_ACTION_ROTATE_CERTIFICATES).
  bool rotate_certificates = false;
  // From a verified header only: the broker the hub moves this device to
  // (a cell drain) and when it signed that. Taken when the decision is not
  // a refusal, even for a generation already handled.
  std::string broker_url;
  int64_t move_issued_ms = 0;
};

// A move to another broker, as a verified desired state asked for it.
struct BrokerMove {
  std::string url;
  int64_t issued_unix_ms = 0;
};

struct DesiredContext {
  std::string device_id;
  const bundles::PublicKey* director = nullptr;  // null: the agent pins no director key
  uint64_t director_generation = 0;              // AppliedState::director_generation
  uint64_t last_generation = 0;                  // AppliedState::generation
};

// Decodes a raw desired-state payload and checks the director's header:
// size cap, parse, header present and signed by the pinned key, for this
// device, agreeing with the message (bundle digest, generation, campaign,
// rollback, artifact base), generation in range and above the signed floor.
// Without a director key: no floor (only an exact repeat of the last
// generation is ignored) and no rollback.
DesiredDecision decide_desired(std::string_view payload, const DesiredContext& ctx);

// The steps of an apply. The pipeline is a state machine: each step may only
// be followed by the ones kTransitions lists (rollback replaces restart,
// health or commit when one fails); InFlight::step persists where it is.
// rotate: `k3s certificate rotate` (k3s stopped), when the desired header asks.
enum class Step { verify, space, download, backup, snapshot, install, rotate, restart, health, commit, rollback, recover };
const char* step_name(Step s);
std::optional<Step> step_from_name(const std::string& name);
// Whether `to` may follow `from` (an apply starts at verify; recover may
// follow anything, after a crash).
bool step_allowed(std::optional<Step> from, Step to);

// The journaled steps of an apply, by name, in order.
inline const std::vector<std::string>& apply_steps() {
  static const std::vector<std::string> steps = {"verify",  "space",  "download", "backup", "snapshot", "install",
                                                 "rotate",  "restart", "health",   "commit", "rollback"};
  return steps;
}

struct CoreConfig {
  std::string device_id;
  std::string arch;                          // amd64, arm64, arm
  std::map<std::string, std::string> labels;
  bundles::Keyring keyring;                  // pinned root keys (plain keyring, `root-keys`)
  // When set (`root-keyring`), bundles are verified under this trust store
  // instead of `keyring`, and a DesiredState's trust moves it forward; it is
  // persisted to <state_dir>/trust.pb after every accepted update.
  std::optional<bundles::TrustStore> trust;
  // The hub's director key (`director-key`, or learned at enrollment). When
  // set, every desired state must carry a header signed by it, and the
  // device, generation, campaign, rollback flag, bundle and artifact base are
  // taken from that header only. When unset (agents enrolled before the hub
  // signed): a rollback is refused and a generation is never a floor
  // (docs/adr/0009-director-signed-desired-state.md).
  std::optional<bundles::PublicKey> director_key;
  // The health gate's defaults (a bundle's `health` overrides them): the
  // whole gate, and how long the node must stay Ready with a heartbeat newer
  // than the restart before workloads are checked.
  std::chrono::milliseconds health_timeout{60000};
  std::chrono::milliseconds health_settle{0};
  std::chrono::milliseconds health_poll{250};
  std::string role = "server";   // k3s role of this node (inventory)
  std::string cluster_id;        // the cluster it belongs to (inventory)
  uint64_t min_free_bytes = 16u << 20;       // refuse to install below this
  std::string state_dir = "/var/lib/flotilla";   // device path: staging/, backup/
  std::string k3s_bin = "/usr/local/bin/k3s";    // where a K3S_BINARY artifact goes
  uint64_t max_artifact_bytes = uint64_t{4} << 30;
  uint32_t max_interrupted = 3;              // crashes of one generation before giving up
  // Test hook (FLOTILLA_AGENT_CRASH_AT=<step>:<begin|end>): _exit(137) right
  // after journaling that step boundary, to prove recovery from kill -9.
  std::string crash_at;
  // Called at every journaled step boundary (step, "begin"/"end"); unit
  // tests throw from it to simulate a crash at that exact point.
  std::function<void(const std::string&, const std::string&)> step_hook;
  // Free memory in bytes; empty = sysinfo(2). Unit tests pin it.
  std::function<uint64_t()> mem_free_bytes;
};

// Whether an inventory differs from the one last sent enough to be worth a
// report: any change of k3s version, node Ready, certificate expiry, labels,
// OS, arch, hostname or agent version; free disk or memory only when it moved
// by more than 10% (and at least 16 MiB) or crossed its low mark. Keeps a fleet's
// periodic checks from turning into a report per device per tick.
bool inventory_changed(const v1::Inventory& sent, const v1::Inventory& now);
inline constexpr uint64_t kLowDiskBytes = uint64_t{1} << 30;    // 1 GiB
inline constexpr uint64_t kLowMemBytes = uint64_t{128} << 20;   // 128 MiB

class Agent {
 public:
  using Reporter = std::function<void(v1::Report&&)>;

  Agent(CoreConfig cfg, K3sRuntime& runtime, FileTree& files, StateStore& state, const Clock& clock,
        Reporter reporter, Downloader* downloader = nullptr);

  // Loads persisted state and finishes what a crash left: an unfinished
  // apply is rolled back (the retained desired state then applies it again).
  Status start();
  // Handles one raw desired-state payload end to end (verify, download,
  // install, restart, health gate, commit or roll back), reporting as it goes.
  void handle_desired(const std::string& payload);
  // The move the last verified desired state asked for, once (the daemon
  // checks and persists it, then reconnects).
  std::optional<BrokerMove> take_broker_move() {
    auto m = std::move(broker_move_);
    broker_move_.reset();
    return m;
  }
  // An inventory report (on connect and when something changed).
  void report_inventory();
  // The periodic cheap check: computes the inventory (asking k3s whether the
  // node is Ready) and reports it only if inventory_changed() against the
  // last one sent. Returns whether it reported. Not during an apply.
  bool check_inventory();
  // An idle report carrying a reason (e.g. REASON_CREDENTIALS_REVOKED after the fact).
  void report_note(v1::Reason reason, const std::string& message);
  // Compares installed files with the applied bundle; repairs and reports
  // (REASON_DRIFT) what differs. Returns the drifted paths.
  std::vector<std::string> check_drift();

  // Final outcomes not yet confirmed delivered; the daemon re-publishes them
  // after (re)connecting and calls outbox_delivered once the broker acked.
  const std::map<uint64_t, std::string>& outbox() const { return state_.outbox; }
  void outbox_delivered(uint64_t up_to_seq);

  const AppliedState& applied() const { return state_; }
  // The trust store in use (null with a plain `root-keys` keyring).
  const bundles::TrustStore* trust() const { return cfg_.trust ? &*cfg_.trust : nullptr; }
  std::string trust_state_path() const { return cfg_.state_dir + "/trust.pb"; }

  // Where each kind of bundle file lives on a device (k3s's own layout).
  static std::string path_for(const v1::BundleFile& f);
  std::string artifact_path(const v1::Artifact& a) const;

 private:
  std::optional<BrokerMove> broker_move_;
  struct Attempt {
    uint64_t generation = 0;
    std::string campaign_id;
    std::string bundle_name;
    uint64_t bundle_version = 0;
    bool signed_header = false;  // generation came from a verified director header
  };
  v1::Report make_report(v1::AgentState state, const Attempt& a, v1::Reason reason, const std::string& message,
                         uint32_t progress, bool with_inventory);
  void report(v1::AgentState state, const Attempt& a, v1::Reason reason = v1::REASON_NONE,
              const std::string& message = "", uint32_t progress = 0, bool with_inventory = false);
  // A final outcome that records the generation: persisted with the state
  // change (outbox) before it is published.
  void finish(v1::AgentState state, const Attempt& a, v1::Reason reason, const std::string& message);
  v1::Inventory inventory();
  // The device clock looks wrong (inventory clock_suspect).
  bool clock_suspect() const;
  // The time bundle validity is checked at: the device clock, unless the
  // hub's signed times show it is behind, or far ahead of the header being
  // verified (docs/agent.md, "Clock").
  int64_t verify_time_ms(int64_t header_issued_ms) const;
  v1::AppliedBundle applied_bundle() const;
  void step(const std::string& name, const char* phase, const std::string& detail = "");
  // Moves the in-flight apply to `to` (checked against the transition
  // table), persisting it when the step changes what recovery must do.
  void advance(Step to, bool persist);
  // The next report sequence number: monotonic, persisted a block ahead so
  // neither a restart nor a wrong clock reuses one.
  uint64_t next_seq();
  // The device's labels: the hub's (signed header) once sent, else enrollment's.
  const std::map<std::string, std::string>& labels() const {
    return state_.hub_labels_set ? state_.hub_labels : cfg_.labels;
  }
  struct GateResult {
    bool ok = false;
    v1::Reason reason = v1::REASON_NONE;
    std::string why;
  };
  // Node Ready with a heartbeat newer than the restart, the bundle's k3s
  // version answering, Ready held for the settling window, then the bundle's
  // workloads rolled out. Time comes from the injected clock only.
  // restarted_unix: when the restart began; back_unix: when it returned
  // (the k3s from before had stopped by then).
  GateResult health_gate(const v1::BundleManifest& m, int64_t restarted_unix, int64_t back_unix,
                         std::optional<int64_t> heartbeat_before);
  // `kubectl delete -f` of a manifest before it leaves the node (k3s deletes
  // nothing itself); what was deleted goes into the final report.
  void delete_manifest_resources(const std::string& path);
  Status save();
  std::string backup_dir() const { return cfg_.state_dir + "/backup"; }
  std::string staging_dir() const { return cfg_.state_dir + "/staging"; }
  // Returns REASON_NONE when every artifact is staged (or already installed).
  v1::Reason fetch_artifacts(const v1::BundleManifest& m, const std::string& base_url, std::string& why);
  Status stage_one(const v1::Artifact& a, const std::string& url, v1::Reason& reason);
  Status backup(const v1::BundleManifest& m);
  Status install(const v1::BundleManifest& m, std::vector<PlacedFile>& placed);
  // The manifest with its files replaced by what resolve() picks for this
  // device's labels (overlays applied): what is placed and drift-checked.
  v1::BundleManifest resolved_for_device(const v1::BundleManifest& m) const;
  // Puts the backups back; returns copies of the manifests it took off the
  // node (their resources are deleted once k3s answers again).
  std::vector<std::string> restore(const std::vector<BackupEntry>& backups);
  void recover();

  CoreConfig cfg_;
  K3sRuntime& runtime_;
  FileTree& files_;
  StateStore& store_;
  const Clock& clock_;
  Reporter reporter_;
  Downloader* downloader_;
  AppliedState state_;
  uint64_t seq_ = 0;
  std::vector<std::string> deleted_;  // resources deleted during this apply
  bool last_node_ready_ = false;
  std::optional<v1::Inventory> last_inventory_;  // the last one reported
  std::string apply_id_;
  uint64_t apply_generation_ = 0;
};

}  // namespace flotilla::agent
