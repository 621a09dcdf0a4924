#pragma once
// The embedded default broker: a real mosquitto started and configured by the
// hub. By default its only listener speaks TLS and takes a client
// certificate from the hub's device CA as the client's identity (CN = MQTT
// username = client id); an ACL confines each device to its own topics, and
// enrolling a device changes nothing in it (docs/security.md,
// docs/adr/0013-device-certificates.md). Passwords remain for devices
// enrolled before certificates (a second listener, until they renew) and for
// the development mode without TLS.
#include <atomic>
#include <chrono>
#include <functional>
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

// How clients authenticate to the embedded broker.
enum class BrokerAuth {
  // TLS with a client certificate from the device CA, nothing else (the default).
  certificate,
  // Passwords (development: plain MQTT unless tls_cert_file is set); every
  // enrollment rewrites the password file and reloads the broker.
  password,
};

struct BrokerConfig {
  // <data-dir>/broker. The hub's: when the hub runs as root, mosquitto
  // (which drops to its own user) may read mosquitto.conf, acl, passwd and
  // tls/ through its group and write only state/ (its persistence). Nothing
  // the hub reads or writes is in a directory the broker's user can change,
  // and the hub opens everything here relative to a descriptor of this
  // directory, never following a link (docs/security.md, "File modes and users").
  std::filesystem::path dir;
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
  BrokerAuth auth = BrokerAuth::certificate;
  // Certificate auth: the CAs whose client certificates the listener takes
  // (the device CA bundle), the revocation list(s) it loads, and its own
  // certificate and key when tls_cert_file is empty (made by the device CA).
  std::string client_ca_pem;
  std::string crl_pem;
  std::string server_cert_pem;
  std::string server_key_pem;
  bool tls() const { return auth == BrokerAuth::certificate || !tls_cert_file.empty(); }
  // Queue limits per client (mosquitto's max_queued_messages and
  // max_queued_bytes). The hub's own persistent session holds the devices'
  // reports while the hub is away, so they are sized for it.
  int64_t max_queued_messages = 1000000;
  int64_t max_queued_bytes = int64_t{256} << 20;
  // The user the broker drops to when started by root.
  std::string broker_user = "mosquitto";
};

// The largest MQTT packet mosquitto accepts (max_packet_size): the largest
// legitimate message, a desired state carrying a bundle and the trust chain
// inline (bundles::kMaxDesiredStateBytes), plus room for the topic and
// headers. A client that announces more is disconnected before mosquitto
// reads the payload.
size_t broker_max_packet_size();

// A broker account with no topics of its own, whose password changes with
// every password-file rewrite: logging in with it tells that a reload took.
inline constexpr const char* kReloadProbeUser = "flotilla-reload-probe";

// One MQTT 3.1.1 CONNECT packet (clean session, keepalive 5 s) with user
// name and password (each left out when empty): what the reload probe
// sends over a raw socket.
std::string mqtt_connect_packet(const std::string& client_id, const std::string& user, const std::string& password);

// A client certificate and its private key, PEM (held in memory only).
struct ClientIdentity {
  std::string cert_pem;
  std::string key_pem;
};

class EmbeddedBroker {
 public:
  using Credentials = std::vector<std::pair<std::string, std::string>>;  // username, hash

  // devices: the password credentials in the store. With certificate auth
  // they are the devices enrolled before certificates: while there are any,
  // a second listener (legacy_url()) takes their passwords, on the port they
  // were given.
  static Result<std::unique_ptr<EmbeddedBroker>> start(const BrokerConfig& cfg, const Credentials& devices);
  ~EmbeddedBroker();

  // The listener devices are told about: ssl:// with certificate auth.
  std::string url() const;
  // The password listener of devices enrolled before certificates; empty without one.
  std::string legacy_url() const;
  bool certificate_auth() const { return cfg_.auth == BrokerAuth::certificate; }
  const std::string& hub_username() const { return cfg_.hub_username; }
  const std::string& hub_password() const { return hub_password_; }
  // Rewrites the password file and has mosquitto reload it (SIGHUP);
  // returns once the broker runs on the new file (proved by logging in with
  // the probe account), or unavailable after reload_timeout.
  Status set_device_credentials(const Credentials& devices);
  // Writes a new revocation list and has mosquitto reload it; returns once
  // the broker refuses `probe` (a certificate revoked by this list and by no
  // earlier one) as revoked, or unavailable after reload_timeout. Only a
  // decommission (and the periodic refresh of the list) calls it.
  Status set_crl(const std::string& crl_pem, const ClientIdentity& probe);
  // Connects once as `who` (a certificate with a device's CN) with a clean
  // session: mosquitto closes that client's current connection and drops its
  // stored session. A decommissioned device's open connection ends so.
  Status take_over_session(const ClientIdentity& who);
  // SIGHUPs sent to mosquitto since start (a reload re-reads every file).
  uint64_t reloads() const { return reloads_.load(); }
  // Times the watchdog found the broker dead and started it again.
  uint64_t restarts() const { return restarts_.load(); }
  // False from when the watchdog finds mosquitto dead until it listens again.
  bool running() const { return running_.load(); }
  void stop();
  pid_t pid() const { return child_.pid(); }

 private:
  EmbeddedBroker() = default;
  Status open_dir();
  Status prepare_state_dir();
  Status install_tls_files();
  Status write_config();
  Status write_passwords(const Credentials& devices);
  // Sends SIGHUP until done() holds or reload_timeout passes (mu_ held).
  Status reload_until(const std::function<bool()>& done, const std::string& what);
  Status pick_ports(bool legacy);
  // A file mosquitto reads: root-owned, group-readable by the broker's group
  // when it drops to its own user; the hub's alone otherwise.
  Status write_broker_file(int dir_fd, const std::string& name, const std::string& content);
  Status launch();
  bool probe_login() const;
  int password_port() const { return cfg_.auth == BrokerAuth::password ? cfg_.port : legacy_port_; }
  void stop_stale();
  void watchdog();

  BrokerConfig cfg_;
  std::string hub_password_;
  std::string probe_password_;  // changes with every password-file rewrite
  bool run_as_root_ = false;
  // Root hub, mosquitto drops to cfg_.broker_user: that user's ids.
  bool drops_privileges_ = false;
  uid_t broker_uid_ = 0;
  gid_t broker_gid_ = 0;
  int dir_fd_ = -1;  // cfg_.dir, opened with O_NOFOLLOW
  std::mutex mu_;
  proc::Child child_;
  std::atomic<bool> stopping_{false};
  std::thread watchdog_;
  int legacy_port_ = 0;  // 0: no password listener beside the certificate one
  bool legacy_tls_ = false;
  std::atomic<uint64_t> reloads_{0};
  std::atomic<uint64_t> restarts_{0};
  std::atomic<bool> running_{false};
};

// Finds a free TCP port on host by binding port 0.
Result<int> free_port(const std::string& host = "127.0.0.1");
// A free port outside the kernel's ephemeral range, for listeners that must
// get the same port back after a restart.
Result<int> free_listen_port(const std::string& host = "127.0.0.1");
// Polls until host:port accepts a TCP connection or the deadline passes.
bool wait_for_port(const std::string& host, int port, std::chrono::milliseconds timeout);

}  // namespace flotilla::hub
