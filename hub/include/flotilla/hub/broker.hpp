#pragma once
// The embedded default broker: a real mosquitto started and configured by the
// hub, with anonymous access off, a password file and an ACL that confines
// each device to its own topics (docs/security.md).
#include <atomic>
#include <chrono>
#include <filesystem>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "flotilla/common/process.hpp"
#include "flotilla/common/result.hpp"

namespace flotilla::hub {

// mosquitto's password-file hash: $7$<iterations>$<b64 salt>$<b64 PBKDF2-HMAC-SHA512>.
// One iteration: every password the hub issues is a random 192-bit value, so
// stretching adds nothing against guessing, while mosquitto re-hashes the
// password of every connected client at each reload (SIGHUP after an
// enrollment). With mosquitto's default of 101 that made direct enrollment
// quadratic: 14 devices/s with 4,000 sessions connected.
std::string mosquitto_password_hash(const std::string& password, int iterations = 1);

struct BrokerConfig {
  std::filesystem::path dir;                // <data-dir>/broker
  std::string mosquitto_bin = "/usr/sbin/mosquitto";
  std::string listen_host = "127.0.0.1";
  int port = 0;                             // 0 = a free port, then kept across restarts
  std::string hub_username = "flotilla-hub";
  std::chrono::milliseconds reload_timeout{15000};  // for a password-file reload to take effect
  // Both set: the only listener speaks TLS 1.2+ (no plain port at all) and
  // url() is ssl://. Copied into <dir>/tls/ at every start, where mosquitto's
  // user can read them.
  std::string tls_cert_file;
  std::string tls_key_file;
  std::string tls_ca_file;  // optional; checked to parse, used by the hub's own client
  bool tls() const { return !tls_cert_file.empty(); }
};

// A broker account with no topics of its own, whose password changes with
// every password-file rewrite: logging in with it tells that a reload took.
inline constexpr const char* kReloadProbeUser = "flotilla-reload-probe";

// One MQTT 3.1.1 CONNECT packet (clean session, keepalive 5 s) with user
// name and password: what the reload probe sends over a raw socket.
std::string mqtt_connect_packet(const std::string& client_id, const std::string& user, const std::string& password);

class EmbeddedBroker {
 public:
  using Credentials = std::vector<std::pair<std::string, std::string>>;  // username, hash

  static Result<std::unique_ptr<EmbeddedBroker>> start(const BrokerConfig& cfg, const Credentials& devices);
  ~EmbeddedBroker();

  std::string url() const;
  const std::string& hub_username() const { return cfg_.hub_username; }
  const std::string& hub_password() const { return hub_password_; }
  // Rewrites the password file and has mosquitto reload it (SIGHUP);
  // returns once the broker runs on the new file (proved by logging in with
  // the probe account), or unavailable after reload_timeout.
  Status set_device_credentials(const Credentials& devices);
  void stop();
  pid_t pid() const { return child_.pid(); }

 private:
  EmbeddedBroker() = default;
  Status install_tls_files();
  Status write_config();
  Status write_passwords(const Credentials& devices);
  Status launch();
  bool probe_login() const;
  void stop_stale();
  void watchdog();

  BrokerConfig cfg_;
  std::string hub_password_;
  std::string probe_password_;  // changes with every password-file rewrite
  bool run_as_root_ = false;
  std::mutex mu_;
  proc::Child child_;
  std::atomic<bool> stopping_{false};
  std::thread watchdog_;
};

// Finds a free TCP port on host by binding port 0.
Result<int> free_port(const std::string& host = "127.0.0.1");
// A free port outside the kernel's ephemeral range, for listeners that must
// get the same port back after a restart.
Result<int> free_listen_port(const std::string& host = "127.0.0.1");
// Polls until host:port accepts a TCP connection or the deadline passes.
bool wait_for_port(const std::string& host, int port, std::chrono::milliseconds timeout);

}  // namespace flotilla::hub
