#pragma once
// Test harness for [integration] tests: real flotilla-hub (with its embedded
// mosquitto), real flotilla-agent processes with the k3s stand-in, the real
// CLI — all on loopback, every wait bounded by a deadline.
#include <chrono>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "flotilla/bundles/bundle.hpp"
#include "tests/support/temp_dir.hpp"
#include "flotilla/common/http_client.hpp"
#include "flotilla/common/process.hpp"
#include "flotilla/common/transport.hpp"
#include "flotilla/v1/enroll.pb.h"

namespace flotilla::test {

namespace stdfs = std::filesystem;
using nlohmann::json;

std::string bin_dir();     // $FLOTILLA_BIN_DIR
// Runs flotilla-hub on data with extra arguments until it exits (a start it
// must refuse), within 20 s; throws if it cannot be run at all.
proc::RunResult run_hub_expecting_exit(const std::filesystem::path& data, const std::vector<std::string>& extra);
std::string source_dir();  // $FLOTILLA_SOURCE_DIR


// Polls pred every 50 ms until it holds or the timeout passes.
bool wait_until(const std::function<bool()>& pred, std::chrono::milliseconds timeout);

// A port free now on 127.0.0.1 for a server a test starts (etcd, a region's
// hub, a stand-in), from below the kernel's ephemeral range
// (hub::free_listen_port): a port bind(0) handed out is as likely to go to
// the next outgoing connection of a test running beside this one before the
// server binds it, and a server restarted on its port must find it free.
int free_loopback_port();

struct CliResult {
  int exit_code = -1;
  std::string out;
  std::string err;
};

class Hub {
 public:
  explicit Hub(stdfs::path data_dir);
  ~Hub();
  void start();            // waits for /readyz
  // Same, with more hub flags (e.g. --tls-cert/--tls-key). A non-empty
  // ca_file is then used for every https request of call() and cli().
  void start(const std::vector<std::string>& extra_args, const std::string& ca_file = "");
  void stop();             // SIGTERM
  void kill9();
  const std::string& url() const { return url_; }
  std::string admin_token() const;
  const stdfs::path& data_dir() const { return data_; }

  // REST with the admin token. Returns status and parsed body (null if not JSON).
  std::pair<int, json> call(const std::string& method, const std::string& path, const std::string& body = "",
                            const std::string& content_type = "application/json",
                            std::optional<std::string> token = std::nullopt);
  // The flotilla CLI pointed at this hub.
  CliResult cli(const std::vector<std::string>& args);
  // The CLI's local commands (key, bundle build/sign/verify/inspect).
  static CliResult cli_local(const std::vector<std::string>& args);
  // Broker address and the hub's own credential (for tests that speak MQTT).
  std::string broker_url() const;
  std::string broker_password() const;
  // The CAs a broker client trusts for the embedded broker's certificate
  // (the hub's device CA, which made it).
  std::string broker_ca_file() const;
  // Options to connect to the embedded broker as `cn` with a client
  // certificate from the hub's device CA (made now, files under dir): what a
  // test uses to act as a device or as an extra client the ACL names.
  transport::ConnectOptions broker_client(const std::string& cn, const stdfs::path& dir) const;
  // Options to connect as a device enrolled by hand: its certificate from
  // the enrollment answer and its identity key, written under dir.
  transport::ConnectOptions device_session(const bundles::KeyPair& key, const v1::EnrollResponse& resp,
                                           const stdfs::path& dir) const;

  // An enrollment token for max_uses devices (0 = no use limit), whose
  // devices may set the label keys in device_label_keys themselves.
  std::string enrollment_token(const std::map<std::string, std::string>& labels, int max_uses = 0,
                               const std::vector<std::string>& device_label_keys = {});
  // An enrollment token whose devices belong to project (made with the admin token).
  std::string project_enrollment_token(const std::string& project, const std::map<std::string, std::string>& labels,
                                       int max_uses = 0);
  // A new API token (secret) with role and project, made with the admin token.
  std::string api_token(const std::string& role, const std::string& project);
  // Every audit entry, oldest first (follows the pages).
  json audit();
  json device(const std::string& id);
  json devices(const std::string& selector = "");
  json campaign(const std::string& id, bool with_devices = false);
  std::string log() const;

