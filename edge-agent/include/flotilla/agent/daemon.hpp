#pragma once
// The on-device daemon around the core: configuration, identity,
// enrollment, the MQTT session and the single-threaded event loop.
#include <atomic>
#include <chrono>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "flotilla/common/backoff.hpp"
#include "flotilla/common/options.hpp"
#include "flotilla/common/result.hpp"

namespace flotilla::agent {

struct AgentConfig {
  std::filesystem::path root = "/";
  std::string hub_url;
  std::string enrollment_token;
  std::vector<std::string> root_keys;   // "ed25519:<base64>" or key files (under root)
  unsigned key_threshold = 1;
  std::string root_keyring;             // root keyring .krg (device path): TUF-style trust store instead of root_keys
  // The hub's director key ("ed25519:<base64>" or a key file under root):
  // pinned, so enrollment must name the same key and every desired state
  // must carry a header it signed. Empty = the key the hub names at enrollment.
  std::string director_key;
  std::map<std::string, std::string> labels;
  std::string arch;
  std::string k3s_bin;                  // device path; default /usr/local/bin/k3s
  std::string node_name;
  std::string state_dir = "/var/lib/flotilla";
  std::chrono::milliseconds health_timeout{600000};
  std::chrono::milliseconds health_settle{30000};
  // TimeoutStartSec= of a unit the agent writes (0 = none, as k3s's own).
  std::chrono::milliseconds service_start_timeout{0};
  std::string k3s_role = "server";      // server or agent
  std::string k3s_server_url;           // an agent node's server (https://server:6443)
  std::string k3s_token_file;           // an agent node's join token (device path)
  std::string cluster_id;               // the cluster this node belongs to
  std::chrono::milliseconds reconnect_max{300000};
  std::string service_manager = "auto";  // auto, systemd, openrc, direct
  // Pinned CA (device path) for every TLS connection the agent makes:
  // ssl:// brokers, https:// enrollment and artifact downloads. Empty = the
  // system CA store.
  std::string tls_ca_file;
  // The hub's device CA (device path), pinned in the image: every broker
  // certificate the hub hands this device must come from it, and the
  // broker's own certificate is checked against it (with tls-ca-file). Empty
  // = the CAs the hub names at enrollment and renewal.
  std::string device_ca_file;
  std::chrono::milliseconds inventory_interval{300000};  // inventory change check; 0 = never
  std::chrono::milliseconds drift_interval{600000};  // 0 = no drift checks
  std::chrono::milliseconds supervise_interval{30000};  // k3s liveness check; 0 = never
  uint64_t min_free_bytes = 64u << 20;
  std::chrono::milliseconds revoked_after{120000};   // refusals shorter than this are propagation delay
  std::chrono::milliseconds revoked_retry{600000};   // retry period once the broker keeps refusing us
  std::chrono::milliseconds download_timeout{30000}; // per read while downloading artifacts
  // The whole download of one artifact must finish within
  // max(download_deadline_min, size / download_min_rate): a server that
  // trickles bytes just fast enough to beat download_timeout cannot hold the
  // agent forever.
  std::chrono::milliseconds download_deadline_min{300000};
  uint64_t download_min_rate = 16 * 1024;  // bytes per second
  std::string crash_at;                  // FLOTILLA_AGENT_CRASH_AT test hook (docs/agent.md)
};

// The issued_unix_ms of a signed enrollment or renewal request: now_ms, but
// at least one above the last value handed out (kept in floor_file, written
// before it is returned), so it never goes backwards across restarts.
Result<uint64_t> next_issued_ms(const std::filesystem::path& floor_file, int64_t now_ms);
void add_agent_options(Options& o);
// Validates every value; errors name the setting and where it came from.
Result<AgentConfig> agent_config_from(const Options& o);
std::string detect_arch();
// The broker reconnect policy: exponential with full jitter, seeded per
// device (and process), so a fleet that lost its broker together does not
// come back in lockstep.
Backoff make_reconnect_backoff(const std::string& device_id, std::chrono::milliseconds cap, uint64_t salt);
// The enrollment retry policy: exponential with full jitter from 1 s, seeded
// with 64 random bits so devices that boot together spread out.
Backoff make_enroll_backoff(std::chrono::milliseconds cap);
// The overall deadline of one artifact download of `bytes` bytes.
std::chrono::milliseconds download_deadline(const AgentConfig& cfg, uint64_t bytes);
// When a certificate valid from not_before to not_after (unix seconds) is
// renewed: at a point in [55 %, 66 %) of its lifetime drawn from `draw`
// (uniform in [0, 1)), so a fleet enrolled together does not renew together
// and every device renews before two thirds of its lifetime.
int64_t certificate_renew_at(int64_t not_before, int64_t not_after, double draw);
// "64MiB", "1GiB", "500MB", "12345": bytes.
Result<uint64_t> parse_size(const std::string& text);

// Runs until *stop becomes true. Returns an error only for problems a
// restart would not fix (bad configuration, unusable state directory).
Status run_agent(const AgentConfig& cfg, const std::atomic<bool>& stop);

}  // namespace flotilla::agent