 private:
  stdfs::path data_;
  std::string url_;
  std::string ca_file_;
  proc::Child child_;
};

struct AgentOptions {
  std::map<std::string, std::string> labels;
  std::vector<std::string> root_keys;  // ed25519:<b64>
  std::string health_timeout = "8s";
  std::string health_settle = "1s";
  // Another agent binary (default: bin_dir()/flotilla-agent) and a command
  // that runs it (e.g. {"qemu-aarch64-static"} for a cross-built agent).
  std::string binary;
  std::vector<std::string> launcher;
};

class Agent {
 public:
  Agent(stdfs::path root, std::string hub_url, std::string enrollment_token, AgentOptions opts);
  ~Agent();
  void start();
  void stop();
  void kill9();
  const stdfs::path& root() const { return root_; }
  // Device id once enrolled (read from the agent's credentials file).
  std::string device_id() const;
  std::string mqtt_password() const;
  // Options to connect to the broker with this agent's own certificate and
  // key (what it received at enrollment), client id = its device id.
  transport::ConnectOptions broker_options(const std::string& url) const;
  std::string log() const;
  // Starts with extra environment (e.g. FLOTILLA_AGENT_CRASH_AT).
  void start_with_env(const std::map<std::string, std::string>& env);
  // The exit status once the agent process ended, or nullopt at the timeout.
  std::optional<int> wait_exit(std::chrono::milliseconds timeout);
  // Appends lines to the agent's config file (before start).
  void append_config(const std::string& yaml_lines);
  pid_t pid() const { return child_.pid(); }

 private:
  void kill_k3s();
  stdfs::path root_;
  std::string hub_url_, token_;
  AgentOptions opts_;
  proc::Child child_;
};

// Polls until the agent has enrolled and its hub shows the device online.
bool wait_agent_online(Hub& hub, const Agent& agent, std::chrono::milliseconds timeout);

// The hub's /metrics text (as its admin); throws when it does not answer 200.
std::string metrics_text(Hub& hub);
// The value of one sample line (name and labels exactly as printed) in
// /metrics text; -1 when the sample is absent.
double metric(const std::string& text, const std::string& sample);

// A certificate request (DER) for a device's identity key, CN = its device
// id: what EnrollRequest.csr carries.
std::string device_csr(const bundles::KeyPair& key);

// Per-file (sha256, mode) of every regular file under root, excluding paths
// that start with one of the given relative prefixes (and k3s's datastore,
// which k3s itself changes as it runs).
std::map<std::string, std::string> snapshot(const stdfs::path& root, const std::vector<std::string>& exclude);
// The paths whose content or mode differ between two snapshots (added,
// removed or changed), one per line: what a failed comparison prints.
std::string snapshot_diff(const std::map<std::string, std::string>& a, const std::map<std::string, std::string>& b);

// An unsigned manifest on channel "stable", valid for an hour from now, with
// these files (kind, name, content), each mode 0644 with its sha256.
using BundleFiles = std::vector<std::tuple<v1::FileKind, std::string, std::string>>;
v1::BundleFile make_file(v1::FileKind kind, const std::string& name, const std::string& content);
v1::BundleManifest make_manifest(const std::string& name, uint64_t version, const BundleFiles& files = {});
// Appends the airgap-images artifact "images.tar", claiming this sha256 and
// size, fetched from url (relative: the hub's artifact base).
void add_airgap_artifact(v1::BundleManifest& m, const std::string& sha256_hex, uint64_t size, const std::string& url);

// A signed bundle built directly with the bundles library.
struct BuiltBundle {
  v1::SignedBundle envelope;
  std::string bytes;
};
BuiltBundle make_bundle(const std::string& name, uint64_t version, const BundleFiles& files,
                        const std::vector<const bundles::KeyPair*>& signers,
                        const std::vector<v1::Overlay>& overlays = {});

// A hub and n agents enrolled with one token, all online (k3s running)
// before the constructor returns.
struct Fleet {
  TempDir tmp;
  Hub hub{tmp.path() / "hub"};
  bundles::KeyPair release = bundles::generate_key();
  std::vector<std::unique_ptr<Agent>> agents;

  // hub_args: extra flags for the hub (e.g. {"--cells", "3"}).
  explicit Fleet(int n, std::map<std::string, std::string> labels = {{"env", "it"}},
                 const std::vector<std::string>& hub_args = {});
  // Uploads a built bundle; returns its id.
  std::string push(const BuiltBundle& b);
  // Waits until exactly the listed agents are online (the others offline).
  bool wait_online(size_t count, std::chrono::seconds timeout = std::chrono::seconds(180));
};

// Creates a campaign and waits until it leaves "running" (or the timeout).
json run_campaign(Hub& hub, const std::string& bundle_id, const std::string& selector,
                  std::chrono::seconds timeout = std::chrono::seconds(60));

}  // namespace flotilla::test
